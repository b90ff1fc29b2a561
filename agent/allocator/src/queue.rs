//! Which nodes need work, in which order, and what a job for each is expected to cost.
//!
//! - A node needs work when its `cloudRequest.generation` differs from the generation last
//!   answered (or the answer was a retryable error whose retry is due).
//! - Nodes with pods waiting go first (most waiting first), then nodes still to be resolved (their
//!   agent cannot serve anything before), then by how long they have had work waiting, then by
//!   name. What is left is work nobody waits for (a warm-pool top-up, a release): it may not
//!   spend the budget's reserve ([`crate::budget::SPARE_RESERVE`]).

use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::runtime::reflector::Store;
use vnet_cloud::{CloudError, NodeIdentity};
use vnet_kube::crd::{CloudRequest, NodeIPPool};

use crate::budget::{Cost, SettleTiming};

/// Retry of a node whose job failed retryably, without `Retry-After`: doubling up to this.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);

/// How long after a node is resolved its first write waits for its first pods (the node's
/// `not_before`, as for any hold). A node that has
/// just started is about to get pods: kubelet re-checks a pod held back while the node's network
/// was not ready every 1-1.5 s (`backOffOnTransientErrorPeriod`, jittered by half), so they reach
/// the agent over that much time after it is ready. The agent asks for its warm pool the moment
/// it is resolved, and each pod that arrives while the ask is unanswered joins it. Written at
/// once, the ask would leave with the warm pool and the first pod or two, and the rest would
/// wait for a second write (3 s later at the lab's timing, 20 s or more on Azure). Held, one
/// write serves them all: the first pods wait up to this much longer, the last ones less.
pub const START_SETTLE: Duration = Duration::from_secs(2);

/// What the allocator remembers of one node.
#[derive(Debug, Default)]
pub(crate) struct Memo {
    pub(crate) identity: Option<NodeIdentity>,
    /// The provider holds the NIC as read after our last write (the next job needs no read).
    pub(crate) nic_known: bool,
    /// The generation last answered and, if its answer was a retryable error, when to retry.
    pub(crate) answered: Option<(u64, Option<Instant>)>,
    /// Consecutive retryable failures (for the back-off).
    pub(crate) failures: u32,
    /// Since when the node has had work waiting (this replica's clock): kept while the agent
    /// changes its request, so a node that updates often keeps its place in the queue.
    pub(crate) due_since: Option<Instant>,
    /// Nothing for this node before then (its answer could not be written).
    pub(crate) not_before: Option<Instant>,
    /// The NodeIPPool this is about (`metadata.uid`): a pool deleted and created again under
    /// the same name (a node replaced by one of the same name) starts from nothing remembered.
    pub(crate) uid: Option<String>,
}

/// A node's request, ready to be ordered. It holds the watched pool itself: every pass orders
/// every due node (thousands in a cold start), so nothing of a pool is copied until its job
/// starts.
pub(crate) struct Candidate {
    pub(crate) pool: Arc<NodeIPPool>,
    pub(crate) waiting_pods: u32,
    /// The node's identity is not known yet: its job resolves it first.
    pub(crate) resolve: bool,
    pub(crate) since: Instant,
}

impl Candidate {
    pub(crate) fn name(&self) -> &str {
        self.pool.metadata.name.as_deref().unwrap_or_default()
    }

    /// The NodeIPPool's `metadata.uid`.
    pub(crate) fn uid(&self) -> Option<&str> {
        self.pool.metadata.uid.as_deref()
    }

    /// The request (a candidate is made only for a pool that has one).
    pub(crate) fn request(&self) -> &CloudRequest {
        self.pool
            .status
            .as_ref()
            .and_then(|s| s.cloud_request.as_ref())
            .expect("a candidate has a request")
    }

    /// No pod waits for this job, and the node's agent already serves (it knows its identity):
    /// a warm-pool top-up, a release.
    pub(crate) fn waits_for_nobody(&self) -> bool {
        self.waiting_pods == 0 && !self.resolve
    }

    /// Most pods waiting first, then resolves, then the longest waiting, then by name.
    fn priority(&self, other: &Candidate) -> std::cmp::Ordering {
        other
            .waiting_pods
            .cmp(&self.waiting_pods)
            .then(other.resolve.cmp(&self.resolve))
            .then(self.since.cmp(&other.since))
            .then(self.name().cmp(other.name()))
    }
}

/// A candidate in the order jobs start: the max-heap's greatest is the first to serve.
struct Queued(Candidate);

impl PartialEq for Queued {
    fn eq(&self, other: &Queued) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}

