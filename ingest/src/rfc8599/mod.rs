//! `POST /rfc8599/push`: a push addressed by the RFC 8599 parameters a SIP registrar stored from
//! the device's Contact (`pn-provider`, `pn-param`, `pn-prid`), so that OpenSIPS, Kamailio or a
//! Flexisip "external push" can call pushfleet directly. The device is mapped to a configured
//! app, and the push is turned into a v1 request and answered as one.

mod params;
mod resolve;

pub use self::resolve::Target;

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use pushfleet_core::clock::now_ms;
use pushfleet_core::config::Settings;
use pushfleet_core::ledger::LedgerEntry;
use pushfleet_core::logged::Escaped;
use serde_json::{json, Map, Value};
use tracing::info;

use self::params::parameters;
use self::resolve::resolve;
use crate::auth::Caller;
use crate::call_options::CallOptions;
use crate::error::ApiError;
use crate::fcm_projects::FcmProjects;
use crate::fields::{field, optional_str, python_str, required_str};
use crate::limits;
use crate::pipeline;
use crate::request::json_object;
use crate::state::{AppState, Shared};

/// `POST /rfc8599/push`.
pub async fn push(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(caller): Extension<Caller>,
    body: Body,
) -> Result<Response, ApiError> {
    let body = json_object(body, state.body_limit()).await?;
    let live = state.live();
    let (v1, options) = v1_body(&body, &live.settings, &live.fcm_projects)?;
    if let Some(app) = linphone_call_end(&v1, &live.settings) {
        return call_ended(&state, peer, &caller, app, &v1).await;
    }
    pipeline::accept(&state, peer, &caller, &v1, &options, "/rfc8599/push").await
}

/// A `cancel` for a Linphone app: Linphone clients take no cancel push (their VoIP push would
/// ring again), but the call's end still matters to a phone rung by alerts.
fn linphone_call_end<'a>(
    v1: &Map<String, Value>,
    settings: &'a Settings,
) -> Option<&'a pushfleet_core::AppSettings> {
    if v1.get("event").and_then(Value::as_str) != Some("cancel") {
        return None;
    }
    let app_id = v1.get("app-id")?.as_str()?;
    let platform = pushfleet_core::Platform::from_alias(v1.get("platform")?.as_str()?)?;
    settings
        .app(app_id, platform)
        .filter(|app| app.app_type == pushfleet_core::AppType::Linphone)
}

/// Records the end of a Linphone call in the ledger, as a cancel's would be, without a push:
/// its alerts stop and the final one says how it ended. Answered 200 at once.
async fn call_ended(
    state: &AppState,
    peer: SocketAddr,
    caller: &Caller,
    app: &pushfleet_core::AppSettings,
    v1: &Map<String, Value>,
) -> Result<Response, ApiError> {
    caller.check_app(&app.id)?;
    let call_id = required_str(v1, "call-id")?;
    let reason = optional_str(v1, "reason")?;
    limits::check(&limits::CALL_ID, &call_id)?;
    limits::check_optional(&limits::REASON, reason.as_deref())?;
    state.api_keys.admit(caller, 1)?;
    let entry = LedgerEntry::Cancel {
        call_id: call_id.clone(),
        at_ms: now_ms(),
        reason: reason.clone(),
    };
    state.broker.publish_ledger(&entry).await?;
    info!(call_id = %Escaped(&call_id), app = %app.id, peer = %peer.ip(), "Linphone call ended");
    Ok(Json(json!({
        "code": 200,
        "description": "call ended: Linphone apps take no cancel push",
        "data": {"call_id": call_id, "reason": reason},
    }))
    .into_response())
}

/// The keys that address the device, replaced in the v1 request by its app, platform and token.
const ADDRESS_KEYS: [&str; 7] = [
    "contact",
    "pn-provider",
    "pn-param",
    "pn-prid",
    "pn-type",
    "pn-tok",
    "type",
];

