//! GC: remove host veths with our prefix that no valid attachment maps to, and leftover
//! tombstones, THEN forward the valid attachments to the agent (it releases every other
//! allocation). Links go first so an address is never freed while its old veth and `/32` host
//! route still exist; a stale veth that cannot be deleted keeps its allocation (found through the
//! agent's allocation list) until a later GC or DEL removes it. Keeps going on errors and reports
//! them all at the end.

use std::collections::HashSet;

use vnet_api::{
    Allocation, AllocationsResponse, AttachmentKey, GcRequest, GcResponse, PATH_ALLOCATIONS,
    PATH_GC, host_veth_name, is_tombstone_name,
};

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
    let (mut keys, mut errors) = gc_keys(list);
    let prefix = ctx.conf.host_veth_prefix.as_str();
    let keep: HashSet<String> = keys.iter().map(|k| host_veth_name(prefix, k)).collect();

    let host = netns::host_netlink().map_err(netlink_socket_error)?;
    let mut undeleted = HashSet::new();
    match datapath::links(&host).await {
        Ok(links) => {
            for link in links.iter().filter(|l| l.is_veth) {
                let stale = is_host_veth_name(&link.name, prefix) && !keep.contains(&link.name);
                if !(stale || is_tombstone_name(&link.name)) {
                    continue;
                }
                match datapath::delete_link(&host, link.index).await {
                    Ok(()) => log_info!("removed stale veth {}", link.name),
                    Err(e) => {
                        errors.push(format!("cannot remove {}: {e}", link.name));
                        if stale {
                            undeleted.insert(link.name.clone());
                        }
                    }
                }
            }
        }
        Err(e) => {
            // Unchecked links may be stale ones still routing their address: release nothing.
            errors.push(format!(
                "cannot list host links: {e}; agent not asked to release anything"
            ));
            return finish(errors);
        }
    }

    if !undeleted.is_empty() {
        match ctx
            .agent
            .get::<AllocationsResponse>(PATH_ALLOCATIONS, READ_TIMEOUT)
            .await
        {
            Ok(resp) => keys.extend(keys_of_veths(&resp.allocations, prefix, &undeleted)),
            Err(e) => {
                // Without the mapping, any release could free the address of a veth still there.
                errors.push(format!(
                    "agent not asked to release anything: {} stale veths remain and the allocations cannot be read: {}",
                    undeleted.len(),
                    agent_error(e)
                ));
                return finish(errors);
            }
        }
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

    finish(errors)
}

/// The attachments whose host veth (named with this config's prefix) is one of `veths`: they stay
/// valid while the veth exists.
fn keys_of_veths(
    allocations: &[Allocation],
    prefix: &str,
    veths: &HashSet<String>,
) -> Vec<AttachmentKey> {
    allocations
        .iter()
        .filter(|a| veths.contains(&host_veth_name(prefix, &a.key)))
        .map(|a| a.key.clone())
        .collect()
}

fn finish(errors: Vec<String>) -> CniResult<()> {
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

    #[test]
    fn a_veth_that_could_not_be_deleted_keeps_its_allocation() {
        let allocation = |id: &str| {
            let key: AttachmentKey = format!("{id}/eth0").parse().unwrap();
            Allocation {
                ip: "10.0.0.1".parse().unwrap(),
                network: None,
                host_veth: host_veth_name("vnet", &key),
                key,
                pod: Default::default(),
                allocated_at: 0,
            }
        };
        let all = [allocation("a"), allocation("b")];
        let stuck: HashSet<String> = [all[1].host_veth.clone()].into();
        assert_eq!(
            keys_of_veths(&all, "vnet", &stuck),
            vec![all[1].key.clone()]
        );
        assert!(keys_of_veths(&all, "vnet", &HashSet::new()).is_empty());
    }
}
