//! Fake Google OAuth2 token endpoint (`POST /token`, JWT-bearer grant).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde_json::json;

use crate::apns::{parse_jwt, random_id};
use crate::journal::{self, AuthKind, Journal};
use crate::script::FakeClock;
use crate::server::{self, ConnInfo, ConnSettings, ServerHandle};
use crate::tls::TestCa;

/// TEST-ONLY RSA key of the fake service account, with its warning preamble.
/// ring cannot generate RSA keys, hence a fixed one.
const KEY_FIXTURE: &str = include_str!("fixtures/service-account-key.pem");

/// The fake service account's private key (PKCS#8 PEM): public in this repository and
/// trusted by nothing but these fakes.
pub fn service_account_key_pem() -> &'static str {
    // Service-account files carry the bare PEM, without the fixture's warning.
    &KEY_FIXTURE[KEY_FIXTURE.find("-----BEGIN").unwrap_or(0)..]
}

const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const SCOPES_ACCEPTED: &[&str] = &[
    "https://www.googleapis.com/auth/firebase.messaging",
    "https://www.googleapis.com/auth/cloud-platform",
];
/// Google tolerates some clock skew on `iat`; golang/oauth2 backdates it by 10 s.
const MAX_SKEW_SECS: i64 = 300;

/// An access token the fake issued.
#[derive(Clone, Debug)]
pub(crate) struct IssuedToken {
    pub(crate) project: String,
    pub(crate) expires_at_ms: i64,
}

pub(crate) struct OAuthState {
    clock: FakeClock,
    url: String,
    rsa_public: Vec<u8>,
    private_key_id: String,
    /// client_email → project
    accounts: Mutex<HashMap<String, String>>,
    revoked_projects: Mutex<HashSet<String>>,
    tokens: Mutex<HashMap<String, IssuedToken>>,
    expires_in: AtomicU64,
    issued: AtomicU64,
    fetches: AtomicU64,
    fail_next: AtomicU32,
    journal: Journal,
}

impl OAuthState {
    /// The project an access token grants, unless it is unknown or expired.
    pub(crate) fn check_access_token(&self, token: &str) -> Option<String> {
        let tokens = self.tokens.lock().unwrap();
        let t = tokens.get(token)?;
        (self.clock.now_ms() < t.expires_at_ms).then(|| t.project.clone())
    }
}

/// Handle to the running fake token endpoint. Clones share the server.
#[derive(Clone)]
pub struct FakeOAuth {
    pub(crate) state: Arc<OAuthState>,
    server: Arc<ServerHandle>,
}

