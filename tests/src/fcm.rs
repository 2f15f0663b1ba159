//! Fake FCM HTTP v1 (`POST /v1/projects/{p}/messages:send`), authenticated by access
//! tokens from the fake OAuth endpoint.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::{json, Map, Value};

use crate::apns::control_error;
use crate::journal::{self, AuthKind, Journal};
use crate::oauth::{FakeOAuth, OAuthState};
use crate::script::{DelaySpec, ScriptAction, ScriptBook, ScriptSpec, Scripted};
use crate::server::{self, ConnInfo, ConnSettings, ServerHandle};
use crate::tls::TestCa;

const MAX_DATA_BYTES: usize = 4096;
const MAX_TOPIC_DATA_BYTES: usize = 2048;
const MAX_TTL_SECS: u64 = 2_419_200;
const FCM_ERROR: &str = "type.googleapis.com/google.firebase.fcm.v1.FcmError";
const BAD_REQUEST: &str = "type.googleapis.com/google.rpc.BadRequest";

const MESSAGE_FIELDS: &[&str] = &[
    "name",
    "data",
    "notification",
    "android",
    "webpush",
    "apns",
    "fcm_options",
    "token",
    "topic",
    "condition",
    "fid",
];
const ANDROID_FIELDS: &[&str] = &[
    "collapse_key",
    "priority",
    "ttl",
    "restricted_package_name",
    "data",
    "notification",
    "fcm_options",
    "direct_boot_ok",
    "bandwidth_constrained_ok",
    "restricted_satellite_ok",
];

/// State of a registration token in the fake's registry (unknown tokens are `Ok`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum FcmTokenState {
    #[default]
    Ok,
    /// 400 INVALID_ARGUMENT "The registration token is not a valid FCM registration token".
    Malformed,
    /// 404 NOT_FOUND "Requested entity was not found." + UNREGISTERED.
    Unregistered,
    /// 403 PERMISSION_DENIED "SenderId mismatch" + SENDER_ID_MISMATCH.
    OtherSender,
}

/// Settings of the fake FCM server.
#[derive(Clone, Debug)]
pub struct FcmOptions {
    /// 0 picks a free port.
    pub port: u16,
    /// Delay before every answer.
    pub response_delay: Duration,
    pub max_concurrent_streams: u32,
}

impl Default for FcmOptions {
    fn default() -> Self {
        Self {
            port: 0,
            response_delay: Duration::ZERO,
            max_concurrent_streams: 1000,
        }
    }
}

/// A message FCM accepted (not a dry run).
#[derive(Clone, Debug)]
pub struct DeliveredMessage {
    pub project: String,
    /// `projects/<p>/messages/<id>` as answered.
    pub name: String,
    /// The `message` object as sent.
    pub message: Value,
}

struct FcmState {
    oauth: Arc<OAuthState>,
    tokens: Mutex<HashMap<String, FcmTokenState>>,
    scripts: ScriptBook,
    journal: Journal,
    delivered: Mutex<Vec<DeliveredMessage>>,
    accepted: AtomicU64,
    requests: AtomicU64,
    next_id: AtomicU64,
    delay_ms: AtomicU64,
}

/// Handle to a running fake FCM server. Clones share the server.
#[derive(Clone)]
pub struct FakeFcm {
    state: Arc<FcmState>,
    oauth: FakeOAuth,
    server: Arc<ServerHandle>,
}

impl FakeFcm {
    pub(crate) async fn start(
        ca: Arc<TestCa>,
        oauth: FakeOAuth,
        journal: (bool, usize),
        options: FcmOptions,
    ) -> Result<Self> {
        let state = Arc::new(FcmState {
            oauth: oauth.state.clone(),
            tokens: Mutex::default(),
            scripts: ScriptBook::default(),
            journal: Journal::new(journal.0, journal.1),
            delivered: Mutex::default(),
            accepted: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            delay_ms: AtomicU64::new(options.response_delay.as_millis() as u64),
        });
        let router = Router::new()
            .route("/_fake/stats", get(stats))
            .route("/_fake/token-state", post(control_token_state))
            .route("/_fake/script", post(control_script))
            .route("/_fake/delay", post(control_delay))
            .fallback(handle)
            .with_state(state.clone());
        let tls = ca.server_config(&[b"h2", b"http/1.1"], false)?;
        let listener = server::bind(options.port).await?;
        let server = server::spawn(
            listener,
            tls,
            router,
            ConnSettings {
                http2_only: false,
                max_concurrent_streams: options.max_concurrent_streams,
            },
        )?;
        Ok(Self {
            state,
            oauth,
            server: Arc::new(server),
        })
    }

