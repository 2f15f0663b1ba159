//! The validation of a Sylk v1 push request: field names, aliases, coercions, validation order
//! and messages as the reference implements them, minus its crashes. The first failing check is
//! the one reported, as in the reference. v2 pushes and RFC 8599 pushes become v1 requests and
//! pass through here too.

use pushfleet_core::config::{AppSettings, AppType, Platform, Settings};
use pushfleet_core::job::{PushData, WebPushKeys};
use pushfleet_core::policy::Event;
use pushfleet_core::webpush::{self, KeyError};
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::fields::{
    bool_or, field, given, int_or, optional_str, python_str, required_str, truthy,
};
use crate::limits::{self, check, check_optional};

/// A v1 request that passed validation.
#[derive(Debug, Clone)]
pub struct ValidPush<'a> {
    pub app: &'a AppSettings,
    pub event: Event,
    pub push: PushData,
}

const MEDIA_TYPES: [&str; 6] = ["audio", "video", "image", "chat", "sms", "file-transfer"];

/// Validates a parsed v1 body against the configured apps.
pub fn validate<'a>(
    body: &Map<String, Value>,
    settings: &'a Settings,
) -> Result<ValidPush<'a>, ApiError> {
    let app = configured_app(body, settings, ApiError::UnknownPlatform)?;
    require_keys(body, app.app_type)?;
    check_media_type(body)?;
    let event = event(body, app.app_type)?;
    let mut push = push_data(body)?;
    if push.token.is_empty() {
        // An empty token cannot address a device; the reference would send it and fail.
        return Err(ApiError::EmptyField("token"));
    }
    check_limits(app.platform, &push)?;
    if app.platform == Platform::UnifiedPush {
        push.webpush_keys = webpush_keys(body)?;
        let bytes = webpush::cleartext_bound(&push);
        if bytes > webpush::MAX_CLEARTEXT_BYTES {
            return Err(ApiError::WebPushTooLarge { bytes });
        }
    }
    Ok(ValidPush { app, event, push })
}

/// Checks 1–4: the app and platform are there at all, pushfleet knows the platform, and an app
/// is configured for it. v1 and v2 word an unknown platform differently: `unknown_platform`
/// builds that error.
pub fn configured_app<'a>(
    body: &Map<String, Value>,
    settings: &'a Settings,
    unknown_platform: fn(String) -> ApiError,
) -> Result<&'a AppSettings, ApiError> {
    let present = |name| field(body, name).filter(|v| truthy(Some(v)));
    let app_id = present("app-id").ok_or(ApiError::RequiredField("app-id"))?;
    let platform_value = present("platform").ok_or(ApiError::RequiredField("platform"))?;
    let platform = platform_value
        .as_str()
        .and_then(Platform::from_alias)
        .ok_or_else(|| unknown_platform(python_str(platform_value)))?;
    let app_id = python_str(app_id);
    check(&limits::APP_ID, &app_id)?;
    match settings.app(&app_id, platform) {
        Some(app) => Ok(app),
        None => Err(ApiError::UnknownApp { platform, app_id }),
    }
}

/// Check 5: the keys each app type needs. The reference's order is random per process; ours is
/// the order below, always.
fn require_keys(body: &Map<String, Value>, app_type: AppType) -> Result<(), ApiError> {
    let required: &[&'static str] = match app_type {
        AppType::Sylk => &[
            "app-id", "call-id", "platform", "from", "token", "silent", "to", "event",
        ],
        AppType::Linphone => &["app-id", "call-id", "platform", "from", "token"],
    };
    let missing: Vec<&'static str> = required
        .iter()
        .copied()
        .filter(|k| given(body, k).is_none())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(ApiError::MissingItems(missing))
    }
}

/// Check 6: a known media-type, except for a cancel.
fn check_media_type(body: &Map<String, Value>) -> Result<(), ApiError> {
    if given(body, "event").and_then(Value::as_str) == Some("cancel") {
        return Ok(());
    }
    match given(body, "media-type") {
        None => Err(ApiError::MissingMediaType),
        Some(m) if !m.as_str().is_some_and(|m| MEDIA_TYPES.contains(&m)) => {
            Err(ApiError::InvalidMediaType)
        }
        Some(_) => Ok(()),
    }
}

