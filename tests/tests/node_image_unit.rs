//! The node image's systemd unit, agent config and scripts: the unit's settings and hardening
//! (`systemd-analyze verify`), the shipped agent.toml, the scripts' syntax, and publish-conflist
//! (published only once the agent is ready, the old 10- name removed, a warning when another
//! conflist sorts first).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;

mod common;

use common::node_image::*;

/// `Key=Value` lines of a unit file (later lines win, as for systemd's single-value settings).
fn unit_settings(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with('[') || line.is_empty() {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            settings
                .entry(key.to_owned())
                .or_default()
                .push(value.to_owned());
        }
    }
    settings
}

#[test]
fn the_unit_is_hardened_and_passes_systemd_analyze_verify() {
    let pkg = package();
    let unit_text = fs::read_to_string(pkg.dir.join("systemd/vnet-agent.service")).unwrap();
    let settings = unit_settings(&unit_text);
    let one = |key: &str| -> String {
        settings
            .get(key)
            .and_then(|v| v.last())
            .unwrap_or_else(|| panic!("the unit sets {key}"))
            .clone()
    };
    let words =
        |key: &str| -> BTreeSet<String> { one(key).split_whitespace().map(String::from).collect() };

    // What a reviewer of the unit checks.
    assert_eq!(one("Type"), "exec", "the agent has no sd_notify");
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(
        one("ExecStart"),
        "/usr/local/bin/vnet-agent --config /etc/vnet-cni/agent.toml $VNET_AGENT_ARGS",
        "extra flags (--kubeconfig) come from agent.env"
    );
    assert_eq!(one("EnvironmentFile"), "-/etc/vnet-cni/agent.env");
    // A slow cloud must not hold up the runtime, the kubelet or hostNetwork pods: the conflist
    // (published once the agent is ready) already keeps pods off the node.
    assert!(
        !settings.contains_key("Before"),
        "the unit orders itself before nothing: {:?}",
        settings.get("Before")
    );
    // The agent stops within 10 s of SIGTERM; systemd waits a little longer before SIGKILL.
    assert_eq!(one("TimeoutStopSec"), "15s");
    assert_eq!(one("LimitNOFILE"), "65536");
    assert!(words("After").contains("network-online.target"));
    assert!(words("Wants").contains("network-online.target"));
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(
        one("CapabilityBoundingSet"),
        "CAP_NET_ADMIN",
        "only CAP_NET_ADMIN"
    );
    assert_eq!(one("AmbientCapabilities"), "CAP_NET_ADMIN");
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(
        words("ReadWritePaths"),
        ["/var/lib/vnet-cni", "/run/vnet-cni", "-/etc/cni/net.d"]
            .into_iter()
            .map(String::from)
            .collect(),
        "writable: state, socket and CNI config directories only"
    );
    for (key, value) in [
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("StateDirectory", "vnet-cni"),
        ("RuntimeDirectory", "vnet-cni"),
        ("WantedBy", "multi-user.target"),
    ] {
        assert_eq!(one(key), value, "{key}");
    }
    assert_eq!(
        words("RestrictAddressFamilies"),
        ["AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6"]
            .into_iter()
            .map(String::from)
            .collect()
    );
    // Forwarding comes from the shipped sysctl drop-in, applied with full privileges.
    assert_eq!(
        one("ExecStartPre"),
        "+/usr/lib/systemd/systemd-sysctl /etc/sysctl.d/90-vnet-cni.conf"
    );
    let sysctl = fs::read_to_string(pkg.dir.join("sysctl/90-vnet-cni.conf")).unwrap();
    assert!(
        sysctl
            .lines()
            .any(|l| l.trim() == "net.ipv4.ip_forward = 1"),
        "{sysctl}"
    );

    if !have("systemd-analyze") {
        eprintln!(
            "node_image: SKIPPED only the `systemd-analyze verify` check: systemd-analyze is not \
             installed here (Debian package `systemd`)"
        );
        return;
    }
    // verify checks that every Exec binary exists, so the unit is checked as installed into a
    // temporary root, with its /usr/local paths pointing there.
    let tmp = TempDir::new("verify");
    let root = tmp.path().join("root");
    install_ok(&pkg.dir, &root, &[]);
    let installed = fs::read_to_string(root.join(UNIT_PATH.trim_start_matches('/'))).unwrap();
    let relocated = installed
        .lines()
        .map(|line| {
            if line.starts_with("Exec") {
                line.replace("/usr/local/", &format!("{}/usr/local/", root.display()))
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let unit_dir = tmp.path().join("units");
    fs::create_dir_all(&unit_dir).unwrap();
    let unit_file = unit_dir.join("vnet-agent.service");
    fs::write(&unit_file, relocated + "\n").unwrap();
    let out = run(
        "systemd-analyze",
        &["verify", "--man=no", unit_file.to_str().unwrap()],
        &[("SYSTEMD_LOG_COLOR", "0")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("vnet-agent.service:"),
        "systemd-analyze verify failed ({}):\n{stderr}",
        out.status
    );
    // The exposure score, for the record (reported, not asserted).
    let security = run(
        "systemd-analyze",
        &[
            "security",
            "--offline=yes",
            "--no-pager",
            unit_file.to_str().unwrap(),
        ],
        &[],
    );
    if let Some(score) = String::from_utf8_lossy(&security.stdout)
        .lines()
        .find(|l| l.contains("Overall exposure level"))
    {
        eprintln!("node_image: systemd-analyze security: {}", score.trim());
    }
}

/// `vnet-agent --config FILE --print-config`, without `VNET_AGENT_*` overrides from the caller.
fn agent_effective_config(agent: &Path, config: &Path) -> String {
    let mut command = Command::new("timeout");
    command
        .arg(COMMAND_TIMEOUT_SECS.to_string())
        .arg(agent)
        .arg("--config")
        .arg(config)
        .arg("--print-config");
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("VNET_AGENT_")) {
        command.env_remove(key);
    }
    let out = command.output().expect("run vnet-agent");
    assert!(
        out.status.success(),
        "vnet-agent rejects {}: {}",
        config.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_shipped_agent_config_is_valid_and_states_the_agents_defaults() {
    let agent = vnet_lab::lab::default_bin_dir().join("vnet-agent");
    assert!(
        agent.is_file(),
        "vnet-agent not built at {}: run `cargo build --workspace --bins` first",
        agent.display()
    );
    let template = node_image_dir().join("agent.toml");
    let check = run(
        agent.to_str().unwrap(),
        &["--config", template.to_str().unwrap(), "--check-config"],
        &[],
    );
    assert!(
        check.status.success(),
        "vnet-agent --check-config rejects the shipped agent.toml: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    // The template says its values are the defaults: the agent must agree.
    assert_eq!(
        agent_effective_config(&agent, &template),
        agent_effective_config(&agent, Path::new("/dev/null")),
        "deploy/node-image/agent.toml differs from the agent's defaults"
    );
}

#[test]
fn the_scripts_are_valid_shell() {
    let dir = node_image_dir();
    for (shell, script) in [
        ("sh", "install.sh"),
        ("sh", "publish-conflist"),
        ("bash", "release.sh"),
    ] {
        run_ok(shell, &["-n", dir.join(script).to_str().unwrap()], &[]);
    }
    if have("shellcheck") {
        for script in ["install.sh", "publish-conflist", "release.sh"] {
            run_ok("shellcheck", &[dir.join(script).to_str().unwrap()], &[]);
        }
    } else {
        eprintln!("node_image: shellcheck is not installed; only `sh -n` syntax checks ran");
    }
    let help = run_ok(
        "sh",
        &[package().dir.join("install.sh").to_str().unwrap(), "--help"],
        &[],
    );
    assert!(
        help.contains("uninstall") && help.contains("--destdir"),
        "{help}"
    );
    let bad = install_sh(&package().dir, &["--frobnicate"]);
    assert!(!bad.status.success(), "an unknown option is an error");
}

/// A one-shot HTTP server on a Unix socket answering `GET /v1/health` with `ready`.
fn serve_health(listener: UnixListener, ready: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut request = [0u8; 1024];
            let n = stream.read(&mut request).unwrap_or(0);
            if n == 0 {
                // The test's wake-up connection: stop serving.
                return;
            }
            let body = format!("{{\"ready\":{ready},\"version\":\"test\"}}");
            let status = if ready {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    })
}

#[test]
fn the_conflist_is_published_only_once_the_agent_is_ready() {
    let pkg = package();
    let tmp = TempDir::new("publish");
    let socket = tmp.path().join("agent.sock");
    let agent_config = tmp.path().join("agent.toml");
    fs::write(
        &agent_config,
        format!("socket_path = \"{}\"\n", socket.display()),
    )
    .unwrap();
    let net_d = tmp.path().join("net.d");
    fs::create_dir_all(&net_d).unwrap();
    let template = pkg.dir.join("etc/00-vnet-cni.conflist");
    let publish = pkg.dir.join("libexec/publish-conflist");
    let state_dir = tmp.path().join("state");
    fs::create_dir_all(&state_dir).unwrap();
    let envs = [
        ("VNET_STATE_DIR", state_dir.to_str().unwrap()),
        ("VNET_CONFLIST_TEMPLATE", template.to_str().unwrap()),
        ("VNET_CNI_CONF_DIR", net_d.to_str().unwrap()),
        ("VNET_AGENT_CONFIG", agent_config.to_str().unwrap()),
        ("VNET_PUBLISH_TIMEOUT", "2"),
    ];
    let published = net_d.join("00-vnet-cni.conflist");

    // No agent: nothing is published, and the unit's start fails (so systemd retries).
    let out = run("sh", &[publish.to_str().unwrap()], &envs);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not ready"));
    assert!(!published.exists());

    let with_curl = have("curl");
    if with_curl {
        // An agent that is up but not ready yet: still nothing.
        let listener = UnixListener::bind(&socket).unwrap();
        let server = serve_health(listener, false);
        let out = run("sh", &[publish.to_str().unwrap()], &envs);
        assert!(
            !out.status.success(),
            "published before the agent was ready"
        );
        assert!(!published.exists());
        let _ = std::os::unix::net::UnixStream::connect(&socket);
        server.join().unwrap();
        fs::remove_file(&socket).unwrap();
    } else {
        eprintln!(
            "node_image: curl is not installed; publish-conflist falls back to the socket's existence"
        );
    }

    // What an earlier release published under the old name, which sorts after other CNIs'.
    let legacy = net_d.join("10-vnet-cni.conflist");
    fs::copy(&template, &legacy).unwrap();

    // A ready agent: the conflist appears, identical to the template, the old one goes, and no
    // temp file stays.
    let listener = UnixListener::bind(&socket).unwrap();
    let server = serve_health(listener, true);
    run_ok("sh", &[publish.to_str().unwrap()], &envs);
    assert_eq!(fs::read(&published).unwrap(), fs::read(&template).unwrap());
    assert_eq!(mode(&published), 0o644);
    let names: Vec<_> = fs::read_dir(&net_d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["00-vnet-cni.conflist"]);

    // A new release's template replaces what this script published before.
    let new_template = tmp.path().join("00-vnet-cni.conflist");
    let new_text = fs::read_to_string(&template).unwrap().replace(
        "\"type\": \"vnet-cni\"",
        "\"type\": \"vnet-cni\",\n      \"logLevel\": \"info\"",
    );
    fs::write(&new_template, &new_text).unwrap();
    let mut new_envs = envs;
    new_envs[1] = ("VNET_CONFLIST_TEMPLATE", new_template.to_str().unwrap());
    run_ok("sh", &[publish.to_str().unwrap()], &new_envs);
    assert_eq!(fs::read_to_string(&published).unwrap(), new_text);

    // A conflist the agent (or an operator) wrote is theirs: left alone.
    let agents = "{\"cniVersion\":\"1.0.0\",\"name\":\"vnet-cni\",\"plugins\":[{\"type\":\"vnet-cni\",\"mtu\":1400}]}\n";
    fs::write(&published, agents).unwrap();
    let output = run_ok("sh", &[publish.to_str().unwrap()], &envs);
    assert!(output.contains("leaving it"), "{output}");
    assert_eq!(fs::read_to_string(&published).unwrap(), agents);

    // Another CNI's file that sorts first would win: the journal says so.
    fs::write(
        net_d.join("00-aaa-other.conflist"),
        "{\"name\":\"other\"}\n",
    )
    .unwrap();
    let out = run("sh", &[publish.to_str().unwrap()], &envs);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning")
            && stderr.contains("00-aaa-other.conflist sorts before 00-vnet-cni.conflist"),
        "{stderr}"
    );
    let _ = std::os::unix::net::UnixStream::connect(&socket);
    server.join().unwrap();
}
