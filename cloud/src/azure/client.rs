//! One HTTP request to ARM or IMDS, the retry loop for reads, and Azure errors mapped to
//! [`CloudError`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use azure_core::credentials::TokenCredential;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::config::{ARM_SCOPE, AzureConfig, CredentialConfig};
use crate::CloudError;

/// Waits between retries. Tests inject one that records the requested delays.
pub trait Sleeper: Send + Sync + 'static {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// `tokio::time::sleep`.
pub struct TokioSleeper;

impl Sleeper for TokioSleeper {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(tokio::time::sleep(duration))
    }
}

/// Where a request goes: IMDS has no proxy, no token, and wants `Metadata: true`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Arm,
    Imds,
}

/// A complete HTTP answer.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn retry_after(&self) -> Option<Duration> {
        retry_after(&self.headers)
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
}

pub struct Client {
    pub config: AzureConfig,
    arm: reqwest::Client,
    imds: reqwest::Client,
    credential: Option<Arc<dyn TokenCredential>>,
    pub sleeper: Arc<dyn Sleeper>,
}

impl Client {
    pub fn new(config: AzureConfig) -> Result<Client, CloudError> {
        let build = |builder: reqwest::ClientBuilder| {
            builder
                .timeout(config.request_timeout)
                .connect_timeout(Duration::from_secs(10))
                .build()
                .map_err(|e| CloudError::Fatal(format!("cannot build HTTP client: {e}")))
        };
        let arm = build(reqwest::Client::builder())?;
        // IMDS is link-local: a proxy would answer for the wrong machine, or not at all.
        let imds = build(reqwest::Client::builder().no_proxy())?;
        let credential = credential(&config.credential)?;
        Ok(Client {
            config,
            arm,
            imds,
            credential,
            sleeper: Arc::new(TokioSleeper),
        })
    }

    pub async fn sleep(&self, duration: Duration) {
        self.sleeper.sleep(duration).await;
    }

    async fn token(&self) -> Result<Option<String>, CloudError> {
        let Some(credential) = &self.credential else {
            return Ok(None);
        };
        let token = credential
            .get_token(&[ARM_SCOPE], None)
            .await
            .map_err(|e| CloudError::Unauthorized {
                message: format!("cannot get a token for {ARM_SCOPE}: {e}"),
            })?;
        Ok(Some(token.token.secret().to_string()))
    }

    /// One request; any HTTP answer is `Ok`, a transport failure or timeout is `Transient`.
    pub async fn send(
        &self,
        target: Target,
        method: Method,
        url: &str,
        body: Option<&Value>,
        if_match: Option<&str>,
    ) -> Result<Reply, CloudError> {
        let mut request = match target {
            Target::Arm => {
                let mut r = self.arm.request(method.clone(), url);
                if let Some(token) = self.token().await? {
                    r = r.bearer_auth(token);
                }
                r
            }
            Target::Imds => self
                .imds
                .request(method.clone(), url)
                .header("Metadata", "true"),
        };
        if let Some(body) = body {
            request = request.json(body);
        }
        if let Some(etag) = if_match {
            request = request.header("If-Match", etag);
        }
        let response = request
            .send()
            .await
            .map_err(|e| transport_error(&method, url, &e))?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| transport_error(&method, url, &e))?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            // A non-JSON body (a proxy's HTML page) keeps its text for the error message.
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// A GET retried as the policy says; returns the 2xx answer or the final error.
    pub async fn get(&self, target: Target, url: &str) -> Result<Reply, CloudError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let error = match self.send(target, Method::GET, url, None, None).await {
                Ok(reply) if reply.status.is_success() => return Ok(reply),
                Ok(reply) => error_from_reply(&reply, None),
                Err(error) => error,
            };
            let Some(delay) = self.retry_delay(&error, attempt) else {
                return Err(final_error(error, attempt, url));
            };
            tracing::debug!(url, attempt, ?delay, %error, "retrying GET");
            self.sleep(delay).await;
        }
    }

    /// How long to wait before retrying after `error`, or `None` to give up.
    pub fn retry_delay(&self, error: &CloudError, attempt: u32) -> Option<Duration> {
        let policy = &self.config.retry;
        if !error.is_retryable() || attempt >= policy.max_attempts {
            return None;
        }
        match error.retry_after() {
            Some(after) if after > policy.max_retry_after => None,
            Some(after) => Some(after),
            None => Some(policy.backoff(attempt)),
        }
    }
}

