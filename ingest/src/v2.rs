//! Sylk Pushserver v2: device tokens stored per account, and pushes to every device of an
//! account (or one of them), fanned out as one job per device (sylk-compat §1.5). Minus the
//! reference's bugs: device ids are stored exactly as given, an unknown account or device is a
//! 404 naming what was asked for, messages are deterministic, and a device whose push would not
//! validate stops the request before anything is sent. Also the listing of an account's
//! devices (tokens fingerprinted) and the audit query by call-id.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::future::join_all;
use pushfleet_core::config::{AppSettings, Platform, Settings};
use pushfleet_core::job::system_time;
use pushfleet_core::{Job, ResponseMode};
use serde_json::{json, Map, Value};
use tracing::{info, warn};

use crate::error::ApiError;
use crate::routes::{self, json_object, Shared};
use crate::tokens::{self, DeadToken, NewToken, StoredToken};
use crate::v1::{self, field, optional_str, parse_bool, python_str, required_str, truthy};

/// Handlers answer with a response or an error, both JSON.
type Answer = Result<Response, ApiError>;

/// The account from the path; a path that is not valid text is the caller's 400.
fn account(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(account)| account)
        .map_err(|e| ApiError::bad_request(format!("invalid account in the path: {e}")))
}

/// A storage problem: the caller gets a 503 that says so, the log gets the detail.
pub(crate) fn storage(error: impl std::fmt::Display) -> ApiError {
    warn!(error = %error, "device token storage failed");
    ApiError::unavailable("token storage unavailable")
}

async fn db(state: &Shared) -> Result<deadpool_postgres::Object, ApiError> {
    state.db.get().await.map_err(storage)
}

/// The app a v2 registration names: the reference's checks 1–4, with its v2 wording.
fn registered_app<'a>(
    body: &Map<String, Value>,
    settings: &'a Settings,
) -> Result<&'a AppSettings, ApiError> {
    if !truthy(field(body, "app-id")) {
        return Err(ApiError::bad_request("Field 'app-id' required"));
    }
    let platform_value = field(body, "platform")
        .filter(|v| truthy(Some(v)))
        .ok_or_else(|| ApiError::bad_request("Field 'platform' required"))?;
    let platform = platform_value
        .as_str()
        .and_then(Platform::from_alias)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "The '{}' platform is not configured",
                python_str(platform_value)
            ))
        })?;
    let app_id = python_str(field(body, "app-id").expect("truthy"));
    settings.app(&app_id, platform).ok_or_else(|| {
        ApiError::not_found(format!(
            "{} {app_id} app is not configured",
            platform.title()
        ))
    })
}

fn non_empty(body: &Map<String, Value>, name: &str) -> Result<String, ApiError> {
    let value = required_str(body, name)?;
    if value.is_empty() {
        return Err(ApiError::bad_request(format!(
            "{name} must not be empty: {name}"
        )));
    }
    Ok(value)
}

/// `POST /v2/tokens/{account}`: stores (or replaces) a device's token.
pub async fn add_token(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    path: Result<Path<String>, PathRejection>,
    body: Body,
) -> Answer {
    let account = account(path)?;
    let body = json_object(body, state.settings.ingest.max_body_bytes).await?;
    let app = registered_app(&body, &state.settings)?;
    let raw_token = non_empty(&body, "token")?;
    let device_id = non_empty(&body, "device-id")?;
    let silent = match field(&body, "silent") {
        None => true,
        Some(v) => parse_bool(v).map_err(|m| ApiError::bad_request(format!("{m}: silent")))?,
    };
    let user_agent = optional_str(&body, "user-agent")?;
    let (token, background_token) = NewToken::split_token(app.platform, &raw_token);
    let new = NewToken {
        account,
        app_id: app.id.clone(),
        platform: app.platform,
        device_id,
        token,
        background_token,
        silent,
        user_agent,
    };
    tokens::register(&**db(&state).await?, &new, true)
        .await
        .map_err(storage)?;
    info!(
        request_id = %format!("{}-{}-{}", new.account, new.app_id, new.device_id),
        peer = %peer.ip(), platform = %new.platform, "token registered"
    );
    // The echo shows the values as stored, as the reference's does.
    Ok(Json(json!({
        "app-id": new.app_id,
        "platform": new.platform,
        "token": new.token,
        "device-id": new.device_id,
        "silent": new.silent,
        "user-agent": new.user_agent,
    }))
    .into_response())
}

