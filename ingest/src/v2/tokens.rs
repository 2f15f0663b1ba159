//! Registering, listing and removing an account's device tokens. Listings show tokens only as
//! fingerprints.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::{Extension, Json};
use deadpool_postgres::tokio_postgres::Client;
use pushfleet_core::clock::now_ms;
use pushfleet_core::config::{Platform, Settings};
use pushfleet_core::logged::{Escaped, Identity};
use pushfleet_core::tokens::{self, token_fingerprint, NewToken, RegistrationExtras, StoredToken};
use serde_json::{json, Map, Value};
use tracing::info;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::fcm_projects::FcmProjects;
use crate::fields::{bool_or, field, non_empty_str, optional_str, required_str};
use crate::limits::{self, check, check_optional};
use crate::pipeline::put_token;
use crate::request::{account, json_object};
use crate::rfc8599;
use crate::state::Shared;
use crate::validate::{configured_app, webpush_keys};

/// `POST /v2/tokens/{account}`: stores (or replaces) a device's token.
pub async fn add_token(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let account = account(path)?;
    let body = json_object(body, state.body_limit()).await?;
    let live = state.live();
    let new = new_token(account, &body, &live.settings, &live.fcm_projects, &caller)?;
    if let Some(app) = live.settings.app(&new.app_id, new.platform) {
        crate::endpoint::check_reachable(app, &new.token).await?;
    }
    let max_devices = live.settings.ingest.max_devices_per_account;
    let mut client = state.db_client().await?;
    tokens::register_within(&mut **client, &new, max_devices, caller.apps()).await?;
    info!(
        request_id = %format!("{}-{}-{}", Identity(&new.account), new.app_id, Escaped(&new.device_id)),
        peer = %peer.ip(), platform = %new.platform, token = %token_fingerprint(&new.token),
        "token registered"
    );
    // The echo shows the values as stored, as the reference's does (the token as answers show it).
    let mut echo = json!({
        "app-id": new.app_id,
        "platform": new.platform,
        "device-id": new.device_id,
        "silent": new.silent,
        "user-agent": new.user_agent,
    });
    if new.extras != RegistrationExtras::default() {
        echo["remote_only"] = json!(new.extras.remote_only);
        echo["push_options"] = json!(new.extras.push_options);
        echo["registration_expires_at"] = json!(new.extras.registration_expires_at);
    }
    put_token(
        &mut echo,
        &new.token,
        live.settings.ingest.raw_tokens_in_answers,
    );
    Ok(Json(echo))
}

/// The registration a body asks for, checked in the reference's order and with its v2 wording;
/// a key for another app is refused as soon as the app is known.
fn new_token(
    account: String,
    body: &Map<String, Value>,
    settings: &Settings,
    fcm_projects: &FcmProjects,
    caller: &Caller,
) -> Result<NewToken, ApiError> {
    if rfc8599::addresses_by_parameters(body) {
        return new_token_by_parameters(account, body, settings, fcm_projects, caller);
    }
    let app = configured_app(body, settings, ApiError::UnknownRegistrationPlatform)?;
    caller.check_app(&app.id)?;
    let raw_token = non_empty_str(body, "token")?;
    let device_id = non_empty_str(body, "device-id")?;
    let silent = bool_or(body, "silent", true)?;
    let user_agent = optional_str(body, "user-agent")?;
    // After every field was read, so that a missing one is reported first, as the reference does.
    limits::check_registered_token(app.platform, &raw_token)?;
    check(&limits::DEVICE_ID, &device_id)?;
    check_optional(&limits::USER_AGENT, user_agent.as_deref())?;
    let webpush_keys = match app.platform {
        Platform::UnifiedPush => webpush_keys(body)?,
        _ => None,
    };
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
        extras: RegistrationExtras {
            registration_expires_at: registration_expiry(body)?,
            ..Default::default()
        },
        webpush_keys,
    })
}

