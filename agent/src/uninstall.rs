//! `vnet-agent uninstall`: removes what vnet-cni made on this node, and refuses while pods of ours
//! still run on it.
//!
//! Why refuse: a pod whose network came from vnet-cni needs the plugin and its conflist to be torn
//! down (the runtime's DEL); without them it stays stuck terminating. And a purge of the state while
//! such pods run lets a reinstall hand their addresses to new pods. So: cordon and drain first.
//!
//! Pods of ours are the host veths with the agent's prefix (a veth dies with its pod's network
//! namespace, so a live one is a live pod) and the store's allocations (an address handed out and
//! never given back). What is removed: every conflist of the `vnet-cni` network in the CNI
//! configuration directories, the agent's nftables tables (`ip vnet-cni*`), tombstone veths (and
//! the host routes on them), the agent's socket; with `--purge` also the state directory. The
//! addresses on the NIC stay assigned in the cloud (releasing them needs the cloud; a drained node
//! that is deleted or reimaged gives them back).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use clap::Parser;
use vnet_agent::config::{Cli, Config};
use vnet_agent::masq;
use vnet_agent::netlink::{LinkOps, Rtnetlink};
use vnet_agent::store::JournalStore;

/// Exit status when pods of ours still run on the node.
pub const EXIT_PODS_PRESENT: u8 = 3;
/// Exit status when the agent still runs (holds its state directory).
pub const EXIT_AGENT_RUNNING: u8 = 4;
/// Names our conflist has had; only files whose network is `vnet-cni` are removed.
const CONFLIST_NAMES: [&str; 2] = ["00-vnet-cni.conflist", "10-vnet-cni.conflist"];
const NETWORK_NAME: &str = "vnet-cni";
const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";

/// `vnet-agent uninstall [--config FILE] [--check] [--purge] [--cni-conf-dir DIR]...`
#[derive(Debug, Parser)]
#[command(
    name = "vnet-agent uninstall",
    about = "Remove vnet-cni from this node (refuses while pods of ours run: cordon and drain first)"
)]
pub struct UninstallCli {
    /// The agent's configuration file (for state_dir, socket_path, host_veth_prefix, cni_conf_dir).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Only check: exit 0 when nothing would stop an uninstall, 3 while pods of ours exist.
    /// Changes nothing and may run while the agent does.
    #[arg(long)]
    check: bool,
    /// Also remove the state directory (allocation store, spool).
    #[arg(long)]
    purge: bool,
    /// A CNI configuration directory to clean (repeatable). Default: the agent's `cni_conf_dir`
    /// and /etc/cni/net.d.
    #[arg(long, value_name = "DIR")]
    cni_conf_dir: Vec<PathBuf>,
}

/// Runs the subcommand; `args` starts with the program name, then "uninstall".
pub fn main(args: Vec<String>) -> ExitCode {
    let cli = UninstallCli::parse_from(
        std::iter::once("vnet-agent uninstall".to_owned()).chain(args.into_iter().skip(2)),
    );
    let agent_cli = Cli {
        config: cli.config.clone(),
        ..Cli::default()
    };
    let config = match Config::load(&agent_cli, |var| std::env::var(var).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vnet-agent uninstall: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vnet-agent uninstall: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&cli, &config)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vnet-agent uninstall: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: &UninstallCli, config: &Config) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    let links = Rtnetlink::open().context("route netlink")?;
    let in_use = pods_of_ours(config, &links).await?;
    if !in_use.is_empty() {
        eprintln!(
            "vnet-agent uninstall: refusing: {} pod network(s) of vnet-cni still on this node:",
            in_use.len()
        );
        for p in &in_use {
            eprintln!("  {p}");
        }
        eprintln!(
            "Removing vnet-cni now would leave these pods stuck terminating, and a purge would let \
             a reinstall hand their addresses out again. Cordon and drain the node first \
             (kubectl cordon NODE; kubectl drain NODE --ignore-daemonsets), then run this again."
        );
        return Ok(ExitCode::from(EXIT_PODS_PRESENT));
    }
    if cli.check {
        println!("vnet-agent uninstall: no pods of vnet-cni on this node: ready to uninstall");
        return Ok(ExitCode::SUCCESS);
    }
    // The agent could hand out an address between the check above and the clean-up below.
    if agent_holds_state(&config.state_dir)? {
        eprintln!(
            "vnet-agent uninstall: refusing: vnet-agent is running (it holds {}); stop it first \
             (systemctl stop vnet-agent, or delete the vnet-cni DaemonSet)",
            config
                .state_dir
                .join(vnet_agent::store::journal::LOCK_FILE)
                .display()
        );
        return Ok(ExitCode::from(EXIT_AGENT_RUNNING));
    }
    // Again, now that no agent can add any.
    let in_use = pods_of_ours(config, &links).await?;
    if !in_use.is_empty() {
        eprintln!(
            "vnet-agent uninstall: refusing: a pod network appeared meanwhile: {}",
            in_use.join(", ")
        );
        return Ok(ExitCode::from(EXIT_PODS_PRESENT));
    }

    for dir in conf_dirs(cli, config) {
        for name in CONFLIST_NAMES {
            let path = dir.join(name);
            if is_our_conflist(&path) {
                std::fs::remove_file(&path)
                    .with_context(|| format!("remove {}", path.display()))?;
                println!("removed {}", path.display());
            }
        }
    }
    for table in our_nft_tables()? {
        nft(&format!("delete table ip {table}\n"))
            .with_context(|| format!("delete nftables table ip {table}"))?;
        println!("removed nftables table ip {table}");
    }
    // Tombstones are host veths a DEL handed over for deletion; their host routes go with them.
    let tombstones = links
        .links_with_prefix(vnet_api::TOMBSTONE_PREFIX)
        .await
        .context("list links")?;
    for name in tombstones
        .into_iter()
        .filter(|n| vnet_api::is_tombstone_name(n))
    {
        links
            .delete_link(&name)
            .await
            .with_context(|| format!("delete tombstone veth {name}"))?;
        println!("removed tombstone veth {name}");
    }
    remove_if_present(&config.socket_path)?;
    if cli.purge {
        if config.state_dir.exists() {
            purge(&config.state_dir)?;
            println!("purged {}", config.state_dir.display());
        }
    } else if config.state_dir.exists() {
        println!(
            "kept {} (the allocation state; --purge removes it)",
            config.state_dir.display()
        );
    }
    println!(
        "vnet-agent uninstall: vnet-cni removed from this node (the NIC's secondary addresses stay \
         assigned in the cloud until the node is deleted or reimaged)"
    );
    Ok(ExitCode::SUCCESS)
}

