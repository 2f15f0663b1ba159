//! APNs over HTTP/2: multiplexed connection pools (one per app with certificate auth, one per
//! team, key and endpoint with token auth), certificate or token (JWT) auth, and Apple's answers
//! turned into [`ProviderResponse`]s.
//!
//! Provider tokens are shared per (team id, key id) across the whole process and renewed on a
//! fixed cadence: Apple answers 429 TooManyProviderTokenUpdates to senders that mint tokens per
//! push, per topic or per client, and 403 ExpiredProviderToken to tokens older than an hour.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pushfleet_core::clock::unix_secs;
use pushfleet_core::config::{ApnsAuth, ApnsSettings, Platform};
use reqwest::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::Url;
use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{
    classify, client_builder, error_chain, header_str, read_file, reason_phrase, retry_after,
    send_error, shared_tls_builder, Alpn, ConnectionLimits, Connections, PoolKey, ProviderError,
    ProviderResponse, RawAnswer, SharedTls, Transport,
};
use crate::payload::ApnsRequest;

// Built once: a header name or value given as a string is parsed and copied on every request.
const APNS_PUSH_TYPE: HeaderName = HeaderName::from_static("apns-push-type");
const APNS_EXPIRATION: HeaderName = HeaderName::from_static("apns-expiration");
const APNS_PRIORITY: HeaderName = HeaderName::from_static("apns-priority");
const APNS_TOPIC: HeaderName = HeaderName::from_static("apns-topic");
const APNS_ID: HeaderName = HeaderName::from_static("apns-id");
const APNS_COLLAPSE_ID: HeaderName = HeaderName::from_static("apns-collapse-id");
const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");

/// A client for one APNs app (one endpoint, one credential).
pub struct ApnsClient {
    connections: Arc<Connections>,
    /// The endpoint, parsed once; each request only sets its path.
    base_url: Url,
    /// `<endpoint's path>/3/device/`, to which each request appends its device token.
    device_path: String,
    /// `None` with certificate auth, where the TLS client certificate is the credential.
    token: Option<Arc<ProviderToken>>,
}

impl ApnsClient {
    pub fn new(
        settings: &ApnsSettings,
        request_timeout: Duration,
    ) -> Result<ApnsClient, ProviderError> {
        ApnsClient::with_transport(
            settings,
            &Transport::direct(request_timeout),
            ConnectionLimits::default(),
        )
    }

    /// With token auth, the connections are shared with every app of the same team and key
    /// (see [`Connections::shared`]); with a certificate, they are the app's own.
    pub fn with_transport(
        settings: &ApnsSettings,
        transport: &Transport,
        limits: ConnectionLimits,
    ) -> Result<ApnsClient, ProviderError> {
        let (token, identity) = match settings.auth() {
            ApnsAuth::Token {
                key_file,
                key_id,
                team_id,
            } => (
                Some(ProviderToken::shared(
                    key_file,
                    key_id,
                    team_id,
                    Duration::from_secs(settings.token_refresh_secs),
                )?),
                None,
            ),
            ApnsAuth::Certificate {
                cert_file,
                key_file,
            } => {
                let mut pem = read_file(cert_file)?;
                if key_file != cert_file {
                    pem.push(b'\n');
                    pem.extend(read_file(key_file)?);
                }
                reqwest::Identity::from_pem(&pem).map_err(|e| {
                    ProviderError::bad_file(
                        cert_file,
                        format!(
                            "with {}: not a PEM certificate and private key: {}",
                            key_file.display(),
                            error_chain(&e)
                        ),
                    )
                })?;
                (None, Some(pem))
            }
        };
        let ca_file = settings.ca_file.clone();
        // A TLS client certificate is the app's own; without one, the TLS settings are shared.
        let shared = match identity {
            None => Some(SharedTls::get(ca_file.as_deref(), Alpn::Http2)?),
            Some(_) => None,
        };
        let build_transport = transport.clone();
        let build_tls = shared.clone();
        let build = move || {
            let builder = match (&build_tls, &identity) {
                (Some(tls), _) => shared_tls_builder(tls, &build_transport),
                (None, Some(pem)) => {
                    let identity = reqwest::Identity::from_pem(pem).map_err(http_client_error)?;
                    client_builder(ca_file.as_deref(), &build_transport)?.identity(identity)
                }
                (None, None) => client_builder(ca_file.as_deref(), &build_transport)?,
            };
            // APNs speaks nothing but HTTP/2.
            builder
                .http2_prior_knowledge()
                .build()
                .map_err(http_client_error)
        };
        let base_url = Url::parse(&settings.endpoint).map_err(|e| ProviderError::BadEndpoint {
            url: settings.endpoint.clone(),
            problem: e.to_string(),
        })?;
        let connections = match (&token, &shared) {
            (Some(token), Some(tls)) => {
                let credential = Some((token.team_id.clone(), token.key_id.clone()));
                let key = PoolKey::new("APNs", credential, &base_url, tls, transport, limits);
                Connections::shared(key, Box::new(build), limits)?
            }
            _ => Arc::new(Connections::new(Box::new(build), limits)?),
        };
        Ok(ApnsClient {
            connections,
            device_path: format!("{}/3/device/", base_url.path().trim_end_matches('/')),
            base_url,
            token,
        })
    }

