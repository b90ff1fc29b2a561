//! One ask for more addresses or blocks: written, waited for (bounded), joined by pods that
//! start waiting while it is unanswered, withdrawn when it fails.

use std::collections::HashSet;

use tracing::warn;
use vnet_cloud::{CloudError, SecondaryIp};

use super::watch::NodeCtx;
use super::{ClusterProvider, Desired, next_request, transient};
use crate::crd::CloudAnswer;

/// An assign in flight: what it will bring, and the generation that carries it now.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ask {
    generation: u64,
    block: bool,
    /// Addresses per entry (1, or a block's 16).
    per_entry: u32,
    /// Entries asked (the caller's count, raised for pods that started waiting since).
    entries: u32,
    /// Waiting pods the ask already covers (the agent sized it with them).
    covered: u32,
    /// Addresses the raises brought beyond the pods they were for (a block's rest).
    room: u32,
}

impl ClusterProvider {
    /// Addresses or blocks: raise the desired count, wait for the answer, return the new ones.
    pub(super) async fn assign(
        &self,
        count: usize,
        prefix_len: u8,
    ) -> Result<Vec<SecondaryIp>, CloudError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let ctx = self.ctx().await?;
        let block = prefix_len < vnet_cloud::SINGLE_ADDRESS;
        let of_kind = |e: &SecondaryIp| e.is_block() == block;
        let before = Self::on_nic(ctx);
        let baseline: HashSet<String> = before.iter().map(|e| e.name.clone()).collect();
        let per_entry = if block {
            1u32 << (vnet_cloud::SINGLE_ADDRESS - prefix_len)
        } else {
            1
        };
        let mut owner = false;
        let generation = self
            .change(ctx, |r, d| {
                // What the NIC holds may exceed the desired count (addresses that arrived after
                // a waiter gave up): count from the larger, so the ask adds `count`.
                let held = held_of_kind(&before, d, of_kind);
                if block {
                    r.blocks = r.blocks.max(held) + count as u32;
                    r.block_prefix_length = Some(prefix_len);
                } else {
                    r.addresses = r.addresses.max(held) + count as u32;
                }
                if d.outstanding.is_none() {
                    owner = true;
                    d.outstanding = Some(Ask {
                        generation: r.generation,
                        block,
                        per_entry,
                        entries: count as u32,
                        covered: d.waiting_pods,
                        room: 0,
                    });
                }
            })
            .await;
        let generation = match generation {
            Ok(g) => g,
            Err(e) => {
                if owner {
                    self.desired.lock().unwrap().outstanding = None;
                }
                return Err(e);
            }
        };
        // What this caller asked in the end: its own count, or the raised ask it owned.
        let (answer, asked) = match self.answer_for_ask(ctx, generation, owner).await {
            (answer, Some(ask)) => (answer, ask.entries as usize),
            (answer, None) => (answer, count),
        };
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                self.withdraw(ctx, asked, block).await;
                return Err(e);
            }
        };
        if let Some(e) = Self::error_of(&answer) {
            self.withdraw(ctx, asked, block).await;
            return Err(e);
        }
        let entries = Self::entries(&answer)?;
        let mut d = self.desired.lock().unwrap();
        let new: Vec<SecondaryIp> = entries
            .iter()
            .filter(|e| of_kind(e) && !baseline.contains(&e.name) && !d.handed.contains(&e.name))
            .take(asked)
            .cloned()
            .collect();
        d.handed.extend(new.iter().map(|e| e.name.clone()));
        // Names of entries gone from the NIC can never be new again.
        let present: HashSet<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        d.handed.retain(|n| present.contains(n.as_str()));
        if new.len() < asked {
            warn!(node = %ctx.name, asked, got = new.len(), "the cluster allocator answered with fewer new entries than asked");
        }
        Ok(new)
    }

    /// Waits for the answer to an ask. Its owner also writes the generations that raise it
    /// (pods that started waiting meanwhile) and waits for the latest.
    /// The owner gets the ask back, taken when the answer was accepted (or the wait ended), so
    /// no raise can slip in between.
    async fn answer_for_ask(
        &self,
        ctx: &NodeCtx,
        generation: u64,
        owner: bool,
    ) -> (Result<CloudAnswer, CloudError>, Option<Ask>) {
        if !owner {
            return (self.answer(ctx, generation).await, None);
        }
        let result = self.owner_wait(ctx, generation).await;
        let ask = self.desired.lock().unwrap().outstanding.take();
        match result {
            Ok((answer, ask)) => (Ok(answer), Some(ask)),
            Err(e) => (Err(e), ask),
        }
    }

    async fn owner_wait(
        &self,
        ctx: &NodeCtx,
        generation: u64,
    ) -> Result<(CloudAnswer, Ask), CloudError> {
        let limit = self.settings.answer_timeout;
        let deadline = tokio::time::Instant::now() + limit;
        let mut rx = ctx.seen.clone();
        loop {
            let raised = self.raised.notified();
            let target = {
                let d = self.desired.lock().unwrap();
                d.outstanding.map_or(generation, |a| a.generation)
            };
            if target > self.desired.lock().unwrap().written {
                self.flush(ctx, target).await?;
            }
            let answered = rx.wait_for(|s| {
                s.answer
                    .as_ref()
                    .is_some_and(|a| a.observed_generation >= target)
            });
            tokio::select! {
                r = answered => {
                    let seen = r.map_err(|_| transient("the NodeIPPool watch stopped"))?.clone();
                    let answer = seen.answer.expect("waited for it");
                    // Raised after this answer's generation: wait for the raise's answer too.
                    let mut d = self.desired.lock().unwrap();
                    match d.outstanding {
                        Some(a) if a.generation > answer.observed_generation => {}
                        Some(a) => {
                            d.outstanding = None;
                            return Ok((answer, a));
                        }
                        None => return Err(transient("the ask was dropped")),
                    }
                }
                _ = raised => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(transient(format!(
                        "no answer from the cluster allocator within {limit:?} (waiting for its answer); is the vnet-cni allocator running?"
                    )));
                }
            }
        }
    }

    /// After a failed or unanswered ask: the desired count goes back to what the NIC holds, so
    /// the allocator does not act for nobody. Best effort: a failed write is corrected by the
    /// next change.
    async fn withdraw(&self, ctx: &NodeCtx, count: usize, block: bool) {
        let on_nic = Self::on_nic(ctx);
        let result = self
            .change(ctx, |r, d| {
                let held = held_of_kind(&on_nic, d, |e| e.is_block() == block);
                let field = if block {
                    &mut r.blocks
                } else {
                    &mut r.addresses
                };
                *field = field.saturating_sub(count as u32).max(held);
            })
            .await;
        if let Err(e) = result {
            warn!(node = %ctx.name, error = %e, "cannot withdraw the cloud request; the next change will");
        }
    }

    /// The agent's hint: pods that start waiting while an ask is still unanswered join it.
    pub(super) fn raise_for_waiting(&self, pods: u32) {
        let mut guard = self.desired.lock().unwrap();
        let d = &mut *guard;
        d.waiting_pods = pods;
        // Pods that start waiting while an ask is still unanswered join it: one NIC write for
        // them instead of a second one after it (a cold start's first top-up leaves before its
        // pods arrive).
        let Some(mut ask) = d.outstanding else {
            return;
        };
        if pods <= ask.covered {
            return;
        }
        let new = pods - ask.covered;
        ask.covered = pods;
        if new <= ask.room {
            ask.room -= new;
            d.outstanding = Some(ask);
            return;
        }
        let need = new - ask.room;
        let extra = need.div_ceil(ask.per_entry);
        ask.room = extra * ask.per_entry - need;
        let request = next_request(d);
        if ask.block {
            request.blocks += extra;
        } else {
            request.addresses += extra;
        }
        request.waiting_pods = pods;
        ask.entries += extra;
        ask.generation = request.generation;
        d.outstanding = Some(ask);
        drop(guard);
        self.raised.notify_one();
    }
}

/// Entries of a kind on the NIC, not counting those being released.
pub(super) fn held_of_kind(
    on_nic: &[SecondaryIp],
    d: &Desired,
    of_kind: impl Fn(&SecondaryIp) -> bool,
) -> u32 {
    on_nic
        .iter()
        .filter(|e| of_kind(e) && !d.releasing.contains(&e.name))
        .count() as u32
}
