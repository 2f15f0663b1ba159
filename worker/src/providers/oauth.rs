//! OAuth 2.0 access tokens for FCM from a Google service account (JWT-bearer grant).
//!
//! The reference fetched a token for every push, which doubles latency and gets throttled; here
//! one token is cached per client, renewed shortly before it expires, and fetched by one caller
//! at a time while the others wait for that same fetch.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pushfleet_core::clock::unix_secs;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::{error_chain, read_file, ProviderError};

pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// Google caps assertions at one hour.
const ASSERTION_LIFETIME_SECS: u64 = 3600;

/// The parts of a service-account JSON key that FCM needs.
pub struct ServiceAccount {
    pub project_id: Option<String>,
    pub client_email: String,
    pub token_uri: String,
    private_key_id: Option<String>,
    key: EncodingKey,
    /// SHA-256 of the private key: a rotated key is another account to the token cache.
    key_digest: Vec<u8>,
}

#[derive(Deserialize)]
struct ServiceAccountFile {
    project_id: Option<String>,
    private_key_id: Option<String>,
    private_key: String,
    client_email: String,
    token_uri: Option<String>,
}

#[derive(Serialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

impl ServiceAccount {
    pub fn load(path: &Path) -> Result<ServiceAccount, ProviderError> {
        let text = read_file(path)?;
        ServiceAccount::from_json(&text).map_err(|problem| ProviderError::bad_file(path, problem))
    }

    /// Reads a service-account key; the error says what is wrong with it.
    fn from_json(text: &[u8]) -> Result<ServiceAccount, KeyFileProblem> {
        let file: ServiceAccountFile = serde_json::from_slice(text)
            .map_err(|e| KeyFileProblem(format!("not a Google service-account JSON key: {e}")))?;
        let key = EncodingKey::from_rsa_pem(file.private_key.as_bytes()).map_err(|e| {
            KeyFileProblem(format!("private_key is not an RSA private key in PEM: {e}"))
        })?;
        Ok(ServiceAccount {
            project_id: file.project_id.filter(|p| !p.is_empty()),
            client_email: file.client_email,
            token_uri: file
                .token_uri
                .unwrap_or_else(|| GOOGLE_TOKEN_URI.to_string()),
            private_key_id: file.private_key_id,
            key,
            key_digest: ring::digest::digest(&ring::digest::SHA256, file.private_key.as_bytes())
                .as_ref()
                .to_vec(),
        })
    }

    /// The signed RS256 assertion exchanged for an access token.
    pub fn assertion(&self, now_secs: u64) -> Result<String, ProviderError> {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = self.private_key_id.clone();
        let claims = AssertionClaims {
            iss: &self.client_email,
            scope: FCM_SCOPE,
            aud: &self.token_uri,
            iat: now_secs,
            exp: now_secs + ASSERTION_LIFETIME_SECS,
        };
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(|source| ProviderError::Signing {
            what: "OAuth assertion",
            source,
        })
    }
}

/// What is wrong with the contents of a service-account key file.
#[derive(Debug)]
struct KeyFileProblem(String);

impl From<KeyFileProblem> for String {
    fn from(problem: KeyFileProblem) -> String {
        problem.0
    }
}

/// The cached access token of one service account.
pub struct AccessTokens {
    account: ServiceAccount,
    http: reqwest::Client,
    state: Mutex<TokenState>,
    fetches: AtomicU64,
}

#[derive(Default)]
struct TokenState {
    token: Option<AccessToken>,
    /// The last failed fetch, handed to the callers that were waiting for it.
    failure: Option<(Instant, ProviderError)>,
}

struct AccessToken {
    value: Arc<str>,
    refresh_at: Instant,
    expires_at: Instant,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: Option<u64>,
}

#[derive(Deserialize, Default)]
struct TokenError {
    error: Option<String>,
    error_description: Option<String>,
}

impl AccessTokens {
    /// `http` is the FCM client's, so the app's `ca_file` is trusted for `token_uri` too.
    pub fn new(account: ServiceAccount, http: reqwest::Client) -> AccessTokens {
        AccessTokens {
            account,
            http,
            state: Mutex::new(TokenState::default()),
            fetches: AtomicU64::new(0),
        }
    }

