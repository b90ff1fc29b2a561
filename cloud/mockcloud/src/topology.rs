//! The mock's world: one VNet, its subnets and VMs (each with one NIC), read from a JSON file.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use crate::MockError;
pub use crate::scaleset::{Orchestration, ScaleSetSpec};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    pub subscription: String,
    pub resource_group: String,
    #[serde(default = "default_location")]
    pub location: String,
    pub vnet: VnetSpec,
    pub subnets: Vec<SubnetSpec>,
    pub vms: Vec<VmSpec>,
    /// Virtual machine scale sets; a VM names its set in `scale_set`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scale_sets: Vec<ScaleSetSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VnetSpec {
    pub name: String,
    pub address_space: Vec<Ipv4Network>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubnetSpec {
    pub name: String,
    pub prefix: Ipv4Network,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub name: String,
    pub subnet: String,
    pub primary_ip: Ipv4Addr,
    /// `00:0d:3a:..` style; derived from the name when absent.
    #[serde(default)]
    pub mac: Option<String>,
    /// The scale set this VM is an instance of (absent: a standalone VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_set: Option<String>,
    /// What else the VM's NIC carries (NSG, ASGs, load balancer pools, tags, DNS, ...).
    #[serde(default, skip_serializing_if = "NicSpec::is_empty")]
    pub nic: NicSpec,
}

/// The fields of a node NIC that vnet-cni does not own but must keep on every write. References
/// are resource names in the topology's resource group (or full resource IDs).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NicSpec {
    pub tags: serde_json::Map<String, serde_json::Value>,
    /// NSG name (`Microsoft.Network/networkSecurityGroups/{name}`).
    pub network_security_group: Option<String>,
    /// ASG names of the primary ipConfiguration.
    pub application_security_groups: Vec<String>,
    /// `{loadBalancer}/{pool}` pairs of the primary ipConfiguration.
    pub load_balancer_backend_address_pools: Vec<String>,
    /// Public IP name of the primary ipConfiguration.
    pub public_ip_address: Option<String>,
    pub dns_servers: Vec<String>,
    pub accelerated_networking: bool,
    pub ip_forwarding: bool,
    /// Further NIC `properties`, kept verbatim (golden documents in tests).
    pub properties: serde_json::Map<String, serde_json::Value>,
    /// Further `properties` of the primary ipConfiguration, kept verbatim.
    pub primary_ip_configuration_properties: serde_json::Map<String, serde_json::Value>,
}

impl NicSpec {
    pub fn is_empty(&self) -> bool {
        *self == NicSpec::default()
    }
}

fn default_location() -> String {
    "westeurope".to_string()
}

impl Topology {
    /// One VNet with one subnet `prefix` and `vm_count` VMs `node-1..` at the first usable addresses.
    pub fn single_subnet(prefix: Ipv4Network, vm_count: usize) -> Topology {
        let vms = (0..vm_count)
            .map(|i| VmSpec {
                name: format!("node-{}", i + 1),
                subnet: "nodes".to_string(),
                primary_ip: Ipv4Addr::from(u32::from(prefix.network()) + 4 + i as u32),
                mac: None,
                scale_set: None,
                nic: NicSpec::default(),
            })
            .collect();
        Topology {
            subscription: "sub".to_string(),
            resource_group: "rg".to_string(),
            location: default_location(),
            vnet: VnetSpec {
                name: "vnet".to_string(),
                address_space: vec![prefix],
            },
            subnets: vec![SubnetSpec {
                name: "nodes".to_string(),
                prefix,
            }],
            vms,
            scale_sets: Vec::new(),
        }
    }

    pub fn from_json(text: &str) -> Result<Topology, MockError> {
        let topology: Topology =
            serde_json::from_str(text).map_err(|e| MockError::Topology(e.to_string()))?;
        topology.validate()?;
        Ok(topology)
    }

    pub fn validate(&self) -> Result<(), MockError> {
        let bad = |m: String| Err(MockError::Topology(m));
        if self.vnet.address_space.is_empty() {
            return bad("the VNet needs an address space".into());
        }
        for (i, subnet) in self.subnets.iter().enumerate() {
            if !self.vnet.address_space.iter().any(|space| {
                space.contains(subnet.prefix.network()) && space.prefix() <= subnet.prefix.prefix()
            }) {
                return bad(format!(
                    "subnet {} is outside the VNet address space",
                    subnet.name
                ));
            }
            if subnet.prefix.prefix() > 29 {
                return bad(format!(
                    "subnet {}: Azure subnets are at most /29",
                    subnet.name
                ));
            }
            for other in &self.subnets[..i] {
                if other.name == subnet.name {
                    return bad(format!("duplicate subnet {}", subnet.name));
                }
                if other.prefix.overlaps(subnet.prefix) {
                    return bad(format!(
                        "subnets {} and {} overlap",
                        other.name, subnet.name
                    ));
                }
            }
        }
        for (i, vm) in self.vms.iter().enumerate() {
            let Some(subnet) = self.subnet(&vm.subnet) else {
                return bad(format!("VM {} names unknown subnet {}", vm.name, vm.subnet));
            };
            if !is_assignable(subnet.prefix, vm.primary_ip) {
                return bad(format!(
                    "VM {}: {} is not an assignable address of {} (first four and last are reserved)",
                    vm.name, vm.primary_ip, subnet.prefix
                ));
            }
            for other in &self.vms[..i] {
                if other.name == vm.name || other.primary_ip == vm.primary_ip {
                    return bad(format!("VMs {} and {} clash", other.name, vm.name));
                }
            }
        }
        crate::scaleset::validate(self)?;
        Ok(())
    }

