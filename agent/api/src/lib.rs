//! The wire contract between `vnet-cni` (the plugin) and `vnet-agent` (the node daemon).
//!
//! The agent serves HTTP/1.1 + JSON on a Unix socket (default [`DEFAULT_SOCKET_PATH`]). Every path
//! is versioned under [`API_PREFIX`]; a breaking change gets a new prefix, so an old plugin binary
//! left in `/opt/cni/bin` during an upgrade keeps working against a new agent, or fails clearly.
//!
//! | method | path                 | body                | answer                  |
//! |--------|----------------------|---------------------|-------------------------|
//! | POST   | `/v1/allocate`       | [`AllocateRequest`] | [`AllocateResponse`]    |
//! | POST   | `/v1/release`        | [`ReleaseRequest`]  | [`ReleaseResponse`]     |
//! | POST   | `/v1/gc`             | [`GcRequest`]       | [`GcResponse`]          |
//! | GET    | `/v1/status`         |                     | [`StatusResponse`]      |
//! | GET    | `/v1/allocations`    |                     | [`AllocationsResponse`] |
//! | GET    | `/v1/health`         |                     | [`HealthResponse`]      |
//!
//! Every error is a non-2xx status with an [`ErrorResponse`] body.
//!
//! This crate stays free of any async runtime, HTTP stack or cloud SDK: the plugin links it and must
//! stay small.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod names;
pub use names::{
    ContainerId, HOST_VETH_PREFIX_MAX, IFNAME_MAX, IfName, LINK_ALIAS_MAX, LINK_ALIAS_PREFIX,
    NameError, TOMBSTONE_PREFIX, host_veth_name, is_tombstone_name, link_alias, spool_file_name,
    tombstone_veth_name, validate_veth_prefix,
};

/// Path prefix of every API route.
pub const API_PREFIX: &str = "/v1";
pub const PATH_ALLOCATE: &str = "/v1/allocate";
pub const PATH_RELEASE: &str = "/v1/release";
pub const PATH_GC: &str = "/v1/gc";
pub const PATH_STATUS: &str = "/v1/status";
pub const PATH_ALLOCATIONS: &str = "/v1/allocations";
pub const PATH_HEALTH: &str = "/v1/health";

/// Where the agent listens unless configured otherwise.
pub const DEFAULT_SOCKET_PATH: &str = "/run/vnet-cni/agent.sock";
/// Where the plugin spools releases it could not deliver because the agent was down, unless the
/// network config says otherwise (`spoolDir`; the agent puts its own `<state_dir>/spool` in the
/// conflist it writes). The agent drains it at start-up, before it serves any allocation.
pub const DEFAULT_SPOOL_DIR: &str = "/var/lib/vnet-cni/spool";
/// Default prefix of host-side veth names (`vnet` + 11 hex digits = 15 bytes).
pub const DEFAULT_HOST_VETH_PREFIX: &str = "vnet";
/// How long the plugin waits for `POST /v1/allocate`. The agent caps its own wait for the pool
/// below this (with margin for the store write and the reply), so its "try again later" always
/// reaches the plugin. One constant for both sides, so they cannot drift apart.
pub const ALLOCATE_WAIT_SECS: u64 = 35;
/// The pod's gateway: link-local, so no VNet address is spent on it. The host veth answers for it
/// through a permanent neighbour entry in the pod.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// The identity of one attachment: what the runtime calls (container ID, ifname). Allocation,
/// release and GC are all keyed by it, so every call is idempotent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AttachmentKey {
    pub container_id: ContainerId,
    pub ifname: IfName,
}

impl fmt::Display for AttachmentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.container_id, self.ifname)
    }
}

