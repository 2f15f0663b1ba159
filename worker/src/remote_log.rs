//! Remote result logging per app (Sylk's `log_remote_urls`): every terminal outcome of an app
//! with a `log_url` is POSTed there as JSON, the fields of its audit row (the token only as its
//! fingerprint).
//!
//! The outcomes come from `<ns>.remote_log`, a queue of its own on the outcome fanout, so a log
//! server never holds up deliveries or the audit sink. Each app has a bounded buffer
//! (`log_buffer` outcomes) drained by its own poster: a JSON array of at most
//! [`MAX_OUTCOMES_PER_REQUEST`] outcomes per request, retried with back-off while the server
//! fails. A server that stays away fills only its own buffer, whose oldest outcomes are then
//! dropped and counted. A broker message is acked once each of its outcomes is posted or
//! dropped: exactly once while all goes well, at least once across a restart. Jobs that died in
//! their queue (expired before a worker took them) reach the queue from the dead-letter
//! auditor instead ([`DeadLetterFeed`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::ExponentialBackoffBuilder;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::Acker;
use lapin::{BasicProperties, Channel, Connection};
use pushfleet_core::clock::system_time;
use pushfleet_core::config::{AppSettings, Platform};
use pushfleet_core::job::{decode_batch, OutcomeEvent};
use pushfleet_core::topology::{self, BrokerError, Topology, PERSISTENT};
use pushfleet_core::Settings;
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use crate::outcomes::{BATCH_TYPE, CONFIRM_TIMEOUT};

/// The most outcomes one request carries.
pub const MAX_OUTCOMES_PER_REQUEST: usize = 100;
/// Waits between failed requests to one log server: from the first to the longest.
const FIRST_RETRY: Duration = Duration::from_millis(200);
const LONGEST_RETRY: Duration = Duration::from_secs(30);

/// Describes the metrics of this module (their `# HELP` lines).
pub fn describe() {
    metrics::describe_counter!(
        "pushfleet_remote_log_posted_total",
        "Terminal outcomes an app's log server accepted (log_url), by app"
    );
    metrics::describe_counter!(
        "pushfleet_remote_log_failed_total",
        "Requests to an app's log server that failed (error, timeout, non-2xx) and are retried, by app"
    );
    metrics::describe_counter!(
        "pushfleet_remote_log_dropped_total",
        "Outcomes dropped, oldest first, because an app's log buffer (log_buffer) was full, by app"
    );
}

fn retry_schedule() -> backoff::ExponentialBackoff {
    ExponentialBackoffBuilder::new()
        .with_initial_interval(FIRST_RETRY)
        .with_max_interval(LONGEST_RETRY)
        .with_max_elapsed_time(None)
        .build()
}

/// Acks its broker message when the last outcome of it is posted or dropped, unless the
/// consumer that received it is gone (the broker then delivers the message again).
struct AckWhenDone {
    /// `None` only in tests.
    acker: Option<Acker>,
    consumer_alive: Arc<AtomicBool>,
}

impl Drop for AckWhenDone {
    fn drop(&mut self) {
        if !self.consumer_alive.load(Ordering::Acquire) {
            return;
        }
        if let Some(acker) = self.acker.take() {
            tokio::spawn(async move {
                let _ = acker.ack(BasicAckOptions::default()).await;
            });
        }
    }
}

struct Entry {
    seq: u64,
    json: Arc<Value>,
    /// Dropped with the entry: the message is acked once none of its entries is left.
    _message: Arc<AckWhenDone>,
}

#[derive(Default)]
struct Buffer {
    entries: VecDeque<Entry>,
    next_seq: u64,
}

/// One app's log server and the outcomes waiting for it.
struct AppLog {
    app: String,
    url: String,
    auth: Option<String>,
    timeout: Duration,
    key: Option<String>,
    capacity: usize,
    buffer: Mutex<Buffer>,
    filled: Notify,
}

