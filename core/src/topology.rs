//! The RabbitMQ topology, in one place: exchange and queue names, their arguments, and the
//! helpers every process uses to connect and declare it. Declaring is idempotent, so ingest and
//! workers both declare on every (re)connect and start in any order.
//!
//! ```text
//! <ns>.jobs (direct) ──calls──► <ns>.calls      (quorum)  ──dead-letter──► <ns>.dead (fanout) ──► <ns>.dead
//!                    ──messages──► <ns>.messages (quorum)                                      └─► <ns>.dead.audit
//!                    ──xmpp──► <ns>.xmpp (quorum; consumed only by the worker holding the XMPP component)
//! <ns>.retry.<lane>.<delay> (quorum, per-queue TTL) ──dead-letter──► <ns>.jobs, routing key <lane>
//! <ns>.outcomes (fanout) ──► <ns>.audit (quorum)
//!                        └─► <ns>.remote_log (quorum, bounded; only where an app has a log_url)
//! <ns>.audit, <ns>.dead.audit ──dead-letter / parked by the sink──► <ns>.audit.dead (fanout) ──► <ns>.audit.dead
//! <ns>.ledger (stream): cancels and dedupe claims, read by every worker
//! ```
//!
//! Every consumed quorum queue has a delivery limit, so that a message that brings its consumer
//! down every time is dead-lettered instead of looping. The lanes have a maximum length and
//! refuse publishes beyond it, so an overload reaches callers as a 503 instead of a broker-wide
//! memory alarm; what is kept for operators (`dead`, `audit.dead`) expires after a maximum age.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::uri::AMQPUri;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
    PublisherConfirm,
};
use tracing::{info, warn};
use uuid::Uuid;

use crate::config::RabbitSettings;
use crate::policy::Lane;

/// How long the ledger keeps cancels and claims: longer than any dedupe window or call TTL a
/// worker joining late needs to catch up on.
const LEDGER_MAX_AGE: &str = "1h";
/// Small segments, so that the stream's retention actually drops old entries.
const LEDGER_SEGMENT_BYTES: i64 = 8 * 1024 * 1024;

/// The most outcome messages `<ns>.remote_log` holds while no worker reads it.
pub const REMOTE_LOG_MAX_MESSAGES: i64 = 1_000_000;

/// AMQP's persistent delivery mode: the broker writes the message to disk.
pub const PERSISTENT: u8 = 2;
/// RabbitMQ's pseudo-queue for direct reply-to (sync mode answers).
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";
/// The AMQP `type` of a message holding one push job.
pub const JOB_TYPE: &str = "push.v1";
/// The AMQP `type` of a message holding a JSON array of push jobs.
pub const JOB_BATCH_TYPE: &str = "push.batch.v1";

/// What can go wrong between a process and RabbitMQ.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot connect to RabbitMQ at {url}: {source}")]
    Unreachable { url: String, source: lapin::Error },
    #[error("cannot connect to RabbitMQ at {url}: no answer within {timeout_ms} ms")]
    ConnectTimeout { url: String, timeout_ms: u64 },
    /// None of the nodes of `[rabbitmq] urls` took the connection: each node's
    /// `Unreachable` or `ConnectTimeout`, in the order they were tried.
    #[error("cannot connect to any RabbitMQ node: {}", node_failures(.0))]
    NoNodeReachable(Vec<BrokerError>),
    /// No connection right now; the process is reconnecting.
    #[error("not connected to RabbitMQ")]
    Disconnected,
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("RabbitMQ: no confirm within {} ms", .0.as_millis())]
    NoConfirm(Duration),
    #[error("RabbitMQ: the broker refused the message")]
    Refused,
    #[error("RabbitMQ: the message was not routable to a queue")]
    Unroutable,
    #[error("cannot encode the message: {0}")]
    Encode(Arc<serde_json::Error>),
}

impl From<serde_json::Error> for BrokerError {
    fn from(error: serde_json::Error) -> BrokerError {
        BrokerError::Encode(Arc::new(error))
    }
}

