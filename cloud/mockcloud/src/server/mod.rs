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

mod network;
mod prelude;
mod scaleset;
mod write;

use network::{arm, operation_status};
use prelude::{action_for, arm_prelude};

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
            provider @ ("Microsoft.Network" | "Microsoft.Compute"),
            "locations",
            _,
            "operations",
            id,
        ] => {
            let op = if *provider == "Microsoft.Network" {
                "operation_get"
            } else {
                "compute_operation_get"
            };
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
