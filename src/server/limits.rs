//! Per-caller rate limits: a token bucket per user or app, refilled
//! continuously. A refusal says how long to wait.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct RateLimiter {
    per_minute: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(per_minute: u32) -> Self {
        Self { per_minute: per_minute.max(1) as f64, buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one request from `who`'s bucket, or says how long until one is free.
    pub fn take(&self, who: &str) -> Result<(), Duration> {
        self.take_at(who, Instant::now())
    }

    fn take_at(&self, who: &str, now: Instant) -> Result<(), Duration> {
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let cap = self.per_minute;
        let e = b.entry(who.to_owned()).or_insert((cap, now));
        let refill = now.saturating_duration_since(e.1).as_secs_f64() * cap / 60.0;
        e.0 = (e.0 + refill).min(cap);
        e.1 = now;
        if e.0 >= 1.0 {
            e.0 -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - e.0) * 60.0 / cap))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_cut_and_refills_over_time_per_caller() {
        let r = RateLimiter::new(3);
        let t = Instant::now();
        for _ in 0..3 {
            r.take_at("a", t).unwrap();
        }
        let wait = r.take_at("a", t).unwrap_err();
        assert!(wait.as_secs_f64() > 19.0 && wait.as_secs_f64() <= 20.0, "{wait:?}");
        r.take_at("b", t).unwrap();
        r.take_at("a", t + Duration::from_secs(20)).unwrap();
        assert!(r.take_at("a", t + Duration::from_secs(20)).is_err());
    }
}
