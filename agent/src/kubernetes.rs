//! The agent as the Kubernetes integration (`vnet-kube`) sees it, and the CNI conflist the agent
//! publishes once it is ready.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use tracing::warn;
use vnet_api::{Allocation, AttachmentKey, ReleaseRequest, StatusResponse};
use vnet_kube::{BoxError, ConflistOptions, NodeAgent, NodeIPPoolSpec};

use crate::agent::Agent;
use crate::config::Config;

/// [`NodeAgent`] over the agent.
pub struct KubeAgent {
    agent: Arc<Agent>,
    /// Without host management the agent may not be in the node's namespace (tests, loopback
    /// runs), so it claims no knowledge of host links.
    manage_host: bool,
}

impl KubeAgent {
    pub fn new(agent: Arc<Agent>, manage_host: bool) -> Self {
        KubeAgent { agent, manage_host }
    }
}

#[async_trait]
impl NodeAgent for KubeAgent {
    fn status(&self) -> StatusResponse {
        self.agent.status()
    }

    fn allocations(&self) -> Vec<Allocation> {
        self.agent.allocations()
    }

    async fn release(&self, key: &AttachmentKey) -> Result<(), BoxError> {
        // The pod's veth is already gone (the caller checked), so there is no dying veth to wait
        // for: the address goes straight to its cooldown. Releasing an unknown key is a no-op.
        self.agent
            .release(ReleaseRequest {
                key: key.clone(),
                dying_veth: None,
            })
            .await
            .map(|_| ())
            .map_err(|e| Box::new(e) as BoxError)
    }

    fn set_pending_demand(&self, pods: u32) {
        self.agent.set_pending_demand(pods);
    }

    fn host_veth_exists(&self, name: &str) -> bool {
        self.manage_host && link_exists(name)
    }

    fn apply_pool_overrides(&self, overrides: &NodeIPPoolSpec) {
        if let Err(e) =
            self.agent
                .set_pool_overrides(overrides.warm, overrides.batch, overrides.max)
        {
            warn!(
                error = e,
                ?overrides,
                "NodeIPPool spec ignored; keeping the pool settings"
            );
        }
    }
}

/// Whether a link named `name` exists in this process's network namespace (the agent never
/// enters another one on its runtime threads).
pub fn link_exists(name: &str) -> bool {
    match nix::net::if_::if_nametoindex(name) {
        Ok(_) => true,
        Err(nix::errno::Errno::ENODEV) => false,
        // Unsure (e.g. out of file descriptors): say it exists, so nothing is released on a guess.
        Err(e) => {
            warn!(name, error = %e, "cannot look up a host link; assuming it exists");
            true
        }
    }
}

/// The conflist for this agent: the plugin talks to this agent's socket, spools undelivered
/// releases where this agent drains them and names host veths with its prefix. MTU and log level
/// are left to the plugin's defaults (the MTU comes from the agent's answer).
pub fn conflist_for(config: &Config) -> String {
    vnet_kube::conflist(&ConflistOptions {
        agent_socket: Some(config.socket_path.display().to_string()),
        spool_dir: Some(config.spool_dir().display().to_string()),
        host_veth_prefix: Some(config.host_veth_prefix.clone()),
        ..ConflistOptions::default()
    })
}

/// Writes the conflist into `dir` atomically (unchanged content is not rewritten).
pub async fn publish_conflist(dir: &Path, content: String) -> std::io::Result<PathBuf> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || vnet_kube::write_conflist(&dir, &content))
        .await
        .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_link_does_not_exist_and_loopback_does() {
        assert!(!link_exists("vnetnosuch0"));
        assert!(link_exists("lo"));
    }

    #[test]
    fn the_conflist_names_the_agent_socket_spool_dir_and_veth_prefix() {
        let config = Config {
            socket_path: "/run/x/agent.sock".into(),
            state_dir: "/var/lib/x".into(),
            host_veth_prefix: "pod".into(),
            ..Config::default()
        };
        let value: serde_json::Value = serde_json::from_str(&conflist_for(&config)).unwrap();
        assert_eq!(value["plugins"][0]["type"], "vnet-cni");
        assert_eq!(value["plugins"][0]["agentSocket"], "/run/x/agent.sock");
        assert_eq!(value["plugins"][0]["spoolDir"], "/var/lib/x/spool");
        assert_eq!(value["plugins"][0]["hostVethPrefix"], "pod");
    }
}
