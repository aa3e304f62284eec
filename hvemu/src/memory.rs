//! A model of guest RAM.
//!
//! The guest reaches its memory only through [`GuestMemory`] (the lead's `SharedBuffer` /
//! `DmaAllocator` adapters sit on top of it) and the host reaches it the same way, by guest
//! physical address. Three properties make guest bugs visible:
//!
//! * Page frame numbers start at a high GPA and only every other frame exists: two pages of
//!   one allocation are never adjacent, so a guest that computes "next PFN = PFN + 1" reads
//!   a hole and gets [`MemError::OutOfRange`].
//! * The free list is shuffled from the seed, so allocations come back in scrambled order.
//! * Pages referenced by a live GPADL are pinned by the host. Freeing a pinned page, freeing
//!   twice, or freeing a frame that was never handed out is recorded as a
//!   [`MemoryViolation`] (never a panic); a freed pinned page is quarantined, not reused,
//!   until the host lets go of it. Freed pages are poisoned with `0xA5`.
//!
//! A second backing, [`GuestMemory::from_ram`], puts the same handle over a real guest's
//! RAM (the `hvemu-vmm` VMM's mapped memory, reached through the [`GuestRam`] trait): then
//! GPAs are the guest's own, every RAM page counts as live, pins are only counted, and the
//! allocation API (which exists for the in-process model's guest) has nothing to hand out.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::rng::SplitMix64;

/// Size of a guest page.
pub const PAGE_SIZE: usize = 4096;
const PAGE: u64 = PAGE_SIZE as u64;
/// First frame of the model: GPA 64 GiB, far above anything a host address could be
/// mistaken for in a test.
const BASE_PFN: u64 = 0x100_0000;
/// Frames are spaced two apart: the odd ones are holes.
const PFN_STRIDE: u64 = 2;
/// Byte freed pages are filled with.
const POISON: u8 = 0xA5;

/// Why an access to guest memory failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemError {
    /// Some byte of `[gpa, gpa + len)` is not guest RAM.
    OutOfRange {
        /// First address of the access.
        gpa: u64,
        /// Length of the access.
        len: usize,
    },
    /// A `u32` access at an address that is not 4-byte aligned.
    Misaligned {
        /// The address.
        gpa: u64,
    },
}

impl std::fmt::Display for MemError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MemError::OutOfRange { gpa, len } => {
                write!(f, "guest memory access {gpa:#x}+{len:#x} out of range")
            }
            MemError::Misaligned { gpa } => write!(f, "misaligned u32 access at {gpa:#x}"),
        }
    }
}

impl std::error::Error for MemError {}

/// What the guest did wrong with its memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryViolationKind {
    /// A page freed that is already free.
    DoubleFree,
    /// A frame freed that this memory never handed out (a hole or out of range).
    ForeignFree,
    /// A page freed while a live GPADL still references it (the host could still write it).
    FreedWhilePinned,
}

/// One guest memory misuse, with the frame concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryViolation {
    /// What went wrong.
    pub kind: MemoryViolationKind,
    /// The page frame number.
    pub pfn: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PageState {
    Free,
    Live,
    /// Freed by the guest while pinned: not reusable until unpinned.
    Quarantined,
}

struct Page {
    state: PageState,
    pins: u32,
    /// Contents; `None` reads as zeros (pages are materialised on first write).
    data: Option<Box<[u8; PAGE_SIZE]>>,
}

struct Inner {
    pages: Vec<Page>,
    free: Vec<usize>,
    live: usize,
    rng: SplitMix64,
    violations: Vec<MemoryViolation>,
}

/// Real guest RAM owned by someone else (a VMM), addressed by guest physical address.
///
/// Implementations check every access against their RAM ranges and fail with
/// [`MemError::OutOfRange`] (writing nothing) when any byte is outside them.
pub trait GuestRam: Send + Sync {
    /// Copies `buf.len()` bytes at `gpa` into `buf`.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError>;
    /// Copies `data` to `gpa`.
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemError>;
    /// Whether every byte of `[gpa, gpa + len)` is RAM.
    fn is_ram(&self, gpa: u64, len: u64) -> bool;
    /// Total bytes of RAM.
    fn size(&self) -> u64;
}

/// [`GuestMemory`] over real RAM: the RAM and the host's pin counts.
struct RamBacked {
    ram: Box<dyn GuestRam>,
    /// Pins per frame (GPADLs referencing it), for [`GuestMemory::pinned_pages`].
    pins: Mutex<BTreeMap<u64, u32>>,
}

