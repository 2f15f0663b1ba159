//! `POST /rfc8599/push`: a push addressed by the RFC 8599 parameters a SIP registrar stored from
//! the device's Contact (`pn-provider`, `pn-param`, `pn-prid`), so that OpenSIPS, Kamailio or a
//! Flexisip "external push" can call pushfleet directly. The parameters are parsed as Flexisip
//! does (flexisip.md §7): Linphone's `remote&voip` pair with `tok:remote&tok:voip`, `apns.dev`,
//! the legacy `pn-type`/`app-id`/`pn-tok`, and `android`/`firebase` meaning `fcm`. The device
//! is mapped to a configured app, the push is turned into a v1 request and answered as one.

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use pushfleet_core::config::{AppSettings, AppType, Platform, Settings};
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::routes::{self, json_object, Shared};
use crate::v1::{field, python_str};

/// The Firebase project ids of the configured apps (from the settings or their service-account
/// files), which is what Android clients put in `pn-param`.
#[derive(Debug, Default, Clone)]
pub struct FcmProjects(HashMap<String, String>);

impl FcmProjects {
    pub fn load(settings: &Settings) -> FcmProjects {
        let mut projects = HashMap::new();
        for app in settings
            .apps
            .iter()
            .filter(|a| a.platform == Platform::Firebase)
        {
            let Some(fcm) = &app.fcm else { continue };
            let project = fcm.project_id.clone().or_else(|| {
                let text = std::fs::read_to_string(&fcm.service_account_file).ok()?;
                let json: Value = serde_json::from_str(&text).ok()?;
                json["project_id"].as_str().map(str::to_string)
            });
            if let Some(project) = project {
                projects.entry(project).or_insert_with(|| app.id.clone());
            }
        }
        FcmProjects(projects)
    }
}

/// An APNs service of a Linphone/Flexisip `pn-param`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    Remote,
    Voip,
}

impl Service {
    fn parse(name: &str) -> Option<Service> {
        match name {
            "remote" => Some(Service::Remote),
            "voip" => Some(Service::Voip),
            _ => None,
        }
    }
}

/// Where a push goes once the parameters are understood.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub platform: Platform,
    pub app_id: String,
    pub token: String,
}

/// The push parameters, from the body's keys or from a `contact` URI (or bare `;k=v` list).
fn parameters(body: &Map<String, Value>) -> Result<HashMap<String, String>, ApiError> {
    let mut params = HashMap::new();
    if let Some(contact) = field(body, "contact") {
        let contact = contact
            .as_str()
            .ok_or_else(|| ApiError::bad_request("str type expected: contact"))?;
        // Parameters end where the URI's headers begin; `<…>` around the URI is allowed.
        let uri = contact.trim().trim_start_matches('<');
        let uri = uri.split(['>', '?']).next().unwrap_or_default();
        for param in uri.split(';').skip(usize::from(!uri.starts_with("pn-"))) {
            if let Some((key, value)) = param.split_once('=') {
                params.insert(
                    key.trim().to_ascii_lowercase(),
                    percent_decode(value.trim()),
                );
            }
        }
    }
    for key in ["pn-provider", "pn-param", "pn-prid", "pn-type", "pn-tok"] {
        if let Some(value) = field(body, key).filter(|v| !v.is_null()) {
            let value = value
                .as_str()
                .ok_or_else(|| ApiError::bad_request(format!("str type expected: {key}")))?;
            params.insert(key.to_string(), value.trim().to_string());
        }
    }
    Ok(params)
}

/// `%XX` escapes, as SIP URIs may carry them; anything malformed is kept as written.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| text.to_string())
}

fn required<'p>(params: &'p HashMap<String, String>, key: &str) -> Result<&'p str, ApiError> {
    params
        .get(key)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApiError::bad_request(format!("field required: {key}")))
}