/// `DELETE /v2/tokens/{account}` with a JSON body `{"app-id", "device-id"}`. Without a
/// device-id, every device of that app goes.
pub async fn remove_token(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    path: Result<Path<String>, PathRejection>,
    body: Body,
) -> Answer {
    let account = account(path)?;
    let body = json_object(body, state.settings.ingest.max_body_bytes).await?;
    let app_id = required_str(&body, "app-id")?;
    let device_id = optional_str(&body, "device-id")?;
    let client = db(&state).await?;
    if !tokens::account_exists(&**client, &account)
        .await
        .map_err(storage)?
    {
        return Ok(result_404("User not found"));
    }
    let removed = tokens::remove(&**client, &account, &app_id, device_id.as_deref())
        .await
        .map_err(storage)?;
    if removed == 0 {
        return Ok(result_404("Not found"));
    }
    info!(
        request_id = %format!("{account}-{app_id}-{}", device_id.as_deref().unwrap_or("*")),
        peer = %peer.ip(), removed, "token removed"
    );
    Ok(Json(json!({"app-id": app_id, "device-id": device_id})).into_response())
}

/// The reference's DELETE misses: `{"result": …}`.
fn result_404(result: &str) -> Response {
    (StatusCode::NOT_FOUND, Json(json!({ "result": result }))).into_response()
}

fn user_not_found(account: &str) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        body: json!({
            "code": 404,
            "description": "Push request was not sent: user not found",
            "data": {"account": account},
        }),
    }
}

/// `GET /v2/tokens/{account}`: the account's devices, tokens only as fingerprints.
pub async fn list_tokens(
    State(state): State<Shared>,
    path: Result<Path<String>, PathRejection>,
) -> Answer {
    let account = account(path)?;
    let devices = tokens::list(&**db(&state).await?, &account)
        .await
        .map_err(storage)?;
    if devices.is_empty() {
        return Err(user_not_found(&account));
    }
    let devices: Vec<Value> = devices.iter().map(StoredToken::redacted).collect();
    Ok(Json(json!({"account": account, "devices": devices})).into_response())
}

/// `POST /v2/tokens/{account}/push`: every device of the account.
pub async fn push_account(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    path: Result<Path<String>, PathRejection>,
    body: Body,
) -> Answer {
    push(&state, peer, &account(path)?, None, body).await
}

/// `POST /v2/tokens/{account}/push/{device}`: one device of the account.
pub async fn push_device(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Body,
) -> Answer {
    let Path((account, device)) = path.map_err(|e| {
        ApiError::bad_request(format!("invalid account or device in the path: {e}"))
    })?;
    push(&state, peer, &account, Some(&device), body).await
}

/// A device's push, merged from its stored record and the request, before it is queued.
enum Planned {
    Send(Box<Job>, Duration),
    Skip(Skipped),
}

/// A device not pushed to, with the code and reason its item reports.
struct Skipped {
    device: Box<StoredToken>,
    code: u16,
    reason: String,
}

impl Skipped {
    /// Its token was found dead: reported as the reference reports a gone token.
    fn dead(device: StoredToken) -> Skipped {
        let reason = format!(
            "token invalidated at {}: {}",
            device.invalidated_at.as_deref().unwrap_or_default(),
            device.invalid_reason.as_deref().unwrap_or("gone")
        );
        Skipped {
            device: Box::new(device),
            code: 410,
            reason,
        }
    }
}

