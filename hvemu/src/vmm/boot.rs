//! PVH boot: where everything goes in guest physical memory, the `hvm_start_info` the
//! kernel reads, and the 32-bit protected-mode entry state the PVH ABI prescribes.
//!
//! Layouts follow Xen's `arch/x86/include/asm/xen/hvm_start_info.h` (start info version
//! 1: magic, version, flags, nr_modules, modlist_paddr @16, cmdline_paddr @24,
//! rsdp_paddr @32, memmap_paddr @40, memmap_entries @48, 56 bytes; memory map entries of
//! 24 bytes: addr, size, type, reserved), which hvnet's `appliance/boot/info.rs` parses.
//!
//! Guest physical layout (RAM from 0 to `mem`; the kernel itself keeps clear of the
//! first MiB):
//!
//! | range | what |
//! |---|---|
//! | 0x500..0x520 | boot GDT (null, code32 0x08, data 0x10, TSS 0x18) |
//! | 0x6000 | `hvm_start_info`; memory map at 0x6100 |
//! | 0x7000 | command line (NUL-terminated, at most 4095 bytes) |
//! | 0x9FC00..0x100000 | reserved (EBDA/BIOS area); ACPI tables at 0xE0000 |
//! | 0x100000.. | the kernel's `PT_LOAD` segments, then free RAM |

use std::fmt;

use super::acpi::{self, AcpiTables};
use super::elf::KernelImage;

/// `hvm_start_info` magic ("xEn3" with bit 7 of 'E' set).
pub const PVH_MAGIC: u32 = 0x336E_C578;
/// Boot GDT.
pub const GDT_ADDR: u64 = 0x500;
/// `hvm_start_info`.
pub const START_INFO_ADDR: u64 = 0x6000;
/// The memory map (E820 entries).
pub const MEMMAP_ADDR: u64 = 0x6100;
/// The command line.
pub const CMDLINE_ADDR: u64 = 0x7000;
/// Longest command line (bytes, without the NUL).
pub const CMDLINE_MAX: usize = 4095;
/// ACPI tables (in the reserved BIOS area, where firmware puts them too).
pub const ACPI_BASE: u64 = 0xE0000;
/// End of conventional low RAM.
pub const LOW_RAM_END: u64 = 0x9FC00;
/// Start of RAM above the BIOS area.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Size of `hvm_start_info` version 1.
pub const START_INFO_LEN: usize = 56;

/// E820 memory types.
pub const E820_RAM: u32 = 1;
/// Reserved.
pub const E820_RESERVED: u32 = 2;

/// Selectors of the boot GDT.
pub const CODE_SELECTOR: u16 = 0x08;
/// Data selector.
pub const DATA_SELECTOR: u16 = 0x10;
/// TSS selector.
pub const TSS_SELECTOR: u16 = 0x18;

/// One memory-map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The memory map for `mem` bytes of RAM starting at 0.
pub fn memory_map(mem: u64) -> Vec<E820Entry> {
    vec![
        E820Entry {
            addr: 0,
            size: LOW_RAM_END,
            kind: E820_RAM,
        },
        E820Entry {
            addr: LOW_RAM_END,
            size: HIGH_RAM_START - LOW_RAM_END,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: HIGH_RAM_START,
            size: mem - HIGH_RAM_START,
            kind: E820_RAM,
        },
    ]
}

/// Encodes the memory map as the kernel reads it.
pub fn encode_memory_map(map: &[E820Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(map.len() * 24);
    for e in map {
        out.extend_from_slice(&e.addr.to_le_bytes());
        out.extend_from_slice(&e.size.to_le_bytes());
        out.extend_from_slice(&e.kind.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
    }
    out
}

/// `hvm_start_info` version 1 with no modules.
pub fn start_info(
    cmdline: u64,
    rsdp: u64,
    memmap: u64,
    memmap_entries: u32,
) -> [u8; START_INFO_LEN] {
    let mut s = [0u8; START_INFO_LEN];
    s[0..4].copy_from_slice(&PVH_MAGIC.to_le_bytes());
    s[4..8].copy_from_slice(&1u32.to_le_bytes()); // version
    s[24..32].copy_from_slice(&cmdline.to_le_bytes());
    s[32..40].copy_from_slice(&rsdp.to_le_bytes());
    s[40..48].copy_from_slice(&memmap.to_le_bytes());
    s[48..52].copy_from_slice(&memmap_entries.to_le_bytes());
    s
}

/// The boot GDT: null, flat 32-bit code (0x08), flat data (0x10), a 32-bit TSS (0x18)
/// of 0x68 bytes at 0. Only there so GDTR points at something consistent with the
/// segment registers; the kernel loads its own GDT at once.
pub fn gdt() -> [u64; 4] {
    [
        0,
        0x00CF_9B00_0000_FFFF, // code: base 0, limit 4 GiB, present, ring 0, exec/read, accessed, 32-bit
        0x00CF_9300_0000_FFFF, // data: read/write, accessed
        0x0000_8B00_0000_0067, // TSS: busy 32-bit TSS, limit 0x67
    ]
}

/// A segment register as KVM wants it (`struct kvm_segment`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// Base address.
    pub base: u64,
    /// Limit (bytes - 1, already scaled by granularity).
    pub limit: u32,
    /// Selector.
    pub selector: u16,
    /// Descriptor type (4 bits).
    pub type_: u8,
    /// Present.
    pub present: u8,
    /// Privilege level.
    pub dpl: u8,
    /// Default operation size (1 = 32-bit).
    pub db: u8,
    /// Code/data (1) or system (0) descriptor.
    pub s: u8,
    /// 64-bit code.
    pub l: u8,
    /// Granularity (4 KiB).
    pub g: u8,
}

/// The vCPU state at the PVH entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryState {
    /// Entry point.
    pub rip: u64,
    /// `hvm_start_info` address (the PVH ABI's EBX).
    pub rbx: u64,
    /// Flags: only the reserved bit 1 (interrupts off).
    pub rflags: u64,
    /// CR0: protected mode, paging off.
    pub cr0: u64,
    /// Code segment.
    pub cs: Segment,
    /// DS, ES, FS, GS, SS.
    pub data: Segment,
    /// Task register.
    pub tr: Segment,
    /// GDTR base and limit.
    pub gdt: (u64, u16),
}

