//! HTTP routing and handlers. One fallback handler routes by path segments so that every answer,
//! including unknown paths and bad bodies, has Azure's shape (a framework rejection never leaks).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes, to_bytes};
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};

use crate::auth::{Principal, Principals, authorization_failed, check_linked_access};
use crate::fabric::Fabric;
use crate::faults::{FaultKind, Faults};
use crate::model::{
    ArmError, Cloud, Failure, OperationStatus, PersistedState, RouteChange, StateView, Timing,
};
use crate::rules;
use crate::throttle::{Kind, Limiter};
use crate::topology::Topology;
use crate::{MockConfig, MockError, write_atomically};

mod scaleset;

const MAX_BODY: usize = 4 << 20;

/// Calls by operation, answers by `"<operation> <status>"`, and faults injected by kind.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub calls: BTreeMap<String, u64>,
    pub responses: BTreeMap<String, u64>,
    pub injected: BTreeMap<String, u64>,
}

impl Counters {
    pub fn calls(&self, operation: &str) -> u64 {
        self.calls.get(operation).copied().unwrap_or(0)
    }

    pub fn responses(&self, operation: &str, status: u16) -> u64 {
        self.responses
            .get(&format!("{operation} {status}"))
            .copied()
            .unwrap_or(0)
    }

    pub fn injected(&self, fault: &str) -> u64 {
        self.injected.get(fault).copied().unwrap_or(0)
    }
}

pub(crate) struct App {
    cloud: Mutex<Cloud>,
    faults: Mutex<Faults>,
    counters: Mutex<Counters>,
    fabric: Option<Fabric>,
    persist: Option<(Arc<StateWriter>, watch::Sender<PersistedState>)>,
    principals: Option<Principals>,
    limiter: Mutex<Limiter>,
}

impl App {
    pub(crate) async fn new(config: MockConfig) -> Result<Arc<App>, MockError> {
        let persisted = match &config.state_file {
            Some(path) if path.exists() => {
                let text = std::fs::read_to_string(path).map_err(|source| MockError::Io {
                    context: format!("cannot read {}", path.display()),
                    source,
                })?;
                Some(
                    serde_json::from_str(&text)
                        .map_err(|e| MockError::State(format!("{}: {e}", path.display())))?,
                )
            }
            _ => None,
        };
        let cloud = Cloud::new(config.topology, persisted)?;
        let fabric = config.fabric_routes.then(Fabric::start);
        if let Some(fabric) = &fabric {
            fabric.submit(cloud.all_routes());
            fabric.flush().await;
        }
        let persist = config.state_file.map(|path| {
            let (tx, rx) = watch::channel(cloud.persisted());
            let writer = Arc::new(StateWriter {
                path,
                write_lock: tokio::sync::Mutex::new(()),
                closed: AtomicBool::new(false),
            });
            tokio::spawn(persist_loop(writer.clone(), rx));
            (writer, tx)
        });
        Ok(Arc::new(App {
            cloud: Mutex::new(cloud),
            faults: Mutex::new(config.faults),
            counters: Mutex::new(Counters::default()),
            fabric,
            persist,
            principals: config.principals,
            limiter: Mutex::new(Limiter::new(config.rate_limits)),
        }))
    }

    pub(crate) fn topology(&self) -> Topology {
        lock(&self.cloud).topology.clone()
    }

    pub(crate) fn set_faults(&self, faults: Faults) {
        *lock(&self.faults) = faults;
    }

    pub(crate) fn counters(&self) -> Counters {
        lock(&self.counters).clone()
    }

    pub(crate) fn set_rate_limits(&self, limits: crate::throttle::RateLimits) {
        *lock(&self.limiter) = Limiter::new(limits);
    }

    pub(crate) fn state(&self) -> StateView {
        lock(&self.cloud).state_view()
    }

    pub(crate) async fn persist_now(&self) {
        if let Some((writer, _)) = &self.persist {
            // Waits for a background write in flight, and stops later ones: this is the last.
            let _guard = writer.write_lock.lock().await;
            writer.closed.store(true, Ordering::SeqCst);
            let snapshot = lock(&self.cloud).persisted();
            write_state(writer.path.clone(), snapshot).await;
        }
    }

