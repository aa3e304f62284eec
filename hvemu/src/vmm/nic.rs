//! Emulated NICs: hvemu's netvsp devices on the VMBus host, each wired either to a host
//! TAP device (real Linux peers) or to the VMM's internal learning switch (the NICs of
//! this VM see each other).
//!
//! Frames move when the event loop calls [`Nics::pump`]: guest-to-wire frames the netvsp
//! collected go out, wire-to-guest frames are queued on the netvsp, then every device is
//! polled so queued frames and completions reach the guest's rings.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;

use hvemu::netvsp::{Netvsp, NetvspConfig, NetvspHandle};
use hvemu::switch::{PortId, Switch};
use hvemu::{DeviceId, VmbusHost};

use super::cli::{format_mac, NicSpec};

/// Where a NIC's frames go.
enum Backend {
    Switch(PortId),
    Tap(Tap),
}

struct Nic {
    device: DeviceId,
    handle: NetvspHandle,
    spec: NicSpec,
    mac: [u8; 6],
    backend: Backend,
    /// Frames moved to and from the wire.
    to_wire: u64,
    from_wire: u64,
}

/// The VM's NICs.
pub struct Nics {
    switch: Switch,
    nics: BTreeMap<u32, Nic>,
    next_id: u32,
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
    /// No NICs, an empty switch.
    pub fn new() -> Self {
        Nics {
            switch: Switch::new(),
            nics: BTreeMap::new(),
            next_id: 1,
        }
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
            if self.nics.values().any(|n| n.spec.tap.as_deref() == Some(tap)) {
                return Err(format!("TAP {tap} is already used by another NIC"));
            }
        }
        let backend = match &spec.tap {
            Some(name) => Backend::Tap(Tap::open(name).map_err(|e| format!("TAP {name}: {e}"))?),
            None => Backend::Switch(self.switch.add_port()),
        };
        let netvsp = Netvsp::new(NetvspConfig {
            mac,
            max_queues: spec.queues,
            ..NetvspConfig::default()
        });
        let handle = netvsp.handle();
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
        let nic = self.nics.remove(&id).ok_or_else(|| format!("no NIC {id}"))?;
        host.remove_device(nic.device);
        if let Backend::Switch(port) = nic.backend {
            self.switch.remove_port(port);
        }
        Ok(())
    }

    /// Moves frames between every NIC and its wire, then polls the devices. Returns
    /// whether any frame moved.
    pub fn pump(&mut self, host: &mut VmbusHost) -> bool {
        let mut moved = false;
        let mut buf = vec![0u8; 65536];
        for nic in self.nics.values_mut() {
            match &mut nic.backend {
                Backend::Switch(port) => {
                    let (up, down) = self.switch.pump_nic(*port, &nic.handle);
                    nic.to_wire += up as u64;
                    nic.from_wire += down as u64;
                    moved |= up + down > 0;
                }
                Backend::Tap(tap) => {
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
            }
        }
        // A second switch pass delivers what one NIC sent to another within this poll.
        if moved {
            for nic in self.nics.values_mut() {
                if let Backend::Switch(port) = nic.backend {
                    let (_, down) = self.switch.pump_nic(port, &nic.handle);
                    nic.from_wire += down as u64;
                }
            }
        }
        for nic in self.nics.values() {
            host.poll_device(nic.device);
        }
        moved
    }

    /// One line per NIC.
    pub fn list(&self, host: &VmbusHost) -> Vec<String> {
        self.nics
            .iter()
            .map(|(id, n)| {
                let st = n.handle.state();
                let stats = n.handle.stats();
                let channels = host.device_channels(n.device);
                format!(
                    "nic {id}: mac {} queues {} ({} offered, {} open) backend {} nvsp {} rndis {} link {} rx {} tx {} wire-out {} wire-in {}",
                    format_mac(&n.mac),
                    n.spec.queues,
                    channels.len(),
                    st.queues_open.len(),
                    match &n.backend {
                        Backend::Switch(p) => format!("switch:{}", p.0),
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
        })
    }
}

use std::os::unix::fs::OpenOptionsExt;

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
    fn add_list_remove_on_the_switch() {
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
        assert!(nics.add(&mut host, &dup).unwrap_err().contains("already in use"));
        let list = nics.list(&host);
        assert_eq!(list.len(), 2);
        assert!(list[0].starts_with("nic 1: mac 00:15:5d:00:00:01 queues 4"), "{}", list[0]);
        assert!(list[1].contains("switch:1"));
        assert!(!nics.pump(&mut host));
        nics.remove(&mut host, 1).unwrap();
        assert!(nics.remove(&mut host, 1).unwrap_err().contains("no NIC 1"));
        assert_eq!(nics.len(), 1);
    }
}
