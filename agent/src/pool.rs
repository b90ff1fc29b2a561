//! Pool sizing: pure decisions from counts, settings and a clock, so every rule has a table test.
//!
//! Rules, in order:
//! 1. One cloud write at a time: while one is in flight, wait (its result changes the counts;
//!    requests that arrive meanwhile are served together by the next write — coalescing).
//! 2. Above the cap (configuration lowered): shrink free addresses down to the cap.
//! 3. Grow when waiting allocations outnumber free addresses, or when free plus cooling-down
//!    addresses are fewer than `warm`. Addresses in cooldown count towards `warm` because they
//!    come back on their own; counting them as gone would make every pod churn a cloud write. A
//!    waiting allocation never waits for a cooldown, though. The step is rounded up to a multiple
//!    of `batch` and clipped to the cap (`max`, and the NIC's 255 secondary addresses).
//! 4. During a back-off (after `SubnetIsFull` or a failed write) nothing grows.
//!    Known demand (pods scheduled to the node, not yet here) adds to `warm`.
//! 5. Shrink only after free addresses have stayed above `warm + batch` for `release_delay`
//!    without interruption (hysteresis), and then by whole batches, never below `warm`.
//!
//! Around a growth, two rules decide *when* it leaves (see [`gather_until`] and
//! [`top_up_yield`]):
//! - **Gather**: a growth for waiting allocations waits until no new allocation has arrived for
//!   a quiet gap (short for a lone waiter, longer once a burst shows), at most [`GATHER`]`.max`
//!   after the first waiter, so a burst that is still arriving is served by one write sized to
//!   all of it.
//! - **Yield**: a top-up (growth with nobody waiting and no known demand) steps back when the
//!   subscription's remaining write budget is low, so nodes with pods waiting write first.

use std::time::Duration;

use crate::config::NIC_SECONDARY_LIMIT;

/// How long demand may gather before a write for waiting allocations leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gather {
    /// A lone waiter's write leaves once nobody else has come for this long.
    pub quiet_first: Duration,
    /// Once a second allocation has come (a burst), the write leaves once no new one has come
    /// for this long.
    pub quiet_burst: Duration,
    /// ... and at the latest this long after the first waiter, however demand keeps coming.
    pub max: Duration,
}

/// A burst of ADDs reaches the agent as one CNI process per pod (runtime, plugin, socket). In the
/// lab's cold burst (100 pods, 2 loaded cores, debug binaries) they arrived over 520 ms, mostly a
/// few ms apart but with stalls of up to 95 ms while the CPUs were busy elsewhere. A lone ADD
/// pays only `quiet_first`, 30 ms: ~1% of the lab's 3 s NIC write, ~0.3% of one on Azure (NRP's
/// operations answer `Retry-After: 10`). Once a second ADD shows a burst is under way, the window
/// tolerates 150 ms stalls, 5% of the write a missed pod would otherwise wait for. The 1 s cap
/// bounds what a steady trickle can add: less than one write, which is what gathering saves. An
/// ADD that finds a free address never gathers.
pub const GATHER: Gather = Gather {
    quiet_first: Duration::from_millis(30),
    quiet_burst: Duration::from_millis(150),
    max: Duration::from_secs(1),
};

impl Gather {
    /// The window for an agent whose allocations wait at most `allocate_timeout`: gathering may
    /// take a tenth of that at most, so a short configured wait is not spent gathering (at the
    /// default 30 s the cap stays 1 s).
    pub fn within(&self, allocate_timeout: Duration) -> Gather {
        let max = self.max.min(allocate_timeout / 10);
        Gather {
            quiet_first: self.quiet_first.min(max),
            quiet_burst: self.quiet_burst.min(max),
            max,
        }
    }
}

/// While a write for waiters gathers (first waiter seen at `started`, `arrivals` more since, the
/// latest at `last_arrival`): the instant to wait until, or `None` when the write leaves now.
pub fn gather_until(
    g: &Gather,
    started: Duration,
    last_arrival: Duration,
    arrivals: u32,
    now: Duration,
) -> Option<Duration> {
    let quiet = if arrivals == 0 {
        g.quiet_first
    } else {
        g.quiet_burst
    };
    let until = (last_arrival.max(started) + quiet).min(started + g.max);
    (now < until).then_some(until)
}

