//! From a validated push to the caller's answer, the same for every API: the job, its
//! publication into RabbitMQ, the wait for the worker's reply in sync mode, and the 202 or
//! synchronous answer in the reference's shapes.

use std::fmt::Display;
use std::net::SocketAddr;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use pushfleet_core::clock::now_ms;
use pushfleet_core::job::{Job, SyncReply, JOB_VERSION};
use pushfleet_core::ledger::LedgerEntry;
use pushfleet_core::logged::{Escaped, Identity};
use pushfleet_core::tokens::token_fingerprint;
use pushfleet_core::{ResponseMode, Settings};
use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{info, warn};
use uuid::Uuid;

use crate::auth::Caller;
use crate::call_options::CallOptions;
use crate::error::ApiError;
use crate::state::AppState;
use crate::validate::{configured_app, validate, ValidPush};

/// Whether callers wait for the worker's answer.
pub fn is_sync(state: &AppState) -> bool {
    state.live().settings.ingest.mode == ResponseMode::Sync
}

/// Until when a request received now waits for its answers.
pub fn sync_deadline(state: &AppState) -> Instant {
    Instant::now() + Duration::from_millis(state.live().settings.ingest.sync_timeout_ms)
}

/// A job for a validated push from `caller`, and the time it is worth delivering.
pub fn new_job(state: &AppState, valid: ValidPush<'_>, caller: &Caller) -> (Job, Duration) {
    let policy = *state.live().policies.get(valid.event);
    let now = now_ms();
    let job = Job {
        v: JOB_VERSION,
        id: Uuid::new_v4(),
        app_id: valid.app.id.clone(),
        platform: valid.app.platform,
        event: valid.event,
        lane: policy.lane,
        received_at_ms: now,
        deadline_ms: now + policy.ttl.as_millis() as u64,
        attempt: 0,
        push: valid.push,
        api_key_id: caller.key_id().map(str::to_string),
        handling: Default::default(),
        reply: false,
    };
    (job, policy.ttl)
}

/// Validates a v1-shaped push (from `/push` or built from RFC 8599 parameters, the `route`),
/// queues it and answers as the reference does.
pub async fn accept(
    state: &AppState,
    peer: SocketAddr,
    caller: &Caller,
    body: &Map<String, Value>,
    options: &CallOptions,
    route: &'static str,
) -> Result<Response, ApiError> {
    let live = state.live();
    let valid = check_app(body, &live.settings, caller)
        .and_then(|()| validate(body, &live.settings))
        .inspect_err(|e| {
            info!(peer = %peer.ip(), status = e.status().as_u16(), error = %e.body(), "push request rejected");
        })?;
    crate::endpoint::check_reachable(valid.app, &valid.push.token).await?;
    let (mut job, ttl) = new_job(state, valid, caller);
    let held = options.apply(&mut job, &live.policies)?;
    state.api_keys.admit(caller, 1)?;
    hold(state, held).await?;
    job.reply = is_sync(state);
    let reply = enqueue(state, &job, ttl, RequestId(&job), peer).await?;
    let Some(reply) = reply else {
        return Ok(accepted(job.id));
    };
    Ok(
        match await_reply(state, job.id, reply, sync_deadline(state), route).await {
            Some(reply) => sync_answer(&job, reply, live.settings.ingest.raw_tokens_in_answers),
            None => accepted(job.id),
        },
    )
}

/// Tells every worker that a call's push is held back, before the push is queued.
pub async fn hold(state: &AppState, held: Option<LedgerEntry>) -> Result<(), ApiError> {
    if let Some(entry) = held {
        state.broker.publish_ledger(&entry).await?;
    }
    Ok(())
}

/// A key for another app is refused before the rest of the body is looked at. A body whose app
/// cannot be made out is left to validation, which says why.
fn check_app(
    body: &Map<String, Value>,
    settings: &Settings,
    caller: &Caller,
) -> Result<(), ApiError> {
    match configured_app(body, settings, ApiError::UnknownPlatform) {
        Ok(app) => caller.check_app(&app.id),
        Err(_) => Ok(()),
    }
}

/// A v1 push's request id in the logs, `<event>-<app id>-<call id>`: written out only by the log
/// lines that show it, instead of being built for every push.
struct RequestId<'a>(&'a Job);

impl Display for RequestId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let job = self.0;
        write!(
            f,
            "{}-{}-{}",
            job.event,
            job.app_id,
            Escaped(&job.push.call_id)
        )
    }
}

