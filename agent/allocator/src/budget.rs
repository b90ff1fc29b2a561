//! The allocator's picture of ARM's token buckets for its principal (it is the principal's only
//! caller in cluster mode).
//!
//! Each bucket is modelled as ARM keeps it: a level that refills at the bucket's rate up to its
//! size and drops by one for every request the allocator really sent (the Azure client counts
//! them). Jobs reserve their expected calls before they start; what in-flight jobs reserved and
//! have not sent yet is *outstanding*, and a job starts only when the level covers the
//! outstanding calls and its own. Counting reservations against the level, rather than taking
//! them from it at once, matters: a bucket at its size stops refilling, so a job reserved while
//! ARM's bucket was full must not let the local one refill meanwhile (measured: that let 1,000
//! nodes' settle reads bunch into 68 429s).
//!
//! What ARM reports (`x-ms-ratelimit-remaining-*`, plus the refill since and minus what was sent
//! since) lowers the level when ARM knows of less (a caller the allocator does not see).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The share of each bucket that work nobody waits for (a warm-pool top-up, a release) may not
/// spend: below it only nodes with pods waiting, and resolves (a node's agent cannot serve
/// before its identity is known), are started. A quarter, as the agents' own top-up gate uses
/// in per-node mode: at the default plan 60 reads and 47 writes, room for a wave of nodes whose
/// pods wait. When a cluster starts cold, the resolves drain the read bucket within seconds, so
/// a node's first top-up waits, and the pods that reach the node meanwhile join it: one write
/// for both instead of a top-up followed at once by a second write for the pods.
pub const SPARE_RESERVE: f64 = 0.25;

/// One of ARM's buckets: `size` tokens, refilled at `refill_per_sec`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BucketSettings {
    pub size: f64,
    pub refill_per_sec: f64,
}

/// A local model of one bucket.
#[derive(Debug, Clone)]
pub struct Bucket {
    settings: BucketSettings,
    level: f64,
    at: Instant,
    /// The client's count of requests of this kind when the level last took them.
    sent: u64,
}

impl Bucket {
    pub fn new(settings: BucketSettings, now: Instant, sent: u64) -> Bucket {
        Bucket {
            settings,
            level: settings.size,
            at: now,
            sent,
        }
    }

    pub fn refill_per_sec(&self) -> f64 {
        self.settings.refill_per_sec
    }

    /// Refill up to `now` (capped at the size), then take what was sent since.
    pub fn advance(&mut self, now: Instant, sent: u64) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        if now > self.at {
            self.at = now;
        }
        self.level = (self.level + elapsed * self.settings.refill_per_sec).min(self.settings.size);
        self.level -= sent.saturating_sub(self.sent) as f64;
        self.sent = self.sent.max(sent);
    }

    /// The level (may be below zero when more was sent than the bucket held).
    pub fn level(&self) -> f64 {
        self.level
    }

    /// How long until the level covers `outstanding` and `n` more (zero: now; otherwise an
    /// estimate: a full bucket waits for the outstanding calls to be sent). A job larger than
    /// the bucket waits for a full bucket.
    pub fn wait_for(&self, n: f64, outstanding: f64) -> Duration {
        self.wait_for_level(outstanding + n.min(self.settings.size))
    }

    /// As [`Bucket::wait_for`], but the job may not take the bucket below [`SPARE_RESERVE`]
    /// of its size: that part is kept for work pods wait for.
    pub fn wait_for_spare(&self, n: f64, outstanding: f64) -> Duration {
        let reserve = self.settings.size * SPARE_RESERVE;
        self.wait_for_level(outstanding + (n + reserve).min(self.settings.size))
    }

    fn wait_for_level(&self, need: f64) -> Duration {
        if self.level >= need {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((need - self.level) / self.settings.refill_per_sec)
    }

    /// ARM said the level is at most `level`: never believe in more.
    pub fn at_most(&mut self, level: f64) {
        self.level = self.level.min(level);
    }
}

/// Expected ARM calls of one job.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cost {
    pub reads: f64,
    pub writes: f64,
}

impl Cost {
    pub fn add(&mut self, other: Cost) {
        self.reads += other.reads;
        self.writes += other.writes;
    }
}

/// The reads and writes buckets together.
#[derive(Debug, Clone)]
pub struct Budget {
    pub reads: Bucket,
    pub writes: Bucket,
}

