//! The delivery loop: consume jobs from both lanes, send each to its provider, report the outcome
//! to the audit exchange, answer a waiting sync caller, and only then acknowledge the job — so a
//! worker that dies mid-push leaves the job in the queue for another worker (at-least-once).
//! A push that may succeed later is parked in a retry queue of the broker, never in memory.
//! A message may carry a batch of jobs (ingest coalesces them): they are handled side by side,
//! the message is acked once all are concluded, and each concluded job is noted in the ledger
//! so that a worker getting the batch again does not send it twice (see [`Dispatcher::run`]).
//! What happens to one job in between — checked, sent, concluded — is in [`phases`].

mod phases;

use std::borrow::Cow;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use futures_util::future::join_all;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::Channel;
use pushfleet_core::config::{AppSettings, Platform, RetrySettings, Settings, WorkerSettings};
use pushfleet_core::job::{decode_jobs, wants_reply, Job};
use pushfleet_core::logged::Escaped;
use pushfleet_core::reload::{self, AppChanges, FileStamp};
use pushfleet_core::topology::{self, BrokerError, Topology, PERSISTENT};
use pushfleet_core::{EventPolicies, Lane};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{info, warn, Instrument};
use uuid::Uuid;

pub use self::phases::Step;
use crate::acks::{Acks, Settle};
use crate::audit::AUDITED_HEADER;
use crate::dead_tokens::DeadTokens;
use crate::ledger_view::LedgerView;
use crate::links::Links;
use crate::outcomes::{OutcomeBatcher, CONFIRM_TIMEOUT};
use crate::providers::{Provider, ProviderError};
use crate::replies::ReplySender;

/// Everything a job handler needs, shared by all in-flight jobs.
pub struct Dispatcher {
    /// What a reload replaces; a job holds the version it started with until it is done.
    live: RwLock<Arc<Live>>,
    /// Credential files whose reload failed: not tried again until one of them changes.
    refused: Mutex<Option<Vec<FileStamp>>>,
    /// Connection limits and timeouts of new clients (fixed until a restart).
    worker: WorkerSettings,
    policies: EventPolicies,
    topology: Topology,
    worker_id: String,
    pub ledger: Arc<LedgerView>,
    pub dead_tokens: Arc<DeadTokens>,
}

/// The part of the configuration a reload changes.
struct Live {
    apps: HashMap<(String, Platform), Arc<AppClient>>,
    retry: RetrySettings,
}

/// A configured app with its provider client, and the files the client was built from.
pub struct AppClient {
    pub settings: AppSettings,
    pub provider: Provider,
    files: Vec<(PathBuf, FileStamp)>,
}

impl AppClient {
    fn build(app: &AppSettings, worker: &WorkerSettings) -> Result<AppClient, ProviderError> {
        // Stamped before reading, so that a file replaced meanwhile is read again next time.
        let files = app
            .files()
            .into_iter()
            .map(|(_, path)| (path.to_path_buf(), reload::stamp(path)))
            .collect();
        // Present from the start at 0, so that the credential alarm sees the first failure.
        metrics::counter!(
            "pushfleet_credential_failures_total",
            "app" => app.id.clone(), "platform" => app.platform.as_str()
        )
        .increment(0);
        Ok(AppClient {
            provider: Provider::for_app(app, worker)?,
            settings: app.clone(),
            files,
        })
    }

    fn files_changed(&self) -> bool {
        self.files
            .iter()
            .any(|(path, stamp)| reload::stamp(path) != *stamp)
    }
}

/// Where a job handler's results go, on the worker's broker connection.
#[derive(Clone)]
struct Outlets {
    /// Confirm mode: retry copies and dead letters.
    publisher: Channel,
    outcomes: OutcomeBatcher,
    replies: ReplySender,
}

impl Dispatcher {
    /// Builds one provider client per configured app; a bad credential file is an error here,
    /// at start-up, not at the first push.
    pub fn new(settings: &Settings, worker_id: String) -> Result<Dispatcher, ProviderError> {
        let mut apps = HashMap::new();
        for app in &settings.apps {
            let client = AppClient::build(app, &settings.worker)?;
            apps.insert((app.id.clone(), app.platform), Arc::new(client));
        }
        let topology = Topology::new(&settings.rabbitmq);
        let policies = settings.event_policies();
        Ok(Dispatcher {
            live: RwLock::new(Arc::new(Live {
                apps,
                retry: settings.retry.clone(),
            })),
            refused: Mutex::new(None),
            worker: settings.worker.clone(),
            ledger: Arc::new(LedgerView::new(topology.clone(), policies.clone())),
            policies,
            topology,
            worker_id,
            dead_tokens: Arc::new(DeadTokens::default()),
        })
    }

