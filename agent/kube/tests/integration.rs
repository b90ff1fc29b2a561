//! `vnet_kube::run` against the fake API server, under paused tokio time.

mod support;

use std::collections::{BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use http::Method;
use serde_json::{Value, json};
use support::{FakeApi, NODES, PODS, POOLS};
use tokio::sync::oneshot;
use vnet_api::{Allocation, AttachmentKey, PodRef, PoolStatus, StatusResponse};
use vnet_kube::{BoxError, KubeConfig, NodeAgent, NodeIPPoolSpec};

const NODE: &str = "node-1";
const NODE_UID: &str = "node-uid-1";

#[derive(Default)]
struct FakeAgent {
    status: Mutex<Option<StatusResponse>>,
    allocations: Mutex<Vec<Allocation>>,
    released: Mutex<Vec<AttachmentKey>>,
    demand: Mutex<Option<u32>>,
    veths: Mutex<HashSet<String>>,
    overrides: Mutex<Option<NodeIPPoolSpec>>,
    cni_conf_dir: Mutex<Option<std::path::PathBuf>>,
}

#[async_trait]
impl NodeAgent for FakeAgent {
    fn status(&self) -> StatusResponse {
        self.status
            .lock()
            .unwrap()
            .clone()
            .unwrap_or(StatusResponse {
                ready: true,
                can_allocate: true,
                reason: None,
                node: NODE.into(),
                pool: PoolStatus {
                    total: 16,
                    allocated: 2,
                    free: 14,
                    cooldown: 0,
                    target: 16,
                    pending: 0,
                    max: 250,
                },
                subnet_full: false,
                last_cloud_error: None,
                unreconciled: vec![],
            })
    }

    fn allocations(&self) -> Vec<Allocation> {
        self.allocations.lock().unwrap().clone()
    }

    async fn release(&self, key: &AttachmentKey) -> Result<(), BoxError> {
        self.allocations.lock().unwrap().retain(|a| &a.key != key);
        self.released.lock().unwrap().push(key.clone());
        Ok(())
    }

    fn set_pending_demand(&self, pods: u32) {
        *self.demand.lock().unwrap() = Some(pods);
    }

    fn host_veth_exists(&self, name: &str) -> bool {
        self.veths.lock().unwrap().contains(name)
    }

    fn apply_pool_overrides(&self, overrides: &NodeIPPoolSpec) {
        *self.overrides.lock().unwrap() = Some(overrides.clone());
    }

    fn cni_conf_dir(&self) -> Option<std::path::PathBuf> {
        self.cni_conf_dir.lock().unwrap().clone()
    }
}

impl FakeAgent {
    fn allocate(&self, container: &str, pod: &str, pod_uid: &str, ip_last: u8) -> Allocation {
        let key = AttachmentKey {
            container_id: container.parse().unwrap(),
            ifname: "eth0".parse().unwrap(),
        };
        let allocation = Allocation {
            ip: Ipv4Addr::new(10, 240, 0, ip_last),
            network: None,
            host_veth: vnet_api::host_veth_name("vnet", &key),
            key,
            pod: PodRef {
                namespace: Some("default".into()),
                name: Some(pod.into()),
                uid: Some(pod_uid.into()),
            },
            allocated_at: 1_700_000_000,
        };
        self.allocations.lock().unwrap().push(allocation.clone());
        allocation
    }

    fn released(&self) -> Vec<AttachmentKey> {
        self.released.lock().unwrap().clone()
    }

    fn demand(&self) -> Option<u32> {
        *self.demand.lock().unwrap()
    }
}

fn config() -> KubeConfig {
    KubeConfig {
        status_interval: Duration::from_secs(5),
        status_resync: Duration::from_secs(300),
        gc_interval: Duration::from_secs(10),
        release_grace: Duration::from_secs(120),
    }
}

fn pod(name: &str, uid: &str, phase: &str, pod_ip: Option<&str>, host_network: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": uid},
        "spec": {"nodeName": NODE, "hostNetwork": host_network,
                 "containers": [{"name": "c", "image": "busybox"}]},
        "status": {"phase": phase, "podIP": pod_ip},
    })
}