    #[cfg(test)]
    pub(super) fn connections(&self) -> &Arc<Connections> {
        &self.connections
    }

    pub fn uses_token_auth(&self) -> bool {
        self.token.is_some()
    }

    /// `<endpoint>/3/device/<token>`, for the price of parsing the path alone.
    pub fn device_url(&self, device_token: &str) -> Url {
        let mut path = String::with_capacity(self.device_path.len() + device_token.len());
        path.push_str(&self.device_path);
        push_path_segment(&mut path, device_token);
        let mut url = self.base_url.clone();
        url.set_path(&path);
        url
    }

    /// One POST to APNs. `apns_id` is the job id, so that a retried push carries the same id.
    pub async fn send(
        &self,
        request: &ApnsRequest,
        device_token: &str,
        apns_id: Uuid,
    ) -> ProviderResponse {
        let url = self.device_url(device_token);
        let started = Instant::now();
        let mut minted = None;
        if let Some(token) = &self.token {
            match token.current() {
                Ok(current) => minted = Some(current),
                Err(e) => {
                    return ProviderResponse::transport_failure(
                        Platform::Apple,
                        url.into(),
                        e.to_string(),
                        started,
                    )
                }
            }
        }
        let mut apns_id_text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let apns_id: &str = apns_id.hyphenated().encode_lower(&mut apns_id_text);
        let sent = self
            .connections
            .send(|http| {
                let builder = http
                    .post(url.clone())
                    .header(APNS_PUSH_TYPE, HeaderValue::from_static(request.push_type))
                    .header(APNS_EXPIRATION, HeaderValue::from(request.expiration))
                    .header(
                        APNS_PRIORITY,
                        HeaderValue::from(u16::from(request.priority)),
                    )
                    .header(APNS_TOPIC, request.topic.as_str())
                    .header(APNS_ID, apns_id)
                    .header(CONTENT_TYPE, APPLICATION_JSON)
                    // Bytes: a resend shares the body instead of copying it.
                    .body(request.payload.clone());
                let builder = match &request.collapse_id {
                    Some(collapse_id) => builder.header(APNS_COLLAPSE_ID, collapse_id.as_str()),
                    None => builder,
                };
                match &minted {
                    Some(minted) => builder.header(AUTHORIZATION, minted.authorization.clone()),
                    None => builder,
                }
            })
            .await;
        let answer = match sent {
            Ok(answer) => answer,
            Err(e) => {
                return ProviderResponse::transport_failure(
                    Platform::Apple,
                    url.into(),
                    send_error(e),
                    started,
                )
            }
        };
        let response = parse_answer(url.into(), answer, started);
        if let (Some(token), Some(minted)) = (&self.token, &minted) {
            if response.answer.refresh_credential {
                // Only the token this request used is replaced: when a burst of in-flight pushes
                // all come back 403, the first mints a new token and the rest reuse it. The new
                // token goes out on a new connection, as Apple limits token changes per connection.
                token.refresh_if_current(&minted.jwt, unix_secs());
                self.connections.renew(started);
            }
        }
        response
    }

    /// The provider token the next send would use (token auth only).
    #[cfg(test)]
    fn current_token(&self) -> Option<Result<Arc<str>, ProviderError>> {
        self.token.as_ref().map(|t| t.bearer())
    }
}

fn http_client_error(error: reqwest::Error) -> ProviderError {
    ProviderError::HttpClient {
        provider: "APNs",
        detail: error_chain(&error),
    }
}

