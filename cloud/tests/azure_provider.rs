//! The Azure client against a real vnet-mockcloud over HTTP.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Lab;
use serde_json::json;
use vnet_cloud::{CloudError, CloudProvider, IP_CONFIG_PREFIX};
use vnet_mockcloud::topology::derived_mac;

#[tokio::test]
async fn discovery_finds_vm_nic_subnet_and_vnet() {
    let lab = Lab::with_subnet("10.240.0.0/16", 2).await;
    let (provider, _) = lab.provider("node-2");
    let identity = provider.discover().await.unwrap();
    assert_eq!(identity.vm_name, "node-2");
    assert_eq!(
        identity.vm_id,
        "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/node-2"
    );
    assert_eq!(identity.nic_id, lab.nic_id("node-2"));
    assert_eq!(identity.primary_ip, Ipv4Addr::new(10, 240, 0, 5));
    assert_eq!(identity.subnet_id, lab.subnet_id());
    assert_eq!(identity.subnet_prefix.to_string(), "10.240.0.0/16");
    assert_eq!(identity.vnet_address_space.len(), 1);
    assert_eq!(identity.mac, derived_mac("node-2"));
    let counters = lab.counters().await;
    assert_eq!(counters.calls("imds"), 1);
    assert_eq!(counters.calls("vm_get"), 1);
}

