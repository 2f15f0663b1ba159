//! Outcome events leave a worker in batches: one confirmed broker message carries the outcomes
//! of every job that finished while the previous batch was being confirmed. Under load that is
//! tens of outcomes per message instead of one each; when idle a batch is a single outcome and
//! goes out at once, so batching adds no delay of its own.

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel};
use pushfleet_core::job::{json_array, OutcomeEvent};
use pushfleet_core::topology::{self, BrokerError, Topology, PERSISTENT};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// The most outcomes one message carries; bounds the audit sink's memory per unacked message.
pub const MAX_OUTCOMES_PER_MESSAGE: usize = 256;

/// The AMQP `type` of a message holding a JSON array of outcome events.
pub const BATCH_TYPE: &str = "outcomes.v1";

/// How long a worker waits for the broker to confirm what it published before the job goes
/// back to its queue; long, because a confirm only runs late when the broker is in trouble.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Hands outcomes to the publishing task; cheap to clone, one per in-flight job.
#[derive(Clone)]
pub struct OutcomeBatcher {
    queue: mpsc::Sender<Pending>,
}

struct Pending {
    /// The outcome, already encoded by the job's own task.
    json: Vec<u8>,
    saved: oneshot::Sender<Result<(), BrokerError>>,
}

impl OutcomeBatcher {
    /// Starts the publishing task on `channel` (in confirm mode). It ends once every
    /// `OutcomeBatcher` clone is dropped and the last batch is confirmed.
    pub fn start(channel: Channel, topology: &Topology) -> (OutcomeBatcher, JoinHandle<()>) {
        let (queue, pending) = mpsc::channel(MAX_OUTCOMES_PER_MESSAGE * 4);
        let task = tokio::spawn(publish_batches(
            channel,
            topology.outcomes_exchange(),
            pending,
        ));
        (OutcomeBatcher { queue }, task)
    }

    /// Returns once the broker holds `outcome` (in some batch), or why it does not.
    pub async fn save(&self, outcome: &OutcomeEvent) -> Result<(), BrokerError> {
        let json = serde_json::to_vec(outcome)?;
        let (saved, confirmed) = oneshot::channel();
        // The publishing task ends only with its channel.
        self.queue
            .send(Pending { json, saved })
            .await
            .map_err(|_| BrokerError::Disconnected)?;
        confirmed.await.map_err(|_| BrokerError::Disconnected)?
    }
}

async fn publish_batches(channel: Channel, exchange: String, mut pending: mpsc::Receiver<Pending>) {
    let mut batch = Vec::with_capacity(MAX_OUTCOMES_PER_MESSAGE);
    let mut body = Vec::new();
    while pending
        .recv_many(&mut batch, MAX_OUTCOMES_PER_MESSAGE)
        .await
        > 0
    {
        json_array(batch.iter().map(|o| o.json.as_slice()), &mut body);
        let published = channel
            .basic_publish(
                exchange.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
                    .with_delivery_mode(PERSISTENT)
                    .with_content_type("application/json".into())
                    .with_type(BATCH_TYPE.into()),
            )
            .await;
        let result = topology::confirm(published, CONFIRM_TIMEOUT).await;
        metrics::histogram!("pushfleet_outcome_batch_size").record(batch.len() as f64);
        for outcome in batch.drain(..) {
            let _ = outcome.saved.send(result.clone());
        }
    }
}