/// The v1 body for one stored device: the request's call data plus the stored token, app and
/// flags (the stored values win). `cancel` and `message` go to the background token when the
/// device has one.
fn device_body(request: &Map<String, Value>, device: &StoredToken) -> Map<String, Value> {
    let mut body = request.clone();
    for key in ["app-id", "platform", "token", "device-id", "silent"] {
        body.remove(key);
        body.remove(&key.replace('-', "_"));
    }
    let event = field(request, "event").and_then(Value::as_str);
    let token = match (event, &device.background_token) {
        (Some("cancel" | "message"), Some(background)) => background,
        _ => &device.token,
    };
    body.insert("app-id".into(), json!(device.app_id));
    body.insert("platform".into(), json!(device.platform));
    body.insert("token".into(), json!(token));
    body.insert("device-id".into(), json!(device.device_id));
    body.insert("silent".into(), json!(device.silent));
    body
}

async fn push(
    state: &Shared,
    peer: SocketAddr,
    account: &str,
    device: Option<&str>,
    body: Body,
) -> Answer {
    let request = json_object(body, state.settings.ingest.max_body_bytes).await?;
    for name in ["call-id", "from", "to"] {
        required_str(&request, name)?;
    }
    let client = db(state).await?;
    let stored = tokens::list(&**client, account).await.map_err(storage)?;
    if stored.is_empty() {
        return Err(user_not_found(account));
    }
    let devices: Vec<StoredToken> = stored
        .into_iter()
        .filter(|d| device.is_none_or(|wanted| d.device_id == wanted))
        .collect();
    if devices.is_empty() {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            body: json!({
                "code": 404,
                "description": "Push request was not sent: device not found",
                "data": {"device_id": device},
            }),
        });
    }

    let one_device = device.is_some();
    let mut first_refusal = None;
    // Every device's push is validated before any is sent: a bad request (a 400) sends
    // nothing. A device that cannot take this push (a 404: its app is no longer configured, a
    // Linphone app and anything but a call) is skipped in an account-wide push, so that the
    // account's other devices still get it.
    let mut planned = Vec::with_capacity(devices.len());
    for device in devices {
        if device.invalidated_at.is_some() {
            planned.push(Planned::Skip(Skipped::dead(device)));
            continue;
        }
        let valid = match v1::validate(&device_body(&request, &device), &state.settings) {
            Ok(valid) => valid,
            Err(e) => {
                info!(%account, device_id = %device.device_id, peer = %peer.ip(),
                      error = %e.body, "v2 push request rejected for a device");
                if e.status != StatusCode::NOT_FOUND || one_device {
                    return Err(e);
                }
                planned.push(Planned::Skip(Skipped {
                    device: Box::new(device),
                    code: e.status.as_u16(),
                    reason: python_str(&e.body["description"]),
                }));
                first_refusal.get_or_insert(e);
                continue;
            }
        };
        let (mut job, ttl) = routes::new_job(state, valid);
        job.push.account = Some(account.to_string());
        job.push.device_id = Some(device.device_id.clone());
        planned.push(Planned::Send(Box::new(job), ttl));
    }

    if let Some(refusal) = first_refusal {
        if !planned.iter().any(|p| matches!(p, Planned::Send(..))) {
            return Err(refusal);
        }
    }
    let sync = state.settings.ingest.mode == ResponseMode::Sync;
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(state.settings.ingest.sync_timeout_ms);
    let results = join_all(planned.into_iter().map(|plan| async move {
        match plan {
            Planned::Skip(skipped) => DeviceResult::Skipped(skipped),
            Planned::Send(job, ttl) => {
                let request_id = format!("{}-{account}-{}", job.event, job.push.call_id);
                match routes::enqueue(state, &job, ttl, sync, &request_id, peer).await {
                    Err(error) => DeviceResult::NotQueued(job, error),
                    Ok(None) => DeviceResult::Queued(job),
                    Ok(Some(reply)) => {
                        match routes::await_reply(state, job.id, reply, deadline).await {
                            Some(reply) => DeviceResult::Answered(job, reply),
                            None => DeviceResult::Queued(job),
                        }
                    }
                }
            }
        }
    }))
    .await;

    // Nothing queued at all: the broker is away; the caller gets its 503.
    let not_queued = results.iter().find_map(|r| match r {
        DeviceResult::NotQueued(_, error) => Some(error),
        _ => None,
    });
    if let Some(error) = not_queued {
        if results
            .iter()
            .all(|r| matches!(r, DeviceResult::NotQueued(..) | DeviceResult::Skipped(_)))
        {
            return Err(error.clone());
        }
    }
    // Dead tokens are marked, as the worker does, so that the next push skips them.
    for result in &results {
        if let DeviceResult::Answered(job, reply) = result {
            if reply.code == 410 {
                let dead = DeadToken {
                    account,
                    app_id: &job.app_id,
                    device_id: job.push.device_id.as_deref().unwrap_or_default(),
                    token: &job.push.token,
                    reason: &reply.reason,
                    since: reply.body["timestamp"].as_u64().map(system_time),
                };
                let marked = tokens::mark_invalid(&**client, &dead).await;
                if let Err(e) = marked {
                    warn!(%account, job_id = %job.id, error = %e, "could not mark a dead token");
                }
            }
        }
    }
    Ok(if sync {
        sync_answer(&results, &request)
    } else {
        async_answer(&results)
    })
}