    /// `https://127.0.0.1:<port>`: the base to put in front of `/v1/projects/...`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    pub fn port(&self) -> u16 {
        self.server.addr().port()
    }

    /// See [`FakeOAuth::service_account_json`].
    pub fn service_account_json(&self, project_id: &str) -> String {
        self.oauth.service_account_json(project_id)
    }

    pub fn set_token_state(&self, token: &str, state: FcmTokenState) {
        self.state
            .tokens
            .lock()
            .unwrap()
            .insert(token.to_string(), state);
    }

    /// Queues a scripted outcome for `token` (`message.token`), used before its registry state.
    pub fn script(&self, token: &str, outcome: Scripted) {
        self.state.scripts.push(token, outcome);
    }

    /// Queues a scripted outcome for any message without a script of its own (topics too).
    pub fn script_all(&self, outcome: Scripted) {
        self.state.scripts.push_global(outcome);
    }

    pub fn clear_scripts(&self) {
        self.state.scripts.clear();
    }

    pub fn set_response_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// Messages answered 200 outside dry runs (always counted).
    pub fn accepted_count(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }

    pub fn request_count(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// Accepted messages, kept only while the journal is on.
    pub fn delivered(&self) -> Vec<DeliveredMessage> {
        self.state.delivered.lock().unwrap().clone()
    }

    /// What this fake received.
    pub fn journal(&self) -> &Journal {
        &self.state.journal
    }

    pub fn clear_journal(&self) {
        self.state.journal.clear();
        self.state.delivered.lock().unwrap().clear();
    }
}

async fn stats(State(st): State<Arc<FcmState>>) -> Json<Value> {
    Json(json!({
        "accepted": st.accepted.load(Ordering::Relaxed),
        "requests": st.requests.load(Ordering::Relaxed),
    }))
}

#[derive(serde::Deserialize)]
struct TokenStateSpec {
    token: String,
    /// `ok`, `malformed`, `unregistered` or `other_sender`.
    state: String,
}

async fn control_token_state(
    State(st): State<Arc<FcmState>>,
    Json(spec): Json<TokenStateSpec>,
) -> Response {
    let state = match spec.state.as_str() {
        "ok" => FcmTokenState::Ok,
        "malformed" => FcmTokenState::Malformed,
        "unregistered" => FcmTokenState::Unregistered,
        "other_sender" => FcmTokenState::OtherSender,
        other => return control_error(format!("unknown state {other:?}")),
    };
    st.tokens.lock().unwrap().insert(spec.token, state);
    StatusCode::NO_CONTENT.into_response()
}

