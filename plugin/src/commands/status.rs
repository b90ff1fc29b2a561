//! STATUS: can the plugin work on this node?
//!
//! - 0: the agent answers and is ready (started, store usable). Address exhaustion (pool at its
//!   max, NIC limit, subnet full: `can_allocate` false) is NOT a STATUS failure: it is logged
//!   here and reported per ADD (code 104), in the NodeIPPool conditions and `/readyz`.
//! - 50: the plugin cannot work at all: the agent is unreachable, not ready (starting, shutting
//!   down) or its store is unusable; the message carries the agent's reason.
//! - 51: as 50, and existing pods are impaired too: the agent reports allocations whose address
//!   the cloud no longer shows on the NIC (`unreconciled`). With the agent ready, unreconciled
//!   addresses are only logged: new pods can still be served.
//!
//! Why exhaustion is 0: runtimes turn a failing STATUS into NetworkReady=false, kubelet marks the
//! node NotReady and, after the taint timeout, evicts every pod on it. A full subnet would then
//! take down every node of the subnet at once, for a condition that only new pods suffer from and
//! that frees itself as pods go away.

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

fn pool_summary(status: &StatusResponse) -> String {
    format!(
        "pool: total {} allocated {} free {} cooldown {} pending {} max {}; subnet_full {}",
        status.pool.total,
        status.pool.allocated,
        status.pool.free,
        status.pool.cooldown,
        status.pool.pending,
        status.pool.max,
        status.subnet_full
    )
}

pub fn decide(status: &StatusResponse) -> CniResult<()> {
    let impaired = !status.unreconciled.is_empty();
    if status.ready {
        if impaired {
            log_warn!("addresses no longer on the NIC: {:?}", status.unreconciled);
        }
        if !status.can_allocate {
            // Reported, not fatal: see the module comment.
            log_warn!(
                "ready, but new pods get no address now ({}); ADD answers 104 until addresses free up ({})",
                status
                    .reason
                    .as_deref()
                    .unwrap_or("no address can be allocated"),
                pool_summary(status)
            );
        }
        return Ok(());
    }
    let reason = status
        .reason
        .clone()
        .unwrap_or_else(|| "vnet-agent is not ready".into());
    let mut details = pool_summary(status);
    if let Some(cloud) = &status.last_cloud_error {
        details.push_str(&format!("; last cloud error: {cloud}"));
    }
    if impaired {
        details.push_str(&format!(
            "; existing pods impaired, addresses no longer on the NIC: {:?}",
            status.unreconciled
        ));
    }
    Err(CniError::new(
        if impaired {
            Code::NotAvailableDegraded
        } else {
            Code::NotAvailable
        },
        format!("cannot serve ADD on node {}: {reason}", status.node),
    )
    .with_details(details))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vnet_api::PoolStatus;

    fn status(ready: bool, can_allocate: bool, unreconciled: usize) -> StatusResponse {
        StatusResponse {
            ready,
            can_allocate,
            reason: match (ready, can_allocate) {
                (false, _) => Some("store failed: No space left on device".into()),
                (true, false) => Some("subnet nodes has no free addresses (SubnetIsFull)".into()),
                (true, true) => None,
            },
            node: "node-1".into(),
            pool: PoolStatus::default(),
            subnet_full: !can_allocate,
            last_cloud_error: None,
            unreconciled: vec![std::net::Ipv4Addr::new(10, 0, 0, 1); unreconciled],
        }
    }

    #[test]
    fn status_codes() {
        assert!(decide(&status(true, true, 0)).is_ok());
        assert!(decide(&status(true, true, 1)).is_ok());
        // Exhaustion (subnet full, pool at max, NIC limit) keeps the node's network ready.
        assert!(decide(&status(true, false, 0)).is_ok());
        assert!(decide(&status(true, false, 3)).is_ok());
        // Not ready or store unusable: the plugin cannot work at all.
        let e = decide(&status(false, false, 0)).unwrap_err();
        assert_eq!(e.code, Code::NotAvailable);
        assert!(e.msg.contains("store failed"), "{}", e.msg);
        assert_eq!(
            decide(&status(false, false, 2)).unwrap_err().code,
            Code::NotAvailableDegraded
        );
        let mut starting = status(false, false, 0);
        starting.reason = None;
        assert!(
            decide(&starting)
                .unwrap_err()
                .msg
                .contains("vnet-agent is not ready")
        );
    }
}
