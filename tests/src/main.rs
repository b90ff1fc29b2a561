//! vnetctl: operator commands for vnet-cni; today the lab (`vnetctl lab ...`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use vnet_lab::lab::{self, DEFAULT_BASE_DIR, Lab, LabConfig, PoolConfig};
use vnet_lab::{bench, demo, report};

#[derive(Parser)]
#[command(name = "vnetctl", version, about = "vnet-cni operator tool")]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    /// A simulated VNet on this machine (network namespaces; run as root).
    Lab {
        #[command(subcommand)]
        command: LabCmd,
    },
}

#[derive(Args, Clone)]
struct Where {
    /// Lab name (several labs can run side by side).
    #[arg(long, default_value = "lab")]
    name: String,
    /// Parent of the lab state directories.
    #[arg(long, default_value = DEFAULT_BASE_DIR)]
    state_dir: PathBuf,
}

#[derive(Args, Clone)]
struct Build {
    /// Number of Kubernetes nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// VNet address space and subnet (gateway .1, nodes from .4, then the plain VM).
    #[arg(long, default_value = "10.240.0.0/16")]
    subnet: String,
    /// Free IPs each agent keeps ready.
    #[arg(long, default_value_t = PoolConfig::default().warm)]
    warm: u32,
    /// Pool grow/shrink step.
    #[arg(long, default_value_t = PoolConfig::default().batch)]
    batch: u32,
    /// Most pod IPs per node.
    #[arg(long, default_value_t = PoolConfig::default().max)]
    max: u32,
    #[arg(long, default_value_t = PoolConfig::default().cooldown_secs)]
    cooldown_secs: u64,
    #[arg(long, default_value_t = PoolConfig::default().release_delay_secs)]
    release_delay_secs: u64,
    /// Mock cloud faults at start (its --faults JSON, the shape of PUT /admin/faults).
    #[arg(long)]
    faults: Option<String>,
    /// Added latency of every mock cloud call, ms (merged into --faults as latency."*").
    #[arg(long)]
    cloud_latency_ms: Option<u64>,
    /// Where vnet-mockcloud, vnet-agent and vnet-cni are (default: next to vnetctl).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// cnitool binary (default: $VNET_CNITOOL or /usr/local/bin/cnitool).
    #[arg(long)]
    cnitool: Option<PathBuf>,
    /// Chain the portmap plugin after vnet-cni.
    #[arg(long)]
    portmap: bool,
    /// What the nodes are in the cloud: vm, uniform (Uniform scale-set instances, as on AKS),
    /// flexible, mixed (vm,uniform,flexible), or a comma-separated list, cycled over the nodes.
    #[arg(long, default_value = "vm")]
    node_kind: String,
    /// The agents' pool mode: address (one address per ipConfiguration) or prefix (a /28 block
    /// per ipConfiguration, 16 addresses; not on Uniform scale-set nodes).
    #[arg(long, default_value = "address")]
    pool_mode: lab::PoolMode,
}

impl Build {
    fn config(&self, at: &Where) -> Result<LabConfig> {
        let mut cfg = LabConfig::new(&at.name);
        cfg.nodes = self.nodes;
        cfg.subnet = self.subnet.clone();
        cfg.pool = PoolConfig {
            warm: self.warm,
            batch: self.batch,
            max: self.max,
            cooldown_secs: self.cooldown_secs,
            release_delay_secs: self.release_delay_secs,
            ..PoolConfig::default()
        };
        cfg.pool_mode = self.pool_mode;
        cfg.faults = merge_latency(self.faults.as_deref(), self.cloud_latency_ms)?;
        cfg.base_dir = at.state_dir.clone();
        if let Some(b) = &self.bin_dir {
            cfg.bin_dir = b.clone();
        }
        if let Some(c) = &self.cnitool {
            cfg.cnitool = c.clone();
        }
        cfg.portmap = self.portmap;
        cfg.node_kinds = lab::parse_node_kinds(&self.node_kind)?;
        Ok(cfg)
    }
}

