//! Physical frame allocator: a sorted list of free ranges built from the memory map.
//!
//! It runs before the heap exists, so it keeps its ranges in a fixed array. Allocation is
//! top-down within a caller-given limit (page tables must sit below 4 GiB while the boot
//! identity map is active; buffers the host shares may come from anywhere), frees merge with
//! their neighbours, and a free that overlaps free memory is refused: a double free is a bug
//! we want reported, not a corrupted list.

/// Page size used for frames.
pub const FRAME_SIZE: u64 = 4096;
/// Most disjoint free ranges tracked (16 KiB of bss). Frees that would need more are
/// refused with [`FrameError::TooFragmented`] so the caller can report the leak.
pub const MAX_RANGES: usize = 1024;

/// Half-open physical range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

impl Range {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start >= self.end
    }
}

/// Why a frame operation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// More disjoint ranges than [`MAX_RANGES`].
    TooFragmented,
    /// The freed range overlaps memory that is already free (double free).
    OverlapsFree { start: u64, end: u64 },
    /// Address or length not frame aligned.
    Unaligned,
}

/// The allocator. `const`-constructible so it can live in a static.
pub struct FrameAllocator {
    ranges: [Range; MAX_RANGES],
    count: usize,
}

impl Default for FrameAllocator {
    fn default() -> Self {
        Self::new()
    }
}

fn align_up(v: u64, a: u64) -> Option<u64> {
    Some(v.checked_add(a - 1)? & !(a - 1))
}

impl FrameAllocator {
    pub const fn new() -> Self {
        Self {
            ranges: [Range { start: 0, end: 0 }; MAX_RANGES],
            count: 0,
        }
    }

    /// The free ranges, sorted by address.
    pub fn ranges(&self) -> &[Range] {
        &self.ranges[..self.count]
    }

    /// Bytes currently free.
    pub fn free_bytes(&self) -> u64 {
        self.ranges().iter().map(Range::len).sum()
    }

    /// Adds `[start, end)` (rounded inwards to frames) as free memory. Overlap with free
    /// memory is refused like a double free.
    pub fn add_free(&mut self, start: u64, end: u64) -> Result<(), FrameError> {
        let Some(start) = align_up(start, FRAME_SIZE) else {
            return Ok(());
        };
        let end = end & !(FRAME_SIZE - 1);
        if start >= end {
            return Ok(());
        }
        self.insert(Range { start, end })
    }

    /// Removes `[start, end)` (rounded outwards to frames) from the free ranges, wherever
    /// it overlaps them.
    pub fn reserve(&mut self, start: u64, end: u64) -> Result<(), FrameError> {
        let start = start & !(FRAME_SIZE - 1);
        let end = align_up(end, FRAME_SIZE).unwrap_or(!(FRAME_SIZE - 1));
        let mut i = 0;
        while i < self.count {
            let r = self.ranges[i];
            if r.end <= start || r.start >= end {
                i += 1;
                continue;
            }
            let left = Range {
                start: r.start,
                end: start.max(r.start),
            };
            let right = Range {
                start: end.min(r.end),
                end: r.end,
            };
            match (left.is_empty(), right.is_empty()) {
                (true, true) => {
                    self.remove_at(i);
                    continue;
                }
                (false, true) => self.ranges[i] = left,
                (true, false) => self.ranges[i] = right,
                (false, false) => {
                    if self.count == MAX_RANGES {
                        return Err(FrameError::TooFragmented);
                    }
                    self.ranges[i] = left;
                    self.insert_at(i + 1, right);
                    i += 1;
                }
            }
            i += 1;
        }
        Ok(())
    }

    /// Allocates `pages` contiguous frames aligned to `align` bytes (a power of two, at
    /// least a frame) that end at or below `limit`. Highest fitting address first.
    pub fn alloc(&mut self, pages: u64, align: u64, limit: u64) -> Option<u64> {
        if pages == 0 || !align.is_power_of_two() {
            return None;
        }
        let align = align.max(FRAME_SIZE);
        let size = pages.checked_mul(FRAME_SIZE)?;
        for i in (0..self.count).rev() {
            let r = self.ranges[i];
            let top = r.end.min(limit);
            let Some(candidate) = top.checked_sub(size) else {
                continue;
            };
            let start = candidate & !(align - 1);
            if start < r.start {
                continue;
            }
            // Carving from inside the range cannot fail for lack of slots only when it
            // touches an end; otherwise it needs one more slot.
            if start != r.start && start + size != r.end && self.count == MAX_RANGES {
                continue;
            }
            self.reserve(start, start + size).ok()?;
            return Some(start);
        }
        None
    }

