//! The allocator's loop: the Lease, the watch, and starting jobs in the queue's order when ARM's
//! budget lets them ([`crate::queue`] says which nodes and in which order).
//!
//! - The order is strict: when the budget cannot pay for the first node's job yet, no later
//!   node's job starts in its place (a node held for its first pods, `START_SETTLE`, is passed
//!   over while held).
//! - A job reserves its expected ARM calls before it starts; its calls are counted as it sends
//!   them ([`crate::budget`]); after a 429 nothing starts until its `Retry-After` has passed.
//! - Only the leader calls ARM: when leadership ends (a renewal failed long enough, or the Lease
//!   went to another replica) the jobs under way are aborted, before another replica may take
//!   over; on shutdown they are drained first and the Lease is given up after.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use vnet_cloud::CloudError;
use vnet_cloud::azure::{ArmCalls, AzureProvider, CallCounter, count_calls_into};
use vnet_kube::crd::NodeIPPool;

use crate::budget::{Budget, Cost};
use crate::inflight::InFlight;
use crate::lease::{self, Leadership, LeaseSettings};
use crate::queue::{
    Estimates, Memo, START_SETTLE, candidates, expected_cost, next_retry, order, retry_delay,
};
use crate::work::{self, Done, Outcome};
use crate::{Counters, Settings};

/// The longest the loop sleeps without looking again (leadership may have changed).
const IDLE_TICK: Duration = Duration::from_millis(500);

/// The shortest time between two passes that a watch event starts. Every pass looks at every
/// pool, and in a large cluster's cold start the pools change many times a second
/// (each pod that reaches its node changes the node's request): passing on every change kept
/// the loop busy on a CPU at 5,000 nodes. A change after a quiet spell is looked at at once; a
/// change within this of the last pass waits for the rest of it, with any others that come.
const PASS_GAP: Duration = Duration::from_millis(25);

/// How long a request waits for its Node to show in the watch before it is answered that
/// there is none.
const NODE_GRACE: Duration = Duration::from_secs(30);

struct Finished {
    name: String,
    done: Done,
    calls: ArmCalls,
    /// How long after its write each settle read of the job came.
    settle_delays: Vec<Duration>,
}