#[derive(Subcommand)]
enum LabCmd {
    /// Build the lab: router + mock cloud, nodes + agents, plain VM, internet.
    Up {
        #[command(flatten)]
        at: Where,
        #[command(flatten)]
        build: Build,
    },
    /// Show the lab's processes, nodes (pools) and pods.
    Status {
        #[command(flatten)]
        at: Where,
    },
    /// Reimage a Uniform scale-set node in the mock cloud: its instance-level ipConfigurations
    /// go back to the scale set's model (the agent's status then lists what its pods lost).
    Reimage {
        node: String,
        #[command(flatten)]
        at: Where,
    },
    /// Remove everything the lab made (also after a crash); a no-op when there is no lab.
    Down {
        #[command(flatten)]
        at: Where,
    },
    /// Pods: network namespaces wired by cnitool + vnet-cni on a node.
    Pod {
        #[command(subcommand)]
        command: PodCmd,
    },
    /// Up, pods on every node, connectivity checks, tables, down (unless --keep).
    Demo {
        #[arg(long, default_value = "demo")]
        name: String,
        #[arg(long, default_value = DEFAULT_BASE_DIR)]
        state_dir: PathBuf,
        #[command(flatten)]
        build: Build,
        #[arg(long, default_value_t = 2)]
        pods_per_node: usize,
        /// Leave the lab running (remove it later with `vnetctl lab down --name demo`).
        #[arg(long)]
        keep: bool,
    },
    /// vnet-cni versus ptp + host-local, cold-pool burst, agent RSS, data path; writes a report.
    Bench {
        #[arg(long, default_value = "bench")]
        name: String,
        #[arg(long, default_value = DEFAULT_BASE_DIR)]
        state_dir: PathBuf,
        /// Where vnet-mockcloud, vnet-agent and vnet-cni are (use target/release).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        #[arg(long)]
        cnitool: Option<PathBuf>,
        /// Output directory for report.md, results.json and latency.svg.
        #[arg(long, default_value = "bench-out")]
        out: PathBuf,
        /// Pods per latency phase.
        #[arg(long, default_value_t = 50)]
        pods: usize,
        /// Calls in flight in the concurrent phases.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Pods in the cold-pool burst.
        #[arg(long, default_value_t = 100)]
        burst: usize,
        /// Mock cloud write latency for the burst, ms.
        #[arg(long, default_value_t = 1000)]
        write_latency_ms: u64,
        /// The mock's operation Retry-After (s) of each cold-burst run: the lab's 1 s, and the
        /// 10 s Azure answers on a NIC PUT.
        #[arg(long, value_delimiter = ',', default_values_t = [1u64, 10])]
        burst_retry_after: Vec<u64>,
        /// The node kinds the cold burst runs on, each at every Retry-After: the NIC path (vm)
        /// and a Uniform scale-set instance written through Compute (uniform).
        #[arg(long, default_value = "vm,uniform")]
        burst_node_kind: String,
        /// iperf3 seconds per data path measurement (0 = skip).
        #[arg(long, default_value_t = 5)]
        iperf_secs: u64,
    },
}

