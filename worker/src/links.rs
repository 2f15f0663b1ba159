//! The worker's connections to RabbitMQ, one per direction of traffic. While a memory or disk
//! alarm lasts, RabbitMQ stops reading from every connection that publishes — acks on it
//! included. So jobs are consumed and acked on one connection; outcomes, retries, dead letters,
//! replies and dedupe claims are published on another; and the audit sink drains the audit
//! queue on a third. An alarm then holds up new outcomes, never the acks that relieve it. Sync
//! replies have a fourth, of their own making (see `replies`).

use std::time::Duration;

use lapin::Connection;
use pushfleet_core::config::RabbitSettings;
use pushfleet_core::topology::{self, BrokerError};

/// How long a close may wait for the broker's answer.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

pub struct Links {
    /// Lane consumers and their acks, and the ledger stream.
    pub consume: Connection,
    /// Every publish of the worker.
    pub publish: Connection,
    /// The audit sink's consumers and acks, when this worker runs the sink.
    pub audit: Option<Connection>,
    /// For connections opened on the side (sync replies).
    pub settings: RabbitSettings,
}

impl Links {
    /// Opens the connections; `worker_id` names them in the broker's connection list.
    pub async fn open(
        settings: &RabbitSettings,
        worker_id: &str,
        audit_sink: bool,
    ) -> Result<Links, BrokerError> {
        let consume = topology::connect(settings, &format!("{worker_id}-consume")).await?;
        let publish = topology::connect(settings, &format!("{worker_id}-publish")).await?;
        let audit = if audit_sink {
            Some(topology::connect(settings, &format!("{worker_id}-audit")).await?)
        } else {
            None
        };
        Ok(Links {
            consume,
            publish,
            audit,
            settings: settings.clone(),
        })
    }

    /// Resolves as soon as any of the connections is lost.
    pub async fn any_closed(&self) {
        let audit = async {
            match &self.audit {
                Some(audit) => topology::closed(audit).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = topology::closed(&self.consume) => {}
            _ = topology::closed(&self.publish) => {}
            _ = audit => {}
        }
    }

    /// Closes the connections; one whose peer is gone is given up on after [`CLOSE_WAIT`]
    /// instead of waiting for a close-ok that never comes.
    pub async fn close(self, reason: &str) {
        let closing = [Some(self.consume), Some(self.publish), self.audit]
            .into_iter()
            .flatten()
            .map(|connection| async move {
                let _ =
                    tokio::time::timeout(CLOSE_WAIT, connection.close(200, reason.into())).await;
            });
        futures_util::future::join_all(closing).await;
    }
}
