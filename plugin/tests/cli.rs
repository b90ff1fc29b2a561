//! The plugin binary's protocol without touching the network: VERSION, and every error that must
//! be reported before anything is changed. No root needed.

mod common;

use common::{conf, exec_plugin};
use serde_json::json;

fn add_env(netns: &str) -> Vec<(&str, &str)> {
    common::cni_env("ADD", "abc123", netns, "eth0")
}

fn good_conf() -> String {
    conf(
        "1.0.0",
        "/nonexistent/agent.sock",
        std::path::Path::new("/nonexistent/spool"),
    )
    .to_string()
}

#[test]
fn version_lists_every_supported_version() {
    let out = exec_plugin(
        None,
        &[("CNI_COMMAND", "VERSION")],
        r#"{"cniVersion":"0.4.0"}"#,
    );
    out.assert_ok();
    let v = out.json();
    assert_eq!(v["cniVersion"], "0.4.0");
    assert_eq!(
        v["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
    // Without stdin, the latest version answers.
    let out = exec_plugin(None, &[("CNI_COMMAND", "VERSION")], "");
    assert_eq!(out.assert_ok().json()["cniVersion"], "1.1.0");
}

#[test]
fn stdin_that_is_not_json_is_code_6() {
    let out = exec_plugin(None, &add_env("/var/run/netns/x"), "this is not json");
    assert_eq!(out.error_code(), 6);
}

#[test]
fn wrong_types_and_missing_fields_are_code_7() {
    for bad in [
        json!({"cniVersion": "1.0.0", "name": 5, "type": "vnet-cni"}),
        json!({"cniVersion": "1.0.0", "name": "n", "type": "vnet-cni", "mtu": "big"}),
        json!({"cniVersion": "1.0.0", "type": "vnet-cni"}),
        json!({"cniVersion": "1.0.0", "name": "n"}),
    ] {
        let out = exec_plugin(None, &add_env("/var/run/netns/x"), &bad.to_string());
        let code = out.error_code();
        assert!(code == 6 || code == 7, "{bad}: code {code}");
        assert!(!out.json()["msg"].as_str().unwrap().is_empty());
    }
}

#[test]
fn unsupported_version_is_code_1() {
    let conf = json!({"cniVersion": "0.2.0", "name": "n", "type": "vnet-cni"});
    let out = exec_plugin(None, &add_env("/var/run/netns/x"), &conf.to_string());
    assert_eq!(out.error_code(), 1);
    // CHECK needs 0.4.0, STATUS and GC 1.1.0.
    let old = conf_version("0.3.1");
    let out = exec_plugin(None, &common::cni_env("CHECK", "abc", "/x", "eth0"), &old);
    assert_eq!(out.error_code(), 1);
    let out = exec_plugin(None, &[("CNI_COMMAND", "STATUS")], &conf_version("1.0.0"));
    assert_eq!(out.error_code(), 1);
}

fn conf_version(v: &str) -> String {
    conf(
        v,
        "/nonexistent/agent.sock",
        std::path::Path::new("/nonexistent"),
    )
    .to_string()
}

#[test]
fn invalid_environment_is_code_4() {
    // Missing CNI_NETNS on ADD.
    let env: Vec<_> = add_env("")
        .into_iter()
        .filter(|(k, _)| *k != "CNI_NETNS")
        .collect();
    let out = exec_plugin(None, &env, &good_conf());
    assert_eq!(out.error_code(), 4);
    assert!(out.json()["msg"].as_str().unwrap().contains("CNI_NETNS"));
    // A container ID that could escape a file name.
    let out = exec_plugin(
        None,
        &common::cni_env("ADD", "../etc", "/var/run/netns/x", "eth0"),
        &good_conf(),
    );
    assert_eq!(out.error_code(), 4);
    // An interface name the kernel would reject.
    let out = exec_plugin(
        None,
        &common::cni_env("ADD", "abc", "/var/run/netns/x", "averyveryverylongname"),
        &good_conf(),
    );
    assert_eq!(out.error_code(), 4);
    // Unknown CNI_ARGS without IgnoreUnknown.
    let mut env = add_env("/var/run/netns/x");
    env.retain(|(k, _)| *k != "CNI_ARGS");
    env.push(("CNI_ARGS", "FOO=bar"));
    assert_eq!(exec_plugin(None, &env, &good_conf()).error_code(), 4);
    // No command at all.
    assert_eq!(exec_plugin(None, &[], &good_conf()).error_code(), 4);
}

#[test]
fn a_missing_netns_fails_add_before_anything_is_allocated() {
    let out = exec_plugin(
        None,
        &add_env("/var/run/netns/does-not-exist-vnet"),
        &good_conf(),
    );
    assert_eq!(out.error_code(), 103);
    assert!(
        out.json()["msg"]
            .as_str()
            .unwrap()
            .contains("does-not-exist-vnet")
    );
}

#[test]
fn status_with_the_agent_down_is_code_50() {
    let out = exec_plugin(None, &[("CNI_COMMAND", "STATUS")], &conf_version("1.1.0"));
    assert_eq!(out.error_code(), 50);
    assert!(
        out.json()["msg"]
            .as_str()
            .unwrap()
            .contains("not reachable")
    );
}

#[test]
fn errors_are_logged_to_the_log_file_and_stdout_stays_one_document() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("vnet-cni.log");
    let mut cfg = conf("1.1.0", "/nonexistent/agent.sock", dir.path());
    cfg["logFile"] = json!(log);
    let out = exec_plugin(None, &[("CNI_COMMAND", "STATUS")], &cfg.to_string());
    assert_eq!(out.error_code(), 50);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("ERROR STATUS") && logged.contains("not reachable"),
        "{logged}"
    );
    assert!(
        logged.contains("DEBUG"),
        "debug lines go to the file too: {logged}"
    );
}
