//! Monotonic time as the runtime sees it.
//!
//! An [`Instant`] is a plain count of nanoseconds since boot. The runtime never reads a
//! clock by itself: the kernel's [`Platform`](crate::Platform) supplies `now()` (the
//! Hyper-V reference TSC page or the LAPIC timer), and the simulation supplies a virtual
//! counter that only moves when it says so. Keeping the value a bare `u64` makes it cheap
//! to copy into timer keys and log lines, and identical in both worlds.
//!
//! Arithmetic saturates instead of panicking: a deadline "a very long time from now" is
//! better than a kernel panic when someone asks for `Duration::MAX`.

use core::fmt;
use core::ops::{Add, AddAssign, Sub};
pub use core::time::Duration;

/// A point in time, in nanoseconds since boot (or since the start of a simulation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(pub u64);

/// Converts a duration to whole nanoseconds, saturating at `u64::MAX` (about 584 years).
fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Instant {
    /// Boot (or the start of a simulation).
    pub const ZERO: Instant = Instant(0);
    /// The latest representable instant; adding to it stays there.
    pub const MAX: Instant = Instant(u64::MAX);

    /// An instant `ns` nanoseconds after boot.
    pub const fn from_nanos(ns: u64) -> Self {
        Instant(ns)
    }

    /// Nanoseconds since boot.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Time elapsed from `earlier` to `self`, or zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Instant) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// Time elapsed from `earlier` to `self`, or `None` if `earlier` is later.
    pub fn checked_duration_since(self, earlier: Instant) -> Option<Duration> {
        self.0.checked_sub(earlier.0).map(Duration::from_nanos)
    }

    /// `self + d`, or `None` on overflow.
    pub fn checked_add(self, d: Duration) -> Option<Instant> {
        u64::try_from(d.as_nanos())
            .ok()
            .and_then(|ns| self.0.checked_add(ns))
            .map(Instant)
    }

    /// `self + d`, stopping at [`Instant::MAX`].
    pub fn saturating_add(self, d: Duration) -> Instant {
        Instant(self.0.saturating_add(duration_nanos(d)))
    }

    /// `self - d`, stopping at [`Instant::ZERO`].
    pub fn saturating_sub(self, d: Duration) -> Instant {
        Instant(self.0.saturating_sub(duration_nanos(d)))
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;
    fn add(self, d: Duration) -> Instant {
        self.saturating_add(d)
    }
}

impl AddAssign<Duration> for Instant {
    fn add_assign(&mut self, d: Duration) {
        *self = self.saturating_add(d);
    }
}

impl Sub<Duration> for Instant {
    type Output = Instant;
    fn sub(self, d: Duration) -> Instant {
        self.saturating_sub(d)
    }
}

/// Prints seconds with nanosecond precision, e.g. `1.000250000s`, so log lines from a
/// simulation line up when diffed.
impl fmt::Display for Instant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{:09}s",
            self.0 / 1_000_000_000,
            self.0 % 1_000_000_000
        )
    }
}

/// The error of [`Handle::timeout`](crate::Handle::timeout): the deadline passed before
/// the future completed (the future has been dropped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Elapsed;

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("deadline elapsed")
    }
}

impl core::error::Error for Elapsed {}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn arithmetic_saturates() {
        let t = Instant::from_nanos(5);
        assert_eq!(t + Duration::from_nanos(7), Instant(12));
        assert_eq!(t - Duration::from_nanos(7), Instant::ZERO);
        assert_eq!(Instant::MAX + Duration::from_secs(1), Instant::MAX);
        assert_eq!(t + Duration::MAX, Instant::MAX);
        assert_eq!(t.checked_add(Duration::MAX), None);
        assert_eq!(t.checked_add(Duration::from_nanos(1)), Some(Instant(6)));
        let mut u = t;
        u += Duration::from_micros(1);
        assert_eq!(u, Instant(1005));
    }

    #[test]
    fn durations_between_instants() {
        let a = Instant(1_000);
        let b = Instant(3_500);
        assert_eq!(b.saturating_duration_since(a), Duration::from_nanos(2_500));
        assert_eq!(a.saturating_duration_since(b), Duration::ZERO);
        assert_eq!(a.checked_duration_since(b), None);
        assert!(a < b);
    }

    #[test]
    fn display_is_seconds_with_nanoseconds() {
        assert_eq!(Instant(1_000_250_000).to_string(), "1.000250000s");
        assert_eq!(Instant::ZERO.to_string(), "0.000000000s");
    }
}
