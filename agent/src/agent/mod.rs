//! The agent's core: allocation, release and GC over the IPAM state, the store and the cloud,
//! plus the background tasks (pool sizing, veth reaping, reconcile).
//!
//! Where things happen: [`allocate`](self::allocate) (ADD), [`release`](self::release) (DEL and the
//! plugin's spool), [`gc`](self::gc) (CNI GC), [`sizing`](self::sizing) (the pool task: grow,
//! shrink, and the cloud side of every release), [`reap`](self::reap) (dying veths) and
//! [`reconcile`](self::reconcile) (the cloud's view of the NIC). This file holds the shared state
//! and the status.
//!
//! Concurrency: one short `std::sync::Mutex` around the IPAM state. Nothing awaits while holding
//! it: a request takes the lock, changes the state, queues the matching records in the store
//! (preserving their order), drops the lock and then waits for its records to be durable — so
//! concurrent requests share fsyncs (group commit) and never wait on each other's I/O.
//!
//! The pool task is the only writer to the cloud. An allocation that finds no free address
//! registers as a waiter and kicks the pool task; the task lets the burst gather (until no new
//! waiter has come for a short quiet gap, bounded, see [`pool::GATHER`]) and asks the cloud for
//! all of them, plus the warm target, in one write. The waiter sleeps until the pool changes or
//! `allocate_timeout` passes (then "try again later"); when the subnet is full or the pool is at
//! its cap it fails at once with "exhausted".

use std::collections::HashSet;
// The test modules take it from here (`use super::*`); the agent itself no longer needs it.
#[cfg(test)]
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, mpsc, watch};
use tracing::{info, warn};
use vnet_api::{
    AllocateRequest, AllocateResponse, Allocation, AttachmentKey, ErrorCode, ErrorResponse,
    GcResponse, PoolStatus, ReleaseRequest, ReleaseResponse, StatusResponse, TOMBSTONE_PREFIX,
};
use vnet_cloud::{CloudError, CloudProvider, NodeIdentity};

use crate::ipam::{AllocOutcome, Ipam, ReconcileReport};
use crate::metrics::Metrics;
use crate::netlink::LinkOps;
use crate::pool::{self, Decision};
use crate::store::{Store, StoreError, StoreState, Ticket};

mod allocate;
mod gc;
#[cfg(test)]
mod prefix_tests;
mod reap;
mod reconcile;
mod release;
mod sizing;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_burst;

/// How often the pool is compared with the cloud's view of the NIC in steady state.
/// (ARM reads are rate-limited per subscription: at 5 minutes, 1,000 nodes make ~3 reads/s.)
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(300);
/// The start-up reconcile is repeated after this long.
const FIRST_RECONCILE_REPEAT: Duration = Duration::from_secs(30);
/// How long the pool task sleeps when nobody kicks it.
const POOL_TICK: Duration = Duration::from_secs(1);
/// Retry delay for a veth deletion that failed.
const REAP_RETRY: Duration = Duration::from_secs(5);
/// How often a failed store is re-opened from disk (the pool task tries).
const STORE_RECOVER_INTERVAL: Duration = Duration::from_secs(5);
/// Upper bound of the back-off between attempts to finish a failed release.
const MAX_RELEASE_BACKOFF_SECS: u64 = 300;

pub(crate) use reap::ReapJob;

#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub node_name: String,
    pub pool: pool::Settings,
    pub cooldown_secs: u64,
    pub allocate_timeout: Duration,
    pub host_veth_prefix: String,
    pub mtu: u32,
    /// Subnet to draw pod addresses from (ARM ID).
    pub subnet_id: String,
    /// The plugin's release spool: an attachment's spooled release is applied before the agent
    /// allocates for it again. `None`: no spool (tests).
    pub spool_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    TryAgainLater(String),
    #[error("{0}")]
    Exhausted(String),
    #[error("{0}")]
    NotReady(String),
    #[error("{0}")]
    Internal(String),
}

impl AgentError {
    pub fn code(&self) -> ErrorCode {
        match self {
            AgentError::BadRequest(_) => ErrorCode::BadRequest,
            AgentError::TryAgainLater(_) => ErrorCode::TryAgainLater,
            AgentError::Exhausted(_) => ErrorCode::Exhausted,
            AgentError::NotReady(_) => ErrorCode::NotReady,
            AgentError::Internal(_) => ErrorCode::Internal,
        }
    }

    pub fn to_response(&self) -> ErrorResponse {
        ErrorResponse {
            code: self.code(),
            message: self.to_string(),
        }
    }
}

