//! Cross-checks between the three views of every address: the mock cloud (what Azure would say is
//! on each NIC), each agent (its allocations and pool), and the pods that really exist.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::lab::{Lab, LabError};

/// Every disagreement found, for a person; empty when all views agree.
pub fn ip_accounting(lab: &Lab) -> Result<Vec<String>, LabError> {
    let st = lab.state();
    let mut problems = Vec::new();
    let mock = lab.mock_json("/admin/state")?;
    let empty = Vec::new();
    let addresses = mock["addresses"].as_array().unwrap_or(&empty);
    let mut owners: BTreeMap<Ipv4Addr, Vec<String>> = BTreeMap::new();
    let mut secondaries: BTreeMap<String, BTreeSet<Ipv4Addr>> = BTreeMap::new();
    for a in addresses {
        let Some(ip) = a["ip"].as_str().and_then(|s| s.parse::<Ipv4Addr>().ok()) else {
            problems.push(format!("mock state row without an address: {a}"));
            continue;
        };
        let vm = a["vm"].as_str().unwrap_or("?").to_owned();
        // A block (prefix mode) holds all its addresses.
        let len = a["prefix_len"].as_u64().unwrap_or(32).min(32) as u32;
        let held = (0..1u64 << (32 - len)).map(|i| Ipv4Addr::from(u32::from(ip) + i as u32));
        for ip in held {
            owners.entry(ip).or_default().push(vm.clone());
            if !a["primary"].as_bool().unwrap_or(false) && !a["pending"].as_bool().unwrap_or(false)
            {
                secondaries.entry(vm.clone()).or_default().insert(ip);
            }
        }
    }
    for (ip, vms) in &owners {
        if vms.len() > 1 {
            problems.push(format!("{ip} is on several NICs in the cloud: {vms:?}"));
        }
    }
    let mut pod_ips: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    for p in &st.pods {
        if let Some(other) = pod_ips.insert(p.ip, format!("{}/{}", p.node, p.name)) {
            problems.push(format!(
                "{} is used by two pods: {other} and {}/{}",
                p.ip, p.node, p.name
            ));
        }
    }
    for n in &st.nodes {
        let allocations = lab.agent_allocations(&n.name)?.allocations;
        let status = lab.agent_status(&n.name)?;
        let allocated: BTreeSet<Ipv4Addr> = allocations.iter().map(|a| a.ip).collect();
        if allocated.len() != allocations.len() {
            problems.push(format!("{}: the agent allocated an address twice", n.name));
        }
        let live: BTreeSet<Ipv4Addr> = st
            .pods
            .iter()
            .filter(|p| p.node == n.name)
            .map(|p| p.ip)
            .collect();
        for ip in allocated.difference(&live) {
            problems.push(format!(
                "{}: {ip} allocated by the agent but no pod has it (leak)",
                n.name
            ));
        }
        for ip in live.difference(&allocated) {
            problems.push(format!(
                "{}: a pod has {ip} but the agent has no allocation for it",
                n.name
            ));
        }
        let on_nic = secondaries.get(&n.name).cloned().unwrap_or_default();
        for ip in allocated.difference(&on_nic) {
            problems.push(format!(
                "{}: {ip} is allocated but not on the node's NIC in the cloud",
                n.name
            ));
        }
        if status.pool.pending == 0 && on_nic.len() as u32 != status.pool.total {
            problems.push(format!(
                "{}: the cloud shows {} secondary addresses on the NIC, the agent's pool counts {}",
                n.name,
                on_nic.len(),
                status.pool.total
            ));
        }
        if status.pool.allocated as usize != allocations.len() {
            problems.push(format!(
                "{}: pool says {} allocated, the allocation list has {}",
                n.name,
                status.pool.allocated,
                allocations.len()
            ));
        }
    }
    Ok(problems)
}

/// Links in the node's namespace that belong to no live pod (lo, eth0 and the kernel's idle
/// fallback tunnel devices aside).
pub fn leftover_links(lab: &Lab, node: &str) -> Result<Vec<String>, LabError> {
    let st = lab.state();
    let n = st
        .node(node)
        .ok_or_else(|| LabError::Failed(format!("no node {node}")))?;
    let live: BTreeSet<&str> = st
        .pods
        .iter()
        .filter(|p| p.node == node)
        .map(|p| p.host_veth.as_str())
        .collect();
    Ok(Lab::links(&n.ns)?
        .into_iter()
        .filter(|(name, kind, up)| {
            let fallback = !kind.is_empty() && kind != "veth" && name.ends_with('0') && !up;
            name != "lo" && name != "eth0" && !fallback && !live.contains(name.as_str())
        })
        .map(|(name, kind, _)| format!("{name} ({kind})"))
        .collect())
}

/// Polls `f` until it returns an empty list or `timeout` passes; returns the last list. For
/// things that settle in the background (tombstone veths, cooldowns), never a timing assertion.
pub fn settle(
    timeout: Duration,
    mut f: impl FnMut() -> Result<Vec<String>, LabError>,
) -> Result<Vec<String>, LabError> {
    let deadline = Instant::now() + timeout;
    loop {
        let problems = f()?;
        if problems.is_empty() || Instant::now() > deadline {
            return Ok(problems);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
