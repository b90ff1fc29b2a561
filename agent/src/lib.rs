//! vnet-agent: the node daemon of vnet-cni.
//!
//! It keeps a warm pool of VNet addresses on the node's NIC, hands them to pods through a
//! Unix-socket API ([`api`]), and never gives one address to two pods: every allocation and release
//! is durable ([`store`]) before it is acknowledged, and start-up reconciles the store with the
//! cloud without ever dropping a live allocation ([`ipam`], [`daemon`]).
//!
//! Layout: pure decisions ([`pool`], [`ipam`]) are separate from effects (the [`store`], the
//! cloud behind `vnet_cloud::CloudProvider`, the kernel in [`netlink`] and [`masq`]), so most logic
//! is tested without root or a network; [`agent`] ties them together.

pub mod agent;
pub mod api;
pub mod client;
pub mod config;
pub mod daemon;
pub mod ipam;
pub mod kubernetes;
pub mod logging;
pub mod masq;
pub mod metrics;
pub mod netlink;
pub mod pool;
pub mod provider;
pub mod spool;
pub mod store;