/// The entry state the PVH ABI asks for: 32-bit protected mode, paging disabled, CS a
/// flat 32-bit code segment, DS/ES/SS flat data, TR a 32-bit TSS, EBX = start info.
pub fn entry_state(entry: u32) -> EntryState {
    let flat = Segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        present: 1,
        db: 1,
        s: 1,
        g: 1,
        ..Segment::default()
    };
    EntryState {
        rip: u64::from(entry),
        rbx: START_INFO_ADDR,
        rflags: 0x2,
        cr0: 0x11, // PE | ET
        cs: Segment {
            selector: CODE_SELECTOR,
            type_: 0xB,
            ..flat
        },
        data: Segment {
            selector: DATA_SELECTOR,
            type_: 0x3,
            ..flat
        },
        tr: Segment {
            base: 0,
            limit: 0x67,
            selector: TSS_SELECTOR,
            type_: 0xB,
            present: 1,
            ..Segment::default()
        },
        gdt: (GDT_ADDR, (gdt().len() * 8 - 1) as u16),
    }
}

/// Why the image cannot be laid out in this VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootError {
    /// A segment is outside `[1 MiB, RAM end)`.
    SegmentOutsideRam {
        /// Segment start.
        start: u64,
        /// Segment end.
        end: u64,
        /// RAM end.
        ram_end: u64,
    },
    /// The command line is longer than [`CMDLINE_MAX`] or contains a NUL.
    BadCmdline(usize),
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SegmentOutsideRam {
                start,
                end,
                ram_end,
            } => write!(
                f,
                "kernel segment {start:#x}..{end:#x} does not fit in RAM {HIGH_RAM_START:#x}..{ram_end:#x} (more --mem?)"
            ),
            Self::BadCmdline(len) => write!(
                f,
                "command line of {len} bytes is too long (at most {CMDLINE_MAX}) or contains NUL"
            ),
        }
    }
}

impl std::error::Error for BootError {}

/// Everything to write into guest RAM before the first `KVM_RUN`, and where to start.
#[derive(Clone, Debug)]
pub struct BootPlan {
    /// `(guest physical address, bytes)`, in order.
    pub writes: Vec<(u64, Vec<u8>)>,
    /// The vCPU state at entry.
    pub entry: EntryState,
    /// The ACPI tables (for the log).
    pub acpi: AcpiTables,
}

