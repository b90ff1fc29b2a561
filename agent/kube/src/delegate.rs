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

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::{OnceCell, watch};
use tracing::{debug, info, warn};
use vnet_cloud::azure::AzureProvider;
use vnet_cloud::{CloudError, CloudProvider, InstanceMetadata, NodeIdentity, SecondaryIp};

use crate::crd::{CloudAnswer, CloudRequest, InstanceRef, NodeIPPool};

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

/// The last state of the node's NodeIPPool the watch delivered.
#[derive(Debug, Clone, Default)]
struct Seen {
    /// The watch has listed at least once.
    synced: bool,
    exists: bool,
    request: Option<CloudRequest>,
    answer: Option<CloudAnswer>,
}

/// What the watch task and the callers share, once the node's name is known.
struct NodeCtx {
    name: String,
    pools: Api<NodeIPPool>,
    seen: watch::Receiver<Seen>,
    _watch: AbortOnDrop,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The request as this process keeps it.
#[derive(Default)]
struct Desired {
    /// `None` until read from the stored status (a restart continues its generation).
    request: Option<CloudRequest>,
    /// Highest generation written successfully.
    written: u64,
    /// Highest generation a snapshot was taken of (a change after it needs a new generation).
    sent: u64,
    /// Names of entries already returned by an assign (so two coalesced callers split them).
    handed: HashSet<String>,
    /// Released addresses, with the generation that asked for their removal.
    releasing: BTreeMap<Ipv4Addr, u64>,
    /// From the agent's hint; sent with the next change.
    waiting_pods: u32,
    /// The assign waiting for the allocator, which pods that start waiting meanwhile join.
    outstanding: Option<Ask>,
}

/// An assign in flight: what it will bring, and the generation that carries it now.
#[derive(Debug, Clone, Copy)]
struct Ask {
    generation: u64,
    block: bool,
    /// Addresses per entry (1, or a block's 16).
    per_entry: u32,
    /// Entries asked (the caller's count, raised for pods that started waiting since).
    entries: u32,
    /// Waiting pods the ask already covers (the agent sized it with them).
    covered: u32,
    /// Addresses the raises brought beyond the pods they were for (a block's rest).
    room: u32,
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

    fn start_watch(&self, name: String) -> NodeCtx {
        let pools: Api<NodeIPPool> = Api::all(self.client.clone());
        let (tx, rx) = watch::channel(Seen::default());
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let stream = watcher(pools.clone(), config).default_backoff();
        let node = name.clone();
        let task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let mut listed: Option<NodeIPPool> = None;
            while let Some(event) = stream.next().await {
                let status = |p: &NodeIPPool| p.status.clone().unwrap_or_default();
                match event {
                    Ok(watcher::Event::Init) => listed = None,
                    Ok(watcher::Event::InitApply(p)) => listed = Some(p),
                    Ok(watcher::Event::InitDone) => {
                        let found = listed.take();
                        tx.send_modify(|s| {
                            s.synced = true;
                            s.exists = found.is_some();
                            let st = found.as_ref().map(status).unwrap_or_default();
                            s.request = st.cloud_request;
                            s.answer = st.cloud;
                        });
                    }
                    Ok(watcher::Event::Apply(p)) => {
                        let st = status(&p);
                        tx.send_modify(|s| {
                            s.exists = true;
                            s.request = st.cloud_request;
                            s.answer = st.cloud;
                        });
                    }
                    Ok(watcher::Event::Delete(_)) => tx.send_modify(|s| {
                        s.exists = false;
                        s.request = None;
                        s.answer = None;
                    }),
                    Err(e) => warn!(node = %node, error = %e, "NodeIPPool watch failed; retrying"),
                }
            }
        });
        NodeCtx {
            name,
            pools,
            seen: rx,
            _watch: AbortOnDrop(task),
        }
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
            let releasing = &d.releasing;
            request.release = releasing.keys().map(|ip| ip.to_string()).collect();
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

