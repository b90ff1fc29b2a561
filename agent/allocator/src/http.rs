//! /healthz and /metrics, served on the agent's bounded listener (`vnet_kube::listener`).
//! /healthz fails when the scheduler's loop is wedged (`Counters::loop_health`), so the
//! liveness probe restarts the replica.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use vnet_allocator::Counters;
use vnet_cloud::CloudProvider;
use vnet_cloud::azure::AzureProvider;

pub fn router(counters: Arc<Counters>, cloud: Arc<AzureProvider>) -> Router {
    Router::new()
        .route(
            "/healthz",
            get({
                let counters = counters.clone();
                move || {
                    let answer = healthz(&counters, vnet_allocator::monotonic_ms());
                    async move { answer }
                }
            }),
        )
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

fn healthz(counters: &Counters, now_ms: u64) -> (StatusCode, String) {
    match counters.loop_health(now_ms) {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
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
    metric(
        "budget_reads",
        "gauge",
        "Reads the allocator believes are left in ARM's bucket, less what its jobs reserved.",
        s.local_reads,
    );
    metric(
        "budget_writes",
        "gauge",
        "Writes the allocator believes are left in ARM's bucket, less what its jobs reserved.",
        s.local_writes,
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use vnet_cloud::azure::{AzureConfig, CredentialConfig};

    use super::*;

    #[test]
    fn metrics_carry_every_documented_series() {
        let counters = Counters::default();
        counters.queue_depth.store(7, Ordering::Relaxed);
        counters.local_reads.store(60, Ordering::Relaxed);
        let cloud = AzureProvider::new(AzureConfig::mock(
            "http://127.0.0.1:9",
            "http://127.0.0.1:9",
            CredentialConfig::None,
        ))
        .unwrap();
        let text = metrics(&counters, &cloud);
        // docs/cluster-allocator.md lists these.
        for name in [
            "jobs_total",
            "jobs_failed_total",
            "arm_reads_total",
            "arm_writes_total",
            "nic_writes_total",
            "arm_throttled_total",
            "queue_depth",
            "jobs_in_flight",
            "leader",
            "budget_reads",
            "budget_writes",
        ] {
            assert!(
                text.contains(&format!("# TYPE vnet_allocator_{name} ")),
                "{name} in {text}"
            );
        }
        assert!(text.contains("vnet_allocator_queue_depth 7\n"), "{text}");
        assert!(text.contains("vnet_allocator_budget_reads 60\n"), "{text}");
    }

    #[test]
    fn healthz_answers_503_once_the_loop_is_wedged() {
        let counters = Counters::default();
        counters.loop_at_ms.store(1_000, Ordering::Relaxed);
        assert_eq!(healthz(&counters, 2_000).0, StatusCode::OK);
        let (status, body) = healthz(&counters, 1_000 + 31_000);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("has not run for 31 s"), "{body}");
    }
}
