//! ADD: allocate an address from the agent, create the veth pair with its pod end directly in the
//! pod's namespace, address and route both sides, print the result. Any failure after the
//! allocation undoes what it can before the error is returned: the veth is removed, then the
//! address released (if the veth cannot be removed, the address is left to the runtime's DEL).

use rtnetlink::Handle;
use serde_json::Value;
use vnet_api::{AllocateRequest, AllocateResponse, AttachmentKey, PATH_ALLOCATE, host_veth_name};

use super::{ALLOCATE_TIMEOUT, agent_error};
use crate::cni::{AddResult, Interface};
use crate::datapath::{self, Owner, VethSpec, is_errno};
use crate::error::{CniError, CniResult, Code};
use crate::netns::{self, Netns};
use crate::{Context, log_debug, log_info, log_warn};

pub async fn run(ctx: &Context) -> CniResult<Value> {
    let key = ctx.env.key();
    let netns_path = ctx
        .env
        .netns
        .as_deref()
        .expect("ADD always has CNI_NETNS after validation");
    let netns = Netns::open(netns_path).map_err(|e| {
        CniError::new(
            Code::Netns,
            format!("cannot open the pod's network namespace {netns_path}"),
        )
        .with_details(e.to_string())
    })?;
    let host = netns::host_netlink().map_err(netlink_socket_error)?;
    let pod = netns.netlink().await.map_err(|e| {
        CniError::new(
            Code::Netns,
            format!("cannot enter the pod's network namespace {netns_path}"),
        )
        .with_details(e.to_string())
    })?;

    // Checked before allocating: if this is a repeated ADD of a live attachment, releasing "our"
    // address on the way out would take it from the running pod.
    if datapath::link_by_name(&pod, key.ifname.as_str())
        .await
        .map_err(|e| CniError::netlink("cannot list the pod's interfaces", e))?
        .is_some()
    {
        return Err(interface_exists(key, netns_path));
    }

    let request = AllocateRequest {
        key: key.clone(),
        network: Some(ctx.conf.name.clone()),
        netns: Some(netns_path.to_owned()),
        pod: ctx.env.args.pod.clone(),
    };
    let allocated: AllocateResponse = ctx
        .agent
        .post(PATH_ALLOCATE, &request, ALLOCATE_TIMEOUT)
        .await
        .map_err(agent_error)?;
    log_debug!("allocated {}", allocated.allocation.ip);

    let host_veth = host_veth_name(&ctx.conf.host_veth_prefix, key);
    match wire(ctx, &netns, &host, &pod, &host_veth, &allocated).await {
        Ok(result) => {
            log_info!(
                "wired {} on {} (host {host_veth})",
                allocated.allocation.ip,
                key.ifname
            );
            Ok(result.render(ctx.conf.cni_version))
        }
        Err(err) => {
            undo(ctx, &host, &host_veth, key).await;
            Err(err)
        }
    }
}