/// What ARM last reported about the subscription's write budget, as one node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteBudget {
    /// `x-ms-ratelimit-remaining-subscription-writes` of the latest write.
    pub remaining: u64,
    /// The bucket's size as far as this node can tell: the largest remaining it has seen plus
    /// the write that reading answered, at least [`WRITE_BUCKET_MIN`].
    pub bucket: u64,
}

/// The smallest bucket assumed: one reading taken after other nodes drained the bucket must not
/// make "low" mean almost nothing.
pub const WRITE_BUCKET_MIN: u64 = 20;

/// ARM's documented refill of the writes bucket (per principal, per second).
pub const WRITE_REFILL_PER_SEC: f64 = 10.0;

impl WriteBudget {
    /// Below a quarter of the bucket the budget is low. The rest of the bucket is headroom for
    /// writes that pods wait for: at ARM's documented sizes (200 writes, refilling 10/s) a
    /// quarter is 50 writes, five seconds of refill, enough for a wave of waiter-driven writes
    /// from 50 nodes before the client's pacing floor slows everyone down. A top-up defers
    /// nothing anyone waits for, so it steps back first.
    pub fn low_mark(&self) -> u64 {
        self.bucket.max(WRITE_BUCKET_MIN) / 4
    }
}

/// Whether a `Grow` decided from `c` is a top-up: nobody waits and no pod is known to be coming.
pub fn is_top_up(c: &Counts) -> bool {
    c.waiters == 0 && c.demand == 0
}

/// How long a top-up steps back for, or `None` when it may go ahead: growths for waiters or
/// known demand never yield; a top-up yields while the remaining write budget is below
/// [`WriteBudget::low_mark`], for the time the bucket takes to refill to that mark at ARM's
/// documented rate (at least a second), stretched by `jitter` (0..1: up to twice as long) so the
/// nodes that saw the same low budget do not all come back at once.
pub fn top_up_yield(c: &Counts, budget: Option<WriteBudget>, jitter: f64) -> Option<Duration> {
    let budget = budget?;
    if !is_top_up(c) || budget.remaining >= budget.low_mark() {
        return None;
    }
    let missing = (budget.low_mark() - budget.remaining) as f64;
    let refill = (missing / WRITE_REFILL_PER_SEC).max(1.0);
    Some(Duration::from_secs_f64(
        refill * (1.0 + jitter.clamp(0.0, 1.0)),
    ))
}

/// Whether a `Grow` decided from `c` waits: `Some(until)` while a top-up steps back for a low
/// write budget. When a postponement ends, the next top-up goes ahead without looking at the
/// budget again: the reading is as old as this node's last write, and only a write brings a
/// fresh one (the client's own pacing still applies to it). A growth for waiters or demand
/// ends any postponement.
pub fn top_up_gate(
    c: &Counts,
    m: &mut Memory,
    remaining_writes: Option<u64>,
    jitter: f64,
    now: Duration,
) -> Option<Duration> {
    if let Some(r) = remaining_writes {
        m.write_bucket_seen = m.write_bucket_seen.max(r.saturating_add(1));
    }
    if !is_top_up(c) {
        m.top_up_after = None;
        return None;
    }
    if let Some(until) = m.top_up_after {
        if now < until {
            return Some(until);
        }
        m.top_up_after = None;
        return None;
    }
    let budget = remaining_writes.map(|remaining| WriteBudget {
        remaining,
        bucket: m.write_bucket_seen,
    });
    let until = now + top_up_yield(c, budget, jitter)?;
    m.top_up_after = Some(until);
    Some(until)
}

