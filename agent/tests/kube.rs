//! What a kubelet and the Kubernetes integration see of the agent: the probes on the metrics
//! listener, the CNI conflist written once ready, and the `NodeAgent` adapter.

mod common;

use std::net::Ipv4Addr;
use std::sync::Arc;

use async_trait::async_trait;
use common::*;
use tokio::sync::watch;
use vnet_agent::daemon;
use vnet_agent::kubernetes::KubeAgent;
use vnet_agent::netlink::NoLinks;
use vnet_cloud::fake::FakeCloud;
use vnet_cloud::{CloudError, CloudProvider, NodeIdentity, SecondaryIp};
use vnet_kube::conflist::CONFLIST_FILE_NAME;
use vnet_kube::{NodeAgent, NodeIPPoolSpec};

/// FakeCloud whose discovery waits until the gate opens: the agent stays in start-up meanwhile.
struct GatedCloud {
    inner: FakeCloud,
    gate: watch::Receiver<bool>,
}

#[async_trait]
impl CloudProvider for GatedCloud {
    async fn discover(&self) -> Result<NodeIdentity, CloudError> {
        let mut gate = self.gate.clone();
        let _ = gate.wait_for(|open| *open).await;
        self.inner.discover().await
    }
    async fn list_secondary_ips(&self, nic_id: &str) -> Result<Vec<SecondaryIp>, CloudError> {
        self.inner.list_secondary_ips(nic_id).await
    }
    async fn assign_ips(
        &self,
        nic_id: &str,
        subnet_id: &str,
        count: usize,
    ) -> Result<Vec<SecondaryIp>, CloudError> {
        self.inner.assign_ips(nic_id, subnet_id, count).await
    }
    async fn release_ips(&self, nic_id: &str, ips: &[Ipv4Addr]) -> Result<(), CloudError> {
        self.inner.release_ips(nic_id, ips).await
    }
}

/// `GET path` on the metrics listener: (HTTP status, body). `None` while nothing listens.
async fn http_get(address: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut out = String::new();
    stream.read_to_string(&mut out).await.ok()?;
    let status = out.split(' ').nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    Some((status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_and_the_conflist_follow_readiness() {
    let dir = tempfile::tempdir().unwrap();
    let conf_dir = dir.path().join("net.d");
    let mut config = test_config(dir.path());
    config.cni_conf_dir = Some(conf_dir.clone());
    let address = config.metrics_address.clone();
    let socket = config.socket_path.clone();
    let spool_dir = config.spool_dir();
    let (open_gate, gate) = watch::channel(false);
    let cloud = Arc::new(GatedCloud {
        inner: FakeCloud::new(),
        gate,
    });
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(daemon::run(
        daemon::Options {
            config,
            cloud,
            links: Arc::new(NoLinks),
            journal: Default::default(),
            on_ready: Some(ready_tx),
        },
        shutdown_rx,
    ));

    // Starting (the cloud has not answered discovery): alive, not ready, no conflist.
    // Bounded wait for the listener (not a timing assertion).
    let mut healthz = None;
    for _ in 0..1_500 {
        healthz = http_get(&address, "/healthz").await;
        if healthz.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(healthz, Some((200, "ok\n".to_string())));
    let (status, body) = http_get(&address, "/readyz").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("discovering the node"), "{body}");
    assert!(!conf_dir.join(CONFLIST_FILE_NAME).exists());

    open_gate.send(true).unwrap();
    let agent = ready_rx.await.expect("the agent becomes ready");
    assert!(agent.is_ready());

    // Ready: both probes 200, and the conflist points the plugin at this agent.
    assert_eq!(
        http_get(&address, "/healthz").await,
        Some((200, "ok\n".to_string()))
    );
    let (status, body) = http_get(&address, "/readyz").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let text = std::fs::read_to_string(conf_dir.join(CONFLIST_FILE_NAME)).unwrap();
    let conflist: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(conflist["plugins"][0]["type"], "vnet-cni");
    assert_eq!(
        conflist["plugins"][0]["agentSocket"],
        socket.display().to_string()
    );
    assert_eq!(
        conflist["plugins"][0]["spoolDir"],
        spool_dir.display().to_string(),
        "the plugin spools where this agent drains"
    );

    // Shutdown keeps the conflist: pods keep being set up across an agent restart.
    shutdown.send(true).unwrap();
    task.await.unwrap().unwrap();
    assert_eq!(
        std::fs::read_to_string(conf_dir.join(CONFLIST_FILE_NAME)).unwrap(),
        text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cni_conf_dir_no_conflist_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path());
    assert_eq!(config.cni_conf_dir, None);
    let agent = TestAgent::start(config, Arc::new(FakeCloud::new())).await;
    let (status, _) = http_get(&agent.metrics_address, "/readyz").await.unwrap();
    assert_eq!(status, 200);
    let mut files = Vec::new();
    for entry in walk(dir.path()) {
        if entry.ends_with(CONFLIST_FILE_NAME) {
            files.push(entry);
        }
    }
    assert!(files.is_empty(), "{files:?}");
    agent.stop().await;
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_agent_adapter_releases_reports_and_applies_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(test_config(dir.path()), Arc::new(FakeCloud::new())).await;

    // Without host management the adapter knows no host links, not even loopback.
    let standalone = KubeAgent::new(agent.agent.clone(), false);
    assert!(!standalone.host_veth_exists("lo"));
    // With it, it looks in this process's namespace.
    let managing = KubeAgent::new(agent.agent.clone(), true);
    assert!(managing.host_veth_exists("lo"));
    assert!(!managing.host_veth_exists("vnetnosuch0"));

    let allocated = agent.client.allocate(&alloc_req("a")).await.unwrap();
    let adapter: Arc<dyn NodeAgent> = Arc::new(standalone);
    assert_eq!(adapter.allocations(), vec![allocated.allocation.clone()]);
    assert!(adapter.status().ready);
    adapter.release(&key("a")).await.unwrap();
    adapter.release(&key("a")).await.unwrap();
    assert!(adapter.allocations().is_empty());
    assert!(
        agent
            .client
            .allocations()
            .await
            .unwrap()
            .allocations
            .is_empty()
    );

    adapter.apply_pool_overrides(&NodeIPPoolSpec {
        warm: Some(2),
        batch: Some(2),
        max: Some(20),
    });
    assert_eq!(adapter.status().pool.max, 20);
    // The pool task sizes the pool with the overrides.
    adapter.apply_pool_overrides(&NodeIPPoolSpec {
        warm: Some(12),
        batch: Some(4),
        max: Some(20),
    });
    eventually("the pool grows to the overridden warm", || {
        let adapter = adapter.clone();
        async move { adapter.status().pool.free >= 12 }
    })
    .await;
    // An invalid combination is ignored as a whole.
    adapter.apply_pool_overrides(&NodeIPPoolSpec {
        warm: Some(30),
        batch: None,
        max: Some(10),
    });
    assert_eq!(adapter.status().pool.max, 20);
    // An empty spec restores the configuration.
    adapter.apply_pool_overrides(&NodeIPPoolSpec::default());
    assert_eq!(adapter.status().pool.max, 250);
    agent.stop().await;
}
