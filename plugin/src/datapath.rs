//! Netlink operations of the routed veth data path. Each takes the handle of the namespace it
//! works in (see `netns`); kernel errnos are kept so callers can match EEXIST / ENOENT.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};
use sha2::{Digest, Sha256};

pub type NlResult<T> = Result<T, rtnetlink::Error>;

/// The kernel's errno of a failed request (positive, e.g. `libc::EEXIST`), if it was one.
pub fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

pub fn is_errno(err: &rtnetlink::Error, code: i32) -> bool {
    errno(err) == Some(code)
}

/// A stable, locally administered unicast MAC for one end of a pod's veth. Chosen by us rather
/// than the kernel so ADD needs no extra query to learn it.
pub fn derive_mac(host_veth: &str, side: &str) -> [u8; 6] {
    let digest = Sha256::new()
        .chain_update(side.as_bytes())
        .chain_update(b"/")
        .chain_update(host_veth.as_bytes())
        .finalize();
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&digest[..6]);
    mac[0] = (mac[0] & 0xfc) | 0x02;
    mac
}

#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Vec<u8>,
    pub mtu: u32,
    pub up: bool,
    /// For a veth: the peer's index (in the peer's namespace).
    pub peer_index: Option<u32>,
    pub is_veth: bool,
    /// `IFLA_IFALIAS`: on host veths, vnet-cni's mark ([`vnet_api::link_alias`]).
    pub alias: Option<String>,
}

/// Whose a link holding a host veth (or tombstone) name is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// A veth carrying this attachment's mark.
    This,
    /// A veth without any alias: made by a plugin from before the mark, treated as this
    /// attachment's as it always was (the name is derived from the key).
    Unmarked,
    /// Anything else: another attachment's veth (a hash collision of the short name), or a link
    /// vnet-cni did not make. Never touched.
    Foreign(String),
}

impl Link {
    pub fn owner(&self, key: &vnet_api::AttachmentKey) -> Owner {
        if !self.is_veth {
            return Owner::Foreign(format!("{} is not a veth", self.name));
        }
        match self.alias.as_deref() {
            None | Some("") => Owner::Unmarked,
            Some(a) if a == vnet_api::link_alias(key) => Owner::This,
            Some(a) => Owner::Foreign(format!("{} carries alias {a:?}", self.name)),
        }
    }
}

impl Link {
    fn from_message(msg: LinkMessage) -> Link {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mac: Vec::new(),
            mtu: 0,
            up: msg.header.flags.contains(LinkFlags::Up),
            peer_index: None,
            is_veth: false,
            alias: None,
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n,
                LinkAttribute::Address(a) => link.mac = a,
                LinkAttribute::Mtu(m) => link.mtu = m,
                LinkAttribute::Link(p) => link.peer_index = Some(p),
                LinkAttribute::IfAlias(a) => link.alias = Some(a),
                LinkAttribute::LinkInfo(infos) => {
                    link.is_veth = infos.iter().any(|i| {
                        matches!(
                            i,
                            netlink_packet_route::link::LinkInfo::Kind(
                                netlink_packet_route::link::InfoKind::Veth
                            )
                        )
                    })
                }
                _ => {}
            }
        }
        link
    }
}

/// The link named `name`, or `None` when there is none.
pub async fn link_by_name(handle: &Handle, name: &str) -> NlResult<Option<Link>> {
    let mut links = handle.link().get().match_name(name).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(Some(Link::from_message(msg))),
        Ok(None) => Ok(None),
        Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// All links in the namespace.
pub async fn links(handle: &Handle) -> NlResult<Vec<Link>> {
    handle
        .link()
        .get()
        .execute()
        .map_ok(Link::from_message)
        .try_collect()
        .await
}

pub struct VethSpec<'a> {
    pub host_name: &'a str,
    pub host_mac: [u8; 6],
    pub pod_name: &'a str,
    pub pod_mac: [u8; 6],
    pub mtu: u32,
    /// The pod's namespace: the peer is created there directly, never visible on the host.
    pub pod_netns_fd: std::os::fd::RawFd,
}

/// Creates the veth pair in one request, the host end up. The pod end must be set up separately:
/// asking for it in the same request fails with ENOTCONN when the peer goes to another namespace.
pub async fn create_veth(handle: &Handle, spec: &VethSpec<'_>) -> NlResult<()> {
    let peer = LinkUnspec::new_with_name(spec.pod_name)
        .mtu(spec.mtu)
        .address(spec.pod_mac.to_vec())
        .setns_by_fd(spec.pod_netns_fd)
        .build();
    let msg = LinkVeth::new(spec.host_name, spec.pod_name)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .mtu(spec.mtu)
        .address(spec.host_mac.to_vec())
        .up()
        .build();
    handle.link().add(msg).execute().await
}

pub async fn delete_link(handle: &Handle, index: u32) -> NlResult<()> {
    match handle.link().del(index).execute().await {
        Err(e) if is_errno(&e, libc::ENODEV) => Ok(()),
        other => other,
    }
}

