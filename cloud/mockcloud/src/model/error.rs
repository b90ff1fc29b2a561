//! Azure's error answers as the mock builds them.

use super::*;

/// An Azure error answer: status, `{"error":{"code","message"}}`, optional `Retry-After`.
#[derive(Debug, Clone, PartialEq)]
pub struct ArmError {
    pub status: u16,
    pub code: String,
    pub message: String,
    pub retry_after: Option<u64>,
    /// `error.details[]` as `(code, message)`.
    pub details: Vec<(String, String)>,
}

impl ArmError {
    pub fn new(status: u16, code: &str, message: impl Into<String>) -> ArmError {
        ArmError {
            status,
            code: code.to_string(),
            message: message.into(),
            retry_after: None,
            details: Vec::new(),
        }
    }

    /// What NRP answers for a write to a resource another operation holds: 429 `RetryableError`
    /// with the specific code in `details[0]` (as in cloudfoundry/bosh-azure-cpi-release#179).
    pub fn busy(detail_code: &str, message: impl Into<String>, retry_after_secs: u64) -> ArmError {
        let mut error = ArmError::new(429, BUSY_CODE, "A retryable error occured.")
            .with_retry_after(retry_after_secs);
        error
            .details
            .push((detail_code.to_string(), message.into()));
        error
    }

    pub fn bad_request(code: &str, message: impl Into<String>) -> ArmError {
        ArmError::new(400, code, message)
    }

    pub fn with_retry_after(mut self, secs: u64) -> ArmError {
        self.retry_after = Some(secs);
        self
    }

    pub fn body(&self) -> Value {
        let details: Vec<Value> = self
            .details
            .iter()
            .map(|(code, message)| json!({"code": code, "message": message}))
            .collect();
        json!({"error": {"code": self.code, "message": self.message, "details": details}})
    }
}
