//! A node whose addresses are exhausted (every address it may hold is allocated) keeps STATUS at
//! 0, so a runtime keeps its network ready, while ADD fails with the exhaustion code 104; STATUS
//! answers 50 only once the agent is gone.

mod common;

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use vnet_lab::exec::{enter_netns, ip, run_timed};
use vnet_lab::lab::{Lab, PoolConfig};

const SIGKILL: i32 = 9;

/// Runs the plugin itself in the node's namespace (cnitool 1.1.2 has no STATUS) with the node's
/// own plugin config, rendered at cniVersion 1.1.0. Returns (exit ok, stdout).
fn plugin(lab: &Lab, env: &[(&str, &str)]) -> (bool, String) {
    let st = lab.state();
    let node = st.node("node-1").expect("node-1");
    let conflist: Value = serde_json::from_slice(
        &std::fs::read(node.conf_dir.join("10-vnet.conflist")).expect("conflist"),
    )
    .expect("conflist json");
    let mut conf = conflist["plugins"][0].clone();
    conf["cniVersion"] = "1.1.0".into();
    conf["name"] = conflist["name"].clone();
    let mut cmd = Command::new(st.bin_dir.join("vnet-cni"));
    cmd.env_clear()
        .env("CNI_PATH", &st.cni_path)
        .envs(env.iter().copied());
    enter_netns(&mut cmd, &node.ns, false).expect("enter node netns");
    let (out, _) = run_timed(
        &mut cmd,
        Some(conf.to_string().as_bytes()),
        Duration::from_secs(60),
    )
    .expect("plugin runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn exhausted_node_stays_ready_under_status_while_add_fails_with_104() {
    let pool = PoolConfig {
        warm: 2,
        batch: 2,
        max: 2,
        ..PoolConfig::default()
    };
    let lab = common::lab("status", 1, pool, None);
    // Both addresses on the NIC first (an ADD racing the first fill is another issue's subject).
    for _ in 0..600 {
        let s = lab.agent_status("node-1").expect("agent status");
        if s.pool.free >= 2 && s.pool.pending == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    lab.add_pod("node-1", "a").expect("first pod");
    lab.add_pod("node-1", "b").expect("second pod");
    let status = [("CNI_COMMAND", "STATUS")];
    let (ok, stdout) = plugin(&lab, &status);
    assert!(ok, "STATUS with both addresses in use: {stdout}");

    // A third pod: no address left and the pool may not grow.
    let ns = lab.pod_ns("node-1", "c");
    ip(&["netns", "add", &ns]).expect("netns");
    let netns = format!("/var/run/netns/{ns}");
    let add = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "exhausted-c"),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    let (ok, stdout) = plugin(&lab, &add);
    let del = [
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", "exhausted-c"),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    let _ = plugin(&lab, &del);
    let _ = ip(&["netns", "del", &ns]);
    assert!(!ok, "ADD on an exhausted node succeeded: {stdout}");
    let err: Value = serde_json::from_str(&stdout).expect("one JSON error");
    assert_eq!(err["code"], 104, "{err}");

    // Still exhausted: STATUS stays 0 (the node's network is ready; only new pods wait).
    let (ok, stdout) = plugin(&lab, &status);
    assert!(ok, "STATUS on an exhausted node failed: {stdout}");
    assert!(stdout.trim().is_empty(), "{stdout}");

    // The plugin cannot work at all without its agent: 50.
    lab.signal_agent("node-1", SIGKILL).expect("kill agent");
    let (ok, stdout) = plugin(&lab, &status);
    assert!(!ok);
    let err: Value = serde_json::from_str(&stdout).expect("one JSON error");
    assert_eq!(err["code"], 50, "{err}");

    lab.start_agent("node-1").expect("restart agent");
    lab.wait_agent_ready("node-1", Duration::from_secs(60))
        .expect("agent ready");
    for pod in ["a", "b"] {
        lab.del_pod("node-1", pod).expect("DEL");
    }
    common::assert_ip_accounting(&lab);
    common::assert_no_leftover_links(&lab);
}