/// The properties of every job message: persistent, JSON, the job id as message and
/// correlation id, and its type.
pub fn job_properties(job_id: Uuid) -> BasicProperties {
    let mut id_text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let id: &str = job_id.hyphenated().encode_lower(&mut id_text);
    BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_content_type("application/json".into())
        .with_message_id(id.into())
        .with_correlation_id(id.into())
        .with_type(JOB_TYPE.into())
}

/// The properties of a message carrying several jobs: as a job's, with the batch's own id as
/// message and correlation id (the key under which workers note its concluded jobs).
pub fn job_batch_properties(batch_id: Uuid) -> BasicProperties {
    job_properties(batch_id).with_type(JOB_BATCH_TYPE.into())
}

/// Waits up to `timeout` for the broker's confirm of a publish on a channel in confirm mode. A
/// mandatory message the broker returned unroutable is an error, as is a nack.
pub async fn confirm(
    published: Result<PublisherConfirm, lapin::Error>,
    timeout: Duration,
) -> Result<(), BrokerError> {
    match tokio::time::timeout(timeout, published?).await {
        Ok(Ok(Confirmation::Ack(None) | Confirmation::NotRequested)) => Ok(()),
        Ok(Ok(Confirmation::Ack(Some(_)))) => Err(BrokerError::Unroutable),
        Ok(Ok(Confirmation::Nack(_))) => Err(BrokerError::Refused),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(BrokerError::NoConfirm(timeout)),
    }
}

/// Exchange and queue names under one namespace, and the limits their queues are declared with.
#[derive(Debug, Clone)]
pub struct Topology {
    namespace: String,
    retry_tiers_ms: Vec<u64>,
    delivery_limit: u32,
    lane_max_length: u64,
    dead_letter_max_age_ms: u64,
}

impl Topology {
    pub fn new(settings: &RabbitSettings) -> Topology {
        Topology {
            namespace: settings.namespace.clone(),
            retry_tiers_ms: settings.retry_tiers_ms.clone(),
            delivery_limit: settings.delivery_limit,
            lane_max_length: settings.lane_max_length,
            dead_letter_max_age_ms: settings.dead_letter_max_age_secs.saturating_mul(1000),
        }
    }

    pub fn retry_tiers_ms(&self) -> &[u64] {
        &self.retry_tiers_ms
    }

    /// The queue where a job of `lane` waits `delay_ms` (one of the tiers) before going back to
    /// its lane.
    pub fn retry_queue(&self, lane: Lane, delay_ms: u64) -> String {
        format!("{}.retry.{}.{}ms", self.namespace, lane.as_str(), delay_ms)
    }

    /// The tier to wait in for a wanted delay: the shortest one at least as long (so that a
    /// `Retry-After` is honoured), or the longest there is.
    pub fn retry_tier(&self, wanted_ms: u64) -> u64 {
        self.retry_tiers_ms
            .iter()
            .copied()
            .find(|&tier| tier >= wanted_ms)
            .or(self.retry_tiers_ms.last().copied())
            .unwrap_or(wanted_ms)
    }

    pub fn ledger_queue(&self) -> String {
        format!("{}.ledger", self.namespace)
    }

    /// A copy of every dead letter, consumed by workers to write its terminal audit row; the
    /// `dead` queue itself is left for operators to inspect and re-drive.
    pub fn dead_audit_queue(&self) -> String {
        format!("{}.dead.audit", self.namespace)
    }

    pub fn jobs_exchange(&self) -> String {
        format!("{}.jobs", self.namespace)
    }

    pub fn lane_queue(&self, lane: Lane) -> String {
        format!("{}.{}", self.namespace, lane.as_str())
    }

    /// UnifiedPush-over-XMPP deliveries: consumed only by the worker that holds the XMPP
    /// component, so that the others never take one they could not send.
    pub fn xmpp_queue(&self) -> String {
        format!("{}.xmpp", self.namespace)
    }

    /// The routing key of XMPP deliveries on the jobs exchange.
    pub const XMPP_KEY: &'static str = "xmpp";