struct Inner {
    ipam: Ipam,
    /// The configured pool settings with any per-node overrides applied.
    pool: pool::Settings,
    memory: pool::Memory,
    pending: u32,
    waiters: u32,
    /// Allocations that took a new address or started waiting, ever: the pool task's gather
    /// window watches it.
    arrivals: u64,
    /// When the latest of them came: a top-up decided right after it gathers too.
    last_arrival: Option<tokio::time::Instant>,
    demand: u32,
    subnet_full: bool,
    failures: u32,
    last_cloud_error: Option<String>,
    store_error: Option<String>,
    /// When the pool task compares the pool with the NIC again.
    next_reconcile: Option<Instant>,
    reconciles: u64,
    /// Consecutive failed releases, and when the next may be tried.
    release_failures: u32,
    release_retry_at: Option<Instant>,
}

impl Inner {
    fn note_arrival(&mut self) {
        self.arrivals += 1;
        self.last_arrival = Some(tokio::time::Instant::now());
    }
}

pub struct Agent {
    settings: AgentSettings,
    identity: NodeIdentity,
    cloud: Arc<dyn CloudProvider>,
    store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    state: Mutex<Inner>,
    /// The pool changed (addresses added, a cloud write finished, a cooldown ended).
    changed: Notify,
    /// Wake the pool task.
    kick: Notify,
    reaper_tx: mpsc::UnboundedSender<ReapJob>,
    reaper_rx: Mutex<Option<mpsc::UnboundedReceiver<ReapJob>>>,
    ready: AtomicBool,
    /// Shutting down: allocations that would wait fail at once instead.
    stopping: AtomicBool,
    epoch: Instant,
    /// Held while a spool file is applied, so a drain that listed a file cannot apply it after an
    /// allocation for the same attachment has consumed it.
    spool_lock: tokio::sync::Mutex<()>,
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn pod_label(a: &Allocation) -> String {
    match (&a.pod.namespace, &a.pod.name) {
        (Some(ns), Some(name)) => format!("{ns}/{name}"),
        (None, Some(name)) => name.clone(),
        _ => "-".into(),
    }
}

/// An allocation counted in `Inner::waiters`; uncounts it when dropped.
struct WaiterGuard<'a> {
    agent: &'a Agent,
    counted: bool,
}

impl WaiterGuard<'_> {
    /// Counts or uncounts the allocation (under the caller's lock).
    fn set(&mut self, st: &mut Inner, waiting: bool) {
        match (self.counted, waiting) {
            (false, true) => {
                st.waiters += 1;
                st.note_arrival();
                // A provider that shares the cloud (cluster mode) lets these join a write that
                // is still unanswered; the Azure provider ignores it.
                let unserved = st.waiters.saturating_sub(st.ipam.counts().free);
                self.agent.cloud.set_waiting_pods(unserved);
            }
            (true, false) => st.waiters -= 1,
            _ => {}
        }
        self.counted = waiting;
    }
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        if self.counted {
            // Never dropped while its allocation holds the lock: `set` uncounts it first.
            self.agent.state.lock().unwrap().waiters -= 1;
        }
    }
}

/// A tombstone name from a request: must be one, or the agent could be told to delete `eth0`.
pub fn validate_dying_veth(name: &str) -> Result<(), AgentError> {
    if vnet_api::is_tombstone_name(name) {
        Ok(())
    } else {
        Err(AgentError::BadRequest(format!(
            "dying_veth {name:?} is not a tombstone name (\"{TOMBSTONE_PREFIX}\" followed by lowercase hex digits, {} bytes in all)",
            vnet_api::IFNAME_MAX
        )))
    }
}

impl Agent {
    pub fn new(
        settings: AgentSettings,
        identity: NodeIdentity,
        cloud: Arc<dyn CloudProvider>,
        store: Arc<dyn Store>,
        loaded: StoreState,
        metrics: Arc<Metrics>,
    ) -> Arc<Agent> {
        let (reaper_tx, reaper_rx) = mpsc::unbounded_channel();
        let pool = settings.pool;
        metrics
            .node_info
            .get_or_create(&crate::metrics::NodeLabels {
                kind: identity.kind.as_str(),
                scale_set: identity.scale_set.clone(),
            })
            .set(1);
        Arc::new(Agent {
            settings,
            identity,
            cloud,
            store,
            metrics,
            state: Mutex::new(Inner {
                ipam: Ipam::from_state(loaded),
                pool,
                memory: pool::Memory::default(),
                pending: 0,
                waiters: 0,
                arrivals: 0,
                last_arrival: None,
                demand: 0,
                subnet_full: false,
                failures: 0,
                last_cloud_error: None,
                store_error: None,
                next_reconcile: None,
                reconciles: 0,
                release_failures: 0,
                release_retry_at: None,
            }),
            changed: Notify::new(),
            kick: Notify::new(),
            reaper_tx,
            reaper_rx: Mutex::new(Some(reaper_rx)),
            ready: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            epoch: Instant::now(),
            spool_lock: tokio::sync::Mutex::new(()),
        })
    }

