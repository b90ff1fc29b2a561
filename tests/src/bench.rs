//! `vnetctl lab bench`: one run that measures vnet-cni and the reference plugins (ptp +
//! host-local) with the same harness, on the same machine, back to back.
//!
//! Method (mirrors shared/bench/anchor-ptp.sh, reimplemented):
//! - Every CNI call is `cnitool add|del` started inside node-1's namespace, as a runtime would;
//!   its wall time (spawn to exit) is one sample. Per repetition and plugin: N pod namespaces, ADD
//!   all sequentially, DEL all sequentially, ADD with C in flight, DEL with C in flight. The
//!   plugins alternate per repetition so both see the same machine noise; tables give medians
//!   over repetitions of each repetition's nearest-rank percentiles.
//! - Cold burst: a separate one-node lab whose pool starts empty (warm 0), mock NIC writes
//!   delayed; all pods launched at once; time until every ADD returned, and the NIC writes used.
//! - Agent RSS (VmRSS) idle and at 250 allocations made through the agent's API.
//! - Data path: iperf3 TCP pod (node-1) -> pod (node-2), node-1 -> node-2, and node-1 -> node-2
//!   over a VXLAN built between the same two node namespaces.
//!
//! Numbers are reported, never asserted.

use std::fmt::Write as _;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::exec::{self, enter_netns, ip, ip_batch};
use crate::lab::{Lab, LabConfig, LabError, LabGuard, PoolConfig, proc_rss_kib};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub pods: usize,
    pub concurrency: usize,
    pub burst: usize,
    pub write_latency_ms: u64,
    /// The mock's operation `Retry-After` of each cold-burst run (the first is the headline).
    pub burst_retry_after_secs: Vec<u64>,
    /// The node kinds of the cold-burst runs (each at every Retry-After; the first is the headline).
    pub burst_node_kinds: Vec<crate::lab::NodeKind>,
    pub iperf_secs: u64,
    pub out: PathBuf,
}

const REPS: usize = 3;
const IPERF_REPS: usize = 3;
const PHASES: [&str; 4] = ["add-seq", "del-seq", "add-conc", "del-conc"];

/// Per plugin label: per phase: one run per repetition.
type LatencyRuns = Vec<(String, Vec<Vec<PhaseRun>>)>;

/// Samples of one phase of one repetition.
#[derive(Debug, Clone)]
struct PhaseRun {
    ms: Vec<f64>,
    wall_s: f64,
    failures: usize,
    cpu: PhaseCpu,
}

/// CPU time (user + system) spent while one phase ran, in ms.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct PhaseCpu {
    /// The phase's cnitool processes and the plugins they started (`RUSAGE_CHILDREN`), with the
    /// kernel work done in their context (ptp's veth deletion, for example).
    clients_ms: f64,
    /// node-1's vnet-agent, all threads (`/proc/<pid>/task/*/schedstat`), with the kernel work
    /// of its netlink requests.
    agent_ms: f64,
    /// The whole machine (`/proc/stat`, 10 ms ticks): also kernel threads, softirqs (RCU
    /// callbacks) and anything else running, such as other builds.
    machine_ms: f64,
}

/// A reading of the counters [`PhaseCpu`] is the difference of.
struct CpuMark {
    children_ms: f64,
    agent_ms: f64,
    machine_ms: f64,
}