#[tokio::test]
async fn assign_then_release_matches_the_cloud() {
    let lab = Lab::with_subnet("10.240.0.0/24", 1).await;
    let (provider, _) = lab.provider("node-1");
    let nic = lab.nic_id("node-1");
    let added = provider
        .assign_ips(&nic, &lab.subnet_id(), 3)
        .await
        .unwrap();
    assert_eq!(added.len(), 3);
    assert!(
        added
            .iter()
            .all(|s| s.name.starts_with(IP_CONFIG_PREFIX) && s.subnet_id == lab.subnet_id())
    );
    let mut ips: Vec<Ipv4Addr> = added.iter().map(|s| s.ip).collect();
    ips.sort();
    assert_eq!(lab.secondary_on("node-1").await, ips);
    // Reserved .0-.3 and the VM's own .4 are never handed out.
    assert!(
        ips.iter()
            .all(|ip| ip.octets()[3] > 4 && ip.octets()[3] < 255)
    );

    let listed = provider.list_secondary_ips(&nic).await.unwrap();
    assert_eq!(listed.len(), 3);

    provider.release_ips(&nic, &ips[..2]).await.unwrap();
    assert_eq!(lab.secondary_on("node-1").await, vec![ips[2]]);
    // Releasing what is already gone is not an error and writes nothing.
    lab.reset_counters().await;
    provider.release_ips(&nic, &ips[..2]).await.unwrap();
    assert_eq!(lab.counters().await.calls("nic_put"), 0);
    let listed: Vec<Ipv4Addr> = provider
        .list_secondary_ips(&nic)
        .await
        .unwrap()
        .iter()
        .map(|s| s.ip)
        .collect();
    assert_eq!(listed, vec![ips[2]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_coalesced_into_one_put() {
    let lab = Lab::with_subnet("10.240.0.0/24", 1).await;
    // A slow PUT keeps the first write in flight while the others queue behind it.
    lab.set_faults(
        json!({"latency": {"nic_put": {"fixed_ms": 500}}, "operation_retry_after_secs": 0}),
    )
    .await;
    let (provider, _) = lab.provider("node-1");
    let nic = lab.nic_id("node-1");
    let assign = |provider: vnet_cloud::azure::AzureProvider| {
        let (nic, subnet) = (nic.clone(), lab.subnet_id());
        tokio::spawn(async move { provider.assign_ips(&nic, &subnet, 1).await })
    };
    let first = assign(provider.clone());
    // Once the mock has the first PUT, the writer is busy: the next seven must share one PUT.
    while lab.counters().await.calls("nic_put") == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rest: Vec<_> = (0..7).map(|_| assign(provider.clone())).collect();
    let mut ips = HashSet::new();
    for task in std::iter::once(first).chain(rest) {
        let added = task.await.unwrap().unwrap();
        assert_eq!(added.len(), 1);
        assert!(ips.insert(added[0].ip), "address handed out twice");
    }
    assert_eq!(lab.secondary_on("node-1").await.len(), 8);
    assert_eq!(
        lab.counters().await.calls("nic_put"),
        2,
        "8 requests should take 2 PUTs"
    );
}

#[tokio::test]
async fn etag_conflict_is_reread_and_reapplied() {
    let lab = Lab::with_subnet("10.240.0.0/24", 1).await;
    lab.set_faults(json!({"etag_race": {"count": 1}})).await;
    let (provider, _) = lab.provider("node-1");
    let added = provider
        .assign_ips(&lab.nic_id("node-1"), &lab.subnet_id(), 2)
        .await
        .unwrap();
    assert_eq!(added.len(), 2);
    let counters = lab.counters().await;
    assert_eq!(counters.injected("etag_race"), 1);
    assert_eq!(counters.responses("nic_put", 412), 1);
    assert_eq!(counters.responses("nic_put", 200), 1);
    assert_eq!(lab.secondary_on("node-1").await.len(), 2);
}

#[tokio::test]
async fn throttling_waits_as_long_as_retry_after_says() {
    let lab = Lab::with_subnet("10.240.0.0/24", 1).await;
    lab.set_faults(json!({
        "throttle": {"count": 1, "retry_after_secs": 7, "operations": ["nic_put"]},
        "operation_retry_after_secs": 0
    }))
    .await;
    let (provider, sleeper) = lab.provider("node-1");
    provider
        .assign_ips(&lab.nic_id("node-1"), &lab.subnet_id(), 1)
        .await
        .unwrap();
    assert_eq!(lab.counters().await.responses("nic_put", 429), 1);
    // Never sooner than Retry-After; later by a jitter of at most half of it.
    let waited = sleeper.delays()[0];
    assert!(
        waited >= Duration::from_secs(7) && waited <= Duration::from_millis(10_500),
        "delays: {:?}",
        sleeper.delays()
    );

    // A busy NIC is waited out the same way.
    lab.set_faults(
        json!({"busy": {"count": 1, "retry_after_secs": 3}, "operation_retry_after_secs": 0}),
    )
    .await;
    let (provider, sleeper) = lab.provider("node-1");
    provider
        .assign_ips(&lab.nic_id("node-1"), &lab.subnet_id(), 1)
        .await
        .unwrap();
    let waited = sleeper.delays()[0];
    assert!(
        waited >= Duration::from_secs(3) && waited <= Duration::from_millis(4_500),
        "{waited:?}"
    );

    // Throttled for longer than the policy accepts: the agent gets Throttled with the delay.
    lab.set_faults(json!({"throttle": {"retry_after_secs": 600, "operations": ["nic_get"]}}))
        .await;
    let err = provider
        .list_secondary_ips(&lab.nic_id("node-1"))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        CloudError::Throttled {
            retry_after: Duration::from_secs(600)
        }
    );
}

#[tokio::test]
async fn async_operation_is_polled_to_success() {
    let lab = Lab::with_subnet("10.240.0.0/24", 1).await;
    lab.set_faults(json!({"operation_polls": 3, "operation_retry_after_secs": 2}))
        .await;
    let (provider, sleeper) = lab.provider("node-1");
    let added = provider
        .assign_ips(&lab.nic_id("node-1"), &lab.subnet_id(), 2)
        .await
        .unwrap();
    assert_eq!(added.len(), 2);
    let counters = lab.counters().await;
    // Three InProgress answers, then Succeeded; every wait was the Retry-After of 2 s.
    assert_eq!(counters.calls("operation_get"), 4);
    assert_eq!(sleeper.delays(), vec![Duration::from_secs(2); 4]);
}

#[tokio::test]
async fn failed_async_operation_is_retried_or_reported() {
    let lab = Lab::with_subnet("10.240.0.0/24", 1).await;
    let (provider, _) = lab.provider("node-1");
    let nic = lab.nic_id("node-1");

    // An internal failure is transient: the client writes again and succeeds.
    lab.set_faults(json!({"async_failure": {"count": 1}, "operation_retry_after_secs": 0}))
        .await;
    provider
        .assign_ips(&nic, &lab.subnet_id(), 1)
        .await
        .unwrap();
    let counters = lab.counters().await;
    assert_eq!(counters.injected("async_failure"), 1);
    assert_eq!(counters.responses("nic_put", 200), 2);
    assert_eq!(lab.secondary_on("node-1").await.len(), 1);

    // A failure that is not retryable comes back as is, and the cloud is rolled back.
    lab.set_faults(
        json!({"async_failure": {"code": "QuotaExceeded"}, "operation_retry_after_secs": 0}),
    )
    .await;
    let err = provider
        .assign_ips(&nic, &lab.subnet_id(), 1)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CloudError::Fatal(m) if m.contains("QuotaExceeded")),
        "{err:?}"
    );
    assert_eq!(lab.secondary_on("node-1").await.len(), 1);
}