    /// Runs `f` on the state after finishing overdue operations; queues the resulting route
    /// changes (in state order) and publishes a snapshot for the state file.
    fn with_cloud<T>(&self, f: impl FnOnce(&mut Cloud) -> (T, Vec<RouteChange>)) -> (T, bool) {
        let mut cloud = lock(&self.cloud);
        let version = cloud.version;
        let mut routes = cloud.expire_operations(Instant::now());
        let (value, more) = f(&mut cloud);
        routes.extend(more);
        if let Some(fabric) = &self.fabric {
            fabric.submit(routes.iter().cloned());
        }
        if let Some((_, tx)) = &self.persist
            && cloud.version != version
        {
            tx.send_replace(cloud.persisted());
        }
        (value, !routes.is_empty())
    }

    async fn flush_fabric(&self) {
        if let Some(fabric) = &self.fabric {
            fabric.flush().await;
        }
    }

    fn count(&self, map: fn(&mut Counters) -> &mut BTreeMap<String, u64>, key: String) {
        *map(&mut lock(&self.counters)).entry(key).or_default() += 1;
    }

    fn roll(&self, kind: FaultKind, operation: &str) -> Option<crate::faults::FaultSpec> {
        let spec = lock(&self.faults).roll(kind, operation)?;
        self.count(|c| &mut c.injected, kind.name().to_string());
        tracing::info!(fault = kind.name(), operation, "injecting fault");
        Some(spec)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves consistent-enough data for a mock; keep serving.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Writes the state file; one write at a time, none after the final one at shutdown.
struct StateWriter {
    path: PathBuf,
    write_lock: tokio::sync::Mutex<()>,
    closed: AtomicBool,
}

async fn persist_loop(writer: Arc<StateWriter>, mut rx: watch::Receiver<PersistedState>) {
    while rx.changed().await.is_ok() {
        let _guard = writer.write_lock.lock().await;
        if writer.closed.load(Ordering::SeqCst) {
            return;
        }
        let snapshot = rx.borrow_and_update().clone();
        write_state(writer.path.clone(), snapshot).await;
    }
}

async fn write_state(path: PathBuf, snapshot: PersistedState) {
    let result = tokio::task::spawn_blocking(move || {
        let data = serde_json::to_vec_pretty(&snapshot).expect("state serializes");
        write_atomically(&path, &data).map_err(|e| format!("{}: {e}", path.display()))
    })
    .await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::error!(%error, "cannot write state file"),
        Err(error) => tracing::error!(%error, "state writer panicked"),
    }
}

pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    stopped: oneshot::Receiver<()>,
) {
    let router = Router::new().fallback(handle).with_state(app);
    let result = axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        let _ = stopped.await;
    })
    .await;
    if let Err(error) = result {
        tracing::error!(%error, "server stopped");
    }
}

struct Ctx {
    method: Method,
    headers: HeaderMap,
    query: HashMap<String, String>,
    body: Bytes,
    peer: IpAddr,
    /// The throttling bucket this request drew from and what is left, for the answer's header.
    rate: Mutex<Option<(Kind, u32)>>,
}

impl Ctx {
    fn host(&self) -> String {
        self.headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("127.0.0.1")
            .to_string()
    }
}

async fn handle(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_string();
    let query = Query::<HashMap<String, String>>::try_from_uri(&parts.uri)
        .map(|q| q.0)
        .unwrap_or_default();
    let body = match to_bytes(body, MAX_BODY).await {
        Ok(body) => body,
        Err(_) => {
            return arm_error(ArmError::new(
                413,
                "RequestEntityTooLarge",
                "The request body is too large.",
            ));
        }
    };
    let ctx = Ctx {
        method: parts.method,
        headers: parts.headers,
        query,
        body,
        peer: peer.ip().to_canonical(),
        rate: Mutex::new(None),
    };
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (operation, mut response) = route(&app, &ctx, &segments).await;
    // ARM reports the caller's remaining budget on every answer, errors included.
    if let Some((kind, remaining)) = *lock(&ctx.rate) {
        response
            .headers_mut()
            .insert(kind.header(), HeaderValue::from(remaining));
    }
    if let Some(operation) = operation {
        app.count(
            |c| &mut c.responses,
            format!("{operation} {}", response.status().as_u16()),
        );
    }
    tracing::debug!(method = %ctx.method, %path, status = response.status().as_u16(), "request");
    response
}

