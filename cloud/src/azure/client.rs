//! One HTTP request to ARM or IMDS, the retry loop for reads, and Azure errors mapped to
//! [`CloudError`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use azure_core::credentials::TokenCredential;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

use super::config::{
    AzureConfig, CredentialConfig, DEFAULT_ARM_ENDPOINT, arm_endpoint_for_environment, arm_scope,
};
use crate::{ArmBudget, CloudError};

/// Headers in which ARM reports the caller's remaining budget.
pub const REMAINING_READS: &str = "x-ms-ratelimit-remaining-subscription-reads";
pub const REMAINING_WRITES: &str = "x-ms-ratelimit-remaining-subscription-writes";
/// "Not reported yet" in the budget gauges.
const UNKNOWN: u64 = u64::MAX;

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

/// The ARM endpoint in use: where the token may go, and the token's scope.
#[derive(Debug, Clone)]
struct ArmBase {
    endpoint: String,
    scheme: String,
    host: String,
    port: Option<u16>,
    scope: String,
}

impl ArmBase {
    fn parse(endpoint: &str) -> Result<ArmBase, CloudError> {
        let url = Url::parse(endpoint)
            .map_err(|e| CloudError::Fatal(format!("ARM endpoint {endpoint:?}: {e}")))?;
        Ok(ArmBase {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            scheme: url.scheme().to_string(),
            host: url.host_str().unwrap_or_default().to_ascii_lowercase(),
            port: url.port_or_known_default(),
            scope: arm_scope(endpoint),
        })
    }

    /// Whether `url` is on this endpoint's scheme, host and port: only there goes the token.
    fn owns(&self, url: &Url) -> bool {
        url.scheme() == self.scheme
            && url
                .host_str()
                .is_some_and(|h| h.eq_ignore_ascii_case(&self.host))
            && url.port_or_known_default() == self.port
    }
}

/// What ARM last said about the caller's budget, and how often it throttled.
#[derive(Debug)]
struct Budget {
    reads: AtomicU64,
    writes: AtomicU64,
    /// When `reads`/`writes` were last reported: ARM refills the bucket since.
    reads_seen: Mutex<Option<Instant>>,
    writes_seen: Mutex<Option<Instant>>,
    throttled: AtomicU64,
    /// ARM requests sent, by kind (GET: reads; anything else: writes).
    reads_sent: AtomicU64,
    writes_sent: AtomicU64,
    /// After a 429 (not a busy answer): no request should go before this.
    throttled_until: Mutex<Option<Instant>>,
    /// `reads_sent` / `writes_sent` when `reads` / `writes` were last reported.
    reads_sent_at_report: AtomicU64,
    writes_sent_at_report: AtomicU64,
}

/// One of ARM's `x-ms-ratelimit-remaining-*` headers as last seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reported {
    pub remaining: u64,
    /// How long ago it was reported (the bucket has refilled since).
    pub age: Duration,
    /// Requests of this kind this client sent since (ARM has taken them since, or will).
    pub sent_since: u64,
}

/// What ARM last reported of both buckets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArmRemaining {
    pub reads: Option<Reported>,
    pub writes: Option<Reported>,
}

/// ARM requests made, by the bucket ARM takes them from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArmCalls {
    pub reads: u64,
    pub writes: u64,
    /// Of those, answered 429 by ARM's throttling (not busy answers).
    pub throttled: u64,
}

/// The ARM requests one piece of work sent so far (see [`count_calls`]); readable while the
/// work runs.
#[derive(Debug, Default)]
pub struct CallCounter {
    reads: AtomicU64,
    writes: AtomicU64,
    throttled: AtomicU64,
    settle: Mutex<Settle>,
}

/// When the work's first write was sent, and the reads after it (the write's settle reads: its
/// polls), each when sent or when planned (known a `Retry-After` before it is sent).
#[derive(Debug, Default)]
struct Settle {
    write: Option<Instant>,
    reads: Vec<Instant>,
    planned: Vec<Instant>,
}

/// Settle reads timed per piece of work (a NIC write polls two or three times).
const SETTLE_READS_TIMED: usize = 8;

impl CallCounter {
    pub fn calls(&self) -> ArmCalls {
        ArmCalls {
            reads: self.reads.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            throttled: self.throttled.load(Ordering::Relaxed),
        }
    }

