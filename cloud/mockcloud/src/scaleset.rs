//! Virtual machine scale sets, as Compute and Network show them.
//!
//! A **Uniform** instance (`.../virtualMachineScaleSets/{ss}/virtualMachines/{id}`) has no
//! standalone NIC: its NIC is read at `.../virtualMachines/{id}/networkInterfaces/{nic}` and
//! changed only through the instance's `networkProfileConfiguration` (Compute's scale-set VM
//! update, with `If-Match` and a long-running operation). A **Flexible** member is an ordinary VM
//! with an ordinary NIC; IMDS names its scale set.
//!
//! Behind both views the instance's NIC is one of the model's NICs (keyed `{vm}-nic`), so every
//! rule a NIC PUT must pass (subnets, limits, addresses, operations, Failed states) holds on the
//! scale-set path too: an instance update is translated into the NIC PUT that Compute makes.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::MockError;
use crate::model::{ArmError, Cloud, Failure, RouteChange, Timing};
use crate::topology::{Topology, VmSpec, nic_name};

/// Compute's API version the mock answers with in operation URLs.
pub const COMPUTE_OPERATION_API_VERSION: &str = "2024-07-01";
/// The only Network API versions that serve scale-set NICs (the SDKs' default is 2018-10-01).
pub const VMSS_NIC_API_VERSIONS: [&str; 2] = ["2017-03-30", "2018-10-01"];
/// AKS node images live in a gallery of a subscription no customer can read (Azure/AKS#1819).
pub const AKS_IMAGE_SUBSCRIPTION: &str = "109a5e88-712a-48ae-9078-9ca8b3c81345";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Orchestration {
    Uniform,
    Flexible,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleSetSpec {
    pub name: String,
    pub orchestration: Orchestration,
}

/// Where a topology VM sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership<'a> {
    Standalone,
    Uniform { set: &'a str, instance: u32 },
    Flexible { set: &'a str },
}

pub(crate) fn validate(t: &Topology) -> Result<(), MockError> {
    let bad = |m: String| Err(MockError::Topology(m));
    for (i, set) in t.scale_sets.iter().enumerate() {
        let valid = !set.name.is_empty()
            && set.name.len() <= 64
            && set
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !valid {
            return bad(format!("scale set name {:?} is invalid", set.name));
        }
        if t.scale_sets[..i]
            .iter()
            .any(|o| o.name.eq_ignore_ascii_case(&set.name))
        {
            return bad(format!("duplicate scale set {}", set.name));
        }
    }
    for vm in &t.vms {
        if let Some(set) = &vm.scale_set
            && scale_set(t, set).is_none()
        {
            return bad(format!("VM {} names unknown scale set {set}", vm.name));
        }
    }
    Ok(())
}

pub fn scale_set<'a>(t: &'a Topology, name: &str) -> Option<&'a ScaleSetSpec> {
    t.scale_sets
        .iter()
        .find(|s| s.name.eq_ignore_ascii_case(name))
}

/// A VM's place: standalone, or instance `n` (its position among the set's members) of a set.
pub fn membership<'a>(t: &'a Topology, vm: &VmSpec) -> Membership<'a> {
    let Some(set) = vm.scale_set.as_deref().and_then(|s| scale_set(t, s)) else {
        return Membership::Standalone;
    };
    match set.orchestration {
        Orchestration::Flexible => Membership::Flexible { set: &set.name },
        Orchestration::Uniform => {
            let instance = t
                .vms
                .iter()
                .filter(|v| {
                    v.scale_set
                        .as_deref()
                        .is_some_and(|s| s.eq_ignore_ascii_case(&set.name))
                })
                .position(|v| v.name == vm.name)
                .unwrap_or(0) as u32;
            Membership::Uniform {
                set: &set.name,
                instance,
            }
        }
    }
}

/// The VM behind instance `instance` of Uniform set `set`.
pub fn uniform_vm<'a>(t: &'a Topology, set: &str, instance: &str) -> Option<&'a VmSpec> {
    t.vms.iter().find(|vm| match membership(t, vm) {
        Membership::Uniform {
            set: s,
            instance: n,
        } => s.eq_ignore_ascii_case(set) && n.to_string() == instance,
        _ => false,
    })
}