impl CpuMark {
    fn now(agent: Option<i32>) -> CpuMark {
        // SAFETY: an all-zero rusage is a valid value (plain integers), and getrusage only
        // writes the struct it is given.
        let ru = unsafe {
            let mut ru: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
            ru
        };
        let tv = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
        let agent_ms = agent
            .and_then(|pid| fs::read_dir(format!("/proc/{pid}/task")).ok())
            .map(|tasks| {
                tasks
                    .flatten()
                    .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
                    .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
                    .sum::<f64>()
                    / 1e6
            })
            .unwrap_or(f64::NAN);
        // user nice system idle iowait irq softirq steal, in USER_HZ (100/s) ticks.
        let machine_ms = fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let f: Vec<f64> = s
                    .lines()
                    .next()?
                    .split_whitespace()
                    .skip(1)
                    .take(8)
                    .filter_map(|x| x.parse().ok())
                    .collect();
                (f.len() == 8).then(|| (f.iter().sum::<f64>() - f[3] - f[4]) * 10.0)
            })
            .unwrap_or(f64::NAN);
        CpuMark {
            children_ms: tv(ru.ru_utime) + tv(ru.ru_stime),
            agent_ms,
            machine_ms,
        }
    }

    fn since(&self, before: &CpuMark) -> PhaseCpu {
        PhaseCpu {
            clients_ms: self.children_ms - before.children_ms,
            agent_ms: self.agent_ms - before.agent_ms,
            machine_ms: self.machine_ms - before.machine_ms,
        }
    }
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Stats {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

/// Nearest-rank percentiles, as lib.sh computes them.
pub fn stats(samples: &[f64]) -> Stats {
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return Stats {
            n: 0,
            p50: f64::NAN,
            p90: f64::NAN,
            p99: f64::NAN,
            max: f64::NAN,
            mean: f64::NAN,
        };
    }
    let pct = |q: f64| {
        let rank = ((q / 100.0) * n as f64).ceil().max(1.0) as usize;
        v[rank.min(n) - 1]
    };
    Stats {
        n,
        p50: pct(50.0),
        p90: pct(90.0),
        p99: pct(99.0),
        max: v[n - 1],
        mean: v.iter().sum::<f64>() / n as f64,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn progress(msg: &str) {
    eprintln!("==> bench: {msg}");
}

/// One plugin under test: a network name and the conf dir holding its conflist.
struct Variant {
    label: &'static str,
    network: String,
    conf_dir: PathBuf,
    pod_prefix: String,
}

fn run_phase(lab: &Lab, v: &Variant, op: &str, pods: &[String], conc: usize) -> PhaseRun {
    let next = AtomicUsize::new(0);
    let samples = Mutex::new(Vec::with_capacity(pods.len()));
    let failures = AtomicUsize::new(0);
    let st = lab.state();
    let node_ns = st.node("node-1").expect("node-1").ns.clone();
    let agent = lab.agent_pid("node-1");
    let cpu_before = CpuMark::now(agent);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..conc.max(1) {
            s.spawn(|| {
                // This thread only starts cnitool and ends with the phase.
                if let Err(e) = enter_thread_netns(&node_ns) {
                    eprintln!("    {}: {e}", v.label);
                    failures.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(pod) = pods.get(i) else { break };
                    match cnitool_from_here(&st, op, v, pod) {
                        Ok(took) => samples
                            .lock()
                            .expect("samples")
                            .push(took.as_secs_f64() * 1e3),
                        Err(e) => {
                            eprintln!("    {} {op} {pod}: {e}", v.label);
                            failures.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            });
        }
    });
    let wall_s = start.elapsed().as_secs_f64();
    PhaseRun {
        ms: samples.into_inner().expect("samples"),
        wall_s,
        failures: failures.into_inner(),
        cpu: CpuMark::now(agent).since(&cpu_before),
    }
}

/// Moves the calling thread (only it) into network namespace `ns`. For the phase's own threads:
/// a child started from such a thread starts in `ns`.
fn enter_thread_netns(ns: &str) -> Result<(), LabError> {
    let fail = |e: std::io::Error| LabError::Failed(format!("cannot enter namespace {ns}: {e}"));
    let handle = fs::File::open(exec::netns_path(ns)).map_err(fail)?;
    // SAFETY: setns only reads the fd, which `handle` keeps open for the call; it changes the
    // namespace of this thread alone, which does nothing else.
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&handle), libc::CLONE_NEWNET) } != 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// `cnitool <op>` for one pod, started from a thread already in the node's namespace
/// ([`enter_thread_netns`]), timed from spawn to exit. No `pre_exec` hook, so the child is
/// started with `posix_spawn` (a vfork-style clone), as a Go runtime such as containerd starts
/// plugins. A fork instead (which `pre_exec` needs) costs this harness ~1 ms of CPU per call
/// here, copy-on-write faults of its busy threads until the child execs: the same for every
/// plugin, but it weighs on whichever is CPU-bound.
fn cnitool_from_here(
    st: &crate::state::LabState,
    op: &str,
    v: &Variant,
    pod: &str,
) -> Result<Duration, LabError> {
    let mut cmd = Command::new(&st.cnitool);
    cmd.args([op, &v.network, &format!("/var/run/netns/{pod}")])
        .env("NETCONFPATH", &v.conf_dir)
        .env("CNI_PATH", &st.cni_path);
    let (output, took) = exec::run_timed(&mut cmd, None, CNITOOL_TIMEOUT)?;
    exec::check(&cmd, output)?;
    Ok(took)
}

/// As the lab's own cnitool calls.
const CNITOOL_TIMEOUT: Duration = Duration::from_secs(60);

fn write_ptp_conflist(lab: &Lab) -> Result<Variant, LabError> {
    let st = lab.state();
    let conf_dir = st.dir.join("bench").join("ptp-net.d");
    fs::create_dir_all(&conf_dir).map_err(|e| LabError::Failed(e.to_string()))?;
    let network = format!("{}-ptp", st.token);
    lab.register_network(&network)?;
    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": network,
        "plugins": [{
            "type": "ptp",
            "ipMasq": false,
            "mtu": 1500,
            "ipam": {
                "type": "host-local",
                "dataDir": st.dir.join("bench").join("ipam"),
                "ranges": [[{"subnet": "10.244.0.0/16"}]],
                "routes": [{"dst": "0.0.0.0/0"}]
            }
        }]
    });
    fs::write(conf_dir.join("10-ptp.conflist"), conflist.to_string())
        .map_err(|e| LabError::Failed(e.to_string()))?;
    Ok(Variant {
        label: "ptp + host-local",
        network,
        conf_dir,
        pod_prefix: format!("{}-bp", st.token),
    })
}

/// Latency phases for both plugins; returns {variant: {phase: [PhaseRun per rep]}}.
fn latency(lab: &Lab, opts: &BenchOptions) -> Result<LatencyRuns, LabError> {
    let st = lab.state();
    let node1 = st.node("node-1").cloned().expect("node-1");
    let variants = [
        Variant {
            label: "vnet-cni",
            network: st.network.clone(),
            conf_dir: node1.conf_dir.clone(),
            pod_prefix: format!("{}-bv", st.token),
        },
        write_ptp_conflist(lab)?,
    ];
    let mut results: LatencyRuns = variants
        .iter()
        .map(|v| (v.label.to_owned(), vec![Vec::new(); PHASES.len()]))
        .collect();
    for rep in 0..REPS {
        for (vi, v) in variants.iter().enumerate() {
            progress(&format!("latency rep {}/{REPS}: {}", rep + 1, v.label));
            let pods: Vec<String> = (0..opts.pods)
                .map(|i| format!("{}{i}", v.pod_prefix))
                .collect();
            for p in &pods {
                ip(&["netns", "add", p])?;
            }
            if rep == 0 {
                // Warm-up: page cache, the agent's first connection, host-local's data dir.
                let warm = vec![pods[0].clone()];
                run_phase(lab, v, "add", &warm, 1);
                run_phase(lab, v, "del", &warm, 1);
            }
            for (pi, phase) in PHASES.iter().enumerate() {
                let op = &phase[..3];
                if op == "add" && v.label == "vnet-cni" {
                    wait_for_free(lab, "node-1", opts.pods as u32);
                }
                let conc = if phase.ends_with("conc") {
                    opts.concurrency
                } else {
                    1
                };
                let run = run_phase(lab, v, op, &pods, conc);
                results[vi].1[pi].push(run);
            }
            for p in &pods {
                ip(&["netns", "del", p])?;
            }
        }
    }
    Ok(results)
}

