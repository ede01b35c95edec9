//! Rate limits on what a stranger can make the portal do without proving anything:
//! challenge creation (a row each) and the pay page (a lookup each). Per key (an order,
//! a serial, a client address), at most `per_minute` in any fixed minute window; kept in
//! memory per instance (N instances allow N times as much: the database bounds what
//! matters across instances, e.g. outstanding challenges per order).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Entries kept before idle ones are dropped.
const PRUNE_AT: usize = 50_000;

/// A fixed-window counter per key.
#[derive(Debug)]
pub struct RateLimiter {
    per_minute: u32,
    windows: Mutex<HashMap<String, (Instant, u32)>>,
}

impl RateLimiter {
    /// At most `per_minute` a minute per key; 0: no limit.
    pub fn new(per_minute: u32) -> RateLimiter {
        RateLimiter {
            per_minute,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one use of `key`: `Err(seconds)` to wait when over the limit.
    pub fn check(&self, key: &str) -> Result<(), u64> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let window = Duration::from_secs(60);
        let now = Instant::now();
        let mut map = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= PRUNE_AT {
            map.retain(|_, (start, _)| now.duration_since(*start) < window);
        }
        let entry = map.entry(key.to_owned()).or_insert((now, 0));
        if now.duration_since(entry.0) >= window {
            *entry = (now, 0);
        }
        if entry.1 >= self.per_minute {
            let left = window.saturating_sub(now.duration_since(entry.0));
            return Err(left.as_secs().max(1));
        }
        entry.1 += 1;
        Ok(())
    }
}

/// The limits of one portal instance.
#[derive(Debug)]
pub struct Limits {
    /// Per order id (challenges) or serial (pay page).
    pub per_subject: RateLimiter,
    /// Per client IP address.
    pub per_address: RateLimiter,
}

impl Limits {
    /// `per_subject` and `per_address` a minute (0: none).
    pub fn new(per_subject: u32, per_address: u32) -> Limits {
        Limits {
            per_subject: RateLimiter::new(per_subject),
            per_address: RateLimiter::new(per_address),
        }
    }

    /// Both limits for one request on `route` about `subject` from `address`.
    pub fn check(&self, route: &str, subject: &str, address: Option<&str>) -> Result<(), u64> {
        self.per_subject.check(&format!("{route}:{subject}"))?;
        if let Some(a) = address {
            self.per_address.check(&format!("{route}@{a}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_over_its_limit_waits_and_others_do_not() {
        let l = RateLimiter::new(3);
        for _ in 0..3 {
            l.check("a").unwrap();
        }
        let wait = l.check("a").unwrap_err();
        assert!((1..=60).contains(&wait), "{wait}");
        l.check("b").unwrap();
        assert!(RateLimiter::new(0).check("a").is_ok());
    }
}
