//! Shared set-up for the end-to-end tests: a uniquely named lab, removed when the guard drops
//! (also when the test panics).

#![allow(dead_code)]

use std::time::Duration;

use vnet_lab::lab::{Lab, LabConfig, LabGuard, PoolConfig, PoolMode, is_root};
use vnet_lab::verify::{ip_accounting, leftover_links, settle};

pub mod node_image;

/// How long background work (tombstone veth removal, pool shrink writes) may take to settle
/// before a check reports what is left. Not a timing assertion: only an upper bound on waiting.
pub const SETTLE: Duration = Duration::from_secs(60);

/// A lab of plain VMs, or of the node kinds `VNET_E2E_NODE_KIND` names (`vnetctl lab up
/// --node-kind`: `uniform`, `mixed`, ...), so every e2e test also runs on scale-set nodes.
pub fn lab(test: &str, nodes: usize, pool: PoolConfig, faults: Option<String>) -> LabGuard {
    let kinds = std::env::var("VNET_E2E_NODE_KIND").unwrap_or_else(|_| "vm".into());
    lab_of(test, nodes, &kinds, pool, faults)
}

/// A lab whose nodes are `kinds` (a `--node-kind` spec), cycled over the nodes.
pub fn lab_of(
    test: &str,
    nodes: usize,
    kinds: &str,
    pool: PoolConfig,
    faults: Option<String>,
) -> LabGuard {
    lab_in_mode(test, nodes, kinds, pool, faults, PoolMode::Address)
}

/// [`lab_of`] with the agents' `pool.mode`.
pub fn lab_in_mode(
    test: &str,
    nodes: usize,
    kinds: &str,
    pool: PoolConfig,
    faults: Option<String>,
    mode: PoolMode,
) -> LabGuard {
    assert!(
        is_root(),
        "needs root: the e2e tests build network namespaces (run `cargo test` as root)"
    );
    let mut cfg = LabConfig::new(&format!("e2e-{test}-{}", std::process::id()));
    cfg.nodes = nodes;
    cfg.pool = pool;
    cfg.faults = faults;
    cfg.node_kinds = vnet_lab::lab::parse_node_kinds(kinds).expect("node kinds");
    cfg.pool_mode = mode;
    for bin in ["vnet-mockcloud", "vnet-agent", "vnet-cni"] {
        assert!(
            cfg.bin_dir.join(bin).is_file(),
            "{bin} not built in {}: run `cargo build --workspace` (or set VNET_BIN_DIR) before the e2e tests",
            cfg.bin_dir.display()
        );
    }
    assert!(
        cfg.cnitool.is_file(),
        "cnitool not found at {} (build it with shared/tools/build-cnitool.sh or set VNET_CNITOOL)",
        cfg.cnitool.display()
    );
    LabGuard::new(Lab::up(&cfg).unwrap_or_else(|e| panic!("lab up failed: {e}")))
}

/// Mock cloud, agents and live pods agree on every address (waits for background work).
pub fn assert_ip_accounting(lab: &Lab) {
    let problems = settle(SETTLE, || ip_accounting(lab)).expect("ip accounting");
    assert!(
        problems.is_empty(),
        "IP accounting disagrees:\n  {}",
        problems.join("\n  ")
    );
}

/// No link in any node namespace that belongs to no live pod (tombstones get a bounded wait).
pub fn assert_no_leftover_links(lab: &Lab) {
    for node in lab.state().nodes {
        let left = settle(SETTLE, || leftover_links(lab, &node.name)).expect("links");
        assert!(
            left.is_empty(),
            "{}: links left behind: {left:?}",
            node.name
        );
    }
}

// --- Host tools (image, containerd and systemd tests) ----------------------------------------------

/// Every external command runs under coreutils `timeout` with this limit.
pub const COMMAND_TIMEOUT_SECS: u32 = 300;

pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Runs `program args` under `timeout`, returning the output whatever the exit status.
pub fn run(program: &str, args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    std::process::Command::new("timeout")
        .arg(COMMAND_TIMEOUT_SECS.to_string())
        .arg(program)
        .args(args)
        .envs(envs.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Like [`run`], but the command must succeed; returns its stdout.
pub fn run_ok(program: &str, args: &[&str], envs: &[(&str, &str)]) -> String {
    let out = run(program, args, envs);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn sha256(path: &std::path::Path) -> String {
    let out = run_ok("sha256sum", &[path.to_str().expect("utf-8 path")], &[]);
    out.split_whitespace()
        .next()
        .expect("sha256sum prints a hash")
        .to_owned()
}

/// A directory removed on drop, even when the test panics.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "vnet-test-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The workspace's debug binaries `names`, without their debug info (five times smaller), copied
/// into `<work>/bin`. They must be built (tests/run.sh builds every binary first).
pub fn stripped_binaries(work: &std::path::Path, names: &[&str]) -> std::path::PathBuf {
    let bin_dir = vnet_lab::lab::default_bin_dir();
    let out = work.join("bin");
    std::fs::create_dir_all(&out).expect("create bin dir");
    for name in names {
        let src = bin_dir.join(name);
        assert!(
            src.is_file(),
            "{} is not built: run `cargo build --workspace --bins` first",
            src.display()
        );
        let dst = out.join(name);
        let strip = run(
            "strip",
            &[
                "--strip-debug",
                "-o",
                dst.to_str().expect("utf-8"),
                src.to_str().expect("utf-8"),
            ],
            &[],
        );
        if !strip.status.success() {
            std::fs::copy(&src, &dst).expect("copy binary");
        }
    }
    out
}
