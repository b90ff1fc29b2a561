//! The only module that switches network namespaces.
//!
//! A netlink socket stays bound to the namespace it was created in. So to work inside a pod's
//! namespace we create the socket on a fresh std thread that enters the namespace and then exits
//! (a thread that changed namespace is never reused), and drive the socket from the tokio runtime
//! in the caller's namespace. Tokio threads never call setns.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, RawFd};

use nix::sched::CloneFlags;
use rtnetlink::Handle;
use rtnetlink::sys::{Socket, TokioSocket, protocols::NETLINK_ROUTE};

/// An open network namespace (a file under /var/run/netns or /proc/PID/ns/net).
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: String,
}

impl Netns {
    pub fn open(path: &str) -> io::Result<Netns> {
        let file = File::open(path)?;
        Ok(Netns {
            file,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// For netlink requests that move a link into this namespace (`IFLA_NET_NS_FD`).
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Opens a route-netlink connection inside this namespace. Must be called within a tokio
    /// runtime: the connection task is spawned on it.
    pub async fn netlink(&self) -> io::Result<Handle> {
        let ns = self.file.try_clone()?;
        let (tx, rx) = futures::channel::oneshot::channel();
        std::thread::Builder::new()
            .name("vnet-netns".into())
            .spawn(move || {
                let socket = nix::sched::setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)
                    .and_then(|()| Socket::new(NETLINK_ROUTE));
                // The thread exits now, still inside the pod's namespace: nothing else runs on it.
                let _ = tx.send(socket);
            })?;
        let socket = rx
            .await
            .map_err(|_| io::Error::other("namespace thread died"))??;
        Ok(spawn_connection(socket))
    }
}

/// A route-netlink connection in the caller's own namespace (the node's).
pub fn host_netlink() -> io::Result<Handle> {
    Ok(spawn_connection(Socket::new(NETLINK_ROUTE)?))
}

fn spawn_connection(socket: Socket) -> Handle {
    // SAFETY: the fd comes straight from a netlink socket we own; into_raw_fd gives up ownership,
    // so the TokioSocket becomes its only owner.
    let socket = unsafe { TokioSocket::from_raw_fd(socket.into_raw_fd()) };
    let (conn, handle, _) = rtnetlink::from_socket(socket);
    tokio::spawn(conn);
    handle
}