    /// The routing key of a lane on the jobs exchange.
    pub fn lane_key(lane: Lane) -> &'static str {
        lane.as_str()
    }

    pub fn outcomes_exchange(&self) -> String {
        format!("{}.outcomes", self.namespace)
    }

    pub fn audit_queue(&self) -> String {
        format!("{}.audit", self.namespace)
    }

    /// Outcomes on their way to the apps' own log servers (`[[apps]] log_url`).
    pub fn remote_log_queue(&self) -> String {
        format!("{}.remote_log", self.namespace)
    }

    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.namespace)
    }

    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.namespace)
    }

    /// Where outcomes the audit sink cannot write are parked, with the error, for operators.
    pub fn audit_dead_exchange(&self) -> String {
        format!("{}.audit.dead", self.namespace)
    }

    pub fn audit_dead_queue(&self) -> String {
        format!("{}.audit.dead", self.namespace)
    }

    /// Every queue, for tools and tests that clean a namespace up.
    pub fn queues(&self) -> Vec<String> {
        let mut queues = vec![
            self.lane_queue(Lane::Calls),
            self.lane_queue(Lane::Messages),
            self.xmpp_queue(),
            self.audit_queue(),
            self.dead_queue(),
            self.dead_audit_queue(),
            self.audit_dead_queue(),
            self.ledger_queue(),
            self.remote_log_queue(),
        ];
        for lane in Lane::ALL {
            for &tier in &self.retry_tiers_ms {
                queues.push(self.retry_queue(lane, tier));
            }
        }
        queues
    }

    pub fn exchanges(&self) -> Vec<String> {
        vec![
            self.jobs_exchange(),
            self.outcomes_exchange(),
            self.dead_exchange(),
            self.audit_dead_exchange(),
        ]
    }

    /// Declares the whole topology, on a channel of its own.
    pub async fn declare(&self, connection: &Connection) -> Result<(), BrokerError> {
        let mut declare = Declarer {
            channel: connection.create_channel().await?,
            connection,
        };
        for (exchange, kind) in [
            (self.jobs_exchange(), ExchangeKind::Direct),
            (self.outcomes_exchange(), ExchangeKind::Fanout),
            (self.dead_exchange(), ExchangeKind::Fanout),
            (self.audit_dead_exchange(), ExchangeKind::Fanout),
        ] {
            declare.exchange(&exchange, kind).await?;
        }

        for lane in Lane::ALL {
            // Jobs that expire in the queue, are rejected, or reach the delivery limit go to the
            // dead-letter exchange.
            let mut args = self.consumed(dead_lettering_args(&self.dead_exchange()));
            if self.lane_max_length > 0 {
                // With `reject-publish` (set for dead-lettering): a full lane nacks the publish.
                args.insert(
                    "x-max-length".into(),
                    AMQPValue::LongLongInt(self.lane_max_length as i64),
                );
            }
            let queue = self.lane_queue(lane);
            declare.queue(&queue, args).await?;
            declare
                .bind(&queue, &self.jobs_exchange(), Self::lane_key(lane))
                .await?;
        }

        // Like a lane: an expired or poisonous delivery is dead-lettered and audited.
        let mut args = self.consumed(dead_lettering_args(&self.dead_exchange()));
        if self.lane_max_length > 0 {
            args.insert(
                "x-max-length".into(),
                AMQPValue::LongLongInt(self.lane_max_length as i64),
            );
        }
        declare.queue(&self.xmpp_queue(), args).await?;
        declare
            .bind(&self.xmpp_queue(), &self.jobs_exchange(), Self::XMPP_KEY)
            .await?;

        let parked = self.consumed(dead_lettering_args(&self.audit_dead_exchange()));
        declare.queue(&self.audit_queue(), parked.clone()).await?;
        declare
            .bind(&self.audit_queue(), &self.outcomes_exchange(), "")
            .await?;

        declare
            .queue(&self.dead_queue(), self.kept(quorum_args()))
            .await?;
        declare
            .bind(&self.dead_queue(), &self.dead_exchange(), "")
            .await?;
        declare.queue(&self.dead_audit_queue(), parked).await?;
        declare
            .bind(&self.dead_audit_queue(), &self.dead_exchange(), "")
            .await?;
        declare
            .queue(&self.audit_dead_queue(), self.kept(quorum_args()))
            .await?;
        declare
            .bind(&self.audit_dead_queue(), &self.audit_dead_exchange(), "")
            .await?;

        // A waiting retry lives in the broker, not in a worker: it survives a worker crash and
        // costs no worker memory. When its tier's TTL runs out it goes back to its lane.
        for lane in Lane::ALL {
            for &tier in &self.retry_tiers_ms {
                let mut args = dead_lettering_args(&self.jobs_exchange());
                args.insert(
                    "x-dead-letter-routing-key".into(),
                    AMQPValue::LongString(Self::lane_key(lane).into()),
                );
                args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(tier as i64));
                declare.queue(&self.retry_queue(lane, tier), args).await?;
            }
        }

        let mut ledger = FieldTable::default();
        ledger.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("stream".into()),
        );
        ledger.insert(
            "x-max-age".into(),
            AMQPValue::LongString(LEDGER_MAX_AGE.into()),
        );
        ledger.insert(
            "x-stream-max-segment-size-bytes".into(),
            AMQPValue::LongLongInt(LEDGER_SEGMENT_BYTES),
        );
        declare.queue(&self.ledger_queue(), ledger).await?;
        let _ = declare.channel.close(200, "declared".into()).await;
        Ok(())
    }

    /// Declares the remote-log queue and binds it to the outcome fanout: done by the workers
    /// that feed log servers, so that a deployment without any keeps no such queue. Bounded:
    /// while no worker consumes it, the oldest messages go first.
    pub async fn declare_remote_log(&self, connection: &Connection) -> Result<(), BrokerError> {
        let mut declare = Declarer {
            channel: connection.create_channel().await?,
            connection,
        };
        declare
            .exchange(&self.outcomes_exchange(), ExchangeKind::Fanout)
            .await?;
        let mut args = self.consumed(quorum_args());
        args.insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(REMOTE_LOG_MAX_MESSAGES),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("drop-head".into()),
        );
        declare.queue(&self.remote_log_queue(), args).await?;
        declare
            .bind(&self.remote_log_queue(), &self.outcomes_exchange(), "")
            .await?;
        let _ = declare.channel.close(200, "declared".into()).await;
        Ok(())
    }

    /// A queue a consumer reads: a message redelivered `delivery_limit` times is dead-lettered.
    fn consumed(&self, mut args: FieldTable) -> FieldTable {
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
        );
        args
    }

    /// A queue kept for operators: its messages expire after the maximum age.
    fn kept(&self, mut args: FieldTable) -> FieldTable {
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(self.dead_letter_max_age_ms as i64),
        );
        args
    }
}

