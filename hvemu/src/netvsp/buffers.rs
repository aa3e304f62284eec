//! Guest buffers as the host sees them: byte spans over GPA ranges (a GPADL's or a
//! GPA-direct packet's), and the allocator of receive-buffer sections.
//!
//! A [`GuestBuf`] is a view, rebuilt from the ranges every time it is used (the guest
//! can tear a GPADL down at any moment; a stale copy of its page list would let the host
//! write pages the guest got back). Every access is bounds-checked against the ranges
//! and every page against guest memory; nothing here panics on guest input.

use std::collections::{BTreeMap, BTreeSet};

use crate::memory::{GuestMemory, MemError, PAGE_SIZE};
use crate::ring::OwnedGpaRange;

/// Why a buffer access failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufError {
    /// `offset + len` lies past the end of the buffer.
    OutOfBounds {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: usize,
        /// Buffer length.
        size: u64,
    },
    /// A range is malformed: offset into its first page >= 4096, or fewer PFNs than its
    /// length needs.
    BadRange,
    /// A page is not guest RAM.
    Memory(MemError),
}

impl std::fmt::Display for BufError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BufError::OutOfBounds { offset, len, size } => {
                write!(
                    f,
                    "{offset:#x}+{len:#x} outside a buffer of {size:#x} bytes"
                )
            }
            BufError::BadRange => f.write_str("malformed GPA range"),
            BufError::Memory(e) => write!(f, "{e}"),
        }
    }
}

/// A byte buffer made of GPA ranges laid end to end.
#[derive(Clone, Copy, Debug)]
pub struct GuestBuf<'a> {
    ranges: &'a [OwnedGpaRange],
}

impl<'a> GuestBuf<'a> {
    /// A view over `ranges`.
    pub fn new(ranges: &'a [OwnedGpaRange]) -> Self {
        GuestBuf { ranges }
    }

    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|r| u64::from(r.byte_count)).sum()
    }

    /// Whether the buffer has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f(gpa, start, len)` for each physically contiguous piece of
    /// `[offset, offset + len)`, where `start` is the piece's offset within the request.
    fn walk(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(u64, usize, usize) -> Result<(), MemError>,
    ) -> Result<(), BufError> {
        let size = self.len();
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= size)
            .ok_or(BufError::OutOfBounds { offset, len, size })?;
        let mut pos = offset;
        let mut range_start = 0u64;
        for r in self.ranges {
            let range_end = range_start + u64::from(r.byte_count);
            while pos < end && pos < range_end {
                if r.byte_offset as usize >= PAGE_SIZE {
                    return Err(BufError::BadRange);
                }
                // Position within the range's page span.
                let abs = u64::from(r.byte_offset) + (pos - range_start);
                let page_idx =
                    usize::try_from(abs / PAGE_SIZE as u64).map_err(|_| BufError::BadRange)?;
                let pfn = *r.pfns.get(page_idx).ok_or(BufError::BadRange)?;
                let in_page = (abs % PAGE_SIZE as u64) as usize;
                let n = (PAGE_SIZE - in_page)
                    .min((range_end - pos) as usize)
                    .min((end - pos) as usize);
                let gpa = pfn
                    .checked_mul(PAGE_SIZE as u64)
                    .and_then(|g| g.checked_add(in_page as u64))
                    .ok_or(BufError::BadRange)?;
                f(gpa, (pos - offset) as usize, n).map_err(BufError::Memory)?;
                pos += n as u64;
            }
            range_start = range_end;
            if pos >= end {
                break;
            }
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes at `offset` out of the buffer.
    pub fn read(&self, mem: &GuestMemory, offset: u64, buf: &mut [u8]) -> Result<(), BufError> {
        let len = buf.len();
        self.walk(offset, len, |gpa, start, n| {
            mem.read(gpa, &mut buf[start..start + n])
        })
    }

    /// Copies `data` into the buffer at `offset`.
    pub fn write(&self, mem: &GuestMemory, offset: u64, data: &[u8]) -> Result<(), BufError> {
        self.walk(offset, data.len(), |gpa, start, n| {
            mem.write(gpa, &data[start..start + n])
        })
    }

    /// The whole buffer, if it is at most `max` bytes.
    pub fn read_all(&self, mem: &GuestMemory, max: usize) -> Result<Vec<u8>, BufError> {
        let size = self.len();
        let len =
            usize::try_from(size)
                .ok()
                .filter(|&l| l <= max)
                .ok_or(BufError::OutOfBounds {
                    offset: 0,
                    len: max,
                    size,
                })?;
        let mut v = vec![0u8; len];
        self.read(mem, 0, &mut v)?;
        Ok(v)
    }
}