fn credential(config: &CredentialConfig) -> Result<Option<Arc<dyn TokenCredential>>, CloudError> {
    use azure_identity::{
        ClientSecretCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
        UserAssignedId, WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
    };
    let fail = |what: &str, e: azure_core::Error| CloudError::Fatal(format!("{what}: {e}"));
    Ok(match config {
        CredentialConfig::None => None,
        CredentialConfig::ManagedIdentity { client_id } => {
            let options = ManagedIdentityCredentialOptions {
                user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                ..Default::default()
            };
            Some(
                ManagedIdentityCredential::new(Some(options))
                    .map_err(|e| fail("managed identity", e))?,
            )
        }
        CredentialConfig::WorkloadIdentity {
            tenant_id,
            client_id,
            token_file,
        } => {
            let options = WorkloadIdentityCredentialOptions {
                tenant_id: tenant_id.clone(),
                client_id: client_id.clone(),
                token_file_path: token_file.clone(),
                ..Default::default()
            };
            Some(
                WorkloadIdentityCredential::new(Some(options))
                    .map_err(|e| fail("workload identity", e))?,
            )
        }
        CredentialConfig::ClientSecret {
            tenant_id,
            client_id,
            secret_file,
        } => {
            let secret = std::fs::read_to_string(secret_file).map_err(|e| {
                CloudError::Fatal(format!(
                    "cannot read client secret {}: {e}",
                    secret_file.display()
                ))
            })?;
            Some(
                ClientSecretCredential::new(
                    tenant_id,
                    client_id.clone(),
                    azure_core::credentials::Secret::new(secret.trim().to_string()),
                    None,
                )
                .map_err(|e| fail("client secret", e))?,
            )
        }
    })
}

fn transport_error(method: &Method, url: &str, error: &reqwest::Error) -> CloudError {
    let kind = if error.is_timeout() {
        "timed out"
    } else {
        "failed"
    };
    CloudError::Transient(format!("{method} {url} {kind}: {error}"))
}

pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// `(code, message)` of an Azure error body `{"error":{"code","message"}}` (IMDS: `{"error":"..."}`).
pub fn error_parts(body: &Value) -> (String, String) {
    let error = &body["error"];
    match error {
        Value::Object(_) => (
            error["code"].as_str().unwrap_or_default().to_string(),
            error["message"].as_str().unwrap_or_default().to_string(),
        ),
        Value::String(text) => (String::new(), text.clone()),
        _ => (
            String::new(),
            body.as_str().map(str::to_string).unwrap_or_default(),
        ),
    }
}

const BUSY_CODES: [&str; 3] = [
    "RetryableErrorDueToAnotherOperation",
    "AnotherOperationInProgress",
    "OperationNotAllowed",
];

