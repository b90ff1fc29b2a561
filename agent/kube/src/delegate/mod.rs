//! Cluster mode: [`ClusterProvider`], the agent's [`CloudProvider`] that makes no ARM call. It
//! asks for the NIC it wants in its NodeIPPool's `status.cloudRequest` (a desired state with a
//! generation) and reads what the cluster allocator did in `status.cloud`. The node then needs no
//! Azure permission at all: IMDS answers without a credential, and the allocator's principal is
//! the only one writing NICs, so it can pace the whole cluster against ARM's buckets.
//!
//! Every wait for the allocator is bounded ([`ClusterSettings::answer_timeout`]). A wait that
//! ends withdraws what it asked (the desired count goes back to what the NIC holds), so nothing
//! stays asked for without a waiter. Addresses that still arrive later are on the NIC: the next
//! `list_secondary_ips` shows them and the agent's reconcile adopts them into its pool (and
//! releases what it does not need).

use std::collections::{BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use tokio::sync::OnceCell;
use tracing::{debug, info, warn};
use vnet_cloud::azure::AzureProvider;
use vnet_cloud::{CloudError, CloudProvider, InstanceMetadata, NodeIdentity, SecondaryIp};

use crate::crd::{CloudAnswer, CloudRequest, InstanceRef};

mod ask;
mod watch;

use ask::{Ask, held_of_kind};
use watch::{NodeCtx, Seen};

/// How long the provider waits for the allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterSettings {
    /// For an answer to a request (and for the NodeIPPool to appear). Longer than the agent's
    /// own allocate timeout is fine: pods get "try again later" meanwhile, and a withdrawn ask
    /// loses its place in the allocator's queue.
    pub answer_timeout: Duration,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            answer_timeout: Duration::from_secs(120),
        }
    }
}

/// The node's Kubernetes name from its IMDS facts (the daemon's rule: the configured name, the
/// computer name, the host name).
pub type NodeNamer = Box<dyn Fn(&InstanceMetadata) -> Result<String, String> + Send + Sync>;

/// Where the provider learns the machine's IMDS facts.
pub enum InstanceSource {
    /// The instance metadata service (the Azure client's IMDS call; no ARM credential needed).
    Imds(AzureProvider),
    /// Already known (the simulation, tests).
    Known(InstanceMetadata),
}

impl InstanceSource {
    async fn get(&self) -> Result<InstanceMetadata, CloudError> {
        match self {
            InstanceSource::Imds(p) => p.instance_metadata().await,
            InstanceSource::Known(m) => Ok(m.clone()),
        }
    }
}

/// The request as this process keeps it.
#[derive(Default)]
struct Desired {
    /// `None` until read from the stored status (a restart continues its generation).
    request: Option<CloudRequest>,
    /// Highest generation written successfully (by this process or, read at start, an earlier one).
    written: u64,
    /// Highest generation this process wrote: only its own asks are worth waiting for (an
    /// earlier run's may stay unanswered while the allocator is down).
    mine: u64,
    /// Highest generation a snapshot was taken of (a change after it needs a new generation).
    sent: u64,
    /// Names of entries already returned by an assign (so two coalesced callers split them).
    handed: HashSet<String>,
    /// Names of the entries released and still listed by the allocator. Names, not addresses:
    /// Azure hands a released address out again under a new name, and that entry must stay.
    releasing: BTreeSet<String>,
    /// From the agent's hint; sent with the next change.
    waiting_pods: u32,
    /// The assign waiting for the allocator, which pods that start waiting meanwhile join.
    outstanding: Option<Ask>,
}

/// The request to change under the next generation (a change made before the last snapshot
/// was taken joins that snapshot's generation instead).
fn next_request(d: &mut Desired) -> &mut CloudRequest {
    let sent = d.sent;
    let request = d.request.get_or_insert_with(CloudRequest::default);
    if request.generation <= sent {
        request.generation = sent + 1;
    }
    request
}

/// [`CloudProvider`] through the node's NodeIPPool and the cluster allocator.
pub struct ClusterProvider {
    client: kube::Client,
    instance: InstanceSource,
    namer: NodeNamer,
    settings: ClusterSettings,
    node: OnceCell<NodeCtx>,
    desired: Mutex<Desired>,
    /// Serializes request writes; callers that wait here find their change already written.
    writer: tokio::sync::Mutex<()>,
    /// The outstanding ask was raised (its waiter writes the new generation).
    raised: tokio::sync::Notify,
}

fn transient(message: impl Into<String>) -> CloudError {
    CloudError::Transient(message.into())
}

