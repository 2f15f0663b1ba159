//! Ingest's link to RabbitMQ: publishes jobs with publisher confirms and collects the workers'
//! synchronous answers over direct reply-to. The link owns its reconnect loop; while the broker
//! is away, publishing fails at once so that callers get a 503 instead of a hang.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use pushfleet_core::config::RabbitSettings;
use pushfleet_core::job::{decode_batch, Job, SyncReply};
use pushfleet_core::ledger::LedgerEntry;
use pushfleet_core::reconnect;
use pushfleet_core::topology::{self, BrokerError, Topology, DIRECT_REPLY_TO, PERSISTENT};
use pushfleet_core::Event;
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};
use uuid::Uuid;

/// Why the link could not be opened: no connection at all, or a connection on which the
/// topology, the confirm mode or the reply consumer could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Connect(#[from] BrokerError),
    #[error("RabbitMQ set-up failed: {0}")]
    SetUp(#[from] lapin::Error),
}

type Pending = Arc<Mutex<HashMap<Uuid, oneshot::Sender<SyncReply>>>>;

#[derive(Clone)]
pub struct Broker {
    settings: RabbitSettings,
    topology: Topology,
    publish_timeout: Duration,
    channel: Arc<RwLock<Option<Channel>>>,
    pending: Pending,
}

impl Broker {
    /// Connects once (an unreachable broker at start-up is an error), then keeps the link up in
    /// the background until `shutdown` flips.
    pub async fn start(
        settings: RabbitSettings,
        publish_timeout: Duration,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Broker, OpenError> {
        let broker = Broker {
            topology: Topology::new(&settings),
            settings,
            publish_timeout,
            channel: Arc::new(RwLock::new(None)),
            pending: Arc::new(Mutex::new(HashMap::new())),
        };
        let connection = broker.open().await?;
        tokio::spawn(broker.clone().keep_alive(connection, shutdown));
        Ok(broker)
    }

    pub fn is_connected(&self) -> bool {
        self.channel
            .read()
            .expect("lock")
            .as_ref()
            .is_some_and(|c| c.status().connected())
    }

    /// Connects, declares the topology and sets up the publishing channel with its reply consumer.
    async fn open(&self) -> Result<Connection, OpenError> {
        let connection = topology::connect(&self.settings, "pushfleet-ingest").await?;
        self.topology.declare(&connection).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        // Direct reply-to: replies come back on the channel that published, no queue needed.
        let replies = channel
            .basic_consume(
                DIRECT_REPLY_TO.into(),
                "pushfleet-ingest-replies".into(),
                BasicConsumeOptions {
                    no_ack: true, // required by direct reply-to
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        tokio::spawn(hand_out_replies(replies, self.pending.clone()));
        *self.channel.write().expect("lock") = Some(channel);
        metrics::gauge!("pushfleet_broker_connected", "service" => "ingest").set(1.0);
        Ok(connection)
    }

    async fn keep_alive(self, mut connection: Connection, mut shutdown: watch::Receiver<bool>) {
        loop {
            let stopping = tokio::select! {
                _ = topology::closed(&connection) => false,
                _ = shutdown.wait_for(|stop| *stop) => true,
            };
            if stopping {
                let _ = connection.close(200, "shutdown".into()).await;
                return;
            }
            *self.channel.write().expect("lock") = None;
            metrics::gauge!("pushfleet_broker_connected", "service" => "ingest").set(0.0);
            // Waiters of the lost channel will never hear back; their requests fall back to 202.
            warn!("lost the RabbitMQ connection; reconnecting");
            let reopened =
                reconnect::until_ok("RabbitMQ still unreachable", &mut shutdown, || self.open());
            let Some(reopened) = reopened.await else {
                return;
            };
            connection = reopened;
            info!("reconnected to RabbitMQ");
        }
    }

    /// The publishing channel, while connected.
    fn channel(&self) -> Result<Channel, BrokerError> {
        self.channel
            .read()
            .expect("lock")
            .clone()
            .filter(|c| c.status().connected())
            .ok_or(BrokerError::Disconnected)
    }

    /// Publishes `job` into its lane, returning once the broker has confirmed it. With
    /// `want_reply`, also returns the receiver of the worker's answer. A cancel is first written
    /// to the ledger, so that every worker knows the call is over before the cancel is queued.
    pub async fn publish(
        &self,
        job: &Job,
        ttl: Duration,
        want_reply: bool,
    ) -> Result<Option<oneshot::Receiver<SyncReply>>, BrokerError> {
        let channel = self.channel()?;
        if job.event == Event::Cancel {
            let entry = LedgerEntry::Cancel {
                call_id: job.push.call_id.clone(),
                at_ms: job.received_at_ms,
                reason: job.push.reason.clone(),
            };
            self.publish_to_ledger(&channel, &entry).await?;
        }
        // A job encodes to a few hundred bytes: allocated once rather than regrown on the way.
        let mut body = Vec::with_capacity(512);
        serde_json::to_writer(&mut body, job)?;
        let mut properties = topology::job_properties(job.id)
            // The broker drops (dead-letters) the job once it is not worth delivering.
            .with_expiration(ttl.as_millis().to_string().into());
        let receiver = if want_reply {
            let (tx, rx) = oneshot::channel();
            self.pending.lock().expect("lock").insert(job.id, tx);
            properties = properties.with_reply_to(DIRECT_REPLY_TO.into());
            Some(rx)
        } else {
            None
        };
        // XMPP deliveries wait in their own queue for the worker holding the component.
        let key = match job.handling.xmpp {
            Some(_) => Topology::XMPP_KEY,
            None => Topology::lane_key(job.lane),
        };
        let published = channel
            .basic_publish(
                self.topology.jobs_exchange().into(),
                key.into(),
                // Mandatory: a job that no queue would take comes back instead of vanishing.
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &body,
                properties,
            )
            .await;
        match topology::confirm(published, self.publish_timeout).await {
            Ok(()) => Ok(receiver),
            Err(e) => {
                self.forget(job.id);
                Err(e)
            }
        }
    }

    /// Writes `entry` to the ledger, returning once the broker has confirmed it.
    pub async fn publish_ledger(&self, entry: &LedgerEntry) -> Result<(), BrokerError> {
        let channel = self.channel()?;
        self.publish_to_ledger(&channel, entry).await
    }

    async fn publish_to_ledger(
        &self,
        channel: &Channel,
        entry: &LedgerEntry,
    ) -> Result<(), BrokerError> {
        let body = serde_json::to_vec(entry)?;
        let published = channel
            .basic_publish(
                "".into(),
                self.topology.ledger_queue().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
                    .with_delivery_mode(PERSISTENT)
                    .with_content_type("application/json".into()),
            )
            .await;
        topology::confirm(published, self.publish_timeout).await
    }

    /// Drops the waiter of a job whose answer will not be awaited any more.
    pub fn forget(&self, job_id: Uuid) {
        self.pending.lock().expect("lock").remove(&job_id);
    }
}

/// Hands each sync reply to the request waiting for it, until the channel goes.
async fn hand_out_replies(mut replies: lapin::Consumer, pending: Pending) {
    while let Some(Ok(delivery)) = replies.next().await {
        // Workers send replies in batches; a single reply is read too.
        match decode_batch::<SyncReply>(&delivery.data) {
            Ok(replies) => {
                let mut pending = pending.lock().expect("lock");
                for reply in replies {
                    if let Some(waiter) = pending.remove(&reply.job_id) {
                        let _ = waiter.send(reply);
                    }
                }
            }
            Err(e) => warn!(error = %e, "unreadable sync reply dropped"),
        }
    }
}