/// A registration whose device is named by RFC 8599 parameters (a `contact`, or `pn-provider`,
/// `pn-param` and `pn-prid`), with the contact's per-contact options.
fn new_token_by_parameters(
    account: String,
    body: &Map<String, Value>,
    settings: &Settings,
    fcm_projects: &FcmProjects,
    caller: &Caller,
) -> Result<NewToken, ApiError> {
    let device = rfc8599::registration(body, settings, fcm_projects)?;
    caller.check_app(&device.app_id)?;
    let device_id = non_empty_str(body, "device-id")?;
    let silent = bool_or(body, "silent", true)?;
    let user_agent = optional_str(body, "user-agent")?;
    check(&limits::DEVICE_ID, &device_id)?;
    check_optional(&limits::USER_AGENT, user_agent.as_deref())?;
    Ok(NewToken {
        account,
        app_id: device.app_id,
        platform: device.platform,
        device_id,
        token: device.token,
        background_token: device.background_token,
        silent,
        user_agent,
        extras: RegistrationExtras {
            remote_only: device.remote_only,
            push_options: device.push_options,
            registration_expires_at: registration_expiry(body)?,
        },
        webpush_keys: None,
    })
}

/// The longest registration pushfleet takes (a year), as SIP registrars cap `Expires` too.
const MAX_EXPIRES_SECS: u64 = 365 * 24 * 3600;

/// When the device's SIP registration expires, in epoch seconds: `expires` (seconds from now,
/// as the REGISTER's Expires) or `registration-expires-at` (epoch seconds).
fn registration_expiry(body: &Map<String, Value>) -> Result<Option<f64>, ApiError> {
    let now_secs = now_ms() as f64 / 1000.0;
    let number = |name: &'static str| -> Result<Option<u64>, ApiError> {
        match field(body, name) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => value.as_u64().map(Some).ok_or(ApiError::InvalidField {
                field: name,
                problem: "value is not a valid non-negative integer",
            }),
        }
    };
    let longest = MAX_EXPIRES_SECS as f64;
    match (number("expires")?, number("registration-expires-at")?) {
        (Some(secs), _) if secs <= MAX_EXPIRES_SECS => Ok(Some(now_secs + secs as f64)),
        (Some(_), _) => Err(ApiError::InvalidField {
            field: "expires",
            problem: "must be at most 31536000 seconds (a year)",
        }),
        (None, Some(at)) if (at as f64) > now_secs && (at as f64) - now_secs <= longest => {
            Ok(Some(at as f64))
        }
        (None, Some(_)) => Err(ApiError::InvalidField {
            field: "registration-expires-at",
            problem: "must be epoch seconds in the coming year",
        }),
        (None, None) => Ok(None),
    }
}

/// `DELETE /v2/tokens/{account}` with a JSON body `{"app-id", "device-id"}`. Without a
/// device-id, every device of that app goes.
pub async fn remove_token(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let account = account(path)?;
    let body = json_object(body, state.body_limit()).await?;
    let app_id = required_str(&body, "app-id")?;
    let device_id = optional_str(&body, "device-id")?;
    check(&limits::APP_ID, &app_id)?;
    check_optional(&limits::DEVICE_ID, device_id.as_deref())?;
    caller.check_app(&app_id)?;
    let client = state.db_client().await?;
    if !account_visible(&client, &account, &caller).await? {
        return Err(ApiError::NoAccountToRemove);
    }
    let removed = tokens::remove(&**client, &account, &app_id, device_id.as_deref()).await?;
    if removed == 0 {
        return Err(ApiError::NoDeviceToRemove);
    }
    info!(
        request_id = %format!("{}-{app_id}-{}", Identity(&account), Escaped(device_id.as_deref().unwrap_or("*"))),
        peer = %peer.ip(), removed, "token removed"
    );
    Ok(Json(json!({"app-id": app_id, "device-id": device_id})))
}

/// `GET /v2/tokens/{account}`: the account's devices, tokens only as fingerprints.
pub async fn list_tokens(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let account = account(path)?;
    let mut devices = tokens::list(&**state.db_client().await?, &account).await?;
    devices.retain(|d| caller.sees(&d.app_id));
    if devices.is_empty() {
        return Err(ApiError::UserNotFound { account });
    }
    let devices: Vec<Value> = devices.iter().map(StoredToken::redacted).collect();
    Ok(Json(json!({"account": account, "devices": devices})))
}