/// Kubernetes identity of the pod, from `CNI_ARGS` (`K8S_POD_*`). Optional: a plain runtime
/// (cnitool, podman) sends none of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllocateRequest {
    #[serde(flatten)]
    pub key: AttachmentKey,
    /// The CNI network name, for logs and future multi-network support.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// The netns path the runtime gave, for logs and for the agent's introspection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    #[serde(default)]
    pub pod: PodRef,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocateResponse {
    pub allocation: Allocation,
    /// Always [`POD_GATEWAY`] today; sent so the plugin never hard-codes what the agent decides.
    pub gateway: Ipv4Addr,
    /// MTU for both veth ends, from the agent's configuration (the node NIC's MTU by default).
    pub mtu: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    #[serde(flatten)]
    pub key: AttachmentKey,
    /// When the plugin has handed the host veth over for deletion (renamed to a tombstone name,
    /// down, routes removed), its current name. The agent deletes it (both ends: the pod's end
    /// goes with it) before it answers, batching concurrent deletions into one netlink call, and
    /// keeps the IP out of the pool until the link is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dying_veth: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseResponse {
    /// The released allocation, or `None` when nothing was allocated for the key (a repeated DEL).
    pub released: Option<Allocation>,
    /// `true` when the agent deleted the request's `dying_veth` before answering. `false` when
    /// there was none, the deletion failed (the agent keeps retrying it and holds the address),
    /// or an older agent (which omits the field) took it for background deletion: the plugin
    /// then deletes the link itself, so nothing of the pod's attachment is left when DEL returns.
    #[serde(default)]
    pub dying_veth_deleted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcRequest {
    /// Every attachment still in use on this network; the agent releases the others of this
    /// network (see `network`).
    pub valid_attachments: Vec<AttachmentKey>,
    /// The CNI network being collected (the config's `name`). The agent releases only
    /// allocations recorded with this network. `None` (a plugin from before networks were
    /// recorded): only allocations recorded without a network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Only allocations made before this time (seconds since the Unix epoch) may be released:
    /// a younger one may be an ADD the runtime's list could not include yet. `None`: now minus
    /// [`GC_MIN_AGE_SECS`]. Later than now counts as now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated_before: Option<u64>,
}

/// GC leaves alone attachments younger than this: the runtime lists its attachments, then calls
/// GC, and an ADD that finished in between is not on the list but is not stale either.
pub const GC_MIN_AGE_SECS: u64 = 60;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcResponse {
    pub released: Vec<Allocation>,
}

/// One IP held by one attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub ip: Ipv4Addr,
    #[serde(flatten)]
    pub key: AttachmentKey,
    #[serde(default)]
    pub pod: PodRef,
    /// The CNI network the attachment was added on (its ADD's `network`). `None` for allocations
    /// recorded before the agent kept it, and for ADDs that named no network: GC of a named
    /// network never releases those (they may be another network's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// The host veth's deterministic name ([`host_veth_name`]).
    pub host_veth: String,
    /// Seconds since the Unix epoch.
    pub allocated_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationsResponse {
    pub allocations: Vec<Allocation>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthResponse {
    /// `true` once start-up (discovery, state load, reconcile, spool drain, masquerade) is done.
    pub ready: bool,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusResponse {
    pub ready: bool,
    /// `true` when an ADD can be served now or after the in-flight cloud write. `false` with
    /// `ready` true means exhaustion (subnet full, pool at max, NIC limit): the plugin's STATUS
    /// still answers 0 then (ADD answers 104); it answers 50 only when `ready` is false.
    pub can_allocate: bool,
    /// Why `can_allocate` is false, for a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub node: String,
    pub pool: PoolStatus,
    pub subnet_full: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_cloud_error: Option<String>,
    /// Allocations whose address the cloud no longer shows on the NIC: kept, never handed out again.
    pub unreconciled: Vec<Ipv4Addr>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStatus {
    /// Addresses on the NIC that belong to the pool.
    pub total: u32,
    pub allocated: u32,
    /// Ready to hand out now.
    pub free: u32,
    /// Released, waiting out the cooldown (or their old veth's removal) before reuse.
    pub cooldown: u32,
    /// What the pool is steering its total towards.
    pub target: u32,
    /// Requested from the cloud and not yet assigned.
    pub pending: u32,
    pub max: u32,
}

/// Body of every non-2xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub code: ErrorCode,
    pub message: String,
}

/// What the plugin needs to know to pick its CNI error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or names an invalid container ID or ifname (HTTP 400).
    BadRequest,
    /// No address now; the cloud may give more later (pool empty, cloud write still pending or
    /// throttled). CNI code 11 (HTTP 503).
    TryAgainLater,
    /// The subnet has no free addresses, or the NIC or configured maximum is reached (HTTP 503).
    Exhausted,
    /// The agent is still starting or shutting down (HTTP 503).
    NotReady,
    /// Anything else (HTTP 500).
    Internal,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::TryAgainLater | ErrorCode::Exhausted | ErrorCode::NotReady => 503,
            ErrorCode::Internal => 500,
        }
    }
}

