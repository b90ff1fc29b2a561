//! vnet-agent's Kubernetes integration.
//!
//! - [`crd`]: the cluster-scoped `NodeIPPool` custom resource (one per node, owned by the Node).
//! - [`run`]: publishes the node's pool in that resource's status, watches the pods scheduled to
//!   the node, releases allocations whose pod is gone, and tells the pool how many pods are on
//!   their way. It talks to the agent only through [`NodeAgent`].
//! - [`conflist`]: the CNI config writer, free of Kubernetes types (standalone agents use it).
//! - [`delegate`]: cluster mode's [`ClusterProvider`], the agent's cloud provider that asks the
//!   cluster allocator through the NodeIPPool instead of calling Azure.
//! - [`client`]: in-cluster, `--kubeconfig`, or standalone (`None`).
//!
//! Every API-server failure (including an RBAC 403) is logged, shown as the
//! `KubeAccessDegraded` condition when the status can still be written, and retried: the node keeps
//! being served whatever the API server says.
//!
//! # Wiring it into the agent
//!
//! ```ignore
//! // Once the agent is ready (both modes): publish the conflist. Remove it only on uninstall.
//! let conf = vnet_kube::conflist(&ConflistOptions::default());
//! vnet_kube::write_conflist(Path::new(vnet_kube::conflist::DEFAULT_CNI_CONF_DIR), &conf)?;
//!
//! // In a cluster: run the integration beside the API server until shutdown.
//! let source = vnet_kube::ClientSource::from_env(cli.kubeconfig.as_deref());
//! if let Some(client) = vnet_kube::client(&source).await? {
//!     let agent: Arc<dyn NodeAgent> = Arc::new(AgentHandle::new(...));
//!     tokio::spawn(vnet_kube::run(client, node_name, agent, KubeConfig::default(), shutdown));
//! }
//! ```

pub mod cloud_ref;
pub mod conflist;
pub mod crd;
pub mod delegate;
pub mod listener;
mod sync;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use kube::config::{InClusterError, KubeConfigOptions, Kubeconfig, KubeconfigError};
use vnet_api::{Allocation, AttachmentKey, StatusResponse};

pub use conflist::{
    ConflistOptions, conflist, effective_conflist, remove_conflist, shadowing_conflist,
    write_conflist,
};
pub use crd::{
    CloudAnswer, CloudErrorRef, CloudRequest, IdentityRef, InstanceRef, NodeIPPool, NodeIPPoolSpec,
    NodeIPPoolStatus, PoolCondition, SecondaryIpRef,
};
pub use delegate::{ClusterProvider, ClusterSettings, InstanceSource, NodeNamer};
pub use sync::run;

/// Errors the agent returns to this crate; shown in logs only.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the Kubernetes integration needs from the agent. Kept small so the agent's pool and store
/// stay free of Kubernetes types; methods other than `release` must not block.
#[async_trait]
pub trait NodeAgent: Send + Sync {
    /// The same answer as `GET /v1/status`.
    fn status(&self) -> StatusResponse;
    /// Every allocation the agent holds (as `GET /v1/allocations`).
    fn allocations(&self) -> Vec<Allocation>;
    /// Releases one attachment as a CNI DEL would (idempotent). Called only for an allocation whose
    /// pod is gone from the API server for longer than the grace period and whose host veth no
    /// longer exists.
    async fn release(&self, key: &AttachmentKey) -> Result<(), BoxError>;
    /// Pods scheduled to this node that need an address and hold none yet: the pool should grow
    /// ahead of them. Replaces the previous value.
    fn set_pending_demand(&self, pods: u32);
    /// Whether a link with this name exists in the node's network namespace.
    fn host_veth_exists(&self, name: &str) -> bool;
    /// The per-node overrides from the NodeIPPool spec (all `None` when the spec is empty or the
    /// resource is gone). Called on start and whenever the spec changes.
    fn apply_pool_overrides(&self, _overrides: &NodeIPPoolSpec) {}
    /// The CNI config directory the agent publishes its conflist in, checked for another config
    /// that the runtime would load instead (the `ConflistShadowed` condition). By default the
    /// directory of this process's last [`write_conflist`]; `None` skips the check.
    fn cni_conf_dir(&self) -> Option<PathBuf> {
        conflist::published_dir()
    }
}