impl ClusterProvider {
    pub fn new(
        client: kube::Client,
        instance: InstanceSource,
        namer: NodeNamer,
        settings: ClusterSettings,
    ) -> ClusterProvider {
        ClusterProvider {
            client,
            instance,
            namer,
            settings,
            node: OnceCell::new(),
            desired: Mutex::new(Desired::default()),
            writer: tokio::sync::Mutex::new(()),
            raised: tokio::sync::Notify::new(),
        }
    }

    /// The node's name, once discovery found it.
    pub fn node_name(&self) -> Option<&str> {
        self.node.get().map(|n| n.name.as_str())
    }

    /// The node context: its watch started, the resource existing (created like the
    /// integration does when missing), the stored request read.
    async fn ctx(&self) -> Result<&NodeCtx, CloudError> {
        let ctx = self
            .node
            .get_or_try_init(|| async {
                let instance = self.instance.get().await?;
                let name = (self.namer)(&instance).map_err(CloudError::Fatal)?;
                Ok::<_, CloudError>(self.start_watch(name))
            })
            .await?;
        let seen = self.wait(ctx, |s| s.synced, "the NodeIPPool watch").await?;
        if !seen.exists {
            let nodes: Api<Node> = Api::all(self.client.clone());
            crate::sync::create_pool(&ctx.pools, &nodes, &ctx.name)
                .await
                .map_err(|e| transient(format!("cannot create NodeIPPool {}: {e}", ctx.name)))?;
        }
        let seen = self
            .wait(ctx, |s| s.exists, "the NodeIPPool to exist")
            .await?;
        let mut d = self.desired.lock().unwrap();
        if d.request.is_none() {
            let stored = seen.request.unwrap_or_default();
            d.written = stored.generation;
            d.sent = stored.generation;
            if stored.generation > 0 {
                info!(node = %ctx.name, generation = stored.generation, "continuing the stored cloud request");
            }
            d.request = Some(stored);
        }
        Ok(ctx)
    }

    /// Waits (bounded) until the watched state satisfies `ready`.
    async fn wait(
        &self,
        ctx: &NodeCtx,
        ready: impl Fn(&Seen) -> bool,
        what: &str,
    ) -> Result<Seen, CloudError> {
        let mut rx = ctx.seen.clone();
        let limit = self.settings.answer_timeout;
        match tokio::time::timeout(limit, rx.wait_for(|s| ready(s))).await {
            Ok(Ok(seen)) => Ok(seen.clone()),
            Ok(Err(_)) => Err(transient("the NodeIPPool watch stopped")),
            Err(_) => Err(transient(format!(
                "no answer from the cluster allocator within {limit:?} (waiting for {what}); is the vnet-cni allocator running?"
            ))),
        }
    }

    /// Applies `change` to the request under a generation and writes it; returns the
    /// generation that carries the change. Changes made before the previous snapshot was taken
    /// share its generation (concurrent callers coalesce into one write).
    async fn change(
        &self,
        ctx: &NodeCtx,
        change: impl FnOnce(&mut CloudRequest, &mut Desired),
    ) -> Result<u64, CloudError> {
        let generation = {
            let mut guard = self.desired.lock().unwrap();
            let d = &mut *guard;
            if let Some(answer) = &ctx.seen.borrow().answer {
                prune_released(d, answer);
            }
            next_request(d);
            let mut request = d.request.take().expect("just made");
            change(&mut request, d);
            request.waiting_pods = d.waiting_pods;
            let g = request.generation;
            d.request = Some(request);
            g
        };
        self.flush(ctx, generation).await?;
        Ok(generation)
    }

    /// Makes sure the request of `generation` (or a later one) is written.
    async fn flush(&self, ctx: &NodeCtx, generation: u64) -> Result<(), CloudError> {
        let _writing = self.writer.lock().await;
        // Let callers that are about to change the request join this write.
        tokio::task::yield_now().await;
        let snapshot = {
            let mut d = self.desired.lock().unwrap();
            if d.written >= generation {
                return Ok(());
            }
            let mut request = d.request.clone().unwrap_or_default();
            request.release = d.releasing.iter().cloned().collect();
            d.sent = request.generation;
            request
        };
        let patch = Patch::Merge(serde_json::json!({ "status": { "cloudRequest": &snapshot } }));
        match ctx
            .pools
            .patch_status(&ctx.name, &PatchParams::default(), &patch)
            .await
        {
            Ok(_) => {
                debug!(node = %ctx.name, generation = snapshot.generation, addresses = snapshot.addresses, blocks = snapshot.blocks, release = snapshot.release.len(), "cloud request written");
                let mut d = self.desired.lock().unwrap();
                d.written = d.written.max(snapshot.generation);
                d.mine = d.mine.max(snapshot.generation);
                Ok(())
            }
            Err(e) => Err(transient(format!(
                "cannot write NodeIPPool {} status.cloudRequest: {e}",
                ctx.name
            ))),
        }
    }

