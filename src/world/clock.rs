//! One clock per world: the assistant's "today", the prompt's date, the
//! mini-programs' opening hours, order times and expiries all read the
//! [`Clock`] they were built with, never the machine's clock directly.
//!
//! A clock is either the wall clock or *pinned*: it starts at a fixed
//! instant and runs forward with the monotonic clock, so a test or an
//! evaluation sees the same dates, weekdays and opening hours on any day
//! it runs. Either kind can be moved forward (`/_admin/clock`) to let
//! order statuses advance without sleeping.
//!
//! [`wall_ms`] is the only place the crate reads the machine's date. A
//! test harness calls [`deny_wall_clock`], or sets `ERRAND_DENY_WALL_CLOCK=1`
//! for a whole process tree (`scripts/test.sh` does), so that any code path
//! that still reads it fails loudly instead of making the test depend on
//! the day it runs; the crate's own unit tests deny it from the start.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a world calls "now". Cheap to clone; clones share the offset.
#[derive(Clone)]
pub struct Clock(Arc<Inner>);

struct Inner {
    /// `None`: the wall clock. `Some((t, at))`: `t` Unix ms at monotonic `at`.
    pinned: Option<(i64, Instant)>,
    offset_ms: AtomicI64,
}

impl Clock {
    /// The machine's clock.
    pub fn wall() -> Self {
        Self::new(None)
    }

    /// A clock that reads `unix_ms` now and runs forward from there.
    pub fn pinned(unix_ms: i64) -> Self {
        Self::new(Some((unix_ms, Instant::now())))
    }

    /// `--now`/`ERRAND_NOW` for the command line: pinned at `instant` when
    /// one is given, the wall clock otherwise.
    pub fn from_option(instant: Option<&str>) -> Result<Self, ClockError> {
        Ok(match instant {
            Some(s) => Self::pinned(parse_instant(s)?),
            None => Self::wall(),
        })
    }

    fn new(pinned: Option<(i64, Instant)>) -> Self {
        Self(Arc::new(Inner { pinned, offset_ms: AtomicI64::new(0) }))
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        let base = match self.0.pinned {
            Some((t, at)) => t + at.elapsed().as_millis() as i64,
            None => wall_ms(),
        };
        base + self.0.offset_ms.load(Ordering::Relaxed)
    }

    /// Seconds since the Unix epoch.
    pub fn now_s(&self) -> i64 {
        self.now_ms().div_euclid(1000)
    }

    /// A clock that reads the same now but moves on its own: a pinned
    /// clock stays pinned, a wall clock stays the wall clock plus its
    /// offset. For worlds that must not move each other's time.
    pub fn fork(&self) -> Self {
        match self.0.pinned {
            Some(_) => Self::pinned(self.now_ms()),
            None => {
                let c = Self::wall();
                c.0.offset_ms.store(self.0.offset_ms.load(Ordering::Relaxed), Ordering::Relaxed);
                c
            }
        }
    }

    pub fn is_pinned(&self) -> bool {
        self.0.pinned.is_some()
    }

    /// Moves the clock forward (statuses that advance with time).
    pub fn advance(&self, by: Duration) {
        self.0.offset_ms.fetch_add(by.as_millis() as i64, Ordering::Relaxed);
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::wall()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never reads the time: printing a wall clock must not trip the guard.
        match self.0.pinned {
            Some((t, _)) => write!(f, "Clock(pinned at {t} ms, +{} ms)", self.0.offset_ms.load(Ordering::Relaxed)),
            None => write!(f, "Clock(wall, +{} ms)", self.0.offset_ms.load(Ordering::Relaxed)),
        }
    }
}

static WALL_DENIED: AtomicBool = AtomicBool::new(cfg!(test));

/// From now on, reading the machine's clock panics in this process. Test
/// harnesses call it so that a test whose result could depend on the day
/// it runs fails on every day instead of on some.
pub fn deny_wall_clock() {
    WALL_DENIED.store(true, Ordering::Relaxed);
}

/// Milliseconds since the Unix epoch by the machine's clock: the one read
/// of it in the crate. Everything else asks a [`Clock`].
pub fn wall_ms() -> i64 {
    static FROM_ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let from_env = *FROM_ENV.get_or_init(|| std::env::var_os("ERRAND_DENY_WALL_CLOCK").is_some_and(|v| v == "1"));
    assert!(
        !(from_env || WALL_DENIED.load(Ordering::Relaxed)),
        "the wall clock was read where clocks must be pinned: build this world with Clock::pinned \
         (or --now / ERRAND_NOW) so its result does not depend on the day it runs"
    );
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("`{0}` is not an instant like 2026-11-22T10:00+08:00 (a date, a time, and Z or an offset)")]
pub struct ClockError(pub String);

