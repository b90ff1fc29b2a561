//! The pool task: sizes the pool (grow, shrink, per-node overrides, demand) and finishes
//! releases from the NIC. It is the only writer to the cloud.

use super::*;

impl Agent {
    /// Pods on their way to this node without an address (e.g. from a Kubernetes pod watch): the
    /// pool grows ahead of them. Replaces the previous value.
    pub fn set_pending_demand(&self, pods: u32) {
        let mut st = self.state.lock().unwrap();
        if st.demand != pods {
            st.demand = pods;
            self.kick.notify_one();
        }
    }

    /// Applies per-node overrides of `warm`, `batch` and `max` (`None`: the configured value) and
    /// returns the settings now in force. A combination the config would reject is refused as a
    /// whole, keeping the settings as they were.
    pub fn set_pool_overrides(
        &self,
        warm: Option<u32>,
        batch: Option<u32>,
        max: Option<u32>,
    ) -> Result<pool::Settings, String> {
        let base = self.settings.pool;
        let wanted = pool::Settings {
            warm: warm.unwrap_or(base.warm),
            batch: batch.unwrap_or(base.batch),
            max: max.unwrap_or(base.max),
            ..base
        };
        crate::config::check_pool_sizes_in(wanted.warm, wanted.batch, wanted.max, base.prefix_len)
            .map_err(|(key, message)| format!("{key}: {message}"))?;
        let mut st = self.state.lock().unwrap();
        if st.pool != wanted {
            info!(
                warm = wanted.warm,
                batch = wanted.batch,
                max = wanted.max,
                "pool settings changed"
            );
            st.pool = wanted;
            // The shrink hysteresis measured against the old settings.
            st.memory.excess_since = None;
            drop(st);
            self.kick.notify_one();
            // Waiters re-check whether the new cap leaves them any hope.
            self.changed.notify_waiters();
        }
        Ok(wanted)
    }

    pub(super) fn pool_counts(st: &Inner) -> pool::Counts {
        let c = st.ipam.counts();
        pool::Counts {
            total: c.total,
            free: c.free,
            cooldown: c.cooldown,
            pending: st.pending,
            waiters: st.waiters,
            releasing: c.releasing,
            demand: st.demand,
        }
    }