impl Eq for Queued {}

impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Queued) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Queued {
    fn cmp(&self, other: &Queued) -> std::cmp::Ordering {
        other.0.priority(&self.0)
    }
}

/// Reads per job beyond what is known, and when a write's settle reads come, learned from what
/// jobs really did.
pub(crate) struct Estimates {
    /// Reads of a NIC write once the NIC is known (the settle reads).
    pub(crate) write_reads: f64,
    pub(crate) resolved_any: bool,
    /// How long after its write each settle read of the latest jobs came (or was planned), by
    /// job (a job's sample is replaced as it learns more).
    pub(crate) settle_delays: VecDeque<(u64, Vec<Duration>)>,
}

/// Jobs whose settle timing is remembered: per poll, the shortest is the one planned with.
const SETTLE_SAMPLES: usize = 32;

impl Estimates {
    pub(crate) fn new() -> Estimates {
        Estimates {
            write_reads: 2.0,
            resolved_any: false,
            settle_delays: VecDeque::new(),
        }
    }

    /// The soonest each settle read of a write may come: per poll, the shortest delay of the
    /// latest jobs (nothing until one was seen: the budget then plans them as due at once).
    pub(crate) fn settle_timing(&self) -> SettleTiming {
        let polls = self
            .settle_delays
            .iter()
            .map(|(_, d)| d.len())
            .max()
            .unwrap_or(0);
        let delays = (0..polls)
            .filter_map(|k| {
                self.settle_delays
                    .iter()
                    .filter_map(|(_, d)| d.get(k))
                    .min()
            })
            .copied()
            .collect();
        SettleTiming { delays }
    }

    /// Job `job`'s settle delays so far (replacing what it taught before).
    pub(crate) fn learn_settle_delays(&mut self, job: u64, delays: Vec<Duration>) {
        if delays.is_empty() {
            return;
        }
        if let Some((_, known)) = self.settle_delays.iter_mut().find(|(j, _)| *j == job) {
            *known = delays;
            return;
        }
        if self.settle_delays.len() == SETTLE_SAMPLES {
            self.settle_delays.pop_front();
        }
        self.settle_delays.push_back((job, delays));
    }
}

/// The nodes due for a job now (not running one, not held), unordered. `running` says whether
/// a node's job is under way.
pub(crate) fn candidates(
    store: &Store<NodeIPPool>,
    memos: &mut HashMap<String, Memo>,
    running: impl Fn(&str) -> bool,
    now: Instant,
) -> Vec<Candidate> {
    let mut out = Vec::new();
    let pools = store.state();
    // Nodes gone (their NodeIPPool deleted with the Node) are forgotten.
    if memos.len() > pools.len() {
        let present: HashSet<String> = pools.iter().map(|p| p.name_any()).collect();
        memos.retain(|name, _| present.contains(name) || running(name));
    }
    // Every pass looks at every pool (a pass follows each batch of watch events): nothing is
    // copied for a pool that is not due.
    for pool in pools {
        let Some(name) = pool.metadata.name.as_deref() else {
            continue;
        };
        let Some(status) = pool.status.as_ref() else {
            continue;
        };
        let Some(request) = status.cloud_request.as_ref() else {
            continue;
        };
        if !memos.contains_key(name) {
            memos.insert(name.to_string(), Memo::default());
        }
        let memo = memos.get_mut(name).expect("inserted above");
        let uid = pool.metadata.uid.as_deref();
        let running = running(name);
        if memo.uid.as_deref() != uid && !running {
            // Its generations, answers and identity were another pool's (the new one may even
            // be another VM): a new request numbered 1 would otherwise look answered.
            *memo = Memo {
                uid: uid.map(str::to_string),
                ..Memo::default()
            };
        }
        // After a restart the resource says what was answered; afterwards this replica's own
        // memory does (the watch may not have shown its last patch yet).
        let answered = memo.answered.or_else(|| {
            status.cloud.as_ref().map(|a| {
                let retry = a
                    .error
                    .as_ref()
                    .is_some_and(|e| e.to_cloud_error("").is_retryable())
                    .then_some(now);
                (a.observed_generation, retry)
            })
        });
        // (Not while its job runs: the job brings the identity, and says it resolved the node.)
        if memo.identity.is_none()
            && !running
            && let Some(known) = status.cloud.as_ref().and_then(|a| a.identity.as_ref())
        {
            memo.identity = NodeIdentity::try_from(known).ok();
        }
        let due = match answered {
            None => true,
            Some((generation, _)) if generation != request.generation => true,
            Some((_, retry)) => retry.is_some_and(|at| at <= now),
        };
        let held = memo.not_before.is_some_and(|at| at > now);
        if !due || held || running {
            continue;
        }
        let since = *memo.due_since.get_or_insert(now);
        out.push(Candidate {
            waiting_pods: request.waiting_pods,
            resolve: memo.identity.is_none(),
            since,
            pool: pool.clone(),
        });
    }
    out
}

