//! The agent drains the release spool whatever the file names look like: the plain
//! `<container id>:<ifname>.json` and the hashed form `vnet_api::spool_file_name` gives container
//! IDs too long for a file name (the plugin writes exactly that name).

mod common;

use std::sync::Arc;

use common::*;
use vnet_cloud::fake::FakeCloud;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_releases_of_short_and_500_byte_container_ids_are_drained() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Arc::new(FakeCloud::new());
    let mut config = test_config(dir.path());
    config.pool.warm = 2;
    config.pool.batch = 2;
    let long = format!("c{}", "0123456789abcdef".repeat(32))[..500].to_owned();

    let agent = TestAgent::start(config.clone(), cloud.clone()).await;
    for id in ["short", long.as_str()] {
        agent.client.allocate(&alloc_req(id)).await.unwrap();
    }
    agent.stop().await;

    // Both DELs happen with the agent down: the plugin spools them.
    let spool = config.spool_dir();
    std::fs::create_dir_all(&spool).unwrap();
    let mut files = Vec::new();
    for id in ["short", long.as_str()] {
        let path = spool.join(vnet_api::spool_file_name(&key(id)));
        std::fs::write(&path, serde_json::to_vec(&release_req(id)).unwrap()).unwrap();
        files.push(path);
    }
    assert!(files[1].file_name().unwrap().len() < 255);
    assert_eq!(files[0].file_name().unwrap(), "short:eth0.json");

    let agent = TestAgent::start(config, cloud).await;
    let left = agent.client.allocations().await.unwrap().allocations;
    assert!(left.is_empty(), "spooled releases not applied: {left:?}");
    for f in &files {
        assert!(!f.exists(), "{} not drained", f.display());
    }
    // And the long ID allocates again (its spooled release was applied first, not later).
    let again = agent.client.allocate(&alloc_req(&long)).await.unwrap();
    assert_eq!(again.allocation.key, key(&long));
    agent.stop().await;
}
