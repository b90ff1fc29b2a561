//! A tiny blocking HTTP/1.1 client: enough for the agent's Unix socket and the mock cloud's admin
//! API, without pulling an async stack into the lab.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::netns::{NetnsError, in_netns};

const IO_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{target}: {source}")]
    Io {
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("{target}: malformed HTTP answer")]
    Malformed { target: String },
    #[error("{target}: HTTP {status}: {body}")]
    Status {
        target: String,
        status: u16,
        body: String,
    },
    #[error("{target}: cannot decode the answer: {source}")]
    Json {
        target: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    /// The body as JSON when the status is 2xx.
    pub fn json<T: DeserializeOwned>(self, target: &str) -> Result<T, HttpError> {
        if !(200..300).contains(&self.status) {
            return Err(HttpError::Status {
                target: target.to_owned(),
                status: self.status,
                body: self.body,
            });
        }
        serde_json::from_str(&self.body).map_err(|source| HttpError::Json {
            target: target.to_owned(),
            source,
        })
    }
}

fn exchange<S: Read + Write>(
    mut stream: S,
    target: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<Response, HttpError> {
    let io_err = |source| HttpError::Io {
        target: target.to_owned(),
        source,
    };
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nMetadata: true\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).map_err(io_err)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(io_err)?;
    parse(&raw).ok_or_else(|| HttpError::Malformed {
        target: target.to_owned(),
    })
}

fn parse(raw: &[u8]) -> Option<Response> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        body = dechunk(&body)?;
    }
    Some(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// One request to an agent (or anything) on a Unix socket.
pub fn unix_request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<Response, HttpError> {
    let target = format!("{} {path}", socket.display());
    let stream = UnixStream::connect(socket).map_err(|source| HttpError::Io {
        target: target.clone(),
        source,
    })?;
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    exchange(stream, &target, method, path, body)
}

/// One request over TCP from inside the network namespace `ns` (the mock cloud lives in the
/// lab's router namespace, unreachable from the host).
pub fn tcp_request_in(
    ns: &str,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<Response, HttpError> {
    let target = format!("http://{addr}{path}");
    let (method, path, body) = (method.to_owned(), path.to_owned(), body.map(str::to_owned));
    let t = target.clone();
    in_netns(ns, move || {
        let stream =
            TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|source| {
                HttpError::Io {
                    target: t.clone(),
                    source,
                }
            })?;
        let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
        let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
        exchange(stream, &t, &method, &path, body.as_deref())
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_answers() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        let r = parse(plain).unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "{}"));
        let chunked =
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let r = parse(chunked).unwrap();
        assert_eq!((r.status, r.body.as_str()), (503, "abcde"));
        assert!(parse(b"garbage").is_none());
    }
}
