//! The lab: a simulated VNet on one machine.
//!
//! ```text
//!            internet ns (203.0.113.10)
//!                  |
//!   vpc router ns: gateway 10.240.0.1 on lo, ip_forward, proxy ARP on every port,
//!                  vnet-mockcloud --fabric-routes (adds <pod ip>/32 via <node ip>)
//!        |            |            |             |
//!     node-1       node-2       node-3         vm-1        (eth0 = primary IP /16, default via .1)
//!   vnet-agent   vnet-agent   vnet-agent     (plain VM)
//!    pods...       pods...      pods...
//! ```
//!
//! Like Azure's fabric, the router answers ARP for every address it can route (proxy ARP), so a
//! node sees the whole subnet on-link while traffic really goes through the router, which learns
//! where each pod IP lives from the mock cloud's fabric routes. Every name starts with the lab's
//! token; everything made is in the state file (see [`crate::state`]).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;
use vnet_api::{AllocationsResponse, HealthResponse, StatusResponse};

use crate::exec::{self, ExecError, enter_netns, ip, ip_batch};
use crate::http::{self, HttpError};
use crate::netns::{self, NetnsError};
pub use crate::state::NodeKind;
use crate::state::{self, HostState, LabState, NodeState, PodState, ProcState, StateError};

/// Where IMDS answers on Azure; in the lab, an address of each node's namespace.
pub const IMDS_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
pub const DEFAULT_BASE_DIR: &str = "/run/vnet-lab";
pub const DEFAULT_CNITOOL: &str = "/usr/local/bin/cnitool";
pub const SYSTEM_CNI_PATH: &str = "/usr/lib/cni";
/// libcni's result cache (cnitool cannot move it); the lab removes its own networks' files.
pub const CNI_CACHE_DIR: &str = "/var/lib/cni/results";
pub const INTERNET_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const INTERNET_ROUTER_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const MOCK_PORT: u16 = 8080;
const CNITOOL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("the lab needs root (network namespaces); run it with sudo")]
    NeedsRoot,
    #[error(
        "lab {name:?} already exists in {dir}; remove it with `vnetctl lab down --name {name}`"
    )]
    Exists { name: String, dir: PathBuf },
    #[error("no lab {0:?} (nothing in its state directory)")]
    NotFound(String),
    #[error("{what} not found at {path}{hint}")]
    MissingBinary {
        what: String,
        path: PathBuf,
        hint: String,
    },
    #[error("invalid {what} {value:?}: {why}")]
    Invalid {
        what: &'static str,
        value: String,
        why: String,
    },
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LabError + '_ {
    move |source| LabError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The agent's `[pool]` settings for every node of the lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    pub warm: u32,
    pub batch: u32,
    pub max: u32,
    pub release_delay_secs: u64,
    pub cooldown_secs: u64,
    pub allocate_timeout_secs: u64,
}

impl Default for PoolConfig {
    /// Faster recycling than the product defaults, so a lab session sees addresses come back.
    fn default() -> Self {
        PoolConfig {
            warm: 8,
            batch: 8,
            max: 250,
            release_delay_secs: 60,
            cooldown_secs: 5,
            allocate_timeout_secs: 30,
        }
    }
}

#[derive(Debug, Clone)]
pub struct LabConfig {
    pub name: String,
    pub nodes: usize,
    /// The VNet and subnet, e.g. 10.240.0.0/16: gateway .1, nodes from .4, then the plain VM.
    pub subnet: String,
    pub pool: PoolConfig,
    /// Fault configuration handed to the mock cloud at start (its `--faults` JSON).
    pub faults: Option<String>,
    /// The mock's operation `Retry-After` (s), pinned unless `faults` sets it: Azure answers 10;
    /// the lab runs at 1 by default.
    pub operation_retry_after_secs: u64,
    pub base_dir: PathBuf,
    pub bin_dir: PathBuf,
    pub cnitool: PathBuf,
    /// Chain `portmap` after vnet-cni in the conflist.
    pub portmap: bool,
    pub agent_log_level: String,
    pub plugin_log_level: String,
    /// Kinds of the nodes, cycled over them (node-1 takes the first); empty: all plain VMs.
    pub node_kinds: Vec<NodeKind>,
    /// The agents' `pool.mode`: `address` (one address per ipConfiguration) or `prefix` (a /28
    /// block per ipConfiguration; the mock's fabric routes the whole block to the node).
    pub pool_mode: PoolMode,
}

/// The agents' `pool.mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PoolMode {
    #[default]
    Address,
    Prefix,
}

impl PoolMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Address => "address",
            PoolMode::Prefix => "prefix",
        }
    }
}

impl std::str::FromStr for PoolMode {
    type Err = String;
    fn from_str(s: &str) -> Result<PoolMode, String> {
        match s {
            "address" => Ok(PoolMode::Address),
            "prefix" => Ok(PoolMode::Prefix),
            other => Err(format!(
                "unknown pool mode {other:?}; use address or prefix"
            )),
        }
    }
}

/// The scale sets the lab's scale-set nodes belong to.
pub const UNIFORM_SCALE_SET: &str = "lab-pool";
pub const FLEXIBLE_SCALE_SET: &str = "lab-flex";

/// `vm`, `uniform`, `flexible`, `mixed` (= `vm,uniform,flexible`) or a comma-separated list of
/// those kinds, cycled over the nodes.
pub fn parse_node_kinds(spec: &str) -> Result<Vec<NodeKind>, LabError> {
    let invalid = |why: &str| LabError::Invalid {
        what: "node kind",
        value: spec.to_owned(),
        why: why.to_owned(),
    };
    let mut kinds = Vec::new();
    for word in spec.split(',').map(str::trim) {
        match word {
            "vm" => kinds.push(NodeKind::Vm),
            "uniform" => kinds.push(NodeKind::Uniform),
            "flexible" => kinds.push(NodeKind::Flexible),
            "mixed" => kinds.extend([NodeKind::Vm, NodeKind::Uniform, NodeKind::Flexible]),
            _ => {
                return Err(invalid(
                    "use vm, uniform, flexible, mixed, or a comma-separated list of them",
                ));
            }
        }
    }
    Ok(kinds)
}

