//! A small seeded random number generator (PCG-XSH-RR, 64-bit state, 32-bit output).
//!
//! The simulation must produce the same schedule for the same seed on every machine and
//! every build, so the generator is written out here rather than taken from a crate whose
//! algorithm could change under a version bump. It is not cryptographic and does not try
//! to be: it decides which ready task runs next, how long a poll "costs", and which fault
//! a test injects.

const MULTIPLIER: u64 = 6_364_136_223_846_793_005;

/// A permuted congruential generator with a selectable stream.
#[derive(Clone, Debug)]
pub struct Pcg32 {
    state: u64,
    increment: u64,
}

impl Pcg32 {
    /// A generator for `seed` on stream `stream`. Two streams with the same seed give
    /// unrelated sequences, which lets the scheduler and fault injection draw from one seed
    /// without drawing from each other's sequence.
    pub const fn new(seed: u64, stream: u64) -> Self {
        let increment = (stream << 1) | 1;
        let mut rng = Pcg32 {
            state: 0,
            increment,
        };
        rng.state = rng.state.wrapping_mul(MULTIPLIER).wrapping_add(increment);
        rng.state = rng.state.wrapping_add(seed);
        rng.state = rng.state.wrapping_mul(MULTIPLIER).wrapping_add(increment);
        rng
    }

    /// The next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        let old = self.state;
        self.state = old.wrapping_mul(MULTIPLIER).wrapping_add(self.increment);
        let xorshifted = (((old >> 18) ^ old) >> 27) as u32;
        let rotation = (old >> 59) as u32;
        xorshifted.rotate_right(rotation)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let high = u64::from(self.next_u32());
        let low = u64::from(self.next_u32());
        (high << 32) | low
    }

    /// A value in `0..bound` (`0` when `bound` is `0`). The slight modulo bias is
    /// irrelevant for scheduling decisions.
    pub fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 {
            0
        } else if bound <= u64::from(u32::MAX) {
            u64::from(self.next_u32()) % bound
        } else {
            self.next_u64() % bound
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn same_seed_same_sequence() {
        let mut a = Pcg32::new(42, 1);
        let mut b = Pcg32::new(42, 1);
        let xs: Vec<u32> = (0..16).map(|_| a.next_u32()).collect();
        let ys: Vec<u32> = (0..16).map(|_| b.next_u32()).collect();
        assert_eq!(xs, ys);
    }

    #[test]
    fn seeds_and_streams_differ() {
        let first = |seed, stream| Pcg32::new(seed, stream).next_u64();
        assert_ne!(first(1, 1), first(2, 1));
        assert_ne!(first(1, 1), first(1, 2));
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut rng = Pcg32::new(7, 0);
        let mut seen = [false; 5];
        for _ in 0..200 {
            let v = rng.below(5);
            assert!(v < 5);
            seen[v as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
        assert_eq!(rng.below(0), 0);
        assert!(rng.below(u64::MAX) < u64::MAX);
    }
}
