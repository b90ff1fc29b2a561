//! A cold burst through the real Azure client against a real vnet-mockcloud (HTTP on
//! 127.0.0.1): 100 ADDs at once on an empty pool are served by one NIC write.

mod common;

use std::collections::BTreeSet;

use common::*;
use vnet_mockcloud::{MockConfig, MockServer, Topology};

async fn start_mock() -> MockServer {
    let topology = Topology::single_subnet("10.240.0.0/16".parse().unwrap(), 1);
    start_mock_with_lab_timing(MockConfig::new(topology)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_adds_on_an_empty_pool_take_one_nic_write() {
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = mock_agent_config(dir.path(), &mock);
    config.pool.warm = 0;
    config.pool.batch = 8;
    let provider = vnet_agent::provider::build(&config.cloud).unwrap();
    let agent = TestAgent::start(config, provider).await;
    let puts_before = mock.counters().calls("nic_put");

    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let client = agent.client.clone();
            tokio::spawn(async move { client.allocate(&alloc_req(&format!("pod{i}"))).await })
        })
        .collect();
    let mut ips = BTreeSet::new();
    for t in tasks {
        let ip = t.await.unwrap().expect("allocation succeeds").allocation.ip;
        assert!(ips.insert(ip), "{ip} handed out twice");
    }
    let counters = mock.counters();
    assert_eq!(
        counters.calls("nic_put") - puts_before,
        1,
        "one NIC write for the burst; calls: {:?}",
        counters.calls
    );
    // Sized to the burst, rounded up to the batch: 13 batches of 8.
    assert_eq!(agent.agent.status().pool.total, 104);
    agent.stop().await;
}