/// An ISO 8601 instant with an explicit zone, `2026-11-22T10:00+08:00`,
/// `2026-11-22T02:00:30Z`, as Unix milliseconds.
pub fn parse_instant(s: &str) -> Result<i64, ClockError> {
    let bad = || ClockError(s.to_owned());
    let num = |x: &str| x.parse::<i64>().map_err(|_| bad());
    let (date, rest) = s.trim().split_once('T').ok_or_else(bad)?;
    let [y, m, d] = date.split('-').collect::<Vec<_>>()[..] else { return Err(bad()) };
    let month = u32::try_from(num(m)?).map_err(|_| bad())?;
    let day = u32::try_from(num(d)?).map_err(|_| bad())?;
    let days = super::calendar::days_from_civil(num(y)?, month, day).ok_or_else(bad)?;
    let (time, offset_s) = match rest.strip_suffix('Z') {
        Some(t) => (t, 0),
        None => {
            let i = rest.rfind(['+', '-']).ok_or_else(bad)?;
            let (t, off) = rest.split_at(i);
            let sign = if off.starts_with('-') { -1 } else { 1 };
            let (oh, om) = off[1..].split_once(':').ok_or_else(bad)?;
            let (oh, om) = (num(oh)?, num(om)?);
            if !(0..=14).contains(&oh) || !(0..60).contains(&om) {
                return Err(bad());
            }
            (t, sign * (oh * 3600 + om * 60))
        }
    };
    // Seconds may carry up to three decimals (milliseconds).
    let (time, ms) = match time.split_once('.') {
        Some((t, f)) if (1..=3).contains(&f.len()) && f.bytes().all(|b| b.is_ascii_digit()) => (t, num(f)? * 10_i64.pow(3 - f.len() as u32)),
        Some(_) => return Err(bad()),
        None => (time, 0),
    };
    let parts = time.split(':').map(num).collect::<Result<Vec<_>, _>>()?;
    let (h, mi, se) = match parts[..] {
        [h, m] if ms == 0 => (h, m, 0),
        [h, m, s] => (h, m, s),
        _ => return Err(bad()),
    };
    if !(0..24).contains(&h) || !(0..60).contains(&mi) || !(0..60).contains(&se) {
        return Err(bad());
    }
    Ok((days * 86_400 + h * 3600 + mi * 60 + se - offset_s) * 1000 + ms)
}

/// Unix milliseconds as `2026-12-08T04:00:00.250Z`: what [`parse_instant`]
/// reads back (to the second), e.g. to restart a process where its pinned
/// clock had got to.
pub fn format_instant(unix_ms: i64) -> String {
    let (days, ms) = (unix_ms.div_euclid(86_400_000), unix_ms.rem_euclid(86_400_000));
    let (y, m, d) = super::calendar::civil_from_days(days);
    let s = ms / 1000;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", s / 3600, s % 3600 / 60, s % 60, ms % 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_parse_with_their_zone_and_bad_ones_say_what_is_expected() {
        assert_eq!(parse_instant("1970-01-01T00:00Z"), Ok(0));
        assert_eq!(parse_instant("1970-01-01T08:00+08:00"), Ok(0));
        assert_eq!(parse_instant("2026-11-22T10:00:30+08:00"), Ok(1_795_312_830_000));
        assert_eq!(parse_instant("1969-12-31T19:00-05:00"), Ok(0));
        assert_eq!(parse_instant("2026-11-22T02:00:30Z"), Ok(1_795_312_830_000));
        assert_eq!(parse_instant("2026-11-21T21:00:30-05:00"), Ok(1_795_312_830_000));
        assert_eq!(format_instant(1_795_312_830_250), "2026-11-22T02:00:30.250Z");
        assert_eq!(format_instant(-1), "1969-12-31T23:59:59.999Z");
        for ms in [0, -1, 1_795_312_830_250, 1_796_688_000_007] {
            assert_eq!(parse_instant(&format_instant(ms)), Ok(ms));
        }
        assert_eq!(parse_instant("2026-11-22T02:00:30.5Z"), Ok(1_795_312_830_500));
        for bad in ["", "2026-11-22", "2026-11-22T10:00", "2026-13-01T10:00Z", "2026-02-30T10:00Z", "2026-11-22T24:00Z", "2026-11-22T10:00+99:00", "2026-11-22T10:00:00.1234Z", "2026-11-22T10:00.5Z", "tomorrow"] {
            let e = parse_instant(bad).unwrap_err();
            assert!(e.to_string().contains("2026-11-22T10:00+08:00"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_pinned_clock_starts_at_its_instant_and_moves_only_forward() {
        let c = Clock::pinned(1_000_000);
        let t = c.now_ms();
        assert!((1_000_000..1_000_000 + 5_000).contains(&t), "{t}");
        let copy = c.clone();
        c.advance(Duration::from_secs(60));
        assert!(copy.now_ms() >= t + 60_000, "clones share the offset");
        assert!(c.is_pinned() && !Clock::wall().is_pinned());
        let fork = c.fork();
        fork.advance(Duration::from_secs(3600));
        assert!(fork.is_pinned() && fork.now_ms() >= c.now_ms() + 3_500_000, "a fork moves on its own");
        assert!(c.now_ms() < t + 70_000, "…and leaves its origin alone");
        assert_eq!(Clock::from_option(Some("1970-01-01T00:00:01Z")).unwrap().now_s(), 1);
        assert!(Clock::from_option(Some("soon")).is_err());
    }

    #[test]
    #[should_panic(expected = "wall clock was read")]
    fn unit_tests_cannot_read_the_wall_clock() {
        Clock::wall().now_ms();
    }
}
