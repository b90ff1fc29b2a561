//! GC: remove host veths with our prefix that no valid attachment maps to, and leftover
//! tombstones, THEN forward the valid attachments to the agent (it releases every other
//! allocation). Links go first so an address is never freed while its old veth and `/32` host
//! route still exist. Keeps going on errors and reports them all at the end.

use std::collections::HashSet;

use vnet_api::{GcRequest, GcResponse, PATH_GC, host_veth_name, is_tombstone_name};

use super::add::netlink_socket_error;
use super::{READ_TIMEOUT, agent_error};
use crate::cni::gc_keys;
use crate::datapath;
use crate::error::{CniError, CniResult, Code};
use crate::netns;
use crate::{Context, log_info, log_warn};

/// Our host veth names are exactly `prefix` + hex digits, 15 bytes: a user's `vnet0` is not ours
/// to delete.
fn is_host_veth_name(name: &str, prefix: &str) -> bool {
    name.len() == vnet_api::IFNAME_MAX
        && name
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')))
}

pub async fn run(ctx: &Context) -> CniResult<()> {
    let Some(list) = ctx.conf.valid_attachments.as_deref() else {
        return Err(CniError::config(
            "GC needs cni.dev/valid-attachments (or cni.dev/attachments) in the config",
        ));
    };
    let (keys, mut errors) = gc_keys(list);
    let prefix = ctx.conf.host_veth_prefix.as_str();
    let keep: HashSet<String> = keys.iter().map(|k| host_veth_name(prefix, k)).collect();

    let host = netns::host_netlink().map_err(netlink_socket_error)?;
    match datapath::links(&host).await {
        Ok(links) => {
            for link in links.iter().filter(|l| l.is_veth) {
                let stale = is_host_veth_name(&link.name, prefix) && !keep.contains(&link.name);
                if !(stale || is_tombstone_name(&link.name)) {
                    continue;
                }
                match datapath::delete_link(&host, link.index).await {
                    Ok(()) => log_info!("removed stale veth {}", link.name),
                    Err(e) => errors.push(format!("cannot remove {}: {e}", link.name)),
                }
            }
        }
        Err(e) => errors.push(format!("cannot list host links: {e}")),
    }

    match ctx
        .agent
        .post::<_, GcResponse>(
            PATH_GC,
            &GcRequest {
                valid_attachments: keys,
            },
            READ_TIMEOUT,
        )
        .await
    {
        Ok(resp) => log_info!("agent released {} allocations", resp.released.len()),
        Err(e) => errors.push(agent_error(e).to_string()),
    }

    if errors.is_empty() {
        return Ok(());
    }
    for e in &errors {
        log_warn!("gc: {e}");
    }
    Err(CniError::new(
        Code::GcIncomplete,
        format!("GC finished with {} errors", errors.len()),
    )
    .with_details(errors.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_generated_names_are_ours() {
        assert!(is_host_veth_name("vnet0123456789a", "vnet"));
        assert!(!is_host_veth_name("vnet0123456789A", "vnet"));
        assert!(!is_host_veth_name("vnet0", "vnet"));
        assert!(!is_host_veth_name("vnet-my-bridge1", "vnet"));
        assert!(!is_host_veth_name("eth0123456789ab", "vnet"));
        assert!(is_tombstone_name("vdel0123456789a"));
    }
}
