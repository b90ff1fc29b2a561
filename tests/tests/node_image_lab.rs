//! The node image in the lab, as root: an in-place upgrade of one node while its pods answer, and
//! the packaged agent getting ready with only CAP_NET_ADMIN and a read-only system.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

mod common;

use common::node_image::*;

// --- In-place upgrade in the lab ------------------------------------------------------------------

/// SIGTERM: how systemd stops the agent on `systemctl restart`.
const SIGTERM: i32 = 15;

/// Probes `to` from `from_ns`, once more after a miss, so one delayed SYN on a loaded machine is
/// not taken for a pod that stopped answering.
fn answers(from_ns: &str, to: std::net::Ipv4Addr) -> Result<(), String> {
    let first = vnet_lab::probe::probe(from_ns, to);
    if first.ok() {
        return Ok(());
    }
    let second = vnet_lab::probe::probe(from_ns, to);
    if second.ok() {
        Ok(())
    } else {
        Err(format!("{to}: {:?} then {:?}", first.error, second.error))
    }
}

/// The node-image upgrade on one lab node: the lab runs the binaries that install.sh put into a
/// node root; a new release is installed over them and node-1's agent is restarted, as
/// `install.sh` does with `systemctl restart` on a real node, while pods on node-1 are probed
/// continuously from node-2. (The lab's nodes share one binary directory, so the new plugin
/// serves node-2 too; only node-1's agent is restarted.)
#[test]
fn lab_upgrade_in_place_keeps_pods_answering_and_loses_no_allocation() {
    use vnet_lab::lab::{Lab, LabConfig, LabGuard, PoolConfig, default_bin_dir, is_root};
    use vnet_lab::probe::Responder;

    assert!(
        is_root(),
        "needs root: the lab builds network namespaces (run `cargo test` as root)"
    );
    let target_bins = default_bin_dir();
    for bin in ["vnet-mockcloud", "vnet-agent", "vnet-cni"] {
        assert!(
            target_bins.join(bin).is_file(),
            "{bin} not built in {}: run `cargo build --workspace --bins` before this test",
            target_bins.display()
        );
    }
    let pkg = package();
    let real = fs::read_to_string(pkg.dir.join("VERSION")).unwrap();
    assert!(
        !real.contains("not-elf"),
        "the package holds stand-ins, not the real binaries:\n{real}"
    );

    // The node root, release 1, and a lab whose binaries are the ones installed there.
    let tmp = TempDir::new("lab-upgrade");
    let root = tmp.path().join("root");
    install_ok(&pkg.dir, &root, &["--no-enable"]);
    let lab_bin = tmp.path().join("lab-bin");
    fs::create_dir_all(&lab_bin).unwrap();
    for (name, installed) in [
        ("vnet-agent", root.join("usr/local/bin/vnet-agent")),
        ("vnet-cni", root.join("opt/cni/bin/vnet-cni")),
        ("vnet-mockcloud", target_bins.join("vnet-mockcloud")),
    ] {
        std::os::unix::fs::symlink(&installed, lab_bin.join(name)).unwrap();
    }
    let mut cfg = LabConfig::new(&format!("ni-upgrade-{}", std::process::id()));
    cfg.nodes = 2;
    cfg.bin_dir = lab_bin;
    cfg.pool = PoolConfig {
        warm: 4,
        batch: 4,
        ..PoolConfig::default()
    };
    assert!(
        cfg.cnitool.is_file(),
        "cnitool not found at {} (tests/tools/build-cnitool.sh, or set VNET_CNITOOL)",
        cfg.cnitool.display()
    );
    let lab: LabGuard = LabGuard::new(Lab::up(&cfg).unwrap_or_else(|e| panic!("lab up: {e}")));

    let client = lab.add_pod("node-2", "client").expect("client pod");
    let servers: Vec<_> = (0..3)
        .map(|i| {
            lab.add_pod("node-1", &format!("web{i}"))
                .expect("pod on node-1")
        })
        .collect();
    let _responders: Vec<Responder> = servers
        .iter()
        .map(|s| Responder::start(&s.ns).expect("responder"))
        .collect();
    for s in &servers {
        answers(&client.ns, s.ip).unwrap_or_else(|e| panic!("{} before the upgrade: {e}", s.name));
    }
    let allocations = |lab: &Lab| -> BTreeSet<(String, std::net::Ipv4Addr)> {
        lab.agent_allocations("node-1")
            .expect("node-1 allocations")
            .allocations
            .into_iter()
            .map(|a| (a.host_veth, a.ip))
            .collect()
    };
    let before = allocations(&lab);
    assert_eq!(
        before.len(),
        servers.len(),
        "one allocation per pod: {before:?}"
    );
    let old_agent = lab.agent_pid("node-1").expect("node-1 agent");

    // Probe node-1's pods from node-2 the whole time the upgrade runs.
    let next = next_release_of_agent_and_plugin(tmp.path());
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (rounds, misses) = std::thread::scope(|scope| {
        let prober = scope.spawn(|| {
            let mut rounds = 0u32;
            let mut misses = Vec::new();
            while !stop.load(Ordering::SeqCst) || rounds == 0 {
                for s in &servers {
                    if let Err(e) = answers(&client.ns, s.ip) {
                        misses.push(format!("{}: {e}", s.name));
                    }
                }
                rounds += 1;
            }
            (rounds, misses)
        });
        // The upgrade: new binaries renamed into place, then the agent restarted.
        let output = install_ok(&next, &root, &["--no-enable"]);
        assert!(
            output.contains("installed /usr/local/bin/vnet-agent"),
            "{output}"
        );
        assert!(
            output.contains("installed /opt/cni/bin/vnet-cni"),
            "{output}"
        );
        lab.signal_agent("node-1", SIGTERM)
            .expect("stop the old agent");
        lab.start_agent("node-1").expect("start the new agent");
        lab.wait_agent_ready("node-1", Duration::from_secs(120))
            .expect("the new agent gets ready");
        stop.store(true, Ordering::SeqCst);
        prober.join().expect("prober")
    });
    eprintln!("node_image: {rounds} probe rounds over the upgrade");
    assert!(
        misses.is_empty(),
        "pods stopped answering during the upgrade: {misses:?}"
    );

    // The new agent runs the new release's binary, and holds every allocation it had.
    let new_agent = lab.agent_pid("node-1").expect("node-1 agent");
    assert_ne!(new_agent, old_agent, "the agent was restarted");
    assert_eq!(
        sha256(&PathBuf::from(format!("/proc/{new_agent}/exe"))),
        expected_sums(&next)["bin/vnet-agent"],
        "node-1 runs the new agent"
    );
    assert_eq!(allocations(&lab), before, "allocations after the upgrade");

    // The upgraded node still serves new pods (through the new plugin), and nothing is doubled.
    let fresh = lab
        .add_pod("node-1", "fresh")
        .expect("ADD after the upgrade");
    assert!(
        !before.iter().any(|(_, ip)| *ip == fresh.ip),
        "{} reused",
        fresh.ip
    );
    let _fresh_responder = Responder::start(&fresh.ns).expect("responder");
    for s in servers.iter().chain(std::iter::once(&fresh)) {
        answers(&client.ns, s.ip).unwrap_or_else(|e| panic!("{} after the upgrade: {e}", s.name));
    }
    common::assert_ip_accounting(&lab);
    for pod in lab.state().pods {
        lab.del_pod(&pod.node, &pod.name).expect("delete pod");
    }
    common::assert_ip_accounting(&lab);
    common::assert_no_leftover_links(&lab);
}

