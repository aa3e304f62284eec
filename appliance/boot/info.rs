//! The boot information both loaders hand over, normalised into one [`BootInfo`].
//!
//! PVH gives `hvm_start_info` (Xen `arch/x86/include/asm/xen/hvm_start_info.h`: memory map
//! in E820 form, RSDP address, command line); Multiboot2 gives a tag list (memory map tag 6,
//! command line tag 1, and a *copy* of the RSDP in tags 14/15). Both are read through
//! [`PhysMemory`] so the parsers run on the host against byte buffers, and every length and
//! count the loader supplies is bounds-checked: a bad loader yields a [`BootInfoError`],
//! never an out-of-bounds read.

use core::fmt;

/// Most memory-map entries kept. Firmware maps seen in practice have well under 64.
pub const MAX_MEMORY_REGIONS: usize = 128;
/// Longest kernel command line kept (bytes); longer ones are truncated with a warning flag.
pub const MAX_CMDLINE: usize = 1024;
/// An ACPI 2.0+ RSDP is 36 bytes; 1.0 RSDPs are 20.
pub const RSDP_MAX_LEN: usize = 36;

/// Read-only access to physical memory as the loader left it.
pub trait PhysMemory {
    /// The `len` bytes at physical address `addr`, or `None` if they are not readable.
    fn read(&self, addr: u64, len: usize) -> Option<&[u8]>;
}

/// What a memory-map range is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    /// RAM free for the kernel's use.
    Usable,
    /// ACPI tables; may be reclaimed after they are parsed (we keep them).
    AcpiReclaimable,
    /// ACPI non-volatile storage: must be preserved.
    AcpiNvs,
    /// Defective RAM.
    Bad,
    /// Anything else (firmware, MMIO holes, unknown types).
    Reserved,
}

impl MemoryKind {
    /// E820 / Multiboot2 memory types share their numbering.
    fn from_e820(kind: u32) -> Self {
        match kind {
            1 => Self::Usable,
            3 => Self::AcpiReclaimable,
            4 => Self::AcpiNvs,
            5 => Self::Bad,
            _ => Self::Reserved,
        }
    }
}

/// One range of the physical memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    pub start: u64,
    pub len: u64,
    pub kind: MemoryKind,
}

impl MemoryRegion {
    /// Exclusive end address, saturating at the top of the address space.
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
}

/// Which loader started us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loader {
    Pvh,
    Multiboot2,
}

impl fmt::Display for Loader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pvh => "PVH",
            Self::Multiboot2 => "Multiboot2",
        })
    }
}

/// Where the ACPI root pointer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rsdp {
    /// The loader gave its physical address (PVH).
    Address(u64),
    /// The loader gave a copy of the structure (Multiboot2 tags 14/15).
    Copy {
        bytes: [u8; RSDP_MAX_LEN],
        len: usize,
    },
}

/// Everything the kernel needs from its loader, copied out of loader memory.
#[derive(Clone, Debug)]
pub struct BootInfo {
    pub loader: Loader,
    regions: [MemoryRegion; MAX_MEMORY_REGIONS],
    region_count: usize,
    /// Entries dropped because the map had more than [`MAX_MEMORY_REGIONS`].
    pub regions_dropped: usize,
    pub rsdp: Option<Rsdp>,
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    /// The command line was longer than [`MAX_CMDLINE`] and was cut.
    pub cmdline_truncated: bool,
}

/// Ways the loader's information can be unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootInfoError {
    /// The protocol value in `%eax`/the start-info magic is not one we know.
    UnknownProtocol(u32),
    /// A structure or tag points outside readable memory.
    Unreadable { what: &'static str, addr: u64 },
    /// A length or size field is impossible (names the field).
    BadLength(&'static str),
    /// PVH start info older than version 1 carries no memory map.
    NoMemoryMap,
}

impl fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownProtocol(p) => write!(f, "unknown boot protocol magic {p:#x}"),
            Self::Unreadable { what, addr } => write!(f, "{what} at {addr:#x} is not readable"),
            Self::BadLength(what) => write!(f, "impossible length in {what}"),
            Self::NoMemoryMap => f.write_str("loader gave no memory map"),
        }
    }
}

