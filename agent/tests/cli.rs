//! The binary's command line: configuration errors name the key and exit 2.

use std::process::Command;

fn agent(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vnet-agent"));
    cmd.args(args);
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