/// Returns the operation name (for counters) and the answer.
async fn route(app: &App, ctx: &Ctx, segments: &[&str]) -> (Option<&'static str>, Response) {
    match segments {
        ["admin", rest @ ..] => (None, admin(app, ctx, rest)),
        ["metadata", rest @ ..] => {
            let vm = match ctx.peer {
                IpAddr::V4(ip) => lock(&app.cloud).vm_by_ip(ip),
                IpAddr::V6(_) => None,
            };
            match vm {
                Some(vm) => imds(app, ctx, &vm, rest).await,
                None => (
                    Some("imds"),
                    imds_error(
                        StatusCode::NOT_FOUND,
                        &format!(
                            "no VM has the primary address {}; use /vms/{{vm}}/metadata/...",
                            ctx.peer
                        ),
                    ),
                ),
            }
        }
        ["vms", vm, "metadata", rest @ ..] => imds(app, ctx, vm, rest).await,
        [
            "subscriptions",
            sub,
            "providers",
            "Microsoft.Network",
            "locations",
            _,
            "operations",
            id,
        ] => {
            let op = "operation_get";
            let scope = format!("/{}", segments.join("/"));
            if let Err(e) = arm_prelude(app, ctx, op, sub, None, &Method::GET, &scope).await {
                return (Some(op), arm_error(e));
            }
            (Some(op), operation_status(app, ctx, id).await)
        }
        [
            "subscriptions",
            sub,
            "providers",
            "Microsoft.Compute",
            "locations",
            _,
            "operations",
            id,
        ] => {
            let op = "compute_operation_get";
            let scope = format!("/{}", segments.join("/"));
            if let Err(e) = arm_prelude(app, ctx, op, sub, None, &Method::GET, &scope).await {
                return (Some(op), arm_error(e));
            }
            (Some(op), operation_status(app, ctx, id).await)
        }
        [
            "subscriptions",
            sub,
            "resourceGroups",
            rg,
            "providers",
            rest @ ..,
        ] => arm(app, ctx, sub, rg, rest).await,
        _ => (
            None,
            arm_error(ArmError::new(
                404,
                "NotFound",
                format!(
                    "No HTTP resource was found that matches the request URI '{}'.",
                    segments.join("/")
                ),
            )),
        ),
    }
}

fn admin(app: &App, ctx: &Ctx, rest: &[&str]) -> Response {
    match (&ctx.method, rest) {
        (&Method::GET, ["state"]) => json_response(StatusCode::OK, json!(app.state())),
        (&Method::GET, ["counters"]) => json_response(StatusCode::OK, json!(app.counters())),
        (&Method::POST, ["counters", "reset"]) => {
            *lock(&app.counters) = Counters::default();
            StatusCode::NO_CONTENT.into_response()
        }
        (&Method::GET, ["faults"]) => json_response(StatusCode::OK, json!(*lock(&app.faults))),
        (&Method::PUT, ["faults"]) => {
            let text = String::from_utf8_lossy(&ctx.body);
            match Faults::from_json(&text) {
                Ok(faults) => {
                    tracing::info!(?faults, "faults replaced");
                    app.set_faults(faults.clone());
                    json_response(StatusCode::OK, json!(faults))
                }
                Err(message) => arm_error(ArmError::bad_request("InvalidRequestContent", message)),
            }
        }
        (&Method::GET, ["topology"]) => json_response(StatusCode::OK, json!(app.topology())),
        (&Method::POST, ["scalesets", set, "virtualMachines", instance, "reimage"]) => {
            scaleset::reimage(app, set, instance)
        }
        _ => arm_error(ArmError::new(404, "NotFound", "Unknown admin endpoint.")),
    }
}

async fn imds(app: &App, ctx: &Ctx, vm: &str, rest: &[&str]) -> (Option<&'static str>, Response) {
    let operation = match rest {
        ["instance"] => "imds",
        ["identity", "oauth2", "token"] => "token",
        _ => return (None, imds_error(StatusCode::NOT_FOUND, "Not found")),
    };
    app.count(|c| &mut c.calls, operation.to_string());
    let delay = lock(&app.faults).latency_for(operation);
    tokio::time::sleep(delay).await;
    if ctx.method != Method::GET {
        return (
            Some(operation),
            imds_error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed"),
        );
    }
    if ctx.headers.get("metadata").and_then(|v| v.to_str().ok()) != Some("true") {
        return (
            Some(operation),
            imds_error(
                StatusCode::BAD_REQUEST,
                "Bad request. Required metadata header not specified",
            ),
        );
    }
    if !ctx.query.contains_key("api-version") {
        return (
            Some(operation),
            imds_error(
                StatusCode::BAD_REQUEST,
                "Bad request. api-version was not specified in the request. For more information refer to aka.ms/azureimds",
            ),
        );
    }
    let response = if operation == "imds" {
        match lock(&app.cloud).imds_json(vm) {
            Some(doc) => json_response(StatusCode::OK, doc),
            None => imds_error(StatusCode::NOT_FOUND, &format!("unknown VM {vm}")),
        }
    } else {
        let Some(resource) = ctx.query.get("resource") else {
            return (
                Some(operation),
                json_response(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "invalid_request", "error_description": "Required query variable 'resource' is missing"}),
                ),
            );
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        json_response(
            StatusCode::OK,
            json!({
                "access_token": format!("mock-token.{vm}"),
                "client_id": ctx.query.get("client_id").cloned().unwrap_or_else(|| "00000000-0000-0000-0000-000000000000".into()),
                "expires_in": "86399",
                "expires_on": (now + 86399).to_string(),
                "ext_expires_in": "86399",
                "not_before": now.to_string(),
                "resource": resource,
                "token_type": "Bearer",
            }),
        )
    };
    (Some(operation), response)
}

