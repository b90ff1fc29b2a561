//! Shared set-up of this crate's tests: the fake API server (crate `vnet-fakeapi`, requests
//! authorized as the agent's ServiceAccount by default) and the rendered manifests.

#![allow(dead_code, unused_imports)]

pub mod manifests;

pub use vnet_fakeapi::*;
