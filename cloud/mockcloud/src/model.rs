//! The mock's state and Azure's rules for it: NICs with ipConfigurations, dynamic allocation,
//! etags, and long-running operations. Pure logic, no I/O: the server drives it under one lock.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::MockError;
use crate::document::{
    RequestedConfig, caller_document, initial_document, parse_ip_configurations,
};
use crate::rules::{self, ConfigRefs};
use crate::topology::{Topology, derived_mac, is_assignable, nic_name};

/// Azure's limit of ipConfigurations on one NIC.
pub const MAX_IP_CONFIGS_PER_NIC: usize = 256;
/// The mock's (unverified) error code for exceeding it; clients should also match the message.
pub const NIC_LIMIT_CODE: &str = "NetworkInterfaceIpConfigurationCountExceedsLimit";
/// An operation nobody polls still finishes after this long, so a NIC never stays busy forever.
const OPERATION_DEADLINE: Duration = Duration::from_secs(10);
/// An Azure error answer: status, `{"error":{"code","message"}}`, optional `Retry-After`.
#[derive(Debug, Clone, PartialEq)]
pub struct ArmError {
    pub status: u16,
    pub code: String,
    pub message: String,
    pub retry_after: Option<u64>,
    /// `error.details[]` as `(code, message)`.
    pub details: Vec<(String, String)>,
}

impl ArmError {
    pub fn new(status: u16, code: &str, message: impl Into<String>) -> ArmError {
        ArmError {
            status,
            code: code.to_string(),
            message: message.into(),
            retry_after: None,
            details: Vec::new(),
        }
    }

    /// What NRP answers for a write to a resource another operation holds: 429 `RetryableError`
    /// with the specific code in `details[0]` (as in cloudfoundry/bosh-azure-cpi-release#179).
    pub fn busy(detail_code: &str, message: impl Into<String>, retry_after_secs: u64) -> ArmError {
        let mut error = ArmError::new(429, BUSY_CODE, "A retryable error occured.")
            .with_retry_after(retry_after_secs);
        error
            .details
            .push((detail_code.to_string(), message.into()));
        error
    }

    pub fn bad_request(code: &str, message: impl Into<String>) -> ArmError {
        ArmError::new(400, code, message)
    }

    pub fn with_retry_after(mut self, secs: u64) -> ArmError {
        self.retry_after = Some(secs);
        self
    }

    pub fn body(&self) -> Value {
        let details: Vec<Value> = self
            .details
            .iter()
            .map(|(code, message)| json!({"code": code, "message": message}))
            .collect();
        json!({"error": {"code": self.code, "message": self.message, "details": details}})
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    pub name: String,
    pub ip: Ipv4Addr,
    #[serde(rename = "static")]
    pub static_allocation: bool,
    /// Subnet name in the topology.
    pub subnet: String,
    pub primary: bool,
    /// Added by an operation that has not finished: no address shown yet.
    #[serde(skip)]
    pub pending: bool,
    /// Left `Failed` by an operation that failed without rolling back, until a PUT succeeds.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub failed: bool,
    /// The rest of the ipConfiguration's `properties` as last written (ASGs, pools, ...).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub extra: Map<String, Value>,
    /// `privateIPAddressPrefixLength`: the configuration holds the aligned block `ip/len`
    /// instead of the single address `ip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_len: Option<u8>,
}

impl IpConfig {
    /// The prefix length of what the configuration holds (32: one address).
    pub fn held_len(&self) -> u8 {
        self.prefix_len.unwrap_or(32)
    }

    /// Every address the configuration holds (one, or the whole block).
    pub fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> + use<> {
        block_addresses(self.ip, self.held_len())
    }

    pub fn provisioning_state(&self) -> &'static str {
        if self.pending {
            "Updating"
        } else if self.failed {
            "Failed"
        } else {
            "Succeeded"
        }
    }
}

#[derive(Debug, Clone)]
pub struct Nic {
    pub name: String,
    pub vm: String,
    pub mac: String,
    pub generation: u64,
    pub provisioning_state: &'static str,
    pub configs: Vec<IpConfig>,
    pub active_operation: Option<String>,
    /// The document's caller-owned fields as last written: `tags` and the non-computed
    /// `properties` (NSG, DNS settings, accelerated networking, ...).
    pub doc: Map<String, Value>,
}

impl Nic {
    pub fn etag(&self) -> String {
        format!(
            "W/\"{:08x}-0000-4000-8000-{:012x}\"",
            fnv(&self.name),
            self.generation
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum OperationStatus {
    InProgress,
    Succeeded,
    Failed { code: String, message: String },
}

#[derive(Debug)]
struct Operation {
    nic: String,
    polls_left: u32,
    failure: Option<Failure>,
    previous: Vec<IpConfig>,
    previous_doc: Map<String, Value>,
    status: OperationStatus,
    deadline: Instant,
}

/// How a long-running operation runs: `polls` answers `InProgress` before the end, and the
/// `Retry-After` (seconds) a PUT to the busy NIC is told to wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub polls: u32,
    pub retry_after_secs: u64,
}

impl Timing {
    pub fn new(polls: u32, retry_after_secs: u64) -> Timing {
        Timing {
            polls,
            retry_after_secs,
        }
    }
}

/// How an operation is made to fail (fault injection).
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub code: String,
    pub message: String,
    /// `true`: the NIC goes back to what it was (and shows `Failed`); `false`: the new
    /// ipConfigurations stay, `Failed`, until the next successful PUT.
    pub rollback: bool,
}

/// A change the fabric must make for the VNet to deliver an address (`len` 32) or a block
/// (`ip/len`) to its VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteChange {
    Replace {
        ip: Ipv4Addr,
        len: u8,
        via: Ipv4Addr,
    },
    Delete {
        ip: Ipv4Addr,
        len: u8,
    },
}

/// The addresses of `base/len` (`base` is the block's first address).
pub fn block_addresses(base: Ipv4Addr, len: u8) -> impl Iterator<Item = Ipv4Addr> + use<> {
    let first = u32::from(base);
    let size = 1u64 << (32 - u32::from(len.min(32)));
    (0..size).map(move |i| Ipv4Addr::from(first.wrapping_add(i as u32)))
}