fn fake_with_node() -> FakeApi {
    let fake = FakeApi::default();
    fake.put(
        NODES,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE, "uid": NODE_UID}}),
    );
    // A pod on another node: the field selector must keep it out of the demand.
    fake.put(PODS, {
        let mut other = pod("elsewhere", "uid-x", "Pending", None, false);
        other["spec"]["nodeName"] = json!("node-2");
        other
    });
    fake
}

/// Starts `run`; dropping the returned sender stops it.
fn start(
    fake: &FakeApi,
    agent: &Arc<FakeAgent>,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    // Logs show up with a failing test's output.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("vnet_kube=debug")
        .try_init();
    let (stop, stopped) = oneshot::channel::<()>();
    let agent: Arc<dyn NodeAgent> = agent.clone();
    let task = tokio::spawn(vnet_kube::run(
        fake.client(),
        NODE.to_string(),
        agent,
        config(),
        async move {
            let _ = stopped.await;
        },
    ));
    (stop, task)
}

/// Advances virtual time in small steps until `done` holds (at most `limit` of virtual time).
async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let step = Duration::from_millis(500);
    let mut waited = Duration::ZERO;
    while !done() {
        assert!(waited < limit, "gave up waiting for: {what}");
        tokio::time::sleep(step).await;
        waited += step;
    }
}

fn condition(pool: &Value, type_: &str) -> Option<(String, String)> {
    pool["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_string(),
                c["message"].as_str().unwrap_or_default().to_string(),
            )
        })
}

/// The scenarios, each one run by its own test and all of them by the RBAC check.
mod scenario {
    use super::*;