/// APNs tokens by service: `tok` for one service, `tok1:remote&tok2:voip` for two.
fn apns_tokens(prid: &str, services: &[Service]) -> Result<Vec<(Service, String)>, ApiError> {
    let malformed = || {
        ApiError::bad_request(format!(
            "pn-prid must hold one token per service of pn-param ('<token>:remote&<token>:voip'): {prid}"
        ))
    };
    if let [service] = services {
        // A single token may still carry its service suffix.
        let token = match prid.rsplit_once(':') {
            Some((token, tag)) if Service::parse(tag).is_some() => token,
            _ => prid,
        };
        return Ok(vec![(*service, token.to_string())]);
    }
    let tokens = prid
        .split('&')
        .map(|part| {
            let (token, tag) = part.rsplit_once(':').ok_or_else(malformed)?;
            let service = Service::parse(tag).ok_or_else(malformed)?;
            Ok((service, token.to_string()))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let complete = tokens.len() == services.len()
        && services
            .iter()
            .all(|s| tokens.iter().any(|(t, tok)| t == s && !tok.is_empty()));
    if complete {
        Ok(tokens)
    } else {
        Err(malformed())
    }
}

/// The configured Apple app for a bundle id, also under its `.dev`/`.prod` configured name.
fn apple_app<'a>(settings: &'a Settings, bundle: &str, sandbox: bool) -> Option<&'a AppSettings> {
    let suffixes: &[&str] = if sandbox {
        &["", ".dev", ".prod"]
    } else {
        &["", ".prod", ".dev"]
    };
    suffixes
        .iter()
        .find_map(|s| settings.app(&format!("{bundle}{s}"), Platform::Apple))
}

/// Resolves the parameters to a configured app and a token for `event`. `app_hint` is the
/// request's own `app-id`, which wins when it names a configured app of the platform.
pub fn resolve(
    params: &HashMap<String, String>,
    event: &str,
    app_hint: Option<&str>,
    settings: &Settings,
    fcm_projects: &FcmProjects,
) -> Result<Target, ApiError> {
    let legacy = !params.contains_key("pn-provider") && params.contains_key("pn-type");
    let provider = if legacy {
        required(params, "pn-type")?.to_ascii_lowercase()
    } else {
        required(params, "pn-provider")?.to_ascii_lowercase()
    };
    let platform = match provider.as_str() {
        "apns" | "apns.dev" | "apns-sandbox" | "apns.sandbox" | "apple" | "ios" => Platform::Apple,
        "fcm" | "firebase" | "android" | "google" => Platform::Firebase,
        other => {
            return Err(ApiError::bad_request(format!(
                "pn-provider '{other}' is not supported (apns, apns.dev, fcm)"
            )))
        }
    };
    let hinted = app_hint.and_then(|id| settings.app(id, platform));
    match platform {
        Platform::Apple => {
            let (bundle, services, prid, sandbox) = if legacy {
                // Legacy Linphone: app-id = <bundle>[.voip].prod|.dev, pn-tok = the token.
                let app_id = app_hint
                    .filter(|a| !a.is_empty())
                    .ok_or_else(|| ApiError::bad_request("field required: app-id"))?;
                let sandbox = app_id.ends_with(".dev");
                let bundle = app_id
                    .strip_suffix(".prod")
                    .or_else(|| app_id.strip_suffix(".dev"))
                    .unwrap_or(app_id);
                let (bundle, service) = match bundle.strip_suffix(".voip") {
                    Some(b) => (b, Service::Voip),
                    None => (bundle, Service::Remote),
                };
                (
                    bundle.to_string(),
                    vec![service],
                    required(params, "pn-tok")?,
                    sandbox,
                )
            } else {
                let param = required(params, "pn-param")?;
                // <TeamID>.<BundleID>[.<services>]: the Team ID only separates.
                let (_team, rest) = param.split_once('.').ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "pn-param must be <TeamID>.<BundleID>[.<service>]: {param}"
                    ))
                })?;
                let (bundle, services) = match rest.rsplit_once('.') {
                    Some((bundle, last)) => {
                        let services: Option<Vec<Service>> =
                            last.split('&').map(Service::parse).collect();
                        match services {
                            Some(s) => (bundle, s),
                            None => (rest, vec![Service::Remote]),
                        }
                    }
                    None => (rest, vec![Service::Remote]),
                };
                (
                    bundle.to_string(),
                    services,
                    required(params, "pn-prid")?,
                    provider != "apns",
                )
            };
            let tokens = apns_tokens(prid, &services)?;
            let app = hinted
                .or_else(|| apple_app(settings, &bundle, sandbox))
                .ok_or_else(|| {
                    ApiError::not_found(format!("Apple {bundle} app is not configured"))
                })?;
            // Calls wake the VoIP service (Linphone apps only ever ring); the rest goes to the
            // remote (background/alert) token. Either falls back to the other.
            let calls = app.app_type == AppType::Linphone
                || matches!(event, "incoming_session" | "incoming_conference_request");
            let preferred = if calls {
                Service::Voip
            } else {
                Service::Remote
            };
            let token = tokens
                .iter()
                .find(|(s, _)| *s == preferred)
                .or(tokens.first())
                .map(|(_, t)| t.clone())
                .unwrap_or_default();
            Ok(Target {
                platform,
                app_id: app.id.clone(),
                token,
            })
        }
        Platform::Firebase => {
            let (param, token) = if legacy {
                (
                    app_hint.unwrap_or_default().to_string(),
                    required(params, "pn-tok")?,
                )
            } else {
                (
                    required(params, "pn-param")?.to_string(),
                    required(params, "pn-prid")?,
                )
            };
            let firebase: Vec<&AppSettings> = settings
                .apps
                .iter()
                .filter(|a| a.platform == Platform::Firebase)
                .collect();
            let app = hinted
                .or_else(|| settings.app(&param, Platform::Firebase))
                .or_else(|| {
                    fcm_projects
                        .0
                        .get(&param)
                        .and_then(|id| settings.app(id, Platform::Firebase))
                })
                .or(match firebase.as_slice() {
                    [only] => Some(*only),
                    _ => None,
                })
                .ok_or_else(|| {
                    ApiError::not_found(format!(
                        "no Firebase app is configured for pn-param '{param}' (give its app-id)"
                    ))
                })?;
            Ok(Target {
                platform,
                app_id: app.id.clone(),
                token: token.to_string(),
            })
        }
    }
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
            _ => Err(ApiError::bad_request(
                "type must be 'call', 'message' or 'background': type",
            )),
        },
    }
}

