//! Test scaffolding for the network side: an in-memory NIC, a wire that connects NICs to
//! hvemu's simulated peers, the task that drives that wire with the simulation's virtual
//! time, and heap accounting that tells the appliance's allocations from the peers'.

#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Poll, Waker};

use hvemu::peers::{self, DhcpServer, DhcpServerConfig, Endpoint, Hub, PeerHost, PeerHostConfig};
use hvnet_net::{InterfaceManager, InterfaceTable, ManagerConfig};
use hvnet_netvsc::nic::{Nic, NicError, NicFuture, NicRegistry, QueueStats};
use hvnet_runtime::sim::{Config, Simulation};
use hvnet_runtime::sync::Event;
use hvnet_runtime::{Duration, Handle, Instant, JoinHandle};

// ---------------------------------------------------------------------------------------
// Heap accounting per test thread, and the adapters that run the guest VMBus against
// hvemu: shared with the vmbus and netvsc tests so every test counts the same way.

#[path = "../../../drivers/vmbus/tests/support/emu.rs"]
mod emu;
pub use emu::*;

// ---------------------------------------------------------------------------------------
// The fake NIC.

/// Frames a [`FakeNic`] holds for the interface before it drops more (a receive ring).
pub const RX_CAPACITY: usize = 512;
/// Frames it holds for the wire before `transmit` says `Busy` (a send ring).
pub const TX_CAPACITY: usize = 256;

struct NicState {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    tx_capacity: usize,
    link_up: bool,
    removed: bool,
    /// Bumped by every change the interface may care about.
    generation: u64,
    /// `generation` at the last `changed()` call.
    seen: u64,
    wakers: Vec<Waker>,
    stats: Vec<QueueStats>,
    receive_calls: u64,
    /// Deliver calls made on a thread-local "re-entered" check.
    in_deliver: bool,
    reentered: u64,
    /// A batch is open: sends wait in `tx_held` until it ends, as a driver that defers
    /// publication holds them.
    batch_open: bool,
    tx_held: usize,
    /// Batches ended, and `changed()` calls made while one was open (the network side
    /// must end its batch before it waits).
    batches: u64,
    waited_in_batch: u64,
}

/// An in-memory NIC: the wire pushes frames in and takes frames out; the interface sees
/// it through the [`Nic`] trait like any driver's NIC.
pub struct FakeNic {
    id: String,
    mac: [u8; 6],
    mtu: usize,
    queues: usize,
    state: RefCell<NicState>,
    /// Set when the NIC has frames for the wire.
    wire_activity: Rc<Event>,
}

impl FakeNic {
    /// A NIC with link up, `queues` queues and a standard MTU.
    pub fn new(id: &str, mac: [u8; 6], queues: usize, wire_activity: Rc<Event>) -> Rc<FakeNic> {
        Rc::new(FakeNic {
            id: id.to_string(),
            mac,
            mtu: 1500,
            queues: queues.max(1),
            state: RefCell::new(NicState {
                rx: VecDeque::new(),
                tx: VecDeque::new(),
                tx_capacity: TX_CAPACITY,
                link_up: true,
                removed: false,
                generation: 0,
                seen: 0,
                wakers: Vec::new(),
                stats: vec![QueueStats::default(); queues.max(1)],
                receive_calls: 0,
                in_deliver: false,
                reentered: 0,
                batch_open: false,
                tx_held: 0,
                batches: 0,
                waited_in_batch: 0,
            }),
            wire_activity,
        })
    }

    fn bump(&self) {
        let wakers = {
            let mut state = self.state.borrow_mut();
            state.generation += 1;
            std::mem::take(&mut state.wakers)
        };
        for waker in wakers {
            waker.wake();
        }
    }

    /// Spreads frames over queues by a hash of their bytes, as RSS would by flow.
    fn queue_of(&self, frame: &[u8]) -> usize {
        let hash = frame
            .iter()
            .take(64)
            .fold(0u32, |h, &b| h.rotate_left(5) ^ u32::from(b));
        hash as usize % self.queues
    }