/// The v1 request that the RFC 8599 push stands for, and the device's per-contact options.
fn v1_body(
    body: &Map<String, Value>,
    settings: &Settings,
    fcm_projects: &FcmProjects,
) -> Result<(Map<String, Value>, CallOptions), ApiError> {
    let params = parameters(body)?;
    let event = event(body)?;
    let hint = field(body, "app-id").and_then(Value::as_str);
    let target = resolve(&params, &event, hint, settings, fcm_projects)?;
    let mut options = CallOptions::from_params(&params)?;
    options.remote_only = target.remote_only();
    options.cancel_token = Some(target.cancel_token().to_string());
    // The v1 validation checks it again as `token`; here the caller reads the name it gave.
    limits::check_token(target.platform, target.token_param, &target.token)?;
    let mut v1 = body.clone();
    for key in ADDRESS_KEYS.iter().chain(&CallOptions::PARAMS) {
        v1.remove(*key);
        v1.remove(&key.replace('-', "_"));
    }
    let group_chat = field(body, "group-chat").filter(|v| !v.is_null());
    v1.remove("group-chat");
    v1.remove("group_chat");
    v1.insert("app-id".into(), json!(target.app_id));
    v1.insert("platform".into(), json!(target.platform));
    v1.insert("token".into(), json!(target.token));
    v1.insert("event".into(), json!(event));
    // What a SIP proxy may not know: the defaults of a plain audio call / chat message.
    if field(body, "silent").is_none() {
        v1.insert("silent".into(), json!(true));
    }
    if field(body, "media-type").is_none() && event != "cancel" {
        let media = if event == "message" { "chat" } else { "audio" };
        v1.insert("media-type".into(), json!(media));
    }
    if let Some(flag) = group_chat {
        options.group_chat = flag.as_bool().ok_or(ApiError::InvalidField {
            field: "group-chat",
            problem: "value could not be parsed to a boolean",
        })?;
    }
    Ok((v1, options))
}

/// A device as a v2 registration addresses it by RFC 8599 parameters: its app and tokens (the
/// VoIP token first, the remote one as the background token), and its per-contact options
/// as they are stored: by parameter name.
pub struct Registration {
    pub app_id: String,
    pub platform: pushfleet_core::Platform,
    pub token: String,
    pub background_token: Option<String>,
    pub remote_only: bool,
    pub push_options: Option<Value>,
}

/// Whether a v2 registration names its device by RFC 8599 parameters instead of app-id,
/// platform and token.
pub fn addresses_by_parameters(body: &Map<String, Value>) -> bool {
    ["contact", "pn-provider", "pn-type"]
        .iter()
        .any(|key| field(body, key).is_some_and(|v| !v.is_null()))
}

pub fn registration(
    body: &Map<String, Value>,
    settings: &Settings,
    fcm_projects: &FcmProjects,
) -> Result<Registration, ApiError> {
    let params = parameters(body)?;
    let hint = field(body, "app-id").and_then(Value::as_str);
    let target = resolve(&params, "incoming_session", hint, settings, fcm_projects)?;
    limits::check_token(target.platform, target.token_param, &target.token)?;
    let background_token = match (&target.voip_token, &target.remote_token) {
        (Some(_), Some(remote)) => {
            limits::check_token(target.platform, target.token_param, remote)?;
            Some(remote.clone())
        }
        _ => None,
    };
    // Checked now, so that a bad option is refused at registration rather than at a push.
    CallOptions::from_params(&params)?;
    let options: Map<String, Value> = CallOptions::PARAMS
        .iter()
        .filter_map(|name| {
            let value = params.get(*name).filter(|v| !v.is_empty())?;
            Some((name.to_string(), json!(value)))
        })
        .collect();
    Ok(Registration {
        app_id: target.app_id.clone(),
        platform: target.platform,
        remote_only: target.remote_only(),
        token: target.token,
        background_token,
        push_options: (!options.is_empty()).then_some(Value::Object(options)),
    })
}

/// The device a wake-up by RFC 8599 parameters is for.
pub fn wake_target(
    body: &Map<String, Value>,
    settings: &Settings,
    fcm_projects: &FcmProjects,
) -> Result<Target, ApiError> {
    let params = parameters(body)?;
    let hint = field(body, "app-id").and_then(Value::as_str);
    resolve(&params, "cancel", hint, settings, fcm_projects)
}

