//! The container image (deploy/Dockerfile, deploy/image/): built with Debian's docker.io engine and no
//! registry, then run the way the DaemonSet runs it. The engine is private to the test: its own data
//! root, exec root and socket, no bridge, no iptables, no IP forwarding, so the host's network is
//! untouched; it is stopped and its data removed at the end, also when the test fails.
//!
//! Needs root, dockerd (docker.io) and debootstrap; the image's Debian base is cached in
//! /var/cache/vnet-cni-ci (first build: about two minutes of debootstrap).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{TempDir, repo_root, run, run_ok, stripped_binaries};

/// The engine's own client (Debian's, matching the daemon's API version).
const DOCKER: &str = "/usr/bin/docker";

/// A dockerd of our own; stopped, its mounts undone and its directory removed on drop.
struct Dockerd {
    child: Child,
    dir: TempDir,
    /// What dockerd creates on the host whatever its roots (the trust key in /etc/docker, its
    /// managed containerd's /opt/containerd): removed again unless they were there before.
    host_residue: Vec<&'static str>,
}

const HOST_RESIDUE: [&str; 2] = ["/etc/docker", "/opt/containerd"];

impl Dockerd {
    fn start() -> Dockerd {
        assert!(
            Path::new("/usr/sbin/dockerd").is_file() && Path::new(DOCKER).is_file(),
            "dockerd and docker are not installed (tests/tools/prepare.sh installs docker.io)"
        );
        let host_residue = HOST_RESIDUE
            .into_iter()
            .filter(|p| !Path::new(p).exists())
            .collect();
        let dir = TempDir::new("dockerd");
        let d = dir.path().to_path_buf();
        let d = d.as_path();
        fs::write(d.join("daemon.json"), "{}\n").unwrap();
        let log = fs::File::create(d.join("dockerd.log")).unwrap();
        let child = Command::new("/usr/sbin/dockerd")
            .arg("--config-file")
            .arg(d.join("daemon.json"))
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", d.join("docker.sock").display()))
            // Nothing of the host's network changes: no docker0, no NAT rules, no forwarding.
            .args([
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
                "--ip-forward=false",
                "--ip-masq=false",
                "--log-level=warn",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        let dockerd = Dockerd {
            child,
            dir,
            host_residue,
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if dockerd.docker(&["version"]).status.success() {
                return dockerd;
            }
            assert!(
                Instant::now() < deadline,
                "dockerd did not answer within 90 s; its log:\n{}",
                fs::read_to_string(d.join("dockerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn host(&self) -> String {
        format!("unix://{}", self.dir.path().join("docker.sock").display())
    }

    fn docker(&self, args: &[&str]) -> Output {
        run(DOCKER, args, &[("DOCKER_HOST", &self.host())])
    }

    fn docker_ok(&self, args: &[&str]) -> String {
        run_ok(DOCKER, args, &[("DOCKER_HOST", &self.host())])
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Whatever dockerd (or its containerd) left mounted under its roots, deepest first.
        let prefix = self.dir.path().to_string_lossy().into_owned();
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in ours {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        for p in &self.host_residue {
            let _ = fs::remove_dir_all(p);
        }
        // The TempDir then removes the data root.
    }
}

/// name -> (inode, mtime, mode, sha256) of every entry in `dir`, hidden ones included.
fn listing(dir: &Path) -> BTreeMap<String, (u64, i64, u32, String)> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            let sum = common::sha256(&e.path());
            (
                e.file_name().to_string_lossy().into_owned(),
                (
                    meta.ino(),
                    meta.mtime_nsec() + meta.mtime() * 1_000_000_000,
                    meta.permissions().mode() & 0o7777,
                    sum,
                ),
            )
        })
        .collect()
}

/// The DaemonSet's install-cni init container: the image's /opt/vnet-cni/install-cni with the
/// host's CNI binary directory bind-mounted at /host/opt/cni/bin.
fn install_cni(docker: &Dockerd, image: &str, host_dir: &Path) -> Output {
    docker.docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--cap-drop",
        "ALL",
        "-v",
        &format!("{}:/host/opt/cni/bin", host_dir.display()),
        "--entrypoint",
        "/opt/vnet-cni/install-cni",
        image,
    ])
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A reference plugin answers the CNI VERSION command (it runs, and it is the plugin it says).
fn answers_cni_version(plugin: &Path) {
    let out = Command::new(plugin)
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", plugin.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("supportedVersions"),
        "{} VERSION: {}",
        plugin.display(),
        text(&out)
    );
}

#[test]
fn the_image_builds_offline_installs_the_plugins_atomically_and_runs_the_agent() {
    assert!(
        vnet_lab::lab::is_root(),
        "needs root: runs a private dockerd (run `cargo test` as root)"
    );
    let work = TempDir::new("image");
    let bins = stripped_binaries(
        work.path(),
        &["vnet-cni", "vnet-agent", "vnetctl", "vnet-mockcloud"],
    );
    let docker = Dockerd::start();
    let tag = format!("vnet-cni:test-{}", std::process::id());
    let build = run(
        "bash",
        &[
            repo_root().join("deploy/image/build.sh").to_str().unwrap(),
            "--bin-dir",
            bins.to_str().unwrap(),
            "--tag",
            &tag,
        ],
        &[("DOCKER", DOCKER), ("DOCKER_HOST", &docker.host())],
    );
    assert!(
        build.status.success(),
        "image build failed:\n{}",
        text(&build)
    );
    assert_eq!(
        String::from_utf8_lossy(&build.stdout).lines().last(),
        Some(tag.as_str())
    );
    // Built from the locally imported Debian base, never pulled.
    let images = docker.docker_ok(&["images", "--format", "{{.Repository}}:{{.Tag}}"]);
    assert!(
        images.lines().any(|l| l.starts_with("vnet-cni-base:")),
        "{images}"
    );

    // --- install-cni into an empty host directory -------------------------------------------
    let host_bin = work.path().join("host-opt-cni-bin");
    fs::create_dir_all(&host_bin).unwrap();
    let out = install_cni(&docker, &tag, &host_bin);
    assert!(out.status.success(), "install-cni failed:\n{}", text(&out));
    let first = listing(&host_bin);
    assert_eq!(
        first.keys().cloned().collect::<Vec<_>>(),
        ["loopback", "portmap", "vnet-cni"],
        "exactly the three plugins, no temp file left:\n{}",
        text(&out)
    );
    assert_eq!(
        first["vnet-cni"].3,
        common::sha256(&bins.join("vnet-cni")),
        "the plugin is the build's"
    );
    for (name, (_, _, mode, _)) in &first {
        assert_eq!(*mode, 0o755, "{name} is executable");
    }
    answers_cni_version(&host_bin.join("loopback"));
    answers_cni_version(&host_bin.join("portmap"));

    // --- twice: nothing changes (no rename, no rewrite) --------------------------------------
    let out = install_cni(&docker, &tag, &host_bin);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        listing(&host_bin),
        first,
        "a second run changed the directory"
    );
    assert!(
        text(&out).contains("vnet-cni is up to date"),
        "{}",
        text(&out)
    );

    // --- an upgrade replaces the plugin by rename, and keeps the node's own plugins ----------
    let node_dir = work.path().join("node-opt-cni-bin");
    fs::create_dir_all(&node_dir).unwrap();
    let old_plugin = node_dir.join("vnet-cni");
    fs::write(&old_plugin, "#!/bin/sh\necho old release\n").unwrap();
    fs::set_permissions(&old_plugin, fs::Permissions::from_mode(0o755)).unwrap();
    // A second name for the old file: if install-cni wrote into the file instead of renaming a
    // new one over it, a runtime executing it meanwhile could see half a binary; this name shows
    // which happened.
    fs::hard_link(&old_plugin, node_dir.join("held-by-a-running-exec")).unwrap();
    let own_portmap = "#!/bin/sh\necho the node's own portmap\n";
    fs::write(node_dir.join("portmap"), own_portmap).unwrap();
    fs::set_permissions(node_dir.join("portmap"), fs::Permissions::from_mode(0o755)).unwrap();
    let old_inode = fs::metadata(&old_plugin).unwrap().ino();
    let out = install_cni(&docker, &tag, &node_dir);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        common::sha256(&old_plugin),
        common::sha256(&bins.join("vnet-cni"))
    );
    assert_ne!(
        fs::metadata(&old_plugin).unwrap().ino(),
        old_inode,
        "renamed into place"
    );
    assert_eq!(
        fs::read_to_string(node_dir.join("held-by-a-running-exec")).unwrap(),
        "#!/bin/sh\necho old release\n",
        "the old file was never written to"
    );
    assert_eq!(
        fs::read_to_string(node_dir.join("portmap")).unwrap(),
        own_portmap,
        "the node's own portmap is kept"
    );
    answers_cni_version(&node_dir.join("loopback"));
    let names: Vec<String> = listing(&node_dir).into_keys().collect();
    assert_eq!(
        names,
        ["held-by-a-running-exec", "loopback", "portmap", "vnet-cni"],
        "no temp file left"
    );

