//! CNI GC: releases the allocations the runtime no longer lists.

use super::*;

impl Agent {
    /// Releases every allocation not in `valid`.
    pub async fn gc(&self, valid: Vec<AttachmentKey>) -> Result<GcResponse, AgentError> {
        let valid: HashSet<AttachmentKey> = valid.into_iter().collect();
        let (released, ticket) = {
            let mut st = self.state.lock().unwrap();
            let now = now_secs();
            let mut released = Vec::new();
            let mut records = Vec::new();
            for key in st.ipam.keys() {
                if valid.contains(&key) {
                    continue;
                }
                if let Some((a, r)) = st
                    .ipam
                    .release(&key, None, now, self.settings.cooldown_secs)
                {
                    released.push(a);
                    records.extend(r);
                }
            }
            (released, self.store.submit(records))
        };
        self.submit_timed(ticket)
            .await
            .map_err(|e| AgentError::Internal(format!("the GC could not be stored: {e}")))?;
        for a in &released {
            info!(container_id = %a.key.container_id, ifname = %a.key.ifname, pod = %pod_label(a), ip = %a.ip, "released by GC");
        }
        self.kick.notify_one();
        Ok(GcResponse { released })
    }
}
