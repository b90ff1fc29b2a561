//! The node image under a real systemd as PID 1: a Debian tree made offline from Debian's packages
//! (debootstrap, cached in /var/cache/vnet-cni-ci), booted with `systemd-nspawn -b` inside the
//! network namespace of a lab node, so its agent talks to the lab's mock cloud as that node.
//! `install.sh` runs inside; the unit must start, the agent get ready and the conflist appear; a
//! pod's network makes uninstall refuse; an upgrade restarts the agent on the new binaries and
//! removes the old 10- conflist; uninstall --purge leaves no unit, conflist, nft table or state.
//!
//! Needs root, systemd-nspawn (systemd-container) and debootstrap.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{TempDir, repo_root, run, run_ok, stripped_binaries};
use vnet_lab::lab::{Lab, PoolConfig};

/// The Debian packages of the node tree: systemd as init, ca-certificates (the agent's HTTPS client
/// loads the system roots at start, even for a mock on http), curl for publish-conflist's readiness
/// check, nftables for the agent, iproute2 to look around.
const NODE_PACKAGES: &str =
    "systemd,systemd-sysv,dbus,ca-certificates,curl,nftables,iproute2,procps,kmod";

/// A booted container; powered off (or killed) on drop.
struct Container {
    nspawn: Child,
    /// The container's PID 1 (systemd), as the host sees it.
    init: u32,
    name: String,
    log: PathBuf,
}

