//! The allocator against a real vnet-mockcloud over HTTP and the fake API server, authorized
//! exactly as deploy/cluster-mode/rbac.yaml authorizes it.

mod support;

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use support::{Lab, ROOMY, ips, names_of, nic_entries, roomy_limits, until};
use vnet_allocator::{BucketSettings, START_SETTLE};
use vnet_mockcloud::{Bucket, RateLimits};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_gets_its_addresses_in_one_nic_write_and_release_removes_exactly_the_listed() {
    let lab = Lab::new(2, "10.1.0.0/24", roomy_limits()).await;
    let allocator = lab.start(Lab::settings("a", ROOMY, ROOMY));

    lab.ask("node-1", 1, 5, &[], 2);
    let answer = lab.answered("node-1", 1).await;
    assert_eq!(answer.error, None);
    assert_eq!(answer.secondary_ips.len(), 5);
    assert_eq!(ips(&answer), lab.nic_addresses("node-1"));
    assert!(answer.secondary_ips.iter().all(|s| s.prefix_length == 32));
    let identity = answer.identity.as_ref().expect("the identity");
    assert_eq!(identity.vm_name, "node-1");
    assert_eq!(identity.subnet_prefix, "10.1.0.0/24");
    assert_eq!(lab.nic_puts(), 1, "one NIC write for the request");

    // Give two back and keep three: exactly those two go, in one more write, nothing added.
    let all = ips(&answer);
    let release = [all[1], all[3]];
    lab.ask("node-1", 2, 3, &names_of(&answer, &release), 0);
    let answer = lab.answered("node-1", 2).await;
    assert_eq!(answer.error, None);
    let kept: Vec<Ipv4Addr> = all
        .iter()
        .copied()
        .filter(|a| !release.contains(a))
        .collect();
    assert_eq!(ips(&answer), kept);
    assert_eq!(lab.nic_addresses("node-1"), kept);
    assert_eq!(lab.nic_puts(), 2);

    // Release one and grow by two: both in the same single write.
    lab.ask("node-1", 3, 4, &names_of(&answer, &[kept[0]]), 0);
    let answer = lab.answered("node-1", 3).await;
    let now = ips(&answer);
    assert_eq!(now.len(), 4);
    assert!(!now.contains(&kept[0]));
    assert!(now.contains(&kept[1]) && now.contains(&kept[2]));
    assert_eq!(lab.nic_addresses("node-1"), now);
    assert_eq!(lab.nic_puts(), 3, "a release and an addition are one write");

    // The same request again (a new generation, nothing to change): answered, no write.
    lab.ask("node-1", 4, 4, &[], 0);
    let answer = lab.answered("node-1", 4).await;
    assert_eq!(ips(&answer), now);
    assert_eq!(lab.nic_puts(), 3);
    // The other node was never touched.
    assert!(lab.nic_addresses("node-2").is_empty());
    assert!(lab.answer("node-2").is_none());
    support::jobs_counted(&allocator.counters, 4).await;
    let counters = allocator.counters.snapshot();
    assert_eq!(counters.jobs_done, 4);
    assert_eq!(counters.nic_writes, 3);
    allocator.stop().await;
}

