//! `/UP`: the HTTP side of the UnifiedPush-over-XMPP gateway. An application server POSTs a
//! push to the endpoint a distributor was handed (`{endpoint_base}?token=…`); the push becomes a
//! job on the messages lane, queued for the worker that holds the XMPP component. The endpoint
//! token is the only credential: application servers are anyone the app gave the endpoint to,
//! so neither API keys nor the access list apply here.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use pushfleet_core::clock::now_ms;
use pushfleet_core::job::{Handling, Job, PushData, JOB_VERSION};
use pushfleet_core::xmpp::{self, MAX_PUSH_BYTES};
use pushfleet_core::{Event, Platform};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use crate::error::ApiError;
use crate::pipeline;
use crate::request::read_body;
use crate::state::Shared;

#[derive(Debug, Deserialize)]
pub struct EndpointQuery {
    token: Option<String>,
}

/// UnifiedPush discovery: what a distributor's endpoint answers to GET.
pub async fn discover(State(state): State<Shared>) -> Result<Response, ApiError> {
    if state.live().settings.xmpp.is_none() {
        return Err(ApiError::NoRoute);
    }
    Ok(Json(json!({"unifiedpush": {"version": 1}})).into_response())
}

/// A push to a registered endpoint: 202 once queued.
pub async fn push(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    query: Result<Query<EndpointQuery>, axum::extract::rejection::QueryRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let live = state.live();
    let Some(gateway) = &live.settings.xmpp else {
        return Err(ApiError::NoRoute);
    };
    let token = query
        .map_err(ApiError::InvalidQuery)?
        .0
        .token
        .filter(|t| !t.is_empty() && t.len() <= 256)
        .ok_or(ApiError::UnknownEndpoint)?;
    let content = read_body(body, MAX_PUSH_BYTES).await?;
    if content.is_empty() {
        return Err(ApiError::EmptyBody);
    }
    let content = String::from_utf8(content.to_vec()).map_err(|_| ApiError::NotText)?;
    let target = {
        let client = state.db_client().await?;
        xmpp::target(&**client, &token).await?
    }
    .ok_or(ApiError::UnknownEndpoint)?;

    let policy = *live.policies.get(Event::Message);
    let now = now_ms();
    let id = Uuid::new_v4();
    let job = Job {
        v: JOB_VERSION,
        id,
        app_id: gateway.component.clone(),
        platform: Platform::UnifiedPush,
        event: Event::Message,
        lane: policy.lane,
        received_at_ms: now,
        deadline_ms: now + policy.ttl.as_millis() as u64,
        attempt: 0,
        push: PushData {
            token,
            // Audit rows are found by call-id: each push has its own.
            call_id: format!("up-{id}"),
            from: gateway.component.clone(),
            to: target.jid.clone(),
            content: Some(content),
            ..Default::default()
        },
        api_key_id: None,
        reply: false,
        handling: Handling {
            xmpp: Some(target),
            ..Default::default()
        },
    };
    pipeline::enqueue(&state, &job, policy.ttl, "UP", peer).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"id": job.id}))).into_response())
}
