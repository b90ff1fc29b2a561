//! Reaping: deletes dying (tombstone) veths; their address starts its cooldown once the link is
//! gone. A DEL waits for its veth (the pod's end goes with it): the reaper takes every job queued
//! at that moment and deletes them with one netlink request ([`LinkOps::delete_links`]), so
//! concurrent DELs share the kernel's grace periods instead of queueing behind each other.

use super::*;
use crate::netlink::REAP_SLOTS;

/// Most links deleted in one request: bounds one request's work and the latency of the first.
const REAP_BATCH_MAX: usize = 128;

/// A dying veth to delete, and the address that waits for it (none for a leftover).
pub(crate) struct ReapJob {
    pub ip: Option<Ipv4Addr>,
    pub veth: String,
    /// A DEL waiting for the answer: told whether the link is gone.
    pub done: Option<tokio::sync::oneshot::Sender<bool>>,
}

impl ReapJob {
    pub fn background(ip: Option<Ipv4Addr>, veth: String) -> ReapJob {
        ReapJob {
            ip,
            veth,
            done: None,
        }
    }
}

impl Agent {
    /// Hands every known dying veth to the reaper and deletes leftover tombstones (start-up).
    /// Only names [`vnet_api::is_tombstone_name`] accepts are deleted: another link that merely
    /// starts with the prefix is not ours.
    pub async fn sweep_tombstones(&self, links: &dyn LinkOps) {
        let dying = self.state.lock().unwrap().ipam.dying();
        let known: HashSet<&str> = dying.iter().map(|(_, v)| v.as_str()).collect();
        match links.links_with_prefix(TOMBSTONE_PREFIX).await {
            Ok(names) => {
                for name in names.iter().filter(|n| !known.contains(n.as_str())) {
                    if vnet_api::is_tombstone_name(name) {
                        let _ = self.reaper_tx.send(ReapJob::background(None, name.clone()));
                    } else {
                        tracing::debug!(link = name, "not a tombstone name; left alone");
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot list leftover tombstone veths"),
        }
        for (ip, veth) in dying {
            let _ = self.reaper_tx.send(ReapJob::background(Some(ip), veth));
        }
    }

    /// Deletes dying veths, in batches of whatever is queued, up to [`REAP_SLOTS`] batches in
    /// the kernel at once; their address starts its cooldown once the link is gone. A failed
    /// deletion is retried in the background.
    pub async fn run_reaper(self: Arc<Self>, links: Arc<dyn LinkOps>) {
        let Some(mut rx) = self.reaper_rx.lock().unwrap().take() else {
            return;
        };
        let slots = Arc::new(tokio::sync::Semaphore::new(REAP_SLOTS));
        while let Some(first) = rx.recv().await {
            // While every slot is busy, jobs queue up and the next batch takes them all.
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < REAP_BATCH_MAX {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            let (agent, links) = (self.clone(), links.clone());
            tokio::spawn(async move {
                agent.reap_batch(links.as_ref(), batch).await;
                drop(slot);
            });
        }
    }

    async fn reap_batch(self: &Arc<Self>, links: &dyn LinkOps, batch: Vec<ReapJob>) {
        let mut names: Vec<String> = batch.iter().map(|j| j.veth.clone()).collect();
        names.sort();
        names.dedup();
        let results = links.delete_links(&names).await;
        let failed: HashSet<&str> = names
            .iter()
            .zip(&results)
            .filter_map(|(name, r)| r.as_ref().err().map(|e| (name, e)))
            .map(|(name, e)| {
                warn!(veth = name, error = %e, "cannot delete dying veth; retrying");
                name.as_str()
            })
            .collect();
        tracing::debug!(
            links = names.len(),
            failed = failed.len(),
            "dying veths deleted"
        );
        let mut records = Vec::new();
        for job in batch {
            let gone = !failed.contains(job.veth.as_str());
            if let Some(done) = job.done {
                let _ = done.send(gone);
            }
            if !gone {
                let tx = self.reaper_tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(REAP_RETRY).await;
                    let _ = tx.send(ReapJob::background(job.ip, job.veth));
                });
            } else if let Some(ip) = job.ip {
                let mut st = self.state.lock().unwrap();
                records.extend(
                    st.ipam
                        .veth_gone(ip, now_secs(), self.settings.cooldown_secs),
                );
            }
        }
        if !records.is_empty() {
            let ticket = self.store.submit(records);
            let _ = self.submit_timed(ticket).await;
            self.kick.notify_one();
        }
    }
}
