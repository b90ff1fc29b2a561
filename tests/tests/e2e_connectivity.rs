//! Pods on a lab VNet: reachable across nodes as plain routed IP, source addresses preserved
//! inside the VNet, masqueraded to the node's address towards the internet, no tunnel devices.

mod common;

use vnet_lab::demo::{checks_table, connectivity_checks, start_responders};
use vnet_lab::lab::PoolConfig;

#[test]
fn pods_talk_across_nodes_with_their_own_ips_and_masquerade_outside_the_vnet() {
    let lab = common::lab("conn", 3, PoolConfig::default(), None);
    for node in ["node-1", "node-2", "node-3"] {
        for pod in ["a", "b"] {
            lab.add_pod(node, pod).expect("add pod");
        }
    }
    let st = lab.state();
    let responders = start_responders(&st).expect("responders");
    let checks = connectivity_checks(&st);
    drop(responders);
    let table = checks_table(&checks);
    assert!(checks.iter().all(|c| c.passed), "failed checks:\n{table}");

    let find = |name: &'static str| checks.iter().filter(move |c| c.name.starts_with(name));
    assert_eq!(find("pod → pod, across nodes").count(), 3, "{table}");
    for c in find("pod → plain VM") {
        let seen = c.probe.as_ref().and_then(|p| p.seen_as).expect("answer");
        assert!(
            st.pods.iter().any(|p| p.ip == seen),
            "the plain VM saw {seen}, not a pod IP:\n{table}"
        );
    }
    for c in find("pod → internet") {
        let seen = c.probe.as_ref().and_then(|p| p.seen_as).expect("answer");
        assert!(
            st.nodes.iter().any(|n| n.ip == seen),
            "the internet saw {seen}, not a node IP:\n{table}"
        );
    }
    assert!(find("no tunnel devices").all(|c| c.passed), "{table}");
    // The node reaches IMDS (answered in its namespace); its pods do not.
    assert_eq!(
        find("node → IMDS").filter(|c| c.passed).count(),
        1,
        "{table}"
    );
    assert_eq!(
        find("pod → IMDS is dropped").filter(|c| c.passed).count(),
        1,
        "{table}"
    );
    common::assert_ip_accounting(&lab);
}
