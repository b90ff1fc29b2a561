//! One job: bring one node's NIC to its `cloudRequest` and answer in `status.cloud`.

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

/// The NodeIPPool a job answers: its name, and its uid (checked before the answer is written,
/// so it does not land on a pool created again under the same name meanwhile).
pub(crate) struct PoolRef {
    pub(crate) name: String,
    pub(crate) uid: Option<String>,
}

pub(crate) async fn run(
    pools: Api<NodeIPPool>,
    cloud: std::sync::Arc<AzureProvider>,
    pool: PoolRef,
    request: CloudRequest,
    known: Option<NodeIdentity>,
    request_timeout: Duration,
) -> Done {
    let generation = request.generation;
    let identity = match identity(&cloud, &request, known).await {
        Ok(identity) => identity,
        Err(error) => {
            return answer(&pools, &pool, generation, None, Err(error), request_timeout).await;
        }
    };
    let result = reconcile(&cloud, &identity, &request).await;
    answer(
        &pools,
        &pool,
        generation,
        Some(identity),
        result,
        request_timeout,
    )
    .await
}

/// Answers `error` for `generation` without any cloud call (the request was refused).
pub(crate) async fn refuse(
    pools: Api<NodeIPPool>,
    pool: PoolRef,
    generation: u64,
    error: CloudError,
    request_timeout: Duration,
) -> Done {
    answer(&pools, &pool, generation, None, Err(error), request_timeout).await
}

/// Why the request of the NodeIPPool `name` must not be served, if it must not: a NodeIPPool
/// is served only for the VM of the Node of the same name (its `spec.providerID`), so a node
/// that writes another node's VM into a request (every agent may patch every NodeIPPool's
/// status) cannot steer the allocator to that VM's NIC. `node_provider_id`: `None` when no Node
/// of that name is known, `Some("")` when it has no providerID.
pub(crate) fn refusal(
    name: &str,
    request: &CloudRequest,
    node_provider_id: Option<&str>,
) -> Option<CloudError> {
    let vm_id = &request.instance.vm_id;
    let expected = crate::provider_id(vm_id);
    match node_provider_id {
        None => Some(CloudError::Transient(format!(
            "no Node named {name} (waited 30 s): the allocator serves a NodeIPPool only for the Node of the same name; nothing done, retried"
        ))),
        Some(found) if vm_id.is_empty() || !found.eq_ignore_ascii_case(&expected) => {
            Some(CloudError::Fatal(format!(
                "refused: cloudRequest.instance.vmId {vm_id:?} is not the VM of Node {name} (spec.providerID {found:?}, expected {expected:?}); nothing done"
            )))
        }
        Some(_) => None,
    }
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
    check_release(request)?;
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
        release: request.release.clone(),
    };
    let done = cloud.reconcile_nic(&identity.nic_id, &want).await?;
    Ok(Reconciled {
        ours: done.ours.iter().map(SecondaryIpRef::from).collect(),
        wrote: done.wrote,
        add_error: done.add_error,
    })
}

/// `cloudRequest.release` names ipConfigurations, not addresses (Azure reuses a released
/// address under a new name; the NIC document the write edits says which entry a name is, if
/// any still is). An address there (an agent of the earlier protocol) would match nothing and
/// release nothing, silently: it is refused instead.
fn check_release(request: &CloudRequest) -> Result<(), CloudError> {
    let bad = request
        .release
        .iter()
        .find(|n| n.trim().is_empty() || n.parse::<std::net::IpAddr>().is_ok());
    match bad {
        Some(bad) => Err(CloudError::Fatal(format!(
            "cloudRequest.release: {bad:?} is not an ipConfiguration name (release lists the names of the entries in status.cloud.secondaryIps, not addresses)"
        ))),
        None => Ok(()),
    }
}

/// Writes `status.cloud` (a merge patch of that field only) for `generation`.
async fn answer(
    pools: &Api<NodeIPPool>,
    pool: &PoolRef,
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
    let name = pool.name.as_str();
    // The pool may have been deleted and created again under its name while the job ran (a
    // node replaced by one of the same name): this answer is not the new pool's. A status patch
    // cannot carry the uid as a precondition (the status subresource keeps the stored metadata),
    // so the pool is read first; only a replacement within that read's round trip gets past.
    match tokio::time::timeout(request_timeout, pools.get_opt(name)).await {
        Ok(Ok(Some(current))) if current.metadata.uid == pool.uid => {}
        Ok(Ok(_)) => {
            tracing::info!(
                node = name,
                generation,
                "pool deleted or replaced: answer dropped"
            );
            return Done {
                outcome: Outcome::Unanswered {
                    reason: format!("{name} was deleted or replaced while its job ran"),
                    wrote,
                },
                identity: None,
            };
        }
        Ok(Err(e)) => {
            return Done {
                outcome: Outcome::Unanswered {
                    reason: format!("reading {name} before its answer: {e}"),
                    wrote,
                },
                identity,
            };
        }
        Err(_) => {
            return Done {
                outcome: Outcome::Unanswered {
                    reason: format!("reading {name}: no answer within {request_timeout:?}"),
                    wrote,
                },
                identity,
            };
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_lists_names_and_an_address_there_is_refused() {
        let with = |release: &[&str]| CloudRequest {
            release: release.iter().map(|s| s.to_string()).collect(),
            ..CloudRequest::default()
        };
        assert!(check_release(&with(&["vnet-cni-0a1b", "vnet-cni-2c3d"])).is_ok());
        for bad in ["10.0.0.5", "", " "] {
            let error = check_release(&with(&["vnet-cni-0a1b", bad])).unwrap_err();
            assert!(
                !error.is_retryable() && error.to_string().contains("not an ipConfiguration name")
            );
        }
    }

    #[test]
    fn a_request_is_served_only_for_the_vm_of_its_node() {
        let vm = "/subscriptions/s/resourceGroups/MC_rg/providers/Microsoft.Compute/virtualMachineScaleSets/ss/virtualMachines/3";
        let request = CloudRequest {
            instance: vnet_kube::crd::InstanceRef {
                vm_id: vm.into(),
                ..Default::default()
            },
            ..CloudRequest::default()
        };
        let aks = format!("azure://{}", vm.to_ascii_lowercase());
        assert!(refusal("n", &request, Some(&aks)).is_none());
        let other = aks.replace("/3", "/4");
        let refused = refusal("n", &request, Some(&other)).unwrap();
        assert!(!refused.is_retryable(), "{refused}");
        assert!(refused.to_string().contains(&other), "{refused}");
        // A Node without a providerID, or none at all.
        assert!(refusal("n", &request, Some("")).is_some_and(|e| !e.is_retryable()));
        assert!(refusal("n", &request, None).is_some_and(|e| e.is_retryable()));
        // An empty vmId never matches.
        let empty = CloudRequest::default();
        assert!(refusal("n", &empty, Some("azure://")).is_some());
    }
}
