//! A fake WebPush / UnifiedPush push service: `POST /push/{id}` as autopush (201), ntfy (200 +
//! JSON), NextPush (200 `{"success":true}`, 401 for an unknown token) or the UnifiedPush-over-XMPP
//! gateway (202) answer it, over TLS with HTTP/2 or HTTP/1.1.
//!
//! The fake holds each subscription's private key: it decrypts what it receives (RFC 8291,
//! `aes128gcm`) and verifies the VAPID token (RFC 8292), so tests see the plaintext the device
//! would see and whether the application server's signature holds, not merely that bytes came.
//! Its checks: `TTL` present (400 otherwise), body of 1–4096 bytes (413), a decryptable body
//! when `Content-Encoding: aes128gcm` (400), a valid VAPID token when one is sent or the
//! subscription is bound to a key (401), then the subscription's state.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use bytes::Bytes;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::script::{ScriptBook, Scripted};
use crate::server::{self, ConnInfo, ConnSettings, ServerHandle};
use crate::tls::TestCa;

/// Which push service the fake answers as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebPushMode {
    /// RFC 8030 / Mozilla autopush: 201 + `Location` + `TTL`; 404 unknown, 410 gone.
    Autopush,
    /// ntfy: 200 with the message as JSON; 404 unknown.
    Ntfy,
    /// NextPush: 200 `{"success":true}`; 401 `{"success":false}` for an unknown or gone token.
    NextPush,
    /// The UnifiedPush-over-XMPP gateway: 202 with the content JSON-quoted; 404 unknown.
    XmppGateway,
}

#[derive(Clone, Debug)]
pub struct WebPushOptions {
    pub port: u16,
    pub mode: WebPushMode,
    /// Offer only HTTP/1.1 in ALPN, like many small push services.
    pub http1_only: bool,
}

impl Default for WebPushOptions {
    fn default() -> Self {
        WebPushOptions {
            port: 0,
            mode: WebPushMode::Autopush,
            http1_only: false,
        }
    }
}

/// A subscription as a device would hand it to an application server.
#[derive(Clone, Debug, Serialize)]
pub struct WebPushSubscription {
    pub id: String,
    pub endpoint: String,
    /// The device's public key, base64url (uncompressed P-256).
    pub p256dh: String,
    /// The authentication secret, base64url (16 bytes).
    pub auth: String,
}

/// What the VAPID `Authorization` said, and whether it held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VapidSeen {
    /// `k=`, base64url.
    pub key: String,
    pub aud: String,
    pub sub: String,
    pub exp: u64,
    /// The ES256 signature verifies with `key`, `aud` is this service's origin, and `exp` is
    /// in the future and at most 24 hours away.
    pub valid: bool,
}

/// One request as the push service received it.
#[derive(Clone, Debug)]
pub struct WebPushRequest {
    pub subscription: String,
    /// Which TCP connection carried it; ids are unique across all fakes.
    pub connection_id: u64,
    /// `HTTP/2.0` or `HTTP/1.1`.
    pub version: String,
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
    /// What the device would get: the decrypted message, or the body as sent without
    /// `Content-Encoding`.
    pub plaintext: Option<Bytes>,
    /// Why decryption failed, when it did.
    pub decrypt_error: Option<String>,
    pub vapid: Option<VapidSeen>,
    pub status: u16,
}

impl WebPushRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The plaintext as JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(self.plaintext.as_ref()?).ok()
    }
}

struct Subscription {
    secret: p256::SecretKey,
    public: [u8; 65],
    auth: [u8; 16],
    /// Unsubscribed: 410 (autopush), 401 (NextPush), 404 (the others).
    gone: bool,
    /// The VAPID key the subscription was made for; pushes signed by another key are refused.
    vapid_key: Option<String>,
}

struct WebPushState {
    origin: Mutex<String>,
    mode: Mutex<WebPushMode>,
    subscriptions: Mutex<HashMap<String, Subscription>>,
    scripts: ScriptBook,
    journal: Mutex<Vec<WebPushRequest>>,
    recorded: watch::Sender<u64>,
    accepted: AtomicU64,
    requests: AtomicU64,
    next_id: AtomicU64,
}

