//! How kubelet retries a pod whose sandbox could not be set up.
//!
//! kubelet's pod worker (kubernetes `pkg/kubelet/pod_workers.go`) requeues a pod whose sync
//! failed after `wait.Jitter(backOffPeriod, workerBackOffPeriodJitterFactor)`, with
//! `backOffPeriod = 10 s` (`pkg/kubelet/kubelet.go`) and the jitter factor 0.5: a uniform wait in
//! [10 s, 15 s), the same after every failure (the doubling up to `MaxContainerBackOff = 300 s`
//! is for container restarts and image pulls, not for a failed sandbox). While the node's
//! network is not ready (no CNI config yet) it requeues after `backOffOnTransientErrorPeriod =
//! 1 s`, jittered the same way: [1 s, 1.5 s).
//!
//! Each attempt is one CNI ADD: the plugin asks the agent, which waits up to its
//! `allocate_timeout` (30 s by default) for an address before answering "try again later".

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::node::{Node, Refusal};

pub const BACKOFF_PERIOD: Duration = Duration::from_secs(10);
pub const NETWORK_NOT_READY_PERIOD: Duration = Duration::from_secs(1);
pub const JITTER_FACTOR: f64 = 0.5;

/// `wait.Jitter(d, f)`: `d + rand[0, f*d)`.
pub fn jitter(d: Duration, factor: f64) -> Duration {
    d + d.mul_f64(factor * rand::random_range(0.0..1.0))
}

#[derive(Default)]
pub struct Tally {
    pub try_again: AtomicU64,
    pub exhausted: AtomicU64,
    pub other: AtomicU64,
}

/// One pod scheduled at `scheduled` onto the node `slot` will hold once it is ready. Returns
/// when the pod is wired: the wait since `scheduled`.
pub async fn run_pod(
    mut slot: watch::Receiver<Option<Arc<Node>>>,
    key: String,
    scheduled: Instant,
    tally: Arc<Tally>,
) -> Duration {
    let mut waited_for_network = false;
    let node = loop {
        if let Some(node) = slot.borrow_and_update().clone() {
            break node;
        }
        waited_for_network = true;
        if slot.changed().await.is_err() {
            // The run is over without this node ever becoming ready.
            std::future::pending::<()>().await;
        }
    };
    if waited_for_network {
        // The pod sat in kubelet's "network not ready" requeue: it notices the ready node at
        // its next 1-1.5 s re-check, somewhere within that period.
        let period = jitter(NETWORK_NOT_READY_PERIOD, JITTER_FACTOR);
        tokio::time::sleep(period.mul_f64(rand::random_range(0.0..1.0))).await;
    }
    loop {
        match node.allocate(&key).await {
            Ok(_) => return scheduled.elapsed(),
            Err(refusal) => {
                let counter = match refusal {
                    Refusal::TryAgainLater => &tally.try_again,
                    Refusal::Exhausted => &tally.exhausted,
                    Refusal::Other(_) => &tally.other,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(jitter(BACKOFF_PERIOD, JITTER_FACTOR)).await;
            }
        }
    }
}
