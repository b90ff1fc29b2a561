//! [`AzureProvider::reconcile_nic`]: one NIC brought to a desired count of our entries in one
//! write, for the cluster allocator (the only ARM caller of a cluster in cluster mode).
//!
//! It spends fewer reads per write than the agent's path, because a cluster's write rate is
//! bounded by ARM's read bucket too (25/s against 10 writes/s): the NIC as read after the last
//! write is kept and the next write starts from it (`If-Match` catches a change since: 412, then
//! a fresh read), and the write is followed by reading the NIC itself until it leaves
//! `Updating` (that read is also the answer) instead of polling the operation and then reading
//! the NIC. The operation is read only when the NIC shows the write did not take.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;

use super::client::{ArmCalls, ArmRemaining, Reply, Target, error_from_reply};
use super::{Add, AzureProvider, Inner, NETWORK_API_VERSION, Releases, config_network, vmss};
use super::{complete_secondary_ips, edited, is_failed, unique_name};
use crate::{CloudError, IP_CONFIG_PREFIX, SINGLE_ADDRESS, SecondaryIp};

/// The NIC one node's agent asked for: how many single-address and block entries of ours it
/// should hold once done, and which of its entries to give back (already excluded from the
/// counts).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NicDesired {
    pub subnet_id: String,
    pub addresses: u32,
    pub blocks: u32,
    /// Length of new blocks (Azure: 28).
    pub prefix_len: u8,
    /// The names of the ipConfigurations of ours to remove (ARM's names, case-insensitive). A
    /// name, not an address: Azure hands a released address out again, so an address may by
    /// now be a new entry's; a name absent from the NIC removes nothing.
    pub release: Vec<String>,
}

/// What the NIC holds after [`AzureProvider::reconcile_nic`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicReconciled {
    /// Every entry of ours on the NIC now.
    pub ours: Vec<SecondaryIp>,
    /// Whether a NIC write was made (nothing to do: no write).
    pub wrote: bool,
    /// The additions failed for good (full subnet, NIC limit) while the releases were written:
    /// `ours` is the NIC after the releases.
    pub add_error: Option<CloudError>,
}

impl AzureProvider {
    /// Brings the NIC's entries of ours to `want` in one write: removes the entries named in
    /// `release` (matched in the NIC document the write edits) and adds what is missing to
    /// reach the counts. Nothing not named in `release` is removed, nothing without
    /// [`IP_CONFIG_PREFIX`] is touched.
    /// Throttling (429) is returned at once, not waited out: the caller paces the cluster.
    pub async fn reconcile_nic(
        &self,
        nic_id: &str,
        want: &NicDesired,
    ) -> Result<NicReconciled, CloudError> {
        if want.blocks > 0 && vmss::instance_of_nic(nic_id).is_some() {
            return Err(CloudError::Fatal(format!(
                "prefix mode is not available on a Uniform scale-set instance ({nic_id}): Compute's instance update has no privateIPAddressPrefixLength (docs/cloud.md); use address mode"
            )));
        }
        let inner = &self.inner;
        let writer = inner.writer(&vmss::write_key(nic_id));
        let _guard = writer.write_lock.clone().lock_owned().await;
        let release = Releases::Names(
            want.release
                .iter()
                .map(|n| n.to_ascii_lowercase())
                .collect(),
        );
        match inner.reconcile_locked(nic_id, want, &release).await {
            Err(error) if !error.is_retryable() && !release.is_empty() => {
                // A full subnet or NIC must not hold back the releases.
                tracing::info!(nic_id, %error, "additions failed; writing the releases alone");
                let only_release = NicDesired {
                    addresses: 0,
                    blocks: 0,
                    ..want.clone()
                };
                let mut done = inner
                    .reconcile_locked(nic_id, &only_release, &release)
                    .await?;
                done.add_error = Some(error);
                Ok(done)
            }
            other => other,
        }
    }

    /// Drops what [`AzureProvider::reconcile_nic`] remembers of the NIC (its next call reads it).
    pub fn forget_nic(&self, nic_id: &str) {
        self.inner.forget_nic(nic_id);
    }

    /// Drops every remembered NIC (an allocator that stopped leading: another may have written
    /// them since).
    pub fn forget_nics(&self) {
        self.inner
            .nics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Every ARM request this provider sent so far, by kind, and the 429s among them.
    pub fn arm_calls(&self) -> ArmCalls {
        self.inner.client.calls()
    }

    /// ARM's last reported remaining reads and writes (`x-ms-ratelimit-remaining-*`), each with
    /// how long ago: the bucket has refilled since.
    pub fn arm_remaining(&self) -> ArmRemaining {
        self.inner.client.budget_age()
    }

    /// Until when ARM's last 429 asked the principal to wait.
    pub fn throttled_until(&self) -> Option<Instant> {
        self.inner.client.throttled_until()
    }
}

impl Inner {
    pub(super) fn forget_nic(&self, nic_id: &str) {
        self.nics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&nic_id.to_ascii_lowercase());
    }