/// Review MUST-FIX 1: Azure hands a released address out again (the mock: the lowest free one).
/// An agent's request that still lists an entry already removed must not take the address
/// that a new entry holds now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_naming_an_entry_already_gone_leaves_its_address_under_a_new_name() {
    let lab = Lab::new(1, "10.9.0.0/24", roomy_limits()).await;
    let allocator = lab.start(Lab::settings("a", ROOMY, ROOMY));
    lab.ask("node-1", 1, 2, &[], 1);
    let answer = lab.answered("node-1", 1).await;
    let all = ips(&answer);
    let gone = names_of(&answer, &all[..1]);
    lab.ask("node-1", 2, 1, &gone, 0);
    let answer = lab.answered("node-1", 2).await;
    assert_eq!(ips(&answer), all[1..].to_vec());
    // An assign whose request still lists the old release (written before answer 2 arrived).
    lab.ask("node-1", 3, 2, &gone, 1);
    let answer = lab.answered("node-1", 3).await;
    assert_eq!(answer.error, None);
    let entries = nic_entries(&lab, "node-1");
    assert_eq!(entries.len(), 2);
    let (reused_name, reused) = entries[0].clone();
    assert_eq!(
        reused, all[0],
        "the mock gave the released address out again"
    );
    assert_ne!(vec![reused_name], gone, "under a new name");
    let puts = lab.nic_puts();
    // The next request still lists the old name (the agent keeps a release until its answer
    // shows it done): the new entry holding the same address stays, nothing is written.
    lab.ask("node-1", 4, 2, &gone, 0);
    let answer = lab.answered("node-1", 4).await;
    assert_eq!(answer.error, None);
    assert_eq!(nic_entries(&lab, "node-1"), entries, "nothing removed");
    assert_eq!(ips(&answer), vec![all[0], all[1]]);
    assert_eq!(lab.nic_puts(), puts, "nothing to write");
    allocator.stop().await;
}

