//! /healthz and /metrics on a bounded listener: at most [`MAX_CONNECTIONS`] at once, headers
//! within [`HEADER_TIMEOUT`], one request per connection, each connection at most
//! [`CONNECTION_TIMEOUT`] (as the agent's listener, agent/src/listener.rs).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use vnet_allocator::Counters;
use vnet_cloud::CloudProvider;
use vnet_cloud::azure::AzureProvider;

pub const MAX_CONNECTIONS: usize = 32;
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);

pub fn router(counters: Arc<Counters>, cloud: Arc<AzureProvider>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let counters = counters.clone();
                let cloud = cloud.clone();
                async move {
                    (
                        [("content-type", "text/plain; version=0.0.4")],
                        metrics(&counters, &cloud),
                    )
                }
            }),
        )
}

/// The counters in Prometheus' text format.
fn metrics(counters: &Counters, cloud: &AzureProvider) -> String {
    let s = counters.snapshot();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(out, "# HELP vnet_allocator_{name} {help}");
        let _ = writeln!(out, "# TYPE vnet_allocator_{name} {kind}");
        let _ = writeln!(out, "vnet_allocator_{name} {value}");
    };
    metric(
        "jobs_total",
        "counter",
        "Node requests answered (done or failed).",
        s.jobs_done,
    );
    metric(
        "jobs_failed_total",
        "counter",
        "Node requests answered with an error.",
        s.jobs_failed,
    );
    metric(
        "arm_reads_total",
        "counter",
        "ARM read requests sent.",
        s.arm_reads,
    );
    metric(
        "arm_writes_total",
        "counter",
        "ARM write requests sent.",
        s.arm_writes,
    );
    metric(
        "nic_writes_total",
        "counter",
        "Jobs that wrote a NIC.",
        s.nic_writes,
    );
    metric(
        "arm_throttled_total",
        "counter",
        "ARM 429 (throttled) answers.",
        s.throttled,
    );
    metric(
        "queue_depth",
        "gauge",
        "Nodes whose request waits for a job.",
        s.queue_depth,
    );
    metric("jobs_in_flight", "gauge", "Jobs under way.", s.in_flight);
    metric(
        "leader",
        "gauge",
        "1 while this replica holds the lease.",
        u64::from(s.leading),
    );
    if let Some(budget) = cloud.arm_budget() {
        if let Some(v) = budget.remaining_reads {
            metric(
                "arm_remaining_reads",
                "gauge",
                "ARM's last reported remaining reads.",
                v,
            );
        }
        if let Some(v) = budget.remaining_writes {
            metric(
                "arm_remaining_writes",
                "gauge",
                "ARM's last reported remaining writes.",
                v,
            );
        }
    }
    out
}

/// Serves `app` on `listener` until the future is dropped.
pub async fn serve(listener: TcpListener, app: Router) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use vnet_cloud::azure::{AzureConfig, CredentialConfig};

    #[test]
    fn metrics_are_prometheus_text_with_every_counter() {
        let counters = Counters::default();
        counters.jobs_done.store(7, Ordering::Relaxed);
        counters.throttled.store(2, Ordering::Relaxed);
        counters.leading.store(1, Ordering::Relaxed);
        let cloud = AzureProvider::new(AzureConfig::mock(
            "http://127.0.0.1:9",
            "http://127.0.0.1:9",
            CredentialConfig::None,
        ))
        .unwrap();
        let text = metrics(&counters, &cloud);
        for line in [
            "vnet_allocator_jobs_total 7",
            "vnet_allocator_arm_throttled_total 2",
            "vnet_allocator_leader 1",
            "vnet_allocator_queue_depth 0",
            "# TYPE vnet_allocator_jobs_total counter",
            "# TYPE vnet_allocator_queue_depth gauge",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing in:\n{text}"
            );
        }
        // ARM has not reported a budget yet: no made-up gauge.
        assert!(!text.contains("arm_remaining"));
    }
}
