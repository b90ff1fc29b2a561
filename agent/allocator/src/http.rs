//! /healthz and /metrics, served on the agent's bounded listener (`vnet_kube::listener`).

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use vnet_allocator::Counters;
use vnet_cloud::CloudProvider;
use vnet_cloud::azure::AzureProvider;

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
