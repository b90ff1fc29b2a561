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
/// The token scope for Azure Resource Manager.
pub const ARM_SCOPE: &str = "https://management.azure.com/.default";

pub const DEFAULT_ARM_ENDPOINT: &str = "https://management.azure.com";
pub const DEFAULT_IMDS_ENDPOINT: &str = "http://169.254.169.254";

#[derive(Debug, Clone)]
pub struct AzureConfig {
    /// ARM base URL, e.g. `https://management.azure.com` or `http://127.0.0.1:PORT` (mock).
    pub arm_endpoint: String,
    /// IMDS base URL: `http://169.254.169.254`, or `http://127.0.0.1:PORT/vms/node-1` (mock).
    pub imds_endpoint: String,
    pub credential: CredentialConfig,
    pub retry: RetryPolicy,
    /// Limit for one HTTP request (a timed-out write is resolved by re-reading the NIC).
    pub request_timeout: Duration,
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
        }
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
