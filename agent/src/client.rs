//! A small client for the agent's Unix-socket API (tests, benchmarks, tools). One connection per
//! request: simple, and what the plugin does too.

use std::path::{Path, PathBuf};

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use vnet_api::{
    AllocateRequest, AllocateResponse, AllocationsResponse, ErrorResponse, GcRequest, GcResponse,
    HealthResponse, ReleaseRequest, ReleaseResponse, StatusResponse,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("HTTP error: {0}")]
    Http(String),
    #[error("agent answered {status}: {error:?}")]
    Api { status: u16, error: ErrorResponse },
    #[error("agent answered {status} with an unexpected body: {body}")]
    Decode { status: u16, body: String },
}

#[derive(Debug, Clone)]
pub struct AgentClient {
    socket: PathBuf,
}

impl AgentClient {
    pub fn new(socket: impl AsRef<Path>) -> Self {
        AgentClient {
            socket: socket.as_ref().to_owned(),
        }
    }

    /// Sends one request and returns the status and the raw body.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect {
                path: self.socket.display().to_string(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "vnet-agent")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        Ok((status, bytes.to_vec()))
    }

    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Req>,
    ) -> Result<Resp, ClientError> {
        let body = body
            .map(|b| serde_json::to_vec(b).expect("requests serialize"))
            .unwrap_or_default();
        let (status, bytes) = self.raw(method, path, body).await?;
        if (200..300).contains(&status) {
            serde_json::from_slice(&bytes).map_err(|_| ClientError::Decode {
                status,
                body: String::from_utf8_lossy(&bytes).into_owned(),
            })
        } else {
            match serde_json::from_slice::<ErrorResponse>(&bytes) {
                Ok(error) => Err(ClientError::Api { status, error }),
                Err(_) => Err(ClientError::Decode {
                    status,
                    body: String::from_utf8_lossy(&bytes).into_owned(),
                }),
            }
        }
    }

    pub async fn allocate(&self, req: &AllocateRequest) -> Result<AllocateResponse, ClientError> {
        self.call(Method::POST, vnet_api::PATH_ALLOCATE, Some(req))
            .await
    }

    pub async fn release(&self, req: &ReleaseRequest) -> Result<ReleaseResponse, ClientError> {
        self.call(Method::POST, vnet_api::PATH_RELEASE, Some(req))
            .await
    }

    pub async fn gc(&self, req: &GcRequest) -> Result<GcResponse, ClientError> {
        self.call(Method::POST, vnet_api::PATH_GC, Some(req)).await
    }

    pub async fn status(&self) -> Result<StatusResponse, ClientError> {
        self.call::<(), _>(Method::GET, vnet_api::PATH_STATUS, None)
            .await
    }

    pub async fn allocations(&self) -> Result<AllocationsResponse, ClientError> {
        self.call::<(), _>(Method::GET, vnet_api::PATH_ALLOCATIONS, None)
            .await
    }

    pub async fn health(&self) -> Result<HealthResponse, ClientError> {
        self.call::<(), _>(Method::GET, vnet_api::PATH_HEALTH, None)
            .await
    }
}
