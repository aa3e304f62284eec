//! Emulated NICs: hvemu's netvsp devices on the VMBus host, each wired either to a host
//! TAP device (real Linux peers) or to the VMM's internal LAN: hvemu's [`Lan`] (a
//! learning switch) with a simulated DHCP server on it, so NICs without a TAP get
//! addresses and see each other with no host networking at all.
//!
//! The internal LAN's gateway is a simulated Azure fabric ([`AzureFabric`]): the DHCP
//! server names it as router, and behind it sit the WireServer (168.63.129.16) and IMDS
//! (169.254.169.254), so a guest whose Azure agent is on reports Ready here as it
//! would on Azure. Each Ready report is announced on stderr.
//!
//! Frames move when the event loop calls [`Nics::pump`]: guest-to-wire frames the netvsp
//! collected go out, wire-to-guest frames are queued on the netvsp, then every device is
//! polled so queued frames and completions reach the guest's rings.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hvemu::lan::Lan;
use hvemu::netvsp::{Netvsp, NetvspConfig, NetvspHandle};
use hvemu::peers::{
    shared, AzureFabric, AzureFabricConfig, DhcpServer, DhcpServerConfig, ImdsNic, Shared,
};
use hvemu::switch::PortId;
use hvemu::{DeviceId, VmbusHost};

use super::cli::{format_mac, NicSpec};
use super::kick::Kicker;

/// Where a NIC's frames go.
enum Backend {
    Lan(PortId),
    Tap(Tap),
}

/// The internal LAN's DHCP server's address.
pub const LAN_SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The internal LAN's gateway (the router the DHCP server hands out): the Azure fabric.
pub const LAN_GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
/// First address the internal LAN's DHCP server leases.
pub const LAN_POOL_START: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

struct Nic {
    device: DeviceId,
    handle: NetvspHandle,
    spec: NicSpec,
    mac: [u8; 6],
    backend: Backend,
    /// Frames moved to and from a TAP.
    to_wire: u64,
    from_wire: u64,
}

/// The VM's NICs.
pub struct Nics {
    lan: Lan,
    dhcp: Shared<DhcpServer>,
    fabric: Shared<AzureFabric>,
    /// Health reports already announced.
    reports_seen: usize,
    /// The LAN NICs and leases the fabric's IMDS document was last built from.
    imds_view: Vec<([u8; 6], Option<Ipv4Addr>)>,
    nics: BTreeMap<u32, Nic>,
    next_id: u32,
    started: Instant,
    /// How a TAP's waker thread gets the event loop to read it (see [`Nics::set_waker`]).
    waker: Option<(Kicker, Arc<AtomicBool>)>,
}