/// Declares on one channel, replacing it when the broker closes it over a queue that exists
/// with other arguments.
struct Declarer<'c> {
    connection: &'c Connection,
    channel: Channel,
}

impl Declarer<'_> {
    async fn exchange(&self, name: &str, kind: ExchangeKind) -> Result<(), BrokerError> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        self.channel
            .exchange_declare(name.into(), kind, durable, FieldTable::default())
            .await?;
        Ok(())
    }

    /// A queue that already exists with other arguments (declared by an earlier version, or
    /// with other limits) is kept as it is: RabbitMQ cannot change a queue's arguments, an
    /// operator policy can (see README, "RabbitMQ topology").
    async fn queue(&mut self, name: &str, args: FieldTable) -> Result<(), BrokerError> {
        let declared = self
            .channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await;
        match declared {
            Ok(_) => Ok(()),
            Err(e) if precondition_failed(&e) => {
                warn!(queue = name, error = %e, "queue exists with other arguments; kept as it is");
                self.channel = self.connection.create_channel().await?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn bind(&self, queue: &str, exchange: &str, key: &str) -> Result<(), BrokerError> {
        self.channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }
}

/// AMQP 406 PRECONDITION_FAILED: what RabbitMQ answers a declaration that differs from the
/// queue that exists.
fn precondition_failed(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e) if e.get_id() == 406)
}

