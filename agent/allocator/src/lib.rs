//! vnet-allocator: the cluster allocator of vnet-cni's cluster mode.
//!
//! In cluster mode no agent calls Azure. Each agent writes the NIC it wants into its
//! `NodeIPPool`'s `status.cloudRequest` (a desired state with a generation); this allocator, the
//! only ARM caller of the cluster's principal, watches every `NodeIPPool`, brings each NIC to
//! what was asked in one write, and answers in `status.cloud` (the generation it acted on, the
//! NIC's entries, or the error). Because it sees the whole cluster's demand it can serve nodes
//! with pods waiting first, and pace itself under ARM's token buckets instead of every node
//! guessing (see docs/cluster-allocator.md).
//!
//! Leader-elected through a Lease ([`lease`]): of its replicas only the leader calls ARM.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use vnet_cloud::azure::AzureProvider;

pub mod budget;
mod inflight;
pub mod lease;
mod queue;
mod scheduler;
mod work;

pub use budget::BucketSettings;
pub use queue::START_SETTLE;

/// How the allocator runs. [`Settings::default`] suits a real cluster.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The namespace of the allocator's Lease (its own).
    pub namespace: String,
    /// This replica's identity in the Lease (the pod's name).
    pub holder: String,
    pub lease_name: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
    /// ARM's reads bucket for the principal, as the allocator plans with it.
    pub reads: BucketSettings,
    /// ARM's writes bucket.
    pub writes: BucketSettings,
    /// Nodes worked on at once.
    pub max_in_flight: usize,
    /// Limit for one Kubernetes API request (status patch, lease).
    pub request_timeout: Duration,
    /// What the allocator has done (the simulation and /metrics read it).
    pub counters: Arc<Counters>,
}

/// ARM documents reads 250 refilling 25/s and writes 200 refilling 10/s per principal; the
/// allocator plans with a small margin below both (ARM's remaining-budget headers lower its
/// view further when a caller it does not see, such as a person's `az`, spends some).
pub const DEFAULT_READS: BucketSettings = BucketSettings {
    size: 240.0,
    refill_per_sec: 24.5,
};
pub const DEFAULT_WRITES: BucketSettings = BucketSettings {
    size: 190.0,
    refill_per_sec: 9.8,
};

impl Default for Settings {
    fn default() -> Self {
        Settings {
            namespace: "kube-system".into(),
            holder: std::env::var("POD_NAME").unwrap_or_else(|_| "vnet-allocator".into()),
            lease_name: "vnet-cni-allocator".into(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            reads: DEFAULT_READS,
            writes: DEFAULT_WRITES,
            max_in_flight: 128,
            request_timeout: Duration::from_secs(10),
            counters: Arc::new(Counters::default()),
        }
    }
}

/// Running totals of what the allocator did.
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests answered (done or failed).
    pub jobs_done: AtomicU64,
    /// Of those, answered with an error.
    pub jobs_failed: AtomicU64,
    /// ARM requests made, by kind.
    pub arm_reads: AtomicU64,
    pub arm_writes: AtomicU64,
    /// NIC writes that changed a NIC (PUTs, successful or not, are in `arm_writes`).
    pub nic_writes: AtomicU64,
    /// ARM's 429 answers.
    pub throttled: AtomicU64,
    /// Nodes that need work and wait for it (not in flight).
    pub queue_depth: AtomicU64,
    pub in_flight: AtomicU64,
    /// 1 while this replica leads.
    pub leading: AtomicU64,
    /// What the allocator believes is left in ARM's buckets (whole tokens).
    pub local_reads: AtomicU64,
    pub local_writes: AtomicU64,
    /// When the scheduler's loop last went round ([`monotonic_ms`]; 0: not started). It goes
    /// round at least every half second, so an old value means the loop is wedged.
    pub loop_at_ms: AtomicU64,
}

/// The scheduler's loop may go this long without a round before /healthz fails (and the
/// kubelet restarts the replica): far beyond its half-second tick, well inside a liveness
/// probe's patience.
pub const LOOP_STALL: Duration = Duration::from_secs(30);

/// Milliseconds on a monotonic clock that starts with the process (never 0 once read: it
/// starts at 1).
pub fn monotonic_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CountersSnapshot {
    pub jobs_done: u64,
    pub jobs_failed: u64,
    pub arm_reads: u64,
    pub arm_writes: u64,
    pub nic_writes: u64,
    pub throttled: u64,
    pub queue_depth: u64,
    pub in_flight: u64,
    pub leading: bool,
    pub local_reads: u64,
    pub local_writes: u64,
}

