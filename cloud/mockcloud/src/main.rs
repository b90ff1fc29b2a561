//! `vnet-mockcloud --listen ADDR:PORT --topology FILE [--state FILE] [--fabric-routes] [--faults JSON]
//! [--principals FILE] [--rate-limits JSON]`

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use vnet_mockcloud::{Faults, MockConfig, MockServer, Principals, RateLimits, Topology};

/// Emulates the slice of Azure vnet-agent uses (IMDS, ARM NICs, long-running operations).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address to serve on (port 0 picks a free port; the chosen address is logged).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Topology JSON: subscription, resource_group, location, vnet, subnets, vms.
    #[arg(long)]
    topology: PathBuf,
    /// Keep assignments in this file across restarts (written atomically after each change).
    #[arg(long)]
    state: Option<PathBuf>,
    /// Maintain `<ip>/32 via <vm primary ip>` routes in this namespace for secondary addresses.
    #[arg(long)]
    fabric_routes: bool,
    /// Initial fault configuration (JSON, same shape as PUT /admin/faults).
    #[arg(long)]
    faults: Option<String>,
    /// Callers and their permissions: JSON `[{"token","name","role":{"Actions":[...]}}]`. With
    /// it, every ARM call needs a known bearer token and the role's actions (as on Azure).
    #[arg(long)]
    principals: Option<PathBuf>,
    /// ARM throttling buckets per principal, JSON
    /// `{"reads":{"size":250,"refill_per_sec":25},"writes":{"size":200,"refill_per_sec":10}}`
    /// (those are the defaults).
    #[arg(long)]
    rate_limits: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.topology)
        .with_context(|| format!("cannot read topology {}", args.topology.display()))?;
    let topology = Topology::from_json(&text)?;
    let faults = match &args.faults {
        Some(json) => Faults::from_json(json).map_err(|e| anyhow::anyhow!("--faults: {e}"))?,
        None => Faults::default(),
    };
    let principals = match &args.principals {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read principals {}", path.display()))?;
            Some(Principals::from_json(&text)?)
        }
        None => None,
    };
    let rate_limits = match &args.rate_limits {
        Some(json) => {
            RateLimits::from_json(json).map_err(|e| anyhow::anyhow!("--rate-limits: {e}"))?
        }
        None => RateLimits::default(),
    };
    let config = MockConfig {
        topology,
        state_file: args.state,
        fabric_routes: args.fabric_routes,
        faults,
        principals,
        rate_limits,
    };
    let server = MockServer::start(config, args.listen).await?;
    // One line on stdout so a parent that asked for port 0 learns the address.
    println!("listening on {}", server.addr());

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}
