//! The loop behind [`run`]: status publishing, pod-aware release and demand.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, ObjectRef, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{info, warn};
use vnet_api::{AttachmentKey, StatusResponse};

use crate::crd::{NodeIPPool, NodeIPPoolSpec, NodeIPPoolStatus, PoolCondition, condition};
use crate::{KubeConfig, NodeAgent};

/// Which API-server interaction a problem belongs to; also the wording in logs and conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Area {
    PodWatch,
    PoolWatch,
    PoolCreate,
    PoolStatus,
}

impl Area {
    /// The verb and resource the ClusterRole must grant for this area.
    fn needs(self) -> &'static str {
        match self {
            Area::PodWatch => "list/watch pods",
            Area::PoolWatch => "list/watch nodeippools",
            Area::PoolCreate => "get nodes and create nodeippools",
            Area::PoolStatus => "patch nodeippools/status",
        }
    }
}

/// Current API-server problems, logged once when they start and when they end.
#[derive(Default)]
struct KubeHealth {
    problems: Mutex<BTreeMap<Area, String>>,
}

impl KubeHealth {
    fn report(&self, area: Area, error: &kube::Error) {
        let message = describe(area, error);
        let mut problems = self.problems.lock().expect("health lock");
        if problems.get(&area) != Some(&message) {
            if is_forbidden(error) {
                warn!(area = ?area, "{message}; the node is still served");
            } else {
                warn!(area = ?area, "{message}; retrying, the node is still served");
            }
            problems.insert(area, message);
        }
    }

    fn clear(&self, area: Area) {
        if self
            .problems
            .lock()
            .expect("health lock")
            .remove(&area)
            .is_some()
        {
            info!(area = ?area, "Kubernetes API access recovered");
        }
    }

    fn is_healthy(&self, area: Area) -> bool {
        !self
            .problems
            .lock()
            .expect("health lock")
            .contains_key(&area)
    }

    fn summary(&self) -> Option<String> {
        let problems = self.problems.lock().expect("health lock");
        (!problems.is_empty()).then(|| problems.values().cloned().collect::<Vec<_>>().join("; "))
    }
}

fn is_forbidden(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 403)
}

fn describe(area: Area, error: &kube::Error) -> String {
    if is_forbidden(error) {
        let detail = match error {
            kube::Error::Api(status) => status.message.as_str(),
            _ => "",
        };
        format!(
            "RBAC forbidden: the agent's service account may not {} (grant it in the vnet-cni-agent ClusterRole): {detail}",
            area.needs()
        )
    } else {
        format!("cannot {}: {error}", area.needs())
    }
}

fn watch_error(error: watcher::Error) -> Option<kube::Error> {
    match error {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => Some(e),
        watcher::Error::WatchError(status) => Some(kube::Error::Api(status)),
        watcher::Error::NoResourceVersion => None,
    }
}