async fn control_script(State(st): State<Arc<FcmState>>, Json(spec): Json<ScriptSpec>) -> Response {
    match spec.to_scripted() {
        Ok(s) => {
            match &spec.token {
                Some(t) => st.scripts.push(t, s),
                None => st.scripts.push_global(s),
            }
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => control_error(e),
    }
}

async fn control_delay(State(st): State<Arc<FcmState>>, Json(spec): Json<DelaySpec>) -> StatusCode {
    st.delay_ms.store(spec.ms, Ordering::Relaxed);
    StatusCode::NO_CONTENT
}

/// A Google API error, or success.
struct Answer {
    status: u16,
    body: Value,
    /// errorCode (or canonical status when there is no FcmError) for the journal.
    reason: Option<String>,
    www_authenticate: Option<&'static str>,
    retry_after: Option<String>,
    delay: Duration,
    action: ScriptAction,
    delivered: bool,
}

impl Answer {
    fn ok(name: String) -> Self {
        Self {
            status: 200,
            body: json!({ "name": name }),
            reason: None,
            www_authenticate: None,
            retry_after: None,
            delay: Duration::ZERO,
            action: ScriptAction::Respond,
            delivered: false,
        }
    }

    fn error(code: u16, status: &str, message: &str, details: Vec<Value>) -> Self {
        let reason = details
            .iter()
            .find(|d| d["@type"] == FCM_ERROR)
            .and_then(|d| d["errorCode"].as_str())
            .unwrap_or(status)
            .to_string();
        Self {
            status: code,
            body: json!({"error": {
                "code": code,
                "message": message,
                "status": status,
                "details": details,
            }}),
            reason: Some(reason),
            ..Self::ok(String::new())
        }
    }

    /// Error with an FcmError detail.
    fn fcm(code: u16, status: &str, message: &str, error_code: &str) -> Self {
        Self::error(
            code,
            status,
            message,
            vec![json!({"@type": FCM_ERROR, "errorCode": error_code})],
        )
    }

    /// JSON-level rejection: Google reports these with a BadRequest field violation only.
    fn field(field: &str, description: String) -> Self {
        Self::error(
            400,
            "INVALID_ARGUMENT",
            &description,
            vec![json!({
                "@type": BAD_REQUEST,
                "fieldViolations": [{"field": field, "description": description}],
            })],
        )
    }

    fn invalid(message: &str) -> Self {
        Self::fcm(400, "INVALID_ARGUMENT", message, "INVALID_ARGUMENT")
    }

    fn unauthenticated(missing: bool) -> Self {
        let (message, challenge) = if missing {
            (
                "Request is missing required authentication credential. Expected OAuth 2 access \
                 token, login cookie or other valid authentication credential. See \
                 https://developers.google.com/identity/sign-in/web/devconsole-project.",
                r#"Bearer realm="https://accounts.google.com/""#,
            )
        } else {
            (
                "Request had invalid authentication credentials. Expected OAuth 2 access token, \
                 login cookie or other valid authentication credential. See \
                 https://developers.google.com/identity/sign-in/web/devconsole-project.",
                r#"Bearer realm="https://accounts.google.com/", error="invalid_token""#,
            )
        };
        let mut a = Self::error(401, "UNAUTHENTICATED", message, vec![]);
        a.www_authenticate = Some(challenge);
        a
    }

    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, self.body.to_string()).into_response();
        let h = resp.headers_mut();
        h.insert(
            "content-type",
            HeaderValue::from_static("application/json; charset=UTF-8"),
        );
        if let Some(w) = self.www_authenticate {
            h.insert("www-authenticate", HeaderValue::from_static(w));
        }
        if let Some(ra) = self
            .retry_after
            .and_then(|r| HeaderValue::from_str(&r).ok())
        {
            h.insert("retry-after", ra);
        }
        resp
    }
}

