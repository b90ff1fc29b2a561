//! The allocator's loop: which node's request to work on next, and when ARM's budget lets it.
//!
//! - A node needs work when its `cloudRequest.generation` differs from the generation last
//!   answered (or the answer was a retryable error whose retry is due).
//! - Nodes with pods waiting go first (most waiting first), then by how long their request has
//!   waited. The order is strict: when the budget cannot pay for the first node's job yet, no
//!   later node's job starts in its place.
//! - A job reserves its expected ARM calls from the local buckets before it starts and is
//!   charged what it really sent when it ends; after a 429 nothing starts until its
//!   `Retry-After` has passed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use vnet_cloud::azure::{ArmCalls, AzureProvider, count_calls};
use vnet_cloud::{CloudError, CloudProvider, NodeIdentity};
use vnet_kube::crd::{CloudRequest, NodeIPPool};

use crate::budget::{Budget, Cost};
use crate::lease::{self, Leadership, LeaseSettings};
use crate::work::{self, Done, Outcome};
use crate::{Counters, Settings};

/// The longest the loop sleeps without looking again (leadership may have changed).
const IDLE_TICK: Duration = Duration::from_millis(500);
/// Retry of a node whose job failed retryably, without `Retry-After`: doubling up to this.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);

/// What the allocator remembers of one node.
#[derive(Debug, Default)]
struct Memo {
    identity: Option<NodeIdentity>,
    /// The provider holds the NIC as read after our last write (the next job needs no read).
    nic_known: bool,
    /// The generation last answered and, if its answer was a retryable error, when to retry.
    answered: Option<(u64, Option<Instant>)>,
    /// Consecutive retryable failures (for the back-off).
    failures: u32,
    /// The generation waiting and since when (this replica's clock).
    seen: Option<(u64, Instant)>,
    /// Nothing for this node before then (its answer could not be written).
    not_before: Option<Instant>,
}

/// A node's request, ready to be ordered.
struct Candidate {
    name: String,
    request: CloudRequest,
    waiting_pods: u32,
    since: Instant,
}

struct Finished {
    name: String,
    reserved: Cost,
    done: Done,
    calls: ArmCalls,
}

/// Reads per job beyond what is known, learned from what jobs really cost.
struct Estimates {
    /// Reads of a NIC write once the NIC is known (the settle reads).
    write_reads: f64,
    resolved_any: bool,
}

pub(crate) async fn run(
    client: kube::Client,
    cloud: Arc<AzureProvider>,
    settings: Settings,
    mut shutdown: watch::Receiver<bool>,
) {
    let counters = settings.counters.clone();
    let pools: Api<NodeIPPool> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, &settings.namespace);
    let leadership = Arc::new(Leadership::default());
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
        },
        leadership.clone(),
        shutdown.clone(),
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

    let mut budget = Budget::new(settings.reads, settings.writes, Instant::now());
    let mut estimates = Estimates {
        write_reads: 2.0,
        resolved_any: false,
    };
    let mut memos: HashMap<String, Memo> = HashMap::new();
    let mut in_flight: HashSet<String> = HashSet::new();
    let mut jobs: JoinSet<Finished> = JoinSet::new();

    loop {
        let leading = leadership.leading();
        counters
            .leading
            .store(u64::from(leading), Ordering::Relaxed);
        let wake = if leading {
            start_jobs(
                &store,
                &pools,
                &cloud,
                &settings,
                &mut budget,
                &estimates,
                &mut memos,
                &mut in_flight,
                &mut jobs,
            )
        } else {
            None
        };
        let wake = wake.unwrap_or(IDLE_TICK).min(IDLE_TICK);
        tokio::select! {
            _ = changed.notified() => {}
            Some(finished) = jobs.join_next(), if !jobs.is_empty() => {
                match finished {
                    Ok(f) => finish(f, &cloud, &counters, &mut budget, &mut estimates, &mut memos, &mut in_flight),
                    Err(error) => {
                        // A panicked job: its node stays in flight no longer than this.
                        tracing::error!(%error, "allocator job failed");
                        in_flight.clear();
                    }
                }
            }
            _ = tokio::time::sleep(wake) => {}
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
        counters
            .in_flight
            .store(in_flight.len() as u64, Ordering::Relaxed);
    }
    // Jobs under way finish (a NIC write is not cut short); nothing new starts.
    while let Some(finished) = jobs.join_next().await {
        if let Ok(f) = finished {
            finish(
                f,
                &cloud,
                &counters,
                &mut budget,
                &mut estimates,
                &mut memos,
                &mut in_flight,
            );
        }
    }
    watch_task.abort();
    let _ = election.await;
    counters.leading.store(0, Ordering::Relaxed);
}

