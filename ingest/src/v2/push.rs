//! v2 pushes: to every device of an account, or to one of them. Each device gets its own job,
//! built as a v1 request from the call data in the request and the device's stored token, and
//! its own item in the answer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use deadpool_postgres::tokio_postgres::Client;
use futures_util::future::join_all;
use pushfleet_core::clock::system_time;
use pushfleet_core::ledger::LedgerEntry;
use pushfleet_core::logged::{Escaped, Identity};
use pushfleet_core::tokens::{self, Invalidation, StoredToken};
use pushfleet_core::{DeliveryStatus, Job, SyncReply};
use serde_json::{json, Map, Value};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::auth::Caller;
use crate::call_options::CallOptions;
use crate::error::ApiError;
use crate::fields::{field, python_str, required_str};
use crate::limits;
use crate::pipeline::{
    await_reply, enqueue, hold, is_sync, new_job, push_result, put_token, sync_deadline,
};
use crate::request::{account, account_and_device, json_object};
use crate::state::{AppState, Shared};
use crate::validate::{validate, ValidPush};

/// `POST /v2/tokens/{account}/push`: every device of the account.
pub async fn push_account(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    push(&state, peer, &caller, &account(path)?, None, body).await
}

/// `POST /v2/tokens/{account}/push/{device}`: one device of the account.
pub async fn push_device(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let (account, device) = account_and_device(path)?;
    push(&state, peer, &caller, &account, Some(&device), body).await
}

async fn push(
    state: &AppState,
    peer: SocketAddr,
    caller: &Caller,
    account: &str,
    device: Option<&str>,
    body: Body,
) -> Result<Response, ApiError> {
    let request = json_object(body, state.body_limit()).await?;
    for name in ["call-id", "from", "to"] {
        required_str(&request, name)?;
    }
    limits::check_call_fields(&request)?;
    let client = state.db_client().await?;
    let devices = devices(&client, account, device, caller).await?;
    let fanout = Fanout {
        state,
        peer,
        caller,
        account,
        route: if device.is_some() {
            "/v2/tokens/{account}/push/{device}"
        } else {
            "/v2/tokens/{account}/push"
        },
    };
    let planned = fanout.plan(&request, devices, device.is_some())?;
    let sends = planned
        .iter()
        .filter(|p| matches!(p, Planned::Send(..)))
        .count();
    state.api_keys.admit(caller, sends)?;
    let mut results = fanout.send(planned).await;
    if let Some(error) = none_queued(&mut results) {
        return Err(error);
    }
    mark_dead(&client, account, &results).await;
    Ok(if is_sync(state) {
        sync_answer(
            &results,
            &request,
            state.live().settings.ingest.raw_tokens_in_answers,
        )
    } else {
        async_answer(&results)
    })
}

/// The account's devices, or the one asked for, among those the caller sees: devices of
/// another tenant's apps are not there for it.
async fn devices(
    client: &Client,
    account: &str,
    device: Option<&str>,
    caller: &Caller,
) -> Result<Vec<StoredToken>, ApiError> {
    let mut stored = tokens::list(client, account).await?;
    stored.retain(|d| caller.sees(&d.app_id));
    if stored.is_empty() {
        return Err(ApiError::UserNotFound {
            account: account.to_string(),
        });
    }
    let Some(wanted) = device else {
        return Ok(stored);
    };
    let devices: Vec<StoredToken> = stored
        .into_iter()
        .filter(|d| d.device_id == wanted)
        .collect();
    if devices.is_empty() {
        return Err(ApiError::DeviceNotFound {
            device_id: wanted.to_string(),
        });
    }
    Ok(devices)
}

/// A device's push, merged from its stored record and the request, before it is queued.
enum Planned {
    /// With the ledger entry of a push held back by the device's `pn-timeout`.
    Send(Box<Job>, Duration, Option<LedgerEntry>),
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

    /// It cannot take this push (see [`Fanout::plan`]).
    fn refused(device: StoredToken, error: &ApiError) -> Skipped {
        Skipped {
            device: Box::new(device),
            code: error.status().as_u16(),
            reason: error.to_string(),
        }
    }
}