/// Handle to a running fake push service. Clones share the server.
#[derive(Clone)]
pub struct FakeWebPush {
    state: Arc<WebPushState>,
    server: Arc<ServerHandle>,
}

impl FakeWebPush {
    pub async fn start(ca: Arc<TestCa>, options: WebPushOptions) -> Result<FakeWebPush> {
        let state = Arc::new(WebPushState {
            origin: Mutex::new(String::new()),
            mode: Mutex::new(options.mode),
            subscriptions: Mutex::default(),
            scripts: ScriptBook::default(),
            journal: Mutex::default(),
            recorded: watch::Sender::new(0),
            accepted: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
        });
        let router = Router::new()
            .route("/push/{id}", post(push).get(discovery))
            .route("/_fake/stats", get(stats))
            .route("/_fake/subscribe", post(control_subscribe))
            .route("/_fake/mode", post(control_mode))
            .with_state(state.clone());
        let alpn: &[&[u8]] = if options.http1_only {
            &[b"http/1.1"]
        } else {
            &[b"h2", b"http/1.1"]
        };
        let tls = ca.server_config(alpn, false)?;
        let listener = server::bind(options.port).await?;
        let server = server::spawn(
            listener,
            tls,
            router,
            ConnSettings {
                http2_only: false,
                max_concurrent_streams: 100,
            },
        )?;
        *state.origin.lock().unwrap() = server.url();
        Ok(FakeWebPush {
            state,
            server: Arc::new(server),
        })
    }

    /// `https://127.0.0.1:<port>`: the origin VAPID tokens must name.
    pub fn url(&self) -> String {
        self.server.url()
    }

