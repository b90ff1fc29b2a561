//! vnet-mockcloud: the slice of Azure that vnet-agent talks to (IMDS, ARM network interfaces,
//! long-running operations), served over HTTP with Azure's shapes, rules and errors, plus fault
//! injection and an admin API. Tests start it in-process with [`MockServer::start`]; the lab runs
//! the `vnet-mockcloud` binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub mod auth;
mod document;
pub mod fabric;
pub mod faults;
pub mod model;
#[cfg(test)]
mod prefix_tests;
pub mod rules;
pub mod scaleset;
mod server;
pub mod throttle;
pub mod topology;

pub use auth::{Principal, Principals, RoleDefinition};
pub use faults::{FaultSpec, Faults, Latency};
pub use model::{AddressView, NicView, StateView};
pub use server::Counters;
pub use throttle::{Bucket, RateLimits};
pub use topology::Topology;

#[derive(Debug, thiserror::Error)]
pub enum MockError {
    #[error("invalid topology: {0}")]
    Topology(String),
    #[error("invalid state: {0}")]
    State(String),
    #[error("invalid faults: {0}")]
    Faults(String),
    #[error("invalid principals: {0}")]
    Principals(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub struct MockConfig {
    pub topology: Topology,
    /// Load from (if present) and keep writing assignments to this file.
    pub state_file: Option<PathBuf>,
    /// Program `<ip>/32 via <vm primary ip>` routes in this process's network namespace.
    pub fabric_routes: bool,
    pub faults: Faults,
    /// Callers by bearer token, each with its permissions. `None`: no authentication and every
    /// action allowed (tests that are not about permissions).
    pub principals: Option<Principals>,
    /// ARM's throttling buckets (per principal; callers without a token share one).
    pub rate_limits: RateLimits,
}

impl MockConfig {
    pub fn new(topology: Topology) -> MockConfig {
        MockConfig {
            topology,
            state_file: None,
            fabric_routes: false,
            faults: Faults::default(),
            principals: None,
            rate_limits: RateLimits::default(),
        }
    }
}

/// A running mock. Dropping it stops the server (without the final state write of `shutdown`).
pub struct MockServer {
    addr: SocketAddr,
    app: Arc<server::App>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl MockServer {
    /// Binds `listen` (port 0 picks one) and serves until [`MockServer::shutdown`] or drop.
    pub async fn start(config: MockConfig, listen: SocketAddr) -> Result<MockServer, MockError> {
        let app = server::App::new(config).await?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|source| MockError::Io {
                context: format!("cannot listen on {listen}"),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| MockError::Io {
            context: "local address".into(),
            source,
        })?;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(server::serve(listener, app.clone(), stopped));
        tracing::info!(%addr, "vnet-mockcloud listening");
        Ok(MockServer {
            addr,
            app,
            stop: Some(stop),
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`: the ARM endpoint (and the IMDS endpoint for callers on a VM's address).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The IMDS endpoint that answers for `vm` whatever the caller's address.
    pub fn imds_endpoint(&self, vm: &str) -> String {
        format!("http://{}/vms/{vm}", self.addr)
    }

    pub fn topology(&self) -> Topology {
        self.app.topology()
    }

    pub fn set_faults(&self, faults: Faults) {
        self.app.set_faults(faults);
    }

    pub fn counters(&self) -> Counters {
        self.app.counters()
    }

    /// Replaces the throttling buckets; every principal's buckets start full again (the
    /// cluster simulation warms a cluster up unthrottled, then measures under ARM's limits).
    pub fn set_rate_limits(&self, limits: RateLimits) {
        self.app.set_rate_limits(limits);
    }

    pub fn state(&self) -> StateView {
        self.app.state()
    }

    /// Stops serving, then writes the state file one last time.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.app.persist_now().await;
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Writes `data` to `path` atomically: a temporary file in the same directory, fsync, rename,
/// fsync of the directory. A crash leaves the old file or the new one, never a torn one.
pub fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
    // Unique per call: the background writer and the final write at shutdown may overlap.
    static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{file_name}.tmp.{}.{serial}", std::process::id()));
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(data)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}