/// The candidates first to last (most pods waiting first, then resolves, then the longest
/// waiting, then by name), each found when asked for: a pass starts a few jobs and stops at the
/// first that must wait for the budget, so ordering all of thousands of due nodes every pass
/// would be wasted (it was most of the allocator's CPU in a 5,000-node cold start).
pub(crate) fn order(candidates: Vec<Candidate>) -> impl Iterator<Item = Candidate> {
    let mut heap: BinaryHeap<Queued> = candidates.into_iter().map(Queued).collect();
    std::iter::from_fn(move || heap.pop().map(|q| q.0))
}

/// When the earliest retry of a failed node is due.
pub(crate) fn next_retry(memos: &HashMap<String, Memo>, now: Instant) -> Option<Duration> {
    memos
        .values()
        .flat_map(|m| [m.answered.and_then(|(_, retry)| retry), m.not_before])
        .flatten()
        .filter(|at| *at > now)
        .min()
        .map(|at| at.saturating_duration_since(now))
}

/// What a job for this node is expected to send: a resolve when its identity is unknown (VM,
/// NIC, and the subnet and VNet the first time), the NIC read when the provider does not hold
/// it, and the write with its settle reads.
pub(crate) fn expected_cost(memo: &Memo, estimates: &Estimates) -> Cost {
    let settle_reads = estimates.write_reads;
    let mut reads = settle_reads;
    if memo.identity.is_none() {
        reads += 2.0 + if estimates.resolved_any { 0.0 } else { 2.0 };
    } else if !memo.nic_known {
        reads += 1.0;
    }
    Cost {
        reads,
        writes: 1.0,
        settle_reads,
    }
}

