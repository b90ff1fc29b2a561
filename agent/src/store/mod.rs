//! The allocation store: what must survive a crash, as an ordered log of [`Record`]s.
//!
//! The agent keeps its working state in memory ([`crate::ipam`]) and describes every change as a
//! record. [`Store::submit`] queues records in order and returns a ticket that resolves once they
//! are durable; callers queue while holding the IPAM lock (so the log order is the order of the
//! changes) and wait for the ticket after releasing it (so many requests share one fsync).
//! Replaying the records over an empty [`StoreState`] rebuilds what was acknowledged.
//!
//! [`journal::JournalStore`] is the durable implementation (its on-disk format is described at the
//! top of its module); [`memory::MemoryStore`] is the in-memory fake for tests.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use vnet_api::{Allocation, AttachmentKey};

pub mod journal;
pub mod memory;

pub use journal::{JournalOptions, JournalStore};
pub use memory::MemoryStore;

/// One durable change. The JSON form (`{"op":"allocate",...}`) is the journal's line format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Record {
    /// Addresses the cloud assigned to the NIC for the pool.
    PoolAdd { ips: Vec<Ipv4Addr> },
    /// Addresses the agent is giving back to the cloud: written before the cloud is asked, so
    /// after a crash the agent neither hands them out nor re-adopts them, and finishes the job.
    PoolReleasing { ips: Vec<Ipv4Addr> },
    /// Addresses gone from the pool (released to the cloud, or no longer on the NIC).
    PoolRemove { ips: Vec<Ipv4Addr> },
    /// An address handed to an attachment.
    Allocate { allocation: Allocation },
    /// An attachment gave its address back; it may be reused after `cooldown_until` (seconds since
    /// the Unix epoch), and not before `dying_veth` (if any) is gone.
    Release {
        key: AttachmentKey,
        ip: Ipv4Addr,
        cooldown_until: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dying_veth: Option<String>,
    },
    /// The cooldown of `ip` (re)starts now and ends at `until`: written once a dying veth is gone.
    Cooldown { ip: Ipv4Addr, until: u64 },
    /// Prefix mode: these blocks are on the NIC (their addresses join the pool with a
    /// `pool_add` in the same batch). An address of a block goes back to the cloud only with
    /// its whole block. A block is gone once none of its addresses is in the pool or being
    /// released (after a `pool_remove`): no record of its own.
    BlockAdd { blocks: Vec<Ipv4Network> },
}

/// A released address waiting before reuse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cooldown {
    pub ip: Ipv4Addr,
    /// Seconds since the Unix epoch.
    pub until: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dying_veth: Option<String>,
}

/// What the records add up to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreState {
    /// Addresses on the NIC that belong to the pool (allocated, free or cooling down).
    pub pool: BTreeSet<Ipv4Addr>,
    pub allocations: BTreeMap<AttachmentKey, Allocation>,
    pub cooldown: BTreeMap<Ipv4Addr, Cooldown>,
    /// Out of the pool, being removed from the NIC.
    pub releasing: BTreeSet<Ipv4Addr>,
    /// Prefix mode: the NIC's blocks that hold pool (or releasing) addresses.
    pub blocks: BTreeSet<Ipv4Network>,
}

/// Keeps the blocks that still hold an address of the pool or one being released: the one
/// rule by which a block is forgotten, for the live state and for a replay alike.
pub(crate) fn retain_held_blocks(
    blocks: &mut BTreeSet<Ipv4Network>,
    pool: &BTreeSet<Ipv4Addr>,
    releasing: &BTreeSet<Ipv4Addr>,
) {
    blocks.retain(|b| {
        b.iter()
            .any(|a| pool.contains(&a) || releasing.contains(&a))
    });
}

impl StoreState {
    pub fn apply(&mut self, record: &Record) {
        match record {
            Record::PoolAdd { ips } => {
                for ip in ips {
                    self.pool.insert(*ip);
                    self.releasing.remove(ip);
                }
            }
            Record::PoolReleasing { ips } => {
                for ip in ips {
                    self.pool.remove(ip);
                    self.cooldown.remove(ip);
                    self.releasing.insert(*ip);
                }
            }
            Record::PoolRemove { ips } => {
                for ip in ips {
                    self.pool.remove(ip);
                    self.cooldown.remove(ip);
                    self.releasing.remove(ip);
                }
                retain_held_blocks(&mut self.blocks, &self.pool, &self.releasing);
            }
            Record::Allocate { allocation } => {
                self.cooldown.remove(&allocation.ip);
                self.allocations
                    .insert(allocation.key.clone(), allocation.clone());
            }
            Record::Release {
                key,
                ip,
                cooldown_until,
                dying_veth,
            } => {
                if self.allocations.get(key).is_some_and(|a| a.ip == *ip) {
                    self.allocations.remove(key);
                }
                self.cooldown.insert(
                    *ip,
                    Cooldown {
                        ip: *ip,
                        until: *cooldown_until,
                        dying_veth: dying_veth.clone(),
                    },
                );
            }
            Record::Cooldown { ip, until } => {
                self.cooldown.insert(
                    *ip,
                    Cooldown {
                        ip: *ip,
                        until: *until,
                        dying_veth: None,
                    },
                );
            }
            Record::BlockAdd { blocks } => self.blocks.extend(blocks.iter().copied()),
        }
    }

