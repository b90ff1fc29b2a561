//! The plugin-facing API: HTTP/1.1 + JSON on a Unix socket (routes in [`vnet_api`]).
//!
//! Handlers are thin: parse, call [`Agent`], map the result. Bodies are parsed here rather than
//! with axum's `Json` extractor so that every malformed request gets a 400 with an
//! [`ErrorResponse`] naming the problem, and changes nothing. Each request runs in its own tracing
//! span and is counted by endpoint and HTTP status.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use tracing::Instrument;
use vnet_api::{
    AllocateRequest, AllocationsResponse, ErrorCode, ErrorResponse, GcRequest, HealthResponse,
    ReleaseRequest,
};

use crate::agent::{Agent, AgentError};
use crate::metrics::{ApiLabels, Metrics};

/// Largest request body accepted. A GC request with 1,000 attachments is ~70 KiB.
pub const BODY_LIMIT: usize = 1 << 20;

fn error_response(status: StatusCode, code: ErrorCode, message: String) -> Response {
    (status, Json(ErrorResponse { code, message })).into_response()
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code().http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.to_response())).into_response()
    }
}

/// Parses a request body; the error is the 400 to send.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, AgentError> {
    serde_json::from_slice(body)
        .map_err(|e| AgentError::BadRequest(format!("invalid request body: {e}")))
}

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route(vnet_api::PATH_ALLOCATE, post(allocate))
        .route(vnet_api::PATH_RELEASE, post(release))
        .route(vnet_api::PATH_GC, post(gc))
        .route(vnet_api::PATH_STATUS, get(status))
        .route(vnet_api::PATH_ALLOCATIONS, get(allocations))
        .route(vnet_api::PATH_HEALTH, get(health))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(agent.clone(), track))
        .with_state(agent)
}

async fn track(State(agent): State<Arc<Agent>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let endpoint = match path {
        vnet_api::PATH_ALLOCATE
        | vnet_api::PATH_RELEASE
        | vnet_api::PATH_GC
        | vnet_api::PATH_STATUS
        | vnet_api::PATH_ALLOCATIONS
        | vnet_api::PATH_HEALTH => path.to_owned(),
        _ => "other".to_owned(),
    };
    let span = tracing::info_span!("request", method = %req.method(), endpoint = %endpoint);
    let response = next.run(req).instrument(span).await;
    agent
        .metrics
        .api_requests
        .get_or_create(&ApiLabels {
            endpoint,
            result: response.status().as_u16().to_string(),
        })
        .inc();
    response
}

async fn allocate(State(agent): State<Arc<Agent>>, body: Bytes) -> Response {
    let req: AllocateRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match agent.allocate(req).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn release(State(agent): State<Arc<Agent>>, body: Bytes) -> Response {
    let req: ReleaseRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if !agent.is_ready() {
        return AgentError::NotReady("the agent is not ready".into()).into_response();
    }
    match agent.release(req).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn gc(State(agent): State<Arc<Agent>>, body: Bytes) -> Response {
    let req: GcRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if !agent.is_ready() {
        return AgentError::NotReady("the agent is not ready".into()).into_response();
    }
    match agent.gc(req).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn status(State(agent): State<Arc<Agent>>) -> Response {
    Json(agent.status()).into_response()
}

async fn allocations(State(agent): State<Arc<Agent>>) -> Response {
    Json(AllocationsResponse {
        allocations: agent.allocations(),
    })
    .into_response()
}

async fn health(State(agent): State<Arc<Agent>>) -> Response {
    let body = HealthResponse {
        ready: agent.is_ready(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let status = if body.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn not_found(req: Request) -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        ErrorCode::BadRequest,
        format!("no route {} {}", req.method(), req.uri().path()),
    )
}

/// Binds the API socket: parent directory created 0700 when missing, a stale socket from a
/// previous run removed (a live one is an error), the socket itself 0600.
pub fn bind_socket(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        } else if std::fs::metadata(dir)?.permissions().mode() & 0o077 != 0 {
            tracing::warn!(dir = %dir.display(), "the socket directory is accessible to group or others; expected 0700");
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("{} is served by another process", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(_) => {}
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// What the TCP listener knows: the metrics from the first moment, the agent once it exists, and
/// which start-up step runs until then. Nothing here calls the cloud or the API server.
pub struct Probes {
    metrics: Arc<Metrics>,
    agent: OnceLock<Arc<Agent>>,
    phase: Mutex<&'static str>,
    stopping: AtomicBool,
}

impl Probes {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Probes> {
        Arc::new(Probes {
            metrics,
            agent: OnceLock::new(),
            phase: Mutex::new("starting"),
            stopping: AtomicBool::new(false),
        })
    }

    /// The start-up step shown by `/readyz` until the agent exists.
    pub fn set_phase(&self, phase: &'static str) {
        *self.phase.lock().unwrap() = phase;
    }

    /// Shutdown began: not ready any more, still alive.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    pub fn set_agent(&self, agent: Arc<Agent>) {
        let _ = self.agent.set(agent);
    }

    /// `Ok(note)` when ready (the note says why it cannot allocate right now, if so), `Err(reason)`
    /// otherwise.
    pub fn readiness(&self) -> Result<Option<String>, String> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err("the agent is shutting down".into());
        }
        let Some(agent) = self.agent.get() else {
            return Err(format!(
                "the agent is starting: {}",
                self.phase.lock().unwrap()
            ));
        };
        let status = agent.status();
        if status.ready {
            Ok((!status.can_allocate).then(|| status.reason.unwrap_or_default()))
        } else {
            Err(status
                .reason
                .unwrap_or_else(|| "the agent is not ready".into()))
        }
    }
}

/// Serves `/metrics` (Prometheus), `/healthz` (200 while the process serves) and `/readyz` (200
/// once the agent serves allocations, including while it waits on the cloud; 503 with the reason
/// otherwise) over plain HTTP.
pub fn metrics_router(probes: Arc<Probes>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(probes): State<Arc<Probes>>| async move {
                // Refresh the pool gauges from the live state.
                if let Some(agent) = probes.agent.get() {
                    let _ = agent.status();
                }
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    probes.metrics.encode(),
                )
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(probes): State<Arc<Probes>>| async move {
                match probes.readiness() {
                    Ok(None) => (StatusCode::OK, "ok\n".to_string()),
                    Ok(Some(note)) => {
                        (StatusCode::OK, format!("ok; cannot allocate now: {note}\n"))
                    }
                    Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
                }
            }),
        )
        .with_state(probes)
}
