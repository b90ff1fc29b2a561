//! CNI GC: releases the allocations of one network that the runtime no longer lists.
//!
//! CNI 1.1 GC is per network: the runtime calls it for each network with that network's attachments,
//! so an allocation is released only when it was recorded with the network being collected. An
//! allocation recorded before the agent kept networks has none; it may be any network's, so a
//! named GC never releases it. The first GC that lists it as in use claims it for its network
//! (after which it is collected like any other). Unclaimed ones are released by DEL, by the pod
//! watch in a cluster, or by a GC that names no network (a plugin from before networks).

use vnet_api::GcRequest;

use super::*;

impl Agent {
    /// Releases every allocation of `req.network` not in `req.valid_attachments` and made
    /// before `req.allocated_before`.
    pub async fn gc(&self, req: GcRequest) -> Result<GcResponse, AgentError> {
        let valid: HashSet<AttachmentKey> = req.valid_attachments.into_iter().collect();
        let network = req.network;
        let (released, claimed, ticket) = {
            let mut st = self.state.lock().unwrap();
            let now = now_secs();
            let before = req
                .allocated_before
                .unwrap_or_else(|| now.saturating_sub(vnet_api::GC_MIN_AGE_SECS))
                // Made up to now at the latest (the clock has whole seconds).
                .min(now + 1);
            let mut released = Vec::new();
            let mut claimed = 0usize;
            let mut records = Vec::new();
            for a in st.ipam.allocations() {
                if valid.contains(&a.key) {
                    if let Some(n) = &network
                        && let Some(r) = st.ipam.claim_network(&a.key, n)
                    {
                        claimed += 1;
                        records.push(r);
                    }
                    continue;
                }
                if a.network != network || a.allocated_at >= before {
                    continue;
                }
                if let Some((a, r)) =
                    st.ipam
                        .release(&a.key, None, now, self.settings.cooldown_secs)
                {
                    released.push(a);
                    records.extend(r);
                }
            }
            (released, claimed, self.store.submit(records))
        };
        self.submit_timed(ticket)
            .await
            .map_err(|e| AgentError::Internal(format!("the GC could not be stored: {e}")))?;
        if claimed > 0 {
            info!(network = ?network, count = claimed, "allocations recorded without a network claimed by the network that lists them");
        }
        for a in &released {
            info!(container_id = %a.key.container_id, ifname = %a.key.ifname, pod = %pod_label(a), ip = %a.ip, network = ?network, "released by GC");
        }
        self.kick.notify_one();
        Ok(GcResponse { released })
    }
}
