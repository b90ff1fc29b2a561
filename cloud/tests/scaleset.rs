//! The Azure client on scale-set nodes (Uniform instances through Compute, Flexible members
//! through their standalone NICs) against a real vnet-mockcloud over HTTP.

mod common;

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use common::{Lab, mixed_topology};
use serde_json::{Value, json};
use vnet_cloud::azure::{COMPUTE_API_VERSION, VMSS_NIC_API_VERSION};
use vnet_cloud::{CloudError, CloudProvider, IP_CONFIG_PREFIX, NodeKind};

async fn lab() -> Lab {
    Lab::start(mixed_topology("10.240.0.0/24")).await
}

#[tokio::test]
async fn discovery_takes_the_path_azure_reports() {
    let lab = lab().await;
    let (provider, _) = lab.provider("node-2");
    let identity = provider.discover().await.unwrap();
    assert_eq!(identity.kind, NodeKind::Uniform);
    assert_eq!(identity.scale_set, "pool1");
    assert_eq!(identity.vm_name, "pool1_0");
    // kubelet registers the host name, not `{ss}_{id}`.
    assert_eq!(identity.computer_name, "pool1000000");
    assert_eq!(identity.vm_id, lab.instance_id("pool1", 0));
    assert_eq!(identity.nic_id, lab.instance_nic_id("pool1", 0));
    assert_eq!(identity.primary_ip, Ipv4Addr::new(10, 240, 0, 5));
    assert_eq!(identity.subnet_id, lab.subnet_id());
    let counters = lab.counters().await;
    assert_eq!(counters.calls("vmss_vm_get"), 1);
    assert_eq!(counters.calls("vmss_nic_get"), 1);
    assert_eq!(counters.calls("vm_get"), 0);
    assert_eq!(counters.calls("nic_get"), 0);

    let (provider, _) = lab.provider("node-4");
    let identity = provider.discover().await.unwrap();
    assert_eq!(identity.kind, NodeKind::Flexible);
    assert_eq!(identity.scale_set, "flex");
    assert_eq!(identity.nic_id, lab.nic_id("node-4"));
    assert_eq!(identity.computer_name, "node-4");

    let (provider, _) = lab.provider("node-1");
    let identity = provider.discover().await.unwrap();
    assert_eq!(identity.kind, NodeKind::Vm);
    assert_eq!(identity.scale_set, "");
    assert_eq!(identity.computer_name, "node-1");
}

#[tokio::test]
async fn a_uniform_instance_has_no_standalone_resources() {
    let lab = lab().await;
    let rg = "/subscriptions/sub/resourceGroups/rg/providers";
    let (status, _) = lab
        .arm_get(
            &format!("{rg}/Microsoft.Network/networkInterfaces/node-2-nic"),
            "2024-05-01",
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = lab
        .arm_get(
            &format!("{rg}/Microsoft.Compute/virtualMachines/node-2"),
            COMPUTE_API_VERSION,
        )
        .await;
    assert_eq!(status, 404);
    // Network serves the scale-set NIC view only at its old api-version.
    let nic = lab.instance_nic_id("pool1", 0);
    let (status, body) = lab.arm_get(&nic, "2024-05-01").await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "NoRegisteredProviderFound");
    // cloud-provider-azure reads it at 2017-03-30.
    assert_eq!(lab.arm_get(&nic, "2017-03-30").await.0, 200);
    let (status, body) = lab.arm_get(&nic, VMSS_NIC_API_VERSION).await;
    assert_eq!(status, 200);
    assert_eq!(body["id"], nic.as_str());
    assert_eq!(
        body["properties"]["virtualMachine"]["id"],
        lab.instance_id("pool1", 0).as_str()
    );
}

