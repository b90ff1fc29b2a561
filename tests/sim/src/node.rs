//! One simulated node: the real `vnet_agent::agent::Agent` (in-memory store, no link layer) over
//! its own real `AzureProvider`, or the naive policy over the same client with pacing off.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use vnet_agent::agent::{Agent, AgentError, AgentSettings};
use vnet_agent::metrics::Metrics;
use vnet_agent::pool;
use vnet_agent::store::{MemoryStore, StoreState};
use vnet_api::{AllocateRequest, ReleaseRequest};
use vnet_cloud::azure::{AzureConfig, AzureProvider, CredentialConfig, Pacing, RetryPolicy};
use vnet_cloud::{CloudError, CloudProvider, NodeIdentity};
use vnet_kube::{ClusterProvider, ClusterSettings, InstanceSource};

/// The bearer token every node sends: on AKS all nodes act as one principal (the kubelet
/// identity), so they draw from one set of ARM buckets.
pub const SHARED_TOKEN: &str = "kubelet-identity";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// vnet-agent's pool task and the Azure client as configured by default (pacing on).
    Agent,
    /// Each node tops up on its own timer, no pacing, 429 retried after a fixed back-off.
    Naive,
    /// Cluster mode: each node's real agent over `vnet_kube::ClusterProvider` (no ARM call),
    /// ONE `vnet_allocator` making every NIC write with one `AzureProvider`, coordinating
    /// through NodeIPPool resources in an in-process fake API server.
    Cluster,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Agent => "agent",
            Policy::Naive => "naive",
            Policy::Cluster => "cluster",
        }
    }
}

/// What every node is configured with.
#[derive(Debug, Clone)]
pub struct NodeParams {
    pub pool: vnet_agent::config::PoolConfig,
    /// Naive policy: how often a node looks at its pool.
    pub naive_timer: Duration,
    /// Naive policy: the fixed wait after a refused or failed call.
    pub naive_backoff: Duration,
    /// The agent's client pacing (the agent always runs with the default: ARM's documented
    /// refill rates; tests with tiny buckets tell it their rates).
    pub pacing: Pacing,
    /// Cluster policy: the agent's bound on one wait for the allocator
    /// (`cloud.cluster_answer_timeout_secs`, default 120 s).
    pub cluster_answer_timeout: Duration,
}

impl Default for NodeParams {
    fn default() -> Self {
        NodeParams {
            pool: vnet_agent::config::PoolConfig::default(),
            naive_timer: Duration::from_secs(1),
            naive_backoff: Duration::from_secs(2),
            pacing: Pacing::default(),
            cluster_answer_timeout: Duration::from_secs(120),
        }
    }
}

/// Why an allocation did not give an address (the plugin's answer to the runtime).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    TryAgainLater,
    Exhausted,
    Other(String),
}

pub enum Node {
    Agent {
        agent: Arc<Agent>,
        provider: AzureProvider,
    },
    Naive {
        naive: Arc<NaiveNode>,
        provider: AzureProvider,
    },
    /// Its ARM calls are the allocator's (counted there).
    Cluster { agent: Arc<Agent> },
}

pub(crate) fn provider(policy: Policy, arm: &str, imds: &str, pacing: &Pacing) -> AzureProvider {
    let mut config = AzureConfig::mock(
        arm,
        imds,
        CredentialConfig::StaticToken {
            token: SHARED_TOKEN.into(),
        },
    );
    config.pacing = pacing.clone();
    if policy == Policy::Cluster {
        // The allocator's own client, as its binary builds it (it paces the principal itself).
        config = vnet_allocator::cloud_config(config);
    }
    if policy == Policy::Naive {
        // No pacing, and every 429 goes straight back to the caller (which waits its fixed
        // back-off) instead of being waited out inside the client.
        config.pacing = Pacing {
            reads_floor: 0,
            writes_floor: 0,
            ..Pacing::default()
        };
        config.retry = RetryPolicy {
            max_retry_after: Duration::ZERO,
            ..RetryPolicy::default()
        };
    }
    AzureProvider::new(config).expect("the mock's client config is valid")
}

/// The daemon's start-up retry (agent/src/daemon.rs `retry`): 2, 4, .. 30 s between attempts.
async fn with_daemon_retry<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, CloudError>>,
{
    let mut attempt = 0u32;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(_) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_secs((1u64 << attempt.min(5)).min(30))).await;
            }
        }
    }
}

