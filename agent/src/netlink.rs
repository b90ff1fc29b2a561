//! Deleting "dying" host veths that DEL handed over (names starting with
//! [`vnet_api::TOMBSTONE_PREFIX`]), through rtnetlink in the agent's own network namespace.
//!
//! A DEL waits for its veth: the pod's end must be gone when DEL returns. Every tombstone
//! pending at once is put in an interface group ([`REAP_GROUP`]) and the group is deleted with
//! one `RTM_DELLINK`, and the batch is answered as soon as the kernel has unlisted its links
//! (its `RTM_DELLINK` notifications), not when the request returns ~15-20 ms later after an RCU
//! grace period that frees the memory ([`batch`]). The address of a dying veth stays out of the
//! pool until the link is gone, then waits out the cooldown: a new pod never shares an address
//! with a link that may still carry the old pod's packets.
//!
//! The agent never switches namespaces: it is started in the node's namespace and opens its
//! netlink socket there. Tests hand a [`Rtnetlink`] a handle opened inside a private namespace.

mod batch;

use async_trait::async_trait;
use futures::TryStreamExt;
use netlink_packet_route::link::LinkAttribute;

/// The first of [`REAP_SLOTS`] interface groups the agent moves tombstones into right before it
/// deletes each group with one request ("vdl" + 1 in ASCII). Reserved for this: any link in
/// them is deleted with a batch, so nothing else on the node may use them.
pub const REAP_GROUP: u32 = 0x7664_6c31;
/// Batches being deleted at once until their links are unlisted, one interface group each
/// (requests answered early may still wait out the kernel's grace period meanwhile, on their
/// own sockets and threads, never a runtime worker).
pub const REAP_SLOTS: usize = 4;

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
    /// Deletes several links, at best with one request; one result per name, in order.
    async fn delete_links(&self, names: &[String]) -> Vec<Result<(), LinkError>> {
        let mut results = Vec::with_capacity(names.len());
        for name in names {
            results.push(self.delete_link(name).await);
        }
        results
    }
}

/// The real thing: route-netlink sockets in the namespace they were opened in.
pub struct Rtnetlink {
    handle: rtnetlink::Handle,
    /// Batch deletions on blocking sockets, with the listener that answers them early.
    batches: Option<batch::Batches>,
}

impl Rtnetlink {
    /// Opens the sockets in the calling thread's namespace; the connection task runs on the
    /// current tokio runtime.
    pub fn open() -> std::io::Result<Rtnetlink> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Rtnetlink {
            handle,
            batches: Some(batch::Batches::open()?),
        })
    }

    /// Uses `handle` only (batches fall back to one request per link).
    pub fn from_handle(handle: rtnetlink::Handle) -> Rtnetlink {
        Rtnetlink {
            handle,
            batches: None,
        }
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

    /// Deletes the batch with one request on a blocking socket ([`batch`]), answered once every
    /// link is unlisted; without batch sockets, one request per link on the async handle.
    async fn delete_links(&self, names: &[String]) -> Vec<Result<(), LinkError>> {
        match &self.batches {
            Some(batches) => batches.delete(names).await,
            None => {
                let mut results = Vec::with_capacity(names.len());
                for name in names {
                    results.push(self.delete_link(name).await);
                }
                results
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
    /// The names of each `delete_links` call, in order.
    pub batches: std::sync::Mutex<Vec<Vec<String>>>,
    /// Each `delete_links` call first waits this long (a kernel that takes time, so that
    /// concurrent requests queue up behind it).
    pub batch_delay: std::sync::Mutex<std::time::Duration>,
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

    async fn delete_links(&self, names: &[String]) -> Vec<Result<(), LinkError>> {
        self.batches.lock().unwrap().push(names.to_vec());
        let delay = *self.batch_delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        let mut results = Vec::with_capacity(names.len());
        for name in names {
            results.push(self.delete_link(name).await);
        }
        results
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
