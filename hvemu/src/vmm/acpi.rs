//! Minimal ACPI tables: RSDP (revision 2), RSDT, XSDT, FADT (revision 6), MADT and a DSDT
//! holding only `Name (\_S5, Package () {5, 5, 0, 0})`, so a guest can count its CPUs,
//! find the I/O APIC and power off through the PM1a control port.
//!
//! Layouts from the ACPI 6.x specification (RSDP 36 bytes, SDT header 36 bytes, FADT 276
//! bytes, MADT entries: local APIC type 0 of 8 bytes, I/O APIC type 1 of 12 bytes,
//! interrupt source override type 2 of 10 bytes). Checksums make each table's bytes sum
//! to 0 mod 256 (the RSDP has two: first 20 bytes, and all 36).

/// Where the ACPI PM1a event block is (status + enable, 2 bytes each).
pub const PM1A_EVT_PORT: u16 = 0x600;
/// Where the ACPI PM1a control register is; writing `SLP_EN | SLP_TYP << 10` sleeps.
pub const PM1A_CNT_PORT: u16 = 0x604;
/// `SLP_TYP` of S5 (soft off) in this DSDT.
pub const S5_SLP_TYP: u16 = 5;
/// `SLP_EN`, bit 13 of PM1 control.
pub const SLP_EN: u16 = 1 << 13;
/// Guest physical address of the local APIC.
pub const LAPIC_ADDR: u32 = 0xFEE0_0000;
/// Guest physical address of the I/O APIC (KVM's in-kernel one decodes it there).
pub const IOAPIC_ADDR: u32 = 0xFEC0_0000;

const OEM_ID: &[u8; 6] = b"HVEMU ";
const OEM_TABLE_ID: &[u8; 8] = b"HVEMUVMM";
const RSDP_OFF: usize = 0;
const RSDT_OFF: usize = 0x40;
const XSDT_OFF: usize = 0x80;
const FADT_OFF: usize = 0x100;
const MADT_OFF: usize = 0x240;
const DSDT_OFF: usize = 0x340;
/// FADT length for revision 6.
pub const FADT_LEN: usize = 276;

/// The tables, ready to copy to guest memory at `base`.
#[derive(Clone, Debug)]
pub struct AcpiTables {
    /// Guest physical address the blob is built for.
    pub base: u64,
    /// The bytes of every table.
    pub bytes: Vec<u8>,
}

impl AcpiTables {
    /// Guest physical address of the RSDP.
    pub fn rsdp(&self) -> u64 {
        self.base + RSDP_OFF as u64
    }
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)))
}

/// An SDT header (36 bytes) for a table of `len` bytes; the checksum is filled later.
fn sdt_header(sig: &[u8; 4], len: usize, revision: u8) -> Vec<u8> {
    let mut h = Vec::with_capacity(len);
    h.extend_from_slice(sig);
    h.extend_from_slice(&(len as u32).to_le_bytes());
    h.push(revision);
    h.push(0); // checksum
    h.extend_from_slice(OEM_ID);
    h.extend_from_slice(OEM_TABLE_ID);
    h.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    h.extend_from_slice(b"HVEM"); // creator id
    h.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    h
}

fn finish(mut t: Vec<u8>) -> Vec<u8> {
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    t[9] = 0;
    t[9] = checksum(&t);
    t
}

/// A Generic Address Structure for a system I/O port of `bits` width.
fn gas_io(port: u16, bits: u8) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O space
    g[1] = bits;
    g[3] = if bits >= 32 { 3 } else { 2 }; // dword / word access
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

