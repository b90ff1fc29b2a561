//! ARM's routes: resources by type, the NIC PUT and its long-running operation.

use super::write::{LongRunningPut, OperationPath};
use super::*;

pub(super) async fn arm(
    app: &App,
    ctx: &Ctx,
    sub: &str,
    rg: &str,
    rest: &[&str],
) -> (Option<&'static str>, Response) {
    let (operation, method) = match (rest, &ctx.method) {
        (["Microsoft.Network", "networkInterfaces", _], &Method::PUT) => ("nic_put", Method::PUT),
        (["Microsoft.Network", "networkInterfaces", _], _) => ("nic_get", Method::GET),
        (["Microsoft.Network", "virtualNetworks", _], _) => ("vnet_get", Method::GET),
        (["Microsoft.Network", "virtualNetworks", _, "subnets", _], _) => {
            ("subnet_get", Method::GET)
        }
        (["Microsoft.Compute", "virtualMachines", _], _) => ("vm_get", Method::GET),
        (
            [
                "Microsoft.Compute",
                "virtualMachineScaleSets",
                _,
                "virtualMachines",
                _,
            ],
            &Method::PUT,
        ) => ("vmss_vm_put", Method::PUT),
        (
            [
                "Microsoft.Compute",
                "virtualMachineScaleSets",
                _,
                "virtualMachines",
                _,
            ],
            _,
        ) => ("vmss_vm_get", Method::GET),
        (
            [
                "Microsoft.Compute",
                "virtualMachineScaleSets",
                _,
                "virtualMachines",
                _,
                "networkInterfaces",
                _,
            ],
            _,
        ) => ("vmss_nic_get", Method::GET),
        _ => {
            return (
                None,
                arm_error(ArmError::new(
                    400,
                    "InvalidResourceType",
                    format!("The resource type '{}' could not be found.", rest.join("/")),
                )),
            );
        }
    };
    let scope = format!(
        "/subscriptions/{sub}/resourceGroups/{rg}/providers/{}",
        rest.join("/")
    );
    let caller = match arm_prelude(app, ctx, operation, sub, Some(rg), &method, &scope).await {
        Ok(caller) => caller,
        Err(e) => return (Some(operation), arm_error(e)),
    };
    let not_found = |kind: &str, name: &str| {
        arm_error(ArmError::new(
            404,
            "ResourceNotFound",
            format!("The Resource '{kind}/{name}' under resource group '{rg}' was not found."),
        ))
    };
    let response = match rest {
        // A Uniform instance's NIC has no standalone resource.
        ["Microsoft.Network", "networkInterfaces", nic]
            if crate::scaleset::is_uniform_nic(&lock(&app.cloud).topology, nic) =>
        {
            not_found("Microsoft.Network/networkInterfaces", nic)
        }
        ["Microsoft.Network", "networkInterfaces", nic] if operation == "nic_put" => {
            nic_put(app, ctx, nic, caller.as_ref(), &scope)
        }
        ["Microsoft.Network", "networkInterfaces", nic] => {
            let (doc, routed) = app.with_cloud(|c| {
                let routes = c.observe_nic(nic);
                (c.nic_json(nic), routes)
            });
            if routed {
                app.flush_fabric().await;
            }
            match doc {
                Some(doc) => nic_response(StatusCode::OK, as_of_api_version(doc, ctx)),
                None => not_found("Microsoft.Network/networkInterfaces", nic),
            }
        }
        ["Microsoft.Network", "virtualNetworks", vnet, rest @ ..] => {
            let cloud = lock(&app.cloud);
            if !vnet.eq_ignore_ascii_case(&cloud.topology.vnet.name) {
                not_found("Microsoft.Network/virtualNetworks", vnet)
            } else {
                match rest {
                    [] => json_response(StatusCode::OK, cloud.vnet_json()),
                    [_, subnet] => match cloud.subnet_json(subnet) {
                        Some(doc) => json_response(StatusCode::OK, doc),
                        None => not_found("Microsoft.Network/virtualNetworks/subnets", subnet),
                    },
                    _ => not_found("Microsoft.Network/virtualNetworks", vnet),
                }
            }
        }
        ["Microsoft.Compute", "virtualMachines", vm] => match lock(&app.cloud).vm_json(vm) {
            Some(doc) => json_response(StatusCode::OK, doc),
            None => not_found("Microsoft.Compute/virtualMachines", vm),
        },
        [
            "Microsoft.Compute",
            "virtualMachineScaleSets",
            set,
            "virtualMachines",
            instance,
        ] => {
            if operation == "vmss_vm_put" {
                scaleset::instance_put(app, ctx, set, instance, caller.as_ref(), &scope)
            } else {
                scaleset::instance_get(app, set, instance).await
            }
        }
        [
            "Microsoft.Compute",
            "virtualMachineScaleSets",
            set,
            "virtualMachines",
            instance,
            "networkInterfaces",
            nic,
        ] => scaleset::instance_nic_get(app, ctx, set, instance, nic).await,
        _ => unreachable!("matched above"),
    };
    (Some(operation), response)
}