/// Starts what the budget and the in-flight cap allow, in priority order. Returns how long
/// until the next job could start, when something waits.
#[allow(clippy::too_many_arguments)]
fn start_jobs(
    store: &Store<NodeIPPool>,
    pools: &Api<NodeIPPool>,
    cloud: &Arc<AzureProvider>,
    settings: &Settings,
    budget: &mut Budget,
    estimates: &Estimates,
    memos: &mut HashMap<String, Memo>,
    in_flight: &mut HashSet<String>,
    jobs: &mut JoinSet<Finished>,
) -> Option<Duration> {
    let now = Instant::now();
    let mut candidates = candidates(store, memos, in_flight, now);
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
    candidates.sort_by(|a, b| {
        b.waiting_pods
            .cmp(&a.waiting_pods)
            .then(a.since.cmp(&b.since))
            .then(a.name.cmp(&b.name))
    });
    if let Some(until) = cloud.throttled_until() {
        return Some(until.saturating_duration_since(now));
    }
    let mut started = 0;
    for candidate in candidates {
        if in_flight.len() >= settings.max_in_flight {
            break;
        }
        let memo = memos.entry(candidate.name.clone()).or_default();
        let cost = expected_cost(memo, estimates);
        let wait = budget.wait_for(cost, now);
        if !wait.is_zero() {
            // Strict priority: the first node waits for the budget, nobody overtakes it.
            depth(started);
            return Some(wait);
        }
        budget.take(cost, now);
        in_flight.insert(candidate.name.clone());
        started += 1;
        let pools = pools.clone();
        let cloud = cloud.clone();
        let known = memo.identity.clone();
        let timeout = settings.request_timeout;
        let name = candidate.name;
        tracing::debug!(node = %name, generation = candidate.request.generation, waiting = candidate.waiting_pods, ?cost, "starting job");
        jobs.spawn(async move {
            let (done, calls) = count_calls(work::run(
                pools,
                cloud,
                name.clone(),
                candidate.request,
                known,
                timeout,
            ))
            .await;
            Finished {
                name,
                reserved: cost,
                done,
                calls,
            }
        });
    }
    depth(started);
    None
}

fn candidates(
    store: &Store<NodeIPPool>,
    memos: &mut HashMap<String, Memo>,
    in_flight: &HashSet<String>,
    now: Instant,
) -> Vec<Candidate> {
    let mut out = Vec::new();
    for pool in store.state() {
        let name = pool.name_any();
        let Some(status) = pool.status.as_ref() else {
            continue;
        };
        let Some(request) = status.cloud_request.clone() else {
            continue;
        };
        let memo = memos.entry(name.clone()).or_default();
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
        if memo.identity.is_none()
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
        if !due || held || in_flight.contains(&name) {
            continue;
        }
        let since = match memo.seen {
            Some((generation, at)) if generation == request.generation => at,
            _ => {
                memo.seen = Some((request.generation, now));
                now
            }
        };
        out.push(Candidate {
            name,
            waiting_pods: request.waiting_pods,
            request,
            since,
        });
    }
    out
}

/// When the earliest retry of a failed node is due.
fn next_retry(memos: &HashMap<String, Memo>, now: Instant) -> Option<Duration> {
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
fn expected_cost(memo: &Memo, estimates: &Estimates) -> Cost {
    let mut reads = estimates.write_reads;
    if memo.identity.is_none() {
        reads += 2.0 + if estimates.resolved_any { 0.0 } else { 2.0 };
    } else if !memo.nic_known {
        reads += 1.0;
    }
    Cost { reads, writes: 1.0 }
}

fn finish(
    f: Finished,
    cloud: &AzureProvider,
    counters: &Counters,
    budget: &mut Budget,
    estimates: &mut Estimates,
    memos: &mut HashMap<String, Memo>,
    in_flight: &mut HashSet<String>,
) {
    let now = Instant::now();
    in_flight.remove(&f.name);
    let spent = Cost {
        reads: f.calls.reads as f64,
        writes: f.calls.writes as f64,
    };
    budget.settle(f.reserved, spent, now);
    if let Some(reported) = cloud.arm_budget() {
        if let Some(reads) = reported.remaining_reads {
            budget.reads.at_most(reads as f64, now);
        }
        if let Some(writes) = reported.remaining_writes {
            budget.writes.at_most(writes as f64, now);
        }
    }
    counters
        .arm_reads
        .fetch_add(f.calls.reads, Ordering::Relaxed);
    counters
        .arm_writes
        .fetch_add(f.calls.writes, Ordering::Relaxed);
    counters
        .throttled
        .fetch_add(f.calls.throttled, Ordering::Relaxed);
    let memo = memos.entry(f.name.clone()).or_default();
    let resolved = memo.identity.is_none() && f.done.identity.is_some();
    if resolved {
        estimates.resolved_any = true;
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
            }
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

fn retry_delay(error: &CloudError, failures: u32) -> Duration {
    if let Some(after) = error.retry_after() {
        return after;
    }
    let exp = Duration::from_secs(1).saturating_mul(1 << failures.saturating_sub(1).min(6));
    exp.min(MAX_RETRY_DELAY)
}
