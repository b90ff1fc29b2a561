//! The cluster simulation's behaviour at small N (never its timings): every pod is wired with
//! an address its node's NIC holds, no address twice, the clients' and the mock's 429 counts
//! agree, and with a tiny shared bucket the naive policy is throttled where the paced agent is
//! not. In cluster mode (agents over ClusterProvider, one real allocator, the real mock over
//! HTTP): a burst of ADDs per node is served with one NIC write per node, also in prefix mode,
//! and a cold start under a tiny bucket is never throttled.

use std::time::Duration;

use vnet_cloud::azure::Pacing;
use vnet_clustersim::{Policy, Scenario, SimConfig, SimResult};
use vnet_mockcloud::{Bucket, RateLimits};

async fn run(cfg: SimConfig) -> SimResult {
    vnet_clustersim::run(&cfg).await.expect("simulation runs")
}

fn assert_consistent(r: &SimResult) {
    assert_eq!(r.wired, r.pods, "every pod wired: {r:?}");
    assert_eq!(r.duplicates, 0, "no address held twice");
    assert_eq!(r.not_on_nic, 0, "every pod's address is on its node's NIC");
    assert_eq!(
        r.client_throttled, r.throttled,
        "the clients read every 429 the mock answered"
    );
    assert_eq!(r.arm_calls, r.writes + r.reads);
}

/// A bucket a cold start of 5 nodes overdraws at once: 25 start-up reads against 20.
fn tiny() -> RateLimits {
    RateLimits {
        reads: Bucket {
            size: 20,
            refill_per_sec: 5.0,
        },
        writes: Bucket {
            size: 10,
            refill_per_sec: 2.0,
        },
    }
}

fn small(scenario: Scenario, policy: Policy, nodes: usize, limits: RateLimits) -> SimConfig {
    let mut cfg = SimConfig::new(nodes, scenario, policy);
    cfg.pods_per_node = 12;
    cfg.limits = limits;
    // The agent's client told the bucket's refill rates (it assumes ARM's documented ones).
    cfg.node.pacing = Pacing {
        reads_per_sec: limits.reads.refill_per_sec,
        writes_per_sec: limits.writes.refill_per_sec,
        ..Pacing::default()
    };
    cfg.give_up_after = Duration::from_secs(600);
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_wires_every_pod_on_its_nodes_nic() {
    let r = run(small(
        Scenario::Cold,
        Policy::Agent,
        3,
        RateLimits::default(),
    ))
    .await;
    assert_consistent(&r);
    assert_eq!(r.pods, 36);
    // Every node needs at least one write, and discovery reads before it.
    assert!(r.writes >= 3, "{r:?}");
    assert!(r.reads >= r.bound.reads, "{r:?}");
    assert_eq!(
        r.throttled, 0,
        "the default bucket is far from empty: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_tiny_shared_bucket_naive_is_throttled_and_the_paced_agent_is_not() {
    let naive = run(small(Scenario::Cold, Policy::Naive, 5, tiny())).await;
    assert_consistent(&naive);
    assert!(naive.throttled > 0, "naive overdraws the bucket: {naive:?}");
    let agent = run(small(Scenario::Cold, Policy::Agent, 5, tiny())).await;
    assert_consistent(&agent);
    assert_eq!(
        agent.throttled, 0,
        "the agent paces below the floor: {agent:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_on_a_warm_cluster_needs_no_cloud_write() {
    let mut cfg = small(Scenario::Churn, Policy::Agent, 2, RateLimits::default());
    cfg.churn_duration = Duration::from_secs(20);
    let r = run(cfg).await;
    assert_consistent(&r);
    assert_eq!(r.pods, 8, "4 replacements per node");
    assert_eq!(r.writes, 0, "the warm pool absorbs the cooldowns: {r:?}");
}

/// Cluster mode, end to end: every node's real agent over ClusterProvider (no ARM call of its
/// own), ONE real allocator with one AzureProvider, the real mock over HTTP, coordinating
/// through NodeIPPools in the fake API server.
fn cluster(scenario: Scenario, nodes: usize, limits: RateLimits) -> SimConfig {
    let mut cfg = small(scenario, Policy::Cluster, nodes, limits);
    // The allocator plans with the mock's buckets (a margin below, as with ARM's).
    let plan = |b: Bucket| vnet_allocator::BucketSettings {
        size: f64::from(b.size) * 0.9,
        refill_per_sec: b.refill_per_sec * 0.95,
    };
    if limits != RateLimits::default() {
        cfg.allocator_reads = plan(limits.reads);
        cfg.allocator_writes = plan(limits.writes);
    }
    cfg
}

fn assert_cluster_consistent(r: &SimResult) {
    assert_consistent(r);
    assert_eq!(r.policy, "cluster");
    assert_eq!(r.other_errors, 0, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_serves_a_scale_out_with_one_write_per_node() {
    let r = run(cluster(Scenario::ScaleOut, 4, RateLimits::default())).await;
    assert_cluster_consistent(&r);
    assert_eq!(r.pods, 48);
    assert_eq!(r.writes, 4, "one NIC write serves each node's burst: {r:?}");
    assert_eq!(r.throttled, 0, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_cold_start_under_a_tiny_bucket_is_never_throttled() {
    let r = run(cluster(Scenario::Cold, 5, tiny())).await;
    assert_cluster_consistent(&r);
    assert_eq!(r.pods, 60);
    assert!(r.writes >= 5, "{r:?}");
    assert!(r.reads >= r.bound.reads, "{r:?}");
    assert_eq!(
        r.throttled, 0,
        "one allocator paces the one principal: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_in_prefix_mode_wires_every_pod_from_blocks() {
    let mut cfg = cluster(Scenario::ScaleOut, 3, RateLimits::default());
    cfg.node.pool.mode = vnet_agent::config::PoolMode::Prefix;
    // More than the warm block's 16 addresses: each node needs blocks, in one write.
    cfg.pods_per_node = 30;
    let r = run(cfg).await;
    assert_consistent(&r);
    assert_eq!(r.policy, "cluster-prefix");
    assert_eq!(r.writes, 3, "{r:?}");
}