/// Aborts the watch tasks when `run` returns, however it returns.
struct AbortOnDrop(Vec<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Runs the Kubernetes integration for `node_name` until `shutdown` completes.
///
/// Never fails: every API-server error is logged (an RBAC 403 says which permission is missing),
/// reported in the `KubeAccessDegraded` condition when the status can still be written, and
/// retried with backoff, while the agent keeps serving the node.
pub async fn run<F>(
    client: kube::Client,
    node_name: String,
    agent: Arc<dyn NodeAgent>,
    cfg: KubeConfig,
    shutdown: F,
) where
    F: Future<Output = ()> + Send,
{
    let health = Arc::new(KubeHealth::default());

    let pods: Api<Pod> = Api::all(client.clone());
    let (pod_store, pod_writer) = reflector::store();
    let pods_synced = Arc::new(AtomicBool::new(false));
    let pod_events = reflector(
        pod_writer,
        watcher(
            pods,
            watcher::Config::default().fields(&format!("spec.nodeName={node_name}")),
        )
        .default_backoff(),
    );

    let pools: Api<NodeIPPool> = Api::all(client.clone());
    let (pool_store, pool_writer) = reflector::store();
    let pools_synced = Arc::new(AtomicBool::new(false));
    let pool_events = reflector(
        pool_writer,
        watcher(
            pools.clone(),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
        )
        .default_backoff(),
    );

    let _watches = AbortOnDrop(vec![
        tokio::spawn(drive(
            pod_events,
            Area::PodWatch,
            health.clone(),
            pods_synced.clone(),
        )),
        tokio::spawn(drive(
            pool_events,
            Area::PoolWatch,
            health.clone(),
            pools_synced.clone(),
        )),
    ]);

    let mut publisher = StatusPublisher {
        pools,
        nodes: Api::all(client),
        node_name: node_name.clone(),
        agent: agent.clone(),
        health: health.clone(),
        exists: false,
        last_written: None,
        applied_overrides: None,
        shadowed_by: None,
    };
    let mut gc = PodGc::default();
    let mut pending_pods = 0;

    let mut status_tick = tokio::time::interval(cfg.status_interval);
    status_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut gc_tick = tokio::time::interval(cfg.gc_interval);
    gc_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let shutdown = std::pin::pin!(shutdown);
    let mut shutdown = shutdown;

    info!(node = %node_name, "Kubernetes integration started");
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = gc_tick.tick() => {
                // Judging pods from a store that is not synced, or stale because the watch fails,
                // would release live pods' addresses.
                if pods_synced.load(Ordering::Acquire) && health.is_healthy(Area::PodWatch) {
                    let pods = pod_store.state();
                    pending_pods = gc.tick(&pods, agent.as_ref(), cfg.release_grace).await;
                } else {
                    gc.forget();
                    // A stale demand would keep the pool grown for pods we can no longer see.
                    if pending_pods != 0 {
                        pending_pods = 0;
                        agent.set_pending_demand(0);
                    }
                }
            }
            _ = status_tick.tick() => {
                let seen = pools_synced.load(Ordering::Acquire).then(|| {
                    pool_store
                        .get(&ObjectRef::new(&node_name))
                        .map(|pool| pool.spec.clone())
                });
                publisher.tick(seen, pending_pods, cfg.status_resync).await;
            }
        }
    }
    info!(node = %node_name, "Kubernetes integration stopped");
}

/// Drives one reflector stream, recording whether it has synced and whether it fails.
async fn drive<K>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    area: Area,
    health: Arc<KubeHealth>,
    synced: Arc<AtomicBool>,
) {
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::InitDone) => {
                synced.store(true, Ordering::Release);
                health.clear(area);
            }
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => health.clear(area),
            Ok(_) => {}
            Err(error) => {
                if let Some(error) = watch_error(error) {
                    health.report(area, &error);
                }
            }
        }
    }
}

struct StatusPublisher {
    pools: Api<NodeIPPool>,
    nodes: Api<Node>,
    node_name: String,
    agent: Arc<dyn NodeAgent>,
    health: Arc<KubeHealth>,
    /// Whether the resource is known to exist (created by us or seen).
    exists: bool,
    last_written: Option<(NodeIPPoolStatus, Instant)>,
    applied_overrides: Option<NodeIPPoolSpec>,
    /// The CNI config the runtime loads instead of ours, as last checked.
    shadowed_by: Option<String>,
}