/// A quorum queue that dead-letters to `exchange` at least once: the broker cannot drop a
/// message on the way.
fn dead_lettering_args(exchange: &str) -> FieldTable {
    let mut args = quorum_args();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(exchange.into()),
    );
    args.insert(
        "x-dead-letter-strategy".into(),
        AMQPValue::LongString("at-least-once".into()),
    );
    // Required by at-least-once dead-lettering.
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    args
}

/// Quorum queues: replicated and durable, the queue type RabbitMQ recommends for data safety.
fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

/// The node the next connection of this process tries first: random at start, so that a fleet
/// spreads over the cluster, then the node of the last successful connection, so that the
/// connections of one process share a node and follow each other when it goes away.
static FIRST_NODE: OnceLock<AtomicUsize> = OnceLock::new();

fn first_node() -> &'static AtomicUsize {
    FIRST_NODE.get_or_init(|| AtomicUsize::new(Uuid::new_v4().as_u128() as usize))
}

/// Opens a connection to one of the configured nodes (`[rabbitmq] urls`, or the single `url`).
/// The nodes are tried one after the other, starting with this process's current node (random
/// at start, then the last one connected to) and going round the list, each bounded by the
/// configured timeout so that an unreachable node is skipped instead of hanging. The error
/// names every node tried.
pub async fn connect(settings: &RabbitSettings, name: &str) -> Result<Connection, BrokerError> {
    let nodes = settings.nodes();
    if let [url] = nodes {
        return connect_node(settings, url, name).await;
    }
    let first = first_node().load(Ordering::Relaxed) % nodes.len().max(1);
    let mut failures = Vec::with_capacity(nodes.len());
    for index in (first..nodes.len()).chain(0..first) {
        match connect_node(settings, &nodes[index], name).await {
            Ok(connection) => {
                first_node().store(index, Ordering::Relaxed);
                let node = redact(&nodes[index]);
                if failures.is_empty() {
                    info!(%node, "connected to RabbitMQ");
                } else {
                    let unreachable = node_failures(&failures);
                    warn!(%node, %unreachable, "connected to RabbitMQ, other nodes unreachable");
                }
                return Ok(connection);
            }
            Err(e) => failures.push(e),
        }
    }
    Err(BrokerError::NoNodeReachable(failures))
}

/// The largest AMQP frame asked for when the URL sets no `frame_max`. lapin keeps 32 frames of
/// read and 32 of write buffer per connection, zero-filled: at RabbitMQ's default of 128 KiB
/// that was 8 MiB resident per connection. A larger message just takes more frames.
const FRAME_MAX: u32 = 16 * 1024;

async fn connect_node(
    settings: &RabbitSettings,
    url: &str,
    name: &str,
) -> Result<Connection, BrokerError> {
    let timeout = Duration::from_millis(settings.connect_timeout_ms);
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let connect = async {
        let mut uri: AMQPUri = url.parse().map_err(|e: String| {
            lapin::Error::from(std::io::Error::other(format!("[rabbitmq] url: {e}")))
        })?;
        uri.query.frame_max.get_or_insert(FRAME_MAX);
        if !url.starts_with("amqps://") {
            return Connection::connect_uri(uri, properties).await;
        }
        // Read at every connect: a CA file replaced on disk counts from the next reconnect.
        let tls = crate::tls::amqp_tls_config(settings.ca_file.as_deref()).map_err(|e| {
            lapin::Error::from(std::io::Error::other(format!("[rabbitmq] ca_file: {e}")))
        })?;
        let runtime = lapin::runtime::default_runtime()?;
        Connection::connect_uri_with_config(uri, properties, tls, runtime).await
    };
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(source)) => Err(BrokerError::Unreachable {
            url: redact(url),
            source,
        }),
        Err(_) => Err(BrokerError::ConnectTimeout {
            url: redact(url),
            timeout_ms: settings.connect_timeout_ms,
        }),
    }
}

/// `<url> (<reason>); …`: one line for the failures of every node.
fn node_failures(failures: &[BrokerError]) -> String {
    let node = |failure: &BrokerError| match failure {
        BrokerError::Unreachable { url, source } => format!("{url} ({source})"),
        BrokerError::ConnectTimeout { url, timeout_ms } => {
            format!("{url} (no answer within {timeout_ms} ms)")
        }
        other => other.to_string(),
    };
    failures.iter().map(node).collect::<Vec<_>>().join("; ")
}

