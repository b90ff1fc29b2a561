//! Configuration of the Azure provider: endpoints, credential, retry policy.

use std::path::PathBuf;
use std::time::Duration;

use crate::CloudError;

/// Microsoft.Network API version used for NICs, subnets, VNets and their operations.
pub const NETWORK_API_VERSION: &str = "2024-05-01";
/// Microsoft.Compute API version used to read the VM (its network profile).
pub const COMPUTE_API_VERSION: &str = "2024-07-01";
/// Instance metadata API version.
pub const IMDS_API_VERSION: &str = "2021-02-01";
/// The token scope for Azure Resource Manager in the public cloud (others: `{endpoint}/.default`).
pub const ARM_SCOPE: &str = "https://management.azure.com/.default";

pub const DEFAULT_ARM_ENDPOINT: &str = "https://management.azure.com";
pub const DEFAULT_IMDS_ENDPOINT: &str = "http://169.254.169.254";

/// The ARM endpoint of an Azure cloud, by the name IMDS gives in `compute.azEnvironment`.
pub fn arm_endpoint_for_environment(environment: &str) -> Option<&'static str> {
    match environment.to_ascii_lowercase().as_str() {
        "azurepubliccloud" => Some("https://management.azure.com"),
        "azureusgovernmentcloud" => Some("https://management.usgovcloudapi.net"),
        "azurechinacloud" => Some("https://management.chinacloudapi.cn"),
        _ => None,
    }
}

/// The token scope for an ARM endpoint: `https://management.azure.com/.default` and the like.
pub fn arm_scope(endpoint: &str) -> String {
    format!("{}/.default", endpoint.trim_end_matches('/'))
}

#[derive(Debug, Clone)]
pub struct AzureConfig {
    /// ARM base URL, e.g. `https://management.azure.com` or `http://127.0.0.1:PORT` (mock).
    /// Empty: the cloud IMDS names in `compute.azEnvironment` (public, US Government, China),
    /// learned at discovery; the public cloud until then.
    pub arm_endpoint: String,
    /// IMDS base URL: `http://169.254.169.254`, or `http://127.0.0.1:PORT/vms/node-1` (mock).
    pub imds_endpoint: String,
    pub credential: CredentialConfig,
    pub retry: RetryPolicy,
    /// Limit for one HTTP request (a timed-out write is resolved by re-reading the NIC).
    pub request_timeout: Duration,
    /// Plain `http://` ARM and the static test token: vnet-mockcloud only (`provider = "mock"`).
    /// Otherwise the token goes only to `https://` URLs on the ARM host.
    pub allow_plain_http: bool,
    /// Slowing down before ARM throttles.
    pub pacing: Pacing,
}

/// When the remaining budget ARM reports (`x-ms-ratelimit-remaining-subscription-reads` /
/// `-writes`) falls below `*_floor`, each request of that kind first waits until, at the
/// documented refill rate, the bucket would be back at the floor. So a burst spreads out
/// instead of running into 429s.
#[derive(Debug, Clone, PartialEq)]
pub struct Pacing {
    pub reads_floor: u64,
    pub writes_floor: u64,
    /// ARM's refill rates (documented: reads 25/s, writes 10/s per principal).
    pub reads_per_sec: f64,
    pub writes_per_sec: f64,
    /// Longest single wait.
    pub max_wait: Duration,
}

impl Default for Pacing {
    fn default() -> Self {
        Pacing {
            reads_floor: 25,
            writes_floor: 10,
            reads_per_sec: 25.0,
            writes_per_sec: 10.0,
            max_wait: Duration::from_secs(5),
        }
    }
}

impl AzureConfig {
    pub fn new(
        arm_endpoint: &str,
        imds_endpoint: &str,
        credential: CredentialConfig,
    ) -> AzureConfig {
        AzureConfig {
            arm_endpoint: arm_endpoint.trim_end_matches('/').to_string(),
            imds_endpoint: imds_endpoint.trim_end_matches('/').to_string(),
            credential,
            retry: RetryPolicy::default(),
            request_timeout: Duration::from_secs(30),
            allow_plain_http: false,
            pacing: Pacing::default(),
        }
    }

    /// vnet-mockcloud: plain HTTP allowed, and the static test token.
    pub fn mock(
        arm_endpoint: &str,
        imds_endpoint: &str,
        credential: CredentialConfig,
    ) -> AzureConfig {
        AzureConfig {
            allow_plain_http: true,
            ..AzureConfig::new(arm_endpoint, imds_endpoint, credential)
        }
    }

    /// What is wrong with this configuration, before any request: an `http://` ARM endpoint or
    /// the static test token outside the mock.
    pub fn validate(&self) -> Result<(), CloudError> {
        if !self.arm_endpoint.is_empty() {
            let url = reqwest::Url::parse(&self.arm_endpoint).map_err(|e| {
                CloudError::Fatal(format!("ARM endpoint {:?}: {e}", self.arm_endpoint))
            })?;
            match url.scheme() {
                "https" => {}
                "http" if self.allow_plain_http => {}
                "http" => {
                    return Err(CloudError::Fatal(format!(
                        "ARM endpoint {}: plain http:// would send the bearer token unencrypted; use https:// (plain HTTP is for the mock provider only)",
                        self.arm_endpoint
                    )));
                }
                other => {
                    return Err(CloudError::Fatal(format!(
                        "ARM endpoint {}: unsupported scheme {other}",
                        self.arm_endpoint
                    )));
                }
            }
            if url.host_str().is_none() {
                return Err(CloudError::Fatal(format!(
                    "ARM endpoint {}: no host",
                    self.arm_endpoint
                )));
            }
        }
        if matches!(self.credential, CredentialConfig::StaticToken { .. }) && !self.allow_plain_http
        {
            return Err(CloudError::Fatal(
                "the static test token is for vnet-mockcloud only (provider = \"mock\")".into(),
            ));
        }
        Ok(())
    }

