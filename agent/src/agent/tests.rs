use std::sync::atomic::AtomicUsize;

use async_trait::async_trait;
use vnet_cloud::SecondaryIp;
use vnet_cloud::fake::FakeCloud;

use super::*;
use crate::store::MemoryStore;

/// The fake cloud, plus the two ways a release can go wrong: the write lands but the answer
/// is an error, and the NIC cannot be read.
#[derive(Default)]
struct FlakyCloud {
    fake: FakeCloud,
    /// The next release writes, then reports an error.
    release_lands_then_fails: AtomicBool,
    /// The next release fails without writing.
    release_fails: AtomicBool,
    /// The next reads fail.
    list_failures: AtomicUsize,
    list_calls: AtomicUsize,
    /// When set, every assignment waits for a permit (an ARM write in flight).
    assign_gate: Option<Arc<tokio::sync::Semaphore>>,
}

#[async_trait]
impl CloudProvider for FlakyCloud {
    async fn discover(&self) -> Result<NodeIdentity, CloudError> {
        self.fake.discover().await
    }

    async fn list_secondary_ips(&self, nic_id: &str) -> Result<Vec<SecondaryIp>, CloudError> {
        self.list_calls.fetch_add(1, Ordering::SeqCst);
        if self
            .list_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(CloudError::Transient("read failed".into()));
        }
        self.fake.list_secondary_ips(nic_id).await
    }

    async fn assign_ips(
        &self,
        nic_id: &str,
        subnet_id: &str,
        count: usize,
    ) -> Result<Vec<SecondaryIp>, CloudError> {
        if let Some(gate) = &self.assign_gate {
            gate.acquire().await.unwrap().forget();
        }
        self.fake.assign_ips(nic_id, subnet_id, count).await
    }

    async fn release_ips(&self, nic_id: &str, ips: &[Ipv4Addr]) -> Result<(), CloudError> {
        if self.release_fails.swap(false, Ordering::SeqCst) {
            return Err(CloudError::Transient("release failed".into()));
        }
        let result = self.fake.release_ips(nic_id, ips).await;
        if self.release_lands_then_fails.swap(false, Ordering::SeqCst) {
            return Err(CloudError::Transient("answer lost".into()));
        }
        result
    }
}

/// Settings for the agent's unit tests (every test module here starts from them).
pub(super) fn settings(cloud: &FakeCloud) -> AgentSettings {
    AgentSettings {
        node_name: "node-1".into(),
        pool: pool::Settings {
            warm: 0,
            batch: 1,
            max: 10,
            release_delay: Duration::from_secs(3600),
            prefix_len: 32,
        },
        cooldown_secs: 30,
        allocate_timeout: Duration::from_secs(30),
        host_veth_prefix: "vnet".into(),
        mtu: 1500,
        subnet_id: cloud.identity().subnet_id.clone(),
        spool_dir: None,
    }
}

fn agent_with(cloud: Arc<FlakyCloud>, store: Arc<MemoryStore>) -> Arc<Agent> {
    agent_with_settings(cloud.clone(), store, settings(&cloud.fake))
}

fn agent_with_settings(
    cloud: Arc<FlakyCloud>,
    store: Arc<MemoryStore>,
    settings: AgentSettings,
) -> Arc<Agent> {
    let identity = cloud.fake.identity().clone();
    ready_agent(settings, identity, cloud, store)
}

/// A ready agent with an empty state (shared by the test modules).
pub(super) fn ready_agent(
    settings: AgentSettings,
    identity: NodeIdentity,
    cloud: Arc<dyn CloudProvider>,
    store: Arc<dyn Store>,
) -> Arc<Agent> {
    let agent = Agent::new(
        settings,
        identity,
        cloud,
        store,
        StoreState::default(),
        Arc::new(Metrics::new()),
    );
    agent.set_ready(true);
    agent
}

pub(super) fn request(id: &str) -> AllocateRequest {
    AllocateRequest {
        key: format!("{id}/eth0").parse().unwrap(),
        network: None,
        netns: None,
        pod: Default::default(),
    }
}