#[tokio::test]
async fn full_subnet_is_subnet_full() {
    // A /28 has 11 assignable addresses (.4-.14); the VM holds .4.
    let lab = Lab::with_subnet("10.240.0.0/28", 1).await;
    lab.set_faults(json!({"operation_retry_after_secs": 0}))
        .await;
    let (provider, _) = lab.provider("node-1");
    let nic = lab.nic_id("node-1");
    let err = provider
        .assign_ips(&nic, &lab.subnet_id(), 11)
        .await
        .unwrap_err();
    match err {
        CloudError::SubnetFull { subnet_id, message } => {
            assert_eq!(subnet_id, lab.subnet_id());
            assert!(
                message.contains("does not have enough capacity"),
                "{message}"
            );
        }
        other => panic!("expected SubnetFull, got {other:?}"),
    }
    assert_eq!(
        provider
            .assign_ips(&nic, &lab.subnet_id(), 10)
            .await
            .unwrap()
            .len(),
        10
    );
}

#[tokio::test]
async fn nic_limit_is_nic_limit_reached() {
    let lab = Lab::with_subnet("10.240.0.0/16", 1).await;
    lab.set_faults(json!({"operation_retry_after_secs": 0}))
        .await;
    let (provider, _) = lab.provider("node-1");
    let nic = lab.nic_id("node-1");
    // The primary plus 255 secondaries is Azure's 256.
    assert_eq!(
        provider
            .assign_ips(&nic, &lab.subnet_id(), 255)
            .await
            .unwrap()
            .len(),
        255
    );
    let err = provider
        .assign_ips(&nic, &lab.subnet_id(), 1)
        .await
        .unwrap_err();
    assert!(matches!(err, CloudError::NicLimitReached { .. }), "{err:?}");
}

#[tokio::test]
async fn server_errors_are_retried_then_reported_clearly() {
    let lab = Lab::with_subnet("10.240.0.0/24", 1).await;
    let nic = lab.nic_id("node-1");
    lab.set_faults(json!({"server_error": {"count": 2, "operations": ["nic_put"]}, "operation_retry_after_secs": 0}))
        .await;
    let (provider, sleeper) = lab.provider("node-1");
    provider
        .assign_ips(&nic, &lab.subnet_id(), 1)
        .await
        .unwrap();
    assert_eq!(lab.counters().await.responses("nic_put", 500), 2);
    let backoffs = sleeper.delays();
    assert!(
        backoffs[0] >= Duration::from_millis(100) && backoffs[0] <= Duration::from_millis(200),
        "{backoffs:?}"
    );
    assert!(
        backoffs[1] >= Duration::from_millis(200) && backoffs[1] <= Duration::from_millis(400),
        "{backoffs:?}"
    );

    // Never recovering: a bounded number of attempts, growing delays, then an error saying so.
    lab.set_faults(json!({"server_error": {"status": 503, "code": "ServiceUnavailable", "operations": ["nic_get"]}}))
        .await;
    let (provider, sleeper) = lab.provider("node-1");
    let err = provider.list_secondary_ips(&nic).await.unwrap_err();
    match &err {
        CloudError::Transient(message) => {
            assert!(message.contains("giving up after 4 attempts"), "{message}");
            assert!(message.contains("503 ServiceUnavailable"), "{message}");
        }
        other => panic!("expected Transient, got {other:?}"),
    }
    let delays = sleeper.delays();
    assert_eq!(delays.len(), 3);
    assert!(delays.windows(2).all(|w| w[0] <= w[1]), "{delays:?}");
    assert_eq!(lab.counters().await.responses("nic_get", 503), 4);
}

