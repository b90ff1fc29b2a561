//! ClusterProvider against the fake API server (as the agent's ServiceAccount: it must need no
//! more than the agent's ClusterRole grants), with a scripted allocator answering in the fake.

mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use support::{FakeApi, NODES, POOLS};
use tokio::sync::Notify;
use vnet_cloud::{CloudError, CloudProvider, InstanceMetadata};
use vnet_kube::{
    CloudAnswer, CloudErrorRef, CloudRequest, ClusterProvider, ClusterSettings, IdentityRef,
    InstanceSource, NodeIPPool, SecondaryIpRef,
};

const NODE: &str = "node-1";
const SUBNET: &str =
    "/subscriptions/s/resourceGroups/g/providers/Microsoft.Network/virtualNetworks/v/subnets/nodes";

fn instance() -> InstanceMetadata {
    InstanceMetadata {
        vm_id: "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/virtualMachines/vm-1"
            .into(),
        vm_name: "vm-1".into(),
        computer_name: NODE.into(),
        ..InstanceMetadata::default()
    }
}

fn identity() -> IdentityRef {
    IdentityRef {
        vm_name: "vm-1".into(),
        vm_id: instance().vm_id,
        nic_id:
            "/subscriptions/s/resourceGroups/g/providers/Microsoft.Network/networkInterfaces/nic-1"
                .into(),
        mac: "00:0d:3a:00:00:01".into(),
        primary_ip: "10.0.0.4".into(),
        subnet_id: SUBNET.into(),
        subnet_prefix: "10.0.0.0/16".into(),
        vnet_address_space: vec!["10.0.0.0/8".into()],
        kind: "vm".into(),
        scale_set: String::new(),
        computer_name: NODE.into(),
    }
}

