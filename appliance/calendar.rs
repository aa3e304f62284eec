//! UTC calendar dates from Unix time, for log lines about the wall clock (the host sets it
//! through the time-synchronization integration service). Proleptic Gregorian calendar,
//! days-from-civil arithmetic in the style of H. Hinnant's public-domain algorithms.

/// `YYYY-MM-DDTHH:MM:SSZ` for `unix_secs` seconds after 1970-01-01T00:00:00Z. Years past
/// 9999 are clamped to 9999-12-31T23:59:59Z so the text keeps its fixed width.
pub fn format_utc(unix_secs: u64) -> [u8; 20] {
    const MAX: u64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let t = unix_secs.min(MAX);
    let days = t / 86_400;
    let secs = t % 86_400;
    let (y, m, d) = civil_from_days(days);
    let mut out = *b"0000-00-00T00:00:00Z";
    put(&mut out[0..4], y);
    put(&mut out[5..7], m);
    put(&mut out[8..10], d);
    put(&mut out[11..13], secs / 3600);
    put(&mut out[14..16], secs / 60 % 60);
    put(&mut out[17..19], secs % 60);
    out
}

fn put(dst: &mut [u8], mut v: u64) {
    for b in dst.iter_mut().rev() {
        *b = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// (year, month 1..=12, day 1..=31) of the day `days` after 1970-01-01.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shift the epoch to 0000-03-01 so leap days fall at the end of each 400-year era.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(t: u64) -> std::string::String {
        std::string::String::from_utf8(format_utc(t).to_vec()).unwrap()
    }

    #[test]
    fn known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_709_164_799), "2024-02-28T23:59:59Z");
        assert_eq!(utc(1_709_164_800), "2024-02-29T00:00:00Z");
        assert_eq!(utc(4_107_542_400), "2100-03-01T00:00:00Z");
        assert_eq!(utc(1_795_867_200), "2026-11-28T12:00:00Z");
    }

    #[test]
    fn far_future_is_clamped() {
        assert_eq!(utc(u64::MAX), "9999-12-31T23:59:59Z");
        assert_eq!(utc(253_402_300_799), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn every_day_follows_the_previous_one() {
        // Walk 1970..2400 day by day: the date must advance by exactly one calendar day.
        let (mut py, mut pm, mut pd) = civil_from_days(0);
        for day in 1..157_000u64 {
            let (y, m, d) = civil_from_days(day);
            let next = if d == pd + 1 && m == pm && y == py {
                true
            } else {
                d == 1 && ((m == pm + 1 && y == py) || (m == 1 && pm == 12 && y == py + 1))
            };
            assert!(next, "day {day}: {py}-{pm}-{pd} -> {y}-{m}-{d}");
            if d == 1 {
                let leap = (py % 4 == 0 && py % 100 != 0) || py % 400 == 0;
                let len = [
                    31,
                    if leap { 29 } else { 28 },
                    31,
                    30,
                    31,
                    30,
                    31,
                    31,
                    30,
                    31,
                    30,
                    31,
                ];
                assert_eq!(pd, len[pm as usize - 1], "month {py}-{pm} length");
            }
            (py, pm, pd) = (y, m, d);
        }
    }
}
