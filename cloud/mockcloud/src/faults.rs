//! Fault injection: latency per operation and probabilistic (optionally counted) failures.
//!
//! Operation names: `imds`, `token`, `nic_get`, `nic_put`, `operation_get`, `vm_get`, `vnet_get`,
//! `subnet_get`, and on the scale-set path `vmss_vm_get`, `vmss_vm_put`, `vmss_nic_get`,
//! `compute_operation_get`. A fault with an empty `operations` list applies to every ARM operation.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Added delay per operation name (`"*"` for every operation without its own entry).
    pub latency: BTreeMap<String, Latency>,
    /// 429 `TooManyRequests` with `Retry-After`.
    pub throttle: Option<FaultSpec>,
    /// 500 `InternalServerError` (or `status`), nothing changed.
    pub server_error: Option<FaultSpec>,
    /// 429 `RetryableError` with `details[0].code` `RetryableErrorDueToAnotherOperation` (or
    /// `code`), as when the NIC is busy.
    pub busy: Option<FaultSpec>,
    /// 403 `AuthorizationFailed` naming the action the caller lacks.
    pub forbidden: Option<FaultSpec>,
    /// The NIC PUT is accepted but its long-running operation ends `Failed`: rolled back, or with
    /// `"rollback": false` its new ipConfigurations left `Failed` until the next successful PUT.
    pub async_failure: Option<FaultSpec>,
    /// Another writer changes the NIC just before a PUT with `If-Match`: the PUT gets 412.
    pub etag_race: Option<FaultSpec>,
    /// The NIC PUT is applied but its answer is a 500 (the caller cannot know it took effect).
    pub lost_response: Option<FaultSpec>,
    /// How many polls of an operation answer `InProgress` before the final status (default 1).
    pub operation_polls: Option<u32>,
    /// `Retry-After` (seconds) on accepted PUTs, on `InProgress` polls and on a PUT to a busy
    /// NIC. Default 10, what NRP answers on a NIC PUT; the lab, tests and benchmark pin 1.
    pub operation_retry_after_secs: Option<u64>,
    /// Base URL of the `Azure-AsyncOperation` URLs (default: `http://` + the request's Host),
    /// e.g. another host to check that a client does not follow it with its token.
    pub operation_base_url: Option<String>,
}

/// `Retry-After` of NRP's long-running operations (Azure's answer to a NIC PUT).
pub const DEFAULT_OPERATION_RETRY_AFTER_SECS: u64 = 10;

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Latency {
    pub fixed_ms: u64,
    pub jitter_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultSpec {
    /// Chance per eligible call, 0.0..=1.0.
    pub probability: f64,
    /// Inject at most this many times, then stop (absent: no limit).
    pub count: Option<u32>,
    /// Operation names this applies to (empty: all ARM operations).
    pub operations: Vec<String>,
    /// `Retry-After` seconds on 429/409 answers.
    pub retry_after_secs: u64,
    /// Overrides the Azure error code.
    pub code: Option<String>,
    /// Overrides the HTTP status (server_error only).
    pub status: Option<u16>,
    /// Overrides the error message (server_error only).
    pub message: Option<String>,
    /// async_failure only: `false` leaves the NIC's new entries `Failed` instead of rolling back.
    pub rollback: bool,
}

impl Default for FaultSpec {
    fn default() -> Self {
        FaultSpec {
            probability: 1.0,
            count: None,
            operations: Vec::new(),
            retry_after_secs: 1,
            code: None,
            status: None,
            message: None,
            rollback: true,
        }
    }
}

/// Which fault, by name (the key in counters' `injected`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    Throttle,
    ServerError,
    Busy,
    Forbidden,
    AsyncFailure,
    EtagRace,
    LostResponse,
}