async fn handle(
    State(st): State<Arc<FcmState>>,
    Extension(conn): Extension<Arc<ConnInfo>>,
    req: Request,
) -> Response {
    let received_at = SystemTime::now();
    let received_instant = Instant::now();
    st.requests.fetch_add(1, Ordering::Relaxed);
    let stream_order = conn.next_stream_order();
    let delay = st.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();

    let mut auth = AuthKind::None;
    let mut token = None;
    let mut delivered_msg = None;
    let answer = decide(
        &st,
        &parts,
        &body,
        &mut auth,
        &mut token,
        &mut delivered_msg,
    );
    let dropped = answer.action == ScriptAction::DropConnection;
    let delivered = answer.delivered && !dropped;
    if delivered {
        st.accepted.fetch_add(1, Ordering::Relaxed);
    }
    if st.journal.enabled() {
        if let (true, Some(msg)) = (delivered, delivered_msg) {
            st.delivered.lock().unwrap().push(msg);
        }
        let mut entry = journal::entry(
            &parts,
            &body,
            &conn,
            stream_order,
            received_at,
            received_instant,
        );
        entry.auth = auth;
        entry.token = token;
        if !dropped {
            entry.status = Some(answer.status);
            entry.reason = answer.reason.clone();
        }
        entry.delivered = delivered;
        st.journal.record(entry);
    }

    if !answer.delay.is_zero() {
        tokio::time::sleep(answer.delay).await;
    }
    match answer.action {
        ScriptAction::DropConnection => {
            conn.drop_connection();
            // HTTP/2 streams run as their own tasks: stay unanswered until the socket is gone.
            tokio::time::sleep(Duration::from_secs(10)).await;
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
        ScriptAction::GoAway => conn.goaway(),
        ScriptAction::Respond => {}
    }
    answer.into_response()
}

fn decide(
    st: &FcmState,
    parts: &axum::http::request::Parts,
    body: &[u8],
    auth: &mut AuthKind,
    token_out: &mut Option<String>,
    delivered: &mut Option<DeliveredMessage>,
) -> Answer {
    let path = parts.uri.path();
    let Some(project) = path
        .strip_prefix("/v1/projects/")
        .and_then(|rest| rest.strip_suffix("/messages:send"))
        .filter(|p| !p.is_empty() && !p.contains('/'))
    else {
        return Answer::error(
            404,
            "NOT_FOUND",
            &format!("The requested URL {path} was not found on this server."),
            vec![],
        );
    };
    if parts.method != Method::POST {
        return Answer::error(405, "METHOD_NOT_ALLOWED", "Method Not Allowed", vec![]);
    }

    let bearer = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .filter(|t| !t.is_empty());
    let Some(bearer) = bearer else {
        return Answer::unauthenticated(true);
    };
    *auth = AuthKind::Bearer {
        access_token: bearer.to_string(),
    };
    let Some(token_project) = st.oauth.check_access_token(bearer) else {
        return Answer::unauthenticated(false);
    };
    if token_project != project {
        return Answer::error(
            403,
            "PERMISSION_DENIED",
            &format!(
                "Permission 'cloudmessaging.messages.create' denied on resource \
                 '//cloudresourcemanager.googleapis.com/projects/{project}' (or it may not exist)."
            ),
            vec![],
        );
    }

    let Ok(Value::Object(req)) = serde_json::from_slice::<Value>(body) else {
        return Answer::error(
            400,
            "INVALID_ARGUMENT",
            "Invalid JSON payload received. Unexpected token.",
            vec![json!({"@type": BAD_REQUEST, "fieldViolations": [{
                "description": "Invalid JSON payload received. Unexpected token."
            }]})],
        );
    };
    for key in req.keys() {
        if !matches!(snake(key).as_str(), "message" | "validate_only") {
            return unknown_field(key, None);
        }
    }
    let validate_only = field(&req, "validate_only")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let Some(message) = field(&req, "message").and_then(Value::as_object) else {
        return Answer::invalid("Request contains an invalid argument.");
    };
    if let Err(a) = validate_message(message) {
        return a;
    }
    let token = field(message, "token").and_then(Value::as_str);
    *token_out = token.map(String::from);

    // Dry runs check everything, the registry included, but consume no script.
    let script = if validate_only {
        None
    } else {
        st.scripts.take(token)
    };
    let mut answer = match script.as_ref().and_then(|s| s.status) {
        Some(200) => success(st, project),
        Some(status) => scripted_error(status, script.as_ref().and_then(|s| s.reason.as_deref())),
        None => {
            let state = token.and_then(|t| st.tokens.lock().unwrap().get(t).cloned());
            match state.unwrap_or_default() {
                FcmTokenState::Ok if validate_only => {
                    Answer::ok(format!("projects/{project}/messages/fake_message_id"))
                }
                FcmTokenState::Ok => success(st, project),
                FcmTokenState::Malformed => {
                    Answer::invalid("The registration token is not a valid FCM registration token")
                }
                FcmTokenState::Unregistered => Answer::fcm(
                    404,
                    "NOT_FOUND",
                    "Requested entity was not found.",
                    "UNREGISTERED",
                ),
                FcmTokenState::OtherSender => Answer::fcm(
                    403,
                    "PERMISSION_DENIED",
                    "SenderId mismatch",
                    "SENDER_ID_MISMATCH",
                ),
            }
        }
    };
    if let Some(script) = script {
        answer.retry_after = script.retry_after;
        answer.delay = script.delay;
        answer.action = script.action;
    }
    if answer.delivered && st.journal.enabled() {
        *delivered = Some(DeliveredMessage {
            project: project.to_string(),
            name: answer.body["name"].as_str().unwrap_or_default().to_string(),
            message: Value::Object(message.clone()),
        });
    }
    answer
}

fn success(st: &FcmState, project: &str) -> Answer {
    let n = st.next_id.fetch_add(1, Ordering::Relaxed);
    let micros = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    let name = format!("projects/{project}/messages/0:{micros}%{n:016x}");
    let mut a = Answer::ok(name);
    a.delivered = true;
    a
}

fn scripted_error(status: u16, reason: Option<&str>) -> Answer {
    let canonical = match status {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        429 => "RESOURCE_EXHAUSTED",
        503 => "UNAVAILABLE",
        _ => "INTERNAL",
    };
    let default_code = match status {
        400 => "INVALID_ARGUMENT",
        401 => "THIRD_PARTY_AUTH_ERROR",
        403 => "SENDER_ID_MISMATCH",
        404 => "UNREGISTERED",
        429 => "QUOTA_EXCEEDED",
        503 => "UNAVAILABLE",
        _ => "INTERNAL",
    };
    let code = reason.unwrap_or(default_code);
    if status == 401 && code == "UNAUTHENTICATED" {
        return Answer::unauthenticated(false);
    }
    let message = match code {
        "UNREGISTERED" => "Requested entity was not found.",
        "SENDER_ID_MISMATCH" => "SenderId mismatch",
        "QUOTA_EXCEEDED" => "Quota exceeded for quota metric 'Send requests'.",
        "UNAVAILABLE" => "The service is currently unavailable.",
        "THIRD_PARTY_AUTH_ERROR" | "APNS_AUTH_ERROR" => "Auth error from APNS or Web Push Service",
        "INVALID_ARGUMENT" => "Request contains an invalid argument.",
        _ => "Internal error encountered.",
    };
    if code.is_empty() {
        return Answer::error(status, canonical, message, vec![]);
    }
    let mut details = vec![json!({"@type": FCM_ERROR, "errorCode": code})];
    if matches!(code, "THIRD_PARTY_AUTH_ERROR" | "APNS_AUTH_ERROR") {
        details.push(json!({
            "@type": "type.googleapis.com/google.firebase.fcm.v1.ApnsError",
            "statusCode": 403,
            "reason": "InvalidProviderToken",
        }));
    }
    Answer::error(status, canonical, message, details)
}

/// Looks a field up under its proto (snake_case) or JSON (lowerCamel) name.
fn field<'a>(obj: &'a Map<String, Value>, snake_name: &str) -> Option<&'a Value> {
    obj.get(snake_name).or_else(|| obj.get(&camel(snake_name)))
}