impl AppLog {
    fn new(app: &AppSettings, url: &str) -> AppLog {
        AppLog {
            app: app.id.clone(),
            url: url.to_string(),
            auth: app.log_auth.clone(),
            timeout: Duration::from_millis(app.log_timeout_ms),
            key: app.log_key.clone(),
            capacity: app.log_buffer,
            buffer: Mutex::default(),
            filled: Notify::new(),
        }
    }

    fn buffer(&self) -> std::sync::MutexGuard<'_, Buffer> {
        self.buffer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds an outcome, dropping the oldest beyond the capacity.
    fn add(&self, json: Arc<Value>, message: &Arc<AckWhenDone>) {
        let dropped = {
            let mut buffer = self.buffer();
            let seq = buffer.next_seq;
            buffer.next_seq += 1;
            buffer.entries.push_back(Entry {
                seq,
                json,
                _message: message.clone(),
            });
            let excess = buffer.entries.len().saturating_sub(self.capacity);
            buffer.entries.drain(..excess).count()
        };
        if dropped > 0 {
            metrics::counter!("pushfleet_remote_log_dropped_total", "app" => self.app.clone())
                .increment(dropped as u64);
        }
        self.filled.notify_one();
    }

    /// Forgets every outcome held: their messages go back to the queue with the channel.
    fn clear(&self) {
        self.buffer().entries.clear();
    }

    /// The next request's outcomes: the oldest held, and the last one's sequence number.
    fn next_batch(&self) -> Option<(Vec<Arc<Value>>, u64)> {
        let buffer = self.buffer();
        let batch: Vec<_> = buffer
            .entries
            .iter()
            .take(MAX_OUTCOMES_PER_REQUEST)
            .map(|e| (e.json.clone(), e.seq))
            .collect();
        let last = batch.last()?.1;
        Some((batch.into_iter().map(|(json, _)| json).collect(), last))
    }

    /// Removes what was posted (up to `last`); returns how many were still held.
    fn posted(&self, last: u64) -> usize {
        let mut buffer = self.buffer();
        let done = buffer.entries.iter().take_while(|e| e.seq <= last).count();
        buffer.entries.drain(..done);
        done
    }

