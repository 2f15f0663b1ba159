//! The delivery loop: consume jobs from both lanes, send each to its provider, report the outcome
//! to the audit exchange, answer a waiting sync caller, and only then acknowledge the job — so a
//! worker that dies mid-push leaves the job in the queue for another worker (at-least-once).
//! A push that may succeed later is parked in a retry queue of the broker, never in memory.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use pushfleet_core::config::{AppSettings, Platform, RetrySettings, Settings};
use pushfleet_core::job::{
    now_ms, AttemptRecord, Job, OutcomeEvent, SyncReply, Terminal, TokenInvalidation,
};
use pushfleet_core::topology::{Topology, PERSISTENT};
use pushfleet_core::{DeliveryStatus, EventPolicies, Lane};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

use crate::acks::{Acks, Settle};
use crate::audit::AUDITED_HEADER;
use crate::dead_tokens::DeadTokens;
use crate::ledger::{Ledger, Verdict};
use crate::outcome::{classify, Class};
use crate::outcomes::{confirm, OutcomeBatcher};
use crate::providers::{sylk_result, Provider, ProviderResponse};
use crate::replies::ReplySender;
use crate::retry::{self, RetryPlan};

/// Everything a job handler needs, shared by all in-flight jobs.
pub struct Dispatcher {
    apps: HashMap<(String, Platform), (AppSettings, Provider)>,
    policies: EventPolicies,
    topology: Topology,
    retry: RetrySettings,
    worker_id: String,
    pub ledger: Arc<Ledger>,
    pub dead_tokens: Arc<DeadTokens>,
}

/// Where a job handler's results go, on the worker's broker connection.
#[derive(Clone)]
struct Outlets {
    /// Confirm mode: retry copies and dead letters.
    publisher: Channel,
    outcomes: OutcomeBatcher,
    replies: ReplySender,
}

/// What handling a job once came to.
pub enum Step {
    /// The job is done; `dead_letter` when it gave up and a copy goes to the dead letters.
    Done {
        outcome: Box<OutcomeEvent>,
        reply: SyncReply,
        dead_letter: bool,
    },
    /// The job waits in the retry tier of `tier_ms`; `outcome` records the attempt.
    Retry {
        outcome: Box<OutcomeEvent>,
        tier_ms: u64,
    },
}

impl Dispatcher {
    /// Builds one provider client per configured app; a bad credential file is an error here,
    /// at start-up, not at the first push.
    pub fn new(settings: &Settings, worker_id: String) -> Result<Dispatcher, String> {
        let mut apps = HashMap::new();
        for app in &settings.apps {
            let provider = Provider::for_app(app, &settings.worker)?;
            apps.insert((app.id.clone(), app.platform), (app.clone(), provider));
        }
        let topology = Topology::new(&settings.rabbitmq);
        let policies = settings.event_policies();
        Ok(Dispatcher {
            apps,
            ledger: Arc::new(Ledger::new(topology.clone(), policies.clone())),
            policies,
            topology,
            retry: settings.retry.clone(),
            worker_id,
            dead_tokens: Arc::new(DeadTokens::default()),
        })
    }

    /// Consumes both lanes on `connection` until it fails or `shutdown` flips; then waits for
    /// the jobs in flight to finish.
    pub async fn run(
        self: &Arc<Self>,
        connection: &Connection,
        prefetch: u16,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), lapin::Error> {
        // Outcomes and replies go out on their own channel, in confirm mode: a job is acked only
        // once the broker holds its outcome.
        let publisher = connection.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let (outcomes, batches) = OutcomeBatcher::start(publisher.clone(), &self.topology);
        let mut ackers = Vec::new();
        // Sync replies are best effort and unconfirmed, on a channel of their own: a confirm
        // channel would keep every reply's pending confirm.
        let (replies, replying) = ReplySender::start(connection.create_channel().await?);
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
            let channel = connection.create_channel().await?;
            // The prefetch bounds the pushes in flight per lane, and so the worker's memory.
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
            consumers.push((channel, tag, consumer, acks));
        }
        info!(worker = %self.worker_id, "consuming calls and messages");

