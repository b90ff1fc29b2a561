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

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::TryStreamExt;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// The first of [`REAP_SLOTS`] interface groups the agent moves tombstones into right before it
/// deletes each group with one request ("vdl" + 1 in ASCII). Reserved for this: any link in
/// them is deleted with a batch, so nothing else on the node may use them.
pub const REAP_GROUP: u32 = 0x7664_6c31;
/// Deletions the agent keeps in the kernel at once, each on its own netlink socket and thread.
/// Concurrent requests overlap their grace-period waits (20 `ip link del` in parallel take ~80
/// ms where one after the other take ~450 ms); each also deletes a whole batch.
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
    /// Blocking sockets for batch deletions, one per slot: a deletion blocks its caller in the
    /// kernel for ~20 ms, so it runs on a blocking thread, never on a runtime worker.
    deleters: Arc<Mutex<Vec<Deleter>>>,
}

impl Rtnetlink {
    /// Opens the sockets in the calling thread's namespace; the connection task runs on the
    /// current tokio runtime.
    pub fn open() -> std::io::Result<Rtnetlink> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        let deleters = (0..REAP_SLOTS)
            .map(|i| Deleter::open(REAP_GROUP + i as u32))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Rtnetlink {
            handle,
            deleters: Arc::new(Mutex::new(deleters)),
        })
    }

    /// Uses `handle` only (batches fall back to one request per link).
    pub fn from_handle(handle: rtnetlink::Handle) -> Rtnetlink {
        Rtnetlink {
            handle,
            deleters: Arc::default(),
        }
    }
}

/// A blocking route-netlink socket that deletes batches: every link joins the socket's own
/// interface group, then the group is deleted with one `RTM_DELLINK`, so the kernel unregisters
/// them together and they share one set of grace periods.
struct Deleter {
    socket: Socket,
    group: u32,
    seq: u32,
}

impl Deleter {
    fn open(group: u32) -> std::io::Result<Deleter> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Deleter {
            socket,
            group,
            seq: 0,
        })
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&mut self, msg: RouteNetlinkMessage) -> Result<(), LinkError> {
        self.seq = self.seq.wrapping_add(1);
        let mut nl = NetlinkMessage::from(msg);
        nl.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        nl.header.sequence_number = self.seq;
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        let io = |e: std::io::Error| LinkError::Other(e.to_string());
        self.socket.send(&buf, 0).map_err(io)?;
        loop {
            let (data, _) = self.socket.recv_from_full().map_err(io)?;
            let mut offset = 0;
            while offset < data.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                    .map_err(|e| LinkError::Other(e.to_string()))?;
                let len = reply.header.length as usize;
                if reply.header.sequence_number == self.seq
                    && let NetlinkPayload::Error(e) = reply.payload
                {
                    return match e.code {
                        None => Ok(()),
                        Some(code) => Err(LinkError::Kernel {
                            errno: code.get().abs(),
                            message: e.to_io().to_string(),
                        }),
                    };
                }
                if len == 0 {
                    break;
                }
                offset += len;
            }
        }
    }

    /// `RTM_DELLINK` by name; a link that is not there is success.
    fn delete_by_name(&mut self, name: &str) -> Result<(), LinkError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        match self.request(RouteNetlinkMessage::DelLink(msg)) {
            Err(e) if e.is_not_found() => Ok(()),
            other => other,
        }
    }

    fn delete_batch(&mut self, names: &[String]) -> Vec<Result<(), LinkError>> {
        if names.len() == 1 {
            return vec![self.delete_by_name(&names[0])];
        }
        let mut results: Vec<Option<Result<(), LinkError>>> = Vec::with_capacity(names.len());
        let mut grouped = 0;
        for name in names {
            let mut join = LinkMessage::default();
            join.attributes.push(LinkAttribute::IfName(name.clone()));
            join.attributes.push(LinkAttribute::Group(self.group));
            match self.request(RouteNetlinkMessage::SetLink(join)) {
                Ok(()) => {
                    grouped += 1;
                    results.push(None);
                }
                // Already gone: nothing to delete.
                Err(e) if e.is_not_found() => results.push(Some(Ok(()))),
                Err(e) => results.push(Some(Err(e))),
            }
        }
        if grouped > 0 {
            // Index 0 and IFLA_GROUP: the kernel deletes every link of the group at once.
            let mut del = LinkMessage::default();
            del.attributes.push(LinkAttribute::Group(self.group));
            match self.request(RouteNetlinkMessage::DelLink(del)) {
                // ENODEV: none of them is left in the group (deleted meanwhile).
                Err(e) if !e.is_not_found() => {
                    tracing::warn!(error = %e, links = grouped, "deleting the batch failed; one by one");
                    for (name, result) in names.iter().zip(results.iter_mut()) {
                        if result.is_none() {
                            *result = Some(self.delete_by_name(name));
                        }
                    }
                }
                _ => {}
            }
        }
        results.into_iter().map(|r| r.unwrap_or(Ok(()))).collect()
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

    /// Deletes the batch on one of the blocking sockets (see [`Deleter`]); without a free one,
    /// one request per link on the async handle.
    async fn delete_links(&self, names: &[String]) -> Vec<Result<(), LinkError>> {
        let deleter = self.deleters.lock().unwrap().pop();
        let Some(mut deleter) = deleter else {
            let mut results = Vec::with_capacity(names.len());
            for name in names {
                results.push(self.delete_link(name).await);
            }
            return results;
        };
        let n = names.len();
        let names = names.to_vec();
        let pool = self.deleters.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let results = deleter.delete_batch(&names);
            pool.lock().unwrap().push(deleter);
            results
        })
        .await;
        joined.unwrap_or_else(|e| {
            (0..n)
                .map(|_| Err(LinkError::Other(format!("deletion thread failed: {e}"))))
                .collect()
        })
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