    /// The process's cache for this service account: every app (and so every FCM client) using
    /// the same account and key shares one access token while any of them lives, so a worker
    /// fetches once per account, not once per app. The first app to register an account decides
    /// the HTTP client used for `token_uri`. Weak references: once the last client using it is
    /// gone (a reload that rotated the key, a stopped worker), the next one starts afresh
    /// instead of inheriting a token and an HTTP client that belonged to it.
    pub fn shared(account: ServiceAccount, http: reqwest::Client) -> Arc<AccessTokens> {
        type Key = (String, String, Vec<u8>);
        type Registry = std::sync::Mutex<std::collections::HashMap<Key, Weak<AccessTokens>>>;
        static REGISTRY: std::sync::OnceLock<Registry> = std::sync::OnceLock::new();
        let key = (
            account.client_email.clone(),
            account.token_uri.clone(),
            account.key_digest.clone(),
        );
        let mut registry = REGISTRY
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(tokens) = registry.get(&key).and_then(Weak::upgrade) {
            return tokens;
        }
        let tokens = Arc::new(AccessTokens::new(account, http));
        registry.retain(|_, tokens| tokens.strong_count() > 0);
        registry.insert(key, Arc::downgrade(&tokens));
        tokens
    }

    /// Token requests made so far.
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// A valid access token, fetched only when the cached one is missing or about to expire.
    pub async fn get(&self) -> Result<Arc<str>, ProviderError> {
        let asked = Instant::now();
        let mut state = self.state.lock().await;
        let now = Instant::now();
        if let Some(token) = state.token.as_ref().filter(|t| now < t.refresh_at) {
            return Ok(token.value.clone());
        }
        // Whoever queued behind a fetch that just failed shares its error instead of hammering
        // a token endpoint that is down, one request timeout after another.
        if let Some((failed_at, error)) = &state.failure {
            if *failed_at >= asked {
                return Err(error.clone());
            }
        }
        match self.fetch().await {
            Ok(token) => {
                let value = token.value.clone();
                state.token = Some(token);
                state.failure = None;
                Ok(value)
            }
            Err(error) => {
                state.failure = Some((Instant::now(), error.clone()));
                // Early renewal failed, but the old token still works for a while.
                match state
                    .token
                    .as_ref()
                    .filter(|t| Instant::now() < t.expires_at)
                {
                    Some(token) => {
                        tracing::warn!(token_uri = %self.account.token_uri, "renewing the FCM access token failed, using the current one: {error}");
                        Ok(token.value.clone())
                    }
                    None => Err(error),
                }
            }
        }
    }

    /// Forgets the cached token if it is `rejected`: after a burst of 401s for one expired
    /// token, only one new token is fetched.
    pub async fn invalidate_if_current(&self, rejected: &str) {
        let mut state = self.state.lock().await;
        if state.token.as_ref().is_some_and(|t| &*t.value == rejected) {
            state.token = None;
        }
    }

    async fn fetch(&self) -> Result<AccessToken, ProviderError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let uri = &self.account.token_uri;
        let sent = Instant::now();
        let assertion = self.account.assertion(unix_secs())?;
        let response = self
            .http
            .post(uri)
            .form(&[
                ("grant_type", GRANT_TYPE),
                ("assertion", assertion.as_str()),
            ])
            .send()
            .await
            .map_err(|e| {
                ProviderError::TokenEndpoint(format!(
                    "token request to {uri} failed: {}",
                    error_chain(&e)
                ))
            })?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| {
            ProviderError::TokenEndpoint(format!(
                "token response from {uri} cut short: {}",
                error_chain(&e)
            ))
        })?;
        if !status.is_success() {
            let detail: TokenError = serde_json::from_slice(&body).unwrap_or_default();
            let detail = match (detail.error, detail.error_description) {
                (Some(error), Some(description)) => format!("{error}: {description}"),
                (Some(error), None) => error,
                _ => String::from_utf8_lossy(&body).into_owned(),
            };
            return Err(ProviderError::TokenEndpoint(format!(
                "token endpoint {uri} answered {status}: {detail}"
            )));
        }
        let token: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
            ProviderError::TokenEndpoint(format!(
                "token endpoint {uri} sent an unexpected answer: {e}"
            ))
        })?;
        let lifetime = Duration::from_secs(token.expires_in.unwrap_or(3600));
        tracing::debug!(token_uri = %uri, expires_in = lifetime.as_secs(), "fetched an FCM access token");
        Ok(AccessToken {
            value: token.access_token.into(),
            refresh_at: sent + lifetime - refresh_margin(lifetime),
            expires_at: sent + lifetime,
        })
    }
}

