//! Connectivity probes: a TCP responder inside a namespace answers every connection with the
//! address it sees the caller as, so one round trip proves reachability, measures latency and
//! shows whether the source address was preserved or masqueraded.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::netns::{NetnsError, in_netns, spawn_in_netns};

/// The port every lab responder listens on (inside its own namespace, so no clash).
pub const PROBE_PORT: u16 = 7777;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot listen in {ns}: {source}")]
    Listen {
        ns: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

/// A responder thread; stops when dropped.
pub struct Responder {
    stop: Arc<AtomicBool>,
    fd: i32,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Responder {
    /// Listens on 0.0.0.0:[`PROBE_PORT`] inside `ns`.
    pub fn start(ns: &str) -> Result<Responder, ProbeError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let ns_name = ns.to_owned();
        let handle = spawn_in_netns(ns, move || {
            let listener = match TcpListener::bind((Ipv4Addr::UNSPECIFIED, PROBE_PORT)) {
                Ok(l) => l,
                Err(source) => {
                    let _ = tx.send(Err(ProbeError::Listen {
                        ns: ns_name,
                        source,
                    }));
                    return;
                }
            };
            let _ = tx.send(Ok(listener.as_raw_fd()));
            serve(&listener, &stop_flag);
        })?;
        let fd = rx
            .recv()
            .map_err(|_| NetnsError::Panicked(ns.to_owned()))??;
        Ok(Responder {
            stop,
            fd,
            handle: Some(handle),
        })
    }
}

fn serve(listener: &TcpListener, stop: &AtomicBool) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut conn) = conn else { continue };
        if let Ok(SocketAddr::V4(peer)) = conn.peer_addr() {
            let _ = conn.write_all(format!("{}\n", peer.ip()).as_bytes());
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // shutdown(2) on a listening socket wakes a blocked accept on Linux; the listener itself
        // is closed by its thread.
        // SAFETY: the fd belongs to the listener, which lives until the thread is joined below.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Outcome of one probe.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The address the responder saw us as; `None` when the probe failed.
    pub seen_as: Option<Ipv4Addr>,
    pub latency: Duration,
    pub error: Option<String>,
}

impl Probe {
    pub fn ok(&self) -> bool {
        self.seen_as.is_some()
    }
}

/// Connects from inside `from_ns` to `to`:[`PROBE_PORT`] (1 s timeout) and reads the answer.
/// A failed attempt is retried twice, so one lost first packet on a loaded machine (ARP, a
/// SYN dropped while a route appears) is not reported as broken connectivity.
pub fn probe(from_ns: &str, to: Ipv4Addr) -> Probe {
    let mut last = probe_once(from_ns, to);
    for _ in 0..2 {
        if last.ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        last = probe_once(from_ns, to);
    }
    last
}

fn probe_once(from_ns: &str, to: Ipv4Addr) -> Probe {
    let outcome = in_netns(from_ns, move || {
        let start = Instant::now();
        let addr = SocketAddr::V4(SocketAddrV4::new(to, PROBE_PORT));
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .map_err(|e| format!("read from {addr}: {e}"))?;
        let seen: Ipv4Addr = answer
            .trim()
            .parse()
            .map_err(|_| format!("bad answer {answer:?} from {addr}"))?;
        Ok::<_, String>((seen, start.elapsed()))
    });
    match outcome {
        Ok(Ok((seen, latency))) => Probe {
            seen_as: Some(seen),
            latency,
            error: None,
        },
        Ok(Err(e)) => Probe {
            seen_as: None,
            latency: Duration::ZERO,
            error: Some(e),
        },
        Err(e) => Probe {
            seen_as: None,
            latency: Duration::ZERO,
            error: Some(e.to_string()),
        },
    }
}
