//! Fake APNs provider API (`POST /3/device/<token>`), checks in the order pushy's mock
//! server runs them so the first error reported matches.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use base64::Engine;
use bytes::Bytes;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use serde_json::json;

use crate::journal::{self, AuthKind, Journal};
use crate::script::{DelaySpec, FakeClock, ScriptAction, ScriptBook, ScriptSpec, Scripted};
use crate::server::{self, ConnInfo, ConnSettings, ServerHandle};
use crate::tls::TestCa;

/// The `apns-push-type` values APNs accepts.
const PUSH_TYPES: &[&str] = &[
    "alert",
    "background",
    "voip",
    "complication",
    "fileprovider",
    "mdm",
    "location",
    "liveactivity",
    "pushtotalk",
    "widgets",
    "controls",
];

const MAX_PAYLOAD: usize = 4096;
const MAX_VOIP_PAYLOAD: usize = 5120;
/// Apple warns against assuming a token length; this only rules out absurd paths.
const MAX_TOKEN_LEN: usize = 200;

/// State of a device token in the fake's registry (unknown tokens are [`ApnsTokenState::Ok`]).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum ApnsTokenState {
    #[default]
    Ok,
    /// 410 Unregistered with this `timestamp` (epoch ms).
    Unregistered { timestamp_ms: i64 },
    /// 410 ExpiredToken.
    Expired,
    /// 400 BadDeviceToken (as for a token of the other environment).
    Bad,
    /// 400 DeviceTokenNotForTopic.
    WrongTopic,
    /// 429 TooManyRequests, without Retry-After as APNs documents none.
    Throttled,
}

/// An APNs signing key the fake trusts: what an app's `.p8` download gives you.
#[derive(Clone, Debug)]
pub struct ApnsTokenKey {
    /// 10-character key id (the JWT `kid`).
    pub key_id: String,
    /// 10-character team id (the JWT `iss`).
    pub team_id: String,
    /// PKCS#8 PEM of the P-256 private key, as in Apple's `AuthKey_<key_id>.p8`.
    pub p8_pem: String,
}

/// Settings of the fake APNs server.
#[derive(Clone, Debug)]
pub struct ApnsOptions {
    /// 0 picks a free port.
    pub port: u16,
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS announced to clients (real APNs: 1000 lately).
    pub max_concurrent_streams: u32,
    /// A JWT whose `iat` is older than this gets 403 ExpiredProviderToken (Apple: 1 h).
    pub jwt_max_age: Duration,
    /// A new JWT sooner than this after the previous change on the same connection gets
    /// 429 TooManyProviderTokenUpdates (Apple: 20 min).
    pub jwt_min_update_interval: Duration,
    /// Delay before every answer.
    pub response_delay: Duration,
}

impl Default for ApnsOptions {
    fn default() -> Self {
        Self {
            port: 0,
            max_concurrent_streams: 1000,
            jwt_max_age: Duration::from_secs(3600),
            jwt_min_update_interval: Duration::from_secs(20 * 60),
            response_delay: Duration::ZERO,
        }
    }
}

struct TrustedKey {
    team_id: String,
    /// Uncompressed P-256 point.
    public_key: Vec<u8>,
}

/// Provider-token state of one connection.
#[derive(Default)]
pub(crate) struct ConnAuth {
    team_id: Option<String>,
    current_jwt: Option<String>,
    /// Fake-clock ms of the last accepted change of JWT on this connection.
    last_change_ms: i64,
}

pub(crate) struct ApnsState {
    clock: FakeClock,
    ca: Arc<TestCa>,
    keys: Mutex<HashMap<String, TrustedKey>>,
    client_certs: Mutex<HashMap<Vec<u8>, String>>,
    tokens: Mutex<HashMap<String, ApnsTokenState>>,
    scripts: ScriptBook,
    journal: Journal,
    accepted: AtomicU64,
    requests: AtomicU64,
    seen_jwts: Mutex<HashSet<String>>,
    jwt_max_age_ms: AtomicU64,
    jwt_min_update_ms: AtomicU64,
    delay_ms: AtomicU64,
}