    /// Waits for the answer of `generation` or a later one.
    async fn answer(&self, ctx: &NodeCtx, generation: u64) -> Result<CloudAnswer, CloudError> {
        let seen = self
            .wait(
                ctx,
                |s| {
                    s.answer
                        .as_ref()
                        .is_some_and(|a| a.observed_generation >= generation)
                },
                "its answer",
            )
            .await?;
        Ok(seen.answer.expect("waited for it"))
    }

    /// The node's subnet as the allocator reported it.
    fn subnet(answer: &CloudAnswer) -> Result<String, CloudError> {
        answer
            .identity
            .as_ref()
            .map(|i| i.subnet_id.clone())
            .ok_or_else(|| transient("the cluster allocator has not resolved this node yet"))
    }

    fn entries(answer: &CloudAnswer) -> Result<Vec<SecondaryIp>, CloudError> {
        let subnet = Self::subnet(answer)?;
        answer
            .secondary_ips
            .iter()
            .map(|r| {
                r.to_secondary_ip(&subnet)
                    .map_err(|e| CloudError::Fatal(e.to_string()))
            })
            .collect()
    }

    fn error_of(answer: &CloudAnswer) -> Option<CloudError> {
        let subnet = answer
            .identity
            .as_ref()
            .map(|i| i.subnet_id.as_str())
            .unwrap_or_default();
        answer.error.as_ref().map(|e| e.to_cloud_error(subnet))
    }

    /// The latest answer's entries (empty before any answer).
    fn on_nic(ctx: &NodeCtx) -> Vec<SecondaryIp> {
        ctx.seen
            .borrow()
            .answer
            .as_ref()
            .and_then(|a| Self::entries(a).ok())
            .unwrap_or_default()
    }
}

/// Forgets released entries the allocator removed (the answer no longer lists their name): a
/// name is never given again, so an entry gone never comes back, and asking for it is useless.
fn prune_released(d: &mut Desired, answer: &CloudAnswer) {
    let listed: HashSet<&str> = answer
        .secondary_ips
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    d.releasing.retain(|name| listed.contains(name.as_str()));
}

#[async_trait]
impl CloudProvider for ClusterProvider {
    async fn discover(&self) -> Result<NodeIdentity, CloudError> {
        let instance = self.instance.get().await?;
        let ctx = self.ctx().await?;
        let wanted = InstanceRef::from(&instance);
        // Resolved by an earlier run for the same VM: at once, even with the allocator down and
        // that run's last ask unanswered (the identity of a VM does not change).
        let stored = ctx
            .seen
            .borrow()
            .answer
            .as_ref()
            .and_then(|a| a.identity.clone())
            .filter(|i| i.vm_id.eq_ignore_ascii_case(&wanted.vm_id));
        if let Some(identity) = stored {
            let same = self
                .desired
                .lock()
                .unwrap()
                .request
                .as_ref()
                .is_some_and(|r| r.instance == wanted);
            if !same {
                // The allocator's later work uses the facts of now.
                self.change(ctx, |r, _| r.instance = wanted).await?;
            }
            return NodeIdentity::try_from(&identity)
                .map_err(|e| CloudError::Fatal(format!("the allocator's answer: {e}")));
        }
        // Known from an earlier run (same machine, answered with its identity): no new ask.
        let known = {
            let d = self.desired.lock().unwrap();
            let seen = ctx.seen.borrow();
            let same = d.request.as_ref().is_some_and(|r| r.instance == wanted);
            let answered = seen
                .answer
                .as_ref()
                .is_some_and(|a| a.identity.is_some() && a.observed_generation >= d.written);
            (same && answered).then_some(d.written)
        };
        let generation = match known {
            Some(g) => g,
            None => {
                info!(node = %ctx.name, vm = %instance.vm_id, "asking the cluster allocator to resolve the node");
                self.change(ctx, |r, _| r.instance = wanted).await?
            }
        };
        let answer = self.answer(ctx, generation).await?;
        match &answer.identity {
            Some(identity) => NodeIdentity::try_from(identity)
                .map_err(|e| CloudError::Fatal(format!("the allocator's answer: {e}"))),
            None => Err(Self::error_of(&answer).unwrap_or_else(|| {
                transient("the cluster allocator answered without the node's identity")
            })),
        }
    }

