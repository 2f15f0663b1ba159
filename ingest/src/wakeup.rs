//! Registration wake-ups asked for through the API: `POST /v2/tokens/{account}/wakeup[/{device}]`
//! for stored devices and `POST /rfc8599/wakeup` for a device named by its RFC 8599 parameters.
//! Each device is claimed in Postgres first (`pushfleet_core::wakeup`), so that however often and
//! through however many ingests a proxy asks, a phone is woken at most once per
//! `[wakeup] wakeup_min_interval_secs`.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::{Extension, Json};
use pushfleet_core::logged::{Escaped, Identity};
use pushfleet_core::wakeup::{self, WakeDecision, WakeTarget};
use pushfleet_core::{Event, Platform};
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::limits;
use crate::pipeline::enqueue;
use crate::request::{account, account_and_device, json_object};
use crate::rfc8599;
use crate::state::{AppState, Shared};

/// `POST /v2/tokens/{account}/wakeup`: every device of the account.
pub async fn wake_account(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    wake_stored(&state, peer, &caller, &account(path)?, None).await
}

/// `POST /v2/tokens/{account}/wakeup/{device}`: one device.
pub async fn wake_device(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let (account, device) = account_and_device(path)?;
    wake_stored(&state, peer, &caller, &account, Some(&device)).await
}

fn min_interval(state: &AppState) -> Duration {
    Duration::from_secs(state.live().settings.wakeup.wakeup_min_interval_secs)
}

async fn wake_stored(
    state: &AppState,
    peer: SocketAddr,
    caller: &Caller,
    account: &str,
    device: Option<&str>,
) -> Result<Json<Value>, ApiError> {
    state.api_keys.admit(caller, 1)?;
    let client = state.db_client().await?;
    let decisions = wakeup::claim_requested(
        &**client,
        account,
        device,
        caller.apps(),
        min_interval(state),
    )
    .await?;
    if decisions.is_empty() {
        return Err(match device {
            Some(device) => ApiError::DeviceNotFound {
                device_id: device.to_string(),
            },
            None => ApiError::UserNotFound {
                account: account.to_string(),
            },
        });
    }
    let mut items = Vec::with_capacity(decisions.len());
    let mut first_error = None;
    for decision in decisions {
        items.push(match decision {
            WakeDecision::Wake(target) => match queue(state, peer, caller, &target).await {
                Ok(item) => item,
                Err(error) => {
                    wakeup::release(&**client, &target).await;
                    let item = json!({"device_id": target.device_id, "result": "not_queued",
                                      "reason": error.to_string()});
                    first_error.get_or_insert(error);
                    item
                }
            },
            WakeDecision::Suppressed { device_id } => {
                count("api", "suppressed");
                json!({"device_id": device_id, "result": "suppressed",
                       "reason": "woken less than wakeup_min_interval_secs ago"})
            }
            WakeDecision::Unreachable { device_id, reason } => {
                json!({"device_id": device_id, "result": "unreachable", "reason": reason})
            }
        });
    }
    // The broker away for every device: the caller should ask again.
    if let Some(error) = first_error {
        if !items.iter().any(|i| i["result"] == "queued") {
            return Err(error);
        }
    }
    info!(account = %Identity(account), device_id = %Escaped(device.unwrap_or("*")),
          peer = %peer.ip(), "wake-up requested");
    Ok(Json(json!({
        "code": 200,
        "description": "wake-up request handled",
        "data": items,
    })))
}

/// Queues one claimed device's wake-up; its item in the answer.
async fn queue(
    state: &AppState,
    peer: SocketAddr,
    caller: &Caller,
    target: &WakeTarget,
) -> Result<Value, ApiError> {
    let live = state.live();
    let policy = live.policies.get(Event::Wakeup);
    let job = target.job(policy, caller.key_id().map(str::to_string));
    let request_id = format!("wakeup-{}-{}", target.app_id, Escaped(&target.device_id));
    match enqueue(state, &job, policy.ttl, request_id, peer).await {
        Ok(_) => {
            count("api", "queued");
            Ok(json!({"device_id": target.device_id, "result": "queued", "job_id": job.id}))
        }
        Err(error) => {
            count("api", "not_queued");
            warn!(error = %error, "wake-up not queued");
            Err(error)
        }
    }
}

fn count(source: &'static str, outcome: &'static str) {
    metrics::counter!("pushfleet_wakeups_total", "source" => source, "outcome" => outcome)
        .increment(1);
}

/// `POST /rfc8599/wakeup`: a device named by its RFC 8599 parameters (as `POST /rfc8599/push`
/// takes them). Its background push goes to the remote token of an iOS device, the token of an
/// Android one.
pub async fn wake_by_parameters(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(caller): Extension<Caller>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let body = json_object(body, state.body_limit()).await?;
    let live = state.live();
    let device = rfc8599::wake_target(&body, &live.settings, &live.fcm_projects)?;
    caller.check_app(&device.app_id)?;
    let token = match (device.platform, device.remote_token) {
        (Platform::Firebase | Platform::UnifiedPush, _) => device.token,
        (Platform::Apple, Some(remote)) => remote,
        (Platform::Apple, None) => return Err(ApiError::NoBackgroundToken),
    };
    limits::check_token(device.platform, "pn-prid", &token)?;
    state.api_keys.admit(&caller, 1)?;
    let client = state.db_client().await?;
    let claimed = wakeup::claim_token(
        &**client,
        &device.app_id,
        device.platform,
        &token,
        min_interval(&state),
    )
    .await?;
    if !claimed {
        count("api", "suppressed");
        return Ok(Json(json!({
            "code": 200,
            "description": "wake-up request handled",
            "data": {"result": "suppressed",
                     "reason": "woken less than wakeup_min_interval_secs ago"},
        })));
    }
    let target = WakeTarget {
        account: String::new(),
        app_id: device.app_id,
        platform: device.platform,
        device_id: String::new(),
        token,
    };
    let mut item = queue(&state, peer, &caller, &target).await?;
    if let Some(item) = item.as_object_mut() {
        item.remove("device_id");
    }
    Ok(Json(json!({
        "code": 200,
        "description": "wake-up request handled",
        "data": item,
    })))
}
