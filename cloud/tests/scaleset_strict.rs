//! The scale-set path against the strict mock: each VM its own principal holding exactly
//! deploy/azure/vnet-cni-role.json, and a Uniform instance whose NIC carries an NSG, an ASG and a
//! load balancer pool. The documented role is enough; a role missing one action fails naming it.

mod common;

use common::{Lab, mixed_topology, principals, role, token_of};
use serde_json::{Value, json};
use vnet_cloud::azure::{COMPUTE_API_VERSION, VMSS_NIC_API_VERSION};
use vnet_cloud::{CloudError, CloudProvider, IP_CONFIG_PREFIX};
use vnet_mockcloud::MockConfig;
use vnet_mockcloud::auth::RoleDefinition;
use vnet_mockcloud::topology::NicSpec;

const UNIFORM: &str = "node-2";

fn cluster_nic() -> NicSpec {
    let mut spec = NicSpec {
        network_security_group: Some("nsg-nodes".into()),
        application_security_groups: vec!["asg-nodes".into()],
        load_balancer_backend_address_pools: vec!["kubernetes/kubernetes".into()],
        ip_forwarding: true,
        ..NicSpec::default()
    };
    spec.tags.insert("aks-managed-pool".into(), json!("pool1"));
    spec
}

async fn strict_lab(role: &RoleDefinition) -> Lab {
    let mut topology = mixed_topology("10.240.0.0/24");
    for vm in &mut topology.vms {
        vm.nic = cluster_nic();
    }
    let mut config = MockConfig::new(topology.clone());
    config.principals = Some(principals(&topology, role));
    let lab = Lab::start_with(config).await;
    lab.set_faults(json!({"operation_retry_after_secs": 1}))
        .await;
    lab
}

fn without(role: &RoleDefinition, action: &str) -> RoleDefinition {
    let mut r = role.clone();
    r.actions.retain(|a| a != action);
    assert_eq!(
        r.actions.len() + 1,
        role.actions.len(),
        "{action} not in the role"
    );
    r
}

