//! STATUS: can this node serve an ADD now?
//!
//! - 0: the agent answers and `can_allocate` is true.
//! - 50: the agent is unreachable, not ready, or cannot allocate (pool exhausted, subnet full);
//!   the message carries the agent's reason.
//! - 51: as 50, and existing pods are impaired too: the agent reports allocations whose address
//!   the cloud no longer shows on the NIC (`unreconciled`), so traffic to those pods is not
//!   delivered. With `can_allocate` true, unreconciled addresses are only logged: new pods can
//!   still be served.

use vnet_api::{PATH_STATUS, StatusResponse};

use super::READ_TIMEOUT;
use crate::error::{CniError, CniResult, Code};
use crate::{Context, log_warn};

pub async fn run(ctx: &Context) -> CniResult<()> {
    let status: StatusResponse = ctx
        .agent
        .get(PATH_STATUS, READ_TIMEOUT)
        .await
        .map_err(|e| CniError::new(Code::NotAvailable, format!("cannot serve ADD: {e}")))?;
    decide(&status)
}

pub fn decide(status: &StatusResponse) -> CniResult<()> {
    let impaired = !status.unreconciled.is_empty();
    if status.ready && status.can_allocate {
        if impaired {
            log_warn!("addresses no longer on the NIC: {:?}", status.unreconciled);
        }
        return Ok(());
    }
    let reason = status.reason.clone().unwrap_or_else(|| {
        if status.ready {
            "no address can be allocated".into()
        } else {
            "vnet-agent is not ready".into()
        }
    });
    let mut err = CniError::new(
        if impaired {
            Code::NotAvailableDegraded
        } else {
            Code::NotAvailable
        },
        format!("cannot serve ADD on node {}: {reason}", status.node),
    );
    let mut details = format!(
        "pool: total {} allocated {} free {} cooldown {} pending {} max {}; subnet_full {}",
        status.pool.total,
        status.pool.allocated,
        status.pool.free,
        status.pool.cooldown,
        status.pool.pending,
        status.pool.max,
        status.subnet_full
    );
    if let Some(cloud) = &status.last_cloud_error {
        details.push_str(&format!("; last cloud error: {cloud}"));
    }
    if impaired {
        details.push_str(&format!(
            "; existing pods impaired, addresses no longer on the NIC: {:?}",
            status.unreconciled
        ));
    }
    err = err.with_details(details);
    Err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vnet_api::PoolStatus;

    fn status(can_allocate: bool, unreconciled: usize) -> StatusResponse {
        StatusResponse {
            ready: true,
            can_allocate,
            reason: (!can_allocate).then(|| "subnet full".into()),
            node: "node-1".into(),
            pool: PoolStatus::default(),
            subnet_full: !can_allocate,
            last_cloud_error: None,
            unreconciled: vec![std::net::Ipv4Addr::new(10, 0, 0, 1); unreconciled],
        }
    }

    #[test]
    fn status_codes() {
        assert!(decide(&status(true, 0)).is_ok());
        assert!(decide(&status(true, 1)).is_ok());
        let e = decide(&status(false, 0)).unwrap_err();
        assert_eq!(e.code, Code::NotAvailable);
        assert!(e.msg.contains("subnet full"));
        assert_eq!(
            decide(&status(false, 2)).unwrap_err().code,
            Code::NotAvailableDegraded
        );
    }
}