    async fn list_secondary_ips(&self, _nic_id: &str) -> Result<Vec<SecondaryIp>, CloudError> {
        let ctx = self.ctx().await?;
        // Waits only for this process's own writes: the allocator is the only writer of the
        // answer, which lists every entry of ours after its last read or write, so the latest
        // one is the NIC as far as anyone knows (a restart during an outage does not stall).
        let mine = self.desired.lock().unwrap().mine;
        let answer = self.answer(ctx, mine).await?;
        if answer.identity.is_none() {
            return Err(Self::error_of(&answer)
                .unwrap_or_else(|| transient("the cluster allocator has not resolved this node")));
        }
        Self::entries(&answer)
    }

    async fn assign_ips(
        &self,
        _nic_id: &str,
        _subnet_id: &str,
        count: usize,
    ) -> Result<Vec<SecondaryIp>, CloudError> {
        self.assign(count, vnet_cloud::SINGLE_ADDRESS).await
    }

    async fn assign_blocks(
        &self,
        _nic_id: &str,
        _subnet_id: &str,
        count: usize,
        prefix_len: u8,
    ) -> Result<Vec<SecondaryIp>, CloudError> {
        self.assign(count, prefix_len).await
    }

    async fn release_ips(&self, _nic_id: &str, ips: &[Ipv4Addr]) -> Result<(), CloudError> {
        let ctx = self.ctx().await?;
        let on_nic = Self::on_nic(ctx);
        let given: HashSet<Ipv4Addr> = ips.iter().copied().collect();
        // Entries that go: a single address given, or a block with every address given. They
        // are released by name (the allocator's contract).
        let going: Vec<SecondaryIp> = on_nic
            .iter()
            .filter(|e| e.addresses().all(|a| given.contains(&a)))
            .cloned()
            .collect();
        let covered: HashSet<Ipv4Addr> = going.iter().flat_map(|e| e.addresses()).collect();
        let unknown: Vec<String> = ips
            .iter()
            .filter(|ip| !covered.contains(ip))
            .map(|ip| ip.to_string())
            .collect();
        if !unknown.is_empty() {
            // Absent entries are no error (the trait's rule); a block given in part stays whole.
            info!(node = %ctx.name, addresses = ?unknown, "not releasing addresses that are no whole entry of the allocator's last answer");
        }
        if going.is_empty() {
            return Ok(());
        }
        let (singles, blocks) = going.iter().fold((0u32, 0u32), |(s, b), e| {
            if e.is_block() { (s, b + 1) } else { (s + 1, b) }
        });
        let generation = self
            .change(ctx, |r, d| {
                let held_s = held_of_kind(&on_nic, d, |e| !e.is_block());
                let held_b = held_of_kind(&on_nic, d, |e| e.is_block());
                d.releasing.extend(going.iter().map(|e| e.name.clone()));
                r.addresses = r.addresses.min(held_s).saturating_sub(singles);
                r.blocks = r.blocks.min(held_b).saturating_sub(blocks);
            })
            .await?;
        let still_listed = |a: &CloudAnswer| {
            a.secondary_ips
                .iter()
                .any(|e| going.iter().any(|g| g.name == e.name))
        };
        let gone = |s: &Seen| {
            s.answer.as_ref().is_some_and(|a| {
                a.observed_generation >= generation && (a.error.is_some() || !still_listed(a))
            })
        };
        let result = self.wait(ctx, gone, "the release").await;
        let failed = match result {
            // An error about additions may come with the releases done (the allocator writes
            // them alone then): gone from the NIC is released.
            Ok(seen) => seen
                .answer
                .as_ref()
                .filter(|a| still_listed(a))
                .and_then(Self::error_of),
            Err(e) => Some(e),
        };
        match failed {
            None => Ok(()),
            Some(e) => {
                // Not released: the agent reads the NIC and takes back what is still there.
                let restore = self
                    .change(ctx, |r, d| {
                        for e in &going {
                            d.releasing.remove(&e.name);
                        }
                        r.addresses += singles;
                        r.blocks += blocks;
                    })
                    .await;
                if let Err(w) = restore {
                    warn!(node = %ctx.name, error = %w, "cannot withdraw the release request");
                }
                Err(e)
            }
        }
    }

    fn set_waiting_pods(&self, pods: u32) {
        self.raise_for_waiting(pods);
    }
}
