//! Uniform scale-set instances (every AKS node): the NIC has no standalone resource. It is read
//! through Network's scale-set view (`.../virtualMachineScaleSets/{ss}/virtualMachines/{id}/
//! networkInterfaces/{nic}`, api-version [`VMSS_NIC_API_VERSION`]) and written through Compute's
//! scale-set VM update: the instance's
//! `networkProfileConfiguration.networkInterfaceConfigurations[].properties.ipConfigurations[]`,
//! PUT with `If-Match`, followed through Compute's long-running operation. The NIC view is what
//! says which address each ipConfiguration got.
//!
//! Flexible members are ordinary VMs with standalone NICs and never come here: the path is chosen
//! from the NIC's resource ID, which discovery took from what Azure reports.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use serde_json::{Value, json};

use super::{Inner, NETWORK_API_VERSION};
use crate::{CloudError, IP_CONFIG_PREFIX};

/// Network's scale-set NIC operations are read at this api-version: the SDKs' default for
/// `GetVirtualMachineScaleSetNetworkInterface`, and the one Azure's own sample pins even in the
/// 2022-05-01 spec (stable/2022-05-01/examples/VmssNetworkInterfaceGet.json). Whether newer
/// Network versions serve them is unverified.
pub const VMSS_NIC_API_VERSION: &str = "2018-10-01";

/// `(instance resource ID, NIC name)` when `nic_id` is a Uniform instance's NIC.
pub(super) fn instance_of_nic(nic_id: &str) -> Option<(&str, &str)> {
    let lower = nic_id.to_ascii_lowercase();
    let at = lower.rfind("/networkinterfaces/")?;
    let instance = &nic_id[..at];
    let name = &nic_id[at + "/networkInterfaces/".len()..];
    (is_uniform_instance(instance) && !name.is_empty() && !name.contains('/'))
        .then_some((instance, name))
}

/// Whether an ARM resource ID is a Uniform instance:
/// `.../Microsoft.Compute/virtualMachineScaleSets/{ss}/virtualMachines/{id}`.
pub(super) fn is_uniform_instance(resource_id: &str) -> bool {
    let parts: Vec<String> = resource_id
        .split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_ascii_lowercase)
        .collect();
    let n = parts.len();
    n >= 6
        && parts[n - 5] == "microsoft.compute"
        && parts[n - 4] == "virtualmachinescalesets"
        && parts[n - 2] == "virtualmachines"
}

/// The api-version for reading a NIC by its resource ID.
pub(super) fn nic_api_version(nic_id: &str) -> &'static str {
    if instance_of_nic(nic_id).is_some() {
        VMSS_NIC_API_VERSION
    } else {
        NETWORK_API_VERSION
    }
}

/// What writes are serialized on: the instance for a scale-set NIC (one update at a time per
/// instance, whatever NIC it changes), else the NIC.
pub(super) fn write_key(nic_id: &str) -> String {
    match instance_of_nic(nic_id) {
        Some((instance, _)) => instance.to_ascii_lowercase(),
        None => nic_id.to_ascii_lowercase(),
    }
}

/// Read-only fields of a scale-set VM (top level, and in `properties`).
const READ_ONLY: [&str; 7] = [
    "id",
    "name",
    "type",
    "etag",
    "instanceId",
    "resources",
    "sku",
];
const READ_ONLY_PROPERTIES: [&str; 6] = [
    "provisioningState",
    "latestModelApplied",
    "vmId",
    "instanceView",
    "timeCreated",
    "modelDefinitionApplied",
];

/// One write: where, what, and the etag it is conditional on.
pub(super) struct Write {
    pub url: String,
    pub body: Value,
    pub etag: String,
}