/// How the scripted allocator answers a request that asks for more than the NIC holds.
#[derive(Clone, Debug, PartialEq)]
enum Mode {
    /// Brings the NIC to the request.
    Serve,
    /// Answers with this error code (the NIC unchanged).
    Fail(&'static str),
    /// Never answers (a dead or overloaded allocator).
    Silent,
    /// Waits for `Script::gate` before answering a release.
    GateReleases,
    /// Answers a release with `busy`, the NIC unchanged.
    RefuseReleases,
    /// Waits for `Script::gate` before answering an ask, then acts on the latest request (as
    /// the allocator does when a node's turn comes).
    HoldAsks,
}

#[derive(Default)]
struct Nic {
    entries: Vec<SecondaryIpRef>,
    /// Names are never given twice (Azure's are random).
    next: u32,
    /// Released single addresses (`10.0.1.<n>`): handed out again first, lowest first, as Azure
    /// and the mock do.
    free: BTreeSet<u32>,
    /// Highest single address handed out.
    top: u32,
}

/// The allocator's side, scripted: it answers in `status.cloud` through the fake's store (no API
/// call of its own, so its permissions are not the agent's question).
struct Script {
    mode: Mutex<Mode>,
    gate: Notify,
    nic: Mutex<Nic>,
    /// Every request generation the allocator saw.
    seen: Mutex<BTreeSet<u64>>,
}

impl Script {
    fn answer(&self, request: &CloudRequest) -> Option<CloudAnswer> {
        let mut nic = self.nic.lock().unwrap();
        let mode = self.mode.lock().unwrap().clone();
        let release: BTreeSet<&str> = request.release.iter().map(String::as_str).collect();
        if mode == Mode::RefuseReleases && !release.is_empty() {
            return Some(CloudAnswer {
                observed_generation: request.generation,
                identity: Some(identity()),
                secondary_ips: nic.entries.clone(),
                error: Some(CloudErrorRef {
                    code: "busy".into(),
                    message: "AnotherOperationInProgress".into(),
                    retry_after_seconds: Some(3),
                }),
                updated: "2026-12-01T00:00:00Z".into(),
            });
        }
        // By name (the contract), or by address as the first contract had it: the tests check
        // what the provider writes, and an address there shows its danger (a reused address).
        let named = |e: &SecondaryIpRef| {
            release.contains(e.name.as_str()) || release.contains(e.ip.as_str())
        };
        let gone: Vec<SecondaryIpRef> = nic.entries.iter().filter(|e| named(e)).cloned().collect();
        for e in &gone {
            if e.prefix_length == 32 {
                let n = e.ip.rsplit('.').next().unwrap().parse().unwrap();
                nic.free.insert(n);
            }
        }
        nic.entries.retain(|e| !named(e));
        let singles = nic.entries.iter().filter(|e| e.prefix_length == 32).count() as u32;
        let blocks = nic.entries.len() as u32 - singles;
        let wants_more = request.addresses > singles || request.blocks > blocks;
        let mut error = None;
        if wants_more {
            match mode {
                Mode::Silent => return None,
                Mode::Fail(code) => {
                    error = Some(CloudErrorRef {
                        code: code.into(),
                        message: "scripted".into(),
                        retry_after_seconds: None,
                    })
                }
                Mode::Serve | Mode::GateReleases | Mode::RefuseReleases | Mode::HoldAsks => {
                    for _ in singles..request.addresses {
                        nic.next += 1;
                        let name = format!("vnet-cni-{}", nic.next);
                        let n = match nic.free.pop_first() {
                            Some(n) => n,
                            None => {
                                nic.top += 1;
                                nic.top
                            }
                        };
                        nic.entries.push(SecondaryIpRef {
                            name,
                            ip: format!("10.0.1.{n}"),
                            prefix_length: 32,
                        });
                    }
                    for _ in blocks..request.blocks {
                        nic.next += 1;
                        let n = nic.next;
                        nic.entries.push(SecondaryIpRef {
                            name: format!("vnet-cni-b{n}"),
                            ip: format!("10.0.{}.0", 100 + n),
                            prefix_length: 28,
                        });
                    }
                }
            }
        }
        Some(CloudAnswer {
            observed_generation: request.generation,
            identity: Some(identity()),
            secondary_ips: nic.entries.clone(),
            error,
            updated: "2026-12-01T00:00:00Z".into(),
        })
    }
}

fn write_answer(fake: &FakeApi, answer: &CloudAnswer) {
    // One synchronous get-modify-put: nothing else runs in between on this test's runtime.
    let mut pool = fake.get(POOLS, NODE).expect("the pool exists");
    pool["status"]["cloud"] = serde_json::to_value(answer).unwrap();
    fake.put(POOLS, pool);
}

/// Starts the scripted allocator: it watches the pool and answers each new generation.
fn allocator(fake: &FakeApi, mode: Mode) -> Arc<Script> {
    let script = Arc::new(Script {
        mode: Mutex::new(mode),
        gate: Notify::new(),
        nic: Mutex::new(Nic::default()),
        seen: Mutex::new(BTreeSet::new()),
    });
    let (fake, s) = (fake.clone(), script.clone());
    tokio::spawn(async move {
        let api: Api<NodeIPPool> = Api::all(fake.client());
        let mut events = std::pin::pin!(watcher(api, watcher::Config::default()).applied_objects());
        let mut answered = 0;
        while let Some(Ok(pool)) = events.next().await {
            let Some(request) = pool.status.and_then(|s| s.cloud_request) else {
                continue;
            };
            if request.generation <= answered {
                continue;
            }
            s.seen.lock().unwrap().insert(request.generation);
            let mode = s.mode.lock().unwrap().clone();
            let gated = (mode == Mode::GateReleases && !request.release.is_empty())
                || (mode == Mode::HoldAsks && request.addresses > 0);
            let request = if gated {
                s.gate.notified().await;
                stored_request(&fake)
            } else {
                request
            };
            if request.generation <= answered {
                continue;
            }
            if let Some(answer) = s.answer(&request) {
                answered = request.generation;
                write_answer(&fake, &answer);
            }
        }
    });
    script
}

fn fake_with_node() -> FakeApi {
    let fake = FakeApi::default();
    fake.put(
        NODES,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE, "uid": "uid-node-1"}}),
    );
    fake
}

