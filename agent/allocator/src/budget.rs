//! The allocator's picture of ARM's token buckets for its principal (it is the principal's only
//! caller in cluster mode): a job reserves its expected calls before it starts, is charged what
//! it really sent when it ends, and what ARM reports (`x-ms-ratelimit-remaining-*`) lowers the
//! local count when ARM knows of less.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// One of ARM's buckets: `size` tokens, refilled at `refill_per_sec`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BucketSettings {
    pub size: f64,
    pub refill_per_sec: f64,
}

/// A local mirror of one bucket. Tokens may go below zero when a job cost more than reserved:
/// the debt is paid from the refill before the next job starts.
#[derive(Debug, Clone)]
pub struct Bucket {
    settings: BucketSettings,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn new(settings: BucketSettings, now: Instant) -> Bucket {
        Bucket {
            settings,
            tokens: settings.size,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens =
            (self.tokens + elapsed * self.settings.refill_per_sec).min(self.settings.size);
        self.at = now;
    }

    pub fn tokens(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }

    /// How long until `n` tokens are there (zero: now). A request larger than the bucket waits
    /// for a full bucket.
    pub fn wait_for(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        let n = n.min(self.settings.size);
        if self.tokens >= n {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((n - self.tokens) / self.settings.refill_per_sec)
    }

    pub fn take(&mut self, n: f64, now: Instant) {
        self.refill(now);
        self.tokens -= n;
    }

    /// A job reserved `reserved` and really sent `spent`: give back or charge the difference.
    pub fn settle(&mut self, reserved: f64, spent: f64, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens + reserved - spent).min(self.settings.size);
    }

    /// ARM said `remaining` are left: never believe in more than that.
    pub fn at_most(&mut self, remaining: f64, now: Instant) {
        self.refill(now);
        self.tokens = self.tokens.min(remaining);
    }
}

/// Expected ARM calls of one job.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cost {
    pub reads: f64,
    pub writes: f64,
}

/// The reads and writes buckets together.
#[derive(Debug, Clone)]
pub struct Budget {
    pub reads: Bucket,
    pub writes: Bucket,
}

impl Budget {
    pub fn new(reads: BucketSettings, writes: BucketSettings, now: Instant) -> Budget {
        Budget {
            reads: Bucket::new(reads, now),
            writes: Bucket::new(writes, now),
        }
    }

    /// How long until `cost` can be reserved.
    pub fn wait_for(&mut self, cost: Cost, now: Instant) -> Duration {
        self.reads
            .wait_for(cost.reads, now)
            .max(self.writes.wait_for(cost.writes, now))
    }

    pub fn take(&mut self, cost: Cost, now: Instant) {
        self.reads.take(cost.reads, now);
        self.writes.take(cost.writes, now);
    }

    pub fn settle(&mut self, reserved: Cost, spent: Cost, now: Instant) {
        self.reads.settle(reserved.reads, spent.reads, now);
        self.writes.settle(reserved.writes, spent.writes, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refills_charges_debts_and_believes_arm() {
        let t0 = Instant::now();
        let mut b = Bucket::new(
            BucketSettings {
                size: 10.0,
                refill_per_sec: 2.0,
            },
            t0,
        );
        assert_eq!(b.wait_for(10.0, t0), Duration::ZERO);
        b.take(10.0, t0);
        assert_eq!(b.wait_for(4.0, t0), Duration::from_secs(2));
        // Reserved 1, spent 3: two more owed.
        b.settle(1.0, 3.0, t0);
        assert_eq!(b.wait_for(4.0, t0), Duration::from_secs(3));
        // Never more than the size, however long idle.
        assert_eq!(b.tokens(t0 + Duration::from_secs(100)), 10.0);
        b.at_most(3.0, t0 + Duration::from_secs(100));
        assert_eq!(b.tokens(t0 + Duration::from_secs(100)), 3.0);
        // Larger than the bucket: waits for a full one, not forever.
        assert_eq!(
            b.wait_for(50.0, t0 + Duration::from_secs(100)),
            Duration::from_secs_f64(3.5)
        );
    }
}
