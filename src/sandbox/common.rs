//! Small helpers more than one sandbox service needs, kept in one place so
//! that the services answer alike: JSON request bodies with a 400 that shows
//! the expected shape, and trimmed query parameters (`city`, `limit`) with
//! errors the model can act on. (Dates: [`crate::world::calendar`].)

use crate::world::cities::{self, City};
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

