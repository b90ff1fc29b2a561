//! Handlers of the scale-set paths: the instance (Compute), its NIC (Network's scale-set view),
//! the admin reimage. Each goes through the same prelude and faults as the NIC paths.

use std::time::Instant;

use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Value, json};

use super::write::{LongRunningPut, OperationPath};
use super::{App, Ctx, action_for, arm_error, json_response, lock, nic_response};
use crate::auth::{Principal, check_linked_access};
use crate::faults::FaultSpec;
use crate::model::ArmError;
use crate::rules;
use crate::scaleset::{COMPUTE_OPERATION_API_VERSION, VMSS_NIC_API_VERSIONS};

/// Operations Compute answers (its throttling has its own shape).
pub(super) fn is_compute(operation: &str) -> bool {
    matches!(
        operation,
        "vmss_vm_get" | "vmss_vm_put" | "compute_operation_get"
    )
}

/// Compute's throttling answer: 429 `OperationNotAllowed` with `Retry-After`.
pub(super) fn compute_throttled(spec: &FaultSpec) -> ArmError {
    ArmError::new(
        429,
        spec.code.as_deref().unwrap_or("OperationNotAllowed"),
        "The server rejected the request because too many requests have been received for this subscription.",
    )
    .with_retry_after(spec.retry_after_secs)
}

pub(super) async fn instance_get(app: &App, set: &str, instance: &str) -> Response {
    let (doc, routed) = app.with_cloud(|c| {
        let routes = c.observe_instance(set, instance);
        (
            c.instance_json(set, instance)
                .ok_or_else(|| c.instance_not_found(set, instance)),
            routes,
        )
    });
    if routed {
        app.flush_fabric().await;
    }
    match doc {
        Ok(doc) => nic_response(StatusCode::OK, doc),
        Err(e) => arm_error(e),
    }
}

pub(super) async fn instance_nic_get(
    app: &App,
    ctx: &Ctx,
    set: &str,
    instance: &str,
    nic: &str,
) -> Response {
    let version = ctx.query.get("api-version").cloned().unwrap_or_default();
    if !VMSS_NIC_API_VERSIONS.contains(&version.as_str()) {
        let location = lock(&app.cloud).topology.location.clone();
        return arm_error(ArmError::bad_request(
            "NoRegisteredProviderFound",
            format!(
                "No registered resource provider found for location '{location}' and API version '{version}' for type 'virtualMachineScaleSets/virtualMachines/networkInterfaces'. The supported api-versions are '{}'.",
                VMSS_NIC_API_VERSIONS.join(", ")
            ),
        ));
    }
    let (doc, routed) = app.with_cloud(|c| {
        let routes = c.observe_instance(set, instance);
        (c.instance_nic_json(set, instance, nic), routes)
    });
    if routed {
        app.flush_fabric().await;
    }
    match doc {
        Some(doc) => nic_response(StatusCode::OK, doc),
        None => arm_error(ArmError::new(
            404,
            "ResourceNotFound",
            format!(
                "The Resource 'Microsoft.Compute/virtualMachineScaleSets/{set}/virtualMachines/{instance}/networkInterfaces/{nic}' under resource group '{}' was not found.",
                lock(&app.cloud).topology.resource_group
            ),
        )),
    }
}

pub(super) fn instance_put(
    app: &App,
    ctx: &Ctx,
    set: &str,
    instance: &str,
    caller: Option<&Principal>,
    scope: &str,
) -> Response {
    let body: Value = match serde_json::from_slice(&ctx.body) {
        Ok(body) => body,
        Err(e) => {
            return arm_error(ArmError::bad_request(
                "InvalidRequestContent",
                format!("The request content was invalid and could not be deserialized: {e}."),
            ));
        }
    };
    // Compute writes the NIC on the caller's behalf: the caller needs `join` on what it carries.
    let nic_body = lock(&app.cloud).instance_nic_body(set, instance, &body);
    if let Err(e) = nic_body.and_then(|nic| {
        let refs = rules::nic_linked_references(&nic);
        check_linked_access(caller, action_for("vmss_vm_put"), scope, refs)
    }) {
        return arm_error(e);
    }
    let put = LongRunningPut::new(app, ctx, "vmss_vm_put", |c| {
        c.bump_instance_etag(set, instance)
    });
    let (result, _) = app.with_cloud(|c| {
        let result = c
            .put_instance(
                set,
                instance,
                put.if_match.as_deref(),
                &body,
                put.failure.clone(),
                put.timing,
                Instant::now(),
            )
            .map(|op| {
                (
                    op,
                    c.instance_json(set, instance),
                    c.topology.subscription.clone(),
                    c.topology.location.clone(),
                )
            });
        (result, Vec::new())
    });
    let (op, doc, sub, location) = match result {
        Ok(ok) => ok,
        Err(e) => return arm_error(e),
    };
    let path = OperationPath {
        subscription: &sub,
        provider: "Microsoft.Compute",
        location: &location,
        default_api_version: COMPUTE_OPERATION_API_VERSION,
    };
    put.started(app, ctx, doc, path, &op)
}

/// `POST /admin/scalesets/{set}/virtualMachines/{instance}/reimage`: the instance's
/// ipConfigurations go back to the model's; answers the addresses that were lost.
pub(super) fn reimage(app: &App, set: &str, instance: &str) -> Response {
    let (result, _) = app.with_cloud(|c| match c.reimage_instance(set, instance) {
        Ok((lost, routes)) => (Ok(lost), routes),
        Err(e) => (Err(e), Vec::new()),
    });
    match result {
        Ok(lost) => {
            tracing::info!(set, instance, ?lost, "instance reimaged");
            json_response(StatusCode::OK, json!({"lost": lost}))
        }
        Err(e) => arm_error(e),
    }
}
