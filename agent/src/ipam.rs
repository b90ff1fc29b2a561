//! The in-memory IPAM state: which address is free, allocated, cooling down or unreconciled.
//!
//! Every method is synchronous and returns the [`Record`]s that describe its change; the caller
//! holds the lock, submits the records to the store in the same critical section (so the log
//! order is the order of the changes) and waits for durability after releasing it.
//!
//! Invariants (checked by [`Ipam::check`] in tests):
//! - an address is in at most one of: free, allocated, cooldown;
//! - free and cooldown addresses are in the pool (on the NIC as far as we know);
//! - an allocated address not in the pool is *unreconciled*: the cloud did not show it. It stays
//!   allocated (the pod may well be using it) but is never handed out again; its release drops it.
//! - prefix mode: an address inside a known block leaves the pool for the cloud only with its
//!   whole block, when all the block's addresses are free (not allocated, not cooling down); a
//!   block is forgotten once none of its addresses is in the pool or being released.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use vnet_api::{AllocateRequest, Allocation, AttachmentKey};
use vnet_cloud::SecondaryIp;

use crate::store::{Cooldown, Record, StoreState};

#[derive(Debug, Default)]
pub struct Ipam {
    pool: BTreeSet<Ipv4Addr>,
    free: BTreeSet<Ipv4Addr>,
    allocations: HashMap<AttachmentKey, Allocation>,
    by_ip: HashMap<Ipv4Addr, AttachmentKey>,
    cooldown: BTreeMap<Ipv4Addr, Cooldown>,
    unreconciled: BTreeSet<Ipv4Addr>,
    /// Out of the pool, being removed from the NIC (survives restarts; see `PoolReleasing`).
    releasing: BTreeSet<Ipv4Addr>,
    /// Prefix mode: the NIC's blocks whose addresses are in the pool (or being released).
    blocks: BTreeSet<Ipv4Network>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllocOutcome {
    /// The attachment already holds this address (a repeated ADD).
    Existing(Allocation),
    New(Allocation, Record),
    /// No free address now.
    Empty,
}

/// What a reconcile with the cloud's view changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// On the NIC, unknown to the store: now free.
    pub adopted: Vec<Ipv4Addr>,
    /// Free or cooling down in the store, absent from the NIC: dropped from the pool.
    pub dropped: Vec<Ipv4Addr>,
    /// Allocated, absent from the NIC: kept, never handed out again.
    pub unreconciled: Vec<Ipv4Addr>,
    /// Unreconciled before, shown by the cloud again.
    pub recovered: Vec<Ipv4Addr>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IpamCounts {
    pub total: u32,
    pub allocated: u32,
    pub free: u32,
    pub cooldown: u32,
    pub unreconciled: u32,
    /// Out of the pool, still on the NIC until the cloud confirms their removal.
    pub releasing: u32,
}

impl Ipam {
    /// Rebuilds the working state from what the store replayed.
    pub fn from_state(state: StoreState) -> Ipam {
        let mut ipam = Ipam {
            releasing: state.releasing.difference(&state.pool).copied().collect(),
            blocks: state.blocks,
            pool: state.pool,
            ..Ipam::default()
        };
        for (key, allocation) in state.allocations {
            if let Some(other) = ipam.by_ip.get(&allocation.ip) {
                // Cannot happen with this store; if it ever does, keep both and say so loudly
                // rather than pick a winner and break a running pod.
                tracing::error!(ip = %allocation.ip, first = %other, second = %key, "address held by two attachments in the store");
            }
            ipam.by_ip.insert(allocation.ip, key.clone());
            if !ipam.pool.contains(&allocation.ip) {
                ipam.unreconciled.insert(allocation.ip);
            }
            ipam.allocations.insert(key, allocation);
        }
        for (ip, c) in state.cooldown {
            if ipam.pool.contains(&ip) && !ipam.by_ip.contains_key(&ip) {
                ipam.cooldown.insert(ip, c);
            }
        }
        ipam.free = ipam
            .pool
            .iter()
            .filter(|ip| !ipam.by_ip.contains_key(ip) && !ipam.cooldown.contains_key(ip))
            .copied()
            .collect();
        ipam
    }