    pub(super) fn remember_nic(&self, nic_id: &str, nic: Value, etag: String) {
        self.nics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(nic_id.to_ascii_lowercase(), (nic, etag));
    }

    fn remembered_nic(&self, nic_id: &str) -> Option<(Value, String)> {
        self.nics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&nic_id.to_ascii_lowercase())
    }

    async fn reconcile_locked(
        &self,
        nic_id: &str,
        want: &NicDesired,
        release: &Releases,
    ) -> Result<NicReconciled, CloudError> {
        let policy = &self.client.config.retry;
        let url = self.arm_url(nic_id, NETWORK_API_VERSION);
        let mut remembered = self.remembered_nic(nic_id);
        let mut attempt = 0;
        let mut last_error: Option<CloudError> = None;
        loop {
            let (nic, etag) = match remembered.take() {
                Some(known) => known,
                None => self.settled_nic(nic_id).await?,
            };
            // What to add follows from the NIC as read, every round: a write whose outcome was
            // lost (a timeout, a 5xx) and took effect shows in the next read, so it is never
            // made twice; a write refused (412) adds nothing to count. The released names are
            // matched in the same read, which the write edits under `If-Match`.
            let addresses = &release.in_nic(&nic);
            let adds = &additions(&nic, want, addresses);
            let failed = is_failed(&nic);
            let body = match edited(&nic, adds, addresses) {
                Some(body) => body,
                None if failed => nic.clone(),
                None => {
                    let ours = complete_secondary_ips(&nic)?;
                    self.remember_nic(nic_id, nic, etag);
                    return Ok(NicReconciled {
                        ours,
                        wrote: attempt > 0,
                        add_error: None,
                    });
                }
            };
            if vmss::instance_of_nic(nic_id).is_some() {
                // A Uniform instance's NIC is written through the instance: the agent's path.
                let nic = self.update_nic(nic_id, adds, release).await?;
                return Ok(NicReconciled {
                    ours: complete_secondary_ips(&nic)?,
                    wrote: true,
                    add_error: None,
                });
            }
            attempt += 1;
            if attempt > policy.max_write_attempts {
                let last = last_error.map(|e| e.to_string()).unwrap_or_default();
                return Err(CloudError::Transient(format!(
                    "NIC {nic_id}: giving up after {} write attempts; last error: {last}",
                    policy.max_write_attempts
                )));
            }
            let subnet_id = (!adds.is_empty()).then_some(want.subnet_id.as_str());
            let if_match = (!etag.is_empty()).then_some(etag.as_str());
            let error = match self
                .client
                .send(Target::Arm, Method::PUT, &url, Some(&body), if_match)
                .await
            {
                Ok(reply) if reply.status.is_success() => {
                    let (after, etag) = self.settled_after(&url, nic_id, &reply).await?;
                    if !is_failed(&after) && edited(&after, adds, addresses).is_none() {
                        let ours = complete_secondary_ips(&after)?;
                        self.remember_nic(nic_id, after, etag);
                        return Ok(NicReconciled {
                            ours,
                            wrote: true,
                            add_error: None,
                        });
                    }
                    // The write did not take: the operation says why.
                    match self.follow_operation(&reply, subnet_id).await {
                        Ok(()) => {
                            remembered = Some((after, etag));
                            continue;
                        }
                        Err(error) => error,
                    }
                }
                Ok(reply) if reply.status.as_u16() == 412 => {
                    tracing::debug!(nic_id, attempt, "etag changed; re-reading");
                    last_error = Some(CloudError::Transient(
                        "412 Precondition Failed (etag changed)".into(),
                    ));
                    continue;
                }
                Ok(reply) => error_from_reply(&reply, subnet_id),
                Err(error) => error,
            };
            if matches!(error, CloudError::Throttled { .. }) {
                return Err(error);
            }
            let Some(delay) = self.client.delay_before_retry(&error, attempt) else {
                return Err(error);
            };
            tracing::info!(nic_id, attempt, ?delay, %error, "NIC write failed; retrying");
            last_error = Some(error);
            self.client.sleep(delay).await;
        }
    }

    /// The NIC after an accepted PUT, read until it leaves `Updating` (waiting as the PUT's
    /// `Retry-After` says), and its etag.
    async fn settled_after(
        &self,
        url: &str,
        nic_id: &str,
        put: &Reply,
    ) -> Result<(Value, String), CloudError> {
        let policy = &self.client.config.retry;
        let state = |v: &Value| {
            v["properties"]["provisioningState"]
                .as_str()
                .unwrap_or("Succeeded")
                .to_string()
        };
        let etag_of = |reply: &Reply| {
            reply.body["etag"]
                .as_str()
                .map(str::to_string)
                .or_else(|| reply.header("etag"))
                .unwrap_or_default()
        };
        let asynchronous = put.header("azure-asyncoperation").is_some();
        if !asynchronous && state(&put.body) != "Updating" && put.body.is_object() {
            return Ok((put.body.clone(), etag_of(put)));
        }
        let step = put.retry_after().unwrap_or(policy.default_poll_interval);
        let mut waited = Duration::ZERO;
        loop {
            if waited > policy.operation_timeout {
                return Err(CloudError::Transient(format!(
                    "{nic_id} still Updating after {waited:?}"
                )));
            }
            super::client::note_settle_planned(step);
            self.client.sleep(step).await;
            waited += step;
            let reply = self.client.get(Target::Arm, url).await?;
            if state(&reply.body) != "Updating" {
                let etag = etag_of(&reply);
                return Ok((reply.body, etag));
            }
        }
    }
}