    /// Posts what is held, for as long as the worker runs.
    async fn post_forever(&self, http: reqwest::Client, mut shutdown: watch::Receiver<bool>) {
        let mut waits = retry_schedule();
        loop {
            let Some((batch, last)) = self.next_batch() else {
                tokio::select! {
                    _ = self.filled.notified() => continue,
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
            };
            // A request in flight does not hold up the worker's exit: what it carried is still
            // unacked and comes again.
            let posted = tokio::select! {
                posted = self.post(&http, &batch) => Some(posted),
                _ = shutdown.wait_for(|stop| *stop) => None,
            };
            let Some(posted) = posted else { return };
            match posted {
                Ok(answer) => {
                    waits.reset();
                    let posted = self.posted(last);
                    metrics::counter!("pushfleet_remote_log_posted_total", "app" => self.app.clone())
                        .increment(posted as u64);
                    let logged = self.key.as_ref().map(|key| answer[key.as_str()].clone());
                    match logged {
                        Some(value) => {
                            info!(app = %self.app, outcomes = batch.len(), log_key = %value, "outcomes posted to the log server")
                        }
                        None => {
                            tracing::debug!(app = %self.app, outcomes = batch.len(), "outcomes posted to the log server")
                        }
                    }
                }
                Err(error) => {
                    metrics::counter!("pushfleet_remote_log_failed_total", "app" => self.app.clone())
                        .increment(1);
                    let wait = waits.next_backoff().unwrap_or(LONGEST_RETRY);
                    warn!(app = %self.app, url = %self.url, %error, retry_in_ms = wait.as_millis() as u64,
                          "log server did not take the outcomes; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.wait_for(|stop| *stop) => return,
                    }
                }
            }
        }
    }

    /// One request; the server's JSON answer (`null` when it is not JSON).
    async fn post(&self, http: &reqwest::Client, batch: &[Arc<Value>]) -> Result<Value, PostError> {
        let mut request = http
            .post(&self.url)
            .timeout(self.timeout)
            .json(&batch.iter().map(|v| &**v).collect::<Vec<_>>());
        if let Some(auth) = &self.auth {
            request = request.header(reqwest::header::AUTHORIZATION, auth);
        }
        let response = request.send().await?;
        let status = response.status();
        if !status.is_success() {
            return Err(PostError::Status(status.as_u16()));
        }
        let body = response.bytes().await?;
        Ok(serde_json::from_slice(&body).unwrap_or(Value::Null))
    }
}

/// Why a request to a log server did not take.
#[derive(Debug, thiserror::Error)]
enum PostError {
    #[error(transparent)]
    Http(#[from] reqwest::Error),
    #[error("answered HTTP {0}")]
    Status(u16),
}

/// What a log server receives for one outcome: the fields of its audit row.
pub fn log_record(outcome: &OutcomeEvent) -> Option<Value> {
    let terminal = outcome.terminal.as_ref()?;
    let time = |ms| pushfleet_core::audit::query::format_time(system_time(ms));
    Some(json!({
        "job_id": outcome.job_id,
        "received_at": time(outcome.received_at_ms),
        "finished_at": time(terminal.finished_at_ms),
        "app_id": outcome.app_id,
        "platform": outcome.platform.as_str(),
        "event": outcome.event.as_str(),
        "call_id": outcome.call_id,
        "account": outcome.account,
        "device_id": outcome.device_id,
        "token_fingerprint": outcome.token_fingerprint,
        "lane": outcome.lane.as_str(),
        "status": terminal.status.as_str(),
        "attempt_count": terminal.attempts,
        "provider_status": terminal.provider_status,
        "provider_reason": terminal.reason,
        "provider_message_id": terminal.provider_message_id,
        "latency_ms": terminal.finished_at_ms.saturating_sub(outcome.received_at_ms),
        "api_key_id": outcome.api_key_id,
    }))
}

/// Hands the terminal outcome of a job that died in its queue (audited from the dead letters,
/// not from an outcome) to `<ns>.remote_log`.
pub struct DeadLetterFeed {
    /// In confirm mode: the dead letter is acked only once its outcome is safe.
    channel: Channel,
    queue: String,
}

impl DeadLetterFeed {
    pub async fn open(
        connection: &Connection,
        topology: &Topology,
    ) -> Result<DeadLetterFeed, BrokerError> {
        topology.declare_remote_log(connection).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(DeadLetterFeed {
            channel,
            queue: topology.remote_log_queue(),
        })
    }