/// Publishes one job (logging and counting it); a job with `reply` set (a sync caller's)
/// returns the receiver of the worker's answer. A broker problem is the caller's 503.
pub async fn enqueue(
    state: &AppState,
    job: &Job,
    ttl: Duration,
    request_id: impl Display,
    peer: SocketAddr,
) -> Result<Option<oneshot::Receiver<SyncReply>>, ApiError> {
    let reply = state.broker.publish(job, ttl).await.inspect_err(|e| {
        warn!(%request_id, call_id = %Escaped(&job.push.call_id), error = %e, "push not queued");
    })?;
    info!(
        %request_id, call_id = %Escaped(&job.push.call_id), job_id = %job.id, peer = %peer.ip(),
        platform = %job.platform, event = %job.event, to = %Identity(&job.push.to),
        token = %token_fingerprint(&job.push.token), "push accepted"
    );
    metrics::counter!(
        "pushfleet_ingest_jobs_total",
        "app" => job.app_id.clone(), "platform" => job.platform.as_str(), "event" => job.event.as_str()
    )
    .increment(1);
    Ok(reply)
}

/// The worker's answer, or `None` once `deadline` passes (counted for `route`, named as in
/// `pushfleet_ingest_requests_total`).
pub async fn await_reply(
    state: &AppState,
    job_id: Uuid,
    reply: oneshot::Receiver<SyncReply>,
    deadline: Instant,
    route: &'static str,
) -> Option<SyncReply> {
    match tokio::time::timeout_at(deadline, reply).await {
        Ok(Ok(reply)) => Some(reply),
        _ => {
            // The job stays queued and will still be delivered and audited.
            state.broker.forget(job_id);
            metrics::counter!("pushfleet_ingest_sync_timeouts_total", "route" => route)
                .increment(1);
            None
        }
    }
}

/// The 202 answer, `{"code": 202, "data": {"job_id": ...}, "description": ...}`, written from a
/// struct: cheaper than a `json!` map on every push. Its fields are declared in the order
/// serde_json's maps write keys (sorted), so that it reads like every other answer.
#[derive(Serialize)]
struct Accepted {
    code: u16,
    data: AcceptedData,
    description: &'static str,
}

#[derive(Serialize)]
struct AcceptedData {
    job_id: Uuid,
}

fn accepted(job_id: Uuid) -> Response {
    let body = Accepted {
        code: 202,
        data: AcceptedData { job_id },
        description: "accepted for delivery",
    };
    (StatusCode::ACCEPTED, Json(body)).into_response()
}

/// The reference's synchronous answer: the HTTP status is the provider-derived code.
fn sync_answer(job: &Job, reply: SyncReply, raw_tokens: bool) -> Response {
    let status = StatusCode::from_u16(reply.code).unwrap_or(StatusCode::BAD_GATEWAY);
    (
        status,
        Json(json!({
            "code": reply.code,
            "description": "push notification response",
            "data": push_result(job, &reply, raw_tokens),
        })),
    )
        .into_response()
}

/// One device's result, in the reference's shape (but for the token, see [`put_token`]).
pub fn push_result(job: &Job, reply: &SyncReply, raw_tokens: bool) -> Value {
    let token = &job.push.token;
    // An APNs URL ends with the device token.
    let url = if raw_tokens || token.is_empty() {
        reply.url.clone()
    } else {
        reply.url.replace(
            token.as_str(),
            &format!("token:{}", token_fingerprint(token)),
        )
    };
    let mut result = json!({
        "body": reply.body,
        "code": reply.code,
        "reason": reply.reason,
        "url": url,
        "platform": job.platform,
        "call_id": job.push.call_id,
    });
    put_token(&mut result, token, raw_tokens);
    result
}

/// A device token as an answer shows it: its fingerprint, under `token_fingerprint`, as answers
/// travel through logs and proxies a token should not reach; or, with
/// `[ingest] raw_tokens_in_answers` for clients that need the reference's shape, the token
/// itself under `token`.
pub fn put_token(item: &mut Value, token: &str, raw: bool) {
    if raw {
        item["token"] = json!(token);
    } else {
        item["token_fingerprint"] = json!(token_fingerprint(token));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::header;

    #[tokio::test]
    async fn the_accepted_answer_keeps_its_bytes() {
        let job_id = Uuid::parse_str("6f1c1c3e-4a43-4c3e-9d6f-5a1f8a2b0c11").expect("literal uuid");
        let response = accepted(job_id);
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .expect("body");
        let expected = json!({
            "code": 202,
            "description": "accepted for delivery",
            "data": {"job_id": job_id},
        });
        assert_eq!(body, expected.to_string().as_bytes());
    }
}
