//! Ingest's link to RabbitMQ: publishes jobs with publisher confirms and collects the workers'
//! synchronous answers over direct reply-to. The link owns its reconnect loop; while the broker
//! is away, publishing fails at once so that callers get a 503 instead of a hang.
//!
//! Jobs are coalesced per lane: up to `[ingest] publishes_in_flight` messages of a lane await
//! their confirms at once, and the jobs accepted while all of them wait share the next message
//! (up to [`MAX_JOBS_PER_MESSAGE`] jobs). Under load that is tens of jobs per broker message instead of
//! one each; when idle a message is a single job, published at once, in the same shape as
//! before batches. Everything else stays per job: its deadline, its reply, its audit row.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use std::future::Future;

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, PublisherConfirm};
use pushfleet_core::clock::now_ms;
use pushfleet_core::config::RabbitSettings;
use pushfleet_core::job::{
    decode_batch, jobs_in_next_message, json_array, message_expiration_ms, Job, SyncReply,
    MAX_JOBS_PER_MESSAGE,
};
use pushfleet_core::ledger::LedgerEntry;
use pushfleet_core::reconnect;
use pushfleet_core::topology::{self, BrokerError, Topology, DIRECT_REPLY_TO, PERSISTENT};
use pushfleet_core::{Event, Lane};
use tokio::sync::{mpsc, oneshot, watch};
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

/// The publishing channel, while there is one.
type SharedChannel = Arc<RwLock<Option<Channel>>>;

#[derive(Clone)]
pub struct Broker {
    settings: RabbitSettings,
    topology: Topology,
    publish_timeout: Duration,
    channel: SharedChannel,
    pending: Pending,
    /// One publishing task per lane, in `Lane::ALL` order, then the XMPP gateway's.
    publishers: Arc<[mpsc::UnboundedSender<Queued>]>,
}

/// A job waiting for its lane's next message.
struct Queued {
    /// The job, encoded by the request's own task.
    json: Vec<u8>,
    id: Uuid,
    /// When the broker may drop it.
    expires_at_ms: u64,
    reply: bool,
    confirmed: oneshot::Sender<Result<(), BrokerError>>,
}

