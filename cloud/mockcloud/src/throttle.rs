//! ARM's request throttling: token buckets per principal for reads and writes (documented since
//! 2024: reads bucket 250 refilling 25/s, writes 200 refilling 10/s), so a client that bursts
//! gets 429 with `Retry-After` as on Azure, and every answer reports what is left.

use std::collections::HashMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bucket {
    pub size: u32,
    pub refill_per_sec: f64,
}

/// Bucket sizes and refill rates (`--rate-limits` JSON).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimits {
    pub reads: Bucket,
    pub writes: Bucket,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            reads: Bucket {
                size: 250,
                refill_per_sec: 25.0,
            },
            writes: Bucket {
                size: 200,
                refill_per_sec: 10.0,
            },
        }
    }
}

impl RateLimits {
    pub fn from_json(text: &str) -> Result<RateLimits, String> {
        let limits: RateLimits = serde_json::from_str(text).map_err(|e| e.to_string())?;
        for (name, b) in [("reads", limits.reads), ("writes", limits.writes)] {
            if b.size == 0 || b.refill_per_sec.is_nan() || b.refill_per_sec <= 0.0 {
                return Err(format!("{name}: size and refill_per_sec must be positive"));
            }
        }
        Ok(limits)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Read,
    Write,
}

impl Kind {
    /// The header that reports this bucket.
    pub fn header(self) -> &'static str {
        match self {
            Kind::Read => "x-ms-ratelimit-remaining-subscription-reads",
            Kind::Write => "x-ms-ratelimit-remaining-subscription-writes",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Read => "read",
            Kind::Write => "write",
        }
    }
}

#[derive(Debug)]
struct State {
    tokens: f64,
    at: Instant,
}

#[derive(Debug, Default)]
pub struct Limiter {
    limits: RateLimits,
    buckets: HashMap<(String, Kind), State>,
}

impl Limiter {
    pub fn new(limits: RateLimits) -> Limiter {
        Limiter {
            limits,
            buckets: HashMap::new(),
        }
    }

    /// Takes one token: `Ok(remaining)` or `Err(seconds until a token is back)`.
    pub fn take(&mut self, principal: &str, kind: Kind, now: Instant) -> Result<u32, u64> {
        let bucket = match kind {
            Kind::Read => self.limits.reads,
            Kind::Write => self.limits.writes,
        };
        let state = self
            .buckets
            .entry((principal.to_string(), kind))
            .or_insert(State {
                tokens: f64::from(bucket.size),
                at: now,
            });
        let elapsed = now.saturating_duration_since(state.at).as_secs_f64();
        state.tokens = (state.tokens + elapsed * bucket.refill_per_sec).min(f64::from(bucket.size));
        state.at = now;
        if state.tokens < 1.0 {
            let wait = ((1.0 - state.tokens) / bucket.refill_per_sec).ceil() as u64;
            return Err(wait.max(1));
        }
        state.tokens -= 1.0;
        Ok(state.tokens.floor() as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_bucket_empties_then_refills() {
        let mut l = Limiter::new(RateLimits {
            reads: Bucket {
                size: 2,
                refill_per_sec: 1.0,
            },
            ..RateLimits::default()
        });
        let t = Instant::now();
        assert_eq!(l.take("a", Kind::Read, t), Ok(1));
        assert_eq!(l.take("a", Kind::Read, t), Ok(0));
        assert_eq!(l.take("a", Kind::Read, t), Err(1));
        // Per principal and per kind.
        assert_eq!(l.take("b", Kind::Read, t), Ok(1));
        assert_eq!(l.take("a", Kind::Write, t), Ok(199));
        assert_eq!(l.take("a", Kind::Read, t + Duration::from_secs(1)), Ok(0));
    }
}
