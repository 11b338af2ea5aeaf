//! Small helpers more than one sandbox service needs, kept in one place so
//! that the services answer alike: JSON request bodies with a 400 that shows
//! the expected shape, trimmed query parameters (`city`, `limit`) with errors
//! the model can act on, and civil-calendar arithmetic for `YYYY-MM-DD`
//! dates (days since 1970-01-01, no time-zone data needed).

use super::cities::{self, City};
use super::core::{json_or_empty, ApiError, ApiResult};
use serde::de::DeserializeOwned;
use std::collections::HashMap;

/// A JSON body (empty means `{}`) into `T`, or a 400 that shows the
/// expected shape.
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8], shape: &str) -> ApiResult<T> {
    let v = json_or_empty(bytes)?;
    serde_json::from_value(v).map_err(|e| ApiError::bad_request(format!("invalid body: {e}; expected {shape}")))
}

/// A query parameter, trimmed; `None` when missing or blank.
pub fn param<'a>(q: &'a HashMap<String, String>, k: &str) -> Option<&'a str> {
    q.get(k).map(|s| s.trim()).filter(|s| !s.is_empty())
}

/// The optional `city` query parameter (a name in any of the three
/// languages), or a 400 listing the known cities.
pub fn city_param(q: &HashMap<String, String>) -> ApiResult<Option<&'static City>> {
    match param(q, "city") {
        Some(c) => Ok(Some(cities::city(c).ok_or_else(|| {
            let known: Vec<&str> = cities::CITIES.iter().map(|c| c.name.en).collect();
            ApiError::bad_request(format!("unknown city '{c}'; known cities: {}", known.join(", ")))
        })?)),
        None => Ok(None),
    }
}

/// The `limit` query parameter: 5 when missing, clamped to 1..=20.
pub fn limit_param(q: &HashMap<String, String>) -> ApiResult<usize> {
    match param(q, "limit") {
        Some(l) => Ok(l
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request(format!("limit must be a number from 1 to 20, not '{l}'")))?
            .clamp(1, 20)),
        None => Ok(5),
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (the usual
/// era/day-of-era arithmetic).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The (year, month, day) of a day number from [`days_from_civil`].
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// A day number as `YYYY-MM-DD`.
pub fn date_text(day: i64) -> String {
    let (y, m, d) = civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}")
}