impl Inner {
    /// The instance update that makes the NIC view `nic` have `adds` and lose `releases`.
    pub(super) async fn instance_write(
        &self,
        instance_id: &str,
        nic_name: &str,
        nic: &Value,
        adds: &[(String, String)],
        releases: &HashSet<Ipv4Addr>,
    ) -> Result<Write, CloudError> {
        let url = self.arm_url(instance_id, super::COMPUTE_API_VERSION);
        let (instance, etag) = self.settled(&url, instance_id).await?;
        let body = edited_instance(&instance, nic_name, nic, adds, releases)?;
        Ok(Write { url, body, etag })
    }
}

/// The instance document to PUT: our ipConfigurations changed in the NIC's configuration, every
/// other field as read, except the image reference (see below).
pub(super) fn edited_instance(
    instance: &Value,
    nic_name: &str,
    nic: &Value,
    adds: &[(String, String)],
    releases: &HashSet<Ipv4Addr>,
) -> Result<Value, CloudError> {
    let mut body = instance.clone();
    let id = instance["id"].as_str().unwrap_or_default().to_string();
    let configs =
        body["properties"]["networkProfileConfiguration"]["networkInterfaceConfigurations"]
            .as_array_mut()
            .ok_or_else(|| {
                CloudError::Transient(format!(
                    "incomplete read of instance {id}: no networkProfileConfiguration"
                ))
            })?;
    let config = configs
        .iter_mut()
        .find(|c| {
            c["name"]
                .as_str()
                .is_some_and(|n| n.eq_ignore_ascii_case(nic_name))
        })
        .ok_or_else(|| {
            CloudError::Fatal(format!(
                "instance {id} has no network interface configuration named {nic_name}"
            ))
        })?;
    let ip_configs = config["properties"]["ipConfigurations"]
        .as_array_mut()
        .ok_or_else(|| {
            CloudError::Transient(format!(
                "incomplete read of instance {id}: {nic_name} has no ipConfigurations"
            ))
        })?;
    // The configuration carries no addresses: the NIC view says which entry holds which.
    let released: HashSet<String> = nic["properties"]["ipConfigurations"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|c| {
            c["properties"]["privateIPAddress"]
                .as_str()
                .and_then(|a| a.parse().ok())
                .is_some_and(|a: Ipv4Addr| releases.contains(&a))
        })
        .filter_map(|c| c["name"].as_str())
        .filter(|n| n.starts_with(IP_CONFIG_PREFIX))
        .map(str::to_ascii_lowercase)
        .collect();
    ip_configs.retain(|c| {
        !c["name"]
            .as_str()
            .is_some_and(|n| released.contains(&n.to_ascii_lowercase()))
    });
    // Azure wants every ipConfiguration of a NIC in the same application security groups.
    let asgs = ip_configs
        .iter()
        .find(|c| c["properties"]["primary"].as_bool() == Some(true))
        .and_then(|c| c["properties"].get("applicationSecurityGroups"))
        .cloned();
    for (name, subnet_id) in adds {
        if ip_configs.iter().any(|c| c["name"].as_str() == Some(name)) {
            continue;
        }
        let mut properties = json!({
            "primary": false,
            "privateIPAddressVersion": "IPv4",
            "subnet": {"id": subnet_id},
        });
        if let Some(asgs) = &asgs {
            properties["applicationSecurityGroups"] = asgs.clone();
        }
        ip_configs.push(json!({"name": name, "properties": properties}));
    }
    // Re-sending the image reference makes Compute check read access to the image: AKS's node
    // image is in a gallery of Microsoft's subscription, so the update fails with
    // LinkedAuthorizationFailed (Azure/AKS#1819). Leaving it out keeps the image unchanged.
    if let Some(storage) = body["properties"]["storageProfile"].as_object_mut() {
        storage.remove("imageReference");
    }
    // What Compute computes is not ours to send back (the SDKs leave read-only fields out too):
    // the extensions (`resources`) in particular are separate child resources.
    if let Some(doc) = body.as_object_mut() {
        for key in READ_ONLY {
            doc.remove(key);
        }
    }
    if let Some(props) = body["properties"].as_object_mut() {
        for key in READ_ONLY_PROPERTIES {
            props.remove(key);
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INSTANCE: &str = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/pool/virtualMachines/3";

    #[test]
    fn uniform_nics_are_recognized_by_their_path() {
        let nic = format!("{INSTANCE}/networkInterfaces/pool");
        assert_eq!(instance_of_nic(&nic), Some((INSTANCE, "pool")));
        assert_eq!(nic_api_version(&nic), VMSS_NIC_API_VERSION);
        assert!(is_uniform_instance(INSTANCE));
        let standalone =
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/networkInterfaces/n";
        assert_eq!(instance_of_nic(standalone), None);
        assert_eq!(nic_api_version(standalone), NETWORK_API_VERSION);
        // A Flexible member is a plain VM.
        assert!(!is_uniform_instance(
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/flex_1a2b"
        ));
        assert_eq!(
            write_key(&format!("{INSTANCE}/networkInterfaces/pool")),
            INSTANCE.to_ascii_lowercase()
        );
    }

    #[test]
    fn instance_edit_touches_only_our_entries_and_drops_the_image_reference() {
        let asg = json!([{"id": "/asg/1"}]);
        let instance = json!({
            "id": INSTANCE, "location": "westeurope", "tags": {"a": "b"},
            "properties": {
                "storageProfile": {"imageReference": {"id": "/subscriptions/other/img"}, "osDisk": {"x": 1}},
                "networkProfileConfiguration": {"networkInterfaceConfigurations": [{
                    "name": "pool",
                    "properties": {"primary": true, "networkSecurityGroup": {"id": "/nsg"}, "ipConfigurations": [
                        {"name": "ipconfig1", "properties": {"primary": true, "subnet": {"id": "/s"}, "applicationSecurityGroups": asg}},
                        {"name": "someone-else", "properties": {"subnet": {"id": "/s"}}},
                        {"name": "vnet-cni-a", "properties": {"subnet": {"id": "/s"}}},
                    ]}
                }]}
            }
        });
        let nic = json!({"properties": {"ipConfigurations": [
            {"name": "ipconfig1", "properties": {"privateIPAddress": "10.0.0.4", "primary": true}},
            {"name": "someone-else", "properties": {"privateIPAddress": "10.0.0.9"}},
            {"name": "vnet-cni-a", "properties": {"privateIPAddress": "10.0.0.5"}},
        ]}});
        let release: HashSet<Ipv4Addr> =
            ["10.0.0.9".parse().unwrap(), "10.0.0.5".parse().unwrap()].into();
        let body = edited_instance(
            &instance,
            "POOL",
            &nic,
            &[("vnet-cni-b".into(), "/s".into())],
            &release,
        )
        .unwrap();
        let config =
            &body["properties"]["networkProfileConfiguration"]["networkInterfaceConfigurations"][0];
        let names: Vec<&str> = config["properties"]["ipConfigurations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, vec!["ipconfig1", "someone-else", "vnet-cni-b"]);
        assert_eq!(
            config["properties"]["ipConfigurations"][2]["properties"]["applicationSecurityGroups"],
            asg
        );
        assert!(
            body["properties"]["storageProfile"]
                .get("imageReference")
                .is_none()
        );
        // Everything else as read (but what Compute computes).
        let mut expected = instance.clone();
        expected.as_object_mut().unwrap().remove("id");
        expected["properties"]["storageProfile"]
            .as_object_mut()
            .unwrap()
            .remove("imageReference");
        expected["properties"]["networkProfileConfiguration"]["networkInterfaceConfigurations"]
            [0]["properties"]["ipConfigurations"] =
            config["properties"]["ipConfigurations"].clone();
        assert_eq!(body, expected);
        assert!(matches!(
            edited_instance(&instance, "other", &nic, &[], &release),
            Err(CloudError::Fatal(_))
        ));
    }
}
