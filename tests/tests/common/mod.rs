//! Shared set-up for the end-to-end tests: a uniquely named lab, removed when the guard drops
//! (also when the test panics).

#![allow(dead_code)]

use std::time::Duration;

use vnet_lab::lab::{Lab, LabConfig, LabGuard, PoolConfig, is_root};
use vnet_lab::verify::{ip_accounting, leftover_links, settle};

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
    assert!(
        is_root(),
        "needs root: the e2e tests build network namespaces (run `cargo test` as root)"
    );
    let mut cfg = LabConfig::new(&format!("e2e-{test}-{}", std::process::id()));
    cfg.nodes = nodes;
    cfg.pool = pool;
    cfg.faults = faults;
    cfg.node_kinds = vnet_lab::lab::parse_node_kinds(kinds).expect("node kinds");
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