impl LabConfig {
    /// The kind of node number `i` (0-based).
    pub fn node_kind(&self, i: usize) -> NodeKind {
        if self.node_kinds.is_empty() {
            NodeKind::Vm
        } else {
            self.node_kinds[i % self.node_kinds.len()]
        }
    }

    pub fn new(name: &str) -> LabConfig {
        LabConfig {
            name: name.to_owned(),
            nodes: 3,
            subnet: "10.240.0.0/16".to_owned(),
            pool: PoolConfig::default(),
            faults: None,
            operation_retry_after_secs: LAB_OPERATION_RETRY_AFTER_SECS,
            base_dir: PathBuf::from(DEFAULT_BASE_DIR),
            bin_dir: default_bin_dir(),
            cnitool: default_cnitool(),
            portmap: false,
            agent_log_level: "info".to_owned(),
            plugin_log_level: "warn".to_owned(),
            node_kinds: Vec::new(),
            pool_mode: PoolMode::Address,
        }
    }
}

/// `VNET_BIN_DIR`, else the directory of the running executable (a test binary in
/// `target/<profile>/deps` looks one level up).
pub fn default_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VNET_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        return dir.parent().map(Path::to_path_buf).unwrap_or(dir);
    }
    dir
}

/// `VNET_CNITOOL`, else /usr/local/bin/cnitool.
pub fn default_cnitool() -> PathBuf {
    std::env::var_os("VNET_CNITOOL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CNITOOL))
}

pub fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn validate_name(what: &'static str, value: &str, max: usize) -> Result<(), LabError> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(LabError::Invalid {
            what,
            value: value.to_owned(),
            why: format!("use 1 to {max} lowercase letters, digits or '-'"),
        })
    }
}

/// `10.240.0.0/16` -> (network address, prefix length).
fn parse_subnet(subnet: &str) -> Result<(Ipv4Addr, u8), LabError> {
    let invalid = |why: &str| LabError::Invalid {
        what: "subnet",
        value: subnet.to_owned(),
        why: why.to_owned(),
    };
    let (addr, len) = subnet
        .split_once('/')
        .ok_or_else(|| invalid("expected a.b.c.d/len"))?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| invalid("bad address"))?;
    let len: u8 = len.parse().map_err(|_| invalid("bad prefix length"))?;
    if !(8..=26).contains(&len) {
        return Err(invalid("prefix length must be 8 to 26"));
    }
    let mask = u32::MAX << (32 - len);
    if u32::from(addr) & !mask != 0 {
        return Err(invalid("host bits set"));
    }
    Ok((addr, len))
}

fn nth_host(network: Ipv4Addr, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(network) + n)
}

fn random_token() -> Result<String, LabError> {
    let mut bytes = [0u8; 2];
    let path = Path::new("/dev/urandom");
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(io_err(path))?;
    Ok(format!("vl{:02x}{:02x}", bytes[0], bytes[1]))
}