async fn get_as(lab: &Lab, vm: &str, path: &str, api_version: &str) -> Value {
    lab.http
        .get(format!(
            "{}{path}?api-version={api_version}",
            lab.mock.base_url()
        ))
        .bearer_auth(token_of(vm))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The document without what a write may change: etags, provisioning states, our entries.
fn comparable(doc: &Value) -> Value {
    match doc {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| *k != "etag" && *k != "provisioningState")
                .map(|(k, v)| (k.clone(), comparable(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .filter(|i| {
                    !i["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with(IP_CONFIG_PREFIX))
                })
                .map(comparable)
                .collect(),
        ),
        other => other.clone(),
    }
}

#[tokio::test]
async fn the_documented_role_is_enough_on_every_node_kind_and_keeps_every_field() {
    let lab = strict_lab(&role()).await;
    let nic_view = lab.instance_nic_id("pool1", 0);
    let instance = lab.instance_id("pool1", 0);
    let nic_before = get_as(&lab, UNIFORM, &nic_view, VMSS_NIC_API_VERSION).await;
    let instance_before = get_as(&lab, UNIFORM, &instance, COMPUTE_API_VERSION).await;
    assert!(nic_before["properties"]["networkSecurityGroup"]["id"].is_string());
    for vm in ["node-1", UNIFORM, "node-4"] {
        let (provider, _) = lab.provider(vm);
        let identity = provider.discover().await.unwrap();
        let added = provider
            .assign_ips(&identity.nic_id, &identity.subnet_id, 3)
            .await
            .unwrap_or_else(|e| panic!("{vm}: {e}"));
        provider
            .release_ips(&identity.nic_id, &[added[0].ip])
            .await
            .unwrap();
        assert_eq!(
            provider
                .list_secondary_ips(&identity.nic_id)
                .await
                .unwrap()
                .len(),
            2,
            "{vm}"
        );
    }
    let counters = lab.counters().await;
    assert_eq!(counters.responses("vmss_vm_put", 403), 0);
    assert_eq!(counters.responses("vmss_vm_put", 400), 0);
    // Our writes through Compute kept every field of the NIC and of the instance.
    let nic_after = get_as(&lab, UNIFORM, &nic_view, VMSS_NIC_API_VERSION).await;
    assert_eq!(comparable(&nic_after), comparable(&nic_before));
    let instance_after = get_as(&lab, UNIFORM, &instance, COMPUTE_API_VERSION).await;
    assert_eq!(comparable(&instance_after), comparable(&instance_before));
    // New entries are in the primary's application security groups (Azure's rule).
    let asgs = |doc: &Value| -> Vec<Value> {
        doc["properties"]["networkProfileConfiguration"]["networkInterfaceConfigurations"][0]
            ["properties"]["ipConfigurations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["properties"]["applicationSecurityGroups"].clone())
            .collect()
    };
    let all = asgs(&instance_after);
    assert_eq!(all.len(), 3);
    assert!(all.iter().all(|a| *a == all[0] && a.is_array()), "{all:?}");
}

/// Each action only the scale-set path needs, taken away: the call that needs it fails, and the
/// error names it.
#[tokio::test]
async fn a_role_missing_a_scale_set_action_says_which() {
    let reads = [
        "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/read",
        "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/networkInterfaces/read",
    ];
    for action in reads {
        let lab = strict_lab(&without(&role(), action)).await;
        let (provider, _) = lab.provider(UNIFORM);
        let err = provider.discover().await.unwrap_err();
        assert!(
            matches!(&err, CloudError::Unauthorized { message } if message.starts_with(&format!("missing permission {action}:"))),
            "{action}: {err:?}"
        );
    }
    let writes = [
        "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/write",
        "Microsoft.Compute/locations/operations/read",
    ];
    for action in writes {
        let lab = strict_lab(&without(&role(), action)).await;
        let (provider, _) = lab.provider(UNIFORM);
        let identity = provider.discover().await.unwrap();
        let err = provider
            .assign_ips(&identity.nic_id, &identity.subnet_id, 1)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, CloudError::Unauthorized { message } if message.starts_with(&format!("missing permission {action}:"))),
            "{action}: {err:?}"
        );
    }
}

/// Compute writes the NIC on the caller's behalf: a missing `join` on what the instance's NIC
/// carries fails as LinkedAuthorizationFailed, naming the action.
#[tokio::test]
async fn a_missing_join_on_the_instance_nic_is_linked_authorization_failed() {
    let asg_join = "Microsoft.Network/applicationSecurityGroups/joinIpConfiguration/action";
    let lab = strict_lab(&without(&role(), asg_join)).await;
    let (provider, _) = lab.provider(UNIFORM);
    let identity = provider.discover().await.unwrap();
    let err = provider
        .assign_ips(&identity.nic_id, &identity.subnet_id, 1)
        .await
        .unwrap_err();
    let CloudError::Unauthorized { message } = &err else {
        panic!("{err:?}");
    };
    assert!(message.contains("LinkedAuthorizationFailed"), "{message}");
    assert!(message.contains(asg_join), "{message}");
    assert!(
        message.contains("Microsoft.Compute/virtualMachineScaleSets/virtualMachines/write"),
        "{message}"
    );
    assert!(lab.secondary_on(UNIFORM).await.is_empty());
}

/// A Uniform instance behind an inbound NAT pool (scale sets only: NICs of single VMs cannot
/// reference one): the instance update re-sends the pool, so the role needs its `join`.
#[tokio::test]
async fn a_missing_join_on_the_instance_nat_pool_is_linked_authorization_failed() {
    let nat_pool_join = "Microsoft.Network/loadBalancers/inboundNatPools/join/action";
    let pool = "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.Network/loadBalancers/kubernetes/inboundNatPools/ssh";
    for (granted, role) in [(true, role()), (false, without(&role(), nat_pool_join))] {
        let mut topology = mixed_topology("10.240.0.0/24");
        for vm in &mut topology.vms {
            vm.nic = cluster_nic();
            if vm.name == UNIFORM {
                vm.nic
                    .primary_ip_configuration_properties
                    .insert("loadBalancerInboundNatPools".into(), json!([{"id": pool}]));
            }
        }
        let mut config = MockConfig::new(topology.clone());
        config.principals = Some(principals(&topology, &role));
        let lab = Lab::start_with(config).await;
        lab.set_faults(json!({"operation_retry_after_secs": 1}))
            .await;
        let (provider, _) = lab.provider(UNIFORM);
        let identity = provider.discover().await.unwrap();
        let result = provider
            .assign_ips(&identity.nic_id, &identity.subnet_id, 1)
            .await;
        if granted {
            result.unwrap();
            assert_eq!(lab.secondary_on(UNIFORM).await.len(), 1);
            continue;
        }
        let err = result.unwrap_err();
        let CloudError::Unauthorized { message } = &err else {
            panic!("{err:?}");
        };
        assert!(message.contains("LinkedAuthorizationFailed"), "{message}");
        assert!(message.contains(nat_pool_join), "{message}");
        assert!(message.contains(pool), "{message}");
        assert!(lab.secondary_on(UNIFORM).await.is_empty());
    }
}

/// The NIC rules hold on the instance update: an entry without the primary's ASGs is refused,
/// naming the NIC by its scale-set ID.
#[tokio::test]
async fn an_instance_update_breaking_the_asg_rule_is_refused() {
    let lab = strict_lab(&role()).await;
    let instance = lab.instance_id("pool1", 0);
    let mut doc = get_as(&lab, UNIFORM, &instance, COMPUTE_API_VERSION).await;
    doc["properties"]["storageProfile"]
        .as_object_mut()
        .unwrap()
        .remove("imageReference");
    doc["properties"]["networkProfileConfiguration"]["networkInterfaceConfigurations"][0]
        ["properties"]["ipConfigurations"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "vnet-cni-bare", "properties": {"subnet": {"id": lab.subnet_id()}}}));
    let response = lab
        .http
        .put(format!(
            "{}{instance}?api-version={COMPUTE_API_VERSION}",
            lab.mock.base_url()
        ))
        .bearer_auth(token_of(UNIFORM))
        .json(&doc)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["error"]["code"],
        vnet_mockcloud::rules::ASG_MISMATCH_CODE
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&lab.instance_nic_id("pool1", 0)),
        "{message}"
    );
    assert!(lab.secondary_on(UNIFORM).await.is_empty());
}
