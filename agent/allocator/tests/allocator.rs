//! The allocator against a real vnet-mockcloud over HTTP and the fake API server, authorized
//! exactly as deploy/cluster-mode/rbac.yaml authorizes it.

mod support;

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use support::{Lab, ROOMY, ips, roomy_limits, until};
use vnet_allocator::BucketSettings;
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
    lab.ask("node-1", 2, 3, &release, 0);
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
    lab.ask("node-1", 3, 4, &[kept[0]], 0);
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
    let counters = allocator.counters.snapshot();
    assert_eq!(counters.jobs_done, 4);
    assert_eq!(counters.nic_writes, 3);
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
    let first = lab.start_with(first_client, Lab::settings("first", ROOMY, ROOMY));
    until("the first leads", || {
        first.counters.leading.load(Ordering::Relaxed) == 1
    })
    .await;
    let second = lab.start(Lab::settings("second", ROOMY, ROOMY));

    lab.ask("node-1", 1, 2, &[], 1);
    lab.answered("node-1", 1).await;
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
    lab.ask("node-2", 1, 3, &[], 1);
    let answer = lab.answered("node-2", 1).await;
    assert_eq!(answer.secondary_ips.len(), 3);
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
