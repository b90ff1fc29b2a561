//! Batch deletion of dying veths, answered as soon as the kernel has unlisted them.
//!
//! A deletion request does two things in the kernel. Under the RTNL lock it closes the links,
//! takes them out of their namespaces' lists (both ends of a veth in the same step), removes
//! their addresses and routes and sends `RTM_DELLINK` for each. Then, with the lock released,
//! `netdev_run_todo` waits in `rcu_barrier()` (~15-20 ms here: a full RCU grace period) before it
//! frees them, and only then does the request's `sendmsg` return. During that second part nothing
//! of the links can be seen or used in any namespace. So a batch is answered once the listener
//! has seen the `RTM_DELLINK` of every link in it, by interface index (a few ms after the
//! request), while the
//! request's own thread and socket wait out the kernel in the background. A lost notification
//! (a full socket buffer) only means that batch is answered by the request's acknowledgement.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{LinkAttribute, LinkExtentMask, LinkMessage};
use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::TimeVal;
use rtnetlink::packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use tokio::sync::{Semaphore, oneshot};

use super::{LinkError, REAP_GROUP, REAP_SLOTS};

/// Requests that may be in the kernel at once, each on its own socket and blocking thread. Far
/// more than [`REAP_SLOTS`]: a request whose batch was answered still waits out its grace period
/// (~20 ms); only a kernel that hangs fills them all, and then new batches wait.
const MAX_REQUESTS: usize = 16;

/// The link-notification multicast group (`RTMGRP_LINK`).
const RTMGRP_LINK: u32 = 1;

type Results = Vec<Result<(), LinkError>>;

/// What a request thread hands back once its links are in the group and its request is about
/// to be sent: the links that could not join (`Some`), and the listener's "all unlisted".
type Joined = (Vec<Option<Result<(), LinkError>>>, oneshot::Receiver<()>);

/// Sockets, interface groups and the unlist listener of one namespace.
pub(super) struct Batches {
    idle: Arc<Mutex<Vec<Deleter>>>,
    requests: Arc<Semaphore>,
    groups: Mutex<Vec<u32>>,
    free_groups: Semaphore,
    gone: Arc<GoneWatch>,
}

impl Batches {
    /// Opens the listener in the calling thread's namespace (where the links are).
    pub(super) fn open() -> std::io::Result<Batches> {
        Ok(Batches {
            idle: Arc::default(),
            requests: Arc::new(Semaphore::new(MAX_REQUESTS)),
            groups: Mutex::new((0..REAP_SLOTS as u32).map(|i| REAP_GROUP + i).collect()),
            free_groups: Semaphore::new(REAP_SLOTS),
            gone: GoneWatch::start()?,
        })
    }

    /// Deletes `names` with one request; returns once every link is unlisted (or the request
    /// has ended). One result per name, in order.
    pub(super) async fn delete(&self, names: &[String]) -> Results {
        let failed = |e: &str| {
            names
                .iter()
                .map(|_| Err(LinkError::Other(e.to_owned())))
                .collect::<Results>()
        };
        // A group is in use only until its links are unlisted, not while the request waits out
        // the kernel: then no link is left in it.
        let Ok(_group_permit) = self.free_groups.acquire().await else {
            return failed("closed");
        };
        let group = self
            .groups
            .lock()
            .unwrap()
            .pop()
            .expect("a group per permit");
        let _give_back = GroupBack(&self.groups, group);
        let Ok(request) = self.requests.clone().acquire_owned().await else {
            return failed("closed");
        };
        let idle = self.idle.lock().unwrap().pop();
        let mut deleter = match idle {
            Some(d) => d,
            None => match Deleter::open() {
                Ok(d) => d,
                Err(e) => return failed(&format!("cannot open a netlink socket: {e}")),
            },
        };
        let (joined_tx, joined_rx) = oneshot::channel::<Joined>();
        let names_owned = names.to_vec();
        let (gone, idle) = (self.gone.clone(), self.idle.clone());
        let mut request_done = tokio::task::spawn_blocking(move || {
            let results = deleter.delete_batch(&names_owned, group, &gone, joined_tx);
            idle.lock().unwrap().push(deleter);
            drop(request);
            results
        });
        let ended = |r: Result<Results, tokio::task::JoinError>| {
            r.unwrap_or_else(|e| failed(&format!("deletion thread failed: {e}")))
        };
        let Ok((partial, unlisted)) = joined_rx.await else {
            // Nothing joined the group (all gone or failed), or the thread failed.
            return ended(request_done.await);
        };
        tokio::select! {
            biased;
            r = &mut request_done => ended(r),
            Ok(()) = unlisted => partial.into_iter().map(|r| r.unwrap_or(Ok(()))).collect(),
        }
    }
}

