//! The cloud boundary of vnet-agent.
//!
//! [`CloudProvider`] is what the agent needs from a cloud: who this node is, which secondary
//! addresses its NIC holds, and to add or remove some. [`azure::AzureProvider`] talks to Azure
//! Resource Manager and IMDS (and, with other base URLs, to `vnet-mockcloud`); [`fake::FakeCloud`]
//! is an in-process stand-in for the agent's unit tests.

use std::net::Ipv4Addr;
use std::time::Duration;

use async_trait::async_trait;
use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

pub mod azure;
pub mod fake;

/// Prefix of every ipConfiguration this product creates. Nothing without it is ever touched.
pub const IP_CONFIG_PREFIX: &str = "vnet-cni-";

/// What discovery learns about the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIdentity {
    /// The VM name as the cloud knows it.
    pub vm_name: String,
    /// ARM resource ID of the VM.
    pub vm_id: String,
    /// ARM resource ID of the node's primary NIC.
    pub nic_id: String,
    /// The NIC's MAC, lowercase with colons (`00:0d:3a:32:85:70`).
    pub mac: String,
    pub primary_ip: Ipv4Addr,
    /// ARM resource ID of the primary IP's subnet.
    pub subnet_id: String,
    pub subnet_prefix: Ipv4Network,
    /// The VNet's address space: the default non-masquerade CIDRs.
    pub vnet_address_space: Vec<Ipv4Network>,
    /// What kind of machine the node is, as the cloud reports it (it decides how the NIC is written).
    #[serde(default)]
    pub kind: NodeKind,
    /// The scale set the node belongs to (empty for a standalone VM).
    #[serde(default)]
    pub scale_set: String,
    /// The guest's host name as Azure set it (IMDS `compute.osProfile.computerName`): the name
    /// kubelet registers the node under. Empty when IMDS does not report it.
    #[serde(default)]
    pub computer_name: String,
}

/// What the instance metadata service tells a node about itself (no ARM call needed): enough for
/// anyone with ARM access (the node itself, or the cluster allocator for it) to find its NIC.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceMetadata {
    /// ARM resource ID of the VM (or scale-set instance).
    pub vm_id: String,
    pub vm_name: String,
    /// The guest's host name as Azure set it (`osProfile.computerName`); may be empty.
    #[serde(default)]
    pub computer_name: String,
    /// Empty for a standalone VM.
    #[serde(default)]
    pub scale_set: String,
    /// The first interface's MAC as IMDS reports it (normalized), used when the NIC reports none.
    #[serde(default)]
    pub mac: String,
    /// `AzurePublicCloud`, `AzureUSGovernmentCloud`, ...; may be empty.
    #[serde(default)]
    pub az_environment: String,
}

/// A standalone VM, or a member of a virtual machine scale set in one of its two orchestration
/// modes. Uniform instances have no standalone NIC: their NIC is written through the instance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    #[default]
    Vm,
    Uniform,
    Flexible,
}

impl NodeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeKind::Vm => "vm",
            NodeKind::Uniform => "uniform",
            NodeKind::Flexible => "flexible",
        }
    }
}

/// The prefix length of a pool entry that is one address.
pub const SINGLE_ADDRESS: u8 = 32;
/// The only block size Azure hands out (`privateIPAddressPrefixLength`; see docs/cloud.md).
pub const AZURE_PREFIX_LENGTH: u8 = 28;

/// One secondary ipConfiguration on the NIC that this product owns: one address, or (prefix
/// mode) an aligned block `ip/prefix_len` of which `ip` is the first address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecondaryIp {
    /// The ipConfiguration's name (always starts with [`IP_CONFIG_PREFIX`]).
    pub name: String,
    pub ip: Ipv4Addr,
    pub subnet_id: String,
    /// 32 for one address; the block's length otherwise.
    #[serde(default = "single_address")]
    pub prefix_len: u8,
}

fn single_address() -> u8 {
    SINGLE_ADDRESS
}

impl SecondaryIp {
    pub fn is_block(&self) -> bool {
        self.prefix_len < SINGLE_ADDRESS
    }

    /// What the entry holds, as a network (`/32` for one address).
    pub fn network(&self) -> Ipv4Network {
        Ipv4Network::new(self.ip, self.prefix_len).expect("a prefix length of at most 32")
    }

    /// Every address the entry holds.
    pub fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> + use<> {
        self.network().iter()
    }
}

/// What ARM last reported about the caller's request budget (its
/// `x-ms-ratelimit-remaining-subscription-reads/writes` headers) and how many 429s it answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArmBudget {
    pub remaining_reads: Option<u64>,
    pub remaining_writes: Option<u64>,
    pub throttled: u64,
}