/// Hex SHA-256 of the parts, joined by a separator; the source of host veth and tombstone names.
pub(crate) fn hex_digest(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            // A separator that cannot appear in either part keeps ("ab","c") apart from ("a","bc").
            hasher.update(b"/");
        }
        hasher.update(part.as_bytes());
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl FromStr for AttachmentKey {
    type Err = NameError;

    /// Parses `container/ifname`, the form logs and `vnetctl` print.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (id, ifname) = s.split_once('/').ok_or(NameError::MissingSeparator)?;
        Ok(AttachmentKey {
            container_id: id.parse()?,
            ifname: ifname.parse()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;

    fn key() -> AttachmentKey {
        AttachmentKey {
            container_id: "abc123".parse().unwrap(),
            ifname: "eth0".parse().unwrap(),
        }
    }

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + fmt::Debug>(value: T) {
        let json = serde_json::to_string(&value).unwrap();
        let back: T = serde_json::from_str(&json).unwrap();
        assert_eq!(back, value, "json was {json}");
    }

    fn allocation() -> Allocation {
        Allocation {
            ip: Ipv4Addr::new(10, 240, 0, 9),
            key: key(),
            pod: PodRef {
                namespace: Some("default".into()),
                name: Some("web-0".into()),
                uid: None,
            },
            network: Some("vnet".into()),
            host_veth: host_veth_name(DEFAULT_HOST_VETH_PREFIX, &key()),
            allocated_at: 1_700_000_000,
        }
    }

    #[test]
    fn every_message_round_trips() {
        round_trip(AllocateRequest {
            key: key(),
            network: Some("vnet".into()),
            netns: Some("/var/run/netns/x".into()),
            pod: PodRef::default(),
        });
        round_trip(AllocateResponse {
            allocation: allocation(),
            gateway: POD_GATEWAY,
            mtu: 1500,
        });
        round_trip(ReleaseRequest {
            key: key(),
            dying_veth: Some("vnx0123456789a".into()),
        });
        round_trip(ReleaseResponse {
            released: None,
            dying_veth_deleted: true,
        });
        // An older agent omits the field: the link was not deleted before the answer.
        let old: ReleaseResponse = serde_json::from_str(r#"{"released":null}"#).unwrap();
        assert!(!old.dying_veth_deleted);
        round_trip(GcRequest {
            valid_attachments: vec![key()],
            network: Some("vnet".into()),
            allocated_before: Some(7),
        });
        // A plugin from before networks sends neither.
        let old: GcRequest = serde_json::from_str(r#"{"valid_attachments":[]}"#).unwrap();
        assert_eq!((old.network, old.allocated_before), (None, None));
        round_trip(GcResponse {
            released: vec![allocation()],
        });
        round_trip(AllocationsResponse {
            allocations: vec![allocation()],
        });
        round_trip(HealthResponse {
            ready: true,
            version: "0.1.0".into(),
        });
        round_trip(StatusResponse {
            ready: true,
            can_allocate: false,
            reason: Some("subnet full".into()),
            node: "node-1".into(),
            pool: PoolStatus {
                total: 10,
                allocated: 3,
                free: 5,
                cooldown: 2,
                target: 10,
                pending: 0,
                max: 250,
            },
            subnet_full: true,
            last_cloud_error: Some("SubnetIsFull".into()),
            unreconciled: vec![Ipv4Addr::new(10, 0, 0, 7)],
        });
        round_trip(ErrorResponse {
            code: ErrorCode::TryAgainLater,
            message: "pool empty".into(),
        });
    }

    #[test]
    fn wire_format_is_flat_and_snake_case() {
        let json = serde_json::to_value(AllocateRequest {
            key: key(),
            network: None,
            netns: None,
            pod: PodRef::default(),
        })
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"container_id": "abc123", "ifname": "eth0", "pod": {}})
        );
        let err = serde_json::to_value(ErrorResponse {
            code: ErrorCode::TryAgainLater,
            message: "m".into(),
        })
        .unwrap();
        assert_eq!(err["code"], "try_again_later");
    }

    #[test]
    fn requests_reject_invalid_names_and_unknown_fields() {
        let bad_id = r#"{"container_id": "../etc", "ifname": "eth0"}"#;
        assert!(serde_json::from_str::<AllocateRequest>(bad_id).is_err());
        let long_if = r#"{"container_id": "abc", "ifname": "abcdefghijklmnop"}"#;
        assert!(serde_json::from_str::<ReleaseRequest>(long_if).is_err());
        let typo = r#"{"container_id": "abc", "ifname": "eth0", "ifnmae": "x"}"#;
        assert!(serde_json::from_str::<ReleaseRequest>(typo).is_err());
        let missing = r#"{"container_id": "abc"}"#;
        assert!(serde_json::from_str::<AllocateRequest>(missing).is_err());
    }

    #[test]
    fn attachment_key_parses_its_display_form() {
        let k: AttachmentKey = "abc123/eth0".parse().unwrap();
        assert_eq!(k, key());
        assert_eq!(k.to_string(), "abc123/eth0");
        assert!("abc123".parse::<AttachmentKey>().is_err());
    }

    #[test]
    fn spool_file_names_are_per_attachment() {
        assert_eq!(spool_file_name(&key()), "abc123:eth0.json");
        // Dots are legal in both names: ("a.b", "eth0") and ("a", "b.eth0") must not share a file.
        let one: AttachmentKey = "a.b/eth0".parse().unwrap();
        let two: AttachmentKey = "a/b.eth0".parse().unwrap();
        assert_ne!(spool_file_name(&one), spool_file_name(&two));
    }

    #[test]
    fn error_codes_map_to_http_statuses() {
        assert_eq!(ErrorCode::BadRequest.http_status(), 400);
        assert_eq!(ErrorCode::TryAgainLater.http_status(), 503);
        assert_eq!(ErrorCode::Internal.http_status(), 500);
    }
}
