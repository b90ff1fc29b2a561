//! GC of one network: remove the host veths of this network's stale allocations and leftover
//! tombstones, THEN ask the agent to release this network's allocations that are not valid.
//! Links go first so an address is never freed while its old veth and `/32` host route still
//! exist; a stale veth that cannot be deleted keeps its allocation (it is sent as valid) until a
//! later GC or DEL removes it. Keeps going on errors and reports them all at the end.
//!
//! Scope (CNI 1.1 GC is per network): a veth is stale only when it belongs to an allocation the
//! agent recorded for this network (the config's `name`), older than [`GC_MIN_AGE_SECS`] (a
//! younger one may be an ADD the runtime's list could not include). A link that merely has our
//! name shape but no such allocation may be another network's, and is left alone.

use std::collections::HashSet;
use std::time::{SystemTime, UNIX_EPOCH};

use vnet_api::{
    AllocationsResponse, GC_MIN_AGE_SECS, GcRequest, GcResponse, PATH_ALLOCATIONS, PATH_GC,
    host_veth_name, is_tombstone_name,
};

use super::add::netlink_socket_error;
use super::{READ_TIMEOUT, agent_error};
use crate::cni::gc_keys;
use crate::datapath::{self, Owner};
use crate::error::{CniError, CniResult, Code};
use crate::netns;
use crate::{Context, log_info, log_warn};

pub async fn run(ctx: &Context) -> CniResult<()> {
    let Some(list) = ctx.conf.valid_attachments.as_deref() else {
        return Err(CniError::config(
            "GC needs cni.dev/valid-attachments (or cni.dev/attachments) in the config",
        ));
    };
    let (mut keys, mut errors) = gc_keys(list);
    let prefix = ctx.conf.host_veth_prefix.as_str();
    let network = ctx.conf.name.as_str();
    let valid: HashSet<_> = keys.iter().cloned().collect();
    let allocated_before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .saturating_sub(GC_MIN_AGE_SECS);

    let host = netns::host_netlink().map_err(netlink_socket_error)?;
    let links = match datapath::links(&host).await {
        Ok(links) => links,
        Err(e) => {
            // Unchecked links may be stale ones still routing their address: release nothing.
            errors.push(format!(
                "cannot list host links: {e}; agent not asked to release anything"
            ));
            return finish(errors);
        }
    };
    // The allocations this GC may release, by host veth name.
    let stale = match ctx
        .agent
        .get::<AllocationsResponse>(PATH_ALLOCATIONS, READ_TIMEOUT)
        .await
    {
        Ok(resp) => Some(
            resp.allocations
                .into_iter()
                .filter(|a| {
                    a.network.as_deref() == Some(network)
                        && a.allocated_at < allocated_before
                        && !valid.contains(&a.key)
                })
                .map(|a| (host_veth_name(prefix, &a.key), a.key))
                .collect::<std::collections::HashMap<_, _>>(),
        ),
        Err(e) => {
            // Without the agent's list no veth is known to be this network's.
            errors.push(format!(
                "agent not asked to release anything: the allocations cannot be read: {}",
                agent_error(e)
            ));
            None
        }
    };
    for link in links.iter().filter(|l| l.is_veth) {
        let key = stale.as_ref().and_then(|s| s.get(&link.name));
        if key.is_none() && !is_tombstone_name(&link.name) {
            continue;
        }
        if let Some(Owner::Foreign(why)) = key.map(|k| link.owner(k)) {
            // The name is this stale attachment's, the link is not (a short-hash collision, or
            // not ours at all): never delete it; the stale allocation is still released.
            log_info!("left {} alone: {why}", link.name);
            continue;
        }
        match datapath::delete_link(&host, link.index).await {
            Ok(()) => log_info!("removed stale veth {}", link.name),
            Err(e) => {
                errors.push(format!("cannot remove {}: {e}", link.name));
                // Its address stays allocated while the veth may still route it.
                keys.extend(key.cloned());
            }
        }
    }
    if stale.is_none() {
        return finish(errors);
    }

    match ctx
        .agent
        .post::<_, GcResponse>(
            PATH_GC,
            &GcRequest {
                valid_attachments: keys,
                network: Some(network.to_owned()),
                allocated_before: Some(allocated_before),
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