#[derive(Clone)]
enum Backing {
    Model(Arc<Mutex<Inner>>),
    Ram(Arc<RamBacked>),
}

/// A shared handle to guest RAM, the model's or a real guest's (clones share the same
/// memory).
#[derive(Clone)]
pub struct GuestMemory {
    backing: Backing,
}

impl std::fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.backing {
            Backing::Model(_) => {
                let g = self.lock();
                f.debug_struct("GuestMemory")
                    .field("pages", &g.pages.len())
                    .field("live", &g.live)
                    .field("violations", &g.violations.len())
                    .finish()
            }
            Backing::Ram(r) => f
                .debug_struct("GuestMemory")
                .field("ram_bytes", &r.ram.size())
                .field("pinned", &self.pinned_pages())
                .finish(),
        }
    }
}

impl GuestMemory {
    /// A handle over a real guest's RAM. GPAs are the guest's; the allocation API
    /// ([`GuestMemory::alloc_pages`], [`GuestMemory::free_pages`]) is the model's and does
    /// nothing here: `alloc_pages` returns `None` and `free_pages` is ignored.
    pub fn from_ram(ram: Box<dyn GuestRam>) -> Self {
        GuestMemory {
            backing: Backing::Ram(Arc::new(RamBacked {
                ram,
                pins: Mutex::new(BTreeMap::new()),
            })),
        }
    }

    /// Whether this handle is over real RAM ([`GuestMemory::from_ram`]) rather than the
    /// model.
    pub fn is_real_ram(&self) -> bool {
        matches!(self.backing, Backing::Ram(_))
    }