/// What the pool holds right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Addresses on the NIC owned by the pool (allocated, free and cooling down).
    pub total: u32,
    pub free: u32,
    pub cooldown: u32,
    /// Requested from the cloud, not yet confirmed.
    pub pending: u32,
    /// Allocation requests waiting for an address.
    pub waiters: u32,
    /// Out of the pool but still on the NIC until the cloud confirms their removal: they hold
    /// NIC slots, so they count against the cap and the NIC limit.
    pub releasing: u32,
    /// Pods known to be on their way to this node without an address yet (from the Kubernetes
    /// pod watch, when there is one): the pool grows ahead of them.
    pub demand: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub warm: u32,
    pub batch: u32,
    pub max: u32,
    pub release_delay: Duration,
    /// What one ipConfiguration holds: 32 (an address), or a block's length (prefix mode).
    pub prefix_len: u8,
}

impl Settings {
    /// In prefix mode `max` is rounded up to whole blocks, and the NIC holds 255 blocks.
    pub fn cap(&self) -> u32 {
        let entry = crate::config::addresses_per_entry(self.prefix_len);
        (self.max.div_ceil(entry) * entry).min(NIC_SECONDARY_LIMIT * entry)
    }
}

/// What the pool remembers between decisions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// Since when free has been above `warm + batch` without interruption.
    pub excess_since: Option<Duration>,
    /// No growth before this instant.
    pub backoff_until: Option<Duration>,
    /// The NIC refused more addresses at this total: treat it as the cap until the total falls.
    pub nic_limit_at: Option<u32>,
    /// A top-up yielded to a low write budget until this instant (see [`top_up_gate`]).
    pub top_up_after: Option<Duration>,
    /// The largest `remaining` writes seen, plus one: what this node knows of the bucket's size.
    pub write_bucket_seen: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Nothing,
    /// Ask the cloud for this many addresses.
    Grow(u32),
    /// Give this many free addresses back.
    Shrink(u32),
    /// Short of addresses but may not grow: the cap is reached.
    AtCap,
    /// Short of addresses, backing off until the given instant.
    BackingOff(Duration),
}

/// The total the pool steers towards with the current demand (for status and metrics).
pub fn target(c: &Counts, s: &Settings, m: &Memory) -> u32 {
    let allocated = c.total.saturating_sub(c.free + c.cooldown);
    (allocated + c.cooldown + (s.warm + c.demand).max(c.waiters)).min(effective_cap(c, s, m))
}

impl Counts {
    /// Addresses the NIC holds for the pool: the pool's own and those being released.
    pub fn on_nic(&self) -> u32 {
        self.total + self.releasing
    }
}

fn effective_cap(c: &Counts, s: &Settings, m: &Memory) -> u32 {
    match m.nic_limit_at {
        Some(at) if c.on_nic() >= at => s.cap().min(at),
        _ => s.cap(),
    }
}

