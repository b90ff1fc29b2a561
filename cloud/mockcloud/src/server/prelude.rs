//! What every ARM request goes through before its handler: authentication, linked
//! authorization, ARM's throttling buckets, the api-version check and injected faults.

use super::*;

/// The Azure RBAC action an operation needs (named in 403 answers).
pub(super) fn action_for(operation: &str) -> &'static str {
    match operation {
        "nic_get" => "Microsoft.Network/networkInterfaces/read",
        "nic_put" => "Microsoft.Network/networkInterfaces/write",
        "vm_get" => "Microsoft.Compute/virtualMachines/read",
        "vnet_get" => "Microsoft.Network/virtualNetworks/read",
        "subnet_get" => "Microsoft.Network/virtualNetworks/subnets/read",
        "vmss_vm_get" => "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/read",
        "vmss_vm_put" => "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/write",
        "vmss_nic_get" => {
            "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/networkInterfaces/read"
        }
        "compute_operation_get" => "Microsoft.Compute/locations/operations/read",
        _ => "Microsoft.Network/locations/operations/read",
    }
}

/// The caller, from its bearer token: `Ok(None)` when the mock has no principals configured.
fn authenticate<'a>(app: &'a App, ctx: &Ctx) -> Result<Option<&'a Principal>, ArmError> {
    let Some(principals) = &app.principals else {
        return Ok(None);
    };
    let header = ctx
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(header) = header else {
        return Err(ArmError::new(
            401,
            "AuthenticationFailed",
            "Authentication failed. The 'Authorization' header is missing.",
        ));
    };
    let token = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .unwrap_or_default();
    principals.get(token.trim()).map(Some).ok_or_else(|| {
        ArmError::new(
            401,
            "InvalidAuthenticationToken",
            "The access token is invalid.",
        )
    })
}

/// The throttling key: the principal, or the raw token when the mock knows no principals.
fn rate_key(ctx: &Ctx, caller: Option<&Principal>) -> String {
    match caller {
        Some(p) => p.name.clone(),
        None => ctx
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("anonymous")
            .to_string(),
    }
}

/// What every ARM call goes through: counting, api-version, scope, the caller and its
/// permission, throttling, latency, injected faults. Returns the caller (with principals).
pub(super) async fn arm_prelude(
    app: &App,
    ctx: &Ctx,
    operation: &'static str,
    sub: &str,
    rg: Option<&str>,
    allowed: &Method,
    scope: &str,
) -> Result<Option<Principal>, ArmError> {
    app.count(|c| &mut c.calls, operation.to_string());
    let version = ctx.query.get("api-version").map(String::as_str);
    // Network's scale-set NIC view is served at its old versions only, below ARM's floor here
    // (cloud-provider-azure reads it at 2017-03-30); its handler refuses any other.
    let old_nic_view = operation == "vmss_nic_get"
        && version.is_some_and(|v| crate::scaleset::VMSS_NIC_API_VERSIONS.contains(&v));
    if !old_nic_view {
        check_api_version(version)?;
    }
    if ctx.method != *allowed {
        return Err(ArmError::new(
            405,
            "MethodNotAllowed",
            format!(
                "The requested method {} is not allowed for this resource.",
                ctx.method
            ),
        ));
    }
    let (want_sub, want_rg) = {
        let cloud = lock(&app.cloud);
        (
            cloud.topology.subscription.clone(),
            cloud.topology.resource_group.clone(),
        )
    };
    if !sub.eq_ignore_ascii_case(&want_sub) {
        return Err(ArmError::new(
            404,
            "SubscriptionNotFound",
            format!("The subscription '{sub}' could not be found."),
        ));
    }
    if let Some(rg) = rg
        && !rg.eq_ignore_ascii_case(&want_rg)
    {
        return Err(ArmError::new(
            404,
            "ResourceGroupNotFound",
            format!("Resource group '{rg}' could not be found."),
        ));
    }
    let caller = authenticate(app, ctx)?.cloned();
    let kind = if operation == "nic_put" || operation == "vmss_vm_put" {
        Kind::Write
    } else {
        Kind::Read
    };
    let key = rate_key(ctx, caller.as_ref());
    let taken = lock(&app.limiter).take(&key, kind, Instant::now());
    match taken {
        Ok(remaining) => *lock(&ctx.rate) = Some((kind, remaining)),
        Err(wait) => {
            *lock(&ctx.rate) = Some((kind, 0));
            return Err(ArmError::new(
                429,
                THROTTLED_CODE,
                format!(
                    "Number of '{}' requests for subscription '{sub}' actor '{key}' exceeded. Please try again after '{wait}' seconds after additional tokens are available.",
                    kind.name()
                ),
            )
            .with_retry_after(wait));
        }
    }

    let delay = lock(&app.faults).latency_for(operation);
    tokio::time::sleep(delay).await;

    let action = action_for(operation);
    if caller.as_ref().is_some_and(|p| !p.allows(action))
        || app.roll(FaultKind::Forbidden, operation).is_some()
    {
        return Err(authorization_failed(caller.as_ref(), action, scope));
    }
    if let Some(spec) = app.roll(FaultKind::Throttle, operation) {
        if scaleset::is_compute(operation) {
            return Err(scaleset::compute_throttled(&spec));
        }
        return Err(ArmError::new(
            429,
            spec.code.as_deref().unwrap_or("TooManyRequests"),
            "The request is being throttled as the limit has been reached for this operation type. Please retry after the time in the Retry-After header.",
        )
        .with_retry_after(spec.retry_after_secs));
    }
    if let Some(spec) = app.roll(FaultKind::ServerError, operation) {
        return Err(ArmError::new(
            spec.status.unwrap_or(500),
            spec.code.as_deref().unwrap_or("InternalServerError"),
            spec.message.as_deref().unwrap_or("An error occurred."),
        ));
    }
    // Busy only makes sense for writes unless the fault names operations explicitly.
    let busy_eligible = operation == "nic_put"
        || operation == "vmss_vm_put"
        || lock(&app.faults)
            .busy
            .as_ref()
            .is_some_and(|b| !b.operations.is_empty());
    if busy_eligible && let Some(spec) = app.roll(FaultKind::Busy, operation) {
        return Err(ArmError::busy(
            spec.code
                .as_deref()
                .unwrap_or(crate::model::BUSY_DETAIL_CODE),
            format!(
                "Operation could not be completed because another operation on the resource is in progress. The call can be retried in {} seconds.",
                spec.retry_after_secs
            ),
            spec.retry_after_secs,
        ));
    }
    Ok(caller)
}

/// ARM's code for a request over the caller's throttling budget (unverified; see docs/cloud.md).
const THROTTLED_CODE: &str = "SubscriptionRequestsThrottled";

fn check_api_version(version: Option<&str>) -> Result<(), ArmError> {
    let Some(version) = version else {
        return Err(ArmError::bad_request(
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        ));
    };
    let date = version.strip_suffix("-preview").unwrap_or(version);
    let well_formed = date.len() == 10
        && date.chars().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                c == '-'
            } else {
                c.is_ascii_digit()
            }
        });
    if !well_formed || date < "2018-01-01" {
        return Err(ArmError::bad_request(
            "InvalidApiVersionParameter",
            format!(
                "The api-version '{version}' is invalid. The supported versions are '2018-01-01' and later (YYYY-MM-DD)."
            ),
        ));
    }
    Ok(())
}
