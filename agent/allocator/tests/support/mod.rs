//! Shared set-up: a real vnet-mockcloud over HTTP on loopback, the fake API server authorizing
//! as the allocator's roles, and allocators run in-process against both.

#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use vnet_allocator::{BucketSettings, Counters, Settings};
use vnet_cloud::azure::{AzureConfig, AzureProvider, CredentialConfig};
use vnet_fakeapi::{FakeApi, NODES, POOLS};
use vnet_kube::crd::{CloudAnswer, CloudRequest, InstanceRef};
use vnet_mockcloud::{Faults, MockConfig, MockServer, RateLimits, Topology};

pub const ROLE: &str = "vnet-cni-allocator";

pub struct Lab {
    pub mock: MockServer,
    pub api: FakeApi,
}

pub struct Running {
    pub counters: Arc<Counters>,
    pub cloud: Arc<AzureProvider>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), vnet_allocator::Error>>,
}

impl Running {
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.task.await.unwrap().unwrap();
    }
}

impl Lab {
    /// `nodes` VMs in one subnet of `prefix`; the lab's operation timing (Retry-After 1 s).
    pub async fn new(nodes: usize, prefix: &str, limits: RateLimits) -> Lab {
        Lab::with_topology(
            Topology::single_subnet(prefix.parse().unwrap(), nodes),
            limits,
        )
        .await
    }

    pub async fn with_topology(topology: Topology, limits: RateLimits) -> Lab {
        let mut config = MockConfig::new(topology);
        config.rate_limits = limits;
        config.faults = Faults {
            operation_retry_after_secs: Some(1),
            ..Faults::default()
        };
        let mock = MockServer::start(config, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        Lab {
            mock,
            api: FakeApi::with_role(ROLE),
        }
    }

    pub fn provider(&self) -> Arc<AzureProvider> {
        let mut config = AzureConfig::mock(
            &self.mock.base_url(),
            &self.mock.imds_endpoint("node-1"),
            CredentialConfig::None,
        );
        config.retry.initial_backoff = Duration::from_millis(50);
        Arc::new(AzureProvider::new(vnet_allocator::cloud_config(config)).unwrap())
    }

    /// Settings for a test: short lease timing, the given buckets.
    pub fn settings(holder: &str, reads: BucketSettings, writes: BucketSettings) -> Settings {
        Settings {
            holder: holder.into(),
            lease_duration: Duration::from_secs(3),
            renew_every: Duration::from_secs(1),
            reads,
            writes,
            ..Settings::default()
        }
    }

    pub fn start(&self, settings: Settings) -> Running {
        self.start_with(self.api.client(), settings)
    }

    pub fn start_with(&self, client: kube::Client, settings: Settings) -> Running {
        let counters = settings.counters.clone();
        let cloud = self.provider();
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(vnet_allocator::run(
            client,
            cloud.clone(),
            settings,
            shutdown,
        ));
        Running {
            counters,
            cloud,
            stop,
            task,
        }
    }

    /// The Node `node` as the kubelet registers it on Azure: `spec.providerID` names its VM.
    pub fn node(&self, node: &str, provider_id: &str) {
        self.api.put(
            NODES,
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
                   "spec": {"providerID": provider_id}}),
        );
    }

    /// Writes node `node`'s NodeIPPool with this cloudRequest (as its agent would), and its Node
    /// (the VM the request names) if there is none yet.
    pub fn request(&self, node: &str, request: CloudRequest) {
        if self.api.get(NODES, node).is_none() {
            self.node(node, &vnet_allocator::provider_id(&request.instance.vm_id));
        }
        let mut pool = self.api.get(POOLS, node).unwrap_or_else(|| {
            json!({"apiVersion": "vnet-cni.io/v1alpha1", "kind": "NodeIPPool",
                   "metadata": {"name": node}, "spec": {},
                   "status": {"total": 0, "allocated": 0, "free": 0, "cooldown": 0,
                              "target": 0, "pending": 0, "max": 250, "pendingPods": 0}})
        });
        pool["status"]["cloudRequest"] = serde_json::to_value(&request).unwrap();
        self.api.put(POOLS, pool);
    }

    /// What IMDS tells `node` about itself (as its agent would put it in the request).
    pub async fn imds_instance(&self, node: &str) -> InstanceRef {
        let provider = AzureProvider::new(AzureConfig::mock(
            &self.mock.base_url(),
            &self.mock.imds_endpoint(node),
            CredentialConfig::None,
        ))
        .unwrap();
        InstanceRef::from(&provider.instance_metadata().await.unwrap())
    }

    pub fn instance(&self, node: &str) -> InstanceRef {
        let topology = self.mock.topology();
        InstanceRef {
            vm_id: topology.vm_id(node),
            vm_name: node.into(),
            computer_name: node.into(),
            ..InstanceRef::default()
        }
    }

    pub fn ask(
        &self,
        node: &str,
        generation: u64,
        addresses: u32,
        release: &[String],
        waiting: u32,
    ) {
        let request = CloudRequest {
            generation,
            instance: self.instance(node),
            addresses,
            release: release.to_vec(),
            waiting_pods: waiting,
            ..CloudRequest::default()
        };
        self.request(node, request);
    }

    pub fn answer(&self, node: &str) -> Option<CloudAnswer> {
        let pool = self.api.get(POOLS, node)?;
        let cloud = pool["status"].get("cloud")?.clone();
        Some(serde_json::from_value(cloud).unwrap())
    }

    /// The answer for `generation`, once there (the test fails with what there is otherwise).
    pub async fn answered(&self, node: &str, generation: u64) -> CloudAnswer {
        for _ in 0..600 {
            if let Some(answer) = self.answer(node)
                && answer.observed_generation == generation
            {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "{node}: no answer for generation {generation}; have {:?}",
            self.answer(node)
        );
    }

    /// The node's addresses of ours in the mock (the cloud's truth), sorted.
    pub fn nic_addresses(&self, node: &str) -> Vec<Ipv4Addr> {
        let mut ips: Vec<Ipv4Addr> = self
            .mock
            .state()
            .addresses
            .into_iter()
            .filter(|a| a.vm == node && !a.primary)
            .map(|a| a.ip)
            .collect();
        ips.sort();
        ips
    }

    pub fn nic_puts(&self) -> u64 {
        self.mock.counters().calls("nic_put")
    }
}