fn parse_answer(url: String, answer: RawAnswer, started: Instant) -> ProviderResponse {
    let reason = answer
        .body
        .get("reason")
        .and_then(Value::as_str)
        .map(str::to_string);
    let apns_timestamp_ms = answer.body.get("timestamp").and_then(|t| {
        t.as_u64()
            .or_else(|| t.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
    });
    let meaning = classify(
        Platform::Apple,
        Some(answer.status),
        reason.as_deref(),
        None,
    )
    .with_retry_after(retry_after(&answer.headers));
    ProviderResponse {
        status: Some(answer.status),
        reason,
        message_id: header_str(&answer.headers, "apns-id").map(str::to_string),
        apns_timestamp_ms,
        url,
        transport_error: answer.body_error,
        body: answer.body,
        duration: started.elapsed(),
        answer: meaning,
    }
}

/// Device tokens are hex, but a malformed one must still give a well-formed URL, so that APNs
/// answers BadDeviceToken instead of the request failing locally.
fn push_path_segment(out: &mut String, raw: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let unreserved = |byte: u8| byte.is_ascii_alphanumeric() || b"-._~".contains(&byte);
    if raw.bytes().all(unreserved) {
        out.push_str(raw);
        return;
    }
    for byte in raw.bytes() {
        if unreserved(byte) {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xF)]));
        }
    }
}

/// APNs part of [`super::sylk_result`]: the reason text and body.
pub(super) fn sylk_result(status: u16, response: &ProviderResponse) -> (String, Value) {
    if status == 200 {
        return (String::new(), json!({}));
    }
    let text = match response.reason.as_deref() {
        Some(reason) => match reason_description(reason) {
            Some(description) => format!("{reason} - {description}"),
            None => reason.to_string(),
        },
        None => reason_phrase(status).to_string(),
    };
    (text, response.body.clone())
}

/// Apple's explanation of each `reason`, from the APNs documentation ("Handling notification
/// responses from APNs").
pub fn reason_description(reason: &str) -> Option<&'static str> {
    Some(match reason {
        "BadCollapseId" => "The collapse identifier exceeds the maximum allowed size.",
        "BadDeviceToken" => "The specified device token is invalid. Verify that the request contains a valid token and that the token matches the environment.",
        "BadExpirationDate" => "The apns-expiration value is invalid.",
        "BadMessageId" => "The apns-id value is invalid.",
        "BadPriority" => "The apns-priority value is invalid.",
        "BadTopic" => "The apns-topic value is invalid.",
        "DeviceTokenNotForTopic" => "The device token doesn't match the specified topic.",
        "DuplicateHeaders" => "One or more headers are repeated.",
        "IdleTimeout" => "Idle timeout.",
        "InvalidPushType" => "The apns-push-type value is invalid.",
        "MissingDeviceToken" => "The device token isn't specified in the request :path. Verify that the :path header contains the device token.",
        "MissingTopic" => "The apns-topic header of the request isn't specified and is required. The apns-topic header is mandatory when the client is connected using a certificate that supports multiple topics.",
        "PayloadEmpty" => "The message payload is empty.",
        "TopicDisallowed" => "Pushing to this topic is not allowed.",
        "BadCertificate" => "The certificate is invalid.",
        "BadCertificateEnvironment" => "The client certificate is for the wrong environment.",
        "ExpiredProviderToken" => "The provider token is stale and a new token should be generated.",
        "Forbidden" => "The specified action is not allowed.",
        "InvalidProviderToken" => "The provider token is not valid, or the token signature can't be verified.",
        "MissingProviderToken" => "No provider certificate was used to connect to APNs, and the authorization header is missing or no provider token is specified.",
        "UnrelatedKeyIdInToken" => "The key ID in the provider token isn't related to the key ID of the token used in the first push of this connection.",
        "BadEnvironmentKeyIdInToken" => "The key ID in the provider token doesn't match the environment.",
        "BadPath" => "The request contained an invalid :path value.",
        "MethodNotAllowed" => "The specified :method value isn't POST.",
        "ExpiredToken" => "The device token has expired.",
        "Unregistered" => "The device token is inactive for the specified topic.",
        "PayloadTooLarge" => "The message payload is too large.",
        "TooManyProviderTokenUpdates" => "The provider's authentication token is being updated too often. Update the authentication token no more than once every 20 minutes.",
        "TooManyRequests" => "Too many requests were made consecutively to the same device token.",
        "InternalServerError" => "An internal server error occurred.",
        "ServiceUnavailable" => "The service is unavailable.",
        "Shutdown" => "The APNs server is shutting down.",
        _ => return None,
    })
}

