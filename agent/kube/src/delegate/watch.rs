//! The watch of the node's own NodeIPPool: the latest request and answer, for every waiter.

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;
use tracing::warn;

use super::ClusterProvider;
use crate::crd::{CloudAnswer, CloudRequest, NodeIPPool};

/// The last state of the node's NodeIPPool the watch delivered.
#[derive(Debug, Clone, Default)]
pub(super) struct Seen {
    /// The watch has listed at least once.
    pub(super) synced: bool,
    pub(super) exists: bool,
    pub(super) request: Option<CloudRequest>,
    pub(super) answer: Option<CloudAnswer>,
}

/// What the watch task and the callers share, once the node's name is known.
pub(super) struct NodeCtx {
    pub(super) name: String,
    pub(super) pools: Api<NodeIPPool>,
    pub(super) seen: watch::Receiver<Seen>,
    pub(super) _watch: AbortOnDrop,
}

pub(super) struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl ClusterProvider {
    pub(super) fn start_watch(&self, name: String) -> NodeCtx {
        let pools: Api<NodeIPPool> = Api::all(self.client.clone());
        let (tx, rx) = watch::channel(Seen::default());
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let stream = watcher(pools.clone(), config).default_backoff();
        let node = name.clone();
        let task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let mut listed: Option<NodeIPPool> = None;
            while let Some(event) = stream.next().await {
                let status = |p: &NodeIPPool| p.status.clone().unwrap_or_default();
                match event {
                    Ok(watcher::Event::Init) => listed = None,
                    Ok(watcher::Event::InitApply(p)) => listed = Some(p),
                    Ok(watcher::Event::InitDone) => {
                        let found = listed.take();
                        tx.send_modify(|s| {
                            s.synced = true;
                            s.exists = found.is_some();
                            let st = found.as_ref().map(status).unwrap_or_default();
                            s.request = st.cloud_request;
                            s.answer = st.cloud;
                        });
                    }
                    Ok(watcher::Event::Apply(p)) => {
                        let st = status(&p);
                        tx.send_modify(|s| {
                            s.exists = true;
                            s.request = st.cloud_request;
                            s.answer = st.cloud;
                        });
                    }
                    Ok(watcher::Event::Delete(_)) => tx.send_modify(|s| {
                        s.exists = false;
                        s.request = None;
                        s.answer = None;
                    }),
                    Err(e) => warn!(node = %node, error = %e, "NodeIPPool watch failed; retrying"),
                }
            }
        });
        NodeCtx {
            name,
            pools,
            seen: rx,
            _watch: AbortOnDrop(task),
        }
    }
}
