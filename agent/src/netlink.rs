//! Deleting "dying" host veths that DEL handed over (names starting with
//! [`vnet_api::TOMBSTONE_PREFIX`]), through rtnetlink in the agent's own network namespace.
//!
//! Deleting a veth costs the kernel ~20 ms, mostly RCU grace periods, and DEL waits for it (the
//! pod's end must be gone when DEL returns). Deletions that are one netlink request share those
//! grace periods: every tombstone pending at once is put in the interface group [`REAP_GROUP`]
//! and the group is deleted with one `RTM_DELLINK` (20 veths in ~28 ms instead of ~400 ms). The
//! address of a dying veth stays out of the pool until the link is gone, then waits out the
//! cooldown: a new pod never shares an address with a link that may still carry the old pod's
//! packets.
//!
//! The agent never switches namespaces: it is started in the node's namespace and opens its
//! netlink socket there. Tests hand a [`Rtnetlink`] a handle opened inside a private namespace.

use async_trait::async_trait;
use futures::TryStreamExt;
use netlink_packet_route::link::LinkAttribute;
use rtnetlink::LinkUnspec;

/// The interface group the agent moves tombstones into right before it deletes them all with one
/// request ("vdl" + 1 in ASCII). Reserved for this: any link in it is deleted with the batch, so
/// nothing else on the node may use it.
pub const REAP_GROUP: u32 = 0x7664_6c31;

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

    /// Puts every link in [`REAP_GROUP`], then deletes the group with one request, so the kernel
    /// unregisters them together. A link that could not join the group, or a group deletion that
    /// failed, falls back to deleting one by one.
    async fn delete_links(&self, names: &[String]) -> Vec<Result<(), LinkError>> {
        if names.len() == 1 {
            return vec![self.delete_link(&names[0]).await];
        }
        let mut results: Vec<Option<Result<(), LinkError>>> = Vec::with_capacity(names.len());
        let mut grouped = 0;
        for name in names {
            let join = LinkUnspec::new_with_name(name)
                .link_group(REAP_GROUP)
                .build();
            match self.handle.link().set(join).execute().await {
                Ok(()) => {
                    grouped += 1;
                    results.push(None);
                }
                Err(e) => {
                    let e = LinkError::from_rtnetlink(e);
                    // Already gone: nothing to delete.
                    results.push(Some(if e.is_not_found() { Ok(()) } else { Err(e) }));
                }
            }
        }
        if grouped > 0 {
            // Index 0 and IFLA_GROUP: the kernel deletes every link of the group at once.
            let mut request = self.handle.link().del(0);
            request
                .message_mut()
                .attributes
                .push(LinkAttribute::Group(REAP_GROUP));
            let deleted = match request.execute().await {
                Ok(()) => Ok(()),
                Err(e) => {
                    let e = LinkError::from_rtnetlink(e);
                    // ENODEV: none of them is left in the group (deleted meanwhile).
                    if e.is_not_found() { Ok(()) } else { Err(e) }
                }
            };
            if let Err(e) = deleted {
                tracing::warn!(error = %e, links = grouped, "deleting the batch failed; one by one");
                for (name, result) in names.iter().zip(results.iter_mut()) {
                    if result.is_none() {
                        *result = Some(self.delete_link(name).await);
                    }
                }
            }
        }
        results.into_iter().map(|r| r.unwrap_or(Ok(()))).collect()
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