/// Sets the interface alias (the kernel ignores one in the request that creates the link).
pub async fn set_alias(handle: &Handle, index: u32, alias: &str) -> NlResult<()> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).alias(alias).build())
        .execute()
        .await
}

pub async fn set_link_up(handle: &Handle, index: u32) -> NlResult<()> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
}

/// Takes a link down, then renames it (older kernels refuse to rename an up link with EBUSY, and
/// down also stops traffic and drops the link's routes).
pub async fn down_and_rename(handle: &Handle, index: u32, new_name: &str) -> NlResult<()> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).down().build())
        .execute()
        .await?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).name(new_name).build())
        .execute()
        .await
}

pub async fn add_address(handle: &Handle, index: u32, ip: Ipv4Addr) -> NlResult<()> {
    handle
        .address()
        .add(index, IpAddr::V4(ip), 32)
        .execute()
        .await
}

/// `dst/32 dev <index> scope link`
pub async fn add_link_route(handle: &Handle, index: u32, dst: Ipv4Addr) -> NlResult<()> {
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst, 32)
        .output_interface(index)
        .scope(RouteScope::Link)
        .build();
    handle.route().add(route).execute().await
}

/// `default via <gw> dev <index>`
pub async fn add_default_route(handle: &Handle, index: u32, gateway: Ipv4Addr) -> NlResult<()> {
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .output_interface(index)
        .gateway(gateway)
        .build();
    handle.route().add(route).execute().await
}

pub async fn add_permanent_neighbour(
    handle: &Handle,
    index: u32,
    ip: Ipv4Addr,
    mac: &[u8],
) -> NlResult<()> {
    handle
        .neighbours()
        .add(index, IpAddr::V4(ip))
        .state(NeighbourState::Permanent)
        .link_layer_address(mac)
        .replace()
        .execute()
        .await
}

/// The IPv4 addresses on a link, with prefix length.
pub async fn addresses(handle: &Handle, index: u32) -> NlResult<Vec<(Ipv4Addr, u8)>> {
    let msgs: Vec<AddressMessage> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await?;
    Ok(msgs
        .into_iter()
        .filter(|m| m.header.family == AddressFamily::Inet && m.header.index == index)
        .filter_map(|m| {
            let prefix = m.header.prefix_len;
            m.attributes.into_iter().find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V4(ip)) => Some((ip, prefix)),
                _ => None,
            })
        })
        .collect())
}

/// One IPv4 route of the main table, reduced to what we check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub scope: RouteScope,
}

pub async fn main_routes(handle: &Handle) -> NlResult<Vec<Route>> {
    let msgs: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await?;
    Ok(msgs
        .into_iter()
        .filter(|m| {
            let table = m
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(u32::from(m.header.table));
            table == u32::from(libc::RT_TABLE_MAIN)
        })
        .map(|m| {
            let mut route = Route {
                dst: Ipv4Addr::UNSPECIFIED,
                prefix: m.header.destination_prefix_length,
                gateway: None,
                oif: None,
                scope: m.header.scope,
            };
            for a in m.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => route.dst = ip,
                    RouteAttribute::Gateway(RouteAddress::Inet(ip)) => route.gateway = Some(ip),
                    RouteAttribute::Oif(i) => route.oif = Some(i),
                    _ => {}
                }
            }
            route
        })
        .collect())
}

/// The link-layer address and state of the IPv4 neighbour `ip` on link `index`.
pub async fn neighbour(
    handle: &Handle,
    index: u32,
    ip: Ipv4Addr,
) -> NlResult<Option<(Vec<u8>, NeighbourState)>> {
    let msgs: Vec<NeighbourMessage> = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet)
        .execute()
        .try_collect()
        .await?;
    Ok(msgs
        .into_iter()
        .filter(|m| m.header.ifindex == index)
        .find_map(|m| {
            let dst = m.attributes.iter().any(
                |a| matches!(a, NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) if *d == ip),
            );
            if !dst {
                return None;
            }
            let lladdr = m.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(l) => Some(l.clone()),
                _ => None,
            })?;
            Some((lladdr, m.header.state))
        }))
}

/// Writes a sysctl of a link in the caller's namespace; a missing file (no IPv6) is fine.
pub fn disable_accept_ra(ifname: &str) -> std::io::Result<()> {
    let path = format!("/proc/sys/net/ipv6/conf/{ifname}/accept_ra");
    match std::fs::write(&path, b"0") {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_macs_are_local_unicast_and_distinct() {
        let host = derive_mac("vnet0123456789a", "host");
        let pod = derive_mac("vnet0123456789a", "pod");
        assert_ne!(host, pod);
        for mac in [host, pod] {
            assert_eq!(mac[0] & 0x01, 0, "unicast");
            assert_eq!(mac[0] & 0x02, 0x02, "locally administered");
        }
        assert_eq!(host, derive_mac("vnet0123456789a", "host"));
    }
}
