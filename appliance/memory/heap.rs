//! The kernel heap: one contiguous run of frames handed to `linked_list_allocator`.
//! Allocation failure is reported with the heap's figures before Rust's
//! `handle_alloc_error` turns it into a panic, so an out-of-memory stop says how much was
//! asked for and how much was left.

use core::alloc::{GlobalAlloc, Layout};
use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};

use linked_list_allocator::LockedHeap;

use crate::arch::serial::EmergencyWriter;

struct KernelHeap {
    inner: LockedHeap,
    failures: AtomicU64,
}

// SAFETY: delegates to `LockedHeap`, which upholds the `GlobalAlloc` contract; the wrapper
// only counts and reports failures.
unsafe impl GlobalAlloc for KernelHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours, forwarded.
        let p = unsafe { self.inner.alloc(layout) };
        if p.is_null() {
            self.failures.fetch_add(1, Ordering::Relaxed);
            let (used, size) = stats();
            let _ = writeln!(
                EmergencyWriter,
                "out of memory: {} bytes (align {}) requested, heap {} of {} bytes in use",
                layout.size(),
                layout.align(),
                used,
                size
            );
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded; `ptr` came from `alloc` with this layout.
        unsafe { self.inner.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static HEAP: KernelHeap = KernelHeap {
    inner: LockedHeap::empty(),
    failures: AtomicU64::new(0),
};

/// Gives the heap `[start, start + size)`, which must be mapped, writable and unused.
pub fn init(start: u64, size: usize) {
    // SAFETY: the caller hands over exclusive, mapped memory (frames taken from the frame
    // allocator after paging identity-mapped them); `init` runs once.
    unsafe { HEAP.inner.lock().init(start as *mut u8, size) };
}

/// (bytes in use, heap size).
pub fn stats() -> (usize, usize) {
    match HEAP.inner.try_lock() {
        Some(h) => (h.used(), h.size()),
        None => (0, 0),
    }
}

/// Allocations that failed since boot.
pub fn failures() -> u64 {
    HEAP.failures.load(Ordering::Relaxed)
}
