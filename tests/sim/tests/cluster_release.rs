//! Cluster mode's releases end to end: the agent's ClusterProvider, the real allocator, the real
//! Azure client, the mock (which hands a released address out again, lowest first, as Azure).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use vnet_cloud::CloudProvider;
use vnet_cloud::azure::{AzureConfig, AzureProvider, CredentialConfig};
use vnet_fakeapi::{FakeApi, NODES, POOLS};
use vnet_kube::{ClusterProvider, ClusterSettings, InstanceSource};
use vnet_mockcloud::{MockConfig, MockServer, Topology};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_through_the_allocator_removes_the_entry_and_never_its_reused_address() {
    let mock = MockServer::start(
        MockConfig::new(Topology::single_subnet("10.0.0.0/24".parse().unwrap(), 1)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let name = "node-1";
    let fake = FakeApi::with_role("vnet-cni-allocator");
    let provider_id = vnet_allocator::provider_id(&mock.topology().vm_id(name));
    fake.put(
        NODES,
        serde_json::json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "uid": "uid-node-1"}, "spec": {"providerID": provider_id}}),
    );
    fake.put(
        POOLS,
        serde_json::json!({"apiVersion": "vnet-cni.io/v1alpha1", "kind": "NodeIPPool",
            "metadata": {"name": name}, "spec": {}}),
    );
    let arm = AzureConfig::mock(
        &mock.base_url(),
        &mock.imds_endpoint(name),
        CredentialConfig::StaticToken {
            token: vnet_clustersim::node::SHARED_TOKEN.into(),
        },
    );
    let cloud = Arc::new(AzureProvider::new(vnet_allocator::cloud_config(arm)).unwrap());
    let (_stop, shutdown) = watch::channel(false);
    let settings = vnet_allocator::Settings {
        holder: "test-allocator".into(),
        ..vnet_allocator::Settings::default()
    };
    tokio::spawn(vnet_allocator::run(
        fake.client(),
        cloud,
        settings,
        shutdown,
    ));
    let imds = AzureProvider::new(AzureConfig::mock(
        "",
        &mock.imds_endpoint(name),
        CredentialConfig::None,
    ))
    .unwrap();
    let p = ClusterProvider::new(
        fake.client(),
        InstanceSource::Imds(imds),
        Box::new(|m| Ok(m.vm_name.clone())),
        ClusterSettings {
            answer_timeout: Duration::from_secs(60),
        },
    );
    let id = p.discover().await.unwrap();
    let got = p.assign_ips(&id.nic_id, &id.subnet_id, 3).await.unwrap();
    let old = got[0].clone();
    p.release_ips(&id.nic_id, &[old.ip]).await.unwrap();
    let listed = p.list_secondary_ips(&id.nic_id).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|e| e.name != old.name));
    // Azure (the mock) hands the address out again, under a new name.
    let again = p.assign_ips(&id.nic_id, &id.subnet_id, 1).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(
        again[0].ip, old.ip,
        "the mock reuses the lowest free address"
    );
    assert_ne!(again[0].name, old.name);
    // Another change: the reused address stays.
    p.assign_ips(&id.nic_id, &id.subnet_id, 1).await.unwrap();
    let listed = p.list_secondary_ips(&id.nic_id).await.unwrap();
    assert_eq!(listed.len(), 4);
    assert!(listed.contains(&again[0]));
    let on_nic: Vec<_> = mock.state().addresses.iter().map(|a| a.ip).collect();
    assert!(on_nic.contains(&old.ip), "{on_nic:?}");
}
