//! Start-up, serving and shutdown, in this order:
//!
//! 1. discover the node through the cloud provider (retried until it answers);
//! 2. open the store (recovering from any crash) and rebuild the IPAM state;
//! 3. reconcile with the cloud's list of the NIC's addresses (retried; a failed read changes
//!    nothing, and allocations are never dropped — see [`crate::ipam`]);
//! 4. start the veth reaper and hand it every dying veth and leftover tombstone;
//! 5. drain the release spool (before any allocation can be served);
//! 6. enable IPv4 forwarding and install the masquerade table;
//! 7. serve the API (Unix socket), start the pool task, report ready, write the CNI conflist
//!    (when `cni_conf_dir` is set).
//!
//! The TCP listener (metrics, `/healthz`, `/readyz`) is up before step 1, so liveness holds
//! while the cloud is slow and `/readyz` names the step the agent waits in.
//!
//! On shutdown (SIGTERM in `main`): stop accepting, let in-flight requests finish (4 s at most),
//! stop the pool task (2 s at most: a hung cloud call is abandoned), flush and close the store,
//! remove the socket. `main` exits the process if all this takes longer than [`STOP_DEADLINE`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, info, warn};
use vnet_cloud::{CloudError, CloudProvider};

use crate::agent::{Agent, AgentSettings};
use crate::api::Probes;
use crate::config::Config;
use crate::kubernetes::conflist_for;
use crate::masq::{self, HostError};
use crate::metrics::{MeteredCloud, Metrics};
use crate::netlink::LinkOps;
use crate::pool;
use crate::spool;
use crate::store::{JournalOptions, JournalStore, StoreError};

/// The agent exits within this long after SIGTERM, whatever the cloud does: `main` exits the
/// process when a graceful stop takes longer. Safe, because every acknowledged change is
/// already durable, and an interrupted cloud write is reconciled at the next start. The
/// DaemonSet's grace period and the unit's `TimeoutStopSec` (15 s) leave room above it.
pub const STOP_DEADLINE: Duration = Duration::from_secs(8);
/// How long shutdown waits for in-flight requests. Allocations waiting for the pool fail at once
/// ("try again later"); what is left waits for a store write.
const REQUEST_GRACE: Duration = Duration::from_secs(4);
/// How long shutdown waits for the pool task to finish a cloud call before abandoning it.
const POOL_GRACE: Duration = Duration::from_secs(2);
/// How often the spool is drained after start-up (a DEL may race the start).
const SPOOL_INTERVAL: Duration = Duration::from_secs(10);
/// The node identity as the last successful discovery found it, in the state directory.
pub const IDENTITY_FILE: &str = "node-identity.json";
/// Start-up reconcile attempts (1 s, 2 s, 4 s apart) before an agent with a stored identity
/// serves from its stored pool.
const STARTUP_RECONCILE_ATTEMPTS: u32 = 3;

fn read_identity(state_dir: &std::path::Path) -> Option<vnet_cloud::NodeIdentity> {
    let path = state_dir.join(IDENTITY_FILE);
    let bytes = std::fs::read(&path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(identity) => Some(identity),
        Err(e) => {
            warn!(file = %path.display(), error = %e, "stored node identity unreadable; ignored");
            None
        }
    }
}

fn write_identity(
    state_dir: &std::path::Path,
    identity: &vnet_cloud::NodeIdentity,
) -> Result<(), StoreError> {
    std::fs::create_dir_all(state_dir).map_err(|e| StoreError::Io {
        path: state_dir.display().to_string(),
        message: e.to_string(),
    })?;
    let bytes = serde_json::to_vec_pretty(identity).expect("the identity serializes");
    crate::store::journal::write_atomic(state_dir, IDENTITY_FILE, &bytes)
}

/// How often forwarding and the nftables table are re-checked (and restored).
pub const HOST_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// Retry delay for a conflist write that failed.
const CONFLIST_RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("host setup: {0}")]
    Host(#[from] HostError),
    #[error("cannot serve the API on {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot serve metrics on {address}: {source}")]
    Metrics {
        address: String,
        source: std::io::Error,
    },
    #[error("configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("cloud: {0}")]
    Cloud(#[from] CloudError),
    #[error("shut down before start-up finished")]
    Interrupted,
    #[error(
        "node name {name:?} (from {from}) is not a valid Kubernetes node name (a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', each label starting and ending with a letter or digit, at most 253 characters); set node_name to the name kubelet registers"
    )]
    NodeName { name: String, from: &'static str },
}

