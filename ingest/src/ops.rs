//! What operators and load balancers call rather than clients: the reference's home page,
//! liveness, readiness (connected to RabbitMQ), the Prometheus metrics, and the request counter
//! that feeds them. Also the answers for a path or method the API does not have, and those of the
//! HTTP limits: load shedding and slow bodies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Version};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use pushfleet_core::http::BodyDeadline;
use pushfleet_core::service;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::error::{ApiError, ErrorLabel};
use crate::state::{AppState, Shared};

/// `GET /`: the reference's greeting, which monitoring may look for.
pub async fn home() -> Json<&'static str> {
    Json("Welcome to sylk-push server")
}

/// `GET /health`: the process answers.
pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /ready`: pushes can be queued, and tokens and audit rows read (Postgres answers
/// within [`DB_PROBE_TIMEOUT`]).
pub async fn ready(State(state): State<Shared>) -> Result<Json<Value>, ApiError> {
    if !state.broker.is_connected() {
        return Err(ApiError::NotReady("RabbitMQ"));
    }
    if probe_postgres(&state).await {
        Ok(Json(json!({"status": "ready"})))
    } else {
        Err(ApiError::NotReady("Postgres"))
    }
}

async fn probe_postgres(state: &AppState) -> bool {
    let postgres = state.live().settings.postgres.clone();
    service::probe_postgres(&state.db, &postgres, "ingest", DB_PROBE_TIMEOUT).await
}

/// A probe answers in time for a load balancer's, whatever the pool's own timeouts.
const DB_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// `GET /metrics`, in the Prometheus text format.
pub async fn metrics_text(State(state): State<Shared>) -> Response {
    probe_postgres(&state).await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        service::render_metrics(&state.metrics),
    )
        .into_response()
}

/// FastAPI's answer for a path no route serves.
pub async fn no_route() -> ApiError {
    ApiError::NoRoute
}

/// FastAPI's answer for a method the route does not take.
pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Middleware: counts every answer by route, status and error kind (`none` for an answer that
/// is not an [`ApiError`]), and times it.
pub async fn count_requests(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    let error = response
        .extensions()
        .get::<ErrorLabel>()
        .map_or("none", |label| label.0);
    metrics::counter!(
        "pushfleet_ingest_requests_total",
        "route" => route.clone(), "status" => status, "error" => error
    )
    .increment(1);
    metrics::histogram!("pushfleet_ingest_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// What a load balancer or Prometheus calls: answered even when everything else is shed, so that
/// an overloaded ingest is not also taken for a dead one.
const PROBES: [&str; 3] = ["/health", "/ready", "/metrics"];

/// Middleware: refuses a request at once (503, `Retry-After`) when `[http]
/// max_in_flight_requests` are already in progress, probes excepted; and answers 408 for a
/// request whose body did not arrive within `[http] request_body_timeout_ms` (the handler only
/// saw its read fail).
pub async fn limit_requests(
    State(in_flight): State<Arc<Semaphore>>,
    request: Request,
    next: Next,
) -> Response {
    let _permit = if PROBES.contains(&request.uri().path()) {
        None
    } else {
        match in_flight.try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => return ApiError::Overloaded.into_response(),
        }
    };
    let deadline = request.extensions().get::<BodyDeadline>().cloned();
    let http1 = request.version() < Version::HTTP_2;
    let response = next.run(request).await;
    match deadline {
        Some(deadline) if deadline.expired() => {
            let mut response = ApiError::BodyTimeout(deadline.timeout()).into_response();
            // The rest of the body may still be on its way: the connection cannot carry another
            // request, and the client should know before it tries.
            if http1 {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
        _ => response,
    }
}
