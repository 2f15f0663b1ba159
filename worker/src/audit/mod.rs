//! The audit sink: drains the durable `audit` queue into Postgres in batches. Workers never
//! wait on Postgres; if the database is away, outcomes wait in RabbitMQ and the sink catches up
//! when it returns. Writes are idempotent, so a redelivered outcome never doubles a row.
//!
//! Nothing in an outcome can stop the sink: a write the database refuses for its data (SQLSTATE
//! classes 22 and 23, say a NUL in a text) is split until the refused outcomes are found, the
//! others are written, and the refused ones are parked in `<ns>.audit.dead` with the error, as
//! are messages that cannot be read at all. Only an unavailable database is waited for.

mod parking;
mod rows;

use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use pushfleet_core::audit::retention::{self, Maintained};
use pushfleet_core::clock::now_ms;
use pushfleet_core::db::DbError;
use pushfleet_core::job::{decode_batch, decode_jobs, wants_reply, Job, OutcomeEvent};
use pushfleet_core::reconnect;
use pushfleet_core::topology::{BrokerError, Topology};
use pushfleet_core::Lane;
use tokio::sync::{watch, Mutex};
use tracing::{info, warn};
use uuid::Uuid;

use self::parking::Parking;
pub use self::rows::write_outcomes;
use self::rows::{dead_letter_outcome, dead_letter_row, write_dead_letter};
use crate::dispatch::queue_alone;
use crate::remote_log::DeadLetterFeed;

/// Set on the dead-letter copy of a job whose terminal row its worker already wrote.
pub const AUDITED_HEADER: &str = "x-pushfleet-audited";

pub struct AuditSink {
    pool: Pool,
    topology: Topology,
    /// Whether some app logs its results remotely: dead letters' outcomes then go there too.
    remote_log: bool,
    batch_size: usize,
    flush_after: Duration,
}