pub struct Options {
    pub config: Config,
    pub cloud: Arc<dyn CloudProvider>,
    pub links: Arc<dyn LinkOps>,
    pub journal: JournalOptions,
    /// Receives the agent once it is ready, for an embedder (e.g. the Kubernetes integration,
    /// which calls `status`, `allocations`, `release` and `set_pending_demand`).
    pub on_ready: Option<tokio::sync::oneshot::Sender<Arc<Agent>>>,
}

async fn retry<T, F, Fut>(
    what: &str,
    shutdown: &mut watch::Receiver<bool>,
    mut f: F,
) -> Result<T, DaemonError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, CloudError>>,
{
    let mut attempt = 0u32;
    loop {
        let result = tokio::select! {
            r = f() => r,
            _ = shutdown.wait_for(|s| *s) => return Err(DaemonError::Interrupted),
        };
        match result {
            Ok(v) => return Ok(v),
            Err(e) => {
                attempt += 1;
                let delay = Duration::from_secs((1u64 << attempt.min(5)).min(30));
                warn!(error = %e, attempt, ?delay, "{what} failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.wait_for(|s| *s) => return Err(DaemonError::Interrupted),
                }
            }
        }
    }
}

/// Drains the spool once; returns how many releases were applied.
pub async fn drain_spool(agent: &Agent, dir: &std::path::Path) -> usize {
    let entries = match spool::read_spool(dir) {
        Ok(e) => e,
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "cannot read the release spool");
            return 0;
        }
    };
    let mut drained = 0;
    for entry in entries {
        // Re-read under the agent's spool lock: an allocation may have applied it meanwhile.
        match agent.apply_spool_file(&entry.path).await {
            Ok(applied) => drained += usize::from(applied),
            Err(e) => {
                warn!(file = %entry.path.display(), error = %e, "spooled release failed; kept for the next drain")
            }
        }
    }
    if drained > 0 {
        info!(drained, "spooled releases applied");
    }
    drained
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Writes the CNI conflist (the runtime then reports the node's network ready). A failed write is
/// retried in the background until shutdown; the file is never removed here (only on uninstall),
/// so pods keep being set up while the agent restarts.
async fn publish_conflist(dir: PathBuf, content: String, mut shutdown: watch::Receiver<bool>) {
    match crate::kubernetes::publish_conflist(&dir, content.clone()).await {
        Ok(path) => {
            info!(path = %path.display(), "CNI conflist written");
            return;
        }
        Err(e) => {
            error!(dir = %dir.display(), error = %e, "cannot write the CNI conflist; retrying")
        }
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(CONFLIST_RETRY) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            match crate::kubernetes::publish_conflist(&dir, content.clone()).await {
                Ok(path) => {
                    info!(path = %path.display(), "CNI conflist written");
                    return;
                }
                Err(e) => {
                    warn!(dir = %dir.display(), error = %e, "cannot write the CNI conflist; retrying")
                }
            }
        }
    });
}

/// Re-checks ip_forward and the agent's nftables table every [`HOST_CHECK_INTERVAL`] and puts
/// back whatever a firewall reload, an `nft flush ruleset` or a sysctl reset removed.
async fn keep_host_rules(rules: masq::HostRules) {
    loop {
        tokio::time::sleep(HOST_CHECK_INTERVAL).await;
        let r = rules.clone();
        match tokio::task::spawn_blocking(move || masq::ensure(&r)).await {
            Ok(Ok(repaired)) => {
                if repaired.forwarding {
                    warn!("IPv4 forwarding was off; turned back on");
                }
                if repaired.table {
                    warn!(
                        table = masq::TABLE,
                        "the agent's nftables table was missing or incomplete; restored"
                    );
                }
            }
            Ok(Err(e)) => {
                error!(error = %e, "cannot restore forwarding or the nftables table; retrying")
            }
            Err(e) => error!(error = %e, "host check failed"),
        }
    }
}