/// The first Microsoft.Network api-version whose NIC ipConfiguration carries
/// `privateIPAddressPrefixLength` (Azure/azure-rest-api-specs#27014 adds it to 2023-09-01).
pub const PREFIX_API_VERSION: &str = "2023-09-01";

/// A NIC document (read or written) as the request's api-version knows it: one older than
/// [`PREFIX_API_VERSION`] has no `privateIPAddressPrefixLength` (what else NRP shows of a block
/// then, or does with such a write, is unverified).
fn as_of_api_version(mut doc: Value, ctx: &Ctx) -> Value {
    let version = ctx.query.get("api-version").map(String::as_str);
    if version.is_some_and(|v| v < PREFIX_API_VERSION)
        && let Some(configs) = doc["properties"]["ipConfigurations"].as_array_mut()
    {
        for config in configs {
            if let Some(props) = config["properties"].as_object_mut() {
                props.remove("privateIPAddressPrefixLength");
            }
        }
    }
    doc
}

fn nic_put(app: &App, ctx: &Ctx, nic: &str, caller: Option<&Principal>, scope: &str) -> Response {
    let body: Value = match serde_json::from_slice(&ctx.body) {
        Ok(body) => body,
        Err(e) => {
            return arm_error(ArmError::bad_request(
                "InvalidRequestFormat",
                format!("Cannot parse the request: {e}."),
            ));
        }
    };
    // An older api-version has no such property: the request's prefix length is dropped and
    // the configuration gets one address.
    let body = as_of_api_version(body, ctx);
    let refs = rules::nic_linked_references(&body);
    if let Err(e) = check_linked_access(caller, action_for("nic_put"), scope, refs) {
        return arm_error(e);
    }
    let put = LongRunningPut::new(app, ctx, "nic_put", |c| c.bump_etag(nic));
    let (result, _) = app.with_cloud(|c| {
        let result = c
            .put_nic(
                nic,
                put.if_match.as_deref(),
                &body,
                put.failure.clone(),
                put.timing,
                Instant::now(),
            )
            .map(|op| {
                let topo = &c.topology;
                (
                    op,
                    c.nic_json(nic),
                    topo.subscription.clone(),
                    topo.location.clone(),
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
        provider: "Microsoft.Network",
        location: &location,
        default_api_version: "2024-05-01",
    };
    put.started(app, ctx, doc, path, &op)
}

pub(super) async fn operation_status(app: &App, _ctx: &Ctx, id: &str) -> Response {
    let (result, routed) = app.with_cloud(|c| match c.poll_operation(id) {
        Ok((status, routes)) => (Ok(status), routes),
        Err(e) => (Err(e), Vec::new()),
    });
    // The fabric must deliver the new addresses before anyone is told they are ready.
    if routed {
        app.flush_fabric().await;
    }
    match result {
        Err(e) => arm_error(e),
        Ok(OperationStatus::InProgress) => {
            let retry_after = lock(&app.faults).operation_retry_after_secs();
            let mut response = json_response(StatusCode::OK, json!({"status": "InProgress"}));
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            response
        }
        Ok(OperationStatus::Succeeded) => {
            json_response(StatusCode::OK, json!({"status": "Succeeded"}))
        }
        Ok(OperationStatus::Failed { code, message }) => json_response(
            StatusCode::OK,
            json!({"status": "Failed", "error": {"code": code, "message": message}}),
        ),
    }
}