    pub fn get(&self, key: &AttachmentKey) -> Option<&Allocation> {
        self.allocations.get(key)
    }

    pub fn allocate(&mut self, req: &AllocateRequest, host_veth: String, now: u64) -> AllocOutcome {
        if let Some(existing) = self.allocations.get(&req.key) {
            return AllocOutcome::Existing(existing.clone());
        }
        let Some(ip) = self.free.pop_first() else {
            return AllocOutcome::Empty;
        };
        let allocation = Allocation {
            ip,
            key: req.key.clone(),
            pod: req.pod.clone(),
            network: req.network.clone(),
            host_veth,
            allocated_at: now,
        };
        self.by_ip.insert(ip, req.key.clone());
        self.allocations.insert(req.key.clone(), allocation.clone());
        let record = Record::Allocate {
            allocation: allocation.clone(),
        };
        AllocOutcome::New(allocation, record)
    }

    /// Releases the attachment's address into cooldown (or out of the pool when it was
    /// unreconciled). `None` when the attachment holds nothing.
    pub fn release(
        &mut self,
        key: &AttachmentKey,
        dying_veth: Option<String>,
        now: u64,
        cooldown_secs: u64,
    ) -> Option<(Allocation, Vec<Record>)> {
        let allocation = self.allocations.remove(key)?;
        let ip = allocation.ip;
        self.by_ip.remove(&ip);
        let until = now + cooldown_secs;
        let mut records = vec![Record::Release {
            key: key.clone(),
            ip,
            cooldown_until: until,
            dying_veth: dying_veth.clone(),
        }];
        if self.unreconciled.remove(&ip) {
            records.push(Record::PoolRemove { ips: vec![ip] });
        } else {
            self.cooldown.insert(
                ip,
                Cooldown {
                    ip,
                    until,
                    dying_veth,
                },
            );
        }
        Some((allocation, records))
    }

    /// Moves cooldowns that are over (and whose veth is gone) to free; returns how many.
    pub fn promote_cooldowns(&mut self, now: u64) -> usize {
        let done: Vec<Ipv4Addr> = self
            .cooldown
            .values()
            .filter(|c| c.dying_veth.is_none() && c.until <= now)
            .map(|c| c.ip)
            .collect();
        for ip in &done {
            self.cooldown.remove(ip);
            self.free.insert(*ip);
        }
        done.len()
    }

    /// The dying veth of `ip` is gone: its cooldown starts now.
    pub fn veth_gone(&mut self, ip: Ipv4Addr, now: u64, cooldown_secs: u64) -> Option<Record> {
        let c = self.cooldown.get_mut(&ip)?;
        c.dying_veth.as_ref()?;
        c.dying_veth = None;
        c.until = now + cooldown_secs;
        Some(Record::Cooldown { ip, until: c.until })
    }

    /// Addresses waiting for their old veth to disappear, with the veth's name.
    pub fn dying(&self) -> Vec<(Ipv4Addr, String)> {
        self.cooldown
            .values()
            .filter_map(|c| c.dying_veth.clone().map(|v| (c.ip, v)))
            .collect()
    }

    /// New addresses from the cloud join the free set.
    pub fn add_to_pool(&mut self, ips: &[Ipv4Addr]) -> Option<Record> {
        let mut added = Vec::new();
        for ip in ips {
            let was_releasing = self.releasing.remove(ip);
            if self.pool.insert(*ip) || was_releasing {
                let recovered = self.unreconciled.remove(ip);
                if !recovered && !self.by_ip.contains_key(ip) && !self.cooldown.contains_key(ip) {
                    self.free.insert(*ip);
                }
                added.push(*ip);
            }
        }
        (!added.is_empty()).then_some(Record::PoolAdd { ips: added })
    }