/// The only `privateIPAddressPrefixLength` NRP accepts (Azure/azure-cli#30837: "Must be a /28
/// prefix (Verify on the service side)").
pub const PREFIX_LENGTH: u8 = 28;
/// The mock's codes for the prefix rules (unverified; see docs/cloud.md).
pub const PREFIX_LENGTH_CODE: &str = "InvalidPrivateIPAddressPrefixLength";
pub const PREFIX_ON_PRIMARY_CODE: &str = "PrivateIPAddressPrefixNotAllowedOnPrimaryIpConfiguration";
pub const PREFIX_WITH_PUBLIC_IP_CODE: &str = "PublicIPAddressNotAllowedWithPrivateIPAddressPrefix";

/// What survives a restart of the mock (`--state FILE`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PersistedState {
    pub nics: BTreeMap<String, PersistedNic>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PersistedNic {
    pub generation: u64,
    pub ip_configurations: Vec<IpConfig>,
    #[serde(default)]
    pub doc: Option<Map<String, Value>>,
    #[serde(default)]
    pub failed: bool,
}

/// `GET /admin/state`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateView {
    /// Every address on every NIC, one row per ipConfiguration (a duplicate would show twice).
    pub addresses: Vec<AddressView>,
    pub nics: Vec<NicView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AddressView {
    pub ip: Ipv4Addr,
    pub nic: String,
    pub vm: String,
    pub ip_configuration: String,
    pub subnet: String,
    pub primary: bool,
    pub pending: bool,
    /// The ipConfiguration's `provisioningState`.
    #[serde(default)]
    pub provisioning_state: String,
    /// Set for a block (`ip` is its first address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_len: Option<u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NicView {
    pub name: String,
    pub vm: String,
    pub etag: String,
    pub provisioning_state: String,
    pub ip_configurations: usize,
}

pub struct Cloud {
    pub topology: Topology,
    nics: BTreeMap<String, Nic>,
    /// Every address held in the VNet, with its NIC. During an operation a NIC holds both its old
    /// and new addresses, so nothing it releases can go elsewhere before the change is final.
    owners: HashMap<Ipv4Addr, String>,
    operations: HashMap<String, Operation>,
    next_operation: u64,
    /// Bumped by every change worth persisting.
    pub version: u64,
    /// Uniform scale-set instances (their NICs are in `nics`).
    pub(crate) instances: crate::scaleset::Instances,
}

impl Cloud {
    pub fn new(topology: Topology, persisted: Option<PersistedState>) -> Result<Cloud, MockError> {
        topology.validate()?;
        let persisted = persisted.unwrap_or_default();
        let mut nics = BTreeMap::new();
        let mut owners = HashMap::new();
        for vm in &topology.vms {
            let name = nic_name(&vm.name);
            let (doc, primary_extra) = initial_document(&topology, &vm.nic);
            let (generation, configs, doc, failed) = match persisted.nics.get(&name) {
                Some(saved) => (
                    saved.generation,
                    saved.ip_configurations.clone(),
                    saved.doc.clone().unwrap_or(doc),
                    saved.failed,
                ),
                None => (
                    1,
                    vec![IpConfig {
                        name: "ipconfig1".into(),
                        ip: vm.primary_ip,
                        static_allocation: false,
                        subnet: vm.subnet.clone(),
                        primary: true,
                        pending: false,
                        failed: false,
                        extra: primary_extra,
                        prefix_len: None,
                    }],
                    doc,
                    false,
                ),
            };
            for config in &configs {
                let Some(subnet) = topology.subnet(&config.subnet) else {
                    return Err(MockError::State(format!(
                        "{name}: unknown subnet {}",
                        config.subnet
                    )));
                };
                for ip in config.addresses() {
                    if !is_assignable(subnet.prefix, ip) {
                        return Err(MockError::State(format!("{name}: {ip} not assignable")));
                    }
                    if let Some(other) = owners.insert(ip, name.clone()) {
                        return Err(MockError::State(format!("{ip} held by {other} and {name}")));
                    }
                }
            }
            nics.insert(
                name.clone(),
                Nic {
                    name,
                    vm: vm.name.clone(),
                    mac: vm.mac.clone().unwrap_or_else(|| derived_mac(&vm.name)),
                    generation,
                    provisioning_state: if failed { "Failed" } else { "Succeeded" },
                    configs,
                    active_operation: None,
                    doc,
                },
            );
        }
        Ok(Cloud {
            instances: crate::scaleset::Instances::new(&topology),
            topology,
            nics,
            owners,
            operations: HashMap::new(),
            next_operation: 1,
            version: 0,
        })
    }

    pub fn nic(&self, name: &str) -> Option<&Nic> {
        self.nics
            .values()
            .find(|n| n.name.eq_ignore_ascii_case(name))
    }

    fn nic_key(&self, name: &str) -> Option<String> {
        self.nic(name).map(|n| n.name.clone())
    }

    pub fn nic_not_found(&self, name: &str) -> ArmError {
        ArmError::new(
            404,
            "ResourceNotFound",
            format!(
                "The Resource 'Microsoft.Network/networkInterfaces/{name}' under resource group '{}' was not found.",
                self.topology.resource_group
            ),
        )
    }