/// Timing of [`run`]. Defaults suit a real cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeConfig {
    /// How often the status is computed; it is written only when it changed...
    pub status_interval: Duration,
    /// ...or when this long has passed since the last write.
    pub status_resync: Duration,
    /// How often allocations are compared with the pods and the demand is recomputed.
    pub gc_interval: Duration,
    /// How long a pod must be gone before its allocation is released. The runtime's CNI DEL
    /// normally releases first; this only catches leaks.
    pub release_grace: Duration,
}

impl Default for KubeConfig {
    fn default() -> Self {
        KubeConfig {
            status_interval: Duration::from_secs(10),
            status_resync: Duration::from_secs(300),
            gc_interval: Duration::from_secs(15),
            release_grace: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot load kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: KubeconfigError,
    },
    #[error("cannot use the in-cluster service account: {0}")]
    InCluster(#[source] InClusterError),
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// Where the client's credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientSource {
    Kubeconfig(PathBuf),
    InCluster,
    /// No Kubernetes: the agent runs standalone.
    None,
}

impl ClientSource {
    /// An explicit `--kubeconfig` wins; otherwise in-cluster when the pod environment says so
    /// (`KUBERNETES_SERVICE_HOST`), otherwise standalone.
    pub fn choose(kubeconfig: Option<&Path>, in_cluster_env: bool) -> Self {
        match kubeconfig {
            Some(path) => ClientSource::Kubeconfig(path.to_owned()),
            None if in_cluster_env => ClientSource::InCluster,
            None => ClientSource::None,
        }
    }

    /// [`ClientSource::choose`] with the process environment.
    pub fn from_env(kubeconfig: Option<&Path>) -> Self {
        let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|v| !v.is_empty());
        Self::choose(kubeconfig, in_cluster)
    }
}

/// Builds the client for `source`; `Ok(None)` means standalone.
pub async fn client(source: &ClientSource) -> Result<Option<kube::Client>, ClientError> {
    // rustls needs one process-wide crypto provider; without this, building a TLS client panics
    // whenever the dependency graph enables none or both. Already installed (by us or the agent) is fine.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let config = match source {
        ClientSource::None => return Ok(None),
        ClientSource::InCluster => kube::Config::incluster().map_err(ClientError::InCluster)?,
        ClientSource::Kubeconfig(path) => {
            let file = Kubeconfig::read_from(path).map_err(|source| ClientError::Kubeconfig {
                path: path.clone(),
                source,
            })?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|source| ClientError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
    };
    kube::Client::try_from(config)
        .map(Some)
        .map_err(ClientError::Client)
}

/// The CRD as the YAML checked in at `deploy/crds/nodeippool.yaml`.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let body = serde_yaml::to_string(&NodeIPPool::crd()).expect("the CRD always serializes");
    format!(
        "# Generated by `cargo run -p vnet-kube --bin crdgen > deploy/crds/nodeippool.yaml`; do not edit.\n{body}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeconfig_flag_wins_then_in_cluster_then_standalone() {
        let path = Path::new("/etc/kubeconfig");
        assert_eq!(
            ClientSource::choose(Some(path), true),
            ClientSource::Kubeconfig(path.into())
        );
        assert_eq!(ClientSource::choose(None, true), ClientSource::InCluster);
        assert_eq!(ClientSource::choose(None, false), ClientSource::None);
    }

    #[tokio::test]
    async fn a_kubeconfig_file_gives_a_client() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        std::fs::write(
            &path,
            r#"apiVersion: v1
kind: Config
clusters:
- name: c
  cluster:
    server: https://127.0.0.1:6443
    insecure-skip-tls-verify: true
users:
- name: u
  user:
    token: not-a-real-token
contexts:
- name: ctx
  context: {cluster: c, user: u}
current-context: ctx
"#,
        )
        .unwrap();
        let source = ClientSource::choose(Some(&path), false);
        let client = client(&source).await.map_err(|e| e.to_string()).unwrap();
        assert!(client.is_some());
    }

    #[tokio::test]
    async fn standalone_has_no_client_and_a_missing_kubeconfig_is_a_clear_error() {
        assert!(client(&ClientSource::None).await.unwrap().is_none());
        let Err(err) = client(&ClientSource::Kubeconfig("/nonexistent/kubeconfig".into())).await
        else {
            panic!("a missing kubeconfig must fail");
        };
        assert!(err.to_string().contains("/nonexistent/kubeconfig"), "{err}");
    }
}