/// Why a write is to be tried again.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error(transparent)]
    Database(#[from] DbError),
    #[error("parking a refused outcome: {0}")]
    Parking(#[from] BrokerError),
}

impl AuditSink {
    pub fn new(
        pool: Pool,
        topology: Topology,
        remote_log: bool,
        batch_size: usize,
        flush_after: Duration,
    ) -> AuditSink {
        AuditSink {
            pool,
            topology,
            remote_log,
            batch_size,
            flush_after,
        }
    }

    /// Consumes on `audit` until it fails or `shutdown` flips; the batch in hand is written
    /// before returning. What cannot be written is parked through `publish`.
    pub async fn run(
        &self,
        audit: &Connection,
        publish: &Connection,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), BrokerError> {
        let parking = Parking::open(publish, &self.topology).await?;
        let channel = audit.create_channel().await?;
        // Room for a full batch being written while the next one arrives. A message holds up
        // to MAX_OUTCOMES_PER_MESSAGE outcomes, so the prefetch in messages also bounds memory.
        let prefetch = (self.batch_size * 2 / 16).clamp(32, usize::from(u16::MAX)) as u16;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let mut consumer = channel
            .basic_consume(
                self.topology.audit_queue().into(),
                "pushfleet-audit-sink".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        loop {
            let mut batch = Batch::default();
            // Wait for the first outcome, then give the batch `flush_after` to fill.
            tokio::select! {
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => batch.add(delivery),
                    Some(Err(e)) => return Err(e.into()),
                    None => return Ok(()),
                },
                _ = shutdown.changed() => return Ok(()),
            }
            let deadline = tokio::time::Instant::now() + self.flush_after;
            while batch.outcomes.len() < self.batch_size {
                match tokio::time::timeout_at(deadline, consumer.next()).await {
                    Ok(Some(Ok(delivery))) => batch.add(delivery),
                    // Unacked deliveries return to the queue with the channel.
                    Ok(Some(Err(e))) => return Err(e.into()),
                    Ok(None) | Err(_) => break,
                }
            }
            if !self.write(batch, &parking, &mut shutdown).await {
                return Ok(());
            }
        }
    }

    /// Gives every dead letter its terminal audit row: jobs that expired in a lane queue, and
    /// jobs a worker could not read. (Jobs that exhausted their retries were audited by their
    /// worker and carry [`AUDITED_HEADER`].) The `dead` queue keeps its own copy for operators.
    /// Dead letters come in bulk (a backlog expiring), so their rows are written in batches like
    /// the outcomes: one transaction for up to `batch_size` jobs.
    pub async fn run_dead_letters(
        &self,
        audit: &Connection,
        publish: &Connection,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), BrokerError> {
        let parking = Parking::open(publish, &self.topology).await?;
        let remote_log = match self.remote_log {
            true => Some(DeadLetterFeed::open(publish, &self.topology).await?),
            false => None,
        };
        // Confirm mode: a job of an expired batch that still has time is queued again before
        // the batch's dead letter is acked.
        let requeue = publish.create_channel().await?;
        requeue
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let channel = audit.create_channel().await?;
        // A dead letter may carry a batch of jobs: a few messages already make a full write.
        let prefetch = (self.batch_size / 4).clamp(64, 1024) as u16;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let mut consumer = channel
            .basic_consume(
                self.topology.dead_audit_queue().into(),
                "pushfleet-dead-letters".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        loop {
            let mut batch = DeadLetters::default();
            tokio::select! {
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => batch.add(delivery),
                    Some(Err(e)) => return Err(e.into()),
                    None => return Ok(()),
                },
                _ = shutdown.changed() => return Ok(()),
            }
            let deadline = tokio::time::Instant::now() + self.flush_after;
            while batch.jobs < self.batch_size {
                match tokio::time::timeout_at(deadline, consumer.next()).await {
                    Ok(Some(Ok(delivery))) => batch.add(delivery),
                    Ok(Some(Err(e))) => return Err(e.into()),
                    Ok(None) | Err(_) => break,
                }
            }
            let audited = self
                .audit_dead_letters(
                    &batch,
                    &requeue,
                    &parking,
                    remote_log.as_ref(),
                    &mut shutdown,
                )
                .await;
            if !audited {
                // Shutting down: not acked, the dead letters wait for the next sink.
                return Ok(());
            }
            if let Some((last, _)) = batch.letters.last() {
                last.ack(BasicAckOptions { multiple: true }).await?;
            }
        }
    }

    /// Writes the terminal rows of a batch of dead letters (queuing again first the jobs of an
    /// expired batch that still have time) and hands them to the remote log. False when
    /// shutdown came first.
    async fn audit_dead_letters(
        &self,
        batch: &DeadLetters,
        requeue: &Channel,
        parking: &Parking,
        remote_log: Option<&DeadLetterFeed>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let mut outcomes = Vec::with_capacity(batch.jobs);
        let mut unreadable = Vec::new();
        for (delivery, letter) in &batch.letters {
            match letter {
                DeadLetter::NoRow => {}
                DeadLetter::Jobs { jobs, batch, death } => {
                    // A lone job expires with its own deadline: nothing to queue again.
                    let live = match batch {
                        true => {
                            self.queue_live_again(requeue, delivery, jobs, death, shutdown)
                                .await
                        }
                        false => Some(Vec::new()),
                    };
                    let Some(live) = live else {
                        return false;
                    };
                    outcomes.extend(
                        jobs.iter()
                            .filter(|job| !live.contains(&job.id))
                            .map(|job| dead_letter_outcome(job, death)),
                    );
                }
                DeadLetter::Unreadable { death } => {
                    unreadable.push((dead_letter_row(delivery, death), &delivery.data))
                }
            }
        }
        // A refused row is parked with its job, as it was dead-lettered.
        let job_body = |outcome: &OutcomeEvent| {
            batch
                .letters
                .iter()
                .filter_map(|(_, letter)| match letter {
                    DeadLetter::Jobs { jobs, .. } => Some(jobs),
                    _ => None,
                })
                .flatten()
                .find(|job| job.id == outcome.job_id)
                .and_then(|job| serde_json::to_vec(job).ok())
                .unwrap_or_default()
        };
        if !self
            .write_parking(&outcomes, &job_body, parking, shutdown)
            .await
        {
            return false;
        }
        for (row, body) in &unreadable {
            let audited = reconnect::until_ok("dead letter not audited yet", shutdown, || async {
                match write_dead_letter(&self.pool, row).await {
                    Err(e) if e.is_data_error() => {
                        parking.park(body, "data", &e.to_string()).await?;
                        Ok(())
                    }
                    written => written.map_err(WriteError::from),
                }
            })
            .await;
            if audited.is_none() {
                return false;
            }
        }
        // Their outcomes never went through the outcome fanout: the apps' log servers get them
        // from here.
        if let Some(remote_log) = remote_log {
            for outcome in &outcomes {
                let fed = reconnect::until_ok(
                    "dead letter not handed to the remote log yet",
                    shutdown,
                    || remote_log.feed(outcome),
                )
                .await;
                if fed.is_none() {
                    return false;
                }
            }
        }
        true
    }

    /// Queues again, each alone in its lane, the jobs of a batch message that expired with its
    /// earliest job while they still have time: they go on as if the batch had never formed.
    /// Returns their ids (none unless the batch `expired`), or `None` when shutdown came first.
    async fn queue_live_again(
        &self,
        requeue: &Channel,
        delivery: &Delivery,
        jobs: &[Job],
        death: &str,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<Vec<Uuid>> {
        if death != "expired" {
            return Some(Vec::new());
        }
        let now = now_ms();
        let reply_to = delivery.properties.reply_to().as_ref();
        let mut live = Vec::new();
        for job in jobs
            .iter()
            .filter(|job| !job.is_expired(now + REQUEUE_SLACK_MS))
        {
            let reply_to = reply_to.filter(|_| wants_reply(job, true, true));
            reconnect::until_ok(
                "job of an expired batch not queued again yet",
                shutdown,
                || queue_alone(requeue, &self.topology, job, reply_to, false),
            )
            .await?;
            metrics::counter!("pushfleet_dead_letter_jobs_requeued_total", "lane" => job.lane.as_str())
                .increment(1);
            live.push(job.id);
        }
        Some(live)
    }

    /// Writes one batch, parking what the database refuses and retrying while it is
    /// unavailable, then acks the batch's messages. False when shutdown came first (nothing
    /// acked: the outcomes stay in the queue for the next sink).
    async fn write(
        &self,
        batch: Batch,
        parking: &Parking,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let Batch {
            outcomes,
            unreadable,
            last,
        } = batch;
        let outcome_body = |outcome: &OutcomeEvent| serde_json::to_vec(outcome).unwrap_or_default();
        if !self
            .write_parking(&outcomes, &outcome_body, parking, shutdown)
            .await
        {
            return false;
        }
        for (body, error) in &unreadable {
            let parked = reconnect::until_ok("parking an unreadable outcome", shutdown, || {
                parking.park(body, "unreadable", error)
            })
            .await;
            if parked.is_none() {
                return false;
            }
        }
        if let Some(last) = last {
            let _ = last.ack(BasicAckOptions { multiple: true }).await;
        }
        true
    }

    /// Writes `outcomes`, parking (as `body_of` it) each one the database refuses for its data,
    /// and retrying while the database is unavailable. False when shutdown came first.
    async fn write_parking(
        &self,
        outcomes: &[OutcomeEvent],
        body_of: &(dyn Fn(&OutcomeEvent) -> Vec<u8> + Sync),
        parking: &Parking,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        if outcomes.is_empty() {
            return true;
        }
        // The parts not yet written, so that a retry goes on where the last attempt stopped.
        let remaining = Mutex::new(vec![outcomes]);
        let what = format!("audit write of {} outcomes failed", outcomes.len());
        let started = Instant::now();
        let written = reconnect::until_ok(&what, shutdown, || async {
            let mut remaining = remaining.lock().await;
            self.write_or_park(&mut remaining, body_of, parking).await
        })
        .await;
        if written.is_none() {
            return false;
        }
        metrics::histogram!("pushfleet_audit_write_seconds")
            .record(started.elapsed().as_secs_f64());
        true
    }

    /// Writes the parts on `remaining`. A part the database refuses for its data is split in
    /// halves, down to the single outcome it refuses, which is parked. Stops at the first
    /// error worth retrying, leaving what is still to do on `remaining`.
    async fn write_or_park(
        &self,
        remaining: &mut Vec<&[OutcomeEvent]>,
        body_of: &(dyn Fn(&OutcomeEvent) -> Vec<u8> + Sync),
        parking: &Parking,
    ) -> Result<(), WriteError> {
        while let Some(part) = remaining.pop() {
            match write_outcomes(&self.pool, part).await {
                Ok(()) => {
                    metrics::counter!("pushfleet_audit_outcomes_written_total")
                        .increment(part.len() as u64);
                    record_lag(part);
                }
                Err(e) if e.is_data_error() && part.len() > 1 => {
                    let (first, second) = part.split_at(part.len() / 2);
                    remaining.extend([second, first]);
                }
                Err(e) if e.is_data_error() => {
                    let body = body_of(&part[0]);
                    if let Err(parking_failed) = parking.park(&body, "data", &e.to_string()).await {
                        remaining.push(part);
                        return Err(parking_failed.into());
                    }
                }
                Err(e) => {
                    metrics::counter!("pushfleet_audit_write_errors_total").increment(1);
                    remaining.push(part);
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }
}

/// A job of an expired batch with less time left than this is recorded `expired` at once.
const REQUEUE_SLACK_MS: u64 = 100;

/// The app and lane of a dead letter (of its first job, for a batch), for its metric labels;
/// "unknown" for what is not a job.
fn dead_letter_labels(data: &[u8]) -> (String, &'static str) {
    #[derive(serde::Deserialize)]
    struct Head {
        app_id: String,
        lane: Lane,
    }
    match decode_batch::<Head>(data).map(|heads| heads.into_iter().next()) {
        Ok(Some(head)) => (head.app_id, head.lane.as_str()),
        _ => ("unknown".into(), "unknown"),
    }
}

/// How far the audit trail is behind: from each outcome's end (its terminal state, else its
/// attempt) to the commit of its row.
fn record_lag(outcomes: &[OutcomeEvent]) {
    let now = now_ms();
    for outcome in outcomes {
        let finished = match (&outcome.terminal, &outcome.attempt) {
            (Some(terminal), _) => terminal.finished_at_ms,
            (None, Some(attempt)) => attempt.at_ms + attempt.duration_ms,
            (None, None) => continue,
        };
        metrics::histogram!("pushfleet_audit_lag_seconds")
            .record(now.saturating_sub(finished) as f64 / 1000.0);
    }
}

/// The outcomes read since the last write, the messages that could not be read, and the last
/// message of all, whose ack (`multiple`) covers the whole batch.
#[derive(Default)]
struct Batch {
    outcomes: Vec<OutcomeEvent>,
    /// The body of each unreadable message, with why.
    unreadable: Vec<(Vec<u8>, String)>,
    last: Option<Delivery>,
}

impl Batch {
    fn add(&mut self, delivery: Delivery) {
        match decode_batch::<OutcomeEvent>(&delivery.data) {
            Ok(outcomes) => self.outcomes.extend(outcomes),
            Err(e) => self.unreadable.push((
                delivery.data.clone(),
                format!("unreadable outcome message: {e}"),
            )),
        }
        self.last = Some(delivery);
    }
}

/// Dead letters read since the last write, each with what it holds, and how many jobs in all.
#[derive(Default)]
struct DeadLetters {
    letters: Vec<(Delivery, DeadLetter)>,
    jobs: usize,
}

enum DeadLetter {
    /// Audited by its worker already (retries exhausted), or an empty batch: only counted.
    NoRow,
    /// `batch` when the message was a batch of jobs (even of one).
    Jobs {
        jobs: Vec<Job>,
        batch: bool,
        death: String,
    },
    Unreadable {
        death: String,
    },
}

impl DeadLetters {
    fn add(&mut self, delivery: Delivery) {
        let headers = delivery.properties.headers().as_ref();
        let header = |name: &str| match headers.and_then(|h| h.inner().get(name)) {
            Some(AMQPValue::LongString(s)) => Some(s.to_string()),
            Some(AMQPValue::ShortString(s)) => Some(s.to_string()),
            _ => None,
        };
        let death = header("x-first-death-reason").unwrap_or_else(|| "unknown".into());
        let (letter, app, lane) = if header(AUDITED_HEADER).is_some() {
            let (app, lane) = dead_letter_labels(&delivery.data);
            (DeadLetter::NoRow, app, lane)
        } else {
            match decode_jobs(&delivery.data) {
                Ok((jobs, batch)) if !jobs.is_empty() => {
                    self.jobs += jobs.len();
                    let (app, lane) = (jobs[0].app_id.clone(), jobs[0].lane.as_str());
                    (
                        DeadLetter::Jobs {
                            jobs,
                            batch,
                            death: death.clone(),
                        },
                        app,
                        lane,
                    )
                }
                Ok(_) => (DeadLetter::NoRow, "unknown".into(), "unknown"),
                Err(_) => {
                    self.jobs += 1;
                    let (app, lane) = dead_letter_labels(&delivery.data);
                    (
                        DeadLetter::Unreadable {
                            death: death.clone(),
                        },
                        app,
                        lane,
                    )
                }
            }
        };
        metrics::counter!(
            "pushfleet_dead_letters_total",
            "reason" => death, "app" => app, "lane" => lane
        )
        .increment(1);
        self.letters.push((delivery, letter));
    }
}

/// Describes the metrics of the audit maintenance (their `# HELP` lines).
pub fn describe() {
    metrics::describe_gauge!(
        "pushfleet_audit_oldest_retained_day_timestamp_seconds",
        "First day (Unix time) of the oldest audit partition kept: how far back the audit goes"
    );
    metrics::describe_counter!(
        "pushfleet_audit_partitions_dropped_total",
        "Audit partitions dropped because their last day was past [audit] retention_days"
    );
    metrics::describe_counter!(
        "pushfleet_audit_invalid_tokens_pruned_total",
        "Dead-token entries deleted because they were older than [audit] retention_days"
    );
    metrics::describe_counter!(
        "pushfleet_audit_default_partition_months_moved_total",
        "Months whose rows were found in a default audit partition and moved into their own"
    );
}

/// Keeps the audit partitions in place and the audit within `retention_days`
/// (`pushfleet_core::audit::retention`), checking a few times a day.
pub async fn maintain_partitions(
    pool: Pool,
    retention_days: u32,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        match maintain_once(&pool, retention_days).await {
            Ok(done) => info!(
                dropped = ?done.dropped, months_moved = done.months_moved,
                invalid_tokens_pruned = done.invalid_tokens_pruned,
                "audit partitions in place"
            ),
            Err(e) => {
                warn!(error = %e, "could not maintain audit partitions; rows go to the default partition")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(6 * 3600)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// One maintenance run, counted in the metrics.
pub async fn maintain_once(pool: &Pool, retention_days: u32) -> Result<Maintained, DbError> {
    let mut client = pool.get().await?;
    let done = retention::maintain(&mut **client, retention_days).await?;
    metrics::counter!("pushfleet_audit_partitions_dropped_total")
        .increment(done.dropped.len() as u64);
    metrics::counter!("pushfleet_audit_invalid_tokens_pruned_total")
        .increment(done.invalid_tokens_pruned);
    metrics::counter!("pushfleet_audit_default_partition_months_moved_total")
        .increment(done.months_moved);
    if let Some(oldest) = done.oldest_retained_day {
        let seconds = oldest
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        metrics::gauge!("pushfleet_audit_oldest_retained_day_timestamp_seconds").set(seconds);
    }
    Ok(done)
}
