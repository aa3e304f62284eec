//! Glue between the guest VMBus crate and the hvemu host emulator, plus a test driver that
//! locks like netvsc, for the scenario tests.
//!
//! hvemu knows nothing of the guest's traits; these adapters implement the guest's
//! `Hypervisor` and `DmaAllocator` over an in-process `VmbusHost` and its `GuestMemory`.

#![allow(dead_code)]

mod emu;
pub use emu::*;

use std::boxed::Box;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::vec::Vec;

use hvemu::{DeviceSpec, Faults, GuestMemory, HostConfig, SubchannelTestDevice, VmbusHost};
use hvnet_runtime::sync::Semaphore;
use hvnet_runtime::ConfigLock;
use hvnet_vmbus::bus::{Device, Driver, RingSizes, VmBus, VmBusConfig};
use hvnet_vmbus::channel::{BoxFuture, ChannelError, DeviceInstance, OpenedChannel};
use hvnet_vmbus::ring::OutgoingPacket;
use hvnet_wire::ring::PacketKind;
use hvnet_wire::vmbus::Guid;

// ---------------------------------------------------------------------------------------
// A test world: host + guest bus.

/// The class GUID of the test device.
pub const TEST_CLASS: Guid =
    Guid::from_fields(0x7e57_0001, 0xbeef, 0x4a1e, [0x80, 0, 0, 0, 0, 0, 0, 1]);

pub fn class_bytes() -> [u8; 16] {
    zerocopy::transmute!(TEST_CLASS)
}

pub fn instance_bytes(n: u32) -> [u8; 16] {
    let g = Guid::from_fields(0x1000 + n, 0x1, 0x2, [0xa0, 0, 0, 0, 0, 0, 0, n as u8]);
    zerocopy::transmute!(g)
}

pub struct World {
    pub host: Rc<RefCell<VmbusHost>>,
    pub memory: GuestMemory,
    pub bus: VmBus,
    pub rtnl: Rc<ConfigLock<Vec<String>>>,
    pub up: Rc<Semaphore>,
    pub removed: Rc<Semaphore>,
    pub driver: Rc<TestDriver>,
}

pub fn world(
    handle: &hvnet_runtime::Handle,
    host_config: HostConfig,
    bus_config: VmBusConfig,
    seed: u64,
) -> World {
    let EmuMachine { host, memory, bus } =
        emu_machine(handle, host_config, bus_config, 1 << 14, seed);
    let rtnl = Rc::new(ConfigLock::new("rtnl", Vec::new()));
    let up = Rc::new(Semaphore::named("interfaces up", 0));
    let removed = Rc::new(Semaphore::named("interfaces removed", 0));
    let driver = Rc::new(TestDriver {
        rtnl: rtnl.clone(),
        up: up.clone(),
        removed: removed.clone(),
        want_subchannels: Cell::new(8),
        probes_failed: Cell::new(0),
        subchannel_open_failures: Cell::new(0),
    });
    bus.register_driver(driver.clone());
    World {
        host,
        memory,
        bus,
        rtnl,
        up,
        removed,
        driver,
    }
}

pub fn add_nic(w: &World, n: u32, max_subchannels: u16, faults: Faults) -> hvemu::DeviceId {
    let mut spec = DeviceSpec::new(
        class_bytes(),
        instance_bytes(n),
        Box::new(SubchannelTestDevice::new(max_subchannels)),
    );
    spec.faults = faults;
    w.host.borrow_mut().add_device(spec)
}

pub const RINGS: RingSizes = RingSizes {
    outgoing_pages: 2,
    incoming_pages: 2,
};

// ---------------------------------------------------------------------------------------
// The test driver: locks like netvsc.

/// Probe: takes the config lock, opens the primary, asks the host for K sub-channels and,
/// still holding the lock, waits until all granted ones are open; then registers an
/// "interface" in the config. Sub-channels are opened by the handler on the sub-channel
/// worker, which never takes the lock.
pub struct TestDriver {
    pub rtnl: Rc<ConfigLock<Vec<String>>>,
    pub up: Rc<Semaphore>,
    pub removed: Rc<Semaphore>,
    pub want_subchannels: Cell<u16>,
    pub probes_failed: Cell<u32>,
    pub subchannel_open_failures: Cell<u32>,
}