    /// Real Azure with the given credential.
    pub fn azure(credential: CredentialConfig) -> AzureConfig {
        AzureConfig::new(DEFAULT_ARM_ENDPOINT, DEFAULT_IMDS_ENDPOINT, credential)
    }
}

/// How the provider gets ARM tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialConfig {
    /// The VM's managed identity through IMDS: system-assigned, or user-assigned by client ID.
    ManagedIdentity { client_id: Option<String> },
    /// Kubernetes workload identity: a federated service-account token exchanged with Entra ID.
    /// `None` fields come from `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`, `AZURE_FEDERATED_TOKEN_FILE`.
    WorkloadIdentity {
        tenant_id: Option<String>,
        client_id: Option<String>,
        token_file: Option<PathBuf>,
    },
    /// A service principal with a secret read from a file.
    ClientSecret {
        tenant_id: String,
        client_id: String,
        secret_file: PathBuf,
    },
    /// A fixed bearer token (vnet-mockcloud's per-caller test tokens; mock provider only).
    StaticToken { token: String },
    /// No `Authorization` header (vnet-mockcloud).
    None,
}

impl CredentialConfig {
    /// From the agent's `[cloud]` keys: `credential` (managed_identity | workload_identity |
    /// client_secret | none), `client_id`, `tenant_id`, `client_secret_file` (empty = unset).
    pub fn from_settings(
        kind: &str,
        client_id: &str,
        tenant_id: &str,
        client_secret_file: &str,
    ) -> Result<CredentialConfig, CloudError> {
        let opt = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_string());
        match kind {
            "managed_identity" => Ok(CredentialConfig::ManagedIdentity {
                client_id: opt(client_id),
            }),
            "workload_identity" => Ok(CredentialConfig::WorkloadIdentity {
                tenant_id: opt(tenant_id),
                client_id: opt(client_id),
                token_file: None,
            }),
            "client_secret" => {
                let missing = |key: &str| {
                    CloudError::Fatal(format!("credential = \"client_secret\" needs {key}"))
                };
                Ok(CredentialConfig::ClientSecret {
                    tenant_id: opt(tenant_id).ok_or_else(|| missing("tenant_id"))?,
                    client_id: opt(client_id).ok_or_else(|| missing("client_id"))?,
                    secret_file: opt(client_secret_file)
                        .ok_or_else(|| missing("client_secret_file"))?
                        .into(),
                })
            }
            "none" => Ok(CredentialConfig::None),
            other => Err(CloudError::Fatal(format!(
                "unknown credential {other:?}: expected managed_identity, workload_identity, client_secret or none"
            ))),
        }
    }
}

/// Retry timing. Throttling and busy answers wait as long as `Retry-After` says; 5xx and
/// transport failures back off exponentially (`initial_backoff` doubling up to `max_backoff`,
/// each delay drawn from its upper half for jitter).
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts of one request before giving up (429, busy, 5xx, timeouts).
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// A longer `Retry-After` is not waited out here: the caller gets `Throttled`/`Busy`.
    pub max_retry_after: Duration,
    /// Read-modify-write rounds of one NIC update (412s, busy NIC, unknown outcomes).
    pub max_write_attempts: u32,
    /// Poll interval for long-running operations when the answer has no `Retry-After`.
    pub default_poll_interval: Duration,
    /// Total wait for one long-running operation (or for a NIC to leave `Updating`).
    pub operation_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(120),
            max_write_attempts: 10,
            default_poll_interval: Duration::from_secs(2),
            operation_timeout: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// The delay before retry number `attempt` (1-based) after a 5xx or transport failure.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        let ceiling = exp.min(self.max_backoff);
        let half = ceiling / 2;
        let jitter_ms = rand::random_range(0..=half.as_millis() as u64);
        half + Duration::from_millis(jitter_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            ..RetryPolicy::default()
        };
        for attempt in 1..=10 {
            let d = policy.backoff(attempt);
            let ceiling = Duration::from_millis((100u64 << (attempt - 1)).min(1000));
            assert!(d >= ceiling / 2 && d <= ceiling, "attempt {attempt}: {d:?}");
        }
    }

    #[test]
    fn credential_settings_are_checked() {
        assert_eq!(
            CredentialConfig::from_settings("managed_identity", "", "", "").unwrap(),
            CredentialConfig::ManagedIdentity { client_id: None }
        );
        assert!(CredentialConfig::from_settings("client_secret", "id", "", "/f").is_err());
        assert!(CredentialConfig::from_settings("magic", "", "", "").is_err());
    }
}
