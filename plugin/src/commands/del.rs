//! DEL: idempotent, and fast without weakening any guarantee.
//!
//! Removing a veth costs the kernel ~22 ms (RCU grace periods), which would dominate DEL. So DEL
//! does not wait for it: it takes the host veth down (which also drops its routes), renames it to
//! its tombstone name (`tombstone_veth_name(host veth)`, `vdel…`, freeing the deterministic name at
//! once so a new ADD for the same pod cannot collide), and hands the tombstone to the agent with
//! the release. The agent deletes the link in the background and keeps the IP out of the pool
//! until the link is gone. If the agent is unreachable, times out or refuses, DEL deletes the veth
//! itself and spools the release to a file the agent processes later: a pod never gets stuck
//! terminating.
//!
//! The tombstone name depends on the host veth name only, so a DEL that runs again after one that
//! died between the rename and the release finds the tombstone and hands it over again; the
//! address is never released while its old link may still exist.
//!
//! When the pod's namespace still exists, its end is taken down and renamed too, so a runtime that
//! re-runs ADD in the same sandbox finds `CNI_IFNAME` free.

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
use crate::netns::{self, Netns};
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

    let (pod_result, host_result) = futures::join!(
        retire_pod_end(ctx, &host_link, &tombstone),
        datapath::down_and_rename(&host, host_link.index, &tombstone),
    );
    if let Err(e) = pod_result {
        // Not fatal: the pod end disappears with the host end or with the namespace.
        log_warn!("pod side cleanup skipped: {e}");
    }
    match host_result {
        Ok(()) => {
            if release(ctx, key, Some(&tombstone)).await {
                log_info!(
                    "released; {tombstone} (was {host_veth}) handed to the agent for deletion"
                );
                return Ok(());
            }
            delete_now(&host, &host_link, &tombstone).await?;
        }
        Err(e) => {
            if is_errno(&e, libc::EEXIST) {
                // The tombstone of an earlier attachment with the same key is still dying (the
                // agent holds that address until it is gone); this veth cannot take its name.
                log_info!("{tombstone} still exists; deleting {host_veth} now");
            } else {
                log_warn!("cannot retire {host_veth} ({e}); deleting it now");
            }
            delete_now(&host, &host_link, &host_veth).await?;
            if release(ctx, key, None).await {
                return Ok(());
            }
        }
    }
    spool(ctx, key)
}

/// No host veth under its deterministic name: a second DEL, an ADD that never got that far, or a
/// DEL that died after the rename. In the last case the tombstone still exists and must go with
/// the release, or the agent would reuse the address while the old link is still there.
async fn del_without_host_veth(
    ctx: &Context,
    host: &Handle,
    host_veth: &str,
    tombstone: &str,
) -> CniResult<()> {
    let key = ctx.env.key();
    let Some(tomb_link) = ours(lookup(host, tombstone).await?, key) else {
        log_debug!("host veth {host_veth} and {tombstone} are gone; releasing only");
        return release_or_spool(ctx, key, None).await;
    };
    // The pod end may still carry CNI_IFNAME if the earlier DEL died before renaming it.
    if let Err(e) = retire_pod_end(ctx, &tomb_link, tombstone).await {
        log_warn!("pod side cleanup skipped: {e}");
    }
    if release(ctx, key, Some(tombstone)).await {
        log_info!("released; leftover {tombstone} (was {host_veth}) handed to the agent");
        return Ok(());
    }
    delete_now(host, &tomb_link, tombstone).await?;
    spool(ctx, key)
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

/// Deletes the link synchronously: the slow path, when the agent cannot take it over.
async fn delete_now(host: &Handle, link: &Link, name: &str) -> CniResult<()> {
    datapath::delete_link(host, link.index)
        .await
        .map_err(|e| CniError::netlink(format!("cannot delete host veth {name}"), e))
}

/// Takes the pod end down and renames it, if the namespace still exists and the interface is the
/// peer of our host veth (anything else with that name is not ours to touch).
async fn retire_pod_end(ctx: &Context, host_link: &Link, tombstone: &str) -> Result<(), String> {
    let Some(path) = ctx.env.netns.as_deref() else {
        return Ok(());
    };
    let netns = match Netns::open(path) {
        Ok(ns) => ns,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot open {path}: {e}")),
    };
    let pod = netns
        .netlink()
        .await
        .map_err(|e| format!("cannot enter {path}: {e}"))?;
    let ifname = ctx.env.key().ifname.as_str();
    let Some(link) = datapath::link_by_name(&pod, ifname)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(());
    };
    if !link.is_veth || link.peer_index != Some(host_link.index) {
        return Err(format!(
            "{ifname} in {path} is not the peer of our host veth; left alone"
        ));
    }
    datapath::down_and_rename(&pod, link.index, tombstone)
        .await
        .map_err(|e| format!("cannot retire {ifname}: {e}"))
}

/// Sends the release; true when the agent accepted it.
async fn release(ctx: &Context, key: &AttachmentKey, dying_veth: Option<&str>) -> bool {
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
            log_debug!("agent released {:?}", resp.released.map(|a| a.ip));
            true
        }
        Err(e) => {
            log_warn!("release not delivered: {e}");
            false
        }
    }
}

/// Releases through the agent, or spools the release when the agent is unreachable, times out or
/// refuses.
pub(crate) async fn release_or_spool(
    ctx: &Context,
    key: &AttachmentKey,
    dying_veth: Option<&str>,
) -> CniResult<()> {
    if release(ctx, key, dying_veth).await {
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
