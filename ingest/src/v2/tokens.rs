//! Registering, listing and removing an account's device tokens. Listings show tokens only as
//! fingerprints.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::Json;
use pushfleet_core::config::Settings;
use pushfleet_core::tokens::{self, NewToken, StoredToken};
use serde_json::{json, Map, Value};
use tracing::info;

use crate::error::ApiError;
use crate::fields::{bool_or, non_empty_str, optional_str, required_str};
use crate::request::{account, json_object};
use crate::state::Shared;
use crate::validate::configured_app;

/// `POST /v2/tokens/{account}`: stores (or replaces) a device's token.
pub async fn add_token(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    path: Result<Path<String>, PathRejection>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let account = account(path)?;
    let body = json_object(body, state.body_limit()).await?;
    let new = new_token(account, &body, &state.settings)?;
    tokens::register(&**state.db_client().await?, &new, true).await?;
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
    })))
}

/// The registration a body asks for, checked in the reference's order and with its v2 wording.
fn new_token(
    account: String,
    body: &Map<String, Value>,
    settings: &Settings,
) -> Result<NewToken, ApiError> {
    let app = configured_app(body, settings, ApiError::UnknownRegistrationPlatform)?;
    let raw_token = non_empty_str(body, "token")?;
    let device_id = non_empty_str(body, "device-id")?;
    let silent = bool_or(body, "silent", true)?;
    let user_agent = optional_str(body, "user-agent")?;
    let (token, background_token) = NewToken::split_token(app.platform, &raw_token);
    Ok(NewToken {
        account,
        app_id: app.id.clone(),
        platform: app.platform,
        device_id,
        token,
        background_token,
        silent,
        user_agent,
    })
}

/// `DELETE /v2/tokens/{account}` with a JSON body `{"app-id", "device-id"}`. Without a
/// device-id, every device of that app goes.
pub async fn remove_token(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    path: Result<Path<String>, PathRejection>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let account = account(path)?;
    let body = json_object(body, state.body_limit()).await?;
    let app_id = required_str(&body, "app-id")?;
    let device_id = optional_str(&body, "device-id")?;
    let client = state.db_client().await?;
    if !tokens::account_exists(&**client, &account).await? {
        return Err(ApiError::NoAccountToRemove);
    }
    let removed = tokens::remove(&**client, &account, &app_id, device_id.as_deref()).await?;
    if removed == 0 {
        return Err(ApiError::NoDeviceToRemove);
    }
    info!(
        request_id = %format!("{account}-{app_id}-{}", device_id.as_deref().unwrap_or("*")),
        peer = %peer.ip(), removed, "token removed"
    );
    Ok(Json(json!({"app-id": app_id, "device-id": device_id})))
}

/// `GET /v2/tokens/{account}`: the account's devices, tokens only as fingerprints.
pub async fn list_tokens(
    State(state): State<Shared>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let account = account(path)?;
    let devices = tokens::list(&**state.db_client().await?, &account).await?;
    if devices.is_empty() {
        return Err(ApiError::UserNotFound { account });
    }
    let devices: Vec<Value> = devices.iter().map(StoredToken::redacted).collect();
    Ok(Json(json!({"account": account, "devices": devices})))
}
