//! `vnet-agent --config FILE`: see `docs/configuration.md`.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use vnet_agent::config::{Cli, Config};
use vnet_agent::netlink::{LinkOps, NoLinks, Rtnetlink};
use vnet_agent::{daemon, logging, provider};

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    match runtime.block_on(main_async(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("vnet-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn main_async(config: Config) -> anyhow::Result<()> {
    let cloud = provider::build(&config.cloud)?;
    let links: Arc<dyn LinkOps> = if config.manage_host {
        Arc::new(Rtnetlink::open()?)
    } else {
        Arc::new(NoLinks)
    };
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
        let _ = tx.send(true);
    });
    match daemon::run(
        daemon::Options {
            config,
            cloud,
            links,
            journal: Default::default(),
            on_ready: None,
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