    /// The pool task: sizes the pool and reconciles periodically until `shutdown` turns true.
    pub async fn run_pool(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut last_recovery: Option<Instant> = None;
        loop {
            if *shutdown.borrow() {
                break;
            }
            // With a failed store nothing is sized or reconciled (its records could not be
            // kept): the store is re-opened first.
            if self.store_failed() {
                let due = last_recovery.is_none_or(|t| t.elapsed() >= STORE_RECOVER_INTERVAL);
                if !due || {
                    last_recovery = Some(Instant::now());
                    !self.recover_store().await
                } {
                    tokio::select! {
                        _ = tokio::time::sleep(POOL_TICK) => {}
                        _ = shutdown.changed() => {}
                    }
                    continue;
                }
            }
            self.pool_step().await;
            let due = self
                .state
                .lock()
                .unwrap()
                .next_reconcile
                .is_none_or(|t| Instant::now() >= t);
            if due {
                let _ = self.reconcile_with_cloud().await;
            }
            tokio::select! {
                _ = self.kick.notified() => {}
                _ = tokio::time::sleep(POOL_TICK) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// One pool decision and its execution.
    pub async fn pool_step(&self) {
        // A release a crash or an unreadable NIC interrupted is finished first, once its
        // back-off is over.
        let leftover = {
            let st = self.state.lock().unwrap();
            if st.release_retry_at.is_some_and(|t| Instant::now() < t) {
                Vec::new()
            } else {
                st.ipam.releasing()
            }
        };
        if !leftover.is_empty() {
            self.finish_release(leftover).await;
        }
        let mut decision = self.decide();
        if matches!(decision, Decision::Grow(_))
            && (self.waiters_unserved() || self.arrived_within(pool::GATHER.quiet_first))
        {
            // A burst may still be arriving: let it gather, then size the write to all of it.
            // That holds for a top-up too: when a scale-out's first ADDs take the warm
            // addresses, the top-up they trigger would leave with `warm` addresses while the
            // rest of the burst, a moment behind, waits for a second write.
            self.gather().await;
            decision = self.decide();
        }
        if let Decision::Grow(n) = decision {
            let remaining = self.cloud.arm_budget().and_then(|b| b.remaining_writes);
            let mut st = self.state.lock().unwrap();
            let counts = Self::pool_counts(&st);
            let now = self.epoch.elapsed();
            let jitter = rand::random::<f64>();
            if let Some(until) = pool::top_up_gate(&counts, &mut st.memory, remaining, jitter, now)
            {
                info!(
                    count = n,
                    remaining_writes = remaining,
                    retry_in = ?until.saturating_sub(now),
                    "ARM write budget low: the warm-pool top-up yields to nodes with pods waiting"
                );
                return;
            }
            st.pending = n;
        }
        match decision {
            Decision::Grow(n) => self.grow(n).await,
            Decision::Shrink(n) => {
                // After a failed release, the cloud is not asked again before the back-off ends.
                let backing_off = self
                    .state
                    .lock()
                    .unwrap()
                    .release_retry_at
                    .is_some_and(|t| Instant::now() < t);
                if !backing_off {
                    self.shrink(n).await;
                }
            }
            Decision::AtCap | Decision::BackingOff(_) => self.changed.notify_waiters(),
            Decision::Nothing => {}
        }
    }

    /// The pool decision for the current counts (cooldowns that ended are promoted first).
    fn decide(&self) -> Decision {
        let mut st = self.state.lock().unwrap();
        if st.ipam.promote_cooldowns(now_secs()) > 0 {
            self.changed.notify_waiters();
        }
        let counts = Self::pool_counts(&st);
        let now = self.epoch.elapsed();
        let settings = st.pool;
        pool::decide(&counts, &settings, &mut st.memory, now)
    }

    /// An allocation took a new address or started waiting less than `gap` ago.
    fn arrived_within(&self, gap: Duration) -> bool {
        let st = self.state.lock().unwrap();
        st.last_arrival.is_some_and(|t| t.elapsed() < gap)
    }

    /// Allocations are waiting that the free addresses cannot serve.
    fn waiters_unserved(&self) -> bool {
        let st = self.state.lock().unwrap();
        st.waiters > st.ipam.counts().free
    }

    /// Waits while allocations keep arriving (see [`pool::gather_until`]): every new waiter
    /// kicks the pool task, which notes the arrival and extends the window.
    async fn gather(&self) {
        let started = tokio::time::Instant::now();
        let mut arrivals = self.state.lock().unwrap().arrivals;
        let mut last = Duration::ZERO;
        let mut extended = 0u32;
        let window = pool::GATHER.within(self.settings.allocate_timeout);
        while let Some(until) =
            pool::gather_until(&window, Duration::ZERO, last, extended, started.elapsed())
        {
            let _ = tokio::time::timeout_at(started + until, self.kick.notified()).await;
            let seen = self.state.lock().unwrap().arrivals;
            if seen != arrivals {
                arrivals = seen;
                last = started.elapsed();
                extended += 1;
            }
        }
        let waiters = self.state.lock().unwrap().waiters;
        info!(waited = ?started.elapsed(), arrivals = extended, waiters, "demand gathered before the write");
    }

    async fn grow(&self, n: u32) {
        let prefix_len = self.settings.pool.prefix_len;
        // ADDs the free addresses cannot serve: this write is for them, not only a top-up.
        let waiting = {
            let st = self.state.lock().unwrap();
            st.waiters.saturating_sub(st.ipam.counts().free)
        };
        self.cloud.set_waiting_pods(waiting);
        let result = if prefix_len < vnet_cloud::SINGLE_ADDRESS {
            let blocks = n.div_ceil(crate::config::addresses_per_entry(prefix_len));
            info!(count = n, blocks, "asking the cloud for blocks");
            let nic = &self.identity.nic_id;
            self.cloud
                .assign_blocks(nic, &self.settings.subnet_id, blocks as usize, prefix_len)
                .await
        } else {
            info!(count = n, "asking the cloud for addresses");
            self.cloud
                .assign_ips(&self.identity.nic_id, &self.settings.subnet_id, n as usize)
                .await
        };
        let mut reconcile = false;
        let ticket = {
            let mut st = self.state.lock().unwrap();
            st.pending = 0;
            match result {
                Ok(assigned) => {
                    st.subnet_full = false;
                    st.failures = 0;
                    st.memory.backoff_until = None;
                    let records = st.ipam.add_entries(&assigned);
                    info!(count = assigned.len(), "pool grew");
                    (!records.is_empty()).then(|| self.store.submit(records))
                }
                Err(e) => {
                    warn!(error = %e, code = e.code(), "cloud refused new addresses");
                    st.last_cloud_error = Some(e.to_string());
                    st.failures = st.failures.saturating_add(1);
                    let exp = st.failures.saturating_sub(1).min(8);
                    let backoff = match &e {
                        CloudError::SubnetFull { .. } => {
                            st.subnet_full = true;
                            Some(Duration::from_secs((10u64 << exp).min(300)))
                        }
                        CloudError::NicLimitReached { .. } => {
                            let c = st.ipam.counts();
                            // What the NIC holds includes addresses still being released.
                            st.memory.nic_limit_at = Some(c.total + c.releasing);
                            None
                        }
                        _ => Some(Duration::from_secs((1u64 << exp).min(30))),
                    };
                    if let Some(b) = backoff {
                        // Never sooner than the cloud asked; spread so nodes that failed
                        // together do not all come back together.
                        let b = spread(b.max(e.retry_after().unwrap_or_default()));
                        st.memory.backoff_until = Some(self.epoch.elapsed() + b);
                    }
                    // The write may have happened even though we got an error: look.
                    reconcile = true;
                    None
                }
            }
        };
        if let Some(t) = ticket {
            let _ = self.submit_timed(t).await;
        }
        self.changed.notify_waiters();
        if reconcile {
            let _ = self.reconcile_with_cloud().await;
        }
    }

    async fn shrink(&self, n: u32) {
        let (ips, ticket) = {
            let mut st = self.state.lock().unwrap();
            let (ips, record) = st.ipam.take_for_release(n);
            (ips, record.map(|r| self.store.submit(vec![r])))
        };
        if ips.is_empty() {
            return;
        }
        // The intent is durable before the cloud hears of it.
        if let Some(t) = ticket
            && self.submit_timed(t).await.is_err()
        {
            return;
        }
        self.finish_release(ips).await;
    }

    /// Removes releasing addresses from the NIC. A failed call may still have changed the NIC
    /// (the answer can be lost after the write), so an address goes back to the pool only when a
    /// settled read still shows it; one the read no longer shows is released. Without a read the
    /// addresses stay releasing (never handed out, already journaled) and are retried after a
    /// back-off.
    pub(super) async fn finish_release(&self, ips: Vec<Ipv4Addr>) {
        let error = match self.cloud.release_ips(&self.identity.nic_id, &ips).await {
            Ok(()) => {
                let ticket = {
                    let mut st = self.state.lock().unwrap();
                    st.release_failures = 0;
                    st.release_retry_at = None;
                    info!(count = ips.len(), addresses = ?ips, "pool shrank");
                    st.ipam
                        .release_done(&ips)
                        .map(|r| self.store.submit(vec![r]))
                };
                if let Some(t) = ticket {
                    let _ = self.submit_timed(t).await;
                }
                return;
            }
            Err(e) => e,
        };
        warn!(error = %error, addresses = ?ips, "cloud refused to release addresses; reading the NIC to see what it holds");
        let listed = self.cloud.list_secondary_ips(&self.identity.nic_id).await;
        let ticket = {
            let mut st = self.state.lock().unwrap();
            st.last_cloud_error = Some(error.to_string());
            st.release_failures = st.release_failures.saturating_add(1);
            let exp = st.release_failures.saturating_sub(1).min(8);
            let backoff = spread(
                error
                    .retry_after()
                    .unwrap_or_default()
                    .max(Duration::from_secs(
                        (1u64 << exp).min(MAX_RELEASE_BACKOFF_SECS),
                    )),
            );
            st.release_retry_at = Some(Instant::now() + backoff);
            if listed.as_ref().is_ok_and(|l| {
                !l.iter()
                    .flat_map(|s| s.addresses())
                    .any(|a| ips.contains(&a))
            }) {
                // The write happened after all: nothing to retry.
                st.release_failures = 0;
                st.release_retry_at = None;
            }
            match listed {
                Ok(listed) => {
                    let on_nic: HashSet<Ipv4Addr> =
                        listed.iter().flat_map(|s| s.addresses()).collect();
                    let (still, gone): (Vec<Ipv4Addr>, Vec<Ipv4Addr>) =
                        ips.iter().partition(|ip| on_nic.contains(ip));
                    if !still.is_empty() {
                        info!(addresses = ?still, "addresses still on the NIC return to the pool");
                    }
                    if !gone.is_empty() {
                        info!(addresses = ?gone, "addresses gone from the NIC despite the error: released");
                    }
                    let records: Vec<_> = st
                        .ipam
                        .add_to_pool(&still)
                        .into_iter()
                        .chain(st.ipam.release_done(&gone))
                        .collect();
                    (!records.is_empty()).then(|| self.store.submit(records))
                }
                Err(e) => {
                    warn!(error = %e, addresses = ?ips, retry_in = ?backoff, "cannot read the NIC either; the addresses stay releasing");
                    None
                }
            }
        };
        if let Some(t) = ticket {
            let _ = self.submit_timed(t).await;
            self.changed.notify_waiters();
        }
    }
}

/// A back-off stretched by a random 0-50%: never shorter than `d` (which already honours any
/// `Retry-After`), and different on every node.
fn spread(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(1.0..1.5))
}