/// The names of the answer's entries holding `addresses` (what an agent lists in `release`).
pub fn names_of(answer: &CloudAnswer, addresses: &[Ipv4Addr]) -> Vec<String> {
    addresses
        .iter()
        .map(|a| {
            answer
                .secondary_ips
                .iter()
                .find(|s| s.ip == a.to_string())
                .unwrap_or_else(|| panic!("{a} is not in the answer {answer:?}"))
                .name
                .clone()
        })
        .collect()
}

/// The NIC's entries of ours in the mock: (name, address), sorted by address.
pub fn nic_entries(lab: &Lab, node: &str) -> Vec<(String, Ipv4Addr)> {
    let mut entries: Vec<(String, Ipv4Addr)> = lab
        .mock
        .state()
        .addresses
        .into_iter()
        .filter(|a| a.vm == node && !a.primary)
        .map(|a| (a.ip_configuration.clone(), a.ip))
        .collect();
    entries.sort_by_key(|e| e.1);
    entries
}

pub fn ips(answer: &CloudAnswer) -> Vec<Ipv4Addr> {
    let mut ips: Vec<Ipv4Addr> = answer
        .secondary_ips
        .iter()
        .map(|s| s.ip.parse().unwrap())
        .collect();
    ips.sort();
    ips
}

/// Plenty: a test that is not about the budget.
pub const ROOMY: BucketSettings = BucketSettings {
    size: 1000.0,
    refill_per_sec: 100.0,
};

pub fn roomy_limits() -> RateLimits {
    RateLimits {
        reads: vnet_mockcloud::Bucket {
            size: 1000,
            refill_per_sec: 100.0,
        },
        writes: vnet_mockcloud::Bucket {
            size: 1000,
            refill_per_sec: 100.0,
        },
    }
}

/// Waits (bounded) until `ready` holds.
pub async fn until(what: &str, mut ready: impl FnMut() -> bool) {
    for _ in 0..600 {
        if ready() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never happened: {what}");
}

/// Waits (at most 5 s) until `counters` count `jobs` jobs done: an answer is visible as soon as
/// its patch lands, and its job is counted when the scheduler joins it, a moment later.
pub async fn jobs_counted(counters: &Counters, jobs: u64) {
    for _ in 0..100 {
        if counters.snapshot().jobs_done >= jobs {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
