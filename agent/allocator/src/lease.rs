//! Leader election with a `coordination.k8s.io/v1` Lease, as client-go's leaderelection does it:
//! the holder renews `renewTime` every `renew_every`; a candidate takes the Lease over only
//! when it has seen the same record unchanged for `lease_duration` by its own clock (so the
//! holders' clocks need not agree); every write carries the `resourceVersion` it read, so two
//! candidates cannot both win (the API server answers the loser 409).
//!
//! The leader may start cloud work only while its last successful renewal is younger than
//! `lease_duration - job_margin`, and its jobs may run only while it is younger than
//! `lease_duration - abort_margin` (the scheduler aborts them then): a leader cut off from the
//! API server has stopped every cloud call before another replica may take over, which is
//! `lease_duration` after that replica saw the last renewal (later than the renewal was sent).
//! On shutdown the scheduler drains its jobs first and only then asks this loop to give the
//! Lease up.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{PostParams, PostParams as PutParams};
use tokio::sync::watch;

/// Leader-election timing and names.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    /// This replica (the pod's name).
    pub holder: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
    /// How long before the lease could expire the leader stops starting jobs.
    pub job_margin: Duration,
    /// How long before the lease could expire the leader's jobs are aborted (smaller than
    /// `job_margin`).
    pub abort_margin: Duration,
}

/// Whether this replica may start cloud work now, and until when its jobs may run.
#[derive(Debug, Default)]
pub struct Leadership {
    /// (start jobs until, abort jobs at), local clock; `None` when not leading.
    until: Mutex<Option<(Instant, Instant)>>,
    /// This replica's leadership began by creating the Lease: no replica led before it, so no
    /// other caller has spent ARM's budget lately.
    created: std::sync::atomic::AtomicBool,
    /// Told on every change (the scheduler wakes at once when leadership ends).
    changed: tokio::sync::Notify,
}

impl Leadership {
    /// Whether jobs may start now.
    pub fn leading(&self) -> bool {
        self.get()
            .is_some_and(|(start_until, _)| Instant::now() < start_until)
    }

    /// Until when the jobs under way may run, when they still may.
    pub fn jobs_until(&self) -> Option<Instant> {
        self.get()
            .map(|(_, abort_at)| abort_at)
            .filter(|abort_at| Instant::now() < *abort_at)
    }

    /// This replica created the Lease (none existed): nobody led before it.
    pub fn created_lease(&self) -> bool {
        self.created.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Resolves when leadership changed (renewed, lost) since the last call.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    fn get(&self) -> Option<(Instant, Instant)> {
        *self.until.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, until: Option<(Instant, Instant)>) {
        *self.until.lock().unwrap_or_else(|p| p.into_inner()) = until;
        self.changed.notify_one();
    }
}

/// What a candidate last saw of the Lease, and when (its own clock).
struct Observed {
    holder: String,
    renew: Option<Timestamp>,
    resource_version: Option<String>,
    at: Instant,
}

/// Runs the election until `shutdown` (the scheduler sends it once its jobs have finished);
/// then, if leading, gives the Lease up so a standby takes over at once.
pub async fn run(
    api: Api<Lease>,
    settings: LeaseSettings,
    leadership: Arc<Leadership>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut observed: Option<Observed> = None;
    let mut was_leading = false;
    loop {
        let started = Instant::now();
        match try_acquire_or_renew(&api, &settings, &mut observed).await {
            Ok(Some(created)) => {
                if !was_leading {
                    leadership
                        .created
                        .store(created, std::sync::atomic::Ordering::Relaxed);
                }
                if !was_leading {
                    tracing::info!(holder = %settings.holder, lease = %settings.name, "became the leader");
                }
                was_leading = true;
                let until = |margin| started + settings.lease_duration.saturating_sub(margin);
                leadership.set(Some((
                    until(settings.job_margin),
                    until(settings.abort_margin),
                )));
            }
            Ok(None) => {
                if was_leading {
                    tracing::warn!(holder = %settings.holder, "lost the lease");
                }
                was_leading = false;
                leadership.set(None);
            }
            Err(error) => {
                // Keep the deadline of the last renewal: it runs out by itself.
                tracing::warn!(%error, lease = %settings.name, "lease request failed");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.renew_every) => {}
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
    leadership.set(None);
    if was_leading {
        release(&api, &settings).await;
    }
}

/// `Some(created)` while this replica holds the Lease (`created`: it created it just now),
/// `None` while another does.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    settings: &LeaseSettings,
    observed: &mut Option<Observed>,
) -> Result<Option<bool>, kube::Error> {
    let now = Timestamp::now();
    let Some(current) = api.get_opt(&settings.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(settings.name.clone()),
                namespace: Some(settings.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(spec(settings, now, now, 0)),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(Some(true)),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
            Err(e) => Err(e),
        };
    };
    let old = current.spec.clone().unwrap_or_default();
    let holder = old.holder_identity.clone().unwrap_or_default();
    let renew = old.renew_time.as_ref().map(|t| t.0);
    let resource_version = current.metadata.resource_version.clone();
    // The record changed (renewed, or a new holder): the expiry clock restarts now.
    let changed = observed.as_ref().is_none_or(|o| {
        o.holder != holder || o.renew != renew || o.resource_version != resource_version
    });
    if changed {
        *observed = Some(Observed {
            holder: holder.clone(),
            renew,
            resource_version: resource_version.clone(),
            at: Instant::now(),
        });
    }
    let duration = old
        .lease_duration_seconds
        .map(|s| Duration::from_secs(s.max(1) as u64))
        .unwrap_or(settings.lease_duration);
    let mine = holder == settings.holder;
    let expired = holder.is_empty()
        || observed
            .as_ref()
            .is_some_and(|o| o.at.elapsed() >= duration && !changed);
    if !mine && !expired {
        return Ok(None);
    }
    let (acquired, transitions) = if mine {
        (
            old.acquire_time.map(|t| t.0).unwrap_or(now),
            old.lease_transitions.unwrap_or(0),
        )
    } else {
        tracing::info!(previous = %holder, holder = %settings.holder, "taking over the lease");
        (now, old.lease_transitions.unwrap_or(0) + 1)
    };
    let mut next = current;
    next.spec = Some(spec(settings, acquired, now, transitions));
    match api
        .replace(&settings.name, &PutParams::default(), &next)
        .await
    {
        Ok(_) => Ok(Some(false)),
        // Someone else wrote it since we read it: not ours this round.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
        Err(e) => Err(e),
    }
}

fn spec(
    settings: &LeaseSettings,
    acquired: Timestamp,
    renewed: Timestamp,
    transitions: i32,
) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(settings.holder.clone()),
        lease_duration_seconds: Some(settings.lease_duration.as_secs().max(1) as i32),
        acquire_time: Some(MicroTime(acquired)),
        renew_time: Some(MicroTime(renewed)),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    }
}

/// Gives the Lease up (holder cleared), so a standby need not wait for it to expire.
async fn release(api: &Api<Lease>, settings: &LeaseSettings) {
    let Ok(Some(mut current)) = api.get_opt(&settings.name).await else {
        return;
    };
    let spec = current.spec.get_or_insert_with(LeaseSpec::default);
    if spec.holder_identity.as_deref() != Some(settings.holder.as_str()) {
        return;
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    match api
        .replace(&settings.name, &PutParams::default(), &current)
        .await
    {
        Ok(_) => tracing::info!(lease = %settings.name, "released the lease"),
        Err(error) => tracing::warn!(%error, "cannot release the lease"),
    }
}