/// The ES256 provider token of one (team id, key id), minted lazily and renewed every
/// `refresh_every`; see the module documentation for why it is shared.
pub struct ProviderToken {
    team_id: String,
    key_id: String,
    key: EncodingKey,
    refresh_every: Duration,
    current: Mutex<Option<Minted>>,
}

#[derive(Clone)]
struct Minted {
    jwt: Arc<str>,
    /// `bearer <jwt>`, built once per token rather than per request.
    authorization: HeaderValue,
    issued_at: u64,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    iat: u64,
}

type TokenRegistry = Mutex<HashMap<(String, String), Arc<ProviderToken>>>;

/// Process-wide on purpose: every app and client using the same signing key must present the
/// same token, or Apple throttles them (429 TooManyProviderTokenUpdates).
fn registry() -> &'static TokenRegistry {
    static REGISTRY: OnceLock<TokenRegistry> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

impl ProviderToken {
    /// The process's token for (team id, key id). A key id names one key, so the first app to
    /// register it decides the key file and the refresh cadence.
    pub fn shared(
        key_file: &Path,
        key_id: &str,
        team_id: &str,
        refresh_every: Duration,
    ) -> Result<Arc<ProviderToken>, ProviderError> {
        let id = (team_id.to_string(), key_id.to_string());
        let mut tokens = registry().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = tokens.get(&id) {
            return Ok(existing.clone());
        }
        let pem = read_file(key_file)?;
        let key = EncodingKey::from_ec_pem(&pem).map_err(|e| {
            ProviderError::bad_file(
                key_file,
                format!("not an APNs .p8 (PKCS#8 P-256) private key: {e}"),
            )
        })?;
        let token = Arc::new(ProviderToken::new(key, key_id, team_id, refresh_every));
        tokens.insert(id, token.clone());
        Ok(token)
    }

    fn new(
        key: EncodingKey,
        key_id: &str,
        team_id: &str,
        refresh_every: Duration,
    ) -> ProviderToken {
        ProviderToken {
            team_id: team_id.to_string(),
            key_id: key_id.to_string(),
            key,
            refresh_every,
            current: Mutex::new(None),
        }
    }

    /// The JWT for the `authorization: bearer` header.
    pub fn bearer(&self) -> Result<Arc<str>, ProviderError> {
        self.bearer_at(unix_secs())
    }

    fn bearer_at(&self, now: u64) -> Result<Arc<str>, ProviderError> {
        self.current_at(now).map(|minted| minted.jwt)
    }

    /// The token to send now, with its header value.
    fn current(&self) -> Result<Minted, ProviderError> {
        self.current_at(unix_secs())
    }

    fn current_at(&self, now: u64) -> Result<Minted, ProviderError> {
        let mut current = self.lock();
        if let Some(minted) = current.as_ref() {
            // A clock stepping backwards must not keep a token alive past Apple's hour.
            let age = now.saturating_sub(minted.issued_at);
            if age < self.refresh_every.as_secs() && now >= minted.issued_at {
                return Ok(minted.clone());
            }
        }
        let minted = self.mint(now)?;
        *current = Some(minted.clone());
        Ok(minted)
    }

    /// Replaces the token if `rejected` is still the current one.
    fn refresh_if_current(&self, rejected: &str, now: u64) {
        let mut current = self.lock();
        if current.as_ref().is_some_and(|m| &*m.jwt == rejected) {
            match self.mint(now) {
                Ok(minted) => *current = Some(minted),
                Err(e) => {
                    tracing::error!(key_id = %self.key_id, "cannot mint an APNs provider token: {e}")
                }
            }
        }
    }