/// The entries to add so the NIC holds `want`'s counts once the releases are gone.
fn additions(nic: &Value, want: &NicDesired, release: &HashSet<Ipv4Addr>) -> Vec<Add> {
    let configs = nic["properties"]["ipConfigurations"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let (mut singles, mut blocks) = (0u32, 0u32);
    for c in &configs {
        let ours = c["name"]
            .as_str()
            .is_some_and(|n| n.starts_with(IP_CONFIG_PREFIX));
        let Some((base, len)) = config_network(c).filter(|_| ours) else {
            continue;
        };
        let kept = ipnetwork::Ipv4Network::new(base, len)
            .map(|net| !net.iter().all(|a| release.contains(&a)))
            .unwrap_or(true);
        match (kept, len == SINGLE_ADDRESS) {
            (true, true) => singles += 1,
            (true, false) => blocks += 1,
            (false, _) => {}
        }
    }
    let new = |count: u32, prefix_len: Option<u8>| {
        (0..count).map(move |_| Add {
            name: unique_name(),
            subnet_id: want.subnet_id.clone(),
            prefix_len,
        })
    };
    new(want.addresses.saturating_sub(singles), None)
        .chain(new(
            want.blocks.saturating_sub(blocks),
            Some(want.prefix_len),
        ))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn released_names_are_matched_in_the_nic_as_read_and_only_ours() {
        let nic = json!({"properties": {"ipConfigurations": [
            {"name": "ipconfig1", "properties": {"primary": true, "privateIPAddress": "10.0.0.4"}},
            {"name": "someone-else", "properties": {"privateIPAddress": "10.0.0.9"}},
            {"name": "vnet-cni-a", "properties": {"privateIPAddress": "10.0.0.5"}},
            {"name": "vnet-cni-c", "properties": {"privateIPAddress": "10.0.0.16/28", "privateIPAddressPrefixLength": 28}},
        ]}});
        let names =
            |list: &[&str]| Releases::Names(list.iter().map(|n| n.to_ascii_lowercase()).collect());
        // A block's name gives all its addresses (it goes whole); the primary and entries not
        // ours are never released, named or not; a name not on the NIC releases nothing.
        let addresses =
            names(&["VNET-CNI-C", "ipconfig1", "someone-else", "vnet-cni-gone"]).in_nic(&nic);
        let block: HashSet<Ipv4Addr> = (16..32).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        assert_eq!(addresses, block);
        let body = edited(&nic, &[], &addresses).unwrap();
        let left: Vec<&str> = body["properties"]["ipConfigurations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(left, ["ipconfig1", "someone-else", "vnet-cni-a"]);
        assert!(names(&["vnet-cni-gone"]).in_nic(&nic).is_empty());
    }

    #[test]
    fn additions_count_what_stays_and_never_part_of_a_block() {
        let nic = json!({"properties": {"ipConfigurations": [
            {"name": "ipconfig1", "properties": {"primary": true, "privateIPAddress": "10.0.0.4"}},
            {"name": "someone-else", "properties": {"privateIPAddress": "10.0.0.9"}},
            {"name": "vnet-cni-a", "properties": {"privateIPAddress": "10.0.0.5"}},
            {"name": "vnet-cni-b", "properties": {"privateIPAddress": "10.0.0.6"}},
            {"name": "vnet-cni-c", "properties": {"privateIPAddress": "10.0.0.16/28", "privateIPAddressPrefixLength": 28}},
        ]}});
        let want = NicDesired {
            subnet_id: "/s".into(),
            addresses: 3,
            blocks: 2,
            prefix_len: 28,
            release: vec![],
        };
        // vnet-cni-b released, one address of the block named: the block stays.
        let release: HashSet<Ipv4Addr> =
            ["10.0.0.6".parse().unwrap(), "10.0.0.16".parse().unwrap()].into();
        let adds = additions(&nic, &want, &release);
        let singles = adds.iter().filter(|a| a.prefix_len.is_none()).count();
        let blocks = adds.iter().filter(|a| a.prefix_len == Some(28)).count();
        assert_eq!((singles, blocks), (2, 1));
        // More than asked already there: nothing added, and nothing removed for it.
        let fewer = NicDesired {
            addresses: 0,
            blocks: 0,
            ..want
        };
        assert!(additions(&nic, &fewer, &HashSet::new()).is_empty());
        assert!(edited(&nic, &[], &HashSet::new()).is_none());
    }
}
