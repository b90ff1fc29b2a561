//! The binary's command line: configuration errors name the key and exit 2.

use std::process::Command;

fn agent(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vnet-agent"));
    cmd.args(args).env_remove("KUBERNETES_SERVICE_HOST");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run vnet-agent");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn invalid_configuration_names_the_key_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    let path_str = path.to_str().unwrap();

    std::fs::write(&path, "[pool]\nwram = 4\n").unwrap();
    let (code, _, err) = agent(&["--config", path_str, "--check-config"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("wram"), "{err}");

    std::fs::write(&path, "[pool]\nmax = 999\n").unwrap();
    let (code, _, err) = agent(&["--config", path_str, "--check-config"], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("pool.max") && err.contains("1 to 255"),
        "{err}"
    );

    std::fs::write(&path, "").unwrap();
    let (code, _, err) = agent(
        &["--config", path_str, "--check-config"],
        &[("VNET_AGENT_LOG_FORMAT", "xml")],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("VNET_AGENT_LOG_FORMAT") && err.contains("json"),
        "{err}"
    );

    let (code, _, err) = agent(&["--config", "/nonexistent/agent.toml"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/agent.toml"), "{err}");
}

#[test]
fn print_config_shows_file_env_and_flags_merged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "mtu = 1400\n[pool]\nwarm = 3\n").unwrap();
    let (code, out, err) = agent(
        &[
            "--config",
            path.to_str().unwrap(),
            "--log-level",
            "debug",
            "--print-config",
        ],
        &[("VNET_AGENT_MTU", "9000")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("mtu = 9000"), "{out}");
    assert!(out.contains("log_level = \"debug\""), "{out}");
    assert!(out.contains("warm = 3"), "{out}");
}

#[test]
fn json_logs_and_sigterm_during_start_up_exit_0() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    // Nothing listens on port 1: discovery keeps failing and retrying.
    let toml = format!(
        "socket_path = \"{0}/run/agent.sock\"\nstate_dir = \"{0}/state\"\nmetrics_address = \"127.0.0.1:0\"\nmanage_host = false\nlog_format = \"json\"\n[cloud]\nprovider = \"mock\"\narm_endpoint = \"http://127.0.0.1:1\"\nimds_endpoint = \"http://127.0.0.1:1/vms/node-1\"\n",
        dir.path().display()
    );
    std::fs::write(&path, toml).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vnet-agent"))
        .args(["--config", path.to_str().unwrap()])
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().expect("a log line").unwrap();
    let parsed: serde_json::Value =
        serde_json::from_str(&first).unwrap_or_else(|e| panic!("not JSON ({e}): {first}"));
    assert!(parsed["level"].is_string(), "{first}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}: {rest:?}");
    assert!(!dir.path().join("run/agent.sock").exists());
}

#[test]
fn a_kubeconfig_that_cannot_be_read_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    let toml = format!(
        "socket_path = \"{0}/run/agent.sock\"\nstate_dir = \"{0}/state\"\nmetrics_address = \"127.0.0.1:0\"\nmanage_host = false\n[cloud]\nprovider = \"mock\"\narm_endpoint = \"http://127.0.0.1:1\"\nimds_endpoint = \"http://127.0.0.1:1/vms/node-1\"\n",
        dir.path().display()
    );
    std::fs::write(&path, toml).unwrap();
    let (code, _, err) = agent(
        &[
            "--config",
            path.to_str().unwrap(),
            "--kubeconfig",
            "/nonexistent/kubeconfig",
        ],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("/nonexistent/kubeconfig"), "{err}");
}

#[test]
fn cni_conf_dir_is_optional_and_must_be_absolute() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "").unwrap();
    let path_str = path.to_str().unwrap();
    let (code, out, err) = agent(&["--config", path_str, "--print-config"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("cni_conf_dir"), "{out}");

    std::fs::write(&path, "cni_conf_dir = \"/etc/cni/net.d\"\n").unwrap();
    let (code, out, err) = agent(&["--config", path_str, "--print-config"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cni_conf_dir = \"/etc/cni/net.d\""), "{out}");

    std::fs::write(&path, "cni_conf_dir = \"net.d\"\n").unwrap();
    let (code, _, err) = agent(&["--config", path_str, "--check-config"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("cni_conf_dir"), "{err}");
}