    pub fn set_mode(&self, mode: WebPushMode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    /// A new subscription with fresh keys, as a browser or distributor creates one.
    pub fn subscribe(&self) -> WebPushSubscription {
        self.state.subscribe(None)
    }

    /// A subscription that accepts only pushes signed with this VAPID public key (base64url).
    pub fn subscribe_for_key(&self, vapid_key: &str) -> WebPushSubscription {
        self.state.subscribe(Some(vapid_key.to_string()))
    }

    /// The subscription ends: later pushes get the mode's "gone" answer.
    pub fn unsubscribe(&self, id: &str) {
        if let Some(s) = self.state.subscriptions.lock().unwrap().get_mut(id) {
            s.gone = true;
        }
    }

    /// Scripted answers for one subscription (status, `Retry-After`, delay, times).
    pub fn script(&self, id: &str, outcome: Scripted) {
        self.state.scripts.push(id, outcome);
    }

    pub fn requests(&self) -> Vec<WebPushRequest> {
        self.state.journal.lock().unwrap().clone()
    }

    pub fn requests_for(&self, id: &str) -> Vec<WebPushRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.subscription == id)
            .collect()
    }

    pub fn request_count(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    pub fn accepted_count(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }

    /// Waits until `n` requests were recorded, then returns them.
    pub async fn wait_for_requests(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<WebPushRequest>> {
        let mut rx = self.state.recorded.subscribe();
        let reached = tokio::time::timeout(timeout, rx.wait_for(|count| *count >= n as u64))
            .await
            .is_ok_and(|r| r.is_ok());
        if reached {
            return Ok(self.requests());
        }
        anyhow::bail!(
            "only {} of {n} WebPush requests arrived within {timeout:?}",
            *self.state.recorded.borrow()
        )
    }
}

impl WebPushState {
    fn subscribe(&self, vapid_key: Option<String>) -> WebPushSubscription {
        let rng = SystemRandom::new();
        let mut id_bytes = [0u8; 20];
        let mut auth = [0u8; 16];
        rng.fill(&mut id_bytes).expect("randomness");
        rng.fill(&mut auth).expect("randomness");
        let id = URL_SAFE_NO_PAD.encode(id_bytes);
        let secret = loop {
            let mut scalar = [0u8; 32];
            rng.fill(&mut scalar).expect("randomness");
            // Zero or above the group order: draw again (about never).
            if let Ok(secret) = p256::SecretKey::from_slice(&scalar) {
                break secret;
            }
        };
        let public: [u8; 65] = secret
            .public_key()
            .to_encoded_point(false)
            .as_bytes()
            .try_into()
            .expect("an uncompressed point");
        let subscription = WebPushSubscription {
            endpoint: format!("{}/push/{id}", self.origin.lock().unwrap()),
            p256dh: URL_SAFE_NO_PAD.encode(public),
            auth: URL_SAFE_NO_PAD.encode(auth),
            id: id.clone(),
        };
        self.subscriptions.lock().unwrap().insert(
            id,
            Subscription {
                secret,
                public,
                auth,
                gone: false,
                vapid_key,
            },
        );
        subscription
    }

    fn record(&self, request: WebPushRequest) {
        self.journal.lock().unwrap().push(request);
        self.recorded.send_modify(|n| *n += 1);
    }
}

/// `GET /push/{id}`: UnifiedPush discovery.
async fn discovery() -> Json<Value> {
    Json(json!({"unifiedpush": {"version": 1}}))
}

async fn stats(State(st): State<Arc<WebPushState>>) -> Json<Value> {
    Json(json!({
        "accepted": st.accepted.load(Ordering::Relaxed),
        "requests": st.requests.load(Ordering::Relaxed),
    }))
}

#[derive(serde::Deserialize, Default)]
struct SubscribeSpec {
    vapid_key: Option<String>,
}

/// `POST /_fake/subscribe` (`{"vapid_key"?}`): a new subscription, as JSON.
async fn control_subscribe(
    State(st): State<Arc<WebPushState>>,
    body: Bytes,
) -> Json<WebPushSubscription> {
    let spec: SubscribeSpec = serde_json::from_slice(&body).unwrap_or_default();
    Json(st.subscribe(spec.vapid_key))
}

#[derive(serde::Deserialize)]
struct ModeSpec {
    mode: WebPushMode,
}

/// `POST /_fake/mode` (`{"mode": "autopush"|"ntfy"|"next_push"|"xmpp_gateway"}`).
async fn control_mode(
    State(st): State<Arc<WebPushState>>,
    Json(spec): Json<ModeSpec>,
) -> StatusCode {
    *st.mode.lock().unwrap() = spec.mode;
    StatusCode::NO_CONTENT
}

async fn push(
    State(st): State<Arc<WebPushState>>,
    Extension(conn): Extension<Arc<ConnInfo>>,
    Path(id): Path<String>,
    version: axum::http::Version,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    st.requests.fetch_add(1, Ordering::Relaxed);
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let mode = *st.mode.lock().unwrap();
    let origin = st.origin.lock().unwrap().clone();
    let vapid = header("authorization").map(|value| check_vapid(value, &origin));

    let (plaintext, decrypt_error, known) = {
        let subscriptions = st.subscriptions.lock().unwrap();
        match subscriptions.get(&id) {
            None => (None, None, None),
            Some(sub) => {
                let (plaintext, error) = match header("content-encoding") {
                    Some("aes128gcm") => match decrypt(sub, &body) {
                        Ok(plain) => (Some(Bytes::from(plain)), None),
                        Err(e) => (None, Some(e)),
                    },
                    Some(other) => (None, Some(format!("unsupported Content-Encoding {other}"))),
                    None => (Some(body.clone()), None),
                };
                (plaintext, error, Some((sub.gone, sub.vapid_key.clone())))
            }
        }
    };

    let scripted = st.scripts.take(Some(&id));
    if let Some(delay) = scripted.as_ref().map(|s| s.delay) {
        tokio::time::sleep(delay).await;
    }
    let mut response = match (&scripted, known) {
        (Some(script), _) if script.status.is_some() => {
            let status = script.status.expect("checked");
            let mut r = (
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                Json(json!({"code": status, "error": script.reason.clone().unwrap_or_default()})),
            )
                .into_response();
            if let Some(after) = &script.retry_after {
                r.headers_mut()
                    .insert("retry-after", after.parse().expect("header value"));
            }
            if (300..400).contains(&status) {
                r.headers_mut().insert(
                    "location",
                    format!("{origin}/push/{id}-moved")
                        .parse()
                        .expect("header value"),
                );
            }
            r
        }
        (_, None) => gone_or_unknown(mode, false),
        (_, Some(_)) if header("ttl").and_then(|t| t.parse::<u64>().ok()).is_none() => (
            StatusCode::BAD_REQUEST,
            Json(json!({"code": 400, "errno": 111, "error": "Bad Request", "message": "Missing TTL header"})),
        )
            .into_response(),
        (_, Some(_)) if body.is_empty() || body.len() > 4096 => (
            StatusCode::PAYLOAD_TOO_LARGE,
            Json(json!({"code": 413, "errno": 104, "error": "Payload Too Large"})),
        )
            .into_response(),
        (_, Some(_)) if decrypt_error.is_some() => (
            StatusCode::BAD_REQUEST,
            Json(json!({"code": 400, "errno": 110, "error": "Bad Request", "message": decrypt_error})),
        )
            .into_response(),
        (_, Some((_, bound_key)))
            if vapid.as_ref().is_some_and(|v| !v.valid)
                || bound_key
                    .as_ref()
                    .is_some_and(|key| vapid.as_ref().map(|v| &v.key) != Some(key)) =>
        {
            (
                StatusCode::UNAUTHORIZED,
                Json(json!({"code": 401, "errno": 109, "error": "Unauthorized"})),
            )
                .into_response()
        }
        (_, Some((true, _))) => gone_or_unknown(mode, true),
        (_, Some(_)) => accepted(&st, mode, &origin, &headers, plaintext.as_deref()),
    };
    let status = response.status().as_u16();
    if (200..300).contains(&status) {
        st.accepted.fetch_add(1, Ordering::Relaxed);
    }
    st.record(WebPushRequest {
        subscription: id,
        connection_id: conn.id,
        version: format!("{version:?}"),
        headers: headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body_len: body.len(),
        plaintext,
        decrypt_error,
        vapid,
        status,
    });
    response
        .headers_mut()
        .remove(axum::http::header::CONNECTION);
    response
}

fn gone_or_unknown(mode: WebPushMode, gone: bool) -> Response {
    match mode {
        WebPushMode::NextPush => {
            (StatusCode::UNAUTHORIZED, Json(json!({"success": false}))).into_response()
        }
        WebPushMode::Autopush if gone => (
            StatusCode::GONE,
            Json(json!({"code": 410, "errno": 106, "error": "Gone"})),
        )
            .into_response(),
        _ => (
            StatusCode::NOT_FOUND,
            Json(json!({"code": 404, "errno": 102, "error": "Not Found"})),
        )
            .into_response(),
    }
}

fn accepted(
    st: &WebPushState,
    mode: WebPushMode,
    origin: &str,
    headers: &HeaderMap,
    plaintext: Option<&[u8]>,
) -> Response {
    let n = st.next_id.fetch_add(1, Ordering::Relaxed);
    match mode {
        WebPushMode::Autopush => {
            let ttl = headers
                .get("ttl")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("0")
                .to_string();
            let mut r = StatusCode::CREATED.into_response();
            r.headers_mut().insert(
                "location",
                format!("{origin}/m/{n}").parse().expect("header value"),
            );
            r.headers_mut()
                .insert("ttl", ttl.parse().expect("header value"));
            r
        }
        WebPushMode::Ntfy => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            Json(json!({"id": format!("ntfy{n}"), "time": now, "event": "message", "topic": "upfake"}))
                .into_response()
        }
        WebPushMode::NextPush => Json(json!({"success": true})).into_response(),
        WebPushMode::XmppGateway => {
            let content = plaintext
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .unwrap_or_default();
            (StatusCode::ACCEPTED, Json(Value::String(content))).into_response()
        }
    }
}