/// Whether the model NIC `nic` belongs to a Uniform instance (it has no standalone resource).
pub fn is_uniform_nic(t: &Topology, nic: &str) -> bool {
    t.vms.iter().any(|vm| {
        nic_name(&vm.name).eq_ignore_ascii_case(nic)
            && matches!(membership(t, vm), Membership::Uniform { .. })
    })
}

pub fn is_uniform_vm(t: &Topology, vm_name: &str) -> bool {
    t.vms.iter().any(|vm| {
        vm.name.eq_ignore_ascii_case(vm_name)
            && matches!(membership(t, vm), Membership::Uniform { .. })
    })
}

pub fn scale_set_id(t: &Topology, set: &str) -> String {
    format!(
        "{}/Microsoft.Compute/virtualMachineScaleSets/{set}",
        t.rg_prefix()
    )
}

pub fn instance_id(t: &Topology, set: &str, instance: u32) -> String {
    format!("{}/virtualMachines/{instance}", scale_set_id(t, set))
}

/// A Uniform instance's NIC takes its name from the set's network configuration: the set's name,
/// as on AKS (the same name on every instance).
pub fn instance_nic_name(set: &str) -> String {
    set.to_string()
}

pub fn instance_nic_id(t: &Topology, set: &str, instance: u32) -> String {
    format!(
        "{}/networkInterfaces/{}",
        instance_id(t, set, instance),
        instance_nic_name(set)
    )
}

/// What the mock keeps of each Uniform instance besides its NIC: the generation behind its etag
/// and every field it was given that the mock does not interpret (kept verbatim across updates).
#[derive(Debug, Default)]
pub struct Instances {
    by_vm: BTreeMap<String, Instance>,
}

#[derive(Debug)]
struct Instance {
    generation: u64,
    /// The instance document without the fields the mock computes (`READ_ONLY`, the network).
    doc: Value,
}

/// Fields of an instance document that Compute computes; a PUT's values for them are ignored.
const READ_ONLY: [&str; 5] = [
    "provisioningState",
    "latestModelApplied",
    "vmId",
    "instanceView",
    "timeCreated",
];

impl Instances {
    pub fn new(t: &Topology) -> Instances {
        let mut by_vm = BTreeMap::new();
        for vm in &t.vms {
            if let Membership::Uniform { set, instance } = membership(t, vm) {
                by_vm.insert(
                    vm.name.clone(),
                    Instance {
                        generation: 1,
                        doc: initial_doc(t, set, instance),
                    },
                );
            }
        }
        Instances { by_vm }
    }
}

/// An AKS-like instance: a gallery image in AKS's subscription, an OS profile, tags.
fn initial_doc(t: &Topology, set: &str, instance: u32) -> Value {
    json!({
        "location": t.location,
        "sku": {"name": "Standard_D4s_v5", "tier": "Standard"},
        "tags": {"aks-managed-poolName": set, "aks-managed-orchestrator": "Kubernetes:1.30.5"},
        "zones": ["1"],
        "properties": {
            "hardwareProfile": {},
            "storageProfile": {
                "imageReference": {
                    "id": format!("/subscriptions/{AKS_IMAGE_SUBSCRIPTION}/resourceGroups/AKS-Ubuntu/providers/Microsoft.Compute/galleries/AKSUbuntu/images/2204gen2containerd/versions/202411.12.0"),
                    "exactVersion": "202411.12.0",
                },
                "osDisk": {
                    "osType": "Linux",
                    "name": format!("{set}_{instance}_OsDisk_1"),
                    "createOption": "FromImage",
                    "caching": "ReadOnly",
                    "managedDisk": {"storageAccountType": "Premium_LRS"},
                    "diskSizeGB": 128,
                },
                "dataDisks": [],
            },
            "osProfile": {
                "computerName": computer_name(set, instance),
                "adminUsername": "azureuser",
                "linuxConfiguration": {"disablePasswordAuthentication": true, "provisionVMAgent": true},
                "secrets": [],
                "allowExtensionOperations": true,
            },
            "diagnosticsProfile": {"bootDiagnostics": {"enabled": true}},
        }
    })
}

