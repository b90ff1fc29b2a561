//! Real containers on vnet-cni: Debian's containerd (1.6) and runc, with containerd itself running
//! inside a lab node's network namespace (made by the test), start containers from a busybox image
//! built here (an OCI archive of busybox-static, imported with `ctr images import`: nothing is
//! pulled) with `ctr run --cni`. Each gets its address from vnet-cni through the node's agent and the
//! mock cloud, they reach each other, and once stopped nothing of theirs is left: no veth, no route,
//! no allocation.
//!
//! ctr reads the CNI configuration from /etc/cni/net.d and the plugins from /opt/cni/bin. Those are
//! the host's, so ctr runs in a private mount namespace where an overlay on /etc and a tmpfs on
//! /opt hold the node's conflist and plugins; the host's directories are never written.
//!
//! Needs root, containerd, runc and busybox-static.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{TempDir, run_ok};
use vnet_lab::lab::{Lab, PoolConfig};

const IMAGE: &str = "docker.io/vnet-test/busybox:1";
const NAMESPACE: &str = "vnet-test";

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn sha256_hex(path: &Path) -> String {
    common::sha256(path)
}

/// Writes `content` as a blob of the OCI layout; returns (digest, size).
fn blob(layout: &Path, content: &[u8]) -> (String, usize) {
    let tmp = layout.join("blob.tmp");
    fs::write(&tmp, content).unwrap();
    let hex = sha256_hex(&tmp);
    fs::rename(&tmp, layout.join("blobs/sha256").join(&hex)).unwrap();
    (format!("sha256:{hex}"), content.len())
}

/// An OCI image archive with one layer: busybox-static and the applets the test uses.
fn busybox_image(work: &Path) -> PathBuf {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .expect("busybox is not installed (tests/tools/prepare.sh installs busybox-static)");
    let headers = run_ok("readelf", &["-l", busybox.to_str().unwrap()], &[]);
    assert!(
        !headers.contains("INTERP"),
        "{} is not static (install busybox-static)",
        busybox.display()
    );
    let rootfs = work.join("layer");
    fs::create_dir_all(rootfs.join("bin")).unwrap();
    for d in ["proc", "sys", "dev", "etc", "tmp"] {
        fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    fs::copy(busybox, rootfs.join("bin/busybox")).unwrap();
    for applet in ["sh", "sleep", "ip", "ping", "cat", "hostname"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    let layout = work.join("oci");
    fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    let layer_tar = work.join("layer.tar");
    run_ok(
        "tar",
        &[
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
            "-C",
            rootfs.to_str().unwrap(),
            "-cf",
            layer_tar.to_str().unwrap(),
            ".",
        ],
        &[],
    );
    let (layer, layer_size) = blob(&layout, &fs::read(&layer_tar).unwrap());
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [layer]},
    });
    let (config, config_size) = blob(&layout, config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": layer_size}],
    });
    let (manifest, manifest_size) = blob(&layout, manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest,
            "size": manifest_size,
            "annotations": {"io.containerd.image.name": IMAGE, "org.opencontainers.image.ref.name": "1"},
        }],
    });
    fs::write(layout.join("index.json"), index.to_string()).unwrap();
    fs::write(
        layout.join("oci-layout"),
        "{\"imageLayoutVersion\":\"1.0.0\"}",
    )
    .unwrap();
    let archive = work.join("busybox-oci.tar");
    run_ok(
        "tar",
        &[
            "-C",
            layout.to_str().unwrap(),
            "-cf",
            archive.to_str().unwrap(),
            ".",
        ],
        &[],
    );
    archive
}

/// containerd in the node's namespace, with every directory of its own; stopped on drop.
struct Containerd {
    child: Child,
    dir: PathBuf,
    address: PathBuf,
    node_ns: String,
    /// The mount-namespace set-up ctr runs under (see the module comment).
    ctr_prelude: String,
}

impl Containerd {
    fn start(dir: &Path, node_ns: &str, conflist: &Path, plugin: &Path) -> Containerd {
        let address = dir.join("containerd.sock");
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{address}\"\n\
             [ttrpc]\n  address = \"{address}.ttrpc\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{opt}\"\n",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            opt = dir.join("opt").display(),
            address = address.display(),
        );
        fs::write(dir.join("config.toml"), config).unwrap();
        let log = fs::File::create(dir.join("containerd.log")).unwrap();
        // nsenter, not `ip netns exec`: that remounts /sys in a new mount namespace, which takes
        // the cgroup mounts away from containerd and runc.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{node_ns}"))
            .args(["containerd", "--config"])
            .arg(dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let upper = dir.join("etc-upper");
        let work = dir.join("etc-work");
        fs::create_dir_all(&upper).unwrap();
        fs::create_dir_all(&work).unwrap();
        let ctr_prelude = format!(
            "set -e; mount --make-rprivate /; \
             mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={work} /etc; \
             mkdir -p /etc/cni/net.d; cp {conflist} /etc/cni/net.d/; \
             mount -t tmpfs tmpfs /opt; mkdir -p /opt/cni/bin; cp {plugin} /usr/lib/cni/loopback /opt/cni/bin/; ",
            upper = upper.display(),
            work = work.display(),
            conflist = conflist.display(),
            plugin = plugin.display(),
        );
        let containerd = Containerd {
            child,
            dir: dir.to_owned(),
            address,
            node_ns: node_ns.to_owned(),
            ctr_prelude,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !containerd.ctr(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not answer within 60 s:\n{}",
                fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        containerd
    }

    fn ctr_command(&self, args: &[&str]) -> Command {
        let mut script = self.ctr_prelude.clone();
        script.push_str("exec ctr --address \"$0\" --namespace ");
        script.push_str(NAMESPACE);
        script.push_str(" \"$@\"");
        let mut cmd = Command::new("timeout");
        cmd.args([
            "300",
            "nsenter",
            &format!("--net=/run/netns/{}", self.node_ns),
        ])
        .args(["unshare", "--mount", "sh", "-c", &script])
        .arg(&self.address)
        .args(args)
        .stdin(Stdio::null());
        cmd
    }

    fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_command(args).output().expect("run ctr")
    }

    fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(out.status.success(), "ctr {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Whatever is still running goes first, so no shim outlives the test.
        if let Ok(out) = self.ctr_command(&["task", "ls", "-q"]).output() {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
            }
        }
        // SAFETY: kill(2) on our own child (nsenter execs containerd in place).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let prefix = self.dir.to_string_lossy().into_owned();
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
    }
}