/// Review MUST-FIX 3: every agent may patch every NodeIPPool's status, so a node could write a
/// request naming another node's VM (and release its entries). The allocator serves a
/// NodeIPPool only for the VM of the Node of the same name (its spec.providerID).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_naming_another_nodes_vm_is_refused_and_touches_nothing() {
    let lab = Lab::new(2, "10.12.0.0/24", roomy_limits()).await;
    let allocator = lab.start(Lab::settings("a", ROOMY, ROOMY));
    lab.ask("node-2", 1, 3, &[], 1);
    let answer = lab.answered("node-2", 1).await;
    let victims = names_of(&answer, &ips(&answer));
    let puts = lab.nic_puts();
    let calls = allocator.cloud.arm_calls();

    // node-1 (its Node says it is VM node-1) asks for VM node-2's NIC, releasing its entries.
    lab.node(
        "node-1",
        &vnet_allocator::provider_id(&lab.instance("node-1").vm_id),
    );
    let mut request = vnet_kube::crd::CloudRequest {
        generation: 1,
        instance: lab.instance("node-2"),
        addresses: 0,
        release: victims,
        waiting_pods: 1,
        ..vnet_kube::crd::CloudRequest::default()
    };
    lab.request("node-1", request.clone());
    let answer = lab.answered("node-1", 1).await;
    let error = answer.error.expect("refused");
    assert_eq!(error.code, "fatal", "{error:?}");
    assert!(
        error.message.contains("node-2") && error.message.contains("Node node-1"),
        "names the mismatch: {}",
        error.message
    );
    assert!(answer.identity.is_none() && answer.secondary_ips.is_empty());
    assert_eq!(
        lab.nic_addresses("node-2").len(),
        3,
        "node-2's NIC untouched"
    );
    assert!(lab.nic_addresses("node-1").is_empty());
    assert_eq!(lab.nic_puts(), puts);
    assert_eq!(allocator.cloud.arm_calls(), calls, "no ARM call at all");

    // The providerID is compared case-insensitively (AKS lower-cases the resource group).
    request.generation = 2;
    request.instance = lab.instance("node-1");
    request.release.clear();
    request.addresses = 2;
    lab.node(
        "node-1",
        &vnet_allocator::provider_id(&lab.instance("node-1").vm_id).to_ascii_uppercase(),
    );
    lab.request("node-1", request);
    let answer = lab.answered("node-1", 2).await;
    assert_eq!(answer.error, None);
    assert_eq!(ips(&answer), lab.nic_addresses("node-1"));
    allocator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_answers_the_error_for_that_generation() {
    // A /27: 32 addresses, 5 reserved by Azure, one primary: 26 free.
    let lab = Lab::new(1, "10.2.0.0/27", roomy_limits()).await;
    let allocator = lab.start(Lab::settings("a", ROOMY, ROOMY));
    lab.ask("node-1", 1, 40, &[], 3);
    let answer = lab.answered("node-1", 1).await;
    let error = answer.error.expect("an error answer");
    assert_eq!(error.code, "subnet_full", "{error:?}");
    assert!(lab.nic_addresses("node-1").is_empty());
    // The agent asks for less: the next generation succeeds.
    lab.ask("node-1", 2, 4, &[], 3);
    let answer = lab.answered("node-1", 2).await;
    assert_eq!(answer.error, None);
    assert_eq!(ips(&answer), lab.nic_addresses("node-1"));
    assert_eq!(answer.secondary_ips.len(), 4);
    allocator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_waiting_pods_is_served_before_a_top_up_when_the_budget_allows_one() {
    let lab = Lab::new(2, "10.3.0.0/24", roomy_limits()).await;
    // The top-up asked first; the node with pods waiting after.
    lab.ask("node-1", 1, 4, &[], 0);
    lab.ask("node-2", 1, 4, &[], 3);
    // One write in the budget, and no refill worth the name during the test.
    let writes = BucketSettings {
        size: 1.0,
        refill_per_sec: 0.001,
    };
    let allocator = lab.start(Lab::settings("a", ROOMY, writes));
    let answer = lab.answered("node-2", 1).await;
    assert_eq!(answer.error, None);
    assert_eq!(answer.secondary_ips.len(), 4);
    until("the top-up is queued behind the budget", || {
        allocator.counters.queue_depth.load(Ordering::Relaxed) == 1
    })
    .await;
    assert!(
        lab.answer("node-1").is_none(),
        "the top-up waits for the budget"
    );
    assert!(lab.nic_addresses("node-1").is_empty());
    assert_eq!(lab.nic_puts(), 1);
    allocator.stop().await;
}

/// A cold start's first top-up leaves the budget's reserve to nodes whose pods wait; the pods
/// that reach its node meanwhile join its request, and one write serves both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_up_leaves_the_reserve_to_waiting_pods_and_the_pods_that_come_join_it() {
    let lab = Lab::new(2, "10.3.1.0/24", roomy_limits()).await;
    // Two writes in the budget (a quarter of it, 0.5, is the reserve), no refill worth the name.
    let writes = BucketSettings {
        size: 2.0,
        refill_per_sec: 0.001,
    };
    let allocator = lab.start(Lab::settings("a", ROOMY, writes));
    // node-1 starts: resolved, nothing to write; past the hold of a new node's top-ups.
    lab.ask("node-1", 1, 0, &[], 0);
    assert_eq!(lab.answered("node-1", 1).await.error, None);
    tokio::time::sleep(START_SETTLE).await;
    // Pods wait on node-2: its write takes the budget down to one write.
    lab.ask("node-2", 1, 3, &[], 3);
    assert_eq!(lab.answered("node-2", 1).await.secondary_ips.len(), 3);
    assert_eq!(lab.nic_puts(), 1);
    // node-1's warm-pool top-up: one write is left, but only the reserve.
    lab.ask("node-1", 2, 4, &[], 0);
    until("the top-up is queued behind the reserve", || {
        allocator.counters.queue_depth.load(Ordering::Relaxed) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        lab.answer("node-1").map(|a| a.observed_generation),
        Some(1),
        "the top-up waits"
    );
    assert!(lab.nic_addresses("node-1").is_empty());
    // Its pods arrive and join the ask (as the agent raises it): the last write serves both.
    lab.ask("node-1", 3, 6, &[], 2);
    let answer = lab.answered("node-1", 3).await;
    assert_eq!(answer.error, None);
    assert_eq!(answer.secondary_ips.len(), 6);
    assert_eq!(ips(&answer), lab.nic_addresses("node-1"));
    assert_eq!(lab.nic_puts(), 2, "one write per node");
    allocator.stop().await;
}

/// A node that has just started: its first top-up waits (the budget is full) for the pods about
/// to arrive, which join it in one write; with no pod coming it goes alone after the hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_nodes_top_up_waits_for_its_pods_and_goes_alone_when_none_come() {
    let lab = Lab::new(2, "10.3.2.0/24", roomy_limits()).await;
    let allocator = lab.start(Lab::settings("a", ROOMY, ROOMY));
    // Before the asks: the allocator resolves the nodes (and starts their hold) after this.
    let resolved = Instant::now();
    for node in ["node-1", "node-2"] {
        lab.ask(node, 1, 0, &[], 0);
        assert_eq!(lab.answered(node, 1).await.error, None);
    }
    // Both agents ask for their warm pool at once.
    lab.ask("node-1", 2, 4, &[], 0);
    lab.ask("node-2", 2, 4, &[], 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // (Only while the hold certainly runs: a test thread stalled past it proves nothing.)
    if resolved.elapsed() < START_SETTLE / 2 {
        assert_eq!(lab.answer("node-1").unwrap().observed_generation, 1);
        assert_eq!(lab.nic_puts(), 0, "the top-ups wait for pods");
    }
    // node-1's pods arrive and join its ask: one write for both.
    lab.ask("node-1", 3, 6, &[], 2);
    let answer = lab.answered("node-1", 3).await;
    assert_eq!(answer.secondary_ips.len(), 6);
    // node-2 gets none: its top-up goes alone once the hold is over.
    let answer = lab.answered("node-2", 2).await;
    assert!(resolved.elapsed() >= START_SETTLE);
    assert_eq!(answer.secondary_ips.len(), 4);
    assert_eq!(lab.nic_puts(), 2, "one write per node");
    allocator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pacing_keeps_429s_at_zero_when_the_buckets_are_small() {
    // ARM's buckets, scaled down: reads 12 refilling 6/s, writes 3 refilling 1.5/s.
    let limits = RateLimits {
        reads: Bucket {
            size: 12,
            refill_per_sec: 6.0,
        },
        writes: Bucket {
            size: 3,
            refill_per_sec: 1.5,
        },
    };
    let lab = Lab::new(8, "10.4.0.0/24", limits).await;
    let mut settings = Lab::settings(
        "a",
        BucketSettings {
            size: 12.0,
            refill_per_sec: 6.0,
        },
        BucketSettings {
            size: 3.0,
            refill_per_sec: 1.5,
        },
    );
    settings.max_in_flight = 8;
    let allocator = lab.start(settings);
    for i in 1..=8 {
        lab.ask(&format!("node-{i}"), 1, 2, &[], (i % 3) as u32);
    }
    for i in 1..=8 {
        let node = format!("node-{i}");
        let answer = lab.answered(&node, 1).await;
        assert_eq!(answer.error, None, "{node}");
        assert_eq!(ips(&answer), lab.nic_addresses(&node));
    }
    let calls = allocator.cloud.arm_calls();
    assert_eq!(calls.throttled, 0, "no 429 in {calls:?}");
    assert_eq!(allocator.counters.snapshot().throttled, 0);
    assert_eq!(lab.nic_puts(), 8, "one write per node");
    // Eight nodes of one subnet: the subnet and the VNet are read once (resolves that miss the
    // cache together wait for one read), the VM once per node, and the NIC read by the resolve
    // is where the write starts from.
    let mock = lab.mock.counters();
    assert_eq!((mock.calls("subnet_get"), mock.calls("vnet_get")), (1, 1));
    assert_eq!(mock.calls("vm_get"), 8);
    assert_eq!(
        mock.calls("nic_get"),
        8 * 3,
        "resolve + two settle reads per node"
    );
    // Without pacing the same work runs into the mock's buckets (the test can fail).
    assert!(
        calls.reads > 12 && calls.writes > 3,
        "the work exceeds one bucket: {calls:?}"
    );
    allocator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_allocator_waits_while_the_first_leads_and_takes_over_when_it_stops_renewing() {
    let lab = Lab::new(2, "10.5.0.0/24", roomy_limits()).await;
    let (first_client, cut_off) = lab.api.client_with_switch();
    // Refilling 1/s: emptied, its buckets could not look full again during the test.
    let slow = BucketSettings {
        size: 1000.0,
        refill_per_sec: 1.0,
    };
    let first = lab.start_with(first_client, Lab::settings("first", slow, slow));
    until("the first leads", || {
        first.counters.leading.load(Ordering::Relaxed) == 1
    })
    .await;
    // It created the Lease: nobody led before it, it plans from full buckets (1,000).
    until("the first plans from full buckets", || {
        first.counters.local_reads.load(Ordering::Relaxed) > 900
    })
    .await;
    let second = lab.start(Lab::settings("second", ROOMY, ROOMY));

    lab.ask("node-1", 1, 2, &[], 1);
    lab.answered("node-1", 1).await;
    support::jobs_counted(&first.counters, 1).await;
    assert_eq!(first.counters.snapshot().jobs_done, 1);
    let standby = second.counters.snapshot();
    assert_eq!(
        (standby.jobs_done, standby.arm_reads, standby.leading),
        (0, 0, false)
    );
    assert_eq!(
        second.cloud.arm_calls().reads,
        0,
        "the standby calls no ARM API"
    );

    // The leader loses the API server: it cannot renew, so it stops starting jobs, and the
    // standby takes over once the lease has gone unrenewed for its duration.
    cut_off.store(true, Ordering::SeqCst);
    until("the first stops leading", || {
        first.counters.leading.load(Ordering::Relaxed) == 0
    })
    .await;
    until("the second takes over", || {
        second.counters.leading.load(Ordering::Relaxed) == 1
    })
    .await;
    // The first may have spent ARM's buckets until it stopped: the second plans from empty
    // ones, refilling at 100/s (full again only after 10 s).
    until("the second plans from empty buckets", || {
        let s = second.counters.snapshot();
        s.local_reads < 500 && s.local_writes < 500
    })
    .await;
    lab.ask("node-2", 1, 3, &[], 1);
    let answer = lab.answered("node-2", 1).await;
    assert_eq!(answer.secondary_ips.len(), 3);
    support::jobs_counted(&second.counters, 1).await;
    assert_eq!(second.counters.snapshot().jobs_done, 1);
    assert_eq!(
        first.counters.snapshot().jobs_done,
        1,
        "the old leader did nothing more"
    );
    let lease = lab
        .api
        .get(vnet_fakeapi::LEASES, "kube-system/vnet-cni-allocator")
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "second");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);

    // The allocator needed exactly what its roles grant.
    assert_eq!(
        lab.api.authorizations(),
        vnet_fakeapi::granted_by(support::ROLE)
    );
    second.stop().await;
    // The stopped leader gave the lease up for the next replica.
    let lease = lab
        .api
        .get(vnet_fakeapi::LEASES, "kube-system/vnet-cni-allocator")
        .unwrap();
    assert!(lease["spec"]["holderIdentity"].is_null(), "{lease}");
    cut_off.store(false, Ordering::SeqCst);
    first.stop().await;
    let _ = Duration::ZERO;
}

/// A NIC that stays `Updating` for `polls` reads (1 s apart): a job that lasts that long.
/// A NodeIPPool deleted and created again under the same name while a job for the old one runs
/// (a node replaced by one of the same name): the old job's answer is dropped (the pool's uid
/// is no longer its), and the new pool's own request is served from scratch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_for_a_replaced_pool_never_lands_on_its_successor() {
    let lab = Lab::new(1, "10.3.3.0/24", roomy_limits()).await;
    slow_operations(&lab, 3);
    let allocator = lab.start(Lab::settings("a", ROOMY, ROOMY));
    lab.ask("node-1", 1, 2, &[], 1);
    until("the old pool's write is under way", || lab.nic_puts() == 1).await;
    let old_uid = lab.api.get(vnet_fakeapi::POOLS, "node-1").unwrap()["metadata"]["uid"].clone();
    lab.api.delete(vnet_fakeapi::POOLS, "node-1");
    lab.ask("node-1", 1, 5, &[], 1);
    let new_uid = lab.api.get(vnet_fakeapi::POOLS, "node-1").unwrap()["metadata"]["uid"].clone();
    assert_ne!(old_uid, new_uid);
    // The new pool's generation 1 asks for 5: its answer says 5, never the old job's 2.
    let answer = lab.answered("node-1", 1).await;
    assert_eq!(answer.error, None);
    assert_eq!(answer.secondary_ips.len(), 5, "{answer:?}");
    assert_eq!(ips(&answer), lab.nic_addresses("node-1"));
    allocator.stop().await;
}