impl Cloud {
    fn uniform(&self, set: &str, instance: &str) -> Option<(String, u32)> {
        let vm = uniform_vm(&self.topology, set, instance)?;
        match membership(&self.topology, vm) {
            Membership::Uniform { instance, .. } => Some((vm.name.clone(), instance)),
            _ => None,
        }
    }

    pub fn instance_not_found(&self, set: &str, instance: &str) -> ArmError {
        ArmError::new(
            404,
            "ResourceNotFound",
            format!(
                "The Resource 'Microsoft.Compute/virtualMachineScaleSets/{set}/virtualMachines/{instance}' under resource group '{}' was not found.",
                self.topology.resource_group
            ),
        )
    }

    fn instance_etag(&self, vm: &str) -> String {
        let generation = self.instances.by_vm.get(vm).map_or(1, |i| i.generation);
        format!("\"{generation}\"")
    }

    /// `GET .../virtualMachineScaleSets/{set}/virtualMachines/{instance}`.
    pub fn instance_json(&self, set: &str, instance: &str) -> Option<Value> {
        let (vm, n) = self.uniform(set, instance)?;
        let topo = &self.topology;
        let set = scale_set(topo, set)?.name.clone();
        let nic = self.nic(&nic_name(&vm))?;
        let nic_doc = self.nic_json(&nic.name)?;
        let mut doc = self.instances.by_vm.get(&vm)?.doc.clone();
        let state = match nic.provisioning_state {
            "Updating" => "Updating",
            "Failed" => "Failed",
            _ => "Succeeded",
        };
        let nic_id = instance_nic_id(topo, &set, n);
        doc["name"] = json!(format!("{set}_{n}"));
        doc["id"] = json!(instance_id(topo, &set, n));
        doc["type"] = json!("Microsoft.Compute/virtualMachineScaleSets/virtualMachines");
        doc["instanceId"] = json!(n.to_string());
        doc["etag"] = json!(self.instance_etag(&vm));
        let props = doc["properties"]
            .as_object_mut()
            .expect("instance properties");
        props.insert("provisioningState".into(), json!(state));
        props.insert("latestModelApplied".into(), json!(true));
        props.insert(
            "vmId".into(),
            json!(format!("{:08x}-0000-4000-8000-000000000002", fnv(&vm))),
        );
        props.insert(
            "networkProfile".into(),
            json!({"networkInterfaces": [{"id": nic_id, "properties": {"primary": true}}]}),
        );
        props.insert(
            "networkProfileConfiguration".into(),
            json!({"networkInterfaceConfigurations": [network_configuration(&set, &nic_doc)]}),
        );
        Some(doc)
    }

    /// `GET .../virtualMachines/{instance}/networkInterfaces/{nic}`: the model NIC under the
    /// instance's names.
    pub fn instance_nic_json(&self, set: &str, instance: &str, nic: &str) -> Option<Value> {
        let (vm, n) = self.uniform(set, instance)?;
        let set = scale_set(&self.topology, set)?.name.clone();
        if !nic.eq_ignore_ascii_case(&instance_nic_name(&set)) {
            return None;
        }
        let mut doc = self.nic_json(&nic_name(&vm))?;
        let nic_id = instance_nic_id(&self.topology, &set, n);
        doc["name"] = json!(instance_nic_name(&set));
        doc["id"] = json!(nic_id);
        doc["properties"]["virtualMachine"] = json!({"id": instance_id(&self.topology, &set, n)});
        if let Some(configs) = doc["properties"]["ipConfigurations"].as_array_mut() {
            for config in configs {
                let name = config["name"].as_str().unwrap_or_default().to_string();
                config["id"] = json!(format!("{nic_id}/ipConfigurations/{name}"));
            }
        }
        Some(doc)
    }

    /// A GET of an instance or its NIC moves a running operation on, as a NIC GET does.
    pub fn observe_instance(&mut self, set: &str, instance: &str) -> Vec<RouteChange> {
        match self.uniform(set, instance) {
            Some((vm, _)) => self.observe_nic(&nic_name(&vm)),
            None => Vec::new(),
        }
    }