/// The event of the push: a Sylk event name, or Flexisip's `type` (call, message, background).
fn event(body: &Map<String, Value>) -> Result<String, ApiError> {
    if let Some(event) = field(body, "event").filter(|v| !v.is_null()) {
        return Ok(python_str(event));
    }
    match field(body, "type").filter(|v| !v.is_null()) {
        None => Ok("incoming_session".into()),
        Some(kind) => match kind.as_str() {
            Some("call") => Ok("incoming_session".into()),
            Some("message") => Ok("message".into()),
            Some("background" | "cancel") => Ok("cancel".into()),
            _ => Err(ApiError::UnknownType),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arbitrary;
    use crate::validate::validate;
    use pushfleet_core::config::Platform;
    use resolve::Target;
    use std::path::Path;

    fn settings() -> Settings {
        let sa = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        let text = format!(
            r#"
            [[apps]]
            id = "org.linphone.phone"
            platform = "apple"
            type = "linphone"
            apns = {{ cert_file = "{0}", cert_key_file = "{0}" }}
            [[apps]]
            id = "com.example.sylk.prod"
            platform = "apple"
            type = "sylk"
            apns = {{ cert_file = "{0}", cert_key_file = "{0}" }}
            [[apps]]
            id = "org.linphone.phone"
            platform = "firebase"
            type = "linphone"
            fcm = {{ service_account_file = "{0}", project_id = "linphone-1234" }}
            [[apps]]
            id = "com.example.sylk"
            platform = "firebase"
            type = "sylk"
            fcm = {{ service_account_file = "{0}" }}
            "#,
            sa.display()
        );
        Settings::from_toml(&text, Vec::new(), Path::new(".")).unwrap()
    }

    fn target(body: Value) -> Result<Target, ApiError> {
        let settings = settings();
        let projects = FcmProjects::load(&settings);
        let body = body.as_object().unwrap().clone();
        let params = parameters(&body)?;
        let event = event(&body)?;
        let hint = body.get("app-id").and_then(Value::as_str);
        resolve(&params, &event, hint, &settings, &projects)
    }

    #[test]
    fn linphone_ios_remote_and_voip_pair() {
        let contact = "<sip:bob@192.0.2.1:5060;transport=tls;pn-provider=apns.dev;\
            pn-param=ABCD1234.org.linphone.phone.remote%26voip;\
            pn-prid=AAAA:remote&BBBB:voip;pn-timeout=0;pn-silent=1>";
        let call = target(json!({"contact": contact})).unwrap();
        assert_eq!(
            (call.platform, call.app_id.as_str(), call.token.as_str()),
            (Platform::Apple, "org.linphone.phone", "BBBB")
        );
        // Token order is free; the counts must match.
        let swapped = json!({"pn-provider": "apns", "pn-param": "ABCD1234.org.linphone.phone.voip&remote",
                             "pn-prid": "BBBB:voip&AAAA:remote"});
        assert_eq!(target(swapped).unwrap().token, "BBBB");
        let short = json!({"pn-provider": "apns", "pn-param": "ABCD1234.org.linphone.phone.remote&voip",
                           "pn-prid": "AAAA:remote"});
        assert!(matches!(
            target(short),
            Err(ApiError::MalformedPnPrid(prid)) if prid == "AAAA:remote"
        ));
    }

    #[test]
    fn sylk_messages_go_to_the_remote_token_and_suffixed_apps_are_found() {
        let body = json!({"pn-provider": "apns", "pn-param": "TEAM.com.example.sylk.remote&voip",
                          "pn-prid": "AAAA:remote&BBBB:voip", "event": "message"});
        let t = target(body).unwrap();
        assert_eq!(
            (t.app_id.as_str(), t.token.as_str()),
            ("com.example.sylk.prod", "AAAA")
        );
        let voip = json!({"pn-provider": "apns", "pn-param": "TEAM.com.example.sylk.voip",
                          "pn-prid": "CCCC"});
        assert_eq!(target(voip).unwrap().token, "CCCC");
        let plain = json!({"pn-provider": "apns", "pn-param": "TEAM.com.example.sylk",
                           "pn-prid": "DDDD", "type": "message"});
        assert_eq!(target(plain).unwrap().token, "DDDD");
    }

    #[test]
    fn linphone_android_and_legacy_forms() {
        let android = json!({"contact": "sip:alice@198.51.100.7;pn-provider=fcm;pn-param=linphone-1234;pn-prid=fcmtok:APA91"});
        let t = target(android).unwrap();
        assert_eq!(
            (t.platform, t.app_id.as_str(), t.token.as_str()),
            (Platform::Firebase, "org.linphone.phone", "fcmtok:APA91")
        );
        // A sender id nobody configured: two Firebase apps, so the caller must name one.
        let sender = json!({"pn-provider": "fcm", "pn-param": "929724111839", "pn-prid": "t"});
        assert!(matches!(
            target(sender.clone()),
            Err(ApiError::NoFirebaseApp { pn_param }) if pn_param == "929724111839"
        ));
        let mut hinted = sender;
        hinted["app-id"] = json!("com.example.sylk");
        assert_eq!(target(hinted).unwrap().app_id, "com.example.sylk");
        let legacy_ios =
            json!({"pn-type": "apple", "app-id": "org.linphone.phone.voip.prod", "pn-tok": "EEEE"});
        let t = target(legacy_ios).unwrap();
        assert_eq!(
            (t.app_id.as_str(), t.token.as_str()),
            ("org.linphone.phone", "EEEE")
        );
        let legacy_android =
            json!({"pn-type": "firebase", "app-id": "org.linphone.phone", "pn-tok": "FFFF"});
        assert_eq!(target(legacy_android).unwrap().token, "FFFF");
    }

    #[test]
    fn mistakes_are_named() {
        assert!(matches!(
            target(json!({"pn-provider": "wp", "pn-param": "x", "pn-prid": "y"})),
            Err(ApiError::UnsupportedProvider(name)) if name == "wp"
        ));
        assert!(matches!(
            target(json!({"pn-param": "x"})),
            Err(ApiError::MissingField("pn-provider"))
        ));
        assert!(matches!(
            target(json!({"pn-provider": "apns", "pn-param": "T.com.unknown.voip", "pn-prid": "y"})),
            Err(ApiError::UnknownApp { platform: Platform::Apple, app_id }) if app_id == "com.unknown"
        ));
        assert!(matches!(
            target(json!({"pn-provider": "apns", "pn-param": "nodot", "pn-prid": "y"})),
            Err(ApiError::MalformedPnParam(_))
        ));
        assert!(matches!(
            target(json!({"type": "fax"})),
            Err(ApiError::UnknownType)
        ));
        assert!(matches!(
            target(json!({"contact": 5})),
            Err(ApiError::InvalidField {
                field: "contact",
                ..
            })
        ));
    }

    #[test]
    fn decoded_and_resolved_values_are_checked() {
        let settings = settings();
        let projects = FcmProjects::load(&settings);
        let v1 = |body: Value| {
            v1_body(body.as_object().unwrap(), &settings, &projects)
                .map(|(v1, _)| v1)
                .map_err(|e| e.to_string())
        };
        let hex = "ab".repeat(32);
        assert_eq!(
            v1(
                json!({"contact": format!("sip:b@h;pn-provider=apns;pn-param=T.org.linphone.phone;pn-prid={hex}%00")})
            ),
            Err("must not contain control characters: pn-prid".into())
        );
        assert_eq!(
            v1(json!({"pn-provider": "apns", "pn-param": "T.org.linphone.phone", "pn-prid": "y"})),
            Err(
                "must be an APNs device token of 64 to 200 hex digits (an even number): pn-prid"
                    .into()
            )
        );
        assert!(v1(
            json!({"pn-type": "apple", "app-id": "org.linphone.phone.voip.prod", "pn-tok": "EEEE"})
        )
        .unwrap_err()
        .ends_with(": pn-tok"));
        // Only the token a push goes to is forwarded, so only its shape matters.
        let pair = format!("{hex}:voip&nothex:remote");
        let call = v1(
            json!({"pn-provider": "apns", "pn-param": "T.org.linphone.phone.remote&voip",
                             "pn-prid": pair}),
        )
        .unwrap();
        assert_eq!(call["token"], hex.as_str());
        assert_eq!(
            v1(json!({"pn-provider": "fcm", "pn-param": "linphone-1234", "pn-prid": "a b"})),
            Err("must be an FCM registration token of letters, digits, '_', ':', '.' and '-': pn-prid".into())
        );
    }

    proptest::proptest! {
        #![proptest_config(arbitrary::config())]

        /// Whatever the body, it becomes a v1 request that validation accepts within the limits
        /// or refuses, or it is refused itself: always with a 4xx.
        #[test]
        fn any_body_becomes_a_push_within_the_limits_or_a_4xx(body in arbitrary::rfc8599_body()) {
            let settings = arbitrary::settings();
            let accepted = v1_body(&body, settings, arbitrary::fcm_projects())
                .and_then(|(v1, _)| validate(&v1, settings));
            match accepted {
                Ok(valid) => arbitrary::assert_push_clean(valid.app.platform, &valid.push),
                Err(error) => arbitrary::assert_refused(&error),
            }
        }
    }

    #[test]
    fn the_v1_request_carries_the_device_and_call_defaults() {
        let settings = settings();
        let projects = FcmProjects::load(&settings);
        let body = json!({"pn-provider": "fcm", "pn-param": "linphone-1234", "pn-prid": "tok",
                          "call-id": "c", "from": "a", "to": "b", "type": "message"});
        let (v1, _) = v1_body(body.as_object().unwrap(), &settings, &projects).unwrap();
        assert_eq!(
            Value::Object(v1),
            json!({"app-id": "org.linphone.phone", "platform": "firebase", "token": "tok",
                   "event": "message", "silent": true, "media-type": "chat",
                   "call-id": "c", "from": "a", "to": "b"})
        );
    }
}
