//! ELF64 kernel images: the `PT_LOAD` segments to copy into guest RAM and the 32-bit PVH
//! entry point from the Xen ELF note `XEN_ELFNOTE_PHYS32_ENTRY` (type 18, owner "Xen").
//!
//! Layouts are the System V ABI's (ELF64 header 64 bytes, program header 56 bytes, note
//! header three `u32`s with name and descriptor each padded to 4 bytes). The file is not
//! trusted: every offset and size is checked against the file and the address space.

use std::fmt;

/// `XEN_ELFNOTE_PHYS32_ENTRY`: the 32-bit physical entry point for PVH.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const SHT_NOTE: u32 = 7;
const EM_X86_64: u16 = 62;
const ET_EXEC: u16 = 2;
const EHDR_LEN: usize = 64;
const PHDR_LEN: usize = 56;
const SHDR_LEN: usize = 64;

/// One `PT_LOAD` segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical load address.
    pub paddr: u64,
    /// Where its bytes start in the file.
    pub offset: u64,
    /// Bytes taken from the file.
    pub filesz: u64,
    /// Bytes in memory (the rest, after `filesz`, is zero).
    pub memsz: u64,
}

impl Segment {
    /// Exclusive end of the segment in guest physical memory.
    pub fn end(&self) -> u64 {
        self.paddr + self.memsz
    }
}

/// What the VMM needs from a kernel ELF.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelImage {
    /// The loadable segments, in file order.
    pub segments: Vec<Segment>,
    /// The PVH entry (32-bit physical address).
    pub pvh_entry: u32,
}

impl KernelImage {
    /// Lowest and (exclusive) highest guest physical address the segments occupy.
    pub fn span(&self) -> (u64, u64) {
        let lo = self.segments.iter().map(|s| s.paddr).min().unwrap_or(0);
        let hi = self.segments.iter().map(Segment::end).max().unwrap_or(0);
        (lo, hi)
    }
}

/// Why a file is not a bootable kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ElfError {
    /// Shorter than an ELF header.
    TooShort,
    /// No ELF magic.
    NotElf,
    /// Not ELFCLASS64 little-endian.
    NotElf64LittleEndian,
    /// `e_machine` is not x86-64.
    WrongMachine(u16),
    /// `e_type` is not ET_EXEC (a relocatable or shared object cannot be loaded here).
    NotExecutable(u16),
    /// The program or section header table lies outside the file or has a bad entry size.
    BadHeaderTable(&'static str),
    /// A segment's file bytes lie outside the file, or its addresses overflow.
    BadSegment(usize),
    /// No `PT_LOAD` segment.
    NoLoadSegments,
    /// No Xen `PHYS32_ENTRY` note: the image has no PVH entry.
    NoPvhNote,
    /// The PVH note's descriptor is malformed.
    BadPvhNote,
}

impl fmt::Display for ElfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooShort => f.write_str("file is too short to be an ELF image"),
            Self::NotElf => f.write_str("not an ELF file (bad magic)"),
            Self::NotElf64LittleEndian => f.write_str("not a 64-bit little-endian ELF file"),
            Self::WrongMachine(m) => write!(f, "ELF machine {m} is not x86-64"),
            Self::NotExecutable(t) => write!(f, "ELF type {t} is not an executable (ET_EXEC)"),
            Self::BadHeaderTable(which) => write!(f, "ELF {which} header table is malformed"),
            Self::BadSegment(i) => write!(f, "ELF program header {i} is malformed"),
            Self::NoLoadSegments => f.write_str("ELF image has no loadable segment"),
            Self::NoPvhNote => f.write_str(
                "ELF image has no PVH entry (Xen note XEN_ELFNOTE_PHYS32_ENTRY, type 18)",
            ),
            Self::BadPvhNote => f.write_str("the PVH entry note is malformed"),
        }
    }
}