    /// A frame arrives from the wire (dropped and counted when the ring is full).
    pub fn push_rx(&self, frame: &[u8]) {
        let queue = self.queue_of(frame);
        host_scope(|| {
            let mut state = self.state.borrow_mut();
            if state.removed || !state.link_up {
                return;
            }
            if state.rx.len() >= RX_CAPACITY {
                state.stats[queue].rx_dropped += 1;
                return;
            }
            state.rx.push_back(frame.to_vec());
        });
        self.bump();
    }

    /// The next frame the interface sent, for the wire.
    pub fn pop_tx(&self) -> Option<Vec<u8>> {
        let frame = {
            let mut state = self.state.borrow_mut();
            // Sends an open batch holds back are not on the wire yet.
            if state.tx.len() > state.tx_held {
                state.tx.pop_front()
            } else {
                None
            }
        };
        if frame.is_some() {
            // Send room freed up.
            self.bump();
        }
        frame
    }

    /// Frames waiting for the wire.
    pub fn tx_pending(&self) -> usize {
        let state = self.state.borrow();
        state.tx.len() - state.tx_held
    }

    /// Sets the link state (a host media-status indication).
    pub fn set_link(&self, up: bool) {
        self.state.borrow_mut().link_up = up;
        self.bump();
    }

    /// Hot-unplug: the NIC stops working (unregistering is the driver's next step).
    pub fn remove(&self) {
        self.state.borrow_mut().removed = true;
        self.bump();
    }

    /// Sets how many frames may wait for the wire before `transmit` says `Busy`.
    pub fn set_tx_capacity(&self, frames: usize) {
        self.state.borrow_mut().tx_capacity = frames;
        self.bump();
    }

    /// Times `transmit` was called from inside `receive`'s callback.
    pub fn reentered(&self) -> u64 {
        self.state.borrow().reentered
    }

    /// Batches ended so far, and times the network side waited with one still open.
    pub fn batches(&self) -> (u64, u64) {
        let state = self.state.borrow();
        (state.batches, state.waited_in_batch)
    }

    /// Sum of every queue's counters.
    pub fn totals(&self) -> QueueStats {
        let state = self.state.borrow();
        state.stats.iter().fold(QueueStats::default(), |mut t, q| {
            t.rx_packets += q.rx_packets;
            t.rx_bytes += q.rx_bytes;
            t.rx_dropped += q.rx_dropped;
            t.tx_packets += q.tx_packets;
            t.tx_bytes += q.tx_bytes;
            t.tx_busy += q.tx_busy;
            t.tx_errors += q.tx_errors;
            t
        })
    }
}

struct Changed<'a> {
    nic: &'a FakeNic,
    since: u64,
}