impl Budget {
    pub fn new(reads: BucketSettings, writes: BucketSettings, now: Instant, sent: Cost) -> Budget {
        Budget {
            reads: Bucket::new(reads, now, sent.reads as u64),
            writes: Bucket::new(writes, now, sent.writes as u64),
        }
    }

    pub fn advance(&mut self, now: Instant, sent_reads: u64, sent_writes: u64) {
        self.reads.advance(now, sent_reads);
        self.writes.advance(now, sent_writes);
    }

    /// How long until `cost` can start beside the `outstanding` calls of the jobs in flight.
    pub fn wait_for(&self, cost: Cost, outstanding: Cost) -> Duration {
        self.reads
            .wait_for(cost.reads, outstanding.reads)
            .max(self.writes.wait_for(cost.writes, outstanding.writes))
    }

    /// As [`Budget::wait_for`] for work nobody waits for: it leaves [`SPARE_RESERVE`] of each
    /// bucket untouched.
    pub fn wait_for_spare(&self, cost: Cost, outstanding: Cost) -> Duration {
        self.reads
            .wait_for_spare(cost.reads, outstanding.reads)
            .max(self.writes.wait_for_spare(cost.writes, outstanding.writes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(t0: Instant) -> Bucket {
        Bucket::new(
            BucketSettings {
                size: 10.0,
                refill_per_sec: 2.0,
            },
            t0,
            0,
        )
    }

    #[test]
    fn the_level_refills_to_the_size_and_takes_what_was_sent() {
        let t0 = Instant::now();
        let mut b = bucket(t0);
        assert_eq!(b.wait_for(10.0, 0.0), Duration::ZERO);
        b.advance(t0, 10);
        assert_eq!(b.wait_for(4.0, 0.0), Duration::from_secs(2));
        // Three more sent than the bucket held: owed from the refill.
        b.advance(t0, 13);
        assert_eq!(b.level(), -3.0);
        assert_eq!(b.wait_for(1.0, 0.0), Duration::from_secs(2));
        // Never more than the size, however long idle.
        b.advance(t0 + Duration::from_secs(100), 13);
        assert_eq!(b.level(), 10.0);
        b.at_most(3.0);
        assert_eq!(b.level(), 3.0);
        // Larger than the bucket: waits for a full one, not forever.
        assert_eq!(b.wait_for(50.0, 0.0), Duration::from_secs_f64(3.5));
    }

    #[test]
    fn spare_work_leaves_a_quarter_of_the_bucket_to_work_pods_wait_for() {
        let t0 = Instant::now();
        let mut b = bucket(t0);
        // Full (10): a job of 2 fits either way.
        assert_eq!(b.wait_for_spare(2.0, 0.0), Duration::ZERO);
        // Level 4, reserve 2.5: a job of 2 fits only if pods wait for it.
        b.advance(t0, 6);
        assert_eq!(b.wait_for(2.0, 0.0), Duration::ZERO);
        assert_eq!(b.wait_for_spare(2.0, 0.0), Duration::from_secs_f64(0.25));
        // Outstanding reservations count against the spare part too.
        assert_eq!(b.wait_for_spare(1.0, 1.0), Duration::from_secs_f64(0.25));
        // Never more than the bucket's size.
        assert_eq!(b.wait_for_spare(50.0, 0.0), Duration::from_secs(3));
    }

    #[test]
    fn reservations_of_jobs_in_flight_count_against_a_full_bucket() {
        let t0 = Instant::now();
        let mut b = bucket(t0);
        // Eight reserved while the bucket was full; none sent yet. Idle time does not refill a
        // full bucket, so after 10 s only two more fit, as at ARM.
        b.advance(t0 + Duration::from_secs(10), 0);
        assert_eq!(b.wait_for(2.0, 8.0), Duration::ZERO);
        assert_eq!(b.wait_for(3.0, 8.0), Duration::from_secs_f64(0.5));
        // The eight are sent: the level drops, the outstanding count with it.
        b.advance(t0 + Duration::from_secs(10), 8);
        assert_eq!(b.wait_for(2.0, 0.0), Duration::ZERO);
        assert_eq!(b.wait_for(3.0, 0.0), Duration::from_secs_f64(0.5));
    }
}
