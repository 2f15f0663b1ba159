//! Sync replies leave a worker in batches: one message per ingest connection carries every
//! reply for it that finished while the previous message was being handed to the broker.
//! Replies are best effort (a caller that gave up waiting gets its answer from the audit
//! instead), so they are unconfirmed; batching halves the broker messages of a sync push.

use std::collections::HashMap;

use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel};
use pushfleet_core::job::{json_array, SyncReply};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

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
    /// Starts the publishing task on `channel`; it ends once every clone is dropped.
    pub fn start(channel: Channel) -> (ReplySender, JoinHandle<()>) {
        let (queue, replies) = mpsc::unbounded_channel();
        (
            ReplySender { queue },
            tokio::spawn(publish(channel, replies)),
        )
    }

    /// Queues `reply` for the caller waiting at `reply_to`.
    pub fn send(&self, reply_to: &ShortString, reply: &SyncReply) {
        if let Ok(json) = serde_json::to_vec(reply) {
            let _ = self.queue.send((reply_to.clone(), json));
        }
    }
}

async fn publish(channel: Channel, mut replies: mpsc::UnboundedReceiver<(ShortString, Vec<u8>)>) {
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
            let _ = channel
                .basic_publish(
                    "".into(),
                    address,
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_type(BATCH_TYPE.into()),
                )
                .await;
        }
    }
}
