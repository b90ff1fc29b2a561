//! 20, then 50 pods deleted at once through libcni (`cnitool del`) against the real agent: the
//! moment each DEL returns, its pod's namespace holds nothing but loopback (CNI: after DEL the
//! attachment is gone), and afterwards the node holds no link of ours and every address is
//! accounted for.

mod common;

use vnet_lab::lab::{Lab, PoolConfig};

#[test]
fn parallel_dels_leave_nothing_in_any_pod_netns_the_moment_they_return() {
    let pool = PoolConfig {
        warm: 60,
        batch: 16,
        cooldown_secs: 1,
        ..PoolConfig::default()
    };
    let lab = common::lab("pdel", 1, pool, None);
    let st = lab.state();
    let node = st.node("node-1").cloned().expect("node-1");
    for n in [20, 50] {
        let names: Vec<String> = (0..n).map(|i| format!("p{n}x{i}")).collect();
        std::thread::scope(|s| {
            for chunk in names.chunks(8) {
                let lab = &lab;
                s.spawn(move || {
                    for name in chunk {
                        lab.add_pod("node-1", name).expect("ADD");
                    }
                });
            }
        });
        let left: Vec<(String, Vec<String>)> = std::thread::scope(|s| {
            let handles: Vec<_> = names
                .iter()
                .map(|name| {
                    let (lab, node, network) = (&lab, &node, &st.network);
                    s.spawn(move || {
                        let ns = lab.pod_ns("node-1", name);
                        lab.cnitool("node-1", "del", network, &node.conf_dir, &ns)
                            .expect("DEL");
                        // Looked at right after this DEL returned, before any other step.
                        let links = Lab::links(&ns).expect("pod links");
                        let ours: Vec<String> = links
                            .into_iter()
                            .map(|(name, _, _)| name)
                            .filter(|l| l != "lo")
                            .collect();
                        (ns, ours)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("DEL thread"))
                .filter(|(_, l)| !l.is_empty())
                .collect()
        });
        assert!(
            left.is_empty(),
            "{n} parallel DELs: {} of {n} pod namespaces still held links when their DEL returned: {left:?}",
            left.len()
        );
        // The runtime's second DEL (idempotent) and the namespaces' removal.
        for name in &names {
            lab.del_pod("node-1", name).expect("second DEL");
        }
    }
    common::assert_ip_accounting(&lab);
    common::assert_no_leftover_links(&lab);
}