async fn with_fixed_retry<T, F, Fut>(backoff: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, CloudError>>,
{
    loop {
        match f().await {
            Ok(v) => return v,
            Err(_) => tokio::time::sleep(backoff).await,
        }
    }
}

/// The daemon's start (discover, first reconcile, serve) of the real agent over `cloud`.
async fn start_agent(
    cloud: Arc<dyn CloudProvider>,
    params: &NodeParams,
    shutdown: watch::Receiver<bool>,
) -> Arc<Agent> {
    let identity = with_daemon_retry(|| cloud.discover()).await;
    let p = &params.pool;
    let settings = AgentSettings {
        node_name: identity.vm_name.clone(),
        pool: pool::Settings {
            warm: p.warm,
            batch: p.batch,
            max: p.max,
            release_delay: Duration::from_secs(p.release_delay_secs),
            // 32: address mode; 28: prefix mode (/28 blocks).
            prefix_len: p.mode.prefix_len(),
        },
        cooldown_secs: p.cooldown_secs,
        allocate_timeout: Duration::from_secs(p.allocate_timeout_secs),
        host_veth_prefix: vnet_api::DEFAULT_HOST_VETH_PREFIX.into(),
        mtu: 1500,
        subnet_id: identity.subnet_id.clone(),
        spool_dir: None,
    };
    let agent = Agent::new(
        settings,
        identity,
        cloud,
        Arc::new(MemoryStore::new()),
        StoreState::default(),
        Arc::new(Metrics::new()),
    );
    with_daemon_retry(|| agent.reconcile_with_cloud()).await;
    agent.set_ready(true);
    tokio::spawn(agent.clone().run_pool(shutdown));
    agent
}

impl Node {
    /// Starts a node as its daemon would (discover, reconcile, serve) and returns it ready.
    /// `kube`: the API server client (cluster policy only; one clone per node).
    pub async fn start(
        policy: Policy,
        arm: &str,
        imds: &str,
        params: &NodeParams,
        kube: Option<kube::Client>,
        shutdown: watch::Receiver<bool>,
    ) -> Node {
        match policy {
            Policy::Agent => {
                let provider = provider(policy, arm, imds, &params.pacing);
                let agent = start_agent(Arc::new(provider.clone()), params, shutdown).await;
                Node::Agent { agent, provider }
            }
            Policy::Cluster => {
                // IMDS only: the node has no ARM credential in cluster mode.
                let imds_only =
                    AzureProvider::new(AzureConfig::mock("", imds, CredentialConfig::None))
                        .expect("the mock's IMDS config is valid");
                let cluster = ClusterProvider::new(
                    kube.expect("the cluster policy has an API server"),
                    InstanceSource::Imds(imds_only),
                    // The sim's NodeIPPools are named like the VMs.
                    Box::new(|m| Ok(m.vm_name.clone())),
                    ClusterSettings {
                        answer_timeout: params.cluster_answer_timeout,
                    },
                );
                let agent = start_agent(Arc::new(cluster), params, shutdown).await;
                Node::Cluster { agent }
            }
            Policy::Naive => {
                let provider = provider(policy, arm, imds, &params.pacing);
                let backoff = params.naive_backoff;
                let identity = with_fixed_retry(backoff, || provider.discover()).await;
                let listed =
                    with_fixed_retry(backoff, || provider.list_secondary_ips(&identity.nic_id))
                        .await;
                let naive = Arc::new(NaiveNode {
                    identity,
                    params: params.clone(),
                    state: Mutex::new(NaiveState::default()),
                    changed: Notify::new(),
                });
                naive.adopt(listed.iter().map(|s| s.ip));
                tokio::spawn(naive.clone().run(provider.clone(), shutdown));
                Node::Naive { naive, provider }
            }
        }
    }

    pub async fn allocate(&self, key: &str) -> Result<Ipv4Addr, Refusal> {
        match self {
            Node::Agent { agent, .. } | Node::Cluster { agent } => {
                let req = AllocateRequest {
                    key: key.parse().expect("valid attachment key"),
                    network: None,
                    netns: None,
                    pod: Default::default(),
                };
                match agent.allocate(req).await {
                    Ok(r) => Ok(r.allocation.ip),
                    Err(AgentError::TryAgainLater(_) | AgentError::NotReady(_)) => {
                        Err(Refusal::TryAgainLater)
                    }
                    Err(AgentError::Exhausted(_)) => Err(Refusal::Exhausted),
                    Err(e) => Err(Refusal::Other(e.to_string())),
                }
            }
            Node::Naive { naive, .. } => naive.allocate(key).await,
        }
    }

    pub async fn release(&self, key: &str) {
        match self {
            Node::Agent { agent, .. } | Node::Cluster { agent } => {
                let req = ReleaseRequest {
                    key: key.parse().expect("valid attachment key"),
                    dying_veth: None,
                };
                let _ = agent.release(req).await;
            }
            Node::Naive { naive, .. } => naive.release(key),
        }
    }

    /// 429s this node's client counted (from the answers it read).
    pub fn throttled(&self) -> u64 {
        let provider = match self {
            Node::Agent { provider, .. } | Node::Naive { provider, .. } => provider,
            Node::Cluster { .. } => return 0,
        };
        provider.arm_budget().map_or(0, |b| b.throttled)
    }

    /// The addresses the node's pods hold.
    pub fn held(&self) -> Vec<Ipv4Addr> {
        match self {
            Node::Agent { agent, .. } | Node::Cluster { agent } => {
                agent.allocations().iter().map(|a| a.ip).collect()
            }
            Node::Naive { naive, .. } => {
                naive.state.lock().unwrap().held.values().copied().collect()
            }
        }
    }

    pub fn identity(&self) -> &NodeIdentity {
        match self {
            Node::Agent { agent, .. } | Node::Cluster { agent } => agent.identity(),
            Node::Naive { naive, .. } => &naive.identity,
        }
    }

    /// No cloud write in flight or due: free addresses at least `warm` (and none pending).
    pub fn settled(&self) -> bool {
        match self {
            Node::Agent { agent, .. } | Node::Cluster { agent } => {
                let s = agent.status();
                s.pool.pending == 0 && s.pool.free + s.pool.cooldown >= agent.settings().pool.warm
            }
            Node::Naive { naive, .. } => {
                let st = naive.state.lock().unwrap();
                st.free.len() as u32 >= naive.params.pool.warm && !st.writing
            }
        }
    }
}

#[derive(Default)]
struct NaiveState {
    free: Vec<Ipv4Addr>,
    held: HashMap<String, Ipv4Addr>,
    known: HashSet<Ipv4Addr>,
    waiting: u32,
    writing: bool,
}

/// The naive per-node policy: a pool of free addresses topped up to `warm` plus whatever is
/// waiting, on a fixed timer, one write at a time; a failed call waits a fixed back-off, then
/// re-reads the NIC (a write whose answer was lost may have landed) before trying again.
pub struct NaiveNode {
    identity: NodeIdentity,
    params: NodeParams,
    state: Mutex<NaiveState>,
    changed: Notify,
}

impl NaiveNode {
    fn adopt(&self, ips: impl IntoIterator<Item = Ipv4Addr>) {
        let mut st = self.state.lock().unwrap();
        for ip in ips {
            if st.known.insert(ip) {
                st.free.push(ip);
            }
        }
        drop(st);
        self.changed.notify_waiters();
    }

    async fn allocate(&self, key: &str) -> Result<Ipv4Addr, Refusal> {
        let deadline = tokio::time::Instant::now()
            + Duration::from_secs(self.params.pool.allocate_timeout_secs);
        let mut counted = false;
        let result = loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.state.lock().unwrap();
                if let Some(ip) = st.held.get(key).copied() {
                    break Ok(ip);
                }
                if let Some(ip) = st.free.pop() {
                    st.held.insert(key.to_string(), ip);
                    break Ok(ip);
                }
                if !counted {
                    counted = true;
                    st.waiting += 1;
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break Err(Refusal::TryAgainLater);
            }
        };
        if counted {
            self.state.lock().unwrap().waiting -= 1;
        }
        result
    }

    fn release(&self, key: &str) {
        let mut st = self.state.lock().unwrap();
        if let Some(ip) = st.held.remove(key) {
            st.free.push(ip);
        }
        drop(st);
        self.changed.notify_waiters();
    }

    async fn run(self: Arc<Self>, provider: AzureProvider, mut shutdown: watch::Receiver<bool>) {
        let p = &self.params;
        // Each node's timer has its own phase.
        let phase = p.naive_timer.mul_f64(rand::random_range(0.0..1.0));
        tokio::time::sleep(phase).await;
        let mut tick = tokio::time::interval(p.naive_timer);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let n = {
                let mut st = self.state.lock().unwrap();
                let total = st.known.len() as u32;
                let deficit = (st.waiting + p.pool.warm).saturating_sub(st.free.len() as u32);
                let room = p.pool.max.min(255).saturating_sub(total);
                let n = (deficit.div_ceil(p.pool.batch) * p.pool.batch).min(room);
                st.writing = n > 0;
                n
            };
            if n == 0 {
                continue;
            }
            let nic = &self.identity.nic_id;
            match provider
                .assign_ips(nic, &self.identity.subnet_id, n as usize)
                .await
            {
                Ok(assigned) => self.adopt(assigned.iter().map(|s| s.ip)),
                Err(_) => {
                    tokio::time::sleep(p.naive_backoff).await;
                    if let Ok(listed) = provider.list_secondary_ips(nic).await {
                        self.adopt(listed.iter().map(|s| s.ip));
                    }
                }
            }
            self.state.lock().unwrap().writing = false;
        }
    }
}
