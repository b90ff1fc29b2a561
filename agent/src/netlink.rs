//! Deleting "dying" host veths that DEL handed over (names starting with
//! [`vnet_api::TOMBSTONE_PREFIX`]), through rtnetlink in the agent's own network namespace.
//!
//! Deleting a veth can take the kernel tens of milliseconds (it waits for an RCU grace period);
//! doing it here, in the background, keeps it off the plugin's DEL path. The address of a dying
//! veth stays out of the pool until the link is gone, then waits out the cooldown: a new pod never
//! shares an address with a link that may still carry the old pod's packets.
//!
//! The agent never switches namespaces: it is started in the node's namespace and opens its
//! netlink socket there. Tests hand a [`Rtnetlink`] a handle opened inside a private namespace.

use async_trait::async_trait;
use futures::TryStreamExt;
use netlink_packet_route::link::LinkAttribute;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("netlink: {message} (errno {errno})")]
    Kernel { errno: i32, message: String },
    #[error("netlink: {0}")]
    Other(String),
}

impl LinkError {
    fn from_rtnetlink(e: rtnetlink::Error) -> LinkError {
        match e {
            rtnetlink::Error::NetlinkError(msg) => LinkError::Kernel {
                errno: msg.raw_code().abs(),
                message: msg.to_io().to_string(),
            },
            other => LinkError::Other(other.to_string()),
        }
    }

    fn is_not_found(&self) -> bool {
        matches!(self, LinkError::Kernel { errno, .. } if *errno == libc::ENODEV || *errno == libc::ENOENT)
    }
}

#[async_trait]
pub trait LinkOps: Send + Sync + 'static {
    /// Deletes the link; a link that does not exist is success.
    async fn delete_link(&self, name: &str) -> Result<(), LinkError>;
    /// Names of the links whose name starts with `prefix`.
    async fn links_with_prefix(&self, prefix: &str) -> Result<Vec<String>, LinkError>;
}

/// The real thing: a route-netlink socket in the namespace it was opened in.
pub struct Rtnetlink {
    handle: rtnetlink::Handle,
}

impl Rtnetlink {
    /// Opens a socket in the calling thread's namespace; its connection task runs on the current
    /// tokio runtime.
    pub fn open() -> std::io::Result<Rtnetlink> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Rtnetlink { handle })
    }

    pub fn from_handle(handle: rtnetlink::Handle) -> Rtnetlink {
        Rtnetlink { handle }
    }
}

#[async_trait]
impl LinkOps for Rtnetlink {
    async fn delete_link(&self, name: &str) -> Result<(), LinkError> {
        let found = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute()
            .try_next()
            .await;
        let index = match found {
            Ok(Some(link)) => link.header.index,
            Ok(None) => return Ok(()),
            Err(e) => {
                let e = LinkError::from_rtnetlink(e);
                return if e.is_not_found() { Ok(()) } else { Err(e) };
            }
        };
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = LinkError::from_rtnetlink(e);
                if e.is_not_found() { Ok(()) } else { Err(e) }
            }
        }
    }

    async fn links_with_prefix(&self, prefix: &str) -> Result<Vec<String>, LinkError> {
        let mut links = self.handle.link().get().execute();
        let mut names = Vec::new();
        while let Some(link) = links.try_next().await.map_err(LinkError::from_rtnetlink)? {
            for attr in link.attributes {
                if let LinkAttribute::IfName(name) = attr
                    && name.starts_with(prefix)
                {
                    names.push(name);
                }
            }
        }
        Ok(names)
    }
}

/// For `manage_host = false`: the agent touches no link, and every dying veth counts as gone.
pub struct NoLinks;

#[async_trait]
impl LinkOps for NoLinks {
    async fn delete_link(&self, _name: &str) -> Result<(), LinkError> {
        Ok(())
    }

    async fn links_with_prefix(&self, _prefix: &str) -> Result<Vec<String>, LinkError> {
        Ok(Vec::new())
    }
}

/// A recording fake for tests: holds a set of link names.
#[derive(Default)]
pub struct FakeLinks {
    pub links: std::sync::Mutex<std::collections::BTreeSet<String>>,
    pub deleted: std::sync::Mutex<Vec<String>>,
    /// While true, deletions fail with EBUSY.
    pub busy: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl LinkOps for FakeLinks {
    async fn delete_link(&self, name: &str) -> Result<(), LinkError> {
        if self.busy.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(LinkError::Kernel {
                errno: libc::EBUSY,
                message: "busy".into(),
            });
        }
        self.links.lock().unwrap().remove(name);
        self.deleted.lock().unwrap().push(name.to_owned());
        Ok(())
    }

    async fn links_with_prefix(&self, prefix: &str) -> Result<Vec<String>, LinkError> {
        Ok(self
            .links
            .lock()
            .unwrap()
            .iter()
            .filter(|n| n.starts_with(prefix))
            .cloned()
            .collect())
    }
}
