//! The allocator alone at cluster scale: N nodes' requests (written into the fake API server as
//! their agents would) against one vnet-mockcloud over HTTP with ARM's documented buckets and the
//! lab's timing (NIC PUT 1 s, operation `Retry-After` 1 s). Two rounds:
//!
//! - cold: every node asks for `addresses` at once; nothing is known (each identity resolved);
//! - scale-out: every node asks for `addresses` more (identities and NICs known), once ARM's
//!   buckets are full again.
//!
//! Prints one JSON line per round: NIC writes and ARM reads (from the mock's counters), 429s,
//! seconds until every node was answered, and the budget's bounds for those calls (ARM's
//! documented buckets: writes 200 + 10/s, reads 250 + 25/s).
//!
//!   cargo run --release -p vnet-allocator --example scale -- 1000 30

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;
use support::Lab;
use vnet_allocator::Settings;
use vnet_mockcloud::{Faults, Latency, RateLimits};

fn reads_of(calls: &BTreeMap<String, u64>) -> u64 {
    calls
        .iter()
        .filter(|(op, _)| op.ends_with("_get") && op.as_str() != "imds")
        .map(|(_, n)| *n)
        .sum()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let nodes: usize = args.get(1).map(|a| a.parse().unwrap()).unwrap_or(100);
    let addresses: u32 = args.get(2).map(|a| a.parse().unwrap()).unwrap_or(30);
    let prefix = if nodes * addresses as usize * 2 < 60_000 {
        "10.0.0.0/16"
    } else {
        "10.0.0.0/12"
    };
    let lab = Lab::new(nodes, prefix, RateLimits::default()).await;
    let mut faults = Faults {
        operation_retry_after_secs: Some(1),
        ..Faults::default()
    };
    faults.latency.insert(
        "nic_put".into(),
        Latency {
            fixed_ms: 1000,
            jitter_ms: 0,
        },
    );
    lab.mock.set_faults(faults);
    let allocator = lab.start(Settings {
        holder: "bench".into(),
        ..Settings::default()
    });
    for (round, generation, want) in [("cold", 1, addresses), ("scale_out", 2, 2 * addresses)] {
        if generation > 1 {
            // Both buckets full again (writes: 200 at 10/s), as on a cluster at rest.
            tokio::time::sleep(Duration::from_secs(21)).await;
        }
        let before = lab.mock.counters();
        let throttled_before = allocator.cloud.arm_calls().throttled;
        let started = Instant::now();
        for i in 1..=nodes {
            lab.ask(&format!("node-{i}"), generation, want, &[], addresses);
        }
        let mut pending: Vec<String> = (1..=nodes).map(|i| format!("node-{i}")).collect();
        let mut next_report = Duration::from_secs(10);
        let mut next_trace = Duration::from_secs(1);
        while !pending.is_empty() {
            pending.retain(|node| {
                lab.answer(node)
                    .is_none_or(|a| a.observed_generation != generation)
            });
            if std::env::var_os("SCALE_TRACE").is_some() && started.elapsed() >= next_trace {
                let c = allocator.counters.snapshot();
                let arm = allocator.cloud.arm_remaining();
                eprintln!(
                    "trace {round} t={:.1} local_reads={} arm_reads={:?} local_writes={} arm_writes={:?} throttled={}",
                    started.elapsed().as_secs_f64(),
                    c.local_reads,
                    arm.reads.map(|r| (r.remaining, r.age.as_millis())),
                    c.local_writes,
                    arm.writes.map(|r| (r.remaining, r.age.as_millis())),
                    allocator.cloud.arm_calls().throttled
                );
                next_trace += Duration::from_secs(1);
            }
            if started.elapsed() >= next_report {
                let c = allocator.counters.snapshot();
                eprintln!(
                    "{round} t={:>4}s answered={} nic_writes={} in_flight={} queued={}",
                    next_report.as_secs(),
                    nodes - pending.len(),
                    lab.nic_puts() - before.calls("nic_put"),
                    c.in_flight,
                    c.queue_depth
                );
                next_report += Duration::from_secs(10);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        let after = lab.mock.counters();
        let writes = after.calls("nic_put") - before.calls("nic_put");
        let reads = reads_of(&after.calls) - reads_of(&before.calls);
        let throttled = allocator.cloud.arm_calls().throttled - throttled_before;
        let throttled_by_operation: BTreeMap<String, u64> = after
            .responses
            .iter()
            .filter(|(k, _)| k.ends_with(" 429"))
            .map(|(k, n)| (k.clone(), n - before.responses.get(k).copied().unwrap_or(0)))
            .filter(|(_, n)| *n > 0)
            .collect();
        let bound = |calls: u64, size: f64, rate: f64| ((calls as f64 - size).max(0.0)) / rate;
        let failed = (1..=nodes)
            .filter(|i| {
                lab.answer(&format!("node-{i}"))
                    .is_some_and(|a| a.error.is_some())
            })
            .count();
        println!(
            "{}",
            json!({
                "round": round, "nodes": nodes, "addresses_per_node": want,
                "nic_writes": writes, "min_writes": nodes, "arm_reads": reads,
                "throttled_429": throttled, "throttled_by_operation": throttled_by_operation,
                "failed_answers": failed,
                "seconds_to_all_answered": (seconds * 10.0).round() / 10.0,
                "write_bound_s": (bound(writes, 200.0, 10.0) * 10.0).round() / 10.0,
                "read_bound_s": (bound(reads, 250.0, 25.0) * 10.0).round() / 10.0,
            })
        );
    }
    allocator.stop().await;
}