/// Lays out the kernel `image` (bytes `file`) in `mem` bytes of RAM with `cmdline`.
pub fn plan(
    image: &KernelImage,
    file: &[u8],
    mem: u64,
    cmdline: &str,
    cpus: u32,
) -> Result<BootPlan, BootError> {
    if cmdline.len() > CMDLINE_MAX || cmdline.contains('\0') {
        return Err(BootError::BadCmdline(cmdline.len()));
    }
    let mut writes = Vec::new();
    for seg in &image.segments {
        if seg.paddr < HIGH_RAM_START || seg.end() > mem {
            return Err(BootError::SegmentOutsideRam {
                start: seg.paddr,
                end: seg.end(),
                ram_end: mem,
            });
        }
        // The ELF parser checked that the file holds `filesz` bytes at `offset`.
        let start = seg.offset as usize;
        let mut bytes = file[start..start + seg.filesz as usize].to_vec();
        bytes.resize(seg.memsz as usize, 0);
        writes.push((seg.paddr, bytes));
    }
    let gdt_bytes: Vec<u8> = gdt().iter().flat_map(|d| d.to_le_bytes()).collect();
    writes.push((GDT_ADDR, gdt_bytes));
    let mut cl = cmdline.as_bytes().to_vec();
    cl.push(0);
    writes.push((CMDLINE_ADDR, cl));
    let map = memory_map(mem);
    writes.push((MEMMAP_ADDR, encode_memory_map(&map)));
    let tables = acpi::build(ACPI_BASE, cpus);
    writes.push((tables.base, tables.bytes.clone()));
    let si = start_info(CMDLINE_ADDR, tables.rsdp(), MEMMAP_ADDR, map.len() as u32);
    writes.push((START_INFO_ADDR, si.to_vec()));
    Ok(BootPlan {
        writes,
        entry: entry_state(image.pvh_entry),
        acpi: tables,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::elf;

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn start_info_layout() {
        let s = start_info(0x7000, 0xE0000, 0x6100, 3);
        assert_eq!(u32_at(&s, 0), 0x336e_c578);
        assert_eq!(u32_at(&s, 4), 1);
        assert_eq!(u32_at(&s, 8), 0); // flags
        assert_eq!(u32_at(&s, 12), 0); // nr_modules
        assert_eq!(u64_at(&s, 16), 0); // modlist
        assert_eq!(u64_at(&s, 24), 0x7000);
        assert_eq!(u64_at(&s, 32), 0xE0000);
        assert_eq!(u64_at(&s, 40), 0x6100);
        assert_eq!(u32_at(&s, 48), 3);
        assert_eq!(s.len(), 56);
    }

    #[test]
    fn memory_map_covers_ram_and_reserves_bios_area() {
        let map = memory_map(256 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: 0x9FC00,
                kind: E820_RAM
            }
        );
        assert_eq!(map[1].kind, E820_RESERVED);
        assert_eq!(map[1].addr + map[1].size, 0x10_0000);
        assert_eq!(map[2].addr + map[2].size, 256 << 20);
        let enc = encode_memory_map(&map);
        assert_eq!(enc.len(), 72);
        assert_eq!(u64_at(&enc, 24), 0x9FC00);
        assert_eq!(u32_at(&enc, 24 + 16), E820_RESERVED);
        // Boot structures sit in low RAM below the kernel, ACPI in the reserved hole.
        const {
            assert!(CMDLINE_ADDR + (CMDLINE_MAX as u64) < LOW_RAM_END);
            assert!(MEMMAP_ADDR + 72 <= CMDLINE_ADDR && START_INFO_ADDR + 56 <= MEMMAP_ADDR);
            assert!(LOW_RAM_END <= ACPI_BASE && ACPI_BASE < HIGH_RAM_START);
        }
    }

    #[test]
    fn entry_state_is_pvh_protected_mode() {
        let e = entry_state(0x10_0030);
        assert_eq!(e.rip, 0x10_0030);
        assert_eq!(e.rbx, START_INFO_ADDR);
        assert_eq!(e.cr0 & 1, 1);
        assert_eq!(e.cr0 & (1 << 31), 0);
        assert_eq!(e.rflags, 2);
        assert_eq!(
            (e.cs.db, e.cs.l, e.cs.limit, e.cs.base),
            (1, 0, 0xFFFF_FFFF, 0)
        );
        assert_eq!(e.cs.type_ & 0x8, 0x8, "CS is a code segment");
        assert_eq!(e.data.type_ & 0x8, 0, "DS is a data segment");
        assert_eq!(e.tr.type_, 0xB);
        assert_eq!(e.gdt, (GDT_ADDR, 31));
        // The GDT's descriptors agree with the segment registers.
        let g = gdt();
        assert_eq!((g[1] >> 40) & 0xF, u64::from(e.cs.type_));
        assert_eq!((g[2] >> 40) & 0xF, u64::from(e.data.type_));
        assert_eq!((g[1] >> 54) & 1, 1, "D bit");
    }

    #[test]
    fn plan_lays_out_everything() {
        let f = elf::tests::build_elf(
            &[0xF4; 8],
            0x10_0000,
            0x2000,
            Some(&0x10_0000u32.to_le_bytes()),
        );
        let image = elf::parse(&f).unwrap();
        let p = plan(&image, &f, 64 << 20, "exit=debug test=ready", 1).unwrap();
        let find = |addr: u64| p.writes.iter().find(|w| w.0 == addr).map(|w| &w.1).unwrap();
        let k = find(0x10_0000);
        assert_eq!(k.len(), 0x2000);
        assert_eq!(&k[..8], &[0xF4; 8]);
        assert!(k[8..].iter().all(|&b| b == 0));
        assert_eq!(find(CMDLINE_ADDR).as_slice(), b"exit=debug test=ready\0");
        let si = find(START_INFO_ADDR);
        assert_eq!(u64_at(si, 32), p.acpi.rsdp());
        assert_eq!(u32_at(si, 48), 3);
        assert_eq!(p.entry.rip, 0x10_0000);

        let long = "x".repeat(CMDLINE_MAX + 1);
        assert_eq!(
            plan(&image, &f, 64 << 20, &long, 1).unwrap_err(),
            BootError::BadCmdline(CMDLINE_MAX + 1)
        );
        let f = elf::tests::build_elf(&[0; 8], 0x8000, 8, Some(&0x8000u32.to_le_bytes()));
        let image = elf::parse(&f).unwrap();
        let e = plan(&image, &f, 64 << 20, "", 1).unwrap_err();
        assert!(
            matches!(e, BootError::SegmentOutsideRam { start: 0x8000, .. }),
            "{e}"
        );
    }
}
