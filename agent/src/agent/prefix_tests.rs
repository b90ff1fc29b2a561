//! The agent in prefix mode against the fake cloud: it grows by blocks, hands out addresses of
//! its blocks, returns a block only when all of it is free and cooled down, and reconciles blocks.

use vnet_cloud::fake::FakeCloud;

use super::tests::{ready_agent, request, settings};
use super::*;
use crate::store::MemoryStore;

fn prefix_agent(cloud: Arc<FakeCloud>, warm: u32, batch: u32, cooldown_secs: u64) -> Arc<Agent> {
    let base = settings(&cloud);
    let settings = AgentSettings {
        pool: pool::Settings {
            warm,
            batch,
            max: 250,
            release_delay: Duration::ZERO,
            prefix_len: 28,
        },
        cooldown_secs,
        ..base
    };
    let identity = cloud.identity().clone();
    ready_agent(settings, identity, cloud, Arc::new(MemoryStore::new()))
}

fn blocks_on_nic(cloud: &FakeCloud) -> Vec<String> {
    let mut blocks: Vec<String> = cloud
        .entries()
        .iter()
        .map(|e| e.network().to_string())
        .collect();
    blocks.sort();
    blocks
}

#[tokio::test]
async fn the_pool_grows_by_one_block_and_pods_get_addresses_of_it() {
    let cloud = Arc::new(FakeCloud::new());
    let agent = prefix_agent(cloud.clone(), 4, 4, 30);
    agent.pool_step().await;
    assert_eq!(cloud.assign_calls(), 1);
    assert_eq!(blocks_on_nic(&cloud), vec!["10.240.0.16/28"]);
    let block: ipnetwork::Ipv4Network = "10.240.0.16/28".parse().unwrap();
    for pod in ["a", "b", "c"] {
        let ip = agent.allocate(request(pod)).await.unwrap().allocation.ip;
        assert!(block.contains(ip), "{ip}");
    }
    // 13 free addresses cover warm 4: no second write.
    agent.pool_step().await;
    assert_eq!(cloud.assign_calls(), 1);
    assert_eq!(agent.status().pool.total, 16);
}

#[tokio::test]
async fn a_block_returns_to_the_cloud_only_once_its_last_pod_is_gone_and_cooled_down() {
    let cloud = Arc::new(FakeCloud::new());
    // warm 20 makes two blocks; warm 0 afterwards lets both go.
    let agent = prefix_agent(cloud.clone(), 0, 1, 0);
    agent.set_pool_overrides(Some(20), Some(1), None).unwrap();
    agent.pool_step().await;
    assert_eq!(
        blocks_on_nic(&cloud),
        vec!["10.240.0.16/28", "10.240.0.32/28"]
    );
    let pod = agent.allocate(request("a")).await.unwrap().allocation;
    assert_eq!(pod.ip.to_string(), "10.240.0.16");
    agent.set_pool_overrides(Some(0), Some(1), None).unwrap();
    agent.pool_step().await;
    // The empty block went; the one with a pod stays, whole.
    assert_eq!(blocks_on_nic(&cloud), vec!["10.240.0.16/28"]);
    assert_eq!(agent.status().pool.total, 16);
    agent
        .release(ReleaseRequest {
            key: pod.key.clone(),
            dying_veth: None,
        })
        .await
        .unwrap();
    agent.pool_step().await;
    assert!(blocks_on_nic(&cloud).is_empty());
    assert_eq!(agent.status().pool.total, 0);
}

#[tokio::test]
async fn reconcile_adopts_a_block_and_drops_one_the_cloud_no_longer_shows() {
    let cloud = Arc::new(FakeCloud::new());
    let agent = prefix_agent(cloud.clone(), 0, 1, 30);
    cloud.add_external_block("10.240.1.0".parse().unwrap(), 28);
    agent.reconcile_with_cloud().await.unwrap();
    assert_eq!(agent.status().pool.total, 16);
    let pod = agent.allocate(request("a")).await.unwrap().allocation;
    assert_eq!(pod.ip.to_string(), "10.240.1.0");
    cloud.remove_external("10.240.1.0".parse().unwrap());
    let report = agent.reconcile_with_cloud().await.unwrap();
    assert_eq!(report.dropped.len(), 15);
    assert_eq!(report.unreconciled, vec![pod.ip]);
    assert_eq!(agent.status().pool.total, 0);
}

#[test]
fn in_prefix_mode_max_rounds_up_to_whole_blocks_and_the_nic_holds_255_blocks() {
    let settings = |max, prefix_len| pool::Settings {
        warm: 0,
        batch: 1,
        max,
        release_delay: Duration::ZERO,
        prefix_len,
    };
    assert_eq!(settings(250, 28).cap(), 256);
    assert_eq!(settings(4080, 28).cap(), 4080);
    assert_eq!(settings(5000, 28).cap(), 4080);
    assert_eq!(settings(250, 32).cap(), 250);
    assert_eq!(settings(300, 32).cap(), 255);
}
