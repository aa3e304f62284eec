//! Memory shared with the host (ring buffers, GPADL-described buffers).
//!
//! A [`SharedBuffer`] is a run of whole pages the host can address by guest physical
//! address (GPA). The guest reaches it only through these checked accessors, never by
//! pointer, so the same driver code works over real frames (the appliance's implementation
//! uses volatile access to identity-mapped memory) and over the host emulator's model of
//! guest memory (where guest and physical addresses differ). Dropping a buffer returns its
//! pages to the allocator.

use alloc::boxed::Box;

/// Page size of GPADLs and GPA ranges.
pub const PAGE_SIZE: usize = 4096;

/// Why a shared-memory operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryError {
    /// No memory left for the request.
    OutOfMemory,
    /// Access outside the buffer.
    OutOfBounds { offset: usize, len: usize },
}

/// One allocation of host-visible pages.
pub trait SharedBuffer {
    /// Length in bytes (a whole number of pages).
    fn len(&self) -> usize;

    /// Whether the buffer is empty (never, for allocated buffers).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Guest page frame number (GPA / 4096) of page `index`.
    fn pfn(&self, index: usize) -> u64;

    /// Copies `buf.len()` bytes at `offset` into `buf`.
    fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), MemoryError>;

    /// Copies `data` to `offset`.
    fn write(&self, offset: usize, data: &[u8]) -> Result<(), MemoryError>;

    /// Reads the aligned `u32` at `offset` with acquire ordering (ring indices the host
    /// updates concurrently).
    fn load_u32(&self, offset: usize) -> Result<u32, MemoryError>;

    /// Writes the aligned `u32` at `offset` with release ordering.
    fn store_u32(&self, offset: usize, value: u32) -> Result<(), MemoryError>;

    /// Number of pages.
    fn pages(&self) -> usize {
        self.len() / PAGE_SIZE
    }
}

/// Hands out host-visible memory.
pub trait DmaAllocator {
    /// Allocates `pages` zeroed pages.
    fn alloc(&self, pages: usize) -> Result<Box<dyn SharedBuffer>, MemoryError>;
}
