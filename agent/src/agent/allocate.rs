//! Allocation: an ADD takes a free address, or waits for the pool task to grow the pool.

use super::*;

impl Agent {
    pub(super) fn exhausted_reason(&self, st: &Inner) -> Option<String> {
        let now = self.epoch.elapsed();
        if st.subnet_full && st.memory.backoff_until.is_some_and(|u| now < u) {
            return Some(format!(
                "subnet {} has no free addresses (SubnetIsFull); the agent retries in the background",
                self.settings.subnet_id
            ));
        }
        let c = st.ipam.counts();
        let mut cap = st.pool.cap();
        if let Some(at) = st.memory.nic_limit_at {
            cap = cap.min(at);
        }
        // Exhausted only when nothing on its way can serve the allocation: addresses in the
        // in-flight cloud write (pending), cooling down, or being released (they free NIC
        // slots once the cloud confirms) are all worth waiting for.
        if c.total + c.releasing + st.pending >= cap
            && st.pending == 0
            && c.cooldown == 0
            && c.releasing == 0
        {
            return Some(format!(
                "all {cap} addresses this node may hold are allocated (pool.max = {}, NIC limit {} addresses)",
                st.pool.max,
                crate::config::NIC_SECONDARY_LIMIT
                    * crate::config::addresses_per_entry(st.pool.prefix_len)
            ));
        }
        None
    }

    /// Allocates (or returns the existing) address of an attachment; durable before it returns.
    pub async fn allocate(&self, req: AllocateRequest) -> Result<AllocateResponse, AgentError> {
        if !self.is_ready() {
            return Err(AgentError::NotReady("the agent is not ready".into()));
        }
        let started = Instant::now();
        if let Some(dir) = &self.settings.spool_dir {
            // A release of this attachment the plugin spooled while the agent was away comes
            // first: drained after this allocation, it would free the new address.
            let path = dir.join(vnet_api::spool_file_name(&req.key));
            if path.exists() {
                self.apply_spool_file(&path).await.map_err(|e| {
                    AgentError::Internal(format!(
                        "a spooled release of this attachment must be applied first and failed: {e}"
                    ))
                })?;
            }
        }
        let deadline = tokio::time::Instant::now() + self.settings.allocate_timeout;
        let host_veth = vnet_api::host_veth_name(&self.settings.host_veth_prefix, &req.key);
        // Counted in `waiters` while it waits; the guard uncounts it however the wait ends,
        // including when the client goes away and the server drops this future.
        let mut waiting = WaiterGuard {
            agent: self,
            counted: false,
        };
        let mut kicked = false;
        let outcome = loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            enum Step {
                Done(Allocation, Ticket, bool),
                Fail(AgentError),
                Wait,
            }
            let step = {
                let mut st = self.state.lock().unwrap();
                let now = now_secs();
                st.ipam.promote_cooldowns(now);
                let step = match st.ipam.allocate(&req, host_veth.clone(), now) {
                    AllocOutcome::Existing(a) => {
                        Step::Done(a, self.store.submit(Vec::new()), false)
                    }
                    AllocOutcome::New(a, record) => {
                        st.note_arrival();
                        Step::Done(a, self.store.submit(vec![record]), true)
                    }
                    AllocOutcome::Empty => match self.exhausted_reason(&st) {
                        Some(reason) => Step::Fail(AgentError::Exhausted(reason)),
                        None if self.stopping.load(Ordering::SeqCst) => {
                            Step::Fail(AgentError::TryAgainLater(
                                "no free address and the agent is shutting down".into(),
                            ))
                        }
                        None => Step::Wait,
                    },
                };
                waiting.set(&mut st, matches!(step, Step::Wait));
                step
            };
            match step {
                Step::Done(a, ticket, new) => {
                    self.kick.notify_one();
                    break self
                        .submit_timed(ticket)
                        .await
                        .map(|()| (a, new))
                        .map_err(|e| {
                            AgentError::Internal(format!("the allocation could not be stored: {e}"))
                        });
                }
                Step::Fail(e) => break Err(e),
                Step::Wait => {
                    if !kicked {
                        kicked = true;
                        self.kick.notify_one();
                    }
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        let mut st = self.state.lock().unwrap();
                        waiting.set(&mut st, false);
                        let why = st
                            .last_cloud_error
                            .clone()
                            .map_or_else(String::new, |e| format!("; last cloud error: {e}"));
                        break Err(AgentError::TryAgainLater(format!(
                            "no free address within {:?}; the pool is growing{why}",
                            self.settings.allocate_timeout
                        )));
                    }
                }
            }
        };
        self.metrics
            .allocate_latency
            .observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok((allocation, new)) => {
                info!(
                    container_id = %allocation.key.container_id,
                    ifname = %allocation.key.ifname,
                    pod = %pod_label(&allocation),
                    ip = %allocation.ip,
                    repeated = !new,
                    "allocated"
                );
                Ok(AllocateResponse {
                    allocation,
                    gateway: vnet_api::POD_GATEWAY,
                    mtu: self.settings.mtu,
                })
            }
            Err(e) => {
                warn!(container_id = %req.key.container_id, ifname = %req.key.ifname, error = %e, "allocation failed");
                Err(e)
            }
        }
    }
}