/// `now` is any monotonic clock (the caller's `Instant` offset); only differences matter.
pub fn decide(c: &Counts, s: &Settings, m: &mut Memory, now: Duration) -> Decision {
    if c.pending > 0 {
        return Decision::Nothing;
    }
    if m.nic_limit_at.is_some_and(|at| c.on_nic() < at) {
        m.nic_limit_at = None;
    }
    let cap = effective_cap(c, s, m);
    // Addresses already being released are on their way out: not shrunk for twice.
    if c.total > cap {
        m.excess_since = None;
        let n = (c.total - cap).min(c.free);
        return if n > 0 {
            Decision::Shrink(n)
        } else {
            Decision::Nothing
        };
    }

    let warm = s.warm + c.demand;
    let short_for_waiters = c.waiters.saturating_sub(c.free);
    let short_for_warm = warm.saturating_sub((c.free + c.cooldown).saturating_sub(c.waiters));
    let deficit = if short_for_waiters > 0 {
        short_for_waiters + warm
    } else {
        short_for_warm
    };
    if deficit > 0 {
        m.excess_since = None;
        if let Some(until) = m.backoff_until {
            if now < until {
                return Decision::BackingOff(until);
            }
            m.backoff_until = None;
        }
        let room = cap.saturating_sub(c.on_nic() + c.pending);
        let step = deficit.div_ceil(s.batch) * s.batch;
        let n = step.min(room);
        return if n > 0 {
            Decision::Grow(n)
        } else {
            Decision::AtCap
        };
    }

    if c.waiters == 0 && c.free > warm + s.batch {
        let since = *m.excess_since.get_or_insert(now);
        if now.saturating_sub(since) >= s.release_delay {
            m.excess_since = None;
            return Decision::Shrink((c.free - warm) / s.batch * s.batch);
        }
    } else {
        m.excess_since = None;
    }
    Decision::Nothing
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Settings = Settings {
        warm: 8,
        batch: 8,
        max: 250,
        release_delay: Duration::from_secs(300),
        prefix_len: 32,
    };

    fn counts(total: u32, free: u32, cooldown: u32, pending: u32, waiters: u32) -> Counts {
        Counts {
            total,
            free,
            cooldown,
            pending,
            waiters,
            releasing: 0,
            demand: 0,
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn growth_decisions() {
        use Decision::*;
        // (what, counts, settings, expected)
        let table: &[(&str, Counts, Settings, Decision)] = &[
            (
                "empty pool grows one batch to warm",
                counts(0, 0, 0, 0, 0),
                S,
                Grow(8),
            ),
            ("warm satisfied", counts(8, 8, 0, 0, 0), S, Nothing),
            (
                "one below warm grows a whole batch",
                counts(8, 7, 0, 0, 0),
                S,
                Grow(8),
            ),
            (
                "cooldown counts towards warm",
                counts(16, 4, 4, 0, 0),
                S,
                Nothing,
            ),
            (
                "a write in flight blocks another",
                counts(0, 0, 0, 8, 5),
                S,
                Nothing,
            ),
            (
                "200 waiters coalesce into one write, rounded to batches",
                counts(8, 0, 0, 0, 200),
                S,
                Grow(208),
            ),
            (
                "waiters do not wait for a cooldown",
                counts(8, 0, 8, 0, 1),
                S,
                Grow(16),
            ),
            (
                "growth is clipped to max",
                counts(245, 0, 0, 0, 20),
                S,
                Grow(5),
            ),
            (
                "growth is clipped to the NIC limit",
                counts(250, 0, 0, 0, 20),
                Settings { max: 255, ..S },
                Grow(5),
            ),
            ("at max nothing to grow", counts(250, 0, 0, 0, 3), S, AtCap),
            (
                "addresses being released still hold NIC slots",
                Counts {
                    releasing: 5,
                    ..counts(250, 0, 0, 0, 3)
                },
                Settings { max: 255, ..S },
                AtCap,
            ),
            (
                "below the NIC limit only by what is being released",
                Counts {
                    releasing: 2,
                    ..counts(250, 0, 0, 0, 3)
                },
                Settings { max: 255, ..S },
                Grow(3),
            ),
            (
                "batch 1 grows exactly",
                counts(3, 0, 0, 0, 2),
                Settings {
                    warm: 0,
                    batch: 1,
                    ..S
                },
                Grow(2),
            ),
            (
                "warm 0 grows only for waiters",
                counts(3, 0, 0, 0, 0),
                Settings { warm: 0, ..S },
                Nothing,
            ),
            (
                "known demand grows ahead of the pods",
                Counts {
                    demand: 20,
                    ..counts(16, 8, 0, 0, 0)
                },
                S,
                Grow(24),
            ),
            (
                "a lowered max shrinks free addresses",
                counts(40, 30, 0, 0, 0),
                Settings { max: 16, ..S },
                Shrink(24),
            ),
        ];
        for (what, c, s, expected) in table {
            let mut m = Memory::default();
            assert_eq!(decide(c, s, &mut m, secs(0)), *expected, "{what}");
        }
    }

    #[test]
    fn release_delay_and_hysteresis() {
        let mut m = Memory::default();
        let excess = counts(40, 30, 0, 0, 0);
        assert_eq!(decide(&excess, &S, &mut m, secs(0)), Decision::Nothing);
        assert_eq!(decide(&excess, &S, &mut m, secs(299)), Decision::Nothing);
        // 30 free, warm 8: release two whole batches, keeping 14 (>= warm).
        assert_eq!(decide(&excess, &S, &mut m, secs(300)), Decision::Shrink(16));

        // An interruption restarts the delay.
        let mut m = Memory::default();
        decide(&excess, &S, &mut m, secs(0));
        decide(&counts(40, 12, 0, 0, 0), &S, &mut m, secs(200));
        assert_eq!(decide(&excess, &S, &mut m, secs(300)), Decision::Nothing);
        assert_eq!(decide(&excess, &S, &mut m, secs(600)), Decision::Shrink(16));

        // Exactly warm + batch free is inside the band: never released (no churn flapping).
        let mut m = Memory::default();
        let band = counts(40, 16, 0, 0, 0);
        decide(&band, &S, &mut m, secs(0));
        assert_eq!(decide(&band, &S, &mut m, secs(10_000)), Decision::Nothing);

        // Waiting allocations stop a shrink.
        let mut m = Memory::default();
        decide(&excess, &S, &mut m, secs(0));
        assert_eq!(
            decide(&counts(40, 30, 0, 0, 1), &S, &mut m, secs(400)),
            Decision::Nothing
        );
    }

    #[test]
    fn churn_inside_the_warm_pool_makes_no_cloud_writes() {
        // After the first growth, create/delete cycles move addresses between allocated, cooldown
        // and free; none of them may call the cloud.
        let mut m = Memory::default();
        for (free, cooldown) in [(16, 0), (15, 0), (15, 1), (14, 1), (14, 2), (16, 0)] {
            assert_eq!(
                decide(&counts(24, free, cooldown, 0, 0), &S, &mut m, secs(1)),
                Decision::Nothing,
                "free {free}, cooldown {cooldown}"
            );
        }
    }

    #[test]
    fn subnet_full_backs_off_then_retries() {
        let mut m = Memory {
            backoff_until: Some(secs(60)),
            ..Memory::default()
        };
        let short = counts(8, 0, 0, 0, 1);
        assert_eq!(
            decide(&short, &S, &mut m, secs(10)),
            Decision::BackingOff(secs(60))
        );
        assert_eq!(decide(&short, &S, &mut m, secs(60)), Decision::Grow(16));
        assert_eq!(m.backoff_until, None);
    }

    #[test]
    fn the_nic_limit_caps_until_the_total_falls() {
        let mut m = Memory {
            nic_limit_at: Some(100),
            ..Memory::default()
        };
        assert_eq!(
            decide(&counts(100, 0, 0, 0, 1), &S, &mut m, secs(0)),
            Decision::AtCap
        );
        assert_eq!(
            decide(&counts(92, 0, 0, 0, 1), &S, &mut m, secs(0)),
            Decision::Grow(16)
        );
        assert_eq!(m.nic_limit_at, None);
    }

    #[test]
    fn gathering_extends_while_demand_arrives_and_is_capped() {
        let ms = Duration::from_millis;
        let g = Gather {
            quiet_first: ms(30),
            quiet_burst: ms(150),
            max: ms(1000),
        };
        // (what, started, last arrival, arrivals since the first, now, expected)
        type Row = (&'static str, u64, u64, u32, u64, Option<u64>);
        let table: &[Row] = &[
            ("a lone waiter waits the first gap", 0, 0, 0, 0, Some(30)),
            ("a lone waiter after it: write", 0, 0, 0, 30, None),
            (
                "a second arrival: a burst, longer gap",
                0,
                20,
                1,
                30,
                Some(170),
            ),
            ("a 95 ms stall inside a burst", 0, 140, 30, 235, Some(290)),
            ("quiet after a burst: write", 0, 500, 99, 650, None),
            ("capped after the first waiter", 0, 950, 80, 960, Some(1000)),
            ("at the cap: write, demand or not", 0, 999, 90, 1000, None),
            (
                "the window starts at the first waiter",
                100,
                100,
                0,
                120,
                Some(130),
            ),
        ];
        for &(what, started, last, arrivals, now, expected) in table {
            assert_eq!(
                gather_until(&g, ms(started), ms(last), arrivals, ms(now)),
                expected.map(ms),
                "{what}"
            );
        }
    }

    #[test]
    fn top_ups_yield_on_a_low_write_budget_and_waiters_never_do() {
        let budget = |remaining, bucket| Some(WriteBudget { remaining, bucket });
        let top_up = counts(0, 0, 0, 0, 0);
        let waiting = counts(0, 0, 0, 0, 3);
        let demand = Counts {
            demand: 5,
            ..top_up
        };
        // (what, counts, budget, jitter, expected seconds)
        type Row = (&'static str, Counts, Option<WriteBudget>, f64, Option<f64>);
        let table: &[Row] = &[
            ("budget unknown: go", top_up, None, 0.0, None),
            ("plenty left: go", top_up, budget(150, 200), 0.0, None),
            (
                "exactly a quarter is not low",
                top_up,
                budget(50, 200),
                0.0,
                None,
            ),
            (
                "low: refill to the mark",
                top_up,
                budget(10, 200),
                0.0,
                Some(4.0),
            ),
            (
                "low, jittered up to twice",
                top_up,
                budget(10, 200),
                0.5,
                Some(6.0),
            ),
            (
                "just below: at least a second",
                top_up,
                budget(49, 200),
                0.0,
                Some(1.0),
            ),
            ("empty small bucket", top_up, budget(0, 40), 0.0, Some(1.0)),
            (
                "tiny bucket seen: the minimum applies",
                top_up,
                budget(4, 8),
                0.0,
                Some(1.0),
            ),
            ("waiters never yield", waiting, budget(0, 200), 0.0, None),
            (
                "known demand never yields",
                demand,
                budget(0, 200),
                0.0,
                None,
            ),
        ];
        for &(what, c, b, jitter, expected) in table {
            assert_eq!(
                top_up_yield(&c, b, jitter),
                expected.map(Duration::from_secs_f64),
                "{what}"
            );
        }
    }

    #[test]
    fn a_yielded_top_up_goes_ahead_once_its_postponement_ends() {
        let mut m = Memory::default();
        let top_up = counts(0, 0, 0, 0, 0);
        // A full bucket seen earlier, then a low reading.
        assert_eq!(top_up_gate(&top_up, &mut m, Some(199), 0.0, secs(0)), None);
        assert_eq!(m.write_bucket_seen, 200);
        let until = top_up_gate(&top_up, &mut m, Some(10), 0.0, secs(10));
        assert_eq!(until, Some(secs(14)));
        // Still postponed with the same (stale) reading.
        assert_eq!(
            top_up_gate(&top_up, &mut m, Some(10), 0.0, secs(12)),
            Some(secs(14))
        );
        // Over: the top-up goes ahead once, whatever the old reading says.
        assert_eq!(top_up_gate(&top_up, &mut m, Some(10), 0.0, secs(14)), None);
        // The next one looks at the budget again.
        assert_eq!(
            top_up_gate(&top_up, &mut m, Some(10), 0.0, secs(15)),
            Some(secs(19))
        );
        // A waiter arrives: its growth goes now and the postponement is dropped.
        let waiting = counts(0, 0, 0, 0, 1);
        assert_eq!(top_up_gate(&waiting, &mut m, Some(0), 0.0, secs(16)), None);
        assert_eq!(m.top_up_after, None);
    }

    #[test]
    fn target_reports_what_the_pool_steers_to() {
        assert_eq!(target(&counts(10, 2, 0, 0, 0), &S, &Memory::default()), 16);
        assert_eq!(
            target(&counts(250, 0, 0, 0, 9), &S, &Memory::default()),
            250
        );
    }

    #[test]
    fn the_gather_window_takes_at_most_a_tenth_of_the_allocation_wait() {
        assert_eq!(GATHER.within(Duration::from_secs(30)), GATHER);
        let short = GATHER.within(Duration::from_secs(1));
        assert_eq!(short.max, Duration::from_millis(100));
        assert_eq!(short.quiet_burst, Duration::from_millis(100));
        assert_eq!(short.quiet_first, GATHER.quiet_first);
    }
}
