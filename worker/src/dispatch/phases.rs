//! One job, handled once, in three phases: **check** whether it may be sent at all (configured
//! app, deadline, cancels and duplicates, dead tokens), **send** it to its provider, and
//! **conclude** from the answer table whether it is done or waits for a retry.

use std::sync::Arc;

use pushfleet_core::clock::now_ms;
use pushfleet_core::job::{
    AttemptRecord, Job, OutcomeEvent, SyncReply, Terminal, TokenInvalidation,
};
use pushfleet_core::DeliveryStatus;
use serde_json::{json, Value};
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::{AppClient, Dispatcher};
use crate::ledger_view::Verdict;
use crate::providers::{sylk_result, Class, ProviderResponse};
use crate::retry::{self, RetryPlan};

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

/// Why a job is not sent.
enum Unsent {
    /// Ingest only accepts configured apps; this worker's configuration lacks one.
    UnknownApp,
    Expired,
    Cancelled,
    Duplicate(Uuid),
    DeadToken,
}

impl Unsent {
    /// The terminal state, the audit reason, and the Sylk code and text of the answer.
    fn verdict(&self, job: &Job) -> (DeliveryStatus, String, u16, String) {
        match self {
            Unsent::UnknownApp => (
                DeliveryStatus::Rejected,
                "app not configured on worker".into(),
                404,
                format!(
                    "{} {} app is not configured",
                    job.platform.title(),
                    job.app_id
                ),
            ),
            Unsent::Expired => (
                DeliveryStatus::Expired,
                "deadline passed before sending".into(),
                410,
                "push expired before it could be sent".into(),
            ),
            Unsent::Cancelled => (
                DeliveryStatus::Cancelled,
                "superseded by a cancel".into(),
                200,
                "not sent: the call was cancelled".into(),
            ),
            Unsent::Duplicate(first) => (
                DeliveryStatus::Cancelled,
                format!("duplicate of job {first}"),
                200,
                format!("duplicate of job {first}, which delivers it"),
            ),
            Unsent::DeadToken => (
                DeliveryStatus::TokenInvalid,
                "token known to be invalid".into(),
                410,
                "token is no longer valid".into(),
            ),
        }
    }

    fn step(self, job: &Job) -> Step {
        let (status, reason, code, text) = self.verdict(job);
        count_terminal(job, status);
        let mut outcome = OutcomeEvent::for_job(job);
        outcome.terminal = Some(terminal(status, job.attempt, None, Some(reason), None));
        Step::Done {
            outcome: Box::new(outcome),
            reply: reply(job, status, code, text, json!({}), String::new()),
            dead_letter: false,
        }
    }
}

impl Dispatcher {
    /// Handles the job once: check, send, conclude.
    pub async fn process(&self, job: &Job) -> Step {
        let client = match self.check(job) {
            Ok(client) => client,
            Err(unsent) => return unsent.step(job),
        };
        let started_ms = now_ms();
        let response = client
            .provider
            .send(&client.settings, job, self.policies.get(job.event))
            .await;
        self.conclude(job, started_ms, response)
    }

    /// The app and client to send `job` with, or why it must not be sent.
    fn check(&self, job: &Job) -> Result<Arc<AppClient>, Unsent> {
        let Some(client) = self.app(&job.app_id, job.platform) else {
            warn!("no such app in this worker's configuration");
            return Err(Unsent::UnknownApp);
        };
        let now = now_ms();
        if job.is_expired(now) {
            info!("expired before it could be sent");
            return Err(Unsent::Expired);
        }
        match self.ledger.check(job, now) {
            Verdict::Send => {}
            Verdict::Cancelled => {
                info!("superseded by a cancel of the call; not sent");
                return Err(Unsent::Cancelled);
            }
            Verdict::Duplicate(first) => {
                info!(duplicate_of = %first, "duplicate push; not sent again");
                metrics::counter!("pushfleet_duplicates_total", "app" => job.app_id.clone(), "event" => job.event.as_str())
                    .increment(1);
                return Err(Unsent::Duplicate(first));
            }
        }
        if self
            .dead_tokens
            .contains(&job.app_id, job.platform, &job.push.token)
        {
            info!("token known to be invalid; not sent");
            return Err(Unsent::DeadToken);
        }
        Ok(client)
    }

