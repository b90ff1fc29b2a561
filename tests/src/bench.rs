//! `vnetctl lab bench` (see [`run`]).

use std::path::PathBuf;

use crate::lab::{LabConfig, LabError};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub pods: usize,
    pub concurrency: usize,
    pub burst: usize,
    pub write_latency_ms: u64,
    pub iperf_secs: u64,
    pub out: PathBuf,
}

pub fn run(_cfg: &LabConfig, _opts: &BenchOptions) -> Result<(), LabError> {
    Err(LabError::Failed("bench: not yet".into()))
}