fn provider(fake: &FakeApi, timeout: Duration) -> ClusterProvider {
    ClusterProvider::new(
        fake.client(),
        InstanceSource::Known(instance()),
        Box::new(|m| Ok(m.computer_name.clone())),
        ClusterSettings {
            answer_timeout: timeout,
        },
    )
}

fn stored_request(fake: &FakeApi) -> CloudRequest {
    let pool: Value = fake.get(POOLS, NODE).unwrap();
    serde_json::from_value(pool["status"]["cloudRequest"].clone()).unwrap()
}

fn request_writes(fake: &FakeApi) -> usize {
    fake.requests()
        .iter()
        .filter(|r| r.starts_with("PATCH ") && r.ends_with(&format!("/{NODE}/status")))
        .count()
}

const LONG: Duration = Duration::from_secs(60);

/// Lets the other tasks run until `done` (bounded: a change that never comes fails the test).
async fn until(done: impl Fn() -> bool, what: &str) {
    for _ in 0..10_000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("never happened: {what}");
}

#[tokio::test(start_paused = true)]
async fn discovery_creates_the_pool_asks_with_imds_facts_and_returns_the_allocators_identity() {
    let fake = fake_with_node();
    allocator(&fake, Mode::Serve);
    let p = provider(&fake, LONG);
    let id = p.discover().await.unwrap();
    assert_eq!(id.nic_id, identity().nic_id);
    assert_eq!(id.subnet_id, SUBNET);
    let pool = fake.get(POOLS, NODE).expect("created by the provider");
    assert_eq!(pool["metadata"]["ownerReferences"][0]["name"], NODE);
    let request = stored_request(&fake);
    assert_eq!(request.instance.vm_id, instance().vm_id);
    assert!(p.list_secondary_ips(&id.nic_id).await.unwrap().is_empty());
    // Everything it did is in the agent's ClusterRole (the fake answers 403 otherwise).
    let used = fake.authorizations();
    for needed in used {
        assert!(
            vnet_fakeapi::granted_by(vnet_fakeapi::AGENT_ROLE).contains(&needed),
            "{needed}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn assign_returns_exactly_the_new_entries() {
    let fake = fake_with_node();
    allocator(&fake, Mode::Serve);
    let p = provider(&fake, LONG);
    let id = p.discover().await.unwrap();
    let first = p.assign_ips(&id.nic_id, SUBNET, 3).await.unwrap();
    assert_eq!(first.len(), 3);
    let second = p.assign_ips(&id.nic_id, SUBNET, 2).await.unwrap();
    assert_eq!(second.len(), 2);
    let names: BTreeSet<String> = first
        .iter()
        .chain(&second)
        .map(|e| e.name.clone())
        .collect();
    assert_eq!(names.len(), 5, "no entry returned twice");
    let blocks = p.assign_blocks(&id.nic_id, SUBNET, 1, 28).await.unwrap();
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].prefix_len, 28);
    assert_eq!(p.list_secondary_ips(&id.nic_id).await.unwrap().len(), 6);
    let request = stored_request(&fake);
    assert_eq!((request.addresses, request.blocks), (5, 1));
    assert_eq!(request.block_prefix_length, Some(28));
}