/// Maps an Azure error answer (or a failed operation's error) to what the agent acts on.
/// `subnet_id` names the subnet in `SubnetFull` when the caller knows it.
pub fn map_error(
    status: u16,
    code: &str,
    message: &str,
    retry_after: Option<Duration>,
    subnet_id: Option<&str>,
) -> CloudError {
    let detail = if code.is_empty() {
        format!("HTTP {status}: {message}")
    } else {
        format!("HTTP {status} {code}: {message}")
    };
    let lower_code = code.to_ascii_lowercase();
    if code == "SubnetIsFull" {
        return CloudError::SubnetFull {
            subnet_id: subnet_id.unwrap_or_default().to_string(),
            message: message.to_string(),
        };
    }
    if (lower_code.contains("ipconfiguration")
        && (lower_code.contains("limit") || lower_code.contains("exceed")))
        || message.contains("exceeds the maximum allowed")
    {
        return CloudError::NicLimitReached {
            message: message.to_string(),
        };
    }
    if BUSY_CODES.iter().any(|c| c.eq_ignore_ascii_case(code))
        && (status == 409 || status == 429 || status == 200)
    {
        return CloudError::Busy {
            code: code.to_string(),
            retry_after: retry_after.unwrap_or(Duration::from_secs(1)),
        };
    }
    match status {
        401 | 403 => CloudError::Unauthorized {
            message: match missing_permission(message) {
                Some(action) => format!("missing permission {action}: {detail}"),
                None => detail,
            },
        },
        404 => CloudError::NotFound(detail),
        429 => CloudError::Throttled {
            retry_after: retry_after.unwrap_or(Duration::from_secs(1)),
        },
        // 410: IMDS answers Gone while the VM is still starting.
        408 | 410 | 500..=599 => CloudError::Transient(detail),
        // A failed long-running operation with an internal error is worth another try.
        200 if code == "InternalServerError" => CloudError::Transient(detail),
        _ => CloudError::Fatal(detail),
    }
}

pub fn error_from_reply(reply: &Reply, subnet_id: Option<&str>) -> CloudError {
    let (code, message) = error_parts(&reply.body);
    map_error(
        reply.status.as_u16(),
        &code,
        &message,
        reply.retry_after(),
        subnet_id,
    )
}

/// The action in ARM's `AuthorizationFailed` text: "...perform action 'X' over scope...".
fn missing_permission(message: &str) -> Option<&str> {
    let start = message.find("action '")? + "action '".len();
    let len = message[start..].find('\'')?;
    Some(&message[start..start + len])
}

/// The error returned after retries ran out, saying so for transient failures.
pub fn final_error(error: CloudError, attempts: u32, what: &str) -> CloudError {
    match error {
        CloudError::Transient(message) if attempts > 1 => CloudError::Transient(format!(
            "{what}: giving up after {attempts} attempts; last error: {message}"
        )),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_errors_map_to_what_the_agent_acts_on() {
        let m = |status, code: &str, message: &str| {
            map_error(
                status,
                code,
                message,
                Some(Duration::from_secs(7)),
                Some("/s"),
            )
        };
        assert!(
            matches!(m(400, "SubnetIsFull", "no room"), CloudError::SubnetFull { subnet_id, .. } if subnet_id == "/s")
        );
        assert_eq!(
            m(429, "TooManyRequests", ""),
            CloudError::Throttled {
                retry_after: Duration::from_secs(7)
            }
        );
        assert!(matches!(
            m(409, "AnotherOperationInProgress", ""),
            CloudError::Busy { .. }
        ));
        assert!(matches!(
            m(429, "RetryableErrorDueToAnotherOperation", ""),
            CloudError::Busy { .. }
        ));
        assert!(matches!(
            m(503, "ServiceUnavailable", ""),
            CloudError::Transient(_)
        ));
        assert!(matches!(
            m(404, "ResourceNotFound", ""),
            CloudError::NotFound(_)
        ));
        assert!(matches!(
            m(400, "NetworkInterfaceIpConfigurationCountExceedsLimit", "x"),
            CloudError::NicLimitReached { .. }
        ));
        let denied = m(
            403,
            "AuthorizationFailed",
            "The client 'c' does not have authorization to perform action 'Microsoft.Network/networkInterfaces/write' over scope '/s'.",
        );
        assert!(
            matches!(&denied, CloudError::Unauthorized { message } if message.starts_with("missing permission Microsoft.Network/networkInterfaces/write")),
            "{denied:?}"
        );
        assert!(matches!(
            m(400, "InvalidRequestFormat", ""),
            CloudError::Fatal(_)
        ));
    }
}
