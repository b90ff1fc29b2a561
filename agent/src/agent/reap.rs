//! Reaping: deletes dying (tombstone) veths; their address starts its cooldown once the link is gone.

use super::*;

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
                        let _ = self.reaper_tx.send((None, name.clone()));
                    } else {
                        tracing::debug!(link = name, "not a tombstone name; left alone");
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot list leftover tombstone veths"),
        }
        for (ip, veth) in dying {
            let _ = self.reaper_tx.send((Some(ip), veth));
        }
    }

    /// Deletes dying veths; their address starts its cooldown once the link is gone.
    pub async fn run_reaper(self: Arc<Self>, links: Arc<dyn LinkOps>) {
        let Some(mut rx) = self.reaper_rx.lock().unwrap().take() else {
            return;
        };
        while let Some((ip, veth)) = rx.recv().await {
            match links.delete_link(&veth).await {
                Ok(()) => {
                    tracing::debug!(veth, "dying veth deleted");
                    if let Some(ip) = ip {
                        let ticket = {
                            let mut st = self.state.lock().unwrap();
                            st.ipam
                                .veth_gone(ip, now_secs(), self.settings.cooldown_secs)
                                .map(|r| self.store.submit(vec![r]))
                        };
                        if let Some(t) = ticket {
                            let _ = self.submit_timed(t).await;
                        }
                        self.kick.notify_one();
                    }
                }
                Err(e) => {
                    warn!(veth, error = %e, "cannot delete dying veth; retrying");
                    let tx = self.reaper_tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(REAP_RETRY).await;
                        let _ = tx.send((ip, veth));
                    });
                }
            }
        }
    }
}