impl FakeOAuth {
    pub(crate) async fn start(
        ca: Arc<TestCa>,
        clock: FakeClock,
        journal: (bool, usize),
        port: u16,
        expires_in: u64,
    ) -> Result<Self> {
        let der = rustls_pemfile::private_key(&mut service_account_key_pem().as_bytes())?
            .context("no key in the service-account fixture")?;
        let key = ring::signature::RsaKeyPair::from_pkcs8(der.secret_der())
            .map_err(|e| anyhow::anyhow!("service-account fixture key: {e}"))?;
        let rsa_public = ring::signature::KeyPair::public_key(&key).as_ref().to_vec();

        let listener = server::bind(port).await?;
        let url = format!("https://{}", listener.local_addr()?);
        let state = Arc::new(OAuthState {
            clock,
            url,
            rsa_public,
            private_key_id: random_id(40).to_lowercase(),
            accounts: Mutex::default(),
            revoked_projects: Mutex::default(),
            tokens: Mutex::default(),
            expires_in: AtomicU64::new(expires_in),
            issued: AtomicU64::new(0),
            fetches: AtomicU64::new(0),
            fail_next: AtomicU32::new(0),
            journal: Journal::new(journal.0, journal.1),
        });
        let router = Router::new()
            .route("/_fake/stats", get(stats))
            .fallback(handle)
            .with_state(state.clone());
        let tls = ca.server_config(&[b"h2", b"http/1.1"], false)?;
        let server = server::spawn(
            listener,
            tls,
            router,
            ConnSettings {
                http2_only: false,
                max_concurrent_streams: 100,
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

    /// `https://127.0.0.1:<port>/token`: the service account's `token_uri`.
    pub fn token_uri(&self) -> String {
        format!("{}/token", self.state.url)
    }

    /// A service-account JSON key file, field for field like Google's, whose `token_uri`
    /// points at this fake. Tokens minted with it are valid for `project_id` only.
    pub fn service_account_json(&self, project_id: &str) -> String {
        let client_email = format!("pushfleet-fake@{project_id}.iam.gserviceaccount.com");
        self.state
            .accounts
            .lock()
            .unwrap()
            .insert(client_email.clone(), project_id.to_string());
        let client_id: String = random_id(21)
            .bytes()
            .map(|b| char::from(b'0' + b % 10))
            .collect();
        let v = json!({
            "type": "service_account",
            "project_id": project_id,
            "private_key_id": self.state.private_key_id,
            "private_key": service_account_key_pem(),
            "client_email": client_email,
            "client_id": client_id,
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri(),
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": format!(
                "https://www.googleapis.com/robot/v1/metadata/x509/pushfleet-fake%40{project_id}.iam.gserviceaccount.com"
            ),
            "universe_domain": "googleapis.com",
        });
        serde_json::to_string_pretty(&v).expect("serialising JSON")
    }

    /// Requests to `/token`, successful or not (always counted).
    pub fn token_fetches(&self) -> u64 {
        self.state.fetches.load(Ordering::Relaxed)
    }

    /// Access tokens issued so far.
    pub fn tokens_issued(&self) -> u64 {
        self.state.issued.load(Ordering::Relaxed)
    }

    /// `expires_in` of tokens issued from now on (default 3599).
    pub fn set_expires_in(&self, secs: u64) {
        self.state.expires_in.store(secs, Ordering::Relaxed);
    }

    /// Makes every access token issued so far invalid (FCM answers 401 for them).
    pub fn expire_all_tokens(&self) {
        self.state.tokens.lock().unwrap().clear();
    }

    /// The next `n` token requests fail with `invalid_grant` / "Invalid JWT Signature.".
    pub fn fail_next_fetches(&self, n: u32) {
        self.state.fail_next.store(n, Ordering::Relaxed);
    }

    /// From now on the service account of `project_id` is refused, as if its key had been
    /// deleted in the cloud console.
    pub fn revoke_service_account(&self, project_id: &str) {
        self.state
            .revoked_projects
            .lock()
            .unwrap()
            .insert(project_id.to_string());
    }

    /// What this fake received.
    pub fn journal(&self) -> &Journal {
        &self.state.journal
    }
}

async fn stats(State(st): State<Arc<OAuthState>>) -> Json<serde_json::Value> {
    Json(json!({
        "token_fetches": st.fetches.load(Ordering::Relaxed),
        "tokens_issued": st.issued.load(Ordering::Relaxed),
    }))
}

async fn handle(
    State(st): State<Arc<OAuthState>>,
    Extension(conn): Extension<Arc<ConnInfo>>,
    req: Request,
) -> Response {
    let received_at = SystemTime::now();
    let received_instant = Instant::now();
    let stream_order = conn.next_stream_order();
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();

    let mut auth = AuthKind::None;
    let result = if parts.uri.path() != "/token" {
        Err((StatusCode::NOT_FOUND, json!({"error": "not_found"})))
    } else if parts.method != Method::POST {
        Err((
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": "invalid_request", "error_description": "Method not allowed"}),
        ))
    } else {
        st.fetches.fetch_add(1, Ordering::Relaxed);
        grant(&st, &body, &mut auth)
    };

    if st.journal.enabled() {
        let mut entry = journal::entry(
            &parts,
            &body,
            &conn,
            stream_order,
            received_at,
            received_instant,
        );
        entry.auth = auth;
        match &result {
            Ok(_) => {
                entry.status = Some(200);
                entry.delivered = true;
            }
            Err((status, v)) => {
                entry.status = Some(status.as_u16());
                entry.reason = v.get("error").and_then(|e| e.as_str()).map(String::from);
            }
        }
        st.journal.record(entry);
    }
    match result {
        Ok(v) => (StatusCode::OK, Json(v)).into_response(),
        Err((status, v)) => (status, Json(v)).into_response(),
    }
}

type Rejection = (StatusCode, serde_json::Value);

fn invalid_grant(description: &str) -> Rejection {
    (
        StatusCode::BAD_REQUEST,
        json!({"error": "invalid_grant", "error_description": description}),
    )
}

fn grant(
    st: &OAuthState,
    body: &[u8],
    auth: &mut AuthKind,
) -> Result<serde_json::Value, Rejection> {
    let form = parse_form(body);
    let grant_type = form.get("grant_type").map(String::as_str).unwrap_or("");
    if grant_type != GRANT_TYPE {
        return Err((
            StatusCode::BAD_REQUEST,
            json!({
                "error": "unsupported_grant_type",
                "error_description": format!("Invalid grant_type: {grant_type}"),
            }),
        ));
    }
    let bad_signature = || invalid_grant("Invalid JWT Signature.");
    let assertion = form.get("assertion").ok_or_else(bad_signature)?;
    let jwt = parse_jwt(assertion).ok_or_else(bad_signature)?;
    if jwt.header.get("alg").and_then(|v| v.as_str()) != Some("RS256") {
        return Err(bad_signature());
    }
    let claim_str = |k: &str| jwt.claims.get(k).and_then(|v| v.as_str()).unwrap_or("");
    let iss = claim_str("iss");
    *auth = AuthKind::JwtAssertion {
        client_email: iss.to_string(),
    };
    if st
        .fail_next
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
    {
        return Err(bad_signature());
    }
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        &st.rsa_public,
    )
    .verify(jwt.signing_input.as_bytes(), &jwt.signature)
    .map_err(|_| bad_signature())?;

    let project = st
        .accounts
        .lock()
        .unwrap()
        .get(iss)
        .cloned()
        .ok_or_else(|| invalid_grant("Invalid grant: account not found"))?;
    if st.revoked_projects.lock().unwrap().contains(&project) {
        return Err(bad_signature());
    }
    let aud = claim_str("aud");
    if !aud_matches(aud, &st.url) {
        return Err(invalid_grant(&format!(
            "Invalid JWT: Failed audience check. The right audience is {}/token",
            st.url
        )));
    }
    let scope_ok = claim_str("scope")
        .split_whitespace()
        .any(|s| SCOPES_ACCEPTED.contains(&s));
    if !scope_ok {
        return Err((
            StatusCode::BAD_REQUEST,
            json!({
                "error": "invalid_scope",
                "error_description": "Invalid OAuth scope or ID token audience provided.",
            }),
        ));
    }
    let iat = jwt.claims.get("iat").and_then(|v| v.as_i64());
    let exp = jwt.claims.get("exp").and_then(|v| v.as_i64());
    let now = st.clock.now_secs();
    let timely = match (iat, exp) {
        (Some(iat), Some(exp)) => {
            exp > iat
                && exp - iat <= 3600
                && iat <= now + MAX_SKEW_SECS
                && exp >= now - MAX_SKEW_SECS
        }
        _ => false,
    };
    if !timely {
        return Err(invalid_grant(
            "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable \
             timeframe. Check your iat and exp values in the JWT claim.",
        ));
    }

    let n = st.issued.fetch_add(1, Ordering::Relaxed) + 1;
    let access_token = format!("ya29.fake-{n}");
    let expires_in = st.expires_in.load(Ordering::Relaxed);
    st.tokens.lock().unwrap().insert(
        access_token.clone(),
        IssuedToken {
            project,
            expires_at_ms: st.clock.now_ms() + expires_in as i64 * 1000,
        },
    );
    Ok(json!({
        "access_token": access_token,
        "expires_in": expires_in,
        "token_type": "Bearer",
    }))
}

/// Accepts the audience whether the client wrote the host as an IP or as `localhost`.
fn aud_matches(aud: &str, url: &str) -> bool {
    let expected = format!("{url}/token");
    aud == expected || aud == expected.replace("127.0.0.1", "localhost")
}

/// `application/x-www-form-urlencoded` decoding, enough for the token grant.
fn parse_form(body: &[u8]) -> HashMap<String, String> {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let escaped = (bytes[i] == b'%' && i + 2 < bytes.len())
                .then(|| Some(hex(bytes[i + 1])? << 4 | hex(bytes[i + 2])?))
                .flatten();
            match (bytes[i], escaped) {
                (_, Some(b)) => {
                    out.push(b);
                    i += 2;
                }
                (b'+', _) => out.push(b' '),
                (b, _) => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}
