//! Prefix mode in the IPAM state: blocks join the pool whole, addresses go to pods one by one,
//! and a block leaves only whole, once every address of it is free and cooled down.

use std::net::Ipv4Addr;

use vnet_api::AllocateRequest;
use vnet_cloud::SecondaryIp;

use super::*;
use crate::store::StoreState;

fn block(base: &str) -> SecondaryIp {
    SecondaryIp {
        name: format!("vnet-cni-{base}"),
        ip: base.parse().unwrap(),
        subnet_id: "/s".into(),
        prefix_len: 28,
    }
}

fn req(id: &str) -> AllocateRequest {
    AllocateRequest {
        key: format!("{id}/eth0").parse().unwrap(),
        network: None,
        netns: None,
        pod: Default::default(),
    }
}

fn replay(records: &[Record], state: &mut StoreState) {
    for r in records {
        state.apply(r);
    }
}

#[test]
fn a_block_goes_back_only_whole_and_only_when_every_address_is_free_and_cooled_down() {
    let mut ipam = Ipam::default();
    let mut state = StoreState::default();
    let records = ipam.add_entries(&[block("10.240.0.16"), block("10.240.0.32")]);
    replay(&records, &mut state);
    assert_eq!(ipam.counts().free, 32);
    assert_eq!(state.blocks.len(), 2);
    // Pods get the lowest addresses: the first block fills first.
    let AllocOutcome::New(a, r) = ipam.allocate(&req("a"), "v".into(), 0) else {
        panic!()
    };
    replay(&[r], &mut state);
    assert_eq!(a.ip, Ipv4Addr::new(10, 240, 0, 16));
    // Asked for 31 addresses back: only the whole free block goes; no loose address of the
    // first block leaves while a pod holds one of its addresses.
    let (taken, record) = ipam.take_for_release(31);
    assert_eq!(taken.len(), 16);
    assert!(taken.iter().all(|ip| ip.octets()[3] >= 32));
    replay(&record.into_iter().collect::<Vec<_>>(), &mut state);
    let done = ipam.release_done(&taken).unwrap();
    replay(&[done], &mut state);
    assert_eq!(ipam.blocks().len(), 1);
    assert_eq!(state.blocks, ipam.blocks().clone(), "replay agrees");
    // The pod's address cools down: the block stays until the cooldown is over.
    let (_, records) = ipam.release(&a.key, None, 100, 30).unwrap();
    replay(&records, &mut state);
    assert!(ipam.take_for_release(16).0.is_empty());
    ipam.promote_cooldowns(129);
    assert!(ipam.take_for_release(16).0.is_empty());
    ipam.promote_cooldowns(130);
    let (taken, record) = ipam.take_for_release(16);
    assert_eq!(taken.len(), 16);
    replay(&record.into_iter().collect::<Vec<_>>(), &mut state);
    let done = ipam.release_done(&taken).unwrap();
    replay(&[done], &mut state);
    assert!(ipam.blocks().is_empty() && state.blocks.is_empty());
    assert_eq!(ipam.counts().total, 0);
}

#[test]
fn fewer_than_a_block_asked_back_releases_no_block_but_loose_addresses_still_go() {
    let mut ipam = Ipam::default();
    ipam.add_entries(&[block("10.240.0.16")]);
    ipam.add_to_pool(&[Ipv4Addr::new(10, 240, 0, 5)]);
    let (taken, _) = ipam.take_for_release(15);
    assert_eq!(taken, vec![Ipv4Addr::new(10, 240, 0, 5)]);
    assert_eq!(ipam.blocks().len(), 1);
}

#[test]
fn reconcile_adopts_a_new_block_and_forgets_a_vanished_one_keeping_its_pods() {
    let mut ipam = Ipam::default();
    let mut state = StoreState::default();
    replay(&ipam.add_entries(&[block("10.240.0.16")]), &mut state);
    let AllocOutcome::New(a, r) = ipam.allocate(&req("a"), "v".into(), 0) else {
        panic!()
    };
    replay(&[r], &mut state);
    // The cloud shows another block and no longer the first.
    let (report, records) = ipam.reconcile_entries(&[block("10.240.0.48")]);
    replay(&records, &mut state);
    assert_eq!(report.adopted.len(), 16);
    assert_eq!(report.dropped.len(), 15);
    assert_eq!(report.unreconciled, vec![a.ip]);
    let blocks: Vec<String> = ipam.blocks().iter().map(|b| b.to_string()).collect();
    assert_eq!(blocks, vec!["10.240.0.48/28"]);
    assert_eq!(state.blocks, ipam.blocks().clone(), "replay agrees");
    assert_eq!(Ipam::from_state(state).blocks(), ipam.blocks());
    ipam.check();
}

/// A crash can keep any leading part of a batch's journal lines: no part may hold a block's
/// addresses without the block, or they would replay as loose addresses and go back to the
/// cloud one by one while pods use the rest of the block.
#[test]
fn no_part_of_a_batch_holds_a_blocks_addresses_without_the_block() {
    let holds_loose_block_addresses = |state: &StoreState| {
        state.pool.iter().any(|ip| {
            ip.octets()[3] >= 16
                && ip.octets()[3] < 32
                && !state.blocks.iter().any(|b| b.contains(*ip))
        })
    };
    let mut ipam = Ipam::default();
    let grown = ipam.add_entries(&[block("10.240.0.16")]);
    let mut adopting = Ipam::default();
    let (_, adopted) = adopting.reconcile_entries(&[block("10.240.0.16")]);
    for (what, records) in [("growth", grown), ("reconcile", adopted)] {
        for cut in 0..=records.len() {
            let mut state = StoreState::default();
            replay(&records[..cut], &mut state);
            assert!(
                !holds_loose_block_addresses(&state),
                "{what}: the first {cut} of {records:?} hold the block's addresses without it"
            );
        }
        let mut state = StoreState::default();
        replay(&records, &mut state);
        assert_eq!(
            state.blocks.len(),
            1,
            "{what}: the whole batch keeps the block"
        );
        assert_eq!(state.pool.len(), 16);
    }
}
