//! The deterministic byte streams TCP echo flows send and check.

/// One 64-bit block of the stream: SplitMix64's output function applied to
/// `seed + block * golden_gamma`, so any block can be computed without the ones before it.
fn block(seed: u64, index: u64) -> u64 {
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `buf` with bytes `offset..offset + buf.len()` of the pseudo-random stream named by
/// `seed`. The same (seed, offset) always gives the same bytes, however the stream is split.
pub fn fill_pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut pos = offset;
    let mut i = 0;
    while i < buf.len() {
        let bytes = block(seed, pos / 8).to_le_bytes();
        let start = (pos % 8) as usize;
        let n = (8 - start).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&bytes[start..start + n]);
        i += n;
        pos += n as u64;
    }
}

/// The first position where `data` differs from the stream at `offset`, if any.
pub(crate) fn first_mismatch(seed: u64, offset: u64, data: &[u8]) -> Option<(usize, u8)> {
    let mut expected = [0u8; 512];
    let mut done = 0;
    while done < data.len() {
        let n = (data.len() - done).min(expected.len());
        fill_pattern(seed, offset + done as u64, &mut expected[..n]);
        if let Some(i) = (0..n).find(|&i| data[done + i] != expected[i]) {
            return Some((done + i, expected[i]));
        }
        done += n;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_is_the_same_however_it_is_split() {
        let mut whole = [0u8; 100];
        fill_pattern(42, 3, &mut whole);
        let mut parts = [0u8; 100];
        let (a, b) = parts.split_at_mut(13);
        fill_pattern(42, 3, a);
        fill_pattern(42, 16, b);
        assert_eq!(whole, parts);
        assert_eq!(first_mismatch(42, 3, &whole), None);
        let mut other = [0u8; 100];
        fill_pattern(43, 3, &mut other);
        assert_ne!(whole, other);
        whole[57] ^= 1;
        assert_eq!(first_mismatch(42, 3, &whole), Some((57, whole[57] ^ 1)));
    }
}