    pub fn subnet(&self, name: &str) -> Option<&SubnetSpec> {
        self.subnets.iter().find(|s| s.name == name)
    }

    pub fn vm(&self, name: &str) -> Option<&VmSpec> {
        self.vms.iter().find(|v| v.name == name)
    }

    pub fn rg_prefix(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers",
            self.subscription, self.resource_group
        )
    }

    pub fn vnet_id(&self) -> String {
        format!(
            "{}/Microsoft.Network/virtualNetworks/{}",
            self.rg_prefix(),
            self.vnet.name
        )
    }

    pub fn subnet_id(&self, subnet: &str) -> String {
        format!("{}/subnets/{subnet}", self.vnet_id())
    }

    pub fn vm_id(&self, vm: &str) -> String {
        format!(
            "{}/Microsoft.Compute/virtualMachines/{vm}",
            self.rg_prefix()
        )
    }

    pub fn nic_id(&self, nic: &str) -> String {
        format!(
            "{}/Microsoft.Network/networkInterfaces/{nic}",
            self.rg_prefix()
        )
    }

    /// A resource ID for `name` of `kind` (`Microsoft.Network/networkSecurityGroups`) in this
    /// resource group, or `name` itself when it already is a resource ID.
    pub fn resource_id(&self, kind: &str, name: &str) -> String {
        if name.starts_with("/subscriptions/") {
            name.to_string()
        } else {
            format!("{}/{kind}/{name}", self.rg_prefix())
        }
    }

    /// The subnet name a subnet resource ID refers to, when it is one of this VNet's.
    pub fn subnet_from_id(&self, id: &str) -> Option<&SubnetSpec> {
        let (prefix, name) = id.rsplit_once("/subnets/")?;
        if !prefix.eq_ignore_ascii_case(&self.vnet_id()) {
            return None;
        }
        self.subnets
            .iter()
            .find(|s| s.name.eq_ignore_ascii_case(name))
    }
}

/// The NIC of a VM is always `{vm}-nic`.
pub fn nic_name(vm: &str) -> String {
    format!("{vm}-nic")
}

/// Azure reserves the network address, .1 (gateway), .2 and .3 (DNS) and the broadcast address.
pub fn is_assignable(subnet: Ipv4Network, ip: Ipv4Addr) -> bool {
    let ip = u32::from(ip);
    let first = u32::from(subnet.network()) + 4;
    let last = u32::from(subnet.broadcast()).saturating_sub(1);
    subnet.contains(Ipv4Addr::from(ip)) && ip >= first && ip <= last
}

/// A stable MAC in Microsoft's 00:0d:3a range, derived from the VM name (FNV-1a).
pub fn derived_mac(name: &str) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in name.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    let b = hash.to_be_bytes();
    format!("00:0d:3a:{:02x}:{:02x}:{:02x}", b[1], b[2], b[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_addresses_are_not_assignable() {
        let net: Ipv4Network = "10.0.0.0/29".parse().unwrap();
        let assignable: Vec<u8> = (0..8u8)
            .filter(|i| is_assignable(net, Ipv4Addr::new(10, 0, 0, *i)))
            .collect();
        assert_eq!(assignable, vec![4, 5, 6]);
    }

    #[test]
    fn topology_from_the_contract_parses() {
        let t = Topology::from_json(
            r#"{"subscription":"sub","resource_group":"rg","location":"westeurope",
            "vnet":{"name":"vnet","address_space":["10.240.0.0/16"]},
            "subnets":[{"name":"nodes","prefix":"10.240.0.0/16"}],
            "vms":[{"name":"node-1","subnet":"nodes","primary_ip":"10.240.0.4"}]}"#,
        )
        .unwrap();
        assert_eq!(t.vms[0].name, "node-1");
        assert!(Topology::from_json(r#"{"subscription":"s"}"#).is_err());
    }

    #[test]
    fn primary_ip_in_reserved_range_is_rejected() {
        let mut t = Topology::single_subnet("10.1.0.0/24".parse().unwrap(), 1);
        t.vms[0].primary_ip = "10.1.0.1".parse().unwrap();
        assert!(t.validate().is_err());
    }
}