impl std::fmt::Debug for Nics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nics")
            .field("nics", &self.nics.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The VMBus instance id of NIC `id`: distinct per NIC, stable for a given id.
pub fn instance_id(id: u32) -> [u8; 16] {
    let mut g = [
        0, 0, 0, 0, 0x5d, 0x15, 0x76, 0x4e, 0x9a, 0x6b, 0x68, 0x76, 0x65, 0x6d, 0x75, 0x00,
    ];
    g[..4].copy_from_slice(&id.to_le_bytes());
    g
}

/// The default MAC of NIC `id`: Hyper-V's 00:15:5d prefix.
pub fn default_mac(id: u32) -> [u8; 6] {
    let b = id.to_be_bytes();
    [0x00, 0x15, 0x5d, b[1], b[2], b[3]]
}

impl Nics {
    /// No NICs; the internal LAN with its DHCP server (10.0.2.2, leases from 10.0.2.15)
    /// and the Azure fabric as its gateway (10.0.2.1).
    pub fn new() -> Self {
        let dhcp = shared(DhcpServer::new(DhcpServerConfig {
            mac: [0x02, 0x15, 0x5d, 0xff, 0x00, 0x02],
            server_ip: LAN_SERVER_IP,
            prefix_len: 24,
            pool_start: LAN_POOL_START,
            pool_size: 64,
            router: Some(LAN_GATEWAY_IP),
            dns: Vec::new(),
            lease_secs: 3600,
        }));
        let mut fabric =
            AzureFabricConfig::new([0x02, 0x15, 0x5d, 0xff, 0x00, 0x01], LAN_GATEWAY_IP, 24);
        fabric.vm_name = "hvemu-vm".into();
        fabric.vm_size = "Standard_hvemu".into();
        fabric.location = "hvemu".into();
        let fabric = shared(AzureFabric::new(fabric));
        let mut lan = Lan::new();
        lan.attach_peer(dhcp.clone());
        lan.attach_peer(fabric.clone());
        Nics {
            lan,
            dhcp,
            fabric,
            reports_seen: 0,
            imds_view: Vec::new(),
            nics: BTreeMap::new(),
            next_id: 1,
            started: Instant::now(),
            waker: None,
        }
    }

    /// Lets TAP back ends wake the event loop as soon as a frame arrives: a waker thread
    /// per TAP sets `pending` (the loop's poll flag) and kicks the vCPU thread. Without
    /// it, TAPs are read every poll period.
    pub fn set_waker(&mut self, kicker: Kicker, pending: Arc<AtomicBool>) {
        self.waker = Some((kicker, pending));
    }

    /// Number of NICs.
    pub fn len(&self) -> usize {
        self.nics.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.nics.is_empty()
    }

    /// Hot-adds a NIC: creates the back end, then offers the device to the guest.
    /// Returns its id.
    pub fn add(&mut self, host: &mut VmbusHost, spec: &NicSpec) -> Result<u32, String> {
        let id = self.next_id;
        let mac = spec.mac.unwrap_or_else(|| default_mac(id));
        if self.nics.values().any(|n| n.mac == mac) {
            return Err(format!("MAC {} is already in use", format_mac(&mac)));
        }
        if let Some(tap) = &spec.tap {
            if self
                .nics
                .values()
                .any(|n| n.spec.tap.as_deref() == Some(tap))
            {
                return Err(format!("TAP {tap} is already used by another NIC"));
            }
        }
        let tap = match &spec.tap {
            Some(name) => {
                let mut tap = Tap::open(name).map_err(|e| format!("TAP {name}: {e}"))?;
                if let Some((kicker, pending)) = &self.waker {
                    tap.start_waker(*kicker, pending.clone())
                        .map_err(|e| format!("TAP {name}: waker thread: {e}"))?;
                }
                Some(tap)
            }
            None => None,
        };
        let netvsp = Netvsp::new(NetvspConfig {
            mac,
            max_queues: spec.queues,
            ..NetvspConfig::default()
        });
        let handle = netvsp.handle();
        let backend = match tap {
            Some(t) => Backend::Tap(t),
            None => Backend::Lan(self.lan.attach_nic(handle.clone())),
        };
        let device = host.add_device(netvsp.into_device_spec(instance_id(id)));
        self.next_id += 1;
        self.nics.insert(
            id,
            Nic {
                device,
                handle,
                spec: spec.clone(),
                mac,
                backend,
                to_wire: 0,
                from_wire: 0,
            },
        );
        Ok(id)
    }

    /// Hot-removes NIC `id` (the host rescinds its channels).
    pub fn remove(&mut self, host: &mut VmbusHost, id: u32) -> Result<(), String> {
        let nic = self
            .nics
            .remove(&id)
            .ok_or_else(|| format!("no NIC {id}"))?;
        host.remove_device(nic.device);
        if let Backend::Lan(port) = nic.backend {
            self.lan.detach(port);
        }
        Ok(())
    }

    /// Moves frames between every NIC and its wire (TAPs, then the internal LAN with its
    /// DHCP server), then polls the devices. Returns whether any frame moved.
    pub fn pump(&mut self, host: &mut VmbusHost) -> bool {
        let mut moved = false;
        let mut buf = vec![0u8; 65536];
        for nic in self.nics.values_mut() {
            let Backend::Tap(tap) = &mut nic.backend else {
                continue;
            };
            while let Some(frame) = nic.handle.take_from_guest() {
                if let Err(e) = tap.file.write_all(&frame) {
                    log::debug!("tap {}: write: {e}", tap.name);
                }
                nic.to_wire += 1;
                moved = true;
            }
            loop {
                match tap.file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        nic.handle.send_to_guest(&buf[..n]);
                        nic.from_wire += 1;
                        moved = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::debug!("tap {}: read: {e}", tap.name);
                        break;
                    }
                }
            }
        }
        let now_ms = self.started.elapsed().as_millis() as u64;
        moved |= self.lan.step(now_ms) > 0;
        for nic in self.nics.values() {
            host.poll_device(nic.device);
        }
        if moved {
            self.sync_fabric();
        }
        moved
    }

    /// Announces new health reports and keeps the fabric's IMDS interface list in step
    /// with the LAN's NICs and their leases.
    fn sync_fabric(&mut self) {
        let fabric = self.fabric.borrow();
        for report in fabric.reports().iter().skip(self.reports_seen) {
            if report.is_ready() {
                eprintln!(
                    "hvemu-vmm: azure: guest reported Ready (incarnation {}, instance {})",
                    report
                        .incarnation
                        .map_or_else(|| "?".to_string(), |n| n.to_string()),
                    report.instance_id
                );
            } else {
                log::info!(
                    "vmm: azure: health report {:?} (incarnation {:?}) refused",
                    report.state,
                    report.incarnation
                );
            }
        }
        let new_reports = fabric.reports().len() > self.reports_seen;
        self.reports_seen = fabric.reports().len();
        drop(fabric);
        if new_reports {
            log::info!("vmm: {}", self.azure_summary());
        }
        let dhcp = self.dhcp.borrow();
        let view: Vec<([u8; 6], Option<Ipv4Addr>)> = self
            .nics
            .values()
            .filter(|n| matches!(n.backend, Backend::Lan(_)))
            .map(|n| (n.mac, dhcp.lease_of(n.mac).map(|l| l.ip)))
            .collect();
        drop(dhcp);
        if view != self.imds_view {
            let interfaces = view
                .iter()
                .map(|(mac, ip)| ImdsNic {
                    mac: *mac,
                    private_ipv4: ip.iter().copied().collect(),
                })
                .collect();
            self.fabric.borrow_mut().set_imds_interfaces(interfaces);
            self.imds_view = view;
        }
    }

    /// One line about the Azure fabric (for the `status` reply): Ready reports taken
    /// from the guest, and requests served.
    pub fn azure_summary(&self) -> String {
        let fabric = self.fabric.borrow();
        let c = fabric.counters();
        format!(
            "azure ready reports: {} (health reports {}, goal state requests {}, IMDS requests {})",
            fabric.ready_reports(),
            c.health,
            c.goal_state,
            c.imds
        )
    }

    /// The internal LAN's DHCP leases: `(mac, address)`.
    pub fn leases(&self) -> Vec<([u8; 6], Ipv4Addr)> {
        self.dhcp
            .borrow()
            .leases()
            .iter()
            .map(|l| (l.mac, l.ip))
            .collect()
    }

    /// One line per NIC.
    pub fn list(&self, host: &VmbusHost) -> Vec<String> {
        self.nics
            .iter()
            .map(|(id, n)| {
                let st = n.handle.state();
                let stats = n.handle.stats();
                let channels = host.device_channels(n.device);
                let lease = self.dhcp.borrow().lease_of(n.mac);
                format!(
                    "nic {id}: mac {} queues {} ({} offered, {} open) backend {} nvsp {} rndis {} link {} rx {} tx {} tap-out {} tap-in {}",
                    format_mac(&n.mac),
                    n.spec.queues,
                    channels.len(),
                    st.queues_open.len(),
                    match &n.backend {
                        Backend::Lan(_) => match lease {
                            Some(l) => format!("lan (lease {})", l.ip),
                            None => "lan (no lease)".to_string(),
                        },
                        Backend::Tap(t) => format!("tap:{}", t.name),
                    },
                    st.nvsp_version
                        .map(|v| format!("{v:#x}"))
                        .unwrap_or_else(|| "-".into()),
                    if st.rndis_initialized { "up" } else { "down" },
                    if st.link_up { "up" } else { "down" },
                    stats.queues.iter().map(|q| q.rx_frames).sum::<u64>(),
                    stats.queues.iter().map(|q| q.tx_frames).sum::<u64>(),
                    n.to_wire,
                    n.from_wire,
                )
            })
            .collect()
    }
}

