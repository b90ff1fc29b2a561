//! The agent on a Uniform scale-set instance (an AKS node) against the strict mock: with the
//! documented role it becomes ready and wires pods through Compute; with a role missing the
//! instance write it still starts, and its status says which permission is missing.

mod common;

use std::sync::Arc;

use common::*;
use vnet_agent::config::{Config, CredentialKind, ProviderKind};
use vnet_mockcloud::auth::{Principal, Principals, RoleDefinition};
use vnet_mockcloud::topology::{Orchestration, ScaleSetSpec};
use vnet_mockcloud::{Faults, MockConfig, MockServer, Topology};

const ROLE_JSON: &str = include_str!("../../deploy/azure/vnet-cni-role.json");
const WRITE: &str = "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/write";

/// node-1 is instance 0 of Uniform scale set `pool`; its agent's token holds `role`.
async fn strict_mock(role: RoleDefinition) -> MockServer {
    let mut topology = Topology::single_subnet("10.240.0.0/16".parse().unwrap(), 1);
    topology.scale_sets = vec![ScaleSetSpec {
        name: "pool".into(),
        orchestration: Orchestration::Uniform,
    }];
    topology.vms[0].scale_set = Some("pool".into());
    let mut config = MockConfig::new(topology);
    config.faults = Faults {
        operation_retry_after_secs: Some(1),
        ..Faults::default()
    };
    config.principals = Some(
        Principals::new(vec![Principal {
            token: "token-node-1".into(),
            name: "vnet-agent-node-1".into(),
            object_id: "00000000-0000-0000-0000-000000000001".into(),
            role,
        }])
        .unwrap(),
    );
    MockServer::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("mock starts")
}

fn agent_config(root: &std::path::Path, mock: &MockServer) -> Config {
    let mut config = test_config(root);
    config.cloud.provider = ProviderKind::Mock;
    config.cloud.credential = CredentialKind::TestToken;
    config.cloud.test_token = "token-node-1".into();
    config.cloud.arm_endpoint = mock.base_url();
    config.cloud.imds_endpoint = mock.imds_endpoint("node-1");
    config.pool.warm = 2;
    config.pool.batch = 2;
    config
}

fn role() -> RoleDefinition {
    serde_json::from_str(ROLE_JSON).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_documented_role_an_agent_on_a_uniform_instance_becomes_ready_and_serves() {
    let mock = strict_mock(role()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = agent_config(dir.path(), &mock);
    let cloud = vnet_agent::provider::build(&config.cloud).unwrap();
    let agent = TestAgent::start(config, Arc::clone(&cloud)).await;
    assert_eq!(agent.agent.identity().kind, vnet_cloud::NodeKind::Uniform);
    let allocated = agent
        .client
        .allocate(&alloc_req("pod-a"))
        .await
        .expect("allocation")
        .allocation
        .ip;
    let on_nic: Vec<_> = mock
        .state()
        .addresses
        .iter()
        .filter(|a| !a.primary)
        .map(|a| a.ip)
        .collect();
    assert!(on_nic.contains(&allocated), "{allocated} not on {on_nic:?}");
    let counters = mock.counters();
    assert!(counters.responses("vmss_vm_put", 200) >= 1);
    assert_eq!(counters.calls("nic_put"), 0);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_role_lacks_the_instance_write_says_which_permission() {
    let mut role = role();
    role.actions.retain(|a| a != WRITE);
    let mock = strict_mock(role).await;
    let dir = tempfile::tempdir().unwrap();
    let config = agent_config(dir.path(), &mock);
    let cloud = vnet_agent::provider::build(&config.cloud).unwrap();
    // Discovery needs only reads: the agent starts, then cannot grow its pool.
    let agent = TestAgent::start(config, cloud).await;
    let client = agent.client.clone();
    eventually("the status names the missing permission", || {
        let client = client.clone();
        async move {
            client.status().await.ok().is_some_and(|s| {
                s.last_cloud_error
                    .is_some_and(|e| e.contains(&format!("missing permission {WRITE}")))
            })
        }
    })
    .await;
    assert!(mock.state().addresses.iter().all(|a| a.primary));
    agent.stop().await;
}