#[tokio::test]
async fn write_with_lost_answer_is_resolved_by_rereading() {
    let lab = Lab::with_subnet("10.240.0.0/24", 1).await;
    lab.set_faults(json!({"lost_response": {"count": 1}, "operation_retry_after_secs": 0}))
        .await;
    let (provider, _) = lab.provider("node-1");
    let added = provider
        .assign_ips(&lab.nic_id("node-1"), &lab.subnet_id(), 2)
        .await
        .unwrap();
    assert_eq!(added.len(), 2);
    // The PUT took effect; the client saw a 500, re-read, and did not write again.
    assert_eq!(lab.counters().await.calls("nic_put"), 1);
    assert_eq!(lab.secondary_on("node-1").await.len(), 2);
}

#[tokio::test]
async fn forbidden_names_the_missing_permission() {
    let lab = Lab::with_subnet("10.240.0.0/24", 1).await;
    lab.set_faults(json!({"forbidden": {"operations": ["nic_put"]}}))
        .await;
    let (provider, _) = lab.provider("node-1");
    let err = provider
        .assign_ips(&lab.nic_id("node-1"), &lab.subnet_id(), 1)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CloudError::Unauthorized { message } if message.contains("Microsoft.Network/networkInterfaces/write")),
        "{err:?}"
    );
}

#[tokio::test]
async fn unknown_nic_is_not_found() {
    let lab = Lab::with_subnet("10.240.0.0/24", 1).await;
    let (provider, _) = lab.provider("node-1");
    let err = provider
        .list_secondary_ips(&lab.nic_id("ghost"))
        .await
        .unwrap_err();
    assert!(matches!(err, CloudError::NotFound(_)), "{err:?}");
}