/// `hvm_start_info` magic; the PVH entry passes it as the protocol value.
pub const PVH_MAGIC: u32 = 0x336e_c578;
/// The Multiboot2 bootloader magic GRUB leaves in `%eax`.
pub const MULTIBOOT2_MAGIC: u32 = 0x36d7_6289;

fn u32_at(bytes: &[u8], off: usize) -> Option<u32> {
    let b = bytes.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn u64_at(bytes: &[u8], off: usize) -> Option<u64> {
    let b = bytes.get(off..off.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_le_bytes(a))
}

impl BootInfo {
    fn empty(loader: Loader) -> Self {
        Self {
            loader,
            regions: [MemoryRegion {
                start: 0,
                len: 0,
                kind: MemoryKind::Reserved,
            }; MAX_MEMORY_REGIONS],
            region_count: 0,
            regions_dropped: 0,
            rsdp: None,
            cmdline: [0; MAX_CMDLINE],
            cmdline_len: 0,
            cmdline_truncated: false,
        }
    }

    /// Parses the loader's information. `protocol` is what the entry code recorded, `info` the
    /// physical address the loader passed in `%ebx`.
    pub fn parse(protocol: u32, info: u64, mem: &dyn PhysMemory) -> Result<Self, BootInfoError> {
        match protocol {
            PVH_MAGIC => Self::parse_pvh(info, mem),
            MULTIBOOT2_MAGIC => Self::parse_multiboot2(info, mem),
            other => Err(BootInfoError::UnknownProtocol(other)),
        }
    }

    /// The memory map, in loader order.
    pub fn memory_regions(&self) -> &[MemoryRegion] {
        &self.regions[..self.region_count]
    }

    /// The kernel command line (lossy: invalid UTF-8 yields an empty string).
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }

    /// Total bytes of usable RAM in the map.
    pub fn usable_bytes(&self) -> u64 {
        self.memory_regions()
            .iter()
            .filter(|r| r.kind == MemoryKind::Usable)
            .fold(0u64, |acc, r| acc.saturating_add(r.len))
    }

    fn push_region(&mut self, start: u64, len: u64, kind: u32) {
        if len == 0 {
            return;
        }
        if self.region_count == MAX_MEMORY_REGIONS {
            self.regions_dropped += 1;
            return;
        }
        self.regions[self.region_count] = MemoryRegion {
            start,
            len,
            kind: MemoryKind::from_e820(kind),
        };
        self.region_count += 1;
    }

    fn set_cmdline(&mut self, raw: &[u8]) {
        let raw = raw.split(|&b| b == 0).next().unwrap_or(&[]);
        let n = raw.len().min(MAX_CMDLINE);
        self.cmdline[..n].copy_from_slice(&raw[..n]);
        self.cmdline_len = n;
        self.cmdline_truncated = raw.len() > MAX_CMDLINE;
    }

    /// `hvm_start_info`: magic, version, flags, nr_modules, modlist_paddr (u64 at 16),
    /// cmdline_paddr (24), rsdp_paddr (32), memmap_paddr (40), memmap_entries (u32 at 48).
    fn parse_pvh(info: u64, mem: &dyn PhysMemory) -> Result<Self, BootInfoError> {
        const START_INFO_LEN: usize = 56;
        const E820_ENTRY_LEN: usize = 24;
        let si = mem
            .read(info, START_INFO_LEN)
            .ok_or(BootInfoError::Unreadable {
                what: "hvm_start_info",
                addr: info,
            })?;
        let magic = u32_at(si, 0).unwrap_or(0);
        if magic != PVH_MAGIC {
            return Err(BootInfoError::UnknownProtocol(magic));
        }
        let version = u32_at(si, 4).unwrap_or(0);
        let mut out = Self::empty(Loader::Pvh);

        let cmdline = u64_at(si, 24).unwrap_or(0);
        if cmdline != 0 {
            out.set_cmdline(read_c_string(mem, cmdline, MAX_CMDLINE + 1));
        }
        let rsdp = u64_at(si, 32).unwrap_or(0);
        if rsdp != 0 {
            out.rsdp = Some(Rsdp::Address(rsdp));
        }
        if version < 1 {
            return Err(BootInfoError::NoMemoryMap);
        }
        let map = u64_at(si, 40).unwrap_or(0);
        let entries = u32_at(si, 48).unwrap_or(0) as usize;
        if map == 0 || entries == 0 {
            return Err(BootInfoError::NoMemoryMap);
        }
        // A hostile count cannot make us read more than MAX_MEMORY_REGIONS * 4 entries.
        if entries > MAX_MEMORY_REGIONS * 4 {
            return Err(BootInfoError::BadLength("hvm_start_info.memmap_entries"));
        }
        let table = mem
            .read(map, entries * E820_ENTRY_LEN)
            .ok_or(BootInfoError::Unreadable {
                what: "PVH memory map",
                addr: map,
            })?;
        for e in table.chunks_exact(E820_ENTRY_LEN) {
            let (Some(start), Some(len), Some(kind)) = (u64_at(e, 0), u64_at(e, 8), u32_at(e, 16))
            else {
                continue;
            };
            out.push_region(start, len, kind);
        }
        Ok(out)
    }

    /// Multiboot2 information: `total_size`, reserved, then 8-aligned tags of
    /// `(type: u32, size: u32, payload)` ending with type 0.
    fn parse_multiboot2(info: u64, mem: &dyn PhysMemory) -> Result<Self, BootInfoError> {
        const MAX_INFO_LEN: usize = 1 << 20;
        let head = mem.read(info, 8).ok_or(BootInfoError::Unreadable {
            what: "multiboot2 information",
            addr: info,
        })?;
        let total = u32_at(head, 0).unwrap_or(0) as usize;
        if !(16..=MAX_INFO_LEN).contains(&total) {
            return Err(BootInfoError::BadLength("multiboot2 total_size"));
        }
        let all = mem.read(info, total).ok_or(BootInfoError::Unreadable {
            what: "multiboot2 information",
            addr: info,
        })?;
        let mut out = Self::empty(Loader::Multiboot2);
        let mut saw_map = false;
        let mut off = 8usize;
        while off + 8 <= all.len() {
            let kind = u32_at(all, off).unwrap_or(0);
            let size = u32_at(all, off + 4).unwrap_or(0) as usize;
            if kind == 0 {
                break;
            }
            if size < 8 {
                return Err(BootInfoError::BadLength("multiboot2 tag size"));
            }
            let tag = all
                .get(off..off.saturating_add(size))
                .ok_or(BootInfoError::BadLength("multiboot2 tag size"))?;
            let body = &tag[8..];
            match kind {
                1 => out.set_cmdline(body),
                6 => {
                    saw_map = true;
                    let entry_size = u32_at(body, 0).unwrap_or(0) as usize;
                    if entry_size < 24 {
                        return Err(BootInfoError::BadLength("multiboot2 memory map entry_size"));
                    }
                    for e in body.get(8..).unwrap_or(&[]).chunks_exact(entry_size) {
                        let (Some(start), Some(len), Some(t)) =
                            (u64_at(e, 0), u64_at(e, 8), u32_at(e, 16))
                        else {
                            continue;
                        };
                        out.push_region(start, len, t);
                    }
                }
                // New (ACPI 2.0+) RSDP wins over the old one whichever comes first.
                14 | 15 => {
                    let n = body.len().min(RSDP_MAX_LEN);
                    if n >= 20 && (kind == 15 || out.rsdp.is_none()) {
                        let mut bytes = [0u8; RSDP_MAX_LEN];
                        bytes[..n].copy_from_slice(&body[..n]);
                        out.rsdp = Some(Rsdp::Copy { bytes, len: n });
                    }
                }
                _ => {}
            }
            off = off.saturating_add((size + 7) & !7);
        }
        if !saw_map {
            return Err(BootInfoError::NoMemoryMap);
        }
        Ok(out)
    }
}

