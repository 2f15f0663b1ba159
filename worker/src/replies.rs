//! Sync replies leave a worker in batches: one message per ingest connection carries every
//! reply for it that finished while the previous message was being handed to the broker.
//! Replies are best effort (a caller that gave up waiting gets its answer from the audit
//! instead), so they are unconfirmed; batching halves the broker messages of a sync push.
//!
//! They travel on a connection of their own. A reply goes to the direct reply-to address of the
//! ingest channel that published the job; when that channel's node of a cluster is gone,
//! RabbitMQ closes the replying connection. Here that costs the replies of the moment, and the
//! next batch opens a new connection; it never interrupts the jobs, their outcomes or acks.

use std::collections::HashMap;

use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection};
use pushfleet_core::config::RabbitSettings;
use pushfleet_core::job::{json_array, SyncReply};
use pushfleet_core::topology::{self, BrokerError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::debug;

/// The most replies one message carries.
const MAX_REPLIES_PER_MESSAGE: usize = 256;

/// The AMQP `type` of a message holding a JSON array of sync replies.
pub const BATCH_TYPE: &str = "replies.v1";

/// Hands replies to the publishing task; cheap to clone.
#[derive(Clone)]
pub struct ReplySender {
    queue: mpsc::UnboundedSender<(ShortString, Vec<u8>)>,
}

impl ReplySender {
    /// Starts the publishing task, which connects as `name` when it has replies to send; it
    /// ends once every clone is dropped.
    pub fn start(settings: RabbitSettings, name: String) -> (ReplySender, JoinHandle<()>) {
        let (queue, replies) = mpsc::unbounded_channel();
        let link = ReplyLink {
            settings,
            name,
            open: None,
        };
        (ReplySender { queue }, tokio::spawn(publish(link, replies)))
    }

    /// Queues `reply` for the caller waiting at `reply_to`.
    pub fn send(&self, reply_to: &ShortString, reply: &SyncReply) {
        if let Ok(json) = serde_json::to_vec(reply) {
            let _ = self.queue.send((reply_to.clone(), json));
        }
    }
}

/// The replying connection, opened when needed and dropped when it fails.
struct ReplyLink {
    settings: RabbitSettings,
    name: String,
    open: Option<(Connection, Channel)>,
}

impl ReplyLink {
    async fn channel(&mut self) -> Result<&Channel, BrokerError> {
        if !self
            .open
            .as_ref()
            .is_some_and(|(_, channel)| channel.status().connected())
        {
            self.open = None;
            let connection = topology::connect(&self.settings, &self.name).await?;
            let channel = connection.create_channel().await?;
            self.open = Some((connection, channel));
        }
        Ok(&self.open.as_ref().expect("just opened").1)
    }

    async fn send(&mut self, address: ShortString, body: &[u8]) -> Result<(), BrokerError> {
        self.channel()
            .await?
            .basic_publish(
                "".into(),
                address,
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_type(BATCH_TYPE.into()),
            )
            .await?;
        Ok(())
    }

    async fn close(self) {
        if let Some((connection, _)) = self.open {
            let _ = connection.close(200, "done".into()).await;
        }
    }
}

async fn publish(
    mut link: ReplyLink,
    mut replies: mpsc::UnboundedReceiver<(ShortString, Vec<u8>)>,
) {
    let mut batch = Vec::with_capacity(MAX_REPLIES_PER_MESSAGE);
    let mut body = Vec::new();
    while replies.recv_many(&mut batch, MAX_REPLIES_PER_MESSAGE).await > 0 {
        // Usually one address: the ingest processes' reply consumers.
        let mut by_address: HashMap<ShortString, Vec<Vec<u8>>> = HashMap::new();
        for (address, json) in batch.drain(..) {
            by_address.entry(address).or_default().push(json);
        }
        for (address, jsons) in by_address {
            json_array(jsons.iter().map(Vec::as_slice), &mut body);
            if let Err(e) = link.send(address, &body).await {
                // Their callers answer 202 once their wait runs out; the jobs are audited.
                debug!(error = %e, replies = jsons.len(), "sync replies not sent");
                link.open = None;
            }
        }
    }
    link.close().await;
}
