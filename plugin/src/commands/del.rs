//! DEL: idempotent, and when it returns nothing of the attachment is left in the pod's namespace
//! (the spec: after DEL the attachment is gone), whatever the load.
//!
//! The pod's end of the veth goes only when the veth is deleted (deleting either end deletes the
//! pair), and deleting a veth costs the kernel ~20 ms of RCU grace periods; moving the pod end out
//! costs as much. Concurrent deletions, however, can share the grace periods when they are one
//! netlink call (the agent batches them: 20 veths in ~28 ms). So DEL:
//!
//! 1. takes the host veth down (which drops its routes) and renames it to its tombstone name
//!    (`tombstone_veth_name(host veth)`, `vdel…`): the agent deletes only tombstone names, and a
//!    DEL that runs again after one that died finds it;
//! 2. asks the agent to release the address and delete the tombstone, and waits for the answer:
//!    the agent deletes it together with every other deletion pending at that moment and answers
//!    once the kernel has unlisted both ends (its `RTM_DELLINK`), without waiting for the grace
//!    period after which the kernel frees them, and says so (`dying_veth_deleted`);
//! 3. deletes the link itself when the agent did not (an older agent that deletes in the
//!    background, or a failed deletion): never returns with the link still there.
//!
//! If the agent is unreachable, times out or refuses, DEL deletes the veth itself and spools the
//! release to a file the agent processes later: a pod never gets stuck terminating.
//!
//! A link holding the host veth or tombstone name that is not this attachment's
//! ([`crate::datapath::Owner::Foreign`]) is left alone: DEL then only releases.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use rtnetlink::Handle;
use vnet_api::{
    AttachmentKey, PATH_RELEASE, ReleaseRequest, ReleaseResponse, host_veth_name, spool_file_name,
    tombstone_veth_name,
};

use super::add::netlink_socket_error;
use crate::datapath::{self, Link, Owner, is_errno};
use crate::error::{CniError, CniResult, Code};
use crate::netns;
use crate::{Context, log_debug, log_info, log_warn};

pub async fn run(ctx: &Context) -> CniResult<()> {
    let key = ctx.env.key();
    let host_veth = host_veth_name(&ctx.conf.host_veth_prefix, key);
    let tombstone = tombstone_veth_name(&host_veth);
    let host = netns::host_netlink().map_err(netlink_socket_error)?;
    let host_link = ours(lookup(&host, &host_veth).await?, key);
    let Some(host_link) = host_link else {
        return del_without_host_veth(ctx, &host, &host_veth, &tombstone).await;
    };
    match datapath::down_and_rename(&host, host_link.index, &tombstone).await {
        Ok(()) => hand_over(ctx, &host, &host_link, &tombstone).await,
        Err(e) => {
            if is_errno(&e, libc::EEXIST) {
                // The tombstone of an earlier attachment with the same key is still there (its
                // DEL died, or the agent could not delete it yet); this veth cannot take its name.
                log_info!("{tombstone} still exists; deleting {host_veth} now");
            } else {
                log_warn!("cannot retire {host_veth} ({e}); deleting it now");
            }
            delete_now(&host, &host_link, &host_veth).await?;
            release_or_spool(ctx, key).await
        }
    }
}

/// No host veth (of ours) under its deterministic name: a second DEL, an ADD that never got that
/// far, or a DEL that died after the rename. In the last case the tombstone still exists and must
/// go with the release, or the agent would reuse the address while the old link is still there.
async fn del_without_host_veth(
    ctx: &Context,
    host: &Handle,
    host_veth: &str,
    tombstone: &str,
) -> CniResult<()> {
    let key = ctx.env.key();
    let Some(tomb_link) = ours(lookup(host, tombstone).await?, key) else {
        log_debug!("host veth {host_veth} and {tombstone} are gone; releasing only");
        return release_or_spool(ctx, key).await;
    };
    log_info!("leftover {tombstone} (was {host_veth}) found; handing it over again");
    hand_over(ctx, host, &tomb_link, tombstone).await
}