/// Resolves when the connection reports an error or stops being connected: the signal for a
/// service's reconnect loop.
pub async fn closed(connection: &Connection) {
    let mut events = connection.events_listener();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        if !connection.status().connected() {
            return;
        }
        tokio::select! {
            event = events.next() => match event {
                Some(lapin::Event::Error(_)) | None => return,
                Some(_) => {}
            },
            _ = tick.tick() => {}
        }
    }
}

/// The URL without its password, for logs and error messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &credentials[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_live_under_the_namespace() {
        let t = Topology::new(&RabbitSettings {
            namespace: "pf-test".into(),
            ..Default::default()
        });
        assert_eq!(t.jobs_exchange(), "pf-test.jobs");
        assert_eq!(t.lane_queue(Lane::Calls), "pf-test.calls");
        assert_eq!(t.audit_queue(), "pf-test.audit");
        assert_eq!(
            t.retry_queue(Lane::Messages, 5000),
            "pf-test.retry.messages.5000ms"
        );
    }

    #[test]
    fn a_delay_rounds_up_to_a_tier() {
        let t = Topology::new(&RabbitSettings {
            retry_tiers_ms: vec![1000, 5000, 60_000],
            ..Default::default()
        });
        assert_eq!(t.retry_tier(0), 1000);
        assert_eq!(t.retry_tier(1000), 1000);
        assert_eq!(t.retry_tier(1001), 5000);
        assert_eq!(t.retry_tier(3_600_000), 60_000);
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }

    /// A local port nobody listens on, and one that accepts connections but never answers.
    async fn dead_ports() -> (u16, u16, tokio::net::TcpListener) {
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed_port = closed.local_addr().unwrap().port();
        drop(closed);
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_port = silent.local_addr().unwrap().port();
        (closed_port, silent_port, silent)
    }

    #[tokio::test]
    async fn every_node_is_tried_and_named_when_none_answers() {
        let (closed, silent, _listener) = dead_ports().await;
        let settings = RabbitSettings {
            urls: Some(vec![
                format!("amqp://guest:secret@127.0.0.1:{closed}/%2f"),
                format!("amqp://guest:secret@127.0.0.1:{silent}/%2f"),
            ]),
            connect_timeout_ms: 300,
            ..Default::default()
        };
        let started = std::time::Instant::now();
        let error = connect(&settings, "test")
            .await
            .expect_err("no node answers");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        let BrokerError::NoNodeReachable(failures) = &error else {
            panic!("{error:?}");
        };
        assert_eq!(failures.len(), 2);
        assert!(failures.iter().any(|f| matches!(f,
            BrokerError::Unreachable { url, .. } if url.ends_with(&format!(":{closed}/%2f")))));
        assert!(failures.iter().any(|f| matches!(f,
            BrokerError::ConnectTimeout { url, timeout_ms: 300 } if url.ends_with(&format!(":{silent}/%2f")))));
        let message = error.to_string();
        assert!(
            message.starts_with("cannot connect to any RabbitMQ node: "),
            "{message}"
        );
        for port in [closed, silent] {
            assert!(
                message.contains(&format!("amqp://guest:***@127.0.0.1:{port}/%2f")),
                "{message}"
            );
        }
        assert!(message.contains("no answer within 300 ms"), "{message}");
        assert!(
            !message.contains("secret") && !message.contains('\n'),
            "{message}"
        );
    }

    #[tokio::test]
    async fn a_single_url_keeps_its_own_errors() {
        let (closed, _, _listener) = dead_ports().await;
        let settings = RabbitSettings {
            url: format!("amqp://guest:secret@127.0.0.1:{closed}/%2f"),
            ..Default::default()
        };
        let error = connect(&settings, "test").await.expect_err("refused");
        assert!(
            matches!(&error, BrokerError::Unreachable { url, .. }
                if url == &format!("amqp://guest:***@127.0.0.1:{closed}/%2f")),
            "{error:?}"
        );
    }
}