#[tokio::test]
async fn assign_and_release_on_a_uniform_instance_go_through_compute() {
    let lab = lab().await;
    let (provider, _) = lab.provider("node-3");
    let nic = provider.discover().await.unwrap().nic_id;
    assert_eq!(nic, lab.instance_nic_id("pool1", 1));
    lab.reset_counters().await;
    let added = provider
        .assign_ips(&nic, &lab.subnet_id(), 3)
        .await
        .unwrap();
    assert_eq!(added.len(), 3);
    assert!(added.iter().all(|s| s.name.starts_with(IP_CONFIG_PREFIX)));
    let mut ips: Vec<Ipv4Addr> = added.iter().map(|s| s.ip).collect();
    ips.sort();
    assert_eq!(lab.secondary_on("node-3").await, ips);
    let counters = lab.counters().await;
    assert_eq!(counters.responses("vmss_vm_put", 200), 1);
    assert!(counters.calls("compute_operation_get") >= 1);
    assert_eq!(counters.calls("nic_put"), 0);

    let listed: Vec<Ipv4Addr> = provider
        .list_secondary_ips(&nic)
        .await
        .unwrap()
        .iter()
        .map(|s| s.ip)
        .collect();
    assert_eq!(listed.len(), 3);

    provider.release_ips(&nic, &ips[..2]).await.unwrap();
    assert_eq!(lab.secondary_on("node-3").await, vec![ips[2]]);
    lab.reset_counters().await;
    provider.release_ips(&nic, &ips[..2]).await.unwrap();
    assert_eq!(lab.counters().await.calls("vmss_vm_put"), 0);
}

/// The instance after our writes equals the one before, except its etag, provisioning state
/// and our own ipConfigurations: the image reference we left out is still there.
#[tokio::test]
async fn an_instance_update_keeps_every_field_it_did_not_create() {
    let lab = lab().await;
    let (provider, _) = lab.provider("node-2");
    let nic = provider.discover().await.unwrap().nic_id;
    let instance = lab.instance_id("pool1", 0);
    let (_, before) = lab.arm_get(&instance, COMPUTE_API_VERSION).await;
    let added = provider
        .assign_ips(&nic, &lab.subnet_id(), 2)
        .await
        .unwrap();
    assert_eq!(added.len(), 2);
    let (_, after) = lab.arm_get(&instance, COMPUTE_API_VERSION).await;
    let strip = |doc: &Value| {
        let mut doc = doc.clone();
        doc.as_object_mut().unwrap().remove("etag");
        doc["properties"]
            .as_object_mut()
            .unwrap()
            .remove("provisioningState");
        doc["properties"]["networkProfileConfiguration"]["networkInterfaceConfigurations"][0]
            ["properties"]["ipConfigurations"]
            .as_array_mut()
            .unwrap()
            .retain(|c| !c["name"].as_str().unwrap().starts_with(IP_CONFIG_PREFIX));
        doc
    };
    assert_ne!(before["etag"], after["etag"]);
    assert_eq!(strip(&before), strip(&after));
    assert!(
        after["properties"]["storageProfile"]["imageReference"]["id"]
            .as_str()
            .unwrap()
            .contains("/galleries/AKSUbuntu/")
    );
    // Our new entries carry what the primary's do not need to repeat: nothing but the subnet.
    let ours: Vec<&Value> = after["properties"]["networkProfileConfiguration"]
        ["networkInterfaceConfigurations"][0]["properties"]["ipConfigurations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"].as_str().unwrap().starts_with(IP_CONFIG_PREFIX))
        .collect();
    assert_eq!(ours.len(), 2);
    assert!(
        ours.iter()
            .all(|c| c["properties"]["subnet"]["id"] == lab.subnet_id().as_str())
    );
}

