//! CHECK: verify that what ADD made is still there and that the agent holds the same allocation.
//! Later plugins in a chain may add things (routes, qdiscs, sysctls); only our own pieces are
//! checked.

use netlink_packet_route::neighbour::NeighbourState;
use netlink_packet_route::route::RouteScope;
use vnet_api::{AllocationsResponse, PATH_ALLOCATIONS, POD_GATEWAY, host_veth_name};

use super::add::netlink_socket_error;
use super::{READ_TIMEOUT, agent_error};
use crate::Context;
use crate::cni::prev_result_ips;
use crate::datapath;
use crate::error::{CniError, CniResult, Code};
use crate::netns::{self, Netns};

fn failed(msg: impl Into<String>) -> CniError {
    CniError::new(Code::CheckFailed, msg)
}

fn nl(what: &str) -> impl Fn(rtnetlink::Error) -> CniError + '_ {
    move |e| CniError::netlink(format!("CHECK cannot read {what}"), e)
}

pub async fn run(ctx: &Context) -> CniResult<()> {
    let key = ctx.env.key();
    let ifname = key.ifname.as_str();
    let netns_path = ctx
        .env
        .netns
        .as_deref()
        .expect("CHECK always has CNI_NETNS");
    let host_veth = host_veth_name(&ctx.conf.host_veth_prefix, key);

    let allocations: AllocationsResponse = ctx
        .agent
        .get(PATH_ALLOCATIONS, READ_TIMEOUT)
        .await
        .map_err(agent_error)?;
    let allocation = allocations
        .allocations
        .into_iter()
        .find(|a| a.key == *key)
        .ok_or_else(|| {
            CniError::new(
                Code::UnknownContainer,
                format!("vnet-agent holds no allocation for {key}"),
            )
        })?;
    let ip = allocation.ip;
    if let Some(prev) = &ctx.conf.prev_result {
        let ips = prev_result_ips(prev);
        if !ips.contains(&ip) {
            return Err(failed(format!(
                "prevResult lists {ips:?} but vnet-agent holds {ip} for {key}"
            )));
        }
    }

    let netns = Netns::open(netns_path).map_err(|e| {
        CniError::new(Code::Netns, format!("cannot open {netns_path}")).with_details(e.to_string())
    })?;
    let host = netns::host_netlink().map_err(netlink_socket_error)?;
    let pod = netns.netlink().await.map_err(|e| {
        CniError::new(Code::Netns, format!("cannot enter {netns_path}")).with_details(e.to_string())
    })?;

    let host_link = datapath::link_by_name(&host, &host_veth)
        .await
        .map_err(nl("host links"))?
        .ok_or_else(|| failed(format!("host veth {host_veth} is missing")))?;
    if let crate::datapath::Owner::Foreign(why) = host_link.owner(key) {
        return Err(failed(format!(
            "host veth {host_veth} is not this attachment's ({why})"
        )));
    }
    if !host_link.up {
        return Err(failed(format!("host veth {host_veth} is down")));
    }
    let pod_link = datapath::link_by_name(&pod, ifname)
        .await
        .map_err(nl("pod links"))?
        .ok_or_else(|| failed(format!("{ifname} is missing in {netns_path}")))?;
    if !pod_link.is_veth || pod_link.peer_index != Some(host_link.index) {
        return Err(failed(format!(
            "{ifname} in {netns_path} is not the peer of host veth {host_veth}"
        )));
    }
    if !pod_link.up {
        return Err(failed(format!("{ifname} in {netns_path} is down")));
    }

    let addrs = datapath::addresses(&pod, pod_link.index)
        .await
        .map_err(nl("pod addresses"))?;
    if !addrs.contains(&(ip, 32)) {
        return Err(failed(format!("{ifname} lacks {ip}/32 (has {addrs:?})")));
    }

    let pod_routes = datapath::main_routes(&pod)
        .await
        .map_err(nl("pod routes"))?;
    let has_gateway_route = pod_routes.iter().any(|r| {
        r.dst == POD_GATEWAY
            && r.prefix == 32
            && r.oif == Some(pod_link.index)
            && r.scope == RouteScope::Link
    });
    if !has_gateway_route {
        return Err(failed(format!(
            "pod route {POD_GATEWAY}/32 dev {ifname} scope link is missing"
        )));
    }
    let has_default = pod_routes
        .iter()
        .any(|r| r.prefix == 0 && r.gateway == Some(POD_GATEWAY) && r.oif == Some(pod_link.index));
    if !has_default {
        return Err(failed(format!(
            "pod default route via {POD_GATEWAY} is missing"
        )));
    }

    match datapath::neighbour(&pod, pod_link.index, POD_GATEWAY)
        .await
        .map_err(nl("pod neighbours"))?
    {
        Some((mac, state)) if mac == host_link.mac && state == NeighbourState::Permanent => {}
        other => {
            return Err(failed(format!(
                "pod neighbour {POD_GATEWAY} should be permanent with the host veth's MAC, found {other:?}"
            )));
        }
    }

    let host_routes = datapath::main_routes(&host)
        .await
        .map_err(nl("host routes"))?;
    let has_host_route = host_routes.iter().any(|r| {
        r.dst == ip
            && r.prefix == 32
            && r.oif == Some(host_link.index)
            && r.scope == RouteScope::Link
    });
    if !has_host_route {
        return Err(failed(format!(
            "host route {ip}/32 dev {host_veth} is missing"
        )));
    }
    Ok(())
}