/// Host veths of live pods and allocations in the store, described for the operator.
async fn pods_of_ours(config: &Config, links: &Rtnetlink) -> anyhow::Result<Vec<String>> {
    use anyhow::Context;
    let mut found = Vec::new();
    // Only names the plugin makes (prefix + hex to the full 15 bytes), not another tool's vnet0.
    let veths: Vec<String> = links
        .links_with_prefix(&config.host_veth_prefix)
        .await
        .context("list links")?
        .into_iter()
        .filter(|n| is_host_veth_name(&config.host_veth_prefix, n))
        .collect();
    let state = if config
        .state_dir
        .join(vnet_agent::store::journal::JOURNAL_FILE)
        .exists()
        || config
            .state_dir
            .join(vnet_agent::store::journal::SNAPSHOT_FILE)
            .exists()
    {
        JournalStore::read_state(&config.state_dir).with_context(|| {
            format!(
                "read the allocation store in {} (a damaged store is never guessed at: \
                 inspect it, or move it away to force the uninstall)",
                config.state_dir.display()
            )
        })?
    } else {
        Default::default()
    };
    for a in state.allocations.values() {
        let pod = match (&a.pod.namespace, &a.pod.name) {
            (Some(ns), Some(name)) => format!("pod {ns}/{name}, "),
            _ => String::new(),
        };
        let veth = if veths.contains(&a.host_veth) {
            "host veth present"
        } else {
            "no host veth: a pod whose DEL never ran? start the agent to reconcile it"
        };
        found.push(format!(
            "{} ({pod}container {}, {}) {veth}",
            a.ip, a.key.container_id, a.host_veth
        ));
    }
    for v in veths {
        if !state.allocations.values().any(|a| a.host_veth == v) {
            found.push(format!("host veth {v} (no allocation recorded)"));
        }
    }
    Ok(found)
}

fn is_host_veth_name(prefix: &str, name: &str) -> bool {
    name.len() == vnet_api::IFNAME_MAX
        && name
            .strip_prefix(prefix)
            .is_some_and(|hex| hex.chars().all(|c| c.is_ascii_hexdigit()))
}

fn conf_dirs(cli: &UninstallCli, config: &Config) -> Vec<PathBuf> {
    let mut dirs = cli.cni_conf_dir.clone();
    if dirs.is_empty() {
        dirs.extend(config.cni_conf_dir.clone());
        dirs.push(PathBuf::from(DEFAULT_CNI_CONF_DIR));
    }
    dirs.dedup();
    dirs
}

/// A conflist file whose network is ours (an operator's file of the same name is left alone).
fn is_our_conflist(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("name").and_then(|n| n.as_str()).map(str::to_owned))
        .is_some_and(|n| n == NETWORK_NAME)
}

/// Whether a running agent holds the state directory's lock.
fn agent_holds_state(dir: &Path) -> anyhow::Result<bool> {
    let path = dir.join(vnet_agent::store::journal::LOCK_FILE);
    let file = match std::fs::OpenOptions::new().write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(anyhow::anyhow!("open {}: {e}", path.display())),
    };
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(_unlocked_on_drop) => Ok(false),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(true),
        Err((_, e)) => Err(anyhow::anyhow!("lock {}: {e}", path.display())),
    }
}

/// `ip` tables named vnet-cni or vnet-cni-*: the agent's masquerade table and any it adds.
fn our_nft_tables() -> anyhow::Result<Vec<String>> {
    let out = match Command::new("nft")
        .args(["list", "tables", "ip"])
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) => out,
        // The agent cannot start without nft, so without nft it made no table.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("nft is not installed: no nftables table of ours to remove");
            return Ok(Vec::new());
        }
        Err(e) => {
            anyhow::bail!("cannot run nft (needed to remove the agent's table): {e}")
        }
    };
    if !out.status.success() {
        anyhow::bail!(
            "nft list tables failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table ip "))
        .filter(|t| *t == masq::TABLE || t.starts_with(&format!("{}-", masq::TABLE)))
        .map(str::to_owned)
        .collect())
}

fn nft(script: &str) -> anyhow::Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        anyhow::bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Removes the state directory: its contents, then the directory itself unless it is a mount
/// point (the uninstall DaemonSet mounts the host's /var/lib/vnet-cni there).
fn purge(dir: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        let removed = if path.is_dir() && !path.is_symlink() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.with_context(|| format!("remove {}", path.display()))?;
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
        Err(e) => Err(anyhow::anyhow!("remove {}: {e}", dir.display())),
    }
}

fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            println!("removed {}", path.display());
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow::anyhow!("remove {}: {e}", path.display())),
    }
}
