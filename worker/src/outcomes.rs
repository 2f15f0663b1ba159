//! Outcome events leave a worker in batches: one confirmed broker message carries the outcomes
//! of every job that finished while the previous batch was being confirmed. Under load that is
//! tens of outcomes per message instead of one each; when idle a batch is a single outcome and
//! goes out at once, so batching adds no delay of its own.

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation};
use pushfleet_core::job::OutcomeEvent;
use pushfleet_core::topology::{Topology, PERSISTENT};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// The most outcomes one message carries; bounds the audit sink's memory per unacked message.
pub const MAX_OUTCOMES_PER_MESSAGE: usize = 256;

/// The AMQP `type` of a message holding a JSON array of outcome events.
pub const BATCH_TYPE: &str = "outcomes.v1";

/// Hands outcomes to the publishing task; cheap to clone, one per in-flight job.
#[derive(Clone)]
pub struct OutcomeBatcher {
    queue: mpsc::Sender<Pending>,
}

struct Pending {
    /// The outcome, already encoded by the job's own task.
    json: Vec<u8>,
    saved: oneshot::Sender<Result<(), String>>,
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
    pub async fn save(&self, outcome: &OutcomeEvent) -> Result<(), String> {
        let json = serde_json::to_vec(outcome).map_err(|e| e.to_string())?;
        let (saved, confirmed) = oneshot::channel();
        self.queue
            .send(Pending { json, saved })
            .await
            .map_err(|_| "outcome publisher stopped".to_string())?;
        confirmed
            .await
            .map_err(|_| "outcome publisher stopped".to_string())?
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
        body.clear();
        body.push(b'[');
        for (i, outcome) in batch.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&outcome.json);
        }
        body.push(b']');
        let result = confirm(
            channel
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
                .await,
        )
        .await;
        metrics::histogram!("pushfleet_outcome_batch_size").record(batch.len() as f64);
        for outcome in batch.drain(..) {
            let _ = outcome.saved.send(result.clone());
        }
    }
}

/// Waits for the broker's confirm of a publish.
pub async fn confirm(
    published: Result<lapin::PublisherConfirm, lapin::Error>,
) -> Result<(), String> {
    let confirm = published.map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(30), confirm).await {
        Ok(Ok(Confirmation::Ack(_) | Confirmation::NotRequested)) => Ok(()),
        Ok(Ok(Confirmation::Nack(_))) => Err("broker refused the message".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no confirm within 30 s".into()),
    }
}

/// Reads an outcome message: a batch (a JSON array), or a single outcome event as workers
/// before batching published them.
pub fn decode(data: &[u8]) -> Result<Vec<OutcomeEvent>, serde_json::Error> {
    match data.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => serde_json::from_slice(data),
        _ => serde_json::from_slice(data).map(|one| vec![one]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_and_single_outcomes_decode() {
        let job = pushfleet_core::job::Job {
            v: pushfleet_core::job::JOB_VERSION,
            id: uuid::Uuid::new_v4(),
            app_id: "com.example".into(),
            platform: pushfleet_core::config::Platform::Apple,
            event: pushfleet_core::Event::IncomingSession,
            lane: pushfleet_core::Lane::Calls,
            received_at_ms: 1,
            deadline_ms: 2,
            attempt: 0,
            push: Default::default(),
        };
        let one = serde_json::to_vec(&OutcomeEvent::for_job(&job)).unwrap();
        let mut batch = b"[".to_vec();
        batch.extend_from_slice(&one);
        batch.push(b',');
        batch.extend_from_slice(&one);
        batch.push(b']');
        assert_eq!(decode(&one).unwrap().len(), 1);
        assert_eq!(decode(&batch).unwrap().len(), 2);
        assert_eq!(decode(b" [] ").unwrap().len(), 0);
        assert!(decode(b"[{").is_err());
        assert!(decode(b"nonsense").is_err());
    }
}