    /// New entries from the cloud (addresses or blocks) join the pool; blocks are recorded.
    pub fn add_entries(&mut self, entries: &[SecondaryIp]) -> Vec<Record> {
        let ips: Vec<Ipv4Addr> = entries.iter().flat_map(|e| e.addresses()).collect();
        let new_blocks: Vec<Ipv4Network> = entries
            .iter()
            .filter(|e| e.is_block())
            .map(|e| e.network())
            .filter(|b| !self.blocks.contains(b))
            .collect();
        // The block is recorded before its addresses: the journal keeps a batch's lines in
        // order, so whatever part of the batch survives a crash never holds a block's addresses
        // without the block (they would replay as loose addresses, released one by one).
        let mut records = Vec::new();
        if !new_blocks.is_empty() {
            self.blocks.extend(new_blocks.iter().copied());
            records.push(Record::BlockAdd { blocks: new_blocks });
        }
        records.extend(self.add_to_pool(&ips));
        records
    }

    fn block_of(&self, ip: &Ipv4Addr) -> Option<Ipv4Network> {
        // Blocks never overlap: the one holding `ip` is the last that starts at or below it.
        let at = Ipv4Network::new(*ip, 32).expect("a /32 is valid");
        self.blocks
            .range(..=at)
            .next_back()
            .filter(|b| b.contains(*ip))
            .copied()
    }

    /// Forgets blocks none of whose addresses is in the pool or being released (the rule
    /// [`StoreState::apply`] follows for a `pool_remove`).
    fn prune_blocks(&mut self) {
        crate::store::retain_held_blocks(&mut self.blocks, &self.pool, &self.releasing);
    }

    /// Takes up to `n` free addresses out of the pool, highest first (low addresses stay, which
    /// keeps a node's pod addresses compact and easy to read), into the releasing set. A block
    /// goes only whole, and only when every one of its addresses is free and cooled down;
    /// addresses outside blocks go one by one.
    pub fn take_for_release(&mut self, n: u32) -> (Vec<Ipv4Addr>, Option<Record>) {
        let n = n as usize;
        let mut ips = Vec::new();
        let whole: Vec<Ipv4Network> = self
            .blocks
            .iter()
            .rev()
            .filter(|b| b.iter().all(|a| self.free.contains(&a)))
            .copied()
            .collect();
        for block in whole {
            let size = block.size() as usize;
            if ips.len() + size > n {
                continue;
            }
            ips.extend(block.iter());
        }
        let loose: Vec<Ipv4Addr> = self
            .free
            .iter()
            .rev()
            .filter(|ip| self.block_of(ip).is_none())
            .take(n.saturating_sub(ips.len()))
            .copied()
            .collect();
        ips.extend(loose);
        for ip in &ips {
            self.free.remove(ip);
            self.pool.remove(ip);
            self.releasing.insert(*ip);
        }
        let record = (!ips.is_empty()).then(|| Record::PoolReleasing { ips: ips.clone() });
        (ips, record)
    }

    /// Prefix mode's unit of release: how many whole blocks are free (for status).
    pub fn free_blocks(&self) -> usize {
        self.blocks
            .iter()
            .filter(|b| b.iter().all(|a| self.free.contains(&a)))
            .count()
    }

    pub fn blocks(&self) -> &BTreeSet<Ipv4Network> {
        &self.blocks
    }

    /// The cloud confirmed the removal of these releasing addresses.
    pub fn release_done(&mut self, ips: &[Ipv4Addr]) -> Option<Record> {
        let done: Vec<Ipv4Addr> = ips
            .iter()
            .filter(|ip| self.releasing.remove(ip))
            .copied()
            .collect();
        self.prune_blocks();
        (!done.is_empty()).then_some(Record::PoolRemove { ips: done })
    }

    /// Addresses still to be removed from the NIC (left by a crash or a failed call).
    pub fn releasing(&self) -> Vec<Ipv4Addr> {
        self.releasing.iter().copied().collect()
    }

