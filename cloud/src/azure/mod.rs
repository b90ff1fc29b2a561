//! [`AzureProvider`]: the [`CloudProvider`] for Azure standalone VMs, over ARM and IMDS.
//!
//! Secondary addresses are ipConfigurations named `vnet-cni-<random>` on the node's NIC. Each
//! change is a read-modify-write of the whole NIC (GET, edit only our entries, PUT with
//! `If-Match`, follow `Azure-AsyncOperation`, GET again to read the addresses). Writes to one NIC
//! are serialized, and requests that arrive while a write runs are coalesced into the next PUT.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ipnetwork::Ipv4Network;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::{
    ArmBudget, CloudError, CloudProvider, IP_CONFIG_PREFIX, InstanceMetadata, NodeIdentity,
    NodeKind, SecondaryIp,
};

mod client;
mod config;
mod reconcile;
mod vmss;

pub use client::{ArmCalls, ArmRemaining, CallCounter, Reported, count_calls, count_calls_into};
use client::{Client, Reply, Target, error_from_reply, error_parts, map_error};
pub use client::{REMAINING_READS, REMAINING_WRITES};
pub use client::{Sleeper, TokioSleeper};
pub use config::{
    ARM_SCOPE, AzureConfig, COMPUTE_API_VERSION, CredentialConfig, DEFAULT_ARM_ENDPOINT,
    DEFAULT_IMDS_ENDPOINT, IMDS_API_VERSION, NETWORK_API_VERSION, Pacing, RetryPolicy,
    arm_endpoint_for_environment, arm_scope,
};
pub use reconcile::{NicDesired, NicReconciled};
pub use vmss::VMSS_NIC_API_VERSION;

#[derive(Clone)]
pub struct AzureProvider {
    inner: Arc<Inner>,
}

/// A subnet's prefix and its VNet's address space, and when they were read.
type SubnetFacts = ((Ipv4Network, Vec<Ipv4Network>), std::time::Instant);

/// How long a subnet's facts are reused (a VNet's address space can grow).
const SUBNET_FACTS_TTL: Duration = Duration::from_secs(600);

struct Inner {
    client: Client,
    writers: Mutex<HashMap<String, Arc<NicWriter>>>,
    /// Subnet ID (lowercase) -> its prefix and its VNet's address space: a cluster allocator
    /// resolving a thousand nodes of one subnet reads the subnet and the VNet once.
    subnets: Mutex<HashMap<String, SubnetFacts>>,
    /// One subnet read at a time: resolves that miss the cache together read it once.
    subnet_reads: tokio::sync::Mutex<()>,
    /// NIC ID (lowercase) -> the NIC as last read after our own write, and its etag
    /// ([`AzureProvider::reconcile_nic`] only): the next write starts from it, with `If-Match`
    /// catching any change since.
    nics: Mutex<HashMap<String, (Value, String)>>,
}

/// Serializes the writes to one NIC and collects the requests waiting for the next one.
struct NicWriter {
    pending: Mutex<Vec<Pending>>,
    write_lock: Arc<tokio::sync::Mutex<()>>,
}

enum Job {
    Assign {
        subnet_id: String,
        names: Vec<String>,
        /// Prefix mode: each name gets a block of this length.
        prefix_len: Option<u8>,
    },
    Release {
        ips: Vec<Ipv4Addr>,
    },
    /// Nothing to add or remove: only bring a `Failed` NIC back to `Succeeded` (re-PUT it).
    Repair,
}

struct Pending {
    job: Job,
    reply: oneshot::Sender<Result<Vec<SecondaryIp>, CloudError>>,
}