impl Container {
    fn boot(root: &Path, netns: &str, name: &str, log: PathBuf) -> Container {
        let out = fs::File::create(&log).unwrap();
        let nspawn = Command::new("systemd-nspawn")
            .arg("--directory")
            .arg(root)
            .args([
                "--boot",
                // No machined and no host systemd here: no registration, no transient scope.
                "--register=no",
                "--keep-unit",
                // nspawn keeps CAP_NET_ADMIN only with --private-network; a node has it.
                "--capability=CAP_NET_ADMIN",
                "--console=pipe",
                &format!("--machine={name}"),
                &format!("--network-namespace-path=/run/netns/{netns}"),
            ])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start systemd-nspawn");
        let mut container = Container {
            init: 0,
            nspawn,
            name: name.to_owned(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = container.nspawn.try_wait() {
                panic!(
                    "systemd-nspawn exited ({status}) before the container booted:\n{}",
                    fs::read_to_string(&container.log).unwrap_or_default()
                );
            }
            let children = fs::read_to_string(format!(
                "/proc/{0}/task/{0}/children",
                container.nspawn.id()
            ))
            .unwrap_or_default();
            if let Some(pid) = children.split_whitespace().next() {
                container.init = pid.parse().unwrap();
                let state = container.exec(&["systemctl", "is-system-running"]);
                let state = String::from_utf8_lossy(&state.stdout).trim().to_owned();
                if state == "running" || state == "degraded" {
                    return container;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the container's systemd did not finish booting within 60 s:\n{}",
                fs::read_to_string(&container.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Runs a command inside every namespace of the container, as `machinectl shell` would.
    fn exec(&self, args: &[&str]) -> Output {
        let target = self.init.to_string();
        let mut all = vec!["-t", target.as_str(), "-a", "--"];
        all.extend_from_slice(args);
        run("nsenter", &all, &[])
    }

    fn sh(&self, script: &str) -> Output {
        self.exec(&["sh", "-c", script])
    }

    fn sh_ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "in the container: {script}\n{}\n--- vnet-agent journal:\n{}",
            text(&out),
            self.journal()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn journal(&self) -> String {
        let out = self.exec(&[
            "journalctl",
            "--no-pager",
            "-n",
            "60",
            "-u",
            "vnet-agent.service",
        ]);
        text(&out)
    }

    fn show(&self, property: &str) -> String {
        let out = self.exec(&[
            "systemctl",
            "show",
            "--value",
            "-p",
            property,
            "vnet-agent.service",
        ]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.init != 0 {
            let _ = self.exec(&["systemctl", "poweroff", "--no-block"]);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // Killing the container's PID 1 ends its whole PID namespace; nspawn alone would not.
        if self.init != 0 && self.nspawn.try_wait().ok().flatten().is_none() {
            // SAFETY: kill(2) on the container's init, a process this test started.
            unsafe { libc::kill(self.init as i32, libc::SIGKILL) };
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        let _ = fs::remove_dir(format!("/run/systemd/nspawn/propagate/{}", self.name));
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `release.sh --bin-dir bins --version version`: the tarball's path.
fn release(bins: &Path, out_dir: &Path, version: &str) -> PathBuf {
    let stdout = run_ok(
        "bash",
        &[
            repo_root()
                .join("deploy/node-image/release.sh")
                .to_str()
                .unwrap(),
            "--bin-dir",
            bins.to_str().unwrap(),
            "--out-dir",
            out_dir.to_str().unwrap(),
            "--version",
            version,
        ],
        &[],
    );
    PathBuf::from(stdout.lines().last().unwrap().trim())
}

/// `cnitool <op>` for a pod namespace on the node, through the container's installed plugin and
/// its agent's socket (reached from the host through the container's root).
fn cnitool(
    lab: &Lab,
    node_ns: &str,
    op: &str,
    netconf: &Path,
    cni_path: &Path,
    pod_ns: &str,
) -> Output {
    let cnitool = lab.state().cnitool;
    run(
        "ip",
        &[
            "netns",
            "exec",
            node_ns,
            cnitool.to_str().unwrap(),
            op,
            "vnet-cni",
            &format!("/var/run/netns/{pod_ns}"),
        ],
        &[
            ("NETCONFPATH", netconf.to_str().unwrap()),
            ("CNI_PATH", cni_path.to_str().unwrap()),
        ],
    )
}

#[test]
fn the_node_image_installs_runs_upgrades_and_uninstalls_under_systemd() {
    assert!(
        vnet_lab::lab::is_root(),
        "needs root: boots a container with systemd-nspawn"
    );
    assert!(
        Path::new("/usr/bin/systemd-nspawn").is_file(),
        "systemd-nspawn is not installed (tests/tools/prepare.sh installs systemd-container)"
    );
    let tree = run_ok(
        "bash",
        &[
            repo_root()
                .join("deploy/image/debian-rootfs.sh")
                .to_str()
                .unwrap(),
            "--include",
            NODE_PACKAGES,
        ],
        &[],
    );
    let tree = PathBuf::from(tree.lines().last().unwrap().trim());

    let work = TempDir::new("systemd");
    let bins = stripped_binaries(work.path(), &["vnet-cni", "vnet-agent", "vnetctl"]);
    let first = release(&bins, &work.path().join("dist-1"), "1.0.0-test");
    // The next release: a different plugin binary.
    let bins2 = work.path().join("bin-next");
    run_ok(
        "cp",
        &["-a", bins.to_str().unwrap(), bins2.to_str().unwrap()],
        &[],
    );
    let mut plugin = fs::OpenOptions::new()
        .append(true)
        .open(bins2.join("vnet-cni"))
        .unwrap();
    std::io::Write::write_all(&mut plugin, b"\nnext release\n").unwrap();
    drop(plugin);
    let second = release(&bins2, &work.path().join("dist-2"), "1.0.1-test");

    // The node's network and the mock cloud; the lab's own agent for node-1 makes way for ours.
    let pool = PoolConfig {
        warm: 2,
        batch: 2,
        ..PoolConfig::default()
    };
    let guard = common::lab("systemd", 1, pool, None);
    let lab: &Lab = &guard;
    let st = lab.state();
    let node = st.nodes[0].clone();
    lab.signal_agent(&node.name, libc::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while lab.agent_pid(&node.name).is_some_and(|p| {
        !fs::read_to_string(format!("/proc/{p}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
    }) {
        assert!(Instant::now() < deadline, "the lab agent did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }

    let root = work.path().join("root");
    fs::create_dir_all(&root).unwrap();
    run_ok(
        "tar",
        &["-xf", tree.to_str().unwrap(), "-C", root.to_str().unwrap()],
        &[],
    );
    for t in [&first, &second] {
        fs::copy(t, root.join("root").join(t.file_name().unwrap())).unwrap();
    }
    // The mock admits each node's agent by its token: take node-1's from the lab's config.
    let lab_config = fs::read_to_string(&node.config_path).unwrap();
    let token = lab_config
        .lines()
        .find_map(|l| l.trim().strip_prefix("test_token = "))
        .unwrap_or_else(|| panic!("no test_token in the lab's agent config:\n{lab_config}"))
        .to_owned();
    // The operator's configuration, written before install (install.sh keeps an existing one).
    fs::create_dir_all(root.join("etc/vnet-cni")).unwrap();
    fs::write(
        root.join("etc/vnet-cni/agent.toml"),
        format!(
            "[cloud]\nprovider = \"mock\"\narm_endpoint = \"http://{0}\"\nimds_endpoint = \"http://{0}\"\n\
             credential = \"test_token\"\ntest_token = {1}\n\n[pool]\nwarm = 2\nbatch = 2\n",
            st.mock_addr, token
        ),
    )
    .unwrap();

    let name = format!("vnt-sd-{}", std::process::id());
    let c = Container::boot(&root, &node.ns, &name, work.path().join("console.log"));
    let pid1 = c.sh_ok("cat /proc/1/comm");
    assert_eq!(pid1.trim(), "systemd", "systemd is PID 1 in the container");

    // --- install: the unit starts, the agent gets ready, the conflist appears ----------------
    let install = |tarball: &Path| {
        let name = tarball.file_name().unwrap().to_str().unwrap();
        let dir = name.trim_end_matches(".tar.gz");
        c.sh_ok(&format!(
            "cd /root && rm -rf {dir} && tar -xzf {name} && ./{dir}/install.sh 2>&1"
        ))
    };
    let out = install(&first);
    assert!(out.contains("starting vnet-agent.service"), "{out}");
    assert_eq!(c.show("ActiveState"), "active", "{}", c.journal());
    assert_eq!(c.show("LimitNOFILE"), "65536");
    assert_eq!(c.show("TimeoutStopUSec"), "15s");
    let health = c.sh_ok("curl -fsS --unix-socket /run/vnet-cni/agent.sock http://agent/v1/health");
    assert!(health.contains("\"ready\":true"), "{health}");
    let conflist = root.join("etc/cni/net.d/00-vnet-cni.conflist");
    assert_eq!(
        fs::read(&conflist).unwrap(),
        fs::read(root.join("etc/vnet-cni/00-vnet-cni.conflist")).unwrap(),
        "the published conflist is the template"
    );
    for plugin in ["vnet-cni", "loopback", "portmap"] {
        assert!(
            root.join("opt/cni/bin").join(plugin).is_file(),
            "{plugin} installed"
        );
    }
    let tables = run_ok(
        "ip",
        &["netns", "exec", &node.ns, "nft", "list", "tables"],
        &[],
    );
    assert!(
        tables.contains("table ip vnet-cni"),
        "the agent's table: {tables}"
    );

    // --- a pod on the node: uninstall refuses and changes nothing ----------------------------
    let netconf = work.path().join("net.d");
    fs::create_dir_all(&netconf).unwrap();
    let socket = format!("/proc/{}/root/run/vnet-cni/agent.sock", c.init);
    fs::write(
        netconf.join("00-vnet-cni.conflist"),
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "vnet-cni",
            "plugins": [{
                "type": "vnet-cni",
                "agentSocket": socket,
                "spoolDir": root.join("var/lib/vnet-cni/spool"),
            }],
        })
        .to_string(),
    )
    .unwrap();
    let cni_path = root.join("opt/cni/bin");
    let pod_ns = format!("{}-sdpod", st.token);
    run_ok("ip", &["netns", "add", &pod_ns], &[]);
    let add = cnitool(lab, &node.ns, "add", &netconf, &cni_path, &pod_ns);
    let cleanup_pod = || {
        let _ = cnitool(lab, &node.ns, "del", &netconf, &cni_path, &pod_ns);
        let _ = run("ip", &["netns", "del", &pod_ns], &[]);
    };
    if !add.status.success() {
        cleanup_pod();
        panic!(
            "pod ADD through the container's agent failed:\n{}\n{}",
            text(&add),
            c.journal()
        );
    }
    let refused = c.sh("/usr/local/libexec/vnet-cni/install.sh uninstall 2>&1");
    let refused_text = text(&refused);
    let still_active = c.show("ActiveState");
    let conflist_kept = conflist.exists();
    cleanup_pod();
    assert!(
        !refused.status.success(),
        "uninstall went ahead with a pod running:\n{refused_text}"
    );
    assert!(refused_text.contains("drain"), "{refused_text}");
    assert_eq!(
        still_active, "active",
        "a refused uninstall stopped the agent"
    );
    assert!(conflist_kept, "a refused uninstall removed the conflist");

    // --- upgrade: new plugin by rename, agent restarted, old 10- conflist removed -------------
    let legacy = root.join("etc/cni/net.d/10-vnet-cni.conflist");
    fs::copy(&conflist, &legacy).unwrap();
    let pid_before = c.show("MainPID");
    let out = install(&second);
    assert!(out.contains("restarting vnet-agent.service"), "{out}");
    assert_eq!(c.show("ActiveState"), "active", "{}", c.journal());
    assert_ne!(c.show("MainPID"), pid_before, "the agent was restarted");
    assert_eq!(
        common::sha256(&root.join("opt/cni/bin/vnet-cni")),
        common::sha256(&bins2.join("vnet-cni")),
        "the new plugin is in place"
    );
    assert!(
        !legacy.exists(),
        "the old 10-vnet-cni.conflist is removed on upgrade"
    );
    assert!(conflist.exists());
    let version = fs::read_to_string(root.join("usr/local/share/doc/vnet-cni/VERSION")).unwrap();
    assert!(version.starts_with("vnet-cni 1.0.1-test"), "{version}");

    // --- uninstall --purge: nothing of ours is left ---------------------------------------------
    let out = c.sh_ok("/usr/local/libexec/vnet-cni/install.sh uninstall --purge 2>&1");
    assert!(out.contains("uninstalled"), "{out}");
    let load = c.show("LoadState");
    assert_eq!(load, "not-found", "the unit is gone");
    assert!(!conflist.exists(), "conflist removed");
    for gone in [
        "usr/local/bin/vnet-agent",
        "opt/cni/bin/vnet-cni",
        "opt/cni/bin/loopback",
        "opt/cni/bin/portmap",
        "etc/systemd/system/vnet-agent.service",
        "var/lib/vnet-cni",
        "etc/vnet-cni",
    ] {
        assert!(
            !root.join(gone).exists(),
            "{gone} is left after uninstall --purge"
        );
    }
    let tables = run_ok(
        "ip",
        &["netns", "exec", &node.ns, "nft", "list", "tables"],
        &[],
    );
    assert!(!tables.contains("vnet-cni"), "nft table left: {tables}");
    drop(c);
    drop(guard);
}