/// The Azure RBAC action an operation needs (named in 403 answers).
fn action_for(operation: &str) -> &'static str {
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
async fn arm_prelude(
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

async fn arm(
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
                Some(doc) => nic_response(StatusCode::OK, doc),
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

fn nic_put(app: &App, ctx: &Ctx, nic: &str, caller: Option<&Principal>, scope: &str) -> Response {
    let mut body: Value = match serde_json::from_slice(&ctx.body) {
        Ok(body) => body,
        Err(e) => {
            return arm_error(ArmError::bad_request(
                "InvalidRequestFormat",
                format!("Cannot parse the request: {e}."),
            ));
        }
    };
    // An older api-version has no such property: the request's prefix length is dropped and
    // the configuration gets one address (what NRP does then is unverified).
    let version = ctx.query.get("api-version").map(String::as_str);
    if version.is_some_and(|v| v < PREFIX_API_VERSION)
        && let Some(configs) = body["properties"]["ipConfigurations"].as_array_mut()
    {
        for config in configs {
            if let Some(props) = config["properties"].as_object_mut() {
                props.remove("privateIPAddressPrefixLength");
            }
        }
    }
    let refs = rules::nic_linked_references(&body);
    if let Err(e) = check_linked_access(caller, action_for("nic_put"), scope, refs) {
        return arm_error(e);
    }
    let if_match = ctx
        .headers
        .get(header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if if_match.is_some() && app.roll(FaultKind::EtagRace, "nic_put").is_some() {
        app.with_cloud(|c| {
            c.bump_etag(nic);
            ((), Vec::new())
        });
    }
    let failure = app
        .roll(FaultKind::AsyncFailure, "nic_put")
        .map(|spec| Failure {
            code: spec.code.unwrap_or_else(|| "InternalServerError".into()),
            message: spec
                .message
                .unwrap_or_else(|| "The operation failed with an internal error.".to_string()),
            rollback: spec.rollback,
        });
    let (polls, retry_after, base_url) = {
        let faults = lock(&app.faults);
        (
            faults.operation_polls(),
            faults.operation_retry_after_secs(),
            faults.operation_base_url.clone(),
        )
    };
    let (result, _) = app.with_cloud(|c| {
        let result = c
            .put_nic(
                nic,
                if_match.as_deref(),
                &body,
                failure,
                Timing::new(polls, retry_after.max(1)),
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
    if app.roll(FaultKind::LostResponse, "nic_put").is_some() {
        return arm_error(ArmError::new(
            500,
            "InternalServerError",
            "An error occurred.",
        ));
    }
    let mut response = nic_response(StatusCode::OK, doc.unwrap_or(Value::Null));
    let base = base_url.unwrap_or_else(|| format!("http://{}", ctx.host()));
    let url = format!(
        "{}/subscriptions/{sub}/providers/Microsoft.Network/locations/{location}/operations/{op}?api-version=2024-05-01",
        base.trim_end_matches('/')
    );
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&url) {
        headers.insert("azure-asyncoperation", value);
    }
    headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    response
}

async fn operation_status(app: &App, _ctx: &Ctx, id: &str) -> Response {
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

fn json_response(status: StatusCode, body: Value) -> Response {
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

fn nic_response(status: StatusCode, doc: Value) -> Response {
    let etag = doc.get("etag").and_then(Value::as_str).map(str::to_string);
    let mut response = json_response(status, doc);
    if let Some(etag) = etag.and_then(|e| HeaderValue::from_str(&e).ok()) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    response
}

fn arm_error(error: ArmError) -> Response {
    let status = StatusCode::from_u16(error.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = json_response(status, error.body());
    if let Some(secs) = error.retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// IMDS errors are shaped differently from ARM's: `{"error": "<text>"}`.
fn imds_error(status: StatusCode, message: &str) -> Response {
    json_response(
        status,
        json!({"error": message, "newest-versions": ["2021-02-01"]}),
    )
}