/// Puts `n` addresses on the NIC and in the pool, then takes `take` of them for release.
async fn pool_with_releasing(
    agent: &Agent,
    cloud: &FlakyCloud,
    n: usize,
    take: u32,
) -> Vec<Ipv4Addr> {
    let nic = &cloud.fake.identity().nic_id;
    let subnet = cloud.fake.identity().subnet_id.clone();
    let assigned = cloud.fake.assign_ips(nic, &subnet, n).await.unwrap();
    let ips: Vec<Ipv4Addr> = assigned.iter().map(|s| s.ip).collect();
    let mut st = agent.state.lock().unwrap();
    let records: Vec<_> = st.ipam.add_to_pool(&ips).into_iter().collect();
    let _ = agent.store.submit(records);
    let (taken, record) = st.ipam.take_for_release(take);
    let _ = agent.store.submit(record.into_iter().collect());
    taken
}

#[tokio::test]
async fn a_failed_release_still_on_the_nic_returns_to_the_pool() {
    let cloud = Arc::new(FlakyCloud::default());
    let store = Arc::new(MemoryStore::new());
    let agent = agent_with(cloud.clone(), store.clone());
    let taken = pool_with_releasing(&agent, &cloud, 2, 1).await;
    cloud.release_fails.store(true, Ordering::SeqCst);
    agent.finish_release(taken.clone()).await;
    assert!(cloud.fake.secondary_ips().contains(&taken[0]));
    let st = agent.state.lock().unwrap();
    assert!(st.ipam.releasing().is_empty());
    assert!(st.ipam.pool().contains(&taken[0]));
    assert_eq!(st.ipam.counts().free, 2);
    st.ipam.check();
    assert!(store.state().pool.contains(&taken[0]));
    assert!(store.state().releasing.is_empty());
}

#[tokio::test]
async fn a_failed_release_that_landed_anyway_is_done_and_never_reused() {
    let cloud = Arc::new(FlakyCloud::default());
    let store = Arc::new(MemoryStore::new());
    let agent = agent_with(cloud.clone(), store.clone());
    let taken = pool_with_releasing(&agent, &cloud, 2, 1).await;
    cloud.release_lands_then_fails.store(true, Ordering::SeqCst);
    agent.finish_release(taken.clone()).await;
    assert!(!cloud.fake.secondary_ips().contains(&taken[0]));
    {
        let st = agent.state.lock().unwrap();
        assert!(st.ipam.releasing().is_empty());
        assert!(!st.ipam.pool().contains(&taken[0]));
        assert_eq!(st.ipam.counts().free, 1);
        st.ipam.check();
    }
    let durable = store.state();
    assert!(!durable.pool.contains(&taken[0]) && !durable.releasing.contains(&taken[0]));
    // An allocation gets the address left, never the released one.
    let a = agent.allocate(request("a")).await.unwrap();
    assert_ne!(a.allocation.ip, taken[0]);
}

#[tokio::test]
async fn a_failed_release_with_an_unreadable_nic_stays_releasing_and_backs_off() {
    let cloud = Arc::new(FlakyCloud::default());
    let store = Arc::new(MemoryStore::new());
    let agent = agent_with(cloud.clone(), store.clone());
    let taken = pool_with_releasing(&agent, &cloud, 2, 1).await;
    cloud.release_fails.store(true, Ordering::SeqCst);
    cloud.list_failures.store(1, Ordering::SeqCst);
    agent.finish_release(taken.clone()).await;
    {
        let st = agent.state.lock().unwrap();
        assert_eq!(st.ipam.releasing(), taken, "neither reused nor forgotten");
        assert_eq!(st.ipam.counts().free, 1);
        st.ipam.check();
    }
    assert_eq!(store.state().releasing, taken.iter().copied().collect());
    // The next pool steps do not call the cloud again during the back-off.
    let releases = cloud.fake.release_calls();
    agent.pool_step().await;
    agent.pool_step().await;
    assert_eq!(cloud.fake.release_calls(), releases);
    // Once the back-off is over the release is finished.
    agent.state.lock().unwrap().release_retry_at = Some(Instant::now());
    agent.pool_step().await;
    assert!(agent.state.lock().unwrap().ipam.releasing().is_empty());
    assert!(!cloud.fake.secondary_ips().contains(&taken[0]));
    assert!(store.state().releasing.is_empty());
}