/// A container started with `ctr run --rm --cni`: ctr stays attached, and when the task exits it
/// tears the network down (CNI DEL) and deletes the container.
struct Running {
    id: String,
    ctr: Child,
}

fn pod_ip(c: &Containerd, id: &str) -> std::net::Ipv4Addr {
    let out = c.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "addr",
        id,
        "ip",
        "-4",
        "-o",
        "addr",
        "show",
        "dev",
        "eth0",
    ]);
    let cidr = out
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .unwrap_or_else(|| panic!("{id} has no IPv4 address on eth0: {out}"));
    assert!(cidr.ends_with("/32"), "a /32 from vnet-cni: {cidr}");
    cidr.trim_end_matches("/32").parse().unwrap()
}

#[test]
fn containers_started_by_containerd_get_vnet_addresses_reach_each_other_and_leave_nothing() {
    assert!(vnet_lab::lab::is_root(), "needs root: runs containerd");
    for tool in ["/usr/bin/containerd", "/usr/bin/ctr", "/usr/sbin/runc"] {
        assert!(
            Path::new(tool).is_file(),
            "{tool} is missing (tests/tools/prepare.sh installs containerd and runc)"
        );
    }
    let work = TempDir::new("containerd");
    let image = busybox_image(work.path());
    let guard = common::lab("ctrd", 1, PoolConfig::default(), None);
    let lab: &Lab = &guard;
    let st = lab.state();
    let node = st.nodes[0].clone();
    let conflist = fs::read_dir(&node.conf_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "conflist"))
        .expect("the lab node's conflist");
    let dir = work.path().join("containerd");
    fs::create_dir_all(&dir).unwrap();
    let containerd = Containerd::start(&dir, &node.ns, &conflist, &st.bin_dir.join("vnet-cni"));
    containerd.ctr_ok(&["images", "import", image.to_str().unwrap()]);
    let images = containerd.ctr_ok(&["images", "ls", "-q"]);
    assert!(images.contains(IMAGE), "imported: {images}");

    let mut running = Vec::new();
    for i in 1..=3 {
        let id = format!("vnt-c{i}-{}", std::process::id());
        let log = fs::File::create(work.path().join(format!("{id}.log"))).unwrap();
        let child = containerd
            .ctr_command(&["run", "--rm", "--cni", IMAGE, &id, "sleep", "600"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("ctr run");
        running.push(Running { id, ctr: child });
    }
    // Each task runs and its network is set up before it counts as started.
    let mut ips = Vec::new();
    for r in &running {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = containerd.ctr(&[
                "task",
                "exec",
                "--exec-id",
                "probe",
                &r.id,
                "ip",
                "-4",
                "-o",
                "addr",
                "show",
                "dev",
                "eth0",
            ]);
            if out.status.success() && String::from_utf8_lossy(&out.stdout).contains("inet ") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not get a network within 60 s: {}\nctr run's log:\n{}",
                r.id,
                text(&out),
                fs::read_to_string(work.path().join(format!("{}.log", r.id))).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        ips.push(pod_ip(&containerd, &r.id));
    }
    let allocations = lab.agent_allocations(&node.name).unwrap().allocations;
    for ip in &ips {
        assert!(
            allocations.iter().any(|a| a.ip == *ip),
            "{ip} was handed out by the node's agent: {allocations:?}"
        );
    }
    let distinct: std::collections::BTreeSet<_> = ips.iter().collect();
    assert_eq!(distinct.len(), ips.len(), "distinct addresses: {ips:?}");

    // They reach each other (container to container, through the node's routes).
    for (i, r) in running.iter().enumerate() {
        let peer = ips[(i + 1) % ips.len()].to_string();
        let out = containerd.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "ping",
            &r.id,
            "ping",
            "-c",
            "2",
            "-W",
            "3",
            &peer,
        ]);
        assert!(out.status.success(), "{} -> {peer}: {}", r.id, text(&out));
    }

    // Stopped: ctr tears the network down, and nothing of theirs is left.
    for r in &running {
        containerd.ctr_ok(&["task", "kill", "-s", "SIGKILL", &r.id]);
    }
    for r in &mut running {
        let deadline = Instant::now() + Duration::from_secs(60);
        while r.ctr.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "ctr run {} did not finish", r.id);
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let left = containerd.ctr_ok(&["containers", "ls", "-q"]);
    assert!(left.trim().is_empty(), "containers left: {left}");
    common::assert_no_leftover_links(lab);
    let allocations = lab.agent_allocations(&node.name).unwrap().allocations;
    assert!(allocations.is_empty(), "allocations left: {allocations:?}");
    let routes = run_ok("ip", &["-n", &node.ns, "route", "show"], &[]);
    for ip in &ips {
        assert!(
            !routes.contains(&format!("{ip} ")),
            "route to {ip} left: {routes}"
        );
    }
    drop(containerd);
    drop(guard);
}
