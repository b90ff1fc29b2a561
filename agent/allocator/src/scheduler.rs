//! The allocator's loop: the Lease, the watch, and starting jobs in the queue's order when ARM's
//! budget lets them ([`crate::queue`] says which nodes and in which order).
//!
//! - The order is strict: when the budget cannot pay for the first node's job yet, no later
//!   node's job starts in its place.
//! - A job reserves its expected ARM calls before it starts; its calls are counted as it sends
//!   them ([`crate::budget`]); after a 429 nothing starts until its `Retry-After` has passed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use vnet_cloud::CloudError;
use vnet_cloud::azure::{ArmCalls, AzureProvider, CallCounter, count_calls_into};
use vnet_kube::crd::NodeIPPool;

use crate::budget::{Budget, Cost};
use crate::lease::{self, Leadership, LeaseSettings};
use crate::queue::{Estimates, Memo, candidates, expected_cost, next_retry, order, retry_delay};
use crate::work::{self, Done, Outcome};
use crate::{Counters, Settings};

/// The longest the loop sleeps without looking again (leadership may have changed).
const IDLE_TICK: Duration = Duration::from_millis(500);

struct Finished {
    name: String,
    done: Done,
    calls: ArmCalls,
}

/// The jobs under way: what each reserved, and what it has sent so far.
struct InFlight {
    jobs: HashMap<String, (Cost, Arc<CallCounter>)>,
}

impl InFlight {
    fn new() -> InFlight {
        InFlight {
            jobs: HashMap::new(),
        }
    }

    fn names(&self) -> HashSet<String> {
        self.jobs.keys().cloned().collect()
    }

    /// What the jobs under way reserved and have not sent yet (a job that sent more than it
    /// reserved owes nothing here: the level already took it).
    fn outstanding(&self) -> Cost {
        let mut owed = Cost::default();
        for (reserved, counter) in self.jobs.values() {
            let sent = counter.calls();
            owed.add(Cost {
                reads: (reserved.reads - sent.reads as f64).max(0.0),
                writes: (reserved.writes - sent.writes as f64).max(0.0),
            });
        }
        owed
    }
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

    let sent = cloud.arm_calls();
    let mut budget = Budget::new(
        settings.reads,
        settings.writes,
        Instant::now(),
        Cost {
            reads: sent.reads as f64,
            writes: sent.writes as f64,
        },
    );
    let mut estimates = Estimates {
        write_reads: 2.0,
        resolved_any: false,
    };
    let mut memos: HashMap<String, Memo> = HashMap::new();
    let mut in_flight = InFlight::new();
    let mut jobs: JoinSet<Finished> = JoinSet::new();

    let mut was_leading = false;
    loop {
        let leading = leadership.leading();
        counters
            .leading
            .store(u64::from(leading), Ordering::Relaxed);
        if was_leading && !leading {
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
        was_leading = leading;
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
                        in_flight.jobs.clear();
                    }
                }
            }
            _ = tokio::time::sleep(wake) => {}
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
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
    in_flight: &mut InFlight,
    jobs: &mut JoinSet<Finished>,
) -> Option<Duration> {
    let now = Instant::now();
    let mut candidates = candidates(store, memos, &in_flight.names(), now);
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
    order(&mut candidates);
    if let Some(until) = cloud.throttled_until() {
        return Some(until.saturating_duration_since(now));
    }
    let sent = cloud.arm_calls();
    budget.advance(now, sent.reads, sent.writes);
    let mut outstanding = in_flight.outstanding();
    let mut started = 0;
    for candidate in candidates {
        if in_flight.jobs.len() >= settings.max_in_flight {
            break;
        }
        let memo = memos.entry(candidate.name.clone()).or_default();
        let cost = expected_cost(memo, estimates);
        let wait = budget.wait_for(cost, outstanding);
        if !wait.is_zero() {
            // Strict priority: the first node waits for the budget, nobody overtakes it.
            depth(started);
            return Some(wait);
        }
        outstanding.add(cost);
        let counter = Arc::new(CallCounter::default());
        in_flight
            .jobs
            .insert(candidate.name.clone(), (cost, counter.clone()));
        started += 1;
        let pools = pools.clone();
        let cloud = cloud.clone();
        let known = memo.identity.clone();
        let timeout = settings.request_timeout;
        let name = candidate.name;
        tracing::debug!(node = %name, generation = candidate.request.generation, waiting = candidate.waiting_pods, ?cost, "starting job");
        jobs.spawn(async move {
            let work = work::run(
                pools,
                cloud,
                name.clone(),
                candidate.request,
                known,
                timeout,
            );
            let done = count_calls_into(counter.clone(), work).await;
            Finished {
                name,
                done,
                calls: counter.calls(),
            }
        });
    }
    depth(started);
    None
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
    in_flight.jobs.remove(&f.name);
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