    pub async fn node_ip_pool_is_created_owned_by_the_node_and_its_status_follows_the_agent()
    -> FakeApi {
        let fake = fake_with_node();
        let agent = Arc::new(FakeAgent::default());
        let (stop, task) = start(&fake, &agent);

        wait_for("status published", Duration::from_secs(60), || {
            fake.get(POOLS, NODE)
                .is_some_and(|p| p["status"]["total"] == 16)
        })
        .await;
        let pool = fake.get(POOLS, NODE).unwrap();
        let owner = &pool["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "Node");
        assert_eq!(owner["name"], NODE);
        assert_eq!(owner["uid"], NODE_UID);
        assert_eq!(pool["status"]["free"], 14);
        assert_eq!(condition(&pool, "Ready").unwrap().0, "True");
        assert_eq!(condition(&pool, "SubnetFull").unwrap().0, "False");

        // The subnet fills up and the cloud complains: both show up.
        let mut status = agent.status();
        status.subnet_full = true;
        status.can_allocate = false;
        status.reason = Some("subnet is full".into());
        status.last_cloud_error = Some("SubnetIsFull: no free address".into());
        status.pool.free = 0;
        *agent.status.lock().unwrap() = Some(status);
        wait_for("degraded status published", Duration::from_secs(60), || {
            fake.get(POOLS, NODE)
                .is_some_and(|p| p["status"]["free"] == 0)
        })
        .await;
        let pool = fake.get(POOLS, NODE).unwrap();
        assert_eq!(
            condition(&pool, "SubnetFull").unwrap().0,
            "True",
            "{pool:#}"
        );
        assert_eq!(
            condition(&pool, "CloudDegraded").unwrap(),
            ("True".into(), "SubnetIsFull: no free address".into())
        );
        assert_eq!(
            condition(&pool, "Ready").unwrap(),
            ("False".into(), "subnet is full".into())
        );
        assert_eq!(
            pool["status"]["lastCloudError"],
            "SubnetIsFull: no free address"
        );

        // Someone sets a per-node override: the agent gets it.
        let mut edited = fake.get(POOLS, NODE).unwrap();
        edited["spec"] = json!({"warm": 32});
        fake.put(POOLS, edited);
        wait_for("override applied", Duration::from_secs(60), || {
            agent
                .overrides
                .lock()
                .unwrap()
                .as_ref()
                .and_then(|o| o.warm)
                == Some(32)
        })
        .await;

        // Deleted behind the agent's back: it comes back, still owned by the node.
        fake.delete(POOLS, NODE);
        wait_for("recreated", Duration::from_secs(400), || {
            fake.get(POOLS, NODE).is_some_and(|p| {
                p["status"]["free"] == 0 && p["metadata"]["ownerReferences"][0]["uid"] == NODE_UID
            })
        })
        .await;

        drop(stop);
        task.await.unwrap();
        fake
    }

    pub async fn a_deleted_pods_address_is_released_after_the_grace_period_and_a_live_one_never()
    -> FakeApi {
        let fake = fake_with_node();
        fake.put(
            PODS,
            pod("live", "uid-live", "Running", Some("10.240.0.5"), false),
        );
        fake.put(
            PODS,
            pod("doomed", "uid-doomed", "Running", Some("10.240.0.6"), false),
        );
        let agent = Arc::new(FakeAgent::default());
        let live = agent.allocate("c0ffee01", "live", "uid-live", 5);
        let doomed = agent.allocate("c0ffee02", "doomed", "uid-doomed", 6);
        // Gone from the API, but its veth is still there: the runtime has not run DEL yet.
        let lingering = agent.allocate("c0ffee03", "lingering", "uid-lingering", 7);
        agent
            .veths
            .lock()
            .unwrap()
            .insert(lingering.host_veth.clone());
        let (stop, task) = start(&fake, &agent);

        wait_for("pods synced", Duration::from_secs(60), || {
            agent.demand().is_some()
        })
        .await;
        fake.delete(PODS, "default/doomed");

        // Well inside the grace period nothing is released.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(agent.released().is_empty(), "{:?}", agent.released());

        // After it, only the deleted pod's address goes.
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(agent.released(), vec![doomed.key.clone()]);
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert_eq!(agent.released(), vec![doomed.key.clone()]);
        let remaining: Vec<_> = agent.allocations().into_iter().map(|a| a.key).collect();
        assert_eq!(remaining, vec![live.key.clone(), lingering.key.clone()]);

        // Once the runtime removed the lingering veth, its address goes too.
        agent.veths.lock().unwrap().clear();
        wait_for("lingering released", Duration::from_secs(60), || {
            agent.released().contains(&lingering.key)
        })
        .await;
        assert!(!agent.released().contains(&live.key));

        drop(stop);
        task.await.unwrap();
        fake
    }

    pub async fn a_pod_recreated_under_the_same_name_does_not_keep_the_old_address() -> FakeApi {
        let fake = fake_with_node();
        fake.put(
            PODS,
            pod("web-0", "uid-new", "Running", Some("10.240.0.9"), false),
        );
        let agent = Arc::new(FakeAgent::default());
        let old = agent.allocate("0bad0001", "web-0", "uid-old", 8);
        let (stop, task) = start(&fake, &agent);
        wait_for("old address released", Duration::from_secs(400), || {
            agent.released() == vec![old.key.clone()]
        })
        .await;
        drop(stop);
        task.await.unwrap();
        fake
    }

    pub async fn pods_scheduled_but_not_started_raise_the_pending_demand() -> FakeApi {
        let fake = fake_with_node();
        fake.put(PODS, pod("waiting-1", "u1", "Pending", None, false));
        fake.put(PODS, pod("waiting-2", "u2", "Pending", None, false));
        fake.put(PODS, pod("host-net", "u3", "Pending", None, true));
        fake.put(
            PODS,
            pod("running", "u4", "Running", Some("10.240.0.4"), false),
        );
        // Sandbox created (it holds an address) but containers still pulling: no new demand.
        fake.put(PODS, pod("pulling", "u5", "Pending", None, false));
        let agent = Arc::new(FakeAgent::default());
        agent.allocate("aaaa0004", "running", "u4", 4);
        agent.allocate("aaaa0005", "pulling", "u5", 5);
        let (stop, task) = start(&fake, &agent);

        wait_for("demand of 2", Duration::from_secs(60), || {
            agent.demand() == Some(2)
        })
        .await;

        // A burst is scheduled.
        for i in 0..5 {
            fake.put(
                PODS,
                pod(
                    &format!("burst-{i}"),
                    &format!("b{i}"),
                    "Pending",
                    None,
                    false,
                ),
            );
        }
        wait_for("demand of 7", Duration::from_secs(60), || {
            agent.demand() == Some(7)
        })
        .await;
        wait_for("demand in the status", Duration::from_secs(60), || {
            fake.get(POOLS, NODE)
                .is_some_and(|p| p["status"]["pendingPods"] == 7)
        })
        .await;

        drop(stop);
        task.await.unwrap();
        fake
    }

    pub async fn an_rbac_403_is_reported_and_the_node_keeps_being_served() -> FakeApi {
        let fake = fake_with_node();
        fake.forbid(Method::GET, PODS);
        fake.put(
            PODS,
            pod("gone-later", "u1", "Running", Some("10.240.0.5"), false),
        );
        let agent = Arc::new(FakeAgent::default());
        let allocation = agent.allocate("dddd0001", "no-such-pod", "u9", 9);
        let (stop, task) = start(&fake, &agent);

        wait_for("403 in the status", Duration::from_secs(120), || {
            fake.get(POOLS, NODE)
                .and_then(|p| condition(&p, "KubeAccessDegraded"))
                .is_some_and(|(status, _)| status == "True")
        })
        .await;
        let pool = fake.get(POOLS, NODE).unwrap();
        let (_, message) = condition(&pool, "KubeAccessDegraded").unwrap();
        assert!(message.contains("RBAC forbidden"), "{message}");
        assert!(message.contains("list/watch pods"), "{message}");
        // The pool is still published, and without a pod view nothing is released.
        assert_eq!(pool["status"]["total"], 16);
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(agent.released().is_empty());
        assert!(!task.is_finished());

        // Status writes forbidden too: the loop keeps going and recovers when RBAC is fixed.
        fake.forbid(Method::PATCH, POOLS);
        let mut status = agent.status();
        status.pool.total = 20;
        *agent.status.lock().unwrap() = Some(status);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!task.is_finished());
        assert_eq!(fake.get(POOLS, NODE).unwrap()["status"]["total"], 16);
        assert!(
            fake.requests()
                .iter()
                .any(|r| r == &format!("PATCH {POOLS}/{NODE}/status")),
            "the agent must keep trying to write its status"
        );
        fake.allow_everything();
        wait_for("recovered", Duration::from_secs(600), || {
            fake.get(POOLS, NODE).is_some_and(|p| {
                p["status"]["total"] == 20
                    && condition(&p, "KubeAccessDegraded")
                        .is_some_and(|(status, _)| status == "False")
            })
        })
        .await;
        // With the pod view back, the allocation of a pod that does not exist is released.
        wait_for("released after recovery", Duration::from_secs(600), || {
            agent.released() == vec![allocation.key.clone()]
        })
        .await;

        drop(stop);
        task.await.unwrap();
        fake
    }

