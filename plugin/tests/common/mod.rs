//! Shared test harness: a fake vnet-agent (axum on a temp Unix socket), a runner that executes the
//! built plugin binary inside a test-created "node" namespace, and config helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use vnet_api::{
    AllocateRequest, AllocateResponse, Allocation, AllocationsResponse, AttachmentKey,
    ErrorResponse, GcRequest, GcResponse, POD_GATEWAY, PoolStatus, ReleaseRequest, ReleaseResponse,
    StatusResponse,
};
use vnet_testns::Netns;

pub const PLUGIN: &str = env!("CARGO_BIN_EXE_vnet-cni");
pub const NODE_IP: &str = "10.250.0.1";

#[derive(Default)]
pub struct FakeState {
    pub next_host: u32,
    pub base: [u8; 3],
    pub allocations: BTreeMap<AttachmentKey, Allocation>,
    pub releases: Vec<ReleaseRequest>,
    pub gcs: Vec<GcRequest>,
    pub status: Option<StatusResponse>,
    pub refuse_allocate: Option<ErrorResponse>,
    /// When set, dying veths handed over by DEL are deleted in this namespace before the answer,
    /// as the real agent does (it also batches concurrent ones), and the answer says so.
    pub reap_in: Option<String>,
    /// With `reap_in`: delete in the background after answering instead, and leave
    /// `dying_veth_deleted` out, as agents before it existed did.
    pub reap_in_background: bool,
    /// When set, the GC handler records `ip -o link show` of this namespace as it was when the
    /// agent was asked to release (GC must have removed stale links by then).
    pub links_seen_at_gc_in: Option<String>,
    pub links_at_gc: Vec<String>,
}

/// An in-test vnet-agent speaking the real wire contract over a Unix socket.
pub struct FakeAgent {
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
    pub state: Arc<Mutex<FakeState>>,
    runtime: tokio::runtime::Runtime,
}

type Shared = Arc<Mutex<FakeState>>;

fn refuse(e: &ErrorResponse) -> (StatusCode, Json<Value>) {
    (
        StatusCode::from_u16(e.code.http_status()).unwrap(),
        Json(serde_json::to_value(e).unwrap()),
    )
}

async fn allocate(
    State(s): State<Shared>,
    Json(req): Json<AllocateRequest>,
) -> Result<Json<AllocateResponse>, (StatusCode, Json<Value>)> {
    let mut st = s.lock().unwrap();
    if let Some(e) = &st.refuse_allocate {
        return Err(refuse(e));
    }
    let allocation = match st.allocations.get(&req.key) {
        Some(a) => a.clone(),
        None => {
            // Lowest free host number, so long runs reuse released addresses.
            let [a, b, c] = st.base;
            let used: Vec<Ipv4Addr> = st.allocations.values().map(|a| a.ip).collect();
            let host = (1..=254u8)
                .find(|h| !used.contains(&Ipv4Addr::new(a, b, c, *h)))
                .expect("fake agent pool exhausted");
            st.next_host = u32::from(host);
            let a = Allocation {
                ip: Ipv4Addr::new(a, b, c, host),
                key: req.key.clone(),
                pod: req.pod.clone(),
                network: req.network.clone(),
                host_veth: vnet_api::host_veth_name("vnet", &req.key),
                allocated_at: 0,
            };
            st.allocations.insert(req.key.clone(), a.clone());
            a
        }
    };
    Ok(Json(AllocateResponse {
        allocation,
        gateway: POD_GATEWAY,
        mtu: 1500,
    }))
}

async fn release(
    State(s): State<Shared>,
    Json(req): Json<ReleaseRequest>,
) -> Json<ReleaseResponse> {
    let (released, reap) = {
        let mut st = s.lock().unwrap();
        let released = st.allocations.remove(&req.key);
        let reap = st.reap_in.clone().zip(req.dying_veth.clone());
        let background = st.reap_in_background;
        st.releases.push(req);
        (released, reap.map(|r| (r, background)))
    };
    let mut dying_veth_deleted = false;
    if let Some(((ns, veth), background)) = reap {
        let del = move || {
            let out = vnet_testns::run("ip", &["-n", &ns, "link", "del", &veth]);
            out.is_ok_and(|o| o.status.success())
        };
        if background {
            std::thread::spawn(del);
        } else {
            dying_veth_deleted = tokio::task::spawn_blocking(del).await.unwrap();
        }
    }
    Json(ReleaseResponse {
        released,
        dying_veth_deleted,
    })
}