    /// How long after its first write the work sent (or will send) each read that followed it:
    /// a NIC write's polls, each a `Retry-After` after the one before. Empty before the write.
    pub fn settle_delays(&self) -> Vec<Duration> {
        let settle = self.settle.lock().unwrap_or_else(|p| p.into_inner());
        let Some(write) = settle.write else {
            return Vec::new();
        };
        let known = settle.reads.len().max(settle.planned.len());
        (0..known)
            .filter_map(|i| {
                let at = match (settle.reads.get(i), settle.planned.get(i)) {
                    (Some(read), Some(planned)) => *read.min(planned),
                    (Some(at), None) | (None, Some(at)) => *at,
                    (None, None) => return None,
                };
                Some(at.saturating_duration_since(write))
            })
            .collect()
    }

    /// When the work sent its first write, and how many reads it sent after it (its polls, for
    /// a NIC write), if it wrote.
    pub fn after_write(&self) -> Option<(Instant, usize)> {
        let settle = self.settle.lock().unwrap_or_else(|p| p.into_inner());
        settle.write.map(|at| (at, settle.reads.len()))
    }

    /// How long after its first write each poll of it was planned to come ([`settle_delays`]
    /// counting planned polls only: a read after the write that was not a poll, such as the NIC
    /// re-read after a 412, is not one).
    ///
    /// [`settle_delays`]: CallCounter::settle_delays
    pub fn planned_delays(&self) -> Vec<Duration> {
        let settle = self.settle.lock().unwrap_or_else(|p| p.into_inner());
        let Some(write) = settle.write else {
            return Vec::new();
        };
        settle
            .planned
            .iter()
            .map(|at| at.saturating_duration_since(write))
            .collect()
    }

    fn count(&self, write: bool) {
        let now = Instant::now();
        if write {
            self.writes.fetch_add(1, Ordering::Relaxed);
        } else {
            self.reads.fetch_add(1, Ordering::Relaxed);
        }
        let mut settle = self.settle.lock().unwrap_or_else(|p| p.into_inner());
        if write {
            settle.write.get_or_insert(now);
        } else if settle.write.is_some() && settle.reads.len() < SETTLE_READS_TIMED {
            settle.reads.push(now);
        }
    }

    fn plan_read(&self, at: Instant) {
        let mut settle = self.settle.lock().unwrap_or_else(|p| p.into_inner());
        if settle.write.is_some() && settle.planned.len() < SETTLE_READS_TIMED {
            // A poll planned while an earlier one is still only planned comes after it.
            settle.planned.push(at);
        }
    }
}

tokio::task_local! {
    static CALLS: Arc<CallCounter>;
}

/// Runs `work` and counts the ARM requests it sends from its own task (work the provider
/// spawns, such as a coalesced NIC write of [`super::AzureProvider::assign_ips`], is not
/// counted): the cluster allocator charges each job exactly what it cost.
pub async fn count_calls<F: Future>(work: F) -> (F::Output, ArmCalls) {
    let counter = Arc::new(CallCounter::default());
    let output = count_calls_into(counter.clone(), work).await;
    (output, counter.calls())
}

/// The counted work's next read comes `after` from now at the soonest: the next poll of the
/// write it has sent, `Retry-After` away. Known before the read is sent, so the allocator can
/// plan the next jobs' settle reads with it.
pub(crate) fn note_settle_planned(after: Duration) {
    let _ = CALLS.try_with(|c| c.plan_read(Instant::now() + after));
}

/// [`count_calls`] into a counter the caller holds (and may read while `work` runs).
pub async fn count_calls_into<F: Future>(counter: Arc<CallCounter>, work: F) -> F::Output {
    CALLS.scope(counter, work).await
}

pub struct Client {
    pub config: AzureConfig,
    arm: reqwest::Client,
    imds: reqwest::Client,
    credential: Option<Arc<dyn TokenCredential>>,
    pub sleeper: Arc<dyn Sleeper>,
    base: RwLock<ArmBase>,
    /// `arm_endpoint` was configured: IMDS's azEnvironment does not change it.
    base_configured: bool,
    budget: Budget,
}

