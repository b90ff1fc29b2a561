//! One job: bring one node's NIC to its `cloudRequest` and answer in `status.cloud`.

use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};
use vnet_cloud::azure::{AzureProvider, NicDesired};
use vnet_cloud::{AZURE_PREFIX_LENGTH, CloudError, InstanceMetadata, NodeIdentity};
use vnet_kube::crd::{
    CloudAnswer, CloudErrorRef, CloudRequest, IdentityRef, NodeIPPool, SecondaryIpRef,
};

/// How a job ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Answered for `generation`: done, or failed with `error`.
    Answered {
        generation: u64,
        error: Option<CloudError>,
        wrote: bool,
    },
    /// Throttled by ARM before anything was answered: tried again after its `Retry-After`.
    Throttled,
    /// The cloud work may be done but the answer could not be written: tried again (the NIC
    /// is then already as asked, so the retry costs no write).
    Unanswered { reason: String, wrote: bool },
}

/// The node's identity the job used (kept by the scheduler so the next job skips the resolve).
pub(crate) struct Done {
    pub outcome: Outcome,
    pub identity: Option<NodeIdentity>,
}

pub(crate) async fn run(
    pools: Api<NodeIPPool>,
    cloud: std::sync::Arc<AzureProvider>,
    name: String,
    request: CloudRequest,
    known: Option<NodeIdentity>,
    request_timeout: Duration,
) -> Done {
    let generation = request.generation;
    let identity = match identity(&cloud, &request, known).await {
        Ok(identity) => identity,
        Err(error) => {
            return answer(&pools, &name, generation, None, Err(error), request_timeout).await;
        }
    };
    let result = reconcile(&cloud, &identity, &request).await;
    answer(
        &pools,
        &name,
        generation,
        Some(identity),
        result,
        request_timeout,
    )
    .await
}

/// The node as ARM knows it: from the previous job, else resolved from the request's IMDS facts.
/// A known identity of another VM (the node was replaced under the same name) is not used.
async fn identity(
    cloud: &AzureProvider,
    request: &CloudRequest,
    known: Option<NodeIdentity>,
) -> Result<NodeIdentity, CloudError> {
    if request.instance.vm_id.is_empty() {
        return Err(CloudError::Fatal(
            "cloudRequest.instance.vmId is empty: the allocator cannot find the node's VM".into(),
        ));
    }
    if let Some(identity) = known.filter(|i| i.vm_id.eq_ignore_ascii_case(&request.instance.vm_id))
    {
        return Ok(identity);
    }
    cloud
        .resolve(&InstanceMetadata::from(&request.instance))
        .await
}

/// What the request's answer says: the NIC's entries of ours, whether a write was made.
struct Reconciled {
    ours: Vec<SecondaryIpRef>,
    wrote: bool,
    add_error: Option<CloudError>,
}

async fn reconcile(
    cloud: &AzureProvider,
    identity: &NodeIdentity,
    request: &CloudRequest,
) -> Result<Reconciled, CloudError> {
    let release = request
        .release
        .iter()
        .map(|a| {
            a.parse::<Ipv4Addr>().map_err(|_| {
                CloudError::Fatal(format!(
                    "cloudRequest.release: {a:?} is not an IPv4 address"
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let prefix_len = request.block_prefix_length.unwrap_or(AZURE_PREFIX_LENGTH);
    if request.blocks > 0 && !(1..32).contains(&prefix_len) {
        return Err(CloudError::Fatal(format!(
            "cloudRequest.blockPrefixLength {prefix_len} is not a block length"
        )));
    }
    let want = NicDesired {
        subnet_id: identity.subnet_id.clone(),
        addresses: request.addresses,
        blocks: request.blocks,
        prefix_len,
        release,
    };
    let done = cloud.reconcile_nic(&identity.nic_id, &want).await?;
    Ok(Reconciled {
        ours: done.ours.iter().map(SecondaryIpRef::from).collect(),
        wrote: done.wrote,
        add_error: done.add_error,
    })
}

/// Writes `status.cloud` (a merge patch of that field only) for `generation`.
async fn answer(
    pools: &Api<NodeIPPool>,
    name: &str,
    generation: u64,
    identity: Option<NodeIdentity>,
    result: Result<Reconciled, CloudError>,
    request_timeout: Duration,
) -> Done {
    let (ours, wrote, error) = match result {
        Ok(done) => (Some(done.ours), done.wrote, done.add_error),
        Err(CloudError::Throttled { .. }) => {
            return Done {
                outcome: Outcome::Throttled,
                identity,
            };
        }
        Err(error) => (None, false, Some(error)),
    };
    let answer = CloudAnswer {
        observed_generation: generation,
        identity: identity.as_ref().map(IdentityRef::from),
        secondary_ips: ours.clone().unwrap_or_default(),
        error: error.as_ref().map(CloudErrorRef::from),
        updated: Timestamp::now().to_string(),
    };
    let mut cloud = serde_json::to_value(&answer).expect("the answer serializes");
    // A merge patch keeps what it does not name: clear the old error explicitly, and keep the
    // last known entries when this failure read none.
    if answer.error.is_none() {
        cloud["error"] = Value::Null;
    }
    if ours.is_none() {
        cloud
            .as_object_mut()
            .expect("an object")
            .remove("secondaryIps");
    }
    if answer.identity.is_none() {
        cloud.as_object_mut().expect("an object").remove("identity");
    }
    let patch = Patch::Merge(json!({ "status": { "cloud": cloud } }));
    let written = tokio::time::timeout(
        request_timeout,
        pools.patch_status(name, &PatchParams::default(), &patch),
    )
    .await;
    let outcome = match written {
        Ok(Ok(_)) => {
            match &error {
                None => tracing::info!(node = name, generation, wrote, "answered"),
                Some(e) => {
                    tracing::warn!(node = name, generation, error = %e, "answered with an error")
                }
            }
            Outcome::Answered {
                generation,
                error,
                wrote,
            }
        }
        Ok(Err(e)) => Outcome::Unanswered {
            reason: format!("status patch of {name}: {e}"),
            wrote,
        },
        Err(_) => Outcome::Unanswered {
            reason: format!("status patch of {name}: no answer within {request_timeout:?}"),
            wrote,
        },
    };
    Done { outcome, identity }
}