    pub fn settings(&self) -> &AgentSettings {
        &self.settings
    }

    pub fn identity(&self) -> &NodeIdentity {
        &self.identity
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// The agent is shutting down: allocations waiting for the pool fail now with "try again
    /// later" instead of holding the shutdown up until their timeout.
    pub fn stop_waiting(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && self.state.lock().unwrap().store_error.is_none()
    }

    fn submit_timed(&self, ticket: Ticket) -> impl Future<Output = Result<(), StoreError>> + '_ {
        let started = Instant::now();
        async move {
            let r = ticket.wait().await;
            self.metrics
                .store_commit_latency
                .observe(started.elapsed().as_secs_f64());
            if let Err(e) = &r {
                self.state.lock().unwrap().store_error = Some(e.to_string());
                tracing::error!(error = %e, "store write failed; the agent stops allocating");
            }
            r
        }
    }

    pub fn allocations(&self) -> Vec<Allocation> {
        self.state.lock().unwrap().ipam.allocations()
    }
    pub fn status(&self) -> StatusResponse {
        let ready = self.is_ready();
        let st = self.state.lock().unwrap();
        let c = st.ipam.counts();
        let target = pool::target(&Self::pool_counts(&st), &st.pool, &st.memory);
        let exhausted = if c.free == 0 {
            self.exhausted_reason(&st)
        } else {
            None
        };
        let reason = if !ready {
            Some(st.store_error.clone().map_or_else(
                || "the agent is starting".into(),
                |e| format!("store failed: {e}"),
            ))
        } else {
            exhausted.clone()
        };
        let status = StatusResponse {
            ready,
            can_allocate: ready && exhausted.is_none(),
            reason,
            node: self.settings.node_name.clone(),
            pool: PoolStatus {
                total: c.total,
                allocated: c.allocated,
                free: c.free,
                cooldown: c.cooldown,
                target,
                pending: st.pending,
                max: st.pool.cap(),
            },
            subnet_full: st.subnet_full,
            last_cloud_error: st.last_cloud_error.clone(),
            unreconciled: st.ipam.unreconciled(),
        };
        drop(st);
        let m = &self.metrics;
        m.set_ips("total", c.total);
        m.set_ips("allocated", c.allocated);
        m.set_ips("free", c.free);
        m.set_ips("cooldown", c.cooldown);
        m.set_ips("pending", status.pool.pending);
        m.set_ips("unreconciled", c.unreconciled);
        m.pool_target.set(target as i64);
        m.subnet_full.set(status.subnet_full as i64);
        status
    }

    /// Whether a store write failed and the store has not been recovered yet.
    pub(super) fn store_failed(&self) -> bool {
        self.state.lock().unwrap().store_error.is_some()
    }

    /// After a failed store write: re-opens the store from disk (once writes succeed again) and
    /// rebuilds the in-memory state from it, so whatever the failed writes described and memory
    /// already held is forgotten exactly as a restart would forget it. The cloud is read again
    /// at once (addresses whose records failed are adopted), and dying veths go to the reaper
    /// again. `true` when the agent allocates again.
    pub async fn recover_store(&self) -> bool {
        let state = match self.store.recover().wait().await {
            Ok(state) => state,
            Err(e) => {
                warn!(error = %e, retry_in = ?STORE_RECOVER_INTERVAL, "the store cannot be re-opened yet");
                return false;
            }
        };
        let dying = {
            let mut st = self.state.lock().unwrap();
            st.ipam = Ipam::from_state(state);
            st.store_error = None;
            st.next_reconcile = Some(Instant::now());
            // Under the lock: every record queued from here on is computed against the new state.
            self.store.resume();
            st.ipam.dying()
        };
        for (ip, veth) in dying {
            let _ = self.reaper_tx.send(ReapJob::background(Some(ip), veth));
        }
        info!("store re-opened from disk after a failed write; the agent allocates again");
        self.changed.notify_waiters();
        self.kick.notify_one();
        true
    }

    /// Waits until everything queued in the store is durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.store.submit(Vec::new()).wait().await
    }
}
