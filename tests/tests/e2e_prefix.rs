//! Prefix mode on a lab VNet: pods on two nodes get /32s out of their node's /28, reach each
//! other and the plain VM with their own addresses (masqueraded only towards the internet), and a
//! node whose pods are all gone gives its block back once the addresses have cooled down.

mod common;

use std::net::Ipv4Addr;

use vnet_lab::demo::{checks_table, connectivity_checks, start_responders};
use vnet_lab::lab::{Lab, PoolConfig, PoolMode};
use vnet_lab::verify::settle;

/// The blocks the mock cloud shows on `vm`'s NIC, as (first address, length).
fn blocks_on(lab: &Lab, vm: &str) -> Vec<(Ipv4Addr, u32)> {
    let state = lab.mock_json("/admin/state").expect("mock state");
    state["addresses"]
        .as_array()
        .expect("addresses")
        .iter()
        .filter(|a| a["vm"] == vm && a["primary"] == false)
        .map(|a| {
            (
                a["ip"].as_str().unwrap().parse().unwrap(),
                a["prefix_len"].as_u64().unwrap_or(32) as u32,
            )
        })
        .collect()
}

fn within(ip: Ipv4Addr, (base, len): (Ipv4Addr, u32)) -> bool {
    let mask = u32::MAX << (32 - len);
    u32::from(ip) & mask == u32::from(base)
}

#[test]
fn pods_get_addresses_of_their_nodes_block_talk_across_nodes_and_the_block_goes_back() {
    // warm 0: a node's only block is surplus once its pods are gone; 1 s delays: it goes soon.
    let pool = PoolConfig {
        warm: 0,
        batch: 1,
        max: 32,
        release_delay_secs: 1,
        cooldown_secs: 1,
        ..PoolConfig::default()
    };
    let lab = common::lab_in_mode("prefix", 2, "vm", pool, None, PoolMode::Prefix);
    for node in ["node-1", "node-2"] {
        for pod in ["a", "b"] {
            lab.add_pod(node, pod).expect("add pod");
        }
    }
    let st = lab.state();
    for node in ["node-1", "node-2"] {
        let blocks = blocks_on(&lab, node);
        assert_eq!(
            blocks.len(),
            1,
            "{node}: one block for two pods: {blocks:?}"
        );
        assert_eq!(blocks[0].1, 28, "{node}: {blocks:?}");
        for pod in st.pods.iter().filter(|p| p.node == node) {
            assert!(
                within(pod.ip, blocks[0]),
                "{node}/{}: {} is not in the node's block {:?}",
                pod.name,
                pod.ip,
                blocks[0]
            );
        }
    }

    let responders = start_responders(&st).expect("responders");
    let checks = connectivity_checks(&st);
    drop(responders);
    let table = checks_table(&checks);
    assert!(checks.iter().all(|c| c.passed), "failed checks:\n{table}");
    let find = |name: &'static str| checks.iter().filter(move |c| c.name.starts_with(name));
    assert!(find("pod → pod, across nodes").count() > 0, "{table}");
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
    common::assert_ip_accounting(&lab);

    // One pod of node-1 gone: its address cools down, the block stays for the other.
    lab.del_pod("node-1", "a").expect("del pod");
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(blocks_on(&lab, "node-1").len(), 1);
    // The last one gone: once it has cooled down the whole block goes back to the cloud.
    lab.del_pod("node-1", "b").expect("del pod");
    let left = settle(common::SETTLE, || {
        let blocks = blocks_on(&lab, "node-1");
        Ok(if blocks.is_empty() {
            Vec::new()
        } else {
            vec![format!("node-1 still holds {blocks:?}")]
        })
    })
    .expect("mock state");
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(blocks_on(&lab, "node-2").len(), 1, "node-2 keeps its block");
    let status = lab.agent_status("node-1").expect("status");
    assert_eq!(status.pool.total, 0);
    common::assert_ip_accounting(&lab);
}
