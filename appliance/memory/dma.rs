//! Host-visible memory: whole frames from the frame allocator, shared with the hypervisor.
//!
//! Every usable frame is identity-mapped (write-back, no execute) by `paging::init`, so a
//! frame's address is both the pointer the kernel uses and the guest physical address
//! (GPA) the host is given. [`FrameDma`] hands such frames to VMBus as
//! [`SharedBuffer`]s; the host may write them at any time, so every access goes through
//! volatile or atomic operations and never through a Rust reference. Buffers prefer one
//! contiguous run and fall back to smaller runs when memory is fragmented (a GPADL lists
//! every page anyway); dropping a buffer returns its frames.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, Ordering};

use hvnet_vmbus::memory::{DmaAllocator, MemoryError, SharedBuffer, PAGE_SIZE};
use log::warn;

use super::frames::FRAME_SIZE;
use super::paging::FRAMES;

/// Allocates `pages` contiguous zeroed frames anywhere in RAM; returns the first frame's
/// address (identity-mapped, so also its GPA).
pub fn alloc_pages(pages: u64) -> Option<u64> {
    let start = FRAMES.lock().alloc(pages, FRAME_SIZE, u64::MAX)?;
    // SAFETY: the frames were just taken from the allocator, so nothing else uses them,
    // and all RAM the allocator hands out is identity-mapped writable.
    unsafe { zero_phys(start, (pages * FRAME_SIZE) as usize) };
    Some(start)
}

/// Returns frames taken with [`alloc_pages`].
pub fn free_pages(start: u64, pages: u64) {
    if let Err(e) = FRAMES.lock().free(start, pages) {
        warn!("dma: {pages} frame(s) at {start:#x} could not be freed ({e:?}); leaked");
    }
}

/// Zeroes `[addr, addr + len)`.
///
/// The whole-word part is one `rep stosq`: under an instruction-emulating hypervisor
/// (KVM-PVM in the test VMM) that is one emulated instruction instead of millions of
/// stores, which took a 16 MiB receive buffer from about 15 s to well under one.
///
/// # Safety
/// The range must be mapped, writable memory the caller owns (possibly shared with the
/// host, never with Rust references).
pub unsafe fn zero_phys(addr: u64, len: usize) {
    let head = (addr.next_multiple_of(8) - addr).min(len as u64) as usize;
    for i in 0..head {
        // SAFETY: inside the caller's range.
        unsafe { core::ptr::write_volatile((addr + i as u64) as *mut u8, 0) };
    }
    let words = (len - head) / 8;
    if words > 0 {
        // SAFETY: [addr + head, addr + head + 8 * words) is inside the caller's range and
        // 8-byte aligned; `rep stosq` writes exactly that (direction flag is clear, as
        // the ABI guarantees) and clobbers only rdi, rcx.
        unsafe {
            core::arch::asm!(
                "rep stosq",
                inout("rdi") addr + head as u64 => _,
                inout("rcx") words => _,
                in("rax") 0u64,
                options(nostack, preserves_flags)
            );
        }
    }
    for i in head + words * 8..len {
        // SAFETY: inside the caller's range.
        unsafe { core::ptr::write_volatile((addr + i as u64) as *mut u8, 0) };
    }
}

/// Copies `buf.len()` bytes from `addr` with volatile loads (aligned words where possible).
///
/// # Safety
/// `[addr, addr + buf.len())` must be mapped, readable memory the caller owns or shares
/// with the host.
pub unsafe fn copy_from_phys(addr: u64, buf: &mut [u8]) {
    let mut i = 0usize;
    while i < buf.len() {
        let a = addr + i as u64;
        if a.is_multiple_of(8) && i + 8 <= buf.len() {
            // SAFETY: inside the caller's range, 8-byte aligned.
            let w = unsafe { core::ptr::read_volatile(a as *const u64) };
            buf[i..i + 8].copy_from_slice(&w.to_ne_bytes());
            i += 8;
        } else {
            // SAFETY: inside the caller's range.
            buf[i] = unsafe { core::ptr::read_volatile(a as *const u8) };
            i += 1;
        }
    }
}

/// Copies `data` to `addr` with volatile stores (aligned words where possible).
///
/// # Safety
/// `[addr, addr + data.len())` must be mapped, writable memory the caller owns or shares
/// with the host, not covered by any Rust reference.
pub unsafe fn copy_to_phys(addr: u64, data: &[u8]) {
    let mut i = 0usize;
    while i < data.len() {
        let a = addr + i as u64;
        if a.is_multiple_of(8) && i + 8 <= data.len() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&data[i..i + 8]);
            // SAFETY: inside the caller's range, 8-byte aligned.
            unsafe { core::ptr::write_volatile(a as *mut u64, u64::from_ne_bytes(w)) };
            i += 8;
        } else {
            // SAFETY: inside the caller's range.
            unsafe { core::ptr::write_volatile(a as *mut u8, data[i]) };
            i += 1;
        }
    }
}