    /// Aligns the pool with the cloud's complete list of the NIC's addresses. Allocations are
    /// never removed: an allocated address the cloud does not show becomes unreconciled.
    pub fn reconcile(&mut self, on_nic: &BTreeSet<Ipv4Addr>) -> (ReconcileReport, Vec<Record>) {
        let mut report = ReconcileReport::default();
        let mut records = Vec::new();
        // Still on the NIC: the release is finished later. Gone: the release is done.
        let released: Vec<Ipv4Addr> = self.releasing.difference(on_nic).copied().collect();
        if let Some(r) = self.release_done(&released) {
            records.push(r);
        }
        for ip in on_nic {
            if self.pool.contains(ip) || self.releasing.contains(ip) {
                continue;
            }
            self.pool.insert(*ip);
            if self.unreconciled.remove(ip) {
                report.recovered.push(*ip);
            } else {
                if !self.by_ip.contains_key(ip) && !self.cooldown.contains_key(ip) {
                    self.free.insert(*ip);
                }
                report.adopted.push(*ip);
            }
        }
        let gone: Vec<Ipv4Addr> = self.pool.difference(on_nic).copied().collect();
        for ip in &gone {
            self.pool.remove(ip);
            if self.by_ip.contains_key(ip) {
                self.unreconciled.insert(*ip);
                report.unreconciled.push(*ip);
            } else {
                self.free.remove(ip);
                self.cooldown.remove(ip);
                report.dropped.push(*ip);
            }
        }
        let added: Vec<Ipv4Addr> = report
            .adopted
            .iter()
            .chain(&report.recovered)
            .copied()
            .collect();
        if !added.is_empty() {
            records.push(Record::PoolAdd { ips: added });
        }
        if !gone.is_empty() {
            records.push(Record::PoolRemove { ips: gone });
        }
        self.prune_blocks();
        (report, records)
    }

    /// [`Ipam::reconcile`] with the cloud's complete list of the NIC's entries: a block counts
    /// with all its addresses, and a block the store did not know is recorded.
    pub fn reconcile_entries(&mut self, listed: &[SecondaryIp]) -> (ReconcileReport, Vec<Record>) {
        let on_nic: BTreeSet<Ipv4Addr> = listed.iter().flat_map(|e| e.addresses()).collect();
        let (report, mut records) = self.reconcile(&on_nic);
        let new_blocks: Vec<Ipv4Network> = listed
            .iter()
            .filter(|e| e.is_block())
            .map(|e| e.network())
            .filter(|b| !self.blocks.contains(b))
            .collect();
        if !new_blocks.is_empty() {
            self.blocks.extend(new_blocks.iter().copied());
            // Right before the `pool_add` of its addresses (see `add_entries`: whatever part of
            // the batch survives a crash never holds them without the block), and after the
            // batch's first `pool_remove`, which would prune a block that holds nothing yet.
            let at = records
                .iter()
                .position(|r| matches!(r, Record::PoolAdd { .. }))
                .unwrap_or(records.len());
            records.insert(at, Record::BlockAdd { blocks: new_blocks });
        }
        (report, records)
    }

    pub fn counts(&self) -> IpamCounts {
        IpamCounts {
            total: self.pool.len() as u32,
            allocated: self.allocations.len() as u32,
            free: self.free.len() as u32,
            cooldown: self.cooldown.len() as u32,
            unreconciled: self.unreconciled.len() as u32,
            releasing: self.releasing.len() as u32,
        }
    }

    pub fn allocations(&self) -> Vec<Allocation> {
        let mut all: Vec<Allocation> = self.allocations.values().cloned().collect();
        all.sort_by_key(|a| a.ip);
        all
    }

    pub fn keys(&self) -> Vec<AttachmentKey> {
        self.allocations.keys().cloned().collect()
    }

    /// Records `network` on an allocation that has none (one made before networks were
    /// recorded), once a GC of that network has listed it as in use.
    pub fn claim_network(&mut self, key: &AttachmentKey, network: &str) -> Option<Record> {
        let a = self.allocations.get_mut(key)?;
        if a.network.is_some() {
            return None;
        }
        a.network = Some(network.to_owned());
        Some(Record::Allocate {
            allocation: a.clone(),
        })
    }