impl AzureProvider {
    /// Builds the HTTP clients and the credential; makes no request.
    pub fn new(config: AzureConfig) -> Result<AzureProvider, CloudError> {
        Ok(AzureProvider {
            inner: Arc::new(Inner {
                client: Client::new(config)?,
                writers: Mutex::new(HashMap::new()),
                subnets: Mutex::new(HashMap::new()),
                subnet_reads: tokio::sync::Mutex::new(()),
                nics: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Replaces how retries wait (tests record the delays instead of sleeping them).
    pub fn with_sleeper(
        config: AzureConfig,
        sleeper: Arc<dyn Sleeper>,
    ) -> Result<AzureProvider, CloudError> {
        AzureProvider::with_parts(config, sleeper, None)
    }

    /// [`AzureProvider::with_sleeper`] with a credential of the caller's (tests: one that fails
    /// the way a token endpoint can).
    pub fn with_parts(
        config: AzureConfig,
        sleeper: Arc<dyn Sleeper>,
        credential: Option<Arc<dyn azure_core::credentials::TokenCredential>>,
    ) -> Result<AzureProvider, CloudError> {
        let mut client = Client::new(config)?;
        client.sleeper = sleeper;
        if let Some(credential) = credential {
            client.set_credential(credential);
        }
        Ok(AzureProvider {
            inner: Arc::new(Inner {
                client,
                writers: Mutex::new(HashMap::new()),
                subnets: Mutex::new(HashMap::new()),
                subnet_reads: tokio::sync::Mutex::new(()),
                nics: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn config(&self) -> &AzureConfig {
        &self.inner.client.config
    }
}

impl Inner {
    /// The subnet's prefix and its VNet's address space, read once per subnet.
    async fn subnet_facts(
        &self,
        subnet_id: &str,
    ) -> Result<(Ipv4Network, Vec<Ipv4Network>), CloudError> {
        let key = subnet_id.to_ascii_lowercase();
        let cached = || {
            self.subnets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&key)
                .filter(|(_, at)| at.elapsed() < SUBNET_FACTS_TTL)
                .map(|(facts, _)| facts.clone())
        };
        if let Some(facts) = cached() {
            return Ok(facts);
        }
        let _reading = self.subnet_reads.lock().await;
        if let Some(facts) = cached() {
            return Ok(facts);
        }
        let subnet = self.arm_get(subnet_id, NETWORK_API_VERSION).await?;
        let prefix_text = subnet["properties"]["addressPrefix"]
            .as_str()
            .or_else(|| subnet["properties"]["addressPrefixes"][0].as_str())
            .ok_or_else(|| CloudError::Fatal(format!("subnet {subnet_id} has no IPv4 prefix")))?;
        let subnet_prefix = parse_net(prefix_text, "subnet")?;

        let vnet_id = subnet_id
            .rsplit_once("/subnets/")
            .map(|(vnet, _)| vnet.to_string())
            .ok_or_else(|| CloudError::Fatal(format!("not a subnet ID: {subnet_id}")))?;
        let vnet = self.arm_get(&vnet_id, NETWORK_API_VERSION).await?;
        let vnet_address_space = vnet["properties"]["addressSpace"]["addressPrefixes"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(Value::as_str)
            .filter(|p| !p.contains(':'))
            .map(|p| parse_net(p, "VNet"))
            .collect::<Result<Vec<_>, _>>()?;
        let facts = (subnet_prefix, vnet_address_space);
        self.subnets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (facts.clone(), std::time::Instant::now()));
        Ok(facts)
    }

    fn arm_url(&self, resource_id: &str, api_version: &str) -> String {
        format!(
            "{}{resource_id}?api-version={api_version}",
            self.client.arm_endpoint()
        )
    }

    async fn arm_get(&self, resource_id: &str, api_version: &str) -> Result<Value, CloudError> {
        Ok(self
            .client
            .get(Target::Arm, &self.arm_url(resource_id, api_version))
            .await?
            .body)
    }

    /// The NIC once no operation runs on it, and its etag.
    async fn settled_nic(&self, nic_id: &str) -> Result<(Value, String), CloudError> {
        let url = self.arm_url(nic_id, vmss::nic_api_version(nic_id));
        self.settled(&url, nic_id).await
    }

    /// The resource at `url` once it is no longer `Updating`, and its etag.
    async fn settled(&self, url: &str, what: &str) -> Result<(Value, String), CloudError> {
        let nic_id = what;
        let policy = &self.client.config.retry;
        let mut waited = Duration::ZERO;
        loop {
            let reply = self.client.get(Target::Arm, url).await?;
            let state = reply.body["properties"]["provisioningState"]
                .as_str()
                .unwrap_or("Succeeded");
            if state != "Updating" {
                let etag = reply.body["etag"]
                    .as_str()
                    .map(str::to_string)
                    .or_else(|| reply.header("etag"))
                    .unwrap_or_default();
                return Ok((reply.body, etag));
            }
            if waited >= policy.operation_timeout {
                return Err(CloudError::Transient(format!(
                    "{nic_id} still Updating after {waited:?}"
                )));
            }
            let delay = reply.retry_after().unwrap_or(policy.default_poll_interval);
            waited += delay;
            self.client.sleep(delay).await;
        }
    }

    /// Polls `Azure-AsyncOperation` until `Succeeded` (Ok) or `Failed`/`Canceled` (the error).
    async fn follow_operation(
        &self,
        put: &Reply,
        subnet_id: Option<&str>,
    ) -> Result<(), CloudError> {
        let policy = &self.client.config.retry;
        let Some(url) = put.header("azure-asyncoperation") else {
            // Finished synchronously; the re-read waits for provisioningState if needed.
            return Ok(());
        };
        let mut delay = put.retry_after().unwrap_or(policy.default_poll_interval);
        let mut waited = Duration::ZERO;
        loop {
            if waited > policy.operation_timeout {
                return Err(CloudError::Transient(format!(
                    "operation {url} still running after {waited:?}"
                )));
            }
            self.client.sleep(delay).await;
            waited += delay;
            let reply = self.client.get(Target::Arm, &url).await?;
            match reply.body["status"].as_str().unwrap_or_default() {
                "Succeeded" => return Ok(()),
                status @ ("Failed" | "Canceled") => {
                    let (code, message) = error_parts(&reply.body);
                    tracing::warn!(%url, status, %code, %message, "NIC operation did not succeed");
                    let message = format!("operation {status}: {message}");
                    return Err(map_error(
                        200,
                        &code,
                        &message,
                        reply.retry_after(),
                        subnet_id,
                    ));
                }
                _ => delay = reply.retry_after().unwrap_or(policy.default_poll_interval),
            }
        }
    }

    fn writer(&self, nic_id: &str) -> Arc<NicWriter> {
        let mut writers = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        writers
            .entry(nic_id.to_ascii_lowercase())
            .or_insert_with(|| {
                Arc::new(NicWriter {
                    pending: Mutex::new(Vec::new()),
                    write_lock: Arc::new(tokio::sync::Mutex::new(())),
                })
            })
            .clone()
    }

    /// `count` new entries (single addresses, or blocks of `prefix_len`) in the next NIC write.
    async fn assign(
        self: &Arc<Self>,
        nic_id: &str,
        subnet_id: &str,
        count: usize,
        prefix_len: Option<u8>,
    ) -> Result<Vec<SecondaryIp>, CloudError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let job = Job::Assign {
            subnet_id: subnet_id.to_string(),
            names: (0..count).map(|_| unique_name()).collect(),
            prefix_len,
        };
        self.submit(nic_id, job).await
    }

    /// Queues `job` for the NIC; whoever gets the write lock next writes every queued job in one
    /// PUT. The write runs in its own task, so a caller that gives up cannot cut it short.
    async fn submit(
        self: &Arc<Self>,
        nic_id: &str,
        job: Job,
    ) -> Result<Vec<SecondaryIp>, CloudError> {
        let writer = self.writer(&vmss::write_key(nic_id));
        let (reply, answer) = oneshot::channel();
        writer
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Pending { job, reply });
        let guard = writer.write_lock.clone().lock_owned().await;
        let batch = std::mem::take(&mut *writer.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if !batch.is_empty() {
            let inner = self.clone();
            let nic_id = nic_id.to_string();
            tokio::spawn(async move {
                let _guard = guard;
                inner.write_batch(&nic_id, batch).await;
            });
        } else {
            drop(guard);
        }
        answer
            .await
            .unwrap_or_else(|_| Err(CloudError::Fatal("the NIC writer stopped".into())))
    }

    async fn write_batch(&self, nic_id: &str, batch: Vec<Pending>) {
        let mut adds: Vec<Add> = Vec::new();
        let mut releases: HashSet<Ipv4Addr> = HashSet::new();
        for pending in &batch {
            match &pending.job {
                Job::Assign {
                    subnet_id,
                    names,
                    prefix_len,
                } => {
                    adds.extend(names.iter().map(|n| Add {
                        name: n.clone(),
                        subnet_id: subnet_id.clone(),
                        prefix_len: *prefix_len,
                    }));
                }
                Job::Release { ips } => releases.extend(ips.iter().copied()),
                Job::Repair => {}
            }
        }
        tracing::info!(
            nic_id,
            requests = batch.len(),
            add = adds.len(),
            release = releases.len(),
            "updating NIC"
        );
        let result = self.update_nic(nic_id, &adds, &releases).await;
        // A full subnet or NIC must not hold back the releases that came in the same batch.
        let release_result = match &result {
            Err(error) if !error.is_retryable() && !adds.is_empty() && !releases.is_empty() => {
                tracing::info!(nic_id, %error, "batch failed; writing its releases alone");
                self.update_nic(nic_id, &[], &releases).await
            }
            other => other.clone(),
        };
        for pending in batch {
            let answer = match (&result, &pending.job) {
                (_, Job::Release { .. }) => release_result.clone().map(|_| Vec::new()),
                (_, Job::Repair) => result.clone().map(|_| Vec::new()),
                (Err(error), _) => Err(error.clone()),
                (Ok(nic), Job::Assign { names, .. }) => assigned(nic, names),
            };
            let _ = pending.reply.send(answer);
        }
    }

    /// The read-modify-write loop. Returns the NIC as read after the change took effect.
    async fn update_nic(
        &self,
        nic_id: &str,
        adds: &[Add],
        releases: &HashSet<Ipv4Addr>,
    ) -> Result<Value, CloudError> {
        let policy = &self.client.config.retry;
        let subnet_id = adds.first().map(|a| a.subnet_id.as_str());
        let url = self.arm_url(nic_id, NETWORK_API_VERSION);
        let mut attempt = 0;
        let mut last_error: Option<CloudError> = None;
        loop {
            // Reading first also settles a write whose outcome we did not learn (timeout, 5xx):
            // if it took effect there is nothing left to change.
            let (nic, etag) = self.settled_nic(nic_id).await?;
            // A Failed NIC (or entry) is not settled: write the same intent again, even when
            // our entries are all there, until Azure reports Succeeded.
            let body = match edited(&nic, adds, releases) {
                Some(body) => body,
                None if is_failed(&nic) => {
                    tracing::info!(nic_id, "NIC is Failed; writing it again");
                    nic.clone()
                }
                None => return Ok(nic),
            };
            // A Uniform instance's NIC is written through the instance.
            let (url, body, etag) = match vmss::instance_of_nic(nic_id) {
                None => (url.clone(), body, etag),
                Some((instance, name)) => {
                    // Compute's instance model has no prefix length (docs/cloud.md): blocks
                    // are refused before they get here.
                    let plain: Vec<(String, String)> = adds
                        .iter()
                        .map(|a| (a.name.clone(), a.subnet_id.clone()))
                        .collect();
                    let write = self
                        .instance_write(instance, name, &nic, &plain, releases)
                        .await?;
                    (write.url, write.body, write.etag)
                }
            };
            attempt += 1;
            if attempt > policy.max_write_attempts {
                let last = last_error.map(|e| e.to_string()).unwrap_or_default();
                return Err(CloudError::Transient(format!(
                    "NIC {nic_id}: giving up after {} write attempts; last error: {last}",
                    policy.max_write_attempts
                )));
            }
            let if_match = (!etag.is_empty()).then_some(etag.as_str());
            let error = match self
                .client
                .send(Target::Arm, Method::PUT, &url, Some(&body), if_match)
                .await
            {
                Ok(reply) if reply.status.is_success() => {
                    match self.follow_operation(&reply, subnet_id).await {
                        Ok(()) => continue,
                        Err(error) => error,
                    }
                }
                Ok(reply) if reply.status.as_u16() == 412 => {
                    tracing::debug!(nic_id, attempt, "etag changed under us; re-reading");
                    last_error = Some(CloudError::Transient(
                        "412 Precondition Failed (etag changed)".into(),
                    ));
                    continue;
                }
                Ok(reply) => error_from_reply(&reply, subnet_id),
                Err(error) => error,
            };
            let Some(delay) = self.client.delay_before_retry(&error, attempt) else {
                return Err(error);
            };
            tracing::info!(nic_id, attempt, ?delay, %error, "NIC write failed; retrying");
            last_error = Some(error);
            self.client.sleep(delay).await;
        }
    }
}

/// One ipConfiguration to add.
struct Add {
    name: String,
    subnet_id: String,
    prefix_len: Option<u8>,
}

/// What an ipConfiguration holds: its address, and the block's length (32: one address).
/// Azure shows a block's `privateIPAddress` as `address/len` beside
/// `privateIPAddressPrefixLength`; a bare address with the length is read the same way, host
/// bits masked.
fn config_network(config: &Value) -> Option<(Ipv4Addr, u8)> {
    let text = config["properties"]["privateIPAddress"].as_str()?;
    let (address, suffix) = match text.split_once('/') {
        Some((address, suffix)) => (address, Some(suffix.parse::<u8>().ok()?)),
        None => (text, None),
    };
    let address: Ipv4Addr = address.parse().ok()?;
    let len = match config["properties"]["privateIPAddressPrefixLength"].as_u64() {
        Some(len) => u8::try_from(len).ok()?,
        None => suffix.unwrap_or(crate::SINGLE_ADDRESS),
    };
    let network = Ipv4Network::new(address, len).ok()?;
    Some((network.network(), len))
}

/// Whether the NIC or one of its ipConfigurations is `Failed` (stays so until a PUT succeeds).
fn is_failed(nic: &Value) -> bool {
    let failed = |v: &Value| v["properties"]["provisioningState"].as_str() == Some("Failed");
    failed(nic)
        || nic["properties"]["ipConfigurations"]
            .as_array()
            .is_some_and(|configs| configs.iter().any(failed))
}

/// Whether an ipConfiguration is provisioned (`Succeeded`, or no state reported).
fn is_succeeded(config: &Value) -> bool {
    config["properties"]["provisioningState"]
        .as_str()
        .is_none_or(|s| s == "Succeeded")
}

/// The NIC body with our entries changed, or `None` when it already is as wanted. New entries
/// carry the primary ipConfiguration's application security groups: Azure refuses a NIC whose
/// ipConfigurations do not all belong to the same ASGs.
fn edited(nic: &Value, adds: &[Add], releases: &HashSet<Ipv4Addr>) -> Option<Value> {
    let configs = nic["properties"]["ipConfigurations"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let primary_asgs: Option<Value> = configs
        .iter()
        .find(|c| c["properties"]["primary"].as_bool() == Some(true))
        .and_then(|c| c["properties"]["applicationSecurityGroups"].as_array())
        .filter(|asgs| !asgs.is_empty())
        .map(|asgs| {
            Value::Array(
                asgs.iter()
                    .filter_map(|a| a["id"].as_str())
                    .map(|id| json!({"id": id}))
                    .collect(),
            )
        });
    let before = configs.len();
    let mut configs: Vec<Value> = configs
        .into_iter()
        .filter(|c| {
            let ours = c["name"]
                .as_str()
                .is_some_and(|n| n.starts_with(IP_CONFIG_PREFIX));
            // A block goes only when every one of its addresses is released: a release that
            // names part of a block (an agent that lost track of it) must not take the
            // addresses pods still use with it.
            let released = config_network(c).is_some_and(|(base, len)| {
                Ipv4Network::new(base, len)
                    .is_ok_and(|net| net.iter().all(|a| releases.contains(&a)))
            });
            !(ours && released)
        })
        .collect();
    let mut changed = configs.len() != before;
    for add in adds {
        if !configs
            .iter()
            .any(|c| c["name"].as_str() == Some(&add.name))
        {
            let mut entry = json!({
                "name": add.name,
                "properties": {
                    "privateIPAllocationMethod": "Dynamic",
                    "privateIPAddressVersion": "IPv4",
                    "primary": false,
                    "subnet": {"id": add.subnet_id},
                }
            });
            if let Some(len) = add.prefix_len {
                entry["properties"]["privateIPAddressPrefixLength"] = json!(len);
            }
            if let Some(asgs) = &primary_asgs {
                entry["properties"]["applicationSecurityGroups"] = asgs.clone();
            }
            configs.push(entry);
            changed = true;
        }
    }
    if !changed {
        return None;
    }
    let mut body = nic.clone();
    body["properties"]["ipConfigurations"] = Value::Array(configs);
    Some(body)
}

/// Our provisioned (`Succeeded`) ipConfigurations with their addresses.
fn secondary_ips(nic: &Value) -> Vec<SecondaryIp> {
    let configs = nic["properties"]["ipConfigurations"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    configs
        .iter()
        .filter_map(|c| {
            let name = c["name"].as_str()?;
            if !name.starts_with(IP_CONFIG_PREFIX) || !is_succeeded(c) {
                return None;
            }
            let (ip, prefix_len) = config_network(c)?;
            Some(SecondaryIp {
                name: name.to_string(),
                ip,
                subnet_id: c["properties"]["subnet"]["id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                prefix_len,
            })
        })
        .collect()
}

/// The NIC's secondary addresses, from a read that must be a complete view: `ipConfigurations`
/// is an array that holds the primary configuration, and every entry named with
/// [`IP_CONFIG_PREFIX`] carries its address. Anything less is a transient error, never taken as
/// the NIC's state: the agent would drop pool addresses or finish releases that did not happen.
fn complete_secondary_ips(nic: &Value) -> Result<Vec<SecondaryIp>, CloudError> {
    let incomplete = |why: &str| CloudError::Transient(format!("incomplete NIC read: {why}"));
    let configs = nic["properties"]["ipConfigurations"]
        .as_array()
        .ok_or_else(|| incomplete("no ipConfigurations list"))?;
    if !configs
        .iter()
        .any(|c| c["properties"]["primary"].as_bool() == Some(true))
    {
        return Err(incomplete("the primary ipConfiguration is missing"));
    }
    for c in configs {
        let name = c["name"]
            .as_str()
            .ok_or_else(|| incomplete("an ipConfiguration without a name"))?;
        if name.starts_with(IP_CONFIG_PREFIX) && !is_succeeded(c) {
            return Err(incomplete(&format!(
                "ipConfiguration {name} is {}",
                c["properties"]["provisioningState"]
                    .as_str()
                    .unwrap_or_default()
            )));
        }
        if name.starts_with(IP_CONFIG_PREFIX) && config_network(c).is_none() {
            return Err(incomplete(&format!(
                "ipConfiguration {name} has no IPv4 address"
            )));
        }
    }
    Ok(secondary_ips(nic))
}

fn assigned(nic: &Value, names: &[String]) -> Result<Vec<SecondaryIp>, CloudError> {
    let all = secondary_ips(nic);
    names
        .iter()
        .map(|name| {
            all.iter()
                .find(|s| &s.name == name)
                .cloned()
                .ok_or_else(|| {
                    CloudError::Transient(format!(
                        "ipConfiguration {name} has no Succeeded address after the update"
                    ))
                })
        })
        .collect()
}

fn unique_name() -> String {
    format!("{IP_CONFIG_PREFIX}{:016x}", rand::random::<u64>())
}

/// `00-0D-3A-32-85-70` or `000D3A328570` -> `00:0d:3a:32:85:70`.
fn normalize_mac(raw: &str) -> Option<String> {
    let hex: String = raw.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    if hex.len() != 12 {
        return None;
    }
    let lower = hex.to_ascii_lowercase();
    Some(
        (0..6)
            .map(|i| &lower[i * 2..i * 2 + 2])
            .collect::<Vec<_>>()
            .join(":"),
    )
}

fn field<'a>(doc: &'a Value, path: &[&str], what: &str) -> Result<&'a Value, CloudError> {
    let mut value = doc;
    for key in path {
        value = &value[*key];
    }
    if value.is_null() {
        return Err(CloudError::Fatal(format!(
            "{what}: missing {}",
            path.join(".")
        )));
    }
    Ok(value)
}

fn parse_net(text: &str, what: &str) -> Result<Ipv4Network, CloudError> {
    text.parse()
        .map_err(|e| CloudError::Fatal(format!("{what}: bad prefix {text:?}: {e}")))
}

impl AzureProvider {
    /// What IMDS says about the machine this process runs on (no ARM call). Adopts the VM's
    /// cloud (sovereign clouds: ARM endpoint and token scope follow it).
    pub async fn instance_metadata(&self) -> Result<InstanceMetadata, CloudError> {
        let client = &self.inner.client;
        let imds_url = format!(
            "{}/metadata/instance?api-version={IMDS_API_VERSION}",
            client.config.imds_endpoint
        );
        let imds = client.get(Target::Imds, &imds_url).await?.body;
        let compute = field(&imds, &["compute"], "IMDS")?;
        let az_environment = compute["azEnvironment"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        client.adopt_environment(&az_environment)?;
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        Ok(InstanceMetadata {
            vm_id: text(field(compute, &["resourceId"], "IMDS compute")?),
            vm_name: text(&compute["name"]),
            computer_name: text(&compute["osProfile"]["computerName"]),
            scale_set: text(&compute["vmScaleSetName"]),
            mac: imds["network"]["interface"][0]["macAddress"]
                .as_str()
                .and_then(normalize_mac)
                .unwrap_or_default(),
            az_environment,
        })
    }

    /// The node `instance` describes, from ARM: its VM (or scale-set instance), primary NIC,
    /// subnet and VNet. Works for any node the principal may read, not only this one.
    pub async fn resolve(&self, instance: &InstanceMetadata) -> Result<NodeIdentity, CloudError> {
        let inner = &self.inner;
        let vm_id = instance.vm_id.clone();
        // What Azure reports picks the path: a Uniform instance's resourceId is
        // `.../virtualMachineScaleSets/{ss}/virtualMachines/{n}` and its NIC lives under it; a
        // Flexible member (vmScaleSetName set, a plain VM resourceId) has a standalone NIC.
        let uniform = vmss::is_uniform_instance(&vm_id);
        let vm_name = instance.vm_name.clone();
        let computer_name = instance.computer_name.clone();
        let scale_set = instance.scale_set.clone();
        let kind = match (uniform, scale_set.is_empty()) {
            (true, _) => NodeKind::Uniform,
            (false, false) => NodeKind::Flexible,
            (false, true) => NodeKind::Vm,
        };
        // The NIC's resource ID is not in IMDS: the VM's (or instance's) network profile names it.
        let vm = inner.arm_get(&vm_id, COMPUTE_API_VERSION).await?;
        let nics = field(
            &vm,
            &["properties", "networkProfile", "networkInterfaces"],
            "VM",
        )?
        .as_array()
        .cloned()
        .unwrap_or_default();
        let nic_ref = nics
            .iter()
            .find(|n| n["properties"]["primary"].as_bool() == Some(true))
            .or_else(|| nics.first())
            .ok_or_else(|| CloudError::Fatal(format!("VM {vm_id} has no network interface")))?;
        let nic_id = nic_ref["id"].as_str().unwrap_or_default().to_string();
        if uniform && vmss::instance_of_nic(&nic_id).is_none() {
            return Err(CloudError::Fatal(format!(
                "instance {vm_id} names NIC {nic_id:?}, not one of its scale-set NICs"
            )));
        }

        let (nic, etag) = inner.settled_nic(&nic_id).await?;
        // A cluster allocator's first write to this NIC starts from this read.
        inner.remember_nic(&nic_id, nic.clone(), etag);
        let configs = nic["properties"]["ipConfigurations"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let primary = configs
            .iter()
            .find(|c| c["properties"]["primary"].as_bool() == Some(true))
            .ok_or_else(|| {
                CloudError::Fatal(format!("NIC {nic_id} has no primary ipConfiguration"))
            })?;
        let primary_ip: Ipv4Addr = primary["properties"]["privateIPAddress"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| CloudError::Fatal(format!("NIC {nic_id}: primary address missing")))?;
        let subnet_id = primary["properties"]["subnet"]["id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let mac = nic["properties"]["macAddress"]
            .as_str()
            .and_then(normalize_mac)
            .or_else(|| Some(instance.mac.clone()).filter(|m| !m.is_empty()))
            .ok_or_else(|| CloudError::Fatal(format!("NIC {nic_id}: no MAC address")))?;

        let (subnet_prefix, vnet_address_space) = inner.subnet_facts(&subnet_id).await?;

        let identity = NodeIdentity {
            vm_name,
            vm_id,
            nic_id,
            mac,
            primary_ip,
            subnet_id,
            subnet_prefix,
            vnet_address_space,
            kind,
            scale_set,
            computer_name,
        };
        tracing::info!(?identity, "discovered node");
        Ok(identity)
    }
}

#[async_trait]
impl CloudProvider for AzureProvider {
    async fn discover(&self) -> Result<NodeIdentity, CloudError> {
        let instance = self.instance_metadata().await?;
        self.resolve(&instance).await
    }

    async fn list_secondary_ips(&self, nic_id: &str) -> Result<Vec<SecondaryIp>, CloudError> {
        let (nic, _) = self.inner.settled_nic(nic_id).await?;
        if !is_failed(&nic) {
            return complete_secondary_ips(&nic);
        }
        // A Failed NIC is not a settled view: have it written again (in the NIC's write queue),
        // then read what Azure made of it.
        self.inner.submit(nic_id, Job::Repair).await?;
        let (nic, _) = self.inner.settled_nic(nic_id).await?;
        complete_secondary_ips(&nic)
    }

    fn arm_budget(&self) -> Option<ArmBudget> {
        Some(self.inner.client.budget())
    }

    async fn assign_ips(
        &self,
        nic_id: &str,
        subnet_id: &str,
        count: usize,
    ) -> Result<Vec<SecondaryIp>, CloudError> {
        self.inner.assign(nic_id, subnet_id, count, None).await
    }

    async fn assign_blocks(
        &self,
        nic_id: &str,
        subnet_id: &str,
        count: usize,
        prefix_len: u8,
    ) -> Result<Vec<SecondaryIp>, CloudError> {
        if vmss::instance_of_nic(nic_id).is_some() {
            return Err(CloudError::Fatal(format!(
                "prefix mode is not available on a Uniform scale-set instance ({nic_id}): Compute's instance update has no privateIPAddressPrefixLength (docs/cloud.md); use address mode"
            )));
        }
        self.inner
            .assign(nic_id, subnet_id, count, Some(prefix_len))
            .await
    }

    async fn release_ips(&self, nic_id: &str, ips: &[Ipv4Addr]) -> Result<(), CloudError> {
        if ips.is_empty() {
            return Ok(());
        }
        self.inner
            .submit(nic_id, Job::Release { ips: ips.to_vec() })
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(name: &str, prefix_len: Option<u8>) -> Add {
        Add {
            name: name.into(),
            subnet_id: "/s".into(),
            prefix_len,
        }
    }

    #[test]
    fn a_block_is_read_from_address_slash_length_or_a_bare_address_with_its_length() {
        let cidr = json!({"properties": {"privateIPAddress": "10.0.0.16/28", "privateIPAddressPrefixLength": 28}});
        let bare = json!({"properties": {"privateIPAddress": "10.0.0.21", "privateIPAddressPrefixLength": 28}});
        let single = json!({"properties": {"privateIPAddress": "10.0.0.7"}});
        let base: Ipv4Addr = "10.0.0.16".parse().unwrap();
        assert_eq!(config_network(&cidr), Some((base, 28)));
        assert_eq!(config_network(&bare), Some((base, 28)), "host bits masked");
        assert_eq!(
            config_network(&single),
            Some(("10.0.0.7".parse().unwrap(), 32))
        );
        assert_eq!(
            config_network(&json!({"properties": {"privateIPAddress": "10.0.0.16/x"}})),
            None
        );
    }

    #[test]
    fn a_new_block_entry_asks_for_its_prefix_length_and_goes_only_with_all_its_addresses() {
        let nic = json!({"properties": {"ipConfigurations": [
            {"name": "ipconfig1", "properties": {"primary": true, "privateIPAddress": "10.0.0.4"}},
            {"name": "vnet-cni-a", "properties": {"privateIPAddress": "10.0.0.16/28", "privateIPAddressPrefixLength": 28}},
        ]}});
        let body = edited(&nic, &[add("vnet-cni-b", Some(28))], &HashSet::new()).unwrap();
        let configs = body["properties"]["ipConfigurations"].as_array().unwrap();
        assert_eq!(configs[2]["properties"]["privateIPAddressPrefixLength"], 28);
        // Part of a block is not the block: it stays, whatever the caller asked.
        let part: HashSet<Ipv4Addr> = ["10.0.0.16".parse().unwrap()].into();
        assert!(edited(&nic, &[], &part).is_none());
        let release: HashSet<Ipv4Addr> = (16..32).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        let body = edited(&nic, &[], &release).unwrap();
        assert_eq!(
            body["properties"]["ipConfigurations"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn edit_touches_only_our_entries() {
        let nic = json!({"properties": {"ipConfigurations": [
            {"name": "ipconfig1", "properties": {"privateIPAddress": "10.0.0.4", "primary": true}},
            {"name": "someone-else", "properties": {"privateIPAddress": "10.0.0.9"}},
            {"name": "vnet-cni-a", "properties": {"privateIPAddress": "10.0.0.5"}},
        ]}});
        let release: HashSet<Ipv4Addr> =
            ["10.0.0.9".parse().unwrap(), "10.0.0.5".parse().unwrap()].into();
        let body = edited(&nic, &[add("vnet-cni-b", None)], &release).unwrap();
        let names: Vec<&str> = body["properties"]["ipConfigurations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, vec!["ipconfig1", "someone-else", "vnet-cni-b"]);
        // Once applied there is nothing left to do: an unknown outcome resolves by re-reading.
        assert!(edited(&body, &[add("vnet-cni-b", None)], &release).is_none());
    }

    #[test]
    fn only_a_complete_nic_read_is_taken_as_the_nics_addresses() {
        let primary = json!({"name": "ipconfig1", "properties": {"privateIPAddress": "10.0.0.4", "primary": true}});
        let ours = json!({"name": "vnet-cni-a", "properties": {"privateIPAddress": "10.0.0.5", "primary": false}});
        let complete = json!({"properties": {"ipConfigurations": [primary, ours]}});
        let listed = complete_secondary_ips(&complete).unwrap();
        assert_eq!(
            listed.iter().map(|s| s.ip).collect::<Vec<_>>(),
            vec![Ipv4Addr::new(10, 0, 0, 5)]
        );
        let incomplete = [
            json!({"properties": {}}),
            json!({"properties": {"ipConfigurations": null}}),
            json!({"properties": {"ipConfigurations": []}}),
            json!({"properties": {"ipConfigurations": [ours]}}),
            json!({"properties": {"ipConfigurations": [primary, {"name": "vnet-cni-b", "properties": {}}]}}),
            json!({"properties": {"ipConfigurations": [primary, {"name": "vnet-cni-b", "properties": {"privateIPAddress": ""}}]}}),
            json!({"properties": {"ipConfigurations": [primary, {"properties": {"privateIPAddress": "10.0.0.6"}}]}}),
        ];
        for nic in incomplete {
            assert!(
                matches!(complete_secondary_ips(&nic), Err(CloudError::Transient(_))),
                "{nic}"
            );
        }
    }

    #[test]
    fn macs_are_normalized() {
        assert_eq!(
            normalize_mac("00-0D-3A-32-85-70").unwrap(),
            "00:0d:3a:32:85:70"
        );
        assert_eq!(normalize_mac("000D3A328570").unwrap(), "00:0d:3a:32:85:70");
        assert!(normalize_mac("xyz").is_none());
    }
}