    /// The NIC as ARM shows it.
    pub fn nic_json(&self, name: &str) -> Option<Value> {
        let nic = self.nic(name)?;
        let topo = &self.topology;
        let nic_id = topo.nic_id(&nic.name);
        let etag = nic.etag();
        let configs: Vec<Value> = nic
            .configs
            .iter()
            .map(|c| {
                let mut properties = Value::Object(c.extra.clone());
                for (key, value) in [
                    ("provisioningState", json!(c.provisioning_state())),
                    (
                        "privateIPAllocationMethod",
                        json!(if c.static_allocation {
                            "Static"
                        } else {
                            "Dynamic"
                        }),
                    ),
                    ("privateIPAddressVersion", json!("IPv4")),
                    ("subnet", json!({"id": topo.subnet_id(&c.subnet)})),
                    ("primary", json!(c.primary)),
                ] {
                    properties[key] = value;
                }
                // A block shows as `address/length` beside its length (the form the .NET SDK
                // documents: "a single IP address or a CIDR block in the format
                // <address>/<prefix-length>").
                if !c.pending || c.static_allocation {
                    properties["privateIPAddress"] = match c.prefix_len {
                        Some(len) => json!(format!("{}/{len}", c.ip)),
                        None => json!(c.ip.to_string()),
                    };
                }
                if let Some(len) = c.prefix_len {
                    properties["privateIPAddressPrefixLength"] = json!(len);
                }
                json!({
                    "name": c.name,
                    "id": format!("{nic_id}/ipConfigurations/{}", c.name),
                    "etag": etag,
                    "type": "Microsoft.Network/networkInterfaces/ipConfigurations",
                    "properties": properties,
                })
            })
            .collect();
        let mut doc = Value::Object(nic.doc.clone());
        for (key, value) in [
            ("name", json!(nic.name)),
            ("id", json!(nic_id)),
            ("etag", json!(etag)),
            ("type", json!("Microsoft.Network/networkInterfaces")),
            ("location", json!(topo.location)),
        ] {
            doc[key] = value;
        }
        if !doc["properties"].is_object() {
            doc["properties"] = json!({});
        }
        for (key, value) in [
            ("provisioningState", json!(nic.provisioning_state)),
            (
                "resourceGuid",
                json!(format!(
                    "{:08x}-0000-4000-8000-000000000000",
                    fnv(&nic.name)
                )),
            ),
            (
                "macAddress",
                json!(nic.mac.replace(':', "-").to_uppercase()),
            ),
            ("primary", json!(true)),
            ("virtualMachine", json!({"id": topo.vm_id(&nic.vm)})),
            ("ipConfigurations", json!(configs)),
        ] {
            doc["properties"][key] = value;
        }
        Some(doc)
    }

    /// Simulates another writer touching the NIC (the etag changes, nothing else).
    pub fn bump_etag(&mut self, name: &str) {
        if let Some(key) = self.nic_key(name)
            && let Some(nic) = self.nics.get_mut(&key)
        {
            nic.generation += 1;
            self.version += 1;
        }
    }

    /// Applies a NIC PUT and starts its long-running operation; returns the operation id.
    pub fn put_nic(
        &mut self,
        name: &str,
        if_match: Option<&str>,
        body: &Value,
        failure: Option<Failure>,
        timing: Timing,
        now: Instant,
    ) -> Result<String, ArmError> {
        let Timing {
            polls,
            retry_after_secs,
        } = timing;
        let key = self.nic_key(name).ok_or_else(|| self.nic_not_found(name))?;
        let nic = &self.nics[&key];
        if let Some(running) = &nic.active_operation {
            // What NRP answers for a write to a NIC whose previous operation still runs.
            return Err(ArmError::busy(
                BUSY_DETAIL_CODE,
                format!(
                    "Operation 'PutNetworkInterfaceOperation' on resource '{}' could not be completed because operation '{running}' is still updating it. The call can be retried in {retry_after_secs} seconds.",
                    self.topology.nic_id(&key)
                ),
                retry_after_secs,
            ));
        }
        if let Some(expected) = if_match
            && expected != "*"
            && expected != nic.etag()
        {
            return Err(ArmError::new(
                412,
                ETAG_MISMATCH_CODE,
                format!(
                    "Precondition failed for operation on resource '{}': the etag {expected} in the If-Match header does not match the current etag {}.",
                    self.topology.nic_id(&key),
                    nic.etag()
                ),
            ));
        }
        let requested = parse_ip_configurations(body)?;
        let new_configs = self.plan(&key, &requested)?;
        self.check_ip_config_rules(&self.topology.nic_id(&key), &new_configs)?;
        let new_doc = caller_document(body);

        let nic = self.nics.get_mut(&key).expect("NIC exists");
        let previous_doc = std::mem::replace(&mut nic.doc, new_doc);
        let previous = std::mem::replace(&mut nic.configs, new_configs);
        nic.generation += 1;
        nic.provisioning_state = "Updating";
        for config in &nic.configs {
            for ip in config.addresses() {
                self.owners.insert(ip, key.clone());
            }
        }
        let id = format!(
            "{:08x}-0000-4000-8000-{:012x}",
            fnv(&key),
            self.next_operation
        );
        self.next_operation += 1;
        self.version += 1;
        nic.active_operation = Some(id.clone());
        self.operations.insert(
            id.clone(),
            Operation {
                nic: key,
                polls_left: polls,
                failure,
                previous,
                previous_doc,
                status: OperationStatus::InProgress,
                deadline: now + OPERATION_DEADLINE,
            },
        );
        Ok(id)
    }

    /// Azure's rules over a NIC's next ipConfigurations: one subnet, one set of ASGs.
    /// `nic_id` names the NIC in messages (a scale-set instance's NIC ID works too).
    pub fn check_ip_config_rules(
        &self,
        nic_id: &str,
        configs: &[IpConfig],
    ) -> Result<(), ArmError> {
        let refs: Vec<ConfigRefs> = configs
            .iter()
            .map(|c| ConfigRefs {
                id: format!("{nic_id}/ipConfigurations/{}", c.name),
                subnet: self.topology.subnet_id(&c.subnet),
                asgs: rules::asg_ids(&json!({"properties": Value::Object(c.extra.clone())})),
            })
            .collect();
        rules::check_one_subnet(&refs)?;
        rules::check_same_asgs(&refs)
    }