fn slow_operations(lab: &Lab, polls: u32) {
    lab.mock.set_faults(vnet_mockcloud::Faults {
        operation_retry_after_secs: Some(1),
        operation_polls: Some(polls),
        ..vnet_mockcloud::Faults::default()
    });
}

/// Review MUST-FIX 2: a leader cut off from the API server cannot renew; its job under way is
/// aborted before the standby may take over, so no call of the old leader's reaches ARM after
/// the new leader's first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_stops_its_job_before_the_standby_calls_arm() {
    let lab = Lab::new(1, "10.10.0.0/24", roomy_limits()).await;
    slow_operations(&lab, 10);
    let (first_client, cut_off) = lab.api.client_with_switch();
    // Refilling 1/s: emptied, its buckets could not look full again during the test.
    let slow = BucketSettings {
        size: 1000.0,
        refill_per_sec: 1.0,
    };
    let first = lab.start_with(first_client, Lab::settings("first", slow, slow));
    until("the first leads", || {
        first.counters.leading.load(Ordering::Relaxed) == 1
    })
    .await;
    // It created the Lease: nobody led before it, it plans from full buckets (1,000).
    until("the first plans from full buckets", || {
        first.counters.local_reads.load(Ordering::Relaxed) > 900
    })
    .await;
    let second = lab.start(Lab::settings("second", ROOMY, ROOMY));
    lab.ask("node-1", 1, 2, &[], 1);
    until("the first's job has written", || lab.nic_puts() == 1).await;
    until("the first counts its job in flight", || {
        first.counters.in_flight.load(Ordering::Relaxed) == 1
    })
    .await;
    cut_off.store(true, Ordering::SeqCst);
    until("the standby calls ARM", || {
        let calls = second.cloud.arm_calls();
        calls.reads + calls.writes > 0
    })
    .await;
    // Whatever the old leader had sent by now is all it ever sends.
    let old = first.cloud.arm_calls();
    assert_eq!(
        first.counters.in_flight.load(Ordering::Relaxed),
        0,
        "the old leader's job was aborted"
    );
    // The new leader finishes the request (the NIC settles under its reads); the old one's
    // job, without the abort, would still be reading the NIC all that time.
    let answer = lab.answered("node-1", 1).await;
    assert_eq!(answer.error, None);
    assert_eq!(ips(&answer), lab.nic_addresses("node-1"));
    assert_eq!(lab.nic_puts(), 1, "the write was counted, not repeated");
    assert_eq!(
        first.cloud.arm_calls(),
        old,
        "no ARM call of the old leader after the new leader's first"
    );
    support::jobs_counted(&second.counters, 1).await;
    assert_eq!(second.counters.snapshot().jobs_done, 1);
    second.stop().await;
    cut_off.store(false, Ordering::SeqCst);
    first.stop().await;
}