impl Future for Changed<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        let mut state = self.nic.state.borrow_mut();
        if state.generation > self.since {
            return Poll::Ready(());
        }
        if !state.wakers.iter().any(|w| w.will_wake(cx.waker())) {
            state.wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl Nic for FakeNic {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn mtu(&self) -> usize {
        self.mtu
    }

    fn link_up(&self) -> bool {
        self.state.borrow().link_up
    }

    fn is_removed(&self) -> bool {
        self.state.borrow().removed
    }

    fn queue_count(&self) -> usize {
        self.queues
    }

    fn receive(&self, budget: usize, deliver: &mut dyn FnMut(&[u8])) -> usize {
        let mut delivered = 0;
        self.state.borrow_mut().receive_calls += 1;
        while delivered < budget {
            let frame = {
                let mut state = self.state.borrow_mut();
                if state.removed {
                    break;
                }
                state.rx.pop_front()
            };
            let Some(frame) = frame else { break };
            let queue = self.queue_of(&frame);
            {
                let mut state = self.state.borrow_mut();
                state.stats[queue].rx_packets += 1;
                state.stats[queue].rx_bytes += frame.len() as u64;
                state.in_deliver = true;
            }
            deliver(&frame);
            self.state.borrow_mut().in_deliver = false;
            host_scope(|| drop(frame));
            delivered += 1;
        }
        delivered
    }

    fn transmit(&self, len: usize, fill: &mut dyn FnMut(&mut [u8])) -> Result<(), NicError> {
        {
            let mut state = self.state.borrow_mut();
            if state.in_deliver {
                state.reentered += 1;
            }
            if state.removed {
                return Err(NicError::Removed);
            }
            if !state.link_up {
                return Err(NicError::LinkDown);
            }
            if len > self.mtu + 14 {
                return Err(NicError::TooLong);
            }
            if state.tx.len() >= state.tx_capacity {
                state.stats[0].tx_busy += 1;
                return Err(NicError::Busy);
            }
        }
        let mut frame = host_scope(|| vec![0u8; len]);
        fill(&mut frame);
        let queue = self.queue_of(&frame);
        {
            let mut state = self.state.borrow_mut();
            state.stats[queue].tx_packets += 1;
            state.stats[queue].tx_bytes += len as u64;
            host_scope(|| state.tx.push_back(frame));
            if state.batch_open {
                state.tx_held += 1;
                return Ok(());
            }
        }
        self.wire_activity.set();
        Ok(())
    }

    fn begin_batch(&self) {
        self.state.borrow_mut().batch_open = true;
    }

    fn end_batch(&self) {
        let held = {
            let mut state = self.state.borrow_mut();
            if state.batch_open {
                state.batches += 1;
            }
            state.batch_open = false;
            std::mem::take(&mut state.tx_held)
        };
        if held > 0 {
            self.wire_activity.set();
        }
    }

    fn can_transmit(&self) -> bool {
        let state = self.state.borrow();
        state.tx.len() < state.tx_capacity
    }

    fn changed(&self) -> NicFuture<'_> {
        // Counted, not flushed: a network side that waits inside a batch is a bug the
        // tests must see (its sends would sit here until something else woke it).
        if self.state.borrow().batch_open {
            self.state.borrow_mut().waited_in_batch += 1;
        }
        let since = {
            let mut state = self.state.borrow_mut();
            let generation = state.generation;
            std::mem::replace(&mut state.seen, generation)
        };
        Box::pin(Changed { nic: self, since })
    }

    fn queue_stats(&self, queue: usize) -> QueueStats {
        self.state
            .borrow()
            .stats
            .get(queue)
            .copied()
            .unwrap_or_default()
    }
}

/// The fake NIC's station on a hub. The hub runs in host scope, so the port only moves
/// frames between the hub and two mailboxes; the wire task moves them between the
/// mailboxes and the NIC in appliance scope, where the NIC's wakers live. (Waking a
/// task from host scope would make the runtime's queues cross scopes and blur the
/// heap accounting.)
pub struct NicPort {
    mac: [u8; 6],
    /// Frames from the hub for the NIC.
    inbox: VecDeque<Vec<u8>>,
    /// Frames from the NIC for the hub.
    outbox: VecDeque<Vec<u8>>,
}

impl Endpoint for NicPort {
    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn receive(&mut self, _now_ms: u64, frame: &[u8]) {
        // A NIC's address filter: its own MAC, broadcast and multicast.
        if frame.len() >= 6 && (frame[..6] == self.mac || frame[0] & 1 == 1) {
            self.inbox.push_back(frame.to_vec());
        }
    }

    fn transmit(&mut self, _now_ms: u64, out: &mut dyn FnMut(&[u8])) {
        while let Some(frame) = self.outbox.pop_front() {
            out(&frame);
        }
    }

    fn poll_at(&self, now_ms: u64) -> Option<u64> {
        (!self.outbox.is_empty()).then_some(now_ms)
    }
}

// ---------------------------------------------------------------------------------------
// The wire and the world.

/// A fake NIC and its port on the hub.
type Plug = (Rc<FakeNic>, Rc<RefCell<NicPort>>);

/// A hub with peers and fake NICs on it, driven by a task of the simulation.
pub struct Wire {
    pub hub: RefCell<Hub>,
    /// Set by NICs when they send: wakes the wire task.
    pub activity: Rc<Event>,
    ports: RefCell<Vec<Plug>>,
}

impl Wire {
    pub fn new() -> Rc<Wire> {
        Rc::new(Wire {
            hub: RefCell::new(host_scope(Hub::new)),
            activity: Rc::new(Event::named("wire activity")),
            ports: RefCell::new(Vec::new()),
        })
    }

