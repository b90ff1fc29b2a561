//! Timing of the plugin's own calls (reported, never asserted): ADD, DEL on the fast path (veth
//! handed to the agent) and DEL on the slow path (agent down: veth deleted synchronously).
//! Run: `cargo test --release -p vnet-cni --test bench -- --ignored --nocapture`.

mod common;

use std::time::{Duration, Instant};

use common::{FakeAgent, cni_env, conf, exec_plugin, node, path_str};
use vnet_testns::Netns;

fn percentile(samples: &mut [Duration], p: f64) -> f64 {
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i].as_secs_f64() * 1000.0
}

fn report(what: &str, samples: &mut [Duration]) {
    println!(
        "{what:<28} n={:<3} p50 {:>6.2} ms  p99 {:>6.2} ms",
        samples.len(),
        percentile(samples, 0.5),
        percentile(samples, 0.99)
    );
}

#[test]
#[ignore = "benchmark: run explicitly with --ignored --nocapture"]
fn add_and_del_timings() {
    const N: usize = 30;
    let node = node();
    let agent = FakeAgent::start([10, 80, 0]);
    let live = conf("1.0.0", agent.socket_str(), &agent.spool_dir()).to_string();
    let dead_socket = FakeAgent::dead_socket(agent.dir.path());
    let dead = conf("1.0.0", dead_socket.to_str().unwrap(), &agent.spool_dir()).to_string();
    let pods: Vec<Netns> = (0..2 * N).map(|_| Netns::new("bench").unwrap()).collect();

    let mut add = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        let start = Instant::now();
        exec_plugin(
            Some(&node),
            &cni_env("ADD", &format!("b{i}"), &path_str(pod), "eth0"),
            &live,
        )
        .assert_ok();
        add.push(start.elapsed());
    }
    let mut del_fast = Vec::new();
    let mut del_sync = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        let (cfg, samples) = if i % 2 == 0 {
            (&live, &mut del_fast)
        } else {
            (&dead, &mut del_sync)
        };
        let start = Instant::now();
        exec_plugin(
            Some(&node),
            &cni_env("DEL", &format!("b{i}"), &path_str(pod), "eth0"),
            cfg,
        )
        .assert_ok();
        samples.push(start.elapsed());
    }
    report("ADD", &mut add);
    report("DEL (handed to agent)", &mut del_fast);
    report("DEL (agent down, sync)", &mut del_sync);
}

/// One plugin chain run through cnitool: per-call latencies, sequential and 8 in flight.
struct ChainResult {
    add_seq: Vec<Duration>,
    del_seq: Vec<Duration>,
    add_par: Vec<Duration>,
    del_par: Vec<Duration>,
    add_par_wall: Duration,
    del_par_wall: Duration,
}

fn cnitool_call(
    tool: &str,
    confdir: &str,
    node: &Netns,
    command: &str,
    network: &str,
    pod: &Netns,
) {
    let cni_path = format!(
        "{}:/usr/lib/cni",
        std::path::Path::new(common::PLUGIN)
            .parent()
            .unwrap()
            .display()
    );
    let env = [
        ("NETCONFPATH", confdir),
        ("CNI_PATH", cni_path.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    common::exec_program(
        tool,
        &[command, network, &path_str(pod)],
        Some(node),
        &env,
        "",
    )
    .assert_ok();
}

fn run_chain(
    tool: &str,
    network: &str,
    conflist: serde_json::Value,
    n: usize,
    on_node: impl FnOnce(&Netns),
) -> ChainResult {
    let node = node();
    on_node(&node);
    let confdir = tempfile::tempdir().unwrap();
    std::fs::write(
        confdir.path().join("10-bench.conflist"),
        conflist.to_string(),
    )
    .unwrap();
    let confdir_s = confdir.path().to_str().unwrap().to_owned();
    let pods: Vec<Netns> = (0..n).map(|_| Netns::new("bench").unwrap()).collect();
    let timed = |command: &str, pod: &Netns| {
        let start = Instant::now();
        cnitool_call(tool, &confdir_s, &node, command, network, pod);
        start.elapsed()
    };
    let add_seq: Vec<_> = pods.iter().map(|p| timed("add", p)).collect();
    let del_seq: Vec<_> = pods.iter().map(|p| timed("del", p)).collect();
    let in_flight = |command: &str| {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let samples = std::sync::Mutex::new(Vec::new());
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(pod) = pods.get(i) else { break };
                        let d = timed(command, pod);
                        samples.lock().unwrap().push(d);
                    }
                });
            }
        });
        (samples.into_inner().unwrap(), start.elapsed())
    };
    let (add_par, add_par_wall) = in_flight("add");
    let (del_par, del_par_wall) = in_flight("del");
    ChainResult {
        add_seq,
        del_seq,
        add_par,
        del_par,
        add_par_wall,
        del_par_wall,
    }
}