/// Returns an interface group to the pool when the batch that used it is answered.
struct GroupBack<'a>(&'a Mutex<Vec<u32>>, u32);

impl Drop for GroupBack<'_> {
    fn drop(&mut self) {
        self.0.lock().unwrap().push(self.1);
    }
}

/// A blocking route-netlink socket that deletes batches: every link joins an interface group
/// (one `RTM_SETLINK` each), then the group is deleted with one `RTM_DELLINK`, so the kernel
/// unregisters them together and they share one set of grace periods.
pub(super) struct Deleter {
    socket: Socket,
    seq: u32,
}

impl Deleter {
    pub(super) fn open() -> std::io::Result<Deleter> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Deleter { socket, seq: 0 })
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&mut self, msg: RouteNetlinkMessage) -> Result<(), LinkError> {
        self.exchange(msg).map(|_| ())
    }

    /// Sends one request and waits for its acknowledgement; the index of the link the kernel
    /// answered with, if it answered with one (`RTM_GETLINK`).
    fn exchange(&mut self, msg: RouteNetlinkMessage) -> Result<Option<u32>, LinkError> {
        self.seq = self.seq.wrapping_add(1);
        let mut nl = NetlinkMessage::from(msg);
        nl.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        nl.header.sequence_number = self.seq;
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        let io = |e: std::io::Error| LinkError::Other(e.to_string());
        self.socket.send(&buf, 0).map_err(io)?;
        let mut index = None;
        loop {
            let (data, _) = self.socket.recv_from_full().map_err(io)?;
            let mut offset = 0;
            while offset < data.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                    .map_err(|e| LinkError::Other(e.to_string()))?;
                let len = reply.header.length as usize;
                if reply.header.sequence_number == self.seq {
                    match reply.payload {
                        NetlinkPayload::Error(e) => {
                            return match e.code {
                                None => Ok(index),
                                Some(code) => Err(LinkError::Kernel {
                                    errno: code.get().abs(),
                                    message: e.to_io().to_string(),
                                }),
                            };
                        }
                        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                            index = Some(link.header.index);
                        }
                        _ => {}
                    }
                }
                if len == 0 {
                    break;
                }
                offset += len;
            }
        }
    }

    /// The index of the link named `name` (ENODEV when there is none).
    fn index_of(&mut self, name: &str) -> Result<u32, LinkError> {
        let mut get = LinkMessage::default();
        get.attributes.push(LinkAttribute::IfName(name.to_owned()));
        // Only the index is read: spare the kernel filling in the counters.
        get.attributes
            .push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
        self.exchange(RouteNetlinkMessage::GetLink(get))?
            .ok_or_else(|| LinkError::Other(format!("no link in the answer for {name}")))
    }

    /// Moves link `index` into `group`; returns the index.
    fn join(&mut self, index: u32, group: u32) -> Result<u32, LinkError> {
        let mut join = LinkMessage::default();
        join.header.index = index;
        join.attributes.push(LinkAttribute::Group(group));
        self.request(RouteNetlinkMessage::SetLink(join))
            .map(|()| index)
    }

    /// `RTM_DELLINK` by name; a link that is not there is success.
    pub(super) fn delete_by_name(&mut self, name: &str) -> Result<(), LinkError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        match self.request(RouteNetlinkMessage::DelLink(msg)) {
            Err(e) if e.is_not_found() => Ok(()),
            other => other,
        }
    }

    /// Moves the links into `group` and deletes the group. Right before the deletion is sent,
    /// `joined` gets the links that could not join and a receiver that fires once the listener
    /// has seen every other link unlisted; this returns when the kernel is done.
    fn delete_batch(
        &mut self,
        names: &[String],
        group: u32,
        gone: &GoneWatch,
        joined: oneshot::Sender<Joined>,
    ) -> Results {
        let mut results: Vec<Option<Result<(), LinkError>>> = Vec::with_capacity(names.len());
        let mut members = HashSet::new();
        for name in names {
            // By index from here on: the batch waits for the unlisting of these very links, not
            // of a later link that took the same name.
            match self
                .index_of(name)
                .and_then(|index| self.join(index, group))
            {
                Ok(index) => {
                    members.insert(index);
                    results.push(None);
                }
                // Already gone: nothing to delete.
                Err(e) if e.is_not_found() => results.push(Some(Ok(()))),
                Err(e) => results.push(Some(Err(e))),
            }
        }
        if members.is_empty() {
            return results.into_iter().map(|r| r.unwrap_or(Ok(()))).collect();
        }
        let grouped = members.len();
        let (id, unlisted) = gone.watch(group, members);
        let _ = joined.send((
            results
                .iter()
                .map(|r| r.as_ref().map(clone_result))
                .collect(),
            unlisted,
        ));
        // Index 0 and IFLA_GROUP: the kernel deletes every link of the group at once.
        let mut del = LinkMessage::default();
        del.attributes.push(LinkAttribute::Group(group));
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
        gone.forget(id);
        results.into_iter().map(|r| r.unwrap_or(Ok(()))).collect()
    }
}