/// Errors the agent acts on: each variant implies a different reaction (wait, back off, report).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloudError {
    #[error("throttled by the cloud API; retry after {retry_after:?}")]
    Throttled { retry_after: Duration },
    #[error("the NIC is busy with another operation ({code}); retry after {retry_after:?}")]
    Busy { code: String, retry_after: Duration },
    #[error("subnet {subnet_id} is full: {message}")]
    SubnetFull { subnet_id: String, message: String },
    #[error("NIC limit reached: {message}")]
    NicLimitReached { message: String },
    #[error("not found: {0}")]
    NotFound(String),
    #[error("not authorized: {message}")]
    Unauthorized { message: String },
    #[error("transient cloud error: {0}")]
    Transient(String),
    #[error("cloud error: {0}")]
    Fatal(String),
}

impl CloudError {
    /// A short stable label for metrics (`code` label) and status.
    pub fn code(&self) -> &'static str {
        match self {
            CloudError::Throttled { .. } => "throttled",
            CloudError::Busy { .. } => "busy",
            CloudError::SubnetFull { .. } => "subnet_full",
            CloudError::NicLimitReached { .. } => "nic_limit",
            CloudError::NotFound(_) => "not_found",
            CloudError::Unauthorized { .. } => "unauthorized",
            CloudError::Transient(_) => "transient",
            CloudError::Fatal(_) => "fatal",
        }
    }

    /// Whether the same call may succeed later without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            CloudError::Throttled { .. } | CloudError::Busy { .. } | CloudError::Transient(_)
        )
    }

    /// How long the cloud asked us to wait, when it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            CloudError::Throttled { retry_after } | CloudError::Busy { retry_after, .. } => {
                Some(*retry_after)
            }
            _ => None,
        }
    }
}

/// The agent's view of a cloud. Implementations retry what is retryable internally (honouring
/// `Retry-After`) and return an error only when they give up; the agent decides what happens next.
#[async_trait]
pub trait CloudProvider: Send + Sync + 'static {
    /// Who is this node, from the instance metadata service and the NIC.
    async fn discover(&self) -> Result<NodeIdentity, CloudError>;

    /// The secondary addresses this product owns on the NIC (ipConfigurations named with
    /// [`IP_CONFIG_PREFIX`]). A complete view or an error, never a partial list.
    async fn list_secondary_ips(&self, nic_id: &str) -> Result<Vec<SecondaryIp>, CloudError>;

    /// Adds `count` dynamic addresses from `subnet_id` and returns exactly the new ones.
    /// Concurrent calls for one NIC may be coalesced into one cloud write. A provider told of
    /// more waiting pods while the call waits ([`CloudProvider::set_waiting_pods`]) may add
    /// theirs to the same write and return them too.
    async fn assign_ips(
        &self,
        nic_id: &str,
        subnet_id: &str,
        count: usize,
    ) -> Result<Vec<SecondaryIp>, CloudError>;

    /// Prefix mode: adds `count` dynamic blocks of `prefix_len` from `subnet_id` (one
    /// ipConfiguration each) and returns exactly the new ones. Concurrent calls for one NIC may
    /// be coalesced into one cloud write, with address requests too.
    async fn assign_blocks(
        &self,
        nic_id: &str,
        subnet_id: &str,
        count: usize,
        prefix_len: u8,
    ) -> Result<Vec<SecondaryIp>, CloudError> {
        let _ = (nic_id, subnet_id, count, prefix_len);
        Err(CloudError::Fatal(
            "this cloud provider has no prefix mode".into(),
        ))
    }

    /// Removes the given entries from the NIC, each named by its address; a block goes only when
    /// every one of its addresses is named (part of a block leaves it on the NIC, since pods may
    /// use the rest). Entries already absent are not an error.
    async fn release_ips(&self, nic_id: &str, ips: &[Ipv4Addr]) -> Result<(), CloudError>;

    /// The cloud API's last reported request budget, for metrics (`None`: not reported).
    fn arm_budget(&self) -> Option<ArmBudget> {
        None
    }

    /// Pods on this node waiting for an address that the free ones cannot serve; the agent
    /// says so before the assign that is for them and whenever a pod starts waiting. A
    /// provider that shares the cloud with other nodes (cluster mode) has nodes with waiting
    /// pods served first, and lets pods that start waiting join an assign still unanswered;
    /// one that calls the cloud itself ignores it.
    fn set_waiting_pods(&self, pods: u32) {
        let _ = pods;
    }
}
