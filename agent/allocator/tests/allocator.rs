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
    let first: Ipv4Addr = answer.secondary_ips[0].ip.parse().unwrap();
    let second: Ipv4Addr = answer.secondary_ips[1].ip.parse().unwrap();
    // Part of the first block named: it stays (pods may use the rest).
    lab.request("node-1", ask(2, 1, vec![first.to_string()]));
    let answer = lab.answered("node-1", 2).await;
    assert_eq!(answer.secondary_ips.len(), 2, "{answer:?}");
    // All of its sixteen addresses: it goes, the other stays, nothing is added.
    let whole: Vec<String> = (0..16)
        .map(|i| Ipv4Addr::from(u32::from(first) + i).to_string())
        .collect();
    lab.request("node-1", ask(3, 1, whole));
    let answer = lab.answered("node-1", 3).await;
    let left: Vec<Ipv4Addr> = answer
        .secondary_ips
        .iter()
        .map(|s| s.ip.parse().unwrap())
        .collect();
    assert_eq!(left, vec![second]);
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
            release: vec![all[0].to_string()],
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