/// The appliance's [`DmaAllocator`]: frames from the frame allocator.
pub struct FrameDma;

/// A run of contiguous frames inside a buffer.
#[derive(Clone, Copy)]
struct Run {
    /// Index of the run's first page within the buffer.
    first_page: usize,
    /// Physical (= virtual) address of that page.
    start: u64,
    pages: usize,
}

struct FrameBuffer {
    runs: Vec<Run>,
    pages: usize,
}

impl FrameBuffer {
    fn check(&self, offset: usize, len: usize) -> Result<(), MemoryError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(MemoryError::OutOfBounds { offset, len }),
        }
    }

    /// The run holding byte `offset` (in bounds) and the address of that byte.
    fn locate(&self, offset: usize) -> Option<(&Run, u64)> {
        let page = offset / PAGE_SIZE;
        let run = self
            .runs
            .iter()
            .find(|r| (r.first_page..r.first_page + r.pages).contains(&page))?;
        let within = offset - run.first_page * PAGE_SIZE;
        Some((run, run.start + within as u64))
    }

    /// Calls `f(address, buffer offset, length)` for each physically contiguous piece of
    /// `[offset, offset + len)`, which must be in bounds.
    fn pieces(
        &self,
        offset: usize,
        len: usize,
        mut f: impl FnMut(u64, usize, usize),
    ) -> Result<(), MemoryError> {
        self.check(offset, len)?;
        let mut done = 0;
        while done < len {
            let at = offset + done;
            let (run, addr) = self
                .locate(at)
                .ok_or(MemoryError::OutOfBounds { offset, len })?;
            let run_end = (run.first_page + run.pages) * PAGE_SIZE;
            let n = (run_end - at).min(len - done);
            f(addr, done, n);
            done += n;
        }
        Ok(())
    }

    /// The address of the aligned `u32` at `offset`.
    fn word(&self, offset: usize) -> Result<*mut u32, MemoryError> {
        self.check(offset, 4)?;
        if !offset.is_multiple_of(4) {
            return Err(MemoryError::OutOfBounds { offset, len: 4 });
        }
        let (_, addr) = self
            .locate(offset)
            .ok_or(MemoryError::OutOfBounds { offset, len: 4 })?;
        Ok(addr as *mut u32)
    }
}

impl SharedBuffer for FrameBuffer {
    fn len(&self) -> usize {
        self.pages * PAGE_SIZE
    }

    fn pfn(&self, index: usize) -> u64 {
        self.locate(index.saturating_mul(PAGE_SIZE))
            .map_or(0, |(_, addr)| addr / PAGE_SIZE as u64)
    }

    fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.pieces(offset, buf.len(), |addr, at, n| {
            // SAFETY: `addr..addr + n` lies in this buffer's frames (bounds checked by
            // `pieces`), which it owns until drop and which are identity-mapped.
            unsafe { copy_from_phys(addr, &mut buf[at..at + n]) }
        })
    }

    fn write(&self, offset: usize, data: &[u8]) -> Result<(), MemoryError> {
        self.pieces(offset, data.len(), |addr, at, n| {
            // SAFETY: as in `read`; no Rust reference covers these frames.
            unsafe { copy_to_phys(addr, &data[at..at + n]) }
        })
    }

    fn load_u32(&self, offset: usize) -> Result<u32, MemoryError> {
        let p = self.word(offset)?;
        // SAFETY: `p` is an aligned u32 inside this buffer's owned, mapped frames; other
        // accesses to it (host or guest) are atomic or volatile, never through references.
        Ok(unsafe { AtomicU32::from_ptr(p) }.load(Ordering::Acquire))
    }

    fn store_u32(&self, offset: usize, value: u32) -> Result<(), MemoryError> {
        let p = self.word(offset)?;
        // SAFETY: as in `load_u32`.
        unsafe { AtomicU32::from_ptr(p) }.store(value, Ordering::Release);
        Ok(())
    }
}

impl Drop for FrameBuffer {
    fn drop(&mut self) {
        for run in &self.runs {
            free_pages(run.start, run.pages as u64);
        }
    }
}

impl DmaAllocator for FrameDma {
    fn alloc(&self, pages: usize) -> Result<Box<dyn SharedBuffer>, MemoryError> {
        let mut buffer = FrameBuffer {
            runs: Vec::new(),
            pages: 0,
        };
        let mut chunk = pages;
        while buffer.pages < pages {
            let want = chunk.min(pages - buffer.pages);
            match alloc_pages(want as u64) {
                Some(start) => {
                    buffer.runs.push(Run {
                        first_page: buffer.pages,
                        start,
                        pages: want,
                    });
                    buffer.pages += want;
                }
                // Fragmented: try halves. Dropping `buffer` frees what was taken.
                None if want > 1 => chunk = want / 2,
                None => return Err(MemoryError::OutOfMemory),
            }
        }
        Ok(Box::new(buffer))
    }
}
