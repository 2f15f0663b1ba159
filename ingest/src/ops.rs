//! What operators and load balancers call rather than clients: the reference's home page,
//! liveness, readiness (connected to RabbitMQ), the Prometheus metrics, and the request counter
//! that feeds them. Also the answers for a path or method the API does not have.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::error::{ApiError, ErrorLabel};
use crate::state::Shared;

/// `GET /`: the reference's greeting, which monitoring may look for.
pub async fn home() -> Json<&'static str> {
    Json("Welcome to sylk-push server")
}

/// `GET /health`: the process answers.
pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /ready`: pushes can be queued.
pub async fn ready(State(state): State<Shared>) -> Result<Json<Value>, ApiError> {
    if state.broker.is_connected() {
        Ok(Json(json!({"status": "ready"})))
    } else {
        Err(ApiError::NotReady)
    }
}

/// `GET /metrics`, in the Prometheus text format.
pub async fn metrics_text(State(state): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
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