/// Which sections a request may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SectionUse {
    /// RNDIS control replies and indications: any free section.
    Control,
    /// Data frames: only sections above the control reserve, so a flood of frames the
    /// guest is slow to return never starves control replies (OpenVMM reserves receive
    /// buffers for control messages the same way).
    Data,
}

/// The receive buffer's sections: which are free, and which transfer-page packet holds
/// the busy ones until the guest completes it.
#[derive(Clone, Debug)]
pub struct SectionAllocator {
    count: u32,
    reserved: u32,
    free: BTreeSet<u32>,
    /// Transaction id of a transfer-page packet -> the sections it carries.
    busy: BTreeMap<u64, Vec<u32>>,
}

impl SectionAllocator {
    /// `count` sections, the lowest `reserved` of them kept for control messages.
    pub fn new(count: u32, reserved: u32) -> Self {
        SectionAllocator {
            count,
            reserved: reserved.min(count),
            free: (0..count).collect(),
            busy: BTreeMap::new(),
        }
    }

    /// The control reserve for a buffer of `count` sections: 16, but never more than a
    /// quarter of the buffer.
    pub fn default_reserve(count: u32) -> u32 {
        (count / 4).min(16)
    }

    /// Number of sections.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Sections currently free.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Sections held by packets the guest has not completed.
    pub fn outstanding(&self) -> usize {
        self.busy.values().map(Vec::len).sum()
    }

    /// Transfer-page packets the guest has not completed.
    pub fn outstanding_packets(&self) -> usize {
        self.busy.len()
    }

    /// Takes the lowest free section `usage` may use.
    pub fn alloc(&mut self, usage: SectionUse) -> Option<u32> {
        let s = match usage {
            SectionUse::Control => self.free.first().copied(),
            SectionUse::Data => self.free.range(self.reserved..).next().copied(),
        }?;
        self.free.remove(&s);
        Some(s)
    }

    /// Returns a section that was allocated but never sent.
    pub fn release(&mut self, section: u32) {
        if section < self.count {
            self.free.insert(section);
        }
    }

    /// Records that packet `trans_id` carries `sections` (possibly none, for a packet that
    /// points at no section, e.g. a fault-injected one). A transaction id already in use
    /// keeps its sections too.
    pub fn hold(&mut self, trans_id: u64, sections: Vec<u32>) {
        self.busy.entry(trans_id).or_default().extend(sections);
    }