    /// Returns `pages` frames at `start` to the free list.
    // The kernel's host-visible-memory allocator (VMBus rings and buffers) frees through
    // this once VMBus runs in the image; until then only the tests call it.
    #[cfg_attr(target_os = "none", allow(dead_code))]
    pub fn free(&mut self, start: u64, pages: u64) -> Result<(), FrameError> {
        if !start.is_multiple_of(FRAME_SIZE) {
            return Err(FrameError::Unaligned);
        }
        let end = pages
            .checked_mul(FRAME_SIZE)
            .and_then(|s| start.checked_add(s))
            .ok_or(FrameError::Unaligned)?;
        if pages == 0 {
            return Ok(());
        }
        self.insert(Range { start, end })
    }

    fn insert(&mut self, new: Range) -> Result<(), FrameError> {
        let pos = self.ranges().partition_point(|r| r.start < new.start);
        let overlaps_prev = pos > 0 && self.ranges[pos - 1].end > new.start;
        let overlaps_next = pos < self.count && self.ranges[pos].start < new.end;
        if overlaps_prev || overlaps_next {
            return Err(FrameError::OverlapsFree {
                start: new.start,
                end: new.end,
            });
        }
        let joins_prev = pos > 0 && self.ranges[pos - 1].end == new.start;
        let joins_next = pos < self.count && self.ranges[pos].start == new.end;
        match (joins_prev, joins_next) {
            (true, true) => {
                self.ranges[pos - 1].end = self.ranges[pos].end;
                self.remove_at(pos);
            }
            (true, false) => self.ranges[pos - 1].end = new.end,
            (false, true) => self.ranges[pos].start = new.start,
            (false, false) => {
                if self.count == MAX_RANGES {
                    return Err(FrameError::TooFragmented);
                }
                self.insert_at(pos, new);
            }
        }
        Ok(())
    }

    fn insert_at(&mut self, pos: usize, r: Range) {
        self.ranges.copy_within(pos..self.count, pos + 1);
        self.ranges[pos] = r;
        self.count += 1;
    }