    /// Simulates another writer changing the instance (its etag changes, nothing else).
    pub fn bump_instance_etag(&mut self, set: &str, instance: &str) {
        if let Some((vm, _)) = self.uniform(set, instance)
            && let Some(i) = self.instances.by_vm.get_mut(&vm)
        {
            i.generation += 1;
            self.version += 1;
        }
    }

    /// `PUT .../virtualMachineScaleSets/{set}/virtualMachines/{instance}`: Compute's rules for
    /// the document, then the NIC PUT it implies (all of the NIC's rules apply). Returns the
    /// operation id.
    #[allow(clippy::too_many_arguments)]
    pub fn put_instance(
        &mut self,
        set: &str,
        instance: &str,
        if_match: Option<&str>,
        body: &Value,
        failure: Option<Failure>,
        timing: Timing,
        now: Instant,
    ) -> Result<String, ArmError> {
        let (vm, _) = self
            .uniform(set, instance)
            .ok_or_else(|| self.instance_not_found(set, instance))?;
        let set = scale_set(&self.topology, set)
            .expect("uniform set")
            .name
            .clone();
        let etag = self.instance_etag(&vm);
        if let Some(expected) = if_match
            && expected != "*"
            && expected != etag
        {
            return Err(ArmError::new(
                412,
                "PreconditionFailed",
                format!(
                    "The specified precondition 'If-Match = {expected}' failed: the current etag of the resource is {etag}."
                ),
            ));
        }
        let Some(props) = body.get("properties").and_then(Value::as_object) else {
            return Err(ArmError::bad_request(
                "InvalidRequestContent",
                "The request content was invalid and could not be deserialized: 'properties' is required.",
            ));
        };
        if body.get("location").and_then(Value::as_str).is_none() {
            return Err(ArmError::bad_request(
                "LocationRequired",
                "The location property is required for this definition.",
            ));
        }
        // Re-sending the image reference makes Compute check it: AKS's gallery image lives in a
        // subscription the caller cannot read (Azure/AKS#1819, cilium/cilium#19695).
        if let Some(image) = props
            .get("storageProfile")
            .and_then(|s| s.get("imageReference"))
            .and_then(|i| i.get("id"))
            .and_then(Value::as_str)
            && let Some(sub) = subscription_of(image)
            && !sub.eq_ignore_ascii_case(&self.topology.subscription)
        {
            return Err(ArmError::new(
                403,
                "LinkedAuthorizationFailed",
                format!(
                    "The client has permission to perform action 'Microsoft.Compute/galleries/images/versions/read' on scope '{}', however the current tenant '00000000-0000-0000-0000-000000000000' is not authorized to access linked subscription '{sub}'.",
                    instance_id(&self.topology, &set, instance.parse().unwrap_or(0))
                ),
            ));
        }
        let nic_key = nic_name(&vm);
        let nic_body = self.instance_nic_body(&set, instance, body)?;
        let op = self
            .put_nic(&nic_key, None, &nic_body, failure, timing, now)
            .map_err(|mut e| {
                // The NIC rules name the NIC; the caller knows it by its scale-set ID.
                let n = instance.parse().unwrap_or(0);
                e.message = e.message.replace(
                    &self.topology.nic_id(&nic_key),
                    &instance_nic_id(&self.topology, &set, n),
                );
                e
            })?;
        let instance = self.instances.by_vm.get_mut(&vm).expect("instance exists");
        instance.doc = kept_fields(body, &instance.doc);
        instance.generation += 1;
        self.version += 1;
        Ok(op)
    }