    /// Addresses or blocks: raise the desired count, wait for the answer, return the new ones.
    async fn assign(&self, count: usize, prefix_len: u8) -> Result<Vec<SecondaryIp>, CloudError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let ctx = self.ctx().await?;
        let block = prefix_len < vnet_cloud::SINGLE_ADDRESS;
        let of_kind = |e: &SecondaryIp| e.is_block() == block;
        let before = Self::on_nic(ctx);
        let baseline: HashSet<String> = before.iter().map(|e| e.name.clone()).collect();
        let per_entry = if block {
            1u32 << (vnet_cloud::SINGLE_ADDRESS - prefix_len)
        } else {
            1
        };
        let mut owner = false;
        let generation = self
            .change(ctx, |r, d| {
                // What the NIC holds may exceed the desired count (addresses that arrived after
                // a waiter gave up): count from the larger, so the ask adds `count`.
                let held = held_of_kind(&before, d, of_kind);
                if block {
                    r.blocks = r.blocks.max(held) + count as u32;
                    r.block_prefix_length = Some(prefix_len);
                } else {
                    r.addresses = r.addresses.max(held) + count as u32;
                }
                if d.outstanding.is_none() {
                    owner = true;
                    d.outstanding = Some(Ask {
                        generation: r.generation,
                        block,
                        per_entry,
                        entries: count as u32,
                        covered: d.waiting_pods,
                        room: 0,
                    });
                }
            })
            .await;
        let generation = match generation {
            Ok(g) => g,
            Err(e) => {
                if owner {
                    self.desired.lock().unwrap().outstanding = None;
                }
                return Err(e);
            }
        };
        // What this caller asked in the end: its own count, or the raised ask it owned.
        let (answer, asked) = match self.answer_for_ask(ctx, generation, owner).await {
            (answer, Some(ask)) => (answer, ask.entries as usize),
            (answer, None) => (answer, count),
        };
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                self.withdraw(ctx, asked, block).await;
                return Err(e);
            }
        };
        if let Some(e) = Self::error_of(&answer) {
            self.withdraw(ctx, asked, block).await;
            return Err(e);
        }
        let entries = Self::entries(&answer)?;
        let mut d = self.desired.lock().unwrap();
        let new: Vec<SecondaryIp> = entries
            .iter()
            .filter(|e| of_kind(e) && !baseline.contains(&e.name) && !d.handed.contains(&e.name))
            .take(asked)
            .cloned()
            .collect();
        d.handed.extend(new.iter().map(|e| e.name.clone()));
        // Names of entries gone from the NIC can never be new again.
        let present: HashSet<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        d.handed.retain(|n| present.contains(n.as_str()));
        if new.len() < asked {
            warn!(node = %ctx.name, asked, got = new.len(), "the cluster allocator answered with fewer new entries than asked");
        }
        Ok(new)
    }

    /// Waits for the answer to an ask. Its owner also writes the generations that raise it
    /// (pods that started waiting meanwhile) and waits for the latest.
    /// The owner gets the ask back, taken when the answer was accepted (or the wait ended), so
    /// no raise can slip in between.
    async fn answer_for_ask(
        &self,
        ctx: &NodeCtx,
        generation: u64,
        owner: bool,
    ) -> (Result<CloudAnswer, CloudError>, Option<Ask>) {
        if !owner {
            return (self.answer(ctx, generation).await, None);
        }
        let result = self.owner_wait(ctx, generation).await;
        let ask = self.desired.lock().unwrap().outstanding.take();
        match result {
            Ok((answer, ask)) => (Ok(answer), Some(ask)),
            Err(e) => (Err(e), ask),
        }
    }

    async fn owner_wait(
        &self,
        ctx: &NodeCtx,
        generation: u64,
    ) -> Result<(CloudAnswer, Ask), CloudError> {
        let limit = self.settings.answer_timeout;
        let deadline = tokio::time::Instant::now() + limit;
        let mut rx = ctx.seen.clone();
        loop {
            let raised = self.raised.notified();
            let target = {
                let d = self.desired.lock().unwrap();
                d.outstanding.map_or(generation, |a| a.generation)
            };
            if target > self.desired.lock().unwrap().written {
                self.flush(ctx, target).await?;
            }
            let answered = rx.wait_for(|s| {
                s.answer
                    .as_ref()
                    .is_some_and(|a| a.observed_generation >= target)
            });
            tokio::select! {
                r = answered => {
                    let seen = r.map_err(|_| transient("the NodeIPPool watch stopped"))?.clone();
                    let answer = seen.answer.expect("waited for it");
                    // Raised after this answer's generation: wait for the raise's answer too.
                    let mut d = self.desired.lock().unwrap();
                    match d.outstanding {
                        Some(a) if a.generation > answer.observed_generation => {}
                        Some(a) => {
                            d.outstanding = None;
                            return Ok((answer, a));
                        }
                        None => return Err(transient("the ask was dropped")),
                    }
                }
                _ = raised => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(transient(format!(
                        "no answer from the cluster allocator within {limit:?} (waiting for its answer); is the vnet-cni allocator running?"
                    )));
                }
            }
        }
    }

    /// After a failed or unanswered ask: the desired count goes back to what the NIC holds, so
    /// the allocator does not act for nobody. Best effort: a failed write is corrected by the
    /// next change.
    async fn withdraw(&self, ctx: &NodeCtx, count: usize, block: bool) {
        let on_nic = Self::on_nic(ctx);
        let result = self
            .change(ctx, |r, d| {
                let held = held_of_kind(&on_nic, d, |e| e.is_block() == block);
                let field = if block {
                    &mut r.blocks
                } else {
                    &mut r.addresses
                };
                *field = field.saturating_sub(count as u32).max(held);
            })
            .await;
        if let Err(e) = result {
            warn!(node = %ctx.name, error = %e, "cannot withdraw the cloud request; the next change will");
        }
    }
}