        let mut streams =
            futures_util::stream::select_all(consumers.iter_mut().map(|(_, _, consumer, acks)| {
                let acks = acks.clone();
                consumer
                    .by_ref()
                    .map(move |delivery| (delivery, acks.clone()))
            }));
        let mut in_flight = JoinSet::new();
        let result = loop {
            tokio::select! {
                next = streams.next() => match next {
                    Some((Ok(delivery), acks)) => {
                        acks.received(delivery.delivery_tag);
                        let (dispatcher, outlets) = (self.clone(), outlets.clone());
                        in_flight.spawn(async move {
                            let tag = delivery.delivery_tag;
                            let acker = delivery.acker.clone();
                            let settle = dispatcher.handle(delivery, &outlets).await;
                            acks.finished(tag, acker, settle);
                        });
                    }
                    Some((Err(e), _)) => break Err(e),
                    None => break Ok(()),
                },
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
                _ = shutdown.changed() => break Ok(()),
            }
        };
        drop(streams);
        // Stop taking new jobs, finish the ones in hand: their outcomes get published and acked.
        for (channel, tag, _, _) in &consumers {
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

    /// Handles one delivery and says how it leaves its queue.
    async fn handle(&self, delivery: Delivery, outlets: &Outlets) -> Settle {
        let Outlets {
            publisher,
            outcomes,
            replies,
        } = outlets;
        let job: Job = match serde_json::from_slice(&delivery.data) {
            Ok(job) => job,
            Err(e) => {
                warn!(error = %e, "unreadable job sent to the dead-letter queue");
                metrics::counter!("pushfleet_jobs_unreadable_total").increment(1);
                return Settle::Reject;
            }
        };
        let span = tracing::info_span!("job", job_id = %job.id, call_id = %job.push.call_id, event = %job.event, app = %job.app_id, attempt = job.attempt + 1);
        async {
            let saved = match self.process(&job).await {
                Step::Done {
                    outcome,
                    reply,
                    dead_letter,
                } => {
                    if let Some(reply_to) = delivery.properties.reply_to() {
                        // Best effort: if the caller gave up waiting, the reply goes nowhere.
                        replies.send(reply_to, &reply);
                    }
                    let mut saved = outcomes.save(&outcome).await;
                    if saved.is_ok() && dead_letter {
                        let reason = outcome
                            .terminal
                            .as_ref()
                            .and_then(|t| t.reason.clone())
                            .unwrap_or_default();
                        saved = self
                            .publish_dead_letter(publisher, &delivery, &reason)
                            .await;
                    }
                    saved
                }
                Step::Retry { outcome, tier_ms } => {
                    let mut next = job.clone();
                    next.attempt += 1;
                    match self
                        .publish_retry(publisher, &next, tier_ms, &delivery.properties)
                        .await
                    {
                        Ok(()) => outcomes.save(&outcome).await,
                        Err(e) => Err(e),
                    }
                }
            };
            match saved {
                Ok(()) => Settle::Ack,
                Err(e) => {
                    // Without a recorded outcome the job is not done: put it back.
                    warn!(error = %e, "outcome not confirmed; job returned to its queue");
                    Settle::Requeue
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Handles the job once: decides whether it may be sent, sends it, and classifies the
    /// answer into a terminal state or a retry.
    pub async fn process(&self, job: &Job) -> Step {
        let now = now_ms();
        let done = |status: DeliveryStatus, reason: String, code: u16, answer: String| {
            count_terminal(job, status);
            let mut outcome = OutcomeEvent::for_job(job);
            outcome.terminal = Some(terminal(status, job.attempt, None, Some(reason), None));
            Step::Done {
                outcome: Box::new(outcome),
                reply: reply(job, status, code, answer, json!({}), String::new()),
                dead_letter: false,
            }
        };

        let Some((app, provider)) = self.apps.get(&(job.app_id.clone(), job.platform)) else {
            // Ingest only accepts configured apps; this worker's configuration lacks one.
            warn!("no such app in this worker's configuration");
            return done(
                DeliveryStatus::Rejected,
                "app not configured on worker".into(),
                404,
                format!(
                    "{} {} app is not configured",
                    job.platform.title(),
                    job.app_id
                ),
            );
        };
        if job.is_expired(now) {
            info!("expired before it could be sent");
            return done(
                DeliveryStatus::Expired,
                "deadline passed before sending".into(),
                410,
                "push expired before it could be sent".into(),
            );
        }
        match self.ledger.check(job, now) {
            Verdict::Send => {}
            Verdict::Cancelled => {
                info!("superseded by a cancel of the call; not sent");
                return done(
                    DeliveryStatus::Cancelled,
                    "superseded by a cancel".into(),
                    200,
                    "not sent: the call was cancelled".into(),
                );
            }
            Verdict::Duplicate(first) => {
                info!(duplicate_of = %first, "duplicate push; not sent again");
                metrics::counter!("pushfleet_duplicates_total", "app" => job.app_id.clone(), "event" => job.event.as_str())
                    .increment(1);
                return done(
                    DeliveryStatus::Cancelled,
                    format!("duplicate of job {first}"),
                    200,
                    format!("duplicate of job {first}, which delivers it"),
                );
            }
        }
        if self
            .dead_tokens
            .contains(&job.app_id, job.platform, &job.push.token)
        {
            info!("token known to be invalid; not sent");
            return done(
                DeliveryStatus::TokenInvalid,
                "token known to be invalid".into(),
                410,
                "token is no longer valid".into(),
            );
        }

        let policy = self.policies.get(job.event);
        let started = now_ms();
        let response = provider.send(app, job, policy).await;
        let class = classify(job.platform, &response);
        record_provider_metrics(job.platform, &response);
        log_answer(&response, class);
        let number = job.attempt + 1;
        let answer_reason = response
            .reason
            .clone()
            .or_else(|| response.transport_error.clone());
        let mut outcome = OutcomeEvent::for_job(job);
        outcome.attempt = Some(AttemptRecord {
            number,
            at_ms: started,
            provider_status: response.status,
            reason: answer_reason.clone(),
            duration_ms: response.duration.as_millis() as u64,
            worker: self.worker_id.clone(),
        });

        let (status, reason, dead_letter) = match class {
            Class::Retryable => match retry::plan(
                &self.retry,
                &self.topology,
                job,
                number,
                response.retry_after,
                now_ms(),
            ) {
                RetryPlan::WaitInTier(tier_ms) => {
                    info!(
                        retry_in_ms = tier_ms,
                        status = response.status,
                        "will try again"
                    );
                    metrics::counter!("pushfleet_retries_total", "app" => job.app_id.clone(), "platform" => job.platform.as_str())
                        .increment(1);
                    return Step::Retry {
                        outcome: Box::new(outcome),
                        tier_ms,
                    };
                }
                RetryPlan::GiveUp(status, why) => {
                    let last = answer_reason.as_deref().unwrap_or("no answer");
                    let failed = status == DeliveryStatus::Failed;
                    (status, Some(format!("{why}; last answer: {last}")), failed)
                }
            },
            Class::Credential => {
                // The client already replaced the credential once inside `send`.
                warn!(
                    status = response.status,
                    reason = answer_reason.as_deref(),
                    "credentials refused by the provider"
                );
                metrics::counter!(
                    "pushfleet_credential_failures_total",
                    "app" => job.app_id.clone(), "platform" => job.platform.as_str()
                )
                .increment(1);
                (DeliveryStatus::Failed, answer_reason.clone(), false)
            }
            Class::TokenInvalid => {
                let dead = TokenInvalidation {
                    token: job.push.token.clone(),
                    reason: answer_reason
                        .clone()
                        .unwrap_or_else(|| "token invalid".into()),
                    provider_timestamp_ms: response.apns_timestamp_ms,
                };
                // A 410 with a timestamp is for the database to judge against the token's
                // registration time; every other verdict applies at once.
                if dead.provider_timestamp_ms.is_none() {
                    self.dead_tokens
                        .insert(&job.app_id, job.platform, &job.push.token);
                }
                outcome.token_invalidation = Some(dead);
                (DeliveryStatus::TokenInvalid, answer_reason.clone(), false)
            }
            Class::Delivered | Class::Rejected => {
                (class.terminal_status(), answer_reason.clone(), false)
            }
        };
        count_terminal(job, status);
        outcome.terminal = Some(terminal(
            status,
            number,
            response.status,
            reason,
            response.message_id.clone(),
        ));
        let (code, text, body) = sylk_result(job.platform, &response);
        Step::Done {
            outcome: Box::new(outcome),
            reply: reply(job, status, code, text, body, response.url.clone()),
            dead_letter,
        }
    }

    /// Parks `job` in a retry queue; it comes back to its lane when the tier's TTL runs out.
    async fn publish_retry(
        &self,
        publisher: &Channel,
        job: &Job,
        tier_ms: u64,
        original: &BasicProperties,
    ) -> Result<(), String> {
        let body = serde_json::to_vec(job).map_err(|e| e.to_string())?;
        let mut properties = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_content_type("application/json".into())
            .with_message_id(job.id.to_string().into())
            .with_correlation_id(job.id.to_string().into())
            .with_type("push.v1".into());
        // A sync caller still waiting gets the answer of the attempt that ends the job.
        if let Some(reply_to) = original.reply_to() {
            properties = properties.with_reply_to(reply_to.clone());
        }
        confirm(
            publisher
                .basic_publish(
                    "".into(),
                    self.topology.retry_queue(job.lane, tier_ms).into(),
                    BasicPublishOptions::default(),
                    &body,
                    properties,
                )
                .await,
        )
        .await
    }

    /// Keeps a copy of a job that gave up in the dead letters, for operators to inspect and
    /// re-drive; its terminal row is already written.
    async fn publish_dead_letter(
        &self,
        publisher: &Channel,
        delivery: &Delivery,
        reason: &str,
    ) -> Result<(), String> {
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
        let properties = delivery
            .properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(PERSISTENT);
        confirm(
            publisher
                .basic_publish(
                    self.topology.dead_exchange().into(),
                    "".into(),
                    BasicPublishOptions::default(),
                    &delivery.data,
                    properties,
                )
                .await,
        )
        .await
    }
}

fn count_terminal(job: &Job, status: DeliveryStatus) {
    metrics::counter!(
        "pushfleet_deliveries_total",
        "app" => job.app_id.clone(), "platform" => job.platform.as_str(),
        "event" => job.event.as_str(), "outcome" => status.as_str()
    )
    .increment(1);
}

fn terminal(
    status: DeliveryStatus,
    attempts: u32,
    provider_status: Option<u16>,
    reason: Option<String>,
    provider_message_id: Option<String>,
) -> Terminal {
    Terminal {
        status,
        attempts,
        provider_status,
        reason,
        provider_message_id,
        finished_at_ms: now_ms(),
    }
}

fn reply(
    job: &Job,
    status: DeliveryStatus,
    code: u16,
    reason: String,
    body: serde_json::Value,
    url: String,
) -> SyncReply {
    SyncReply {
        job_id: job.id,
        status,
        code,
        reason,
        body,
        url,
    }
}

fn record_provider_metrics(platform: Platform, response: &ProviderResponse) {
    let status = response
        .status
        .map(|s| s.to_string())
        .unwrap_or_else(|| "none".into());
    metrics::counter!("pushfleet_provider_requests_total", "platform" => platform.as_str(), "status" => status)
        .increment(1);
    metrics::histogram!("pushfleet_provider_latency_seconds", "platform" => platform.as_str())
        .record(response.duration.as_secs_f64());
}

fn log_answer(response: &ProviderResponse, class: Class) {
    match class {
        Class::Delivered => debug!(
            status = response.status,
            message_id = response.message_id.as_deref(),
            latency_ms = response.duration.as_millis() as u64,
            "push sent"
        ),
        _ => info!(
            status = response.status,
            reason = response.reason.as_deref(),
            error = response.transport_error.as_deref(),
            class = class.as_str(),
            "push not delivered"
        ),
    }
}
