//! What the two long-running PUTs (a NIC, a scale-set instance) share: `If-Match`, the faults
//! injected into a write, the operation's timing, and the answer that starts the operation.

use super::*;

pub(super) struct LongRunningPut {
    /// The fault key of the write (`nic_put`, `vmss_vm_put`).
    operation: &'static str,
    pub(super) if_match: Option<String>,
    pub(super) failure: Option<Failure>,
    pub(super) timing: Timing,
    retry_after: u64,
    base_url: Option<String>,
}

impl LongRunningPut {
    /// Rolls the write's faults: an etag race runs `bump_etag` (another writer got there first),
    /// an async failure makes the operation fail.
    pub(super) fn new(
        app: &App,
        ctx: &Ctx,
        operation: &'static str,
        bump_etag: impl FnOnce(&mut Cloud),
    ) -> LongRunningPut {
        let if_match = ctx
            .headers
            .get(header::IF_MATCH)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if if_match.is_some() && app.roll(FaultKind::EtagRace, operation).is_some() {
            app.with_cloud(|c| {
                bump_etag(c);
                ((), Vec::new())
            });
        }
        let failure = app
            .roll(FaultKind::AsyncFailure, operation)
            .map(|spec| Failure {
                code: spec.code.unwrap_or_else(|| "InternalServerError".into()),
                message: spec
                    .message
                    .unwrap_or_else(|| "The operation failed with an internal error.".to_string()),
                rollback: spec.rollback,
            });
        let faults = lock(&app.faults);
        let retry_after = faults.operation_retry_after_secs();
        LongRunningPut {
            operation,
            if_match,
            failure,
            timing: Timing::new(faults.operation_polls(), retry_after.max(1)),
            retry_after,
            base_url: faults.operation_base_url.clone(),
        }
    }

    /// The answer to a write whose operation `op` started: 200 with the resource as it now is,
    /// `Azure-AsyncOperation` under `provider` (carrying the request's api-version, as ARM's
    /// operation URLs do) and `Retry-After`; or an injected lost response.
    pub(super) fn started(
        &self,
        app: &App,
        ctx: &Ctx,
        doc: Option<Value>,
        operation_path: OperationPath<'_>,
        op: &str,
    ) -> Response {
        if app.roll(FaultKind::LostResponse, self.operation).is_some() {
            return arm_error(ArmError::new(
                500,
                "InternalServerError",
                "An error occurred.",
            ));
        }
        let mut response = nic_response(StatusCode::OK, doc.unwrap_or(Value::Null));
        let base = self
            .base_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", ctx.host()));
        let api_version = ctx
            .query
            .get("api-version")
            .map_or(operation_path.default_api_version, String::as_str);
        let OperationPath {
            subscription,
            provider,
            location,
            ..
        } = operation_path;
        let url = format!(
            "{}/subscriptions/{subscription}/providers/{provider}/locations/{location}/operations/{op}?api-version={api_version}",
            base.trim_end_matches('/')
        );
        let headers = response.headers_mut();
        if let Ok(value) = HeaderValue::from_str(&url) {
            headers.insert("azure-asyncoperation", value);
        }
        headers.insert(header::RETRY_AFTER, HeaderValue::from(self.retry_after));
        response
    }
}

/// Where a write's operation is polled.
pub(super) struct OperationPath<'a> {
    pub(super) subscription: &'a str,
    /// `Microsoft.Network` or `Microsoft.Compute`.
    pub(super) provider: &'a str,
    pub(super) location: &'a str,
    /// Used when the request named none (it cannot have got this far without one).
    pub(super) default_api_version: &'a str,
}
