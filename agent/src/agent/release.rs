//! Release: a DEL frees an attachment's address (durable first), and the spooled releases the
//! plugin wrote while the agent was away are applied.

use super::*;

/// The longest a release waits for its dying veth's deletion before it answers without it (the
/// plugin then deletes the link itself). Far above the ~20-60 ms a batch takes.
const DELETE_WAIT: Duration = Duration::from_secs(1);

impl Agent {
    /// Releases an attachment's address; durable before it returns. Also used by the spool drain
    /// before the agent is ready.
    pub async fn release(&self, req: ReleaseRequest) -> Result<ReleaseResponse, AgentError> {
        if let Some(veth) = &req.dying_veth {
            validate_dying_veth(veth)?;
        }
        let (released, ticket) = {
            let mut st = self.state.lock().unwrap();
            match st.ipam.release(
                &req.key,
                req.dying_veth.clone(),
                now_secs(),
                self.settings.cooldown_secs,
            ) {
                Some((allocation, records)) => (Some(allocation), self.store.submit(records)),
                // Wait for anything queued before (e.g. the same release, in flight).
                None => (None, self.store.submit(Vec::new())),
            }
        };
        // The veth is deleted while the release is written (the DEL waits for both). Deleting
        // before the release is durable is safe: a crash in between leaves the allocation, and
        // the plugin, without an answer, spools the release. The reaper gets the veth even when
        // the write fails: memory already holds the address back until the link is gone, and
        // nobody else would ever delete it (the store stops the agent from allocating until a
        // restart, whose sweep finds the tombstone again).
        let deleted = req.dying_veth.map(|veth| {
            let (done, gone) = tokio::sync::oneshot::channel();
            let _ = self.reaper_tx.send(ReapJob {
                ip: released.as_ref().map(|a| a.ip),
                veth,
                done: Some(done),
            });
            gone
        });
        let stored = self.submit_timed(ticket).await;
        stored
            .map_err(|e| AgentError::Internal(format!("the release could not be stored: {e}")))?;
        let dying_veth_deleted = match deleted {
            // Bounded: without a running reaper (or a kernel that hangs) the plugin deletes it.
            Some(gone) => tokio::time::timeout(DELETE_WAIT, gone)
                .await
                .is_ok_and(|r| r.unwrap_or(false)),
            None => false,
        };
        match &released {
            Some(a) => info!(
                container_id = %a.key.container_id,
                ifname = %a.key.ifname,
                pod = %pod_label(a),
                ip = %a.ip,
                "released"
            ),
            None => {
                info!(container_id = %req.key.container_id, ifname = %req.key.ifname, "release of an unknown attachment (already released)")
            }
        }
        self.kick.notify_one();
        Ok(ReleaseResponse {
            released,
            dying_veth_deleted,
        })
    }

    /// Applies the spooled release in `path`, if the file is still there, and deletes the file
    /// once the release is durable. `Ok(true)` when a release was applied. A file that is not a
    /// valid release is set aside as `.invalid`; on any other error the file stays for the next
    /// drain.
    pub async fn apply_spool_file(&self, path: &Path) -> Result<bool, AgentError> {
        let _serialized = self.spool_lock.lock().await;
        let request = match crate::spool::read_file(path) {
            Ok(Some(request)) => request,
            Ok(None) => return Ok(false),
            Err(e) => {
                return Err(AgentError::Internal(format!(
                    "cannot read spooled release {}: {e}",
                    path.display()
                )));
            }
        };
        match self.release(request).await {
            Ok(_) => {
                crate::spool::remove(path);
                Ok(true)
            }
            Err(AgentError::BadRequest(message)) => {
                warn!(file = %path.display(), message, "spooled release is invalid; set aside");
                crate::spool::set_aside(path);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}
