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
//! A write's settle reads (the operation poll, the NIC done) cannot come before the operation's
//! `Retry-After` has passed, so they count as due then, not at once: what refills until then
//! pays for them (never past the bucket's size). How soon they come is learned from the jobs'
//! own calls (the shortest of the latest delays; until one is seen, they count as due at once).
//! Without that, the last writes of a read-bound burst start only once their settle reads are in
//! the bucket already, a write's duration later than the budget needs.
//!
//! What ARM reports (`x-ms-ratelimit-remaining-*`, plus the refill since and minus what was sent
//! since) lowers the level when ARM knows of less (a caller the allocator does not see).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The share of each bucket that work nobody waits for (a warm-pool top-up, a release) may not
/// spend: below it only nodes with pods waiting, and resolves (a node's agent cannot serve
/// before its identity is known), are started. A quarter, as the agents' own top-up gate uses
/// in per-node mode: at the default plan 60 reads and 47.5 writes, room for a wave of nodes whose
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
        self.wait_for_reserving(n, outstanding, 0.0)
    }

    /// As [`Bucket::wait_for`], but the job may not take the bucket below [`SPARE_RESERVE`]
    /// of its size: that part is kept for work pods wait for.
    pub fn wait_for_spare(&self, n: f64, outstanding: f64) -> Duration {
        self.wait_for_reserving(n, outstanding, self.spare_reserve())
    }

    /// The part of the bucket work nobody waits for leaves untouched.
    pub fn spare_reserve(&self) -> f64 {
        self.settings.size * SPARE_RESERVE
    }

    /// `n` tokens at once beside `outstanding`, keeping `reserve`; a job larger than the rest of
    /// the bucket waits for a full one.
    fn wait_for_reserving(&self, n: f64, outstanding: f64, reserve: f64) -> Duration {
        let n = n.min(self.settings.size - reserve);
        self.wait_for_dues(outstanding + n, &[], reserve)
    }

    /// How long until `now` tokens can be taken at once and, besides, each of `later`'s amounts
    /// when it falls due (seconds from now), leaving `reserve` in the bucket throughout. What
    /// refills before a due time counts towards it, never past the bucket's size.
    pub fn wait_for_dues(&self, now: f64, later: &[(f64, f64)], reserve: f64) -> Duration {
        let rate = self.settings.refill_per_sec;
        let mut short = (now + reserve - self.level).max(0.0);
        let base = self.level - now;
        let mut later = later.to_vec();
        later.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut due = 0.0;
        for (at, amount) in later {
            due += amount;
            let available = (base + rate * at.max(0.0)).min(self.settings.size) - reserve;
            short = short.max(due - available);
        }
        Duration::from_secs_f64(short.max(0.0) / rate)
    }

    /// Empty from `now` on: it refills at its rate.
    pub fn empty(&mut self, now: Instant) {
        self.advance(now, self.sent);
        self.level = self.level.min(0.0);
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
    /// Of `reads`, those that follow the job's write (its settle reads: they cannot be sent
    /// before the write's operation is polled, `Retry-After` after the write).
    pub settle_reads: f64,
}

impl Cost {
    pub fn add(&mut self, other: Cost) {
        self.reads += other.reads;
        self.writes += other.writes;
        self.settle_reads += other.settle_reads;
    }

    /// The reads due at once (before the write).
    pub fn first_reads(&self) -> f64 {
        (self.reads - self.settle_reads).max(0.0)
    }
}

/// What the jobs under way still owe the read bucket: at once, and later (the settle reads,
/// with how many seconds from now they may fall due).
#[derive(Debug, Clone, Default)]
pub struct ReadDues {
    pub now: f64,
    pub later: Vec<(f64, f64)>,
}

/// How soon after a write each of its settle reads may come (the k-th poll no sooner than
/// `delays[k]`; polls past the last known one no sooner than it). Empty: at once.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SettleTiming {
    pub delays: Vec<Duration>,
}

impl SettleTiming {
    pub fn at(&self, k: usize) -> Duration {
        self.delays
            .get(k)
            .or(self.delays.last())
            .copied()
            .unwrap_or(Duration::ZERO)
    }