/// Entries of a kind on the NIC, not counting those being released.
fn held_of_kind(
    on_nic: &[SecondaryIp],
    d: &Desired,
    of_kind: impl Fn(&SecondaryIp) -> bool,
) -> u32 {
    on_nic
        .iter()
        .filter(|e| of_kind(e) && !e.addresses().all(|a| d.releasing.contains_key(&a)))
        .count() as u32
}

/// Forgets released addresses the allocator removed (an answer at or after their generation no
/// longer shows them): the NIC may get the same address again later, and it must stay then.
fn prune_released(d: &mut Desired, answer: &CloudAnswer) {
    let held: HashSet<Ipv4Addr> = answer
        .secondary_ips
        .iter()
        .filter_map(|e| e.to_secondary_ip("").ok())
        .flat_map(|e| e.addresses())
        .collect();
    let observed = answer.observed_generation;
    d.releasing
        .retain(|ip, asked| observed < *asked || held.contains(ip));
}

#[async_trait]
impl CloudProvider for ClusterProvider {
    async fn discover(&self) -> Result<NodeIdentity, CloudError> {
        let instance = self.instance.get().await?;
        let ctx = self.ctx().await?;
        let wanted = InstanceRef::from(&instance);
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
        let outstanding = self.desired.lock().unwrap().written;
        let answer = self.answer(ctx, outstanding).await?;
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
        let named: HashSet<Ipv4Addr> = ips.iter().copied().collect();
        // Entries that go: a single address named, or a block with every address named.
        let going: Vec<SecondaryIp> = on_nic
            .iter()
            .filter(|e| e.addresses().all(|a| named.contains(&a)))
            .cloned()
            .collect();
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
                for ip in going.iter().flat_map(|e| e.addresses()) {
                    d.releasing.insert(ip, r.generation);
                }
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
                        for ip in going.iter().flat_map(|e| e.addresses()) {
                            d.releasing.remove(&ip);
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
        let mut guard = self.desired.lock().unwrap();
        let d = &mut *guard;
        d.waiting_pods = pods;
        // Pods that start waiting while an ask is still unanswered join it: one NIC write for
        // them instead of a second one after it (a cold start's first top-up leaves before its
        // pods arrive).
        let Some(mut ask) = d.outstanding else {
            return;
        };
        if pods <= ask.covered {
            return;
        }
        let new = pods - ask.covered;
        ask.covered = pods;
        if new <= ask.room {
            ask.room -= new;
            d.outstanding = Some(ask);
            return;
        }
        let need = new - ask.room;
        let extra = need.div_ceil(ask.per_entry);
        ask.room = extra * ask.per_entry - need;
        let request = next_request(d);
        if ask.block {
            request.blocks += extra;
        } else {
            request.addresses += extra;
        }
        request.waiting_pods = pods;
        ask.entries += extra;
        ask.generation = request.generation;
        d.outstanding = Some(ask);
        drop(guard);
        self.raised.notify_one();
    }
}
