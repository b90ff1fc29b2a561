//! The lab's state file: everything a lab made (namespaces, processes, files), written before or
//! right after it is made, so `vnetctl lab down` can undo a lab whose creator crashed or was
//! killed. Written to a temporary file and renamed, so it is always whole; updates take an
//! exclusive `flock` so two `vnetctl` processes (or threads) never lose each other's changes.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "lock";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a lab state file: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub name: String,
    /// Prefix of every namespace and link name this lab makes, e.g. `vl3f2a`.
    pub token: String,
    pub dir: PathBuf,
    pub subnet: String,
    pub gateway: Ipv4Addr,
    pub mock_addr: SocketAddr,
    /// CNI network name of the vnet-cni conflist (also names libcni's cache files).
    pub network: String,
    /// Other CNI network names used by this lab (the bench's reference plugins).
    #[serde(default)]
    pub other_networks: Vec<String>,
    pub cni_path: String,
    pub cnitool: PathBuf,
    pub bin_dir: PathBuf,
    pub router_ns: String,
    pub nodes: Vec<NodeState>,
    pub vm: HostState,
    pub internet: HostState,
    /// Every namespace this lab created or is about to create (pods are listed in `pods`).
    pub namespaces: Vec<String>,
    pub processes: Vec<ProcState>,
    pub pods: Vec<PodState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub conf_dir: PathBuf,
    pub config_path: PathBuf,
    pub agent_log: PathBuf,
    /// What the mock cloud makes this node: a plain VM or a scale-set member.
    #[serde(default)]
    pub kind: NodeKind,
}

/// The Azure machine a lab node is (`vnetctl lab up --node-kind`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    /// A standalone VM with a standalone NIC.
    #[default]
    Vm,
    /// An instance of a Uniform scale set (an AKS node): its NIC is written through Compute.
    Uniform,
    /// A member of a Flexible scale set: a VM with a standalone NIC.
    Flexible,
}

impl NodeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeKind::Vm => "vm",
            NodeKind::Uniform => "uniform",
            NodeKind::Flexible => "flexible",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostState {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcState {
    /// `mock` or `agent:<node>`.
    pub role: String,
    pub pid: i32,
    /// Start time from /proc/<pid>/stat, so a recycled pid is never signalled.
    pub start_time: u64,
    pub log: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodState {
    pub node: String,
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    pub host_veth: String,
}

impl LabState {
    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn process(&self, role: &str) -> Option<&ProcState> {
        self.processes.iter().find(|p| p.role == role)
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

pub fn state_path(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

pub fn load(dir: &Path) -> Result<LabState, StateError> {
    let path = state_path(dir);
    let text = fs::read_to_string(&path).map_err(io_err(&path))?;
    serde_json::from_str(&text).map_err(|source| StateError::Parse { path, source })
}

pub fn save(state: &LabState) -> Result<(), StateError> {
    let path = state_path(&state.dir);
    let tmp = state
        .dir
        .join(format!("{STATE_FILE}.tmp.{}", std::process::id()));
    let text = serde_json::to_string_pretty(state).expect("lab state serializes");
    fs::write(&tmp, text).map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))
}

/// Holds the lab's lock file locked until dropped.
struct Lock(File);

impl Lock {
    fn take(dir: &Path) -> Result<Lock, StateError> {
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        // SAFETY: flock(2) on an fd we own; blocking until the lock is ours.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io_err(&path)(io::Error::last_os_error()));
        }
        Ok(Lock(file))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: unlocking the fd we locked; closing it would unlock as well.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Re-reads the state under the lock, applies `change`, writes it back, returns the new state.
pub fn update(dir: &Path, change: impl FnOnce(&mut LabState)) -> Result<LabState, StateError> {
    let _lock = Lock::take(dir)?;
    let mut state = load(dir)?;
    change(&mut state);
    save(&state)?;
    Ok(state)
}
