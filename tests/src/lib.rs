//! The vnet-cni lab: a whole simulated VNet (router with the mock cloud, nodes with their agents,
//! a plain VM, an "internet") built from network namespaces on one machine, plus the demo, the
//! benchmark and the helpers the end-to-end tests use.

pub mod exec;
pub mod http;
pub mod lab;
pub mod netns;
pub mod probe;
pub mod state;

pub use lab::{Lab, LabConfig, LabError, LabGuard, PoolConfig};
pub mod bench;
pub mod demo;
pub mod report;
pub mod verify;
