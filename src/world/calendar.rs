//! Calendar arithmetic on day numbers (days since 1970-01-01), proleptic
//! Gregorian, without a date library: the prompt's date, "tomorrow" and
//! weekdays, instants on the command line, and the mini-programs' dates.
//! The one copy: the agent, the prompt, the template, eval and the
//! sandbox services all use it.

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The day number of a date; `None` for a date that does not exist
/// (month 13, February 30).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> Option<i64> {
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    // Reject dates like Feb 31 by a round trip.
    let (_, m2, d2) = civil_from_days(days);
    (m2 == m && d2 == d).then_some(days)
}

/// A day number as `YYYY-MM-DD`.
pub fn date_text(day: i64) -> String {
    let (y, m, d) = civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Why a `YYYY-MM-DD` text is not a day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DateError {
    /// Not of the form `YYYY-MM-DD`.
    Malformed,
    /// Well formed, but no such day (2026-02-30).
    NoSuchDay,
}

/// A strict `YYYY-MM-DD` date (four, two and two digits) as a day number.
pub fn parse_date(s: &str) -> Result<i64, DateError> {
    let parts: Vec<&str> = s.trim().split('-').collect();
    let [y, m, d] = parts[..] else { return Err(DateError::Malformed) };
    let digits = |x: &str, n: usize| x.len() == n && x.bytes().all(|b| b.is_ascii_digit());
    if !(digits(y, 4) && digits(m, 2) && digits(d, 2)) {
        return Err(DateError::Malformed);
    }
    let (y, m, d) = (y.parse().map_err(|_| DateError::Malformed)?, m.parse().map_err(|_| DateError::Malformed)?, d.parse().map_err(|_| DateError::Malformed)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(DateError::Malformed);
    }
    days_from_civil(y, m, d).ok_or(DateError::NoSuchDay)
}

/// `YYYY-M-D`: a four-digit year, and a month and day of one or two
/// digits (`2026-12-9`), as people and small models write dates.
pub fn parse_date_loose(s: &str) -> Result<i64, DateError> {
    let parts: Vec<&str> = s.trim().split('-').collect();
    let [y, m, d] = parts[..] else { return Err(DateError::Malformed) };
    let digits = |x: &str, n: std::ops::RangeInclusive<usize>| n.contains(&x.len()) && x.bytes().all(|b| b.is_ascii_digit());
    if !(digits(y, 4..=4) && digits(m, 1..=2) && digits(d, 1..=2)) {
        return Err(DateError::Malformed);
    }
    let (y, m, d) = (y.parse().map_err(|_| DateError::Malformed)?, m.parse().map_err(|_| DateError::Malformed)?, d.parse().map_err(|_| DateError::Malformed)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(DateError::Malformed);
    }
    days_from_civil(y, m, d).ok_or(DateError::NoSuchDay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_read_strictly_and_written_back() {
        assert_eq!(parse_date("2024-02-29"), days_from_civil(2024, 2, 29).ok_or(DateError::NoSuchDay));
        assert_eq!(parse_date(" 2026-12-08 ").map(date_text), Ok("2026-12-08".to_string()));
        assert_eq!(date_text(0), "1970-01-01");
        assert_eq!(parse_date("2026-02-29"), Err(DateError::NoSuchDay));
        assert_eq!(parse_date("2026-04-31"), Err(DateError::NoSuchDay));
        for bad in ["2026-13-01", "2026-00-10", "2026-1-05", "26-01-05", "2026-01-05x", "2026/01/05", "tomorrow", "", "+026-01-05"] {
            assert_eq!(parse_date(bad), Err(DateError::Malformed), "{bad:?}");
        }
        assert_eq!(parse_date_loose("2026-12-9"), parse_date("2026-12-09"));
        assert_eq!(parse_date_loose("2026-2-30"), Err(DateError::NoSuchDay));
        for bad in ["2026-123-1", "26-1-5", "2026-1-+5", "2026-1", "tomorrow"] {
            assert_eq!(parse_date_loose(bad), Err(DateError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn days_and_dates_round_trip_and_impossible_dates_are_refused() {
        assert_eq!(days_from_civil(1970, 1, 1), Some(0));
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        for day in [-800_000, -1, 0, 11_016, 20_795, 20_880, 1_000_000] {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), Some(day));
        }
        assert_eq!(days_from_civil(2028, 2, 29).map(civil_from_days), Some((2028, 2, 29)));
        assert_eq!(days_from_civil(2026, 2, 29), None);
        assert_eq!(days_from_civil(2026, 13, 1), None);
    }
}