/// Renew a minute early, or a tenth early for short-lived tokens, so a token never expires
/// between being handed out and reaching FCM.
fn refresh_margin(lifetime: Duration) -> Duration {
    (lifetime / 10).min(Duration::from_secs(60))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    /// A throwaway RSA key pair made for these tests, trusted nowhere.
    const TEST_KEY: &str = include_str!("testdata/service-account-test-key.pem");
    const TEST_PUBLIC_KEY: &[u8] = include_bytes!("testdata/service-account-test-key.pub.pem");

    pub(crate) fn service_account_json(project_id: Option<&str>, token_uri: &str) -> String {
        serde_json::json!({
            "type": "service_account",
            "project_id": project_id,
            "private_key_id": "0123456789abcdef",
            "private_key": TEST_KEY,
            "client_email": "pushfleet@example-project.iam.gserviceaccount.com",
            "client_id": "123456789012345678901",
            "token_uri": token_uri,
        })
        .to_string()
    }

    #[derive(Deserialize, Debug)]
    struct Claims {
        iss: String,
        scope: String,
        aud: String,
        iat: u64,
        exp: u64,
    }

    #[test]
    fn assertion_carries_googles_claims() {
        let uri = "https://127.0.0.1:9443/token";
        let account = ServiceAccount::from_json(service_account_json(Some("p"), uri).as_bytes())
            .expect("parses");
        let jwt = account.assertion(1_700_000_000).expect("signs");
        let header = jsonwebtoken::decode_header(&jwt).expect("header");
        assert_eq!(header.alg, Algorithm::RS256);
        assert_eq!(header.kid.as_deref(), Some("0123456789abcdef"));
        let mut validation = Validation::new(Algorithm::RS256);
        validation.validate_exp = false;
        validation.set_audience(&[uri]);
        let key = DecodingKey::from_rsa_pem(TEST_PUBLIC_KEY).expect("public key");
        let claims = jsonwebtoken::decode::<Claims>(&jwt, &key, &validation)
            .expect("signature verifies")
            .claims;
        assert_eq!(
            claims.iss,
            "pushfleet@example-project.iam.gserviceaccount.com"
        );
        assert_eq!(claims.scope, FCM_SCOPE);
        assert_eq!(claims.aud, uri);
        assert_eq!((claims.iat, claims.exp), (1_700_000_000, 1_700_003_600));
    }

    #[test]
    fn bad_key_files_are_explained() {
        let Err(KeyFileProblem(e)) = ServiceAccount::from_json(b"{}") else {
            panic!("empty JSON accepted");
        };
        assert!(e.contains("service-account"), "{e}");
        let text = service_account_json(None, "https://x/token").replace("PRIVATE KEY", "KEY");
        let Err(KeyFileProblem(e)) = ServiceAccount::from_json(text.as_bytes()) else {
            panic!("garbage key accepted");
        };
        assert!(e.contains("private_key"), "{e}");
    }

    #[test]
    fn renewal_margin_scales_with_short_lifetimes() {
        assert_eq!(
            refresh_margin(Duration::from_secs(3599)),
            Duration::from_secs(60)
        );
        assert_eq!(
            refresh_margin(Duration::from_secs(30)),
            Duration::from_secs(3)
        );
    }

    /// Apps of one account share a token cache while any of them lives; a rotated key, or a
    /// worker started after the last user of the cache was gone, gets a fresh one.
    #[test]
    fn the_token_cache_is_shared_only_while_used_and_per_key() {
        let token_uri = "https://127.0.0.1:9/shared-cache-test/token";
        let account = |key: &str| {
            let mut json: serde_json::Value =
                serde_json::from_str(&service_account_json(None, token_uri)).unwrap();
            json["private_key"] = key.into();
            ServiceAccount::from_json(json.to_string().as_bytes()).unwrap()
        };
        let http = reqwest::Client::new();
        let first = AccessTokens::shared(account(TEST_KEY), http.clone());
        let second = AccessTokens::shared(account(TEST_KEY), http.clone());
        assert!(Arc::ptr_eq(&first, &second));
        // The same key written otherwise stands for a rotated one: another cache.
        let rotated = AccessTokens::shared(account(&format!("{TEST_KEY}\n")), http.clone());
        assert!(!Arc::ptr_eq(&first, &rotated));
        first.fetches.fetch_add(1, Ordering::Relaxed);
        drop((first, second));
        let later = AccessTokens::shared(account(TEST_KEY), http);
        assert_eq!(later.fetches(), 0, "a new cache, not the dropped one");
    }
}
