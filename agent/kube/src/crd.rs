//! The `NodeIPPool` custom resource: one per node, named after the node, owned by the Node object
//! (so it is garbage-collected with it). The spec is written by people (per-node pool overrides),
//! the status only by that node's agent.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every vnet-cni custom resource.
pub const GROUP: &str = "vnet-cni.io";
pub const VERSION: &str = "v1alpha1";

/// Condition types the agent maintains in [`NodeIPPoolStatus::conditions`].
pub mod condition {
    /// The agent is ready and can serve an ADD now (or once its in-flight cloud write finishes).
    pub const READY: &str = "Ready";
    /// The subnet (or the NIC's or configured maximum) has no address left for this node.
    pub const SUBNET_FULL: &str = "SubnetFull";
    /// The last cloud call failed; `lastCloudError` says why.
    pub const CLOUD_DEGRADED: &str = "CloudDegraded";
    /// The API server refused (RBAC 403) or failed a call the agent needs; the node is still
    /// served, but pod-aware garbage collection or demand may be stale.
    pub const KUBE_ACCESS_DEGRADED: &str = "KubeAccessDegraded";
    /// Another CNI config in the runtime's config directory sorts before vnet-cni's, so the
    /// runtime gives new pods that network instead; the message names the file.
    pub const CONFLIST_SHADOWED: &str = "ConflistShadowed";
}

/// Per-node overrides of the agent's `[pool]` settings. Unset fields keep the agent's config.
#[derive(
    CustomResource, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema,
)]
#[kube(
    group = "vnet-cni.io",
    version = "v1alpha1",
    kind = "NodeIPPool",
    plural = "nodeippools",
    singular = "nodeippool",
    shortname = "nip",
    category = "vnet-cni",
    status = "NodeIPPoolStatus",
    doc = "The VNet address pool of one node, published by its vnet-cni agent.",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Total","type":"integer","jsonPath":".status.total"}"#,
    printcolumn = r#"{"name":"Allocated","type":"integer","jsonPath":".status.allocated"}"#,
    printcolumn = r#"{"name":"Free","type":"integer","jsonPath":".status.free"}"#,
    printcolumn = r#"{"name":"Cooldown","type":"integer","jsonPath":".status.cooldown"}"#,
    printcolumn = r#"{"name":"Target","type":"integer","jsonPath":".status.target"}"#,
    printcolumn = r#"{"name":"Cloud Error","type":"string","priority":1,"jsonPath":".status.lastCloudError"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NodeIPPoolSpec {
    /// Free addresses to keep ready on this node (overrides `pool.warm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm: Option<u32>,
    /// Grow/shrink step (overrides `pool.batch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<u32>,
    /// Never more pod addresses on this node's NIC (overrides `pool.max`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
}

/// What the agent reports. Counts are addresses of the pool on the node's NIC.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeIPPoolStatus {
    pub total: u32,
    pub allocated: u32,
    pub free: u32,
    /// Released addresses waiting out their cooldown before reuse.
    pub cooldown: u32,
    /// What the pool is steering its total towards.
    pub target: u32,
    /// Requested from the cloud and not yet assigned.
    pub pending: u32,
    pub max: u32,
    /// Pods scheduled to this node that need an address and hold none yet.
    pub pending_pods: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_cloud_error: Option<String>,
    #[serde(default)]
    pub conditions: Vec<PoolCondition>,
}

/// A condition in the usual Kubernetes shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolCondition {
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
    /// RFC 3339; changes only when `status` changes.
    pub last_transition_time: String,
}

impl PoolCondition {
    pub fn is_true(&self) -> bool {
        self.status == "True"
    }
}
