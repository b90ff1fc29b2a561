//! When the pool task writes: a burst gathers into one write, and warm-pool top-ups step back
//! for nodes with pods waiting when the write budget is low. Tokio's paused clock drives the
//! gather window (the fake cloud is in-process: no sockets wait on the virtual clock).

use vnet_cloud::fake::FakeCloud;
use vnet_cloud::{ArmBudget, SecondaryIp};

use super::tests::{ready_agent, request, settings};
use super::*;
use crate::store::MemoryStore;

/// The fake cloud, reporting a remaining write budget set by the test.
#[derive(Default)]
struct BudgetCloud {
    fake: FakeCloud,
    remaining_writes: Mutex<Option<u64>>,
}

impl BudgetCloud {
    fn report(&self, remaining: u64) {
        *self.remaining_writes.lock().unwrap() = Some(remaining);
    }
}

#[async_trait::async_trait]
impl CloudProvider for BudgetCloud {
    async fn discover(&self) -> Result<NodeIdentity, CloudError> {
        self.fake.discover().await
    }
    async fn list_secondary_ips(&self, nic_id: &str) -> Result<Vec<SecondaryIp>, CloudError> {
        self.fake.list_secondary_ips(nic_id).await
    }
    async fn assign_ips(
        &self,
        nic_id: &str,
        subnet_id: &str,
        count: usize,
    ) -> Result<Vec<SecondaryIp>, CloudError> {
        self.fake.assign_ips(nic_id, subnet_id, count).await
    }
    async fn release_ips(&self, nic_id: &str, ips: &[Ipv4Addr]) -> Result<(), CloudError> {
        self.fake.release_ips(nic_id, ips).await
    }
    fn arm_budget(&self) -> Option<ArmBudget> {
        let remaining = *self.remaining_writes.lock().unwrap();
        remaining.map(|r| ArmBudget {
            remaining_writes: Some(r),
            ..ArmBudget::default()
        })
    }
}

fn agent(cloud: &Arc<BudgetCloud>, warm: u32, batch: u32) -> Arc<Agent> {
    let base = settings(&cloud.fake);
    let settings = AgentSettings {
        pool: pool::Settings {
            warm,
            batch,
            max: 250,
            ..base.pool
        },
        ..base
    };
    let identity = cloud.fake.identity().clone();
    ready_agent(
        settings,
        identity,
        cloud.clone(),
        Arc::new(MemoryStore::new()),
    )
}

fn spawn_allocations(
    agent: &Arc<Agent>,
    names: std::ops::Range<usize>,
) -> Vec<tokio::task::JoinHandle<Result<AllocateResponse, AgentError>>> {
    names
        .map(|i| {
            let agent = agent.clone();
            tokio::spawn(async move { agent.allocate(request(&format!("pod{i}"))).await })
        })
        .collect()
}

/// 100 ADDs on an empty pool, arriving in three waves 10 ms apart (well inside the quiet gap):
/// one cloud write sized to all of them. Before the gather window, the first ADD's write left
/// alone and the rest needed a second one.
#[tokio::test(start_paused = true)]
async fn a_burst_arriving_in_waves_is_served_by_one_write() {
    let cloud = Arc::new(BudgetCloud::default());
    let agent = agent(&cloud, 0, 8);
    let (stop, shutdown) = watch::channel(false);
    let pool_task = tokio::spawn(agent.clone().run_pool(shutdown));
    let mut tasks = spawn_allocations(&agent, 0..1);
    tokio::time::sleep(Duration::from_millis(10)).await;
    tasks.extend(spawn_allocations(&agent, 1..50));
    tokio::time::sleep(Duration::from_millis(10)).await;
    tasks.extend(spawn_allocations(&agent, 50..100));
    let mut ips = BTreeSet::new();
    for t in tasks {
        let ip = t.await.unwrap().expect("allocated").allocation.ip;
        assert!(ips.insert(ip), "{ip} handed out twice");
    }
    assert_eq!(cloud.fake.assign_calls(), 1, "one write for the burst");
    // Sized to the demand, rounded up to the batch.
    assert_eq!(agent.status().pool.total, 104);
    stop.send(true).unwrap();
    pool_task.await.unwrap();
}