enum DeviceResult {
    Skipped(Skipped),
    NotQueued(Box<Job>, ApiError),
    Queued(Box<Job>),
    Answered(Box<Job>, pushfleet_core::SyncReply),
}

impl DeviceResult {
    /// The device's item in a sync answer: the reference's per-device result plus the device
    /// and job ids.
    fn item(&self, request: &Map<String, Value>) -> Value {
        let unsent = |job: &Job, code: u16, reason: &Value| {
            json!({
                "body": {}, "code": code, "reason": reason, "url": "",
                "platform": job.platform, "call_id": job.push.call_id, "token": job.push.token,
                "device_id": job.push.device_id, "job_id": job.id,
            })
        };
        match self {
            DeviceResult::Answered(job, reply) => {
                let mut item = routes::push_result(job, reply);
                item["device_id"] = json!(job.push.device_id);
                item["job_id"] = json!(job.id);
                item
            }
            DeviceResult::Queued(job) => unsent(job, 202, &json!("accepted for delivery")),
            DeviceResult::NotQueued(job, error) => {
                let mut item = unsent(job, error.status.as_u16(), &error.body["description"]);
                item["job_id"] = Value::Null;
                item
            }
            DeviceResult::Skipped(Skipped {
                device,
                code,
                reason,
            }) => json!({
                "body": {}, "code": code, "reason": reason, "url": "",
                "platform": device.platform,
                "call_id": field(request, "call-id").map(python_str),
                "token": device.token, "device_id": device.device_id, "job_id": null,
            }),
        }
    }

    fn code(&self) -> u16 {
        match self {
            DeviceResult::Answered(_, reply) => reply.code,
            DeviceResult::Queued(_) => 202,
            DeviceResult::NotQueued(_, error) => error.status.as_u16(),
            DeviceResult::Skipped(skipped) => skipped.code,
        }
    }
}

/// The reference's aggregate: the HTTP status is the last device's code, a gone token counting
/// as 200 (its own item still says 410). Devices skipped because they cannot take this push
/// do not decide it.
fn sync_answer(results: &[DeviceResult], request: &Map<String, Value>) -> Response {
    let last = results
        .iter()
        .rev()
        .find(|r| !matches!(r, DeviceResult::Skipped(s) if s.code != 410))
        .map(DeviceResult::code);
    let code = match last {
        Some(410) | None => 200,
        Some(code) => code,
    };
    let data: Vec<Value> = results.iter().map(|r| r.item(request)).collect();
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY),
        Json(json!({
            "code": code,
            "description": "push notification responses",
            "data": data,
        })),
    )
        .into_response()
}

