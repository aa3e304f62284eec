//! Pure helpers for ACPI power-off: finding the S5 sleep type in the DSDT.
//!
//! Entering S5 means writing `SLP_TYPa << 10 | SLP_EN` to the PM1a control block (and
//! `SLP_TYPb` to PM1b if present). The type values live in the DSDT as
//! `Name(_S5_, Package() { a, b, ... })`. A full AML interpreter is far more than a power-off
//! needs, so this decodes just that one object, bounds-checked, from the raw table bytes.

/// `SLP_TYPa` and `SLP_TYPb` for S5 (soft off).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SleepTypes {
    pub a: u8,
    pub b: u8,
}

const NAME_OP: u8 = 0x08;
const ROOT_CHAR: u8 = b'\\';
const PACKAGE_OP: u8 = 0x12;
const ZERO_OP: u8 = 0x00;
const ONE_OP: u8 = 0x01;
const BYTE_PREFIX: u8 = 0x0a;
const WORD_PREFIX: u8 = 0x0b;
const DWORD_PREFIX: u8 = 0x0c;

/// Finds `_S5_` in AML `code` and returns its first two package elements.
pub fn find_s5(code: &[u8]) -> Option<SleepTypes> {
    let mut from = 0;
    while let Some(pos) = code.get(from..)?.windows(4).position(|w| w == b"_S5_") {
        let at = from + pos;
        from = at + 4;
        let named = match at.checked_sub(1).and_then(|i| code.get(i)) {
            Some(&NAME_OP) => true,
            Some(&ROOT_CHAR) => at >= 2 && code.get(at - 2) == Some(&NAME_OP),
            _ => false,
        };
        if !named {
            continue;
        }
        if let Some(t) = decode_package(code.get(at + 4..)?) {
            return Some(t);
        }
    }
    None
}

fn decode_package(p: &[u8]) -> Option<SleepTypes> {
    if *p.first()? != PACKAGE_OP {
        return None;
    }
    // PkgLength: the top two bits of the lead byte count the extra length bytes.
    let lead = *p.get(1)?;
    let mut i = 2 + usize::from(lead >> 6);
    let count = *p.get(i)?;
    i += 1;
    if count < 2 {
        return None;
    }
    let (a, used) = integer(p.get(i..)?)?;
    let (b, _) = integer(p.get(i + used..)?)?;
    Some(SleepTypes { a, b })
}

/// Decodes one small integer data object, returning its low byte and encoded length.
fn integer(p: &[u8]) -> Option<(u8, usize)> {
    match *p.first()? {
        ZERO_OP => Some((0, 1)),
        ONE_OP => Some((1, 1)),
        BYTE_PREFIX => Some((*p.get(1)?, 2)),
        WORD_PREFIX => Some((*p.get(1)?, 3)).filter(|_| p.len() >= 3),
        DWORD_PREFIX => Some((*p.get(1)?, 5)).filter(|_| p.len() >= 5),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_piix4_style_package() {
        // Name (_S5, Package (0x04) { Zero, Zero, Zero, Zero }) as QEMU's PIIX4 DSDT has it.
        let aml = [
            0x10, 0x08, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x04, 0, 0, 0, 0, 0x5b,
        ];
        assert_eq!(find_s5(&aml), Some(SleepTypes { a: 0, b: 0 }));
    }

    #[test]
    fn byte_prefixed_values_and_root_path() {
        let aml = [
            0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 0x0a, 0x02, 0x0a, 0x05, 0x0a, 0x07,
        ];
        assert_eq!(find_s5(&aml), Some(SleepTypes { a: 5, b: 7 }));
        // Two-byte PkgLength.
        let aml = [
            0x08, b'_', b'S', b'5', b'_', 0x12, 0x40, 0x01, 0x02, 0x01, 0x0a, 0x03,
        ];
        assert_eq!(find_s5(&aml), Some(SleepTypes { a: 1, b: 3 }));
    }

    #[test]
    fn references_that_are_not_definitions_are_skipped() {
        // A method call mentioning _S5_ first, then the real definition.
        let aml = [
            0x70, b'_', b'S', b'5', b'_', 0x08, b'_', b'S', b'5', b'_', 0x12, 0x05, 0x02, 0x01,
            0x01,
        ];
        assert_eq!(find_s5(&aml), Some(SleepTypes { a: 1, b: 1 }));
    }

    #[test]
    fn truncated_or_garbage_input_yields_none() {
        assert_eq!(find_s5(&[]), None);
        assert_eq!(find_s5(b"_S5_"), None);
        assert_eq!(find_s5(&[0x08, b'_', b'S', b'5', b'_', 0x12]), None);
        assert_eq!(
            find_s5(&[0x08, b'_', b'S', b'5', b'_', 0x12, 0xc0, 0x02]),
            None
        );
        assert_eq!(
            find_s5(&[0x08, b'_', b'S', b'5', b'_', 0x12, 0x04, 0x02, 0x0a]),
            None
        );
        for n in 0..=255u8 {
            let aml = [0x08, b'_', b'S', b'5', b'_', n, n, n, n, n];
            let _ = find_s5(&aml);
        }
    }
}