#[tokio::test]
async fn a_cancelled_waiting_allocation_does_not_leak_its_waiter() {
    let cloud = Arc::new(FlakyCloud::default());
    let agent = agent_with(cloud, Arc::new(MemoryStore::new()));
    // Nothing in the pool and no pool task: the allocation waits. The client gives up
    // (plugin killed, connection closed) and the server drops the handler future.
    let mut allocation = Box::pin(agent.allocate(request("abc")));
    assert!(
        futures::poll!(allocation.as_mut()).is_pending(),
        "the allocation waits"
    );
    assert_eq!(agent.state.lock().unwrap().waiters, 1);
    drop(allocation);
    assert_eq!(agent.state.lock().unwrap().waiters, 0, "waiter leaked");
}

#[tokio::test]
async fn a_spooled_release_is_applied_before_the_same_attachment_allocates_again() {
    let spool = tempfile::tempdir().unwrap();
    let cloud = Arc::new(FlakyCloud::default());
    let store = Arc::new(MemoryStore::new());
    let settings = AgentSettings {
        spool_dir: Some(spool.path().to_owned()),
        ..settings(&cloud.fake)
    };
    let agent = agent_with_settings(cloud.clone(), store.clone(), settings);
    pool_with_releasing(&agent, &cloud, 2, 0).await;
    let first = agent.allocate(request("abc")).await.unwrap().allocation;
    // DEL while the agent was unreachable: the plugin spooled the release. The runtime then
    // runs ADD for the same attachment again.
    let spooled = spool
        .path()
        .join(vnet_api::spool_file_name(&request("abc").key));
    let release = ReleaseRequest {
        key: request("abc").key,
        dying_veth: None,
    };
    std::fs::write(&spooled, serde_json::to_vec(&release).unwrap()).unwrap();
    let second = agent.allocate(request("abc")).await.unwrap().allocation;
    assert_ne!(
        second.ip, first.ip,
        "the old address is released (cooling down), not handed back"
    );
    assert!(!spooled.exists(), "the applied release's file is deleted");
    // The periodic drain finds nothing that could free the new allocation.
    assert_eq!(crate::daemon::drain_spool(&agent, spool.path()).await, 0);
    assert_eq!(agent.allocations(), vec![second.clone()]);
    let durable = store.state();
    assert_eq!(durable.allocations[&second.key].ip, second.ip);
    assert!(durable.cooldown.contains_key(&first.ip));
}

#[tokio::test]
async fn a_drain_that_listed_a_file_an_allocation_consumed_applies_nothing() {
    let spool = tempfile::tempdir().unwrap();
    let cloud = Arc::new(FlakyCloud::default());
    let settings = AgentSettings {
        spool_dir: Some(spool.path().to_owned()),
        ..settings(&cloud.fake)
    };
    let agent = agent_with_settings(cloud.clone(), Arc::new(MemoryStore::new()), settings);
    pool_with_releasing(&agent, &cloud, 2, 0).await;
    agent.allocate(request("abc")).await.unwrap();
    let spooled = spool
        .path()
        .join(vnet_api::spool_file_name(&request("abc").key));
    let release = ReleaseRequest {
        key: request("abc").key,
        dying_veth: None,
    };
    std::fs::write(&spooled, serde_json::to_vec(&release).unwrap()).unwrap();
    let listed = crate::spool::read_spool(spool.path()).unwrap();
    let fresh = agent.allocate(request("abc")).await.unwrap().allocation;
    // The drain goes on with what it listed before the allocation.
    for entry in listed {
        assert!(!agent.apply_spool_file(&entry.path).await.unwrap());
    }
    assert_eq!(agent.allocations(), vec![fresh]);
}

#[tokio::test]
async fn a_release_whose_write_fails_still_hands_its_veth_to_the_reaper() {
    let cloud = Arc::new(FlakyCloud::default());
    let store = Arc::new(MemoryStore::new());
    let agent = agent_with(cloud.clone(), store.clone());
    let links = Arc::new(crate::netlink::FakeLinks::default());
    let tombstone = vnet_api::tombstone_veth_name("vnet0123456789a");
    links.links.lock().unwrap().insert(tombstone.clone());
    tokio::spawn(agent.clone().run_reaper(links.clone()));
    pool_with_releasing(&agent, &cloud, 1, 0).await;
    agent.allocate(request("abc")).await.unwrap();
    store.fail_next(1);
    let result = agent
        .release(ReleaseRequest {
            key: request("abc").key,
            dying_veth: Some(tombstone.clone()),
        })
        .await;
    assert!(matches!(result, Err(AgentError::Internal(_))), "{result:?}");
    assert!(!agent.is_ready(), "a failed store write stops allocations");
    for _ in 0..1_000 {
        if links.deleted.lock().unwrap().contains(&tombstone) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        links.deleted.lock().unwrap().contains(&tombstone),
        "the tombstone is deleted"
    );
}