/// Runs the agent until `shutdown` turns true.
pub async fn run(options: Options, mut shutdown: watch::Receiver<bool>) -> Result<(), DaemonError> {
    let Options {
        config,
        cloud,
        links,
        journal,
        on_ready,
    } = options;
    info!(
        version = env!("CARGO_PKG_VERSION"),
        socket = %config.socket_path.display(),
        state_dir = %config.state_dir.display(),
        provider = ?config.cloud.provider,
        "vnet-agent starting"
    );
    let metrics = Arc::new(Metrics::new());
    let cloud: Arc<dyn CloudProvider> = Arc::new(MeteredCloud::new(cloud, metrics.clone()));

    // The probes answer from the first moment: a node whose cloud is slow to answer is alive,
    // just not ready.
    let probes = Probes::new(metrics.clone());
    let metrics_address = config.metrics_socket_addr()?;
    let metrics_listener = tokio::net::TcpListener::bind(metrics_address)
        .await
        .map_err(|source| DaemonError::Metrics {
            address: config.metrics_address.clone(),
            source,
        })?;
    info!(address = %metrics_listener.local_addr().map_or(metrics_address, |a| a), "serving metrics and probes");
    let metrics_app = crate::api::metrics_router(probes.clone());
    // Served until `run` returns (not stopped by the signal): the probes keep answering while
    // in-flight requests finish, with /readyz saying the agent is stopping.
    let mut metrics_task = AbortOnDrop(tokio::spawn(async move {
        vnet_kube::listener::serve(metrics_listener, metrics_app).await;
    }));

    probes.set_phase("discovering the node through the cloud");
    let stored_identity = read_identity(&config.state_dir);
    let identity = match &stored_identity {
        // Known from an earlier run: one attempt, then the stored identity (a cloud outage
        // must not keep a restarted agent from serving its stored pool).
        Some(stored) => match tokio::select! {
            r = cloud.discover() => r,
            _ = shutdown.wait_for(|s| *s) => return Err(DaemonError::Interrupted),
        } {
            Ok(found) => found,
            Err(e) => {
                warn!(error = %e, vm = stored.vm_name, nic = stored.nic_id, "node discovery failed; using the identity stored by the previous run");
                stored.clone()
            }
        },
        None => retry("node discovery", &mut shutdown, || cloud.discover()).await?,
    };
    info!(vm = identity.vm_name, kind = identity.kind.as_str(), scale_set = identity.scale_set, nic = identity.nic_id, primary_ip = %identity.primary_ip, subnet = %identity.subnet_prefix, "node discovered");
    if stored_identity.as_ref() != Some(&identity)
        && let Err(e) = write_identity(&config.state_dir, &identity)
    {
        warn!(error = %e, "cannot store the node identity; a restart during a cloud outage will wait for the cloud");
    }

    // Compute's instance update cannot carry a prefix length (docs/cloud.md): refuse at once
    // rather than fail every grow.
    if config.pool.mode == crate::config::PoolMode::Prefix
        && identity.kind == vnet_cloud::NodeKind::Uniform
    {
        return Err(DaemonError::Cloud(CloudError::Fatal(format!(
            "pool.mode = \"prefix\" is not available on a Uniform scale-set instance ({}): Compute's instance update has no privateIPAddressPrefixLength; use pool.mode = \"address\"",
            identity.vm_name
        ))));
    }

    probes.set_phase("opening the allocation store");
    let state_dir = config.state_dir.clone();
    let (store, loaded) =
        tokio::task::spawn_blocking(move || JournalStore::open(&state_dir, journal))
            .await
            .expect("store open does not panic")?;
    let store = Arc::new(store);
    info!(
        allocations = loaded.allocations.len(),
        pool = loaded.pool.len(),
        cooldown = loaded.cooldown.len(),
        "store loaded"
    );

    // Azure keeps every ipConfiguration of a NIC in one subnet: pods use the NIC's.
    let subnet_id = identity.subnet_id.clone();
    let settings = AgentSettings {
        node_name: node_name(config.node_name.as_deref(), &identity.computer_name, || {
            std::fs::read_to_string("/proc/sys/kernel/hostname").ok()
        })?,
        pool: pool::Settings {
            warm: config.pool.warm,
            batch: config.pool.batch,
            max: config.pool.max,
            release_delay: Duration::from_secs(config.pool.release_delay_secs),
            prefix_len: config.pool.mode.prefix_len(),
        },
        cooldown_secs: config.pool.cooldown_secs,
        allocate_timeout: Duration::from_secs(config.pool.allocate_timeout_secs),
        host_veth_prefix: config.host_veth_prefix.clone(),
        mtu: config.mtu,
        subnet_id,
        spool_dir: Some(config.spool_dir()),
    };
    let agent = Agent::new(
        settings,
        identity.clone(),
        cloud.clone(),
        store.clone(),
        loaded,
        metrics,
    );

    probes.set_phase("reading the NIC's addresses from the cloud");
    if stored_identity.is_some() {
        // A few attempts; then serve from the stored pool (every address in it was on the NIC
        // at the last reconcile) and let the pool task reconcile once the cloud answers.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let done = tokio::select! {
                r = agent.reconcile_with_cloud() => r.is_ok(),
                _ = shutdown.wait_for(|s| *s) => return Err(DaemonError::Interrupted),
            };
            if done {
                break;
            }
            if attempts >= STARTUP_RECONCILE_ATTEMPTS {
                warn!(
                    "the cloud does not answer; serving from the stored pool until it does (no pool growth, releases journaled)"
                );
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1 << attempts)) => {}
                _ = shutdown.wait_for(|s| *s) => return Err(DaemonError::Interrupted),
            }
        }
    } else {
        retry("reading the NIC's addresses", &mut shutdown, || {
            agent.reconcile_with_cloud()
        })
        .await?;
    }

    tokio::spawn(agent.clone().run_reaper(links.clone()));
    agent.sweep_tombstones(links.as_ref()).await;

    probes.set_phase("draining the release spool and preparing the host");
    let spool_dir = config.spool_dir();
    drain_spool(&agent, &spool_dir).await;

    let host_task = if config.manage_host {
        let mut rules = masq::HostRules {
            masquerade: None,
            drop_pod_imds: (!config.pod_imds_access).then(|| config.host_veth_prefix.clone()),
        };
        if config.masquerade {
            let mut non_masq = config.non_masquerade_networks()?;
            if non_masq.is_empty() {
                non_masq = identity.vnet_address_space.clone();
            }
            // Pods draw from the NIC's subnet.
            let sources = vec![identity.subnet_prefix];
            rules.masquerade = Some((sources, identity.primary_ip, non_masq));
        }
        tokio::task::spawn_blocking(masq::enable_forwarding)
            .await
            .expect("no panic")?;
        if !rules.is_empty() {
            let script = rules.script();
            tokio::task::spawn_blocking(move || masq::apply_nft(&script, masq::NFT_TIMEOUT))
                .await
                .expect("no panic")?;
            info!(masquerade = ?rules.masquerade, drop_pod_imds = rules.drop_pod_imds.is_some(), "host table installed");
        }
        Some(AbortOnDrop(tokio::spawn(keep_host_rules(rules))))
    } else {
        None
    };

    let socket_path = config.socket_path.clone();
    let listener = crate::api::bind_socket(&socket_path).map_err(|source| DaemonError::Socket {
        path: socket_path.clone(),
        source,
    })?;
    let app = crate::api::router(agent.clone());
    let mut api_shutdown = shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = api_shutdown.wait_for(|s| *s).await;
            })
            .await
    });

    let pool_task = tokio::spawn(agent.clone().run_pool(shutdown.clone()));
    let spool_task = {
        let agent = agent.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let stop = tokio::select! {
                    _ = tokio::time::sleep(SPOOL_INTERVAL) => false,
                    _ = shutdown.wait_for(|s| *s) => true,
                };
                if stop {
                    break;
                }
                drain_spool(&agent, &spool_dir).await;
            }
        })
    };
    agent.set_ready(true);
    probes.set_agent(agent.clone());
    if let Some(dir) = config.cni_conf_dir.clone() {
        publish_conflist(dir, conflist_for(&config), shutdown.clone()).await;
    }
    if let Some(tx) = on_ready {
        let _ = tx.send(agent.clone());
    }
    info!(socket = %socket_path.display(), node = agent.settings().node_name, "ready");

    let _ = shutdown.wait_for(|s| *s).await;
    probes.set_stopping();
    agent.stop_waiting();
    info!("shutting down: no new requests; finishing those in flight");
    let mut server = server;
    match tokio::time::timeout(REQUEST_GRACE, &mut server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => error!(error = %e, "API server failed"),
        Ok(Err(e)) => error!(error = %e, "API server task failed"),
        Err(_) => {
            warn!("in-flight requests did not finish within {REQUEST_GRACE:?}; abandoned");
            server.abort();
        }
    }
    agent.set_ready(false);
    let mut pool_task = pool_task;
    if tokio::time::timeout(POOL_GRACE, &mut pool_task)
        .await
        .is_err()
    {
        warn!(
            "the pool task did not stop within {POOL_GRACE:?} (a cloud call in flight); abandoned: an interrupted cloud write is reconciled at the next start"
        );
        pool_task.abort();
    }
    spool_task.abort();
    drop(host_task);
    if let Err(e) = agent.flush().await {
        error!(error = %e, "final store flush failed");
    }
    let closing = store.clone();
    let _ = tokio::task::spawn_blocking(move || closing.close()).await;
    let _ = std::fs::remove_file(&socket_path);
    // The listener is closed before `run` returns, so a restart can bind the same port.
    metrics_task.0.abort();
    let _ = (&mut metrics_task.0).await;
    info!("stopped");
    Ok(())
}

