//! One simulation run: a mock, N nodes, a pod schedule, and the figures.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use ipnetwork::Ipv4Network;
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use vnet_agent::config::PoolMode;
use vnet_cloud::CloudProvider;
use vnet_cloud::azure::AzureProvider;
use vnet_fakeapi::{FakeApi, NODES, POOLS};
use vnet_mockcloud::{Counters, Faults, Latency, MockConfig, MockServer, Topology};

use crate::kubelet::{self, Tally};
use crate::node::{Node, Policy};
use crate::{Bound, Scenario, SimConfig, SimResult, percentile, unthrottled};

type Slot = watch::Sender<Option<Arc<Node>>>;

/// A subnet with room for every node and 64 addresses each.
fn subnet_for(nodes: usize) -> Ipv4Network {
    let need = (nodes as u64 + 1) * 65 + 16;
    let bits = 64 - need.next_power_of_two().leading_zeros() - 1;
    let prefix = 32 - bits.max(8) as u8;
    Ipv4Network::new(Ipv4Addr::new(10, 0, 0, 0), prefix.max(8)).expect("valid prefix")
}

fn arm_calls(c: &Counters) -> (u64, u64) {
    let mut writes = 0;
    let mut reads = 0;
    for (op, n) in &c.calls {
        match op.as_str() {
            "imds" | "token" => {}
            "nic_put" | "vmss_vm_put" => writes += n,
            _ => reads += n,
        }
    }
    (writes, reads)
}

fn throttled(c: &Counters) -> u64 {
    c.responses
        .iter()
        .filter(|(k, _)| k.ends_with(" 429"))
        .map(|(_, n)| n)
        .sum()
}

fn diff(after: &Counters, before: &Counters) -> Counters {
    let sub = |a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>| {
        a.iter()
            .map(|(k, v)| (k.clone(), v - b.get(k).copied().unwrap_or(0)))
            .collect()
    };
    Counters {
        calls: sub(&after.calls, &before.calls),
        responses: sub(&after.responses, &before.responses),
        injected: sub(&after.injected, &before.injected),
    }
}

fn key(node: usize, pod: usize) -> String {
    format!("n{node}p{pod}/eth0")
}

async fn start_nodes(
    cfg: &SimConfig,
    mock: &MockServer,
    slots: &[Slot],
    kube: Option<&kube::Client>,
    shutdown: &watch::Receiver<bool>,
) -> JoinSet<()> {
    let mut set = JoinSet::new();
    for (i, slot) in slots.iter().enumerate() {
        let arm = mock.base_url();
        let imds = mock.imds_endpoint(&format!("node-{}", i + 1));
        let (policy, params, shutdown, slot) =
            (cfg.policy, cfg.node.clone(), shutdown.clone(), slot.clone());
        let kube = kube.cloned();
        set.spawn(async move {
            let node = Node::start(policy, &arm, &imds, &params, kube, shutdown).await;
            slot.send_replace(Some(Arc::new(node)));
        });
    }
    set
}