impl Broker {
    /// Connects once (an unreachable broker at start-up is an error), then keeps the link up in
    /// the background until `shutdown` flips.
    pub async fn start(
        settings: RabbitSettings,
        publish_timeout: Duration,
        publishes_in_flight: usize,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Broker, OpenError> {
        let topology = Topology::new(&settings);
        let channel: SharedChannel = Arc::new(RwLock::new(None));
        let targets = Lane::ALL
            .into_iter()
            .map(|lane| {
                (
                    Topology::lane_key(lane),
                    lane.as_str(),
                    MAX_JOBS_PER_MESSAGE,
                )
            })
            // The XMPP gateway reads one job per message.
            .chain([(Topology::XMPP_KEY, "xmpp", 1)]);
        let publishers = targets
            .map(|(key, label, max_jobs)| {
                let (queue, queued) = mpsc::unbounded_channel();
                let publisher = Publisher {
                    key,
                    label,
                    max_jobs,
                    in_flight: publishes_in_flight,
                    exchange: topology.jobs_exchange(),
                    channel: channel.clone(),
                    publish_timeout,
                };
                // Ends once every `Broker` clone (and so the queue's sender) is gone.
                tokio::spawn(publisher.run(queued));
                queue
            })
            .collect();
        let broker = Broker {
            topology,
            settings,
            publish_timeout,
            channel,
            pending: Arc::new(Mutex::new(HashMap::new())),
            publishers,
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
        connected(&self.channel)
    }

    /// Publishes `job` into its lane, in the lane's next message, returning once the broker has
    /// confirmed that message. When the job asks for a reply (`job.reply`), also returns the
    /// receiver of the worker's answer. `ttl` is how long the job is worth delivering from now.
    /// A cancel is first written to the ledger, so that every worker knows the call is over
    /// before the cancel is queued.
    pub async fn publish(
        &self,
        job: &Job,
        ttl: Duration,
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
        let mut json = Vec::with_capacity(512);
        serde_json::to_writer(&mut json, job)?;
        let receiver = job.reply.then(|| {
            let (tx, rx) = oneshot::channel();
            self.pending.lock().expect("lock").insert(job.id, tx);
            rx
        });
        let (confirmed, confirm) = oneshot::channel();
        let queued = Queued {
            json,
            id: job.id,
            expires_at_ms: now_ms() + ttl.as_millis() as u64,
            reply: job.reply,
            confirmed,
        };
        // XMPP deliveries wait in their own queue for the worker holding the component.
        let publisher = match job.handling.xmpp {
            Some(_) => Lane::ALL.len(),
            None => Lane::ALL
                .iter()
                .position(|&l| l == job.lane)
                .expect("every lane has a publisher"),
        };
        let published = match self.publishers[publisher].send(queued) {
            Ok(()) => confirm.await.unwrap_or(Err(BrokerError::Disconnected)),
            Err(_) => Err(BrokerError::Disconnected),
        };
        match published {
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

fn connected(channel: &SharedChannel) -> Result<Channel, BrokerError> {
    channel
        .read()
        .expect("lock")
        .clone()
        .filter(|c| c.status().connected())
        .ok_or(BrokerError::Disconnected)
}

/// Publishes the jobs of one routing key (a lane, or the XMPP gateway's queue): up to
/// `in_flight` messages await their confirms at once, and the jobs queued while all of them wait
/// share the next message.
struct Publisher {
    /// The routing key, and the `lane` label of its metric.
    key: &'static str,
    label: &'static str,
    /// Most jobs per message: [`MAX_JOBS_PER_MESSAGE`], or 1 where the consumer reads single
    /// jobs only (the XMPP gateway).
    max_jobs: usize,
    in_flight: usize,
    exchange: String,
    channel: SharedChannel,
    publish_timeout: Duration,
}

type Confirming = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

impl Publisher {
    async fn run(self, mut queued: mpsc::UnboundedReceiver<Queued>) {
        let mut waiting: VecDeque<Queued> = VecDeque::new();
        let mut received = Vec::with_capacity(MAX_JOBS_PER_MESSAGE);
        let mut confirming: FuturesUnordered<Confirming> = FuturesUnordered::new();
        let mut open = true;
        loop {
            // Jobs arrive while confirms are awaited; a confirm frees a slot for the next
            // message. Never a timer: a lone job is published as soon as a slot is free.
            let slot_free = confirming.len() < self.in_flight;
            if waiting.is_empty() || !slot_free {
                tokio::select! {
                    n = queued.recv_many(&mut received, MAX_JOBS_PER_MESSAGE), if open => {
                        if n == 0 {
                            open = false;
                        }
                    }
                    Some(()) = confirming.next(), if !confirming.is_empty() => {}
                    else => return,
                }
            }
            while let Ok(job) = queued.try_recv() {
                received.push(job);
                if received.len() >= MAX_JOBS_PER_MESSAGE {
                    break;
                }
            }
            waiting.extend(received.drain(..));
            while confirming.len() < self.in_flight && !waiting.is_empty() {
                let taken = jobs_in_next_message(waiting.iter().map(|job| job.json.len()))
                    .min(self.max_jobs);
                let batch: Vec<Queued> = waiting.drain(..taken).collect();
                metrics::histogram!("pushfleet_ingest_jobs_per_publish", "lane" => self.label)
                    .record(batch.len() as f64);
                let sent = self.publish(&batch).await;
                let timeout = self.publish_timeout;
                confirming.push(Box::pin(async move {
                    let result = match sent {
                        Ok(published) => topology::confirm(Ok(published), timeout).await,
                        Err(e) => Err(e),
                    };
                    for job in batch {
                        let _ = job.confirmed.send(result.clone());
                    }
                }));
            }
            if !open && waiting.is_empty() && confirming.is_empty() {
                return;
            }
        }
    }

    /// Sends `batch` as one message, returning the broker's confirm to await. A single job goes
    /// as it always did (a JSON object with the job's id); several go as a JSON array under a
    /// batch id, each job saying whether it is answered.
    async fn publish(&self, batch: &[Queued]) -> Result<PublisherConfirm, BrokerError> {
        let channel = connected(&self.channel)?;
        let mut body = Vec::new();
        let mut properties = match batch {
            [job] => {
                body.extend_from_slice(&job.json);
                topology::job_properties(job.id)
            }
            _ => {
                json_array(batch.iter().map(|job| job.json.as_slice()), &mut body);
                topology::job_batch_properties(Uuid::new_v4())
            }
        };
        // The broker drops (dead-letters) the message once its earliest job is not worth
        // delivering; the audit sink queues its jobs that still have time again.
        let expiration = message_expiration_ms(batch.iter().map(|job| job.expires_at_ms), now_ms());
        properties = properties.with_expiration(expiration.to_string().into());
        if batch.iter().any(|job| job.reply) {
            properties = properties.with_reply_to(DIRECT_REPLY_TO.into());
        }
        Ok(channel
            .basic_publish(
                self.exchange.as_str().into(),
                self.key.into(),
                // Mandatory: a job that no queue would take comes back instead of vanishing.
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &body,
                properties,
            )
            .await?)
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
