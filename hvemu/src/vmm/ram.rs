//! Guest RAM: one anonymous private mapping, registered with KVM as memory slot 0 at guest
//! physical address 0, and lent to hvemu's [`GuestMemory`] through the [`GuestRam`] trait.
//!
//! Host accesses (the VMBus host, netvsp, the SynIC delivery) happen only on the vCPU
//! thread while the vCPU is out of `KVM_RUN`, so the guest never writes the bytes while the
//! host copies them: with one vCPU there is no concurrent access to reason about.

use std::io;
use std::sync::Arc;

use hvemu::{GuestMemory, GuestRam, MemError};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;

/// The mapping that backs guest RAM `[0, size)`.
#[derive(Debug)]
pub struct RamMapping {
    ptr: *mut u8,
    size: usize,
}

// SAFETY: the mapping is plain memory owned by this value; all access goes through the
// bounds-checked copies below, and (see the module docs) only while no vCPU runs.
unsafe impl Send for RamMapping {}
// SAFETY: as for `Send`: shared references only copy bytes in and out.
unsafe impl Sync for RamMapping {}

impl RamMapping {
    /// Maps `size` bytes of zeroed RAM (lazily backed: untouched pages cost nothing).
    pub fn new(size: u64) -> io::Result<Arc<Self>> {
        let size =
            usize::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a fresh anonymous mapping at an address the kernel picks; no existing
        // memory is affected. The result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Arc::new(RamMapping {
            ptr: ptr.cast(),
            size,
        }))
    }

    /// Bytes of RAM.
    pub fn size(&self) -> u64 {
        self.size as u64
    }

    /// Registers the mapping with `vm` as slot 0 at GPA 0. The caller keeps this
    /// `RamMapping` alive (an `Arc` clone) for as long as `vm` exists.
    pub fn register(self: &Arc<Self>, vm: &VmFd) -> io::Result<()> {
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: self.size as u64,
            userspace_addr: self.ptr as u64,
        };
        // SAFETY: the region is this live mapping of `size` bytes; the machine holds an
        // `Arc` to it in a field dropped after the VM's file descriptors.
        unsafe { vm.set_user_memory_region(region) }.map_err(io::Error::from)
    }

    /// The offset range of `[gpa, gpa + len)` if it lies inside RAM.
    fn span(&self, gpa: u64, len: usize) -> Option<usize> {
        let start = usize::try_from(gpa).ok()?;
        let end = start.checked_add(len)?;
        (end <= self.size).then_some(start)
    }

    /// A [`GuestMemory`] handle over this RAM.
    pub fn guest_memory(self: &Arc<Self>) -> GuestMemory {
        GuestMemory::from_ram(Box::new(SharedRam(Arc::clone(self))))
    }
}

impl Drop for RamMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`size` are exactly the mapping created in `new`, unmapped once.
        unsafe {
            libc::munmap(self.ptr.cast(), self.size);
        }
    }
}

/// The RAM as hvemu sees it.
struct SharedRam(Arc<RamMapping>);

impl GuestRam for SharedRam {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let m = &self.0;
        let off = m.span(gpa, buf.len()).ok_or(MemError::OutOfRange {
            gpa,
            len: buf.len(),
        })?;
        // SAFETY: `off..off + buf.len()` is inside the mapping (checked by `span`), and
        // `buf` is a distinct Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(m.ptr.add(off), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        let m = &self.0;
        let off = m.span(gpa, data.len()).ok_or(MemError::OutOfRange {
            gpa,
            len: data.len(),
        })?;
        // SAFETY: as in `read`, with the copy going the other way.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), m.ptr.add(off), data.len()) };
        Ok(())
    }

    fn is_ram(&self, gpa: u64, len: u64) -> bool {
        usize::try_from(len)
            .ok()
            .and_then(|len| self.0.span(gpa, len))
            .is_some()
    }

    fn size(&self) -> u64 {
        self.0.size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_ram_through_guest_memory() {
        let ram = RamMapping::new(1 << 20).unwrap();
        let mem = ram.guest_memory();
        assert!(mem.is_real_ram());
        assert_eq!(mem.total_pages(), 256);
        mem.write(0xFFFFE, &[1, 2]).unwrap();
        let mut b = [0u8; 3];
        assert!(mem.read(0xFFFFE, &mut b).is_err());
        mem.read(0xFFFFD, &mut b).unwrap();
        assert_eq!(b, [0, 1, 2]);
        assert!(mem.write(u64::MAX - 1, &[0; 4]).is_err());
        assert!(mem.is_live(0xFF) && !mem.is_live(0x100));
    }
}
