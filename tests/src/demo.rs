//! `vnetctl lab demo`: the whole story in one command. Also the connectivity checks the e2e tests
//! reuse.

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::lab::{Lab, LabConfig, LabError, LabGuard};
use crate::probe::{Probe, Responder, probe};
use crate::report::{nodes_table, pods_table, table};
use crate::state::LabState;

/// One row of the connectivity matrix.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub from: String,
    pub to: String,
    /// What the receiver must see as the source; `None`: any (reachability only).
    pub expect_seen: Option<Ipv4Addr>,
    pub probe: Option<Probe>,
    pub passed: bool,
    pub detail: String,
}

/// Tunnel link kinds: none of them may exist in the lab (no overlay, no encapsulation).
const TUNNEL_KINDS: &[&str] = &[
    "vxlan",
    "geneve",
    "ipip",
    "gre",
    "gretap",
    "ip6gre",
    "ip6gretap",
    "sit",
    "ip6tnl",
    "wireguard",
    "erspan",
    "ip6erspan",
    "vti",
    "vti6",
    "fou",
    "bareudp",
];

/// Responders in every namespace a check may target.
pub struct Responders(#[allow(dead_code)] Vec<Responder>);

pub fn start_responders(st: &LabState) -> Result<Responders, LabError> {
    let mut all = Vec::new();
    let targets = st
        .pods
        .iter()
        .map(|p| p.ns.clone())
        .chain(st.nodes.iter().map(|n| n.ns.clone()))
        .chain([st.vm.ns.clone(), st.internet.ns.clone()]);
    for ns in targets {
        all.push(Responder::start(&ns).map_err(|e| LabError::Failed(e.to_string()))?);
    }
    Ok(Responders(all))
}

fn check(
    name: &str,
    from_label: String,
    from_ns: &str,
    to_label: String,
    to: Ipv4Addr,
    expect: Option<Ipv4Addr>,
) -> Check {
    let p = probe(from_ns, to);
    let (passed, detail) = match (&p.seen_as, expect) {
        (None, _) => (false, p.error.clone().unwrap_or_default()),
        (Some(seen), Some(want)) if *seen != want => {
            (false, format!("receiver saw {seen}, expected {want}"))
        }
        (Some(seen), _) => (true, format!("receiver saw {seen}")),
    };
    Check {
        name: name.to_owned(),
        from: from_label,
        to: format!("{to_label} {to}"),
        expect_seen: expect,
        probe: Some(p),
        passed,
        detail,
    }
}

/// Every connectivity check the lab's design promises, over the pods that exist.
pub fn connectivity_checks(st: &LabState) -> Vec<Check> {
    let mut checks = Vec::new();
    let first_pod = |node: &str| st.pods.iter().find(|p| p.node == node);
    let label = |p: &crate::state::PodState| format!("{}/{}", p.node, p.name);
    // Same node.
    for n in &st.nodes {
        let pods: Vec<_> = st.pods.iter().filter(|p| p.node == n.name).collect();
        if let [a, b, ..] = pods.as_slice() {
            checks.push(check(
                "pod → pod, same node",
                label(a),
                &a.ns,
                label(b),
                b.ip,
                Some(a.ip),
            ));
        }
    }
    // Across nodes: each node's first pod to the next node's first pod.
    let with_pods: Vec<_> = st.nodes.iter().filter_map(|n| first_pod(&n.name)).collect();
    if with_pods.len() >= 2 {
        for (i, a) in with_pods.iter().enumerate() {
            let b = with_pods[(i + 1) % with_pods.len()];
            if with_pods.len() == 2 && i == 1 {
                checks.push(check(
                    "pod → pod, across nodes",
                    label(a),
                    &a.ns,
                    label(b),
                    b.ip,
                    Some(a.ip),
                ));
                break;
            }
            checks.push(check(
                "pod → pod, across nodes",
                label(a),
                &a.ns,
                label(b),
                b.ip,
                Some(a.ip),
            ));
        }
    }
    if let (Some(n), Some(p)) = (st.nodes.first(), with_pods.first()) {
        checks.push(check(
            "node → pod, same node",
            n.name.clone(),
            &n.ns,
            label(p),
            p.ip,
            None,
        ));
    }
    if let (Some(n), Some(p)) = (st.nodes.first(), with_pods.get(1)) {
        checks.push(check(
            "node → pod, other node",
            n.name.clone(),
            &n.ns,
            label(p),
            p.ip,
            Some(n.ip),
        ));
    }
    for p in with_pods.iter().take(2) {
        checks.push(check(
            "pod → plain VM (source IP preserved)",
            label(p),
            &p.ns,
            st.vm.name.clone(),
            st.vm.ip,
            Some(p.ip),
        ));
    }
    if let Some(p) = with_pods.last() {
        checks.push(check(
            "plain VM → pod",
            st.vm.name.clone(),
            &st.vm.ns,
            label(p),
            p.ip,
            Some(st.vm.ip),
        ));
    }
    for p in &with_pods {
        let node_ip = st.node(&p.node).map(|n| n.ip);
        checks.push(check(
            "pod → internet (masqueraded to node IP)",
            label(p),
            &p.ns,
            "internet".into(),
            st.internet.ip,
            node_ip,
        ));
    }
    checks.push(no_tunnels(st));
    checks
}

/// No tunnel device in any lab namespace. The kernel's per-namespace fallback devices (tunl0,
/// gre0, ... which appear when their module is loaded) count only if someone brought them up.
pub fn no_tunnels(st: &LabState) -> Check {
    let mut found = Vec::new();
    let mut errors = Vec::new();
    let all = st.namespaces.iter().chain(st.pods.iter().map(|p| &p.ns));
    for ns in all {
        match Lab::links(ns) {
            Ok(links) => {
                for (name, kind, up) in links {
                    if TUNNEL_KINDS.contains(&kind.as_str()) && (up || !name.ends_with('0')) {
                        found.push(format!("{ns}: {name} ({kind})"));
                    }
                }
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    let passed = found.is_empty() && errors.is_empty();
    Check {
        name: "no tunnel devices (plain routed IP)".into(),
        from: format!("{} namespaces", st.namespaces.len() + st.pods.len()),
        to: "-".into(),
        expect_seen: None,
        probe: None,
        passed,
        detail: if passed {
            "none found".into()
        } else {
            found
                .into_iter()
                .chain(errors)
                .collect::<Vec<_>>()
                .join("; ")
        },
    }
}

/// Each agent discovered its node as the kind the lab made it (plain VM, Uniform instance,
/// Flexible member): the cloud path it writes through follows from that.
pub fn node_kind_checks(lab: &Lab) -> Vec<Check> {
    let st = lab.state();
    st.nodes
        .iter()
        .map(|n| {
            let want_set = match n.kind {
                crate::state::NodeKind::Vm => "",
                crate::state::NodeKind::Uniform => crate::lab::UNIFORM_SCALE_SET,
                crate::state::NodeKind::Flexible => crate::lab::FLEXIBLE_SCALE_SET,
            };
            let want = format!(
                "vnet_agent_node_info{{kind=\"{}\",scale_set=\"{want_set}\"}} 1",
                n.kind.as_str()
            );
            let (passed, detail) = match lab.agent_metrics(&n.name) {
                Ok(text) => match text
                    .lines()
                    .find(|l| l.starts_with("vnet_agent_node_info{"))
                {
                    Some(line) if line.trim() == want => {
                        (true, format!("agent: {}", n.kind.as_str()))
                    }
                    Some(line) => (false, format!("agent reports {line}, expected {want}")),
                    None => (false, "the agent reports no node kind".into()),
                },
                Err(e) => (false, e.to_string()),
            };
            Check {
                name: "node kind as the agent discovered it".into(),
                from: n.name.clone(),
                to: if want_set.is_empty() {
                    n.kind.as_str().to_owned()
                } else {
                    format!("{} ({want_set})", n.kind.as_str())
                },
                expect_seen: None,
                probe: None,
                passed,
                detail,
            }
        })
        .collect()
}

pub fn checks_table(checks: &[Check]) -> String {
    let rows: Vec<Vec<String>> = checks
        .iter()
        .map(|c| {
            vec![
                if c.passed { "✓".into() } else { "✗".into() },
                c.name.clone(),
                c.from.clone(),
                c.to.clone(),
                c.probe
                    .as_ref()
                    .filter(|p| p.ok())
                    .map(|p| format!("{:.2} ms", p.latency.as_secs_f64() * 1e3))
                    .unwrap_or_else(|| "-".into()),
                c.detail.clone(),
            ]
        })
        .collect();
    table(&["", "check", "from", "to", "latency", "detail"], &rows)
}

/// Runs the demo; `Ok(true)` when every check passed.
pub fn run(cfg: &LabConfig, pods_per_node: usize, keep: bool) -> Result<bool, LabError> {
    // Torn down on every path out of here (error, panic) unless --keep.
    let mut lab = LabGuard::new(Lab::up(cfg)?);
    if keep {
        lab.disarm();
    }
    let ok = demo_body(&lab, pods_per_node)?;
    if keep {
        eprintln!(
            "==> kept: `vnetctl lab status --name {0}`, `vnetctl lab down --name {0}`",
            cfg.name
        );
    } else {
        eprintln!("==> tearing the lab down");
    }
    drop(lab);
    Ok(ok)
}

fn demo_body(lab: &Lab, pods_per_node: usize) -> Result<bool, LabError> {
    let st = lab.state();
    for n in &st.nodes {
        for i in 1..=pods_per_node {
            let pod = lab.add_pod(&n.name, &format!("pod-{i}"))?;
            eprintln!(
                "==> pod {}/{}: {} (host veth {})",
                pod.node, pod.name, pod.ip, pod.host_veth
            );
        }
    }
    let st = lab.state();
    eprintln!("==> running connectivity checks");
    let responders = start_responders(&st)?;
    // Give the responders' listen() a moment on a loaded machine; probes also time out at 1 s.
    std::thread::sleep(Duration::from_millis(50));
    let mut checks = connectivity_checks(&st);
    drop(responders);
    checks.extend(node_kind_checks(lab));
    println!("\nNodes\n{}", nodes_table(lab));
    println!("Pods\n{}", pods_table(lab));
    println!("Connectivity\n{}", checks_table(&checks));
    let failed = checks.iter().filter(|c| !c.passed).count();
    if failed == 0 {
        println!("all {} checks passed", checks.len());
    } else {
        println!("{failed} of {} checks FAILED", checks.len());
    }
    Ok(failed == 0)
}