/// Releases the address with the tombstone for the agent to delete, and makes sure the link is
/// gone before DEL returns: deleted by the agent, or here when it did not.
async fn hand_over(ctx: &Context, host: &Handle, link: &Link, tombstone: &str) -> CniResult<()> {
    let key = ctx.env.key();
    match release(ctx, key, Some(tombstone)).await {
        Some(resp) if resp.dying_veth_deleted => {
            log_info!("released; {tombstone} deleted by the agent");
            Ok(())
        }
        Some(_) => {
            // Released, but the link may still be there: an older agent deletes it in the
            // background, or the agent's deletion failed (it retries, holding the address).
            delete_now(host, link, tombstone).await?;
            log_info!("released; {tombstone} deleted here");
            Ok(())
        }
        None => {
            delete_now(host, link, tombstone).await?;
            spool(ctx, key)
        }
    }
}

/// The link, unless it is not this attachment's: another attachment's veth with the same short
/// hashed name, or not a veth at all. That one is left alone (and logged); this DEL then only
/// releases.
fn ours(link: Option<Link>, key: &AttachmentKey) -> Option<Link> {
    let link = link?;
    match link.owner(key) {
        Owner::This | Owner::Unmarked => Some(link),
        Owner::Foreign(why) => {
            log_warn!(
                "{} is not this attachment's link ({why}); left alone",
                link.name
            );
            None
        }
    }
}

async fn lookup(host: &Handle, name: &str) -> CniResult<Option<Link>> {
    datapath::link_by_name(host, name)
        .await
        .map_err(|e| CniError::netlink(format!("cannot look up host link {name}"), e))
}

/// Deletes the link synchronously (both ends), when the agent has not.
async fn delete_now(host: &Handle, link: &Link, name: &str) -> CniResult<()> {
    datapath::delete_link(host, link.index)
        .await
        .map_err(|e| CniError::netlink(format!("cannot delete host veth {name}"), e))
}

/// Sends the release; the agent's answer when it accepted it.
async fn release(
    ctx: &Context,
    key: &AttachmentKey,
    dying_veth: Option<&str>,
) -> Option<ReleaseResponse> {
    let request = ReleaseRequest {
        key: key.clone(),
        dying_veth: dying_veth.map(str::to_owned),
    };
    let timeout = Duration::from_millis(ctx.conf.del_timeout_ms);
    match ctx
        .agent
        .post::<_, ReleaseResponse>(PATH_RELEASE, &request, timeout)
        .await
    {
        Ok(resp) => {
            log_debug!("agent released {:?}", resp.released.as_ref().map(|a| a.ip));
            Some(resp)
        }
        Err(e) => {
            log_warn!("release not delivered: {e}");
            None
        }
    }
}

/// Releases through the agent (no link left to hand over), or spools the release when the agent
/// is unreachable, times out or refuses.
pub(crate) async fn release_or_spool(ctx: &Context, key: &AttachmentKey) -> CniResult<()> {
    if release(ctx, key, None).await.is_some() {
        Ok(())
    } else {
        spool(ctx, key)
    }
}

/// Writes the release (without a dying veth: the link is already gone) to
/// `<spoolDir>/<vnet_api::spool_file_name>` (`<container>:<ifname>.json`, hashed for IDs too long
/// for a file name), durably: temp file, fsync, rename, fsync directory.
fn spool(ctx: &Context, key: &AttachmentKey) -> CniResult<()> {
    let dir = Path::new(&ctx.conf.spool_dir);
    let io = |what: &str, e: std::io::Error| {
        CniError::new(
            Code::Io,
            format!("cannot spool the release of {key}: {what}"),
        )
        .with_details(e.to_string())
    };
    std::fs::create_dir_all(dir).map_err(|e| io("create spool dir", e))?;
    let name = spool_file_name(key);
    // Not derived from `name`, which may already be as long as a file name can be; one DEL per
    // process, so the pid keeps concurrent DELs apart.
    let tmp = dir.join(format!(".release.{}.tmp", std::process::id()));
    let body = serde_json::to_vec(&ReleaseRequest {
        key: key.clone(),
        dying_veth: None,
    })
    .expect("a release request always serialises");
    let mut file = std::fs::File::create(&tmp).map_err(|e| io("create", e))?;
    file.write_all(&body).map_err(|e| io("write", e))?;
    file.sync_all().map_err(|e| io("fsync", e))?;
    drop(file);
    std::fs::rename(&tmp, dir.join(&name)).map_err(|e| io("rename", e))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    log_warn!(
        "release of {key} not delivered (vnet-agent unreachable, timed out or refused); spooled to {}",
        dir.join(&name).display()
    );
    Ok(())
}