/// The unit's privilege claims, without systemd: in a private network and mount namespace
/// (anonymous, gone with its processes), forwarding is switched on first (the unit's
/// `ExecStartPre=+systemd-sysctl`), `/proc/sys` is made read-only (`ProtectKernelTunables=yes`),
/// so is `/` except the agent's directories (`ProtectSystem=strict`, `ReadWritePaths=`), and the
/// packaged agent runs with CAP_NET_ADMIN as its only capability and no new privileges
/// (`CapabilityBoundingSet=CAP_NET_ADMIN`, `NoNewPrivileges=yes`) against vnet-mockcloud on
/// the namespace's loopback. It must get ready and install its nftables table.
#[test]
fn the_agent_gets_ready_with_only_cap_net_admin_and_a_read_only_system() {
    use vnet_lab::lab::{default_bin_dir, is_root};

    assert!(
        is_root(),
        "needs root: the test makes a private network namespace"
    );
    for tool in ["unshare", "setpriv", "nft", "curl"] {
        assert!(have(tool), "{tool} is needed for this test");
    }
    let mock = default_bin_dir().join("vnet-mockcloud");
    assert!(
        mock.is_file(),
        "vnet-mockcloud not built at {}: run `cargo build --workspace --bins` first",
        mock.display()
    );
    let pkg = package();
    let agent = pkg.dir.join("bin/vnet-agent");
    let version = fs::read_to_string(pkg.dir.join("VERSION")).unwrap();
    assert!(
        !version.contains("vnet-agent not-elf"),
        "the package holds a stand-in agent, not the real one:\n{version}"
    );

    let tmp = TempDir::new("caps");
    let dir = tmp.path();
    fs::write(
        dir.join("topology.json"),
        r#"{"subscription":"sub","resource_group":"rg","location":"westeurope",
            "vnet":{"name":"vnet","address_space":["10.240.0.0/16"]},
            "subnets":[{"name":"nodes","prefix":"10.240.0.0/16"}],
            "vms":[{"name":"node-1","subnet":"nodes","primary_ip":"10.240.0.4"}]}"#,
    )
    .unwrap();
    fs::write(
        dir.join("agent.toml"),
        format!(
            r#"socket_path = "{dir}/run/agent.sock"
state_dir = "{dir}/state"
metrics_address = "127.0.0.1:19464"
[cloud]
provider = "mock"
arm_endpoint = "http://127.0.0.1:18080"
imds_endpoint = "http://127.0.0.1:18080/vms/node-1"
credential = "none"
[pool]
warm = 2
batch = 2
"#,
            dir = dir.display()
        ),
    )
    .unwrap();
    // Children are stopped on every exit path of the script; the namespaces die with them.
    let script = r#"
