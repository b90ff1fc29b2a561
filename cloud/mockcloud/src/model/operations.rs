//! Long-running operations: a NIC PUT's `Azure-AsyncOperation`, polled to its end, expired when
//! nobody polls, rolled back on an injected failure.

use super::*;

#[derive(Debug, Clone, PartialEq)]
pub enum OperationStatus {
    InProgress,
    Succeeded,
    Failed { code: String, message: String },
}

/// A running NIC PUT: what to restore if it fails.
#[derive(Debug)]
pub(super) struct Operation {
    pub(super) nic: String,
    pub(super) polls_left: u32,
    pub(super) failure: Option<Failure>,
    pub(super) previous: Vec<IpConfig>,
    pub(super) previous_doc: Map<String, Value>,
    pub(super) status: OperationStatus,
    pub(super) deadline: Instant,
}

/// How a long-running operation runs: `polls` answers `InProgress` before the end, and the
/// `Retry-After` (seconds) a PUT to the busy NIC is told to wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub polls: u32,
    pub retry_after_secs: u64,
}

impl Timing {
    pub fn new(polls: u32, retry_after_secs: u64) -> Timing {
        Timing {
            polls,
            retry_after_secs,
        }
    }
}

/// How an operation is made to fail (fault injection).
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub code: String,
    pub message: String,
    /// `true`: the NIC goes back to what it was (and shows `Failed`); `false`: the new
    /// ipConfigurations stay, `Failed`, until the next successful PUT.
    pub rollback: bool,
}

impl Cloud {
    /// Finishes operations nobody polled in time (as if they had been polled to the end).
    pub fn expire_operations(&mut self, now: Instant) -> Vec<RouteChange> {
        let expired: Vec<String> = self
            .operations
            .iter()
            .filter(|(_, op)| op.status == OperationStatus::InProgress && op.deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        let mut routes = Vec::new();
        for id in expired {
            routes.extend(self.finish(&id));
        }
        routes
    }

    /// One poll of an operation: `InProgress` until its polls are used up, then its final status.
    /// Finishing returns the route changes the fabric must make before the caller sees `Succeeded`.
    pub fn poll_operation(
        &mut self,
        id: &str,
    ) -> Result<(OperationStatus, Vec<RouteChange>), ArmError> {
        let op = self.operations.get_mut(id).ok_or_else(|| {
            ArmError::new(
                404,
                "OperationNotFound",
                format!("Operation {id} was not found."),
            )
        })?;
        if op.status != OperationStatus::InProgress {
            return Ok((op.status.clone(), Vec::new()));
        }
        if op.polls_left > 0 {
            op.polls_left -= 1;
            return Ok((OperationStatus::InProgress, Vec::new()));
        }
        let routes = self.finish(id);
        Ok((self.operations[id].status.clone(), routes))
    }

    /// A GET of a NIC with a running operation counts as one poll of it: the operation moves on
    /// even when its caller lost the operation URL (as Azure's would, with time).
    pub fn observe_nic(&mut self, name: &str) -> Vec<RouteChange> {
        let Some(id) = self.nic(name).and_then(|n| n.active_operation.clone()) else {
            return Vec::new();
        };
        self.poll_operation(&id)
            .map(|(_, routes)| routes)
            .unwrap_or_default()
    }

    fn finish(&mut self, id: &str) -> Vec<RouteChange> {
        self.version += 1;
        let op = self.operations.get_mut(id).expect("operation exists");
        let nic = self.nics.get_mut(&op.nic).expect("NIC exists");
        let vm_ip = self.topology.vm(&nic.vm).map(|v| v.primary_ip);
        // Entries are keyed by what they hold: an address, or a block's base and length.
        let old: HashSet<(Ipv4Addr, u8)> =
            op.previous.iter().map(|c| (c.ip, c.held_len())).collect();
        // What the fabric delivers already (a Failed entry's address is not delivered).
        let delivered: HashSet<(Ipv4Addr, u8)> = op
            .previous
            .iter()
            .filter(|c| !c.failed && !c.pending)
            .map(|c| (c.ip, c.held_len()))
            .collect();
        let new: HashSet<(Ipv4Addr, u8)> =
            nic.configs.iter().map(|c| (c.ip, c.held_len())).collect();
        let owners = &mut self.owners;
        let mut release = |held: &(Ipv4Addr, u8), routes: &mut Vec<RouteChange>| {
            for ip in block_addresses(held.0, held.1) {
                owners.remove(&ip);
            }
            if delivered.contains(held) {
                routes.push(RouteChange::Delete {
                    ip: held.0,
                    len: held.1,
                });
            }
        };
        let mut routes = Vec::new();
        match op.failure.take() {
            None => {
                for held in old.difference(&new) {
                    release(held, &mut routes);
                }
                for config in nic.configs.iter_mut() {
                    config.pending = false;
                    config.failed = false;
                    if !config.primary
                        && !delivered.contains(&(config.ip, config.held_len()))
                        && let Some(via) = vm_ip
                    {
                        routes.push(RouteChange::Replace {
                            ip: config.ip,
                            len: config.held_len(),
                            via,
                        });
                    }
                }
                nic.provisioning_state = "Succeeded";
                op.status = OperationStatus::Succeeded;
            }
            Some(failure) if failure.rollback => {
                for (ip, len) in new.difference(&old) {
                    for ip in block_addresses(*ip, *len) {
                        self.owners.remove(&ip);
                    }
                }
                nic.configs = std::mem::take(&mut op.previous);
                nic.doc = std::mem::take(&mut op.previous_doc);
                nic.generation += 1;
                nic.provisioning_state = "Failed";
                op.status = OperationStatus::Failed {
                    code: failure.code,
                    message: failure.message,
                };
            }
            Some(failure) => {
                // Released addresses are gone; what the PUT added stays, Failed, holding its
                // address, until a later PUT succeeds.
                for held in old.difference(&new) {
                    release(held, &mut routes);
                }
                for config in nic.configs.iter_mut() {
                    if config.pending {
                        config.pending = false;
                        config.failed = true;
                    }
                }
                nic.generation += 1;
                nic.provisioning_state = "Failed";
                op.status = OperationStatus::Failed {
                    code: failure.code,
                    message: failure.message,
                };
            }
        }
        nic.active_operation = None;
        routes
    }

    /// Drops every ipConfiguration but the primary at once (a reimage resetting the instance to
    /// its scale set's model), finishing a running operation first. Returns the addresses lost
    /// and the routes to delete.
    pub fn reset_to_primary(
        &mut self,
        name: &str,
    ) -> Result<(Vec<String>, Vec<RouteChange>), ArmError> {
        let key = self.nic_key(name).ok_or_else(|| self.nic_not_found(name))?;
        let mut routes = Vec::new();
        if let Some(id) = self.nics[&key].active_operation.clone() {
            routes.extend(self.finish(&id));
        }
        let nic = self.nics.get_mut(&key).expect("NIC exists");
        let (kept, lost): (Vec<IpConfig>, Vec<IpConfig>) = std::mem::take(&mut nic.configs)
            .into_iter()
            .partition(|c| c.primary);
        nic.configs = kept;
        nic.generation += 1;
        nic.provisioning_state = "Succeeded";
        for config in &lost {
            for ip in config.addresses() {
                self.owners.remove(&ip);
            }
            routes.push(RouteChange::Delete {
                ip: config.ip,
                len: config.held_len(),
            });
        }
        self.version += 1;
        Ok((lost.iter().map(|c| c.ip.to_string()).collect(), routes))
    }
}