impl StatusPublisher {
    /// `seen`: `None` until the NodeIPPool watch has synced, then the resource's spec if it exists.
    async fn tick(
        &mut self,
        seen: Option<Option<NodeIPPoolSpec>>,
        pending_pods: u32,
        resync: std::time::Duration,
    ) {
        if let Some(found) = seen {
            if found.is_some() {
                self.exists = true;
            }
            let spec = found.unwrap_or_default();
            if self.applied_overrides.as_ref() != Some(&spec) {
                if spec != NodeIPPoolSpec::default() {
                    info!(?spec, "applying the NodeIPPool's pool overrides");
                }
                self.agent.apply_pool_overrides(&spec);
                self.applied_overrides = Some(spec);
            }
        }

        self.check_conflist().await;
        let previous = self.last_written.as_ref().map(|(status, _)| status);
        let status = build_status(
            &self.agent.status(),
            pending_pods,
            self.health.summary(),
            self.shadowed_by.as_deref(),
            previous.map(|s| s.conditions.as_slice()).unwrap_or(&[]),
        );
        let due = match &self.last_written {
            Some((written, at)) => *written != status || at.elapsed() >= resync,
            None => true,
        };
        if !due {
            return;
        }
        if !self.exists {
            match self.create().await {
                Ok(()) => {
                    self.exists = true;
                    self.health.clear(Area::PoolCreate);
                }
                Err(error) => {
                    self.health.report(Area::PoolCreate, &error);
                    return;
                }
            }
        }
        let patch = Patch::Merge(serde_json::json!({ "status": status }));
        let written = with_timeout(self.pools.patch_status(
            &self.node_name,
            &PatchParams::default(),
            &patch,
        ))
        .await;
        match written {
            Ok(_) => {
                self.health.clear(Area::PoolStatus);
                self.last_written = Some((status, Instant::now()));
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {
                // Deleted behind our back: recreate on the next tick.
                self.exists = false;
                self.last_written = None;
            }
            Err(error) => self.health.report(Area::PoolStatus, &error),
        }
    }

    /// Looks for a CNI config that sorts before ours (another CNI installed later, a leftover):
    /// the runtime would give new pods that network. Logged when it starts and when it ends.
    async fn check_conflist(&mut self) {
        let Some(dir) = self.agent.cni_conf_dir() else {
            return;
        };
        let checked = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || crate::conflist::shadowing_conflist(&dir)).await
        };
        let shadowed_by = match checked {
            Ok(Ok(found)) => found.map(|name| dir.join(name).display().to_string()),
            Ok(Err(error)) => {
                warn!(dir = %dir.display(), %error, "cannot read the CNI config directory");
                return;
            }
            Err(_) => return,
        };
        if shadowed_by != self.shadowed_by {
            match &shadowed_by {
                Some(path) => warn!(
                    config = %path,
                    "{}",
                    shadowed_message(path)
                ),
                None => info!(
                    "vnet-cni's conflist is again the first in {}",
                    dir.display()
                ),
            }
            self.shadowed_by = shadowed_by;
        }
    }

    /// Creates the resource (see [`create_pool`]).
    async fn create(&self) -> Result<(), kube::Error> {
        create_pool(&self.pools, &self.nodes, &self.node_name).await
    }
}

