//! Physical memory: the frame allocator (pure, host-tested), and on the target the kernel's
//! page tables and heap built from the loader's memory map, and host-visible (DMA) memory.

#[cfg(target_os = "none")]
pub mod dma;
pub mod frames;
#[cfg(target_os = "none")]
pub mod heap;
#[cfg(target_os = "none")]
pub mod layout;
#[cfg(target_os = "none")]
pub mod paging;
