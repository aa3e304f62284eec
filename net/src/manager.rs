//! The interface manager: the [`NicRegistry`] NIC drivers register their NICs with, the
//! table of interfaces, addresses and routes behind the configuration lock, and one task
//! per interface that runs it.
//!
//! # Names
//! A registered NIC becomes `ethN` with the lowest free N. Names are stable: removing
//! `eth1` renames nobody, and a NIC that comes back with the same [`Nic::id`] gets its old
//! name again if nobody took it meanwhile (the last [`REMEMBERED_NAMES`] removals are
//! remembered).
//!
//! # Locking
//! [`InterfaceTable`] is what the configuration lock (the product's rtnl) protects: a
//! driver registers and unregisters with the lock held, and everything that changes the
//! table takes it. Interface tasks take it only to record a change of their own
//! addresses, and never wait for it with traffic pending: they apply a new lease to
//! smoltcp at once, try the lock, and if a probe is holding it they keep serving while
//! they wait for it alongside their other events.
//!
//! Readers that must not wait for a probe (the status page, served by interface tasks)
//! read a copy of the table that every change publishes, the way Linux reads its device
//! list under RCU instead of rtnl.
//!
//! # Interface tasks
//! Each interface is served by a task named `net:ethN` that loops: poll the
//! [`Interface`], then wait for whichever comes first: the NIC reports a change
//! ([`Nic::changed`]), smoltcp's poll delay passes, the interface is unregistered, or
//! (with a change to record) the configuration lock is free. It ends when the NIC is
//! removed or unregistered, or the manager is dropped, and takes the interface's smoltcp
//! state, sockets and buffers with it.
//!
//! # The Azure agent
//! With [`ManagerConfig::azure`] enabled, the manager owns one
//! [`AzureAgent`] and attaches it to every interface it registers. It runs on
//! the first interface whose lease gives it a route to the WireServer (the one holding
//! the default route when the agent comes up) and moves to the next interface with a
//! route if that one goes before the agent is done; an interface task also wakes for
//! that hand-over ([`Interface::azure_claim_event`]). [`InterfaceManager::azure_status`]
//! and the status page's `azure` object show its progress.

use alloc::borrow::Cow;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::rc::{Rc, Weak};
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::fmt;
use core::future::{poll_fn, Future};
use core::pin::Pin;
use core::task::Poll;

use hvnet_netvsc::nic::{MtuError, Nic, NicRegistry};
use hvnet_runtime::config_lock::{ConfigGuard, Lock};
use hvnet_runtime::sync::{Event, EventWait};
use hvnet_runtime::{ConfigLock, Duration, Handle, Instant, JoinHandle, Sleep};
use smoltcp::wire::{Ipv4Address, Ipv4Cidr};

use crate::azure::{AzureAgent, AzureConfig, AzureStatus};
use crate::device::{DeviceStats, MIN_IP_MTU};
use crate::iface::{Interface, InterfaceConfig, InterfaceEvent, IpConfig};
use crate::services::status::{InterfaceStatus, StatusSnapshot, StatusSource};

/// How many removed NICs' names are remembered for their return.
pub const REMEMBERED_NAMES: usize = 64;

/// How long an interface task waits before polling again when the NIC had no send room
/// and did not say it has some now (a floor, so a full NIC cannot make it spin).
pub const TX_RETRY: Duration = Duration::from_millis(1);

/// Settings of the manager.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// The configuration lock's name in logs and deadlock reports.
    pub lock_name: Cow<'static, str>,
    /// Settings every new interface gets.
    pub interface: InterfaceConfig,
    /// The Azure agent (off by default).
    pub azure: AzureConfig,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            lock_name: Cow::Borrowed("rtnl"),
            interface: InterfaceConfig::default(),
            azure: AzureConfig::default(),
        }
    }
}

/// A route in the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Destination network (`0.0.0.0/0` for the default route).
    pub destination: Ipv4Cidr,
    /// Next hop; `None` for a network reached directly.
    pub gateway: Option<Ipv4Address>,
    /// Outgoing interface.
    pub interface: String,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.destination)?;
        if let Some(gateway) = self.gateway {
            write!(f, " via {gateway}")?;
        }
        write!(f, " dev {}", self.interface)
    }
}

struct Entry {
    name: String,
    serial: u64,
    nic: Rc<dyn Nic>,
    id: String,
    ip: Option<IpConfig>,
    stop: Rc<Event>,
    task: JoinHandle<()>,
    stats: Rc<Cell<DeviceStats>>,
}

