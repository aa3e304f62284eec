//! A netvsc test world: the guest VMBus and netvsc driver against hvemu's VMBus host with
//! netvsp NICs, and a minimal NIC registry standing in for the network side.

#![allow(dead_code)]

#[path = "../../../vmbus/tests/support/emu.rs"]
mod emu;
pub use emu::*;

use std::cell::RefCell;
use std::rc::Rc;

use hvemu::netvsp::{Netvsp, NetvspConfig, NetvspHandle};
use hvemu::{DeviceId, GuestMemory, HostConfig, VmbusHost};
use hvnet_netvsc::nic::{Nic, NicRegistry};
use hvnet_netvsc::{NetvscConfig, NetvscDriver, NetvscNic};
use hvnet_runtime::sync::Semaphore;
use hvnet_runtime::{ConfigLock, Duration, Handle};
use hvnet_vmbus::bus::{VmBus, VmBusConfig};

/// The network side, reduced to a list of registered NICs.
pub struct Registry {
    pub lock: ConfigLock<Vec<Rc<dyn Nic>>>,
    pub registered: Semaphore,
    pub unregistered: Semaphore,
}

impl NicRegistry for Registry {
    type Config = Vec<Rc<dyn Nic>>;

    fn config_lock(&self) -> &ConfigLock<Self::Config> {
        &self.lock
    }

    fn register(&self, config: &mut Self::Config, nic: Rc<dyn Nic>) {
        config.push(nic);
        self.registered.release(1);
    }

    fn unregister(&self, config: &mut Self::Config, nic: &Rc<dyn Nic>) {
        let before = config.len();
        config.retain(|n| !Rc::ptr_eq(n, nic));
        if config.len() != before {
            self.unregistered.release(1);
        }
    }
}

pub struct NetWorld {
    pub host: Rc<RefCell<VmbusHost>>,
    pub memory: GuestMemory,
    pub bus: VmBus,
    pub registry: Rc<Registry>,
    pub devices: Rc<RefCell<Vec<DeviceId>>>,
}

/// Small buffers keep host tests fast; the protocol is the same at any size.
pub fn test_netvsc_config() -> NetvscConfig {
    NetvscConfig {
        recv_buffer_bytes: 256 * 1024,
        send_buffer_bytes: 128 * 1024,
        ring_pages: 8,
        ..NetvscConfig::default()
    }
}

pub fn net_world(handle: &Handle, seed: u64, config: NetvscConfig) -> NetWorld {
    let host_config = HostConfig {
        seed,
        ..HostConfig::default()
    };
    let machine = emu_machine(handle, host_config, VmBusConfig::default(), 1 << 16, seed);
    net_world_on(machine, config)
}

/// A world on `machine`: the netvsc driver registered on its bus with a test registry.
pub fn net_world_on(machine: EmuMachine, config: NetvscConfig) -> NetWorld {
    let EmuMachine { host, memory, bus } = machine;
    let registry = Rc::new(Registry {
        lock: ConfigLock::new("rtnl", Vec::new()),
        registered: Semaphore::named("nics registered", 0),
        unregistered: Semaphore::named("nics unregistered", 0),
    });
    bus.register_driver(Rc::new(NetvscDriver::new(registry.clone(), config)));
    NetWorld {
        host,
        memory,
        bus,
        registry,
        devices: Rc::new(RefCell::new(Vec::new())),
    }
}

pub fn instance(n: u32) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(&(0x5e71_0000 + n).to_le_bytes());
    id[15] = n as u8;
    id
}

pub fn mac(n: u32) -> [u8; 6] {
    [0x00, 0x15, 0x5d, 0x10, 0x00, n as u8]
}

/// Hot-adds a netvsp NIC.
pub fn add_nic(w: &NetWorld, n: u32, config: NetvspConfig) -> (DeviceId, NetvspHandle) {
    // Host objects are built (and later dropped) as host code, so the guest heap
    // accounting sees only the guest.
    let (id, handle) = host_scope(|| {
        let dev = Netvsp::new(NetvspConfig {
            mac: mac(n),
            ..config
        });
        let handle = dev.handle();
        let id = w
            .host
            .borrow_mut()
            .add_device(dev.into_device_spec(instance(n)));
        (id, handle)
    });
    w.devices.borrow_mut().push(id);
    (id, handle)
}

pub fn remove_nic(w: &NetWorld, id: DeviceId) {
    host_scope(|| w.host.borrow_mut().remove_device(id));
    w.devices.borrow_mut().retain(|d| *d != id);
}

/// Lets host-initiated traffic flow: polls every device every 100 us of virtual time
/// (the host acts only inside host calls).
pub fn spawn_host_pump(handle: &Handle, w: &NetWorld) {
    let host = w.host.clone();
    let devices = w.devices.clone();
    let h = handle.clone();
    handle.spawn("host pump", async move {
        loop {
            let list = devices.borrow().clone();
            for d in list {
                host_scope(|| host.borrow_mut().poll_device(d));
            }
            h.sleep(Duration::from_micros(100)).await;
        }
    });
}

/// The registered NIC with `mac`, as the concrete netvsc type.
pub fn nic_by_mac(w: &NetWorld, m: [u8; 6]) -> Option<Rc<dyn Nic>> {
    let list = w.registry.lock.try_lock()?;
    list.iter().find(|n| n.mac() == m).cloned()
}

pub fn as_netvsc(nic: &Rc<dyn Nic>) -> Rc<NetvscNic> {
    let any: Rc<dyn std::any::Any> = nic.clone();
    any.downcast::<NetvscNic>().expect("a netvsc NIC")
}

/// A UDP/IPv4 frame from 10.0.0.1:`sport` to 10.0.0.2:7 with `payload_len` bytes.
pub fn udp_frame(dst_mac: [u8; 6], sport: u16, payload_len: usize, fill: u8) -> Vec<u8> {
    let mut f = vec![0u8; 42 + payload_len];
    f[..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14] = 0x45;
    let ip_len = (28 + payload_len) as u16;
    f[16..18].copy_from_slice(&ip_len.to_be_bytes());
    f[22] = 64;
    f[23] = 17;
    f[26..30].copy_from_slice(&[10, 0, 0, 1]);
    f[30..34].copy_from_slice(&[10, 0, 0, 2]);
    f[34..36].copy_from_slice(&sport.to_be_bytes());
    f[36..38].copy_from_slice(&7u16.to_be_bytes());
    f[38..40].copy_from_slice(&((8 + payload_len) as u16).to_be_bytes());
    for b in &mut f[42..] {
        *b = fill;
    }
    f
}