/// Handle to a running fake APNs server. Clones share the server; it stops when the
/// last clone is dropped.
#[derive(Clone)]
pub struct FakeApns {
    state: Arc<ApnsState>,
    server: Arc<ServerHandle>,
}

impl FakeApns {
    /// Starts the fake on 127.0.0.1 with a certificate from `ca`.
    pub(crate) async fn start(
        ca: Arc<TestCa>,
        clock: FakeClock,
        journal: (bool, usize),
        options: ApnsOptions,
    ) -> Result<Self> {
        let state = Arc::new(ApnsState {
            clock,
            ca: ca.clone(),
            keys: Mutex::default(),
            client_certs: Mutex::default(),
            tokens: Mutex::default(),
            scripts: ScriptBook::default(),
            journal: Journal::new(journal.0, journal.1),
            accepted: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            seen_jwts: Mutex::default(),
            jwt_max_age_ms: AtomicU64::new(options.jwt_max_age.as_millis() as u64),
            jwt_min_update_ms: AtomicU64::new(options.jwt_min_update_interval.as_millis() as u64),
            delay_ms: AtomicU64::new(options.response_delay.as_millis() as u64),
        });
        let router = Router::new()
            .route("/_fake/stats", get(stats))
            .route("/_fake/token-state", post(control_token_state))
            .route("/_fake/script", post(control_script))
            .route("/_fake/delay", post(control_delay))
            .fallback(handle)
            .with_state(state.clone());
        // APNs speaks HTTP/2 only; h2 via ALPN, or prior knowledge when a client skips ALPN.
        let tls = ca.server_config(&[b"h2"], true)?;
        let listener = server::bind(options.port).await?;
        let server = server::spawn(
            listener,
            tls,
            router,
            ConnSettings {
                http2_only: true,
                max_concurrent_streams: options.max_concurrent_streams,
            },
        )?;
        Ok(Self {
            state,
            server: Arc::new(server),
        })
    }