    /// Plugs `endpoint` into the hub.
    pub fn attach(&self, endpoint: Rc<RefCell<dyn Endpoint>>) {
        host_scope(|| self.hub.borrow_mut().attach(endpoint));
    }

    /// A fake NIC plugged into this wire.
    pub fn nic(&self, id: &str, mac: [u8; 6], queues: usize) -> Rc<FakeNic> {
        let nic = FakeNic::new(id, mac, queues, self.activity.clone());
        let port = host_scope(|| {
            Rc::new(RefCell::new(NicPort {
                mac,
                inbox: VecDeque::new(),
                outbox: VecDeque::new(),
            }))
        });
        self.attach(port.clone());
        host_scope(|| self.ports.borrow_mut().push((nic.clone(), port)));
        nic
    }

    /// Moves what the NICs sent to their ports.
    fn collect(&self) {
        for (nic, port) in self.ports.borrow().iter() {
            while let Some(frame) = nic.pop_tx() {
                host_scope(|| port.borrow_mut().outbox.push_back(frame));
            }
        }
    }

    /// Hands what the hub delivered to the NICs.
    fn deliver(&self) {
        for (nic, port) in self.ports.borrow().iter() {
            while let Some(frame) = host_scope(|| port.borrow_mut().inbox.pop_front()) {
                nic.push_rx(&frame);
                host_scope(|| drop(frame));
            }
        }
    }

    /// One round: NIC frames out, the hub's round, frames in. Returns frames sent.
    fn step(&self, now_ms: u64) -> usize {
        self.collect();
        let sent = host_scope(|| self.hub.borrow_mut().step(now_ms));
        self.deliver();
        sent
    }
}

fn millis(t: Instant) -> u64 {
    t.as_nanos() / 1_000_000
}

/// Spawns the task that runs `wire`: rounds back to back while frames flow, and when
/// the wire is quiet, a sleep until the next peer timer or until a NIC sends.
pub fn spawn_wire(handle: &Handle, wire: Rc<Wire>) -> JoinHandle<()> {
    let handle2 = handle.clone();
    handle.spawn("wire", async move {
        let handle = handle2;
        loop {
            wire.activity.reset();
            let now_ms = millis(handle.now());
            let sent = wire.step(now_ms);
            if sent > 0 {
                handle.yield_now().await;
                continue;
            }
            let next = host_scope(|| wire.hub.borrow().next_wakeup(now_ms));
            let wake_ms = match next {
                Some(t) if t > now_ms => Some(t),
                Some(_) => Some(now_ms + 1),
                None => None,
            };
            let mut sleep =
                wake_ms.map(|ms| handle.sleep_until(Instant::from_nanos(ms * 1_000_000)));
            let mut activity = wire.activity.wait();
            poll_fn(|cx| {
                if Pin::new(&mut activity).poll(cx).is_ready() {
                    return Poll::Ready(());
                }
                match sleep.as_mut() {
                    Some(sleep) => Pin::new(sleep).poll(cx),
                    None => Poll::Pending,
                }
            })
            .await;
        }
    })
}

/// The LAN of most tests: 10.0.0.0/24, DHCP server .1 (also router and DNS), a peer
/// host at .2, leases from .100.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
pub const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
pub const POOL_START: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);

pub fn mac(n: u8) -> [u8; 6] {
    [0x00, 0x15, 0x5d, 0x00, 0x00, n]
}

pub struct World {
    pub handle: Handle,
    pub wire: Rc<Wire>,
    pub dhcp: peers::Shared<DhcpServer>,
    pub peer: peers::Shared<PeerHost>,
    pub manager: InterfaceManager,
}

/// Lease time handed out by the test DHCP server.
pub const LEASE_SECS: u32 = 3600;

pub fn dhcp_config(lease_secs: u32) -> DhcpServerConfig {
    DhcpServerConfig {
        mac: [0x02, 0, 0, 0, 0, 1],
        server_ip: SERVER_IP,
        prefix_len: 24,
        pool_start: POOL_START,
        pool_size: 50,
        router: Some(SERVER_IP),
        dns: vec![SERVER_IP, Ipv4Addr::new(10, 0, 0, 53)],
        lease_secs,
    }
}