/// Builds the tables for `cpus` processors, to live at guest physical address `base`.
pub fn build(base: u64, cpus: u32) -> AcpiTables {
    let at = |off: usize| base + off as u64;

    // DSDT: header + AML `Name (\_S5, Package (4) {5, 5, 0, 0})`.
    let mut dsdt = sdt_header(b"DSDT", 0, 2);
    dsdt.extend_from_slice(&[
        0x08,
        b'\\',
        b'_',
        b'S',
        b'5',
        b'_', // NameOp "\_S5_"
        0x12,
        0x08,
        0x04, // PackageOp, PkgLength 8, 4 elements
        0x0A,
        S5_SLP_TYP as u8,
        0x0A,
        S5_SLP_TYP as u8, // BytePrefix 5, BytePrefix 5
        0x00,
        0x00, // Zero, Zero
    ]);
    let dsdt = finish(dsdt);

    // FADT revision 6 (minor 4).
    let mut fadt = sdt_header(b"FACP", FADT_LEN, 6);
    fadt.resize(FADT_LEN, 0);
    let put32 =
        |t: &mut Vec<u8>, off: usize, v: u32| t[off..off + 4].copy_from_slice(&v.to_le_bytes());
    put32(&mut fadt, 40, at(DSDT_OFF) as u32); // DSDT
    fadt[46..48].copy_from_slice(&9u16.to_le_bytes()); // SCI_INT
    put32(&mut fadt, 56, u32::from(PM1A_EVT_PORT)); // PM1a_EVT_BLK
    put32(&mut fadt, 64, u32::from(PM1A_CNT_PORT)); // PM1a_CNT_BLK
    fadt[88] = 4; // PM1_EVT_LEN
    fadt[89] = 2; // PM1_CNT_LEN
    put32(&mut fadt, 112, 1 << 0 | 1 << 4); // flags: WBINVD, PWR_BUTTON (none)
    fadt[131] = 4; // FADT minor version
    fadt[140..148].copy_from_slice(&at(DSDT_OFF).to_le_bytes()); // X_DSDT
    fadt[148..160].copy_from_slice(&gas_io(PM1A_EVT_PORT, 32)); // X_PM1a_EVT_BLK
    fadt[172..184].copy_from_slice(&gas_io(PM1A_CNT_PORT, 16)); // X_PM1a_CNT_BLK
    fadt[268..276].copy_from_slice(b"HVEMUVMM"); // hypervisor vendor identity
    let fadt = finish(fadt);

    // MADT: local APIC address, PCAT_COMPAT (the in-kernel 8259s exist), entries.
    let mut madt = sdt_header(b"APIC", 0, 4);
    madt.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    madt.extend_from_slice(&1u32.to_le_bytes());
    for id in 0..cpus {
        // Processor local APIC: type 0, length 8, processor uid, APIC id, flags (enabled).
        madt.extend_from_slice(&[0, 8, id as u8, id as u8]);
        madt.extend_from_slice(&1u32.to_le_bytes());
    }
    // I/O APIC: type 1, length 12, id, reserved, address, GSI base 0.
    madt.extend_from_slice(&[1, 12, cpus as u8, 0]);
    madt.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    madt.extend_from_slice(&0u32.to_le_bytes());
    // Interrupt source override: ISA IRQ 0 (PIT) is GSI 2, as KVM routes it.
    madt.extend_from_slice(&[2, 10, 0, 0]);
    madt.extend_from_slice(&2u32.to_le_bytes());
    madt.extend_from_slice(&0u16.to_le_bytes());
    let madt = finish(madt);

    let mut rsdt = sdt_header(b"RSDT", 0, 1);
    rsdt.extend_from_slice(&(at(FADT_OFF) as u32).to_le_bytes());
    rsdt.extend_from_slice(&(at(MADT_OFF) as u32).to_le_bytes());
    let rsdt = finish(rsdt);

    let mut xsdt = sdt_header(b"XSDT", 0, 1);
    xsdt.extend_from_slice(&at(FADT_OFF).to_le_bytes());
    xsdt.extend_from_slice(&at(MADT_OFF).to_le_bytes());
    let xsdt = finish(xsdt);

    let mut rsdp = Vec::with_capacity(36);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0); // checksum of the first 20 bytes
    rsdp.extend_from_slice(OEM_ID);
    rsdp.push(2); // revision: ACPI 2.0+
    rsdp.extend_from_slice(&(at(RSDT_OFF) as u32).to_le_bytes());
    rsdp.extend_from_slice(&36u32.to_le_bytes());
    rsdp.extend_from_slice(&at(XSDT_OFF).to_le_bytes());
    rsdp.push(0); // extended checksum
    rsdp.extend_from_slice(&[0; 3]);
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);

    let mut bytes = vec![0u8; DSDT_OFF + dsdt.len()];
    for (off, t) in [
        (RSDP_OFF, &rsdp),
        (RSDT_OFF, &rsdt),
        (XSDT_OFF, &xsdt),
        (FADT_OFF, &fadt),
        (MADT_OFF, &madt),
        (DSDT_OFF, &dsdt),
    ] {
        bytes[off..off + t.len()].copy_from_slice(t);
    }
    AcpiTables { base, bytes }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    fn table_at(t: &AcpiTables, addr: u64) -> &[u8] {
        let off = (addr - t.base) as usize;
        let len = u32::from_le_bytes(t.bytes[off + 4..off + 8].try_into().unwrap()) as usize;
        &t.bytes[off..off + len]
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let t = build(0xE0000, 1);
        let rsdp = &t.bytes[..36];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        assert_eq!(rsdp[15], 2);
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let rsdt_addr = u64::from(u32::from_le_bytes(rsdp[16..20].try_into().unwrap()));
        let xsdt = table_at(&t, xsdt_addr);
        let rsdt = table_at(&t, rsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(&rsdt[..4], b"RSDT");
        assert_eq!(xsdt.len(), 36 + 16);
        let mut sigs = Vec::new();
        for e in xsdt[36..].chunks(8) {
            let table = table_at(&t, u64::from_le_bytes(e.try_into().unwrap()));
            assert_eq!(sum(table), 0, "{:?}", &table[..4]);
            sigs.push(table[..4].to_vec());
        }
        assert_eq!(sigs, [b"FACP".to_vec(), b"APIC".to_vec()]);

        let fadt = table_at(&t, u64::from_le_bytes(xsdt[36..44].try_into().unwrap()));
        assert_eq!(fadt.len(), FADT_LEN);
        assert_eq!(
            u32::from_le_bytes(fadt[64..68].try_into().unwrap()),
            u32::from(PM1A_CNT_PORT)
        );
        assert_eq!(fadt[172], 1); // X_PM1a_CNT_BLK in system I/O space
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = table_at(&t, dsdt_addr);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(sum(dsdt), 0);
        let aml = &dsdt[36..];
        assert!(aml.windows(4).any(|w| w == b"_S5_"));
    }

    #[test]
    fn madt_lists_cpus_and_ioapic() {
        let t = build(0xE0000, 2);
        let madt = table_at(&t, 0xE0000 + MADT_OFF as u64);
        assert_eq!(&madt[..4], b"APIC");
        let mut off = 44;
        let mut kinds = Vec::new();
        while off < madt.len() {
            kinds.push(madt[off]);
            off += usize::from(madt[off + 1]);
        }
        assert_eq!(off, madt.len());
        assert_eq!(kinds, [0, 0, 1, 2]);
    }
}