    /// `https://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        self.server.url()
    }

    pub fn port(&self) -> u16 {
        self.server.addr().port()
    }

    /// Creates a P-256 signing key the fake trusts for `team_id`, with a fresh key id.
    pub fn create_token_key(&self, team_id: &str) -> ApnsTokenKey {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("P-256 key generation");
        let key_id = random_id(10);
        self.trust_key(&key_id, team_id, key.public_key_raw());
        ApnsTokenKey {
            key_id,
            team_id: team_id.to_string(),
            p8_pem: key.serialize_pem(),
        }
    }

    /// Trusts a key made elsewhere: `public_key` is the uncompressed P-256 point (65 bytes).
    pub fn trust_key(&self, key_id: &str, team_id: &str, public_key: &[u8]) {
        self.state.keys.lock().unwrap().insert(
            key_id.to_string(),
            TrustedKey {
                team_id: team_id.to_string(),
                public_key: public_key.to_vec(),
            },
        );
    }

    /// Revokes a key: its JWTs get 403 InvalidProviderToken from now on.
    pub fn revoke_key(&self, key_id: &str) {
        self.state.keys.lock().unwrap().remove(key_id);
    }

    /// Issues a TLS client certificate for `bundle` (certificate auth), signed by the test
    /// CA: returns `(cert_pem, key_pem)`. Requests on a connection presenting it need no
    /// JWT, and a missing `apns-topic` defaults to the bundle.
    pub fn issue_client_certificate(&self, bundle: &str) -> (String, String) {
        let cert = self
            .state
            .ca
            .issue_client_cert(&format!("Apple VoIP Services: {bundle}"), bundle)
            .expect("issuing client certificate");
        self.state
            .client_certs
            .lock()
            .unwrap()
            .insert(cert.cert_der.clone(), bundle.to_string());
        (cert.cert_pem, cert.key_pem)
    }

    pub fn set_token_state(&self, token: &str, state: ApnsTokenState) {
        self.state
            .tokens
            .lock()
            .unwrap()
            .insert(token.to_string(), state);
    }

    pub fn token_state(&self, token: &str) -> ApnsTokenState {
        self.state
            .tokens
            .lock()
            .unwrap()
            .get(token)
            .cloned()
            .unwrap_or_default()
    }

    /// Queues a scripted outcome for `token`, used before its registry state.
    pub fn script(&self, token: &str, outcome: Scripted) {
        self.state.scripts.push(token, outcome);
    }

    /// Queues a scripted outcome for any token without a script of its own.
    pub fn script_all(&self, outcome: Scripted) {
        self.state.scripts.push_global(outcome);
    }

    pub fn clear_scripts(&self) {
        self.state.scripts.clear();
    }

    /// Delay before every answer (benchmarks: a realistic provider latency).
    pub fn set_response_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn set_jwt_max_age(&self, age: Duration) {
        self.state
            .jwt_max_age_ms
            .store(age.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn set_jwt_min_update_interval(&self, interval: Duration) {
        self.state
            .jwt_min_update_ms
            .store(interval.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn clock(&self) -> &FakeClock {
        &self.state.clock
    }

    /// Pushes answered 200 so far (always counted, even with the journal off).
    pub fn accepted_count(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }

    /// Requests received so far, whatever their answer (always counted).
    pub fn request_count(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// Distinct valid JWTs seen so far: shows whether clients reuse provider tokens.
    pub fn distinct_jwt_count(&self) -> usize {
        self.state.seen_jwts.lock().unwrap().len()
    }

    /// What this fake received.
    pub fn journal(&self) -> &Journal {
        &self.state.journal
    }
}

async fn stats(State(st): State<Arc<ApnsState>>) -> Json<serde_json::Value> {
    Json(json!({
        "accepted": st.accepted.load(Ordering::Relaxed),
        "requests": st.requests.load(Ordering::Relaxed),
        "distinct_jwts": st.seen_jwts.lock().unwrap().len(),
    }))
}

#[derive(serde::Deserialize)]
struct TokenStateSpec {
    token: String,
    /// `ok`, `unregistered`, `expired`, `bad`, `wrong_topic` or `throttled`.
    state: String,
    /// For `unregistered`; defaults to now.
    timestamp_ms: Option<i64>,
}

async fn control_token_state(
    State(st): State<Arc<ApnsState>>,
    Json(spec): Json<TokenStateSpec>,
) -> Response {
    let state = match spec.state.as_str() {
        "ok" => ApnsTokenState::Ok,
        "unregistered" => ApnsTokenState::Unregistered {
            timestamp_ms: spec.timestamp_ms.unwrap_or_else(|| st.clock.now_ms()),
        },
        "expired" => ApnsTokenState::Expired,
        "bad" => ApnsTokenState::Bad,
        "wrong_topic" => ApnsTokenState::WrongTopic,
        "throttled" => ApnsTokenState::Throttled,
        other => return control_error(format!("unknown state {other:?}")),
    };
    st.tokens.lock().unwrap().insert(spec.token, state);
    StatusCode::NO_CONTENT.into_response()
}

async fn control_script(
    State(st): State<Arc<ApnsState>>,
    Json(spec): Json<ScriptSpec>,
) -> Response {
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

async fn control_delay(
    State(st): State<Arc<ApnsState>>,
    Json(spec): Json<DelaySpec>,
) -> StatusCode {
    st.delay_ms.store(spec.ms, Ordering::Relaxed);
    StatusCode::NO_CONTENT
}

pub(crate) fn control_error(message: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": message}))).into_response()
}

/// An answer decided for a request.
struct Outcome {
    status: u16,
    reason: Option<String>,
    timestamp_ms: Option<i64>,
    retry_after: Option<String>,
    delay: Duration,
    action: ScriptAction,
}

impl Outcome {
    fn error(status: u16, reason: &str) -> Self {
        Self {
            status,
            reason: Some(reason.to_string()),
            ..Self::ok()
        }
    }

    fn ok() -> Self {
        Self {
            status: 200,
            reason: None,
            timestamp_ms: None,
            retry_after: None,
            delay: Duration::ZERO,
            action: ScriptAction::Respond,
        }
    }
}

async fn handle(
    State(st): State<Arc<ApnsState>>,
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
    let (body, body_too_big) = match axum::body::to_bytes(body, 1 << 20).await {
        Ok(b) => (b, false),
        Err(_) => (Bytes::new(), true),
    };

    let mut ctx = Ctx {
        auth: AuthKind::None,
        token: None,
        apns_id: None,
    };
    let outcome = decide(&st, &conn, &parts, &body, body_too_big, &mut ctx);
    let apns_id = ctx
        .apns_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let delivered = outcome.status == 200 && outcome.action != ScriptAction::DropConnection;
    if delivered {
        st.accepted.fetch_add(1, Ordering::Relaxed);
    }

    if st.journal.enabled() {
        let mut entry = journal::entry(
            &parts,
            &body,
            &conn,
            stream_order,
            received_at,
            received_instant,
        );
        entry.auth = ctx.auth.clone();
        entry.token = ctx.token.clone();
        if outcome.action != ScriptAction::DropConnection {
            entry.status = Some(outcome.status);
            entry.reason = outcome.reason.clone();
        }
        entry.delivered = delivered;
        st.journal.record(entry);
    }

    if !outcome.delay.is_zero() {
        tokio::time::sleep(outcome.delay).await;
    }
    match outcome.action {
        ScriptAction::DropConnection => {
            conn.drop_connection();
            // HTTP/2 streams run as their own tasks: keep this one from answering until
            // the connection is gone, then let it end.
            tokio::time::sleep(Duration::from_secs(10)).await;
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
        ScriptAction::GoAway => conn.goaway(),
        ScriptAction::Respond => {}
    }
    respond(&outcome, &apns_id)
}

fn respond(outcome: &Outcome, apns_id: &str) -> Response {
    let status = StatusCode::from_u16(outcome.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut builder = Response::builder().status(status);
    if let Ok(v) = HeaderValue::from_str(apns_id) {
        builder = builder.header("apns-id", v);
    }
    if let Some(ra) = outcome.retry_after.as_deref() {
        builder = builder.header("retry-after", ra);
    }
    let body = match &outcome.reason {
        Some(reason) if outcome.status != 200 => {
            builder = builder.header("content-type", "application/json");
            let v = match outcome.timestamp_ms {
                Some(ts) => json!({"reason": reason, "timestamp": ts}),
                None => json!({"reason": reason}),
            };
            Body::from(v.to_string())
        }
        _ => Body::empty(),
    };
    builder
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

struct Ctx {
    auth: AuthKind,
    token: Option<String>,
    apns_id: Option<String>,
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn decide(
    st: &ApnsState,
    conn: &ConnInfo,
    parts: &axum::http::request::Parts,
    body: &Bytes,
    body_too_big: bool,
    ctx: &mut Ctx,
) -> Outcome {
    let h = &parts.headers;

    // apns-id first: even an otherwise broken request echoes a valid one.
    if let Some(raw) = h.get("apns-id") {
        match raw.to_str().ok().filter(|s| is_canonical_uuid(s)) {
            Some(id) => ctx.apns_id = Some(id.to_string()),
            None => return Outcome::error(400, "BadMessageId"),
        }
    }
    for name in [
        "apns-id",
        "apns-topic",
        "apns-push-type",
        "apns-priority",
        "apns-expiration",
        "apns-collapse-id",
        "authorization",
    ] {
        if h.get_all(name).iter().count() > 1 {
            return Outcome::error(400, "DuplicateHeaders");
        }
    }
    if parts.method != Method::POST {
        return Outcome::error(405, "MethodNotAllowed");
    }

    // Some(None): a certificate the CA signed but this fake did not issue (no known bundle).
    let cert_bundle = conn.peer_cert.as_ref().map(|der| {
        let bundle = st.client_certs.lock().unwrap().get(der).cloned();
        ctx.auth = AuthKind::ApnsCertificate {
            bundle: bundle.clone(),
        };
        bundle
    });
    let push_type = header(h, "apns-push-type");
    let topic: Option<String> = match header(h, "apns-topic") {
        Some(t) if !t.is_empty() => Some(t.to_string()),
        _ => match &cert_bundle {
            Some(Some(bundle)) if push_type == Some("voip") => Some(format!("{bundle}.voip")),
            Some(Some(bundle)) => Some(bundle.clone()),
            _ => None,
        },
    };
    if topic.is_none() {
        return Outcome::error(400, "MissingTopic");
    }
    let topic = topic.unwrap_or_default();

    if h.get("apns-collapse-id").is_some_and(|v| v.len() > 64) {
        return Outcome::error(400, "BadCollapseId");
    }
    if let Some(p) = h.get("apns-priority") {
        if !matches!(p.to_str(), Ok("10" | "5" | "1")) {
            return Outcome::error(400, "BadPriority");
        }
    }
    if let Some(pt) = h.get("apns-push-type") {
        if !pt.to_str().is_ok_and(|pt| PUSH_TYPES.contains(&pt)) {
            return Outcome::error(400, "InvalidPushType");
        }
    }
    if let Some(exp) = h.get("apns-expiration") {
        let ok = exp
            .to_str()
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u64>().ok())
            .is_some();
        if !ok {
            return Outcome::error(400, "BadExpirationDate");
        }
    }

    let Some(token) = parts.uri.path().strip_prefix("/3/device/") else {
        return if parts.uri.path() == "/3/device" {
            Outcome::error(400, "MissingDeviceToken")
        } else {
            Outcome::error(404, "BadPath")
        };
    };
    if token.is_empty() {
        return Outcome::error(400, "MissingDeviceToken");
    }
    ctx.token = Some(token.to_string());
    if token.len() > MAX_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Outcome::error(400, "BadDeviceToken");
    }
    if let Some(suffix) = push_type.and_then(required_topic_suffix) {
        if !topic.ends_with(suffix) {
            return Outcome::error(400, "DeviceTokenNotForTopic");
        }
    }

    match &cert_bundle {
        Some(bundle) => {
            if let Some(bundle) = bundle {
                let allowed = topic == *bundle || topic.starts_with(&format!("{bundle}."));
                if !allowed {
                    return Outcome::error(400, "TopicDisallowed");
                }
            }
        }
        None => {
            if let Err(reject) = check_provider_token(st, conn, h, ctx) {
                return reject;
            }
        }
    }

    if body_too_big {
        return Outcome::error(413, "PayloadTooLarge");
    }
    if body.is_empty() {
        return Outcome::error(400, "PayloadEmpty");
    }
    let limit = if push_type == Some("voip") {
        MAX_VOIP_PAYLOAD
    } else {
        MAX_PAYLOAD
    };
    if body.len() > limit {
        return Outcome::error(413, "PayloadTooLarge");
    }
    if !serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| v.is_object()) {
        return Outcome::error(400, "BadPayload");
    }

    let mut base = Outcome::ok();
    if let Some(script) = st.scripts.take(Some(token)) {
        base.delay = script.delay;
        base.action = script.action;
        base.retry_after = script.retry_after.clone();
        if let Some(status) = script.status {
            base.status = status;
            base.reason = Some(
                script
                    .reason
                    .clone()
                    .unwrap_or_else(|| default_reason(status).to_string()),
            );
            if status == 410 {
                base.timestamp_ms = Some(st.clock.now_ms());
            }
            if status == 200 {
                base.reason = None;
            }
            return base;
        }
    }
    let state = st.tokens.lock().unwrap().get(token).cloned();
    let (status, reason, ts) = match state.unwrap_or_default() {
        ApnsTokenState::Ok => return base,
        ApnsTokenState::Unregistered { timestamp_ms } => (410, "Unregistered", Some(timestamp_ms)),
        ApnsTokenState::Expired => (410, "ExpiredToken", None),
        ApnsTokenState::Bad => (400, "BadDeviceToken", None),
        ApnsTokenState::WrongTopic => (400, "DeviceTokenNotForTopic", None),
        ApnsTokenState::Throttled => (429, "TooManyRequests", None),
    };
    base.status = status;
    base.reason = Some(reason.to_string());
    base.timestamp_ms = ts;
    base
}

fn required_topic_suffix(push_type: &str) -> Option<&'static str> {
    match push_type {
        "voip" => Some(".voip"),
        "complication" => Some(".complication"),
        "fileprovider" => Some(".pushkit.fileprovider"),
        "location" => Some(".location-query"),
        "liveactivity" => Some(".push-type.liveactivity"),
        "pushtotalk" => Some(".voip-ptt"),
        _ => None,
    }
}

fn default_reason(status: u16) -> &'static str {
    match status {
        400 => "BadDeviceToken",
        403 => "Forbidden",
        404 => "BadPath",
        405 => "MethodNotAllowed",
        410 => "Unregistered",
        413 => "PayloadTooLarge",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        _ => "InternalServerError",
    }
}

fn is_canonical_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

fn check_provider_token(
    st: &ApnsState,
    conn: &ConnInfo,
    h: &HeaderMap,
    ctx: &mut Ctx,
) -> Result<(), Outcome> {
    let invalid = || Outcome::error(403, "InvalidProviderToken");
    let jwt = header(h, "authorization")
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Outcome::error(403, "MissingProviderToken"))?;

    let parsed = parse_jwt(jwt).ok_or_else(invalid)?;
    if parsed.header.get("alg").and_then(|v| v.as_str()) != Some("ES256") {
        return Err(invalid());
    }
    let kid = parsed
        .header
        .get("kid")
        .and_then(|v| v.as_str())
        .ok_or_else(invalid)?;
    let iss = parsed
        .claims
        .get("iss")
        .and_then(|v| v.as_str())
        .ok_or_else(invalid)?;
    let iat = parsed
        .claims
        .get("iat")
        .and_then(|v| v.as_i64())
        .ok_or_else(invalid)?;
    ctx.auth = AuthKind::ApnsJwt {
        key_id: kid.to_string(),
        team_id: iss.to_string(),
    };

    let mut auth = conn.apns_auth.lock().unwrap();
    let already_verified = auth.current_jwt.as_deref() == Some(jwt);
    if !already_verified {
        let keys = st.keys.lock().unwrap();
        let key = keys.get(kid).ok_or_else(invalid)?;
        if key.team_id != iss {
            return Err(invalid());
        }
        let verifier = ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            &key.public_key,
        );
        verifier
            .verify(parsed.signing_input.as_bytes(), &parsed.signature)
            .map_err(|_| invalid())?;
        st.seen_jwts.lock().unwrap().insert(jwt.to_string());
    } else if !st.keys.lock().unwrap().contains_key(kid) {
        return Err(invalid());
    }

    // Apple binds a connection to the team of its first push (pushy's mock says
    // InvalidProviderToken; Apple documents UnrelatedKeyIdInToken).
    if auth.team_id.as_deref().is_some_and(|t| t != iss) {
        return Err(invalid());
    }
    let now_ms = st.clock.now_ms();
    let max_age = st.jwt_max_age_ms.load(Ordering::Relaxed) as i64;
    if now_ms - iat.saturating_mul(1000) > max_age {
        return Err(Outcome::error(403, "ExpiredProviderToken"));
    }
    if !already_verified {
        if auth.current_jwt.is_some() {
            let min_gap = st.jwt_min_update_ms.load(Ordering::Relaxed) as i64;
            if now_ms - auth.last_change_ms < min_gap {
                return Err(Outcome::error(429, "TooManyProviderTokenUpdates"));
            }
        }
        auth.current_jwt = Some(jwt.to_string());
        auth.last_change_ms = now_ms;
        auth.team_id = Some(iss.to_string());
    }
    Ok(())
}

pub(crate) struct ParsedJwt {
    pub(crate) header: serde_json::Value,
    pub(crate) claims: serde_json::Value,
    pub(crate) signing_input: String,
    pub(crate) signature: Vec<u8>,
}

/// Splits and decodes a compact JWS without checking its signature.
pub(crate) fn parse_jwt(jwt: &str) -> Option<ParsedJwt> {
    let mut it = jwt.split('.');
    let (h, c, s) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() {
        return None;
    }
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let decode = |part: &str| b64.decode(part.trim_end_matches('=')).ok();
    let header: serde_json::Value = serde_json::from_slice(&decode(h)?).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&decode(c)?).ok()?;
    if !header.is_object() || !claims.is_object() {
        return None;
    }
    Some(ParsedJwt {
        header,
        claims,
        signing_input: format!("{h}.{c}"),
        signature: decode(s)?,
    })
}

/// Apple-style identifier: uppercase letters and digits.
pub(crate) fn random_id(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut bytes = vec![0u8; len];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("system randomness");
    bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}
