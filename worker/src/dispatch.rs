//! The delivery loop: consume jobs from both lanes, send each to its provider, report the outcome
//! to the audit exchange, answer a waiting sync caller, and only then acknowledge the job — so a
//! worker that dies mid-push leaves the job in the queue for another worker (at-least-once).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use pushfleet_core::config::{AppSettings, Platform, Settings};
use pushfleet_core::job::{now_ms, AttemptRecord, Job, OutcomeEvent, SyncReply, Terminal};
use pushfleet_core::topology::{Topology, PERSISTENT};
use pushfleet_core::{DeliveryStatus, EventPolicies, Lane};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

use crate::outcome::{classify, Class};
use crate::providers::{sylk_result, Provider, ProviderResponse};

/// Everything a job handler needs, shared by all in-flight jobs.
pub struct Dispatcher {
    apps: HashMap<(String, Platform), (AppSettings, Provider)>,
    policies: EventPolicies,
    topology: Topology,
    worker_id: String,
}

impl Dispatcher {
    /// Builds one provider client per configured app; a bad credential file is an error here,
    /// at start-up, not at the first push.
    pub fn new(settings: &Settings, worker_id: String) -> Result<Dispatcher, String> {
        let mut apps = HashMap::new();
        for app in &settings.apps {
            let provider = Provider::for_app(app, settings.worker.request_timeout())?;
            apps.insert((app.id.clone(), app.platform), (app.clone(), provider));
        }
        Ok(Dispatcher {
            apps,
            policies: settings.event_policies(),
            topology: Topology::new(&settings.rabbitmq.namespace),
            worker_id,
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
            consumers.push((channel, tag, consumer));
        }
        info!(worker = %self.worker_id, "consuming calls and messages");

        let mut streams = futures_util::stream::select_all(
            consumers
                .iter_mut()
                .map(|(_, _, consumer)| consumer.by_ref()),
        );
        let mut in_flight = JoinSet::new();
        let result = loop {
            tokio::select! {
                next = streams.next() => match next {
                    Some(Ok(delivery)) => {
                        let dispatcher = self.clone();
                        let publisher = publisher.clone();
                        in_flight.spawn(async move { dispatcher.handle(delivery, &publisher).await });
                    }
                    Some(Err(e)) => break Err(e),
                    None => break Ok(()),
                },
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
                _ = shutdown.changed() => break Ok(()),
            }
        };
        drop(streams);
        // Stop taking new jobs, finish the ones in hand: their outcomes get published and acked.
        for (channel, tag, _) in &consumers {
            let _ = channel
                .basic_cancel(tag.clone().into(), BasicCancelOptions::default())
                .await;
        }
        while in_flight.join_next().await.is_some() {}
        let _ = publisher.wait_for_confirms().await;
        result
    }

    async fn handle(&self, delivery: Delivery, publisher: &Channel) {
        let job: Job = match serde_json::from_slice(&delivery.data) {
            Ok(job) => job,
            Err(e) => {
                warn!(error = %e, "unreadable job sent to the dead-letter queue");
                metrics::counter!("pushfleet_jobs_unreadable_total").increment(1);
                let _ = delivery.reject(BasicRejectOptions { requeue: false }).await;
                return;
            }
        };
        let span = tracing::info_span!("job", job_id = %job.id, call_id = %job.push.call_id, event = %job.event, app = %job.app_id);
        async {
            let (outcome, reply) = self.deliver(&job).await;
            if let Some(reply_to) = delivery.properties.reply_to() {
                // Best effort: if the caller gave up waiting, the reply simply goes nowhere.
                let _ = publisher
                    .basic_publish(
                        "".into(),
                        reply_to.clone(),
                        BasicPublishOptions::default(),
                        &serde_json::to_vec(&reply).unwrap_or_default(),
                        BasicProperties::default().with_correlation_id(job.id.to_string().into()),
                    )
                    .await;
            }
            match self.publish_outcome(publisher, &outcome).await {
                Ok(()) => {
                    let _ = delivery.ack(BasicAckOptions::default()).await;
                }
                Err(e) => {
                    // Without a recorded outcome the job is not done: put it back.
                    warn!(error = %e, "outcome not confirmed; job returned to its queue");
                    let _ = delivery
                        .nack(BasicNackOptions {
                            requeue: true,
                            ..Default::default()
                        })
                        .await;
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Sends the job once and decides its terminal state.
    pub async fn deliver(&self, job: &Job) -> (OutcomeEvent, SyncReply) {
        let mut outcome = OutcomeEvent::for_job(job);
        let now = now_ms();
        let labels = |status: DeliveryStatus| {
            metrics::counter!(
                "pushfleet_deliveries_total",
                "app" => job.app_id.clone(), "platform" => job.platform.as_str(),
                "event" => job.event.as_str(), "outcome" => status.as_str()
            )
            .increment(1);
        };

        let Some((app, provider)) = self.apps.get(&(job.app_id.clone(), job.platform)) else {
            // Ingest only accepts configured apps; this worker's configuration lacks one.
            warn!("no such app in this worker's configuration");
            labels(DeliveryStatus::Rejected);
            outcome.terminal = Some(terminal(
                DeliveryStatus::Rejected,
                job.attempt,
                None,
                Some("app not configured on worker".into()),
                None,
            ));
            let reply = reply(
                job,
                DeliveryStatus::Rejected,
                404,
                format!(
                    "{} {} app is not configured",
                    job.platform.title(),
                    job.app_id
                ),
                json!({}),
                String::new(),
            );
            return (outcome, reply);
        };
        if job.is_expired(now) {
            info!("expired before it could be sent");
            labels(DeliveryStatus::Expired);
            outcome.terminal = Some(terminal(
                DeliveryStatus::Expired,
                job.attempt,
                None,
                Some("deadline passed before sending".into()),
                None,
            ));
            let reply = reply(
                job,
                DeliveryStatus::Expired,
                410,
                "push expired before it could be sent".into(),
                json!({}),
                String::new(),
            );
            return (outcome, reply);
        }

        let policy = self.policies.get(job.event);
        let response = provider.send(app, job, policy).await;
        let class = classify(job.platform, &response);
        record_provider_metrics(job.platform, &response);
        let status = class.terminal_status();
        let number = job.attempt + 1;
        log_answer(&response, class);
        labels(status);
        outcome.attempt = Some(AttemptRecord {
            number,
            at_ms: now,
            provider_status: response.status,
            reason: response
                .reason
                .clone()
                .or_else(|| response.transport_error.clone()),
            duration_ms: response.duration.as_millis() as u64,
            worker: self.worker_id.clone(),
        });
        outcome.terminal = Some(terminal(
            status,
            number,
            response.status,
            response
                .reason
                .clone()
                .or_else(|| response.transport_error.clone()),
            response.message_id.clone(),
        ));
        let (code, reason, body) = sylk_result(job.platform, &response);
        let reply = reply(job, status, code, reason, body, response.url.clone());
        (outcome, reply)
    }

    async fn publish_outcome(
        &self,
        publisher: &Channel,
        outcome: &OutcomeEvent,
    ) -> Result<(), String> {
        let body = serde_json::to_vec(outcome).map_err(|e| e.to_string())?;
        let confirm = publisher
            .basic_publish(
                self.topology.outcomes_exchange().into(),
                "".into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
                    .with_delivery_mode(PERSISTENT)
                    .with_content_type("application/json".into())
                    .with_type("outcome.v1".into()),
            )
            .await
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(Duration::from_secs(30), confirm).await {
            Ok(Ok(Confirmation::Ack(_) | Confirmation::NotRequested)) => Ok(()),
            Ok(Ok(Confirmation::Nack(_))) => Err("broker refused the outcome".into()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no confirm within 30 s".into()),
        }
    }
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
