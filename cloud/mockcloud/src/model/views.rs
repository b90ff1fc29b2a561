//! What the mock shows of its state: ARM and IMDS documents, the admin view, the persisted state.

use super::*;

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

impl Cloud {
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
