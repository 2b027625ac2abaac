//! The task that carries address records between the handler task and a
//! [`RecordBackend`](crate::records::RecordBackend).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::identity::PeerId;
use crate::records::RecordBackend;

/// The task that moves records between the handler task and a backend: our records out
/// as they are published, everyone's in every `interval`. It ends when the handler task
/// does (the publish channel closes, or no handle is left to send to).
pub(super) async fn pump(
    backend: Arc<dyn RecordBackend>,
    interval: Duration,
    owner: PeerId,
    commands: mpsc::WeakSender<super::handle::Command>,
    mut published: mpsc::UnboundedReceiver<Bytes>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            biased;
            sealed = published.recv() => {
                let Some(sealed) = sealed else { break };
                let b = backend.clone();
                let result = tokio::task::spawn_blocking(move || b.publish(owner, &sealed)).await;
                match result {
                    Ok(Ok(())) => tracing::debug!(backend = %backend.describe(), "our address record written"),
                    Ok(Err(e)) => tracing::warn!(backend = %backend.describe(), error = %e, "cannot write our address record"),
                    Err(e) => tracing::warn!(error = %e, "record writer failed"),
                }
            }
            _ = tick.tick() => {
                let b = backend.clone();
                let fetched = tokio::task::spawn_blocking(move || b.fetch()).await;
                let records = match fetched {
                    Ok(Ok(records)) => {
                        if failing {
                            tracing::info!(backend = %backend.describe(), "records readable again");
                            failing = false;
                        }
                        records
                    }
                    Ok(Err(e)) => {
                        if !failing {
                            tracing::warn!(backend = %backend.describe(), error = %e, "cannot read address records (said once until it recovers)");
                            failing = true;
                        }
                        continue;
                    }
                    Err(_) => continue,
                };
                let Some(commands) = commands.upgrade() else { break };
                if commands
                    .send(super::handle::Command::OfferRecords { records, reply: None })
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
    }
}