/// The options a device registered through RFC 8599 parameters stored with its tokens.
fn stored_options(device: &StoredToken) -> Result<CallOptions, ApiError> {
    let params: HashMap<String, String> = device
        .push_options
        .as_ref()
        .and_then(Value::as_object)
        .map(|options| {
            options
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let mut options = CallOptions::from_params(&params)?;
    options.remote_only = device.remote_only;
    options.cancel_token = device.background_token.clone();
    Ok(options)
}

/// The v1 body for one stored device: the request's call data plus the stored token, app and
/// flags (the stored values win). `cancel` and `message` go to the background token when the
/// device has one.
fn device_body(request: &Map<String, Value>, device: &StoredToken) -> Map<String, Value> {
    let mut body = request.clone();
    for key in [
        "app-id",
        "platform",
        "token",
        "device-id",
        "silent",
        "p256dh",
        "auth",
    ] {
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
    if let Some(keys) = &device.webpush_keys {
        body.insert("p256dh".into(), json!(keys.p256dh));
        body.insert("auth".into(), json!(keys.auth));
    }
    body
}

/// One v2 push request on its way to the account's devices.
struct Fanout<'a> {
    state: &'a AppState,
    peer: SocketAddr,
    caller: &'a Caller,
    account: &'a str,
    /// The route as `pushfleet_ingest_requests_total` names it, for the sync timeouts.
    route: &'static str,
}

impl Fanout<'_> {
    /// Every device's push is validated before any is sent: a bad request (a 400) sends
    /// nothing. A device that cannot take this push (a 404: its app is no longer configured, a
    /// Linphone app and anything but a call; or a 400 about its own stored token or device id,
    /// which a registration from before the input limits or an import may hold) is skipped in an
    /// account-wide push, so that the account's other devices still get it; when no device can
    /// take it, that is the answer.
    fn plan(
        &self,
        request: &Map<String, Value>,
        devices: Vec<StoredToken>,
        one_device: bool,
    ) -> Result<Vec<Planned>, ApiError> {
        let mut planned = Vec::with_capacity(devices.len());
        let mut first_refusal = None;
        let live = self.state.live();
        for device in devices {
            if device.invalidated_at.is_some() {
                planned.push(Planned::Skip(Skipped::dead(device)));
                continue;
            }
            match validate(&device_body(request, &device), &live.settings) {
                Ok(valid) => match self.job(valid, device) {
                    Ok(plan) => planned.push(plan),
                    Err(refused) => {
                        let (device, e) = *refused;
                        planned.push(Planned::Skip(Skipped::refused(device, &e)));
                        first_refusal.get_or_insert(e);
                    }
                },
                Err(e) => {
                    info!(account = %Identity(self.account), device_id = %Escaped(&device.device_id),
                          peer = %self.peer.ip(), error = %e.body(),
                          "v2 push request rejected for a device");
                    if !device_fault(&e) || one_device {
                        return Err(e);
                    }
                    planned.push(Planned::Skip(Skipped::refused(device, &e)));
                    first_refusal.get_or_insert(e);
                }
            }
        }
        match first_refusal {
            Some(refusal) if !planned.iter().any(|p| matches!(p, Planned::Send(..))) => {
                Err(refusal)
            }
            _ => Ok(planned),
        }
    }

    /// The device's job, shaped by the options it registered; a device whose stored options
    /// do not fit this push (a `pn-timeout` beyond a shortened TTL) comes back with the reason.
    fn job(
        &self,
        valid: ValidPush<'_>,
        device: StoredToken,
    ) -> Result<Planned, Box<(StoredToken, ApiError)>> {
        let (mut job, ttl) = new_job(self.state, valid, self.caller);
        job.push.account = Some(self.account.to_string());
        let held = match stored_options(&device)
            .and_then(|options| options.apply(&mut job, &self.state.live().policies))
        {
            Ok(held) => held,
            Err(e) => return Err(Box::new((device, e))),
        };
        job.push.device_id = Some(device.device_id);
        Ok(Planned::Send(Box::new(job), ttl, held))
    }

    /// Queues every planned job at once and, in sync mode, waits for their answers until one
    /// shared deadline.
    async fn send(&self, planned: Vec<Planned>) -> Vec<DeviceResult> {
        let deadline = sync_deadline(self.state);
        join_all(planned.into_iter().map(|plan| async move {
            match plan {
                Planned::Skip(skipped) => DeviceResult::Skipped(skipped),
                Planned::Send(job, ttl, held) => {
                    if let Err(error) = hold(self.state, held).await {
                        return DeviceResult::NotQueued(job, error);
                    }
                    self.send_one(job, ttl, deadline).await
                }
            }
        }))
        .await
    }

    async fn send_one(&self, mut job: Box<Job>, ttl: Duration, deadline: Instant) -> DeviceResult {
        let request_id = format!(
            "{}-{}-{}",
            job.event,
            Identity(self.account),
            Escaped(&job.push.call_id)
        );
        job.reply = is_sync(self.state);
        match enqueue(self.state, &job, ttl, &request_id, self.peer).await {
            Err(error) => DeviceResult::NotQueued(job, error),
            Ok(None) => DeviceResult::Queued(job),
            Ok(Some(reply)) => {
                match await_reply(self.state, job.id, reply, deadline, self.route).await {
                    Some(reply) => DeviceResult::Answered(job, reply),
                    None => DeviceResult::Queued(job),
                }
            }
        }
    }
}

/// Whether a device's push was refused for what the device is rather than for what the request
/// asks.
fn device_fault(error: &ApiError) -> bool {
    error.status() == StatusCode::NOT_FOUND || matches!(error.field(), Some("token" | "device-id"))
}

/// When nothing at all was queued, the broker is away: the first device's error, a 503, is the
/// answer.
fn none_queued(results: &mut Vec<DeviceResult>) -> Option<ApiError> {
    let queued =
        |r: &DeviceResult| matches!(r, DeviceResult::Queued(_) | DeviceResult::Answered(..));
    if results.iter().any(queued) {
        return None;
    }
    let first = results
        .iter()
        .position(|r| matches!(r, DeviceResult::NotQueued(..)))?;
    match results.swap_remove(first) {
        DeviceResult::NotQueued(_, error) => Some(error),
        _ => None,
    }
}

/// Tokens the provider declared dead are marked at once, as the worker's audit sink marks them,
/// so that the very next push skips them. The terminal state decides, not the code: a job that
/// expired before it was sent is answered 410 too, and its token is alive.
async fn mark_dead(client: &Client, account: &str, results: &[DeviceResult]) {
    for result in results {
        let DeviceResult::Answered(job, reply) = result else {
            continue;
        };
        if reply.status != DeliveryStatus::TokenInvalid {
            continue;
        }
        let dead = Invalidation {
            app_id: &job.app_id,
            platform: job.platform,
            token: &job.push.token,
            reason: &reply.reason,
            since: reply.invalid_since_ms.map(system_time),
        };
        if let Err(e) = tokens::invalidate(client, &dead).await {
            warn!(account = %Identity(account), job_id = %job.id, error = %e, "could not mark a dead token");
        }
    }
}

enum DeviceResult {
    Skipped(Skipped),
    NotQueued(Box<Job>, ApiError),
    Queued(Box<Job>),
    Answered(Box<Job>, SyncReply),
}

impl DeviceResult {
    /// The device's item in a sync answer: the reference's per-device result plus the device
    /// and job ids.
    fn item(&self, request: &Map<String, Value>, raw_tokens: bool) -> Value {
        let unsent = |job: &Job, code: u16, reason: &str| {
            let mut item = json!({
                "body": {}, "code": code, "reason": reason, "url": "",
                "platform": job.platform, "call_id": job.push.call_id,
                "device_id": job.push.device_id, "job_id": job.id,
            });
            put_token(&mut item, &job.push.token, raw_tokens);
            item
        };
        match self {
            DeviceResult::Answered(job, reply) => {
                let mut item = push_result(job, reply, raw_tokens);
                item["device_id"] = json!(job.push.device_id);
                item["job_id"] = json!(job.id);
                item
            }
            DeviceResult::Queued(job) => unsent(job, 202, "accepted for delivery"),
            DeviceResult::NotQueued(job, error) => {
                let mut item = unsent(job, error.status().as_u16(), &error.to_string());
                item["job_id"] = Value::Null;
                item
            }
            DeviceResult::Skipped(Skipped {
                device,
                code,
                reason,
            }) => {
                let mut item = json!({
                    "body": {}, "code": code, "reason": reason, "url": "",
                    "platform": device.platform,
                    "call_id": field(request, "call-id").map(python_str),
                    "device_id": device.device_id, "job_id": null,
                });
                put_token(&mut item, &device.token, raw_tokens);
                item
            }
        }
    }

    fn code(&self) -> u16 {
        match self {
            DeviceResult::Answered(_, reply) => reply.code,
            DeviceResult::Queued(_) => 202,
            DeviceResult::NotQueued(_, error) => error.status().as_u16(),
            DeviceResult::Skipped(skipped) => skipped.code,
        }
    }
}

/// The reference's aggregate: the HTTP status is the last device's code, a gone token counting
/// as 200 (its own item still says 410). Devices skipped because they cannot take this push
/// do not decide it.
fn sync_answer(
    results: &[DeviceResult],
    request: &Map<String, Value>,
    raw_tokens: bool,
) -> Response {
    let last = results
        .iter()
        .rev()
        .find(|r| !matches!(r, DeviceResult::Skipped(s) if s.code != 410))
        .map(DeviceResult::code);
    let code = match last {
        Some(410) | None => 200,
        Some(code) => code,
    };
    let data: Vec<Value> = results
        .iter()
        .map(|r| r.item(request, raw_tokens))
        .collect();
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
                "device_id": job.push.device_id, "code": error.status().as_u16(),
                "reason": error.to_string(),
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
            remote_only: false,
            push_options: None,
            registration_expires_at: None,
            webpush_keys: None,
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