/// What the client must not do: re-send the image reference (AKS's gallery image is in a
/// subscription no customer can read).
#[tokio::test]
async fn the_mock_refuses_an_update_that_resends_the_image_reference() {
    let lab = lab().await;
    let instance = lab.instance_id("pool1", 0);
    let (_, doc) = lab.arm_get(&instance, COMPUTE_API_VERSION).await;
    let response = lab
        .http
        .put(format!(
            "{}{instance}?api-version={COMPUTE_API_VERSION}",
            lab.mock.base_url()
        ))
        .json(&doc)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "LinkedAuthorizationFailed");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Microsoft.Compute/galleries/images/versions/read")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_on_an_instance_are_coalesced() {
    let lab = lab().await;
    lab.set_faults(
        json!({"latency": {"vmss_vm_put": {"fixed_ms": 500}}, "operation_retry_after_secs": 0}),
    )
    .await;
    let (provider, _) = lab.provider("node-2");
    let nic = provider.discover().await.unwrap().nic_id;
    let assign = |provider: vnet_cloud::azure::AzureProvider| {
        let (nic, subnet) = (nic.clone(), lab.subnet_id());
        tokio::spawn(async move { provider.assign_ips(&nic, &subnet, 1).await })
    };
    let first = assign(provider.clone());
    while lab.counters().await.calls("vmss_vm_put") == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rest: Vec<_> = (0..7).map(|_| assign(provider.clone())).collect();
    let mut ips = HashSet::new();
    for task in std::iter::once(first).chain(rest) {
        let added = task.await.unwrap().unwrap();
        assert!(ips.insert(added[0].ip), "address handed out twice");
    }
    assert_eq!(lab.secondary_on("node-2").await.len(), 8);
    assert_eq!(lab.counters().await.calls("vmss_vm_put"), 2);
}

#[tokio::test]
async fn a_changed_instance_etag_is_reread_and_reapplied() {
    let lab = lab().await;
    let (provider, _) = lab.provider("node-2");
    let nic = provider.discover().await.unwrap().nic_id;
    lab.set_faults(json!({"etag_race": {"count": 1, "operations": ["vmss_vm_put"]}}))
        .await;
    let added = provider
        .assign_ips(&nic, &lab.subnet_id(), 2)
        .await
        .unwrap();
    assert_eq!(added.len(), 2);
    let counters = lab.counters().await;
    assert_eq!(counters.responses("vmss_vm_put", 412), 1);
    assert_eq!(counters.responses("vmss_vm_put", 200), 1);
}

/// Compute throttles with 429 `OperationNotAllowed` and `Retry-After`: waited out as said.
#[tokio::test]
async fn computes_throttling_is_waited_out() {
    let lab = lab().await;
    let (provider, sleeper) = lab.provider("node-2");
    let nic = provider.discover().await.unwrap().nic_id;
    lab.set_faults(json!({
        "throttle": {"count": 1, "operations": ["vmss_vm_put"], "retry_after_secs": 7},
        "busy": {"count": 1, "operations": ["vmss_vm_put"], "retry_after_secs": 3},
        "operation_retry_after_secs": 0,
    }))
    .await;
    let added = provider
        .assign_ips(&nic, &lab.subnet_id(), 1)
        .await
        .unwrap();
    assert_eq!(added.len(), 1);
    // Each wait is at least its Retry-After, later by a jitter of at most half of it.
    let delays = sleeper.delays();
    let waited = |after: u64| {
        delays
            .iter()
            .any(|d| *d >= Duration::from_secs(after) && *d <= Duration::from_secs(after) * 3 / 2)
    };
    assert!(waited(7), "{delays:?}");
    assert!(waited(3), "{delays:?}");
    let counters = lab.counters().await;
    assert_eq!(counters.responses("vmss_vm_put", 429), 2);
}

#[tokio::test]
async fn a_failed_compute_operation_is_retried_and_a_lost_answer_reread() {
    let lab = lab().await;
    let (provider, _) = lab.provider("node-2");
    let nic = provider.discover().await.unwrap().nic_id;
    lab.set_faults(json!({
        "async_failure": {"count": 1, "operations": ["vmss_vm_put"]},
        "lost_response": {"count": 1, "operations": ["vmss_vm_put"]},
        "operation_retry_after_secs": 0,
    }))
    .await;
    let added = provider
        .assign_ips(&nic, &lab.subnet_id(), 2)
        .await
        .unwrap();
    assert_eq!(added.len(), 2);
    let mut on_nic = lab.secondary_on("node-2").await;
    let mut told: Vec<Ipv4Addr> = added.iter().map(|s| s.ip).collect();
    on_nic.sort();
    told.sort();
    assert_eq!(on_nic, told);
    let counters = lab.counters().await;
    assert_eq!(counters.injected("async_failure"), 1);
    assert_eq!(counters.injected("lost_response"), 1);
}