/// Reads a NUL-terminated string of at most `max` bytes; stops early at unreadable memory.
fn read_c_string(mem: &dyn PhysMemory, addr: u64, max: usize) -> &[u8] {
    // Try the longest read first, shrinking to the page end when it crosses into
    // unreadable memory.
    let mut len = max;
    loop {
        if let Some(bytes) = mem.read(addr, len) {
            let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            return &bytes[..end];
        }
        if len <= 1 {
            return &[];
        }
        len /= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    /// A flat buffer standing for physical memory starting at `base`.
    struct FakeMemory {
        base: u64,
        bytes: Vec<u8>,
    }

    impl PhysMemory for FakeMemory {
        fn read(&self, addr: u64, len: usize) -> Option<&[u8]> {
            let off = usize::try_from(addr.checked_sub(self.base)?).ok()?;
            self.bytes.get(off..off.checked_add(len)?)
        }
    }

    fn put(buf: &mut [u8], off: usize, v: &[u8]) {
        buf[off..off + v.len()].copy_from_slice(v);
    }

    fn pvh_fixture(entries: u32) -> FakeMemory {
        let mut b = std::vec![0u8; 4096];
        let base = 0x1000u64;
        put(&mut b, 0, &PVH_MAGIC.to_le_bytes());
        put(&mut b, 4, &1u32.to_le_bytes());
        put(&mut b, 24, &(base + 0x200).to_le_bytes());
        put(&mut b, 32, &0xf5a30u64.to_le_bytes());
        put(&mut b, 40, &(base + 0x400).to_le_bytes());
        put(&mut b, 48, &entries.to_le_bytes());
        put(&mut b, 0x200, b"log=debug test=ready\0junk");
        let map: [(u64, u64, u32); 3] = [
            (0, 0x9fc00, 1),
            (0x100000, 0x7ee0000, 1),
            (0xfffc0000, 0x40000, 2),
        ];
        for (i, (s, l, t)) in map.iter().enumerate() {
            let o = 0x400 + i * 24;
            put(&mut b, o, &s.to_le_bytes());
            put(&mut b, o + 8, &l.to_le_bytes());
            put(&mut b, o + 16, &t.to_le_bytes());
        }
        FakeMemory { base, bytes: b }
    }

    #[test]
    fn pvh_start_info_is_normalised() {
        let mem = pvh_fixture(3);
        let info = BootInfo::parse(PVH_MAGIC, 0x1000, &mem).unwrap();
        assert_eq!(info.loader, Loader::Pvh);
        assert_eq!(info.cmdline(), "log=debug test=ready");
        assert_eq!(info.rsdp, Some(Rsdp::Address(0xf5a30)));
        let r = info.memory_regions();
        assert_eq!(r.len(), 3);
        assert_eq!(
            r[1],
            MemoryRegion {
                start: 0x100000,
                len: 0x7ee0000,
                kind: MemoryKind::Usable
            }
        );
        assert_eq!(r[2].kind, MemoryKind::Reserved);
        assert_eq!(info.usable_bytes(), 0x9fc00 + 0x7ee0000);
    }

    #[test]
    fn pvh_rejects_hostile_counts_and_pointers() {
        let mem = pvh_fixture(100_000);
        assert_eq!(
            BootInfo::parse(PVH_MAGIC, 0x1000, &mem).unwrap_err(),
            BootInfoError::BadLength("hvm_start_info.memmap_entries")
        );
        // Entry count runs past the end of readable memory.
        let mem = pvh_fixture(500);
        assert!(matches!(
            BootInfo::parse(PVH_MAGIC, 0x1000, &mem),
            Err(BootInfoError::Unreadable { .. })
        ));
        let mem = pvh_fixture(3);
        assert!(matches!(
            BootInfo::parse(PVH_MAGIC, 0x9_0000, &mem),
            Err(BootInfoError::Unreadable { .. })
        ));
        assert_eq!(
            BootInfo::parse(0x1234, 0x1000, &mem).unwrap_err(),
            BootInfoError::UnknownProtocol(0x1234)
        );
    }

    /// Builds a Multiboot2 information block from `(type, payload)` tags.
    fn mb2(tags: &[(u32, Vec<u8>)]) -> FakeMemory {
        let mut b = std::vec![0u8; 8];
        for (t, payload) in tags {
            let size = 8 + payload.len();
            b.extend_from_slice(&t.to_le_bytes());
            b.extend_from_slice(&(size as u32).to_le_bytes());
            b.extend_from_slice(payload);
            while !b.len().is_multiple_of(8) {
                b.push(0);
            }
        }
        b.extend_from_slice(&[0, 0, 0, 0, 8, 0, 0, 0]);
        let total = b.len() as u32;
        b[0..4].copy_from_slice(&total.to_le_bytes());
        FakeMemory {
            base: 0x9000,
            bytes: b,
        }
    }

    fn mmap_tag(entries: &[(u64, u64, u32)]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&24u32.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        for (s, l, t) in entries {
            p.extend_from_slice(&s.to_le_bytes());
            p.extend_from_slice(&l.to_le_bytes());
            p.extend_from_slice(&t.to_le_bytes());
            p.extend_from_slice(&0u32.to_le_bytes());
        }
        p
    }

    #[test]
    fn multiboot2_tags_are_normalised() {
        let mut rsdp_new = std::vec![0u8; 36];
        rsdp_new[..8].copy_from_slice(b"RSD PTR ");
        rsdp_new[15] = 2;
        let mut rsdp_old = std::vec![0u8; 20];
        rsdp_old[..8].copy_from_slice(b"RSD PTR ");
        let mem = mb2(&[
            (1, b"log=trace\0".to_vec()),
            (15, rsdp_new.clone()),
            (14, rsdp_old),
            (
                6,
                mmap_tag(&[
                    (0, 0x9f000, 1),
                    (0x100000, 0x3ff00000, 1),
                    (0xfee00000, 0x1000, 2),
                ]),
            ),
            (99, std::vec![1, 2, 3]),
        ]);
        let info = BootInfo::parse(MULTIBOOT2_MAGIC, 0x9000, &mem).unwrap();
        assert_eq!(info.loader, Loader::Multiboot2);
        assert_eq!(info.cmdline(), "log=trace");
        assert_eq!(info.memory_regions().len(), 3);
        match info.rsdp {
            Some(Rsdp::Copy { bytes, len }) => {
                assert_eq!(len, 36);
                assert_eq!(bytes[15], 2, "the ACPI 2.0 copy must win over the 1.0 one");
            }
            other => panic!("unexpected rsdp {other:?}"),
        }
    }

    #[test]
    fn multiboot2_rejects_malformed_blocks() {
        // A tag whose size runs past total_size.
        let mut mem = mb2(&[(1, b"x\0".to_vec())]);
        mem.bytes[12..16].copy_from_slice(&4000u32.to_le_bytes());
        assert_eq!(
            BootInfo::parse(MULTIBOOT2_MAGIC, 0x9000, &mem).unwrap_err(),
            BootInfoError::BadLength("multiboot2 tag size")
        );
        // A tag size below the 8-byte header (would loop forever if accepted).
        let mut mem = mb2(&[(1, b"x\0".to_vec())]);
        mem.bytes[12..16].copy_from_slice(&0u32.to_le_bytes());
        assert!(BootInfo::parse(MULTIBOOT2_MAGIC, 0x9000, &mem).is_err());
        // total_size larger than memory.
        let mut mem = mb2(&[(6, mmap_tag(&[(0, 0x1000, 1)]))]);
        mem.bytes[0..4].copy_from_slice(&0x8000u32.to_le_bytes());
        assert!(matches!(
            BootInfo::parse(MULTIBOOT2_MAGIC, 0x9000, &mem),
            Err(BootInfoError::Unreadable { .. })
        ));
        // No memory map at all.
        let mem = mb2(&[(1, b"x\0".to_vec())]);
        assert_eq!(
            BootInfo::parse(MULTIBOOT2_MAGIC, 0x9000, &mem).unwrap_err(),
            BootInfoError::NoMemoryMap
        );
        // Memory-map entry size too small to hold an entry.
        let mut tag = mmap_tag(&[(0, 0x1000, 1)]);
        tag[0..4].copy_from_slice(&8u32.to_le_bytes());
        let mem = mb2(&[(6, tag)]);
        assert!(BootInfo::parse(MULTIBOOT2_MAGIC, 0x9000, &mem).is_err());
    }

    #[test]
    fn oversized_maps_and_cmdlines_are_cut_not_overflowed() {
        let entries: Vec<(u64, u64, u32)> = (0..200).map(|i| (i * 0x10000, 0x1000, 1)).collect();
        let long = std::vec![b'a'; MAX_CMDLINE + 50];
        let mut cmd = long.clone();
        cmd.push(0);
        let mem = mb2(&[(6, mmap_tag(&entries)), (1, cmd)]);
        let info = BootInfo::parse(MULTIBOOT2_MAGIC, 0x9000, &mem).unwrap();
        assert_eq!(info.memory_regions().len(), MAX_MEMORY_REGIONS);
        assert_eq!(info.regions_dropped, 200 - MAX_MEMORY_REGIONS);
        assert!(info.cmdline_truncated);
        assert_eq!(info.cmdline().len(), MAX_CMDLINE);
    }
}