    pub async fn feed(&self, outcome: &OutcomeEvent) -> Result<(), BrokerError> {
        let body = serde_json::to_vec(std::slice::from_ref(outcome))?;
        let published = self
            .channel
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
                    .with_delivery_mode(PERSISTENT)
                    .with_content_type("application/json".into())
                    .with_type(BATCH_TYPE.into()),
            )
            .await;
        topology::confirm(published, CONFIRM_TIMEOUT).await
    }
}

type Logs = HashMap<(String, Platform), Arc<AppLog>>;

/// The apps with a `log_url`.
fn app_logs(settings: &Settings) -> Logs {
    settings
        .apps
        .iter()
        .filter_map(|app| {
            let url = app.log_url.as_deref()?;
            Some((
                (app.id.clone(), app.platform),
                Arc::new(AppLog::new(app, url)),
            ))
        })
        .collect()
}

/// Whether any app logs remotely: only then does a worker run [`run`].
pub fn configured(settings: &Settings) -> bool {
    settings.apps.iter().any(|app| app.log_url.is_some())
}

/// Feeds the apps' log servers until shutdown, on a broker connection of its own.
pub async fn run(settings: Settings, worker_id: String, mut shutdown: watch::Receiver<bool>) {
    let logs = app_logs(&settings);
    if logs.is_empty() {
        return;
    }
    let http = reqwest::Client::new();
    let mut posters = tokio::task::JoinSet::new();
    for log in logs.values() {
        let (log, http, stop) = (log.clone(), http.clone(), shutdown.clone());
        posters.spawn(async move { log.post_forever(http, stop).await });
    }
    let topology = Topology::new(&settings.rabbitmq);
    // Room for every buffer to be full while the other apps' outcomes still flow.
    let held: usize = logs.values().map(|log| log.capacity).sum();
    let prefetch = (held + 256).min(usize::from(u16::MAX)) as u16;
    let mut waits = retry_schedule();
    loop {
        let alive = Arc::new(AtomicBool::new(true));
        let consumed = consume(
            &settings,
            &worker_id,
            &topology,
            prefetch,
            &logs,
            &alive,
            shutdown.clone(),
        )
        .await;
        // What is held came on this connection: the broker delivers it again to the next one.
        alive.store(false, Ordering::Release);
        for log in logs.values() {
            log.clear();
        }
        if *shutdown.borrow() {
            break;
        }
        let wait = waits.next_backoff().unwrap_or(LONGEST_RETRY);
        match consumed {
            Ok(()) => waits.reset(),
            Err(error) => warn!(%error, "remote log consumer stopped; reconnecting"),
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
    while posters.join_next().await.is_some() {}
}

/// Consumes `<ns>.remote_log` until shutdown (`Ok`) or until the connection or the consumer
/// ends (an error: [`run`] connects again).
async fn consume(
    settings: &Settings,
    worker_id: &str,
    topology: &Topology,
    prefetch: u16,
    logs: &Logs,
    alive: &Arc<AtomicBool>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), BrokerError> {
    let connection =
        topology::connect(&settings.rabbitmq, &format!("{worker_id}-remote-log")).await?;
    topology.declare_remote_log(&connection).await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            topology.remote_log_queue().into(),
            "pushfleet-remote-log".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    loop {
        let next = tokio::select! {
            next = consumer.next() => Some(next),
            _ = shutdown.wait_for(|stop| *stop) => None,
        };
        let Some(next) = next else {
            // Nothing held may be acked once the worker stops posting.
            alive.store(false, Ordering::Release);
            let _ = connection.close(200, "shutdown".into()).await;
            return Ok(());
        };
        let delivery = next.ok_or(BrokerError::Disconnected)??;
        let message = Arc::new(AckWhenDone {
            acker: Some(delivery.acker.clone()),
            consumer_alive: alive.clone(),
        });
        // An unreadable message is the audit sink's to park; here it is only acked.
        for outcome in decode_batch::<OutcomeEvent>(&delivery.data).unwrap_or_default() {
            let Some(log) = logs.get(&(outcome.app_id.clone(), outcome.platform)) else {
                continue;
            };
            if let Some(record) = log_record(&outcome) {
                log.add(Arc::new(record), &message);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pushfleet_core::config::AppType;

    fn app_log(capacity: usize) -> AppLog {
        let mut app = crate::payload::test_support::app("a", Platform::Apple, AppType::Sylk);
        app.log_buffer = capacity;
        AppLog::new(&app, "http://127.0.0.1:9/log")
    }

    #[tokio::test]
    async fn a_full_buffer_drops_its_oldest_and_posted_entries_leave() {
        let log = app_log(3);
        let message = Arc::new(AckWhenDone {
            acker: None,
            consumer_alive: Arc::new(AtomicBool::new(false)),
        });
        for n in 0..5 {
            log.add(Arc::new(json!(n)), &message);
        }
        let (batch, last) = log.next_batch().expect("entries");
        assert_eq!(
            batch.iter().map(|v| (**v).clone()).collect::<Vec<_>>(),
            [json!(2), json!(3), json!(4)]
        );
        // While the request is out the buffer overflows again: 2 goes, and only 3 and 4 of
        // those posted are still there to remove.
        log.add(Arc::new(json!(5)), &message);
        assert_eq!(log.posted(last), 2);
        assert_eq!(log.next_batch().map(|(b, _)| b.len()), Some(1));
    }
}