/// 16 nodes, each with its own client (as 16 agents), assign and release concurrently under
/// throttling, busy answers and etag races. No address is ever held by two NICs: neither in the
/// cloud's view (sampled continuously) nor in what the clients were told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_nics_never_share_an_address() {
    let lab = Arc::new(Lab::with_subnet("10.240.0.0/24", 16).await);
    lab.set_faults(json!({
        "latency": {"*": {"fixed_ms": 1, "jitter_ms": 5}},
        "throttle": {"probability": 0.05, "retry_after_secs": 1, "operations": ["nic_put"]},
        "busy": {"probability": 0.05, "retry_after_secs": 1},
        "etag_race": {"probability": 0.1},
        "operation_retry_after_secs": 0
    }))
    .await;
    // Client-side ledger: address -> node, filled on assign, emptied on release.
    let ledger: Arc<Mutex<HashMap<Ipv4Addr, String>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let watcher = {
        let (lab, stop) = (lab.clone(), stop.clone());
        tokio::spawn(async move {
            let mut samples = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let state = lab.state().await;
                let mut seen = HashMap::new();
                for a in &state.addresses {
                    if let Some(other) = seen.insert(a.ip, a.nic.clone()) {
                        panic!("{} held by {other} and {}", a.ip, a.nic);
                    }
                }
                samples += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            samples
        })
    };

    let nodes: Vec<_> = (1..=16)
        .map(|i| {
            let vm = format!("node-{i}");
            let (provider, _) = lab.provider(&vm);
            let (nic, subnet, ledger) = (lab.nic_id(&vm), lab.subnet_id(), ledger.clone());
            tokio::spawn(async move {
                let mut held: Vec<Ipv4Addr> = Vec::new();
                for round in 0..4 {
                    let added = provider.assign_ips(&nic, &subnet, 3).await.unwrap();
                    {
                        let mut ledger = ledger.lock().unwrap();
                        for s in &added {
                            if let Some(owner) = ledger.insert(s.ip, vm.clone()) {
                                panic!("{} given to {vm} while {owner} holds it", s.ip);
                            }
                        }
                    }
                    held.extend(added.iter().map(|s| s.ip));
                    let release: Vec<Ipv4Addr> = held.drain(..2 + round % 2).collect();
                    {
                        let mut ledger = ledger.lock().unwrap();
                        for ip in &release {
                            ledger.remove(ip);
                        }
                    }
                    provider.release_ips(&nic, &release).await.unwrap();
                }
                held.sort();
                (vm, held)
            })
        })
        .collect();
    let mut expected = HashMap::new();
    for node in nodes {
        let (vm, held) = node.await.unwrap();
        expected.insert(vm, held);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(watcher.await.unwrap() > 0);

    for (vm, held) in &expected {
        assert_eq!(
            &lab.secondary_on(vm).await,
            held,
            "{vm}: cloud and client disagree"
        );
    }
    let counters = lab.counters().await;
    assert!(
        counters.injected("etag_race") > 0,
        "the run should have seen etag races"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_coalesced_with_a_failing_assign_still_happen() {
    // /28: 10 free addresses besides the VM's own.
    let lab = Lab::with_subnet("10.240.0.0/28", 1).await;
    lab.set_faults(json!({"operation_retry_after_secs": 0}))
        .await;
    let (provider, _) = lab.provider("node-1");
    let nic = lab.nic_id("node-1");
    let held: Vec<Ipv4Addr> = provider
        .assign_ips(&nic, &lab.subnet_id(), 10)
        .await
        .unwrap()
        .iter()
        .map(|s| s.ip)
        .collect();
    // Hold the NIC's writer with a slow write so the next two requests land in one batch.
    lab.set_faults(
        json!({"latency": {"nic_put": {"fixed_ms": 300}}, "operation_retry_after_secs": 0}),
    )
    .await;
    let first = {
        let (provider, nic) = (provider.clone(), nic.clone());
        let ip = held[0];
        tokio::spawn(async move { provider.release_ips(&nic, &[ip]).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (p1, p2, n1, n2, subnet) = (
        provider.clone(),
        provider.clone(),
        nic.clone(),
        nic.clone(),
        lab.subnet_id(),
    );
    let too_many = tokio::spawn(async move { p1.assign_ips(&n1, &subnet, 5).await });
    let ip = held[1];
    let release = tokio::spawn(async move { p2.release_ips(&n2, &[ip]).await });
    first.await.unwrap().unwrap();
    let err = too_many.await.unwrap().unwrap_err();
    assert!(matches!(err, CloudError::SubnetFull { .. }), "{err:?}");
    release.await.unwrap().unwrap();
    assert_eq!(lab.secondary_on("node-1").await.len(), 8);
}

#[test]
fn every_credential_kind_builds_without_network() {
    use vnet_cloud::azure::{AzureConfig, AzureProvider, CredentialConfig};
    let dir = std::env::temp_dir().join(format!("vnet-cloud-cred-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("secret");
    let token = dir.join("token");
    std::fs::write(&secret, "s3cret\n").unwrap();
    std::fs::write(&token, "eyJhbGciOi.fake.token").unwrap();
    let tenant = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    let kinds = [
        CredentialConfig::from_settings("managed_identity", "", "", "").unwrap(),
        CredentialConfig::from_settings(
            "managed_identity",
            "11111111-2222-3333-4444-555555555555",
            "",
            "",
        )
        .unwrap(),
        CredentialConfig::WorkloadIdentity {
            tenant_id: Some(tenant.into()),
            client_id: Some("app".into()),
            token_file: Some(token.clone()),
        },
        CredentialConfig::from_settings("client_secret", "app", tenant, secret.to_str().unwrap())
            .unwrap(),
        CredentialConfig::from_settings("none", "", "", "").unwrap(),
    ];
    for credential in kinds {
        let config = AzureConfig::azure(credential.clone());
        assert!(AzureProvider::new(config).is_ok(), "{credential:?}");
    }
    // A secret file that cannot be read is a clear configuration error.
    let missing =
        CredentialConfig::from_settings("client_secret", "app", tenant, "/nonexistent/secret")
            .unwrap();
    let err = AzureProvider::new(AzureConfig::azure(missing))
        .err()
        .expect("must fail");
    assert!(
        matches!(&err, CloudError::Fatal(m) if m.contains("/nonexistent/secret")),
        "{err:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every test here runs against the shipped role: the lab's mock knows each agent as a principal
/// and refuses a caller it does not know.
#[tokio::test]
async fn the_lab_mock_authorizes_every_call_against_the_shipped_role() {
    let lab = Lab::with_subnet("10.240.0.0/24", 1).await;
    let url = format!(
        "{}{}?api-version=2024-05-01",
        lab.mock.base_url(),
        lab.nic_id("node-1")
    );
    let anonymous = reqwest::Client::new().get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let agent = lab.http.get(&url).send().await.unwrap();
    assert_eq!(agent.status(), 200);
}
