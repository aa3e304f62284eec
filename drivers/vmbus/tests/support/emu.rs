//! Adapters that let the guest VMBus crate run against the hvemu host emulator: the
//! guest's `Hypervisor` and `DmaAllocator` over an in-process `VmbusHost` and its
//! `GuestMemory`, plus per-thread heap accounting. Shared by the vmbus and netvsc tests.

#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::boxed::Box;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::vec::Vec;

use hvemu::{GuestMemory, HostConfig, VmbusHost};
use hvnet_runtime::irq::IrqSignal;
use hvnet_runtime::Handle;
use hvnet_vmbus::bus::{VmBus, VmBusConfig};
use hvnet_vmbus::memory::{DmaAllocator, MemoryError, SharedBuffer, PAGE_SIZE};
use hvnet_vmbus::platform::{HvStatus, Hypervisor, SynicMessage};

// ---------------------------------------------------------------------------------------
// Heap accounting per test thread (tests run on parallel threads).

pub struct CountingAlloc;

thread_local! {
    static LIVE_BYTES: Cell<i64> = const { Cell::new(0) };
    static LIVE_BLOCKS: Cell<i64> = const { Cell::new(0) };
    static IN_HOST: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` as host code: its allocations are not counted as the guest's. Every call into
/// the emulator goes through here, and whatever it returns is dropped or copied inside,
/// so guest accounting sees only guest allocations.
pub fn host_scope<R>(f: impl FnOnce() -> R) -> R {
    let was = IN_HOST.with(|h| h.replace(true));
    let r = f();
    IN_HOST.with(|h| h.set(was));
    r
}

fn counting() -> bool {
    IN_HOST.try_with(|h| !h.get()).unwrap_or(false)
}

// SAFETY: forwards to the system allocator; the counters are thread-local cells that
// never allocate.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract, forwarded.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() && counting() {
            let _ = LIVE_BYTES.try_with(|c| c.set(c.get() + layout.size() as i64));
            let _ = LIVE_BLOCKS.try_with(|c| c.set(c.get() + 1));
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if counting() {
            let _ = LIVE_BYTES.try_with(|c| c.set(c.get() - layout.size() as i64));
            let _ = LIVE_BLOCKS.try_with(|c| c.set(c.get() - 1));
        }
        // SAFETY: forwarded; `ptr` came from `alloc` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// (live bytes, live blocks) allocated by this thread and not yet freed.
pub fn heap_live() -> (i64, i64) {
    (LIVE_BYTES.with(Cell::get), LIVE_BLOCKS.with(Cell::get))
}

// ---------------------------------------------------------------------------------------
// Adapters.

/// The guest's hypervisor, backed by the emulated host.
pub struct EmuHypervisor {
    pub host: Rc<RefCell<VmbusHost>>,
    pub irq: &'static IrqSignal,
}

impl Hypervisor for EmuHypervisor {
    fn post_message(
        &self,
        connection_id: u32,
        message_type: u32,
        payload: &[u8],
    ) -> Result<(), HvStatus> {
        host_scope(|| {
            self.host
                .borrow_mut()
                .post_message(connection_id, message_type, payload)
        })
        .map_err(HvStatus)
    }

    fn signal_event(&self, connection_id: u32) -> Result<(), HvStatus> {
        host_scope(|| self.host.borrow_mut().signal_event(connection_id)).map_err(HvStatus)
    }

    fn take_message(&self) -> Option<SynicMessage> {
        host_scope(|| {
            let (message_type, bytes) = self.host.borrow_mut().take_message()?;
            let mut payload = [0u8; 240];
            let n = bytes.len().min(240);
            payload[..n].copy_from_slice(&bytes[..n]);
            Some(SynicMessage {
                message_type,
                payload_size: n as u8,
                payload,
            })
        })
    }

    fn drain_events(&self, f: &mut dyn FnMut(u32)) {
        // Event flags are 2048 bits: reserving that many up front keeps the vector a guest
        // allocation even though the host fills it.
        let mut relids = Vec::with_capacity(2048);
        host_scope(|| self.host.borrow_mut().drain_events(&mut |r| relids.push(r)));
        relids.into_iter().for_each(f);
    }

    fn interrupt(&self) -> &'static IrqSignal {
        self.irq
    }

    fn vp_index(&self) -> u32 {
        0
    }
}

/// Host-visible guest memory, backed by hvemu's model (scattered, non-identity PFNs).
pub struct EmuAllocator {
    pub memory: GuestMemory,
}

struct EmuBuffer {
    memory: GuestMemory,
    pfns: Vec<u64>,
}

impl EmuBuffer {
    fn gpa(&self, offset: usize) -> Option<u64> {
        let pfn = *self.pfns.get(offset / PAGE_SIZE)?;
        Some(pfn * PAGE_SIZE as u64 + (offset % PAGE_SIZE) as u64)
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), MemoryError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(MemoryError::OutOfBounds { offset, len }),
        }
    }

    /// Splits `[offset, offset+len)` at page boundaries.
    fn chunks(&self, offset: usize, len: usize) -> impl Iterator<Item = (u64, usize, usize)> + '_ {
        let mut done = 0;
        std::iter::from_fn(move || {
            if done >= len {
                return None;
            }
            let at = offset + done;
            let n = (PAGE_SIZE - at % PAGE_SIZE).min(len - done);
            let item = (self.gpa(at)?, done, n);
            done += n;
            Some(item)
        })
    }
}

impl SharedBuffer for EmuBuffer {
    fn len(&self) -> usize {
        self.pfns.len() * PAGE_SIZE
    }

    fn pfn(&self, index: usize) -> u64 {
        self.pfns.get(index).copied().unwrap_or(0)
    }

    fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.check(offset, buf.len())?;
        let len = buf.len();
        for (gpa, at, n) in self.chunks(offset, len) {
            host_scope(|| self.memory.read(gpa, &mut buf[at..at + n]))
                .map_err(|_| MemoryError::OutOfBounds { offset, len })?;
        }
        Ok(())
    }

    fn write(&self, offset: usize, data: &[u8]) -> Result<(), MemoryError> {
        self.check(offset, data.len())?;
        let len = data.len();
        for (gpa, at, n) in self.chunks(offset, len) {
            host_scope(|| self.memory.write(gpa, &data[at..at + n]))
                .map_err(|_| MemoryError::OutOfBounds { offset, len })?;
        }
        Ok(())
    }

    fn load_u32(&self, offset: usize) -> Result<u32, MemoryError> {
        self.check(offset, 4)?;
        let gpa = self
            .gpa(offset)
            .ok_or(MemoryError::OutOfBounds { offset, len: 4 })?;
        host_scope(|| self.memory.load_u32(gpa))
            .map_err(|_| MemoryError::OutOfBounds { offset, len: 4 })
    }

    fn store_u32(&self, offset: usize, value: u32) -> Result<(), MemoryError> {
        self.check(offset, 4)?;
        let gpa = self
            .gpa(offset)
            .ok_or(MemoryError::OutOfBounds { offset, len: 4 })?;
        host_scope(|| self.memory.store_u32(gpa, value))
            .map_err(|_| MemoryError::OutOfBounds { offset, len: 4 })
    }
}

impl Drop for EmuBuffer {
    fn drop(&mut self) {
        host_scope(|| self.memory.free_pages(&self.pfns));
    }
}

impl DmaAllocator for EmuAllocator {
    fn alloc(&self, pages: usize) -> Result<Box<dyn SharedBuffer>, MemoryError> {
        let host_pfns =
            host_scope(|| self.memory.alloc_pages(pages)).ok_or(MemoryError::OutOfMemory)?;
        let pfns = host_pfns.clone();
        host_scope(|| drop(host_pfns));
        Ok(Box::new(EmuBuffer {
            memory: self.memory.clone(),
            pfns,
        }))
    }
}

// ---------------------------------------------------------------------------------------
// A machine: the guest bus wired to a fresh emulated host.

/// The emulated host, its guest memory, and the guest's bus connected to both.
pub struct EmuMachine {
    pub host: Rc<RefCell<VmbusHost>>,
    pub memory: GuestMemory,
    pub bus: VmBus,
}

/// Builds an [`EmuMachine`] with `pages` pages of guest memory. Host objects are made as
/// host code, so guest heap accounting sees only the guest.
pub fn emu_machine(
    handle: &Handle,
    host_config: HostConfig,
    bus_config: VmBusConfig,
    pages: usize,
    seed: u64,
) -> EmuMachine {
    emu_machine_with(handle, host_config, bus_config, pages, seed, |hv, mem| {
        (Rc::new(hv), Rc::new(mem))
    })
}

/// Like [`emu_machine`], with `wrap` putting something (counters, faults) between the
/// bus and the adapters.
pub fn emu_machine_with(
    handle: &Handle,
    host_config: HostConfig,
    bus_config: VmBusConfig,
    pages: usize,
    seed: u64,
    wrap: impl FnOnce(EmuHypervisor, EmuAllocator) -> (Rc<dyn Hypervisor>, Rc<dyn DmaAllocator>),
) -> EmuMachine {
    let memory = host_scope(|| GuestMemory::new(pages, seed));
    let host = host_scope(|| Rc::new(RefCell::new(VmbusHost::new(host_config, memory.clone()))));
    let irq: &'static IrqSignal = Box::leak(Box::new(IrqSignal::named("vmbus SINT")));
    host_scope(|| host.borrow_mut().set_notify(Box::new(move || irq.raise())));
    let (hv, mem) = wrap(
        EmuHypervisor {
            host: host.clone(),
            irq,
        },
        EmuAllocator {
            memory: memory.clone(),
        },
    );
    let bus = VmBus::new(handle, hv, mem, bus_config);
    EmuMachine { host, memory, bus }
}

/// Asserts the host saw no protocol violation and guest memory no bad access.
pub fn assert_host_clean(host: &RefCell<VmbusHost>, memory: &GuestMemory) {
    let host = host.borrow();
    let v = host.violations();
    assert!(v.is_empty(), "host recorded protocol violations: {v:#?}");
    let mv = memory.violations();
    assert!(mv.is_empty(), "guest-memory violations: {mv:#?}");
}

/// A scenario step's result.
pub type Res = Result<(), String>;

/// `Err(what())` unless `cond` holds.
pub fn ensure(cond: bool, what: impl FnOnce() -> String) -> Res {
    if cond {
        Ok(())
    } else {
        Err(what())
    }
}