/// Whether the account has devices the caller sees: an account known only through another
/// tenant's apps is answered as unknown, so that a tenant learns nothing about the others.
async fn account_visible(
    client: &Client,
    account: &str,
    caller: &Caller,
) -> Result<bool, ApiError> {
    Ok(match caller.apps() {
        None => tokens::account_exists(client, account).await?,
        Some(_) => tokens::list(client, account)
            .await?
            .iter()
            .any(|d| caller.sees(&d.app_id)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arbitrary::{self, assert_clean, assert_token};
    use crate::request;
    use pushfleet_core::config::Platform;
    use serde_json::json;

    fn parse(body: Value) -> Result<NewToken, String> {
        new_token(
            "bob@example.com".into(),
            body.as_object().unwrap(),
            arbitrary::settings(),
            arbitrary::fcm_projects(),
            &Caller::Anonymous,
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn registrations_keep_the_limits() {
        let (voip, background) = ("ab".repeat(32), "CD".repeat(32));
        let body = |token: &str, device: &str| {
            json!({"app-id": "com.example.sylk", "platform": "apple", "token": token,
                   "device-id": device})
        };
        let new = parse(body(&format!("{voip}-{background}"), "d1")).unwrap();
        assert_eq!(
            (new.token.as_str(), new.background_token.as_deref()),
            (voip.as_str(), Some(background.as_str()))
        );
        assert!(parse(body(&format!("{voip}-tok"), "d1"))
            .unwrap_err()
            .ends_with(": token"));
        assert_eq!(
            parse(body(&voip, "d\u{0}1")).unwrap_err(),
            "must not contain control characters: device-id"
        );
        // A missing field is reported before a malformed one.
        assert_eq!(
            parse(json!({"app-id": "com.example.sylk", "platform": "apple", "token": "t"}))
                .unwrap_err(),
            "field required: device-id"
        );
        let mut long_agent = body(&voip, "d1");
        long_agent["user-agent"] = json!("u".repeat(513));
        assert_eq!(
            parse(long_agent).unwrap_err(),
            "ensure this value has at most 512 characters: user-agent"
        );
    }

    #[test]
    fn registration_expiries_are_checked() {
        let expiry = |extra: Value| {
            let mut body = json!({"app-id": "com.example.sylk", "platform": "firebase",
                                  "token": "tok", "device-id": "d1"});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            registration_expiry(body.as_object().unwrap()).map_err(|e| e.to_string())
        };
        let now = now_ms() as f64 / 1000.0;
        let at = expiry(json!({"expires": 3600})).unwrap().unwrap();
        assert!((at - now - 3600.0).abs() < 5.0, "{at} {now}");
        assert_eq!(expiry(json!({})), Ok(None));
        assert_eq!(
            expiry(json!({"expires": -1})),
            Err("value is not a valid non-negative integer: expires".into())
        );
        assert_eq!(
            expiry(json!({"expires": 31_536_001})),
            Err("must be at most 31536000 seconds (a year): expires".into())
        );
        assert_eq!(
            expiry(json!({"registration-expires-at": 1000})),
            Err("must be epoch seconds in the coming year: registration-expires-at".into())
        );
        let later = now as u64 + 600;
        assert_eq!(
            expiry(json!({"registration-expires-at": later})),
            Ok(Some(later as f64))
        );
    }

    proptest::proptest! {
        #![proptest_config(arbitrary::config())]

        /// Whatever the account and body, a registration is stored within the limits or
        /// refused with a 4xx.
        #[test]
        fn any_registration_is_within_the_limits_or_refused_with_a_4xx(
            account in arbitrary::text(),
            body in arbitrary::registration_body(),
        ) {
            let parsed = request::account(Ok(Path(account)))
                .and_then(|account| {
                    new_token(account, &body, arbitrary::settings(), arbitrary::fcm_projects(), &Caller::Anonymous)
                });
            match parsed {
                Ok(new) => {
                    assert_clean(&limits::ACCOUNT, &new.account);
                    assert_token(new.platform, &new.token);
                    if let Some(background) = &new.background_token {
                        assert_token(Platform::Apple, background);
                    }
                    assert_clean(&limits::DEVICE_ID, &new.device_id);
                    if let Some(agent) = &new.user_agent {
                        assert_clean(&limits::USER_AGENT, agent);
                    }
                }
                Err(error) => arbitrary::assert_refused(&error),
            }
        }
    }
}
