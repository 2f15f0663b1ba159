//! HTTP routes: the Sylk v1 API, the v2 token API, the RFC 8599 push, audit queries, health,
//! readiness and metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use deadpool_postgres::Pool;
use metrics_exporter_prometheus::PrometheusHandle;
use pushfleet_core::job::{now_ms, Job, SyncReply, JOB_VERSION};
use pushfleet_core::service::metrics_recorder;
use pushfleet_core::{EventPolicies, ResponseMode, Settings};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tracing::{info, warn};
use uuid::Uuid;

use crate::acl::{self, AccessList};
use crate::broker::Broker;
use crate::error::ApiError;
use crate::{rfc8599, v1, v2};

pub struct AppState {
    pub(crate) settings: Settings,
    pub(crate) policies: EventPolicies,
    pub(crate) broker: Broker,
    /// Device tokens (v2) and audit queries.
    pub(crate) db: Pool,
    pub(crate) fcm_projects: rfc8599::FcmProjects,
    acl: Arc<AccessList>,
    metrics: PrometheusHandle,
}

impl AppState {
    pub fn new(settings: Settings, broker: Broker, db: Pool, acl: AccessList) -> AppState {
        AppState {
            acl: Arc::new(acl),
            policies: settings.event_policies(),
            fcm_projects: rfc8599::FcmProjects::load(&settings),
            settings,
            broker,
            db,
            metrics: metrics_recorder(),
        }
    }
}

pub(crate) type Shared = Arc<AppState>;

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/", get(home))
        .route("/push", any(push_v1))
        // Starlette's redirect_slashes, which Sylk clients may rely on.
        .route("/push/", any(|| async { Redirect::temporary("/push") }))
        .route(
            "/v2/tokens/{account}",
            post(v2::add_token)
                .delete(v2::remove_token)
                .get(v2::list_tokens)
                .fallback(method_not_allowed),
        )
        .route(
            "/v2/tokens/{account}/push",
            post(v2::push_account).fallback(method_not_allowed),
        )
        .route(
            "/v2/tokens/{account}/push/{device}",
            post(v2::push_device).fallback(method_not_allowed),
        )
        .route(
            "/rfc8599/push",
            post(rfc8599::push).fallback(method_not_allowed),
        )
        .route("/audit", get(v2::audit).fallback(method_not_allowed))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .fallback(|| async { ApiError::detail(StatusCode::NOT_FOUND, "Not Found") })
        .layer(middleware::from_fn_with_state(
            state.acl.clone(),
            acl::guard,
        ))
        .layer(middleware::from_fn(count_requests))
        .with_state(state)
}

async fn method_not_allowed() -> ApiError {
    ApiError::detail(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
}

async fn home() -> Json<&'static str> {
    Json("Welcome to sylk-push server")
}

async fn ready(State(state): State<Shared>) -> Response {
    if state.broker.is_connected() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        ApiError::unavailable("not connected to RabbitMQ").into_response()
    }
}

async fn metrics_text(State(state): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn count_requests(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("pushfleet_ingest_requests_total", "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("pushfleet_ingest_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Reads the whole body, refusing more than `limit` bytes.
async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::too_large(limit))
}

/// Parses a request body as the JSON object every API route takes.
pub async fn json_object(
    body: Body,
    limit: usize,
) -> Result<serde_json::Map<String, Value>, ApiError> {
    let bytes = read_body(body, limit).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("request body is empty"));
    }
    let value: Value = serde_json::from_slice(&bytes).map_err(|_| ApiError::unparsable_body())?;
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(ApiError::bad_request("request body must be a JSON object")),
    }
}

async fn push_v1(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    if request.method() != axum::http::Method::POST {
        return method_not_allowed().await.into_response();
    }
    let accepted =
        match json_object(request.into_body(), state.settings.ingest.max_body_bytes).await {
            Ok(body) => accept_push(&state, peer, &body).await,
            Err(error) => Err(error),
        };
    accepted.unwrap_or_else(IntoResponse::into_response)
}

