//! The agent's core: allocation, release and GC over the IPAM state, the store and the cloud,
//! plus the background tasks (pool sizing, veth reaping, reconcile).
//!
//! Concurrency: one short `std::sync::Mutex` around the IPAM state. Nothing awaits while holding
//! it: a request takes the lock, changes the state, queues the matching records in the store
//! (preserving their order), drops the lock and then waits for its records to be durable — so
//! concurrent requests share fsyncs (group commit) and never wait on each other's I/O.
//!
//! The pool task is the only writer to the cloud. An allocation that finds no free address
//! registers as a waiter and kicks the pool task; the task sees all waiters at once and asks the
//! cloud for all of them in one write (coalescing). The waiter sleeps until the pool changes or
//! `allocate_timeout` passes (then "try again later"); when the subnet is full or the pool is at
//! its cap it fails at once with "exhausted".

use std::collections::{BTreeSet, HashSet};
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

/// How often the pool is compared with the cloud's view of the NIC in steady state.
/// (ARM reads are rate-limited per subscription: at 5 minutes, 1,000 nodes make ~3 reads/s.)
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(300);
/// The start-up reconcile is repeated after this long.
const FIRST_RECONCILE_REPEAT: Duration = Duration::from_secs(30);
/// How long the pool task sleeps when nobody kicks it.
const POOL_TICK: Duration = Duration::from_secs(1);
/// Retry delay for a veth deletion that failed.
const REAP_RETRY: Duration = Duration::from_secs(5);
/// Upper bound of the back-off between attempts to finish a failed release.
const MAX_RELEASE_BACKOFF_SECS: u64 = 300;