    /// Guest RAM of `pages` pages; `seed` scrambles the allocation order.
    pub fn new(pages: usize, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed ^ 0x6D65_6D6F_7279);
        let mut free: Vec<usize> = (0..pages).collect();
        // Fisher-Yates: allocation order is a seeded permutation of the frames.
        for i in (1..free.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            free.swap(i, j);
        }
        let pages = (0..pages)
            .map(|_| Page {
                state: PageState::Free,
                pins: 0,
                data: None,
            })
            .collect();
        GuestMemory {
            backing: Backing::Model(Arc::new(Mutex::new(Inner {
                pages,
                free,
                live: 0,
                rng,
                violations: Vec::new(),
            }))),
        }
    }

    /// The model's state. Callers check for the model backing first; over real RAM this
    /// hands out an empty stand-in model so no caller can panic.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        match &self.backing {
            // A test that panicked while holding the lock must not hide its own failure.
            Backing::Model(inner) => inner.lock().unwrap_or_else(|e| e.into_inner()),
            Backing::Ram(_) => {
                static EMPTY: Mutex<Inner> = Mutex::new(Inner {
                    pages: Vec::new(),
                    free: Vec::new(),
                    live: 0,
                    rng: SplitMix64::new(0),
                    violations: Vec::new(),
                });
                EMPTY.lock().unwrap_or_else(|e| e.into_inner())
            }
        }
    }

    fn ram(&self) -> Option<&RamBacked> {
        match &self.backing {
            Backing::Ram(r) => Some(r),
            Backing::Model(_) => None,
        }
    }

    /// Total pages of RAM.
    pub fn total_pages(&self) -> usize {
        if let Some(r) = self.ram() {
            return usize::try_from(r.ram.size() / PAGE).unwrap_or(usize::MAX);
        }
        self.lock().pages.len()
    }

    /// Allocates `n` zeroed pages; returns their frame numbers (never contiguous, in
    /// scrambled order), or `None` if fewer than `n` pages are free. Always `None` over
    /// real RAM (the guest allocates its own memory there).
    pub fn alloc_pages(&self, n: usize) -> Option<Vec<u64>> {
        if self.ram().is_some() {
            return None;
        }
        let mut g = self.lock();
        if g.free.len() < n {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let idx = g.free.pop()?;
            let page = &mut g.pages[idx];
            page.state = PageState::Live;
            page.data = None;
            out.push(index_to_pfn(idx));
        }
        g.live += n;
        Some(out)
    }

    /// Returns pages to the free pool. Misuse (double free, foreign frame, pinned page) is
    /// recorded in [`GuestMemory::violations`]; the call itself never fails. Ignored over
    /// real RAM.
    pub fn free_pages(&self, pfns: &[u64]) {
        if self.ram().is_some() {
            return;
        }
        let mut g = self.lock();
        for &pfn in pfns {
            let Some(idx) = pfn_to_index(pfn, g.pages.len()) else {
                g.violations.push(MemoryViolation {
                    kind: MemoryViolationKind::ForeignFree,
                    pfn,
                });
                continue;
            };
            let (state, pins) = (g.pages[idx].state, g.pages[idx].pins);
            if state != PageState::Live {
                g.violations.push(MemoryViolation {
                    kind: MemoryViolationKind::DoubleFree,
                    pfn,
                });
                continue;
            }
            g.live -= 1;
            if let Some(data) = g.pages[idx].data.as_mut() {
                data.fill(POISON);
            }
            if pins > 0 {
                g.violations.push(MemoryViolation {
                    kind: MemoryViolationKind::FreedWhilePinned,
                    pfn,
                });
                g.pages[idx].state = PageState::Quarantined;
            } else {
                g.pages[idx].state = PageState::Free;
                release_to_free_list(&mut g, idx);
            }
        }
    }

    /// Pages currently allocated (for leak checks; 0 over real RAM, where the guest's
    /// allocations are its own business).
    pub fn live_pages(&self) -> usize {
        self.lock().live
    }

    /// Whether `pfn` is a page currently allocated to the guest (over real RAM: whether it
    /// is RAM at all).
    pub fn is_live(&self, pfn: u64) -> bool {
        if let Some(r) = self.ram() {
            return pfn
                .checked_mul(PAGE)
                .is_some_and(|gpa| r.ram.is_ram(gpa, PAGE));
        }
        let g = self.lock();
        pfn_to_index(pfn, g.pages.len()).is_some_and(|i| g.pages[i].state == PageState::Live)
    }

    /// Memory misuse recorded so far.
    pub fn violations(&self) -> Vec<MemoryViolation> {
        self.lock().violations.clone()
    }

    /// Pages pinned by the host (referenced by live GPADLs), counted once per pin.
    pub fn pinned_pages(&self) -> usize {
        if let Some(r) = self.ram() {
            let pins = r.pins.lock().unwrap_or_else(|e| e.into_inner());
            return pins.values().map(|&n| n as usize).sum();
        }
        self.lock().pages.iter().map(|p| p.pins as usize).sum()
    }

    /// Copies `buf.len()` bytes at `gpa` into `buf`. May cross pages; every page touched
    /// must be RAM (live or not: the host side may look at any RAM).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        if let Some(r) = self.ram() {
            return r.ram.read(gpa, buf);
        }
        let g = self.lock();
        let err = MemError::OutOfRange {
            gpa,
            len: buf.len(),
        };
        let mut done = 0usize;
        while done < buf.len() {
            let addr = gpa.checked_add(done as u64).ok_or(err)?;
            let idx = pfn_to_index(addr / PAGE, g.pages.len()).ok_or(err)?;
            let off = (addr % PAGE) as usize;
            let n = (PAGE_SIZE - off).min(buf.len() - done);
            let dst = &mut buf[done..done + n];
            match &g.pages[idx].data {
                Some(data) => dst.copy_from_slice(&data[off..off + n]),
                None => dst.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    /// Copies `data` to `gpa`. May cross pages; fails without writing anything if any
    /// page touched is not RAM.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        if let Some(r) = self.ram() {
            return r.ram.write(gpa, data);
        }
        let mut g = self.lock();
        let err = MemError::OutOfRange {
            gpa,
            len: data.len(),
        };
        // Check the whole range first so a failed write changes nothing.
        let mut done = 0usize;
        while done < data.len() {
            let addr = gpa.checked_add(done as u64).ok_or(err)?;
            pfn_to_index(addr / PAGE, g.pages.len()).ok_or(err)?;
            done += PAGE_SIZE - (addr % PAGE) as usize;
        }
        let mut done = 0usize;
        while done < data.len() {
            let addr = gpa + done as u64;
            let idx = pfn_to_index(addr / PAGE, g.pages.len()).ok_or(err)?;
            let off = (addr % PAGE) as usize;
            let n = (PAGE_SIZE - off).min(data.len() - done);
            let page = g.pages[idx]
                .data
                .get_or_insert_with(|| Box::new([0u8; PAGE_SIZE]));
            page[off..off + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        Ok(())
    }

    /// Reads the little-endian `u32` at the 4-byte aligned `gpa`.
    pub fn load_u32(&self, gpa: u64) -> Result<u32, MemError> {
        if !gpa.is_multiple_of(4) {
            return Err(MemError::Misaligned { gpa });
        }
        let mut b = [0u8; 4];
        self.read(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Writes the little-endian `u32` at the 4-byte aligned `gpa`.
    pub fn store_u32(&self, gpa: u64, value: u32) -> Result<(), MemError> {
        if !gpa.is_multiple_of(4) {
            return Err(MemError::Misaligned { gpa });
        }
        self.write(gpa, &value.to_le_bytes())
    }

    /// Reads the little-endian `u64` at `gpa` (any alignment).
    pub fn load_u64(&self, gpa: u64) -> Result<u64, MemError> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Pins pages for a GPADL: all must be live, else nothing is pinned and the first
    /// offending frame is returned. Over real RAM every RAM frame counts as live.
    pub(crate) fn pin(&self, pfns: &[u64]) -> Result<(), u64> {
        if let Some(r) = self.ram() {
            if let Some(&bad) = pfns.iter().find(|&&pfn| {
                !pfn.checked_mul(PAGE)
                    .is_some_and(|gpa| r.ram.is_ram(gpa, PAGE))
            }) {
                return Err(bad);
            }
            let mut pins = r.pins.lock().unwrap_or_else(|e| e.into_inner());
            for &pfn in pfns {
                *pins.entry(pfn).or_insert(0) += 1;
            }
            return Ok(());
        }
        let mut g = self.lock();
        let len = g.pages.len();
        for &pfn in pfns {
            match pfn_to_index(pfn, len) {
                Some(i) if g.pages[i].state == PageState::Live => {}
                _ => return Err(pfn),
            }
        }
        for &pfn in pfns {
            if let Some(i) = pfn_to_index(pfn, len) {
                g.pages[i].pins += 1;
            }
        }
        Ok(())
    }

    /// Drops the pins [`GuestMemory::pin`] took; quarantined pages whose last pin goes are
    /// returned to the free pool.
    pub(crate) fn unpin(&self, pfns: &[u64]) {
        if let Some(r) = self.ram() {
            let mut pins = r.pins.lock().unwrap_or_else(|e| e.into_inner());
            for pfn in pfns {
                if let Some(n) = pins.get_mut(pfn) {
                    *n -= 1;
                    if *n == 0 {
                        pins.remove(pfn);
                    }
                }
            }
            return;
        }
        let mut g = self.lock();
        let len = g.pages.len();
        for &pfn in pfns {
            let Some(i) = pfn_to_index(pfn, len) else {
                continue;
            };
            let page = &mut g.pages[i];
            page.pins = page.pins.saturating_sub(1);
            if page.pins == 0 && page.state == PageState::Quarantined {
                page.state = PageState::Free;
                release_to_free_list(&mut g, i);
            }
        }
    }
}

fn release_to_free_list(g: &mut Inner, idx: usize) {
    // Insert at a seeded position so reuse order stays scrambled too.
    let pos = g.rng.below(g.free.len() as u64 + 1) as usize;
    g.free.insert(pos, idx);
}

fn index_to_pfn(idx: usize) -> u64 {
    BASE_PFN + idx as u64 * PFN_STRIDE
}

fn pfn_to_index(pfn: u64, pages: usize) -> Option<usize> {
    let rel = pfn.checked_sub(BASE_PFN)?;
    if !rel.is_multiple_of(PFN_STRIDE) {
        return None;
    }
    let idx = usize::try_from(rel / PFN_STRIDE).ok()?;
    (idx < pages).then_some(idx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_scrambled_and_never_adjacent() {
        let m = GuestMemory::new(64, 1);
        let pfns = m.alloc_pages(16).unwrap();
        assert_eq!(m.live_pages(), 16);
        for w in pfns.windows(2) {
            assert!(w[1].abs_diff(w[0]) >= 2, "{pfns:x?}");
        }
        let mut sorted = pfns.clone();
        sorted.sort_unstable();
        assert_ne!(sorted, pfns, "allocation order should be scrambled");
        assert!(pfns.iter().all(|&p| p >= BASE_PFN));
    }

    #[test]
    fn read_write_cross_pages_and_holes() {
        let m = GuestMemory::new(4, 2);
        let p = m.alloc_pages(1).unwrap()[0];
        let gpa = p * PAGE + 4094;
        // The next frame is a hole: a write spanning into it fails and writes nothing.
        assert_eq!(
            m.write(gpa, &[1, 2, 3, 4]),
            Err(MemError::OutOfRange { gpa, len: 4 })
        );
        let mut b = [9u8; 2];
        m.read(gpa, &mut b).unwrap();
        assert_eq!(b, [0, 0]);
        m.store_u32(p * PAGE + 8, 0xdead_beef).unwrap();
        assert_eq!(m.load_u32(p * PAGE + 8), Ok(0xdead_beef));
        assert_eq!(
            m.load_u32(p * PAGE + 6),
            Err(MemError::Misaligned { gpa: p * PAGE + 6 })
        );
        assert!(m.read(0x1000, &mut b).is_err());
    }

    #[test]
    fn free_misuse_is_counted() {
        let m = GuestMemory::new(8, 3);
        let pfns = m.alloc_pages(3).unwrap();
        m.write(pfns[0] * PAGE, &[7; 16]).unwrap();
        m.pin(&pfns[..1]).unwrap();
        m.free_pages(&pfns);
        m.free_pages(&pfns[1..2]);
        m.free_pages(&[BASE_PFN + 1, 5]);
        assert_eq!(m.live_pages(), 0);
        let kinds: Vec<_> = m.violations().iter().map(|v| v.kind).collect();
        assert_eq!(
            kinds,
            [
                MemoryViolationKind::FreedWhilePinned,
                MemoryViolationKind::DoubleFree,
                MemoryViolationKind::ForeignFree,
                MemoryViolationKind::ForeignFree
            ]
        );
        // Freed memory is poisoned.
        let mut b = [0u8; 4];
        m.read(pfns[0] * PAGE, &mut b).unwrap();
        assert_eq!(b, [POISON; 4]);
        // The quarantined page comes back only after unpin.
        assert!(m.alloc_pages(8).is_none());
        m.unpin(&pfns[..1]);
        assert_eq!(m.alloc_pages(8).map(|v| v.len()), Some(8));
        assert!(m.pin(&[BASE_PFN + 1]).is_err());
    }

    /// A flat RAM of `len` bytes at GPA 0 (what a VMM's mapping looks like).
    struct FlatRam(Mutex<Vec<u8>>);

    impl GuestRam for FlatRam {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
            let ram = self.0.lock().unwrap();
            let err = MemError::OutOfRange {
                gpa,
                len: buf.len(),
            };
            let start = usize::try_from(gpa).map_err(|_| err)?;
            let src = ram.get(start..start + buf.len()).ok_or(err)?;
            buf.copy_from_slice(src);
            Ok(())
        }
        fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
            let mut ram = self.0.lock().unwrap();
            let err = MemError::OutOfRange {
                gpa,
                len: data.len(),
            };
            let start = usize::try_from(gpa).map_err(|_| err)?;
            let dst = ram.get_mut(start..start + data.len()).ok_or(err)?;
            dst.copy_from_slice(data);
            Ok(())
        }
        fn is_ram(&self, gpa: u64, len: u64) -> bool {
            gpa.checked_add(len)
                .is_some_and(|end| end <= self.0.lock().unwrap().len() as u64)
        }
        fn size(&self) -> u64 {
            self.0.lock().unwrap().len() as u64
        }
    }

    #[test]
    fn real_ram_backing_reads_writes_and_counts_pins() {
        let m = GuestMemory::from_ram(Box::new(FlatRam(Mutex::new(vec![0; 4 * PAGE_SIZE]))));
        assert!(m.is_real_ram());
        assert!(!GuestMemory::new(1, 0).is_real_ram());
        assert_eq!(m.total_pages(), 4);
        // Guest GPAs are used as they are: page 1 is GPA 0x1000, and pages are contiguous.
        m.write(0x1ffe, &[1, 2, 3, 4]).unwrap();
        let mut b = [0u8; 4];
        m.read(0x1ffe, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        m.store_u32(0x3000, 0xfeed_f00d).unwrap();
        assert_eq!(m.load_u32(0x3000), Ok(0xfeed_f00d));
        assert_eq!(
            m.write(0x3ffe, &[0; 4]),
            Err(MemError::OutOfRange {
                gpa: 0x3ffe,
                len: 4
            })
        );
        // Every RAM frame is live; the model's allocator is not there.
        assert!(m.is_live(3) && !m.is_live(4));
        assert_eq!(m.alloc_pages(1), None);
        m.free_pages(&[1, 99]);
        assert!(m.violations().is_empty());
        assert_eq!(m.live_pages(), 0);
        // Pins are counted per frame and refused outside RAM.
        m.pin(&[1, 2]).unwrap();
        m.pin(&[2]).unwrap();
        assert_eq!(m.pin(&[3, 4]), Err(4));
        assert_eq!(m.pinned_pages(), 3);
        m.unpin(&[1, 2, 2, 7]);
        assert_eq!(m.pinned_pages(), 0);
        assert!(format!("{m:?}").contains("ram_bytes"));
    }
}