/// Checks `vapid t=<jwt>, k=<key>` for this service's origin.
fn check_vapid(value: &str, origin: &str) -> VapidSeen {
    let mut seen = VapidSeen {
        key: String::new(),
        aud: String::new(),
        sub: String::new(),
        exp: 0,
        valid: false,
    };
    let Some(params) = value.strip_prefix("vapid ") else {
        return seen;
    };
    let mut token = None;
    for part in params.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => token = Some(t.to_string()),
            Some(("k", k)) => seen.key = k.to_string(),
            _ => {}
        }
    }
    let Some(token) = token else { return seen };
    let Some((input, signature)) = token.rsplit_once('.') else {
        return seen;
    };
    let decode = |text: &str| {
        URL_SAFE_NO_PAD
            .decode(text)
            .or_else(|_| URL_SAFE.decode(text))
            .ok()
    };
    let claims: Option<Value> = input
        .split('.')
        .nth(1)
        .and_then(decode)
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    let header: Option<Value> = input
        .split('.')
        .next()
        .and_then(decode)
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    let Some(claims) = claims else { return seen };
    seen.aud = claims["aud"].as_str().unwrap_or_default().to_string();
    seen.sub = claims["sub"].as_str().unwrap_or_default().to_string();
    seen.exp = claims["exp"].as_u64().unwrap_or_default();
    let verified = match (decode(&seen.key), decode(signature)) {
        (Some(key), Some(signature)) => UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, key)
            .verify(input.as_bytes(), &signature)
            .is_ok(),
        _ => false,
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    seen.valid = verified
        && header.is_some_and(|h| h["alg"] == "ES256")
        && seen.aud == origin
        && seen.exp > now
        && seen.exp <= now + 24 * 3600
        && (seen.sub.starts_with("mailto:") || seen.sub.starts_with("https:"));
    seen
}

