//! Retries after 429 / busy answers are spread: never before `Retry-After`, and not in step.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use serde_json::json;
use vnet_cloud::CloudProvider;

/// Four nodes throttled by the same answer (`Retry-After: 2`) must not come back together.
#[tokio::test]
async fn throttled_reads_retry_after_retry_after_and_not_in_step() {
    let lab = Lab::with_subnet("10.240.0.0/24", 4).await;
    let mut delays = Vec::new();
    for n in 1..=4 {
        let vm = format!("node-{n}");
        lab.set_faults(json!({
            "throttle": {"count": 2, "retry_after_secs": 2, "operations": ["nic_get"]}
        }))
        .await;
        let (provider, sleeper) = lab.provider(&vm);
        provider.list_secondary_ips(&lab.nic_id(&vm)).await.unwrap();
        let recorded = sleeper.delays();
        assert_eq!(recorded.len(), 2, "{vm}: {recorded:?}");
        delays.extend(recorded);
    }
    assert!(
        delays
            .iter()
            .all(|d| *d >= Duration::from_secs(2) && *d <= Duration::from_secs(3)),
        "every retry at or after Retry-After, at most half of it later: {delays:?}"
    );
    let distinct: BTreeSet<_> = delays.iter().collect();
    assert_eq!(distinct.len(), delays.len(), "retries in step: {delays:?}");
}

/// The NIC write's own loop (a busy NIC, a throttled PUT) spreads its retries the same way.
#[tokio::test]
async fn retried_nic_writes_wait_past_retry_after_with_jitter() {
    let lab = Lab::with_subnet("10.240.0.0/24", 1).await;
    let mut waits = Vec::new();
    for faults in [
        json!({"throttle": {"count": 1, "retry_after_secs": 4, "operations": ["nic_put"]},
               "operation_retry_after_secs": 0}),
        json!({"busy": {"count": 1, "retry_after_secs": 4}, "operation_retry_after_secs": 0}),
        json!({"throttle": {"count": 1, "retry_after_secs": 4, "operations": ["nic_put"]},
               "operation_retry_after_secs": 0}),
    ] {
        lab.set_faults(faults).await;
        let (provider, sleeper) = lab.provider("node-1");
        provider
            .assign_ips(&lab.nic_id("node-1"), &lab.subnet_id(), 1)
            .await
            .unwrap();
        // The operation polls wait 0 s here; the retry is the one delay of seconds.
        let retries: Vec<Duration> = sleeper
            .delays()
            .into_iter()
            .filter(|d| *d >= Duration::from_secs(1))
            .collect();
        assert_eq!(retries.len(), 1, "{:?}", sleeper.delays());
        waits.push(retries[0]);
    }
    assert!(
        waits
            .iter()
            .all(|d| *d >= Duration::from_secs(4) && *d <= Duration::from_secs(6)),
        "{waits:?}"
    );
    let distinct: BTreeSet<_> = waits.iter().collect();
    assert_eq!(distinct.len(), waits.len(), "retries in step: {waits:?}");
}
