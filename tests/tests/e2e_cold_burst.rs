//! 60 pods at once on a node whose pool is empty: all come up, and the cloud writes it took stay
//! within the batching rule (each NIC write adds at least one whole batch, writes never overlap,
//! so reaching 60 + warm addresses takes at most ceil((60 + warm) / batch) writes).

mod common;

use std::sync::Barrier;

use vnet_lab::lab::PoolConfig;

const PODS: usize = 60;

#[test]
fn sixty_pods_at_once_on_an_empty_pool_all_come_up_within_the_batching_rule() {
    let pool = PoolConfig {
        warm: 0,
        batch: 8,
        max: 250,
        release_delay_secs: 3600,
        cooldown_secs: 30,
        allocate_timeout_secs: 30,
    };
    let lab = common::lab("cold", 1, pool.clone(), None);
    let before = lab.agent_status("node-1").expect("status");
    assert_eq!(
        before.pool.total, 0,
        "the pool should start empty: {before:?}"
    );
    lab.mock_request("POST", "/admin/counters/reset", None)
        .expect("reset counters");

    let barrier = Barrier::new(PODS);
    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..PODS)
            .map(|i| {
                let (lab, barrier) = (&*lab, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    lab.add_pod("node-1", &format!("b{i}"))
                        .err()
                        .map(|e| format!("b{i}: {e}"))
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().expect("thread"))
            .collect()
    });
    assert!(errors.is_empty(), "pods failed:\n  {}", errors.join("\n  "));
    assert_eq!(lab.state().pods.len(), PODS);

    let counters = lab.mock_json("/admin/counters").expect("counters");
    // A NIC PUT, or on a Uniform scale-set instance the instance update that carries the NIC.
    let writes = ["nic_put", "vmss_vm_put"]
        .iter()
        .map(|op| counters["calls"][op].as_u64().unwrap_or(0) as usize)
        .sum::<usize>();
    let allowed = (PODS + pool.warm as usize).div_ceil(pool.batch as usize);
    eprintln!(
        "cold burst of {PODS}: {writes} NIC writes (batching rule allows at most {allowed}); counters {counters}"
    );
    assert!(writes >= 1, "no cloud write recorded: {counters}");
    assert!(
        writes <= allowed,
        "{writes} NIC writes for {PODS} pods, batching allows {allowed}: {counters}"
    );
    common::assert_ip_accounting(&lab);
}
