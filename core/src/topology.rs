//! The RabbitMQ topology, in one place: exchange and queue names, their arguments, and the
//! helpers every process uses to connect and declare it. Declaring is idempotent, so ingest and
//! workers both declare on every (re)connect and start in any order.
//!
//! ```text
//! <ns>.jobs (direct) ──calls──► <ns>.calls      (quorum)  ──dead-letter──► <ns>.dead (fanout) ──► <ns>.dead
//!                    ──messages──► <ns>.messages (quorum)
//! <ns>.outcomes (fanout) ──► <ns>.audit (quorum)
//! ```

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::config::RabbitSettings;
use crate::policy::Lane;

/// AMQP's persistent delivery mode: the broker writes the message to disk.
pub const PERSISTENT: u8 = 2;
/// RabbitMQ's pseudo-queue for direct reply-to (sync mode answers).
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Exchange and queue names under one namespace.
#[derive(Debug, Clone)]
pub struct Topology {
    namespace: String,
}

impl Topology {
    pub fn new(namespace: &str) -> Topology {
        Topology {
            namespace: namespace.to_string(),
        }
    }

    pub fn jobs_exchange(&self) -> String {
        format!("{}.jobs", self.namespace)
    }

    pub fn lane_queue(&self, lane: Lane) -> String {
        format!("{}.{}", self.namespace, lane.as_str())
    }

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

    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.namespace)
    }

    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.namespace)
    }

    /// Every queue, for tools and tests that clean a namespace up.
    pub fn queues(&self) -> Vec<String> {
        vec![
            self.lane_queue(Lane::Calls),
            self.lane_queue(Lane::Messages),
            self.audit_queue(),
            self.dead_queue(),
        ]
    }

    pub fn exchanges(&self) -> Vec<String> {
        vec![
            self.jobs_exchange(),
            self.outcomes_exchange(),
            self.dead_exchange(),
        ]
    }

    /// Declares the whole topology on `channel`.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                self.jobs_exchange().into(),
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.outcomes_exchange().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.dead_exchange().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;

        for lane in Lane::ALL {
            let queue = self.lane_queue(lane);
            let mut args = quorum_args();
            // Jobs that expire in the queue or are rejected go to the dead-letter exchange, and
            // at-least-once dead-lettering means the broker cannot drop them on the way.
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(self.dead_exchange().into()),
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
            declare_queue(channel, &queue, args).await?;
            channel
                .queue_bind(
                    queue.into(),
                    self.jobs_exchange().into(),
                    Self::lane_key(lane).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }

        declare_queue(channel, &self.audit_queue(), quorum_args()).await?;
        channel
            .queue_bind(
                self.audit_queue().into(),
                self.outcomes_exchange().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

        declare_queue(channel, &self.dead_queue(), quorum_args()).await?;
        channel
            .queue_bind(
                self.dead_queue().into(),
                self.dead_exchange().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }
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

async fn declare_queue(channel: &Channel, name: &str, args: FieldTable) -> lapin::Result<()> {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
    Ok(())
}

/// Opens a connection, bounded by the configured timeout so that an unreachable broker is
/// reported instead of hanging.
pub async fn connect(settings: &RabbitSettings, name: &str) -> Result<Connection, String> {
    let timeout = Duration::from_millis(settings.connect_timeout_ms);
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(timeout, Connection::connect(&settings.url, properties)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => Err(format!(
            "cannot connect to RabbitMQ at {}: {e}",
            redact(&settings.url)
        )),
        Err(_) => Err(format!(
            "cannot connect to RabbitMQ at {}: no answer within {} ms",
            redact(&settings.url),
            settings.connect_timeout_ms
        )),
    }
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
        let t = Topology::new("pf-test");
        assert_eq!(t.jobs_exchange(), "pf-test.jobs");
        assert_eq!(t.lane_queue(Lane::Calls), "pf-test.calls");
        assert_eq!(t.audit_queue(), "pf-test.audit");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }
}