pub(crate) async fn run(
    client: kube::Client,
    cloud: Arc<AzureProvider>,
    settings: Settings,
    mut shutdown: watch::Receiver<bool>,
) {
    let counters = settings.counters.clone();
    let pools: Api<NodeIPPool> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, &settings.namespace);
    let leadership = Arc::new(Leadership::default());
    // The election stops (and gives the Lease up) only once the jobs have finished.
    let (stop_election, election_stop) = watch::channel(false);
    let election = tokio::spawn(lease::run(
        leases,
        LeaseSettings {
            namespace: settings.namespace.clone(),
            name: settings.lease_name.clone(),
            holder: settings.holder.clone(),
            lease_duration: settings.lease_duration,
            renew_every: settings.renew_every,
            // Room for a job that starts just before: a NIC write and its settle.
            job_margin: settings.lease_duration / 3,
            // Before a standby may take over (lease_duration after it saw the last renewal).
            abort_margin: settings.lease_duration / 6,
        },
        leadership.clone(),
        election_stop,
    ));

    let (store, writer) = reflector::store();
    let changed = Arc::new(Notify::new());
    let watch_task = {
        let changed = changed.clone();
        let events = reflector::reflector(
            writer,
            watcher(pools.clone(), watcher::Config::default()).default_backoff(),
        );
        tokio::spawn(async move {
            let mut events = std::pin::pin!(events);
            while let Some(event) = events.next().await {
                if let Err(error) = event {
                    tracing::warn!(%error, "NodeIPPool watch failed; retrying");
                }
                changed.notify_one();
            }
        })
    };

    // The Nodes, for their providerIDs only (the rest is dropped: 5,000 Nodes' status would
    // cost the allocator hundreds of MB).
    let (node_store, node_writer) = reflector::store();
    let nodes_ready = Arc::new(AtomicBool::new(false));
    let node_task = {
        let changed = changed.clone();
        let ready = nodes_ready.clone();
        let events = reflector::reflector(
            node_writer,
            watcher(nodes, watcher::Config::default())
                .modify(|node: &mut Node| {
                    node.status = None;
                    node.metadata.managed_fields = None;
                    node.metadata.annotations = None;
                    node.metadata.labels = None;
                })
                .default_backoff(),
        );
        tokio::spawn(async move {
            let mut events = std::pin::pin!(events);
            while let Some(event) = events.next().await {
                match event {
                    Ok(watcher::Event::InitDone) => ready.store(true, Ordering::Relaxed),
                    Ok(_) => {}
                    Err(error) => tracing::warn!(%error, "Node watch failed; retrying"),
                }
                changed.notify_one();
            }
        })
    };
    let nodes = NodeView {
        store: node_store,
        ready: nodes_ready,
    };

    let sent = cloud.arm_calls();
    let mut budget = Budget::new(
        settings.reads,
        settings.writes,
        Instant::now(),
        Cost {
            reads: sent.reads as f64,
            writes: sent.writes as f64,
            settle_reads: 0.0,
        },
    );
    let mut estimates = Estimates::new();
    let mut memos: HashMap<String, Memo> = HashMap::new();
    let mut in_flight = InFlight::new();
    let mut jobs: JoinSet<Finished> = JoinSet::new();

    let mut was_holding = false;
    // When the last pass ran and when it asked to be woken; whether the loop woke for a watch
    // event too soon after it (then it waits out PASS_GAP instead of passing again).
    let mut last_pass = Instant::now();
    let mut planned_wake: Option<Instant> = None;
    let mut too_soon = false;
    loop {
        counters.loop_went_round();
        let leading = leadership.leading();
        let jobs_until = leadership.jobs_until();
        counters
            .leading
            .store(u64::from(leading), Ordering::Relaxed);
        if jobs_until.is_none() && !jobs.is_empty() {
            // Another replica may take over soon: no call of this one's may land after.
            abort_jobs(&mut jobs, &mut in_flight, &counters).await;
        }
        if was_holding && jobs_until.is_none() {
            // Another replica may answer and write from now on: what this one remembers of
            // answers and NICs is no longer the truth (identities stay: a VM's NIC and subnet
            // do not change under it).
            tracing::info!("not leading: forgetting answers and NICs");
            for memo in memos.values_mut() {
                memo.answered = None;
                memo.nic_known = false;
                memo.not_before = None;
            }
            cloud.forget_nics();
        }
        if !was_holding && jobs_until.is_some() && !leadership.created_lease() {
            // Another replica led before this one, and may have spent ARM's buckets until just
            // before the takeover (its last call is at least lease_duration / 6 earlier, a
            // released Lease not even that): start from empty buckets. They refill at ARM's
            // rate, so only the burst is lost, for at most a bucket's refill time (10 s for
            // reads, 19 s for writes at the default plan).
            tracing::info!("leading a Lease another replica held: planning from empty buckets");
            budget.empty(Instant::now());
        }
        was_holding = jobs_until.is_some();
        let wake = if too_soon {
            let gap_end = last_pass + PASS_GAP;
            let until = planned_wake.map_or(gap_end, |at| at.min(gap_end));
            Some(until.saturating_duration_since(Instant::now()))
        } else if leading {
            let pass_started = Instant::now();
            let passed = start_jobs(
                &store,
                &nodes,
                &pools,
                &cloud,
                &settings,
                &mut budget,
                &mut estimates,
                &mut memos,
                &mut in_flight,
                &mut jobs,
            );
            // Never sooner than PASS_GAP either: the budget's wait is an estimate, and one that
            // is too short (a shortfall at a later settle read, which waiting a little does not
            // cure) would otherwise bring the loop round every few milliseconds until it passes.
            let wake = passed.map(|after| after.max(PASS_GAP));
            // The gap counts from the pass's end: a pass that takes longer than the gap (thousands
            // of pools on a busy machine) still leaves the loop idle for the gap after it.
            last_pass = Instant::now();
            planned_wake = wake.and_then(|after| pass_started.checked_add(after));
            wake
        } else {
            None
        };
        let mut wake = wake.unwrap_or(IDLE_TICK).min(IDLE_TICK);
        if let Some(until) = jobs_until.filter(|_| !jobs.is_empty()) {
            wake = wake.min(until.saturating_duration_since(Instant::now()));
        }
        let mut watched = false;
        tokio::select! {
            _ = changed.notified() => watched = true,
            _ = leadership.changed() => {}
            Some(finished) = jobs.join_next_with_id(), if !jobs.is_empty() => {
                joined(finished, &cloud, &counters, &mut budget, &mut estimates, &mut memos, &mut in_flight);
                // Every job that has finished meanwhile, for one pass after them all.
                while let Some(finished) = jobs.try_join_next_with_id() {
                    joined(finished, &cloud, &counters, &mut budget, &mut estimates, &mut memos, &mut in_flight);
                }
            }
            _ = tokio::time::sleep(wake) => {}
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
        // A finished job, a timer, a change of leadership: a pass at once. A watch event within
        // PASS_GAP of the last pass: after the rest of the gap (or the timer, if sooner).
        too_soon = watched && last_pass.elapsed() < PASS_GAP;
        counters
            .in_flight
            .store(in_flight.jobs.len() as u64, Ordering::Relaxed);
        let sent = cloud.arm_calls();
        budget.advance(Instant::now(), sent.reads, sent.writes);
        let outstanding = in_flight.outstanding();
        let free = |level: f64, owed: f64| (level - owed).max(0.0).floor() as u64;
        counters.local_reads.store(
            free(budget.reads.level(), outstanding.reads),
            Ordering::Relaxed,
        );
        counters.local_writes.store(
            free(budget.writes.level(), outstanding.writes),
            Ordering::Relaxed,
        );
    }
    // Nothing new starts; the jobs under way finish (a NIC write is not cut short) while this
    // replica still holds the Lease, and are aborted if it stops holding it meanwhile.
    counters.leading.store(0, Ordering::Relaxed);
    while !jobs.is_empty() {
        let Some(until) = leadership.jobs_until() else {
            abort_jobs(&mut jobs, &mut in_flight, &counters).await;
            break;
        };
        tokio::select! {
            Some(finished) = jobs.join_next_with_id() => {
                joined(finished, &cloud, &counters, &mut budget, &mut estimates, &mut memos, &mut in_flight);
            }
            _ = tokio::time::sleep_until(until.into()) => {}
            _ = leadership.changed() => {}
        }
    }
    counters.in_flight.store(0, Ordering::Relaxed);
    // Only now may a standby take over at once.
    let _ = stop_election.send(true);
    watch_task.abort();
    node_task.abort();
    let _ = election.await;
    counters.leading.store(0, Ordering::Relaxed);
}