/// Check 7 and the first of 8: Linphone apps only ring, their event defaulting to
/// incoming_session; any other app names a known event.
fn event(body: &Map<String, Value>, app_type: AppType) -> Result<Event, ApiError> {
    let name = match (app_type, given(body, "event")) {
        (AppType::Linphone, None) => "incoming_session",
        (AppType::Linphone, Some(v)) if v.as_str() != Some("incoming_session") => {
            return Err(ApiError::OnlyIncomingSession)
        }
        (_, Some(Value::String(s))) => s.as_str(),
        (_, Some(_)) => {
            return Err(ApiError::InvalidField {
                field: "event",
                problem: "str type expected",
            })
        }
        (_, None) => "",
    };
    Event::parse(name).ok_or(ApiError::UnknownEvent)
}

/// Check 8: the field types. Fields are read in the reference model's field order, so that the
/// first bad one is the one reported.
fn push_data(body: &Map<String, Value>) -> Result<PushData, ApiError> {
    Ok(PushData {
        token: required_str(body, "token")?,
        device_id: optional_str(body, "device-id")?,
        call_id: required_str(body, "call-id")?,
        from: required_str(body, "from")?,
        from_display_name: optional_str(body, "from-display-name")?,
        to: required_str(body, "to")?,
        media_type: optional_str(body, "media-type")?,
        silent: bool_or(body, "silent", true)?,
        reason: optional_str(body, "reason")?,
        badge: int_or(body, "badge", 1)?,
        filename: optional_str(body, "filename")?,
        filetype: optional_str(body, "filetype")?,
        account: optional_str(body, "account")?,
        content: optional_str(body, "content")?,
        content_type: optional_str(body, "content-type")?,
        group_chat: false,
        strings: Default::default(),
        webpush_keys: None,
    })
}

/// A WebPush subscription's `p256dh` and `auth`: both or neither, each of its size.
pub fn webpush_keys(body: &Map<String, Value>) -> Result<Option<WebPushKeys>, ApiError> {
    let keys = match (optional_str(body, "p256dh")?, optional_str(body, "auth")?) {
        (None, None) => return Ok(None),
        (Some(p256dh), Some(auth)) => WebPushKeys { p256dh, auth },
        (Some(_), None) => {
            return Err(ApiError::BadWebPushKey {
                field: "p256dh",
                problem: KeyError::Incomplete("auth"),
            })
        }
        (None, Some(_)) => {
            return Err(ApiError::BadWebPushKey {
                field: "auth",
                problem: KeyError::Incomplete("p256dh"),
            })
        }
    };
    webpush::decode_keys(&keys)
        .map_err(|(field, problem)| ApiError::BadWebPushKey { field, problem })?;
    Ok(Some(keys))
}