    pub fn unreconciled(&self) -> Vec<Ipv4Addr> {
        self.unreconciled.iter().copied().collect()
    }

    pub fn pool(&self) -> &BTreeSet<Ipv4Addr> {
        &self.pool
    }

    /// Panics when an invariant of the module doc is broken (tests only).
    pub fn check(&self) {
        for ip in &self.free {
            assert!(self.pool.contains(ip), "free {ip} outside the pool");
            assert!(!self.by_ip.contains_key(ip), "free {ip} is allocated");
            assert!(!self.cooldown.contains_key(ip), "free {ip} is cooling down");
        }
        for ip in self.cooldown.keys() {
            assert!(self.pool.contains(ip), "cooling {ip} outside the pool");
            assert!(!self.by_ip.contains_key(ip), "cooling {ip} is allocated");
        }
        assert_eq!(
            self.by_ip.len(),
            self.allocations.len(),
            "an address held twice"
        );
        for ip in &self.unreconciled {
            assert!(self.by_ip.contains_key(ip) && !self.pool.contains(ip));
        }
        for ip in &self.releasing {
            assert!(
                !self.pool.contains(ip) && !self.by_ip.contains_key(ip),
                "releasing {ip} in use"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: &str) -> AllocateRequest {
        AllocateRequest {
            key: format!("{id}/eth0").parse().unwrap(),
            network: None,
            netns: None,
            pod: Default::default(),
        }
    }

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 240, 0, last)
    }

    fn ipam_with(ips: &[u8]) -> Ipam {
        let mut ipam = Ipam::default();
        ipam.add_to_pool(&ips.iter().map(|&i| ip(i)).collect::<Vec<_>>());
        ipam
    }

    fn allocated_ip(outcome: AllocOutcome) -> Ipv4Addr {
        match outcome {
            AllocOutcome::New(a, _) | AllocOutcome::Existing(a) => a.ip,
            AllocOutcome::Empty => panic!("pool empty"),
        }
    }

    #[test]
    fn allocate_is_idempotent_per_attachment() {
        let mut ipam = ipam_with(&[10, 11]);
        let a = allocated_ip(ipam.allocate(&req("a"), "v".into(), 0));
        assert!(
            matches!(ipam.allocate(&req("a"), "v".into(), 0), AllocOutcome::Existing(x) if x.ip == a)
        );
        let b = allocated_ip(ipam.allocate(&req("b"), "v".into(), 0));
        assert_ne!(a, b);
        assert_eq!(ipam.allocate(&req("c"), "v".into(), 0), AllocOutcome::Empty);
        ipam.check();
    }

    #[test]
    fn released_addresses_wait_out_the_cooldown_and_their_veth() {
        let mut ipam = ipam_with(&[10]);
        ipam.allocate(&req("a"), "v".into(), 0);
        let (_, records) = ipam
            .release(&req("a").key, Some("vdelx".into()), 100, 30)
            .unwrap();
        assert_eq!(records.len(), 1);
        assert!(
            ipam.release(&req("a").key, None, 100, 30).is_none(),
            "release is idempotent"
        );
        assert_eq!(ipam.promote_cooldowns(1_000), 0, "the veth is not gone yet");
        assert_eq!(ipam.dying(), vec![(ip(10), "vdelx".to_string())]);
        assert_eq!(
            ipam.veth_gone(ip(10), 200, 30),
            Some(Record::Cooldown {
                ip: ip(10),
                until: 230
            })
        );
        assert_eq!(ipam.promote_cooldowns(229), 0);
        assert_eq!(ipam.allocate(&req("b"), "v".into(), 0), AllocOutcome::Empty);
        assert_eq!(ipam.promote_cooldowns(230), 1);
        assert_eq!(
            allocated_ip(ipam.allocate(&req("b"), "v".into(), 0)),
            ip(10)
        );
        ipam.check();
    }

