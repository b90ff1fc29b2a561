//! vnet-clustersim: a cluster of N nodes in one process. Each node runs vnet-agent's real pool
//! logic (`vnet_agent::agent::Agent` with the in-memory store and no link layer) over its own
//! real Azure client (`vnet_cloud::azure::AzureProvider`, one per node), all against ONE
//! `vnet-mockcloud` that enforces ARM's token buckets. All nodes send the same bearer token:
//! on AKS every node acts as the kubelet identity, one principal, one set of buckets.
//!
//! Time is real and uncompressed: the agent's own timers (pool tick, reconcile, allocation
//! wait), `Retry-After` (whole seconds) and the buckets' refill all run on the wall clock, so
//! nothing is scaled and nothing needs to be scaled back.
//!
//! Pods follow a schedule ([`Scenario`]) and call the node's allocate as the plugin would; a
//! "try again later" is retried as kubelet's pod worker does ([`kubelet`]).
//!
//! The cluster policy ([`Policy::Cluster`]) runs the agents over `vnet_kube::ClusterProvider`
//! instead: they make no ARM call, and ONE `vnet_allocator` (one `AzureProvider`, the one
//! principal) makes every NIC write, the two coordinating through NodeIPPool resources in ONE
//! in-process `vnet-fakeapi` (each node's agent holds a clone of its client).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use vnet_mockcloud::{Bucket, RateLimits};

pub mod kubelet;
pub mod node;
pub mod report;
mod run;

pub use node::{NodeParams, Policy};
pub use run::run;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    /// Every node starts (discovery, first NIC read) with an empty pool and `pods_per_node`
    /// pods already scheduled to it.
    Cold,
    /// A warm cluster (every node running, pool at `warm`, no pods) gets `pods_per_node` new
    /// pods per node at once.
    ScaleOut,
    /// A warm cluster running `pods_per_node` pods per node replaces one pod per node every
    /// `churn_interval` for `churn_duration`.
    Churn,
}

impl Scenario {
    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::Cold => "cold",
            Scenario::ScaleOut => "scale_out",
            Scenario::Churn => "churn",
        }
    }
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub nodes: usize,
    pub scenario: Scenario,
    pub policy: Policy,
    pub pods_per_node: u32,
    /// ARM's buckets during the measurement (warm-up runs unthrottled).
    pub limits: RateLimits,
    /// The mock's latency of a NIC PUT.
    pub put_latency: Duration,
    /// `Retry-After` on the PUT's operation and its `InProgress` polls (whole seconds).
    pub operation_retry_after_secs: u64,
    pub churn_interval: Duration,
    pub churn_duration: Duration,
    pub node: NodeParams,
    /// A run that has not wired every pod by then stops and reports what it has.
    pub give_up_after: Duration,
    /// Cluster policy: the buckets the allocator plans with (its defaults: a margin below
    /// ARM's documented ones).
    pub allocator_reads: vnet_allocator::BucketSettings,
    pub allocator_writes: vnet_allocator::BucketSettings,
}

impl SimConfig {
    /// The lab's timing (NIC PUT 1 s, operation `Retry-After` 1 s), ARM's documented buckets,
    /// the agent's default pool settings, 30 pods per node.
    pub fn new(nodes: usize, scenario: Scenario, policy: Policy) -> SimConfig {
        SimConfig {
            nodes,
            scenario,
            policy,
            pods_per_node: 30,
            limits: RateLimits::default(),
            put_latency: Duration::from_secs(1),
            operation_retry_after_secs: 1,
            churn_interval: Duration::from_secs(5),
            churn_duration: Duration::from_secs(120),
            node: NodeParams::default(),
            give_up_after: Duration::from_secs(3 * 3600),
            allocator_reads: vnet_allocator::DEFAULT_READS,
            allocator_writes: vnet_allocator::DEFAULT_WRITES,
        }
    }
}

/// Budget wide enough that warm-up never waits for it.
pub fn unthrottled() -> RateLimits {
    let huge = Bucket {
        size: u32::MAX / 2,
        refill_per_sec: 1e9,
    };
    RateLimits {
        reads: huge,
        writes: huge,
    }
}

/// The cheapest a scenario can be: cloud calls it cannot do without, and the time ARM's buckets
/// need to allow them (each bucket's initial content is spent first).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Bound {
    pub writes: u64,
    pub reads: u64,
    pub writes_s: f64,
    pub reads_s: f64,
    /// One write's own duration: the PUT and the operation's two polls.
    #[serde(default)]
    pub one_write_s: f64,
    /// See [`Bound::all_wired`].
    pub all_wired_s: f64,
}