set -eu
dir=$1 mock=$2 agent=$3
pids=
trap 'for p in $pids; do kill $p 2>/dev/null || true; done; wait' EXIT
ip link set lo up
echo 1 > /proc/sys/net/ipv4/ip_forward
mount --make-rprivate /
mount --bind -o ro /proc/sys /proc/sys
# ProtectSystem=strict + ReadWritePaths: everything read-only but the test's directory (state,
# socket). Every other mount (/dev, /proc, /tmp if separate) is left as it is.
mount --bind "$dir" "$dir"
mount -o remount,bind,ro /
if touch /vnet-node-image-probe 2>/dev/null; then rm -f /vnet-node-image-probe; echo "/ is writable"; exit 1; fi
"$mock" --listen 127.0.0.1:18080 --topology "$dir/topology.json" >"$dir/mock.log" 2>&1 &
pids="$pids $!"
setpriv --bounding-set=-all,+net_admin --inh-caps=-all --no-new-privs     "$agent" --config "$dir/agent.toml" >"$dir/agent.log" 2>&1 &
agent_pid=$!
pids="$pids $agent_pid"
tries=0
until curl -fsS --max-time 2 --unix-socket "$dir/run/agent.sock" http://agent/v1/health 2>/dev/null | grep -q '"ready":true'; do
    kill -0 "$agent_pid" 2>/dev/null || { echo "agent exited"; exit 1; }
    tries=$((tries + 1))
    [ "$tries" -lt 120 ] || { echo "agent not ready"; exit 1; }
    sleep 0.5
done
echo "ready"
grep CapEff /proc/"$agent_pid"/status
nft list table ip vnet-cni >/dev/null && echo "nft table present"
"#;
    let out = run(
        "unshare",
        &[
            "--net",
            "--mount",
            "sh",
            "-c",
            script,
            "sh",
            dir.to_str().unwrap(),
            mock.to_str().unwrap(),
            agent.to_str().unwrap(),
        ],
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    assert!(
        out.status.success() && stdout.contains("ready\n"),
        "the agent did not get ready with CAP_NET_ADMIN only ({}):\n{stdout}{}\nagent log:\n{log}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // CAP_NET_ADMIN is bit 12: the agent held nothing else.
    assert!(stdout.contains("CapEff:\t0000000000001000"), "{stdout}");
    assert!(
        stdout.contains("nft table present"),
        "{stdout}\nagent log:\n{log}"
    );
}

/// A new release whose agent and plugin binaries differ from the installed ones (a byte appended
/// after the ELF image changes the file, not what runs).
fn next_release_of_agent_and_plugin(into: &Path) -> PathBuf {
    let next = next_release(into);
    let mut agent = fs::OpenOptions::new()
        .append(true)
        .open(next.join("bin/vnet-agent"))
        .unwrap();
    agent.write_all(b"\nnext release\n").unwrap();
    drop(agent);
    run_ok(
        "sh",
        &[
            "-c",
            &format!(
                "cd '{}' && find . -type f ! -name SHA256SUMS | sed 's|^\\./||' | LC_ALL=C sort | xargs sha256sum > SHA256SUMS",
                next.display()
            ),
        ],
        &[],
    );
    next
}
