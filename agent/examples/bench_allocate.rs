//! Reports (never asserts) the agent's allocation latency, memory and cloud writes.
//!
//! ```text
//! cargo build --release -p vnet-agent && cargo run --release -p vnet-agent --example bench_allocate
//! ```
//!
//! Runs the real `vnet-agent` binary (found next to this example's directory, i.e.
//! `target/<profile>/vnet-agent`) against an in-process vnet-mockcloud on 127.0.0.1, talking to it
//! over its Unix socket like the plugin does (one connection per request). Without the binary the
//! agent runs inside this process instead (then RSS covers agent and clients together).
//! `cooldown_secs = 0` so back-to-back churn keeps the pool warm; the journal is fsync'd as always.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use vnet_agent::client::AgentClient;
use vnet_agent::config::{Config, CredentialKind, ProviderKind};
use vnet_agent::daemon;
use vnet_agent::netlink::NoLinks;
use vnet_api::{AllocateRequest, ReleaseRequest};
use vnet_mockcloud::{Faults, MockConfig, MockServer, Topology};

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

fn rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
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

fn agent_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("vnet-agent");
    bin.exists().then_some(bin)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mock = MockServer::start(
        MockConfig::new(Topology::single_subnet("10.240.0.0/16".parse().unwrap(), 1)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .expect("mock");
    mock.set_faults(Faults {
        operation_polls: Some(0),
        operation_retry_after_secs: Some(0),
        ..Faults::default()
    });
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
    config.cloud.provider = ProviderKind::Mock;
    config.cloud.credential = CredentialKind::None;
    config.cloud.arm_endpoint = mock.base_url();
    config.cloud.imds_endpoint = mock.imds_endpoint("node-1");
    config.pool.warm = 32;
    config.pool.batch = 32;
    config.pool.cooldown_secs = 0;

    let (stop, rx) = watch::channel(false);
    let (mut child, pid, in_process) = match agent_binary() {
        Some(bin) => {
            let path = dir.path().join("agent.toml");
            std::fs::write(&path, config.to_toml()).unwrap();
            let child = std::process::Command::new(&bin)
                .arg("--config")
                .arg(&path)
                .spawn()
                .expect("spawn vnet-agent");
            let pid = child.id().to_string();
            println!("agent: {} (pid {pid})", bin.display());
            (Some(child), pid, None)
        }
        None => {
            println!("agent: in this process (build the vnet-agent binary for a separate RSS)");
            let cloud = vnet_agent::provider::build(&config.cloud).unwrap();
            let task = tokio::spawn(daemon::run(
                daemon::Options {
                    config: config.clone(),
                    cloud,
                    links: Arc::new(NoLinks),
                    journal: Default::default(),
                    on_ready: None,
                },
                rx,
            ));
            (None, "self".to_string(), Some(task))
        }
    };
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

    let writes = || mock.counters().calls("nic_put");
    let before = writes();
    for i in 0..100 {
        let id = format!("churn{i}");
        client.allocate(&req(&id)).await.unwrap();
        client.release(&rel(&id)).await.unwrap();
    }
    println!(
        "cloud writes (NIC PUTs) for 100 pods of churn within the warm pool: {}",
        writes() - before
    );
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
        "cloud writes for a burst of 100 new pods beyond the warm pool, then their deletion: {}",
        writes() - before
    );

    for i in 0..250 {
        client.allocate(&req(&format!("rss{i}"))).await.unwrap();
    }
    let status = client.status().await.unwrap();
    println!(
        "agent RSS with {} allocations: {:.1} MiB{}",
        status.pool.allocated,
        rss_kib(&pid) as f64 / 1024.0,
        if in_process.is_some() {
            " (agent and benchmark clients together)"
        } else {
            ""
        }
    );
    if let Some(child) = child.as_mut() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = child.wait();
    }
    let _ = stop.send(true);
    if let Some(task) = in_process {
        let _ = task.await;
    }
}