/// The Kubernetes node name: the configured one, else the name kubelet registers by default, the
/// host name: Azure's computer name (lowercased, as kubelet does), else the kernel's. Never the
/// VM name: on a Uniform instance IMDS `compute.name` is `{ss}_{id}`, not a valid node name.
/// (Cluster mode's provider names the node's NodeIPPool by the same rule.)
pub fn node_name(
    configured: Option<&str>,
    computer_name: &str,
    hostname: impl FnOnce() -> Option<String>,
) -> Result<String, DaemonError> {
    let (name, from) = match configured {
        Some(name) => (name.to_string(), "node_name"),
        None if !computer_name.is_empty() => (
            computer_name.to_ascii_lowercase(),
            "IMDS compute.osProfile.computerName",
        ),
        None => (
            hostname().unwrap_or_default().trim().to_ascii_lowercase(),
            "the host name",
        ),
    };
    if is_dns1123_subdomain(&name) {
        Ok(name)
    } else {
        Err(DaemonError::NodeName { name, from })
    }
}

fn is_dns1123_subdomain(name: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            label.starts_with(alnum)
                && label.ends_with(alnum)
                && label.chars().all(|c| alnum(c) || c == '-')
        })
}

#[cfg(test)]
mod node_name_tests {
    use super::*;