async fn wire(
    ctx: &Context,
    netns: &Netns,
    host: &Handle,
    pod: &Handle,
    host_veth: &str,
    allocated: &AllocateResponse,
) -> CniResult<AddResult> {
    let key = ctx.env.key();
    let ifname = key.ifname.as_str();
    let ip = allocated.allocation.ip;
    let gateway = allocated.gateway;
    let mtu = ctx.conf.mtu.unwrap_or(allocated.mtu);
    let spec = VethSpec {
        host_name: host_veth,
        host_mac: datapath::derive_mac(host_veth, "host"),
        pod_name: ifname,
        pod_mac: datapath::derive_mac(host_veth, "pod"),
        mtu,
        pod_netns_fd: netns.raw_fd(),
    };
    if let Err(e) = datapath::create_veth(host, &spec).await {
        if !is_errno(&e, libc::EEXIST) {
            return Err(CniError::netlink("cannot create the veth pair", e));
        }
        // Either the pod end appeared since we looked (a concurrent ADD) or a stale host veth of
        // an earlier attempt holds the deterministic name; only the latter is ours to remove.
        let stale = datapath::link_by_name(host, host_veth)
            .await
            .map_err(|e| CniError::netlink("cannot look up the host veth", e))?;
        let Some(stale) = stale else {
            return Err(interface_exists(key, netns.path()));
        };
        if let Owner::Foreign(why) = stale.owner(key) {
            return Err(name_taken(host_veth, &why));
        }
        log_warn!(
            "removing stale host veth {host_veth} (index {}) of an earlier attempt",
            stale.index
        );
        datapath::delete_link(host, stale.index)
            .await
            .map_err(|e| {
                CniError::netlink(format!("cannot remove stale host veth {host_veth}"), e)
            })?;
        datapath::create_veth(host, &spec).await.map_err(|e| {
            if is_errno(&e, libc::EEXIST) {
                interface_exists(key, netns.path())
            } else {
                CniError::netlink("cannot create the veth pair", e)
            }
        })?;
    }

    let host_side = async {
        let link = datapath::link_by_name(host, host_veth)
            .await
            .map_err(|e| CniError::netlink("cannot look up the new host veth", e))?
            .ok_or_else(|| {
                CniError::new(Code::Netlink, format!("host veth {host_veth} vanished"))
            })?;
        // The mark that lets ADD, DEL and CHECK tell this attachment's veth from another
        // attachment's that happens to have the same short hashed name.
        datapath::set_alias(host, link.index, &vnet_api::link_alias(key))
            .await
            .map_err(|e| CniError::netlink(format!("cannot mark {host_veth} with its alias"), e))?;
        datapath::disable_accept_ra(host_veth).map_err(|e| {
            CniError::new(Code::Io, format!("cannot set accept_ra=0 on {host_veth}"))
                .with_details(e.to_string())
        })?;
        datapath::add_link_route(host, link.index, ip)
            .await
            .map_err(|e| {
                CniError::netlink(format!("cannot add host route {ip}/32 dev {host_veth}"), e)
            })?;
        Ok::<_, CniError>(link)
    };
    let pod_side = async {
        let link = datapath::link_by_name(pod, ifname)
            .await
            .map_err(|e| CniError::netlink("cannot look up the pod interface", e))?
            .ok_or_else(|| {
                CniError::new(Code::Netlink, format!("pod interface {ifname} vanished"))
            })?;
        if !link.up {
            datapath::set_link_up(pod, link.index)
                .await
                .map_err(|e| CniError::netlink(format!("cannot set {ifname} up"), e))?;
        }
        datapath::add_address(pod, link.index, ip)
            .await
            .map_err(|e| CniError::netlink(format!("cannot add {ip}/32 to {ifname}"), e))?;
        datapath::add_permanent_neighbour(pod, link.index, gateway, &spec.host_mac)
            .await
            .map_err(|e| {
                CniError::netlink(format!("cannot add the neighbour entry for {gateway}"), e)
            })?;
        datapath::add_link_route(pod, link.index, gateway)
            .await
            .map_err(|e| {
                CniError::netlink(format!("cannot add route {gateway}/32 dev {ifname}"), e)
            })?;
        datapath::add_default_route(pod, link.index, gateway)
            .await
            .map_err(|e| CniError::netlink(format!("cannot add default route via {gateway}"), e))?;
        Ok::<_, CniError>(link)
    };
    let (host_link, pod_link) = futures::try_join!(host_side, pod_side)?;
    Ok(AddResult {
        host: Interface {
            name: host_veth.to_owned(),
            mac: spec.host_mac,
            mtu: host_link.mtu,
            sandbox: None,
        },
        pod: Interface {
            name: ifname.to_owned(),
            mac: spec.pod_mac,
            mtu: pod_link.mtu,
            sandbox: Some(netns.path().to_owned()),
        },
        ip,
        gateway,
    })
}

/// Best effort: a failure here is logged, the original error is what the runtime needs to see.
/// The address is released only once the veth is known to be gone: while it may still exist (with
/// its `/32` host route), the address must not go back to the pool. The runtime follows a failed
/// ADD with a DEL, which retires the veth and releases then.
async fn undo(ctx: &Context, host: &Handle, host_veth: &str, key: &AttachmentKey) {
    let veth_gone = match datapath::link_by_name(host, host_veth).await {
        // Another attachment's link holds the name: this ADD made no veth of its own.
        Ok(Some(link)) if matches!(link.owner(key), Owner::Foreign(_)) => true,
        Ok(Some(link)) => match datapath::delete_link(host, link.index).await {
            Ok(()) => true,
            Err(e) => {
                log_warn!(
                    "undo: cannot delete {host_veth} ({e}); the address stays allocated until DEL"
                );
                false
            }
        },
        Ok(None) => true,
        Err(e) => {
            log_warn!(
                "undo: cannot look up {host_veth} ({e}); the address stays allocated until DEL"
            );
            false
        }
    };
    if veth_gone && let Err(e) = super::del::release_or_spool(ctx, key).await {
        log_warn!("undo: {e}");
    }
}

fn interface_exists(key: &AttachmentKey, netns: &str) -> CniError {
    CniError::new(
        Code::InterfaceExists,
        format!(
            "interface {} already exists in the pod's network namespace {netns}; pick another CNI_IFNAME or delete the attachment first",
            key.ifname
        ),
    )
}

/// A link that is not this attachment's holds its deterministic host veth name.
pub(crate) fn name_taken(host_veth: &str, why: &str) -> CniError {
    CniError::new(
        Code::NameTaken,
        format!(
            "host veth name {host_veth} is held by a link that is not this attachment's ({why}); left alone. Delete that pod first, or pick another hostVethPrefix"
        ),
    )
}

pub(crate) fn netlink_socket_error(e: std::io::Error) -> CniError {
    CniError::new(Code::Io, "cannot open a netlink socket").with_details(e.to_string())
}