pub(crate) fn retry_delay(error: &CloudError, failures: u32) -> Duration {
    if let Some(after) = error.retry_after() {
        return after;
    }
    let exp = Duration::from_secs(1).saturating_mul(1 << failures.saturating_sub(1).min(6));
    exp.min(MAX_RETRY_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(name: &str, waiting_pods: u32, since: Instant) -> Candidate {
        Candidate {
            pool: Arc::new(pool(name, "uid", 1, None)),
            waiting_pods,
            resolve: false,
            since,
        }
    }

    #[test]
    fn waiting_pods_first_then_the_oldest_then_by_name() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(5);
        let queue = vec![
            candidate("top-up-old", 0, t0),
            candidate("one-waiting-new", 1, later),
            candidate("three-waiting-new", 3, later),
            candidate("one-waiting-old", 1, t0),
            candidate("b-top-up-new", 0, later),
            candidate("a-top-up-new", 0, later),
        ];
        let queue: Vec<Candidate> = order(queue).collect();
        let names: Vec<&str> = queue.iter().map(Candidate::name).collect();
        assert_eq!(
            names,
            [
                "three-waiting-new",
                "one-waiting-old",
                "one-waiting-new",
                "top-up-old",
                "a-top-up-new",
                "b-top-up-new"
            ]
        );
    }

    #[test]
    fn resolves_go_after_waiting_pods_and_before_older_top_ups() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(5);
        let resolve = |name: &str| Candidate {
            resolve: true,
            ..candidate(name, 0, later)
        };
        let queue = vec![
            candidate("top-up-old", 0, t0),
            resolve("new-node"),
            candidate("waiting-new", 1, later),
        ];
        let queue: Vec<Candidate> = order(queue).collect();
        let names: Vec<&str> = queue.iter().map(Candidate::name).collect();
        assert_eq!(names, ["waiting-new", "new-node", "top-up-old"]);
        let nobody: Vec<bool> = queue.iter().map(Candidate::waits_for_nobody).collect();
        assert_eq!(nobody, [false, false, true]);
    }

    #[test]
    fn a_held_node_is_not_due_until_its_hold_ends_and_the_loop_wakes_for_it() {
        use kube::runtime::{reflector, watcher};
        let (store, mut writer) = reflector::store();
        writer.apply_watcher_event(&watcher::Event::Apply(pool("node-1", "uid-1", 2, Some(1))));
        let t0 = Instant::now();
        let none = |_: &str| false;
        let mut memos = HashMap::new();
        // Identity from a stored answer (no hold): due at once.
        assert_eq!(candidates(&store, &mut memos, none, t0).len(), 1);
        assert_eq!(next_retry(&memos, t0), None);
        // Resolved by this replica just now: held START_SETTLE, and the loop wakes for it.
        memos.get_mut("node-1").unwrap().not_before = Some(t0 + START_SETTLE);
        assert!(candidates(&store, &mut memos, none, t0).is_empty());
        assert_eq!(next_retry(&memos, t0), Some(START_SETTLE));
        assert_eq!(
            candidates(&store, &mut memos, none, t0 + START_SETTLE).len(),
            1
        );
    }

    #[test]
    fn the_settle_timing_planned_with_is_the_shortest_of_the_latest_jobs_per_poll() {
        let ms = |v: &[u64]| {
            v.iter()
                .map(|&m| Duration::from_millis(m))
                .collect::<Vec<_>>()
        };
        let mut e = Estimates::new();
        assert_eq!(e.settle_timing().delays, ms(&[]), "nothing seen: no credit");
        e.learn_settle_delays(1, ms(&[2100, 3100]));
        e.learn_settle_delays(2, ms(&[1900]));
        e.learn_settle_delays(3, ms(&[2500, 3000, 4000]));
        assert_eq!(e.settle_timing().delays, ms(&[1900, 3000, 4000]));
        // A job that learns more replaces its own sample (one sample per job).
        e.learn_settle_delays(2, ms(&[1950, 2800]));
        assert_eq!(e.settle_timing().delays, ms(&[1950, 2800, 4000]));
        assert_eq!(e.settle_delays.len(), 3);
        // The short ones age out once SETTLE_SAMPLES later jobs were seen.
        for job in 10..10 + SETTLE_SAMPLES as u64 {
            e.learn_settle_delays(job, ms(&[10_000]));
        }
        assert_eq!(e.settle_timing().delays, ms(&[10_000]));
    }

    fn pool(name: &str, uid: &str, generation: u64, answered: Option<u64>) -> NodeIPPool {
        use vnet_kube::crd::{CloudAnswer, NodeIPPoolSpec, NodeIPPoolStatus};
        let mut pool = NodeIPPool::new(name, NodeIPPoolSpec::default());
        pool.metadata.uid = Some(uid.into());
        pool.status = Some(NodeIPPoolStatus {
            cloud_request: Some(CloudRequest {
                generation,
                ..CloudRequest::default()
            }),
            cloud: answered.map(|g| CloudAnswer {
                observed_generation: g,
                ..CloudAnswer::default()
            }),
            ..NodeIPPoolStatus::default()
        });
        pool
    }

    #[test]
    fn a_pool_created_again_under_the_same_name_is_served_from_scratch() {
        use kube::runtime::{reflector, watcher};
        let (store, mut writer) = reflector::store();
        let now = Instant::now();
        let mut memos = HashMap::new();
        let none = |_: &str| false;
        writer.apply_watcher_event(&watcher::Event::Apply(pool("node-1", "uid-1", 1, None)));
        assert_eq!(candidates(&store, &mut memos, none, now).len(), 1);
        // Answered generation 1; then the pool is replaced by a new one whose first request is
        // also generation 1, before the allocator saw it gone.
        memos.get_mut("node-1").unwrap().answered = Some((1, None));
        assert!(candidates(&store, &mut memos, none, now).is_empty());
        writer.apply_watcher_event(&watcher::Event::Delete(pool("node-1", "uid-1", 1, None)));
        writer.apply_watcher_event(&watcher::Event::Apply(pool("node-1", "uid-2", 1, None)));
        let due = candidates(&store, &mut memos, none, now);
        assert_eq!(due.len(), 1, "the new pool's request is due");
        assert!(due[0].resolve, "and its node is resolved again");
    }

    #[test]
    fn retries_back_off_from_one_second_to_a_minute_unless_told() {
        let transient = CloudError::Transient("x".into());
        assert_eq!(retry_delay(&transient, 1), Duration::from_secs(1));
        assert_eq!(retry_delay(&transient, 3), Duration::from_secs(4));
        assert_eq!(retry_delay(&transient, 30), MAX_RETRY_DELAY);
        let busy = CloudError::Busy {
            code: "AnotherOperationInProgress".into(),
            retry_after: Duration::from_secs(7),
        };
        assert_eq!(retry_delay(&busy, 5), Duration::from_secs(7));
    }
}