/// Check 9, pushfleet's own: every text within its limits, the token of its platform's shape
/// (see `crate::limits`), in the model's field order.
fn check_limits(platform: Platform, push: &PushData) -> Result<(), ApiError> {
    limits::check_token(platform, limits::TOKEN.field, &push.token)?;
    check_optional(&limits::DEVICE_ID, push.device_id.as_deref())?;
    check(&limits::CALL_ID, &push.call_id)?;
    check(&limits::FROM, &push.from)?;
    check_optional(
        &limits::FROM_DISPLAY_NAME,
        push.from_display_name.as_deref(),
    )?;
    check(&limits::TO, &push.to)?;
    check_optional(&limits::MEDIA_TYPE, push.media_type.as_deref())?;
    check_optional(&limits::REASON, push.reason.as_deref())?;
    check_optional(&limits::FILENAME, push.filename.as_deref())?;
    check_optional(&limits::FILETYPE, push.filetype.as_deref())?;
    check_optional(&limits::ACCOUNT, push.account.as_deref())?;
    check_optional(&limits::CONTENT, push.content.as_deref())?;
    check_optional(&limits::CONTENT_TYPE, push.content_type.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arbitrary;
    use serde_json::json;
    use std::path::Path;

    fn settings() -> Settings {
        let sa = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        let text = format!(
            r#"
            [[apps]]
            id = "com.example.sylk"
            platform = "firebase"
            type = "sylk"
            fcm = {{ service_account_file = "{0}" }}

            [[apps]]
            id = "com.example.linphone"
            platform = "firebase"
            type = "linphone"
            fcm = {{ service_account_file = "{0}" }}
            "#,
            sa.display()
        );
        Settings::from_toml(&text, Vec::new(), Path::new(".")).unwrap()
    }

    fn sylk_body() -> Value {
        json!({
            "app-id": "com.example.sylk", "platform": "android", "token": "tok",
            "device-id": "dev1", "call-id": "call-1", "from": "alice@example.com",
            "from-display-name": "Alice", "to": "bob@example.com", "media-type": "audio",
            "event": "incoming_session", "silent": "1"
        })
    }

    fn check(body: Value) -> Result<ValidPush<'static>, (u16, String)> {
        let settings: &'static Settings = Box::leak(Box::new(settings()));
        validate(body.as_object().unwrap(), settings)
            .map_err(|e| (e.status().as_u16(), e.to_string()))
    }

    fn without(mut body: Value, key: &str) -> Value {
        body.as_object_mut().unwrap().remove(key);
        body
    }

    fn with(mut body: Value, key: &str, value: Value) -> Value {
        body.as_object_mut().unwrap().insert(key.into(), value);
        body
    }

    #[test]
    fn a_complete_sylk_request_is_accepted() {
        let v = check(sylk_body()).unwrap();
        assert_eq!(v.event, Event::IncomingSession);
        assert_eq!(v.app.platform, Platform::Firebase);
        assert_eq!(v.push.from_display_name.as_deref(), Some("Alice"));
        assert!(v.push.silent);
        assert_eq!(v.push.badge, 1);
    }

    #[test]
    fn checks_run_in_the_reference_order() {
        assert_eq!(
            check(json!({})).unwrap_err(),
            (400, "Field 'app-id' required".into())
        );
        assert_eq!(
            check(json!({"app-id": "x"})).unwrap_err(),
            (400, "Field 'platform' required".into())
        );
        assert_eq!(
            check(json!({"app-id": "x", "platform": "Apple"})).unwrap_err(),
            (404, "'Apple' platform is not configured".into())
        );
        assert_eq!(
            check(json!({"app-id": "com.unknown", "platform": "ios"})).unwrap_err(),
            (404, "Apple com.unknown app is not configured".into())
        );
        assert_eq!(
            check(without(without(sylk_body(), "silent"), "event")).unwrap_err(),
            (400, "'silent ,event' item(s) missing.".into())
        );
        assert_eq!(
            check(without(sylk_body(), "media-type")).unwrap_err(),
            (400, "Field media-type required".into())
        );
        assert_eq!(
            check(with(sylk_body(), "media-type", json!("fax")))
                .unwrap_err()
                .0,
            400
        );
        assert_eq!(
            check(with(sylk_body(), "event", json!("ring"))).unwrap_err().1,
            "event must be 'incoming_session', 'incoming_conference_request', 'cancel' or 'message', 'transfer': event"
        );
    }

    #[test]
    fn cancel_needs_no_media_type() {
        let body = with(without(sylk_body(), "media-type"), "event", json!("cancel"));
        assert_eq!(check(body).unwrap().event, Event::Cancel);
    }

    #[test]
    fn both_spellings_are_accepted() {
        let body = with(
            without(sylk_body(), "from-display-name"),
            "from_display_name",
            json!("Alice U."),
        );
        assert_eq!(
            check(body).unwrap().push.from_display_name.as_deref(),
            Some("Alice U.")
        );
        let body = with(sylk_body(), "event", json!("incoming_conference"));
        assert_eq!(check(body).unwrap().event, Event::IncomingConferenceRequest);
    }

    #[test]
    fn values_are_coerced_like_pydantic() {
        let v = check(with(
            with(sylk_body(), "token", json!(12345)),
            "badge",
            json!("2"),
        ))
        .unwrap();
        assert_eq!((v.push.token.as_str(), v.push.badge), ("12345", 2));
        assert!(
            !check(with(sylk_body(), "silent", json!("off")))
                .unwrap()
                .push
                .silent
        );
        assert_eq!(
            check(with(sylk_body(), "silent", json!("abc"))).unwrap_err(),
            (400, "value could not be parsed to a boolean: silent".into())
        );
        assert_eq!(
            check(with(sylk_body(), "badge", Value::Null)).unwrap_err(),
            (400, "none is not an allowed value: badge".into())
        );
        assert_eq!(
            check(with(sylk_body(), "to", json!({"user": "bob"}))).unwrap_err(),
            (400, "str type expected: to".into())
        );
    }

    #[test]
    fn linphone_rings_only() {
        let body = json!({
            "app-id": "com.example.linphone", "platform": "firebase", "token": "t",
            "call-id": "c", "from": "f", "to": "t", "media-type": "audio"
        });
        assert_eq!(check(body.clone()).unwrap().event, Event::IncomingSession);
        assert_eq!(
            check(with(body.clone(), "event", json!("message"))).unwrap_err(),
            (404, "event not found (must be incoming_sesion)".into())
        );
        assert_eq!(
            check(without(body, "to")).unwrap_err(),
            (400, "field required: to".into())
        );
    }

    #[test]
    fn texts_are_checked_after_the_reference_checks() {
        assert_eq!(
            check(with(sylk_body(), "call-id", json!("a\u{0}b"))).unwrap_err(),
            (400, "must not contain control characters: call-id".into())
        );
        assert_eq!(
            check(with(sylk_body(), "to", json!("b".repeat(513)))).unwrap_err(),
            (
                400,
                "ensure this value has at most 512 characters: to".into()
            )
        );
        assert_eq!(
            check(with(sylk_body(), "content", json!("two\r\nlines\t!")))
                .unwrap()
                .push
                .content
                .as_deref(),
            Some("two\r\nlines\t!")
        );
        // The reference's own checks come first.
        let both = with(
            with(sylk_body(), "call-id", json!("a\u{0}b")),
            "silent",
            Value::Null,
        );
        assert_eq!(
            check(both).unwrap_err(),
            (400, "'silent' item(s) missing.".into())
        );
        assert_eq!(
            check(with(sylk_body(), "app-id", json!("x".repeat(257)))).unwrap_err(),
            (
                400,
                "ensure this value has at most 256 characters: app-id".into()
            )
        );
        assert_eq!(
            check(with(sylk_body(), "token", json!("tok/1")))
                .unwrap_err()
                .0,
            400
        );
    }

    proptest::proptest! {
        #![proptest_config(arbitrary::config())]

        /// Whatever the body, validation answers: a push whose texts keep the limits, or a 4xx.
        #[test]
        fn any_body_is_accepted_within_the_limits_or_refused_with_a_4xx(
            body in arbitrary::push_body()
        ) {
            match validate(&body, arbitrary::settings()) {
                Ok(valid) => arbitrary::assert_push_clean(valid.app.platform, &valid.push),
                Err(error) => arbitrary::assert_refused(&error),
            }
        }
    }

    #[test]
    fn errors_name_what_is_wrong() {
        let settings = settings();
        let object = |v: Value| v.as_object().unwrap().clone();
        assert!(matches!(
            configured_app(
                &object(json!({"app-id": "x", "platform": "Apple"})),
                &settings,
                ApiError::UnknownRegistrationPlatform
            ),
            Err(ApiError::UnknownRegistrationPlatform(p)) if p == "Apple"
        ));
        assert!(matches!(
            validate(&object(with(sylk_body(), "token", json!(""))), &settings),
            Err(ApiError::EmptyField("token"))
        ));
        assert!(matches!(
            validate(
                &object(with(sylk_body(), "media-type", json!("fax"))),
                &settings
            ),
            Err(ApiError::InvalidMediaType)
        ));
        assert!(matches!(
            validate(&object(with(sylk_body(), "event", json!(5))), &settings),
            Err(ApiError::InvalidField { field: "event", .. })
        ));
    }
}