    fn remove_at(&mut self, pos: usize) {
        self.ranges.copy_within(pos + 1..self.count, pos);
        self.count -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn sorted_and_disjoint(a: &FrameAllocator) -> bool {
        a.ranges().windows(2).all(|w| w[0].end < w[1].start)
            && a.ranges()
                .iter()
                .all(|r| r.start < r.end && r.start % FRAME_SIZE == 0)
    }

    #[test]
    fn add_rounds_inwards_and_merges() {
        let mut a = FrameAllocator::new();
        a.add_free(0x1001, 0x5fff).unwrap();
        assert_eq!(
            a.ranges(),
            [Range {
                start: 0x2000,
                end: 0x5000
            }]
        );
        a.add_free(0x5000, 0x8000).unwrap();
        a.add_free(0x0, 0x2000).unwrap();
        assert_eq!(
            a.ranges(),
            [Range {
                start: 0,
                end: 0x8000
            }]
        );
        assert_eq!(
            a.add_free(0x7000, 0x9000),
            Err(FrameError::OverlapsFree {
                start: 0x7000,
                end: 0x9000
            })
        );
    }

    #[test]
    fn reserve_splits_and_trims() {
        let mut a = FrameAllocator::new();
        a.add_free(0, 16 * MIB).unwrap();
        a.reserve(MIB, 2 * MIB + 1).unwrap();
        assert_eq!(
            a.ranges(),
            [
                Range { start: 0, end: MIB },
                Range {
                    start: 2 * MIB + FRAME_SIZE,
                    end: 16 * MIB
                }
            ]
        );
        a.reserve(0, 4 * MIB).unwrap();
        assert_eq!(
            a.ranges(),
            [Range {
                start: 4 * MIB,
                end: 16 * MIB
            }]
        );
        a.reserve(0, u64::MAX).unwrap();
        assert!(a.ranges().is_empty());
    }

    #[test]
    fn alloc_is_top_down_aligned_and_limited() {
        let mut a = FrameAllocator::new();
        a.add_free(MIB, 8 * GIB).unwrap();
        let p = a.alloc(1, FRAME_SIZE, 4 * GIB).unwrap();
        assert_eq!(p, 4 * GIB - FRAME_SIZE);
        let big = a.alloc(512, 2 * MIB, u64::MAX).unwrap();
        assert_eq!(big % (2 * MIB), 0);
        assert_eq!(big + 2 * MIB, 8 * GIB);
        assert!(
            a.alloc(1, 3 * FRAME_SIZE, u64::MAX).is_none(),
            "non power-of-two align"
        );
        assert!(a.alloc(0, FRAME_SIZE, u64::MAX).is_none());
        assert!(
            a.alloc(1, FRAME_SIZE, MIB).is_none(),
            "nothing below the limit"
        );
        assert!(sorted_and_disjoint(&a));
    }

    #[test]
    fn free_merges_and_refuses_double_free() {
        let mut a = FrameAllocator::new();
        a.add_free(0, 64 * FRAME_SIZE).unwrap();
        let before = a.free_bytes();
        let x = a.alloc(4, FRAME_SIZE, u64::MAX).unwrap();
        let y = a.alloc(4, FRAME_SIZE, u64::MAX).unwrap();
        assert_eq!(a.free_bytes(), before - 8 * FRAME_SIZE);
        a.free(x, 4).unwrap();
        assert_eq!(
            a.free(x, 4),
            Err(FrameError::OverlapsFree {
                start: x,
                end: x + 4 * FRAME_SIZE
            })
        );
        a.free(y, 4).unwrap();
        assert_eq!(
            a.ranges(),
            [Range {
                start: 0,
                end: 64 * FRAME_SIZE
            }]
        );
        assert_eq!(a.free(1, 1), Err(FrameError::Unaligned));
        assert_eq!(a.free(!0xfff, 2), Err(FrameError::Unaligned));
    }

    #[test]
    fn fragmentation_is_bounded_not_fatal() {
        let mut a = FrameAllocator::new();
        a.add_free(0, 4 * MAX_RANGES as u64 * FRAME_SIZE).unwrap();
        let mut refused = false;
        for i in 0..(2 * MAX_RANGES as u64) {
            match a.reserve(
                2 * i * FRAME_SIZE + FRAME_SIZE,
                2 * i * FRAME_SIZE + 2 * FRAME_SIZE,
            ) {
                Ok(()) => {}
                Err(FrameError::TooFragmented) => refused = true,
                Err(e) => panic!("{e:?}"),
            }
            assert!(a.ranges().len() <= MAX_RANGES);
        }
        assert!(refused);
        assert!(sorted_and_disjoint(&a));
    }

    /// Random alloc/free sequences never lose or duplicate a frame.
    #[test]
    fn random_alloc_free_conserves_memory() {
        let mut a = FrameAllocator::new();
        a.add_free(MIB, 64 * MIB).unwrap();
        let total = a.free_bytes();
        let mut live: std::vec::Vec<(u64, u64)> = std::vec::Vec::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..5000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            if (!seed.is_multiple_of(3) && live.len() < 400) || live.is_empty() {
                let pages = 1 + seed % 64;
                let align = FRAME_SIZE << (seed % 4);
                if let Some(p) = a.alloc(pages, align, u64::MAX) {
                    assert_eq!(p % align, 0);
                    assert!(live
                        .iter()
                        .all(|&(s, n)| p + pages * FRAME_SIZE <= s || s + n * FRAME_SIZE <= p));
                    live.push((p, pages));
                }
            } else {
                let (s, n) = live.swap_remove((seed as usize / 3) % live.len());
                a.free(s, n).unwrap();
            }
            let used: u64 = live.iter().map(|&(_, n)| n * FRAME_SIZE).sum();
            assert_eq!(a.free_bytes() + used, total);
            assert!(sorted_and_disjoint(&a));
        }
    }
}