    /// The NIC PUT an instance update implies (Compute makes it on the caller's behalf, so the
    /// NIC's rules and the caller's linked access apply to it). Without a network profile the
    /// instance's network is left as it is.
    pub fn instance_nic_body(
        &self,
        set: &str,
        instance: &str,
        body: &Value,
    ) -> Result<Value, ArmError> {
        let (vm, _) = self
            .uniform(set, instance)
            .ok_or_else(|| self.instance_not_found(set, instance))?;
        let set = scale_set(&self.topology, set)
            .expect("uniform set")
            .name
            .clone();
        let nic_key = nic_name(&vm);
        let nic_doc = self
            .nic_json(&nic_key)
            .ok_or_else(|| self.nic_not_found(&nic_key))?;
        match body["properties"]
            .get("networkProfileConfiguration")
            .and_then(|n| n.get("networkInterfaceConfigurations"))
        {
            None => Ok(nic_doc),
            Some(configs) => nic_put_body(&set, &nic_doc, configs),
        }
    }

    /// Admin: reimage an instance. Its instance-level ipConfigurations go back to the scale set's
    /// model (the primary only); the addresses they held are released at once.
    pub fn reimage_instance(
        &mut self,
        set: &str,
        instance: &str,
    ) -> Result<(Vec<String>, Vec<RouteChange>), ArmError> {
        let (vm, _) = self
            .uniform(set, instance)
            .ok_or_else(|| self.instance_not_found(set, instance))?;
        let (lost, routes) = self.reset_to_primary(&nic_name(&vm))?;
        if let Some(i) = self.instances.by_vm.get_mut(&vm) {
            i.generation += 1;
        }
        self.version += 1;
        Ok((lost, routes))
    }

    /// IMDS `compute` of a machine: its `osProfile.computerName` (the host name kubelet
    /// registers), and of a scale-set member `vmScaleSetName`, for a Uniform instance the
    /// instance's name (`{ss}_{id}`, not a node name) and resource ID.
    pub fn patch_imds(&self, vm: &VmSpec, doc: &mut Value) {
        doc["compute"]["osProfile"] =
            json!({"adminUsername": "azureuser", "computerName": vm.name});
        match membership(&self.topology, vm) {
            Membership::Standalone => {}
            Membership::Flexible { set } => {
                doc["compute"]["vmScaleSetName"] = json!(set);
            }
            Membership::Uniform { set, instance } => {
                doc["compute"]["vmScaleSetName"] = json!(set);
                doc["compute"]["name"] = json!(format!("{set}_{instance}"));
                doc["compute"]["resourceId"] = json!(instance_id(&self.topology, set, instance));
                doc["compute"]["osProfile"]["computerName"] = json!(computer_name(set, instance));
            }
        }
    }

    /// A Flexible member's VM document names its scale set.
    pub fn patch_vm_json(&self, vm: &VmSpec, doc: &mut Value) {
        if let Membership::Flexible { set } = membership(&self.topology, vm) {
            doc["properties"]["virtualMachineScaleSet"] =
                json!({"id": scale_set_id(&self.topology, set)});
        }
    }
}

/// The instance's network interface configuration as Compute shows it, from the NIC.
fn network_configuration(set: &str, nic: &Value) -> Value {
    let nic_props = &nic["properties"];
    let ip_configs: Vec<Value> = nic_props["ipConfigurations"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|c| {
            let p = &c["properties"];
            let mut props = Map::new();
            props.insert(
                "primary".into(),
                json!(p["primary"].as_bool() == Some(true)),
            );
            props.insert("privateIPAddressVersion".into(), json!("IPv4"));
            props.insert("subnet".into(), json!({"id": p["subnet"]["id"]}));
            for key in IP_CONFIG_REFERENCES {
                if let Some(v) = p.get(key) {
                    props.insert(key.into(), v.clone());
                }
            }
            json!({"name": c["name"], "properties": props})
        })
        .collect();
    let mut props = Map::new();
    props.insert("primary".into(), json!(true));
    for key in NIC_SETTINGS {
        if let Some(v) = nic_props.get(key) {
            props.insert(key.into(), v.clone());
        }
    }
    props.insert("ipConfigurations".into(), json!(ip_configs));
    json!({"name": instance_nic_name(set), "properties": props})
}

