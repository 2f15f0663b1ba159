//! One job, handled once, in three phases: **check** whether it may be sent at all (configured
//! app, deadline, cancels and duplicates, dead tokens), **send** it to its provider, and
//! **conclude** from the answer table whether it is done or waits for a retry.

use std::borrow::Cow;
use std::sync::Arc;

use pushfleet_core::clock::now_ms;
use pushfleet_core::job::{
    AttemptRecord, CallEnd, Job, OutcomeEvent, SyncReply, Terminal, TokenInvalidation,
};
use pushfleet_core::{DeliveryStatus, Event};
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
    /// `next` waits in the delay queue of `tier_ms` and comes back to its lane: held back
    /// (`pn-timeout`), or between two rings. `outcome` records the ring just sent (none for a
    /// hold), and `reply` answers a sync caller after the first ring instead of the whole call.
    Later {
        next: Box<Job>,
        tier_ms: u64,
        outcome: Option<Box<OutcomeEvent>>,
        reply: Option<SyncReply>,
    },
}

/// A job comes back this close to its time: it is due.
const DUE_SLACK_MS: u64 = 50;

/// Why a job is not sent.
enum Unsent {
    /// Ingest only accepts configured apps; this worker's configuration lacks one.
    UnknownApp,
    Expired,
    Cancelled,
    Duplicate(Uuid),
    DeadToken,
    /// A ringing call whose TTL passed after it rang: done, nothing more to send.
    RingingOver(u32),
    /// A cancel for a device whose push was still held back: it never rang.
    NothingRang,
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
            Unsent::RingingOver(rings) => (
                DeliveryStatus::Delivered,
                format!("rang {rings} times until the call's TTL passed"),
                200,
                String::new(),
            ),
            Unsent::NothingRang => (
                DeliveryStatus::Cancelled,
                "the call ended while its push was held back: nothing rang".into(),
                200,
                "not sent: the call ended before its push was sent".into(),
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
        if let Some(held) = self.hold(job) {
            return held;
        }
        let (client, ended) = match self.check(job) {
            Ok(target) => target,
            Err(unsent) => return unsent.step(job),
        };
        // The call ended after ringing: one final alert says how, and the job is done.
        let job: Cow<'_, Job> = match ended {
            Some(end) => {
                let mut last = job.clone();
                if let Some(ringing) = &mut last.handling.ringing {
                    ringing.ended = Some(end);
                }
                Cow::Owned(last)
            }
            None => Cow::Borrowed(job),
        };
        let started_ms = now_ms();
        let response = client
            .provider
            .send(&client.settings, &job, self.policies.get(job.event))
            .await;
        self.conclude(&job, started_ms, response)
    }

    /// A job that is not due yet goes back to wait (an expired one is concluded as such).
    fn hold(&self, job: &Job) -> Option<Step> {
        let now = now_ms();
        let until = job.handling.hold_until_ms?;
        if job.is_expired(now) || until <= now + DUE_SLACK_MS {
            return None;
        }
        Some(Step::Later {
            next: Box::new(job.clone()),
            tier_ms: self.delay_tier(until - now),
            outcome: None,
            reply: None,
        })
    }

    /// The delay queue to wait `remaining_ms` in: the longest that does not overshoot, so that
    /// a long wait is made of several, else the shortest (a little late rather than early: a
    /// cancel within a `pn-timeout` must still find the push unsent).
    fn delay_tier(&self, remaining_ms: u64) -> u64 {
        let tiers = self.topology.retry_tiers_ms();
        tiers
            .iter()
            .rev()
            .find(|&&t| t <= remaining_ms + DUE_SLACK_MS)
            .or(tiers.first())
            .copied()
            .unwrap_or(remaining_ms)
    }

    /// The app and client to send `job` with, and whether that send is a ringing call's final
    /// alert; or why it must not be sent.
    fn check(&self, job: &Job) -> Result<(Arc<AppClient>, Option<CallEnd>), Unsent> {
        let Some(client) = self.app(&job.app_id, job.platform) else {
            warn!("no such app in this worker's configuration");
            return Err(Unsent::UnknownApp);
        };
        let now = now_ms();
        let rings = job.handling.ringing.as_ref().map_or(0, |r| r.rings);
        if job.is_expired(now) {
            if rings > 0 {
                info!(rings, "the call's TTL passed; ringing stops");
                return Err(Unsent::RingingOver(rings));
            }
            info!("expired before it could be sent");
            return Err(Unsent::Expired);
        }
        if job.event == Event::Cancel && self.ledger.ends_a_held_call(job) {
            info!("the call ended while its push was held back; no cancel needed");
            metrics::counter!("pushfleet_held_calls_ended_total", "app" => job.app_id.clone())
                .increment(1);
            return Err(Unsent::NothingRang);
        }
        // A call that rang by repeated alerts is told how it ended; a single alert is not.
        let repeating = rings > 0
            && job
                .handling
                .ringing
                .as_ref()
                .is_some_and(|r| r.interval_ms > 0);
        let mut ended = None;
        match self.ledger.check(job, now) {
            Verdict::Send => {}
            Verdict::Cancelled if repeating => {
                let reason = self.ledger.cancel_reason(&job.push.call_id).flatten();
                let end = CallEnd::from_reason(reason.as_deref());
                info!(
                    rings,
                    end = end.as_str(),
                    "the call ended; sending the final alert"
                );
                ended = Some(end);
            }
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
        Ok((client, ended))
    }

    /// After a delivered ring: the job that rings next, unless the call ended or the next ring
    /// would come at or after the deadline.
    fn next_ring(&self, job: &Job, now: u64) -> Option<(Job, u64)> {
        let ringing = job.handling.ringing.as_ref()?;
        if ringing.ended.is_some() || ringing.interval_ms == 0 {
            return None;
        }
        let at = now + ringing.interval_ms;
        if at >= job.deadline_ms {
            return None;
        }
        let mut next = job.clone();
        next.attempt += 1;
        next.handling.hold_until_ms = Some(at);
        if let Some(ringing) = &mut next.handling.ringing {
            ringing.rings += 1;
        }
        Some((next, self.delay_tier(ringing.interval_ms)))
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
        if let Some(ringing) = &job.handling.ringing {
            let alert = if ringing.ended.is_some() {
                "final"
            } else {
                "ring"
            };
            metrics::counter!("pushfleet_ringing_alerts_total", "app" => job.app_id.clone(), "alert" => alert)
                .increment(1);
        }
        if response.answer.class == Class::Delivered {
            if let Some((next, tier_ms)) = self.next_ring(job, now_ms()) {
                let first = job.handling.ringing.as_ref().is_some_and(|r| r.rings == 0);
                let reply = first.then(|| {
                    let (code, text, body) = sylk_result(job.platform, &response);
                    reply(
                        job,
                        DeliveryStatus::Delivered,
                        code,
                        text,
                        body,
                        response.url.clone(),
                    )
                });
                return Step::Later {
                    next: Box::new(next),
                    tier_ms,
                    outcome: Some(Box::new(outcome)),
                    reply,
                };
            }
        }
        let ended = job.handling.ringing.as_ref().and_then(|r| r.ended);
        let answer = response.answer;
        let (status, reason, dead_letter) = match answer.class {
            // Rings already delivered are not failed attempts: a long call keeps its retries.
            Class::Retryable => {
                match self.plan_retry(job, number - rings_delivered(job), &response) {
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
                }
            }
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
            Class::Delivered => (
                answer.terminal_status(),
                reason.or(ended.map(|end| format!("call ended: {}", end.as_str()))),
                false,
            ),
            Class::Rejected => (answer.terminal_status(), reason, false),
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

/// Alerts of a ringing call delivered before this attempt.
fn rings_delivered(job: &Job) -> u32 {
    job.handling.ringing.as_ref().map_or(0, |r| r.rings)
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use pushfleet_core::job::Ringing;
    use pushfleet_core::{Lane, PushData, Settings};

    use super::*;

    fn dispatcher() -> Dispatcher {
        let settings = Settings::from_toml("", Vec::new(), Path::new(".")).expect("defaults");
        Dispatcher::new(&settings, "test".into()).expect("no apps to load")
    }

    /// A ringing call accepted at `now` (one clock reading for the whole test: the deadline
    /// checks are exact to the millisecond).
    fn ringing_job(now: u64, deadline_in_ms: u64, interval_ms: u64) -> Job {
        Job {
            v: 1,
            id: Uuid::new_v4(),
            app_id: "a".into(),
            platform: pushfleet_core::Platform::Apple,
            event: Event::IncomingSession,
            lane: Lane::Calls,
            received_at_ms: now,
            deadline_ms: now + deadline_in_ms,
            attempt: 0,
            push: PushData::default(),
            api_key_id: None,
            handling: pushfleet_core::job::Handling {
                ringing: Some(Ringing {
                    interval_ms,
                    ..Default::default()
                }),
                ..Default::default()
            },
            reply: false,
        }
    }

    #[test]
    fn waits_are_made_of_the_retry_tiers_never_early() {
        let d = dispatcher();
        // Default tiers: 1, 2, 5, 15, 60, 300 s.
        assert_eq!(d.delay_tier(1_000), 1_000);
        assert_eq!(d.delay_tier(3_000), 2_000);
        assert_eq!(d.delay_tier(4_900), 2_000);
        // Within the slack of a tier: that tier, a few milliseconds late.
        assert_eq!(d.delay_tier(4_990), 5_000);
        assert_eq!(d.delay_tier(30_000), 15_000);
        // Less than the shortest tier left: a little late rather than early.
        assert_eq!(d.delay_tier(400), 1_000);
    }

    #[test]
    fn a_ring_is_followed_by_the_next_until_the_deadline() {
        let d = dispatcher();
        let now = now_ms();
        let job = ringing_job(now, 10_000, 3_000);
        let (next, tier) = d.next_ring(&job, now).expect("rings again");
        assert_eq!(next.attempt, 1);
        assert_eq!(next.handling.ringing.as_ref().unwrap().rings, 1);
        assert_eq!(next.handling.hold_until_ms, Some(now + 3_000));
        assert_eq!(tier, 2_000);
        // The next ring would fall on or after the deadline: done.
        assert!(d.next_ring(&ringing_job(now, 3_000, 3_000), now).is_none());
        // A single alert, and a final alert, are never repeated.
        assert!(d.next_ring(&ringing_job(now, 10_000, 0), now).is_none());
        let mut last = ringing_job(now, 10_000, 1_000);
        last.handling.ringing.as_mut().unwrap().ended = Some(CallEnd::Missed);
        assert!(d.next_ring(&last, now).is_none());
        // A job held until later goes back to wait; a due one does not.
        let mut held = ringing_job(now, 10_000, 1_000);
        held.handling.hold_until_ms = Some(now_ms() + 2_500);
        assert!(matches!(
            d.hold(&held),
            Some(Step::Later { tier_ms: 2_000, .. })
        ));
        held.handling.hold_until_ms = Some(now_ms());
        assert!(d.hold(&held).is_none());
    }
}