fn camel(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut upper = false;
    for c in s.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn snake(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn unknown_field(key: &str, parent: Option<&str>) -> Answer {
    let at = parent.map(|p| format!(" at '{p}'")).unwrap_or_default();
    let description =
        format!("Invalid JSON payload received. Unknown name \"{key}\"{at}: Cannot find field.");
    Answer::error(
        400,
        "INVALID_ARGUMENT",
        &description,
        vec![json!({
            "@type": BAD_REQUEST,
            "fieldViolations": [{"field": parent.unwrap_or(""), "description": description}],
        })],
    )
}

fn validate_message(m: &Map<String, Value>) -> Result<(), Answer> {
    for key in m.keys() {
        if !MESSAGE_FIELDS.contains(&snake(key).as_str()) {
            return Err(unknown_field(key, Some("message")));
        }
    }
    let targets = ["token", "topic", "condition", "fid"]
        .iter()
        .filter(|t| field(m, t).is_some())
        .count();
    if targets == 0 {
        return Err(Answer::invalid("Recipient of the message is not set."));
    }
    if targets > 1 {
        return Err(Answer::field(
            "message",
            "Invalid value at 'message' (oneof), oneof field 'target' is already set. \
             Cannot set another target."
                .to_string(),
        ));
    }
    for t in ["token", "topic", "condition"] {
        if let Some(v) = field(m, t) {
            if !v.is_string() || v.as_str() == Some("") {
                return Err(Answer::invalid(match t {
                    "token" => "The registration token is not a valid FCM registration token",
                    _ => "Request contains an invalid argument.",
                }));
            }
        }
    }
    let topic = field(m, "topic").is_some() || field(m, "condition").is_some();
    let mut data_bytes = check_data(field(m, "data"), "message.data")?;

    if let Some(android) = field(m, "android") {
        let Some(android) = android.as_object() else {
            return Err(Answer::field(
                "message.android",
                "Invalid value at 'message.android' (type.googleapis.com/google.firebase.fcm.v1.AndroidConfig)".into(),
            ));
        };
        for key in android.keys() {
            if !ANDROID_FIELDS.contains(&snake(key).as_str()) {
                return Err(unknown_field(key, Some("message.android")));
            }
        }
        data_bytes += check_data(field(android, "data"), "message.android.data")?;
        if let Some(p) = field(android, "priority") {
            if !matches!(p.as_str(), Some("normal" | "high" | "NORMAL" | "HIGH")) {
                return Err(Answer::field(
                    "message.android.priority",
                    format!(
                        "Invalid value at 'message.android.priority' \
                         (type.googleapis.com/google.firebase.fcm.v1.AndroidMessagePriority), {p}"
                    ),
                ));
            }
        }
        if let Some(ttl) = field(android, "ttl") {
            match ttl.as_str().and_then(parse_duration) {
                None => {
                    return Err(Answer::field(
                        "message.android.ttl",
                        format!(
                            "Invalid value at 'message.android.ttl' (type.googleapis.com/google.protobuf.Duration), {ttl}"
                        ),
                    ))
                }
                Some((secs, nanos)) if secs > MAX_TTL_SECS || (secs == MAX_TTL_SECS && nanos > 0) => {
                    return Err(Answer::invalid(
                        "Android TTL must not exceed 4 weeks (2419200s).",
                    ))
                }
                Some(_) => {}
            }
        }
    }
    let limit = if topic {
        MAX_TOPIC_DATA_BYTES
    } else {
        MAX_DATA_BYTES
    };
    if data_bytes > limit {
        return Err(Answer::invalid("Message is too big"));
    }
    Ok(())
}

/// Checks a `map<string,string>` field; returns its size (keys plus values) in bytes.
fn check_data(data: Option<&Value>, path: &str) -> Result<usize, Answer> {
    let Some(data) = data else { return Ok(0) };
    let Some(data) = data.as_object() else {
        return Err(Answer::field(
            path,
            format!("Invalid value at '{path}' (type.googleapis.com/google.protobuf.Struct)"),
        ));
    };
    let mut size = 0;
    for (i, (k, v)) in data.iter().enumerate() {
        let at = format!("{path}[{i}].value");
        let description = match v {
            Value::String(s) => {
                if k == "from" || k == "gcm" || k.starts_with("google.") || k.starts_with("gcm.") {
                    return Err(Answer::invalid(&format!("Invalid data payload key: {k}")));
                }
                size += k.len() + s.len();
                continue;
            }
            Value::Object(_) => "Starting an object on a scalar field".to_string(),
            Value::Array(_) => "Proto field is not repeating, cannot start list.".to_string(),
            other => format!("Invalid value at '{at}' (TYPE_STRING), {other}"),
        };
        return Err(Answer::field(&at, description));
    }
    Ok(size)
}

/// Proto3 JSON Duration as FCM accepts it: `^\d+(\.\d{1,9})?s$`.
fn parse_duration(s: &str) -> Option<(u64, u32)> {
    let body = s.strip_suffix('s')?;
    let (whole, frac) = match body.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (body, None),
    };
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nanos = match frac {
        None => 0,
        Some(f) if (1..=9).contains(&f.len()) && f.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{f:0<9}").parse().ok()?
        }
        Some(_) => return None,
    };
    Some((whole.parse().ok()?, nanos))
}
