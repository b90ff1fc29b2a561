//! The one place where the lab switches network namespaces inside its own process: a closure runs
//! on a fresh std thread that enters the namespace and then exits, so no other thread (and no
//! pooled thread) ever finds itself in the wrong namespace. Sockets opened there stay bound to
//! that namespace after the thread is gone.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::exec::netns_path;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot enter network namespace {ns}: {source}")]
    Enter {
        ns: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot write sysctl {key} in {ns}: {source}")]
    Sysctl {
        ns: String,
        key: String,
        #[source]
        source: io::Error,
    },
    #[error("the thread working in network namespace {0} panicked")]
    Panicked(String),
}

/// Enters `ns` on the calling thread. Only for threads that never leave it again.
fn enter(ns: &str) -> Result<(), NetnsError> {
    let err = |source| NetnsError::Enter {
        ns: ns.to_owned(),
        source,
    };
    let handle = File::open(netns_path(ns)).map_err(err)?;
    // SAFETY: setns(2) on a valid fd we own; it only changes this thread's network namespace.
    if unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(())
}

/// Runs `f` inside the network namespace `ns` on a dedicated thread and returns its value.
pub fn in_netns<T, F>(ns: &str, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let name = ns.to_owned();
    std::thread::spawn(move || -> Result<T, NetnsError> {
        enter(&name)?;
        Ok(f())
    })
    .join()
    .map_err(|_| NetnsError::Panicked(ns.to_owned()))?
}

/// Starts a long-lived thread inside `ns` running `f`. The thread stays in `ns` until it ends.
pub fn spawn_in_netns<F>(ns: &str, f: F) -> Result<std::thread::JoinHandle<()>, NetnsError>
where
    F: FnOnce() + Send + 'static,
{
    let name = ns.to_owned();
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || match enter(&name) {
        Ok(()) => {
            let _ = tx.send(Ok(()));
            f();
        }
        Err(e) => {
            let _ = tx.send(Err(e));
        }
    });
    rx.recv()
        .map_err(|_| NetnsError::Panicked(ns.to_owned()))??;
    Ok(handle)
}

/// Writes a sysctl (e.g. `net/ipv4/ip_forward`) inside `ns`; /proc/sys/net shows the namespace of
/// the thread that opens it.
pub fn sysctl(ns: &str, key: &str, value: &str) -> Result<(), NetnsError> {
    let path = Path::new("/proc/sys").join(key);
    let value = value.to_owned();
    in_netns(ns, move || fs::write(path, value))?.map_err(|source| NetnsError::Sysctl {
        ns: ns.to_owned(),
        key: key.to_owned(),
        source,
    })
}