pub struct TestNic {
    name: String,
    primary: RefCell<Option<OpenedChannel>>,
    subchannels: RefCell<Vec<OpenedChannel>>,
    opened: Semaphore,
    rtnl: Rc<ConfigLock<Vec<String>>>,
    removed: Rc<Semaphore>,
}

impl TestNic {
    pub fn subchannels_open(&self) -> usize {
        self.subchannels.borrow().len()
    }
}

/// Sends `payload` in-band with a completion requested and waits for the completion.
pub async fn request(
    ch: &OpenedChannel,
    trans_id: u64,
    payload: &[&[u8]],
) -> Result<Vec<u8>, ChannelError> {
    let write = ch
        .ring()
        .try_write(&OutgoingPacket::inband(trans_id, true, payload))?;
    if write.signal {
        ch.signal_host();
    }
    let mut buf = vec![0u8; 4096];
    loop {
        if let Some(p) = ch.ring().read_packet(&mut buf)? {
            let is_reply =
                matches!(p.kind, PacketKind::Completion) && p.descriptor.trans_id.get() == trans_id;
            let payload = p.payload.to_vec();
            if ch.ring().read_done()? {
                ch.signal_host();
            }
            if is_reply {
                return Ok(payload);
            }
            continue;
        }
        if ch.ring().unmask_and_check()? {
            continue;
        }
        ch.wait_signal().await?;
    }
}

impl Driver for TestDriver {
    fn name(&self) -> &'static str {
        "test-nic"
    }

    fn class_id(&self) -> Guid {
        TEST_CLASS
    }

    fn probe(
        &self,
        device: Device,
    ) -> BoxFuture<'static, Result<Rc<dyn DeviceInstance>, ChannelError>> {
        let rtnl = self.rtnl.clone();
        let up = self.up.clone();
        let removed = self.removed.clone();
        let want = self.want_subchannels.get();
        let failures = Rc::new(Cell::new(0u32));
        let driver_failures = failures.clone();
        Box::pin(async move {
            let mut config = rtnl.lock().await;
            let name = format!("nic-relid{}", device.channel().relid());
            let nic = Rc::new(TestNic {
                name: name.clone(),
                primary: RefCell::new(None),
                subchannels: RefCell::new(Vec::new()),
                opened: Semaphore::named("sub-channels opened", 0),
                rtnl: rtnl.clone(),
                removed,
            });
            let primary = device.open(RINGS).await?;
            let handler_nic = Rc::downgrade(&nic);
            device.set_subchannel_handler(Rc::new(move |sub: Device| {
                let nic = handler_nic.clone();
                let failures = driver_failures.clone();
                Box::pin(async move {
                    let result = sub.open(RINGS).await;
                    let Some(nic) = nic.upgrade() else { return };
                    match result {
                        Ok(ch) => nic.subchannels.borrow_mut().push(ch),
                        Err(_) => failures.set(failures.get() + 1),
                    }
                    nic.opened.release(1);
                })
            }));
            *nic.primary.borrow_mut() = Some(primary.clone());
            let reply = request(&primary, 1, &[hvemu::SUBCH_MAGIC, &want.to_le_bytes()]).await?;
            let granted = reply
                .get(5..7)
                .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
            // Trust no more than was asked for.
            let granted = granted.min(want);
            let wait = nic.opened.acquire(usize::from(granted));
            device
                .channel()
                .or_rescind(async {
                    wait.await;
                    Ok(())
                })
                .await?;
            config.push(name);
            drop(config);
            let _ = failures;
            up.release(1);
            Ok(nic as Rc<dyn DeviceInstance>)
        })
    }
}

impl DeviceInstance for TestNic {
    fn remove(&self) -> BoxFuture<'static, ()> {
        let rtnl = self.rtnl.clone();
        let name = self.name.clone();
        let primary = self.primary.borrow_mut().take();
        let subs = std::mem::take(&mut *self.subchannels.borrow_mut());
        let removed = self.removed.clone();
        Box::pin(async move {
            let mut config = rtnl.lock().await;
            config.retain(|n| *n != name);
            drop(config);
            for s in subs {
                let _ = s.close().await;
            }
            if let Some(p) = primary {
                let _ = p.close().await;
            }
            removed.release(1);
        })
    }
}

pub fn host_config(seed: u64) -> HostConfig {
    HostConfig {
        seed,
        ..HostConfig::default()
    }
}