/// A dying veth to delete, and the address that waits for it (none for a leftover).
type ReapJob = (Option<Ipv4Addr>, String);

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
            (false, true) => st.waiters += 1,
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

    fn exhausted_reason(&self, st: &Inner) -> Option<String> {
        let now = self.epoch.elapsed();
        if st.subnet_full && st.memory.backoff_until.is_some_and(|u| now < u) {
            return Some(format!(
                "subnet {} has no free addresses (SubnetIsFull); the agent retries in the background",
                self.settings.subnet_id
            ));
        }
        let c = st.ipam.counts();
        let mut cap = st.pool.cap();
        if let Some(at) = st.memory.nic_limit_at {
            cap = cap.min(at);
        }
        // Addresses being released free NIC slots once the cloud confirms: worth waiting for.
        if c.total + c.releasing + st.pending >= cap && c.cooldown == 0 && c.releasing == 0 {
            return Some(format!(
                "all {cap} addresses this node may hold are allocated (pool.max = {}, NIC limit {})",
                st.pool.max,
                crate::config::NIC_SECONDARY_LIMIT
            ));
        }
        None
    }

    /// Allocates (or returns the existing) address of an attachment; durable before it returns.
    pub async fn allocate(&self, req: AllocateRequest) -> Result<AllocateResponse, AgentError> {
        if !self.is_ready() {
            return Err(AgentError::NotReady("the agent is not ready".into()));
        }
        let started = Instant::now();
        if let Some(dir) = &self.settings.spool_dir {
            // A release of this attachment the plugin spooled while the agent was away comes
            // first: drained after this allocation, it would free the new address.
            let path = dir.join(vnet_api::spool_file_name(&req.key));
            if path.exists() {
                self.apply_spool_file(&path).await.map_err(|e| {
                    AgentError::Internal(format!(
                        "a spooled release of this attachment must be applied first and failed: {e}"
                    ))
                })?;
            }
        }
        let deadline = tokio::time::Instant::now() + self.settings.allocate_timeout;
        let host_veth = vnet_api::host_veth_name(&self.settings.host_veth_prefix, &req.key);
        // Counted in `waiters` while it waits; the guard uncounts it however the wait ends,
        // including when the client goes away and the server drops this future.
        let mut waiting = WaiterGuard {
            agent: self,
            counted: false,
        };
        let mut kicked = false;
        let outcome = loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            enum Step {
                Done(Allocation, Ticket, bool),
                Fail(AgentError),
                Wait,
            }
            let step = {
                let mut st = self.state.lock().unwrap();
                let now = now_secs();
                st.ipam.promote_cooldowns(now);
                let step = match st.ipam.allocate(&req, host_veth.clone(), now) {
                    AllocOutcome::Existing(a) => {
                        Step::Done(a, self.store.submit(Vec::new()), false)
                    }
                    AllocOutcome::New(a, record) => {
                        Step::Done(a, self.store.submit(vec![record]), true)
                    }
                    AllocOutcome::Empty => match self.exhausted_reason(&st) {
                        Some(reason) => Step::Fail(AgentError::Exhausted(reason)),
                        None if self.stopping.load(Ordering::SeqCst) => {
                            Step::Fail(AgentError::TryAgainLater(
                                "no free address and the agent is shutting down".into(),
                            ))
                        }
                        None => Step::Wait,
                    },
                };
                waiting.set(&mut st, matches!(step, Step::Wait));
                step
            };
            match step {
                Step::Done(a, ticket, new) => {
                    self.kick.notify_one();
                    break self
                        .submit_timed(ticket)
                        .await
                        .map(|()| (a, new))
                        .map_err(|e| {
                            AgentError::Internal(format!("the allocation could not be stored: {e}"))
                        });
                }
                Step::Fail(e) => break Err(e),
                Step::Wait => {
                    if !kicked {
                        kicked = true;
                        self.kick.notify_one();
                    }
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        let mut st = self.state.lock().unwrap();
                        waiting.set(&mut st, false);
                        let why = st
                            .last_cloud_error
                            .clone()
                            .map_or_else(String::new, |e| format!("; last cloud error: {e}"));
                        break Err(AgentError::TryAgainLater(format!(
                            "no free address within {:?}; the pool is growing{why}",
                            self.settings.allocate_timeout
                        )));
                    }
                }
            }
        };
        self.metrics
            .allocate_latency
            .observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok((allocation, new)) => {
                info!(
                    container_id = %allocation.key.container_id,
                    ifname = %allocation.key.ifname,
                    pod = %pod_label(&allocation),
                    ip = %allocation.ip,
                    repeated = !new,
                    "allocated"
                );
                Ok(AllocateResponse {
                    allocation,
                    gateway: vnet_api::POD_GATEWAY,
                    mtu: self.settings.mtu,
                })
            }
            Err(e) => {
                warn!(container_id = %req.key.container_id, ifname = %req.key.ifname, error = %e, "allocation failed");
                Err(e)
            }
        }
    }

    /// Releases an attachment's address; durable before it returns. Also used by the spool drain
    /// before the agent is ready.
    pub async fn release(&self, req: ReleaseRequest) -> Result<ReleaseResponse, AgentError> {
        if let Some(veth) = &req.dying_veth {
            validate_dying_veth(veth)?;
        }
        let (released, ticket) = {
            let mut st = self.state.lock().unwrap();
            match st.ipam.release(
                &req.key,
                req.dying_veth.clone(),
                now_secs(),
                self.settings.cooldown_secs,
            ) {
                Some((allocation, records)) => (Some(allocation), self.store.submit(records)),
                // Wait for anything queued before (e.g. the same release, in flight).
                None => (None, self.store.submit(Vec::new())),
            }
        };
        let stored = self.submit_timed(ticket).await;
        // The reaper gets the veth even when the write failed: memory already holds the address
        // back until the link is gone, and nobody else would ever delete it (the store stops the
        // agent from allocating until a restart, whose sweep finds the tombstone again).
        if let Some(veth) = req.dying_veth {
            let _ = self.reaper_tx.send((released.as_ref().map(|a| a.ip), veth));
        }
        stored
            .map_err(|e| AgentError::Internal(format!("the release could not be stored: {e}")))?;
        match &released {
            Some(a) => info!(
                container_id = %a.key.container_id,
                ifname = %a.key.ifname,
                pod = %pod_label(a),
                ip = %a.ip,
                "released"
            ),
            None => {
                info!(container_id = %req.key.container_id, ifname = %req.key.ifname, "release of an unknown attachment (already released)")
            }
        }
        self.kick.notify_one();
        Ok(ReleaseResponse { released })
    }

    /// Applies the spooled release in `path`, if the file is still there, and deletes the file
    /// once the release is durable. `Ok(true)` when a release was applied. A file that is not a
    /// valid release is set aside as `.invalid`; on any other error the file stays for the next
    /// drain.
    pub async fn apply_spool_file(&self, path: &Path) -> Result<bool, AgentError> {
        let _serialized = self.spool_lock.lock().await;
        let request = match crate::spool::read_file(path) {
            Ok(Some(request)) => request,
            Ok(None) => return Ok(false),
            Err(e) => {
                return Err(AgentError::Internal(format!(
                    "cannot read spooled release {}: {e}",
                    path.display()
                )));
            }
        };
        match self.release(request).await {
            Ok(_) => {
                crate::spool::remove(path);
                Ok(true)
            }
            Err(AgentError::BadRequest(message)) => {
                warn!(file = %path.display(), message, "spooled release is invalid; set aside");
                crate::spool::set_aside(path);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Releases every allocation not in `valid`.
    pub async fn gc(&self, valid: Vec<AttachmentKey>) -> Result<GcResponse, AgentError> {
        let valid: HashSet<AttachmentKey> = valid.into_iter().collect();
        let (released, ticket) = {
            let mut st = self.state.lock().unwrap();
            let now = now_secs();
            let mut released = Vec::new();
            let mut records = Vec::new();
            for key in st.ipam.keys() {
                if valid.contains(&key) {
                    continue;
                }
                if let Some((a, r)) = st
                    .ipam
                    .release(&key, None, now, self.settings.cooldown_secs)
                {
                    released.push(a);
                    records.extend(r);
                }
            }
            (released, self.store.submit(records))
        };
        self.submit_timed(ticket)
            .await
            .map_err(|e| AgentError::Internal(format!("the GC could not be stored: {e}")))?;
        for a in &released {
            info!(container_id = %a.key.container_id, ifname = %a.key.ifname, pod = %pod_label(a), ip = %a.ip, "released by GC");
        }
        self.kick.notify_one();
        Ok(GcResponse { released })
    }

    pub fn allocations(&self) -> Vec<Allocation> {
        self.state.lock().unwrap().ipam.allocations()
    }

    /// Pods on their way to this node without an address (e.g. from a Kubernetes pod watch): the
    /// pool grows ahead of them. Replaces the previous value.
    pub fn set_pending_demand(&self, pods: u32) {
        let mut st = self.state.lock().unwrap();
        if st.demand != pods {
            st.demand = pods;
            self.kick.notify_one();
        }
    }

    /// Applies per-node overrides of `warm`, `batch` and `max` (`None`: the configured value) and
    /// returns the settings now in force. A combination the config would reject is refused as a
    /// whole, keeping the settings as they were.
    pub fn set_pool_overrides(
        &self,
        warm: Option<u32>,
        batch: Option<u32>,
        max: Option<u32>,
    ) -> Result<pool::Settings, String> {
        let base = self.settings.pool;
        let wanted = pool::Settings {
            warm: warm.unwrap_or(base.warm),
            batch: batch.unwrap_or(base.batch),
            max: max.unwrap_or(base.max),
            ..base
        };
        crate::config::check_pool_sizes(wanted.warm, wanted.batch, wanted.max)
            .map_err(|(key, message)| format!("{key}: {message}"))?;
        let mut st = self.state.lock().unwrap();
        if st.pool != wanted {
            info!(
                warm = wanted.warm,
                batch = wanted.batch,
                max = wanted.max,
                "pool settings changed"
            );
            st.pool = wanted;
            // The shrink hysteresis measured against the old settings.
            st.memory.excess_since = None;
            drop(st);
            self.kick.notify_one();
            // Waiters re-check whether the new cap leaves them any hope.
            self.changed.notify_waiters();
        }
        Ok(wanted)
    }

    fn pool_counts(st: &Inner) -> pool::Counts {
        let c = st.ipam.counts();
        pool::Counts {
            total: c.total,
            free: c.free,
            cooldown: c.cooldown,
            pending: st.pending,
            waiters: st.waiters,
            releasing: c.releasing,
            demand: st.demand,
        }
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

    /// Aligns the pool with the cloud's list of the NIC's addresses. A failed read changes
    /// nothing.
    pub async fn reconcile_with_cloud(&self) -> Result<ReconcileReport, CloudError> {
        let listed = match self.cloud.list_secondary_ips(&self.identity.nic_id).await {
            Ok(listed) => listed,
            Err(e) => {
                warn!(error = %e, "cannot read the NIC's addresses; keeping the pool as it is");
                let mut st = self.state.lock().unwrap();
                st.last_cloud_error = Some(e.to_string());
                st.next_reconcile = Some(Instant::now() + FIRST_RECONCILE_REPEAT);
                return Err(e);
            }
        };
        let on_nic: BTreeSet<Ipv4Addr> = listed.iter().map(|s| s.ip).collect();
        let (report, ticket) = {
            let mut st = self.state.lock().unwrap();
            let (report, records) = st.ipam.reconcile(&on_nic);
            // The first reconcile (start-up) is repeated soon: a cloud write the previous run
            // started just before dying may land after it.
            st.reconciles += 1;
            let delay = if st.reconciles == 1 {
                FIRST_RECONCILE_REPEAT
            } else {
                RECONCILE_INTERVAL
            };
            st.next_reconcile = Some(Instant::now() + delay);
            (report, self.store.submit(records))
        };
        let _ = self.submit_timed(ticket).await;
        if !report.adopted.is_empty() || !report.dropped.is_empty() || !report.recovered.is_empty()
        {
            info!(adopted = ?report.adopted, dropped = ?report.dropped, recovered = ?report.recovered, "pool reconciled with the cloud");
        }
        if !report.unreconciled.is_empty() {
            warn!(addresses = ?report.unreconciled, "allocated addresses the cloud does not show on the NIC: kept, never handed out again");
        }
        self.changed.notify_waiters();
        Ok(report)
    }

    /// Hands every known dying veth to the reaper and deletes leftover tombstones (start-up).
    /// Only names [`vnet_api::is_tombstone_name`] accepts are deleted: another link that merely
    /// starts with the prefix is not ours.
    pub async fn sweep_tombstones(&self, links: &dyn LinkOps) {
        let dying = self.state.lock().unwrap().ipam.dying();
        let known: HashSet<&str> = dying.iter().map(|(_, v)| v.as_str()).collect();
        match links.links_with_prefix(TOMBSTONE_PREFIX).await {
            Ok(names) => {
                for name in names.iter().filter(|n| !known.contains(n.as_str())) {
                    if vnet_api::is_tombstone_name(name) {
                        let _ = self.reaper_tx.send((None, name.clone()));
                    } else {
                        tracing::debug!(link = name, "not a tombstone name; left alone");
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot list leftover tombstone veths"),
        }
        for (ip, veth) in dying {
            let _ = self.reaper_tx.send((Some(ip), veth));
        }
    }

    /// Deletes dying veths; their address starts its cooldown once the link is gone.
    pub async fn run_reaper(self: Arc<Self>, links: Arc<dyn LinkOps>) {
        let Some(mut rx) = self.reaper_rx.lock().unwrap().take() else {
            return;
        };
        while let Some((ip, veth)) = rx.recv().await {
            match links.delete_link(&veth).await {
                Ok(()) => {
                    tracing::debug!(veth, "dying veth deleted");
                    if let Some(ip) = ip {
                        let ticket = {
                            let mut st = self.state.lock().unwrap();
                            st.ipam
                                .veth_gone(ip, now_secs(), self.settings.cooldown_secs)
                                .map(|r| self.store.submit(vec![r]))
                        };
                        if let Some(t) = ticket {
                            let _ = self.submit_timed(t).await;
                        }
                        self.kick.notify_one();
                    }
                }
                Err(e) => {
                    warn!(veth, error = %e, "cannot delete dying veth; retrying");
                    let tx = self.reaper_tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(REAP_RETRY).await;
                        let _ = tx.send((ip, veth));
                    });
                }
            }
        }
    }

    /// The pool task: sizes the pool and reconciles periodically until `shutdown` turns true.
    pub async fn run_pool(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            if *shutdown.borrow() {
                break;
            }
            self.pool_step().await;
            let due = self
                .state
                .lock()
                .unwrap()
                .next_reconcile
                .is_none_or(|t| Instant::now() >= t);
            if due {
                let _ = self.reconcile_with_cloud().await;
            }
            tokio::select! {
                _ = self.kick.notified() => {}
                _ = tokio::time::sleep(POOL_TICK) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// One pool decision and its execution.
    pub async fn pool_step(&self) {
        // A release a crash or an unreadable NIC interrupted is finished first, once its
        // back-off is over.
        let leftover = {
            let st = self.state.lock().unwrap();
            if st.release_retry_at.is_some_and(|t| Instant::now() < t) {
                Vec::new()
            } else {
                st.ipam.releasing()
            }
        };
        if !leftover.is_empty() {
            self.finish_release(leftover).await;
        }
        let decision = {
            let mut st = self.state.lock().unwrap();
            if st.ipam.promote_cooldowns(now_secs()) > 0 {
                self.changed.notify_waiters();
            }
            let counts = Self::pool_counts(&st);
            let now = self.epoch.elapsed();
            let settings = st.pool;
            let d = pool::decide(&counts, &settings, &mut st.memory, now);
            if let Decision::Grow(n) = d {
                st.pending = n;
            }
            d
        };
        match decision {
            Decision::Grow(n) => self.grow(n).await,
            Decision::Shrink(n) => {
                // After a failed release, the cloud is not asked again before the back-off ends.
                let backing_off = self
                    .state
                    .lock()
                    .unwrap()
                    .release_retry_at
                    .is_some_and(|t| Instant::now() < t);
                if !backing_off {
                    self.shrink(n).await;
                }
            }
            Decision::AtCap | Decision::BackingOff(_) => self.changed.notify_waiters(),
            Decision::Nothing => {}
        }
    }

    async fn grow(&self, n: u32) {
        info!(count = n, "asking the cloud for addresses");
        let result = self
            .cloud
            .assign_ips(&self.identity.nic_id, &self.settings.subnet_id, n as usize)
            .await;
        let mut reconcile = false;
        let ticket = {
            let mut st = self.state.lock().unwrap();
            st.pending = 0;
            match result {
                Ok(assigned) => {
                    st.subnet_full = false;
                    st.failures = 0;
                    st.memory.backoff_until = None;
                    let ips: Vec<Ipv4Addr> = assigned.iter().map(|s| s.ip).collect();
                    info!(count = ips.len(), "pool grew");
                    st.ipam
                        .add_to_pool(&ips)
                        .map(|r| self.store.submit(vec![r]))
                }
                Err(e) => {
                    warn!(error = %e, code = e.code(), "cloud refused new addresses");
                    st.last_cloud_error = Some(e.to_string());
                    st.failures = st.failures.saturating_add(1);
                    let exp = st.failures.saturating_sub(1).min(8);
                    let backoff = match &e {
                        CloudError::SubnetFull { .. } => {
                            st.subnet_full = true;
                            Some(Duration::from_secs((10u64 << exp).min(300)))
                        }
                        CloudError::NicLimitReached { .. } => {
                            let c = st.ipam.counts();
                            // What the NIC holds includes addresses still being released.
                            st.memory.nic_limit_at = Some(c.total + c.releasing);
                            None
                        }
                        _ => Some(Duration::from_secs((1u64 << exp).min(30))),
                    };
                    if let Some(b) = backoff {
                        st.memory.backoff_until = Some(self.epoch.elapsed() + b);
                    }
                    // The write may have happened even though we got an error: look.
                    reconcile = true;
                    None
                }
            }
        };
        if let Some(t) = ticket {
            let _ = self.submit_timed(t).await;
        }
        self.changed.notify_waiters();
        if reconcile {
            let _ = self.reconcile_with_cloud().await;
        }
    }

    async fn shrink(&self, n: u32) {
        let (ips, ticket) = {
            let mut st = self.state.lock().unwrap();
            let (ips, record) = st.ipam.take_for_release(n);
            (ips, record.map(|r| self.store.submit(vec![r])))
        };
        if ips.is_empty() {
            return;
        }
        // The intent is durable before the cloud hears of it.
        if let Some(t) = ticket
            && self.submit_timed(t).await.is_err()
        {
            return;
        }
        self.finish_release(ips).await;
    }

    /// Removes releasing addresses from the NIC. A failed call may still have changed the NIC
    /// (the answer can be lost after the write), so an address goes back to the pool only when a
    /// settled read still shows it; one the read no longer shows is released. Without a read the
    /// addresses stay releasing (never handed out, already journaled) and are retried after a
    /// back-off.
    async fn finish_release(&self, ips: Vec<Ipv4Addr>) {
        let error = match self.cloud.release_ips(&self.identity.nic_id, &ips).await {
            Ok(()) => {
                let ticket = {
                    let mut st = self.state.lock().unwrap();
                    st.release_failures = 0;
                    st.release_retry_at = None;
                    info!(count = ips.len(), addresses = ?ips, "pool shrank");
                    st.ipam
                        .release_done(&ips)
                        .map(|r| self.store.submit(vec![r]))
                };
                if let Some(t) = ticket {
                    let _ = self.submit_timed(t).await;
                }
                return;
            }
            Err(e) => e,
        };
        warn!(error = %error, addresses = ?ips, "cloud refused to release addresses; reading the NIC to see what it holds");
        let listed = self.cloud.list_secondary_ips(&self.identity.nic_id).await;
        let ticket = {
            let mut st = self.state.lock().unwrap();
            st.last_cloud_error = Some(error.to_string());
            st.release_failures = st.release_failures.saturating_add(1);
            let exp = st.release_failures.saturating_sub(1).min(8);
            let backoff = error
                .retry_after()
                .unwrap_or_default()
                .max(Duration::from_secs(
                    (1u64 << exp).min(MAX_RELEASE_BACKOFF_SECS),
                ));
            st.release_retry_at = Some(Instant::now() + backoff);
            if listed
                .as_ref()
                .is_ok_and(|l| !l.iter().any(|s| ips.contains(&s.ip)))
            {
                // The write happened after all: nothing to retry.
                st.release_failures = 0;
                st.release_retry_at = None;
            }
            match listed {
                Ok(listed) => {
                    let on_nic: HashSet<Ipv4Addr> = listed.iter().map(|s| s.ip).collect();
                    let (still, gone): (Vec<Ipv4Addr>, Vec<Ipv4Addr>) =
                        ips.iter().partition(|ip| on_nic.contains(ip));
                    if !still.is_empty() {
                        info!(addresses = ?still, "addresses still on the NIC return to the pool");
                    }
                    if !gone.is_empty() {
                        info!(addresses = ?gone, "addresses gone from the NIC despite the error: released");
                    }
                    let records: Vec<_> = st
                        .ipam
                        .add_to_pool(&still)
                        .into_iter()
                        .chain(st.ipam.release_done(&gone))
                        .collect();
                    (!records.is_empty()).then(|| self.store.submit(records))
                }
                Err(e) => {
                    warn!(error = %e, addresses = ?ips, retry_in = ?backoff, "cannot read the NIC either; the addresses stay releasing");
                    None
                }
            }
        };
        if let Some(t) = ticket {
            let _ = self.submit_timed(t).await;
            self.changed.notify_waiters();
        }
    }

    /// Waits until everything queued in the store is durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.store.submit(Vec::new()).wait().await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use async_trait::async_trait;
    use vnet_cloud::SecondaryIp;
    use vnet_cloud::fake::FakeCloud;

    use super::*;
    use crate::store::MemoryStore;

    /// The fake cloud, plus the two ways a release can go wrong: the write lands but the answer
    /// is an error, and the NIC cannot be read.
    #[derive(Default)]
    struct FlakyCloud {
        fake: FakeCloud,
        /// The next release writes, then reports an error.
        release_lands_then_fails: AtomicBool,
        /// The next release fails without writing.
        release_fails: AtomicBool,
        /// The next reads fail.
        list_failures: AtomicUsize,
        list_calls: AtomicUsize,
    }

    #[async_trait]
    impl CloudProvider for FlakyCloud {
        async fn discover(&self) -> Result<NodeIdentity, CloudError> {
            self.fake.discover().await
        }

        async fn list_secondary_ips(&self, nic_id: &str) -> Result<Vec<SecondaryIp>, CloudError> {
            self.list_calls.fetch_add(1, Ordering::SeqCst);
            if self
                .list_failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(CloudError::Transient("read failed".into()));
            }
            self.fake.list_secondary_ips(nic_id).await
        }

        async fn assign_ips(
            &self,
            nic_id: &str,
            subnet_id: &str,
            count: usize,
        ) -> Result<Vec<SecondaryIp>, CloudError> {
            self.fake.assign_ips(nic_id, subnet_id, count).await
        }

        async fn release_ips(&self, nic_id: &str, ips: &[Ipv4Addr]) -> Result<(), CloudError> {
            if self.release_fails.swap(false, Ordering::SeqCst) {
                return Err(CloudError::Transient("release failed".into()));
            }
            let result = self.fake.release_ips(nic_id, ips).await;
            if self.release_lands_then_fails.swap(false, Ordering::SeqCst) {
                return Err(CloudError::Transient("answer lost".into()));
            }
            result
        }
    }

    fn settings(cloud: &FakeCloud) -> AgentSettings {
        AgentSettings {
            node_name: "node-1".into(),
            pool: pool::Settings {
                warm: 0,
                batch: 1,
                max: 10,
                release_delay: Duration::from_secs(3600),
            },
            cooldown_secs: 30,
            allocate_timeout: Duration::from_secs(30),
            host_veth_prefix: "vnet".into(),
            mtu: 1500,
            subnet_id: cloud.identity().subnet_id.clone(),
            spool_dir: None,
        }
    }

    fn agent_with(cloud: Arc<FlakyCloud>, store: Arc<MemoryStore>) -> Arc<Agent> {
        agent_with_settings(cloud.clone(), store, settings(&cloud.fake))
    }

    fn agent_with_settings(
        cloud: Arc<FlakyCloud>,
        store: Arc<MemoryStore>,
        settings: AgentSettings,
    ) -> Arc<Agent> {
        let identity = cloud.fake.identity().clone();
        let agent = Agent::new(
            settings,
            identity,
            cloud,
            store,
            StoreState::default(),
            Arc::new(Metrics::new()),
        );
        agent.set_ready(true);
        agent
    }

    fn request(id: &str) -> AllocateRequest {
        AllocateRequest {
            key: format!("{id}/eth0").parse().unwrap(),
            network: None,
            netns: None,
            pod: Default::default(),
        }
    }

    /// Puts `n` addresses on the NIC and in the pool, then takes `take` of them for release.
    async fn pool_with_releasing(
        agent: &Agent,
        cloud: &FlakyCloud,
        n: usize,
        take: u32,
    ) -> Vec<Ipv4Addr> {
        let nic = &cloud.fake.identity().nic_id;
        let subnet = cloud.fake.identity().subnet_id.clone();
        let assigned = cloud.fake.assign_ips(nic, &subnet, n).await.unwrap();
        let ips: Vec<Ipv4Addr> = assigned.iter().map(|s| s.ip).collect();
        let mut st = agent.state.lock().unwrap();
        let records: Vec<_> = st.ipam.add_to_pool(&ips).into_iter().collect();
        let _ = agent.store.submit(records);
        let (taken, record) = st.ipam.take_for_release(take);
        let _ = agent.store.submit(record.into_iter().collect());
        taken
    }

    #[tokio::test]
    async fn a_failed_release_still_on_the_nic_returns_to_the_pool() {
        let cloud = Arc::new(FlakyCloud::default());
        let store = Arc::new(MemoryStore::new());
        let agent = agent_with(cloud.clone(), store.clone());
        let taken = pool_with_releasing(&agent, &cloud, 2, 1).await;
        cloud.release_fails.store(true, Ordering::SeqCst);
        agent.finish_release(taken.clone()).await;
        assert!(cloud.fake.secondary_ips().contains(&taken[0]));
        let st = agent.state.lock().unwrap();
        assert!(st.ipam.releasing().is_empty());
        assert!(st.ipam.pool().contains(&taken[0]));
        assert_eq!(st.ipam.counts().free, 2);
        st.ipam.check();
        assert!(store.state().pool.contains(&taken[0]));
        assert!(store.state().releasing.is_empty());
    }

    #[tokio::test]
    async fn a_failed_release_that_landed_anyway_is_done_and_never_reused() {
        let cloud = Arc::new(FlakyCloud::default());
        let store = Arc::new(MemoryStore::new());
        let agent = agent_with(cloud.clone(), store.clone());
        let taken = pool_with_releasing(&agent, &cloud, 2, 1).await;
        cloud.release_lands_then_fails.store(true, Ordering::SeqCst);
        agent.finish_release(taken.clone()).await;
        assert!(!cloud.fake.secondary_ips().contains(&taken[0]));
        {
            let st = agent.state.lock().unwrap();
            assert!(st.ipam.releasing().is_empty());
            assert!(!st.ipam.pool().contains(&taken[0]));
            assert_eq!(st.ipam.counts().free, 1);
            st.ipam.check();
        }
        let durable = store.state();
        assert!(!durable.pool.contains(&taken[0]) && !durable.releasing.contains(&taken[0]));
        // An allocation gets the address left, never the released one.
        let a = agent.allocate(request("a")).await.unwrap();
        assert_ne!(a.allocation.ip, taken[0]);
    }

    #[tokio::test]
    async fn a_failed_release_with_an_unreadable_nic_stays_releasing_and_backs_off() {
        let cloud = Arc::new(FlakyCloud::default());
        let store = Arc::new(MemoryStore::new());
        let agent = agent_with(cloud.clone(), store.clone());
        let taken = pool_with_releasing(&agent, &cloud, 2, 1).await;
        cloud.release_fails.store(true, Ordering::SeqCst);
        cloud.list_failures.store(1, Ordering::SeqCst);
        agent.finish_release(taken.clone()).await;
        {
            let st = agent.state.lock().unwrap();
            assert_eq!(st.ipam.releasing(), taken, "neither reused nor forgotten");
            assert_eq!(st.ipam.counts().free, 1);
            st.ipam.check();
        }
        assert_eq!(store.state().releasing, taken.iter().copied().collect());
        // The next pool steps do not call the cloud again during the back-off.
        let releases = cloud.fake.release_calls();
        agent.pool_step().await;
        agent.pool_step().await;
        assert_eq!(cloud.fake.release_calls(), releases);
        // Once the back-off is over the release is finished.
        agent.state.lock().unwrap().release_retry_at = Some(Instant::now());
        agent.pool_step().await;
        assert!(agent.state.lock().unwrap().ipam.releasing().is_empty());
        assert!(!cloud.fake.secondary_ips().contains(&taken[0]));
        assert!(store.state().releasing.is_empty());
    }

    #[tokio::test]
    async fn a_cancelled_waiting_allocation_does_not_leak_its_waiter() {
        let cloud = Arc::new(FlakyCloud::default());
        let agent = agent_with(cloud, Arc::new(MemoryStore::new()));
        // Nothing in the pool and no pool task: the allocation waits. The client gives up
        // (plugin killed, connection closed) and the server drops the handler future.
        let mut allocation = Box::pin(agent.allocate(request("abc")));
        assert!(
            futures::poll!(allocation.as_mut()).is_pending(),
            "the allocation waits"
        );
        assert_eq!(agent.state.lock().unwrap().waiters, 1);
        drop(allocation);
        assert_eq!(agent.state.lock().unwrap().waiters, 0, "waiter leaked");
    }

    #[tokio::test]
    async fn a_spooled_release_is_applied_before_the_same_attachment_allocates_again() {
        let spool = tempfile::tempdir().unwrap();
        let cloud = Arc::new(FlakyCloud::default());
        let store = Arc::new(MemoryStore::new());
        let settings = AgentSettings {
            spool_dir: Some(spool.path().to_owned()),
            ..settings(&cloud.fake)
        };
        let agent = agent_with_settings(cloud.clone(), store.clone(), settings);
        pool_with_releasing(&agent, &cloud, 2, 0).await;
        let first = agent.allocate(request("abc")).await.unwrap().allocation;
        // DEL while the agent was unreachable: the plugin spooled the release. The runtime then
        // runs ADD for the same attachment again.
        let spooled = spool
            .path()
            .join(vnet_api::spool_file_name(&request("abc").key));
        let release = ReleaseRequest {
            key: request("abc").key,
            dying_veth: None,
        };
        std::fs::write(&spooled, serde_json::to_vec(&release).unwrap()).unwrap();
        let second = agent.allocate(request("abc")).await.unwrap().allocation;
        assert_ne!(
            second.ip, first.ip,
            "the old address is released (cooling down), not handed back"
        );
        assert!(!spooled.exists(), "the applied release's file is deleted");
        // The periodic drain finds nothing that could free the new allocation.
        assert_eq!(crate::daemon::drain_spool(&agent, spool.path()).await, 0);
        assert_eq!(agent.allocations(), vec![second.clone()]);
        let durable = store.state();
        assert_eq!(durable.allocations[&second.key].ip, second.ip);
        assert!(durable.cooldown.contains_key(&first.ip));
    }

    #[tokio::test]
    async fn a_drain_that_listed_a_file_an_allocation_consumed_applies_nothing() {
        let spool = tempfile::tempdir().unwrap();
        let cloud = Arc::new(FlakyCloud::default());
        let settings = AgentSettings {
            spool_dir: Some(spool.path().to_owned()),
            ..settings(&cloud.fake)
        };
        let agent = agent_with_settings(cloud.clone(), Arc::new(MemoryStore::new()), settings);
        pool_with_releasing(&agent, &cloud, 2, 0).await;
        agent.allocate(request("abc")).await.unwrap();
        let spooled = spool
            .path()
            .join(vnet_api::spool_file_name(&request("abc").key));
        let release = ReleaseRequest {
            key: request("abc").key,
            dying_veth: None,
        };
        std::fs::write(&spooled, serde_json::to_vec(&release).unwrap()).unwrap();
        let listed = crate::spool::read_spool(spool.path()).unwrap();
        let fresh = agent.allocate(request("abc")).await.unwrap().allocation;
        // The drain goes on with what it listed before the allocation.
        for entry in listed {
            assert!(!agent.apply_spool_file(&entry.path).await.unwrap());
        }
        assert_eq!(agent.allocations(), vec![fresh]);
    }

    #[tokio::test]
    async fn a_release_whose_write_fails_still_hands_its_veth_to_the_reaper() {
        let cloud = Arc::new(FlakyCloud::default());
        let store = Arc::new(MemoryStore::new());
        let agent = agent_with(cloud.clone(), store.clone());
        let links = Arc::new(crate::netlink::FakeLinks::default());
        let tombstone = vnet_api::tombstone_veth_name("vnet0123456789a");
        links.links.lock().unwrap().insert(tombstone.clone());
        tokio::spawn(agent.clone().run_reaper(links.clone()));
        pool_with_releasing(&agent, &cloud, 1, 0).await;
        agent.allocate(request("abc")).await.unwrap();
        store.fail_next(1);
        let result = agent
            .release(ReleaseRequest {
                key: request("abc").key,
                dying_veth: Some(tombstone.clone()),
            })
            .await;
        assert!(matches!(result, Err(AgentError::Internal(_))), "{result:?}");
        assert!(!agent.is_ready(), "a failed store write stops allocations");
        for _ in 0..1_000 {
            if links.deleted.lock().unwrap().contains(&tombstone) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            links.deleted.lock().unwrap().contains(&tombstone),
            "the tombstone is deleted"
        );
    }

    #[tokio::test]
    async fn shutting_down_fails_waiting_allocations_at_once() {
        let cloud = Arc::new(FlakyCloud::default());
        let agent = agent_with(cloud, Arc::new(MemoryStore::new()));
        let mut allocation = Box::pin(agent.allocate(request("abc")));
        assert!(futures::poll!(allocation.as_mut()).is_pending());
        agent.stop_waiting();
        let err = allocation.await.unwrap_err();
        assert!(
            matches!(&err, AgentError::TryAgainLater(m) if m.contains("shutting down")),
            "{err:?}"
        );
        assert_eq!(agent.state.lock().unwrap().waiters, 0);
    }
}
