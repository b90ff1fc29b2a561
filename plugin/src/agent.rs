//! A small HTTP/1.1 client for the vnet-agent API on its Unix socket: one connection per request
//! (the plugin makes one or two calls per run), with connect and request timeouts.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;
use vnet_api::ErrorResponse;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("vnet-agent is not reachable at {socket}: {source}")]
    Unreachable {
        socket: String,
        source: std::io::Error,
    },
    #[error(
        "vnet-agent at {socket} did not accept a connection within the connect timeout ({timeout:?})"
    )]
    ConnectTimeout { socket: String, timeout: Duration },
    #[error("vnet-agent at {socket} did not answer {path} within {timeout:?}")]
    Timeout {
        socket: String,
        path: String,
        timeout: Duration,
    },
    #[error("vnet-agent refused {path} ({status}): {}", body.message)]
    Refused {
        path: String,
        status: StatusCode,
        body: ErrorResponse,
    },
    /// The connection broke before the answer was complete: the agent died or restarted
    /// mid-request ("connection closed before message completed", a reset). Whether it acted on
    /// the request is unknown; every call is idempotent, so the runtime's retry is safe.
    #[error(
        "vnet-agent at {socket} closed the connection before answering {path} (it may have died or restarted): {detail}"
    )]
    Dropped {
        socket: String,
        path: String,
        detail: String,
    },
    #[error("vnet-agent answered {path} with something unexpected: {detail}")]
    Protocol { path: String, detail: String },
}

impl AgentError {
    /// True when the agent never got (or never answered) the request: the caller may fall back.
    pub fn is_unavailable(&self) -> bool {
        match self {
            AgentError::Unreachable { .. }
            | AgentError::ConnectTimeout { .. }
            | AgentError::Timeout { .. }
            | AgentError::Dropped { .. } => true,
            AgentError::Refused { body, .. } => body.code == vnet_api::ErrorCode::NotReady,
            AgentError::Protocol { .. } => false,
        }
    }
}

/// The longest the client waits for the socket to accept a connection (a live agent accepts at
/// once; a hung one should not eat the whole request budget).
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);

#[derive(Debug, Clone)]
pub struct AgentClient {
    socket: String,
}

impl AgentClient {
    pub fn new(socket: impl Into<String>) -> Self {
        AgentClient {
            socket: socket.into(),
        }
    }

    pub async fn get<R: DeserializeOwned>(
        &self,
        path: &str,
        timeout: Duration,
    ) -> Result<R, AgentError> {
        self.call(Method::GET, path, None, timeout).await
    }

    pub async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<R, AgentError> {
        let body = serde_json::to_vec(body).map_err(|e| AgentError::Protocol {
            path: path.into(),
            detail: e.to_string(),
        })?;
        self.call(Method::POST, path, Some(body), timeout).await
    }

    async fn call<R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<R, AgentError> {
        // Never wait longer to connect than the caller allows for the whole request.
        let connect_timeout = CONNECT_TIMEOUT.min(timeout);
        let stream = tokio::time::timeout(connect_timeout, UnixStream::connect(&self.socket))
            .await
            .map_err(|_| AgentError::ConnectTimeout {
                socket: self.socket.clone(),
                timeout: connect_timeout,
            })?
            .map_err(|source| AgentError::Unreachable {
                socket: self.socket.clone(),
                source,
            })?;
        tokio::time::timeout(timeout, self.exchange(stream, method, path, body))
            .await
            .map_err(|_| AgentError::Timeout {
                socket: self.socket.clone(),
                path: path.to_owned(),
                timeout,
            })?
    }

    async fn exchange<R: DeserializeOwned>(
        &self,
        stream: UnixStream,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<R, AgentError> {
        let protocol = |detail: String| AgentError::Protocol {
            path: path.to_owned(),
            detail,
        };
        // A broken connection is the agent going away, not an answer we could not understand.
        let transport = |e: hyper::Error| {
            if is_connection_lost(&e) {
                AgentError::Dropped {
                    socket: self.socket.clone(),
                    path: path.to_owned(),
                    detail: e.to_string(),
                }
            } else {
                protocol(e.to_string())
            }
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(transport)?;
        // The connection task ends when the request is done and `sender` is dropped.
        tokio::spawn(conn);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "vnet-agent");
        if body.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| protocol(e.to_string()))?;
        let response = sender.send_request(request).await.map_err(transport)?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(transport)?
            .to_bytes();
        if status.is_success() {
            serde_json::from_slice(&bytes).map_err(|e| protocol(format!("bad JSON: {e}")))
        } else {
            let body =
                serde_json::from_slice::<ErrorResponse>(&bytes).unwrap_or_else(|_| ErrorResponse {
                    code: vnet_api::ErrorCode::Internal,
                    message: String::from_utf8_lossy(&bytes).into_owned(),
                });
            Err(AgentError::Refused {
                path: path.to_owned(),
                status,
                body,
            })
        }
    }
}

/// True when hyper failed because the connection ended or broke (EOF before a complete answer,
/// a reset, a closed channel), as opposed to a malformed answer from a live agent.
fn is_connection_lost(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() || e.is_canceled() || e.is_closed() || e.is_body_write_aborted() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_timeout_says_so() {
        let err = AgentError::ConnectTimeout {
            socket: "/run/vnet-cni/agent.sock".into(),
            timeout: Duration::from_millis(100),
        };
        assert!(err.is_unavailable());
        let msg = err.to_string();
        assert!(
            msg.contains("connect timeout") && msg.contains("100ms"),
            "{msg}"
        );
    }

    /// Accepts connections, reads the request head, and closes without answering: an agent that
    /// dies mid-request.
    fn dying_agent(socket: &std::path::Path, reply: &'static [u8]) {
        use std::io::{Read, Write};
        let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                let _ = conn.write_all(reply);
            }
        });
    }

    #[tokio::test]
    async fn an_agent_that_dies_mid_request_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        for (i, reply) in [
            &b""[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"released\"",
        ]
        .into_iter()
        .enumerate()
        {
            let socket = dir.path().join(format!("dying{i}.sock"));
            dying_agent(&socket, reply);
            let client = AgentClient::new(socket.to_str().unwrap());
            let err = client
                .get::<serde_json::Value>("/v1/status", Duration::from_secs(5))
                .await
                .unwrap_err();
            assert!(matches!(err, AgentError::Dropped { .. }), "{err}");
            assert!(err.is_unavailable());
            assert!(err.to_string().contains("closed the connection"), "{err}");
        }
    }

    #[tokio::test]
    async fn a_garbled_answer_is_still_a_protocol_error() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("garbled.sock");
        dying_agent(&socket, b"NOT HTTP AT ALL\r\n\r\n");
        let client = AgentClient::new(socket.to_str().unwrap());
        let err = client
            .get::<serde_json::Value>("/v1/status", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, AgentError::Protocol { .. }), "{err}");
        assert!(!err.is_unavailable());
    }

    #[tokio::test]
    async fn a_missing_socket_is_unreachable_not_a_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nobody.sock");
        let client = AgentClient::new(socket.to_str().unwrap());
        let err = client
            .get::<serde_json::Value>("/v1/health", Duration::from_millis(100))
            .await
            .unwrap_err();
        // Nothing listens: refused at once, reported as unreachable (not as a timeout).
        assert!(matches!(err, AgentError::Unreachable { .. }), "{err}");
    }
}