struct Length(usize);

impl hkdf::KeyType for Length {
    fn len(&self) -> usize {
        self.0
    }
}

fn hkdf_sha256(salt: &[u8], ikm: &[u8], info: &[&[u8]], out: &mut [u8]) -> Result<(), String> {
    hkdf::Salt::new(hkdf::HKDF_SHA256, salt)
        .extract(ikm)
        .expand(info, Length(out.len()))
        .and_then(|okm| okm.fill(out))
        .map_err(|_| "HKDF failed".to_string())
}

/// RFC 8291/8188 decryption with the subscription's private key.
fn decrypt(sub: &Subscription, body: &[u8]) -> Result<Vec<u8>, String> {
    if body.len() < 21 {
        return Err("shorter than an aes128gcm header".into());
    }
    let salt = &body[..16];
    let record_size = u32::from_be_bytes(body[16..20].try_into().expect("4 bytes")) as usize;
    let id_len = body[20] as usize;
    if id_len != 65 || body.len() < 21 + id_len + 17 {
        return Err(format!(
            "key id of {id_len} bytes, expected the 65-byte sender key"
        ));
    }
    let as_public = &body[21..21 + id_len];
    let ciphertext = &body[21 + id_len..];
    if ciphertext.len() > record_size {
        return Err("more than one record".into());
    }
    let sender =
        p256::PublicKey::from_sec1_bytes(as_public).map_err(|_| "sender key is not P-256")?;
    let shared = p256::ecdh::diffie_hellman(sub.secret.to_nonzero_scalar(), sender.as_affine());
    let mut ikm = [0u8; 32];
    hkdf_sha256(
        &sub.auth,
        shared.raw_secret_bytes(),
        &[b"WebPush: info\0", &sub.public, as_public],
        &mut ikm,
    )?;
    let mut cek = [0u8; 16];
    hkdf_sha256(salt, &ikm, &[b"Content-Encoding: aes128gcm\0"], &mut cek)?;
    let mut nonce = [0u8; 12];
    hkdf_sha256(salt, &ikm, &[b"Content-Encoding: nonce\0"], &mut nonce)?;
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &cek).map_err(|_| "bad key")?);
    let mut record = ciphertext.to_vec();
    let plain = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::empty(),
            &mut record,
        )
        .map_err(|_| "authentication failed: wrong key or corrupted record")?;
    // The last record ends with 0x02, then optional zero padding.
    let end = plain
        .iter()
        .rposition(|b| *b != 0)
        .ok_or("no padding delimiter")?;
    if plain[end] != 2 {
        return Err(format!(
            "padding delimiter {:#04x}, expected 0x02",
            plain[end]
        ));
    }
    Ok(plain[..end].to_vec())
}

/// A fresh VAPID key for an application server: the PKCS#8 PEM for `vapid_key_file` and the
/// public key (base64url) subscriptions are made for.
pub fn vapid_key() -> (String, String) {
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .expect("P-256 key generation");
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
        .expect("the generated key parses");
    let text = base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref());
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in text.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    (pem, URL_SAFE_NO_PAD.encode(pair.public_key().as_ref()))
}