fn clone_result(r: &Result<(), LinkError>) -> Result<(), LinkError> {
    match r {
        Ok(()) => Ok(()),
        Err(LinkError::Kernel { errno, message }) => Err(LinkError::Kernel {
            errno: *errno,
            message: message.clone(),
        }),
        Err(LinkError::Other(m)) => Err(LinkError::Other(m.clone())),
    }
}

/// Listens to the namespace's link notifications and tells each waiting batch when every link of
/// it has been unlisted (`RTM_DELLINK` with its index, in its group). By index, not by name: the
/// listener may read a notification late, and the late `RTM_DELLINK` of an earlier link with the
/// same tombstone name (the same container and interface added and deleted again meanwhile), in
/// a group used again, must not answer the batch of the link that replaced it.
#[derive(Default)]
struct GoneWatch {
    waiters: Mutex<Vec<Waiter>>,
    next_id: AtomicU64,
}

struct Waiter {
    id: u64,
    group: u32,
    /// Indexes of the links not seen unlisted yet.
    left: HashSet<u32>,
    tx: oneshot::Sender<()>,
}

impl GoneWatch {
    /// Subscribes in the calling thread's namespace; the listener thread ends when the watch is
    /// dropped (it looks once a second).
    fn start() -> std::io::Result<Arc<GoneWatch>> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind(&SocketAddr::new(0, RTMGRP_LINK))?;
        // Every link change on the node is multicast here (ADDs too): room for bursts.
        let _ = socket.set_rx_buf_sz(1 << 20);
        setsockopt(&socket, sockopt::ReceiveTimeout, &TimeVal::new(1, 0))?;
        let watch = Arc::new(GoneWatch::default());
        let weak = Arc::downgrade(&watch);
        std::thread::Builder::new()
            .name("vnet-unlisted".into())
            .spawn(move || listen(socket, weak))?;
        Ok(watch)
    }

    /// Registers a batch before its deletion is sent.
    fn watch(&self, group: u32, left: HashSet<u32>) -> (u64, oneshot::Receiver<()>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().unwrap().push(Waiter {
            id,
            group,
            left,
            tx,
        });
        (id, rx)
    }

    /// The request ended: whatever was not seen no longer matters.
    fn forget(&self, id: u64) {
        self.waiters.lock().unwrap().retain(|w| w.id != id);
    }

    fn unlisted(&self, index: u32, group: u32) {
        let mut waiters = self.waiters.lock().unwrap();
        let mut i = 0;
        while i < waiters.len() {
            let w = &mut waiters[i];
            if w.group == group && w.left.remove(&index) && w.left.is_empty() {
                let _ = waiters.swap_remove(i).tx.send(());
            } else {
                i += 1;
            }
        }
    }
}