async fn gc(State(s): State<Shared>, Json(req): Json<GcRequest>) -> Json<GcResponse> {
    let mut st = s.lock().unwrap();
    if let Some(ns) = st.links_seen_at_gc_in.clone() {
        let out = vnet_testns::run("ip", &["-n", &ns, "-o", "link", "show"]).unwrap();
        st.links_at_gc
            .push(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let keep: Vec<_> = req.valid_attachments.clone();
    let mut released = Vec::new();
    st.allocations.retain(|k, a| {
        let ok = keep.contains(k);
        if !ok {
            released.push(a.clone());
        }
        ok
    });
    st.gcs.push(req);
    Json(GcResponse { released })
}

async fn status(State(s): State<Shared>) -> Json<StatusResponse> {
    let st = s.lock().unwrap();
    Json(st.status.clone().unwrap_or(StatusResponse {
        ready: true,
        can_allocate: true,
        reason: None,
        node: "node-1".into(),
        pool: PoolStatus::default(),
        subnet_full: false,
        last_cloud_error: None,
        unreconciled: vec![],
    }))
}

async fn allocations(State(s): State<Shared>) -> Json<AllocationsResponse> {
    let st = s.lock().unwrap();
    Json(AllocationsResponse {
        allocations: st.allocations.values().cloned().collect(),
    })
}

impl FakeAgent {
    /// Starts the fake; addresses come from `base.0/24` (.1 upwards).
    pub fn start(base: [u8; 3]) -> FakeAgent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let state = Arc::new(Mutex::new(FakeState {
            base,
            ..Default::default()
        }));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let app = Router::new()
            .route(vnet_api::PATH_ALLOCATE, post(allocate))
            .route(vnet_api::PATH_RELEASE, post(release))
            .route(vnet_api::PATH_GC, post(gc))
            .route(vnet_api::PATH_STATUS, get(status))
            .route(vnet_api::PATH_ALLOCATIONS, get(allocations))
            .with_state(state.clone());
        let listener = runtime.block_on(async { tokio::net::UnixListener::bind(&socket).unwrap() });
        runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakeAgent {
            socket,
            dir,
            state,
            runtime,
        }
    }

    /// A socket path nobody listens on, for "agent down" tests.
    pub fn dead_socket(dir: &Path) -> PathBuf {
        dir.join("nobody.sock")
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    pub fn socket_str(&self) -> &str {
        self.socket.to_str().unwrap()
    }

    pub fn releases(&self) -> Vec<ReleaseRequest> {
        self.state.lock().unwrap().releases.clone()
    }

    pub fn allocation_count(&self) -> usize {
        self.state.lock().unwrap().allocations.len()
    }
}

/// An agent that dies mid-request: accepts each connection, reads the request, and closes it
/// without answering (hyper then reports "connection closed before message completed").
pub fn dying_agent(socket: &Path) {
    use std::io::Read;
    let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
        }
    });
}

/// The network config the tests use.
pub fn conf(version: &str, socket: &str, spool: &Path) -> Value {
    json!({
        "cniVersion": version,
        "name": "vnet-test",
        "type": "vnet-cni",
        "agentSocket": socket,
        "spoolDir": spool,
        "logLevel": "debug",
        "someFutureKey": {"ignored": true},
    })
}

#[derive(Debug)]
pub struct Outcome {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    /// The one JSON document on stdout.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not one JSON document ({e}): {:?}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }

    pub fn error_code(&self) -> u64 {
        assert!(!self.success, "expected failure, got {self:?}");
        self.json()["code"]
            .as_u64()
            .expect("error has a numeric code")
    }

    pub fn assert_ok(&self) -> &Self {
        assert!(self.success, "plugin failed: {self:?}");
        self
    }
}

/// Runs the plugin binary with exactly `env` (plus CNI_PATH unless given), `stdin`, inside the
/// `node` namespace when given (entered in the child before exec, so the test process and the
/// root namespace are never touched). Killed after 60 s.
pub fn exec_plugin(node: Option<&Netns>, env: &[(&str, &str)], stdin: &str) -> Outcome {
    exec_program(PLUGIN, &[], node, env, stdin)
}

pub fn exec_program(
    program: &str,
    args: &[&str],
    node: Option<&Netns>,
    env: &[(&str, &str)],
    stdin: &str,
) -> Outcome {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if !env.iter().any(|(k, _)| *k == "CNI_PATH") {
        cmd.env("CNI_PATH", "/opt/cni/bin");
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let ns_file = node.map(|ns| File::open(ns.path()).expect("node netns opens"));
    if let Some(f) = &ns_file {
        let fd = f.as_raw_fd();
        // SAFETY: setns is async-signal-safe and only touches the child after fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    finish(cmd, program, stdin)
}

/// Spawns `cmd` (stdio piped by the caller), writes `stdin`, waits at most 60 s (then kills it
/// and panics).
pub fn finish(mut cmd: Command, program: &str, stdin: &str) -> Outcome {
    let mut child = cmd.spawn().expect("program starts");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{program} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let out = child.wait_with_output().unwrap();
    Outcome {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// CNI env for one attachment.
pub fn cni_env<'a>(
    command: &'a str,
    container: &'a str,
    netns: &'a str,
    ifname: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", container),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", ifname),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=x",
        ),
    ]
}

/// A "node": a namespace holding NODE_IP (on its loopback: this kernel has no dummy links),
/// where the plugin runs.
pub fn node() -> Netns {
    let ns = Netns::new("node").unwrap();
    ns.exec(
        "ip",
        &["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"],
    )
    .unwrap();
    ns
}

/// `ip <args>` inside `ns`, stdout as a string.
pub fn ip(ns: &Netns, args: &[&str]) -> String {
    let out = ns.exec("ip", args).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn path_str(ns: &Netns) -> String {
    ns.path().to_str().unwrap().to_owned()
}