    #[test]
    fn reconcile_adopts_drops_and_never_erases_allocations() {
        let mut ipam = ipam_with(&[10, 11, 12]);
        let a = allocated_ip(ipam.allocate(&req("a"), "v".into(), 0));
        assert_eq!(a, ip(10));
        // The cloud shows 11 and 13, not 10 (allocated) nor 12 (free).
        let on_nic: BTreeSet<_> = [ip(11), ip(13)].into();
        let (report, records) = ipam.reconcile(&on_nic);
        assert_eq!(report.adopted, vec![ip(13)]);
        assert_eq!(report.dropped, vec![ip(12)]);
        assert_eq!(report.unreconciled, vec![ip(10)]);
        assert_eq!(records.len(), 2);
        assert_eq!(
            ipam.get(&req("a").key).unwrap().ip,
            ip(10),
            "allocation kept"
        );
        ipam.check();
        // Never handed out again.
        let others: Vec<_> = ["b", "c", "d"]
            .iter()
            .map(|id| ipam.allocate(&req(id), "v".into(), 0))
            .collect();
        assert!(
            others
                .iter()
                .all(|o| !matches!(o, AllocOutcome::New(x, _) if x.ip == ip(10)))
        );
        // Its release drops it instead of cooling it down.
        let (_, records) = ipam.release(&req("a").key, None, 0, 30).unwrap();
        assert!(records.contains(&Record::PoolRemove { ips: vec![ip(10)] }));
        assert_eq!(ipam.counts().cooldown, 0);
        ipam.check();
    }

    #[test]
    fn an_unreconciled_address_the_cloud_shows_again_is_recovered() {
        let mut ipam = ipam_with(&[10]);
        ipam.allocate(&req("a"), "v".into(), 0);
        ipam.reconcile(&BTreeSet::new());
        assert_eq!(ipam.unreconciled(), vec![ip(10)]);
        let (report, _) = ipam.reconcile(&[ip(10)].into());
        assert_eq!(report.recovered, vec![ip(10)]);
        assert!(ipam.unreconciled().is_empty());
        assert_eq!(ipam.counts().free, 0);
        ipam.check();
    }

    #[test]
    fn an_interrupted_release_is_neither_reused_nor_readopted() {
        let mut ipam = ipam_with(&[10, 11]);
        let (ips, record) = ipam.take_for_release(1);
        assert_eq!(ips, vec![ip(11)]);
        assert_eq!(record, Some(Record::PoolReleasing { ips: vec![ip(11)] }));
        // After a crash the cloud still shows it: not adopted back into the pool.
        let (report, _) = ipam.reconcile(&[ip(10), ip(11)].into());
        assert!(report.adopted.is_empty());
        assert_eq!(ipam.releasing(), vec![ip(11)]);
        assert_eq!(ipam.counts().free, 1);
        // Once the cloud no longer shows it, the release is done.
        let (_, records) = ipam.reconcile(&[ip(10)].into());
        assert_eq!(records, vec![Record::PoolRemove { ips: vec![ip(11)] }]);
        assert!(ipam.releasing().is_empty());
        ipam.check();
    }

    #[test]
    fn state_round_trips_through_records() {
        let mut ipam = Ipam::default();
        let mut state = StoreState::default();
        let mut apply = |records: Vec<Record>| {
            for r in &records {
                state.apply(r);
            }
        };
        apply(
            ipam.add_to_pool(&[ip(10), ip(11), ip(12)])
                .into_iter()
                .collect(),
        );
        for id in ["a", "b"] {
            if let AllocOutcome::New(_, r) = ipam.allocate(&req(id), "v".into(), 0) {
                apply(vec![r]);
            }
        }
        apply(ipam.release(&req("a").key, None, 0, 3_000).unwrap().1);
        apply(ipam.take_for_release(1).1.into_iter().collect());
        let rebuilt = Ipam::from_state(state);
        assert_eq!(rebuilt.counts(), ipam.counts());
        assert_eq!(rebuilt.allocations(), ipam.allocations());
        rebuilt.check();
    }
}

#[cfg(test)]
#[path = "ipam_blocks.rs"]
mod block_tests;