impl FaultKind {
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Throttle => "throttle",
            FaultKind::ServerError => "server_error",
            FaultKind::Busy => "busy",
            FaultKind::Forbidden => "forbidden",
            FaultKind::AsyncFailure => "async_failure",
            FaultKind::EtagRace => "etag_race",
            FaultKind::LostResponse => "lost_response",
        }
    }
}

impl Faults {
    pub fn from_json(text: &str) -> Result<Faults, String> {
        let faults: Faults = serde_json::from_str(text).map_err(|e| e.to_string())?;
        for (kind, spec) in faults.specs() {
            if let Some(spec) = spec
                && !(0.0..=1.0).contains(&spec.probability)
            {
                return Err(format!("{}: probability must be within 0..=1", kind.name()));
            }
        }
        Ok(faults)
    }

    fn specs(&self) -> [(FaultKind, &Option<FaultSpec>); 7] {
        [
            (FaultKind::Throttle, &self.throttle),
            (FaultKind::ServerError, &self.server_error),
            (FaultKind::Busy, &self.busy),
            (FaultKind::Forbidden, &self.forbidden),
            (FaultKind::AsyncFailure, &self.async_failure),
            (FaultKind::EtagRace, &self.etag_race),
            (FaultKind::LostResponse, &self.lost_response),
        ]
    }

    fn spec_mut(&mut self, kind: FaultKind) -> &mut Option<FaultSpec> {
        match kind {
            FaultKind::Throttle => &mut self.throttle,
            FaultKind::ServerError => &mut self.server_error,
            FaultKind::Busy => &mut self.busy,
            FaultKind::Forbidden => &mut self.forbidden,
            FaultKind::AsyncFailure => &mut self.async_failure,
            FaultKind::EtagRace => &mut self.etag_race,
            FaultKind::LostResponse => &mut self.lost_response,
        }
    }

    /// Decides whether `kind` fires for `operation` now; consumes one of its `count` if so.
    pub fn roll(&mut self, kind: FaultKind, operation: &str) -> Option<FaultSpec> {
        let slot = self.spec_mut(kind);
        let spec = slot.as_mut()?;
        if !spec.operations.is_empty() && !spec.operations.iter().any(|o| o == operation) {
            return None;
        }
        if spec.count == Some(0) || !rand::random_bool(spec.probability.clamp(0.0, 1.0)) {
            return None;
        }
        if let Some(count) = spec.count.as_mut() {
            *count -= 1;
        }
        Some(spec.clone())
    }

    pub fn latency_for(&self, operation: &str) -> Duration {
        let Some(latency) = self
            .latency
            .get(operation)
            .or_else(|| self.latency.get("*"))
        else {
            return Duration::ZERO;
        };
        let jitter = if latency.jitter_ms > 0 {
            rand::random_range(0..=latency.jitter_ms)
        } else {
            0
        };
        Duration::from_millis(latency.fixed_ms + jitter)
    }

    pub fn operation_polls(&self) -> u32 {
        self.operation_polls.unwrap_or(1)
    }

    pub fn operation_retry_after_secs(&self) -> u64 {
        self.operation_retry_after_secs
            .unwrap_or(DEFAULT_OPERATION_RETRY_AFTER_SECS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_fault_fires_exactly_count_times() {
        let mut faults = Faults::from_json(
            r#"{"throttle":{"probability":1.0,"count":2,"operations":["nic_put"]}}"#,
        )
        .unwrap();
        assert!(faults.roll(FaultKind::Throttle, "nic_get").is_none());
        assert!(faults.roll(FaultKind::Throttle, "nic_put").is_some());
        assert!(faults.roll(FaultKind::Throttle, "nic_put").is_some());
        assert!(faults.roll(FaultKind::Throttle, "nic_put").is_none());
    }

    #[test]
    fn bad_probability_and_unknown_keys_are_rejected() {
        assert!(Faults::from_json(r#"{"throttle":{"probability":2}}"#).is_err());
        assert!(Faults::from_json(r#"{"thrtotle":{}}"#).is_err());
    }
}
