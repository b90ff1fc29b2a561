//! A real vnet-mockcloud on 127.0.0.1 and an AzureProvider pointed at it.

#![allow(dead_code)]

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use vnet_cloud::azure::{AzureConfig, AzureProvider, CredentialConfig, RetryPolicy, Sleeper};
use vnet_mockcloud::{
    Counters, MockConfig, MockServer, Principal, Principals, RoleDefinition, StateView, Topology,
};

/// Records every delay the provider asks for and waits only a millisecond, so retry timing is
/// asserted on what the client decided, not on the clock (`real`: waits the whole delay, for
/// tests where the mock's clock matters, such as throttling buckets refilling).
#[derive(Default)]
pub struct RecordingSleeper {
    delays: Mutex<Vec<Duration>>,
    pub real: bool,
}

impl RecordingSleeper {
    /// Records and really waits each delay.
    pub fn real() -> RecordingSleeper {
        RecordingSleeper {
            real: true,
            ..RecordingSleeper::default()
        }
    }

    pub fn delays(&self) -> Vec<Duration> {
        self.delays.lock().unwrap().clone()
    }
}

impl Sleeper for RecordingSleeper {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        self.delays.lock().unwrap().push(duration);
        let wait = if self.real {
            duration
        } else {
            Duration::from_millis(1)
        };
        Box::pin(tokio::time::sleep(wait))
    }
}

/// The custom role docs/cloud.md shows and the Terraform grants: the agents' permissions.
pub const ROLE_JSON: &str = include_str!("../../../deploy/azure/vnet-cni-role.json");

pub fn role() -> RoleDefinition {
    serde_json::from_str(ROLE_JSON).expect("deploy/azure/vnet-cni-role.json parses")
}

/// The static test token of `vm`'s agent.
pub fn token_of(vm: &str) -> String {
    format!("test-token-{vm}")
}

/// One principal per VM (token [`token_of`]) with `role`.
pub fn principals(topology: &Topology, role: &RoleDefinition) -> Principals {
    Principals::new(
        topology
            .vms
            .iter()
            .map(|vm| Principal {
                token: token_of(&vm.name),
                name: format!("agent-{}", vm.name),
                object_id: "11111111-2222-3333-4444-555555555555".into(),
                role: role.clone(),
            })
            .collect(),
    )
    .unwrap()
}

pub struct Lab {
    pub mock: MockServer,
    pub http: reqwest::Client,
}

impl Lab {
    pub async fn start(topology: Topology) -> Lab {
        Lab::start_with(MockConfig::new(topology)).await
    }

    /// Unless the test gives its own, every VM's agent is a principal with the shipped role
    /// (deploy/azure/vnet-cni-role.json), so every test runs against the real permissions.
    /// `http` sends node-1's token, for tests that speak the wire API themselves.
    pub async fn start_with(mut config: MockConfig) -> Lab {
        if config.principals.is_none() {
            config.principals = Some(principals(&config.topology, &role()));
        }
        let mock = MockServer::start(config, "127.0.0.1:0".parse().unwrap())
            .await
            .expect("mock starts");
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {}", token_of("node-1")).parse().unwrap(),
        );
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .unwrap();
        Lab { mock, http }
    }

    /// `vm_count` VMs node-1.. in one subnet `prefix`.
    pub async fn with_subnet(prefix: &str, vm_count: usize) -> Lab {
        Lab::start(Topology::single_subnet(prefix.parse().unwrap(), vm_count)).await
    }

    /// A provider for `vm` with its static test token (each VM its own principal).
    pub fn provider(&self, vm: &str) -> (AzureProvider, Arc<RecordingSleeper>) {
        let sleeper = Arc::new(RecordingSleeper::default());
        let provider =
            AzureProvider::with_sleeper(self.config(vm), sleeper.clone()).expect("provider");
        (provider, sleeper)
    }

    /// The configuration [`Lab::provider`] uses (tests change it for special cases).
    pub fn config(&self, vm: &str) -> AzureConfig {
        let mut config = AzureConfig::mock(
            &self.mock.base_url(),
            &self.mock.imds_endpoint(vm),
            CredentialConfig::StaticToken {
                token: token_of(vm),
            },
        );
        config.retry = RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(60),
            max_write_attempts: 20,
            default_poll_interval: Duration::from_secs(2),
            operation_timeout: Duration::from_secs(300),
        };
        config.request_timeout = Duration::from_secs(20);
        config
    }

    pub fn nic_id(&self, vm: &str) -> String {
        format!(
            "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.Network/networkInterfaces/{vm}-nic"
        )
    }

    pub fn subnet_id(&self) -> String {
        "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/vnet/subnets/nodes"
            .to_string()
    }

    /// Replaces the faults through the admin API (as the lab does).
    pub async fn set_faults(&self, faults: Value) {
        let response = self
            .http
            .put(format!("{}/admin/faults", self.mock.base_url()))
            .json(&faults)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "faults rejected: {}",
            response.text().await.unwrap()
        );
    }

    pub async fn counters(&self) -> Counters {
        self.http
            .get(format!("{}/admin/counters", self.mock.base_url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn reset_counters(&self) {
        let url = format!("{}/admin/counters/reset", self.mock.base_url());
        assert!(
            self.http
                .post(url)
                .send()
                .await
                .unwrap()
                .status()
                .is_success()
        );
    }

    pub async fn state(&self) -> StateView {
        self.http
            .get(format!("{}/admin/state", self.mock.base_url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Secondary (non-primary) addresses the cloud shows on `vm`'s NIC.
    pub async fn secondary_on(&self, vm: &str) -> Vec<std::net::Ipv4Addr> {
        let mut ips: Vec<_> = self
            .state()
            .await
            .addresses
            .into_iter()
            .filter(|a| a.vm == vm && !a.primary)
            .map(|a| a.ip)
            .collect();
        ips.sort();
        ips
    }
}

/// node-1 a standalone VM, node-2 and node-3 instances 0 and 1 of Uniform scale set `pool1`,
/// node-4 a member of Flexible scale set `flex`, all in one subnet `prefix`.
pub fn mixed_topology(prefix: &str) -> Topology {
    use vnet_mockcloud::topology::{Orchestration, ScaleSetSpec};
    let mut topology = Topology::single_subnet(prefix.parse().unwrap(), 4);
    topology.scale_sets = vec![
        ScaleSetSpec {
            name: "pool1".into(),
            orchestration: Orchestration::Uniform,
        },
        ScaleSetSpec {
            name: "flex".into(),
            orchestration: Orchestration::Flexible,
        },
    ];
    topology.vms[1].scale_set = Some("pool1".into());
    topology.vms[2].scale_set = Some("pool1".into());
    topology.vms[3].scale_set = Some("flex".into());
    topology
}

impl Lab {
    /// Instance `n` of Uniform scale set `set` (resource ID).
    pub fn instance_id(&self, set: &str, n: u32) -> String {
        format!(
            "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/{set}/virtualMachines/{n}"
        )
    }

    /// The NIC of instance `n` of Uniform scale set `set`, as Network's scale-set view names it.
    pub fn instance_nic_id(&self, set: &str, n: u32) -> String {
        format!("{}/networkInterfaces/{set}", self.instance_id(set, n))
    }

    /// GET of an ARM path on the mock (no token), as JSON.
    pub async fn arm_get(&self, path: &str, api_version: &str) -> (u16, Value) {
        let response = self
            .http
            .get(format!(
                "{}{path}?api-version={api_version}",
                self.mock.base_url()
            ))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}
