//! The agent over its real Unix socket, against the in-process FakeCloud.

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use common::*;
use hyper::Method;
use vnet_agent::client::ClientError;
use vnet_agent::netlink::FakeLinks;
use vnet_agent::store::JournalStore;
use vnet_api::{ErrorCode, ErrorResponse, GcRequest, ReleaseRequest};
use vnet_cloud::CloudError;
use vnet_cloud::fake::FakeCloud;

fn api_error(e: ClientError) -> (u16, ErrorCode) {
    match e {
        ClientError::Api { status, error } => (status, error.code),
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_400_that_names_the_problem_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(test_config(dir.path()), Arc::new(FakeCloud::new())).await;
    agent.client.allocate(&alloc_req("keep")).await.unwrap();
    let before_allocs = agent.client.allocations().await.unwrap();
    let before_pool = agent.client.status().await.unwrap().pool;

    let cases: &[(&str, &str, &str)] = &[
        (vnet_api::PATH_ALLOCATE, "{not json", "invalid request body"),
        (
            vnet_api::PATH_ALLOCATE,
            r#"{"container_id":"abc"}"#,
            "ifname",
        ),
        (
            vnet_api::PATH_ALLOCATE,
            r#"{"container_id":"../etc","ifname":"eth0"}"#,
            "container ID",
        ),
        (
            vnet_api::PATH_ALLOCATE,
            r#"{"container_id":"abc","ifname":"eth0","extra":1}"#,
            "extra",
        ),
        (vnet_api::PATH_ALLOCATE, "", "invalid request body"),
        (
            vnet_api::PATH_RELEASE,
            r#"{"container_id":"keep","ifname":"eth0","dying_veth":"eth0"}"#,
            "tombstone",
        ),
        (
            vnet_api::PATH_RELEASE,
            r#"{"container_id":"keep"}"#,
            "ifname",
        ),
        (
            vnet_api::PATH_GC,
            r#"{"valid_attachments":[{"container_id":"-x","ifname":"eth0"}]}"#,
            "container ID",
        ),
        (vnet_api::PATH_GC, r#"{}"#, "valid_attachments"),
    ];
    for (path, body, needle) in cases {
        let (status, bytes) = agent
            .client
            .raw(Method::POST, path, body.as_bytes().to_vec())
            .await
            .unwrap();
        assert_eq!(status, 400, "{path} {body}");
        let err: ErrorResponse = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            panic!(
                "error body is an ErrorResponse: {}",
                String::from_utf8_lossy(&bytes)
            )
        });
        assert_eq!(err.code, ErrorCode::BadRequest);
        assert!(
            err.message.contains(needle),
            "{path} {body}: {}",
            err.message
        );
    }
    let (status, _) = agent
        .client
        .raw(Method::GET, "/v2/allocate", Vec::new())
        .await
        .unwrap();
    assert_eq!(status, 404);
    // The agent answers 413 as soon as the body passes its limit and closes the connection; a
    // client still writing the rest may see that close before it reads the answer. Either way
    // the body is refused and nothing changes (checked below).
    match agent
        .client
        .raw(Method::POST, vnet_api::PATH_ALLOCATE, vec![b' '; 2 << 20])
        .await
    {
        Ok((status, _)) => assert_eq!(status, 413, "oversized bodies are refused"),
        Err(e) => assert!(
            format!("{e:?}").contains("error writing a body to connection"),
            "oversized body: {e:?}"
        ),
    }

    assert_eq!(agent.client.allocations().await.unwrap(), before_allocs);
    assert_eq!(
        agent.client.status().await.unwrap().pool.allocated,
        before_pool.allocated
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocate_release_and_gc_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(test_config(dir.path()), Arc::new(FakeCloud::new())).await;
    let c = &agent.client;
    let first = c.allocate(&alloc_req("a")).await.unwrap();
    let again = c.allocate(&alloc_req("a")).await.unwrap();
    assert_eq!(
        first.allocation, again.allocation,
        "a repeated ADD gets the same IP"
    );
    assert_eq!(first.gateway, vnet_api::POD_GATEWAY);
    assert_eq!(first.mtu, 1500);
    assert_eq!(
        first.allocation.host_veth,
        vnet_api::host_veth_name("vnet", &key("a"))
    );
    let mut eth1 = alloc_req("a");
    eth1.key.ifname = "eth1".parse().unwrap();
    let second_if = c.allocate(&eth1).await.unwrap();
    assert_ne!(second_if.allocation.ip, first.allocation.ip);

    let released = c.release(&release_req("a")).await.unwrap();
    assert_eq!(released.released.unwrap().ip, first.allocation.ip);
    assert!(
        c.release(&release_req("a"))
            .await
            .unwrap()
            .released
            .is_none()
    );
    assert!(
        c.release(&release_req("never"))
            .await
            .unwrap()
            .released
            .is_none()
    );

    for id in ["b", "c", "d"] {
        c.allocate(&alloc_req(id)).await.unwrap();
    }
    let gc = GcRequest {
        valid_attachments: vec![key("b"), eth1.key.clone()],
        network: Some("vnet".into()),
        allocated_before: Some(vnet_agent::agent::now_secs() + 1),
    };
    let out = c.gc(&gc).await.unwrap();
    let gone: BTreeSet<String> = out.released.iter().map(|a| a.key.to_string()).collect();
    assert_eq!(gone, ["c/eth0".to_string(), "d/eth0".to_string()].into());
    assert!(
        c.gc(&gc).await.unwrap().released.is_empty(),
        "GC is idempotent"
    );
    let left: BTreeSet<String> = c
        .allocations()
        .await
        .unwrap()
        .allocations
        .iter()
        .map(|a| a.key.to_string())
        .collect();
    assert_eq!(left, ["a/eth1".to_string(), "b/eth0".to_string()].into());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_releases_only_its_own_networks_old_allocations() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(test_config(dir.path()), Arc::new(FakeCloud::new())).await;
    let c = &agent.client;
    let on = |id: &str, network: Option<&str>| {
        let mut r = alloc_req(id);
        r.network = network.map(Into::into);
        r
    };
    for (id, network) in [
        ("blue-a", Some("blue")),
        ("blue-b", Some("blue")),
        ("red-a", Some("red")),
        // As recorded before the agent kept networks.
        ("legacy", None),
        ("legacy-gone", None),
    ] {
        c.allocate(&on(id, network)).await.unwrap();
    }
    let gc = |network: Option<&str>, valid: &[&str], allocated_before: Option<u64>| GcRequest {
        valid_attachments: valid.iter().map(|id| key(id)).collect(),
        network: network.map(Into::into),
        allocated_before,
    };
    let released = |r: vnet_api::GcResponse| -> BTreeSet<String> {
        r.released
            .iter()
            .map(|a| a.key.container_id.to_string())
            .collect()
    };
    let later = Some(vnet_agent::agent::now_secs() + 1);
    // Just made: the runtime's list may predate them, so the default cut-off spares them all.
    let out = c.gc(&gc(Some("blue"), &[], None)).await.unwrap();
    assert!(
        out.released.is_empty(),
        "young allocations released: {out:?}"
    );
    // Blue's GC frees blue's stale attachment only: never red's, never one without a network.
    let out = c
        .gc(&gc(Some("blue"), &["blue-a", "legacy"], later))
        .await
        .unwrap();
    assert_eq!(released(out), ["blue-b".to_string()].into());
    let network_of = |all: &[vnet_api::Allocation], id: &str| {
        all.iter()
            .find(|a| a.key == key(id))
            .map(|a| a.network.clone())
    };
    let all = c.allocations().await.unwrap().allocations;
    assert_eq!(network_of(&all, "red-a"), Some(Some("red".into())));
    assert_eq!(
        network_of(&all, "legacy"),
        Some(Some("blue".into())),
        "blue listed it: claimed"
    );
    assert_eq!(
        network_of(&all, "legacy-gone"),
        Some(None),
        "kept, unclaimed"
    );
    // Red's GC frees red's and leaves the claimed one to blue.
    let out = c.gc(&gc(Some("red"), &[], later)).await.unwrap();
    assert_eq!(released(out), ["red-a".to_string()].into());
    // A plugin from before networks collects only what carries no network.
    let out = c.gc(&gc(None, &[], later)).await.unwrap();
    assert_eq!(released(out), ["legacy-gone".to_string()].into());
    let left: BTreeSet<String> = c
        .allocations()
        .await
        .unwrap()
        .allocations
        .iter()
        .map(|a| a.key.container_id.to_string())
        .collect();
    assert_eq!(left, ["blue-a".to_string(), "legacy".to_string()].into());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_allocations_get_distinct_durable_ips() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Arc::new(FakeCloud::new());
    let agent = TestAgent::start(test_config(dir.path()), cloud.clone()).await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let client = agent.client.clone();
        tasks.push(tokio::spawn(async move {
            client.allocate(&alloc_req(&format!("pod{i}"))).await
        }));
    }
    let mut ips = BTreeSet::new();
    for t in tasks {
        let r = t.await.unwrap().expect("every allocation succeeds");
        assert!(ips.insert(r.allocation.ip), "duplicate {}", r.allocation.ip);
    }
    assert_eq!(ips.len(), 200);
    let on_nic: BTreeSet<Ipv4Addr> = cloud.secondary_ips().into_iter().collect();
    assert!(ips.is_subset(&on_nic), "every address is on the NIC");
    eprintln!(
        "cloud assign calls for 200 concurrent allocations: {}",
        cloud.assign_calls()
    );
    let state_dir = agent.state_dir.clone();
    agent.stop().await;

    let on_disk = JournalStore::read_state(&state_dir).unwrap();
    let disk_ips: BTreeSet<Ipv4Addr> = on_disk.allocations.values().map(|a| a.ip).collect();
    assert_eq!(disk_ips, ips, "all allocations are on disk");
    assert!(on_disk.duplicate_ips().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cooldown_survives_a_restart_and_the_spool_is_drained_before_serving() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Arc::new(FakeCloud::new());
    let mut config = test_config(dir.path());
    config.pool.cooldown_secs = 3_600;
    config.pool.warm = 1;
    config.pool.batch = 1;

    let agent = TestAgent::start(config.clone(), cloud.clone()).await;
    let a = agent
        .client
        .allocate(&alloc_req("a"))
        .await
        .unwrap()
        .allocation
        .ip;
    let b = agent
        .client
        .allocate(&alloc_req("b"))
        .await
        .unwrap()
        .allocation
        .ip;
    agent.client.release(&release_req("a")).await.unwrap();
    assert_eq!(agent.client.status().await.unwrap().pool.cooldown, 1);
    agent.stop().await;

    // While the agent is down, DEL for b is spooled by the plugin.
    let spool = config.spool_dir();
    std::fs::create_dir_all(&spool).unwrap();
    let spooled = spool.join(vnet_api::spool_file_name(&key("b")));
    std::fs::write(&spooled, serde_json::to_vec(&release_req("b")).unwrap()).unwrap();

    let agent = TestAgent::start(config, cloud.clone()).await;
    // Before any new allocation: b is released and its file gone.
    assert!(
        agent
            .client
            .allocations()
            .await
            .unwrap()
            .allocations
            .is_empty()
    );
    assert!(!spooled.exists(), "drained spool file is deleted");
    let status = agent.client.status().await.unwrap();
    assert_eq!(
        status.pool.cooldown, 2,
        "both addresses still cool down after the restart"
    );
    for id in ["c", "d", "e"] {
        let ip = agent
            .client
            .allocate(&alloc_req(id))
            .await
            .unwrap()
            .allocation
            .ip;
        assert!(
            ip != a && ip != b,
            "{ip} was handed out during its cooldown"
        );
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allocation_the_cloud_does_not_show_is_kept_but_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Arc::new(FakeCloud::new());
    let config = test_config(dir.path());
    let agent = TestAgent::start(config.clone(), cloud.clone()).await;
    let lost = agent
        .client
        .allocate(&alloc_req("a"))
        .await
        .unwrap()
        .allocation
        .ip;
    agent.stop().await;

    cloud.remove_external(lost);
    let agent = TestAgent::start(config, cloud.clone()).await;
    let status = agent.client.status().await.unwrap();
    assert_eq!(status.unreconciled, vec![lost]);
    let allocs = agent.client.allocations().await.unwrap().allocations;
    assert_eq!(allocs.len(), 1, "the allocation is kept");
    let metrics = reqwest_metrics(&agent.metrics_address).await;
    assert!(
        metrics.contains(r#"vnet_agent_ip_addresses{state="unreconciled"} 1"#),
        "{metrics}"
    );
    for i in 0..20 {
        let ip = agent
            .client
            .allocate(&alloc_req(&format!("n{i}")))
            .await
            .unwrap()
            .allocation
            .ip;
        assert_ne!(ip, lost);
    }
    agent.client.release(&release_req("a")).await.unwrap();
    let status = agent.client.status().await.unwrap();
    assert!(status.unreconciled.is_empty());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_subnet_fails_fast_and_shows_in_status_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    // Hosts .10 to .14 only.
    let cloud = Arc::new(FakeCloud::with_subnet("10.9.0.0/28".parse().unwrap()));
    let mut config = test_config(dir.path());
    config.pool.warm = 0;
    config.pool.batch = 1;
    let agent = TestAgent::start(config, cloud.clone()).await;
    for i in 0..5 {
        agent
            .client
            .allocate(&alloc_req(&format!("p{i}")))
            .await
            .unwrap();
    }
    let err = agent.client.allocate(&alloc_req("p5")).await.unwrap_err();
    assert_eq!(api_error(err), (503, ErrorCode::Exhausted));
    let status = agent.client.status().await.unwrap();
    assert!(status.subnet_full);
    assert!(!status.can_allocate);
    assert!(status.reason.unwrap().contains("SubnetIsFull"));
    assert!(status.last_cloud_error.unwrap().contains("full"));
    let metrics = reqwest_metrics(&agent.metrics_address).await;
    assert!(metrics.contains("vnet_agent_subnet_full 1"), "{metrics}");
    assert!(
        metrics.contains(
            r#"vnet_agent_cloud_errors_total{operation="assign_ips",code="subnet_full"}"#
        )
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_pool_that_cannot_grow_in_time_says_try_again_later() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Arc::new(FakeCloud::new());
    let mut config = test_config(dir.path());
    config.pool.warm = 0;
    config.pool.allocate_timeout_secs = 1;
    let agent = TestAgent::start(config, cloud.clone()).await;
    for _ in 0..50 {
        cloud.fail_next(CloudError::Throttled {
            retry_after: std::time::Duration::from_secs(1),
        });
    }
    let err = agent.client.allocate(&alloc_req("a")).await.unwrap_err();
    assert_eq!(api_error(err), (503, ErrorCode::TryAgainLater));
    assert!(
        agent
            .client
            .allocations()
            .await
            .unwrap()
            .allocations
            .is_empty()
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_private_and_metrics_count_requests() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(test_config(dir.path()), Arc::new(FakeCloud::new())).await;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&agent.socket), 0o600);
    assert_eq!(mode(agent.socket.parent().unwrap()), 0o700);
    agent.client.allocate(&alloc_req("a")).await.unwrap();
    let _ = agent
        .client
        .raw(Method::POST, vnet_api::PATH_ALLOCATE, b"{".to_vec())
        .await;
    let metrics = reqwest_metrics(&agent.metrics_address).await;
    for needle in [
        r#"vnet_agent_api_requests_total{endpoint="/v1/allocate",result="200"} 1"#,
        r#"vnet_agent_api_requests_total{endpoint="/v1/allocate",result="400"} 1"#,
        r#"vnet_agent_ip_addresses{state="allocated"} 1"#,
        "vnet_agent_allocate_latency_seconds_count 1",
        "vnet_agent_store_commit_latency_seconds_count",
        "vnet_agent_pool_target",
        r#"vnet_agent_cloud_calls_total{operation="assign_ips",code="ok"}"#,
    ] {
        assert!(metrics.contains(needle), "missing {needle}:\n{metrics}");
    }
    let socket = agent.socket.clone();
    agent.stop().await;
    assert!(!socket.exists(), "the socket is removed on shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dying_veth_is_deleted_before_its_address_returns() {
    let dir = tempfile::tempdir().unwrap();
    let links = Arc::new(FakeLinks::default());
    // A tombstone a crashed DEL left behind, one a release hands over, and a link that only
    // shares the prefix (not ours: never deleted).
    let leftover = vnet_api::tombstone_veth_name("vnetleftover001");
    let dying = vnet_api::tombstone_veth_name(&vnet_api::host_veth_name("vnet", &key("a")));
    let not_ours = "vdelnotours01".to_string();
    for name in [&leftover, &dying, &not_ours] {
        links.links.lock().unwrap().insert(name.clone());
    }
    let mut config = test_config(dir.path());
    config.pool.warm = 0;
    config.pool.batch = 1;
    let agent =
        TestAgent::start_with_links(config, Arc::new(FakeCloud::new()), links.clone()).await;
    // The start-up sweep removes tombstones nobody claims.
    eventually("leftover tombstone deleted", || async {
        links.deleted.lock().unwrap().contains(&leftover)
    })
    .await;

    links.busy.store(true, std::sync::atomic::Ordering::SeqCst);
    let a = agent
        .client
        .allocate(&alloc_req("a"))
        .await
        .unwrap()
        .allocation
        .ip;
    agent
        .client
        .release(&ReleaseRequest {
            key: key("a"),
            dying_veth: Some(dying.clone()),
        })
        .await
        .unwrap();
    // The link cannot be deleted yet: the address stays out of the pool.
    let b = agent
        .client
        .allocate(&alloc_req("b"))
        .await
        .unwrap()
        .allocation
        .ip;
    assert_ne!(a, b);
    assert_eq!(agent.client.status().await.unwrap().pool.cooldown, 1);
    links.busy.store(false, std::sync::atomic::Ordering::SeqCst);
    eventually("dying veth deleted and its address free", || async {
        agent.client.status().await.unwrap().pool.cooldown == 0
    })
    .await;
    assert!(links.deleted.lock().unwrap().contains(&dying));
    assert!(
        !links.deleted.lock().unwrap().contains(&not_ours),
        "a link that is not a tombstone is never deleted"
    );
    assert!(links.links.lock().unwrap().contains(&not_ours));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_shrinks_after_the_release_delay() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Arc::new(FakeCloud::new());
    let mut config = test_config(dir.path());
    config.pool.warm = 2;
    config.pool.batch = 2;
    config.pool.release_delay_secs = 0;
    let agent = TestAgent::start(config, cloud.clone()).await;
    for i in 0..10 {
        agent
            .client
            .allocate(&alloc_req(&format!("p{i}")))
            .await
            .unwrap();
    }
    for i in 0..10 {
        agent
            .client
            .release(&release_req(&format!("p{i}")))
            .await
            .unwrap();
    }
    eventually("pool back to warm + at most one batch", || async {
        let s = agent.client.status().await.unwrap();
        s.pool.total <= 4 && s.pool.free >= 2
    })
    .await;
    assert!(cloud.release_calls() >= 1);
    eventually("cloud agrees", || async {
        let s = agent.client.status().await.unwrap();
        cloud.secondary_ips().len() as u32 == s.pool.total
    })
    .await;
    agent.stop().await;
}

/// GET /metrics over plain HTTP on loopback.
async fn reqwest_metrics(address: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_the_answer_is_exhausted_unless_an_address_is_cooling_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.pool.max = 3;
    config.pool.warm = 1;
    config.pool.batch = 1;
    config.pool.cooldown_secs = 3_600;
    config.pool.allocate_timeout_secs = 1;
    let agent = TestAgent::start(config, Arc::new(FakeCloud::new())).await;
    for id in ["a", "b", "c"] {
        agent.client.allocate(&alloc_req(id)).await.unwrap();
    }
    let err = agent.client.allocate(&alloc_req("d")).await.unwrap_err();
    assert_eq!(api_error(err), (503, ErrorCode::Exhausted));
    let status = agent.client.status().await.unwrap();
    assert!(!status.can_allocate);
    assert_eq!(status.pool.max, 3);
    // One address comes back later (cooldown): not exhausted, but not now either.
    agent.client.release(&release_req("a")).await.unwrap();
    let err = agent.client.allocate(&alloc_req("d")).await.unwrap_err();
    assert_eq!(api_error(err), (503, ErrorCode::TryAgainLater));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_demand_grows_the_pool_ahead_of_the_pods() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Arc::new(FakeCloud::new());
    let agent = TestAgent::start(test_config(dir.path()), cloud.clone()).await;
    eventually("warm pool", || async {
        agent.client.status().await.unwrap().pool.free >= 8
    })
    .await;
    // What the Kubernetes integration does when 20 pods are scheduled to the node.
    agent.agent.set_pending_demand(20);
    eventually("pool grown for warm + demand", || async {
        agent.client.status().await.unwrap().pool.free >= 28
    })
    .await;
    assert!(cloud.secondary_ips().len() >= 28);
    agent.stop().await;
}

/// A small tmpfs mounted on `path`, unmounted when dropped (on failure too).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount: {out:?}");
        Tmpfs(path.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_allocations_until_space_is_freed_then_the_agent_recovers() {
    // Regression: a failed journal write poisoned the store until a restart.
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    let _tmpfs = Tmpfs::mount(&config.state_dir, "1m");
    config.pool.cooldown_secs = 0;
    let agent = TestAgent::start(config.clone(), Arc::new(FakeCloud::new())).await;
    let c = &agent.client;
    c.allocate(&alloc_req("before")).await.unwrap();
    // Fill the file system.
    let filler = config.state_dir.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let mut small = [0u8; 512].to_vec();
        while !small.is_empty() {
            if f.write_all(&small).is_err() {
                small.truncate(small.len() / 2);
            }
        }
        let _ = f.sync_all();
    }
    // Allocations go on until the journal's last page is full, then fail.
    let mut refused = None;
    for i in 0..500 {
        if let Err(e) = c.allocate(&alloc_req(&format!("full-{i}"))).await {
            refused = Some(e);
            break;
        }
    }
    let refused = refused.expect("an allocation fails on a full disk");
    assert_eq!(api_error(refused).1, ErrorCode::Internal);
    assert!(!c.health().await.is_ok_and(|h| h.ready));
    let err = c.allocate(&alloc_req("while-full")).await.unwrap_err();
    assert_eq!(api_error(err).1, ErrorCode::NotReady);
    // Space comes back: the agent re-opens its store by itself, no restart.
    std::fs::remove_file(&filler).unwrap();
    eventually("the agent is ready again", || async {
        c.health().await.is_ok_and(|h| h.ready)
    })
    .await;
    let after = c.allocate(&alloc_req("after")).await.unwrap();
    let served: BTreeSet<_> = c
        .allocations()
        .await
        .unwrap()
        .allocations
        .into_iter()
        .map(|a| (a.key.to_string(), a.ip))
        .collect();
    assert!(served.contains(&(key("after").to_string(), after.allocation.ip)));
    agent.stop().await;
    // What it served is exactly what is durable.
    let durable: BTreeSet<_> = JournalStore::read_state(&config.state_dir)
        .unwrap()
        .allocations
        .into_values()
        .map(|a| (a.key.to_string(), a.ip))
        .collect();
    assert_eq!(durable, served);
}

/// A cloud that answers nothing: an ARM and IMDS outage.
struct DownCloud;

#[async_trait::async_trait]
impl vnet_cloud::CloudProvider for DownCloud {
    async fn discover(&self) -> Result<vnet_cloud::NodeIdentity, CloudError> {
        Err(CloudError::Transient("IMDS unreachable".into()))
    }
    async fn list_secondary_ips(
        &self,
        _: &str,
    ) -> Result<Vec<vnet_cloud::SecondaryIp>, CloudError> {
        Err(CloudError::Transient("ARM unreachable".into()))
    }
    async fn assign_ips(
        &self,
        _: &str,
        _: &str,
        _: usize,
    ) -> Result<Vec<vnet_cloud::SecondaryIp>, CloudError> {
        Err(CloudError::Transient("ARM unreachable".into()))
    }
    async fn release_ips(&self, _: &str, _: &[Ipv4Addr]) -> Result<(), CloudError> {
        Err(CloudError::Transient("ARM unreachable".into()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_during_a_cloud_outage_serves_from_the_stored_pool() {
    // Regression: after a restart with the cloud unreachable the agent served nothing.
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.pool.warm = 3;
    config.pool.batch = 3;
    let cloud = Arc::new(FakeCloud::new());
    let agent = TestAgent::start(config.clone(), cloud.clone()).await;
    let a = agent.client.allocate(&alloc_req("a")).await.unwrap();
    eventually("the warm pool is there", || async {
        agent.client.status().await.unwrap().pool.free >= 2
    })
    .await;
    agent.stop().await;

    // The cloud goes away; the agent restarts (on a fresh metrics port: the old one may linger).
    config.metrics_address = test_config(dir.path()).metrics_address;
    let agent = TestAgent::start(config.clone(), Arc::new(DownCloud)).await;
    let c = &agent.client;
    let status = c.status().await.unwrap();
    assert!(status.last_cloud_error.is_some(), "{status:?}");
    let listed = c.allocations().await.unwrap().allocations;
    assert_eq!(listed.len(), 1, "the stored allocation is kept");
    assert_eq!(listed[0].ip, a.allocation.ip);
    let b = c.allocate(&alloc_req("b")).await.unwrap();
    assert!(
        cloud.secondary_ips().contains(&b.allocation.ip),
        "from the stored pool, on the NIC"
    );
    assert_ne!(b.allocation.ip, a.allocation.ip);
    let released = c.release(&release_req("a")).await.unwrap();
    assert_eq!(released.released.unwrap().ip, a.allocation.ip);
    agent.stop().await;

    // The cloud is back: the agent reconciles and keeps what it did meanwhile.
    config.metrics_address = test_config(dir.path()).metrics_address;
    let agent = TestAgent::start(config, cloud.clone()).await;
    let listed = agent.client.allocations().await.unwrap().allocations;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].ip, b.allocation.ip);
    assert!(agent.client.status().await.unwrap().unreconciled.is_empty());
    agent.stop().await;
}