    /// A static pod's sandbox carries the kubelet's UID, which the API server shows only in its
    /// mirror pod's annotation: its address must stay, while a pod that is really gone loses it.
    pub async fn a_static_pods_address_is_kept_through_its_mirror_pod() -> FakeApi {
        let fake = fake_with_node();
        let mut mirror = pod(
            "etcd-node-1",
            "mirror-uid",
            "Running",
            Some("10.240.0.3"),
            false,
        );
        mirror["metadata"]["annotations"] = json!({"kubernetes.io/config.mirror": "static-uid"});
        fake.put(PODS, mirror);
        let agent = Arc::new(FakeAgent::default());
        let static_pod = agent.allocate("57a71c01", "etcd-node-1", "static-uid", 3);
        let gone = agent.allocate("57a71c02", "no-such-pod", "uid-gone", 4);
        let (stop, task) = start(&fake, &agent);
        wait_for("the gone pod released", Duration::from_secs(400), || {
            agent.released().contains(&gone.key)
        })
        .await;
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(agent.released(), vec![gone.key.clone()]);
        assert!(agent.allocations().iter().any(|a| a.key == static_pod.key));
        drop(stop);
        task.await.unwrap();
        fake
    }

    /// Another CNI's config that sorts before ours shows up as a condition naming the file, and
    /// clears once it is removed.
    pub async fn a_conflist_that_sorts_first_is_reported_until_it_is_gone() -> FakeApi {
        let fake = fake_with_node();
        let dir = tempfile::tempdir().unwrap();
        vnet_kube::write_conflist(
            dir.path(),
            &vnet_kube::conflist(&vnet_kube::ConflistOptions::default()),
        )
        .unwrap();
        let intruder = dir.path().join("00-multus.conf");
        std::fs::write(&intruder, "{}").unwrap();
        let agent = Arc::new(FakeAgent::default());
        *agent.cni_conf_dir.lock().unwrap() = Some(dir.path().to_owned());
        let (stop, task) = start(&fake, &agent);
        wait_for("shadowed condition", Duration::from_secs(60), || {
            fake.get(POOLS, NODE)
                .and_then(|p| condition(&p, "ConflistShadowed"))
                .is_some_and(|(status, _)| status == "True")
        })
        .await;
        let (_, message) = condition(&fake.get(POOLS, NODE).unwrap(), "ConflistShadowed").unwrap();
        assert!(
            message.contains(&intruder.display().to_string())
                && message.contains("00-vnet-cni.conflist"),
            "{message}"
        );
        std::fs::remove_file(&intruder).unwrap();
        wait_for("condition cleared", Duration::from_secs(60), || {
            fake.get(POOLS, NODE)
                .and_then(|p| condition(&p, "ConflistShadowed"))
                .is_some_and(|(status, _)| status == "False")
        })
        .await;
        drop(stop);
        task.await.unwrap();
        fake
    }
}

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test(start_paused = true)]
            async fn $name() {
                scenario::$name().await;
            }
        )*

        /// What every scenario asked the API server for, as "group/resource:verb".
        async fn authorizations_of_every_scenario() -> BTreeSet<String> {
            let mut seen = BTreeSet::new();
            $(seen.extend(scenario::$name().await.authorizations());)*
            seen
        }
    };
}