/// The LAN's peer host (MAC 02:00:00:00:00:02 at [`PEER_IP`]/24): ping, echo and
/// HTTP for the tests.
pub fn lan_peer() -> peers::Shared<PeerHost> {
    host_scope(|| {
        peers::shared(PeerHost::new(PeerHostConfig {
            mac: [0x02, 0, 0, 0, 0, 2],
            ip: PEER_IP,
            prefix_len: 24,
            gateway: None,
        }))
    })
}

/// A wire with a DHCP server and a peer host, its task running, and a manager.
pub fn world(handle: &Handle, lease_secs: u32, config: ManagerConfig) -> World {
    let wire = Wire::new();
    let dhcp = host_scope(|| peers::shared(DhcpServer::new(dhcp_config(lease_secs))));
    let peer = lan_peer();
    wire.attach(dhcp.clone());
    wire.attach(peer.clone());
    spawn_wire(handle, wire.clone());
    World {
        handle: handle.clone(),
        wire,
        dhcp,
        peer,
        manager: InterfaceManager::new(handle.clone(), config),
    }
}

/// A manager configuration with the echo service on (as tests want it).
pub fn test_config() -> ManagerConfig {
    let mut config = ManagerConfig::default();
    config.interface.echo = Some(hvnet_net::EchoConfig::default());
    config
}

/// A simulation with room for long transfers.
pub fn sim(seed: u64) -> Simulation {
    Simulation::with_config(
        seed,
        Config {
            max_steps: 200_000_000,
            max_virtual_time: std::time::Duration::from_secs(7200),
            ..Config::default()
        },
    )
}

/// Registers `nic` the way a driver's probe does: under the configuration lock.
pub async fn register(manager: &InterfaceManager, nic: &Rc<FakeNic>) {
    let nic: Rc<dyn Nic> = nic.clone();
    let mut table = manager.config_lock().lock().await;
    manager.register(&mut table, nic);
}

/// Unregisters `nic` the way a driver's removal path does.
pub async fn unregister(manager: &InterfaceManager, nic: &Rc<FakeNic>) {
    let nic: Rc<dyn Nic> = nic.clone();
    let mut table = manager.config_lock().lock().await;
    manager.unregister(&mut table, &nic);
}

/// Reads the table under the lock.
pub async fn with_table<R>(manager: &InterfaceManager, f: impl FnOnce(&InterfaceTable) -> R) -> R {
    let table = manager.config_lock().lock().await;
    f(&table)
}

/// Waits (in virtual time, checking every millisecond) until `condition` holds; `Err`
/// after `limit`.
pub async fn wait_until(
    handle: &Handle,
    limit: Duration,
    what: &str,
    mut condition: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = handle.now() + limit;
    loop {
        if condition() {
            return Ok(());
        }
        if handle.now() >= deadline {
            return Err(format!("timed out after {limit:?} waiting for {what}"));
        }
        handle.sleep(Duration::from_millis(1)).await;
    }
}

/// The address the manager's table has for `name`.
pub fn address_of(manager: &InterfaceManager, name: &str) -> Option<Ipv4Addr> {
    let table = manager.config_lock().try_lock()?;
    table
        .get(name)
        .and_then(|i| i.address())
        .map(|a| a.address())
}

/// The host side's clock for tests on the emulated VMBus: steps `lan` and polls the VMBus
/// device of every NIC `devices` names, every 100 us of virtual time, back to back while
/// frames flow.
pub fn spawn_lan_host(
    handle: &Handle,
    lan: Rc<RefCell<hvemu::lan::Lan>>,
    host: Rc<RefCell<hvemu::VmbusHost>>,
    devices: impl Fn() -> Vec<hvemu::DeviceId> + 'static,
) -> JoinHandle<()> {
    let h = handle.clone();
    handle.spawn("host", async move {
        loop {
            let now_ms = h.now().as_nanos() / 1_000_000;
            let list = devices();
            let moved = host_scope(|| {
                let moved = lan.borrow_mut().step(now_ms);
                for d in &list {
                    host.borrow_mut().poll_device(*d);
                }
                moved
            });
            if moved > 0 {
                h.yield_now().await;
            } else {
                h.sleep(Duration::from_micros(100)).await;
            }
        }
    })
}