/// ARM reads one NIC write costs the Azure client: the NIC before, two operation polls (the
/// mock's operation answers `InProgress` once), the NIC after.
pub const READS_PER_WRITE: u64 = 4;
/// Reads of a node's discovery (VM, NIC, subnet, VNet) and its first NIC read (reconcile).
pub const READS_PER_START: u64 = 5;
/// Cluster policy: the allocator starts a NIC write from the NIC as it last read it (`If-Match`
/// catches a change) and learns the new addresses by reading the NIC after the PUT until it
/// leaves `Updating`: with the mock's operation (`InProgress` once) that is two reads per
/// write, the NIC while updating and the NIC done (the agent's client needs four: the NIC
/// before, two operation polls, the NIC after).
pub const CLUSTER_READS_PER_WRITE: u64 = 2;
/// Cluster policy: resolving a node reads its VM and its NIC (that read also starts the first
/// write); the subnet and the VNet are read once for the cluster ([`CLUSTER_READS_ONCE`]).
pub const CLUSTER_READS_PER_START: u64 = 2;
pub const CLUSTER_READS_ONCE: u64 = 2;

impl Bound {
    pub fn of(cfg: &SimConfig) -> Bound {
        let n = cfg.nodes as u64;
        // One write per node serves 30 pods plus the warm target (the NIC takes 255; in prefix
        // mode 30 pods exceed the warm block's 16 addresses, and one write adds the blocks).
        let (writes, reads) = Bound::needs(cfg.scenario, cfg.policy, n);
        let over =
            |need: u64, b: Bucket| need.saturating_sub(u64::from(b.size)) as f64 / b.refill_per_sec;
        let writes_s = over(writes, cfg.limits.writes);
        let reads_s = over(reads, cfg.limits.reads);
        let one_write = if writes > 0 {
            cfg.put_latency.as_secs_f64() + 2.0 * cfg.operation_retry_after_secs as f64
        } else {
            0.0
        };
        Bound {
            writes,
            reads,
            writes_s,
            reads_s,
            one_write_s: one_write,
            all_wired_s: Bound::all_wired(writes_s, reads_s, one_write),
        }
    }

    /// The writes and reads a scenario cannot do without, for `n` nodes.
    pub fn needs(scenario: Scenario, policy: crate::Policy, n: u64) -> (u64, u64) {
        let cluster = policy == crate::Policy::Cluster;
        match scenario {
            Scenario::Cold if cluster => (
                n,
                n * (CLUSTER_READS_PER_START + CLUSTER_READS_PER_WRITE) + CLUSTER_READS_ONCE,
            ),
            Scenario::ScaleOut if cluster => (n, n * CLUSTER_READS_PER_WRITE),
            Scenario::Cold => (n, n * (READS_PER_START + READS_PER_WRITE)),
            Scenario::ScaleOut => (n, n * READS_PER_WRITE),
            // The warm pool (8) absorbs the cooldown (30 s / 5 s = 6 addresses) of one pod
            // replaced per 5 s: no cloud call is needed.
            Scenario::Churn => (0, 0),
        }
    }

    /// The last read cannot be allowed before `reads_s`, the last write not before `writes_s`
    /// (and it still takes its own time to finish), and no pod is served before one write.
    pub fn all_wired(writes_s: f64, reads_s: f64, one_write_s: f64) -> f64 {
        reads_s.max(writes_s + one_write_s).max(one_write_s)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SimResult {
    pub nodes: usize,
    pub scenario: String,
    pub policy: String,
    pub pods: u64,
    pub wired: u64,
    /// "Try again later" answers the pods got (each is one kubelet retry).
    pub try_again: u64,
    pub exhausted: u64,
    pub other_errors: u64,
    /// ARM calls during the measurement, from the mock's counters.
    pub writes: u64,
    pub reads: u64,
    pub arm_calls: u64,
    pub throttled: u64,
    /// 429s the nodes' clients counted from the answers they read (must equal `throttled`).
    pub client_throttled: u64,
    pub all_wired_s: f64,
    pub wait_p50_s: f64,
    pub wait_p99_s: f64,
    pub wait_max_s: f64,
    pub bound: Bound,
    /// Addresses held by two pods, and pods whose address is not on their node's NIC.
    pub duplicates: u64,
    pub not_on_nic: u64,
    pub peak_rss_mib: f64,
    pub wall_s: f64,
    /// CPU seconds (user and system) the whole simulation process spent during the
    /// measurement: divided by `all_wired_s`, the cores it used. Near the machine's cores, a
    /// figure would measure the simulation rather than the policy.
    #[serde(default)]
    pub cpu_s: f64,
    /// The mock's counters over the measurement: calls by operation, answers by status.
    #[serde(default)]
    pub counters: vnet_mockcloud::Counters,
    /// When each pod was wired, seconds after the measurement started (sorted).
    pub wired_at_s: Vec<f64>,
    pub settings: serde_json::Value,
}

impl SimResult {
    pub fn throttled_pct(&self) -> f64 {
        if self.arm_calls == 0 {
            0.0
        } else {
            100.0 * self.throttled as f64 / self.arm_calls as f64
        }
    }
}

/// Raises this process's open-file limit to its hard limit (every node holds HTTP connections
/// to the mock, and the mock holds the other end).
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// CPU seconds (user and system) this process has spent so far.
pub fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct we pass.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return 0.0;
        }
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Peak resident memory of this process (VmHWM), MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