    /// The NIC's next ipConfigurations for a PUT, with dynamic addresses chosen. Errors as Azure's.
    fn plan(&self, key: &str, requested: &[RequestedConfig]) -> Result<Vec<IpConfig>, ArmError> {
        let nic = &self.nics[key];
        if requested.len() > MAX_IP_CONFIGS_PER_NIC {
            return Err(ArmError::bad_request(
                NIC_LIMIT_CODE,
                format!(
                    "The total number of IP configurations {} on network interface {key} exceeds the maximum allowed value of {MAX_IP_CONFIGS_PER_NIC}.",
                    requested.len()
                ),
            ));
        }
        let mut names = HashSet::new();
        for r in requested {
            if !names.insert(r.name.to_ascii_lowercase()) {
                return Err(ArmError::bad_request(
                    "DuplicateResourceName",
                    format!(
                        "Resource {key} has two child resources with the same name ({}).",
                        r.name
                    ),
                ));
            }
        }
        let old_primary = nic
            .configs
            .iter()
            .find(|c| c.primary)
            .expect("a primary config");
        if !requested.iter().any(|r| r.name == old_primary.name) {
            return Err(ArmError::bad_request(
                "IpConfigDeleteNotSupported",
                format!(
                    "IP Configuration {} cannot be deleted. Deletion and renaming of primary IP Configuration is not supported.",
                    old_primary.name
                ),
            ));
        }

        // Addresses this PUT may not take: everything held in the VNet, including what this NIC
        // releases now (Azure does not hand a released address straight back).
        let mut taken: HashSet<Ipv4Addr> = self.owners.keys().copied().collect();
        let mut result = Vec::with_capacity(requested.len());
        let mut dynamic_needed: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut blocks_needed: BTreeMap<(String, u8), Vec<usize>> = BTreeMap::new();
        for r in requested {
            let existing = nic
                .configs
                .iter()
                .find(|c| c.name.eq_ignore_ascii_case(&r.name));
            if let Some(len) = r.prefix_len {
                check_prefix_request(key, r, len, existing.is_some_and(|e| e.primary))?;
            }
            if let Some(existing) = existing {
                // An existing configuration keeps its address and subnet; a Failed one is
                // provisioned again by this PUT.
                let mut kept = existing.clone();
                if let Some(stat) = r.static_allocation {
                    kept.static_allocation = stat;
                }
                kept.extra = r.extra.clone();
                if kept.failed {
                    kept.pending = true;
                }
                result.push(kept);
                continue;
            }
            if r.primary {
                return Err(ArmError::bad_request(
                    "NicMustHaveOnePrimaryIpConfiguration",
                    format!("Network interface {key} can have only one primary IP configuration."),
                ));
            }
            let subnet_id = r.subnet_id.as_deref().ok_or_else(|| {
                ArmError::bad_request(
                    "InvalidRequestFormat",
                    format!(
                        "IP configuration {} must reference a subnet (properties.subnet.id).",
                        r.name
                    ),
                )
            })?;
            let subnet = self.topology.subnet_from_id(subnet_id).ok_or_else(|| {
                ArmError::bad_request(
                    "InvalidResourceReference",
                    format!("Resource {subnet_id} referenced by resource {key} was not found."),
                )
            })?;
            let mut config = IpConfig {
                name: r.name.clone(),
                ip: Ipv4Addr::UNSPECIFIED,
                static_allocation: r.static_allocation.unwrap_or(false),
                subnet: subnet.name.clone(),
                primary: false,
                pending: true,
                failed: false,
                extra: r.extra.clone(),
                prefix_len: r.prefix_len,
            };
            if config.static_allocation && r.prefix_len.is_some() {
                let base = r.ip.ok_or_else(|| {
                    ArmError::bad_request(
                        "PrivateIPAddressRequired",
                        format!(
                            "IP configuration {} is Static but has no privateIPAddress.",
                            r.name
                        ),
                    )
                })?;
                let len = config.held_len();
                let block: Vec<Ipv4Addr> = block_addresses(base, len).collect();
                let aligned = u32::from(base) & !(u32::MAX >> len) == u32::from(base);
                if !aligned || !block.iter().all(|ip| is_assignable(subnet.prefix, *ip)) {
                    return Err(ArmError::bad_request(
                        "PrivateIPAddressNotInSubnet",
                        format!(
                            "Private static IP address prefix {base}/{len} is not an aligned block of assignable addresses of subnet prefix {}.",
                            subnet.prefix
                        ),
                    ));
                }
                if block.iter().any(|ip| taken.contains(ip)) {
                    return Err(ArmError::bad_request(
                        "PrivateIPAddressInUse",
                        format!(
                            "IP configuration {} is using the private IP address prefix {base}/{len} which is already allocated.",
                            r.name
                        ),
                    ));
                }
                taken.extend(block);
                config.ip = base;
            } else if config.static_allocation {
                let ip = r.ip.ok_or_else(|| {
                    ArmError::bad_request(
                        "PrivateIPAddressRequired",
                        format!(
                            "IP configuration {} is Static but has no privateIPAddress.",
                            r.name
                        ),
                    )
                })?;
                if !is_assignable(subnet.prefix, ip) {
                    return Err(ArmError::bad_request(
                        "PrivateIPAddressNotInSubnet",
                        format!(
                            "Private static IP address {ip} does not belong to the range of subnet prefix {}.",
                            subnet.prefix
                        ),
                    ));
                }
                if !taken.insert(ip) {
                    return Err(ArmError::bad_request(
                        "PrivateIPAddressInUse",
                        format!(
                            "IP configuration {} is using the private IP address {ip} which is already allocated.",
                            r.name
                        ),
                    ));
                }
                config.ip = ip;
            } else if let Some(len) = r.prefix_len {
                blocks_needed
                    .entry((subnet.name.clone(), len))
                    .or_default()
                    .push(result.len());
            } else {
                dynamic_needed
                    .entry(subnet.name.clone())
                    .or_default()
                    .push(result.len());
            }
            result.push(config);
        }
        // Blocks before single addresses, so one PUT's addresses do not split the blocks it
        // asks for (the order NRP uses is unverified).
        for ((subnet_name, len), slots) in blocks_needed {
            let subnet = self.topology.subnet(&subnet_name).expect("checked above");
            let size = 1u32 << (32 - u32::from(len));
            let network = u32::from(subnet.prefix.network());
            let end = u32::from(subnet.prefix.broadcast());
            let mut free = Vec::new();
            let mut base = network;
            while base <= end && free.len() < slots.len() {
                let candidate = Ipv4Addr::from(base);
                if block_addresses(candidate, len)
                    .all(|ip| is_assignable(subnet.prefix, ip) && !taken.contains(&ip))
                {
                    free.push(candidate);
                }
                base = match base.checked_add(size) {
                    Some(next) => next,
                    None => break,
                };
            }
            if free.len() < slots.len() {
                return Err(ArmError::bad_request(
                    "SubnetIsFull",
                    format!(
                        "Subnet {subnet_name} with address prefix {} does not have enough capacity for {} IP address prefixes of length {len}.",
                        subnet.prefix,
                        slots.len()
                    ),
                ));
            }
            for (slot, base) in slots.into_iter().zip(free) {
                taken.extend(block_addresses(base, len));
                result[slot].ip = base;
            }
        }
        for (subnet_name, slots) in dynamic_needed {
            let subnet = self.topology.subnet(&subnet_name).expect("checked above");
            let first = u32::from(subnet.prefix.network()) + 4;
            let last = u32::from(subnet.prefix.broadcast()) - 1;
            let free: Vec<Ipv4Addr> = (first..=last)
                .map(Ipv4Addr::from)
                .filter(|ip| !taken.contains(ip))
                .take(slots.len())
                .collect();
            if free.len() < slots.len() {
                return Err(ArmError::bad_request(
                    "SubnetIsFull",
                    format!(
                        "Subnet {subnet_name} with address prefix {} does not have enough capacity for {} IP addresses.",
                        subnet.prefix,
                        slots.len()
                    ),
                ));
            }
            for (slot, ip) in slots.into_iter().zip(free) {
                taken.insert(ip);
                result[slot].ip = ip;
            }
        }
        Ok(result)
    }

