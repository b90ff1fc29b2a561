//! `vnet-agent --config FILE [--kubeconfig PATH]`: see `docs/configuration.md`.
//! `vnet-agent uninstall [--check] [--purge]`: see [`uninstall`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches};
use vnet_agent::agent::Agent;
use vnet_agent::config::{Cli, Config};
use vnet_agent::kubernetes::KubeAgent;
use vnet_agent::netlink::{LinkOps, NoLinks, Rtnetlink};
use vnet_agent::{daemon, logging, provider};
use vnet_kube::NodeAgent;

mod uninstall;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("uninstall") {
        return uninstall::main(args);
    }
    let matches = Cli::command()
        .after_help(
            "To remove vnet-cni from a drained node: vnet-agent uninstall [--check] [--purge] \
             (see vnet-agent uninstall --help)",
        )
        .get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let config = match Config::load(&cli, |var| std::env::var(var).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vnet-agent: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.print_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    if cli.check_config {
        return ExitCode::SUCCESS;
    }
    logging::init(config.log_format, &config.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vnet-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(main_async(config, cli.kubeconfig));
    // Blocking work still running (e.g. an nft call) must not hold the exit up.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("vnet-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn main_async(config: Config, kubeconfig: Option<PathBuf>) -> anyhow::Result<()> {
    // First, so that a signal during any start-up step stops the agent cleanly.
    // The handlers are installed here, not in the task, so they are in place before the first
    // log line.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
        let _ = tx.send(true);
        // The bound on stopping, whatever the cloud (or anything else) does. A thread, not a
        // task: it must fire even if the runtime is stuck.
        std::thread::spawn(|| {
            std::thread::sleep(daemon::STOP_DEADLINE);
            tracing::error!(deadline = ?daemon::STOP_DEADLINE, "the agent did not stop in time; exiting anyway (every acknowledged change is durable)");
            eprintln!(
                "vnet-agent: did not stop within {:?}; exiting",
                daemon::STOP_DEADLINE
            );
            std::process::exit(1);
        });
    });
    // The Kubernetes client first: cluster mode's provider works through it.
    let source = vnet_kube::ClientSource::from_env(kubeconfig.as_deref());
    let kube_client = vnet_kube::client(&source)
        .await
        .context("Kubernetes integration")?;
    if kube_client.is_none() {
        tracing::info!(
            "no Kubernetes client (no --kubeconfig, not in a cluster): running standalone"
        );
    }
    let configured = config.node_name.clone();
    let namer: vnet_kube::NodeNamer = Box::new(move |instance| {
        daemon::node_name(configured.as_deref(), &instance.computer_name, || {
            std::fs::read_to_string("/proc/sys/kernel/hostname").ok()
        })
        .map_err(|e| e.to_string())
    });
    let cloud = provider::build_with(&config.cloud, kube_client.as_ref(), namer)?;
    let links: Arc<dyn LinkOps> = if config.manage_host {
        Arc::new(Rtnetlink::open()?)
    } else {
        Arc::new(NoLinks)
    };
    let on_ready = kube_client.map(|client| {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Arc<Agent>>();
        let manage_host = config.manage_host;
        let mut shutdown = rx.clone();
        tokio::spawn(async move {
            // Dropped unanswered when the daemon stops before it is ready.
            let Ok(agent) = ready_rx.await else { return };
            let node_name = agent.settings().node_name.clone();
            tracing::info!(node = node_name, source = ?source, "starting the Kubernetes integration");
            let node_agent: Arc<dyn NodeAgent> = Arc::new(KubeAgent::new(agent, manage_host));
            vnet_kube::run(
                client,
                node_name,
                node_agent,
                vnet_kube::KubeConfig::default(),
                async move {
                    let _ = shutdown.wait_for(|s| *s).await;
                },
            )
            .await;
        });
        ready_tx
    });
    match daemon::run(
        daemon::Options {
            config,
            cloud,
            links,
            journal: Default::default(),
            on_ready,
        },
        rx,
    )
    .await
    {
        // SIGTERM while still starting (e.g. the cloud unreachable): a clean stop.
        Ok(()) | Err(daemon::DaemonError::Interrupted) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
