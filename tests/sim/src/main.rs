//! `vnet-clustersim run --nodes N --scenario cold|scale-out|churn --policy agent|naive|cluster
//! [--mode address|prefix] --out DIR` runs one simulation and writes
//! `DIR/<scenario>-<policy>[-prefix]-<N>.json`;
//! `vnet-clustersim report --out DIR` turns every result in DIR into `report.md` and `chart.svg`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use vnet_agent::config::PoolMode;
use vnet_clustersim::{Policy, Scenario, SimConfig, SimResult, report};

#[derive(Parser)]
#[command(
    about = "N nodes' real vnet-agent pool logic and Azure client against one vnet-mockcloud enforcing ARM's buckets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum ScenarioArg {
    Cold,
    ScaleOut,
    Churn,
}

#[derive(Clone, Copy, ValueEnum)]
enum PolicyArg {
    Agent,
    Naive,
    Cluster,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Address,
    Prefix,
}

#[derive(Subcommand)]
enum Command {
    /// One run; prints a summary and writes its JSON into --out.
    Run {
        #[arg(long)]
        nodes: usize,
        #[arg(long, value_enum)]
        scenario: ScenarioArg,
        #[arg(long, value_enum)]
        policy: PolicyArg,
        #[arg(long, default_value_t = 30)]
        pods_per_node: u32,
        /// The agents' `pool.mode`.
        #[arg(long, value_enum, default_value = "address")]
        mode: ModeArg,
        /// Naive policy: seconds between a node's looks at its pool.
        #[arg(long, default_value_t = 1.0)]
        naive_timer_s: f64,
        /// Naive policy: fixed seconds to wait after a 429 or failed call.
        #[arg(long, default_value_t = 2.0)]
        naive_backoff_s: f64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Tables (report.md) and chart (chart.svg) from every *.json in --out.
    Report {
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run {
            nodes,
            scenario,
            policy,
            pods_per_node,
            mode,
            naive_timer_s,
            naive_backoff_s,
            out,
        } => {
            let scenario = match scenario {
                ScenarioArg::Cold => Scenario::Cold,
                ScenarioArg::ScaleOut => Scenario::ScaleOut,
                ScenarioArg::Churn => Scenario::Churn,
            };
            let policy = match policy {
                PolicyArg::Agent => Policy::Agent,
                PolicyArg::Naive => Policy::Naive,
                PolicyArg::Cluster => Policy::Cluster,
            };
            let mut cfg = SimConfig::new(nodes, scenario, policy);
            cfg.pods_per_node = pods_per_node;
            cfg.node.pool.mode = match mode {
                ModeArg::Address => PoolMode::Address,
                ModeArg::Prefix => PoolMode::Prefix,
            };
            cfg.node.naive_timer = Duration::from_secs_f64(naive_timer_s);
            cfg.node.naive_backoff = Duration::from_secs_f64(naive_backoff_s);
            // RUST_LOG=vnet_allocator=debug (say) traces a run on stderr; off by default, since
            // thousands of nodes' logs would cost more than the run.
            if std::env::var_os("RUST_LOG").is_some() {
                tracing_subscriber::fmt()
                    .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                    .with_writer(std::io::stderr)
                    .init();
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let result = runtime.block_on(vnet_clustersim::run(&cfg))?;
            std::fs::create_dir_all(&out)?;
            let path = out.join(format!(
                "{}-{}-{}.json",
                scenario.as_str(),
                result.policy,
                nodes
            ));
            std::fs::write(&path, serde_json::to_vec_pretty(&result)?)?;
            let mut summary = result.clone();
            summary.wired_at_s.clear();
            println!("{}", serde_json::to_string_pretty(&summary)?);
            eprintln!("wrote {}", path.display());
            runtime.shutdown_timeout(Duration::from_secs(1));
            Ok(())
        }
        Command::Report { out } => {
            let mut results: Vec<SimResult> = Vec::new();
            for entry in std::fs::read_dir(&out).with_context(|| format!("{}", out.display()))? {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "json") {
                    let text = std::fs::read_to_string(&path)?;
                    let mut result: SimResult = serde_json::from_str(&text)
                        .with_context(|| format!("{}", path.display()))?;
                    report::normalize(&mut result);
                    results.push(result);
                }
            }
            std::fs::write(out.join("report.md"), report::tables(&results))?;
            std::fs::write(out.join("chart.svg"), report::svg(&results))?;
            println!("{}", report::tables(&results));
            Ok(())
        }
    }
}