impl Default for Nics {
    fn default() -> Self {
        Self::new()
    }
}

/// A host TAP device (no packet information header), non-blocking.
struct Tap {
    name: String,
    file: File,
    /// Stops the waker thread (set when the NIC goes away).
    stop: Arc<AtomicBool>,
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

impl Tap {
    /// Attaches to (or creates) TAP device `name`. Needs CAP_NET_ADMIN or a TAP owned by
    /// this user.
    fn open(name: &str) -> io::Result<Tap> {
        const TUNSETIFF: libc::c_ulong = 0x4004_54CA;
        const IFF_TAP: libc::c_short = 0x0002;
        const IFF_NO_PI: libc::c_short = 0x1000;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        // struct ifreq: 16-byte name, then the flags (a short) in the union.
        let mut ifr = [0u8; 40];
        let n = name.len().min(15);
        ifr[..n].copy_from_slice(&name.as_bytes()[..n]);
        ifr[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI).to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes on x86-64), which
        // `ifr` is, on a descriptor of /dev/net/tun that we own.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Tap {
            name: name.to_string(),
            file,
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Starts a thread that waits for the TAP to become readable, then sets `pending`
    /// and kicks the vCPU thread, and waits until the loop took the flag (it drains the
    /// TAP when it does) before waiting again.
    fn start_waker(&mut self, kicker: Kicker, pending: Arc<AtomicBool>) -> io::Result<()> {
        let file = self.file.try_clone()?;
        let stop = self.stop.clone();
        std::thread::Builder::new()
            .name(format!("hvemu-tap-{}", self.name))
            .spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    let mut pfd = libc::pollfd {
                        fd: file.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid `pollfd` for a descriptor this thread owns (a
                    // duplicate of the TAP's), with a timeout so `stop` is seen.
                    let r = unsafe { libc::poll(&mut pfd, 1, 100) };
                    if r < 0 {
                        if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                            continue;
                        }
                        break;
                    }
                    if r == 0 {
                        continue;
                    }
                    if pfd.revents & libc::POLLIN == 0 {
                        break; // hang-up or error: the TAP is gone
                    }
                    if !pending.swap(true, Ordering::AcqRel) {
                        kicker.kick();
                    }
                    // Let the loop drain the TAP before polling again (bounded, so a
                    // loop that is busy elsewhere does not stall us for long).
                    let t = Instant::now();
                    while pending.load(Ordering::Acquire)
                        && t.elapsed() < Duration::from_millis(20)
                        && !stop.load(Ordering::Acquire)
                    {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                }
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_macs() {
        assert_ne!(instance_id(1), instance_id(2));
        assert_eq!(&instance_id(7)[..4], &[7, 0, 0, 0]);
        assert_eq!(default_mac(1), [0, 0x15, 0x5d, 0, 0, 1]);
        assert_eq!(default_mac(0x1_0203), [0, 0x15, 0x5d, 1, 2, 3]);
    }

    #[test]
    fn add_list_remove_on_the_lan() {
        let mem = hvemu::GuestMemory::new(16, 1);
        let mut host = VmbusHost::new(hvemu::HostConfig::default(), mem);
        let mut nics = Nics::new();
        let spec = NicSpec {
            queues: 4,
            ..NicSpec::default()
        };
        assert_eq!(nics.add(&mut host, &spec), Ok(1));
        assert_eq!(nics.add(&mut host, &spec), Ok(2));
        let dup = NicSpec {
            mac: Some(default_mac(1)),
            ..spec.clone()
        };
        assert!(nics
            .add(&mut host, &dup)
            .unwrap_err()
            .contains("already in use"));
        let list = nics.list(&host);
        assert_eq!(list.len(), 2);
        assert!(
            list[0].starts_with("nic 1: mac 00:15:5d:00:00:01 queues 4"),
            "{}",
            list[0]
        );
        assert!(list[1].contains("backend lan (no lease)"), "{}", list[1]);
        assert!(!nics.pump(&mut host));
        nics.remove(&mut host, 1).unwrap();
        assert!(nics.remove(&mut host, 1).unwrap_err().contains("no NIC 1"));
        assert_eq!(nics.len(), 1);
    }

    #[test]
    fn the_lan_gateway_is_the_azure_fabric() {
        let mem = hvemu::GuestMemory::new(16, 1);
        let mut host = VmbusHost::new(hvemu::HostConfig::default(), mem);
        let mut nics = Nics::new();
        assert_eq!(nics.dhcp.borrow().config().router, Some(LAN_GATEWAY_IP));
        assert_eq!(nics.fabric.borrow().config().gateway, LAN_GATEWAY_IP);
        assert!(nics.azure_summary().starts_with("azure ready reports: 0 "));
        // IMDS lists the LAN's NICs (no lease yet: no address).
        let spec = NicSpec {
            queues: 1,
            ..NicSpec::default()
        };
        nics.add(&mut host, &spec).unwrap();
        nics.sync_fabric();
        let interfaces = nics.fabric.borrow().config().interfaces.clone();
        assert_eq!(
            interfaces,
            [ImdsNic {
                mac: default_mac(1),
                private_ipv4: Vec::new()
            }]
        );
    }
}