impl Drop for Entry {
    /// However the entry goes (unregistered, or the whole manager dropped), its task
    /// stops.
    fn drop(&mut self) {
        self.stop.set();
    }
}

/// What the status page reads without the lock: a copy of the table's entries.
#[derive(Clone)]
struct Published {
    name: String,
    id: String,
    nic: Rc<dyn Nic>,
    ip: Option<IpConfig>,
    stats: Rc<Cell<DeviceStats>>,
}

/// The interfaces, their addresses and routes: what the configuration lock protects.
/// Get it with `manager.config_lock().lock().await`.
pub struct InterfaceTable {
    /// By N of `ethN`, so iteration is in name order.
    entries: BTreeMap<u32, Entry>,
    /// Names of removed NICs by id, oldest first.
    remembered: Vec<(String, u32)>,
    next_serial: u64,
    published: Rc<RefCell<Vec<Published>>>,
}

/// A view of one interface in the [`InterfaceTable`].
#[derive(Clone, Copy)]
pub struct InterfaceRef<'a> {
    entry: &'a Entry,
}

impl<'a> InterfaceRef<'a> {
    /// `ethN`.
    pub fn name(&self) -> &'a str {
        &self.entry.name
    }

    /// The NIC.
    pub fn nic(&self) -> &'a Rc<dyn Nic> {
        &self.entry.nic
    }

    /// The NIC's id when it was registered.
    pub fn id(&self) -> &'a str {
        &self.entry.id
    }

    /// The IPv4 configuration recorded for it.
    pub fn ip_config(&self) -> Option<&'a IpConfig> {
        self.entry.ip.as_ref()
    }

    /// Its address with prefix, if configured.
    pub fn address(&self) -> Option<Ipv4Cidr> {
        self.entry.ip.as_ref().map(|ip| ip.address)
    }

    /// Whether its task is still running.
    pub fn task_running(&self) -> bool {
        !self.entry.task.is_finished()
    }

    /// The glue's counters.
    pub fn device_stats(&self) -> DeviceStats {
        self.entry.stats.get()
    }
}

impl fmt::Debug for InterfaceRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Interface")
            .field("name", &self.entry.name)
            .field("id", &self.entry.id)
            .field("ip", &self.entry.ip)
            .finish_non_exhaustive()
    }
}

impl InterfaceTable {
    fn new() -> Self {
        InterfaceTable {
            entries: BTreeMap::new(),
            remembered: Vec::new(),
            next_serial: 1,
            published: Rc::new(RefCell::new(Vec::new())),
        }
    }

    /// How many interfaces there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every interface, in name order (`eth0`, `eth1`, ..., `eth10`).
    pub fn iter(&self) -> impl Iterator<Item = InterfaceRef<'_>> {
        self.entries.values().map(|entry| InterfaceRef { entry })
    }

    /// The names, in order.
    pub fn names(&self) -> Vec<String> {
        self.entries.values().map(|e| e.name.clone()).collect()
    }

    /// The interface called `name`.
    pub fn get(&self, name: &str) -> Option<InterfaceRef<'_>> {
        self.iter().find(|i| i.name() == name)
    }

    /// The interface of `nic`.
    pub fn find(&self, nic: &Rc<dyn Nic>) -> Option<InterfaceRef<'_>> {
        self.iter().find(|i| same_nic(i.nic(), nic))
    }

    /// The routing table: a connected route per configured interface, and a default
    /// route per interface whose lease named a router.
    pub fn routes(&self) -> Vec<Route> {
        let mut routes = Vec::new();
        for entry in self.entries.values() {
            let Some(ip) = &entry.ip else { continue };
            routes.push(Route {
                destination: ip.address.network(),
                gateway: None,
                interface: entry.name.clone(),
            });
            if let Some(gateway) = ip.gateway {
                routes.push(Route {
                    destination: Ipv4Cidr::new(Ipv4Address::UNSPECIFIED, 0),
                    gateway: Some(gateway),
                    interface: entry.name.clone(),
                });
            }
        }
        routes
    }

    /// The default route, if any interface has one (the lowest-named wins).
    pub fn default_route(&self) -> Option<Route> {
        self.routes()
            .into_iter()
            .find(|r| r.destination.prefix_len() == 0)
    }

    /// The N for a NIC with `id`: its remembered one if free, else the lowest free.
    fn pick_index(&mut self, id: &str) -> u32 {
        if let Some(position) = self.remembered.iter().position(|(r, _)| r == id) {
            let (_, index) = self.remembered.remove(position);
            if !self.entries.contains_key(&index) {
                return index;
            }
        }
        (0..)
            .find(|n| !self.entries.contains_key(n))
            .unwrap_or(u32::MAX)
    }

    fn remember(&mut self, id: String, index: u32) {
        self.remembered.retain(|(r, _)| *r != id);
        if self.remembered.len() >= REMEMBERED_NAMES {
            self.remembered.remove(0);
        }
        self.remembered.push((id, index));
    }

    /// Records changes an interface task reported. Entries that are gone are skipped.
    fn record(&mut self, serial: u64, events: &mut Vec<InterfaceEvent>) {
        let entry = self.entries.values_mut().find(|e| e.serial == serial);
        if let Some(entry) = entry {
            for event in events.iter() {
                match event {
                    InterfaceEvent::Configured(ip) => entry.ip = Some(ip.clone()),
                    InterfaceEvent::Deconfigured => entry.ip = None,
                    InterfaceEvent::LinkUp | InterfaceEvent::LinkDown => {}
                }
            }
        }
        events.clear();
        self.publish();
    }

    /// Copies the table to where lock-free readers find it.
    fn publish(&self) {
        let copy = self
            .entries
            .values()
            .map(|e| Published {
                name: e.name.clone(),
                id: e.id.clone(),
                nic: e.nic.clone(),
                ip: e.ip.clone(),
                stats: e.stats.clone(),
            })
            .collect();
        *self.published.borrow_mut() = copy;
    }
}

