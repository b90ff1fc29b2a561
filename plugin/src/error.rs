//! CNI errors: every failure the plugin reports, with its CNI error code.
//!
//! Codes below 100 are the spec's; 100 and above are ours and documented in docs/plugin.md.

use serde::Serialize;

/// A CNI error code. The numeric value is what goes into the error JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    /// STATUS: the plugin cannot serve ADD.
    NotAvailable = 50,
    /// STATUS: cannot serve ADD, and existing pods are impaired too.
    NotAvailableDegraded = 51,
    /// The agent answered ADD with an error that retrying will not fix (bad request, internal).
    AgentRejected = 100,
    /// `CNI_IFNAME` already exists in the pod's network namespace.
    InterfaceExists = 101,
    /// The kernel refused a netlink request while wiring the pod.
    Netlink = 102,
    /// The pod's network namespace could not be opened or entered.
    Netns = 103,
    /// No address left: the subnet is full or the node's maximum is reached.
    Exhausted = 104,
    /// CHECK found the pod's wiring or allocation differs from what ADD made.
    CheckFailed = 105,
    /// GC could not remove everything; details list each failure.
    GcIncomplete = 106,
    /// ADD: the host veth name is held by a link that is not this attachment's (another
    /// attachment's veth with the same hashed name, or a link vnet-cni did not make).
    NameTaken = 107,
}

impl Code {
    pub fn as_u32(self) -> u32 {
        self as u32
    }
}

/// An error as the runtime sees it: code, a message a person can act on, and details.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    pub fn env(msg: impl Into<String>) -> Self {
        Self::new(Code::InvalidEnvironment, msg)
    }

    pub fn config(msg: impl Into<String>) -> Self {
        Self::new(Code::InvalidConfig, msg)
    }

    pub fn netlink(what: impl Into<String>, err: impl std::fmt::Display) -> Self {
        Self::new(Code::Netlink, what).with_details(err.to_string())
    }

    /// The JSON document printed on stdout.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_string(&Wire {
            cni_version,
            code: self.code.as_u32(),
            msg: &self.msg,
            details: &self.details,
        })
        .expect("error JSON always serialises")
    }
}

pub type CniResult<T> = Result<T, CniError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_the_spec_fields() {
        let err =
            CniError::new(Code::TryAgainLater, "agent is down").with_details("connect: ENOENT");
        let v: serde_json::Value = serde_json::from_str(&err.to_json("1.0.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["code"], 11);
        assert_eq!(v["msg"], "agent is down");
        assert_eq!(v["details"], "connect: ENOENT");
        let plain = CniError::env("x").to_json("1.1.0");
        assert!(!plain.contains("details"));
    }
}
