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
