//! Prometheus metrics (prometheus-client), served as text on `metrics_address` at `/metrics`.
//!
//! Pool gauges are refreshed from the live state at every scrape, so they are never stale.
//! Cloud calls are counted by [`MeteredCloud`], a wrapper around any [`CloudProvider`].

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use vnet_cloud::{CloudError, CloudProvider, NodeIdentity, SecondaryIp};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloudLabels {
    pub operation: &'static str,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub kind: &'static str,
    pub scale_set: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub endpoint: String,
    pub result: String,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~52 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

pub struct Metrics {
    registry: Registry,
    /// Addresses by state: total, allocated, free, cooldown, pending, unreconciled.
    pub ips: Family<StateLabels, Gauge>,
    pub pool_target: Gauge,
    pub subnet_full: Gauge,
    pub allocate_latency: Histogram,
    pub cloud_calls: Family<CloudLabels, Counter>,
    pub cloud_errors: Family<CloudLabels, Counter>,
    pub cloud_latency: Family<OperationLabels, Histogram>,
    pub store_commit_latency: Histogram,
    pub api_requests: Family<ApiLabels, Counter>,
    /// 1 for the node's kind (vm, uniform, flexible) and scale set, as discovery found them.
    pub node_info: Family<NodeLabels, Gauge>,
    /// Addresses the cloud took off the NIC without a release by this agent, by what they were.
    pub addresses_lost: Family<StateLabels, Counter>,
    /// ARM's `x-ms-ratelimit-remaining-subscription-reads/writes`, by `kind` (read, write).
    pub arm_remaining: Family<KindLabels, Gauge>,
    /// 429 answers the cloud client has seen.
    pub arm_throttled: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("vnet_agent");
        let ips = Family::<StateLabels, Gauge>::default();
        let pool_target = Gauge::default();
        let subnet_full = Gauge::default();
        let allocate_latency = latency_histogram();
        let cloud_calls = Family::<CloudLabels, Counter>::default();
        let cloud_errors = Family::<CloudLabels, Counter>::default();
        let cloud_latency = Family::<OperationLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let store_commit_latency = latency_histogram();
        let api_requests = Family::<ApiLabels, Counter>::default();
        let node_info = Family::<NodeLabels, Gauge>::default();
        let addresses_lost = Family::<StateLabels, Counter>::default();
        registry.register(
            "node_info",
            "The node as the cloud reports it: kind (vm, uniform or flexible scale-set member) and scale set",
            node_info.clone(),
        );
        registry.register(
            "addresses_lost",
            "Addresses the cloud removed from the NIC without a release by this agent (a reimage or model upgrade of a scale-set instance, another writer), by state: allocated (a pod still holds it; kept, never handed out again) or free",
            addresses_lost.clone(),
        );
        let arm_remaining = Family::<KindLabels, Gauge>::default();
        let arm_throttled = Gauge::default();
        registry.register(
            "arm_remaining_requests",
            "Requests ARM last said this identity has left (x-ms-ratelimit-remaining-subscription-reads/writes), by kind",
            arm_remaining.clone(),
        );
        registry.register(
            "arm_throttled_responses",
            "429 answers from ARM seen by the cloud client since start",
            arm_throttled.clone(),
        );
        registry.register(
            "ip_addresses",
            "Pod addresses by state (total, allocated, free, cooldown, pending, unreconciled)",
            ips.clone(),
        );
        registry.register(
            "pool_target",
            "Total pool size the agent steers towards",
            pool_target.clone(),
        );
        registry.register(
            "subnet_full",
            "1 while the pod subnet reported SubnetIsFull and the agent backs off",
            subnet_full.clone(),
        );
        registry.register(
            "allocate_latency_seconds",
            "Time to answer an allocation, including waiting for the cloud and the store",
            allocate_latency.clone(),
        );
        registry.register(
            "cloud_calls",
            "Cloud provider calls by operation and result code (ok or an error code)",
            cloud_calls.clone(),
        );
        registry.register(
            "cloud_errors",
            "Failed cloud provider calls by operation and error code",
            cloud_errors.clone(),
        );
        registry.register(
            "cloud_latency_seconds",
            "Cloud provider call latency by operation",
            cloud_latency.clone(),
        );
        registry.register(
            "store_commit_latency_seconds",
            "Time from queuing a store record to its fsync",
            store_commit_latency.clone(),
        );
        registry.register(
            "api_requests",
            "Unix-socket API requests by endpoint and result (HTTP status)",
            api_requests.clone(),
        );
        Metrics {
            registry,
            ips,
            pool_target,
            subnet_full,
            allocate_latency,
            cloud_calls,
            cloud_errors,
            cloud_latency,
            store_commit_latency,
            api_requests,
            node_info,
            addresses_lost,
            arm_remaining,
            arm_throttled,
        }
    }

    /// Copies the cloud client's last reported ARM budget into the gauges.
    fn observe_budget(&self, budget: Option<vnet_cloud::ArmBudget>) {
        let Some(budget) = budget else {
            return;
        };
        for (kind, value) in [
            ("read", budget.remaining_reads),
            ("write", budget.remaining_writes),
        ] {
            if let Some(v) = value {
                self.arm_remaining
                    .get_or_create(&KindLabels { kind })
                    .set(i64::try_from(v).unwrap_or(i64::MAX));
            }
        }
        self.arm_throttled
            .set(i64::try_from(budget.throttled).unwrap_or(i64::MAX));
    }

    pub fn set_ips(&self, state: &'static str, value: u32) {
        self.ips
            .get_or_create(&StateLabels { state })
            .set(value as i64);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    fn observe_cloud<T>(
        &self,
        operation: &'static str,
        started: Instant,
        result: &Result<T, CloudError>,
    ) {
        let code = match result {
            Ok(_) => "ok",
            Err(e) => e.code(),
        };
        self.cloud_calls
            .get_or_create(&CloudLabels { operation, code })
            .inc();
        if result.is_err() {
            self.cloud_errors
                .get_or_create(&CloudLabels { operation, code })
                .inc();
        }
        self.cloud_latency
            .get_or_create(&OperationLabels { operation })
            .observe(started.elapsed().as_secs_f64());
    }

    fn observe(
        &self,
        cloud: &dyn CloudProvider,
        operation: &'static str,
        started: Instant,
        result: &Result<impl Sized, CloudError>,
    ) {
        self.observe_cloud(operation, started, result);
        self.observe_budget(cloud.arm_budget());
    }
}

/// A [`CloudProvider`] that records every call in [`Metrics`].
pub struct MeteredCloud {
    inner: Arc<dyn CloudProvider>,
    metrics: Arc<Metrics>,
}

impl MeteredCloud {
    pub fn new(inner: Arc<dyn CloudProvider>, metrics: Arc<Metrics>) -> Self {
        MeteredCloud { inner, metrics }
    }
}

#[async_trait]
impl CloudProvider for MeteredCloud {
    async fn discover(&self) -> Result<NodeIdentity, CloudError> {
        let started = Instant::now();
        let r = self.inner.discover().await;
        self.metrics
            .observe(self.inner.as_ref(), "discover", started, &r);
        r
    }

    async fn list_secondary_ips(&self, nic_id: &str) -> Result<Vec<SecondaryIp>, CloudError> {
        let started = Instant::now();
        let r = self.inner.list_secondary_ips(nic_id).await;
        self.metrics
            .observe(self.inner.as_ref(), "list_secondary_ips", started, &r);
        r
    }

    async fn assign_ips(
        &self,
        nic_id: &str,
        subnet_id: &str,
        count: usize,
    ) -> Result<Vec<SecondaryIp>, CloudError> {
        let started = Instant::now();
        let r = self.inner.assign_ips(nic_id, subnet_id, count).await;
        self.metrics
            .observe(self.inner.as_ref(), "assign_ips", started, &r);
        r
    }

    async fn assign_blocks(
        &self,
        nic_id: &str,
        subnet_id: &str,
        count: usize,
        prefix_len: u8,
    ) -> Result<Vec<SecondaryIp>, CloudError> {
        let started = Instant::now();
        let r = self
            .inner
            .assign_blocks(nic_id, subnet_id, count, prefix_len)
            .await;
        self.metrics
            .observe(self.inner.as_ref(), "assign_blocks", started, &r);
        r
    }

    async fn release_ips(&self, nic_id: &str, ips: &[Ipv4Addr]) -> Result<(), CloudError> {
        let started = Instant::now();
        let r = self.inner.release_ips(nic_id, ips).await;
        self.metrics
            .observe(self.inner.as_ref(), "release_ips", started, &r);
        r
    }

    fn set_waiting_pods(&self, pods: u32) {
        self.inner.set_waiting_pods(pods);
    }

    fn arm_budget(&self) -> Option<vnet_cloud::ArmBudget> {
        self.inner.arm_budget()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arm_budget_headers_become_gauges() {
        let m = Metrics::new();
        m.observe_budget(Some(vnet_cloud::ArmBudget {
            remaining_reads: Some(240),
            remaining_writes: Some(7),
            throttled: 2,
        }));
        let text = m.encode();
        assert!(
            text.contains("vnet_agent_arm_remaining_requests{kind=\"write\"} 7"),
            "{text}"
        );
        assert!(text.contains("vnet_agent_arm_remaining_requests{kind=\"read\"} 240"));
        assert!(text.contains("vnet_agent_arm_throttled_responses 2"));
    }

    #[tokio::test]
    async fn cloud_calls_are_counted_by_operation_and_code() {
        let fake = Arc::new(vnet_cloud::fake::FakeCloud::new());
        let metrics = Arc::new(Metrics::new());
        let cloud = MeteredCloud::new(fake.clone(), metrics.clone());
        let nic = fake.identity().nic_id.clone();
        let subnet = fake.identity().subnet_id.clone();
        cloud.assign_ips(&nic, &subnet, 2).await.unwrap();
        fake.fail_next(CloudError::Throttled {
            retry_after: std::time::Duration::from_secs(1),
        });
        cloud.assign_ips(&nic, &subnet, 2).await.unwrap_err();
        let text = metrics.encode();
        assert!(
            text.contains(r#"vnet_agent_cloud_calls_total{operation="assign_ips",code="ok"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"vnet_agent_cloud_errors_total{operation="assign_ips",code="throttled"} 1"#
            ),
            "{text}"
        );
    }
}