impl std::error::Error for ElfError {}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// The bytes `[off, off + len)` of `file`, if inside it.
fn range(file: &[u8], off: u64, len: u64) -> Option<&[u8]> {
    let start = usize::try_from(off).ok()?;
    let len = usize::try_from(len).ok()?;
    file.get(start..start.checked_add(len)?)
}

/// Entries of a header table: `(offset, count, entry size)` checked against the file.
fn table<'a>(
    file: &'a [u8],
    off: u64,
    count: u16,
    entsize: u16,
    min: usize,
    which: &'static str,
) -> Result<Vec<&'a [u8]>, ElfError> {
    if count == 0 {
        return Ok(Vec::new());
    }
    if usize::from(entsize) < min {
        return Err(ElfError::BadHeaderTable(which));
    }
    let all = range(file, off, u64::from(count) * u64::from(entsize))
        .ok_or(ElfError::BadHeaderTable(which))?;
    Ok(all.chunks_exact(usize::from(entsize)).collect())
}

/// Finds the PHYS32_ENTRY value in a block of notes.
fn find_pvh_note(notes: &[u8]) -> Result<Option<u32>, ElfError> {
    let mut off = 0usize;
    while off + 12 <= notes.len() {
        let (Some(namesz), Some(descsz), Some(kind)) = (
            u32_at(notes, off),
            u32_at(notes, off + 4),
            u32_at(notes, off + 8),
        ) else {
            break;
        };
        let name_start = off + 12;
        let name_len = usize::try_from(namesz).map_err(|_| ElfError::BadPvhNote)?;
        let desc_start = name_start
            .checked_add(name_len.next_multiple_of(4))
            .ok_or(ElfError::BadPvhNote)?;
        let desc_len = usize::try_from(descsz).map_err(|_| ElfError::BadPvhNote)?;
        let next = desc_start
            .checked_add(desc_len.next_multiple_of(4))
            .ok_or(ElfError::BadPvhNote)?;
        let Some(name) = notes.get(name_start..name_start + name_len) else {
            break;
        };
        if name == b"Xen\0" && kind == XEN_ELFNOTE_PHYS32_ENTRY {
            let desc = notes
                .get(desc_start..desc_start + desc_len)
                .ok_or(ElfError::BadPvhNote)?;
            // Linux and hvnet emit a 4-byte `.long`; accept an 8-byte value below 4 GiB.
            let entry = match desc_len {
                4 => u64::from(u32_at(desc, 0).ok_or(ElfError::BadPvhNote)?),
                8 => u64_at(desc, 0).ok_or(ElfError::BadPvhNote)?,
                _ => return Err(ElfError::BadPvhNote),
            };
            return u32::try_from(entry)
                .map(Some)
                .map_err(|_| ElfError::BadPvhNote);
        }
        off = next;
    }
    Ok(None)
}

