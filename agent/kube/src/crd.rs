//! The `NodeIPPool` custom resource: one per node, named after the node, owned by the Node object
//! (so it is garbage-collected with it). The spec is written by people (per-node pool overrides).
//! The status is written by that node's agent, except `status.cloud`: in cluster mode the agent
//! makes no cloud call, it asks in `status.cloudRequest` and the cluster allocator (the only one
//! calling Azure for the cluster) answers in `status.cloud`. Every writer merge-patches only its
//! own fields.

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

/// What the agent reports. Counts are addresses of the pool on the node's NIC. Every field has
/// a default: in cluster mode `cloudRequest` (and the allocator's `cloud`) can be written before
/// the agent's first status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
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
    /// Cluster mode: what the agent asks of the allocator (written by the agent only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_request: Option<CloudRequest>,
    /// Cluster mode: the allocator's answer (written by the allocator only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud: Option<CloudAnswer>,
}

/// Cluster mode: the NIC the agent wants. A desired state, not a queue of operations, so a
/// repeated or lost write is harmless: the allocator brings the NIC to it and says so.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CloudRequest {
    /// Bumped by the agent on every change of the request; the allocator echoes the generation
    /// it last acted on in [`CloudAnswer::observed_generation`].
    pub generation: u64,
    /// From IMDS: how the allocator finds the node's VM and NIC.
    pub instance: InstanceRef,
    /// Single-address ipConfigurations of ours the NIC should hold once this is done.
    #[serde(default)]
    pub addresses: u32,
    /// Prefix mode: block ipConfigurations of ours the NIC should hold once this is done.
    #[serde(default)]
    pub blocks: u32,
    /// Prefix length of new blocks (Azure: 28).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_prefix_length: Option<u8>,
    /// Names of the ipConfigurations of ours the agent gave up (the `name` of entries in
    /// `status.cloud.secondaryIps`; a block is one entry, listed only when every one of its
    /// addresses is free and cooled down): the allocator removes those entries. Names, not
    /// addresses: Azure hands a released address out again under a new name, and that entry
    /// must stay. The counts above already exclude them.
    #[serde(default)]
    pub release: Vec<String>,
    /// Pods waiting on this node for an address now: nodes with waiting pods are served before
    /// nodes that only top up their warm pool.
    #[serde(default)]
    pub waiting_pods: u32,
}

/// The IMDS facts of [`vnet_cloud::InstanceMetadata`], as the resource carries them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceRef {
    /// ARM resource ID of the VM or scale-set instance.
    pub vm_id: String,
    #[serde(default)]
    pub vm_name: String,
    #[serde(default)]
    pub computer_name: String,
    #[serde(default)]
    pub scale_set: String,
    #[serde(default)]
    pub mac: String,
    #[serde(default)]
    pub az_environment: String,
}

/// Cluster mode: what the allocator last did for the node and what the NIC holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CloudAnswer {
    /// The request generation this answer is for: done (`error` unset) or failed (`error` set).
    pub observed_generation: u64,
    /// The node as ARM knows it (resolved once per node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityRef>,
    /// Every ipConfiguration of ours on the NIC after the allocator's last read or write.
    #[serde(default)]
    pub secondary_ips: Vec<SecondaryIpRef>,
    /// Why the request of `observedGeneration` could not be done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<CloudErrorRef>,
    /// RFC 3339 time of this answer.
    #[serde(default)]
    pub updated: String,
}

/// [`vnet_cloud::NodeIdentity`] as the resource carries it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdentityRef {
    pub vm_name: String,
    pub vm_id: String,
    pub nic_id: String,
    pub mac: String,
    pub primary_ip: String,
    pub subnet_id: String,
    pub subnet_prefix: String,
    pub vnet_address_space: Vec<String>,
    /// `vm`, `uniform` or `flexible`.
    pub kind: String,
    #[serde(default)]
    pub scale_set: String,
    #[serde(default)]
    pub computer_name: String,
}

/// [`vnet_cloud::SecondaryIp`] as the resource carries it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecondaryIpRef {
    pub name: String,
    pub ip: String,
    /// 32 for one address, the block's length otherwise.
    pub prefix_length: u8,
}

/// [`vnet_cloud::CloudError`] as the resource carries it: the agent maps it back to the same
/// variant, so it reacts as it would to its own call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CloudErrorRef {
    /// [`vnet_cloud::CloudError::code`].
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
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