fn listen(socket: Socket, watch: Weak<GoneWatch>) {
    loop {
        let data = match socket.recv_from_full() {
            Ok((data, _)) => data,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if watch.strong_count() == 0 {
                    return;
                }
                continue;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                // Notifications were dropped: batches waiting for them are answered by their
                // request's acknowledgement instead.
                tracing::debug!("link notifications overran the socket buffer");
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "link notification listener stopped; DELs are answered when the kernel is done");
                return;
            }
        };
        let Some(watch) = watch.upgrade() else {
            return;
        };
        for (index, group) in unlisted_links(&data) {
            watch.unlisted(index, group);
        }
    }
}

/// The (index, group) of every `RTM_DELLINK` in a buffer of notifications.
fn unlisted_links(data: &[u8]) -> Vec<(u32, u32)> {
    let mut found = Vec::new();
    let mut offset = 0;
    while offset < data.len() {
        let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..]) else {
            break;
        };
        let len = msg.header.length as usize;
        if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) = msg.payload {
            let group = link.attributes.iter().find_map(|a| match a {
                LinkAttribute::Group(g) => Some(*g),
                _ => None,
            });
            found.push((link.header.index, group.unwrap_or(0)));
        }
        if len == 0 {
            break;
        }
        offset += len;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notification(msg: RouteNetlinkMessage) -> Vec<u8> {
        let mut nl = NetlinkMessage::from(msg);
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        buf
    }

    fn link(name: &str, index: u32, group: u32) -> LinkMessage {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        msg.attributes.push(LinkAttribute::Group(group));
        msg
    }

    fn indexes(i: &[u32]) -> HashSet<u32> {
        i.iter().copied().collect()
    }

    #[test]
    fn only_dellink_notifications_count_as_unlisted() {
        let mut data = notification(RouteNetlinkMessage::NewLink(link("vdela", 7, REAP_GROUP)));
        data.extend(notification(RouteNetlinkMessage::DelLink(link(
            "vdela", 7, REAP_GROUP,
        ))));
        data.extend(notification(RouteNetlinkMessage::DelLink(link(
            "eth0", 2, 0,
        ))));
        assert_eq!(unlisted_links(&data), vec![(7, REAP_GROUP), (2, 0)]);
    }

    #[tokio::test]
    async fn a_batch_is_unlisted_once_all_its_links_are_seen_in_its_group() {
        let watch = GoneWatch::default();
        let (_, mut first) = watch.watch(REAP_GROUP, indexes(&[7, 8]));
        let (other, mut second) = watch.watch(REAP_GROUP + 1, indexes(&[9]));
        watch.unlisted(7, REAP_GROUP);
        // Same index, another group: not this batch's link.
        watch.unlisted(8, REAP_GROUP + 1);
        assert!(first.try_recv().is_err(), "link 8 is not unlisted yet");
        watch.unlisted(8, REAP_GROUP);
        assert!(first.try_recv().is_ok());
        // A batch whose request ended is forgotten: its sender is dropped.
        watch.forget(other);
        assert!(matches!(
            second.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert!(watch.waiters.lock().unwrap().is_empty());
    }

    /// The same container and interface added and deleted again within the listener's lag: the
    /// new tombstone has the old one's name and its batch may get the old batch's group. The
    /// old link's late `RTM_DELLINK`, read from the listener's socket after the new batch was
    /// registered, must not answer the new batch while its link is still there.
    #[tokio::test]
    async fn a_late_notification_of_an_earlier_link_with_the_same_name_answers_nothing() {
        let watch = GoneWatch::default();
        // The new batch: tombstone "vdela", now link 12, in the group the old batch used.
        let (_, mut batch) = watch.watch(REAP_GROUP, indexes(&[12]));
        // Read late: the old "vdela" (link 7) in the same group.
        let late = notification(RouteNetlinkMessage::DelLink(link("vdela", 7, REAP_GROUP)));
        for (index, group) in unlisted_links(&late) {
            watch.unlisted(index, group);
        }
        assert!(
            batch.try_recv().is_err(),
            "answered by another link's notification"
        );
        let own = notification(RouteNetlinkMessage::DelLink(link("vdela", 12, REAP_GROUP)));
        for (index, group) in unlisted_links(&own) {
            watch.unlisted(index, group);
        }
        assert!(batch.try_recv().is_ok());
    }
}