/// Aborts every job under way and waits until none runs any more. A NIC write cut short is
/// safe: the next leader reads the NIC, and `If-Match` refuses a write from a stale read.
async fn abort_jobs(jobs: &mut JoinSet<Finished>, in_flight: &mut InFlight, counters: &Counters) {
    tracing::warn!(
        jobs = jobs.len(),
        "leadership ended: aborting the jobs under way"
    );
    jobs.shutdown().await;
    let sent = in_flight.clear();
    counters.add_calls(&sent);
    counters.in_flight.store(0, Ordering::Relaxed);
}

/// A job's task ended: finished, or panicked (its node alone is freed, and tried again later).
fn joined(
    result: Result<(tokio::task::Id, Finished), tokio::task::JoinError>,
    cloud: &AzureProvider,
    counters: &Counters,
    budget: &mut Budget,
    estimates: &mut Estimates,
    memos: &mut HashMap<String, Memo>,
    in_flight: &mut InFlight,
) {
    match result {
        Ok((task, f)) => {
            in_flight.tasks.remove(&task);
            finish(f, cloud, counters, budget, estimates, memos, in_flight);
        }
        Err(error) => {
            let Some((name, sent)) = in_flight.remove(error.id()) else {
                return;
            };
            tracing::error!(node = %name, %error, "allocator job failed");
            counters.add_calls(&sent);
            let memo = memos.entry(name).or_default();
            memo.nic_known = false;
            memo.failures += 1;
            memo.not_before = Some(
                Instant::now()
                    + retry_delay(&CloudError::Transient(error.to_string()), memo.failures),
            );
        }
    }
}