impl fmt::Debug for InterfaceTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Two handles to one NIC (compares the objects, not vtables).
fn same_nic(a: &Rc<dyn Nic>, b: &Rc<dyn Nic>) -> bool {
    core::ptr::addr_eq(Rc::as_ptr(a), Rc::as_ptr(b))
}

struct Shared {
    handle: Handle,
    config: ManagerConfig,
    table: ConfigLock<InterfaceTable>,
    /// The same cell as the table's `published`.
    published: Rc<RefCell<Vec<Published>>>,
    azure: AzureAgent,
}

impl StatusSource for Shared {
    fn snapshot(&self) -> StatusSnapshot {
        let published = self.published.borrow();
        StatusSnapshot {
            uptime: self.handle.now().saturating_duration_since(Instant::ZERO),
            interfaces: published
                .iter()
                .map(|p| InterfaceStatus {
                    name: p.name.clone(),
                    id: p.id.clone(),
                    mac: p.nic.mac(),
                    mtu: p.nic.mtu(),
                    link_up: p.nic.link_up() && !p.nic.is_removed(),
                    addresses: p.ip.iter().map(|ip| ip.address).collect(),
                    gateway: p.ip.as_ref().and_then(|ip| ip.gateway),
                    dns: p.ip.as_ref().map(|ip| ip.dns.clone()).unwrap_or_default(),
                    queues: (0..p.nic.queue_count())
                        .map(|q| p.nic.queue_stats(q))
                        .collect(),
                    device: p.stats.get(),
                })
                .collect(),
            azure: Some(self.azure.status()),
        }
    }
}

/// The network side's [`NicRegistry`]. Cheap to clone (all clones are one manager).
///
/// The appliance creates one and hands clones to its NIC drivers:
///
/// ```
/// use hvnet_net::{InterfaceManager, ManagerConfig};
/// use hvnet_netvsc::nic::NicRegistry;
/// use hvnet_runtime::sim::Simulation;
///
/// let sim = Simulation::new(1);
/// let manager = InterfaceManager::new(sim.handle(), ManagerConfig::default());
/// let registry = manager.clone(); // what a NIC driver keeps
/// sim.run(async move {
///     // A probe takes the lock, brings its NIC up, then calls
///     // `registry.register(&mut table, nic)` before letting go.
///     let table = registry.config_lock().lock().await;
///     assert!(table.is_empty());
/// })
/// .unwrap();
/// assert!(manager.snapshot().interfaces.is_empty());
/// ```
#[derive(Clone)]
pub struct InterfaceManager {
    shared: Rc<Shared>,
}

impl InterfaceManager {
    /// A manager with no interfaces, spawning its tasks on `handle`.
    pub fn new(handle: Handle, config: ManagerConfig) -> Self {
        let table = InterfaceTable::new();
        let published = table.published.clone();
        // Drawn only when the agent runs, so a manager without it leaves the runtime's
        // random sequence as it was.
        let seed = if config.azure.enabled {
            handle.random_u64()
        } else {
            0
        };
        let azure = AzureAgent::new(config.azure.clone(), seed);
        InterfaceManager {
            shared: Rc::new(Shared {
                handle,
                table: ConfigLock::new(config.lock_name.clone(), table),
                config,
                published,
                azure,
            }),
        }
    }