    /// `n` settle reads of a write sent `since` seconds ago, the first `first` of them already
    /// sent: each remaining read by when it falls due, in seconds from now.
    pub fn dues(&self, n: f64, first: usize, since: f64, out: &mut Vec<(f64, f64)>) {
        let mut left = n;
        let mut k = first;
        while left > 1e-9 {
            let amount = left.min(1.0);
            out.push(((self.at(k).as_secs_f64() - since).max(0.0), amount));
            left -= amount;
            k += 1;
        }
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

    /// Both buckets empty from `now` on (a new leader does not know what the one before it
    /// spent).
    pub fn empty(&mut self, now: Instant) {
        self.reads.empty(now);
        self.writes.empty(now);
    }

    pub fn advance(&mut self, now: Instant, sent_reads: u64, sent_writes: u64) {
        self.reads.advance(now, sent_reads);
        self.writes.advance(now, sent_writes);
    }

    /// How long until a job of `cost` can start beside the jobs under way, counting the read
    /// bucket's refill until each settle read falls due: a write's settle reads come no sooner
    /// than `settle` says (learned from what jobs did; when not known yet, every read counts as
    /// due at once). `outstanding` is the jobs' total still owed (writes from
    /// it), `dues` the same reads by when they fall due. `spare`: work nobody waits for, which
    /// leaves [`SPARE_RESERVE`] of each bucket untouched.
    pub fn wait_for_job(
        &self,
        cost: Cost,
        outstanding: Cost,
        dues: &ReadDues,
        settle: &SettleTiming,
        spare: bool,
    ) -> Duration {
        let size = self.reads.settings.size;
        let reads_reserve = if spare {
            self.reads.spare_reserve()
        } else {
            0.0
        };
        // A job larger than the bucket waits for a full bucket, as in `wait_for`.
        let fit = ((size - reads_reserve) / cost.reads.max(f64::MIN_POSITIVE)).min(1.0);
        let mut later = dues.later.clone();
        settle.dues(cost.settle_reads * fit, 0, 0.0, &mut later);
        let reads =
            self.reads
                .wait_for_dues(dues.now + cost.first_reads() * fit, &later, reads_reserve);
        let writes = if spare {
            self.writes.wait_for_spare(cost.writes, outstanding.writes)
        } else {
            self.writes.wait_for(cost.writes, outstanding.writes)
        };
        reads.max(writes)
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
    fn settle_reads_count_the_refill_until_they_fall_due() {
        let t0 = Instant::now();
        let mut b = bucket(t0);
        b.advance(t0, 8);
        // Level 2, refill 2/s. Four reads at once: 1 s short.
        assert_eq!(b.wait_for_dues(4.0, &[], 0.0), Duration::from_secs(1));
        // Two at once and two due in 1 s (refilled by then): nothing to wait for.
        assert_eq!(b.wait_for_dues(2.0, &[(1.0, 2.0)], 0.0), Duration::ZERO);
        // Due sooner, 0.5 s: 1 refilled by then, 1 short (0.5 s).
        assert_eq!(
            b.wait_for_dues(2.0, &[(0.5, 2.0)], 0.0),
            Duration::from_secs_f64(0.5)
        );
        // Dues add up in order: 2 by 1 s, 4 more by 2 s (6 refilled by then): 0 short, then 0.
        assert_eq!(
            b.wait_for_dues(0.0, &[(2.0, 4.0), (1.0, 2.0)], 0.0),
            Duration::ZERO
        );
        // The refill never counts past the bucket's size (10): 12 due in 100 s is 1 s short.
        assert_eq!(
            b.wait_for_dues(0.0, &[(100.0, 12.0)], 0.0),
            Duration::from_secs(1)
        );
        // A reserve stays untouched throughout.
        assert_eq!(
            b.wait_for_dues(2.0, &[(1.0, 2.0)], 1.0),
            Duration::from_secs_f64(0.5)
        );
    }

    #[test]
    fn a_job_starts_when_its_settle_reads_will_have_refilled_and_not_before() {
        let t0 = Instant::now();
        let settings = BucketSettings {
            size: 10.0,
            refill_per_sec: 2.0,
        };
        let mut budget = Budget::new(settings, settings, t0, Cost::default());
        budget.advance(t0, 9, 0);
        let job = Cost {
            reads: 3.0,
            writes: 1.0,
            settle_reads: 2.0,
        };
        let none = ReadDues::default();
        // Level 1: the first read fits now; the two settle reads only if they come 0.5 s later.
        let after = |ms: &[u64]| SettleTiming {
            delays: ms.iter().map(|&ms| Duration::from_millis(ms)).collect(),
        };
        let wait = |settle_ms| {
            budget.wait_for_job(job, Cost::default(), &none, &after(&[settle_ms]), false)
        };
        assert_eq!(wait(0), Duration::from_secs(1));
        assert_eq!(wait(500), Duration::from_secs_f64(0.5));
        assert_eq!(wait(1000), Duration::ZERO);
        // Another job's settle reads due first take that refill.
        let busy = ReadDues {
            now: 0.0,
            later: vec![(0.5, 1.0)],
        };
        assert_eq!(
            budget.wait_for_job(job, Cost::default(), &busy, &after(&[1000]), false),
            Duration::from_secs_f64(0.5)
        );
        // Work nobody waits for keeps the reserve (2.5 of 10) as well.
        assert_eq!(
            budget.wait_for_job(job, Cost::default(), &none, &after(&[1000]), true),
            Duration::from_secs_f64(1.25)
        );
        // Polls a second apart: the second settle read refills a second longer.
        assert_eq!(
            budget.wait_for_job(job, Cost::default(), &none, &after(&[500, 1500]), false),
            Duration::ZERO
        );
        assert_eq!(
            budget.wait_for_job(job, Cost::default(), &none, &after(&[]), false),
            Duration::from_secs(1),
            "not known: at once"
        );
    }

    #[test]
    fn settle_reads_fall_due_poll_by_poll() {
        let timing = SettleTiming {
            delays: vec![Duration::from_secs(2), Duration::from_secs(3)],
        };
        let mut out = Vec::new();
        // 2.5 reads of a write sent 0.5 s ago, none sent yet: 1 at 1.5 s, 1 at 2.5 s, 0.5 at
        // 2.5 s (a third poll no sooner than the last known).
        timing.dues(2.5, 0, 0.5, &mut out);
        assert_eq!(out, [(1.5, 1.0), (2.5, 1.0), (2.5, 0.5)]);
        // One sent already, 4 s after the write: the rest is due at once.
        out.clear();
        timing.dues(1.0, 1, 4.0, &mut out);
        assert_eq!(out, [(0.0, 1.0)]);
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
