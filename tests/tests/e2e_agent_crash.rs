//! The agent of a node is killed with SIGKILL while pods come and go there: existing pods keep
//! working (the data path does not need the agent), no address is handed out twice, and after a
//! restart the node serves pods again with every release that happened meanwhile accounted for.

mod common;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use vnet_lab::lab::PoolConfig;
use vnet_lab::probe::{Responder, probe};

const SIGKILL: i32 = 9;

#[test]
fn agent_kill_9_mid_churn_keeps_pods_working_and_the_node_recovers() {
    let pool = PoolConfig {
        warm: 4,
        batch: 4,
        cooldown_secs: 1,
        ..PoolConfig::default()
    };
    let lab = common::lab("crash", 2, pool, None);
    let client = lab.add_pod("node-1", "client").expect("client pod");
    let survivors: Vec<_> = (0..3)
        .map(|i| lab.add_pod("node-2", &format!("s{i}")).expect("survivor"))
        .collect();

    let ops = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let churn_errors = std::thread::scope(|s| {
        let churn = s.spawn(|| {
            let mut live = VecDeque::new();
            let mut errors = 0;
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let name = format!("k{i}");
                i += 1;
                // Failures while the agent is down are expected; what matters is what remains.
                match lab.add_pod("node-2", &name) {
                    Ok(_) => live.push_back(name),
                    Err(_) => errors += 1,
                }
                if live.len() > 3 {
                    let old = live.pop_front().expect("live");
                    if lab.del_pod("node-2", &old).is_err() {
                        errors += 1;
                        live.push_back(old);
                    }
                }
                ops.fetch_add(1, Ordering::SeqCst);
            }
            errors
        });
        while ops.load(Ordering::SeqCst) < 10 {
            std::thread::sleep(Duration::from_millis(20));
        }
        lab.signal_agent("node-2", SIGKILL).expect("kill agent");

        // With the agent dead, the pods it wired still answer.
        for s in &survivors {
            let r = Responder::start(&s.ns).expect("responder");
            let p = probe(&client.ns, s.ip);
            drop(r);
            assert_eq!(
                p.seen_as,
                Some(client.ip),
                "survivor {} unreachable with the agent down: {p:?}",
                s.name
            );
        }
        let during = ops.load(Ordering::SeqCst);
        while ops.load(Ordering::SeqCst) < during + 5 {
            std::thread::sleep(Duration::from_millis(20));
        }

        lab.start_agent("node-2").expect("restart agent");
        lab.wait_agent_ready("node-2", Duration::from_secs(60))
            .expect("agent ready again");
        let after = ops.load(Ordering::SeqCst);
        while ops.load(Ordering::SeqCst) < after + 10 {
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::SeqCst);
        churn.join().expect("churn thread")
    });
    eprintln!("CNI calls refused while the agent was down: {churn_errors}");

    // The node recovers: a new pod comes up and is reachable; survivors still are.
    let fresh = lab
        .add_pod("node-2", "fresh")
        .expect("ADD after the agent restart");
    for s in survivors.iter().chain(std::iter::once(&fresh)) {
        let r = Responder::start(&s.ns).expect("responder");
        let p = probe(&client.ns, s.ip);
        drop(r);
        assert_eq!(
            p.seen_as,
            Some(client.ip),
            "{} unreachable after the restart: {p:?}",
            s.name
        );
    }
    // No address twice, and the releases spooled while the agent was down were applied.
    common::assert_ip_accounting(&lab);
    for pod in lab.state().pods {
        lab.del_pod(&pod.node, &pod.name).expect("delete");
    }
    common::assert_ip_accounting(&lab);
    common::assert_no_leftover_links(&lab);
}