    /// What the status page would show now.
    pub fn snapshot(&self) -> StatusSnapshot {
        self.shared.snapshot()
    }

    /// The Azure agent's progress (also in [`snapshot`](Self::snapshot)).
    pub fn azure_status(&self) -> AzureStatus {
        self.shared.azure.status()
    }
}

/// Why [`InterfaceManager::set_mtu`] changed nothing (or not what was asked).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SetMtuError {
    /// No interface has that name.
    NoSuchInterface(String),
    /// Below what the stack works with (IPv4 needs 576-byte datagrams to pass).
    BelowStackMinimum {
        /// The MTU asked for.
        mtu: usize,
        /// [`MIN_IP_MTU`].
        min: usize,
    },
    /// The NIC refused or failed the change.
    Nic(MtuError),
}

impl fmt::Display for SetMtuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoSuchInterface(name) => write!(f, "no interface {name}"),
            Self::BelowStackMinimum { mtu, min } => {
                write!(f, "MTU {mtu} is below the network stack's minimum {min}")
            }
            Self::Nic(e) => write!(f, "{e}"),
        }
    }
}

impl InterfaceManager {
    /// Changes interface `name`'s MTU. The NIC re-attaches to its host with the new
    /// value (netvsc: as Linux's `netvsc_change_mtu`), under the config lock, so no
    /// probe, removal or other change runs meanwhile; the interface keeps its name,
    /// addresses and sockets, and smoltcp sees the new MTU from its next poll.
    pub async fn set_mtu(&self, name: &str, mtu: usize) -> Result<(), SetMtuError> {
        if mtu < MIN_IP_MTU {
            return Err(SetMtuError::BelowStackMinimum {
                mtu,
                min: MIN_IP_MTU,
            });
        }
        let table = self.shared.table.lock().await;
        let nic = table
            .get(name)
            .map(|i| i.nic().clone())
            .ok_or_else(|| SetMtuError::NoSuchInterface(String::from(name)))?;
        let old = nic.mtu();
        let result = nic.set_mtu(mtu).await.map_err(SetMtuError::Nic);
        match &result {
            Ok(()) => log::info!("{name}: MTU {old} -> {}", nic.mtu()),
            Err(e) => log::warn!("{name}: MTU {old} -> {mtu} refused: {e}"),
        }
        drop(table);
        result
    }
}

impl fmt::Debug for InterfaceManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InterfaceManager")
            .field("lock", &self.shared.table)
            .finish_non_exhaustive()
    }
}

impl NicRegistry for InterfaceManager {
    type Config = InterfaceTable;

    fn config_lock(&self) -> &ConfigLock<InterfaceTable> {
        &self.shared.table
    }

    fn register(&self, table: &mut InterfaceTable, nic: Rc<dyn Nic>) {
        if let Some(existing) = table.find(&nic) {
            log::warn!(
                "NIC {} registered twice (it is {})",
                nic.id(),
                existing.name()
            );
            return;
        }
        let id = nic.id();
        let index = table.pick_index(&id);
        let name = format!("eth{index}");
        let handle = &self.shared.handle;
        let mut interface = Interface::new(
            name.clone(),
            nic.clone(),
            &self.shared.config.interface,
            handle.now(),
            handle.random_u64(),
        );
        if self.shared.azure.enabled() {
            interface.set_azure(self.shared.azure.attach());
        }
        let serial = table.next_serial;
        table.next_serial += 1;
        let stop = Rc::new(Event::named("interface unregistered"));
        let stats = interface.shared_device_stats();
        let task = handle.spawn(
            format!("net:{name}"),
            serve(Rc::downgrade(&self.shared), interface, stop.clone(), serial),
        );
        let mac = nic.mac();
        log::info!(
            "{name} up: NIC {id}, MAC {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}, MTU {}, {} queue(s), link {}",
            mac[0],
            mac[1],
            mac[2],
            mac[3],
            mac[4],
            mac[5],
            nic.mtu(),
            nic.queue_count(),
            if nic.link_up() { "up" } else { "down" },
        );
        table.entries.insert(
            index,
            Entry {
                name,
                serial,
                nic,
                id,
                ip: None,
                stop,
                task,
                stats,
            },
        );
        table.publish();
    }

