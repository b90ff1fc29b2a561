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
    epoch: Instant,
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

/// A tombstone name from a request: must be one, or the agent could be told to delete `eth0`.
pub fn validate_dying_veth(name: &str) -> Result<(), AgentError> {
    let valid = name.starts_with(TOMBSTONE_PREFIX)
        && name.len() <= vnet_api::IFNAME_MAX
        && name.chars().all(|c| c.is_ascii_alphanumeric());
    if valid {
        Ok(())
    } else {
        Err(AgentError::BadRequest(format!(
            "dying_veth {name:?} is not a tombstone name (\"{TOMBSTONE_PREFIX}\" followed by letters or digits, at most {} bytes)",
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
            }),
            changed: Notify::new(),
            kick: Notify::new(),
            reaper_tx,
            reaper_rx: Mutex::new(Some(reaper_rx)),
            ready: AtomicBool::new(false),
            epoch: Instant::now(),
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
        if c.total + st.pending >= cap && c.cooldown == 0 {
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
        let deadline = tokio::time::Instant::now() + self.settings.allocate_timeout;
        let host_veth = vnet_api::host_veth_name(&self.settings.host_veth_prefix, &req.key);
        let mut waiting = false;
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
                        None => Step::Wait,
                    },
                };
                match (&step, waiting) {
                    (Step::Wait, false) => st.waiters += 1,
                    (Step::Done(..) | Step::Fail(_), true) => st.waiters -= 1,
                    _ => {}
                }
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
                    if !waiting {
                        waiting = true;
                        self.kick.notify_one();
                    }
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        let mut st = self.state.lock().unwrap();
                        st.waiters -= 1;
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
        self.submit_timed(ticket)
            .await
            .map_err(|e| AgentError::Internal(format!("the release could not be stored: {e}")))?;
        if let Some(veth) = req.dying_veth {
            let _ = self.reaper_tx.send((released.as_ref().map(|a| a.ip), veth));
        }
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
        let limit = crate::config::NIC_SECONDARY_LIMIT;
        if wanted.max == 0 || wanted.max > limit {
            return Err(format!(
                "max {} is out of range; use 1 to {limit}",
                wanted.max
            ));
        }
        if wanted.batch == 0 || wanted.batch > wanted.max {
            return Err(format!(
                "batch {} is out of range; use 1 to max ({})",
                wanted.batch, wanted.max
            ));
        }
        if wanted.warm > wanted.max {
            return Err(format!(
                "warm {} is out of range; use 0 to max ({})",
                wanted.warm, wanted.max
            ));
        }
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

    /// The pool settings in force (configuration plus overrides).
    pub fn pool_settings(&self) -> pool::Settings {
        self.state.lock().unwrap().pool
    }

    /// The addresses the pool believes are on the NIC.
    pub fn pool_ips(&self) -> BTreeSet<Ipv4Addr> {
        self.state.lock().unwrap().ipam.pool().clone()
    }

    fn pool_counts(st: &Inner) -> pool::Counts {
        let c = st.ipam.counts();
        pool::Counts {
            total: c.total,
            free: c.free,
            cooldown: c.cooldown,
            pending: st.pending,
            waiters: st.waiters,
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
    pub async fn sweep_tombstones(&self, links: &dyn LinkOps) {
        let dying = self.state.lock().unwrap().ipam.dying();
        let known: HashSet<&str> = dying.iter().map(|(_, v)| v.as_str()).collect();
        match links.links_with_prefix(TOMBSTONE_PREFIX).await {
            Ok(names) => {
                for name in names.iter().filter(|n| !known.contains(n.as_str())) {
                    let _ = self.reaper_tx.send((None, name.clone()));
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
        // A release a crash interrupted is finished first.
        let leftover = self.state.lock().unwrap().ipam.releasing();
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
            Decision::Shrink(n) => self.shrink(n).await,
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
                            st.memory.nic_limit_at = Some(st.ipam.counts().total);
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

    /// Removes releasing addresses from the NIC; on failure they return to the free set.
    async fn finish_release(&self, ips: Vec<Ipv4Addr>) {
        let result = self.cloud.release_ips(&self.identity.nic_id, &ips).await;
        let ticket = {
            let mut st = self.state.lock().unwrap();
            match &result {
                Ok(()) => {
                    info!(count = ips.len(), addresses = ?ips, "pool shrank");
                    st.ipam.release_done(&ips)
                }
                Err(e) => {
                    warn!(error = %e, "cloud refused to release addresses; keeping them");
                    st.last_cloud_error = Some(e.to_string());
                    st.ipam.add_to_pool(&ips)
                }
            }
            .map(|r| self.store.submit(vec![r]))
        };
        if let Some(t) = ticket {
            let _ = self.submit_timed(t).await;
        }
        if result.is_err() {
            self.changed.notify_waiters();
        }
    }

    /// Waits until everything queued in the store is durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.store.submit(Vec::new()).wait().await
    }
}