async fn wait_settled(nodes: &[Arc<Node>], limit: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + limit;
    loop {
        if nodes.iter().all(|n| n.settled()) {
            return Ok(());
        }
        if Instant::now() > until {
            bail!("warm-up: pools did not settle within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn run(cfg: &SimConfig) -> anyhow::Result<SimResult> {
    let wall = Instant::now();
    crate::raise_nofile_limit();
    let topology = Topology::single_subnet(subnet_for(cfg.nodes), cfg.nodes);
    let mut mock_config = MockConfig::new(topology);
    let mut faults = Faults {
        operation_retry_after_secs: Some(cfg.operation_retry_after_secs),
        ..Faults::default()
    };
    faults.latency.insert(
        "nic_put".into(),
        Latency {
            fixed_ms: cfg.put_latency.as_millis() as u64,
            jitter_ms: 0,
        },
    );
    mock_config.faults = faults;
    mock_config.rate_limits = match cfg.scenario {
        Scenario::Cold => cfg.limits,
        Scenario::ScaleOut | Scenario::Churn => unthrottled(),
    };
    let mock = MockServer::start(mock_config, "127.0.0.1:0".parse().unwrap())
        .await
        .context("starting the mock")?;
    let (stop, shutdown) = watch::channel(false);
    let cluster = (cfg.policy == Policy::Cluster)
        .then(|| Cluster::start(cfg, &mock, shutdown.clone()))
        .transpose()?;
    let slots: Vec<Slot> = (0..cfg.nodes).map(|_| watch::channel(None).0).collect();
    let tally = Arc::new(Tally::default());
    let (waits_tx, mut waits_rx) = mpsc::unbounded_channel();
    let pods = Pods {
        waits: waits_tx,
        tasks: Arc::new(Mutex::new(Vec::new())),
        tally: tally.clone(),
        last_scheduled: Arc::new(Mutex::new(None)),
    };
    let mut throttled_before = 0;
    let mut pods_count = 0u64;

    let (t0, before, cpu_at_t0) = match cfg.scenario {
        Scenario::Cold => {
            let t0 = Instant::now();
            let cpu_at_t0 = crate::cpu_seconds();
            let before = mock.counters();
            start_nodes(
                cfg,
                &mock,
                &slots,
                cluster.as_ref().map(|c| &c.client),
                &shutdown,
            )
            .await
            .detach_all();
            for (i, slot) in slots.iter().enumerate() {
                for p in 0..cfg.pods_per_node as usize {
                    pods.spawn(slot.subscribe(), key(i, p), t0);
                    pods_count += 1;
                }
            }
            (t0, before, cpu_at_t0)
        }
        Scenario::ScaleOut | Scenario::Churn => {
            let mut starts = start_nodes(
                cfg,
                &mock,
                &slots,
                cluster.as_ref().map(|c| &c.client),
                &shutdown,
            )
            .await;
            while starts.join_next().await.is_some() {}
            let nodes: Vec<Arc<Node>> = slots.iter().map(|s| s.borrow().clone().unwrap()).collect();
            if cfg.scenario == Scenario::Churn {
                let mut warm = JoinSet::new();
                for (i, node) in nodes.iter().enumerate() {
                    for p in 0..cfg.pods_per_node as usize {
                        let (node, key) = (node.clone(), key(i, p));
                        warm.spawn(async move {
                            while node.allocate(&key).await.is_err() {
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        });
                    }
                }
                while warm.join_next().await.is_some() {}
            }
            // The mock is unthrottled for the warm-up, but in cluster mode the allocator does not
            // know: it paces the warm-up by its own read bucket, about 4 reads per node (resolve
            // and settle), which at 5,000 nodes takes longer than 600 s. Twice that, for margin.
            let paced = Duration::from_secs_f64(
                2.0 * cfg.nodes as f64 * 4.0 / cfg.allocator_reads.refill_per_sec,
            );
            wait_settled(&nodes, Duration::from_secs(600).max(paced)).await?;
            // Past the agent's repeated start-up reconcile (30 s), so the measurement starts
            // from steady state; then ARM's buckets, full.
            tokio::time::sleep(Duration::from_secs(35)).await;
            throttled_before = nodes.iter().map(|n| n.throttled()).sum::<u64>()
                + cluster.as_ref().map_or(0, Cluster::throttled);
            mock.set_rate_limits(cfg.limits);
            let before = mock.counters();
            let t0 = Instant::now();
            let cpu_at_t0 = crate::cpu_seconds();
            if cfg.scenario == Scenario::ScaleOut {
                for (i, slot) in slots.iter().enumerate() {
                    for p in 0..cfg.pods_per_node as usize {
                        pods.spawn(slot.subscribe(), key(i, p), t0);
                        pods_count += 1;
                    }
                }
            } else {
                pods_count += churn_schedule(cfg, &slots, &pods);
            }
            (t0, before, cpu_at_t0)
        }
    };

    let give_up = t0 + cfg.give_up_after;
    let mut wired_at = Vec::with_capacity(pods_count as usize);
    let mut waits = Vec::with_capacity(pods_count as usize);
    while (waits.len() as u64) < pods_count {
        match tokio::time::timeout_at(give_up, waits_rx.recv()).await {
            Ok(Some(wait)) => {
                waits.push(wait.as_secs_f64());
                wired_at.push(t0.elapsed().as_secs_f64());
            }
            Ok(None) | Err(_) => break,
        }
    }
    let all_wired_s = t0.elapsed().as_secs_f64();
    let cpu_s = crate::cpu_seconds() - cpu_at_t0;
    let after = mock.counters();
    pods.abort_all();

    let nodes: Vec<Arc<Node>> = slots.iter().filter_map(|s| s.borrow().clone()).collect();
    let client_throttled: u64 = nodes.iter().map(|n| n.throttled()).sum::<u64>()
        + cluster.as_ref().map_or(0, Cluster::throttled)
        - throttled_before;
    let (duplicates, not_on_nic) = verify(&mock, &nodes);
    let _ = stop.send(true);

    let c = diff(&after, &before);
    let mut bound = Bound::of(cfg);
    if cfg.scenario == Scenario::Churn {
        // Needing no cloud call, the last new pod can be wired when it is scheduled.
        bound.all_wired_s = pods.last_scheduled_s(t0);
    }
    let (writes, reads) = arm_calls(&c);
    waits.sort_by(f64::total_cmp);
    wired_at.sort_by(f64::total_cmp);
    let t = &tally;
    let result = SimResult {
        nodes: cfg.nodes,
        scenario: cfg.scenario.as_str().into(),
        policy: policy_label(cfg),
        pods: pods_count,
        wired: waits.len() as u64,
        try_again: t.try_again.load(Ordering::Relaxed),
        exhausted: t.exhausted.load(Ordering::Relaxed),
        other_errors: t.other.load(Ordering::Relaxed),
        writes,
        reads,
        arm_calls: writes + reads,
        throttled: throttled(&c),
        client_throttled,
        all_wired_s: if waits.len() as u64 == pods_count {
            wired_at.last().copied().unwrap_or(0.0)
        } else {
            all_wired_s
        },
        wait_p50_s: percentile(&waits, 50.0),
        wait_p99_s: percentile(&waits, 99.0),
        wait_max_s: waits.last().copied().unwrap_or(0.0),
        bound,
        duplicates,
        not_on_nic,
        peak_rss_mib: crate::peak_rss_mib(),
        wall_s: wall.elapsed().as_secs_f64(),
        cpu_s,
        wired_at_s: wired_at,
        counters: c.clone(),
        settings: settings_json(cfg),
    };
    drop(nodes);
    mock.shutdown().await;
    Ok(result)
}

/// The policy as the tables name it (prefix mode is its own row).
fn policy_label(cfg: &SimConfig) -> String {
    match cfg.node.pool.mode {
        PoolMode::Address => cfg.policy.as_str().into(),
        PoolMode::Prefix => format!("{}-prefix", cfg.policy.as_str()),
    }
}

/// The cluster policy's shared parts: ONE fake API server (every node's NodeIPPool, created as
/// the agent's integration would, each node's agent a client clone of it) and ONE allocator
/// with ONE AzureProvider (the one principal) against the mock.
struct Cluster {
    client: kube::Client,
    cloud: Arc<AzureProvider>,
}

impl Cluster {
    fn start(
        cfg: &SimConfig,
        mock: &MockServer,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Cluster> {
        // One role for all: the allocator's (list/watch nodeippools, patch their status,
        // its Lease). The agents' calls (watch of their pool, patch of its status) are within
        // it too; the pools exist before the agents start, so none needs `create`.
        let fake = FakeApi::with_role("vnet-cni-allocator");
        let topology = mock.topology();
        for i in 1..=cfg.nodes {
            let name = format!("node-{i}");
            // As kubelet registers it on Azure: the allocator serves a pool only for its Node's VM.
            let provider_id = vnet_allocator::provider_id(&topology.vm_id(&name));
            fake.put(
                NODES,
                serde_json::json!({"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": name, "uid": format!("uid-{name}")},
                    "spec": {"providerID": provider_id}}),
            );
            fake.put(
                POOLS,
                serde_json::json!({"apiVersion": "vnet-cni.io/v1alpha1", "kind": "NodeIPPool",
                    "metadata": {"name": name, "ownerReferences": [{"apiVersion": "v1",
                        "kind": "Node", "name": name, "uid": format!("uid-{name}")}]},
                    "spec": {}}),
            );
        }
        let client = fake.client();
        let cloud = Arc::new(crate::node::provider(
            Policy::Cluster,
            &mock.base_url(),
            &mock.imds_endpoint("node-1"),
            &cfg.node.pacing,
        ));
        let settings = vnet_allocator::Settings {
            holder: "sim-allocator".into(),
            reads: cfg.allocator_reads,
            writes: cfg.allocator_writes,
            ..vnet_allocator::Settings::default()
        };
        let allocator_client = client.clone();
        let allocator_cloud = cloud.clone();
        tokio::spawn(async move {
            if let Err(e) =
                vnet_allocator::run(allocator_client, allocator_cloud, settings, shutdown).await
            {
                eprintln!("allocator: {e}");
            }
        });
        Ok(Cluster { client, cloud })
    }

    fn throttled(&self) -> u64 {
        self.cloud.arm_budget().map_or(0, |b| b.throttled)
    }
}

/// Starts pod tasks; each reports its wait when wired.
#[derive(Clone)]
struct Pods {
    waits: mpsc::UnboundedSender<Duration>,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
    tally: Arc<Tally>,
    last_scheduled: Arc<Mutex<Option<Instant>>>,
}

impl Pods {
    fn spawn(&self, slot: watch::Receiver<Option<Arc<Node>>>, key: String, scheduled: Instant) {
        let (waits, tally) = (self.waits.clone(), self.tally.clone());
        let mut last = self.last_scheduled.lock().unwrap();
        *last = Some(last.map_or(scheduled, |l| l.max(scheduled)));
        drop(last);
        let task = tokio::spawn(async move {
            let wait = kubelet::run_pod(slot, key, scheduled, tally).await;
            let _ = waits.send(wait);
        });
        self.tasks.lock().unwrap().push(task.abort_handle());
    }

    fn last_scheduled_s(&self, t0: Instant) -> f64 {
        self.last_scheduled
            .lock()
            .unwrap()
            .map_or(0.0, |l| l.duration_since(t0).as_secs_f64())
    }

    fn abort_all(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

/// Each node, from its own random phase, deletes its oldest pod every `churn_interval` and a
/// new pod is scheduled to it at that moment. Returns the number of new pods.
fn churn_schedule(cfg: &SimConfig, slots: &[Slot], pods: &Pods) -> u64 {
    let rounds = (cfg.churn_duration.as_secs_f64() / cfg.churn_interval.as_secs_f64()) as usize;
    for (i, slot) in slots.iter().enumerate() {
        let node = slot.borrow().clone().expect("warm nodes are ready");
        let (spawner, slot) = (pods.clone(), slot.subscribe());
        let (interval, per_node) = (cfg.churn_interval, cfg.pods_per_node as usize);
        let driver = tokio::spawn(async move {
            tokio::time::sleep(interval.mul_f64(rand::random_range(0.0..1.0))).await;
            for round in 0..rounds {
                node.release(&key(i, round)).await;
                spawner.spawn(slot.clone(), key(i, per_node + round), Instant::now());
                tokio::time::sleep(interval).await;
            }
        });
        pods.tasks.lock().unwrap().push(driver.abort_handle());
    }
    (rounds * slots.len()) as u64
}

/// Addresses held twice, and held addresses not on the node's NIC in the mock.
fn verify(mock: &MockServer, nodes: &[Arc<Node>]) -> (u64, u64) {
    let state = mock.state();
    // A block (prefix mode) holds every address of its prefix.
    let on_nic: HashSet<(String, Ipv4Addr)> = state
        .addresses
        .iter()
        .flat_map(|a| {
            let len = a.prefix_len.unwrap_or(32);
            let block = Ipv4Network::new(a.ip, len).expect("a valid block");
            block.iter().map(move |ip| (a.vm.clone(), ip))
        })
        .collect();
    let mut seen: HashMap<Ipv4Addr, usize> = HashMap::new();
    let mut missing = 0;
    for node in nodes {
        let vm = node.identity().vm_name.clone();
        for ip in node.held() {
            *seen.entry(ip).or_default() += 1;
            if !on_nic.contains(&(vm.clone(), ip)) {
                missing += 1;
            }
        }
    }
    let dups = seen.values().filter(|n| **n > 1).count() as u64;
    (dups, missing)
}

fn settings_json(cfg: &SimConfig) -> serde_json::Value {
    let p = &cfg.node.pool;
    serde_json::json!({
        "pods_per_node": cfg.pods_per_node,
        "limits": cfg.limits,
        "put_latency_ms": cfg.put_latency.as_millis() as u64,
        "operation_retry_after_secs": cfg.operation_retry_after_secs,
        "churn_interval_s": cfg.churn_interval.as_secs_f64(),
        "churn_duration_s": cfg.churn_duration.as_secs_f64(),
        "pool": {"mode": p.mode, "warm": p.warm, "batch": p.batch, "max": p.max, "cooldown_secs": p.cooldown_secs, "allocate_timeout_secs": p.allocate_timeout_secs, "release_delay_secs": p.release_delay_secs},
        "cluster_answer_timeout_s": cfg.node.cluster_answer_timeout.as_secs_f64(),
        "allocator_reads": {"size": cfg.allocator_reads.size, "refill_per_sec": cfg.allocator_reads.refill_per_sec},
        "allocator_writes": {"size": cfg.allocator_writes.size, "refill_per_sec": cfg.allocator_writes.refill_per_sec},
        "naive_timer_s": cfg.node.naive_timer.as_secs_f64(),
        "naive_backoff_s": cfg.node.naive_backoff.as_secs_f64(),
    })
}