    fn unregister(&self, table: &mut InterfaceTable, nic: &Rc<dyn Nic>) {
        let Some(index) = table
            .entries
            .iter()
            .find(|(_, e)| same_nic(&e.nic, nic))
            .map(|(index, _)| *index)
        else {
            log::debug!("unregister of an unknown NIC ignored");
            return;
        };
        if let Some(entry) = table.entries.remove(&index) {
            log::info!("{} down: NIC {} unregistered", entry.name, entry.id);
            table.remember(entry.id.clone(), index);
            // Dropping the entry stops its task.
            drop(entry);
        }
        table.publish();
    }
}

/// Why an interface task woke up.
enum Wake<'a> {
    Stop,
    Nic,
    Timer,
    Locked(ConfigGuard<'a, InterfaceTable>),
    AzureClaim,
}

/// Waits for the first of: unregistered, the lock (if asked), a NIC change, the timer,
/// the Azure agent looking for an interface (if this one could take it).
async fn next_wake<'a>(
    stop: &Event,
    lock: Option<Lock<'a, InterfaceTable>>,
    nic: &dyn Nic,
    sleep: Option<Sleep>,
    azure: Option<EventWait<'_>>,
) -> Wake<'a> {
    let mut stop_wait = stop.wait();
    let mut lock = lock;
    let mut changed = nic.changed();
    let mut sleep = sleep;
    let mut azure = azure;
    poll_fn(move |cx| {
        if Pin::new(&mut stop_wait).poll(cx).is_ready() {
            return Poll::Ready(Wake::Stop);
        }
        if let Some(lock) = lock.as_mut() {
            if let Poll::Ready(guard) = Pin::new(lock).poll(cx) {
                return Poll::Ready(Wake::Locked(guard));
            }
        }
        if changed.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Wake::Nic);
        }
        if let Some(sleep) = sleep.as_mut() {
            if Pin::new(sleep).poll(cx).is_ready() {
                return Poll::Ready(Wake::Timer);
            }
        }
        if let Some(azure) = azure.as_mut() {
            if Pin::new(azure).poll(cx).is_ready() {
                return Poll::Ready(Wake::AzureClaim);
            }
        }
        Poll::Pending
    })
    .await
}

/// The interface task. See the [module docs](self).
async fn serve(shared: Weak<Shared>, mut interface: Interface, stop: Rc<Event>, serial: u64) {
    let nic = interface.nic().clone();
    let name = String::from(interface.name());
    let Some(handle) = shared.upgrade().map(|s| s.handle.clone()) else {
        return;
    };
    // Address changes applied to smoltcp but not yet recorded in the table.
    let mut unrecorded: Vec<InterfaceEvent> = Vec::new();
    // Made once: the loop hands out clones of the `Arc`, not new strings.
    let reason: Arc<str> = Arc::from(format!("{name}: NIC, smoltcp timer or unregister"));
    let mut wakes = (0u64, 0u64);
    loop {
        if stop.is_set() {
            break;
        }
        if nic.is_removed() {
            log::info!("{name}: NIC removed");
            break;
        }
        let Some(strong) = shared.upgrade() else {
            break;
        };
        let now = handle.now();
        let result = interface.poll(now, &*strong);
        unrecorded.extend(result.events.into_iter().filter(|e| {
            matches!(
                e,
                InterfaceEvent::Configured(_) | InterfaceEvent::Deconfigured
            )
        }));
        if !unrecorded.is_empty() {
            if let Some(mut table) = strong.table.try_lock() {
                table.record(serial, &mut unrecorded);
            }
        }
        if result.more {
            drop(strong);
            handle.yield_now().await;
            continue;
        }
        let mut delay = interface.poll_delay(handle.now());
        if result.tx_blocked {
            delay = Some(delay.map_or(TX_RETRY, |d| d.max(TX_RETRY)));
        }
        let sleep = delay.map(|d| handle.sleep(d));
        // Hold the manager only while a change waits for the lock: a dropped manager
        // then drops the table, whose entries stop their tasks.
        let strong = (!unrecorded.is_empty()).then_some(strong);
        let lock = strong.as_ref().map(|s| s.table.lock());
        let azure = interface.azure_claim_event().map(Event::wait);
        let wake = handle
            .waiting_on(reason.clone(), next_wake(&stop, lock, &*nic, sleep, azure))
            .await;
        match wake {
            Wake::Locked(mut table) => table.record(serial, &mut unrecorded),
            Wake::Stop => break,
            Wake::Nic | Wake::AzureClaim => wakes.0 += 1,
            Wake::Timer => wakes.1 += 1,
        }
    }
    log::debug!(
        "{name}: task ends ({} NIC wakes, {} timer wakes)",
        wakes.0,
        wakes.1
    );
}