/// The Nodes as the watch last showed them (names and providerIDs).
struct NodeView {
    store: Store<Node>,
    ready: Arc<AtomicBool>,
}

impl NodeView {
    /// Node `name`'s `spec.providerID` (`""` when unset), `None` when there is no such Node.
    fn provider_id(&self, name: &str) -> Option<String> {
        self.store
            .get(&reflector::ObjectRef::new(name))
            .map(|node| {
                node.spec
                    .as_ref()
                    .and_then(|s| s.provider_id.clone())
                    .unwrap_or_default()
            })
    }
}

/// Starts what the budget and the in-flight cap allow, in priority order. Returns how long
/// until the next job could start, when something waits.
#[allow(clippy::too_many_arguments)]
fn start_jobs(
    store: &Store<NodeIPPool>,
    nodes: &NodeView,
    pools: &Api<NodeIPPool>,
    cloud: &Arc<AzureProvider>,
    settings: &Settings,
    budget: &mut Budget,
    estimates: &mut Estimates,
    memos: &mut HashMap<String, Memo>,
    in_flight: &mut InFlight,
    jobs: &mut JoinSet<Finished>,
) -> Option<Duration> {
    let now = Instant::now();
    if !nodes.ready.load(Ordering::Relaxed) {
        // Until the Nodes are listed, no request can be checked against its Node.
        return Some(IDLE_TICK);
    }
    let candidates = candidates(store, memos, |name| in_flight.jobs.contains_key(name), now);
    let queued = candidates.len() as u64;
    let depth = |started: u64| {
        settings
            .counters
            .queue_depth
            .store(queued - started, Ordering::Relaxed)
    };
    depth(0);
    if candidates.is_empty() {
        return next_retry(memos, now);
    }
    if let Some(until) = cloud.throttled_until() {
        return Some(until.saturating_duration_since(now));
    }
    let sent = cloud.arm_calls();
    budget.advance(now, sent.reads, sent.writes);
    let mut outstanding = in_flight.outstanding();
    in_flight.learn_settle_delays(estimates);
    let settle = estimates.settle_timing();
    let mut dues = in_flight.read_dues(now, &settle);
    let mut started = 0;
    // The soonest a held node (a new node waiting for its pods, a failed answer) is due.
    let held = next_retry(memos, now);
    for candidate in order(candidates) {
        if in_flight.jobs.len() >= settings.max_in_flight {
            break;
        }
        let memo = memos.entry(candidate.name().to_string()).or_default();
        let provider_id = nodes.provider_id(candidate.name());
        if provider_id.is_none() && now.saturating_duration_since(candidate.since) < NODE_GRACE {
            // The Node's watch event may trail its NodeIPPool's: wait for it a little (the
            // Node watch wakes the loop), without holding up the nodes behind.
            continue;
        }
        if let Some(error) = work::refusal(
            candidate.name(),
            candidate.request(),
            provider_id.as_deref(),
        ) {
            // Answered without a cloud call, so without a reservation.
            tracing::warn!(node = %candidate.name(), %error, "request refused");
            let counter = Arc::new(CallCounter::default());
            let (pools, timeout) = (pools.clone(), settings.request_timeout);
            let name = candidate.name().to_string();
            let generation = candidate.request().generation;
            let job_name = name.clone();
            let uid = candidate.uid().map(str::to_string);
            let task = jobs.spawn(async move {
                let pool = work::PoolRef {
                    name: job_name.clone(),
                    uid,
                };
                let done = work::refuse(pools, pool, generation, error, timeout).await;
                Finished {
                    name: job_name,
                    done,
                    calls: ArmCalls::default(),
                    settle_delays: Vec::new(),
                }
            });
            in_flight.insert(task.id(), name, Cost::default(), counter);
            started += 1;
            continue;
        }
        let cost = expected_cost(memo, estimates);
        // A top-up or a release leaves the reserve to nodes whose pods wait; while it waits,
        // the pods that reach its node join its request (one write for both).
        let spare = candidate.waits_for_nobody();
        let wait = budget.wait_for_job(cost, outstanding, &dues, &settle, spare);
        if !wait.is_zero() {
            // Strict priority: the first node waits for the budget, nobody overtakes it.
            depth(started);
            return Some(held.map_or(wait, |h| h.min(wait)));
        }
        outstanding.add(cost);
        dues.now += cost.first_reads();
        settle.dues(cost.settle_reads, 0, 0.0, &mut dues.later);
        let counter = Arc::new(CallCounter::default());
        started += 1;
        let pools = pools.clone();
        let cloud = cloud.clone();
        let known = memo.identity.clone();
        let timeout = settings.request_timeout;
        let name = candidate.name().to_string();
        let request = candidate.request().clone();
        let uid = candidate.uid().map(str::to_string);
        tracing::debug!(node = %name, generation = request.generation, waiting = candidate.waiting_pods, ?cost, "starting job");
        let job_counter = counter.clone();
        let job_name = name.clone();
        let task = jobs.spawn(async move {
            let counter = job_counter;
            let name = job_name;
            let pool = work::PoolRef {
                name: name.clone(),
                uid,
            };
            let work = work::run(pools, cloud, pool, request, known, timeout);
            let done = count_calls_into(counter.clone(), work).await;
            Finished {
                name,
                done,
                calls: counter.calls(),
                settle_delays: counter.settle_delays(),
            }
        });
        in_flight.insert(task.id(), name, cost, counter);
    }
    depth(started);
    held
}