/// ipConfiguration fields that travel between the instance's configuration and its NIC.
const IP_CONFIG_REFERENCES: [&str; 4] = [
    "applicationSecurityGroups",
    "loadBalancerBackendAddressPools",
    "loadBalancerInboundNatPools",
    "applicationGatewayBackendAddressPools",
];
/// NIC-level fields that travel between the instance's configuration and its NIC.
const NIC_SETTINGS: [&str; 5] = [
    "networkSecurityGroup",
    "dnsSettings",
    "enableAcceleratedNetworking",
    "enableIPForwarding",
    "auxiliaryMode",
];

/// The NIC PUT a scale-set VM update implies: the NIC as it is, with the configuration's
/// ipConfigurations and NIC settings (so dropping one in the update drops it on the NIC).
fn nic_put_body(set: &str, nic: &Value, configs: &Value) -> Result<Value, ArmError> {
    let invalid = |m: String| ArmError::bad_request("InvalidParameter", m);
    let configs = configs.as_array().ok_or_else(|| {
        invalid(
            "networkProfileConfiguration.networkInterfaceConfigurations must be an array.".into(),
        )
    })?;
    let name = instance_nic_name(set);
    if configs.len() != 1 {
        return Err(invalid(format!(
            "The instance has one network interface configuration ({name}); {} were given.",
            configs.len()
        )));
    }
    let config = &configs[0];
    if !config["name"]
        .as_str()
        .is_some_and(|n| n.eq_ignore_ascii_case(&name))
    {
        return Err(invalid(format!(
            "Network interface configuration {} does not exist; adding or renaming one is not supported on an instance.",
            config["name"]
        )));
    }
    let props = &config["properties"];
    let ip_configs = props["ipConfigurations"].as_array().ok_or_else(|| {
        invalid(format!(
            "Network interface configuration {name} must have ipConfigurations."
        ))
    })?;
    let mut nic_ip_configs = Vec::with_capacity(ip_configs.len());
    for (i, c) in ip_configs.iter().enumerate() {
        let p = &c["properties"];
        let Some(subnet) = p["subnet"]["id"].as_str() else {
            return Err(invalid(format!(
                "ipConfigurations[{i}] ({}) must reference a subnet.",
                c["name"]
            )));
        };
        if p.get("privateIPAddress").is_some() {
            return Err(invalid(format!(
                "ipConfigurations[{i}]: privateIPAddress is not a property of a scale-set IP configuration."
            )));
        }
        // An existing entry keeps what the scale-set shape cannot say (its public IP, ...).
        let existing = nic["properties"]["ipConfigurations"]
            .as_array()
            .and_then(|all| {
                all.iter().find(|e| {
                    e["name"]
                        .as_str()
                        .zip(c["name"].as_str())
                        .is_some_and(|(a, b)| a.eq_ignore_ascii_case(b))
                })
            });
        let mut np = existing
            .and_then(|e| e["properties"].as_object())
            .cloned()
            .unwrap_or_default();
        for key in IP_CONFIG_REFERENCES {
            np.remove(key);
        }
        np.insert("privateIPAllocationMethod".into(), json!("Dynamic"));
        np.insert(
            "privateIPAddressVersion".into(),
            p.get("privateIPAddressVersion")
                .cloned()
                .unwrap_or(json!("IPv4")),
        );
        np.insert(
            "primary".into(),
            json!(p["primary"].as_bool() == Some(true)),
        );
        np.insert("subnet".into(), json!({"id": subnet}));
        for key in IP_CONFIG_REFERENCES {
            if let Some(v) = p.get(key) {
                np.insert(key.into(), v.clone());
            }
        }
        nic_ip_configs.push(json!({"name": c["name"], "properties": np}));
    }
    let mut body = nic.clone();
    let nic_props = body["properties"].as_object_mut().expect("NIC properties");
    for key in NIC_SETTINGS {
        match props.get(key) {
            Some(v) => {
                nic_props.insert(key.into(), v.clone());
            }
            None => {
                nic_props.remove(key);
            }
        }
    }
    nic_props.insert("ipConfigurations".into(), json!(nic_ip_configs));
    Ok(body)
}