/// Review MUST-FIX 2: on shutdown the leader lets its jobs finish and answer, and only then
/// gives the Lease up (a standby that took over at once would work beside the old jobs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_leader_drains_its_jobs_before_it_gives_the_lease_up() {
    let lab = Lab::new(1, "10.11.0.0/24", roomy_limits()).await;
    slow_operations(&lab, 3);
    let first = lab.start(Lab::settings("first", ROOMY, ROOMY));
    until("the first leads", || {
        first.counters.leading.load(Ordering::Relaxed) == 1
    })
    .await;
    lab.ask("node-1", 1, 2, &[], 1);
    until("the job has written", || lab.nic_puts() == 1).await;
    first.stop().await;
    let answer = lab.answer("node-1").expect("the drained job answered");
    assert_eq!((answer.observed_generation, &answer.error), (1, &None));
    assert_eq!(ips(&answer), lab.nic_addresses("node-1"));
    let events = lab.api.events();
    let answered = events
        .iter()
        .find(|(_, c, e)| *c == vnet_fakeapi::POOLS && !e["object"]["status"]["cloud"].is_null())
        .map(|(rv, _, _)| *rv)
        .expect("the answer's write");
    let released = events
        .iter()
        .find(|(_, c, e)| {
            *c == vnet_fakeapi::LEASES && e["object"]["spec"]["holderIdentity"].is_null()
        })
        .map(|(rv, _, _)| *rv)
        .expect("the Lease given up");
    assert!(
        answered < released,
        "answered at resourceVersion {answered}, Lease given up at {released}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_or_a_412_never_adds_twice() {
    use vnet_mockcloud::{FaultSpec, Faults};
    let lab = Lab::new(1, "10.6.0.0/24", roomy_limits()).await;
    let allocator = lab.start(Lab::settings("a", ROOMY, ROOMY));
    lab.ask("node-1", 1, 2, &[], 1);
    lab.answered("node-1", 1).await;
    let once = |probability: f64| FaultSpec {
        probability,
        count: Some(1),
        operations: vec!["nic_put".into()],
        ..FaultSpec::default()
    };
    // The next write is applied but answered 500: the allocator cannot know it took effect.
    lab.mock.set_faults(Faults {
        operation_retry_after_secs: Some(1),
        lost_response: Some(once(1.0)),
        ..Faults::default()
    });
    lab.ask("node-1", 2, 5, &[], 1);
    let answer = lab.answered("node-1", 2).await;
    assert_eq!(answer.error, None);
    assert_eq!(
        lab.nic_addresses("node-1").len(),
        5,
        "the lost write counted, not repeated"
    );
    assert_eq!(ips(&answer), lab.nic_addresses("node-1"));
    assert_eq!(lab.mock.counters().injected("lost_response"), 1);
    // Someone else changes the NIC after the allocator last read it: its remembered NIC is
    // stale, the PUT gets 412, and what to add is counted again from a fresh read.
    lab.mock.set_faults(Faults {
        operation_retry_after_secs: Some(1),
        etag_race: Some(once(1.0)),
        ..Faults::default()
    });
    lab.ask("node-1", 3, 8, &[], 1);
    let answer = lab.answered("node-1", 3).await;
    assert_eq!(answer.error, None);
    assert_eq!(lab.mock.counters().injected("etag_race"), 1);
    assert_eq!(lab.nic_addresses("node-1").len(), 8);
    assert_eq!(ips(&answer), lab.nic_addresses("node-1"));
    allocator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_mode_blocks_come_in_the_same_single_write_and_go_only_whole() {
    use vnet_kube::crd::CloudRequest;
    let lab = Lab::new(1, "10.7.0.0/22", roomy_limits()).await;
    let allocator = lab.start(Lab::settings("a", ROOMY, ROOMY));
    let ask = |generation: u64, blocks: u32, release: Vec<String>| CloudRequest {
        generation,
        instance: lab.instance("node-1"),
        blocks,
        block_prefix_length: Some(28),
        release,
        waiting_pods: 1,
        ..CloudRequest::default()
    };
    lab.request("node-1", ask(1, 2, vec![]));
    let answer = lab.answered("node-1", 1).await;
    assert_eq!(answer.error, None);
    assert_eq!(answer.secondary_ips.len(), 2);
    assert!(answer.secondary_ips.iter().all(|s| s.prefix_length == 28));
    assert_eq!(lab.nic_puts(), 1);
    let first = answer.secondary_ips[0].name.clone();
    let second: Ipv4Addr = answer.secondary_ips[1].ip.parse().unwrap();
    // A block is one entry: named, it goes whole; the other stays, nothing is added.
    lab.request("node-1", ask(2, 1, vec![first]));
    let answer = lab.answered("node-1", 2).await;
    let left: Vec<Ipv4Addr> = answer
        .secondary_ips
        .iter()
        .map(|s| s.ip.parse().unwrap())
        .collect();
    assert_eq!(left, vec![second]);
    assert_eq!(lab.nic_puts(), 2);
    allocator.stop().await;
}

/// Every AKS node is a Uniform scale-set instance: its NIC is written through the instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uniform_scale_set_instance_gets_its_addresses_in_one_instance_write() {
    use vnet_kube::crd::CloudRequest;
    use vnet_mockcloud::Topology;
    use vnet_mockcloud::topology::{Orchestration, ScaleSetSpec};
    let mut topology = Topology::single_subnet("10.8.0.0/24".parse().unwrap(), 2);
    topology.scale_sets = vec![ScaleSetSpec {
        name: "pool1".into(),
        orchestration: Orchestration::Uniform,
    }];
    topology.vms[1].scale_set = Some("pool1".into());
    let lab = Lab::with_topology(topology, roomy_limits()).await;
    let allocator = lab.start(Lab::settings("a", ROOMY, ROOMY));
    let instance = lab.imds_instance("node-2").await;
    assert!(
        instance
            .vm_id
            .contains("/virtualMachineScaleSets/pool1/virtualMachines/")
    );
    lab.request(
        "node-2",
        CloudRequest {
            generation: 1,
            instance: instance.clone(),
            addresses: 3,
            waiting_pods: 1,
            ..CloudRequest::default()
        },
    );
    let answer = lab.answered("node-2", 1).await;
    assert_eq!(answer.error, None);
    assert_eq!(answer.secondary_ips.len(), 3);
    assert_eq!(answer.identity.as_ref().unwrap().kind, "uniform");
    let mock = lab.mock.counters();
    assert_eq!(mock.calls("vmss_vm_put"), 1);
    assert_eq!(mock.calls("nic_put"), 0);
    // And a release with an addition, again one instance write.
    let all = ips(&answer);
    lab.request(
        "node-2",
        CloudRequest {
            generation: 2,
            instance,
            addresses: 3,
            release: names_of(&answer, &all[..1]),
            ..CloudRequest::default()
        },
    );
    let answer = lab.answered("node-2", 2).await;
    let now = ips(&answer);
    assert_eq!(now.len(), 3);
    assert!(!now.contains(&all[0]) && now.contains(&all[1]) && now.contains(&all[2]));
    assert_eq!(lab.mock.counters().calls("vmss_vm_put"), 2);
    // Blocks cannot be written through an instance: a fatal answer, nothing written.
    lab.request(
        "node-2",
        CloudRequest {
            generation: 3,
            instance: lab.imds_instance("node-2").await,
            addresses: 3,
            blocks: 1,
            block_prefix_length: Some(28),
            ..CloudRequest::default()
        },
    );
    let answer = lab.answered("node-2", 3).await;
    assert_eq!(answer.error.map(|e| e.code), Some("fatal".to_string()));
    assert_eq!(lab.mock.counters().calls("vmss_vm_put"), 2);
    assert_eq!(lab.nic_addresses("node-2"), now);
    allocator.stop().await;
}
