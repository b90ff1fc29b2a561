//! The agent in prefix mode through the real Azure client against vnet-mockcloud: on a VM it
//! grows by a /28 and serves pods /32s of it; on a Uniform scale-set instance it refuses to start.

mod common;

use std::sync::Arc;

use common::*;
use vnet_agent::config::{Config, PoolMode};
use vnet_agent::daemon;
use vnet_agent::netlink::NoLinks;
use vnet_mockcloud::topology::{Orchestration, ScaleSetSpec};
use vnet_mockcloud::{MockConfig, MockServer, Topology};

async fn mock(uniform: bool) -> MockServer {
    let mut topology = Topology::single_subnet("10.240.0.0/16".parse().unwrap(), 1);
    if uniform {
        topology.scale_sets = vec![ScaleSetSpec {
            name: "pool".into(),
            orchestration: Orchestration::Uniform,
        }];
        topology.vms[0].scale_set = Some("pool".into());
    }
    start_mock_with_lab_timing(MockConfig::new(topology)).await
}

fn prefix_config(root: &std::path::Path, mock: &MockServer) -> Config {
    let mut config = mock_agent_config(root, mock);
    config.pool.mode = PoolMode::Prefix;
    config.pool.warm = 2;
    config.pool.batch = 2;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_vm_the_agent_grows_by_a_block_and_serves_its_addresses() {
    let mock = mock(false).await;
    let dir = tempfile::tempdir().unwrap();
    let config = prefix_config(dir.path(), &mock);
    let cloud = vnet_agent::provider::build(&config.cloud).unwrap();
    let agent = TestAgent::start(config, Arc::clone(&cloud)).await;
    let mut ips = Vec::new();
    for pod in ["a", "b", "c"] {
        let ip = agent
            .client
            .allocate(&alloc_req(pod))
            .await
            .expect("allocation")
            .allocation
            .ip;
        ips.push(ip);
    }
    let state = mock.state();
    let blocks: Vec<_> = state
        .addresses
        .iter()
        .filter(|a| !a.primary)
        .map(|a| (a.ip, a.prefix_len))
        .collect();
    assert_eq!(blocks.len(), 1, "{blocks:?}");
    let (base, len) = blocks[0];
    assert_eq!(len, Some(28));
    let block = ipnetwork::Ipv4Network::new(base, 28).unwrap();
    assert!(
        ips.iter().all(|ip| block.contains(*ip)),
        "{ips:?} in {block}"
    );
    assert_eq!(agent.agent.status().pool.total, 16);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_uniform_instance_prefix_mode_stops_the_agent_with_a_clear_error() {
    let mock = mock(true).await;
    let dir = tempfile::tempdir().unwrap();
    let config = prefix_config(dir.path(), &mock);
    let cloud = vnet_agent::provider::build(&config.cloud).unwrap();
    let (_shutdown, rx) = tokio::sync::watch::channel(false);
    let result = daemon::run(
        daemon::Options {
            config,
            cloud,
            links: Arc::new(NoLinks),
            journal: Default::default(),
            on_ready: None,
        },
        rx,
    )
    .await;
    let err = result
        .expect_err("prefix mode on a Uniform instance")
        .to_string();
    assert!(
        err.contains("pool.mode") && err.contains("Uniform") && err.contains("address"),
        "{err}"
    );
    // Nothing was written to the instance.
    assert!(mock.state().addresses.iter().all(|a| a.primary));
}