/// The v1 request that the RFC 8599 push stands for.
pub fn v1_body(
    body: &Map<String, Value>,
    settings: &Settings,
    fcm_projects: &FcmProjects,
) -> Result<Map<String, Value>, ApiError> {
    let params = parameters(body)?;
    let event = event(body)?;
    let hint = field(body, "app-id").and_then(Value::as_str);
    let target = resolve(&params, &event, hint, settings, fcm_projects)?;
    let mut v1 = body.clone();
    for key in [
        "contact",
        "pn-provider",
        "pn-param",
        "pn-prid",
        "pn-type",
        "pn-tok",
        "type",
    ] {
        v1.remove(key);
        v1.remove(&key.replace('-', "_"));
    }
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
    Ok(v1)
}

/// `POST /rfc8599/push`.
pub async fn push(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Body,
) -> Result<Response, ApiError> {
    let body = json_object(body, state.settings.ingest.max_body_bytes).await?;
    let v1 = v1_body(&body, &state.settings, &state.fcm_projects)?;
    routes::accept_push(&state, peer, &v1).await
}

#[cfg(test)]
mod tests {
    use super::*;
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

    fn target(body: Value) -> Result<Target, (u16, String)> {
        let settings = settings();
        let projects = FcmProjects::load(&settings);
        let body = body.as_object().unwrap().clone();
        let params = parameters(&body).map_err(err)?;
        let event = event(&body).map_err(err)?;
        let hint = body.get("app-id").and_then(Value::as_str);
        resolve(&params, &event, hint, &settings, &projects).map_err(err)
    }

    fn err(e: ApiError) -> (u16, String) {
        (
            e.status.as_u16(),
            e.body["description"].as_str().unwrap().to_string(),
        )
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
        assert_eq!(target(short).unwrap_err().0, 400);
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
        assert_eq!(target(sender.clone()).unwrap_err().0, 404);
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
        assert_eq!(
            target(json!({"pn-provider": "wp", "pn-param": "x", "pn-prid": "y"})).unwrap_err(),
            (
                400,
                "pn-provider 'wp' is not supported (apns, apns.dev, fcm)".into()
            )
        );
        assert_eq!(
            target(json!({"pn-param": "x"})).unwrap_err(),
            (400, "field required: pn-provider".into())
        );
        assert_eq!(
            target(
                json!({"pn-provider": "apns", "pn-param": "T.com.unknown.voip", "pn-prid": "y"})
            )
            .unwrap_err(),
            (404, "Apple com.unknown app is not configured".into())
        );
        assert_eq!(target(json!({"type": "fax"})).unwrap_err().0, 400);
    }
}