    fn live(&self) -> Arc<Live> {
        self.live
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The app's client as configured now.
    fn app(&self, id: &str, platform: Platform) -> Option<Arc<AppClient>> {
        self.live().apps.get(&(id.to_string(), platform)).cloned()
    }

    /// Puts `apps` and `retry` in force. Unchanged apps keep their client and its connections;
    /// a new or changed app (its settings or a file it reads) gets a new client, and jobs in
    /// flight finish with the client they started with. Any app that cannot be built refuses
    /// the whole reload, and the apps in force stay.
    pub fn reload(
        &self,
        apps: &[AppSettings],
        retry: &RetrySettings,
    ) -> Result<AppChanges, ProviderError> {
        let current = self.live();
        let mut next = HashMap::new();
        let mut changes = AppChanges::default();
        for app in apps {
            let key = (app.id.clone(), app.platform);
            let client = match current.apps.get(&key) {
                Some(client) if client.settings == *app && !client.files_changed() => {
                    client.clone()
                }
                existing => {
                    let client = Arc::new(AppClient::build(app, &self.worker)?);
                    match existing {
                        Some(_) => changes.changed.push(reload::label(app)),
                        None => changes.added.push(reload::label(app)),
                    }
                    client
                }
            };
            next.insert(key, client);
        }
        changes.removed = current
            .apps
            .iter()
            .filter(|(key, _)| !next.contains_key(*key))
            .map(|(_, client)| reload::label(&client.settings))
            .collect();
        *self.live.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(Live {
            apps: next,
            retry: retry.clone(),
        });
        Ok(changes)
    }

    /// Rebuilds the clients whose credential or CA files changed on disk. `None` when nothing
    /// changed, or when the files are still those a previous attempt refused.
    pub fn refresh_credentials(&self) -> Option<Result<AppChanges, ProviderError>> {
        let live = self.live();
        if !live.apps.values().any(|client| client.files_changed()) {
            return None;
        }
        let stamps: Vec<FileStamp> = live
            .apps
            .values()
            .flat_map(|client| client.files.iter().map(|(path, _)| reload::stamp(path)))
            .collect();
        let mut refused = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
        if refused.as_ref() == Some(&stamps) {
            return None;
        }
        let apps: Vec<AppSettings> = live.apps.values().map(|c| c.settings.clone()).collect();
        let result = self.reload(&apps, &live.retry);
        *refused = result.is_err().then_some(stamps);
        Some(result)
    }

    /// Consumes both lanes until a connection fails or `shutdown` flips; then waits for the
    /// jobs in flight to finish.
    pub async fn run(
        self: &Arc<Self>,
        links: &Links,
        prefetch: u16,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), BrokerError> {
        // Outcomes and replies go out on their own channel, in confirm mode: a job is acked only
        // once the broker holds its outcome.
        let publisher = links.publish.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let (outcomes, batches) = OutcomeBatcher::start(publisher.clone(), &self.topology);
        let mut ackers = Vec::new();
        // Sync replies are best effort and unconfirmed, on a connection of their own (see
        // `replies`): a confirm channel would keep every reply's pending confirm.
        let (replies, replying) = ReplySender::start(
            links.settings.clone(),
            format!("{}-replies", self.worker_id),
        );
        let outlets = Outlets {
            publisher: publisher.clone(),
            outcomes,
            replies,
        };
        // Cancels and claims of the recent past first, so that no superseded push slips out.
        self.ledger.wait_caught_up(Duration::from_secs(5)).await;
        let mut consumers = Vec::new();
        for lane in Lane::ALL {
            // One channel per lane, so that a full messages lane never holds up calls.
            let channel = links.consume.create_channel().await?;
            // The prefetch bounds the messages held per lane, and so the worker's memory.
            channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await?;
            let tag = format!("{}-{}", self.worker_id, lane);
            let consumer = channel
                .basic_consume(
                    self.topology.lane_queue(lane).into(),
                    tag.clone().into(),
                    // Manual acks: a job is removed from the queue only after its outcome is safe.
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let (acks, acking) = Acks::start();
            ackers.push(acking);
            // The prefetch counts messages, and a message may carry many jobs: the jobs in
            // flight per lane are bounded by the prefetch too.
            let permits = Arc::new(Semaphore::new(usize::from(prefetch)));
            consumers.push((channel, tag, consumer, acks, permits));
        }
        info!(worker = %self.worker_id, "consuming calls and messages");

        // A lane's next message is read only while its jobs in hand (read, not yet concluded)
        // leave room: the unacked messages the broker sends ahead stay raw bytes, whatever
        // number of jobs they carry.
        let in_hand = usize::from(prefetch) * 2;
        let mut streams = futures_util::stream::select_all(consumers.iter_mut().map(
            |(_, _, consumer, acks, permits)| {
                let (acks, permits) = (acks.clone(), permits.clone());
                let room = Arc::new(Semaphore::new(in_hand));
                Box::pin(consumer.by_ref().then(move |delivery| {
                    let (acks, permits, room) = (acks.clone(), permits.clone(), room.clone());
                    async move {
                        let delivery = delivery?;
                        let jobs = decode_jobs(&delivery.data);
                        let count = jobs.as_ref().map_or(1, |(jobs, _)| jobs.len());
                        let held = room
                            .acquire_many_owned(count.clamp(1, in_hand) as u32)
                            .await
                            .expect("the room is never closed");
                        Ok::<_, lapin::Error>((delivery, jobs, held, acks, permits))
                    }
                }))
            },
        ));
        let mut in_flight = JoinSet::new();
        let result = loop {
            tokio::select! {
                next = streams.next() => match next {
                    Some(Ok((delivery, jobs, held, acks, permits))) => {
                        acks.received(delivery.delivery_tag);
                        let (dispatcher, outlets) = (self.clone(), outlets.clone());
                        in_flight.spawn(async move {
                            let tag = delivery.delivery_tag;
                            let acker = delivery.acker.clone();
                            let redelivered = delivery.redelivered;
                            let handled = AssertUnwindSafe(dispatcher.handle(delivery, jobs, &outlets, &permits))
                                .catch_unwind()
                                .await;
                            let settle = handled.unwrap_or_else(|_| after_panic(redelivered));
                            acks.finished(tag, acker, settle);
                            drop(held);
                        });
                    }
                    Some(Err(e)) => break Err(e.into()),
                    None => break Ok(()),
                },
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
                _ = shutdown.changed() => break Ok(()),
            }
        };
        drop(streams);
        // Stop taking new jobs, finish the ones in hand: their outcomes get published and acked.
        for (channel, tag, ..) in &consumers {
            let _ = channel
                .basic_cancel(tag.clone().into(), BasicCancelOptions::default())
                .await;
        }
        while in_flight.join_next().await.is_some() {}
        // Every handle on the outcome batcher and the ackers gone, they send their last
        // batches; the lane channels stay open until the acks are out.
        drop(outlets);
        let channels: Vec<Channel> = consumers.into_iter().map(|(c, ..)| c).collect();
        let _ = batches.await;
        let _ = replying.await;
        for acking in ackers {
            let _ = acking.await;
        }
        drop(channels);
        let _ = publisher.wait_for_confirms().await;
        result
    }

    /// Handles one delivery (one job, or a batch of them) and says how it leaves its queue.
    async fn handle(
        &self,
        delivery: Delivery,
        jobs: serde_json::Result<(Vec<Job>, bool)>,
        outlets: &Outlets,
        permits: &Semaphore,
    ) -> Settle {
        let (jobs, batch) = match jobs {
            Ok(jobs) => jobs,
            Err(e) => {
                warn!(error = %e, "unreadable job sent to the dead-letter queue");
                metrics::counter!("pushfleet_jobs_unreadable_total").increment(1);
                return Settle::Reject;
            }
        };
        if batch {
            return self.handle_batch(&jobs, &delivery, outlets, permits).await;
        }
        let Some(job) = jobs.first() else {
            return Settle::Reject;
        };
        let _permit = permits.acquire().await;
        let source = Source {
            delivery: &delivery,
            batch: false,
            reply_to: delivery.properties.reply_to().as_ref(),
        };
        match AssertUnwindSafe(self.handle_job(job, &source, outlets))
            .catch_unwind()
            .await
        {
            Ok(Ok(())) => Settle::Ack,
            // Without a recorded outcome the job is not done: back to its queue.
            Ok(Err(_)) => Settle::Requeue,
            Err(_) => after_panic(delivery.redelivered || panicked_before(&delivery)),
        }
    }

    /// Handles the jobs of a batch message side by side, each as if it came alone, and acks the
    /// message once every job is concluded. A job that is not (its outcome unconfirmed, its
    /// handler panicking) is queued again on its own, so that the others are not repeated; only
    /// when none is concluded, or that fails, does the whole message go back. The jobs some
    /// worker already concluded (one that died before acking it) are skipped.
    async fn handle_batch(
        &self,
        jobs: &[Job],
        delivery: &Delivery,
        outlets: &Outlets,
        permits: &Semaphore,
    ) -> Settle {
        let batch_id = delivery
            .properties
            .message_id()
            .as_ref()
            .and_then(|id| Uuid::parse_str(id.as_str()).ok());
        let done = batch_id.map_or_else(Vec::new, |id| self.ledger.concluded(id));
        let reply_to = delivery.properties.reply_to().as_ref();
        let ends = join_all(jobs.iter().enumerate().map(|(index, job)| {
            let index = index as u16;
            let done = done.contains(&index);
            async move {
                if done {
                    metrics::counter!("pushfleet_jobs_already_concluded_total").increment(1);
                    info!(job_id = %job.id, "concluded before its batch came back; skipped");
                    return JobEnd::Concluded;
                }
                let _permit = permits.acquire().await;
                let source = Source {
                    delivery,
                    batch: true,
                    reply_to: reply_to.filter(|_| wants_reply(job, true, true)),
                };
                // Boxed once the permit is held: a job waiting for its turn stays a few bytes
                // instead of a whole handler's state, so a worker holding many batches stays
                // small.
                let handled = Box::pin(self.handle_job(job, &source, outlets));
                match AssertUnwindSafe(handled).catch_unwind().await {
                    Ok(Ok(())) => {
                        if let Some(batch) = batch_id {
                            self.ledger.conclude(batch, index);
                        }
                        JobEnd::Concluded
                    }
                    Ok(Err(_)) => JobEnd::Unsaved,
                    Err(_) => {
                        metrics::counter!("pushfleet_jobs_panicked_total").increment(1);
                        warn!(job_id = %job.id, "a job's handler panicked; job queued again alone");
                        JobEnd::Panicked
                    }
                }
            }
        }))
        .await;
        let alone = match after_batch(&ends) {
            AfterBatch::Ack => return Settle::Ack,
            AfterBatch::Requeue => return Settle::Requeue,
            AfterBatch::QueueAlone(alone) => alone,
        };
        for index in alone {
            let job = &jobs[index];
            let reply_to = reply_to.filter(|_| wants_reply(job, true, true));
            let panicked = ends[index] == JobEnd::Panicked;
            let queued =
                queue_alone(&outlets.publisher, &self.topology, job, reply_to, panicked).await;
            if let Err(e) = queued {
                warn!(job_id = %job.id, error = %e, "job not queued again alone; its batch returned to its queue");
                return Settle::Requeue;
            }
        }
        Settle::Ack
    }

    /// Handles one job: sends it, saves its outcome, answers its sync caller. An error when the
    /// outcome (or the job's next copy) is not confirmed: the job is not concluded.
    async fn handle_job(
        &self,
        job: &Job,
        source: &Source<'_>,
        outlets: &Outlets,
    ) -> Result<(), BrokerError> {
        let Outlets {
            publisher,
            outcomes,
            replies,
        } = outlets;
        record_queue_wait(job);
        let span = tracing::info_span!("job", job_id = %job.id, call_id = %Escaped(&job.push.call_id), event = %job.event, app = %job.app_id, attempt = job.attempt + 1);
        async {
            let saved = match self.process(job).await {
                Step::Done {
                    outcome,
                    reply,
                    dead_letter,
                } => {
                    let mut saved = outcomes.save(&outcome).await;
                    if saved.is_ok() && dead_letter {
                        let reason = outcome
                            .terminal
                            .as_ref()
                            .and_then(|t| t.reason.clone())
                            .unwrap_or_default();
                        saved = self
                            .publish_dead_letter(publisher, source, job, &reason)
                            .await;
                    }
                    // Only an answer the audit trail holds is given: a job whose outcome is not
                    // saved goes back to its queue and may still end otherwise.
                    if let (Ok(()), Some(reply_to)) = (&saved, source.reply_to) {
                        // Best effort: if the caller gave up waiting, the reply goes nowhere.
                        replies.send(reply_to, &reply);
                    }
                    saved
                }
                Step::Retry { outcome, tier_ms } => {
                    let mut next = job.clone();
                    next.attempt += 1;
                    match self
                        .publish_retry(publisher, &next, tier_ms, source.reply_to)
                        .await
                    {
                        Ok(()) => outcomes.save(&outcome).await,
                        Err(e) => Err(e),
                    }
                }
                Step::Later {
                    next,
                    tier_ms,
                    outcome,
                    reply,
                } => {
                    // The ring's outcome first: should the next copy then fail to publish, the
                    // job comes back and rings once more (its attempt recorded once), rather
                    // than leaving two copies ringing side by side.
                    let mut saved = match outcome {
                        Some(outcome) => outcomes.save(&outcome).await,
                        None => Ok(()),
                    };
                    // A caller answered now waits no longer: the job goes on without it.
                    let reply_to = source.reply_to.filter(|_| reply.is_none());
                    if saved.is_ok() {
                        saved = self
                            .publish_retry(publisher, &next, tier_ms, reply_to)
                            .await;
                    }
                    if let (Ok(()), Some(reply), Some(reply_to)) = (&saved, reply, source.reply_to)
                    {
                        replies.send(reply_to, &reply);
                    }
                    saved
                }
            };
            if let Err(e) = &saved {
                // Without a recorded outcome the job is not done: it goes back.
                warn!(error = %e, "outcome not confirmed; job returned to its queue");
            }
            saved
        }
        .instrument(span)
        .await
    }

    /// Parks `job` in a retry queue; it comes back to its lane when the tier's TTL runs out. A
    /// sync caller still waiting (at `reply_to`) gets the answer of the attempt that ends it.
    async fn publish_retry(
        &self,
        publisher: &Channel,
        job: &Job,
        tier_ms: u64,
        reply_to: Option<&ShortString>,
    ) -> Result<(), BrokerError> {
        let body = serde_json::to_vec(job)?;
        let mut properties = topology::job_properties(job.id);
        if let Some(reply_to) = reply_to {
            properties = properties.with_reply_to(reply_to.clone());
        }
        let published = publisher
            .basic_publish(
                "".into(),
                self.topology.retry_queue(job.lane, tier_ms).into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await;
        topology::confirm(published, CONFIRM_TIMEOUT).await
    }

    /// Keeps a copy of a job that gave up in the dead letters, for operators to inspect and
    /// re-drive; its terminal row is already written.
    async fn publish_dead_letter(
        &self,
        publisher: &Channel,
        source: &Source<'_>,
        job: &Job,
        reason: &str,
    ) -> Result<(), BrokerError> {
        let mut headers = FieldTable::default();
        headers.insert(
            AUDITED_HEADER.into(),
            AMQPValue::LongString("failed".into()),
        );
        headers.insert(
            "x-first-death-reason".into(),
            AMQPValue::LongString("retries-exhausted".into()),
        );
        headers.insert(
            "x-pushfleet-reason".into(),
            AMQPValue::LongString(reason.into()),
        );
        // A job of a batch goes alone: the dead letters hold one job per message.
        let (body, properties) = if source.batch {
            (
                Cow::Owned(serde_json::to_vec(job)?),
                topology::job_properties(job.id),
            )
        } else {
            let delivery = source.delivery;
            (Cow::Borrowed(&delivery.data), delivery.properties.clone())
        };
        let properties = properties
            .with_headers(headers)
            .with_delivery_mode(PERSISTENT);
        let published = publisher
            .basic_publish(
                self.topology.dead_exchange().into(),
                "".into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await;
        topology::confirm(published, CONFIRM_TIMEOUT).await
    }
}

/// How long a fresh job waited in its lane. Lanes are FIFO, so while a backlog lasts the jobs
/// taken now are the oldest queued: their wait is the age of the lane's head, which RabbitMQ
/// does not export for quorum queues. Retries are left out: their wait includes the back-off.
fn record_queue_wait(job: &Job) {
    if job.attempt > 0 {
        return;
    }
    let waited = pushfleet_core::clock::now_ms().saturating_sub(job.received_at_ms);
    metrics::histogram!("pushfleet_queue_wait_seconds", "lane" => job.lane.as_str())
        .record(waited as f64 / 1000.0);
}

/// Where a job came from: its message, whether that carries several jobs, and where the job's
/// sync caller waits, when it is answered.
struct Source<'a> {
    delivery: &'a Delivery,
    batch: bool,
    reply_to: Option<&'a ShortString>,
}

/// How a job of a batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobEnd {
    /// Its outcome is safe (now, or by an earlier worker).
    Concluded,
    /// Its outcome was not confirmed.
    Unsaved,
    Panicked,
}

/// What becomes of a batch message once each of its jobs ended so.
#[derive(Debug, PartialEq, Eq)]
enum AfterBatch {
    /// Every job concluded.
    Ack,
    /// No job concluded and none panicked (the broker is in trouble): the message goes back
    /// as it is, nothing of it is repeated.
    Requeue,
    /// These jobs (their indexes) go back alone, then the message is acked: the concluded ones
    /// are not repeated, and a panicking job does not take its batch with it.
    QueueAlone(Vec<usize>),
}

fn after_batch(ends: &[JobEnd]) -> AfterBatch {
    let unfinished: Vec<usize> = (0..ends.len())
        .filter(|&i| ends[i] != JobEnd::Concluded)
        .collect();
    if unfinished.is_empty() {
        AfterBatch::Ack
    } else if unfinished.len() == ends.len() && !ends.contains(&JobEnd::Panicked) {
        AfterBatch::Requeue
    } else {
        AfterBatch::QueueAlone(unfinished)
    }
}

/// Set on a job queued again alone after its handler panicked in a batch: a second panic is
/// its last, as for a redelivered job.
const PANICKED_HEADER: &str = "x-pushfleet-panicked";

fn panicked_before(delivery: &Delivery) -> bool {
    delivery
        .properties
        .headers()
        .as_ref()
        .is_some_and(|headers| headers.inner().contains_key(PANICKED_HEADER))
}

/// How a job whose handler panicked leaves its queue: back once, in case the panic came from
/// something passing; to the dead letters (and so an audit row) when it comes back and panics
/// again. Either way its prefetch slot is given back.
fn after_panic(redelivered: bool) -> Settle {
    metrics::counter!("pushfleet_jobs_panicked_total").increment(1);
    if redelivered {
        warn!("a job's handler panicked again; job sent to the dead letters");
        Settle::Reject
    } else {
        warn!("a job's handler panicked; job returned to its queue once");
        Settle::Requeue
    }
}

/// Queues a job of a batch again, alone, in its lane, until its own deadline, answered at
/// `reply_to`: so the batch is acked (or its dead letter settled) without repeating its other
/// jobs. `panicked` marks a job whose handler panicked, so that a second panic sends it to the
/// dead letters (see [`after_panic`]).
pub(crate) async fn queue_alone(
    publisher: &Channel,
    topology: &Topology,
    job: &Job,
    reply_to: Option<&ShortString>,
    panicked: bool,
) -> Result<(), BrokerError> {
    let body = serde_json::to_vec(job)?;
    let remaining = job.remaining(pushfleet_core::clock::now_ms());
    let mut properties =
        topology::job_properties(job.id).with_expiration(remaining.as_millis().to_string().into());
    if let Some(reply_to) = reply_to {
        properties = properties.with_reply_to(reply_to.clone());
    }
    if panicked {
        let mut headers = FieldTable::default();
        headers.insert(PANICKED_HEADER.into(), AMQPValue::Boolean(true));
        properties = properties.with_headers(headers);
    }
    let published = publisher
        .basic_publish(
            topology.jobs_exchange().into(),
            Topology::lane_key(job.lane).into(),
            BasicPublishOptions::default(),
            &body,
            properties,
        )
        .await;
    topology::confirm(published, CONFIRM_TIMEOUT).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_repeats_only_its_unconcluded_jobs() {
        use JobEnd::*;
        assert_eq!(after_batch(&[Concluded, Concluded]), AfterBatch::Ack);
        // Nothing concluded: the whole message goes back.
        assert_eq!(after_batch(&[Unsaved, Unsaved]), AfterBatch::Requeue);
        // Some concluded: only the others go back, alone.
        assert_eq!(
            after_batch(&[Concluded, Unsaved, Concluded, Unsaved]),
            AfterBatch::QueueAlone(vec![1, 3])
        );
        // A panicking job never takes its batch back with it.
        assert_eq!(
            after_batch(&[Panicked, Unsaved]),
            AfterBatch::QueueAlone(vec![0, 1])
        );
        assert_eq!(
            after_batch(&[Concluded, Panicked]),
            AfterBatch::QueueAlone(vec![1])
        );
    }

    #[test]
    fn a_panicking_job_is_requeued_once_then_dead_lettered() {
        assert_eq!(after_panic(false), Settle::Requeue);
        assert_eq!(after_panic(true), Settle::Reject);
    }
}