/// Namespace names on this machine.
pub fn list_netns() -> Result<Vec<String>, LabError> {
    let out = ip(&["netns", "list"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// /proc/<pid>/stat start time (clock ticks since boot), or `None` when the pid is gone.
fn proc_start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start with field 3, "state".
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Whether the recorded process still runs (and is still that process, not a recycled pid).
pub fn proc_alive(p: &ProcState) -> bool {
    proc_start_time(p.pid) == Some(p.start_time)
}

/// Resident memory of a process in KiB (VmRSS).
pub fn proc_rss_kib(pid: i32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A running (or half-made) lab. Dropping it does nothing: call [`Lab::down`] (or use
/// [`LabGuard`]) to remove it.
pub struct Lab {
    dir: PathBuf,
    state: Mutex<LabState>,
    /// Processes this process started, to reap them after they are stopped.
    children: Mutex<HashMap<i32, Child>>,
}

/// Calls [`Lab::down`] when dropped, also while unwinding from a panic (tests), unless disarmed.
pub struct LabGuard {
    lab: Lab,
    armed: bool,
}

impl LabGuard {
    pub fn new(lab: Lab) -> LabGuard {
        LabGuard { lab, armed: true }
    }

    /// Leave the lab running when the guard goes.
    pub fn disarm(&mut self) {
        self.armed = false;
    }
}

impl std::ops::Deref for LabGuard {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        &self.lab
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if self.armed
            && let Err(e) = self.lab.down()
        {
            eprintln!("lab {}: teardown failed: {e}", self.lab.dir.display());
        }
    }
}

/// Progress lines go to stderr; stdout is for results.
fn progress(msg: &str) {
    eprintln!("==> {msg}");
}

impl Lab {
    /// Builds the whole lab and waits until every agent is ready. On failure everything made so
    /// far is removed again.
    pub fn up(cfg: &LabConfig) -> Result<Lab, LabError> {
        if !is_root() {
            return Err(LabError::NeedsRoot);
        }
        validate_name("lab name", &cfg.name, 32)?;
        if cfg.nodes == 0 || cfg.nodes > 50 {
            return Err(LabError::Invalid {
                what: "node count",
                value: cfg.nodes.to_string(),
                why: "use 1 to 50".into(),
            });
        }
        let (network, _) = parse_subnet(&cfg.subnet)?;
        for bin in ["vnet-mockcloud", "vnet-agent", "vnet-cni"] {
            let path = cfg.bin_dir.join(bin);
            if !path.is_file() {
                return Err(LabError::MissingBinary {
                    what: bin.to_owned(),
                    path,
                    hint: " (build it: cargo build -p vnet-mockcloud -p vnet-agent -p vnet-cni, or pass --bin-dir)".into(),
                });
            }
        }
        if !cfg.cnitool.is_file() {
            return Err(LabError::MissingBinary {
                what: "cnitool".into(),
                path: cfg.cnitool.clone(),
                hint: " (build it with shared/tools/build-cnitool.sh, or set VNET_CNITOOL)".into(),
            });
        }
        let dir = cfg.base_dir.join(&cfg.name);
        if state::state_path(&dir).exists() {
            return Err(LabError::Exists {
                name: cfg.name.clone(),
                dir,
            });
        }
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let existing = list_netns()?;
        let token = loop {
            let t = random_token()?;
            if !existing.iter().any(|n| n.starts_with(&t)) {
                break t;
            }
        };
        let bin_dir = fs::canonicalize(&cfg.bin_dir).map_err(io_err(&cfg.bin_dir))?;
        let cni_bin = dir.join("cni-bin");
        fs::create_dir_all(&cni_bin).map_err(io_err(&cni_bin))?;
        let link = cni_bin.join("vnet-cni");
        // Left over by a start that died before its state file was written.
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(bin_dir.join("vnet-cni"), &link).map_err(io_err(&link))?;

        let gateway = nth_host(network, 1);
        let nodes = (0..cfg.nodes)
            .map(|i| {
                let name = format!("node-{}", i + 1);
                let ndir = dir.join("nodes").join(&name);
                NodeState {
                    ns: format!("{token}-{name}"),
                    ip: nth_host(network, 4 + i as u32),
                    socket: ndir.join("agent.sock"),
                    state_dir: ndir.join("state"),
                    conf_dir: ndir.join("net.d"),
                    config_path: ndir.join("agent.toml"),
                    agent_log: ndir.join("agent.log"),
                    dir: ndir,
                    name,
                    kind: cfg.node_kind(i),
                }
            })
            .collect::<Vec<_>>();
        let vm = HostState {
            name: "vm-1".into(),
            ns: format!("{token}-vm-1"),
            ip: nth_host(network, 4 + cfg.nodes as u32),
        };
        let internet = HostState {
            name: "internet".into(),
            ns: format!("{token}-inet"),
            ip: INTERNET_IP,
        };
        let router_ns = format!("{token}-vpc");
        let mut namespaces = vec![router_ns.clone()];
        namespaces.extend(nodes.iter().map(|n| n.ns.clone()));
        namespaces.push(vm.ns.clone());
        namespaces.push(internet.ns.clone());
        let st = LabState {
            name: cfg.name.clone(),
            token: token.clone(),
            dir: dir.clone(),
            subnet: cfg.subnet.clone(),
            gateway,
            mock_addr: SocketAddr::V4(SocketAddrV4::new(gateway, MOCK_PORT)),
            network: format!("{token}-vnet"),
            other_networks: Vec::new(),
            cni_path: format!("{}:{SYSTEM_CNI_PATH}", cni_bin.display()),
            cnitool: cfg.cnitool.clone(),
            bin_dir,
            router_ns,
            nodes,
            vm,
            internet,
            namespaces,
            processes: Vec::new(),
            pods: Vec::new(),
        };
        // Recorded before anything is made, so `down` can undo a half-built lab.
        state::save(&st)?;
        let lab = Lab {
            dir,
            state: Mutex::new(st),
            children: Mutex::new(HashMap::new()),
        };
        match lab.build(cfg) {
            Ok(()) => Ok(lab),
            Err(e) => {
                if let Err(down) = lab.down() {
                    eprintln!("cleanup after failed start also failed: {down}");
                }
                Err(e)
            }
        }
    }

    /// Opens an existing lab by name.
    pub fn open(base_dir: &Path, name: &str) -> Result<Lab, LabError> {
        let dir = base_dir.join(name);
        if !state::state_path(&dir).exists() {
            return Err(LabError::NotFound(name.to_owned()));
        }
        let st = state::load(&dir)?;
        Ok(Lab {
            dir,
            state: Mutex::new(st),
            children: Mutex::new(HashMap::new()),
        })
    }

    /// A copy of the current state.
    pub fn state(&self) -> LabState {
        self.state.lock().expect("state lock").clone()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn update(&self, change: impl FnOnce(&mut LabState)) -> Result<LabState, LabError> {
        let mut cached = self.state.lock().expect("state lock");
        let new = state::update(&self.dir, change)?;
        *cached = new.clone();
        Ok(new)
    }

    fn build(&self, cfg: &LabConfig) -> Result<(), LabError> {
        let st = self.state();
        progress(&format!(
            "lab {} ({}): {} nodes, plain VM, internet, router; state in {}",
            st.name,
            st.token,
            st.nodes.len(),
            st.dir.display()
        ));
        for ns in &st.namespaces {
            ip(&["netns", "add", ns])?;
        }
        self.wire(&st)?;
        self.write_topology(&st)?;
        write_principals(&st)?;
        let faults = pinned_faults(cfg.faults.as_deref(), cfg.operation_retry_after_secs)?;
        self.start_mock(Some(&faults))?;
        for node in &st.nodes {
            fs::create_dir_all(&node.state_dir).map_err(io_err(&node.state_dir))?;
            fs::create_dir_all(&node.conf_dir).map_err(io_err(&node.conf_dir))?;
            write_agent_config(&st, node, cfg)?;
            write_conflist(&st, node, cfg)?;
            self.start_agent(&node.name)?;
        }
        progress("waiting for the agents to be ready");
        for node in &st.nodes {
            self.wait_agent_ready(&node.name, Duration::from_secs(60))?;
        }
        progress("lab is up");
        Ok(())
    }

    fn wire(&self, st: &LabState) -> Result<(), LabError> {
        let r = &st.router_ns;
        netns::sysctl(r, "net/ipv4/ip_forward", "1")?;
        netns::sysctl(r, "net/ipv4/conf/all/rp_filter", "0")?;
        netns::sysctl(r, "net/ipv4/conf/default/rp_filter", "0")?;
        let mut router = vec![
            "link set lo up".to_owned(),
            format!("addr add {}/32 dev lo", st.gateway),
        ];
        let mut ports = Vec::new();
        let hosts = st
            .nodes
            .iter()
            .map(|n| (n.ns.as_str(), n.ip))
            .chain(std::iter::once((st.vm.ns.as_str(), st.vm.ip)));
        let (_, prefix_len) = parse_subnet(&st.subnet)?;
        for (i, (ns, host_ip)) in hosts.enumerate() {
            let port = format!("{}-h{}", st.token, i + 1);
            router.push(format!(
                "link add {port} type veth peer name eth0 netns {ns}"
            ));
            router.push(format!("link set {port} up"));
            router.push(format!("route add {host_ip}/32 dev {port} scope link"));
            ports.push(port);
        }
        let inet_port = format!("{}-inet", st.token);
        router.push(format!(
            "link add {inet_port} type veth peer name eth0 netns {}",
            st.internet.ns
        ));
        router.push(format!("addr add {INTERNET_ROUTER_IP}/24 dev {inet_port}"));
        router.push(format!("link set {inet_port} up"));
        ip_batch(Some(r), &router)?;
        for port in &ports {
            // Answer ARP for every address routed elsewhere (the fabric), at once (the default
            // proxy delay is up to 0.8 s per first packet).
            netns::sysctl(r, &format!("net/ipv4/conf/{port}/proxy_arp"), "1")?;
            netns::sysctl(r, &format!("net/ipv4/neigh/{port}/proxy_delay"), "0")?;
        }
        let hosts = st
            .nodes
            .iter()
            .map(|n| (n.ns.as_str(), n.ip))
            .chain(std::iter::once((st.vm.ns.as_str(), st.vm.ip)));
        for (ns, host_ip) in hosts {
            ip_batch(
                Some(ns),
                &[
                    "link set lo up".into(),
                    format!("addr add {host_ip}/{prefix_len} dev eth0"),
                    "link set eth0 up".into(),
                    format!("route add default via {}", st.gateway),
                ],
            )?;
        }
        for n in &st.nodes {
            // IMDS, answered in the node's namespace as Azure's host answers for the VM (the
            // demo's responder listens there): the node reaches it, its pods must not. Scope
            // host, so the node never picks it as a source address.
            ip_batch(
                Some(&n.ns),
                &[format!("addr add {IMDS_ADDRESS}/32 dev lo scope host")],
            )?;
        }
        ip_batch(
            Some(&st.internet.ns),
            &[
                "link set lo up".into(),
                format!("addr add {}/24 dev eth0", st.internet.ip),
                "link set eth0 up".into(),
                format!("route add default via {INTERNET_ROUTER_IP}"),
            ],
        )?;
        Ok(())
    }

    fn write_topology(&self, st: &LabState) -> Result<(), LabError> {
        // Node NICs as in a cluster: an NSG, an ASG and a load balancer backend pool, which every
        // NIC write re-sends (ASG copied to new entries, join permissions checked).
        let mut vms: Vec<serde_json::Value> = st
            .nodes
            .iter()
            .map(|n| {
                let mut vm = json!({"name": n.name, "subnet": "nodes", "primary_ip": n.ip.to_string(),
                       "nic": {"network_security_group": "nsg-nodes",
                               "application_security_groups": ["asg-nodes"],
                               "load_balancer_backend_address_pools": ["kubernetes/kubernetes"],
                               "tags": {"vnet-lab": st.name}}});
                match n.kind {
                    NodeKind::Vm => {}
                    NodeKind::Uniform => vm["scale_set"] = json!(UNIFORM_SCALE_SET),
                    NodeKind::Flexible => vm["scale_set"] = json!(FLEXIBLE_SCALE_SET),
                }
                vm
            })
            .collect();
        vms.push(
            json!({"name": st.vm.name, "subnet": "nodes", "primary_ip": st.vm.ip.to_string()}),
        );
        let topology = json!({
            "subscription": "sub-lab",
            "resource_group": "rg-lab",
            "location": "westeurope",
            "vnet": {"name": "vnet", "address_space": [st.subnet]},
            "subnets": [{"name": "nodes", "prefix": st.subnet}],
            "vms": vms,
            "scale_sets": [
                {"name": UNIFORM_SCALE_SET, "orchestration": "Uniform"},
                {"name": FLEXIBLE_SCALE_SET, "orchestration": "Flexible"},
            ],
        });
        let path = st.dir.join("topology.json");
        fs::write(
            &path,
            serde_json::to_string_pretty(&topology).expect("json"),
        )
        .map_err(io_err(&path))
    }

    /// Starts `program` detached inside `ns`, logging to `log`, and records it under `role`.
    fn spawn_recorded(
        &self,
        role: &str,
        ns: &str,
        program: &Path,
        args: &[String],
        log: &Path,
    ) -> Result<ProcState, LabError> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io_err(log))?;
        let err = out.try_clone().map_err(io_err(log))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env("RUST_BACKTRACE", "1");
        enter_netns(&mut cmd, ns, true)?;
        let child = cmd.spawn().map_err(|source| ExecError::Spawn {
            what: exec::describe(&cmd),
            source,
        })?;
        let pid = child.id() as i32;
        let proc_state = ProcState {
            role: role.to_owned(),
            pid,
            start_time: proc_start_time(pid).unwrap_or(0),
            log: log.to_owned(),
        };
        self.children.lock().expect("children").insert(pid, child);
        let recorded = proc_state.clone();
        self.update(move |s| {
            s.processes.retain(|p| p.role != recorded.role);
            s.processes.push(recorded);
        })?;
        Ok(proc_state)
    }

    fn start_mock(&self, faults: Option<&str>) -> Result<(), LabError> {
        let st = self.state();
        let mut args = vec![
            "--listen".to_owned(),
            st.mock_addr.to_string(),
            "--topology".to_owned(),
            st.dir.join("topology.json").display().to_string(),
            "--state".to_owned(),
            st.dir.join("mock-state.json").display().to_string(),
            "--fabric-routes".to_owned(),
        ];
        if let Some(f) = faults {
            args.push("--faults".to_owned());
            args.push(f.to_owned());
        }
        args.push("--principals".to_owned());
        args.push(st.dir.join("principals.json").display().to_string());
        progress(&format!(
            "starting vnet-mockcloud on {} (router namespace)",
            st.mock_addr
        ));
        let log = st.dir.join("mockcloud.log");
        let p = self.spawn_recorded(
            "mock",
            &st.router_ns,
            &st.bin_dir.join("vnet-mockcloud"),
            &args,
            &log,
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match http::tcp_request_in(&st.router_ns, st.mock_addr, "GET", "/admin/counters", None)
            {
                Ok(_) => return Ok(()),
                Err(e) => {
                    if proc_start_time(p.pid).is_none() || Instant::now() > deadline {
                        return Err(LabError::Failed(format!(
                            "vnet-mockcloud did not come up ({e}); its log:\n{}",
                            tail(&log, 20)
                        )));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts (or restarts) the agent of `node`.
    pub fn start_agent(&self, node: &str) -> Result<ProcState, LabError> {
        let st = self.state();
        let n = self.node_state(&st, node)?;
        progress(&format!("starting vnet-agent on {} ({})", n.name, n.ip));
        self.spawn_recorded(
            &format!("agent:{}", n.name),
            &n.ns,
            &st.bin_dir.join("vnet-agent"),
            &["--config".to_owned(), n.config_path.display().to_string()],
            &n.agent_log,
        )
    }

    fn node_state(&self, st: &LabState, node: &str) -> Result<NodeState, LabError> {
        st.node(node).cloned().ok_or_else(|| LabError::Invalid {
            what: "node",
            value: node.to_owned(),
            why: format!(
                "the lab has {}",
                st.nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
    }

    pub fn wait_agent_ready(&self, node: &str, timeout: Duration) -> Result<(), LabError> {
        let st = self.state();
        let n = self.node_state(&st, node)?;
        let role = format!("agent:{node}");
        let pid = st.process(&role).map(|p| p.pid);
        let deadline = Instant::now() + timeout;
        loop {
            let last = match http::unix_request(&n.socket, "GET", vnet_api::PATH_HEALTH, None)
                .and_then(|r| r.json::<HealthResponse>("agent health"))
            {
                Ok(h) if h.ready => return Ok(()),
                Ok(_) => "not ready".to_owned(),
                Err(e) => e.to_string(),
            };
            let dead = pid.is_some_and(|p| proc_start_time(p).is_none());
            if dead || Instant::now() > deadline {
                return Err(LabError::Failed(format!(
                    "agent on {node} {} ({last}); its log:\n{}",
                    if dead {
                        "exited"
                    } else {
                        "is not ready in time"
                    },
                    tail(&n.agent_log, 30)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` to the agent of `node` (SIGKILL for the crash tests) and reaps it.
    pub fn signal_agent(&self, node: &str, signal: i32) -> Result<(), LabError> {
        let st = self.state();
        let p = st
            .process(&format!("agent:{node}"))
            .cloned()
            .ok_or_else(|| LabError::Failed(format!("no agent recorded for {node}")))?;
        self.stop_process(&p, signal, Duration::from_secs(10));
        Ok(())
    }

    /// A cloud outage: the mock (ARM and IMDS alike) is killed with SIGKILL. Pods keep their
    /// data path (the fabric routes stay); [`Lab::restart_mock`] brings the same cloud back from
    /// its state file.
    pub fn kill_mock(&self) -> Result<(), LabError> {
        let st = self.state();
        let p = st
            .process("mock")
            .cloned()
            .ok_or_else(|| LabError::Failed("no mock cloud recorded".into()))?;
        self.stop_process(&p, 9, Duration::from_secs(10));
        Ok(())
    }

    /// Starts the mock cloud again after [`Lab::kill_mock`], with the lab's operation timing.
    pub fn restart_mock(&self) -> Result<(), LabError> {
        let faults = pinned_faults(None, LAB_OPERATION_RETRY_AFTER_SECS)?;
        self.start_mock(Some(&faults))
    }

    pub fn agent_pid(&self, node: &str) -> Option<i32> {
        self.state()
            .process(&format!("agent:{node}"))
            .map(|p| p.pid)
    }

    pub fn mock_pid(&self) -> Option<i32> {
        self.state().process("mock").map(|p| p.pid)
    }

    /// Signals a recorded process if it is still the same process, and waits until it is gone
    /// (SIGKILL after `grace`).
    fn stop_process(&self, p: &ProcState, signal: i32, grace: Duration) {
        if proc_start_time(p.pid) != Some(p.start_time) {
            self.reap(p.pid);
            return;
        }
        // SAFETY: kill(2) on a pid whose start time we just checked against the record.
        unsafe { libc::kill(p.pid, signal) };
        let deadline = Instant::now() + grace;
        while proc_start_time(p.pid) == Some(p.start_time) {
            self.try_reap(p.pid);
            if Instant::now() > deadline {
                // SAFETY: as above; still the recorded process.
                unsafe { libc::kill(p.pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.reap(p.pid);
    }

    fn try_reap(&self, pid: i32) {
        if let Some(child) = self.children.lock().expect("children").get_mut(&pid) {
            let _ = child.try_wait();
        }
    }

    fn reap(&self, pid: i32) {
        if let Some(mut child) = self.children.lock().expect("children").remove(&pid) {
            let _ = child.wait();
        }
    }

    pub fn agent_status(&self, node: &str) -> Result<StatusResponse, LabError> {
        let n = self.node_state(&self.state(), node)?;
        Ok(
            http::unix_request(&n.socket, "GET", vnet_api::PATH_STATUS, None)?
                .json("agent status")?,
        )
    }

    pub fn agent_allocations(&self, node: &str) -> Result<AllocationsResponse, LabError> {
        let n = self.node_state(&self.state(), node)?;
        Ok(
            http::unix_request(&n.socket, "GET", vnet_api::PATH_ALLOCATIONS, None)?
                .json("agent allocations")?,
        )
    }

    /// A request to the mock cloud (from inside the router namespace, where it listens).
    pub fn mock_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<http::Response, LabError> {
        let st = self.state();
        Ok(http::tcp_request_in(
            &st.router_ns,
            st.mock_addr,
            method,
            path,
            body,
        )?)
    }

    pub fn mock_json(&self, path: &str) -> Result<serde_json::Value, LabError> {
        Ok(self.mock_request("GET", path, None)?.json(path)?)
    }

    /// The Prometheus text of `node`'s agent (served on 127.0.0.1:9464 in the node's namespace).
    pub fn agent_metrics(&self, node: &str) -> Result<String, LabError> {
        let n = self.node_state(&self.state(), node)?;
        let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9464));
        let response = http::tcp_request_in(&n.ns, addr, "GET", "/metrics", None)?;
        if response.status != 200 {
            return Err(LabError::Failed(format!(
                "{node}: metrics answered {}",
                response.status
            )));
        }
        Ok(response.body)
    }

    /// Reimages `node`, a Uniform scale-set instance, in the mock cloud: its instance-level
    /// ipConfigurations go back to the scale set's model. Returns the addresses it lost.
    pub fn reimage(&self, node: &str) -> Result<Vec<Ipv4Addr>, LabError> {
        let st = self.state();
        let n = self.node_state(&st, node)?;
        if n.kind != NodeKind::Uniform {
            return Err(LabError::Invalid {
                what: "node",
                value: node.to_owned(),
                why: format!(
                    "{} is a {}, not a Uniform scale-set instance",
                    n.name,
                    n.kind.as_str()
                ),
            });
        }
        // Instance IDs follow the order of the set's members.
        let instance = st
            .nodes
            .iter()
            .take_while(|m| m.name != n.name)
            .filter(|m| m.kind == NodeKind::Uniform)
            .count();
        let path =
            format!("/admin/scalesets/{UNIFORM_SCALE_SET}/virtualMachines/{instance}/reimage");
        let answer: serde_json::Value = self.mock_request("POST", &path, None)?.json(&path)?;
        Ok(answer["lost"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|ip| ip.as_str()?.parse().ok())
            .collect())
    }

    /// Registers another CNI network name whose libcni cache files `down` must remove.
    pub fn register_network(&self, name: &str) -> Result<(), LabError> {
        let name = name.to_owned();
        self.update(move |s| {
            if !s.other_networks.contains(&name) {
                s.other_networks.push(name);
            }
        })?;
        Ok(())
    }

    /// Runs `cnitool <op> <network> /var/run/netns/<pod_ns>` inside the node's namespace, as a
    /// container runtime on that node would. Returns stdout and the wall time of the call.
    pub fn cnitool(
        &self,
        node: &str,
        op: &str,
        network: &str,
        conf_dir: &Path,
        pod_ns: &str,
    ) -> Result<(String, Duration), LabError> {
        let st = self.state();
        let n = self.node_state(&st, node)?;
        let mut cmd = Command::new(&st.cnitool);
        cmd.args([op, network, &format!("/var/run/netns/{pod_ns}")])
            .env("NETCONFPATH", conf_dir)
            .env("CNI_PATH", &st.cni_path);
        enter_netns(&mut cmd, &n.ns, false)?;
        let (output, took) = exec::run_timed(&mut cmd, None, CNITOOL_TIMEOUT)?;
        Ok((exec::check(&cmd, output)?, took))
    }

    /// Name of the namespace of pod `name` on `node`.
    pub fn pod_ns(&self, node: &str, name: &str) -> String {
        format!("{}-{node}-{name}", self.state().token)
    }

    /// Creates the pod's namespace and wires it with cnitool + vnet-cni on `node`.
    pub fn add_pod(&self, node: &str, name: &str) -> Result<PodState, LabError> {
        validate_name("pod name", name, 24)?;
        let st = self.state();
        let n = self.node_state(&st, node)?;
        let ns = self.pod_ns(node, name);
        if st.pods.iter().any(|p| p.ns == ns) {
            return Err(LabError::Invalid {
                what: "pod",
                value: name.to_owned(),
                why: format!("already exists on {node}"),
            });
        }
        ip(&["netns", "add", &ns])?;
        let result = self
            .cnitool(node, "add", &st.network, &n.conf_dir, &ns)
            .and_then(|(out, _)| parse_cni_result(&out));
        let (pod_ip, host_veth) = match result {
            Ok(r) => r,
            Err(e) => {
                // As a runtime does after a failed ADD: DEL, so nothing half-made stays behind.
                let _ = self.cnitool(node, "del", &st.network, &n.conf_dir, &ns);
                let _ = ip(&["netns", "del", &ns]);
                return Err(e);
            }
        };
        let pod = PodState {
            node: node.to_owned(),
            name: name.to_owned(),
            ns,
            ip: pod_ip,
            host_veth,
        };
        let recorded = pod.clone();
        self.update(move |s| s.pods.push(recorded))?;
        Ok(pod)
    }

    /// cnitool DEL, then removes the pod's namespace.
    pub fn del_pod(&self, node: &str, name: &str) -> Result<(), LabError> {
        let st = self.state();
        let n = self.node_state(&st, node)?;
        let ns = self.pod_ns(node, name);
        if !st.pods.iter().any(|p| p.ns == ns) {
            return Err(LabError::Invalid {
                what: "pod",
                value: name.to_owned(),
                why: format!("no such pod on {node}"),
            });
        }
        self.cnitool(node, "del", &st.network, &n.conf_dir, &ns)?;
        ip(&["netns", "del", &ns])?;
        self.update(move |s| s.pods.retain(|p| p.ns != ns))?;
        Ok(())
    }

    /// Kernel interfaces in `ns`: (name, kind, up).
    pub fn links(ns: &str) -> Result<Vec<(String, String, bool)>, LabError> {
        let out = ip(&["-n", ns, "-j", "-d", "link", "show"])?;
        let links: Vec<serde_json::Value> = serde_json::from_str(&out)
            .map_err(|e| LabError::Failed(format!("ip -j link in {ns}: {e}")))?;
        Ok(links
            .iter()
            .map(|l| {
                let name = l["ifname"].as_str().unwrap_or("?").to_owned();
                let kind = l["linkinfo"]["info_kind"].as_str().unwrap_or("").to_owned();
                let up = l["flags"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|x| x == "UP"));
                (name, kind, up)
            })
            .collect())
    }

    /// Removes everything the lab made. Safe to call on a half-built lab and twice.
    pub fn down(&self) -> Result<(), LabError> {
        let st = match state::load(&self.dir) {
            Ok(s) => s,
            Err(_) if !self.dir.exists() => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        teardown(&st, |p| {
            self.stop_process(p, libc::SIGTERM, Duration::from_secs(5))
        })
    }

    /// `down` for a lab known only by name (another process made it).
    pub fn down_by_name(base_dir: &Path, name: &str) -> Result<bool, LabError> {
        let dir = base_dir.join(name);
        if !dir.exists() {
            return Ok(false);
        }
        let lab = Lab {
            dir: dir.clone(),
            state: Mutex::new(match state::load(&dir) {
                Ok(s) => s,
                Err(_) => {
                    // No state file: nothing was made yet besides the directory.
                    fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
                    return Ok(true);
                }
            }),
            children: Mutex::new(HashMap::new()),
        };
        lab.down()?;
        Ok(true)
    }
}

/// Every failure is collected: teardown goes on past one and reports them all.
fn teardown(st: &LabState, stop: impl Fn(&ProcState)) -> Result<(), LabError> {
    let mut failures = Vec::new();
    // Agents first, so none of them talks to a vanished mock.
    let mut procs = st.processes.clone();
    procs.sort_by_key(|p| p.role == "mock");
    for p in &procs {
        stop(p);
    }
    let prefix = format!("{}-", st.token);
    let mut all_ns: Vec<String> = st.pods.iter().map(|p| p.ns.clone()).collect();
    all_ns.extend(st.namespaces.iter().cloned());
    match list_netns() {
        Ok(live) => {
            for ns in live {
                if ns.starts_with(&prefix) && !all_ns.contains(&ns) {
                    all_ns.push(ns);
                }
            }
        }
        Err(e) => failures.push(e.to_string()),
    }
    for ns in &all_ns {
        if !exec::netns_path(ns).exists() {
            continue;
        }
        // Anything still running in the namespace (a bench's iperf3, a process started by a
        // lab that crashed before recording it) goes with it.
        if let Ok(pids) = ip(&["netns", "pids", ns]) {
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: kill(2) on a pid that `ip netns pids` just found in our namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if let Err(e) = ip(&["netns", "del", ns]) {
            failures.push(e.to_string());
        }
    }
    let mut networks = vec![st.network.clone()];
    networks.extend(st.other_networks.iter().cloned());
    if let Ok(entries) = fs::read_dir(CNI_CACHE_DIR) {
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            if networks.iter().any(|n| file.starts_with(&format!("{n}-"))) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    if let Err(e) = fs::remove_dir_all(&st.dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        failures.push(format!("{}: {e}", st.dir.display()));
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(LabError::Failed(format!(
            "teardown incomplete:\n  {}",
            failures.join("\n  ")
        )))
    }
}

/// (pod IP, host veth name) from a CNI ADD result.
pub fn parse_cni_result(out: &str) -> Result<(Ipv4Addr, String), LabError> {
    let bad = |why: &str| LabError::Failed(format!("unexpected CNI result ({why}): {out}"));
    let v: serde_json::Value = serde_json::from_str(out).map_err(|_| bad("not JSON"))?;
    let addr = v["ips"][0]["address"]
        .as_str()
        .ok_or_else(|| bad("no ips[0].address"))?;
    let pod_ip: Ipv4Addr = addr
        .split('/')
        .next()
        .unwrap_or("")
        .parse()
        .map_err(|_| bad("bad address"))?;
    let host_veth = v["interfaces"]
        .as_array()
        .and_then(|ifs| {
            ifs.iter()
                .find(|i| i["sandbox"].as_str().unwrap_or("").is_empty())
                .and_then(|i| i["name"].as_str())
        })
        .unwrap_or("?")
        .to_owned();
    Ok((pod_ip, host_veth))
}

/// The lab's default operation `Retry-After` (the mock's own default is Azure's 10 s).
pub const LAB_OPERATION_RETRY_AFTER_SECS: u64 = 1;

/// The agents' permissions: exactly the custom role the docs show and Terraform grants.
pub const AGENT_ROLE_JSON: &str = include_str!("../../deploy/azure/vnet-cni-role.json");

/// A node agent's static test token (its principal at the mock).
fn agent_token(st: &LabState, node: &NodeState) -> String {
    format!("vnet-lab.{}.{}.{}", st.name, st.token, node.name)
}

/// `principals.json` for the mock: one principal per node agent, each with the shipped role.
fn write_principals(st: &LabState) -> Result<(), LabError> {
    let role: serde_json::Value = serde_json::from_str(AGENT_ROLE_JSON)
        .map_err(|e| LabError::Failed(format!("deploy/azure/vnet-cni-role.json: {e}")))?;
    let principals: Vec<serde_json::Value> = st
        .nodes
        .iter()
        .map(|n| json!({"token": agent_token(st, n), "name": format!("vnet-agent-{}", n.name), "role": role}))
        .collect();
    let path = st.dir.join("principals.json");
    fs::write(
        &path,
        serde_json::to_string_pretty(&principals).expect("json"),
    )
    .map_err(io_err(&path))
}

/// `faults` with the operation timing pinned (unless `faults` sets it itself).
fn pinned_faults(faults: Option<&str>, retry_after_secs: u64) -> Result<String, LabError> {
    let mut value: serde_json::Value = match faults {
        Some(text) => serde_json::from_str(text)
            .map_err(|e| LabError::Failed(format!("mock faults are not JSON: {e}")))?,
        None => json!({}),
    };
    let Some(map) = value.as_object_mut() else {
        return Err(LabError::Failed("mock faults must be a JSON object".into()));
    };
    map.entry("operation_retry_after_secs")
        .or_insert(json!(retry_after_secs));
    Ok(value.to_string())
}

fn write_agent_config(st: &LabState, node: &NodeState, cfg: &LabConfig) -> Result<(), LabError> {
    let endpoint = format!("http://{}", st.mock_addr);
    let p = &cfg.pool;
    let mut toml = String::new();
    let _ = write!(
        toml,
        r#"# vnet-agent of lab {lab}, {node} (written by vnetctl)
socket_path = "{socket}"
state_dir = "{state_dir}"
metrics_address = "127.0.0.1:9464"
masquerade = true
log_level = "{log_level}"

[cloud]
provider = "mock"
arm_endpoint = "{endpoint}"
imds_endpoint = "{endpoint}"
credential = "test_token"
test_token = "{token}"

[pool]
mode = "{mode}"
warm = {warm}
batch = {batch}
max = {max}
release_delay_secs = {release}
cooldown_secs = {cooldown}
allocate_timeout_secs = {alloc}
"#,
        lab = st.name,
        node = node.name,
        token = agent_token(st, node),
        socket = node.socket.display(),
        state_dir = node.state_dir.display(),
        log_level = cfg.agent_log_level,
        mode = cfg.pool_mode.as_str(),
        warm = p.warm,
        batch = p.batch,
        max = p.max,
        release = p.release_delay_secs,
        cooldown = p.cooldown_secs,
        alloc = p.allocate_timeout_secs,
    );
    fs::write(&node.config_path, toml).map_err(io_err(&node.config_path))
}

fn write_conflist(st: &LabState, node: &NodeState, cfg: &LabConfig) -> Result<(), LabError> {
    let mut plugins = vec![json!({
        "type": "vnet-cni",
        "agentSocket": node.socket,
        "spoolDir": node.state_dir.join("spool"),
        "logLevel": cfg.plugin_log_level,
        "logFile": node.dir.join("plugin.log"),
    })];
    if cfg.portmap {
        plugins
            .push(json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}));
    }
    let conflist = json!({"cniVersion": "1.0.0", "name": st.network, "plugins": plugins});
    let path = node.conf_dir.join("10-vnet.conflist");
    fs::write(
        &path,
        serde_json::to_string_pretty(&conflist).expect("json"),
    )
    .map_err(io_err(&path))
}

#[cfg(test)]
mod tests {

    #[test]
    fn node_kinds_parse_and_cycle_over_the_nodes() {
        let mut cfg = LabConfig::new("x");
        cfg.node_kinds = parse_node_kinds("mixed").unwrap();
        let kinds: Vec<NodeKind> = (0..4).map(|i| cfg.node_kind(i)).collect();
        assert_eq!(
            kinds,
            [
                NodeKind::Vm,
                NodeKind::Uniform,
                NodeKind::Flexible,
                NodeKind::Vm
            ]
        );
        cfg.node_kinds = parse_node_kinds("uniform, vm").unwrap();
        assert_eq!(cfg.node_kind(3), NodeKind::Vm);
        assert!(parse_node_kinds("uniform,aks").is_err());
        assert_eq!(LabConfig::new("x").node_kind(7), NodeKind::Vm);
    }

    #[test]
    fn the_mock_timing_is_pinned_unless_the_faults_set_it() {
        let pinned: serde_json::Value =
            serde_json::from_str(&pinned_faults(None, 1).unwrap()).unwrap();
        assert_eq!(pinned, serde_json::json!({"operation_retry_after_secs": 1}));
        let kept: serde_json::Value = serde_json::from_str(
            &pinned_faults(Some(r#"{"operation_retry_after_secs": 0, "busy": {}}"#), 1).unwrap(),
        )
        .unwrap();
        assert_eq!(kept["operation_retry_after_secs"], 0);
        assert!(pinned_faults(Some("[]"), 1).is_err());
        // The agents' role is the shipped one and parses as a role definition.
        let role: serde_json::Value = serde_json::from_str(AGENT_ROLE_JSON).unwrap();
        assert!(role["Actions"].as_array().unwrap().len() > 5);
    }

    use super::*;

    #[test]
    fn subnets_parse_and_hosts_count_from_the_network() {
        let (net, len) = parse_subnet("10.240.0.0/16").unwrap();
        assert_eq!((net, len), (Ipv4Addr::new(10, 240, 0, 0), 16));
        assert_eq!(nth_host(net, 4), Ipv4Addr::new(10, 240, 0, 4));
        assert!(parse_subnet("10.240.0.1/16").is_err());
        assert!(parse_subnet("10.240.0.0").is_err());
        assert!(parse_subnet("10.240.0.0/30").is_err());
    }

    #[test]
    fn cni_results_give_the_pod_ip_and_host_veth() {
        let out = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"vnet0123456789a","mac":"aa"},
            {"name":"eth0","sandbox":"/var/run/netns/x"}],"ips":[{"address":"10.240.0.9/32","interface":1}]}"#;
        let (ip, veth) = parse_cni_result(out).unwrap();
        assert_eq!(ip, Ipv4Addr::new(10, 240, 0, 9));
        assert_eq!(veth, "vnet0123456789a");
        assert!(parse_cni_result("{}").is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("pod", "web-1", 24).is_ok());
        assert!(validate_name("pod", "Web", 24).is_err());
        assert!(validate_name("pod", "", 24).is_err());
        assert!(validate_name("pod", "a/b", 24).is_err());
    }
}