#[derive(Subcommand)]
enum PodCmd {
    /// Create a pod on NODE (name defaults to pod-<n>).
    Add {
        node: String,
        pod: Option<String>,
        #[command(flatten)]
        at: Where,
    },
    /// Delete pod POD on NODE (cnitool DEL, then the namespace).
    Del {
        node: String,
        pod: String,
        #[command(flatten)]
        at: Where,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vnetctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let Top::Lab { command } = cli.command;
    match command {
        LabCmd::Up { at, build } => {
            let lab = Lab::up(&build.config(&at)?)?;
            print!("{}", report::status(&lab));
            println!(
                "\nlab {:?} is up; `vnetctl lab pod add node-1`, `vnetctl lab status`, `vnetctl lab down` (add --name {} if not the default)",
                at.name, at.name
            );
        }
        LabCmd::Status { at } => {
            let lab = Lab::open(&at.state_dir, &at.name)?;
            print!("{}", report::status(&lab));
        }
        LabCmd::Reimage { node, at } => {
            let lab = Lab::open(&at.state_dir, &at.name)?;
            let lost = lab.reimage(&node)?;
            println!(
                "{node} reimaged: {} addresses left its NIC ({})",
                lost.len(),
                lost.iter()
                    .map(|ip| ip.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        LabCmd::Down { at } => {
            if !lab::is_root() {
                anyhow::bail!(lab::LabError::NeedsRoot);
            }
            if Lab::down_by_name(&at.state_dir, &at.name)? {
                println!("lab {:?} removed", at.name);
            } else {
                println!("no lab {:?}: nothing to do", at.name);
            }
        }
        LabCmd::Pod { command } => match command {
            PodCmd::Add { node, pod, at } => {
                let lab = Lab::open(&at.state_dir, &at.name)?;
                let name = match pod {
                    Some(n) => n,
                    None => next_pod_name(&lab, &node),
                };
                let pod = lab
                    .add_pod(&node, &name)
                    .with_context(|| format!("adding pod {name} on {node}"))?;
                println!(
                    "pod {} on {}: ip {}, host veth {}, netns {}",
                    pod.name, pod.node, pod.ip, pod.host_veth, pod.ns
                );
            }
            PodCmd::Del {
                node,
                pod: name,
                at,
            } => {
                let lab = Lab::open(&at.state_dir, &at.name)?;
                lab.del_pod(&node, &name)
                    .with_context(|| format!("deleting pod {name} on {node}"))?;
                println!("pod {name} on {node} deleted");
            }
        },
        LabCmd::Demo {
            name,
            state_dir,
            build,
            pods_per_node,
            keep,
        } => {
            let at = Where { name, state_dir };
            let ok = demo::run(&build.config(&at)?, pods_per_node, keep)?;
            return Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        LabCmd::Bench {
            name,
            state_dir,
            bin_dir,
            cnitool,
            out,
            pods,
            concurrency,
            burst,
            write_latency_ms,
            burst_retry_after,
            burst_node_kind,
            iperf_secs,
        } => {
            let mut cfg = LabConfig::new(&name);
            cfg.base_dir = state_dir;
            if let Some(b) = bin_dir {
                cfg.bin_dir = b;
            }
            if let Some(c) = cnitool {
                cfg.cnitool = c;
            }
            let opts = bench::BenchOptions {
                pods,
                concurrency,
                burst,
                write_latency_ms,
                burst_retry_after_secs: burst_retry_after,
                burst_node_kinds: lab::parse_node_kinds(&burst_node_kind)?,
                iperf_secs,
                out,
            };
            bench::run(&cfg, &opts)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `--faults` with `--cloud-latency-ms` added as the default latency of every operation.
fn merge_latency(faults: Option<&str>, latency_ms: Option<u64>) -> Result<Option<String>> {
    let Some(ms) = latency_ms else {
        return Ok(faults.map(str::to_owned));
    };
    let mut value: serde_json::Value = match faults {
        Some(text) => serde_json::from_str(text).context("--faults is not JSON")?,
        None => serde_json::json!({}),
    };
    let object = value
        .as_object_mut()
        .context("--faults must be a JSON object")?;
    let latency = object
        .entry("latency")
        .or_insert_with(|| serde_json::json!({}));
    latency["*"] = serde_json::json!({ "fixed_ms": ms });
    Ok(Some(value.to_string()))
}

fn next_pod_name(lab: &Lab, node: &str) -> String {
    let st = lab.state();
    (1..)
        .map(|i| format!("pod-{i}"))
        .find(|n| !st.pods.iter().any(|p| p.node == node && &p.name == n))
        .expect("an unused pod name")
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "vnetctl", "lab", "pod", "add", "node-1", "web", "--name", "x",
        ]);
        assert!(cli.is_ok());
    }

    #[test]
    fn cloud_latency_merges_into_the_faults() {
        assert_eq!(merge_latency(None, None).unwrap(), None);
        let merged = merge_latency(Some(r#"{"throttle":{"probability":0.1}}"#), Some(200)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&merged.unwrap()).unwrap();
        assert_eq!(v["latency"]["*"]["fixed_ms"], 200);
        assert_eq!(v["throttle"]["probability"], 0.1);
        assert!(merge_latency(Some("[1]"), Some(1)).is_err());
    }
}