scenarios!(
    node_ip_pool_is_created_owned_by_the_node_and_its_status_follows_the_agent,
    a_deleted_pods_address_is_released_after_the_grace_period_and_a_live_one_never,
    a_pod_recreated_under_the_same_name_does_not_keep_the_old_address,
    pods_scheduled_but_not_started_raise_the_pending_demand,
    an_rbac_403_is_reported_and_the_node_keeps_being_served,
    a_static_pods_address_is_kept_through_its_mirror_pod,
    a_conflist_that_sorts_first_is_reported_until_it_is_gone,
);

/// The agent's ClusterRole grants exactly what the integration's code paths ask the API server
/// for in the scenarios above (every request the fake recorded, mapped to RBAC's verbs), so a
/// new call without its grant, or a grant nothing uses, fails here.
#[tokio::test(start_paused = true)]
async fn cluster_role_grants_exactly_what_the_scenarios_call() {
    let called = authorizations_of_every_scenario().await;
    let granted = support::granted_by_the_cluster_role();
    let missing: Vec<_> = called.difference(&granted).collect();
    let unused: Vec<_> = granted.difference(&called).collect();
    assert!(
        missing.is_empty() && unused.is_empty(),
        "deploy/manifests/rbac.yaml disagrees with the calls the agent makes:\n  called but not granted: {missing:?}\n  granted but never called: {unused:?}"
    );
}

#[test]
fn requests_map_to_the_rbac_verbs_the_api_server_checks() {
    use support::authorization;
    let cases = [
        (Method::GET, "/api/v1/pods", false, "/pods:list"),
        (Method::GET, "/api/v1/pods", true, "/pods:watch"),
        (Method::GET, "/api/v1/nodes/node-1", false, "/nodes:get"),
        (
            Method::GET,
            "/api/v1/namespaces/kube-system/pods/p",
            false,
            "/pods:get",
        ),
        (Method::POST, POOLS, false, "vnet-cni.io/nodeippools:create"),
        (
            Method::PATCH,
            "/apis/vnet-cni.io/v1alpha1/nodeippools/n/status",
            false,
            "vnet-cni.io/nodeippools/status:patch",
        ),
        (
            Method::PUT,
            "/apis/vnet-cni.io/v1alpha1/nodeippools/n",
            false,
            "vnet-cni.io/nodeippools:update",
        ),
    ];
    for (method, path, watch, expected) in cases {
        assert_eq!(
            authorization(&method, path, watch).as_deref(),
            Some(expected),
            "{method} {path}"
        );
    }
}