/// Steady state before an ADD phase: addresses released by the previous DEL phase wait out
/// their cooldown (and their old veth's removal) before reuse; without this wait the phase would
/// time cloud writes, which the cold burst measures on its own.
fn wait_for_free(lab: &Lab, node: &str, want: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        match lab.agent_status(node) {
            Ok(s) if s.pool.free >= want && s.pool.pending == 0 => return,
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    eprintln!("    pool on {node} did not reach {want} free addresses; timing anyway");
}

const ANCHOR_RUNS: usize = 100;

/// Whole-process start cost (spawn to exit) of the binaries every CNI call starts: the floor of
/// ADD and DEL, measured in the same run because it moves with the machine's load.
fn start_anchors(cfg: &LabConfig) -> Value {
    progress("process start anchors");
    let plugin = cfg.bin_dir.join("vnet-cni");
    let cases: Vec<(&str, PathBuf, bool)> = vec![
        (
            "/bin/true (fork+exec floor)",
            PathBuf::from("/bin/true"),
            false,
        ),
        ("cnitool (usage)", cfg.cnitool.clone(), false),
        ("vnet-cni VERSION", plugin, true),
        ("ptp VERSION", PathBuf::from("/usr/lib/cni/ptp"), true),
        (
            "host-local VERSION",
            PathBuf::from("/usr/lib/cni/host-local"),
            true,
        ),
    ];
    let mut out = serde_json::Map::new();
    for (name, path, version) in cases {
        let mut samples = Vec::with_capacity(ANCHOR_RUNS);
        for _ in 0..ANCHOR_RUNS {
            let mut cmd = Command::new(&path);
            if version {
                cmd.env("CNI_COMMAND", "VERSION");
            }
            if let Ok((_, took)) = exec::run_timed(&mut cmd, None, Duration::from_secs(10)) {
                samples.push(took.as_secs_f64() * 1e3);
            }
        }
        out.insert(name.to_owned(), json!(stats(&samples)));
    }
    Value::Object(out)
}

/// Empty-pool burst in a separate one-node lab with slow NIC writes.
fn cold_burst(
    cfg: &LabConfig,
    opts: &BenchOptions,
    retry_after: u64,
    kind: crate::lab::NodeKind,
) -> Result<Value, LabError> {
    let mut c = cfg.clone();
    c.name = format!("{}-cold", cfg.name);
    c.nodes = 1;
    c.node_kinds = vec![kind];
    c.operation_retry_after_secs = retry_after;
    c.pool = PoolConfig {
        warm: 0,
        batch: 8,
        max: 250,
        release_delay_secs: 3600,
        cooldown_secs: 30,
        allocate_timeout_secs: 30,
    };
    // The same write latency for a NIC PUT and for a Uniform instance's update.
    let write = json!({"fixed_ms": opts.write_latency_ms});
    c.faults = Some(json!({"latency": {"nic_put": write, "vmss_vm_put": write}}).to_string());
    progress(&format!(
        "cold burst: {} pods at once on a {} node, empty pool, NIC write latency {} ms, operation Retry-After {retry_after} s",
        opts.burst,
        kind.as_str(),
        opts.write_latency_ms
    ));
    let lab = LabGuard::new(Lab::up(&c)?);
    let st = lab.state();
    let pool_before = lab.agent_status("node-1")?.pool;
    lab.mock_request("POST", "/admin/counters/reset", None)?;
    let pods: Vec<String> = (0..opts.burst)
        .map(|i| format!("{}-cb{i}", st.token))
        .collect();
    for p in &pods {
        ip(&["netns", "add", p])?;
    }
    let v = Variant {
        label: "vnet-cni",
        network: st.network.clone(),
        conf_dir: st.nodes[0].conf_dir.clone(),
        pod_prefix: String::new(),
    };
    let launched = seconds_of_day(std::time::SystemTime::now());
    let run = run_phase(&lab, &v, "add", &pods, opts.burst);
    let counters = lab.mock_json("/admin/counters")?;
    // The agent's log of the burst (when the write left, what it gathered), kept with the report.
    let log = opts.out.join(format!(
        "cold-burst-{}-retry-after-{retry_after}-agent.log",
        kind.as_str()
    ));
    if let Err(e) =
        fs::create_dir_all(&opts.out).and_then(|()| fs::copy(&st.nodes[0].agent_log, &log))
    {
        eprintln!("    cannot keep the agent log as {}: {e}", log.display());
    }
    let timeline = fs::read_to_string(&st.nodes[0].agent_log)
        .map(|text| burst_timeline(&text, launched, run.wall_s))
        .unwrap_or(Value::Null);
    let pool_after = lab.agent_status("node-1")?.pool;
    let s = stats(&run.ms);
    Ok(json!({
        "pods": opts.burst,
        "node_kind": kind.as_str(),
        "write_latency_ms": opts.write_latency_ms,
        "operation_retry_after_secs": retry_after,
        "pool": {"warm": c.pool.warm, "batch": c.pool.batch},
        "pool_total_before": pool_before.total,
        "pool_total_after": pool_after.total,
        "all_wired_s": run.wall_s,
        "wired": run.ms.len(),
        "failures": run.failures,
        "add_ms": s,
        // A NIC PUT, or the instance update that carries a Uniform instance's NIC.
        "nic_writes": counters["calls"]["nic_put"].as_u64().unwrap_or(0)
            + counters["calls"]["vmss_vm_put"].as_u64().unwrap_or(0),
        "cloud_calls": counters["calls"],
        "timeline_s": timeline,
    }))
}

/// Seconds since midnight UTC (the agent logs UTC times of day; the bench runs on the same clock).
fn seconds_of_day(t: std::time::SystemTime) -> f64 {
    let unix = t
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    unix % 86_400.0
}

/// `2026-12-01T12:22:30.579126Z  INFO ...`: the time of day of a log line, in seconds.
fn log_time(line: &str) -> Option<f64> {
    let clock = line.split_whitespace().next()?.split('T').nth(1)?;
    let clock = clock.strip_suffix('Z')?;
    let mut parts = clock.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// Where the burst's time went, from the agent's log (seconds after the bench launched the
/// ADDs): the first waiter, the write leaving (after the gather window) and landing, the
/// allocations, and the end of the phase (the plugins wiring the pods). The first write only.
fn burst_timeline(log: &str, launched: f64, wall_s: f64) -> Value {
    let at = |line: &str| log_time(line).map(|t| (t - launched).rem_euclid(86_400.0));
    let find = |needle: &str| log.lines().find(|l| l.contains(needle));
    let gathered = find("demand gathered before the write");
    let waited_s = gathered
        .and_then(|l| l.split("waited=").nth(1))
        .and_then(|w| w.split_whitespace().next())
        .and_then(|w| {
            w.strip_suffix("ms")
                .and_then(|ms| ms.parse::<f64>().ok().map(|ms| ms / 1e3))
                .or_else(|| w.strip_suffix('s').and_then(|s| s.parse().ok()))
        });
    let write_start = find("asking the cloud for addresses").and_then(at);
    let write_end = find("pool grew").and_then(at);
    let allocated: Vec<f64> = log
        .lines()
        .filter(|l| l.contains(": allocated "))
        .filter_map(at)
        .collect();
    let first_waiter = gathered.and_then(at).zip(waited_s).map(|(g, w)| g - w);
    json!({
        "first_waiter": first_waiter,
        "gather": waited_s,
        "write_leaves": write_start,
        "write_lands": write_end,
        "write": write_start.zip(write_end).map(|(a, b)| b - a),
        "first_allocated": allocated.first(),
        "last_allocated": allocated.last(),
        "all_wired": wall_s,
    })
}

/// Agent VmRSS idle and with 250 allocations (made through the API: no veths needed).
fn agent_rss(lab: &Lab) -> Result<Value, LabError> {
    progress("agent RSS at 250 allocations (node-2)");
    let st = lab.state();
    let node = st.node("node-2").cloned().expect("node-2");
    let pid = lab.agent_pid("node-2").expect("agent pid");
    let idle = proc_rss_kib(pid);
    let target = 250usize;
    let next = AtomicUsize::new(0);
    let failures = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= target {
                        break;
                    }
                    let body =
                        json!({"container_id": format!("rss-{i}"), "ifname": "eth0"}).to_string();
                    // 503 = try again later (the pool is growing): retry as the plugin would.
                    let give_up = Instant::now() + Duration::from_secs(120);
                    loop {
                        let r = crate::http::unix_request(
                            &node.socket,
                            "POST",
                            vnet_api::PATH_ALLOCATE,
                            Some(&body),
                        );
                        match r {
                            Ok(r) if r.status == 200 => break,
                            Ok(r) if r.status == 503 && Instant::now() < give_up => {
                                std::thread::sleep(Duration::from_millis(100));
                            }
                            _ => {
                                failures.fetch_add(1, Ordering::SeqCst);
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    let status = lab.agent_status("node-2")?;
    let at_250 = proc_rss_kib(pid);
    for i in 0..target {
        let body = json!({"container_id": format!("rss-{i}"), "ifname": "eth0"}).to_string();
        let _ =
            crate::http::unix_request(&node.socket, "POST", vnet_api::PATH_RELEASE, Some(&body));
    }
    Ok(json!({
        "idle_kib": idle,
        "at_allocations_kib": at_250,
        "allocations": status.pool.allocated,
        "failed_requests": failures.into_inner(),
        "mock_rss_kib": lab.mock_pid().and_then(proc_rss_kib),
    }))
}

/// iperf3 from `client_ns` to `server_ip` in `server_ns`; bits per second.
fn iperf(
    server_ns: &str,
    server_ip: Ipv4Addr,
    client_ns: &str,
    secs: u64,
) -> Result<f64, LabError> {
    let mut server = Command::new("iperf3");
    server.args(["-s", "-1", "-B", &server_ip.to_string(), "-p", "5201"]);
    enter_netns(&mut server, server_ns, false)?;
    let server_thread = std::thread::spawn(move || {
        exec::run_timed(&mut server, None, Duration::from_secs(secs + 60))
    });
    let mut last_err = String::new();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let mut client = Command::new("iperf3");
        client.args([
            "-c",
            &server_ip.to_string(),
            "-p",
            "5201",
            "-t",
            &secs.to_string(),
            "-J",
        ]);
        enter_netns(&mut client, client_ns, false)?;
        let (out, _) = exec::run_timed(&mut client, None, Duration::from_secs(secs + 30))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64() {
            let _ = server_thread.join();
            return Ok(bps);
        }
        last_err = v["error"].as_str().unwrap_or(&text).to_owned();
        if !last_err.contains("refused") {
            break;
        }
    }
    // The server thread ends with its timeout, or when the lab teardown kills what runs in the
    // namespace.
    Err(LabError::Failed(format!(
        "iperf3 {client_ns} -> {server_ip}: {last_err}"
    )))
}

fn data_path(lab: &Lab, secs: u64) -> Result<Value, LabError> {
    progress("data path: iperf3 pod->pod across nodes, node->node, VXLAN overlay");
    let st = lab.state();
    let a = lab.add_pod("node-1", "iperf-a")?;
    let b = lab.add_pod("node-2", "iperf-b")?;
    let n1 = st.node("node-1").cloned().expect("node-1");
    let n2 = st.node("node-2").cloned().expect("node-2");
    let vx = format!("{}-vx", st.token);
    let (o1, o2) = (
        Ipv4Addr::new(192, 168, 240, 1),
        Ipv4Addr::new(192, 168, 240, 2),
    );
    for (n, local, remote, addr) in [(&n1, n1.ip, n2.ip, o1), (&n2, n2.ip, n1.ip, o2)] {
        ip_batch(
            Some(&n.ns),
            &[
                format!(
                    "link add {vx} type vxlan id 42 local {local} remote {remote} dstport 4789 dev eth0"
                ),
                format!("addr add {addr}/24 dev {vx}"),
                format!("link set {vx} up"),
            ],
        )?;
    }
    // An overlay pod path as Flannel's VXLAN backend builds it: a pod namespace behind a veth
    // on each node, pod subnets routed over the tunnel.
    let overlay = [
        (&n1, format!("{}-ovl-a", st.token), 1u8, o2),
        (&n2, format!("{}-ovl-b", st.token), 2u8, o1),
    ];
    for (n, ns, k, peer) in &overlay {
        ip(&["netns", "add", ns])?;
        let other = 3 - k;
        let host_if = format!("{}-o{k}", st.token);
        ip_batch(
            Some(&n.ns),
            &[
                format!("link add {host_if} type veth peer name eth0 netns {ns}"),
                format!("addr add 10.99.{k}.1/24 dev {host_if}"),
                format!("link set {host_if} up"),
                format!("route add 10.99.{other}.0/24 via {peer} dev {vx} onlink"),
            ],
        )?;
        ip_batch(
            Some(ns),
            &[
                "link set lo up".into(),
                format!("addr add 10.99.{k}.2/24 dev eth0"),
                "link set eth0 up".into(),
                format!("route add default via 10.99.{k}.1"),
            ],
        )?;
    }
    let overlay_b = Ipv4Addr::new(10, 99, 2, 2);
    // Interleaved repetitions, medians: one iperf3 run on a shared machine is noisy.
    let (mut pod, mut node, mut vxlan, mut pod_vxlan) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..IPERF_REPS {
        pod.push(iperf(&b.ns, b.ip, &a.ns, secs)?);
        node.push(iperf(&n2.ns, n2.ip, &n1.ns, secs)?);
        vxlan.push(iperf(&n2.ns, o2, &n1.ns, secs)?);
        pod_vxlan.push(iperf(&overlay[1].1, overlay_b, &overlay[0].1, secs)?);
    }
    for (_, ns, _, _) in &overlay {
        let _ = ip(&["netns", "del", ns]);
    }
    for n in [&n1, &n2] {
        let _ = ip(&["-n", &n.ns, "link", "del", &vx]);
    }
    let (pod_bps, node_bps, vxlan_bps, pod_vxlan_bps) = (
        median(pod.clone()),
        median(node.clone()),
        median(vxlan.clone()),
        median(pod_vxlan.clone()),
    );
    Ok(json!({
        "seconds": secs,
        "reps": IPERF_REPS,
        "pod_to_pod_across_nodes_bps": pod_bps,
        "node_to_node_bps": node_bps,
        "vxlan_node_to_node_bps": vxlan_bps,
        "vxlan_pod_to_pod_bps": pod_vxlan_bps,
        "samples_bps": {"pod_to_pod": pod, "node_to_node": node, "vxlan_node": vxlan, "vxlan_pod": pod_vxlan},
        "pod_vs_node_ratio": pod_bps / node_bps,
        "pod_vs_vxlan_ratio": pod_bps / pod_vxlan_bps,
        "pod_vs_vxlan_node_ratio": pod_bps / vxlan_bps,
    }))
}

fn cmd_line(program: &str, args: &[&str]) -> String {
    exec::run_ok(Command::new(program).args(args), Duration::from_secs(10))
        .map(|s| s.lines().next().unwrap_or("").trim().to_owned())
        .unwrap_or_else(|_| "unavailable".into())
}

fn versions(cfg: &LabConfig) -> Value {
    let os = fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("PRETTY_NAME=")
                    .map(|v| v.trim_matches('"').to_owned())
            })
        })
        .unwrap_or_default();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cnitool_version = fs::read_to_string(format!("{}.version", cfg.cnitool.display()))
        .map(|t| t.lines().next().unwrap_or("").to_owned())
        .unwrap_or_else(|_| "no .version file".into());
    json!({
        "date_utc": cmd_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "kernel": cmd_line("uname", &["-r"]),
        "os": os,
        "cpu": format!("{cpu} x {cpus}"),
        "rustc": cmd_line("rustc", &["-V"]),
        "containernetworking-plugins": cmd_line("dpkg-query", &["-W", "-f=${Version}", "containernetworking-plugins"]),
        "cnitool": cnitool_version,
        "iperf3": cmd_line("iperf3", &["-v"]),
        "vnet_git": cmd_line("git", &["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "--short", "HEAD"]),
        "bin_dir": cfg.bin_dir.display().to_string(),
    })
}

fn file_size(path: &Path) -> Option<u64> {
    fs::metadata(path).ok().map(|m| m.len())
}

/// The whole bench; writes report.md, results.json and latency.svg into `opts.out`.
pub fn run(cfg: &LabConfig, opts: &BenchOptions) -> Result<(), LabError> {
    fs::create_dir_all(&opts.out)
        .map_err(|e| LabError::Failed(format!("{}: {e}", opts.out.display())))?;
    let mut c = cfg.clone();
    c.nodes = 2;
    // A steady-state node: the warm pool covers a whole phase, so ADD latency is the plugin's
    // and the agent's, not a cloud write's (the cold burst measures that separately).
    c.pool = PoolConfig {
        warm: (opts.pods as u32 + 8).min(200),
        batch: 16,
        max: 250,
        release_delay_secs: 3600,
        cooldown_secs: 1,
        allocate_timeout_secs: 30,
    };
    let started = Instant::now();
    let lab = LabGuard::new(Lab::up(&c)?);
    // The first fill of the warm pool is cloud writes: let it finish before timing.
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let s = lab.agent_status("node-1")?;
        if s.pool.free >= c.pool.warm && s.pool.pending == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let anchors = start_anchors(&c);
    let lat = latency(&lab, opts)?;
    let rss = agent_rss(&lab)?;
    let dp = if opts.iperf_secs > 0 {
        data_path(&lab, opts.iperf_secs).unwrap_or_else(|e| json!({"error": e.to_string()}))
    } else {
        Value::Null
    };
    drop(lab);
    let mut bursts = Vec::new();
    let kinds = if opts.burst_node_kinds.is_empty() {
        vec![crate::lab::NodeKind::Vm]
    } else {
        opts.burst_node_kinds.clone()
    };
    for &kind in &kinds {
        for &retry_after in &opts.burst_retry_after_secs {
            bursts.push(cold_burst(cfg, opts, retry_after, kind)?);
        }
    }
    let burst = bursts.first().cloned().unwrap_or(Value::Null);
    let plugin_path = c.bin_dir.join("vnet-cni");
    let sizes = json!({
        "vnet-cni_bytes": file_size(&plugin_path),
        "vnet-cni_path": plugin_path.display().to_string(),
        "ptp_bytes": file_size(Path::new("/usr/lib/cni/ptp")),
        "host-local_bytes": file_size(Path::new("/usr/lib/cni/host-local")),
    });
    let mut latency_json = serde_json::Map::new();
    let mut summary: Vec<(String, String, Stats, f64, usize)> = Vec::new();
    for (label, phases) in &lat {
        let mut per_phase = serde_json::Map::new();
        for (pi, runs) in phases.iter().enumerate() {
            let per_rep: Vec<Stats> = runs.iter().map(|r| stats(&r.ms)).collect();
            let med = Stats {
                n: per_rep.first().map(|s| s.n).unwrap_or(0),
                p50: median(per_rep.iter().map(|s| s.p50).collect()),
                p90: median(per_rep.iter().map(|s| s.p90).collect()),
                p99: median(per_rep.iter().map(|s| s.p99).collect()),
                max: median(per_rep.iter().map(|s| s.max).collect()),
                mean: median(per_rep.iter().map(|s| s.mean).collect()),
            };
            let pods_per_s = median(runs.iter().map(|r| r.ms.len() as f64 / r.wall_s).collect());
            let failures: usize = runs.iter().map(|r| r.failures).sum();
            let n = |r: &PhaseRun| r.ms.len().max(1) as f64;
            let cpu_per_op = json!({
                "clients_ms": median(runs.iter().map(|r| r.cpu.clients_ms / n(r)).collect()),
                "agent_ms": median(runs.iter().map(|r| r.cpu.agent_ms / n(r)).collect()),
                "machine_ms": median(runs.iter().map(|r| r.cpu.machine_ms / n(r)).collect()),
            });
            per_phase.insert(
                PHASES[pi].to_owned(),
                json!({
                    "median_of_reps": med,
                    "pods_per_s": pods_per_s,
                    "failures": failures,
                    "cpu_ms_per_op": cpu_per_op,
                    "reps": runs.iter().map(|r| json!({"stats": stats(&r.ms), "wall_s": r.wall_s, "cpu_ms": r.cpu, "samples_ms": r.ms})).collect::<Vec<_>>(),
                }),
            );
            summary.push((
                label.clone(),
                PHASES[pi].to_owned(),
                med,
                pods_per_s,
                failures,
            ));
        }
        latency_json.insert(label.clone(), Value::Object(per_phase));
    }
    let mut ratios = serde_json::Map::new();
    for phase in PHASES {
        let find = |l: &str| summary.iter().find(|s| s.0 == l && s.1 == phase).cloned();
        if let (Some(v), Some(p)) = (find("vnet-cni"), find("ptp + host-local")) {
            ratios.insert(
                phase.to_owned(),
                json!({"p50_vnet_over_ptp": v.2.p50 / p.2.p50, "p99_vnet_over_ptp": v.2.p99 / p.2.p99, "pods_per_s_vnet_over_ptp": v.3 / p.3}),
            );
        }
    }
    let results = json!({
        "options": {"pods": opts.pods, "concurrency": opts.concurrency, "reps": REPS, "burst": opts.burst,
                    "write_latency_ms": opts.write_latency_ms, "iperf_secs": opts.iperf_secs,
                    "latency_lab_pool": {"warm": c.pool.warm, "batch": c.pool.batch, "cooldown_secs": c.pool.cooldown_secs}},
        "versions": versions(&c),
        "latency": latency_json,
        "ratios": ratios,
        "cold_burst": burst,
        "cold_burst_runs": bursts,
        "agent_rss": rss,
        "binary_sizes": sizes,
        "start_anchors_ms": anchors,
        "data_path": dp,
        "total_runtime_s": started.elapsed().as_secs_f64(),
    });
    let write = |name: &str, text: String| {
        let path = opts.out.join(name);
        fs::write(&path, text).map_err(|e| LabError::Failed(format!("{}: {e}", path.display())))
    };
    write(
        "results.json",
        serde_json::to_string_pretty(&results).expect("json"),
    )?;
    write("latency.svg", svg_chart(&lat))?;
    let md = markdown(&results, &summary);
    write("report.md", md.clone())?;
    print!("{md}");
    eprintln!(
        "==> bench: wrote {}/report.md, results.json, latency.svg",
        opts.out.display()
    );
    Ok(())
}

fn f2(v: &Value) -> String {
    v.as_f64()
        .map(|x| format!("{x:.2}"))
        .unwrap_or_else(|| "-".into())
}

fn markdown(r: &Value, summary: &[(String, String, Stats, f64, usize)]) -> String {
    let mut md = String::new();
    let o = &r["options"];
    let _ = writeln!(md, "# vnet-cni lab bench\n");
    let _ = writeln!(
        md,
        "N={} pods per phase, {} in flight in the concurrent phases, {} repetitions (medians of each repetition's nearest-rank percentiles); every call is `cnitool` in node-1's namespace. Latency lab pool: warm {}, batch {}.\n",
        o["pods"],
        o["concurrency"],
        o["reps"],
        o["latency_lab_pool"]["warm"],
        o["latency_lab_pool"]["batch"]
    );
    let _ = writeln!(md, "## ADD / DEL latency\n");
    let _ = writeln!(
        md,
        "| plugin | phase | p50 ms | p90 ms | p99 ms | max ms | pods/s | failures |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    for (label, phase, s, per_s, fails) in summary {
        let _ = writeln!(
            md,
            "| {label} | {phase} | {:.2} | {:.2} | {:.2} | {:.2} | {per_s:.1} | {fails} |",
            s.p50, s.p90, s.p99, s.max
        );
    }
    let _ = writeln!(
        md,
        "\n| phase | p50 vnet/ptp | p99 vnet/ptp | pods/s vnet/ptp |\n|---|---|---|---|"
    );
    if let Some(ratios) = r["ratios"].as_object() {
        for (phase, v) in ratios {
            let _ = writeln!(
                md,
                "| {phase} | {} | {} | {} |",
                f2(&v["p50_vnet_over_ptp"]),
                f2(&v["p99_vnet_over_ptp"]),
                f2(&v["pods_per_s_vnet_over_ptp"])
            );
        }
    }
    let _ = writeln!(
        md,
        "\nCPU per operation (ms, median over repetitions): the cnitool processes and the plugins they ran, node-1's agent, and the whole machine (kernel threads, softirqs and other load included; 10 ms ticks).\n\n| plugin | phase | clients | agent | machine |\n|---|---|---|---|---|"
    );
    for (label, phase, ..) in summary {
        let c = &r["latency"][label][phase]["cpu_ms_per_op"];
        let _ = writeln!(
            md,
            "| {label} | {phase} | {} | {} | {} |",
            f2(&c["clients_ms"]),
            f2(&c["agent_ms"]),
            f2(&c["machine_ms"])
        );
    }
    let _ = writeln!(md, "\n## Cold-pool burst\n");
    let runs = match r["cold_burst_runs"].as_array() {
        Some(runs) if !runs.is_empty() => runs.clone(),
        _ => vec![r["cold_burst"].clone()],
    };
    for b in &runs {
        let _ = writeln!(
            md,
            "{} pods launched at once on a {} node with an empty pool (warm {}, batch {}), mock NIC write latency {} ms, operation Retry-After {} s: all wired after **{} s** ({} wired, {} failed); **{} NIC writes**; pool total {} -> {}; ADD p50 {} ms, p99 {} ms.\n",
            b["pods"],
            b["node_kind"].as_str().unwrap_or("vm"),
            b["pool"]["warm"],
            b["pool"]["batch"],
            b["write_latency_ms"],
            b["operation_retry_after_secs"],
            f2(&b["all_wired_s"]),
            b["wired"],
            b["failures"],
            b["nic_writes"],
            b["pool_total_before"],
            b["pool_total_after"],
            f2(&b["add_ms"]["p50"]),
            f2(&b["add_ms"]["p99"])
        );
        let t = &b["timeline_s"];
        if t.is_object() {
            let _ = writeln!(
                md,
                "Timeline (s after launch, from the agent's log): first ADD waiting {}, write leaves {} (gathered {}), lands {} (write {}), allocations {}-{}, all wired {}.\n",
                f2(&t["first_waiter"]),
                f2(&t["write_leaves"]),
                f2(&t["gather"]),
                f2(&t["write_lands"]),
                f2(&t["write"]),
                f2(&t["first_allocated"]),
                f2(&t["last_allocated"]),
                f2(&t["all_wired"])
            );
        }
    }
    let _ = writeln!(
        md,
        "\n## Process start anchors (same run, p50 / p99 ms over {ANCHOR_RUNS} runs)\n\n| binary | p50 ms | p99 ms |\n|---|---|---|"
    );
    if let Some(a) = r["start_anchors_ms"].as_object() {
        for (name, st) in a {
            let _ = writeln!(md, "| {name} | {} | {} |", f2(&st["p50"]), f2(&st["p99"]));
        }
    }
    let rss = &r["agent_rss"];
    let _ = writeln!(md, "\n## Footprint\n");
    let _ = writeln!(
        md,
        "- agent VmRSS: {} KiB idle, {} KiB at {} allocations ({} failed requests); mock cloud {} KiB",
        rss["idle_kib"],
        rss["at_allocations_kib"],
        rss["allocations"],
        rss["failed_requests"],
        rss["mock_rss_kib"]
    );
    let s = &r["binary_sizes"];
    let _ = writeln!(
        md,
        "- plugin binary: {} bytes ({}); for reference ptp {} bytes, host-local {} bytes",
        s["vnet-cni_bytes"],
        s["vnet-cni_path"].as_str().unwrap_or(""),
        s["ptp_bytes"],
        s["host-local_bytes"]
    );
    let d = &r["data_path"];
    let _ = writeln!(
        md,
        "\n## Data path (iperf3 TCP, {} s per run, median of {} interleaved runs)\n",
        d["seconds"], d["reps"]
    );
    if d["error"].is_string() || d.is_null() {
        let _ = writeln!(
            md,
            "not measured: {}",
            d["error"].as_str().unwrap_or("skipped")
        );
    } else {
        let g = |k: &str| {
            d[k].as_f64()
                .map(|x| format!("{:.2} Gbit/s", x / 1e9))
                .unwrap_or_default()
        };
        let _ = writeln!(md, "| path | throughput |\n|---|---|");
        let _ = writeln!(
            md,
            "| pod (node-1) -> pod (node-2), routed, no overlay | {} |",
            g("pod_to_pod_across_nodes_bps")
        );
        let _ = writeln!(md, "| node-1 -> node-2 | {} |", g("node_to_node_bps"));
        let _ = writeln!(
            md,
            "| node-1 -> node-2 over VXLAN | {} |",
            g("vxlan_node_to_node_bps")
        );
        let _ = writeln!(
            md,
            "| pod -> pod over a VXLAN overlay (veth + routes + tunnel, Flannel-style) | {} |",
            g("vxlan_pod_to_pod_bps")
        );
        let _ = writeln!(
            md,
            "\nvnet-cni pod/node ratio **{}**; vnet-cni pod / VXLAN-overlay pod ratio **{}** (against bare \
             node-to-node VXLAN: {}).",
            f2(&d["pod_vs_node_ratio"]),
            f2(&d["pod_vs_vxlan_ratio"]),
            f2(&d["pod_vs_vxlan_node_ratio"])
        );
    }
    let _ = writeln!(md, "\n## Machine and versions\n\n```");
    if let Some(v) = r["versions"].as_object() {
        for (k, val) in v {
            let _ = writeln!(md, "{k}: {}", val.as_str().unwrap_or(""));
        }
    }
    let _ = writeln!(
        md,
        "```\n\nTotal bench runtime {} s. Chart: latency.svg; every sample: results.json.",
        f2(&r["total_runtime_s"])
    );
    md
}

/// Four panels (one per phase), each with the CDF of every sample of both plugins.
fn svg_chart(lat: &LatencyRuns) -> String {
    let (pw, ph, pad) = (440.0, 260.0, 50.0);
    let colors = ["#1f77b4", "#ff7f0e", "#2ca02c"];
    let mut svg = String::new();
    let width = 2.0 * (pw + pad) + pad;
    let height = 2.0 * (ph + pad) + pad + 30.0;
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{pad}" y="24" font-size="16">cnitool call latency, CDF of all samples (ms)</text>"#
    );
    for (i, (label, _)) in lat.iter().enumerate() {
        let x = pad + 480.0 + i as f64 * 170.0;
        let _ = write!(
            svg,
            r#"<rect x="{x}" y="12" width="12" height="12" fill="{}"/><text x="{}" y="23">{label}</text>"#,
            colors[i % colors.len()],
            x + 16.0
        );
    }
    for (pi, phase) in PHASES.iter().enumerate() {
        let ox = pad + (pi % 2) as f64 * (pw + pad);
        let oy = pad + 10.0 + (pi / 2) as f64 * (ph + pad);
        let series: Vec<Vec<f64>> = lat
            .iter()
            .map(|(_, phases)| {
                let mut all: Vec<f64> = phases[pi]
                    .iter()
                    .flat_map(|r| r.ms.iter().copied())
                    .collect();
                all.sort_by(|a, b| a.total_cmp(b));
                all
            })
            .collect();
        let xmax = series
            .iter()
            .filter_map(|s| s.last().copied())
            .fold(1.0_f64, f64::max)
            * 1.05;
        let _ = write!(
            svg,
            r##"<g transform="translate({ox},{oy})"><rect width="{pw}" height="{ph}" fill="none" stroke="#999"/><text x="4" y="-6" font-weight="bold">{phase}</text>"##
        );
        for t in 0..=4 {
            let fx = t as f64 / 4.0;
            let _ = write!(
                svg,
                r##"<line x1="{x}" y1="{ph}" x2="{x}" y2="{y2}" stroke="#999"/><text x="{x}" y="{ty}" text-anchor="middle">{v:.0}</text><text x="-6" y="{yy}" text-anchor="end">{p:.2}</text>"##,
                x = fx * pw,
                y2 = ph + 4.0,
                ty = ph + 16.0,
                v = fx * xmax,
                yy = ph - fx * ph + 4.0,
                p = fx
            );
        }
        for (si, s) in series.iter().enumerate() {
            if s.is_empty() {
                continue;
            }
            let mut points = String::new();
            let n = s.len() as f64;
            for (k, v) in s.iter().enumerate() {
                let x = v / xmax * pw;
                let _ = write!(
                    points,
                    "{x:.1},{:.1} {x:.1},{:.1} ",
                    ph - (k as f64 / n) * ph,
                    ph - ((k + 1) as f64 / n) * ph
                );
            }
            let _ = write!(
                svg,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"#,
                colors[si % colors.len()],
                points.trim_end()
            );
        }
        let _ = write!(svg, "</g>");
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_burst_timeline_is_read_from_the_agent_log() {
        let log = "\
2026-12-01T12:22:30.579126Z  INFO vnet_agent::agent::sizing: demand gathered before the write waited=615.28211ms arrivals=98 waiters=100
2026-12-01T12:22:30.579312Z  INFO vnet_agent::agent::sizing: asking the cloud for addresses count=104
2026-12-01T12:22:33.889704Z  INFO vnet_agent::agent::sizing: pool grew count=104
2026-12-01T12:22:33.897305Z  INFO request{method=POST}: vnet_agent::agent::allocate: allocated container_id=a
2026-12-01T12:22:33.931469Z  INFO request{method=POST}: vnet_agent::agent::allocate: allocated container_id=b
";
        let launched = 12.0 * 3600.0 + 22.0 * 60.0 + 29.8;
        let t = burst_timeline(log, launched, 4.31);
        let near = |v: &Value, x: f64| (v.as_f64().unwrap() - x).abs() < 1e-3;
        assert!(near(&t["gather"], 0.615), "{t}");
        assert!(near(&t["first_waiter"], 0.164), "{t}");
        assert!(near(&t["write"], 3.310), "{t}");
        assert!(near(&t["last_allocated"], 4.131), "{t}");
        assert!(near(&t["all_wired"], 4.31), "{t}");
    }

    #[test]
    fn nearest_rank_percentiles_match_the_shell_harness() {
        let v: Vec<f64> = (1..=50).map(f64::from).collect();
        let s = stats(&v);
        assert_eq!((s.p50, s.p90, s.p99, s.max), (25.0, 45.0, 50.0, 50.0));
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn the_chart_is_one_svg_document() {
        let run = PhaseRun {
            ms: vec![1.0, 2.0, 3.0],
            wall_s: 1.0,
            failures: 0,
            cpu: PhaseCpu::default(),
        };
        let lat = vec![
            ("a".to_owned(), vec![vec![run.clone()]; 4]),
            ("b".to_owned(), vec![vec![run]; 4]),
        ];
        let svg = svg_chart(&lat);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 8);
    }
}