    /// Addresses held by more than one attachment: must always be empty.
    pub fn duplicate_ips(&self) -> Vec<Ipv4Addr> {
        let mut seen = BTreeSet::new();
        let mut dups = Vec::new();
        for a in self.allocations.values() {
            if !seen.insert(a.ip) {
                dups.push(a.ip);
            }
        }
        dups
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O error on {path}: {message}")]
    Io { path: String, message: String },
    #[error(
        "store file {path} is corrupt at line {line}: {message}. The agent does not guess (a guess can give one address to two pods). To recover: keep a copy of the state directory; repair the line by hand if you can read what it was (one JSON record per line), or drain the node, stop the agent, move the state directory aside and start the agent (it then re-reads the NIC); see docs/operations.md"
    )]
    Corrupt {
        path: String,
        line: usize,
        message: String,
    },
    #[error(
        "store file {path} was written by a newer agent (format version {version}; this agent reads up to {readable}): run the newer agent, or drain the node, stop the agent and move the state directory aside"
    )]
    NewerVersion {
        path: String,
        version: u32,
        readable: u32,
    },
    #[error("state dir {0} is in use by another vnet-agent")]
    Locked(String),
    #[error("the store failed earlier and accepts no more writes: {0}")]
    Poisoned(String),
    #[error("the store is closed")]
    Closed,
}

/// Resolves once the submitted records are durable.
pub struct Ticket(oneshot::Receiver<Result<(), StoreError>>);

impl Ticket {
    pub fn ready(result: Result<(), StoreError>) -> Ticket {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(result);
        Ticket(rx)
    }

    pub fn new(rx: oneshot::Receiver<Result<(), StoreError>>) -> Ticket {
        Ticket(rx)
    }

    pub async fn wait(self) -> Result<(), StoreError> {
        self.0.await.unwrap_or(Err(StoreError::Closed))
    }
}

/// Resolves to the durable state once a recovery is done.
pub struct RecoverTicket(pub(crate) oneshot::Receiver<Result<StoreState, StoreError>>);

impl RecoverTicket {
    pub async fn wait(self) -> Result<StoreState, StoreError> {
        self.0.await.unwrap_or(Err(StoreError::Closed))
    }
}

pub trait Store: Send + Sync + 'static {
    /// Queues `records` after everything submitted before. An empty list is a barrier: its ticket
    /// resolves once everything before it is durable.
    fn submit(&self, records: Vec<Record>) -> Ticket;

    /// After a failed write: re-open from what is durable, once writing works again, and return
    /// that state. Until [`Store::resume`] every submission is refused, so records computed
    /// against the state before the failure never land.
    fn recover(&self) -> RecoverTicket;

    /// Accept submissions again (queued in order: everything submitted after it is accepted).
    fn resume(&self);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> AttachmentKey {
        format!("{id}/eth0").parse().unwrap()
    }

    fn alloc(id: &str, ip: [u8; 4]) -> Allocation {
        Allocation {
            ip: ip.into(),
            key: key(id),
            pod: Default::default(),
            network: None,
            host_veth: "vnet0".into(),
            allocated_at: 1,
        }
    }

    #[test]
    fn records_have_a_stable_readable_form() {
        let r = Record::Release {
            key: key("abc"),
            ip: [10, 0, 0, 9].into(),
            cooldown_until: 100,
            dying_veth: None,
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"op":"release","key":{"container_id":"abc","ifname":"eth0"},"ip":"10.0.0.9","cooldown_until":100}"#
        );
        let a = Record::Allocate {
            allocation: alloc("abc", [10, 0, 0, 9]),
        };
        let back: Record = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn replay_follows_an_address_through_its_life() {
        let ip: Ipv4Addr = [10, 0, 0, 9].into();
        let mut s = StoreState::default();
        s.apply(&Record::PoolAdd { ips: vec![ip] });
        s.apply(&Record::Allocate {
            allocation: alloc("a", [10, 0, 0, 9]),
        });
        assert_eq!(s.allocations.len(), 1);
        s.apply(&Record::Release {
            key: key("a"),
            ip,
            cooldown_until: 50,
            dying_veth: Some("vdel1".into()),
        });
        assert!(s.allocations.is_empty());
        assert_eq!(s.cooldown[&ip].dying_veth.as_deref(), Some("vdel1"));
        s.apply(&Record::Cooldown { ip, until: 70 });
        assert_eq!(s.cooldown[&ip].until, 70);
        s.apply(&Record::Allocate {
            allocation: alloc("b", [10, 0, 0, 9]),
        });
        assert!(s.cooldown.is_empty());
        // A stale release for "a" must not free b's address.
        s.apply(&Record::Release {
            key: key("a"),
            ip: [10, 0, 0, 1].into(),
            cooldown_until: 0,
            dying_veth: None,
        });
        assert_eq!(s.allocations[&key("b")].ip, ip);
        s.apply(&Record::PoolRemove {
            ips: vec![[10, 0, 0, 1].into()],
        });
        assert!(s.duplicate_ips().is_empty());
    }
}
