//! 200 pod creates and deletes across 3 nodes: afterwards the cloud, the agents and the live pods
//! agree on every address, and no node keeps a link of a deleted pod.

mod common;

use std::collections::VecDeque;

use vnet_lab::demo::{connectivity_checks, start_responders};
use vnet_lab::lab::PoolConfig;

const CREATES: usize = 200;
const LIVE_PER_NODE: usize = 4;

#[test]
fn churn_of_200_pods_leaks_no_ip_and_no_link() {
    // Short cooldown and release delay: addresses are reused and the pool shrinks mid-churn.
    let pool = PoolConfig {
        warm: 4,
        batch: 4,
        cooldown_secs: 1,
        release_delay_secs: 3,
        ..PoolConfig::default()
    };
    let lab = common::lab("churn", 3, pool, None);
    let nodes = ["node-1", "node-2", "node-3"];
    let errors: Vec<String> = std::thread::scope(|s| {
        let workers: Vec<_> = nodes
            .iter()
            .enumerate()
            .map(|(ni, node)| {
                let lab = &*lab;
                s.spawn(move || {
                    let mut errors = Vec::new();
                    let mut live = VecDeque::new();
                    let creates = CREATES / nodes.len() + usize::from(ni < CREATES % nodes.len());
                    for i in 0..creates {
                        let name = format!("c{i}");
                        match lab.add_pod(node, &name) {
                            Ok(_) => live.push_back(name),
                            Err(e) => errors.push(format!("add {node}/{name}: {e}")),
                        }
                        if live.len() > LIVE_PER_NODE {
                            let old = live.pop_front().expect("live pod");
                            if let Err(e) = lab.del_pod(node, &old) {
                                errors.push(format!("del {node}/{old}: {e}"));
                            }
                        }
                    }
                    errors
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("worker"))
            .collect()
    });
    assert!(
        errors.is_empty(),
        "CNI calls failed:\n  {}",
        errors.join("\n  ")
    );

    // The survivors of the churn still work and are accounted for.
    let st = lab.state();
    assert_eq!(st.pods.len(), nodes.len() * LIVE_PER_NODE);
    common::assert_ip_accounting(&lab);
    let responders = start_responders(&st).expect("responders");
    let checks = connectivity_checks(&st);
    drop(responders);
    let failed: Vec<_> = checks.iter().filter(|c| !c.passed).collect();
    assert!(failed.is_empty(), "after churn: {failed:#?}");

    for pod in st.pods {
        lab.del_pod(&pod.node, &pod.name).expect("delete survivor");
    }
    common::assert_ip_accounting(&lab);
    common::assert_no_leftover_links(&lab);
    for node in nodes {
        assert!(lab.agent_allocations(node).unwrap().allocations.is_empty());
    }
}
