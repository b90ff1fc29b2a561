//! One module per CNI command.

pub mod add;
pub mod check;
pub mod del;
pub mod gc;
pub mod status;
pub mod version;

use std::time::Duration;

use crate::agent::AgentError;
use crate::error::{CniError, Code};

/// How long ADD waits for an address: the agent may be waiting for a cloud write, and answers
/// before this (its own wait is capped below it).
pub const ALLOCATE_TIMEOUT: Duration = Duration::from_secs(vnet_api::ALLOCATE_WAIT_SECS);
/// STATUS, CHECK and GC: the agent answers them from memory, without a cloud call.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Maps an agent failure to a CNI error a person can act on.
pub fn agent_error(err: AgentError) -> CniError {
    use vnet_api::ErrorCode;
    let code = match &err {
        AgentError::Unreachable { .. }
        | AgentError::ConnectTimeout { .. }
        | AgentError::Timeout { .. }
        | AgentError::Dropped { .. } => Code::TryAgainLater,
        AgentError::Refused { body, .. } => match body.code {
            ErrorCode::TryAgainLater | ErrorCode::NotReady => Code::TryAgainLater,
            ErrorCode::Exhausted => Code::Exhausted,
            ErrorCode::BadRequest | ErrorCode::Internal => Code::AgentRejected,
        },
        AgentError::Protocol { .. } => Code::AgentRejected,
    };
    let hint = match code {
        Code::TryAgainLater if err.is_unavailable() => {
            "; check that vnet-agent is running on this node (systemctl status vnet-agent / the vnet-agent pod)"
        }
        _ => "",
    };
    CniError::new(code, format!("{err}{hint}"))
}