/// Demand that keeps arriving cannot hold the write back for longer than the cap: a trickle
/// every 20 ms for two seconds is served by more than one write, and every ADD is served.
#[tokio::test(start_paused = true)]
async fn a_steady_trickle_does_not_hold_the_write_back_past_the_cap() {
    let cloud = Arc::new(BudgetCloud::default());
    let agent = agent(&cloud, 0, 1);
    let (stop, shutdown) = watch::channel(false);
    let pool_task = tokio::spawn(agent.clone().run_pool(shutdown));
    let mut tasks = Vec::new();
    let first = tokio::time::Instant::now();
    let mut first_write_by = None;
    for i in 0..100 {
        tasks.extend(spawn_allocations(&agent, i..i + 1));
        tokio::time::sleep(Duration::from_millis(20)).await;
        if first_write_by.is_none() && cloud.fake.assign_calls() > 0 {
            first_write_by = Some(first.elapsed());
        }
    }
    // The first write left within the cap of the first waiter (plus one 20 ms step of this
    // loop's sampling), while the trickle was still coming.
    let by = first_write_by.expect("a write left while the trickle went on");
    assert!(
        by <= pool::GATHER.max + Duration::from_millis(20),
        "the first write waited {by:?}, past the {:?} cap",
        pool::GATHER.max
    );
    for t in tasks {
        t.await.unwrap().expect("allocated");
    }
    assert!(
        cloud.fake.assign_calls() >= 2,
        "{}",
        cloud.fake.assign_calls()
    );
    stop.send(true).unwrap();
    pool_task.await.unwrap();
}

/// With the write budget low, a warm-pool top-up (nobody waiting) does not write; a growth for
/// a waiting ADD does, at once, with the same budget.
#[tokio::test(start_paused = true)]
async fn a_top_up_yields_on_a_low_write_budget_while_a_waiter_driven_grow_proceeds() {
    let cloud = Arc::new(BudgetCloud::default());
    let agent = agent(&cloud, 8, 8);
    // A healthy budget: the warm pool fills.
    cloud.report(190);
    agent.pool_step().await;
    assert_eq!(cloud.fake.assign_calls(), 1);
    assert_eq!(agent.status().pool.free, 8);

    // A pod takes an address: the pool is one below warm. Budget low (10 of ~191): the top-up
    // yields, on this step and the next.
    agent.allocate(request("a")).await.unwrap();
    cloud.report(10);
    agent.pool_step().await;
    agent.pool_step().await;
    assert_eq!(cloud.fake.assign_calls(), 1, "the top-up yielded");
    assert_eq!(agent.status().pool.free, 7);

    // Eight more pods: seven take free addresses, the eighth waits; its growth goes now.
    let mut tasks = spawn_allocations(&agent, 0..8);
    while agent.state.lock().unwrap().waiters == 0 {
        tokio::task::yield_now().await;
    }
    agent.pool_step().await;
    assert_eq!(
        cloud.fake.assign_calls(),
        2,
        "the waiter's growth went ahead"
    );
    for t in tasks.drain(..) {
        t.await.unwrap().expect("allocated");
    }
}

/// A scale-out on a warm node: the first pods take the warm addresses and trigger a top-up while
/// the rest of the burst is a moment behind. The top-up gathers too, so one write serves the
/// burst; before, it left with `warm` addresses and the rest waited for a second write.
#[tokio::test(start_paused = true)]
async fn a_top_up_triggered_by_a_burst_gathers_the_rest_of_it() {
    let cloud = Arc::new(BudgetCloud::default());
    let agent = agent(&cloud, 8, 8);
    agent.pool_step().await;
    assert_eq!(cloud.fake.assign_calls(), 1);
    assert_eq!(agent.status().pool.free, 8);
    let (stop, shutdown) = watch::channel(false);
    let pool_task = tokio::spawn(agent.clone().run_pool(shutdown));
    let mut tasks = spawn_allocations(&agent, 0..8);
    for t in tasks.drain(..) {
        t.await.unwrap().expect("served from the warm pool");
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    tasks.extend(spawn_allocations(&agent, 8..30));
    let mut ips = BTreeSet::new();
    for t in tasks {
        let ip = t.await.unwrap().expect("allocated").allocation.ip;
        assert!(ips.insert(ip), "{ip} handed out twice");
    }
    assert_eq!(
        cloud.fake.assign_calls(),
        2,
        "the warm fill, then one write for the rest of the burst"
    );
    stop.send(true).unwrap();
    pool_task.await.unwrap();
}
