//! The agent of a node restarts while the cloud (ARM and IMDS) is down: from its stored identity
//! and pool it becomes ready, serves new pods from addresses already on the NIC and journals the
//! releases of deleted ones; once the cloud is back the node reconciles, and no address is ever
//! handed out twice.

mod common;

use std::time::Duration;

use vnet_lab::lab::PoolConfig;
use vnet_lab::probe::{Responder, probe};

const SIGKILL: i32 = 9;

#[test]
fn a_restart_during_a_cloud_outage_serves_pods_from_the_stored_pool() {
    let pool = PoolConfig {
        warm: 4,
        batch: 4,
        cooldown_secs: 1,
        ..PoolConfig::default()
    };
    let lab = common::lab("outage", 2, pool, None);
    let client = lab.add_pod("node-1", "client").expect("client pod");
    let old = lab.add_pod("node-2", "old").expect("pod before the outage");
    // The warm pool is on the NIC before the cloud goes away.
    for _ in 0..600 {
        let st = lab.agent_status("node-2").expect("status");
        if st.pool.free >= 2 && st.pool.pending == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    lab.kill_mock().expect("cloud outage");
    lab.signal_agent("node-2", SIGKILL).expect("kill agent");
    lab.start_agent("node-2").expect("restart agent");
    lab.wait_agent_ready("node-2", Duration::from_secs(90))
        .expect("ready from the stored identity and pool while the cloud is down");

    // New pods get addresses already on the NIC; deleting a pod is journalled.
    let during = lab
        .add_pod("node-2", "during")
        .expect("ADD served from the stored pool during the outage");
    assert_ne!(during.ip, old.ip);
    lab.del_pod("node-2", "old").expect("DEL during the outage");
    let r = Responder::start(&during.ns).expect("responder");
    let p = probe(&client.ns, during.ip);
    drop(r);
    assert_eq!(
        p.seen_as,
        Some(client.ip),
        "the pod made during the outage is unreachable: {p:?}"
    );

    // The cloud comes back: the node reconciles and keeps serving; nothing is held twice.
    lab.restart_mock().expect("cloud back");
    let after = lab
        .add_pod("node-2", "after")
        .expect("ADD after the outage");
    let r = Responder::start(&after.ns).expect("responder");
    let p = probe(&client.ns, after.ip);
    drop(r);
    assert_eq!(p.seen_as, Some(client.ip), "after the outage: {p:?}");
    common::assert_ip_accounting(&lab);
    for pod in lab.state().pods {
        lab.del_pod(&pod.node, &pod.name).expect("delete");
    }
    common::assert_ip_accounting(&lab);
    common::assert_no_leftover_links(&lab);
}