impl Counters {
    /// Adds the ARM calls a job sent (finished, aborted or panicked alike).
    pub(crate) fn add_calls(&self, calls: &vnet_cloud::azure::ArmCalls) {
        self.arm_reads.fetch_add(calls.reads, Ordering::Relaxed);
        self.arm_writes.fetch_add(calls.writes, Ordering::Relaxed);
        self.throttled.fetch_add(calls.throttled, Ordering::Relaxed);
    }

    /// The loop went round just now.
    pub(crate) fn loop_went_round(&self) {
        self.loop_at_ms.store(monotonic_ms(), Ordering::Relaxed);
    }

    /// For /healthz: an error naming how long the scheduler's loop has not gone round, when
    /// that is longer than [`LOOP_STALL`] (a loop that has not started yet is healthy).
    pub fn loop_health(&self, now_ms: u64) -> Result<(), String> {
        let at = self.loop_at_ms.load(Ordering::Relaxed);
        let idle = Duration::from_millis(now_ms.saturating_sub(at));
        if at != 0 && idle > LOOP_STALL {
            return Err(format!(
                "the allocator's scheduler loop has not run for {} s (limit {} s)",
                idle.as_secs(),
                LOOP_STALL.as_secs()
            ));
        }
        Ok(())
    }

    pub fn snapshot(&self) -> CountersSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CountersSnapshot {
            jobs_done: get(&self.jobs_done),
            jobs_failed: get(&self.jobs_failed),
            arm_reads: get(&self.arm_reads),
            arm_writes: get(&self.arm_writes),
            nic_writes: get(&self.nic_writes),
            throttled: get(&self.throttled),
            queue_depth: get(&self.queue_depth),
            in_flight: get(&self.in_flight),
            leading: get(&self.leading) == 1,
            local_reads: get(&self.local_reads),
            local_writes: get(&self.local_writes),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid settings: {0}")]
    Settings(String),
}

/// The `spec.providerID` the cloud provider gives the Node of the VM (or scale-set instance)
/// whose ARM resource ID is `vm_id` (AKS: `azure:///subscriptions/.../virtualMachineScaleSets/
/// <ss>/virtualMachines/<n>`). The allocator serves a NodeIPPool only when the Node of the same
/// name carries this ID (compared ASCII case-insensitively) for the request's `instance.vmId`.
pub fn provider_id(vm_id: &str) -> String {
    format!("azure://{vm_id}")
}

/// The allocator's Azure client configuration from a plain one: the agents' per-request pacing
/// (`Pacing` floors) off, since the allocator budgets every call itself and that pacing would
/// only delay what it already planned. Build the `AzureProvider` given to [`run`] from this.
pub fn cloud_config(mut config: vnet_cloud::azure::AzureConfig) -> vnet_cloud::azure::AzureConfig {
    config.pacing.reads_floor = 0;
    config.pacing.writes_floor = 0;
    config
}

/// Runs the allocator until `shutdown` turns true: the Lease election, the watch of every
/// `NodeIPPool`, and (while leading) the work.
pub async fn run(
    client: kube::Client,
    cloud: Arc<AzureProvider>,
    settings: Settings,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), Error> {
    validate(&settings)?;
    scheduler::run(client, cloud, settings, shutdown).await;
    Ok(())
}

fn validate(s: &Settings) -> Result<(), Error> {
    let bad = |m: String| Err(Error::Settings(m));
    for (name, b) in [("reads", s.reads), ("writes", s.writes)] {
        if !(b.size >= 1.0 && b.refill_per_sec > 0.0 && b.refill_per_sec.is_finite()) {
            return bad(format!(
                "{name} bucket: size must be at least 1 and refill positive, got {b:?}"
            ));
        }
    }
    if s.max_in_flight == 0 {
        return bad("max_in_flight must be at least 1".into());
    }
    if s.renew_every.is_zero() || s.renew_every * 2 > s.lease_duration {
        return bad(format!(
            "renew_every ({:?}) must be positive and at most half of lease_duration ({:?})",
            s.renew_every, s.lease_duration
        ));
    }
    if s.holder.is_empty() || s.lease_name.is_empty() || s.namespace.is_empty() {
        return bad("holder, lease_name and namespace must be set".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_fails_once_the_loop_has_not_gone_round_for_the_stall_limit() {
        let counters = Counters::default();
        // Not started yet: healthy (the Lease and the watches may still be starting).
        assert_eq!(counters.loop_health(1_000_000), Ok(()));
        counters.loop_at_ms.store(10_000, Ordering::Relaxed);
        let stall = LOOP_STALL.as_millis() as u64;
        assert_eq!(counters.loop_health(10_000 + stall), Ok(()));
        let err = counters.loop_health(10_000 + stall + 1_000).unwrap_err();
        assert!(err.contains("has not run for 31 s"), "{err}");
        counters.loop_went_round();
        assert_eq!(counters.loop_health(monotonic_ms()), Ok(()));
    }
}