fn finish(
    f: Finished,
    cloud: &AzureProvider,
    counters: &Counters,
    budget: &mut Budget,
    estimates: &mut Estimates,
    memos: &mut HashMap<String, Memo>,
    in_flight: &mut InFlight,
) {
    let now = Instant::now();
    let seq = in_flight.jobs.remove(&f.name).map(|job| job.seq);
    let sent = cloud.arm_calls();
    budget.advance(now, sent.reads, sent.writes);
    // What ARM last reported, plus the refill since, minus what was sent since: a caller the
    // allocator does not see (a person's `az`, another tool on the principal) lowers it.
    let reported = cloud.arm_remaining();
    if let Some(r) = reported.reads {
        let refilled = r.age.as_secs_f64() * budget.reads.refill_per_sec();
        budget
            .reads
            .at_most(r.remaining as f64 + refilled - r.sent_since as f64);
    }
    if let Some(w) = reported.writes {
        let refilled = w.age.as_secs_f64() * budget.writes.refill_per_sec();
        budget
            .writes
            .at_most(w.remaining as f64 + refilled - w.sent_since as f64);
    }
    counters.add_calls(&f.calls);
    let memo = memos.entry(f.name.clone()).or_default();
    let resolved = memo.identity.is_none() && f.done.identity.is_some();
    if resolved {
        estimates.resolved_any = true;
        // A node that has just started: its first pods are about to join its next request.
        memo.not_before = Some(now + START_SETTLE);
    }
    if let Some(identity) = f.done.identity {
        memo.identity = Some(identity);
    }
    match f.done.outcome {
        Outcome::Answered {
            generation,
            error,
            wrote,
        } => {
            counters.jobs_done.fetch_add(1, Ordering::Relaxed);
            if wrote {
                counters.nic_writes.fetch_add(1, Ordering::Relaxed);
                // Learn the settle reads of a write on a known NIC.
                if memo.nic_known && !resolved && f.calls.writes == 1 && f.calls.throttled == 0 {
                    estimates.write_reads =
                        0.8 * estimates.write_reads + 0.2 * f.calls.reads as f64;
                }
                // All its polls now, replacing what it taught while it ran (one write and no 429
                // only: after a retried write the reads are not all polls of one write).
                if let Some(seq) = seq
                    && f.calls.writes == 1
                    && f.calls.throttled == 0
                {
                    estimates.learn_settle_delays(seq, f.settle_delays);
                }
            }
            memo.due_since = None;
            match error {
                None => {
                    memo.failures = 0;
                    memo.nic_known = true;
                    memo.answered = Some((generation, None));
                }
                Some(error) => {
                    counters.jobs_failed.fetch_add(1, Ordering::Relaxed);
                    memo.nic_known = false;
                    let retry = error.is_retryable().then(|| {
                        memo.failures += 1;
                        now + retry_delay(&error, memo.failures)
                    });
                    if !error.is_retryable() {
                        memo.failures = 0;
                    }
                    memo.answered = Some((generation, retry));
                }
            }
        }
        Outcome::Throttled => {
            memo.nic_known = false;
            tracing::info!(node = %f.name, "throttled; waiting out Retry-After");
        }
        Outcome::Unanswered { reason, wrote } => {
            if wrote {
                counters.nic_writes.fetch_add(1, Ordering::Relaxed);
            }
            memo.failures += 1;
            tracing::warn!(node = %f.name, %reason, "answer not written; will redo");
            // Redone when due; the NIC is as asked by then, so the redo writes nothing.
            memo.not_before =
                Some(now + retry_delay(&CloudError::Transient(reason), memo.failures));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vnet_cloud::azure::{AzureConfig, CredentialConfig};

    /// A job that panics frees its own node only: the others stay in flight (and are not
    /// started twice).
    #[tokio::test]
    async fn a_panicked_job_frees_only_its_node() {
        let cloud = AzureProvider::new(AzureConfig::mock(
            "http://127.0.0.1:9",
            "http://127.0.0.1:9",
            CredentialConfig::None,
        ))
        .unwrap();
        let counters = Counters::default();
        let mut budget = Budget::new(
            crate::DEFAULT_READS,
            crate::DEFAULT_WRITES,
            Instant::now(),
            Cost::default(),
        );
        let mut estimates = Estimates::new();
        let mut memos = HashMap::new();
        let mut in_flight = InFlight::new();
        let mut jobs: JoinSet<Finished> = JoinSet::new();
        let (_hold, held) = watch::channel(());
        for name in ["node-a", "node-b"] {
            let mut held = held.clone();
            let task = jobs.spawn(async move {
                if name == "node-a" {
                    panic!("a bug in node-a's job");
                }
                let _ = held.changed().await;
                unreachable!("node-b's job runs until the test ends");
            });
            let counter = Arc::new(CallCounter::default());
            in_flight.insert(task.id(), name.into(), Cost::default(), counter);
        }
        let result = jobs.join_next_with_id().await.unwrap();
        assert!(result.as_ref().is_err_and(|e| e.is_panic()));
        joined(
            result,
            &cloud,
            &counters,
            &mut budget,
            &mut estimates,
            &mut memos,
            &mut in_flight,
        );
        let running: Vec<&String> = in_flight.jobs.keys().collect();
        assert_eq!(running, ["node-b"]);
        let memo = &memos["node-a"];
        assert!(memo.not_before.is_some(), "node-a is tried again later");
        assert!(!memos.contains_key("node-b"));
        jobs.abort_all();
    }
}