#[test]
#[ignore = "benchmark: run explicitly with --ignored --nocapture"]
fn cnitool_vnet_cni_against_ptp_host_local() {
    const N: usize = 50;
    let tool = std::env::var("VNET_CNITOOL").unwrap_or_else(|_| "/usr/local/bin/cnitool".into());
    assert!(
        std::path::Path::new(&tool).exists(),
        "cnitool not found at {tool}"
    );
    let pid = std::process::id();

    let agent = FakeAgent::start([10, 82, 0]);
    let vnet_name = format!("bench-vnet-{pid}");
    let mut plugin = conf("1.0.0", agent.socket_str(), &agent.spool_dir());
    plugin["logLevel"] = serde_json::json!("warn");
    let vnet_list =
        serde_json::json!({"cniVersion": "1.0.0", "name": vnet_name, "plugins": [plugin]});

    let ipam_dir = tempfile::tempdir().unwrap();
    let ptp_name = format!("bench-ptp-{pid}");
    let ptp_list = serde_json::json!({"cniVersion": "1.0.0", "name": ptp_name, "plugins": [{
        "type": "ptp", "ipMasq": false, "mtu": 1500,
        "ipam": {"type": "host-local", "subnet": "10.83.0.0/16", "dataDir": ipam_dir.path()},
    }]});

    // vnet-cni's dying veths are deleted in the background in the node namespace, as the real
    // agent does: the kernel's veth removal still happens, just not while the runtime waits.
    let vnet = run_chain(&tool, &vnet_name, vnet_list, N, |node| {
        agent.state.lock().unwrap().reap_in = Some(node.name().to_owned());
    });
    let ptp = run_chain(&tool, &ptp_name, ptp_list, N, |_| {});

    let mut rows = Vec::new();
    let mut line = |what: &str, v: &mut Vec<Duration>, p: &mut Vec<Duration>| {
        let (v50, v99, p50, p99) = (
            percentile(v, 0.5),
            percentile(v, 0.99),
            percentile(p, 0.5),
            percentile(p, 0.99),
        );
        rows.push(format!(
            "{what:<22} vnet-cni p50 {v50:>6.2} p99 {v99:>6.2} | ptp p50 {p50:>6.2} p99 {p99:>6.2} | ratio p50 {:.2}",
            v50 / p50
        ));
    };
    let (mut v, mut p) = (vnet, ptp);
    line("ADD sequential (ms)", &mut v.add_seq, &mut p.add_seq);
    line("DEL sequential (ms)", &mut v.del_seq, &mut p.del_seq);
    line("ADD 8 in flight (ms)", &mut v.add_par, &mut p.add_par);
    line("DEL 8 in flight (ms)", &mut v.del_par, &mut p.del_par);
    let rate = |wall: Duration| N as f64 / wall.as_secs_f64();
    rows.push(format!(
        "pods/s 8 in flight ADD  vnet-cni {:.0} | ptp {:.0} | ratio {:.2}",
        rate(v.add_par_wall),
        rate(p.add_par_wall),
        rate(v.add_par_wall) / rate(p.add_par_wall)
    ));
    rows.push(format!(
        "pods/s 8 in flight DEL  vnet-cni {:.0} | ptp {:.0} | ratio {:.2}",
        rate(v.del_par_wall),
        rate(p.del_par_wall),
        rate(v.del_par_wall) / rate(p.del_par_wall)
    ));
    for r in rows {
        println!("{r}");
    }
}
