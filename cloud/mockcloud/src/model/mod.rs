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

mod error;
mod operations;
#[cfg(test)]
mod tests;
mod views;

pub use error::ArmError;
use operations::Operation;
pub use operations::{Failure, OperationStatus, Timing};
pub use views::{AddressView, NicView, PersistedNic, PersistedState, StateView};

/// Azure's limit of ipConfigurations on one NIC.
pub const MAX_IP_CONFIGS_PER_NIC: usize = 256;
/// The mock's (unverified) error code for exceeding it; clients should also match the message.
pub const NIC_LIMIT_CODE: &str = "NetworkInterfaceIpConfigurationCountExceedsLimit";
/// An operation nobody polls still finishes after this long, so a NIC never stays busy forever.
const OPERATION_DEADLINE: Duration = Duration::from_secs(10);
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
