//! The lab's VNet fabric: a host route `<ip>/32 via <VM primary address>` (`<base>/28` for a block) in the mock's own network
//! namespace for every secondary address. Changes run in order on one task; `flush` waits for them.

use std::time::Duration;

use tokio::process::Command;
use tokio::sync::{mpsc, oneshot};

use crate::model::RouteChange;

const IP_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

enum Command_ {
    Change(RouteChange),
    Flush(oneshot::Sender<()>),
}

#[derive(Clone)]
pub struct Fabric {
    tx: mpsc::UnboundedSender<Command_>,
}

impl Fabric {
    pub fn start() -> Fabric {
        let (tx, mut rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(command) = rx.recv().await {
                match command {
                    Command_::Change(change) => apply(&change).await,
                    Command_::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        Fabric { tx }
    }

    /// Queues changes; call while holding the state lock so the order matches the state's.
    pub fn submit(&self, changes: impl IntoIterator<Item = RouteChange>) {
        for change in changes {
            let _ = self.tx.send(Command_::Change(change));
        }
    }

    /// Waits until every change queued so far has been applied (or has failed and been logged).
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Command_::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

async fn apply(change: &RouteChange) {
    let args: Vec<String> = match change {
        RouteChange::Replace { ip, len, via } => {
            vec![
                "route".into(),
                "replace".into(),
                format!("{ip}/{len}"),
                "via".into(),
                via.to_string(),
            ]
        }
        RouteChange::Delete { ip, len } => {
            vec!["route".into(), "del".into(), format!("{ip}/{len}")]
        }
    };
    let mut command = Command::new("ip");
    command.args(&args).kill_on_drop(true);
    match tokio::time::timeout(IP_COMMAND_TIMEOUT, command.output()).await {
        Ok(Ok(output)) if output.status.success() => {
            tracing::debug!(?change, "fabric route applied");
        }
        Ok(Ok(output)) => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            // Deleting a route that is already gone is the state we want.
            if matches!(change, RouteChange::Delete { .. }) && stderr.contains("No such process") {
                tracing::debug!(?change, "fabric route already absent");
            } else {
                tracing::warn!(?change, stderr = %stderr.trim(), "ip {} failed", args.join(" "));
            }
        }
        Ok(Err(error)) => tracing::warn!(?change, %error, "cannot run ip"),
        Err(_) => tracing::warn!(?change, "ip {} timed out", args.join(" ")),
    }
}
