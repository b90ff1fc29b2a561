//! Reconcile: aligns the pool with the cloud's view of the NIC.

use super::*;

impl Agent {
    /// Aligns the pool with the cloud's list of the NIC's addresses. A failed read changes
    /// nothing.
    pub async fn reconcile_with_cloud(&self) -> Result<ReconcileReport, CloudError> {
        let listed = match self.cloud.list_secondary_ips(&self.identity.nic_id).await {
            Ok(listed) => listed,
            Err(e) => {
                warn!(error = %e, "cannot read the NIC's addresses; keeping the pool as it is");
                let mut st = self.state.lock().unwrap();
                st.last_cloud_error = Some(e.to_string());
                st.next_reconcile = Some(Instant::now() + FIRST_RECONCILE_REPEAT);
                return Err(e);
            }
        };
        let (report, ticket) = {
            let mut st = self.state.lock().unwrap();
            // A block counts with all its addresses (prefix mode).
            let (report, records) = st.ipam.reconcile_entries(&listed);
            // The first reconcile (start-up) is repeated soon: a cloud write the previous run
            // started just before dying may land after it.
            st.reconciles += 1;
            let delay = if st.reconciles == 1 {
                FIRST_RECONCILE_REPEAT
            } else {
                RECONCILE_INTERVAL
            };
            st.next_reconcile = Some(Instant::now() + delay);
            (report, self.store.submit(records))
        };
        let _ = self.submit_timed(ticket).await;
        if !report.adopted.is_empty() || !report.dropped.is_empty() || !report.recovered.is_empty()
        {
            info!(adopted = ?report.adopted, dropped = ?report.dropped, recovered = ?report.recovered, "pool reconciled with the cloud");
        }
        let lost = |state: &'static str, n: usize| {
            self.metrics
                .addresses_lost
                .get_or_create(&crate::metrics::StateLabels { state })
                .inc_by(n as u64);
        };
        lost("free", report.dropped.len());
        lost("allocated", report.unreconciled.len());
        if !report.unreconciled.is_empty() {
            warn!(addresses = ?report.unreconciled, "allocated addresses the cloud does not show on the NIC: kept, never handed out again");
        }
        self.changed.notify_waiters();
        Ok(report)
    }
}
