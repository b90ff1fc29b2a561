//! Reports (never asserts) the agent's allocation latency, memory and cloud writes.
//!
//! `cargo run --release -p vnet-agent --example bench_allocate`
//!
//! The agent runs in this process, with its real Unix socket, journal (fsync) and pool logic, and
//! the in-process FakeCloud (so the numbers exclude cloud latency: with a warm pool the cloud is
//! not on the allocation path anyway). `cooldown_secs = 0` so that back-to-back churn keeps the
//! pool warm. RSS is this whole process (agent + benchmark clients): an upper bound for the agent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use vnet_agent::client::AgentClient;
use vnet_agent::config::Config;
use vnet_agent::daemon;
use vnet_agent::netlink::NoLinks;
use vnet_api::{AllocateRequest, ReleaseRequest};
use vnet_cloud::fake::FakeCloud;

fn req(id: &str) -> AllocateRequest {
    AllocateRequest {
        key: format!("{id}/eth0").parse().unwrap(),
        network: None,
        netns: None,
        pod: Default::default(),
    }
}

fn rel(id: &str) -> ReleaseRequest {
    ReleaseRequest {
        key: format!("{id}/eth0").parse().unwrap(),
        dying_veth: None,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

async fn latency_run(client: &AgentClient, clients: usize, per_client: usize) -> Vec<Duration> {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_client);
            for i in 0..per_client {
                let id = format!("bench{clients}c{c}i{i}");
                let started = Instant::now();
                client.allocate(&req(&id)).await.expect("allocate");
                lat.push(started.elapsed());
                client.release(&rel(&id)).await.expect("release");
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    all
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        socket_path: dir.path().join("run/agent.sock"),
        state_dir: dir.path().join("state"),
        metrics_address: "127.0.0.1:0".into(),
        manage_host: false,
        masquerade: false,
        log_level: "warn".into(),
        ..Config::default()
    };
    config.pool.warm = 32;
    config.pool.batch = 32;
    config.pool.cooldown_secs = 0;
    let cloud = Arc::new(FakeCloud::new());
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(daemon::run(
        daemon::Options {
            config: config.clone(),
            cloud: cloud.clone(),
            links: Arc::new(NoLinks),
            journal: Default::default(),
        },
        rx,
    ));
    let client = AgentClient::new(&config.socket_path);
    loop {
        if let Ok(s) = client.status().await
            && s.ready
            && s.pool.free >= config.pool.warm
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    println!(
        "allocate latency over the Unix socket, warm pool (connect + HTTP + fsync'd journal):"
    );
    for (clients, per_client) in [(1usize, 500usize), (16, 100)] {
        let lat = latency_run(&client, clients, per_client).await;
        println!(
            "  {clients:>2} concurrent client(s), {} allocations: p50 {:?}  p99 {:?}  max {:?}",
            lat.len(),
            percentile(&lat, 0.50),
            percentile(&lat, 0.99),
            lat.last().unwrap()
        );
    }

    // Churn inside the warm pool: one pod deleted, one created, 100 times.
    let writes = || cloud.assign_calls() + cloud.release_calls();
    let before = writes();
    for i in 0..100 {
        let id = format!("churn{i}");
        client.allocate(&req(&id)).await.unwrap();
        client.release(&rel(&id)).await.unwrap();
    }
    println!(
        "cloud writes for 100 pods of churn within the warm pool: {}",
        writes() - before
    );
    // A burst of 100 pods (beyond the warm pool), then their deletion.
    let before = writes();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            client.allocate(&req(&format!("burst{i}"))).await.unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for i in 0..100 {
        client.release(&rel(&format!("burst{i}"))).await.unwrap();
    }
    println!(
        "cloud writes for a burst of 100 new pods then their deletion (release delay not yet passed): {}",
        writes() - before
    );

    let rss_before = rss_kib();
    for i in 0..250 {
        client.allocate(&req(&format!("rss{i}"))).await.unwrap();
    }
    let status = client.status().await.unwrap();
    println!(
        "RSS with {} allocations: {:.1} MiB (whole process, agent + clients; {:.1} MiB before)",
        status.pool.allocated,
        rss_kib() as f64 / 1024.0,
        rss_before as f64 / 1024.0
    );
    let _ = stop.send(true);
    let _ = task.await;
}
