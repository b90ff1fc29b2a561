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

/// Runs the plugin with raw environment bytes (`exec_plugin` only takes strings).
fn exec_with_raw_env(vars: &[(&[u8], &[u8])], stdin: &str) -> common::Outcome {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    use std::process::{Command, Stdio};
    let mut cmd = Command::new(common::PLUGIN);
    cmd.env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in vars {
        cmd.env(OsStr::from_bytes(k), OsStr::from_bytes(v));
    }
    common::finish(cmd, common::PLUGIN, stdin)
}

#[test]
fn non_utf8_environment_is_code_4_for_cni_variables_only() {
    // A non-UTF-8 variable the plugin does not read is ignored (it used to panic).
    let out = exec_with_raw_env(
        &[(b"CNI_COMMAND", b"VERSION"), (b"LANG_JUNK", b"caf\xe9")],
        "",
    );
    assert_eq!(out.assert_ok().json()["cniVersion"], "1.1.0");
    // A non-UTF-8 CNI_* value is an invalid environment, reported as one JSON error.
    let out = exec_with_raw_env(
        &[
            (b"CNI_COMMAND", b"ADD"),
            (b"CNI_CONTAINERID", b"abc\xff"),
            (b"CNI_NETNS", b"/var/run/netns/x"),
            (b"CNI_IFNAME", b"eth0"),
            (b"CNI_PATH", b"/opt/cni/bin"),
        ],
        &good_conf(),
    );
    assert_eq!(out.error_code(), 4);
    assert_eq!(out.json()["cniVersion"], "1.0.0");
    assert!(
        out.json()["msg"]
            .as_str()
            .unwrap()
            .contains("CNI_CONTAINERID"),
        "{:?}",
        out.json()
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

#[test]
fn del_timeout_out_of_range_is_code_7() {
    let mut cfg = conf(
        "1.0.0",
        "/nonexistent/agent.sock",
        std::path::Path::new("/nonexistent/spool"),
    );
    cfg["delTimeoutMs"] = json!(50_000);
    let out = exec_plugin(
        None,
        &common::cni_env("DEL", "abc", "", "eth0"),
        &cfg.to_string(),
    );
    assert_eq!(out.error_code(), 7);
    assert!(
        out.json()["msg"]
            .as_str()
            .unwrap()
            .contains("delTimeoutMs 50000"),
        "{:?}",
        out.json()
    );
}

#[test]
fn relative_paths_in_the_config_are_code_7_and_create_nothing() {
    use std::process::{Command, Stdio};
    let cwd = tempfile::tempdir().unwrap();
    for (field, value) in [
        ("logFile", "1.1.0"),
        ("spoolDir", "spool"),
        ("agentSocket", "agent.sock"),
    ] {
        let mut cfg = conf("1.0.0", "/nonexistent/agent.sock", cwd.path());
        cfg["spoolDir"] = json!("/nonexistent/spool");
        cfg[field] = json!(value);
        // DEL with the agent down would spool and log: the path must be refused before that.
        let mut cmd = Command::new(common::PLUGIN);
        cmd.env_clear()
            .current_dir(cwd.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in common::cni_env("DEL", "abc", "", "eth0") {
            cmd.env(k, v);
        }
        cmd.env("CNI_PATH", "/opt/cni/bin");
        let out = common::finish(cmd, common::PLUGIN, &cfg.to_string());
        assert_eq!(out.error_code(), 7, "{field}: {out:?}");
        let msg = out.json()["msg"].as_str().unwrap().to_owned();
        assert!(msg.contains(field) && msg.contains("absolute"), "{msg}");
        let left: Vec<_> = std::fs::read_dir(cwd.path()).unwrap().collect();
        assert!(left.is_empty(), "{field}: created {left:?}");
    }
}

#[test]
fn an_agent_that_dies_mid_request_is_try_again_later() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("dying.sock");
    common::dying_agent(&socket);
    let cfg = conf("1.1.0", socket.to_str().unwrap(), dir.path()).to_string();
    // CHECK asks the agent before it touches any namespace.
    let out = exec_plugin(None, &common::cni_env("CHECK", "abc", "/x", "eth0"), &cfg);
    assert_eq!(out.error_code(), 11, "{out:?}");
    let msg = out.json()["msg"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("closed the connection") && msg.contains("vnet-agent is running"),
        "{msg}"
    );
    // STATUS: the plugin cannot work now.
    let out = exec_plugin(None, &[("CNI_COMMAND", "STATUS")], &cfg);
    assert_eq!(out.error_code(), 50, "{out:?}");
}
