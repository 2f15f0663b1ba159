//! Sylk Pushserver v1 `POST /push`: the request's field names, aliases, coercions, validation
//! order and messages, as the reference implements them (sylk-compat §1.2–§1.3) — minus its
//! crashes. The first failing check is the one reported, as in the reference.

use pushfleet_core::config::{AppSettings, AppType, Platform, Settings};
use pushfleet_core::job::PushData;
use pushfleet_core::policy::Event;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// A v1 request that passed validation.
#[derive(Debug, Clone)]
pub struct ValidPush<'a> {
    pub app: &'a AppSettings,
    pub event: Event,
    pub push: PushData,
}

const MEDIA_TYPES: [&str; 6] = ["audio", "video", "image", "chat", "sms", "file-transfer"];

/// Looks a field up under its dashed name (the reference's only accepted spelling) or the
/// underscore spelling its README uses (`from_display_name`).
pub(crate) fn field<'v>(body: &'v Map<String, Value>, dashed: &str) -> Option<&'v Value> {
    body.get(dashed).or_else(|| {
        // Only a dashed name has another spelling to try (most absent fields are looked up).
        if dashed.contains('-') {
            body.get(&dashed.replace('-', "_"))
        } else {
            None
        }
    })
}

/// Present and not null: the reference tests `values.get(k) is None`.
fn given<'v>(body: &'v Map<String, Value>, dashed: &str) -> Option<&'v Value> {
    field(body, dashed).filter(|v| !v.is_null())
}

/// Python truthiness, as the reference's `if not values.get(...)` checks.
pub(crate) fn truthy(value: Option<&Value>) -> bool {
    match value {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
    }
}

/// How a value prints in the reference's messages (Python's `str()` of it).
pub(crate) fn python_str(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Null => "None".into(),
        other => other.to_string(),
    }
}

/// Validates a parsed v1 body against the configured apps.
pub fn validate<'a>(
    body: &Map<String, Value>,
    settings: &'a Settings,
) -> Result<ValidPush<'a>, ApiError> {
    // 1–2: the app and platform must be there at all.
    if !truthy(field(body, "app-id")) {
        return Err(ApiError::bad_request("Field 'app-id' required"));
    }
    let platform_value = field(body, "platform");
    if !truthy(platform_value) {
        return Err(ApiError::bad_request("Field 'platform' required"));
    }
    // 3: a platform pushfleet knows.
    let platform_value = platform_value.expect("truthy");
    let platform = platform_value
        .as_str()
        .and_then(Platform::from_alias)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "'{}' platform is not configured",
                python_str(platform_value)
            ))
        })?;
    // 4: an app configured for it.
    let app_id = python_str(field(body, "app-id").expect("truthy"));
    let app = settings.app(&app_id, platform).ok_or_else(|| {
        ApiError::not_found(format!(
            "{} {app_id} app is not configured",
            platform.title()
        ))
    })?;

    // 5: the keys each app type needs. The reference's order is random per process; ours is
    // the order below, always.
    let required: &[&str] = match app.app_type {
        AppType::Sylk => &[
            "app-id", "call-id", "platform", "from", "token", "silent", "to", "event",
        ],
        AppType::Linphone => &["app-id", "call-id", "platform", "from", "token"],
    };
    let missing: Vec<&str> = required
        .iter()
        .copied()
        .filter(|k| given(body, k).is_none())
        .collect();
    if !missing.is_empty() {
        return Err(ApiError::bad_request(format!(
            "'{}' item(s) missing.",
            missing.join(" ,")
        )));
    }

    // 6: media-type, except for cancel.
    let event_value = given(body, "event");
    if event_value.and_then(Value::as_str) != Some("cancel") {
        match given(body, "media-type") {
            None => return Err(ApiError::bad_request("Field media-type required")),
            Some(m) if !m.as_str().is_some_and(|m| MEDIA_TYPES.contains(&m)) => {
                return Err(ApiError::bad_request(
                    "media-type must be 'audio', 'video', 'chat', 'sms', 'file-transfer', 'image'",
                ))
            }
            Some(_) => {}
        }
    }

    // 7: Linphone apps only ring; their event defaults to incoming_session.
    let event_name = match (app.app_type, event_value) {
        (AppType::Linphone, None) => "incoming_session",
        (AppType::Linphone, Some(v)) if v.as_str() != Some("incoming_session") => {
            return Err(ApiError::not_found(
                "event not found (must be incoming_sesion)",
            ))
        }
        (_, Some(v)) => match v {
            Value::String(s) => s.as_str(),
            _ => return Err(ApiError::bad_request("str type expected: event")),
        },
        (_, None) => "",
    };

    // 8: field types, in the reference model's field order.
    let event = Event::parse(event_name).ok_or_else(|| {
        ApiError::bad_request(
            "event must be 'incoming_session', 'incoming_conference_request', 'cancel' or 'message', 'transfer': event",
        )
    })?;
    let token = required_str(body, "token")?;
    let device_id = optional_str(body, "device-id")?;
    let call_id = required_str(body, "call-id")?;
    let from = required_str(body, "from")?;
    let from_display_name = optional_str(body, "from-display-name")?;
    let to = required_str(body, "to")?;
    let media_type = optional_str(body, "media-type")?;
    let silent = match field(body, "silent") {
        None => true,
        Some(v) => parse_bool(v).map_err(|m| ApiError::bad_request(format!("{m}: silent")))?,
    };
    let reason = optional_str(body, "reason")?;
    let badge = match field(body, "badge") {
        None => 1,
        Some(v) => parse_int(v).map_err(|m| ApiError::bad_request(format!("{m}: badge")))?,
    };
    let push = PushData {
        token,
        device_id,
        call_id,
        from,
        from_display_name,
        to,
        media_type,
        silent,
        reason,
        badge,
        filename: optional_str(body, "filename")?,
        filetype: optional_str(body, "filetype")?,
        account: optional_str(body, "account")?,
        content: optional_str(body, "content")?,
        content_type: optional_str(body, "content-type")?,
    };
    if push.token.is_empty() {
        // An empty token cannot address a device; the reference would send it and fail.
        return Err(ApiError::bad_request("token must not be empty: token"));
    }
    Ok(ValidPush { app, event, push })
}

