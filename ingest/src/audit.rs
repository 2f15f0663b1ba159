//! `GET /audit?call_id=…`: what happened to the pushes of a call, read from the audit tables the
//! workers write, each delivery with its provider attempts and the API key that sent it. A
//! caller with a key sees only the rows of the key's apps.

use std::collections::HashMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::{Extension, Json};
use pushfleet_core::db::DbError;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::limits;
use crate::state::Shared;

/// The query string as the reference reads it: any keys, the last of a repeated one winning.
type QueryParams = HashMap<String, String>;

const DELIVERIES_OF_A_CALL: &str = "SELECT coalesce(json_agg(d ORDER BY d.received_at), '[]'::json)
       FROM (SELECT id AS job_id, received_at, finished_at, recorded_at, app_id,
                    platform, event, call_id, account, device_id, token_fingerprint,
                    lane, status, attempts, provider_status, provider_reason,
                    provider_message_id, latency_ms, api_key_id,
                    (SELECT coalesce(json_agg(a ORDER BY a.attempt, a.attempted_at),
                                     '[]'::json)
                       FROM (SELECT attempt, attempted_at, provider_status, reason,
                                    duration_ms, worker
                               FROM delivery_attempts
                              WHERE job_id = deliveries.id) a) AS attempt_log
               FROM deliveries
              WHERE call_id = $1 AND ($2::text[] IS NULL OR app_id = ANY($2))) d";

/// `GET /audit`.
pub async fn audit(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<QueryParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(ApiError::InvalidQuery)?;
    let call_id = query
        .get("call_id")
        .or_else(|| query.get("call-id"))
        .filter(|c| !c.is_empty())
        .ok_or(ApiError::MissingField("call_id"))?;
    // Postgres refuses a NUL in text: that must be the caller's 400, not a 503.
    limits::check_as(&limits::CALL_ID, "call_id", call_id)?;
    let row = state
        .db_client()
        .await?
        .query_one(DELIVERIES_OF_A_CALL, &[call_id, &caller.apps()])
        .await
        .map_err(DbError::query("deliveries"))?;
    let deliveries: Value = row.get(0);
    Ok(Json(json!({"call_id": call_id, "deliveries": deliveries})))
}