#[tokio::test]
async fn shutting_down_fails_waiting_allocations_at_once() {
    let cloud = Arc::new(FlakyCloud::default());
    let agent = agent_with(cloud, Arc::new(MemoryStore::new()));
    let mut allocation = Box::pin(agent.allocate(request("abc")));
    assert!(futures::poll!(allocation.as_mut()).is_pending());
    agent.stop_waiting();
    let err = allocation.await.unwrap_err();
    assert!(
        matches!(&err, AgentError::TryAgainLater(m) if m.contains("shutting down")),
        "{err:?}"
    );
    assert_eq!(agent.state.lock().unwrap().waiters, 0);
}

/// A scale-set instance reimaged under running pods: its ipConfigurations are gone. The pod's
/// address is kept (unreconciled, in the status), never handed to another pod, and counted as
/// lost; when the cloud gives the same address back it stays the old pod's.
#[tokio::test]
async fn addresses_a_reimage_takes_off_the_nic_are_reported_and_never_handed_out_twice() {
    let cloud = Arc::new(FlakyCloud::default());
    let store = Arc::new(MemoryStore::new());
    let agent = agent_with(cloud.clone(), store.clone());
    let pool = pool_with_releasing(&agent, &cloud, 2, 0).await;
    assert!(pool.is_empty());
    let held = agent.allocate(request("a")).await.unwrap().allocation.ip;
    let spare = *cloud
        .fake
        .secondary_ips()
        .iter()
        .find(|ip| **ip != held)
        .unwrap();
    assert_eq!(agent.status().pool.free, 1);

    // The reimage: every secondary address leaves the NIC at once.
    cloud.fake.remove_external(held);
    cloud.fake.remove_external(spare);
    agent.reconcile_with_cloud().await.unwrap();
    let status = agent.status();
    assert_eq!(status.unreconciled, vec![held]);
    assert_eq!(status.pool.free, 0);
    let metrics = agent.metrics.encode();
    assert!(
        metrics.contains("vnet_agent_addresses_lost_total{state=\"allocated\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("vnet_agent_addresses_lost_total{state=\"free\"} 1"));
    assert!(metrics.contains("vnet_agent_node_info{kind=\"vm\",scale_set=\"\"} 1"));

    // The cloud hands the pod's old address back: recovered for the pod that holds it.
    cloud.fake.add_external(held);
    cloud.fake.add_external(spare);
    agent.reconcile_with_cloud().await.unwrap();
    assert!(agent.status().unreconciled.is_empty());
    assert_eq!(agent.status().pool.free, 1);
    let b = agent.allocate(request("b")).await.unwrap().allocation.ip;
    assert_ne!(b, held);
    agent.state.lock().unwrap().ipam.check();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_the_max_allocations_wait_for_pending_addresses() {
    // Regression: with max = 4, warm = 2, batch = 2, after two ADDs (total 2, allocated 2,
    // pending 2) the next ADDs were refused at once as "exhausted".
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let cloud = Arc::new(FlakyCloud {
        assign_gate: Some(gate.clone()),
        ..Default::default()
    });
    let mut settings = settings(&cloud.fake);
    settings.pool.warm = 2;
    settings.pool.batch = 2;
    settings.pool.max = 4;
    let agent = agent_with_settings(cloud.clone(), Arc::new(MemoryStore::new()), settings);
    // The warm pool, already there (put on the NIC past the gate).
    pool_with_releasing(&agent, &cloud, 2, 0).await;
    let (stop, shutdown) = watch::channel(false);
    let pool_task = tokio::spawn(agent.clone().run_pool(shutdown));
    agent.allocate(request("a")).await.unwrap();
    agent.allocate(request("b")).await.unwrap();
    // The pool asks for two more; that write is in flight.
    for _ in 0..1_000 {
        if agent.status().pool.pending == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pool = agent.status().pool;
    assert_eq!((pool.total, pool.allocated, pool.pending), (2, 2, 2));
    let waiting: Vec<_> = ["c", "d", "e"]
        .into_iter()
        .map(|id| {
            let agent = agent.clone();
            tokio::spawn(async move { agent.allocate(request(id)).await })
        })
        .collect();
    for _ in 0..1_000 {
        if agent.state.lock().unwrap().waiters == 3 {
            break;
        }
        if waiting.iter().any(|t| t.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        waiting.iter().all(|t| !t.is_finished()),
        "an ADD was answered while two addresses were on their way"
    );
    // The write lands: two ADDs get the new addresses; the third is now truly exhausted.
    gate.add_permits(1);
    let mut served = 0;
    let mut exhausted = 0;
    for t in waiting {
        match t.await.unwrap() {
            Ok(_) => served += 1,
            Err(AgentError::Exhausted(_)) => exhausted += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!((served, exhausted), (2, 1));
    let _ = stop.send(true);
    pool_task.await.unwrap();
}

#[tokio::test]
async fn a_failed_store_write_is_recovered_in_process() {
    let cloud = Arc::new(FlakyCloud::default());
    let store = Arc::new(MemoryStore::new());
    let agent = agent_with(cloud.clone(), store.clone());
    pool_with_releasing(&agent, &cloud, 3, 0).await;
    let kept = agent.allocate(request("a")).await.unwrap().allocation;
    store.fail_next(1);
    let err = agent.allocate(request("b")).await.unwrap_err();
    assert!(matches!(err, AgentError::Internal(_)), "{err:?}");
    assert!(!agent.is_ready());
    assert!(agent.recover_store().await);
    assert!(agent.is_ready(), "allocating again");
    // Memory is what the store holds: the refused allocation is forgotten, the kept one stays.
    assert_eq!(agent.allocations(), vec![kept]);
    let b = agent.allocate(request("b")).await.unwrap().allocation;
    assert_eq!(store.state().allocations[&b.key].ip, b.ip);
    agent.state.lock().unwrap().ipam.check();
}

#[tokio::test]
async fn a_release_answers_once_its_veth_is_deleted_and_concurrent_ones_share_a_request() {
    let cloud = Arc::new(FlakyCloud::default());
    let store = Arc::new(MemoryStore::new());
    let agent = agent_with(cloud.clone(), store.clone());
    let links = Arc::new(crate::netlink::FakeLinks::default());
    // Each request to the kernel takes a while, as deleting veths does.
    *links.batch_delay.lock().unwrap() = Duration::from_millis(50);
    tokio::spawn(agent.clone().run_reaper(links.clone()));
    pool_with_releasing(&agent, &cloud, 13, 0).await;
    let ids: Vec<String> = (0..12).map(|i| format!("pod{i}")).collect();
    let mut tombstones = Vec::new();
    for id in &ids {
        agent.allocate(request(id)).await.unwrap();
        let t = vnet_api::tombstone_veth_name(&vnet_api::host_veth_name("vnet", &request(id).key));
        links.links.lock().unwrap().insert(t.clone());
        tombstones.push(t);
    }
    let releases = ids.iter().zip(&tombstones).map(|(id, t)| {
        let agent = agent.clone();
        let links = links.clone();
        let (key, t) = (request(id).key, t.clone());
        async move {
            let resp = agent
                .release(ReleaseRequest {
                    key,
                    dying_veth: Some(t.clone()),
                })
                .await
                .unwrap();
            // When the answer comes, the link is gone.
            (
                resp.dying_veth_deleted,
                links.links.lock().unwrap().contains(&t),
            )
        }
    });
    let answers = futures::future::join_all(releases).await;
    assert!(
        answers
            .iter()
            .all(|&(deleted, still_there)| deleted && !still_there),
        "{answers:?}"
    );
    let batches = links.batches.lock().unwrap().clone();
    assert!(
        batches.len() < ids.len(),
        "12 concurrent deletions took {} requests: {batches:?}",
        batches.len()
    );
    assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), ids.len());

    // A deletion that fails: answered at once with `dying_veth_deleted` false (the plugin then
    // deletes the link itself); the reaper keeps retrying and the address stays held.
    *links.batch_delay.lock().unwrap() = Duration::ZERO;
    links.busy.store(true, Ordering::SeqCst);
    agent.allocate(request("busy")).await.unwrap();
    let t = vnet_api::tombstone_veth_name("vnetbusy0000000");
    links.links.lock().unwrap().insert(t.clone());
    let resp = agent
        .release(ReleaseRequest {
            key: request("busy").key,
            dying_veth: Some(t),
        })
        .await
        .unwrap();
    assert!(!resp.dying_veth_deleted);
    assert!(resp.released.is_some());
}