/// Async mode: 202 with each device's job id; skipped and unqueued devices say why.
fn async_answer(results: &[DeviceResult]) -> Response {
    let mut jobs = Vec::new();
    let mut skipped = Vec::new();
    for result in results {
        match result {
            DeviceResult::Queued(job) | DeviceResult::Answered(job, _) => {
                jobs.push(json!({"device_id": job.push.device_id, "job_id": job.id}))
            }
            DeviceResult::NotQueued(job, error) => skipped.push(json!({
                "device_id": job.push.device_id, "code": error.status.as_u16(),
                "reason": error.body["description"],
            })),
            DeviceResult::Skipped(s) => skipped.push(json!({
                "device_id": s.device.device_id, "code": s.code, "reason": s.reason,
            })),
        }
    }
    (
        StatusCode::ACCEPTED,
        Json(json!({
            "code": 202,
            "description": "accepted for delivery",
            "data": {
                "job_ids": jobs.iter().map(|j| j["job_id"].clone()).collect::<Vec<_>>(),
                "jobs": jobs,
                "skipped": skipped,
            },
        })),
    )
        .into_response()
}

/// `GET /audit?call_id=…`: the audit rows of a call, each with its provider attempts.
pub async fn audit(
    State(state): State<Shared>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Answer {
    let Query(query) =
        query.map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))?;
    let call_id = query
        .get("call_id")
        .or_else(|| query.get("call-id"))
        .filter(|c| !c.is_empty())
        .ok_or_else(|| ApiError::bad_request("field required: call_id"))?;
    let row = db(&state)
        .await?
        .query_one(
            "SELECT coalesce(json_agg(d ORDER BY d.received_at), '[]'::json)
               FROM (SELECT id AS job_id, received_at, finished_at, recorded_at, app_id,
                            platform, event, call_id, account, device_id, token_fingerprint,
                            lane, status, attempts, provider_status, provider_reason,
                            provider_message_id, latency_ms,
                            (SELECT coalesce(json_agg(a ORDER BY a.attempt, a.attempted_at),
                                             '[]'::json)
                               FROM (SELECT attempt, attempted_at, provider_status, reason,
                                            duration_ms, worker
                                       FROM delivery_attempts
                                      WHERE job_id = deliveries.id) a) AS attempt_log
                       FROM deliveries WHERE call_id = $1) d",
            &[call_id],
        )
        .await
        .map_err(storage)?;
    let deliveries: Value = row.get(0);
    Ok(Json(json!({"call_id": call_id, "deliveries": deliveries})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(background: Option<&str>) -> StoredToken {
        StoredToken {
            app_id: "com.example".into(),
            platform: "apple".into(),
            device_id: "<urn:uuid:abcd>".into(),
            token: "voip".into(),
            background_token: background.map(str::to_string),
            silent: false,
            user_agent: None,
            created_at: String::new(),
            updated_at: String::new(),
            invalidated_at: None,
            invalid_reason: None,
        }
    }

    #[test]
    fn cancel_and_message_use_the_background_token() {
        let request = |event: &str| {
            json!({"event": event, "token": "forged", "call-id": "c"})
                .as_object()
                .unwrap()
                .clone()
        };
        for (event, token) in [
            ("cancel", "bg"),
            ("message", "bg"),
            ("incoming_session", "voip"),
        ] {
            let body = device_body(&request(event), &stored(Some("bg")));
            assert_eq!(body["token"], token, "{event}");
            assert_eq!(body["device-id"], "<urn:uuid:abcd>");
            assert_eq!(body["silent"], false);
        }
        let body = device_body(&request("cancel"), &stored(None));
        assert_eq!(body["token"], "voip");
    }
}