    fn mint(&self, now: u64) -> Result<Minted, ProviderError> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        let claims = Claims {
            iss: &self.team_id,
            iat: now,
        };
        let jwt = jsonwebtoken::encode(&header, &claims, &self.key).map_err(|source| {
            ProviderError::Signing {
                what: "APNs provider token",
                source,
            }
        })?;
        // A JWT is base64url and dots: always a valid header value.
        let authorization =
            HeaderValue::try_from(format!("bearer {jwt}")).expect("a JWT is a valid header value");
        tracing::debug!(key_id = %self.key_id, team_id = %self.team_id, "minted a new APNs provider token");
        Ok(Minted {
            jwt: jwt.into(),
            authorization,
            issued_at: now,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Minted>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};
    use std::path::PathBuf;

    /// A throwaway P-256 key pair made for these tests, trusted nowhere.
    const TEST_KEY: &[u8] = include_bytes!("testdata/apns-test-key.p8");
    const TEST_PUBLIC_KEY: &[u8] = include_bytes!("testdata/apns-test-key.pub.pem");

    fn testdata(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/providers/testdata")
            .join(name)
    }

    fn token() -> ProviderToken {
        let key = EncodingKey::from_ec_pem(TEST_KEY).expect("test key loads");
        ProviderToken::new(key, "KEY1234567", "TEAM123456", Duration::from_secs(3000))
    }

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct DecodedClaims {
        iss: String,
        iat: u64,
    }

    #[test]
    fn jwt_is_es256_with_kid_iss_and_iat() {
        let jwt = token().bearer_at(1_700_000_000).expect("mints");
        let header = jsonwebtoken::decode_header(&jwt).expect("header decodes");
        assert_eq!(header.alg, Algorithm::ES256);
        assert_eq!(header.kid.as_deref(), Some("KEY1234567"));
        let mut validation = Validation::new(Algorithm::ES256);
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        let key = DecodingKey::from_ec_pem(TEST_PUBLIC_KEY).expect("public key");
        let data = jsonwebtoken::decode::<DecodedClaims>(&jwt, &key, &validation)
            .expect("signature verifies");
        assert_eq!(
            data.claims,
            DecodedClaims {
                iss: "TEAM123456".into(),
                iat: 1_700_000_000
            }
        );
    }

    #[test]
    fn jwt_is_reused_until_the_refresh_interval() {
        let token = token();
        let first = token.bearer_at(1_000).expect("mints");
        assert_eq!(token.bearer_at(1_000).expect("cached"), first);
        assert_eq!(token.bearer_at(3_999).expect("cached"), first);
        let second = token.bearer_at(4_000).expect("mints");
        assert_ne!(second, first);
        assert_eq!(token.bearer_at(4_001).expect("cached"), second);
        // A clock stepping back does not extend the token's life.
        assert_ne!(token.bearer_at(10).expect("mints"), second);
    }

    #[test]
    fn a_rejected_token_is_replaced_only_once() {
        let token = token();
        let rejected = token.bearer_at(1_000).expect("mints");
        token.refresh_if_current(&rejected, 1_010);
        let replacement = token.bearer_at(1_010).expect("cached");
        assert_ne!(replacement, rejected);
        // Late 403s for the old token must not churn the new one.
        token.refresh_if_current(&rejected, 1_011);
        assert_eq!(token.bearer_at(1_012).expect("cached"), replacement);
    }

    #[test]
    fn the_token_is_shared_per_team_and_key() {
        let path = testdata("apns-test-key.p8");
        let refresh = Duration::from_secs(3000);
        let a = ProviderToken::shared(&path, "SHAREKEY01", "TEAMSHARED", refresh).expect("loads");
        let b = ProviderToken::shared(&path, "SHAREKEY01", "TEAMSHARED", refresh).expect("loads");
        let c = ProviderToken::shared(&path, "SHAREKEY02", "TEAMSHARED", refresh).expect("loads");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(a.bearer().expect("mints"), b.bearer().expect("cached"));
    }

    fn settings() -> ApnsSettings {
        ApnsSettings {
            endpoint: "https://127.0.0.1:8443/".into(),
            ca_file: None,
            key_file: Some(testdata("apns-test-key.p8")),
            key_id: Some("CLIENTKEY1".into()),
            team_id: Some("TEAMCLIENT".into()),
            cert_file: None,
            cert_key_file: None,
            token_refresh_secs: 3000,
        }
    }

    #[test]
    fn clients_of_one_key_share_the_token_and_build_device_urls() {
        let timeout = Duration::from_secs(5);
        let a = ApnsClient::new(&settings(), timeout).expect("builds");
        let b = ApnsClient::new(&settings(), timeout).expect("builds");
        let token_a = a.current_token().expect("token auth").expect("mints");
        assert_eq!(
            b.current_token().expect("token auth").expect("cached"),
            token_a
        );
        assert_eq!(
            a.device_url("abc123").as_str(),
            "https://127.0.0.1:8443/3/device/abc123"
        );
        assert_eq!(
            a.device_url("a/b c").as_str(),
            "https://127.0.0.1:8443/3/device/a%2Fb%20c"
        );
        assert_eq!(
            a.device_url("x%y\u{e9}").as_str(),
            "https://127.0.0.1:8443/3/device/x%25y%C3%A9"
        );
    }

    #[test]
    fn unreadable_credentials_name_the_file() {
        let mut s = settings();
        s.key_id = Some("MISSINGKEY".into());
        s.key_file = Some(PathBuf::from("/nonexistent/AuthKey.p8"));
        let Err(e) = ApnsClient::new(&s, Duration::from_secs(5)) else {
            panic!("a missing key file must fail");
        };
        assert!(
            matches!(&e, ProviderError::Unreadable { path, .. } if path.ends_with("AuthKey.p8")),
            "{e:?}"
        );

        let mut s = settings();
        s.key_id = Some("BADKEY0001".into());
        s.key_file = Some(testdata("apns-test-key.pub.pem"));
        let Err(e) = ApnsClient::new(&s, Duration::from_secs(5)) else {
            panic!("a public key is not a signing key");
        };
        assert!(
            matches!(&e, ProviderError::BadFile { path, problem }
                if path.ends_with("apns-test-key.pub.pem") && problem.contains(".p8")),
            "{e:?}"
        );
    }

    fn answer(status: u16, headers: &[(&str, &str)], body: Value) -> RawAnswer {
        RawAnswer::for_test(status, headers, body)
    }

    #[test]
    fn responses_are_parsed() {
        let ok = parse_answer(
            "u".into(),
            answer(
                200,
                &[("apns-id", "6f1c1c3e-4a43-4c3e-9d6f-5a1f8a2b0c11")],
                json!({}),
            ),
            Instant::now(),
        );
        assert_eq!(ok.status, Some(200));
        assert_eq!(ok.reason, None);
        assert_eq!(
            ok.message_id.as_deref(),
            Some("6f1c1c3e-4a43-4c3e-9d6f-5a1f8a2b0c11")
        );

        let gone = parse_answer(
            "u".into(),
            answer(
                410,
                &[],
                json!({"reason": "Unregistered", "timestamp": 1_714_979_289_500u64}),
            ),
            Instant::now(),
        );
        assert_eq!(gone.reason.as_deref(), Some("Unregistered"));
        assert_eq!(gone.apns_timestamp_ms, Some(1_714_979_289_500));

        let busy = parse_answer(
            "u".into(),
            answer(
                429,
                &[("retry-after", "30")],
                json!({"reason": "TooManyRequests"}),
            ),
            Instant::now(),
        );
        assert_eq!(busy.answer.retry_after, Some(Duration::from_secs(30)));
    }

    fn sylk(status: u16, body: Value) -> (u16, String, Value) {
        let response = parse_answer("u".into(), answer(status, &[], body), Instant::now());
        super::super::sylk_result(pushfleet_core::Platform::Apple, &response)
    }

    #[test]
    fn sylk_results_follow_the_reference() {
        assert_eq!(sylk(200, json!({})), (200, String::new(), json!({})));
        assert_eq!(
            sylk(410, json!({"reason": "Unregistered", "timestamp": 5})),
            (
                410,
                "Unregistered - The device token is inactive for the specified topic.".into(),
                json!({"reason": "Unregistered", "timestamp": 5})
            )
        );
        let (code, reason, _) = sylk(400, json!({"reason": "BadDeviceToken"}));
        assert_eq!(code, 410);
        assert!(reason.starts_with("BadDeviceToken - The specified device token is invalid."));
        let (code, reason, _) = sylk(400, json!({"reason": "DeviceTokenNotForTopic"}));
        assert_eq!(
            (code, reason.as_str()),
            (
                400,
                "DeviceTokenNotForTopic - The device token doesn't match the specified topic."
            )
        );
        assert_eq!(
            sylk(503, json!({"reason": "SomethingNew"})).1,
            "SomethingNew"
        );
        assert_eq!(sylk(502, json!({})).1, "Bad Gateway");
    }
}
