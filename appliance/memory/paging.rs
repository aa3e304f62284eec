//! The kernel's own page tables, replacing the 4 GiB boot identity map.
//!
//! Identity mapping throughout (virtual = physical), so device-visible addresses need no
//! translation; but only what is really there is mapped: kernel sections with their own
//! permissions (text RX, rodata R, data RW, all but text NX), a guard page under the boot
//! stack, the RAM and ACPI ranges of the memory map (2 MiB pages where aligned), and MMIO on
//! request, uncached. Page 0 stays unmapped so null dereferences fault.

use spin::Mutex;
use x86_64::registers::control::{Cr0, Cr0Flags, Cr3, Cr3Flags};
use x86_64::registers::model_specific::{Efer, EferFlags};
use x86_64::structures::paging::mapper::MapToError;
use x86_64::structures::paging::{
    FrameAllocator, Mapper, OffsetPageTable, Page, PageSize, PageTable, PageTableFlags as F,
    PhysFrame, Size2MiB, Size4KiB, Translate,
};
use x86_64::{PhysAddr, VirtAddr};

use super::frames::{self, FRAME_SIZE};
use super::layout;
use crate::boot::info::{BootInfo, MemoryKind};

/// Page tables must be reachable through the boot identity map while they are built.
const PAGE_TABLE_LIMIT: u64 = 1 << 32;
const HUGE: u64 = Size2MiB::SIZE;

/// The frame allocator, shared with whoever needs frames later (heap, device buffers).
pub static FRAMES: Mutex<frames::FrameAllocator> = Mutex::new(frames::FrameAllocator::new());

/// Physical address of the active PML4 once `init` has switched to it.
static PML4: Mutex<Option<u64>> = Mutex::new(None);

static NX: spin::Once<bool> = spin::Once::new();

fn nx() -> F {
    if *NX.get().unwrap_or(&false) {
        F::NO_EXECUTE
    } else {
        F::empty()
    }
}

/// Hands out zeroed frames below 4 GiB for page tables.
struct TableFrames<'a>(&'a mut frames::FrameAllocator);

// SAFETY: frames come from the allocator, are unused, and are zeroed before use.
unsafe impl FrameAllocator<Size4KiB> for TableFrames<'_> {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        let p = self.0.alloc(1, FRAME_SIZE, PAGE_TABLE_LIMIT)?;
        // SAFETY: the frame is below 4 GiB (identity-mapped by whichever tables are active)
        // and freshly allocated, so no one else references it.
        unsafe { core::ptr::write_bytes(p as *mut u8, 0, FRAME_SIZE as usize) };
        PhysFrame::from_start_address(PhysAddr::new(p)).ok()
    }
}

/// Why paging could not be set up.
#[derive(Debug)]
pub enum PagingError {
    OutOfFrames,
}

fn map_err<S: PageSize>(e: MapToError<S>) -> Result<(), PagingError> {
    match e {
        // Already mapped (e.g. an ACPI range inside RAM): the existing mapping stands.
        MapToError::PageAlreadyMapped(_) | MapToError::ParentEntryHugePage => Ok(()),
        MapToError::FrameAllocationFailed => Err(PagingError::OutOfFrames),
    }
}

/// Maps `[start, end)` identity with `flags`, using 2 MiB pages for aligned interiors when
/// `huge` is set. Flushes are skipped while building (`flush` false) and done otherwise.
fn map_identity(
    mapper: &mut OffsetPageTable<'_>,
    alloc: &mut TableFrames<'_>,
    start: u64,
    end: u64,
    flags: F,
    huge: bool,
    flush: bool,
) -> Result<(), PagingError> {
    let mut a = start & !(FRAME_SIZE - 1);
    let end = (end + FRAME_SIZE - 1) & !(FRAME_SIZE - 1);
    while a < end {
        if huge && a.is_multiple_of(HUGE) && a + HUGE <= end {
            map_page::<Size2MiB>(mapper, alloc, a, flags | F::HUGE_PAGE, flush)?;
            a += HUGE;
        } else {
            map_page::<Size4KiB>(mapper, alloc, a, flags, flush)?;
            a += FRAME_SIZE;
        }
    }
    Ok(())
}

/// Identity-maps the one page of size `S` at `addr`.
fn map_page<S: PageSize>(
    mapper: &mut OffsetPageTable<'_>,
    alloc: &mut TableFrames<'_>,
    addr: u64,
    flags: F,
    flush: bool,
) -> Result<(), PagingError>
where
    for<'a> OffsetPageTable<'a>: Mapper<S>,
{
    let page = Page::<S>::containing_address(VirtAddr::new(addr));
    let frame = PhysFrame::<S>::containing_address(PhysAddr::new(addr));
    // SAFETY: identity mapping of memory the memory map (or a device) reports; it aliases
    // nothing else because virtual equals physical everywhere.
    match unsafe { mapper.map_to(page, frame, flags, alloc) } {
        Ok(f) if flush => f.flush(),
        Ok(f) => f.ignore(),
        Err(e) => map_err(e)?,
    }
    Ok(())
}