    /// Finishes operations nobody polled in time (as if they had been polled to the end).
    pub fn expire_operations(&mut self, now: Instant) -> Vec<RouteChange> {
        let expired: Vec<String> = self
            .operations
            .iter()
            .filter(|(_, op)| op.status == OperationStatus::InProgress && op.deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        let mut routes = Vec::new();
        for id in expired {
            routes.extend(self.finish(&id));
        }
        routes
    }

    /// One poll of an operation: `InProgress` until its polls are used up, then its final status.
    /// Finishing returns the route changes the fabric must make before the caller sees `Succeeded`.
    pub fn poll_operation(
        &mut self,
        id: &str,
    ) -> Result<(OperationStatus, Vec<RouteChange>), ArmError> {
        let op = self.operations.get_mut(id).ok_or_else(|| {
            ArmError::new(
                404,
                "OperationNotFound",
                format!("Operation {id} was not found."),
            )
        })?;
        if op.status != OperationStatus::InProgress {
            return Ok((op.status.clone(), Vec::new()));
        }
        if op.polls_left > 0 {
            op.polls_left -= 1;
            return Ok((OperationStatus::InProgress, Vec::new()));
        }
        let routes = self.finish(id);
        Ok((self.operations[id].status.clone(), routes))
    }

    /// A GET of a NIC with a running operation counts as one poll of it: the operation moves on
    /// even when its caller lost the operation URL (as Azure's would, with time).
    pub fn observe_nic(&mut self, name: &str) -> Vec<RouteChange> {
        let Some(id) = self.nic(name).and_then(|n| n.active_operation.clone()) else {
            return Vec::new();
        };
        self.poll_operation(&id)
            .map(|(_, routes)| routes)
            .unwrap_or_default()
    }

    fn finish(&mut self, id: &str) -> Vec<RouteChange> {
        self.version += 1;
        let op = self.operations.get_mut(id).expect("operation exists");
        let nic = self.nics.get_mut(&op.nic).expect("NIC exists");
        let vm_ip = self.topology.vm(&nic.vm).map(|v| v.primary_ip);
        // Entries are keyed by what they hold: an address, or a block's base and length.
        let old: HashSet<(Ipv4Addr, u8)> =
            op.previous.iter().map(|c| (c.ip, c.held_len())).collect();
        // What the fabric delivers already (a Failed entry's address is not delivered).
        let delivered: HashSet<(Ipv4Addr, u8)> = op
            .previous
            .iter()
            .filter(|c| !c.failed && !c.pending)
            .map(|c| (c.ip, c.held_len()))
            .collect();
        let new: HashSet<(Ipv4Addr, u8)> =
            nic.configs.iter().map(|c| (c.ip, c.held_len())).collect();
        let owners = &mut self.owners;
        let mut release = |held: &(Ipv4Addr, u8), routes: &mut Vec<RouteChange>| {
            for ip in block_addresses(held.0, held.1) {
                owners.remove(&ip);
            }
            if delivered.contains(held) {
                routes.push(RouteChange::Delete {
                    ip: held.0,
                    len: held.1,
                });
            }
        };
        let mut routes = Vec::new();
        match op.failure.take() {
            None => {
                for held in old.difference(&new) {
                    release(held, &mut routes);
                }
                for config in nic.configs.iter_mut() {
                    config.pending = false;
                    config.failed = false;
                    if !config.primary
                        && !delivered.contains(&(config.ip, config.held_len()))
                        && let Some(via) = vm_ip
                    {
                        routes.push(RouteChange::Replace {
                            ip: config.ip,
                            len: config.held_len(),
                            via,
                        });
                    }
                }
                nic.provisioning_state = "Succeeded";
                op.status = OperationStatus::Succeeded;
            }
            Some(failure) if failure.rollback => {
                for (ip, len) in new.difference(&old) {
                    for ip in block_addresses(*ip, *len) {
                        self.owners.remove(&ip);
                    }
                }
                nic.configs = std::mem::take(&mut op.previous);
                nic.doc = std::mem::take(&mut op.previous_doc);
                nic.generation += 1;
                nic.provisioning_state = "Failed";
                op.status = OperationStatus::Failed {
                    code: failure.code,
                    message: failure.message,
                };
            }
            Some(failure) => {
                // Released addresses are gone; what the PUT added stays, Failed, holding its
                // address, until a later PUT succeeds.
                for held in old.difference(&new) {
                    release(held, &mut routes);
                }
                for config in nic.configs.iter_mut() {
                    if config.pending {
                        config.pending = false;
                        config.failed = true;
                    }
                }
                nic.generation += 1;
                nic.provisioning_state = "Failed";
                op.status = OperationStatus::Failed {
                    code: failure.code,
                    message: failure.message,
                };
            }
        }
        nic.active_operation = None;
        routes
    }

    /// Drops every ipConfiguration but the primary at once (a reimage resetting the instance to
    /// its scale set's model), finishing a running operation first. Returns the addresses lost
    /// and the routes to delete.
    pub fn reset_to_primary(
        &mut self,
        name: &str,
    ) -> Result<(Vec<String>, Vec<RouteChange>), ArmError> {
        let key = self.nic_key(name).ok_or_else(|| self.nic_not_found(name))?;
        let mut routes = Vec::new();
        if let Some(id) = self.nics[&key].active_operation.clone() {
            routes.extend(self.finish(&id));
        }
        let nic = self.nics.get_mut(&key).expect("NIC exists");
        let (kept, lost): (Vec<IpConfig>, Vec<IpConfig>) = std::mem::take(&mut nic.configs)
            .into_iter()
            .partition(|c| c.primary);
        nic.configs = kept;
        nic.generation += 1;
        nic.provisioning_state = "Succeeded";
        for config in &lost {
            for ip in config.addresses() {
                self.owners.remove(&ip);
            }
            routes.push(RouteChange::Delete {
                ip: config.ip,
                len: config.held_len(),
            });
        }
        self.version += 1;
        Ok((lost.iter().map(|c| c.ip.to_string()).collect(), routes))
    }

    /// Every secondary address's route, for (re)programming the fabric at start.
    pub fn all_routes(&self) -> Vec<RouteChange> {
        let mut routes = Vec::new();
        for nic in self.nics.values() {
            let Some(vm) = self.topology.vm(&nic.vm) else {
                continue;
            };
            for config in nic.configs.iter().filter(|c| !c.primary && !c.failed) {
                routes.push(RouteChange::Replace {
                    ip: config.ip,
                    len: config.held_len(),
                    via: vm.primary_ip,
                });
            }
        }
        routes
    }

    pub fn persisted(&self) -> PersistedState {
        PersistedState {
            nics: self
                .nics
                .values()
                .map(|nic| {
                    (
                        nic.name.clone(),
                        PersistedNic {
                            generation: nic.generation,
                            ip_configurations: nic.configs.clone(),
                            doc: Some(nic.doc.clone()),
                            failed: nic.provisioning_state == "Failed",
                        },
                    )
                })
                .collect(),
        }
    }

    pub fn state_view(&self) -> StateView {
        let mut addresses = Vec::new();
        let mut nics = Vec::new();
        for nic in self.nics.values() {
            for c in &nic.configs {
                addresses.push(AddressView {
                    ip: c.ip,
                    nic: nic.name.clone(),
                    vm: nic.vm.clone(),
                    ip_configuration: c.name.clone(),
                    subnet: c.subnet.clone(),
                    primary: c.primary,
                    pending: c.pending,
                    provisioning_state: c.provisioning_state().to_string(),
                    prefix_len: c.prefix_len,
                });
            }
            nics.push(NicView {
                name: nic.name.clone(),
                vm: nic.vm.clone(),
                etag: nic.etag(),
                provisioning_state: nic.provisioning_state.to_string(),
                ip_configurations: nic.configs.len(),
            });
        }
        addresses.sort_by_key(|a| a.ip);
        StateView { addresses, nics }
    }

    /// The VM whose primary address is `ip` (IMDS answers by the caller's source address).
    pub fn vm_by_ip(&self, ip: Ipv4Addr) -> Option<String> {
        self.topology
            .vms
            .iter()
            .find(|v| v.primary_ip == ip)
            .map(|v| v.name.clone())
    }

    /// IMDS `metadata/instance` for a VM.
    pub fn imds_json(&self, vm_name: &str) -> Option<Value> {
        let topo = &self.topology;
        let vm = topo.vm(vm_name)?;
        let nic = self.nic(&nic_name(&vm.name))?;
        let mut doc = self.imds_doc(vm, nic)?;
        self.patch_imds(vm, &mut doc);
        Some(doc)
    }

    fn imds_doc(&self, vm: &crate::topology::VmSpec, nic: &Nic) -> Option<Value> {
        let topo = &self.topology;
        let subnet = topo.subnet(&vm.subnet)?;
        let mut addresses: Vec<Value> = Vec::new();
        for c in nic.configs.iter().filter(|c| c.primary) {
            addresses.push(json!({"privateIpAddress": c.ip.to_string(), "publicIpAddress": ""}));
        }
        for c in nic
            .configs
            .iter()
            .filter(|c| !c.primary && !c.pending && !c.failed)
        {
            addresses.push(json!({"privateIpAddress": c.ip.to_string(), "publicIpAddress": ""}));
        }
        Some(json!({
            "compute": {
                "name": vm.name,
                "resourceId": topo.vm_id(&vm.name),
                "subscriptionId": topo.subscription,
                "resourceGroupName": topo.resource_group,
                "location": topo.location,
                "vmScaleSetName": "",
                "vmSize": "Standard_D4s_v5",
                "zone": "",
                "osType": "Linux",
                "azEnvironment": "AzurePublicCloud",
                "vmId": format!("{:08x}-0000-4000-8000-000000000001", fnv(&vm.name)),
            },
            "network": {
                "interface": [{
                    "macAddress": nic.mac.replace(':', "").to_uppercase(),
                    "ipv4": {
                        "ipAddress": addresses,
                        "subnet": [{
                            "address": subnet.prefix.network().to_string(),
                            "prefix": subnet.prefix.prefix().to_string(),
                        }],
                    },
                    "ipv6": {"ipAddress": []},
                }]
            }
        }))
    }

    /// ARM `Microsoft.Compute/virtualMachines/{vm}`: what discovery needs (the NIC reference).
    pub fn vm_json(&self, vm_name: &str) -> Option<Value> {
        let topo = &self.topology;
        let vm = self
            .topology
            .vms
            .iter()
            .find(|v| v.name.eq_ignore_ascii_case(vm_name))?;
        // A Uniform instance is no `virtualMachines` resource.
        if crate::scaleset::is_uniform_vm(topo, &vm.name) {
            return None;
        }
        let mut doc = json!({
            "name": vm.name,
            "id": topo.vm_id(&vm.name),
            "type": "Microsoft.Compute/virtualMachines",
            "location": topo.location,
            "properties": {
                "vmId": format!("{:08x}-0000-4000-8000-000000000001", fnv(&vm.name)),
                "provisioningState": "Succeeded",
                "hardwareProfile": {"vmSize": "Standard_D4s_v5"},
                "networkProfile": {
                    "networkInterfaces": [{
                        "id": topo.nic_id(&nic_name(&vm.name)),
                        "properties": {"primary": true},
                    }]
                }
            }
        });
        self.patch_vm_json(vm, &mut doc);
        Some(doc)
    }

    pub fn subnet_json(&self, name: &str) -> Option<Value> {
        let topo = &self.topology;
        let subnet = topo
            .subnets
            .iter()
            .find(|s| s.name.eq_ignore_ascii_case(name))?;
        Some(json!({
            "name": subnet.name,
            "id": topo.subnet_id(&subnet.name),
            "type": "Microsoft.Network/virtualNetworks/subnets",
            "properties": {
                "provisioningState": "Succeeded",
                "addressPrefix": subnet.prefix.to_string(),
            }
        }))
    }

    pub fn vnet_json(&self) -> Value {
        let topo = &self.topology;
        let subnets: Vec<Value> = topo
            .subnets
            .iter()
            .filter_map(|s| self.subnet_json(&s.name))
            .collect();
        json!({
            "name": topo.vnet.name,
            "id": topo.vnet_id(),
            "type": "Microsoft.Network/virtualNetworks",
            "location": topo.location,
            "properties": {
                "provisioningState": "Succeeded",
                "addressSpace": {
                    "addressPrefixes": topo.vnet.address_space.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                },
                "subnets": subnets,
            }
        })
    }
}

/// Top-level code of a PUT to a NIC whose previous operation still runs (429, with `Retry-After`).
pub const BUSY_CODE: &str = "RetryableError";
/// Its `details[0].code`, naming why.
pub const BUSY_DETAIL_CODE: &str = "RetryableErrorDueToAnotherOperation";
/// Code of a PUT whose `If-Match` is stale (412).
pub const ETAG_MISMATCH_CODE: &str = "PreconditionFailedEtagMismatch";

/// NRP's rules for an ipConfiguration that asks for a prefix: /28 only, never the primary
/// configuration (Azure/azure-cli#30837), no public IP with it (Microsoft's "Assign private IP
/// address prefixes" page). The codes are the mock's (unverified).
fn check_prefix_request(
    nic: &str,
    r: &RequestedConfig,
    len: u8,
    existing_primary: bool,
) -> Result<(), ArmError> {
    if len != PREFIX_LENGTH {
        return Err(ArmError::bad_request(
            PREFIX_LENGTH_CODE,
            format!(
                "IP configuration {} on network interface {nic} has privateIPAddressPrefixLength {len}; only {PREFIX_LENGTH} is supported.",
                r.name
            ),
        ));
    }
    if r.primary || existing_primary {
        return Err(ArmError::bad_request(
            PREFIX_ON_PRIMARY_CODE,
            format!(
                "IP configuration {} on network interface {nic} is primary and cannot have a private IP address prefix.",
                r.name
            ),
        ));
    }
    if r.extra.get("publicIPAddress").is_some_and(|v| !v.is_null()) {
        return Err(ArmError::bad_request(
            PREFIX_WITH_PUBLIC_IP_CODE,
            format!(
                "IP configuration {} on network interface {nic} has a private IP address prefix and cannot have a public IP address.",
                r.name
            ),
        ));
    }
    Ok(())
}

fn fnv(text: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in text.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cloud(prefix: &str, vms: usize) -> Cloud {
        Cloud::new(Topology::single_subnet(prefix.parse().unwrap(), vms), None).unwrap()
    }

    fn body_adding(cloud: &Cloud, nic: &str, names: &[&str]) -> Value {
        let mut body = cloud.nic_json(nic).unwrap();
        let subnet_id = cloud.topology.subnet_id("nodes");
        let configs = body["properties"]["ipConfigurations"]
            .as_array_mut()
            .unwrap();
        for name in names {
            configs.push(json!({"name": name, "properties": {"privateIPAllocationMethod": "Dynamic", "subnet": {"id": subnet_id}}}));
        }
        body
    }

    fn finish_all(cloud: &mut Cloud, id: &str) -> OperationStatus {
        loop {
            let (status, _) = cloud.poll_operation(id).unwrap();
            if status != OperationStatus::InProgress {
                return status;
            }
        }
    }

    #[test]
    fn dynamic_addresses_skip_reserved_and_used_ones() {
        let mut c = cloud("10.0.0.0/24", 2); // VMs at .4 and .5
        let body = body_adding(&c, "node-1-nic", &["a", "b"]);
        let op = c
            .put_nic(
                "node-1-nic",
                None,
                &body,
                None,
                Timing::new(0, 1),
                Instant::now(),
            )
            .unwrap();
        assert_eq!(finish_all(&mut c, &op), OperationStatus::Succeeded);
        let ips: Vec<String> = c
            .state_view()
            .addresses
            .iter()
            .map(|a| a.ip.to_string())
            .collect();
        assert_eq!(ips, vec!["10.0.0.4", "10.0.0.5", "10.0.0.6", "10.0.0.7"]);
    }

    #[test]
    fn full_subnet_is_subnet_is_full() {
        let mut c = cloud("10.0.0.0/29", 1); // assignable .4 .5 .6; VM holds .4
        let body = body_adding(&c, "node-1-nic", &["a", "b", "c"]);
        let err = c
            .put_nic(
                "node-1-nic",
                None,
                &body,
                None,
                Timing::new(0, 1),
                Instant::now(),
            )
            .unwrap_err();
        assert_eq!(err.code, "SubnetIsFull");
        assert_eq!(err.status, 400);
    }

    #[test]
    fn stale_etag_is_412_and_busy_nic_is_429() {
        let mut c = cloud("10.0.0.0/24", 1);
        let body = body_adding(&c, "node-1-nic", &["a"]);
        let err = c
            .put_nic(
                "node-1-nic",
                Some("W/\"stale\""),
                &body,
                None,
                Timing::new(0, 1),
                Instant::now(),
            )
            .unwrap_err();
        assert_eq!((err.status, err.code.as_str()), (412, ETAG_MISMATCH_CODE));
        let etag = c.nic("node-1-nic").unwrap().etag();
        c.put_nic(
            "node-1-nic",
            Some(&etag),
            &body,
            None,
            Timing::new(1, 1),
            Instant::now(),
        )
        .unwrap();
        let err = c
            .put_nic(
                "node-1-nic",
                None,
                &body,
                None,
                Timing::new(0, 1),
                Instant::now(),
            )
            .unwrap_err();
        assert_eq!((err.status, err.code.as_str()), (429, BUSY_CODE));
        assert_eq!(err.retry_after, Some(1));
    }

    #[test]
    fn failed_operation_rolls_back() {
        let mut c = cloud("10.0.0.0/24", 1);
        let body = body_adding(&c, "node-1-nic", &["a"]);
        let failure = Some(Failure {
            code: "InternalServerError".into(),
            message: "boom".into(),
            rollback: true,
        });
        let op = c
            .put_nic(
                "node-1-nic",
                None,
                &body,
                failure,
                Timing::new(0, 1),
                Instant::now(),
            )
            .unwrap();
        assert!(matches!(
            finish_all(&mut c, &op),
            OperationStatus::Failed { .. }
        ));
        assert_eq!(c.state_view().addresses.len(), 1);
    }

    #[test]
    fn too_many_configs_is_the_nic_limit() {
        let mut c = cloud("10.0.0.0/16", 1);
        let names: Vec<String> = (0..256).map(|i| format!("x{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let body = body_adding(&c, "node-1-nic", &refs);
        let err = c
            .put_nic(
                "node-1-nic",
                None,
                &body,
                None,
                Timing::new(0, 1),
                Instant::now(),
            )
            .unwrap_err();
        assert_eq!(err.code, NIC_LIMIT_CODE);
    }

    #[test]
    fn released_address_is_not_reused_until_the_operation_ends() {
        let mut c = cloud("10.0.0.0/29", 2); // assignable .4 .5 .6; VMs hold .4 .5
        let body = body_adding(&c, "node-1-nic", &["a"]);
        let op = c
            .put_nic(
                "node-1-nic",
                None,
                &body,
                None,
                Timing::new(0, 1),
                Instant::now(),
            )
            .unwrap();
        finish_all(&mut c, &op);
        // node-1 releases .6; while that runs node-2 cannot get it.
        let mut body = c.nic_json("node-1-nic").unwrap();
        body["properties"]["ipConfigurations"]
            .as_array_mut()
            .unwrap()
            .retain(|c| c["name"] != "a");
        let op = c
            .put_nic(
                "node-1-nic",
                None,
                &body,
                None,
                Timing::new(1, 1),
                Instant::now(),
            )
            .unwrap();
        let grab = body_adding(&c, "node-2-nic", &["b"]);
        assert_eq!(
            c.put_nic(
                "node-2-nic",
                None,
                &grab,
                None,
                Timing::new(0, 1),
                Instant::now()
            )
            .unwrap_err()
            .code,
            "SubnetIsFull"
        );
        finish_all(&mut c, &op);
        let op2 = c
            .put_nic(
                "node-2-nic",
                None,
                &grab,
                None,
                Timing::new(0, 1),
                Instant::now(),
            )
            .unwrap();
        assert_eq!(finish_all(&mut c, &op2), OperationStatus::Succeeded);
    }

    #[test]
    fn failed_without_rollback_keeps_failed_entries_until_a_put_succeeds() {
        let mut c = cloud("10.0.0.0/24", 1);
        let body = body_adding(&c, "node-1-nic", &["a"]);
        let failure = Some(Failure {
            code: "InternalServerError".into(),
            message: "boom".into(),
            rollback: false,
        });
        let op = c
            .put_nic(
                "node-1-nic",
                None,
                &body,
                failure,
                Timing::new(0, 1),
                Instant::now(),
            )
            .unwrap();
        assert!(matches!(
            finish_all(&mut c, &op),
            OperationStatus::Failed { .. }
        ));
        let doc = c.nic_json("node-1-nic").unwrap();
        assert_eq!(doc["properties"]["provisioningState"], "Failed");
        assert_eq!(
            doc["properties"]["ipConfigurations"][1]["properties"]["provisioningState"],
            "Failed"
        );
        // The same document again: provisioned, Succeeded, same address.
        let ip = doc["properties"]["ipConfigurations"][1]["properties"]["privateIPAddress"].clone();
        let op = c
            .put_nic(
                "node-1-nic",
                None,
                &doc,
                None,
                Timing::new(0, 1),
                Instant::now(),
            )
            .unwrap();
        assert_eq!(finish_all(&mut c, &op), OperationStatus::Succeeded);
        let doc = c.nic_json("node-1-nic").unwrap();
        assert_eq!(doc["properties"]["provisioningState"], "Succeeded");
        let entry = &doc["properties"]["ipConfigurations"][1]["properties"];
        assert_eq!(entry["provisioningState"], "Succeeded");
        assert_eq!(entry["privateIPAddress"], ip);
    }

    #[test]
    fn a_second_subnet_or_other_asgs_on_one_nic_are_refused() {
        let mut topo = Topology::single_subnet("10.0.0.0/16".parse().unwrap(), 1);
        topo.subnets[0].prefix = "10.0.0.0/24".parse().unwrap();
        topo.subnets.push(crate::topology::SubnetSpec {
            name: "pods".into(),
            prefix: "10.0.1.0/24".parse().unwrap(),
        });
        topo.vms[0].nic.application_security_groups = vec!["asg-nodes".into()];
        let mut c = Cloud::new(topo, None).unwrap();
        let mut body = c.nic_json("node-1-nic").unwrap();
        let pods = c.topology.subnet_id("pods");
        let asgs =
            body["properties"]["ipConfigurations"][0]["properties"]["applicationSecurityGroups"]
                .clone();
        body["properties"]["ipConfigurations"].as_array_mut().unwrap().push(
            json!({"name": "x", "properties": {"subnet": {"id": pods}, "applicationSecurityGroups": asgs}}),
        );
        let err = c
            .put_nic(
                "node-1-nic",
                None,
                &body,
                None,
                Timing::new(0, 1),
                Instant::now(),
            )
            .unwrap_err();
        assert_eq!(err.message, rules::DIFFERENT_SUBNETS_MESSAGE);
        let body = body_adding(&c, "node-1-nic", &["y"]);
        let err = c
            .put_nic(
                "node-1-nic",
                None,
                &body,
                None,
                Timing::new(0, 1),
                Instant::now(),
            )
            .unwrap_err();
        assert_eq!(err.code, rules::ASG_MISMATCH_CODE);
    }
}