impl Client {
    pub fn new(config: AzureConfig) -> Result<Client, CloudError> {
        config.validate()?;
        let base_configured = !config.arm_endpoint.is_empty();
        let base = ArmBase::parse(if base_configured {
            &config.arm_endpoint
        } else {
            DEFAULT_ARM_ENDPOINT
        })?;
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
            base: RwLock::new(base),
            base_configured,
            budget: Budget {
                reads: AtomicU64::new(UNKNOWN),
                writes: AtomicU64::new(UNKNOWN),
                reads_seen: Mutex::new(None),
                writes_seen: Mutex::new(None),
                throttled: AtomicU64::new(0),
                reads_sent: AtomicU64::new(0),
                writes_sent: AtomicU64::new(0),
                throttled_until: Mutex::new(None),
                reads_sent_at_report: AtomicU64::new(0),
                writes_sent_at_report: AtomicU64::new(0),
            },
        })
    }

    /// Replaces the credential (tests: one that fails the way a token endpoint can).
    pub fn set_credential(&mut self, credential: Arc<dyn TokenCredential>) {
        self.credential = Some(credential);
    }

    /// The ARM base URL in use.
    pub fn arm_endpoint(&self) -> String {
        self.base
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .endpoint
            .clone()
    }

    /// Follows IMDS's `compute.azEnvironment` unless `arm_endpoint` was configured.
    pub fn adopt_environment(&self, environment: &str) -> Result<(), CloudError> {
        if self.base_configured || environment.is_empty() {
            return Ok(());
        }
        let endpoint = arm_endpoint_for_environment(environment).ok_or_else(|| {
            CloudError::Fatal(format!(
                "IMDS names Azure environment {environment:?}, whose ARM endpoint is unknown; set cloud.arm_endpoint"
            ))
        })?;
        let base = ArmBase::parse(endpoint)?;
        tracing::info!(
            environment,
            endpoint,
            "ARM endpoint from IMDS azEnvironment"
        );
        *self.base.write().unwrap_or_else(|p| p.into_inner()) = base;
        Ok(())
    }

    /// ARM's last reported budget and the number of 429s seen.
    pub fn budget(&self) -> ArmBudget {
        let known = |v: u64| (v != UNKNOWN).then_some(v);
        ArmBudget {
            remaining_reads: known(self.budget.reads.load(Ordering::Relaxed)),
            remaining_writes: known(self.budget.writes.load(Ordering::Relaxed)),
            throttled: self.budget.throttled.load(Ordering::Relaxed),
        }
    }

    /// Every ARM request sent so far, by kind, and the 429s among them.
    pub fn calls(&self) -> ArmCalls {
        ArmCalls {
            reads: self.budget.reads_sent.load(Ordering::Relaxed),
            writes: self.budget.writes_sent.load(Ordering::Relaxed),
            throttled: self.budget.throttled.load(Ordering::Relaxed),
        }
    }

    /// ARM's last reported remaining reads and writes, each with how long ago it was reported.
    pub fn budget_age(&self) -> ArmRemaining {
        let read = |gauge: &AtomicU64,
                    seen: &Mutex<Option<Instant>>,
                    sent: &AtomicU64,
                    sent_then: &AtomicU64| {
            let value = gauge.load(Ordering::Relaxed);
            let at = *seen.lock().unwrap_or_else(|p| p.into_inner());
            match (value, at) {
                (UNKNOWN, _) | (_, None) => None,
                (remaining, Some(at)) => Some(Reported {
                    remaining,
                    age: at.elapsed(),
                    sent_since: sent
                        .load(Ordering::Relaxed)
                        .saturating_sub(sent_then.load(Ordering::Relaxed)),
                }),
            }
        };
        let b = &self.budget;
        ArmRemaining {
            reads: read(
                &b.reads,
                &b.reads_seen,
                &b.reads_sent,
                &b.reads_sent_at_report,
            ),
            writes: read(
                &b.writes,
                &b.writes_seen,
                &b.writes_sent,
                &b.writes_sent_at_report,
            ),
        }
    }

    /// Until when ARM's last 429 asked the caller to wait (`None`: no such wait pending).
    pub fn throttled_until(&self) -> Option<Instant> {
        let until = *self
            .budget
            .throttled_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        until.filter(|at| *at > Instant::now())
    }

    fn count_sent(&self, method: &Method) {
        let write = method != Method::GET;
        let global = if write {
            &self.budget.writes_sent
        } else {
            &self.budget.reads_sent
        };
        global.fetch_add(1, Ordering::Relaxed);
        let _ = CALLS.try_with(|c| c.count(write));
    }

    fn note_budget(&self, reply_headers: &HeaderMap, status: StatusCode, body: &Value) {
        let b = &self.budget;
        for (name, gauge, seen, sent, sent_then) in [
            (
                REMAINING_READS,
                &b.reads,
                &b.reads_seen,
                &b.reads_sent,
                &b.reads_sent_at_report,
            ),
            (
                REMAINING_WRITES,
                &b.writes,
                &b.writes_seen,
                &b.writes_sent,
                &b.writes_sent_at_report,
            ),
        ] {
            if let Some(v) = reply_headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
            {
                gauge.store(v, Ordering::Relaxed);
                sent_then.store(sent.load(Ordering::Relaxed), Ordering::Relaxed);
                *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                tracing::debug!(header = name, remaining = v, "ARM budget");
            }
        }
        // A busy resource's 429 is not throttling (Microsoft: "view the error details").
        if status == StatusCode::TOO_MANY_REQUESTS && !is_busy_answer(body) {
            self.budget.throttled.fetch_add(1, Ordering::Relaxed);
            let _ = CALLS.try_with(|c| c.throttled.fetch_add(1, Ordering::Relaxed));
            let wait = retry_after(reply_headers).unwrap_or(Duration::from_secs(1));
            let until = Instant::now() + wait;
            let mut slot = self
                .budget
                .throttled_until
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if slot.is_none_or(|at| at < until) {
                *slot = Some(until);
            }
            drop(slot);
            tracing::warn!(
                retry_after = ?retry_after(reply_headers),
                "ARM throttled the request (429)"
            );
        }
    }

    /// Before an ARM request: wait if the budget of its kind is low (see [`super::Pacing`]).
    async fn pace(&self, method: &Method) {
        let pacing = &self.config.pacing;
        let (remaining, seen, floor, rate) = if method == Method::GET {
            (
                self.budget.reads.load(Ordering::Relaxed),
                &self.budget.reads_seen,
                pacing.reads_floor,
                pacing.reads_per_sec,
            )
        } else {
            (
                self.budget.writes.load(Ordering::Relaxed),
                &self.budget.writes_seen,
                pacing.writes_floor,
                pacing.writes_per_sec,
            )
        };
        if remaining == UNKNOWN {
            return;
        }
        let since = seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|at| at.elapsed())
            .unwrap_or_default();
        let Some(wait) = pace_wait(remaining, since, floor, rate) else {
            return;
        };
        // Callers that saw the same low budget would wake together: spread them over +50%.
        let wait = wait
            .mul_f64(rand::random_range(1.0..1.5))
            .min(pacing.max_wait);
        tracing::info!(remaining, floor, ?wait, "ARM budget low; slowing down");
        self.sleep(wait).await;
    }

    pub async fn sleep(&self, duration: Duration) {
        self.sleeper.sleep(duration).await;
    }

    async fn token(&self) -> Result<Option<String>, CloudError> {
        if let CredentialConfig::StaticToken { token } = &self.config.credential {
            return Ok(Some(token.clone()));
        }
        let Some(credential) = &self.credential else {
            return Ok(None);
        };
        let scope = self
            .base
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .scope
            .clone();
        let token = credential
            .get_token(&[&scope], None)
            .await
            .map_err(|e| token_error(&scope, &e))?;
        Ok(Some(token.token.secret().to_string()))
    }

    /// The token may go only to the ARM endpoint's scheme, host and port (`https://` unless
    /// this is the mock): never to a long-running-operation URL on another host.
    fn check_arm_url(&self, url: &str) -> Result<(), CloudError> {
        let parsed =
            Url::parse(url).map_err(|e| CloudError::Fatal(format!("not a URL: {url:?}: {e}")))?;
        let base = self.base.read().unwrap_or_else(|p| p.into_inner());
        if parsed.scheme() != "https" && !self.config.allow_plain_http {
            return Err(CloudError::Fatal(format!(
                "refusing to send the ARM token over {}: {url} (only https:// to {})",
                parsed.scheme(),
                base.endpoint
            )));
        }
        if !base.owns(&parsed) {
            return Err(CloudError::Fatal(format!(
                "refusing to send the ARM token to {url}: not the ARM endpoint {}",
                base.endpoint
            )));
        }
        Ok(())
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
                self.check_arm_url(url)?;
                self.pace(&method).await;
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
        if target == Target::Arm {
            self.count_sent(&method);
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
        if target == Target::Arm {
            self.note_budget(&headers, status, &body);
        }
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
        if attempt >= self.config.retry.max_attempts {
            return None;
        }
        self.delay_before_retry(error, attempt)
    }

    /// The wait before another try after `error` (`Retry-After` with jitter, or the back-off),
    /// or `None` when it is not worth retrying at all; callers bound the attempts themselves.
    pub fn delay_before_retry(&self, error: &CloudError, attempt: u32) -> Option<Duration> {
        let policy = &self.config.retry;
        if !error.is_retryable() {
            return None;
        }
        match error.retry_after() {
            Some(after) if after > policy.max_retry_after => None,
            Some(after) => Some(past_retry_after(after)),
            None => Some(policy.backoff(attempt)),
        }
    }
}