/// A job for a validated push, and the time it is worth delivering.
pub(crate) fn new_job(state: &AppState, valid: v1::ValidPush<'_>) -> (Job, Duration) {
    let policy = state.policies.get(valid.event);
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
    };
    (job, policy.ttl)
}

/// Validates a v1-shaped push (from `/push` or built from RFC 8599 parameters), queues it and
/// answers as the reference does.
pub(crate) async fn accept_push(
    state: &AppState,
    peer: SocketAddr,
    body: &serde_json::Map<String, Value>,
) -> Result<Response, ApiError> {
    let valid = v1::validate(body, &state.settings).inspect_err(|e| {
        info!(peer = %peer.ip(), status = e.status.as_u16(), error = %e.body, "push request rejected");
    })?;
    let (job, ttl) = new_job(state, valid);
    let sync = state.settings.ingest.mode == ResponseMode::Sync;
    let reply = enqueue(state, &job, ttl, sync, RequestId(&job), peer).await?;
    let Some(reply) = reply else {
        return Ok(accepted(job.id));
    };
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(state.settings.ingest.sync_timeout_ms);
    Ok(match await_reply(state, job.id, reply, deadline).await {
        Some(reply) => sync_answer(&job, reply),
        None => accepted(job.id),
    })
}

/// A v1 push's request id in the logs, `<event>-<app id>-<call id>`: written out only by the log
/// lines that show it, instead of being built for every push.
struct RequestId<'a>(&'a Job);

impl std::fmt::Display for RequestId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let job = self.0;
        write!(f, "{}-{}-{}", job.event, job.app_id, job.push.call_id)
    }
}

/// Publishes one job (logging and counting it); a broker problem is the caller's 503.
pub(crate) async fn enqueue(
    state: &AppState,
    job: &Job,
    ttl: Duration,
    sync: bool,
    request_id: impl std::fmt::Display,
    peer: SocketAddr,
) -> Result<Option<oneshot::Receiver<SyncReply>>, ApiError> {
    let reply = state.broker.publish(job, ttl, sync).await.map_err(|e| {
        warn!(%request_id, call_id = %job.push.call_id, error = %e, "push not queued");
        ApiError::unavailable(format!("push queue unavailable: {e}"))
    })?;
    info!(
        %request_id, call_id = %job.push.call_id, job_id = %job.id, peer = %peer.ip(),
        platform = %job.platform, event = %job.event, to = %job.push.to, "push accepted"
    );
    metrics::counter!(
        "pushfleet_ingest_jobs_total",
        "app" => job.app_id.clone(), "platform" => job.platform.as_str(), "event" => job.event.as_str()
    )
    .increment(1);
    Ok(reply)
}

/// The worker's answer, or `None` once `deadline` passes.
pub(crate) async fn await_reply(
    state: &AppState,
    job_id: Uuid,
    reply: oneshot::Receiver<SyncReply>,
    deadline: tokio::time::Instant,
) -> Option<SyncReply> {
    match tokio::time::timeout_at(deadline, reply).await {
        Ok(Ok(reply)) => Some(reply),
        _ => {
            // The job stays queued and will still be delivered and audited.
            state.broker.forget(job_id);
            metrics::counter!("pushfleet_ingest_sync_timeouts_total").increment(1);
            None
        }
    }
}

/// The 202 answer, `{"code": 202, "data": {"job_id": ...}, "description": ...}`: a struct rather
/// than a `json!` map for every push, its fields in the order the map wrote them.
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
fn sync_answer(job: &Job, reply: SyncReply) -> Response {
    let status = StatusCode::from_u16(reply.code).unwrap_or(StatusCode::BAD_GATEWAY);
    (
        status,
        Json(json!({
            "code": reply.code,
            "description": "push notification response",
            "data": push_result(job, &reply),
        })),
    )
        .into_response()
}

/// One device's result, in the reference's shape.
pub(crate) fn push_result(job: &Job, reply: &SyncReply) -> Value {
    json!({
        "body": reply.body,
        "code": reply.code,
        "reason": reply.reason,
        "url": reply.url,
        "platform": job.platform,
        "call_id": job.push.call_id,
        "token": job.push.token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