    /// The guest completed packet `trans_id`: its sections are free again. Returns how
    /// many were freed, or `None` if no such packet is outstanding.
    pub fn complete(&mut self, trans_id: u64) -> Option<usize> {
        let sections = self.busy.remove(&trans_id)?;
        let n = sections.len();
        for s in sections {
            self.release(s);
        }
        Some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(pfns: &[u64], byte_offset: u32, byte_count: u32) -> OwnedGpaRange {
        OwnedGpaRange {
            byte_count,
            byte_offset,
            pfns: pfns.to_vec(),
        }
    }

    #[test]
    fn buffer_spans_pages_and_ranges() {
        let mem = GuestMemory::new(16, 5);
        let pfns = mem.alloc_pages(4).unwrap();
        // Range 1: 100 bytes from offset 4000 of page 0 into page 1; range 2: two pages.
        let ranges = [
            range(&pfns[..2], 4000, 100),
            range(&pfns[2..], 0, 2 * PAGE_SIZE as u32),
        ];
        let b = GuestBuf::new(&ranges);
        assert_eq!(b.len(), 100 + 8192);
        let data: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        b.write(&mem, 50, &data).unwrap();
        let mut back = vec![0u8; 300];
        b.read(&mem, 50, &mut back).unwrap();
        assert_eq!(back, data);
        // The first 50 bytes of range 1 sit at page 0 offset 4050; 46 bytes there, then
        // page 1 offset 0.
        let mut one = [0u8; 1];
        mem.read(pfns[0] * PAGE_SIZE as u64 + 4050, &mut one)
            .unwrap();
        assert_eq!(one[0], 0);
        mem.read(pfns[1] * PAGE_SIZE as u64, &mut one).unwrap();
        assert_eq!(one[0], 46);
        // Byte 50 of the request is offset 100 of the buffer: range 2, page 2 offset 0.
        mem.read(pfns[2] * PAGE_SIZE as u64, &mut one).unwrap();
        assert_eq!(one[0], 50);
    }

    #[test]
    fn buffer_rejects_hostile_ranges() {
        let mem = GuestMemory::new(16, 6);
        let pfns = mem.alloc_pages(2).unwrap();
        let ok = [range(&pfns, 0, 8192)];
        let b = GuestBuf::new(&ok);
        let mut x = [0u8; 8];
        assert!(matches!(
            b.read(&mem, 8190, &mut x),
            Err(BufError::OutOfBounds { .. })
        ));
        assert!(matches!(
            b.read(&mem, u64::MAX - 2, &mut x),
            Err(BufError::OutOfBounds { .. })
        ));
        // Claims three pages, lists two.
        let short = [range(&pfns, 0, 3 * 4096)];
        let b = GuestBuf::new(&short);
        assert_eq!(b.read(&mem, 8190, &mut x), Err(BufError::BadRange));
        // Offset into the first page out of range.
        let bad = [range(&pfns, 5000, 10)];
        assert_eq!(
            GuestBuf::new(&bad).read(&mem, 0, &mut x[..4]),
            Err(BufError::BadRange)
        );
        // A page that is not RAM.
        let hole = [range(&[pfns[0] + 1], 0, 4096)];
        assert!(matches!(
            GuestBuf::new(&hole).read(&mem, 0, &mut x),
            Err(BufError::Memory(_))
        ));
        assert!(GuestBuf::new(&ok).read_all(&mem, 100).is_err());
        assert_eq!(GuestBuf::new(&ok).read_all(&mem, 8192).unwrap().len(), 8192);
    }

    #[test]
    fn sections_reserve_and_complete() {
        let mut a = SectionAllocator::new(8, SectionAllocator::default_reserve(8));
        assert_eq!(SectionAllocator::default_reserve(8), 2);
        assert_eq!(SectionAllocator::default_reserve(1000), 16);
        // Data starts above the reserve; control takes the lowest.
        assert_eq!(a.alloc(SectionUse::Data), Some(2));
        assert_eq!(a.alloc(SectionUse::Control), Some(0));
        a.hold(10, vec![2]);
        a.hold(11, vec![0]);
        let mut data = Vec::new();
        while let Some(s) = a.alloc(SectionUse::Data) {
            data.push(s);
        }
        assert_eq!(data, [3, 4, 5, 6, 7]);
        // Data is exhausted but control still has section 1.
        assert_eq!(a.alloc(SectionUse::Control), Some(1));
        assert_eq!(a.alloc(SectionUse::Control), None);
        for (i, s) in data.into_iter().enumerate() {
            a.hold(100 + i as u64, vec![s]);
        }
        a.release(1);
        assert_eq!(a.outstanding(), 7);
        assert_eq!(a.complete(10), Some(1));
        assert_eq!(a.complete(10), None, "completing twice is refused");
        assert_eq!(a.complete(999), None);
        assert_eq!(a.alloc(SectionUse::Data), Some(2));
        // A packet with no section (fault injection) completes with zero sections.
        a.hold(7, Vec::new());
        assert_eq!(a.complete(7), Some(0));
        // Releasing an out-of-range section is ignored.
        a.release(1000);
        assert_eq!(a.free(), 1);
    }
}