/// The longest a retry is put off beyond `Retry-After` for jitter.
const MAX_RETRY_JITTER: Duration = Duration::from_secs(10);

/// When to retry after the cloud said `Retry-After: after`: never sooner, and later by a random
/// share of up to half of it (at most [`MAX_RETRY_JITTER`]). Every node that ARM throttled in the
/// same second gets the same `Retry-After`; retrying exactly then would bring them back in step,
/// to be throttled together again.
pub fn past_retry_after(after: Duration) -> Duration {
    spread_past(after, rand::random::<f64>())
}

/// [`past_retry_after`] with the random draw `r` (0..1) given.
fn spread_past(after: Duration, r: f64) -> Duration {
    after + (after / 2).min(MAX_RETRY_JITTER).mul_f64(r.clamp(0.0, 1.0))
}

fn credential(config: &CredentialConfig) -> Result<Option<Arc<dyn TokenCredential>>, CloudError> {
    use azure_identity::{
        ClientSecretCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
        UserAssignedId, WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
    };
    let fail = |what: &str, e: azure_core::Error| CloudError::Fatal(format!("{what}: {e}"));
    Ok(match config {
        CredentialConfig::None | CredentialConfig::StaticToken { .. } => None,
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

/// A token failure: transient when the token endpoint was unreachable, timed out or answered
/// 5xx/429/408 (retried like any transient failure), else `Unauthorized` (a refusal, or a
/// credential that cannot be built, e.g. a missing federated token file).
fn token_error(scope: &str, error: &azure_core::Error) -> CloudError {
    let message = format!("cannot get a token for {scope}: {error}");
    if token_error_is_transient(error) {
        CloudError::Transient(message)
    } else {
        CloudError::Unauthorized { message }
    }
}

fn token_error_is_transient(error: &azure_core::Error) -> bool {
    use azure_core::error::ErrorKind;
    let kind_transient = |kind: &ErrorKind| match kind {
        // Not `Io` as such: a missing federated token file is an I/O error too, and no retry
        // brings it back. I/O causes count only for the network kinds below.
        ErrorKind::Connection => true,
        ErrorKind::HttpResponse { status, .. } => {
            let code = u16::from(*status);
            code >= 500 || code == 429 || code == 408
        }
        _ => false,
    };
    if kind_transient(error.kind()) {
        return true;
    }
    // azure_identity wraps the cause in a Credential error: look down the chain.
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(inner) = cause.downcast_ref::<azure_core::Error>()
            && kind_transient(inner.kind())
        {
            return true;
        }
        if let Some(inner) = cause.downcast_ref::<reqwest::Error>()
            && (inner.is_connect() || inner.is_timeout())
        {
            return true;
        }
        if let Some(inner) = cause.downcast_ref::<std::io::Error>()
            && io_error_is_network(inner)
        {
            return true;
        }
        source = cause.source();
    }
    false
}

/// An I/O failure of the connection to the token endpoint (not of a local file).
fn io_error_is_network(error: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        error.kind(),
        ErrorKind::ConnectionRefused
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::NotConnected
            | ErrorKind::BrokenPipe
            | ErrorKind::TimedOut
            | ErrorKind::UnexpectedEof
            | ErrorKind::HostUnreachable
            | ErrorKind::NetworkUnreachable
            | ErrorKind::NetworkDown
    )
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
/// NRP answers a busy resource with the generic `RetryableError` and the reason in
/// `details[].code` (cloudfoundry/bosh-azure-cpi-release#179): a busy code found there is returned
/// as the code, with the detail's message (which says when to retry).
pub fn error_parts(body: &Value) -> (String, String) {
    let error = &body["error"];
    match error {
        Value::Object(_) => {
            let code = error["code"].as_str().unwrap_or_default();
            let message = error["message"].as_str().unwrap_or_default();
            let busy_detail = error["details"].as_array().and_then(|details| {
                details.iter().find(|d| {
                    d["code"]
                        .as_str()
                        .is_some_and(|c| BUSY_CODES.iter().any(|b| b.eq_ignore_ascii_case(c)))
                })
            });
            match busy_detail {
                Some(detail) => (
                    detail["code"].as_str().unwrap_or_default().to_string(),
                    format!(
                        "{code}: {message} {}",
                        detail["message"].as_str().unwrap_or_default()
                    )
                    .trim()
                    .to_string(),
                ),
                None => (code.to_string(), message.to_string()),
            }
        }
        Value::String(text) => (String::new(), text.clone()),
        _ => (
            String::new(),
            body.as_str().map(str::to_string).unwrap_or_default(),
        ),
    }
}

/// How long to wait before a request when ARM reported `remaining` tokens `since` ago: the bucket
/// refills at `rate`/s meanwhile, and the wait brings it back to `floor`. `None`: no wait.
fn pace_wait(remaining: u64, since: Duration, floor: u64, rate: f64) -> Option<Duration> {
    if rate <= 0.0 {
        return None;
    }
    let now = remaining as f64 + since.as_secs_f64() * rate;
    let missing = floor as f64 - now;
    (missing > 0.0).then(|| Duration::from_secs_f64(missing / rate))
}

/// A 429 that says the resource is busy, not that the caller is throttled.
fn is_busy_answer(body: &Value) -> bool {
    let (code, _) = error_parts(body);
    BUSY_CODES.iter().any(|b| b.eq_ignore_ascii_case(&code))
}

/// The wait NRP names in a busy answer's text ("The call can be retried in 14 seconds."), used
/// when the answer has no `Retry-After` header.
fn retry_in_message(message: &str) -> Option<Duration> {
    let at = message.find("retried in ")? + "retried in ".len();
    let rest = &message[at..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    if !rest[digits.len()..].trim_start().starts_with("second") {
        return None;
    }
    digits.parse::<u64>().ok().map(Duration::from_secs)
}

/// The NIC is busy with another operation: retry after `Retry-After`. (`OperationNotAllowed`
/// is not one of them: it is a refusal, reported with its message.)
const BUSY_CODES: [&str; 2] = [
    "RetryableErrorDueToAnotherOperation",
    "AnotherOperationInProgress",
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
            retry_after: retry_after
                .or_else(|| retry_in_message(message))
                .unwrap_or(Duration::from_secs(1)),
        };
    }
    // A refusal (even with 401/403): retrying or re-authenticating changes nothing. With 429 it
    // is Compute's throttling ("The server rejected the request because too many requests have
    // been received for this subscription.", Microsoft's troubleshooting-throttling-errors page).
    if code.eq_ignore_ascii_case("OperationNotAllowed") && status != 429 {
        return CloudError::Fatal(detail);
    }
    // NRP's linked access check fails with 400 (Azure/mpf#44): a missing permission all the same.
    let denied =
        matches!(status, 401 | 403) || code.eq_ignore_ascii_case("LinkedAccessCheckFailed");
    match status {
        _ if denied => CloudError::Unauthorized {
            message: match missing_permissions(code, message) {
                Some(actions) if code.eq_ignore_ascii_case("LinkedAuthorizationFailed") => {
                    format!(
                        "missing permission {} on resources the NIC references (linked access check): {detail}",
                        actions.join(", ")
                    )
                }
                Some(actions) => format!("missing permission {}: {detail}", actions.join(", ")),
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

/// The actions the caller lacks, from ARM's texts:
/// `AuthorizationFailed`: "...does not have authorization to perform action 'X' over scope...";
/// `LinkedAuthorizationFailed`: "...has permission to perform action 'W' on scope '...'; however,
/// it does not have permission to perform action(s) 'X,Y' on the linked scope(s) ...".
fn missing_permissions(code: &str, message: &str) -> Option<Vec<String>> {
    let after = if code.eq_ignore_ascii_case("LinkedAuthorizationFailed") {
        let at = message.find("does not have permission to perform ")?;
        &message[at..]
    } else {
        message
    };
    let start = after
        .find("action(s) '")
        .map(|i| i + "action(s) '".len())
        .or_else(|| after.find("action '").map(|i| i + "action '".len()))?;
    let len = after[start..].find('\'')?;
    let actions: Vec<String> = after[start..start + len]
        .split(',')
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect();
    (!actions.is_empty()).then_some(actions)
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
        let refused = m(
            409,
            "OperationNotAllowed",
            "Operation is not allowed because x.",
        );
        assert!(
            matches!(&refused, CloudError::Fatal(m) if m.contains("Operation is not allowed because x.")),
            "{refused:?}"
        );
        // Azure/mpf#44: NRP's linked access check answers 400, naming the action.
        let access_check = m(
            400,
            "LinkedAccessCheckFailed",
            "The client 'c' with object id 'o' does not have authorization to perform action 'Microsoft.Network/publicIPAddresses/join/action' over scope '/p' or the scope is invalid.",
        );
        assert!(
            matches!(&access_check, CloudError::Unauthorized { message } if message.starts_with("missing permission Microsoft.Network/publicIPAddresses/join/action:")),
            "{access_check:?}"
        );
        assert_eq!(
            m(
                429,
                "OperationNotAllowed",
                "The server rejected the request because too many requests have been received for this subscription."
            ),
            CloudError::Throttled {
                retry_after: Duration::from_secs(7)
            }
        );
        for status in [403, 401, 400] {
            let refused = m(
                status,
                "OperationNotAllowed",
                "Operation is not allowed because y.",
            );
            assert!(
                matches!(&refused, CloudError::Fatal(m) if m.contains("Operation is not allowed because y.")),
                "{status}: {refused:?}"
            );
        }
        let linked = m(
            403,
            "LinkedAuthorizationFailed",
            "The client 'c' with object id 'o' has permission to perform action 'Microsoft.Network/networkInterfaces/write' on scope '/n'; however, it does not have permission to perform action(s) 'Microsoft.Network/networkSecurityGroups/join/action,Microsoft.Network/applicationSecurityGroups/joinIpConfiguration/action' on the linked scope(s) '/a,/b' (respectively) or the linked scope(s) are invalid.",
        );
        assert!(
            matches!(&linked, CloudError::Unauthorized { message } if message.starts_with("missing permission Microsoft.Network/networkSecurityGroups/join/action, Microsoft.Network/applicationSecurityGroups/joinIpConfiguration/action ")),
            "{linked:?}"
        );
    }

    #[test]
    fn retries_wait_at_least_retry_after_and_spread_beyond_it() {
        let s = Duration::from_secs;
        assert_eq!(spread_past(s(2), 0.0), s(2));
        assert_eq!(spread_past(s(2), 0.5), Duration::from_millis(2500));
        assert_eq!(spread_past(s(2), 1.0), s(3));
        // A long Retry-After is not stretched by more than the cap.
        assert_eq!(spread_past(s(60), 1.0), s(70));
        assert_eq!(spread_past(Duration::ZERO, 1.0), Duration::ZERO);
        let drawn: Vec<Duration> = (0..8).map(|_| past_retry_after(s(1))).collect();
        assert!(
            drawn
                .iter()
                .all(|d| *d >= s(1) && *d <= Duration::from_millis(1500))
        );
        let distinct: std::collections::BTreeSet<_> = drawn.iter().collect();
        assert!(distinct.len() > 1, "{drawn:?}");
    }

    #[test]
    fn pacing_counts_the_refill_since_the_budget_was_reported() {
        let at_once = Duration::ZERO;
        assert_eq!(
            pace_wait(0, at_once, 10, 10.0),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            pace_wait(5, at_once, 10, 10.0),
            Some(Duration::from_millis(500))
        );
        assert_eq!(pace_wait(10, at_once, 10, 10.0), None);
        // Reported empty 0.3 s ago: 3 tokens are back, 0.7 s to the floor.
        let wait = pace_wait(0, Duration::from_millis(300), 10, 10.0).unwrap();
        assert!((wait.as_secs_f64() - 0.7).abs() < 1e-9, "{wait:?}");
        // Reported empty a while ago: the bucket is full again.
        assert_eq!(pace_wait(0, Duration::from_secs(2), 10, 10.0), None);
        assert_eq!(pace_wait(0, at_once, 10, 0.0), None);
    }

    /// The answer NRP gave cloudfoundry/bosh-azure-cpi-release#179 for a busy resource: generic
    /// top-level code, the reason in `details`, the wait in the text, no `Retry-After` header.
    #[test]
    fn a_busy_answer_is_recognised_by_its_detail_code() {
        let body = serde_json::json!({"error": {
            "code": "RetryableError",
            "message": "A retryable error occured.",
            "details": [{
                "code": "RetryableErrorDueToAnotherOperation",
                "message": "Operation PutNetworkInterfaceOperation (xyz) is updating resource /subscriptions/s/resourceGroups/g/providers/Microsoft.Network/networkInterfaces/n. The call can be retried in 14 seconds."
            }]
        }});
        let (code, message) = error_parts(&body);
        assert_eq!(code, "RetryableErrorDueToAnotherOperation");
        assert_eq!(
            map_error(429, &code, &message, None, None),
            CloudError::Busy {
                code: "RetryableErrorDueToAnotherOperation".into(),
                retry_after: Duration::from_secs(14),
            }
        );
        // A Retry-After header wins over the text.
        assert_eq!(
            map_error(429, &code, &message, Some(Duration::from_secs(3)), None),
            CloudError::Busy {
                code: "RetryableErrorDueToAnotherOperation".into(),
                retry_after: Duration::from_secs(3),
            }
        );
        // Without a busy detail, a generic RetryableError 429 is throttling.
        let (code, message) = error_parts(&serde_json::json!({"error": {
            "code": "RetryableError", "message": "A retryable error occured.", "details": []
        }}));
        assert!(matches!(
            map_error(429, &code, &message, None, None),
            CloudError::Throttled { .. }
        ));
    }

    #[test]
    fn the_arm_endpoint_follows_imds_unless_configured() {
        let auto = Client::new(AzureConfig::new(
            "",
            "http://127.0.0.1:1",
            CredentialConfig::None,
        ))
        .unwrap();
        assert_eq!(auto.arm_endpoint(), "https://management.azure.com");
        auto.adopt_environment("AzureUSGovernmentCloud").unwrap();
        assert_eq!(auto.arm_endpoint(), "https://management.usgovcloudapi.net");
        assert_eq!(
            auto.base.read().unwrap().scope,
            "https://management.usgovcloudapi.net/.default"
        );
        auto.adopt_environment("AzureChinaCloud").unwrap();
        assert_eq!(auto.arm_endpoint(), "https://management.chinacloudapi.cn");
        assert!(auto.adopt_environment("AzureMarsCloud").is_err());
        // The token stays on the endpoint in use.
        assert!(
            auto.check_arm_url("https://management.chinacloudapi.cn/x")
                .is_ok()
        );
        assert!(
            auto.check_arm_url("https://management.azure.com/x")
                .is_err()
        );
        assert!(
            auto.check_arm_url("http://management.chinacloudapi.cn/x")
                .is_err()
        );

        let configured = Client::new(AzureConfig::new(
            "https://management.usgovcloudapi.net/",
            "http://127.0.0.1:1",
            CredentialConfig::None,
        ))
        .unwrap();
        configured.adopt_environment("AzurePublicCloud").unwrap();
        assert_eq!(
            configured.arm_endpoint(),
            "https://management.usgovcloudapi.net"
        );
    }

    /// The settle delays of a write: from the write to each poll, known as soon as the poll is
    /// planned; reads before the write do not count.
    #[tokio::test]
    async fn a_writes_settle_delays_are_known_once_its_polls_are_planned() {
        let counter = Arc::new(CallCounter::default());
        let c = counter.clone();
        count_calls_into(counter.clone(), async move {
            c.count(false);
            note_settle_planned(Duration::from_secs(5));
            assert!(c.settle_delays().is_empty(), "no write yet");
            assert_eq!(c.after_write(), None);
            c.count(true);
            assert!(c.settle_delays().is_empty());
            note_settle_planned(Duration::from_secs(2));
            let planned = c.settle_delays();
            assert_eq!(planned.len(), 1);
            assert!(planned[0] >= Duration::from_secs(2) && planned[0] < Duration::from_secs(3));
            // The read comes when planned (or earlier): the earlier of the two counts.
            c.count(false);
            assert!(c.settle_delays()[0] < Duration::from_secs(2));
            // The second poll, planned and sent.
            note_settle_planned(Duration::from_secs(1));
            c.count(false);
            assert_eq!(c.settle_delays().len(), 2);
            // Two reads after the write (the read before it is not one of its polls).
            assert_eq!(c.after_write().map(|(_, polls)| polls), Some(2));
        })
        .await;
        assert_eq!(counter.calls().reads, 3);
        assert_eq!(counter.calls().writes, 1);
    }
}
