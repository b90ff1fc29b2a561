//! Labs whose nodes are scale-set members: a mixed lab (a plain VM, a Uniform instance written
//! through Compute, a Flexible member) passes the demo's checks with pods coming and going, and a
//! reimaged Uniform instance, whose ipConfigurations vanish under running pods, never gets an
//! address handed out twice and reports what it lost.

mod common;

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use vnet_lab::demo::{checks_table, connectivity_checks, node_kind_checks, start_responders};
use vnet_lab::lab::PoolConfig;

const SIGKILL: i32 = 9;

fn small_pool() -> PoolConfig {
    PoolConfig {
        warm: 3,
        batch: 3,
        cooldown_secs: 1,
        ..PoolConfig::default()
    }
}

#[test]
fn a_mixed_lab_of_vm_uniform_and_flexible_nodes_passes_the_demo_checks() {
    let lab = common::lab_of("mixed", 3, "mixed", small_pool(), None);
    let kinds: Vec<&str> = lab.state().nodes.iter().map(|n| n.kind.as_str()).collect();
    assert_eq!(kinds, vec!["vm", "uniform", "flexible"]);
    for node in ["node-1", "node-2", "node-3"] {
        for pod in ["a", "b"] {
            lab.add_pod(node, pod).expect("add pod");
        }
    }
    let st = lab.state();
    let responders = start_responders(&st).expect("responders");
    let mut checks = connectivity_checks(&st);
    drop(responders);
    checks.extend(node_kind_checks(&lab));
    let table = checks_table(&checks);
    assert!(checks.iter().all(|c| c.passed), "failed checks:\n{table}");
    assert_eq!(
        checks
            .iter()
            .filter(|c| c.name == "node kind as the agent discovered it")
            .count(),
        3,
        "{table}"
    );

    // Churn on every kind, then the cloud, the agents and the pods agree on every address.
    for round in 0..3 {
        for node in ["node-1", "node-2", "node-3"] {
            lab.del_pod(node, "a").expect("delete");
            lab.add_pod(node, "a")
                .unwrap_or_else(|e| panic!("re-add on {node}, round {round}: {e}"));
        }
    }
    common::assert_ip_accounting(&lab);
    // The Uniform node was written through Compute only, the others through their NICs.
    let counters = lab.mock_json("/admin/counters").expect("counters");
    assert!(
        counters["calls"]["vmss_vm_put"].as_u64().unwrap_or(0) >= 1,
        "{counters}"
    );
    assert!(
        counters["calls"]["nic_put"].as_u64().unwrap_or(0) >= 2,
        "{counters}"
    );
    common::assert_no_leftover_links(&lab);
}

#[test]
fn a_reimaged_uniform_instance_hands_no_address_out_twice_and_reports_its_loss() {
    let lab = common::lab_of("reimage", 2, "uniform,vm", small_pool(), None);
    let old: Vec<_> = (0..3)
        .map(|i| lab.add_pod("node-1", &format!("old{i}")).expect("pod"))
        .collect();
    let old_ips: HashSet<Ipv4Addr> = old.iter().map(|p| p.ip).collect();

    let lost = lab.reimage("node-1").expect("reimage");
    assert!(
        old_ips.iter().all(|ip| lost.contains(ip)),
        "the reimage took {lost:?}, the pods hold {old_ips:?}"
    );
    // A reimage restarts the node's agent; its start-up reconcile (and the periodic one) sees
    // the NIC as it now is.
    lab.signal_agent("node-1", SIGKILL).expect("kill agent");
    lab.start_agent("node-1").expect("restart agent");
    lab.wait_agent_ready("node-1", Duration::from_secs(60))
        .expect("agent ready again");

    // The pods' addresses are kept for them (shown in the status), not handed out again.
    let status = lab.agent_status("node-1").expect("status");
    let unreconciled: HashSet<Ipv4Addr> = status.unreconciled.iter().copied().collect();
    let recovered_or_kept = |ip: &Ipv4Addr| {
        unreconciled.contains(ip)
            || lab
                .agent_allocations("node-1")
                .unwrap()
                .allocations
                .iter()
                .any(|a| a.ip == *ip)
    };
    assert!(old_ips.iter().all(recovered_or_kept), "{status:?}");
    let metrics = lab.agent_metrics("node-1").expect("metrics");
    let lost_allocated: u64 = metrics
        .lines()
        .find(|l| l.starts_with("vnet_agent_addresses_lost_total{state=\"allocated\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0);
    assert_eq!(lost_allocated, 3, "{metrics}");

    // New pods on both nodes: no live pod shares an address with another.
    for i in 0..3 {
        lab.add_pod("node-1", &format!("new{i}")).expect("new pod");
        lab.add_pod("node-2", &format!("other{i}"))
            .expect("other pod");
    }
    let st = lab.state();
    let mut seen = HashSet::new();
    for pod in &st.pods {
        assert!(
            seen.insert(pod.ip),
            "{} handed out twice: {:?}",
            pod.ip,
            st.pods
        );
    }
    // Once the old pods are gone, the cloud, the agents and the pods agree again.
    for pod in &old {
        lab.del_pod("node-1", &pod.name).expect("delete old pod");
    }
    common::assert_ip_accounting(&lab);
    common::assert_no_leftover_links(&lab);
}