/// pydantic v1's `str`: strings, and numbers coerced to their text.
fn coerce_str(value: &Value) -> Result<String, &'static str> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(_) | Value::Bool(_) => Ok(python_str(value)),
        Value::Null => Err("none is not an allowed value"),
        _ => Err("str type expected"),
    }
}

pub(crate) fn required_str(body: &Map<String, Value>, name: &str) -> Result<String, ApiError> {
    match field(body, name) {
        None => Err(ApiError::bad_request(format!("field required: {name}"))),
        Some(v) => coerce_str(v).map_err(|m| ApiError::bad_request(format!("{m}: {name}"))),
    }
}

pub(crate) fn optional_str(
    body: &Map<String, Value>,
    name: &str,
) -> Result<Option<String>, ApiError> {
    match field(body, name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => coerce_str(v)
            .map(Some)
            .map_err(|m| ApiError::bad_request(format!("{m}: {name}"))),
    }
}

/// pydantic v1's `bool`.
pub(crate) fn parse_bool(value: &Value) -> Result<bool, &'static str> {
    const INVALID: &str = "value could not be parsed to a boolean";
    match value {
        Value::Bool(b) => Ok(*b),
        Value::Number(n) => match n.as_f64() {
            Some(1.0) => Ok(true),
            Some(0.0) => Ok(false),
            _ => Err(INVALID),
        },
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "1" | "on" | "t" | "true" | "y" | "yes" => Ok(true),
            "0" | "off" | "f" | "false" | "n" | "no" => Ok(false),
            _ => Err(INVALID),
        },
        Value::Null => Err("none is not an allowed value"),
        _ => Err(INVALID),
    }
}

/// pydantic v1's `int`: integers, integral text, and floats truncated.
fn parse_int(value: &Value) -> Result<i64, &'static str> {
    const INVALID: &str = "value is not a valid integer";
    match value {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.is_finite())
                    .map(|f| f.trunc() as i64)
            })
            .ok_or(INVALID),
        Value::Bool(b) => Ok(i64::from(*b)),
        Value::String(s) => s.trim().parse().map_err(|_| INVALID),
        Value::Null => Err("none is not an allowed value"),
        _ => Err(INVALID),
    }
}

/// A v1 body must be a JSON object; an array, a string or a number is refused with a 400.
pub fn as_object(value: &Value) -> Result<&Map<String, Value>, ApiError> {
    value
        .as_object()
        .ok_or_else(|| ApiError::bad_request("request body must be a JSON object"))
}

#[cfg(test)]
mod tests {
    use super::*;
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
        validate(body.as_object().unwrap(), settings).map_err(|e| {
            (
                e.status.as_u16(),
                e.body["description"].as_str().unwrap().to_string(),
            )
        })
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
}