/// Parses a kernel image.
pub fn parse(file: &[u8]) -> Result<KernelImage, ElfError> {
    if file.len() < EHDR_LEN {
        return Err(ElfError::TooShort);
    }
    if file[..4] != *b"\x7fELF" {
        return Err(ElfError::NotElf);
    }
    if file[4] != 2 || file[5] != 1 {
        return Err(ElfError::NotElf64LittleEndian);
    }
    let e_type = u16_at(file, 16).unwrap_or(0);
    let machine = u16_at(file, 18).unwrap_or(0);
    if machine != EM_X86_64 {
        return Err(ElfError::WrongMachine(machine));
    }
    if e_type != ET_EXEC {
        return Err(ElfError::NotExecutable(e_type));
    }
    let phoff = u64_at(file, 32).unwrap_or(0);
    let shoff = u64_at(file, 40).unwrap_or(0);
    let phentsize = u16_at(file, 54).unwrap_or(0);
    let phnum = u16_at(file, 56).unwrap_or(0);
    let shentsize = u16_at(file, 58).unwrap_or(0);
    let shnum = u16_at(file, 60).unwrap_or(0);

    let mut segments = Vec::new();
    let mut pvh_entry = None;
    for (i, ph) in table(file, phoff, phnum, phentsize, PHDR_LEN, "program")?
        .into_iter()
        .enumerate()
    {
        let kind = u32_at(ph, 0).unwrap_or(0);
        let offset = u64_at(ph, 8).unwrap_or(0);
        let paddr = u64_at(ph, 24).unwrap_or(0);
        let filesz = u64_at(ph, 32).unwrap_or(0);
        let memsz = u64_at(ph, 40).unwrap_or(0);
        match kind {
            PT_LOAD => {
                if filesz > memsz
                    || paddr.checked_add(memsz).is_none()
                    || range(file, offset, filesz).is_none()
                {
                    return Err(ElfError::BadSegment(i));
                }
                if memsz > 0 {
                    segments.push(Segment {
                        paddr,
                        offset,
                        filesz,
                        memsz,
                    });
                }
            }
            PT_NOTE if pvh_entry.is_none() => {
                let notes = range(file, offset, filesz).ok_or(ElfError::BadSegment(i))?;
                pvh_entry = find_pvh_note(notes)?;
            }
            _ => {}
        }
    }
    // Some linkers leave notes out of the program headers: look at the sections too.
    if pvh_entry.is_none() && shoff != 0 {
        for sh in table(file, shoff, shnum, shentsize, SHDR_LEN, "section")? {
            if u32_at(sh, 4) != Some(SHT_NOTE) {
                continue;
            }
            let (Some(off), Some(size)) = (u64_at(sh, 24), u64_at(sh, 32)) else {
                continue;
            };
            if let Some(notes) = range(file, off, size) {
                pvh_entry = find_pvh_note(notes)?;
                if pvh_entry.is_some() {
                    break;
                }
            }
        }
    }
    if segments.is_empty() {
        return Err(ElfError::NoLoadSegments);
    }
    Ok(KernelImage {
        segments,
        pvh_entry: pvh_entry.ok_or(ElfError::NoPvhNote)?,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ET_EXEC x86-64 ELF: one PT_LOAD of `code` at `paddr` (memsz `memsz`)
    /// and, if `note` is given, a PT_NOTE with the Xen PHYS32_ENTRY descriptor bytes.
    pub(crate) fn build_elf(code: &[u8], paddr: u64, memsz: u64, note: Option<&[u8]>) -> Vec<u8> {
        let phnum: u16 = if note.is_some() { 2 } else { 1 };
        let data_off = EHDR_LEN + PHDR_LEN * usize::from(phnum);
        let mut f = vec![0u8; data_off];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        f[32..40].copy_from_slice(&(EHDR_LEN as u64).to_le_bytes());
        f[52..54].copy_from_slice(&(EHDR_LEN as u16).to_le_bytes());
        f[54..56].copy_from_slice(&(PHDR_LEN as u16).to_le_bytes());
        f[56..58].copy_from_slice(&phnum.to_le_bytes());
        let code_off = f.len() as u64;
        f.extend_from_slice(code);
        let mut ph = |idx: usize, kind: u32, off: u64, addr: u64, filesz: u64, memsz: u64| {
            let p = EHDR_LEN + idx * PHDR_LEN;
            f[p..p + 4].copy_from_slice(&kind.to_le_bytes());
            f[p + 8..p + 16].copy_from_slice(&off.to_le_bytes());
            f[p + 16..p + 24].copy_from_slice(&addr.to_le_bytes());
            f[p + 24..p + 32].copy_from_slice(&addr.to_le_bytes());
            f[p + 32..p + 40].copy_from_slice(&filesz.to_le_bytes());
            f[p + 40..p + 48].copy_from_slice(&memsz.to_le_bytes());
        };
        ph(0, PT_LOAD, code_off, paddr, code.len() as u64, memsz);
        if let Some(desc) = note {
            let mut n = Vec::new();
            n.extend_from_slice(&4u32.to_le_bytes());
            n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
            n.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
            n.extend_from_slice(b"Xen\0");
            n.extend_from_slice(desc);
            while n.len() % 4 != 0 {
                n.push(0);
            }
            let note_off = (data_off + code.len()) as u64;
            ph(1, PT_NOTE, note_off, 0, n.len() as u64, n.len() as u64);
            f.extend_from_slice(&n);
        }
        f
    }

    #[test]
    fn parses_load_segments_and_pvh_note() {
        let f = build_elf(
            &[0x90; 16],
            0x10_0000,
            0x3000,
            Some(&0x10_0008u32.to_le_bytes()),
        );
        let k = parse(&f).unwrap();
        assert_eq!(k.pvh_entry, 0x10_0008);
        assert_eq!(k.segments.len(), 1);
        assert_eq!(
            k.segments[0],
            Segment {
                paddr: 0x10_0000,
                offset: (EHDR_LEN + 2 * PHDR_LEN) as u64,
                filesz: 16,
                memsz: 0x3000
            }
        );
        assert_eq!(k.span(), (0x10_0000, 0x10_3000));
        // An 8-byte descriptor works too.
        let f = build_elf(&[0x90; 4], 0x20_0000, 4, Some(&0x20_0000u64.to_le_bytes()));
        assert_eq!(parse(&f).unwrap().pvh_entry, 0x20_0000);
    }

    #[test]
    fn rejects_bad_images() {
        assert_eq!(parse(b"\x7fELF"), Err(ElfError::TooShort));
        assert_eq!(parse(&[0u8; 64]), Err(ElfError::NotElf));
        let good = build_elf(
            &[0x90; 16],
            0x10_0000,
            16,
            Some(&0x10_0000u32.to_le_bytes()),
        );
        // No PVH note: the error names the missing note.
        let f = build_elf(&[0x90; 16], 0x10_0000, 16, None);
        assert_eq!(parse(&f), Err(ElfError::NoPvhNote));
        assert!(ElfError::NoPvhNote.to_string().contains("PHYS32_ENTRY"));
        let mut f = good.clone();
        f[4] = 1;
        assert_eq!(parse(&f), Err(ElfError::NotElf64LittleEndian));
        let mut f = good.clone();
        f[18] = 3;
        assert_eq!(parse(&f), Err(ElfError::WrongMachine(3)));
        let mut f = good.clone();
        f[16] = 3;
        assert_eq!(parse(&f), Err(ElfError::NotExecutable(3)));
        // A segment whose file bytes run past the end of the file.
        let mut f = good.clone();
        f[EHDR_LEN + 32..EHDR_LEN + 40].copy_from_slice(&0x10_0000u64.to_le_bytes());
        f[EHDR_LEN + 40..EHDR_LEN + 48].copy_from_slice(&0x10_0000u64.to_le_bytes());
        assert_eq!(parse(&f), Err(ElfError::BadSegment(0)));
        // filesz > memsz.
        let mut f = good.clone();
        f[EHDR_LEN + 40..EHDR_LEN + 48].copy_from_slice(&1u64.to_le_bytes());
        assert_eq!(parse(&f), Err(ElfError::BadSegment(0)));
        // Program header table outside the file.
        let mut f = good.clone();
        f[32..40].copy_from_slice(&0xffff_ffffu64.to_le_bytes());
        assert_eq!(parse(&f), Err(ElfError::BadHeaderTable("program")));
        // A 2-byte PVH descriptor.
        let f = build_elf(&[0x90; 16], 0x10_0000, 16, Some(&[1, 2]));
        assert_eq!(parse(&f), Err(ElfError::BadPvhNote));
        // Truncation anywhere never panics.
        for n in 0..good.len() {
            let _ = parse(&good[..n]);
        }
    }
}