/// `range` minus `hole`, as up to two ranges.
fn subtract(range: (u64, u64), hole: (u64, u64)) -> [(u64, u64); 2] {
    let left = (range.0, range.1.min(hole.0));
    let right = (range.0.max(hole.1), range.1);
    [left, right]
}

/// Summary of what `init` did, for the boot log.
pub struct PagingSummary {
    pub mapped_ram: u64,
    pub table_frames: u64,
}

/// Builds the kernel's page tables from the memory map and switches to them.
pub fn init(boot: &BootInfo) -> Result<PagingSummary, PagingError> {
    let has_nx = crate::arch::cpu::has_nx();
    NX.call_once(|| has_nx);
    if has_nx {
        // SAFETY: the CPU supports NXE (checked); setting it only makes the NX bit valid.
        unsafe { Efer::update(|f| f.insert(EferFlags::NO_EXECUTE_ENABLE)) };
    }
    let mut frames = FRAMES.lock();
    let before = frames.free_bytes();
    let mut alloc = TableFrames(&mut frames);
    let pml4 = alloc.allocate_frame().ok_or(PagingError::OutOfFrames)?;
    // SAFETY: the frame was just allocated and zeroed, and is identity-mapped.
    let table = unsafe { &mut *(pml4.start_address().as_u64() as *mut PageTable) };
    // SAFETY: all physical memory we touch through this mapper is below 4 GiB and
    // identity-mapped by the active boot tables, so offset 0 is correct.
    let mut mapper = unsafe { OffsetPageTable::new(table, VirtAddr::new(0)) };

    let rw = F::PRESENT | F::WRITABLE | nx();
    let image = layout::kernel_image();
    let sections = [
        (layout::boot_section(), F::PRESENT),
        (layout::text(), F::PRESENT),
        (layout::rodata(), F::PRESENT | nx()),
        (layout::data_below_guard(), rw),
        (layout::data_above_guard(), rw),
    ];
    for ((start, end), flags) in sections {
        map_identity(&mut mapper, &mut alloc, start, end, flags, false, false)?;
    }

    let mut mapped_ram = 0;
    for r in boot.memory_regions() {
        if !matches!(
            r.kind,
            MemoryKind::Usable | MemoryKind::AcpiReclaimable | MemoryKind::AcpiNvs
        ) {
            continue;
        }
        // Never map page 0, and leave the kernel image to the section mappings above.
        let start = r.start.max(FRAME_SIZE);
        for (s, e) in subtract((start, r.end()), image) {
            if s < e {
                map_identity(&mut mapper, &mut alloc, s, e, rw, true, false)?;
                mapped_ram += e - s;
            }
        }
    }
    let table_frames = (before - frames.free_bytes()) / FRAME_SIZE;
    drop(frames);

    // SAFETY: the new tables map the running code (text), the stack (bss) and all data the
    // kernel uses, with the same virtual addresses as before.
    unsafe {
        Cr3::write(pml4, Cr3Flags::empty());
        Cr0::update(|f| f.insert(Cr0Flags::WRITE_PROTECT));
    }
    *PML4.lock() = Some(pml4.start_address().as_u64());
    Ok(PagingSummary {
        mapped_ram,
        table_frames,
    })
}

fn with_active<R>(
    f: impl FnOnce(&mut OffsetPageTable<'_>, &mut TableFrames<'_>) -> R,
) -> Option<R> {
    let pml4 = (*PML4.lock())?;
    let mut frames = FRAMES.lock();
    // SAFETY: `pml4` is the active top-level table (identity-mapped); the PML4 lock's
    // holder is the only writer of the tables, and mapper use is serialised by FRAMES.
    let table = unsafe { &mut *(pml4 as *mut PageTable) };
    // SAFETY: all page-table frames are identity-mapped below 4 GiB.
    let mut mapper = unsafe { OffsetPageTable::new(table, VirtAddr::new(0)) };
    Some(f(&mut mapper, &mut TableFrames(&mut frames)))
}

/// Maps a device register range uncached and returns its (identity) address.
pub fn map_mmio(phys: u64, len: u64) -> Option<u64> {
    let flags = F::PRESENT | F::WRITABLE | F::NO_CACHE | F::WRITE_THROUGH | nx();
    with_active(|m, a| map_identity(m, a, phys, phys.checked_add(len)?, flags, false, true).ok())??;
    Some(phys)
}

/// Makes firmware tables at `[phys, phys + len)` readable (write-back, read-only), unless
/// they already are (most lie in RAM or ACPI ranges mapped at boot).
pub fn map_firmware(phys: u64, len: u64) -> Option<u64> {
    if phys < FRAME_SIZE {
        return None;
    }
    let flags = F::PRESENT | nx();
    with_active(|m, a| {
        let end = phys.checked_add(len)?;
        let mut p = phys & !(FRAME_SIZE - 1);
        while p < end {
            if m.translate_addr(VirtAddr::new(p)).is_none() {
                map_identity(m, a, p, p + FRAME_SIZE, flags, false, true).ok()?;
            }
            p += FRAME_SIZE;
        }
        Some(())
    })??;
    Some(phys)
}