    // --- no host directory mounted: a clear error, not a silent success -----------------------
    let out = docker.docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "/opt/vnet-cni/install-cni",
        &tag,
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("is not a directory"), "{}", text(&out));

    // --- the agent container: --version and --check-config ------------------------------------
    let out = docker.docker_ok(&["run", "--rm", "--network", "none", &tag, "--version"]);
    assert_eq!(
        out.trim(),
        format!("vnet-agent {}", env!("CARGO_PKG_VERSION"))
    );
    let config_dir = work.path().join("etc-vnet-cni");
    fs::create_dir_all(&config_dir).unwrap();
    fs::copy(
        repo_root().join("deploy/node-image/agent.toml"),
        config_dir.join("agent.toml"),
    )
    .unwrap();
    let mount = format!("{}:/etc/vnet-cni:ro", config_dir.display());
    let check = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "--rm",
            "--network",
            "none",
            "--read-only",
            "-v",
            &mount,
            &tag,
        ];
        args.extend_from_slice(extra);
        docker.docker(&args)
    };
    // The image's default command with --check-config: the shipped config is valid.
    let out = check(&["--config", "/etc/vnet-cni/agent.toml", "--check-config"]);
    assert!(out.status.success(), "{}", text(&out));
    fs::write(config_dir.join("agent.toml"), "mtu = \"big\"\n").unwrap();
    let out = check(&["--config", "/etc/vnet-cni/agent.toml", "--check-config"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("mtu"),
        "names the bad key: {}",
        text(&out)
    );

    // What the agent and the sysctls init container call inside the image.
    let nft = docker.docker_ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "nft",
        &tag,
        "--version",
    ]);
    assert!(nft.starts_with("nftables v"), "{nft}");
    let sysctl = docker.docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "sysctl",
        &tag,
        "--version",
    ]);
    assert!(sysctl.status.success(), "{}", text(&sysctl));
    // The agent's HTTPS client loads the system's root certificates at start: without them it
    // cannot even build its cloud client.
    let roots = docker.docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "test",
        &tag,
        "-s",
        "/etc/ssl/certs/ca-certificates.crt",
    ]);
    assert!(roots.status.success(), "no CA roots in the image");
    // The kind fabric (deploy/kind/fabric.yaml) runs its route loop in this image.
    let fabric_tools = docker.docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "sh",
        &tag,
        "-c",
        "for t in wget ip awk tr; do command -v $t >/dev/null || { echo missing $t; exit 1; }; done",
    ]);
    assert!(
        fabric_tools.status.success(),
        "the kind fabric's tools: {}",
        text(&fabric_tools)
    );

    // --- the uninstall DaemonSet's command, with its privileges (NET_ADMIN only) --------------
    let host = work.path().join("uninstall-host");
    for d in ["etc/cni/net.d", "var/lib/vnet-cni", "run/vnet-cni"] {
        fs::create_dir_all(host.join(d)).unwrap();
    }
    let ours =
        "{\"cniVersion\":\"1.0.0\",\"name\":\"vnet-cni\",\"plugins\":[{\"type\":\"vnet-cni\"}]}\n";
    fs::write(host.join("etc/cni/net.d/00-vnet-cni.conflist"), ours).unwrap();
    fs::write(host.join("etc/cni/net.d/10-vnet-cni.conflist"), ours).unwrap();
    fs::write(
        host.join("etc/cni/net.d/05-other.conflist"),
        "{\"name\":\"other\"}\n",
    )
    .unwrap();
    let mounts: Vec<String> = ["etc/cni/net.d", "var/lib/vnet-cni", "run/vnet-cni"]
        .iter()
        .map(|d| format!("{}:/{d}", host.join(d).display()))
        .collect();
    let mut args = vec![
        "run",
        "--rm",
        "--network",
        "none",
        "--cap-drop",
        "ALL",
        "--cap-add",
        "NET_ADMIN",
    ];
    for m in &mounts {
        args.extend(["-v", m.as_str()]);
    }
    args.extend([tag.as_str(), "uninstall", "--purge"]);
    let out = docker.docker(&args);
    assert!(
        out.status.success(),
        "vnet-agent uninstall in the image: {}",
        text(&out)
    );
    let left: Vec<String> = listing(&host.join("etc/cni/net.d")).into_keys().collect();
    assert_eq!(
        left,
        ["05-other.conflist"],
        "only another network's conflist stays"
    );
    assert!(
        !host
            .join("var/lib/vnet-cni")
            .read_dir()
            .unwrap()
            .any(|_| true),
        "purged"
    );

    docker.docker_ok(&["rmi", &tag]);
}