    fn no_hostname() -> Option<String> {
        None
    }

    #[test]
    fn a_uniform_instance_is_named_by_its_computer_name_not_its_vm_name() {
        let name = node_name(None, "aks-nodepool1-12345678-VMSS000000", no_hostname).unwrap();
        assert_eq!(name, "aks-nodepool1-12345678-vmss000000");
    }

    #[test]
    fn without_a_computer_name_the_host_name_is_used() {
        let name = node_name(None, "", || Some("Node-7.example\n".into())).unwrap();
        assert_eq!(name, "node-7.example");
    }

    #[test]
    fn the_configured_name_wins_and_is_checked() {
        assert_eq!(node_name(Some("n1"), "other", no_hostname).unwrap(), "n1");
        let err = node_name(Some("pool1_0"), "other", no_hostname).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("\"pool1_0\" (from node_name)"),
            "{message}"
        );
        assert!(message.contains("DNS-1123"), "{message}");
    }

    #[test]
    fn names_that_are_not_dns1123_subdomains_are_refused() {
        for bad in ["", "pool1_0", "-a", "a-", "a..b", &"a".repeat(254)] {
            assert!(
                node_name(None, "", || Some(bad.to_string())).is_err(),
                "{bad:?}"
            );
        }
        assert!(node_name(None, "", no_hostname).is_err());
    }
}