/// Creates the node's NodeIPPool, owned by the Node so it goes away with it. Already existing
/// is fine. Also used by the cluster provider, which needs the resource before the agent is ready.
pub(crate) async fn create_pool(
    pools: &Api<NodeIPPool>,
    nodes: &Api<Node>,
    node_name: &str,
) -> Result<(), kube::Error> {
    let node = with_timeout(nodes.get(node_name)).await?;
    let owner = OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: node_name.to_string(),
        uid: node.metadata.uid.unwrap_or_default(),
        ..Default::default()
    };
    let pool = NodeIPPool {
        metadata: ObjectMeta {
            name: Some(node_name.to_string()),
            owner_references: Some(vec![owner]),
            labels: Some(
                [(
                    "app.kubernetes.io/managed-by".to_string(),
                    "vnet-agent".to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        spec: NodeIPPoolSpec::default(),
        status: None,
    };
    match with_timeout(pools.create(&PostParams::default(), &pool)).await {
        Ok(_) => {
            info!(node = %node_name, "created NodeIPPool");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(error) => Err(error),
    }
}

/// A hung API call must not stall the loop (and with it the release of leaked addresses).
const API_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

async fn with_timeout<T>(
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, kube::Error> {
    tokio::time::timeout(API_CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(kube::Error::Service(
                format!("no answer from the API server within {API_CALL_TIMEOUT:?}").into(),
            ))
        })
}

fn shadowed_message(path: &str) -> String {
    format!(
        "{path} sorts before {}: the container runtime gives new pods that network, not vnet-cni's; \
         remove it (or the CNI that wrote it)",
        crate::conflist::CONFLIST_FILE_NAME
    )
}

/// The status from the agent's view; condition times carry over while a condition keeps its value.
fn build_status(
    agent: &StatusResponse,
    pending_pods: u32,
    kube_problems: Option<String>,
    shadowed_by: Option<&str>,
    previous: &[PoolCondition],
) -> NodeIPPoolStatus {
    let ready_message = agent.reason.clone().unwrap_or_default();
    let cloud_message = agent.last_cloud_error.clone().unwrap_or_default();
    let conditions = [
        (
            condition::READY,
            agent.ready && agent.can_allocate,
            if agent.ready && agent.can_allocate {
                "CanAllocate"
            } else if agent.ready {
                "CannotAllocate"
            } else {
                "Starting"
            },
            ready_message,
        ),
        (
            condition::SUBNET_FULL,
            agent.subnet_full,
            if agent.subnet_full {
                "NoAddressLeft"
            } else {
                "AddressesAvailable"
            },
            String::new(),
        ),
        (
            condition::CLOUD_DEGRADED,
            agent.last_cloud_error.is_some(),
            if agent.last_cloud_error.is_some() {
                "CloudCallFailed"
            } else {
                "CloudHealthy"
            },
            cloud_message,
        ),
        (
            condition::KUBE_ACCESS_DEGRADED,
            kube_problems.is_some(),
            if kube_problems.is_some() {
                "APIServerCallFailed"
            } else {
                "APIServerHealthy"
            },
            kube_problems.unwrap_or_default(),
        ),
        (
            condition::CONFLIST_SHADOWED,
            shadowed_by.is_some(),
            if shadowed_by.is_some() {
                "AnotherConfigSortsFirst"
            } else {
                "VnetCniConfigFirst"
            },
            shadowed_by.map(shadowed_message).unwrap_or_default(),
        ),
    ]
    .into_iter()
    .map(|(type_, value, reason, message)| {
        let status = if value { "True" } else { "False" };
        let last_transition_time = previous
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(now_rfc3339);
        PoolCondition {
            type_: type_.to_string(),
            status: status.to_string(),
            reason: reason.to_string(),
            message,
            last_transition_time,
        }
    })
    .collect();
    NodeIPPoolStatus {
        total: agent.pool.total,
        allocated: agent.pool.allocated,
        free: agent.pool.free,
        cooldown: agent.pool.cooldown,
        target: agent.pool.target,
        pending: agent.pool.pending,
        max: agent.pool.max,
        pending_pods,
        last_cloud_error: agent.last_cloud_error.clone(),
        conditions,
        // Cluster mode's request and answer have their own writers (merge patches leave them).
        cloud_request: None,
        cloud: None,
    }
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Compares allocations with the pods on the node.
#[derive(Default)]
struct PodGc {
    /// When each allocation's pod was first seen missing.
    gone_since: HashMap<AttachmentKey, Instant>,
    /// Allocations already warned about because their veth outlived their pod.
    veth_warned: HashSet<AttachmentKey>,
}

impl PodGc {
    fn forget(&mut self) {
        self.gone_since.clear();
    }

    /// Releases what is due and returns the pending demand it handed to the agent.
    async fn tick(
        &mut self,
        pods: &[Arc<Pod>],
        agent: &dyn NodeAgent,
        grace: std::time::Duration,
    ) -> u32 {
        let now = Instant::now();
        let live: HashMap<(&str, &str), Option<&str>> = pods
            .iter()
            .filter_map(|pod| {
                let meta = &pod.metadata;
                Some((
                    (meta.namespace.as_deref()?, meta.name.as_deref()?),
                    runtime_uid(pod),
                ))
            })
            .collect();

        let allocations = agent.allocations();
        let mut holders: HashSet<(String, String)> = HashSet::new();
        for allocation in &allocations {
            // Without a pod identity (cnitool, podman) there is nothing to judge against.
            let (Some(namespace), Some(name)) = (&allocation.pod.namespace, &allocation.pod.name)
            else {
                continue;
            };
            let alive = match live.get(&(namespace.as_str(), name.as_str())) {
                // A pod recreated under the same name (a StatefulSet) is another pod.
                Some(uid) => match (&allocation.pod.uid, uid) {
                    (Some(ours), Some(theirs)) => ours == theirs,
                    _ => true,
                },
                None => false,
            };
            if alive {
                self.gone_since.remove(&allocation.key);
                holders.insert((namespace.clone(), name.clone()));
                continue;
            }
            let since = *self.gone_since.entry(allocation.key.clone()).or_insert(now);
            if now.duration_since(since) < grace {
                continue;
            }
            if agent.host_veth_exists(&allocation.host_veth) {
                if self.veth_warned.insert(allocation.key.clone()) {
                    warn!(
                        attachment = %allocation.key, pod = %format!("{namespace}/{name}"),
                        veth = %allocation.host_veth,
                        "pod is gone but its host veth still exists; keeping the address until the runtime's DEL"
                    );
                }
                continue;
            }
            match agent.release(&allocation.key).await {
                Ok(()) => {
                    info!(
                        attachment = %allocation.key, ip = %allocation.ip,
                        pod = %format!("{namespace}/{name}"),
                        "released the address of a pod that is gone"
                    );
                    self.gone_since.remove(&allocation.key);
                    self.veth_warned.remove(&allocation.key);
                }
                Err(error) => {
                    warn!(attachment = %allocation.key, "cannot release the address of a pod that is gone: {error}")
                }
            }
        }
        let current: HashSet<&AttachmentKey> = allocations.iter().map(|a| &a.key).collect();
        self.gone_since.retain(|key, _| current.contains(key));
        self.veth_warned.retain(|key| current.contains(key));

        let demand = pods
            .iter()
            .filter(|pod| needs_address(pod))
            .filter(|pod| {
                let meta = &pod.metadata;
                !holders.contains(&(
                    meta.namespace.clone().unwrap_or_default(),
                    meta.name.clone().unwrap_or_default(),
                ))
            })
            .count();
        let demand = u32::try_from(demand).unwrap_or(u32::MAX);
        agent.set_pending_demand(demand);
        demand
    }
}

/// On a mirror pod: the UID of the static pod it mirrors (kubelet sets it to the static pod's
/// config hash, which is that pod's UID).
pub(crate) const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// The UID the runtime passes as `K8S_POD_UID`. For a static pod that is the kubelet's own UID,
/// which its mirror pod in the API server carries in the mirror annotation, not in metadata.uid.
fn runtime_uid(pod: &Pod) -> Option<&str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(MIRROR_ANNOTATION))
        .map(String::as_str)
        .filter(|uid| !uid.is_empty())
        .or(pod.metadata.uid.as_deref())
}

/// A pod that will ask this node for an address: on the pod network, not started, not going away.
fn needs_address(pod: &Pod) -> bool {
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|spec| spec.host_network)
        .unwrap_or(false);
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    let started = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .is_some();
    !host_network
        && pod.metadata.deletion_timestamp.is_none()
        && matches!(phase, None | Some("Pending"))
        && !started
}

#[cfg(test)]
mod tests {
    use super::*;
    use vnet_api::PoolStatus;

    fn agent_status() -> StatusResponse {
        StatusResponse {
            ready: true,
            can_allocate: true,
            reason: None,
            node: "node-1".into(),
            pool: PoolStatus {
                total: 16,
                allocated: 3,
                free: 11,
                cooldown: 2,
                target: 16,
                pending: 0,
                max: 250,
            },
            subnet_full: false,
            last_cloud_error: None,
            unreconciled: vec![],
        }
    }

    fn condition<'a>(status: &'a NodeIPPoolStatus, type_: &str) -> &'a PoolCondition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn status_mirrors_the_pool_and_sets_conditions() {
        let mut agent = agent_status();
        let status = build_status(&agent, 4, None, None, &[]);
        assert_eq!((status.total, status.free, status.cooldown), (16, 11, 2));
        assert_eq!(status.pending_pods, 4);
        assert!(condition(&status, "Ready").is_true());
        assert!(!condition(&status, "SubnetFull").is_true());
        assert!(!condition(&status, "CloudDegraded").is_true());

        agent.subnet_full = true;
        agent.can_allocate = false;
        agent.reason = Some("subnet full".into());
        agent.last_cloud_error = Some("SubnetIsFull".into());
        let degraded = build_status(
            &agent,
            0,
            Some("RBAC forbidden".into()),
            Some("/etc/cni/net.d/00-multus.conf"),
            &status.conditions,
        );
        assert!(!condition(&degraded, "Ready").is_true());
        assert_eq!(condition(&degraded, "Ready").message, "subnet full");
        assert!(condition(&degraded, "SubnetFull").is_true());
        assert_eq!(
            condition(&degraded, "CloudDegraded").message,
            "SubnetIsFull"
        );
        assert!(condition(&degraded, "KubeAccessDegraded").is_true());
        assert!(!condition(&status, "ConflistShadowed").is_true());
        let shadowed = condition(&degraded, "ConflistShadowed");
        assert!(shadowed.is_true());
        assert!(
            shadowed
                .message
                .starts_with("/etc/cni/net.d/00-multus.conf sorts before 00-vnet-cni.conflist"),
            "{}",
            shadowed.message
        );
        assert_eq!(degraded.last_cloud_error.as_deref(), Some("SubnetIsFull"));
    }

    #[test]
    fn unchanged_conditions_keep_their_transition_time() {
        let mut previous = build_status(&agent_status(), 0, None, None, &[]).conditions;
        for c in &mut previous {
            c.last_transition_time = "2020-01-01T00:00:00Z".into();
        }
        let mut agent = agent_status();
        agent.subnet_full = true;
        let status = build_status(&agent, 0, None, None, &previous);
        assert_eq!(
            condition(&status, "Ready").last_transition_time,
            "2020-01-01T00:00:00Z"
        );
        assert_ne!(
            condition(&status, "SubnetFull").last_transition_time,
            "2020-01-01T00:00:00Z"
        );
    }

    #[test]
    fn only_unstarted_pod_network_pods_need_an_address() {
        let pod = |host_network: bool, phase: &str, ip: Option<&str>| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p", "namespace": "default"},
                "spec": {"containers": [], "hostNetwork": host_network},
                "status": {"phase": phase, "podIP": ip},
            }))
            .unwrap()
        };
        assert!(needs_address(&pod(false, "Pending", None)));
        assert!(!needs_address(&pod(true, "Pending", None)));
        assert!(!needs_address(&pod(false, "Running", Some("10.0.0.5"))));
        assert!(!needs_address(&pod(false, "Pending", Some("10.0.0.5"))));
        assert!(!needs_address(&pod(false, "Succeeded", None)));
    }

    #[test]
    fn a_mirror_pod_stands_for_the_static_pods_uid() {
        let pod = |annotations: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "etcd-node-1", "namespace": "kube-system",
                             "uid": "api-uid", "annotations": annotations},
            }))
            .unwrap()
        };
        assert_eq!(
            runtime_uid(&pod(serde_json::json!({MIRROR_ANNOTATION: "static-uid"}))),
            Some("static-uid")
        );
        assert_eq!(runtime_uid(&pod(serde_json::json!({}))), Some("api-uid"));
        assert_eq!(
            runtime_uid(&pod(serde_json::json!({MIRROR_ANNOTATION: ""}))),
            Some("api-uid")
        );
    }

    #[test]
    fn forbidden_errors_name_the_missing_permission() {
        let error = kube::Error::Api(Box::new(kube::core::Status {
            code: 403,
            message: "pods is forbidden: User \"system:serviceaccount:kube-system:vnet-cni-agent\" cannot list resource \"pods\"".into(),
            reason: "Forbidden".into(),
            ..Default::default()
        }));
        let text = describe(Area::PodWatch, &error);
        assert!(text.starts_with("RBAC forbidden"), "{text}");
        assert!(text.contains("list/watch pods"), "{text}");
        assert!(text.contains("cannot list resource"), "{text}");
    }
}