#[tokio::test(start_paused = true)]
async fn concurrent_assigns_coalesce_into_one_generation() {
    let fake = fake_with_node();
    let script = allocator(&fake, Mode::Serve);
    let p = provider(&fake, LONG);
    let id = p.discover().await.unwrap();
    let writes = request_writes(&fake);
    let generations = script.seen.lock().unwrap().len();
    let (a, b) = tokio::join!(
        p.assign_ips(&id.nic_id, SUBNET, 2),
        p.assign_ips(&id.nic_id, SUBNET, 3)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((a.len(), b.len()), (2, 3));
    assert!(
        a.iter().all(|e| !b.contains(e)),
        "each caller gets its own entries"
    );
    assert_eq!(
        request_writes(&fake) - writes,
        1,
        "one request write for both"
    );
    assert_eq!(
        script.seen.lock().unwrap().len() - generations,
        1,
        "one generation"
    );
    assert_eq!(stored_request(&fake).addresses, 5);
}

#[tokio::test(start_paused = true)]
async fn release_waits_for_the_answer_then_forgets_the_addresses() {
    let fake = fake_with_node();
    let script = allocator(&fake, Mode::GateReleases);
    let p = Arc::new(provider(&fake, LONG));
    let id = p.discover().await.unwrap();
    let got = p.assign_ips(&id.nic_id, SUBNET, 3).await.unwrap();
    let ip = got[0].ip;
    let release = tokio::spawn({
        let (p, nic) = (p.clone(), id.nic_id.clone());
        async move { p.release_ips(&nic, &[ip]).await }
    });
    // Let the request be written and seen; the allocator holds its answer.
    until(
        || stored_request(&fake).release.contains(&got[0].name),
        "the release is written",
    )
    .await;
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    assert!(
        !release.is_finished(),
        "returned before the allocator answered"
    );
    assert_eq!(stored_request(&fake).addresses, 2);
    script.gate.notify_one();
    release.await.unwrap().unwrap();
    let listed = p.list_secondary_ips(&id.nic_id).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|e| e.ip != ip));
    // The next change no longer names it: the NIC may get the address again.
    p.assign_ips(&id.nic_id, SUBNET, 1).await.unwrap();
    assert!(stored_request(&fake).release.is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_error_answer_maps_back_and_withdraws_the_ask() {
    let fake = fake_with_node();
    let script = allocator(&fake, Mode::Serve);
    let p = provider(&fake, LONG);
    let id = p.discover().await.unwrap();
    p.assign_ips(&id.nic_id, SUBNET, 2).await.unwrap();
    *script.mode.lock().unwrap() = Mode::Fail("subnet_full");
    let err = p.assign_ips(&id.nic_id, SUBNET, 4).await.unwrap_err();
    assert!(
        matches!(&err, CloudError::SubnetFull { subnet_id, .. } if subnet_id == SUBNET),
        "{err:?}"
    );
    assert_eq!(
        stored_request(&fake).addresses,
        2,
        "the failed ask is withdrawn"
    );
    *script.mode.lock().unwrap() = Mode::Fail("nic_limit");
    let err = p.assign_ips(&id.nic_id, SUBNET, 1).await.unwrap_err();
    assert!(matches!(err, CloudError::NicLimitReached { .. }), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn an_unanswered_ask_times_out_and_is_withdrawn() {
    let fake = fake_with_node();
    let script = allocator(&fake, Mode::Serve);
    let p = provider(&fake, Duration::from_secs(5));
    let id = p.discover().await.unwrap();
    *script.mode.lock().unwrap() = Mode::Silent;
    let err = p.assign_ips(&id.nic_id, SUBNET, 4).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(err.to_string().contains("allocator"), "{err}");
    let request = stored_request(&fake);
    assert_eq!(
        request.addresses, 0,
        "nothing stays asked for without a waiter"
    );
    // What arrives late shows up in the next list (the agent's reconcile adopts it).
    *script.mode.lock().unwrap() = Mode::Serve;
    let got = p.assign_ips(&id.nic_id, SUBNET, 1).await.unwrap();
    assert_eq!(got.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_restarted_provider_continues_the_stored_generation() {
    let fake = fake_with_node();
    let script = allocator(&fake, Mode::Serve);
    let id = {
        let p = provider(&fake, LONG);
        let id = p.discover().await.unwrap();
        p.assign_ips(&id.nic_id, SUBNET, 3).await.unwrap();
        id
    };
    let before = stored_request(&fake);
    let p = provider(&fake, LONG);
    assert_eq!(p.discover().await.unwrap(), id);
    assert_eq!(
        stored_request(&fake).generation,
        before.generation,
        "the same machine, already resolved: no new ask"
    );
    assert_eq!(p.list_secondary_ips(&id.nic_id).await.unwrap().len(), 3);
    let got = p.assign_ips(&id.nic_id, SUBNET, 2).await.unwrap();
    assert_eq!(
        got.len(),
        2,
        "only the new ones, not the 3 of the previous run"
    );
    let after = stored_request(&fake);
    assert_eq!(after.generation, before.generation + 1);
    assert_eq!(after.addresses, 5);
    assert!(script.seen.lock().unwrap().contains(&after.generation));
}

#[tokio::test(start_paused = true)]
async fn a_refused_release_maps_back_and_asks_for_the_addresses_again() {
    let fake = fake_with_node();
    let script = allocator(&fake, Mode::Serve);
    let p = provider(&fake, LONG);
    let id = p.discover().await.unwrap();
    let got = p.assign_ips(&id.nic_id, SUBNET, 3).await.unwrap();
    *script.mode.lock().unwrap() = Mode::RefuseReleases;
    let err = p.release_ips(&id.nic_id, &[got[0].ip]).await.unwrap_err();
    assert!(
        matches!(&err, CloudError::Busy { retry_after, .. } if retry_after.as_secs() == 3),
        "{err:?}"
    );
    let request = stored_request(&fake);
    assert!(request.release.is_empty(), "the release is withdrawn");
    assert_eq!(request.addresses, 3, "and the address is wanted again");
    assert_eq!(p.list_secondary_ips(&id.nic_id).await.unwrap().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn pods_that_start_waiting_join_the_unanswered_ask() {
    let fake = fake_with_node();
    let script = allocator(&fake, Mode::HoldAsks);
    let p = Arc::new(provider(&fake, LONG));
    let id = p.discover().await.unwrap();
    // The first top-up (no pod waiting yet) leaves for 8 addresses...
    let ask = tokio::spawn({
        let (p, nic) = (p.clone(), id.nic_id.clone());
        async move { p.assign_ips(&nic, SUBNET, 8).await }
    });
    until(
        || stored_request(&fake).addresses == 8,
        "the ask is written",
    )
    .await;
    // ...and 30 pods start waiting before the allocator's turn for the node comes.
    p.set_waiting_pods(30);
    until(
        || stored_request(&fake).addresses == 38,
        "the ask is raised",
    )
    .await;
    assert_eq!(stored_request(&fake).waiting_pods, 30);
    script.gate.notify_one();
    let got = ask.await.unwrap().unwrap();
    assert_eq!(
        got.len(),
        38,
        "one answer brings the pods' addresses with the top-up"
    );
    assert_eq!(p.list_secondary_ips(&id.nic_id).await.unwrap().len(), 38);
    // A hint with no ask outstanding raises nothing.
    p.set_waiting_pods(50);
    assert_eq!(stored_request(&fake).addresses, 38);
}

#[tokio::test(start_paused = true)]
async fn a_released_address_given_back_under_a_new_name_is_never_asked_to_be_released() {
    let fake = fake_with_node();
    let script = allocator(&fake, Mode::GateReleases);
    let p = Arc::new(provider(&fake, LONG));
    let id = p.discover().await.unwrap();
    let got = p.assign_ips(&id.nic_id, SUBNET, 3).await.unwrap();
    let old = got[0].clone();
    // The release is written; its answer is held...
    let release = tokio::spawn({
        let (p, nic, ip) = (p.clone(), id.nic_id.clone(), old.ip);
        async move { p.release_ips(&nic, &[ip]).await }
    });
    until(
        || !stored_request(&fake).release.is_empty(),
        "the release is written",
    )
    .await;
    let stored = stored_request(&fake).release;
    // ...and an assign writes the next generation, which still lists the release.
    let assign = tokio::spawn({
        let (p, nic) = (p.clone(), id.nic_id.clone());
        async move { p.assign_ips(&nic, SUBNET, 1).await }
    });
    let asked = stored_request(&fake).generation;
    until(
        || stored_request(&fake).generation > asked,
        "the assign is written",
    )
    .await;
    // The allocator removes the old entry and gives its address back under a new name.
    script.gate.notify_one();
    release.await.unwrap().unwrap();
    let new = assign.await.unwrap().unwrap();
    assert_eq!(new.len(), 1);
    assert_eq!(
        new[0].ip, old.ip,
        "the scripted allocator reuses the address"
    );
    assert_ne!(new[0].name, old.name);
    // The pod's new entry is never asked to be released, by address or by name.
    *script.mode.lock().unwrap() = Mode::Serve;
    p.assign_ips(&id.nic_id, SUBNET, 1).await.unwrap();
    let request = stored_request(&fake);
    assert!(
        !request.release.contains(&old.ip.to_string()) && !request.release.contains(&new[0].name),
        "{:?}",
        request.release
    );
    let listed = p.list_secondary_ips(&id.nic_id).await.unwrap();
    assert!(
        listed.contains(&new[0]),
        "the reused address stays on the NIC"
    );
    assert_eq!(listed.len(), 4);
    assert_eq!(stored, vec![old.name.clone()], "released by name");
}

#[tokio::test(start_paused = true)]
async fn a_block_is_released_by_its_name_only_with_every_address() {
    let fake = fake_with_node();
    allocator(&fake, Mode::Serve);
    let p = provider(&fake, LONG);
    let id = p.discover().await.unwrap();
    let blocks = p.assign_blocks(&id.nic_id, SUBNET, 1, 28).await.unwrap();
    let addresses: Vec<_> = blocks[0].addresses().collect();
    assert_eq!(addresses.len(), 16);
    // Part of the block, and an address of no entry: nothing asked, no error.
    let stranger = "10.9.9.9".parse().unwrap();
    let generation = stored_request(&fake).generation;
    p.release_ips(&id.nic_id, &[addresses[0], stranger])
        .await
        .unwrap();
    assert_eq!(stored_request(&fake).generation, generation);
    assert_eq!(p.list_secondary_ips(&id.nic_id).await.unwrap().len(), 1);
    p.release_ips(&id.nic_id, &addresses).await.unwrap();
    let request = stored_request(&fake);
    assert_eq!(request.release, vec![blocks[0].name.clone()]);
    assert_eq!(request.blocks, 0);
    assert!(p.list_secondary_ips(&id.nic_id).await.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_restart_during_an_allocator_outage_answers_from_the_stored_answer() {
    let fake = fake_with_node();
    let script = allocator(&fake, Mode::Serve);
    let id = {
        let p = provider(&fake, LONG);
        let id = p.discover().await.unwrap();
        p.assign_ips(&id.nic_id, SUBNET, 3).await.unwrap();
        id
    };
    // The allocator goes down; the previous run had asked for more before it stopped.
    *script.mode.lock().unwrap() = Mode::Silent;
    let mut pool = fake.get(POOLS, NODE).unwrap();
    let mut pending = stored_request(&fake);
    pending.generation += 1;
    pending.addresses += 2;
    pool["status"]["cloudRequest"] = serde_json::to_value(&pending).unwrap();
    fake.put(POOLS, pool);
    // A restarted provider: the node and the NIC as last answered, not an error after the
    // answer timeout (no answer will come), and no new ask.
    let p = provider(&fake, LONG);
    assert_eq!(p.discover().await.unwrap(), id);
    assert_eq!(stored_request(&fake).generation, pending.generation);
    assert_eq!(p.list_secondary_ips(&id.nic_id).await.unwrap().len(), 3);
    // Its own ask is still waited for (and times out unanswered).
    let err = p.assign_ips(&id.nic_id, SUBNET, 1).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
}