    /// Turns the provider's answer into the job's terminal state, or a retry.
    fn conclude(&self, job: &Job, started_ms: u64, response: ProviderResponse) -> Step {
        record_provider_metrics(job, &response);
        log_answer(&response);
        let number = job.attempt + 1;
        let reason = response.reason_text().map(str::to_string);
        let mut outcome = OutcomeEvent::for_job(job);
        outcome.attempt = Some(AttemptRecord {
            number,
            at_ms: started_ms,
            provider_status: response.status,
            reason: reason.clone(),
            duration_ms: response.duration.as_millis() as u64,
            worker: self.worker_id.clone(),
        });
        let answer = response.answer;
        let (status, reason, dead_letter) = match answer.class {
            Class::Retryable => match self.plan_retry(job, number, &response) {
                RetryPlan::WaitInTier(tier_ms) => {
                    return Step::Retry {
                        outcome: Box::new(outcome),
                        tier_ms,
                    }
                }
                RetryPlan::GiveUp(status, why) => {
                    let last = reason.as_deref().unwrap_or("no answer");
                    let failed = status == DeliveryStatus::Failed;
                    (status, Some(format!("{why}; last answer: {last}")), failed)
                }
            },
            Class::CredentialRejected => {
                // The client already replaced the credential once inside `send`.
                warn!(
                    status = response.status,
                    reason = reason.as_deref(),
                    "credentials refused by the provider"
                );
                metrics::counter!(
                    "pushfleet_credential_failures_total",
                    "app" => job.app_id.clone(), "platform" => job.platform.as_str()
                )
                .increment(1);
                (DeliveryStatus::Failed, reason, false)
            }
            Class::TokenGone => {
                outcome.token_invalidation = Some(self.token_gone(job, &response));
                (DeliveryStatus::TokenInvalid, reason, false)
            }
            Class::Delivered | Class::Rejected => (answer.terminal_status(), reason, false),
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
        let mut reply = reply(job, status, code, text, body, response.url);
        if status == DeliveryStatus::TokenInvalid {
            reply.invalid_since_ms = response.apns_timestamp_ms;
        }
        Step::Done {
            outcome: Box::new(outcome),
            reply,
            dead_letter,
        }
    }

    fn plan_retry(&self, job: &Job, attempts: u32, response: &ProviderResponse) -> RetryPlan {
        let plan = retry::plan(
            &self.live().retry,
            &self.topology,
            job,
            attempts,
            response.answer.retry_after,
            now_ms(),
        );
        if let RetryPlan::WaitInTier(tier_ms) = plan {
            info!(
                retry_in_ms = tier_ms,
                status = response.status,
                "will try again"
            );
            metrics::counter!("pushfleet_retries_total", "app" => job.app_id.clone(), "platform" => job.platform.as_str())
                .increment(1);
        }
        plan
    }

    /// The verdict the audit sink records for a token the provider declared gone.
    fn token_gone(&self, job: &Job, response: &ProviderResponse) -> TokenInvalidation {
        let dead = TokenInvalidation {
            token: job.push.token.clone(),
            reason: response
                .reason_text()
                .unwrap_or("token invalid")
                .to_string(),
            provider_timestamp_ms: response.apns_timestamp_ms,
        };
        // A 410 with a timestamp is for the database to judge against the token's registration
        // time; every other verdict applies at once.
        if dead.provider_timestamp_ms.is_none() {
            self.dead_tokens
                .insert(&job.app_id, job.platform, &job.push.token);
        }
        dead
    }
}

fn count_terminal(job: &Job, status: DeliveryStatus) {
    metrics::counter!(
        "pushfleet_deliveries_total",
        "app" => job.app_id.clone(), "platform" => job.platform.as_str(),
        "event" => job.event.as_str(), "outcome" => status.as_str()
    )
    .increment(1);
    let latency_ms = now_ms().saturating_sub(job.received_at_ms);
    metrics::histogram!(
        "pushfleet_push_latency_seconds",
        "lane" => job.lane.as_str(), "outcome" => status.as_str()
    )
    .record(latency_ms as f64 / 1000.0);
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
    body: Value,
    url: String,
) -> SyncReply {
    SyncReply {
        job_id: job.id,
        status,
        code,
        reason,
        body,
        url,
        invalid_since_ms: None,
    }
}

fn record_provider_metrics(job: &Job, response: &ProviderResponse) {
    let status = response
        .status
        .map(|s| s.to_string())
        .unwrap_or_else(|| "none".into());
    let platform = job.platform.as_str();
    metrics::counter!(
        "pushfleet_provider_requests_total",
        "app" => job.app_id.clone(), "platform" => platform, "status" => status
    )
    .increment(1);
    metrics::histogram!(
        "pushfleet_provider_latency_seconds",
        "app" => job.app_id.clone(), "platform" => platform
    )
    .record(response.duration.as_secs_f64());
}

fn log_answer(response: &ProviderResponse) {
    match response.answer.class {
        Class::Delivered => debug!(
            status = response.status,
            message_id = response.message_id.as_deref(),
            latency_ms = response.duration.as_millis() as u64,
            "push sent"
        ),
        class => info!(
            status = response.status,
            reason = response.reason.as_deref(),
            error = response.transport_error.as_deref(),
            class = class.as_str(),
            "push not delivered"
        ),
    }
}
