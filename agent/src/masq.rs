//! IPv4 forwarding and the masquerade rule for pod egress.
//!
//! Pod traffic to destinations inside the non-masquerade CIDRs (the VNet by default) keeps the
//! pod's address: that is what makes pods first-class VNet addresses. Everything else leaves with
//! the node's address. The rule matches the pod subnet minus the node's own address, so host
//! traffic is never rewritten.
//!
//! The whole table is replaced in one `nft -f -` transaction (`table` + `delete table` + the new
//! definition): applying it twice, or after a restart with different CIDRs, leaves exactly one
//! current copy and never a moment without a rule.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;

pub const TABLE: &str = "vnet-cni";
/// Azure's instance metadata service: the node's identity and its tokens.
pub const IMDS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
pub const MASQUERADE_COMMENT: &str = "vnet-cni pod egress";
pub const IMDS_DROP_COMMENT: &str = "vnet-cni pod imds drop";

/// What the agent keeps in its table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRules {
    /// Pod egress SNAT: the pods' source prefixes, the node's address, what is not masqueraded.
    pub masquerade: Option<(Vec<Ipv4Network>, Ipv4Addr, Vec<Ipv4Network>)>,
    /// Drop pod traffic to IMDS (a pod must not get the node's identity and its tokens): the
    /// host veth prefix, since every pod packet enters the node through its host veth.
    pub drop_pod_imds: Option<String>,
}

impl HostRules {
    pub fn is_empty(&self) -> bool {
        self.masquerade.is_none() && self.drop_pod_imds.is_none()
    }

    /// The table (replaced atomically, as [`masquerade_script`] describes).
    pub fn script(&self) -> String {
        let mut script = match &self.masquerade {
            Some((sources, node_ip, non_masq)) => masquerade_script(sources, *node_ip, non_masq),
            None => format!("table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n}}\n"),
        };
        if let Some(prefix) = &self.drop_pod_imds {
            // Before routing, so it holds whether IMDS is reached through the node (Azure) or
            // answered by it: priority raw.
            script.push_str(&format!(
                "table ip {TABLE} {{\n\
                 \tchain pod_imds {{\n\
                 \t\ttype filter hook prerouting priority raw; policy accept;\n\
                 \t\tiifname \"{prefix}*\" ip daddr {IMDS} drop comment \"{IMDS_DROP_COMMENT}\"\n\
                 \t}}\n\
                 }}\n"
            ));
        }
        script
    }

    fn comments(&self) -> Vec<&'static str> {
        let mut c = Vec::new();
        if self.masquerade.is_some() {
            c.push(MASQUERADE_COMMENT);
        }
        if self.drop_pod_imds.is_some() {
            c.push(IMDS_DROP_COMMENT);
        }
        c
    }
}

/// What [`ensure`] had to put back.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Repaired {
    pub forwarding: bool,
    pub table: bool,
}

/// Checks forwarding and the table and restores whatever is missing (a firewall reload, an
/// `nft flush ruleset`, a sysctl reset). Blocking: call from a blocking thread.
pub fn ensure(rules: &HostRules) -> Result<Repaired, HostError> {
    // The table first: where /proc/sys is read-only (the agent's unprivileged container, whose
    // init container sets forwarding) a failed sysctl write must not keep the pods' SNAT and
    // IMDS drop from coming back.
    let mut table = false;
    if !rules.is_empty() {
        let listing = Command::new("nft")
            .args(["list", "table", "ip", TABLE])
            .stderr(Stdio::null())
            .output()
            .map_err(HostError::Spawn)?;
        let text = String::from_utf8_lossy(&listing.stdout);
        if !listing.status.success() || rules.comments().iter().any(|c| !text.contains(c)) {
            apply_nft(&rules.script(), NFT_TIMEOUT)?;
            table = true;
        }
    }
    let forwarding = enable_forwarding()?;
    Ok(Repaired { forwarding, table })
}
pub const NFT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot enable IPv4 forwarding ({path}): {source}")]
    Forwarding {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot run nft: {0}")]
    Spawn(std::io::Error),
    #[error("nft did not finish within {0:?}")]
    Timeout(Duration),
    #[error("nft failed ({status}): {stderr}")]
    Nft { status: String, stderr: String },
}

/// The nftables script that installs (or replaces) the masquerade table.
pub fn masquerade_script(
    pod_sources: &[Ipv4Network],
    node_ip: Ipv4Addr,
    non_masq: &[Ipv4Network],
) -> String {
    let join = |nets: &[Ipv4Network]| {
        nets.iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    // An empty set would masquerade even traffic to the pods' own subnet.
    let non_masq = if non_masq.is_empty() {
        pod_sources
    } else {
        non_masq
    };
    let sources = join(pod_sources);
    format!(
        "table ip {TABLE}\n\
         delete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
         \tset non_masquerade {{\n\
         \t\ttype ipv4_addr\n\
         \t\tflags interval\n\
         \t\tauto-merge\n\
         \t\telements = {{ {} }}\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {{ {sources} }} ip saddr != {node_ip} ip daddr != @non_masquerade masquerade comment \"{MASQUERADE_COMMENT}\"\n\
         \t}}\n\
         }}\n",
        join(non_masq)
    )
}

/// Feeds `script` to `nft -f -`, killing it after `timeout`. Blocking: call from a blocking
/// thread.
pub fn apply_nft(script: &str, timeout: Duration) -> Result<(), HostError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(HostError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(HostError::Spawn)?;
    }
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().map_err(HostError::Spawn)? {
            if status.success() {
                return Ok(());
            }
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
            }
            return Err(HostError::Nft {
                status: status.to_string(),
                stderr: stderr.trim().to_owned(),
            });
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HostError::Timeout(timeout));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sets `net.ipv4.ip_forward = 1` (and `conf.all.forwarding`, its alias) for the current netns;
/// `true` when it was off.
pub fn enable_forwarding() -> Result<bool, HostError> {
    let path = "/proc/sys/net/ipv4/ip_forward";
    let current = std::fs::read_to_string(path).unwrap_or_default();
    if current.trim() == "1" {
        return Ok(false);
    }
    std::fs::write(path, "1").map_err(|source| HostError::Forwarding {
        path: path.into(),
        source,
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_replaces_the_table_atomically_and_spares_the_node() {
        let script = masquerade_script(
            &["10.240.0.0/16".parse().unwrap()],
            Ipv4Addr::new(10, 240, 0, 4),
            &[
                "10.240.0.0/16".parse().unwrap(),
                "192.168.0.0/16".parse().unwrap(),
            ],
        );
        let lines: Vec<&str> = script.lines().collect();
        assert_eq!(lines[0], "table ip vnet-cni");
        assert_eq!(lines[1], "delete table ip vnet-cni");
        assert!(script.contains("elements = { 10.240.0.0/16, 192.168.0.0/16 }"));
        assert!(script.contains(
            "ip saddr { 10.240.0.0/16 } ip saddr != 10.240.0.4 ip daddr != @non_masquerade masquerade"
        ));
    }

    #[test]
    fn no_cidrs_still_keeps_pod_subnet_traffic_unmasqueraded() {
        let script = masquerade_script(
            &["10.1.0.0/24".parse().unwrap()],
            Ipv4Addr::new(10, 1, 0, 4),
            &[],
        );
        assert!(script.contains("elements = { 10.1.0.0/24 }"));
    }
}