/// The fields of a PUT body the mock keeps: everything but the computed and network fields. An
/// omitted image reference means "unchanged" (what Cilium relies on).
fn kept_fields(body: &Value, old: &Value) -> Value {
    let mut doc = body.clone();
    if let Some(obj) = doc.as_object_mut() {
        for key in ["id", "name", "type", "etag", "instanceId", "resources"] {
            obj.remove(key);
        }
        // Read-only on an instance: a PUT cannot change them, leaving them out keeps them.
        for key in ["sku", "zones"] {
            if let Some(v) = old.get(key) {
                obj.insert(key.into(), v.clone());
            }
        }
    }
    if let Some(props) = doc["properties"].as_object_mut() {
        for key in READ_ONLY {
            props.remove(key);
        }
        props.remove("networkProfile");
        props.remove("networkProfileConfiguration");
    }
    if doc["properties"]["storageProfile"].is_object()
        && doc["properties"]["storageProfile"]
            .get("imageReference")
            .is_none()
        && let Some(image) = old["properties"]["storageProfile"].get("imageReference")
    {
        doc["properties"]["storageProfile"]["imageReference"] = image.clone();
    }
    if !doc["properties"]["storageProfile"].is_object() {
        doc["properties"]["storageProfile"] = old["properties"]["storageProfile"].clone();
    }
    doc
}

/// A Uniform instance's host name: the scale set's prefix and the instance ID, six digits (AKS:
/// `aks-nodepool1-12345678-vmss000000`).
fn computer_name(set: &str, instance: u32) -> String {
    format!("{set}{instance:06}")
}

fn subscription_of(id: &str) -> Option<&str> {
    let mut parts = id.split('/').filter(|s| !s.is_empty());
    while let Some(part) = parts.next() {
        if part.eq_ignore_ascii_case("subscriptions") {
            return parts.next();
        }
    }
    None
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

    fn topology() -> Topology {
        let mut t = Topology::single_subnet("10.0.0.0/24".parse().unwrap(), 3);
        t.scale_sets = vec![
            ScaleSetSpec {
                name: "pool1".into(),
                orchestration: Orchestration::Uniform,
            },
            ScaleSetSpec {
                name: "flex".into(),
                orchestration: Orchestration::Flexible,
            },
        ];
        t.vms[0].scale_set = Some("pool1".into());
        t.vms[1].scale_set = Some("pool1".into());
        t.vms[2].scale_set = Some("flex".into());
        t
    }

    #[test]
    fn members_get_instance_ids_in_order() {
        let t = topology();
        assert_eq!(
            membership(&t, &t.vms[1]),
            Membership::Uniform {
                set: "pool1",
                instance: 1
            }
        );
        assert_eq!(
            membership(&t, &t.vms[2]),
            Membership::Flexible { set: "flex" }
        );
        assert_eq!(uniform_vm(&t, "POOL1", "0").unwrap().name, "node-1");
        assert!(is_uniform_nic(&t, "node-2-nic"));
        assert!(!is_uniform_nic(&t, "node-3-nic"));
        let mut broken = t.clone();
        broken.vms[0].scale_set = Some("nope".into());
        assert!(broken.validate().is_err());
    }

    #[test]
    fn an_update_that_resends_the_image_is_refused_and_one_without_it_keeps_it() {
        let mut c = Cloud::new(topology(), None).unwrap();
        let doc = c.instance_json("pool1", "0").unwrap();
        let err = c
            .put_instance(
                "pool1",
                "0",
                None,
                &doc,
                None,
                Timing::new(0, 1),
                Instant::now(),
            )
            .unwrap_err();
        assert_eq!(
            (err.status, err.code.as_str()),
            (403, "LinkedAuthorizationFailed")
        );
        let mut without = doc.clone();
        without["properties"]["storageProfile"]
            .as_object_mut()
            .unwrap()
            .remove("imageReference");
        c.put_instance(
            "pool1",
            "0",
            None,
            &without,
            None,
            Timing::new(0, 1),
            Instant::now(),
        )
        .unwrap();
        let after = c.instance_json("pool1", "0").unwrap();
        assert_eq!(
            after["properties"]["storageProfile"]["imageReference"],
            doc["properties"]["storageProfile"]["imageReference"]
        );
        assert_ne!(after["etag"], doc["etag"]);
    }
}
