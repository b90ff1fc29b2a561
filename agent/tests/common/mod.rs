//! An in-process agent on a real Unix socket in a temp dir, against `FakeCloud` (or any provider).
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use vnet_agent::client::AgentClient;
use vnet_agent::config::Config;
use vnet_agent::daemon::{self, DaemonError};
use vnet_agent::netlink::{LinkOps, NoLinks};
use vnet_api::{AllocateRequest, AttachmentKey, ReleaseRequest};
use vnet_cloud::CloudProvider;

pub struct TestAgent {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub metrics_address: String,
    pub client: AgentClient,
    /// The in-process agent, as an embedder sees it.
    pub agent: Arc<vnet_agent::agent::Agent>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<Result<(), DaemonError>>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A config for tests: everything under `root`, no host changes, a free loopback metrics port.
pub fn test_config(root: &std::path::Path) -> Config {
    let port = free_port();
    let mut config = Config {
        socket_path: root.join("run/agent.sock"),
        state_dir: root.join("state"),
        metrics_address: format!("127.0.0.1:{port}"),
        manage_host: false,
        masquerade: false,
        ..Config::default()
    };
    config.pool.cooldown_secs = 0;
    config
}

impl TestAgent {
    pub async fn start(config: Config, cloud: Arc<dyn CloudProvider>) -> TestAgent {
        Self::start_with_links(config, cloud, Arc::new(NoLinks)).await
    }

    pub async fn start_with_links(
        mut config: Config,
        cloud: Arc<dyn CloudProvider>,
        links: Arc<dyn LinkOps>,
    ) -> TestAgent {
        // The free port test_config picked can be taken by another test's connection before the
        // agent binds it: then pick another (the port is set-up, not what these tests check).
        for _ in 0..5 {
            match Self::try_start(config.clone(), cloud.clone(), links.clone()).await {
                Ok(agent) => return agent,
                Err(DaemonError::Metrics { source, .. })
                    if source.kind() == std::io::ErrorKind::AddrInUse =>
                {
                    config.metrics_address = format!("127.0.0.1:{}", free_port());
                }
                Err(e) => panic!("agent exited during start-up: {e}"),
            }
        }
        panic!("no free metrics port after 5 tries");
    }

    async fn try_start(
        config: Config,
        cloud: Arc<dyn CloudProvider>,
        links: Arc<dyn LinkOps>,
    ) -> Result<TestAgent, DaemonError> {
        let (shutdown, rx) = watch::channel(false);
        let socket = config.socket_path.clone();
        let state_dir = config.state_dir.clone();
        let metrics_address = config.metrics_address.clone();
        let (ready_tx, mut ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(daemon::run(
            daemon::Options {
                config,
                cloud,
                links,
                journal: Default::default(),
                on_ready: Some(ready_tx),
            },
            rx,
        ));
        let client = AgentClient::new(&socket);
        // Bounded wait for readiness (not a timing assertion: a slow machine just waits longer).
        for _ in 0..1_000 {
            if task.is_finished() {
                return match task.await.expect("agent task") {
                    Err(e) => Err(e),
                    Ok(()) => panic!("agent exited during start-up without an error"),
                };
            }
            if let Ok(agent) = ready_rx.try_recv() {
                assert!(client.health().await.unwrap().ready);
                return Ok(TestAgent {
                    agent,
                    socket,
                    state_dir,
                    metrics_address,
                    client,
                    shutdown,
                    task,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("agent did not become ready");
    }

    /// Graceful stop, as on SIGTERM.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        self.task
            .await
            .expect("agent task")
            .expect("agent exits cleanly");
    }
}

pub fn key(id: &str) -> AttachmentKey {
    format!("{id}/eth0").parse().unwrap()
}

pub fn alloc_req(id: &str) -> AllocateRequest {
    AllocateRequest {
        key: key(id),
        network: Some("vnet".into()),
        netns: None,
        pod: vnet_api::PodRef {
            namespace: Some("default".into()),
            name: Some(format!("pod-{id}")),
            uid: None,
        },
    }
}

pub fn release_req(id: &str) -> ReleaseRequest {
    ReleaseRequest {
        key: key(id),
        dying_veth: None,
    }
}

/// Polls `check` until it returns true (bounded; panics with `what` otherwise).
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..1_500 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never happened: {what}");
}

/// A mock on loopback with the lab's operation timing (`Retry-After: 1`; the mock's default is
/// Azure's 10), from `config` as the test shaped it.
pub async fn start_mock_with_lab_timing(
    mut config: vnet_mockcloud::MockConfig,
) -> vnet_mockcloud::MockServer {
    config.faults.operation_retry_after_secs = Some(1);
    vnet_mockcloud::MockServer::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("mock starts")
}

/// [`test_config`] with node-1 of `mock` as the cloud (the mock provider, no credential).
pub fn mock_agent_config(root: &std::path::Path, mock: &vnet_mockcloud::MockServer) -> Config {
    let mut config = test_config(root);
    config.cloud.provider = vnet_agent::config::ProviderKind::Mock;
    config.cloud.credential = vnet_agent::config::CredentialKind::None;
    config.cloud.arm_endpoint = mock.base_url();
    config.cloud.imds_endpoint = mock.imds_endpoint("node-1");
    config
}