#[tokio::test]
async fn a_missing_compute_permission_is_named() {
    let lab = lab().await;
    let (provider, _) = lab.provider("node-2");
    let nic = provider.discover().await.unwrap().nic_id;
    lab.set_faults(json!({"forbidden": {"operations": ["vmss_vm_put"]}}))
        .await;
    let error = provider
        .assign_ips(&nic, &lab.subnet_id(), 1)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, CloudError::Unauthorized { message } if message.contains("Microsoft.Compute/virtualMachineScaleSets/virtualMachines/write")),
        "{error:?}"
    );
    lab.set_faults(json!({"forbidden": {"operations": ["vmss_nic_get"]}}))
        .await;
    let error = provider.discover().await.unwrap_err();
    assert!(
        matches!(&error, CloudError::Unauthorized { message } if message.contains("Microsoft.Compute/virtualMachineScaleSets/virtualMachines/networkInterfaces/read")),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_full_subnet_on_an_instance_is_subnet_full() {
    let lab = Lab::start(mixed_topology("10.240.0.0/28")).await; // .4-.14 assignable, 4 VMs
    let (provider, _) = lab.provider("node-2");
    let nic = provider.discover().await.unwrap().nic_id;
    let error = provider
        .assign_ips(&nic, &lab.subnet_id(), 8)
        .await
        .unwrap_err();
    assert!(matches!(error, CloudError::SubnetFull { .. }), "{error:?}");
    assert!(lab.secondary_on("node-2").await.is_empty());
}

/// A reimage resets the instance's ipConfigurations to the scale set's model: the next read
/// shows the addresses gone, and new ones can be added.
#[tokio::test]
async fn a_reimaged_instance_loses_its_addresses_and_gets_new_ones() {
    let lab = lab().await;
    let (provider, _) = lab.provider("node-2");
    let nic = provider.discover().await.unwrap().nic_id;
    let added = provider
        .assign_ips(&nic, &lab.subnet_id(), 3)
        .await
        .unwrap();
    let response = lab
        .http
        .post(format!(
            "{}/admin/scalesets/pool1/virtualMachines/0/reimage",
            lab.mock.base_url()
        ))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    let lost: Value = response.json().await.unwrap();
    assert_eq!(lost["lost"].as_array().unwrap().len(), 3);
    assert!(provider.list_secondary_ips(&nic).await.unwrap().is_empty());
    assert!(lab.secondary_on("node-2").await.is_empty());
    let again = provider
        .assign_ips(&nic, &lab.subnet_id(), 1)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert!(added.iter().all(|a| a.name != again[0].name));
}

/// A VM, two Uniform instances and a Flexible member assigning and releasing at once: no
/// address is ever on two NICs, and each client is told exactly what its NIC holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_kind_at_once_never_shares_an_address() {
    let lab = lab().await;
    lab.set_faults(json!({
        "etag_race": {"probability": 0.2},
        "busy": {"probability": 0.1, "operations": ["nic_put", "vmss_vm_put"]},
        "operation_retry_after_secs": 0,
    }))
    .await;
    let mut tasks = Vec::new();
    for vm in ["node-1", "node-2", "node-3", "node-4"] {
        let (provider, _) = lab.provider(vm);
        let subnet = lab.subnet_id();
        tasks.push(tokio::spawn(async move {
            let nic = provider.discover().await.unwrap().nic_id;
            let mut held: Vec<Ipv4Addr> = Vec::new();
            for round in 0..4 {
                let added = provider.assign_ips(&nic, &subnet, 3).await.unwrap();
                held.extend(added.iter().map(|s| s.ip));
                if round % 2 == 1 {
                    let release: Vec<Ipv4Addr> = held.drain(..2).collect();
                    provider.release_ips(&nic, &release).await.unwrap();
                }
            }
            held.sort();
            (vm, held)
        }));
    }
    let mut all = HashSet::new();
    for task in tasks {
        let (vm, held) = task.await.unwrap();
        assert_eq!(lab.secondary_on(vm).await, held, "{vm}");
        for ip in held {
            assert!(all.insert(ip), "{ip} held twice");
        }
    }
    let state = lab.state().await;
    let unique: HashSet<Ipv4Addr> = state.addresses.iter().map(|a| a.ip).collect();
    assert_eq!(unique.len(), state.addresses.len());
}
