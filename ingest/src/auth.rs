//! API keys (`Authorization: Bearer pfk_<id>_<secret>`): who is calling, what the key lets it do,
//! and how fast it may push.
//!
//! The key table lives in Postgres (`pushfleet keys create|list|revoke`); ingest holds the keys
//! in force in memory and reloads them every `[ingest] api_keys_refresh_ms`, so that a
//! revocation reaches every ingest within that time, without a restart and without a database
//! query per request. A reload that fails keeps the last table: a revocation is itself a write
//! to that database, so none can be missed while it is away.
//!
//! With `require_api_key` every API route wants a key with the route's scope. Without it a
//! request may still send one: a valid key is then used as if keys were required (its scopes,
//! its apps, its rate limit, its id in the audit), and a bad one is refused, so that a caller
//! never believes itself authenticated when it is not. Apps scope what a key reaches: pushes
//! and registrations only for its apps, listings and audit rows only of its apps.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use deadpool_postgres::Pool;
use pushfleet_core::config::IngestSettings;
use pushfleet_core::db::DbError;
use pushfleet_core::keys::{self, ApiKey, Scope};
use tracing::{debug, info, warn};

use crate::error::{ApiError, Unauthorized};
use crate::state::{AppState, Shared};
use crate::StartError;

/// The scope each API route wants. Routes not listed (the greeting, probes, metrics, the
/// trailing-slash redirect, unknown paths) need no key.
fn scope_of(route: &str) -> Option<Scope> {
    match route {
        "/push"
        | "/v2/tokens/{account}/push"
        | "/v2/tokens/{account}/push/{device}"
        | "/v2/tokens/{account}/wakeup"
        | "/v2/tokens/{account}/wakeup/{device}"
        | "/rfc8599/push"
        | "/rfc8599/wakeup" => Some(Scope::Push),
        "/v2/tokens/{account}" => Some(Scope::Tokens),
        "/audit" | "/audit/summary" => Some(Scope::Audit),
        _ => None,
    }
}

/// Who sent a request, as the handlers see it.
#[derive(Debug, Clone, Default)]
pub enum Caller {
    /// No key, where none is required.
    #[default]
    Anonymous,
    Key(Arc<ApiKey>),
}

impl Caller {
    /// The key's public id, recorded with every push it sends.
    pub fn key_id(&self) -> Option<&str> {
        match self {
            Caller::Anonymous => None,
            Caller::Key(key) => Some(&key.id),
        }
    }

    /// The apps the caller is limited to; `None`: every app.
    pub fn apps(&self) -> Option<&[String]> {
        match self {
            Caller::Anonymous => None,
            Caller::Key(key) => Some(&key.apps),
        }
    }

    /// Whether the caller sees what belongs to `app_id` (devices, audit rows).
    pub fn sees(&self, app_id: &str) -> bool {
        match self {
            Caller::Anonymous => true,
            Caller::Key(key) => key.allows_app(app_id),
        }
    }

    /// 403 unless the caller may act for `app_id`.
    pub fn check_app(&self, app_id: &str) -> Result<(), ApiError> {
        match self {
            Caller::Key(key) if !key.allows_app(app_id) => Err(ApiError::AppNotAllowed {
                key_id: key.id.clone(),
                app_id: app_id.to_string(),
            }),
            _ => Ok(()),
        }
    }
}

/// Middleware: identifies the caller of an API route (401 / 403 before the body is read) and
/// hands it to the handler as a request extension.
pub async fn authenticate(
    State(state): State<Shared>,
    mut request: Request,
    next: Next,
) -> Response {
    let scope = request
        .extensions()
        .get::<MatchedPath>()
        .and_then(|route| scope_of(route.as_str()));
    let caller = match scope {
        None => Caller::Anonymous,
        Some(scope) => match identify(&state, request.headers(), scope) {
            Ok(caller) => caller,
            Err(error) => {
                debug!(path = %request.uri().path(), error = %error, "request refused: API key");
                return error.into_response();
            }
        },
    };
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// What the `Authorization` header holds.
enum Credentials<'a> {
    None,
    Bearer(&'a str),
    /// Another scheme, or a value that is not text.
    Other,
}

fn credentials(headers: &HeaderMap) -> Credentials<'_> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Credentials::None;
    };
    let Ok(value) = value.to_str() else {
        return Credentials::Other;
    };
    match value.trim().split_once(' ') {
        Some((scheme, key)) if scheme.eq_ignore_ascii_case("bearer") => {
            Credentials::Bearer(key.trim())
        }
        _ => Credentials::Other,
    }
}

fn identify(state: &AppState, headers: &HeaderMap, scope: Scope) -> Result<Caller, ApiError> {
    let required = state.live().settings.ingest.require_api_key;
    let key = match credentials(headers) {
        Credentials::Bearer(text) => state
            .api_keys
            .verify(text)
            .ok_or(ApiError::Unauthorized(Unauthorized::Invalid))?,
        Credentials::None if required => return Err(ApiError::Unauthorized(Unauthorized::Missing)),
        Credentials::Other if required => {
            return Err(ApiError::Unauthorized(Unauthorized::Malformed))
        }
        // Another scheme (a proxy's Basic credentials) is not meant for us when keys are
        // optional: the request is served as it was before keys existed.
        Credentials::None | Credentials::Other => return Ok(Caller::Anonymous),
    };
    if !key.has_scope(scope) {
        return Err(ApiError::MissingScope {
            key_id: key.id.clone(),
            scope,
        });
    }
    Ok(Caller::Key(key))
}

/// Whether ingest would serve anyone who reaches `addr`: a non-loopback address with neither
/// keys nor an access list, and no explicit `allow_anonymous`.
pub fn open_to_anyone(settings: &IngestSettings, addr: SocketAddr) -> bool {
    !addr.ip().to_canonical().is_loopback()
        && !settings.require_api_key
        && settings.allowed_hosts.is_empty()
        && !settings.allow_anonymous
}

/// A key's rate limit as this ingest enforces it: its share of the key's rate.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Limit {
    per_second: f64,
    burst: f64,
}

impl Limit {
    fn of(key: &ApiKey, share: f64) -> Option<Limit> {
        if key.pushes_per_second == 0 {
            return None;
        }
        let burst = if key.burst == 0 {
            key.pushes_per_second
        } else {
            key.burst
        };
        Some(Limit {
            per_second: f64::from(key.pushes_per_second) * share,
            // A bucket smaller than one push would never let one through.
            burst: (f64::from(burst) * share).max(1.0),
        })
    }
}

/// A token bucket: `tokens` pushes may go at once, refilled at the limit's rate.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Takes `pushes`, or says how long until they could be taken. A request for more pushes
    /// than the bucket holds (a v2 push to many devices) goes through on a full bucket and
    /// leaves it in debt, so that it is possible at all and still paid for.
    fn take(&mut self, limit: Limit, pushes: usize, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * limit.per_second).min(limit.burst);
        self.at = now;
        let pushes = pushes as f64;
        let needed = pushes.min(limit.burst);
        // Float drift must not refuse a push that the rate allows exactly.
        if self.tokens + 1e-9 >= needed {
            self.tokens -= pushes;
            Ok(())
        } else {
            // A share small enough to make the wait overflow still gets an answer.
            Err(
                Duration::try_from_secs_f64((needed - self.tokens) / limit.per_second)
                    .unwrap_or(Duration::MAX),
            )
        }
    }
}

/// The keys in force and their buckets.
pub struct ApiKeys {
    table: RwLock<Arc<HashMap<String, Arc<ApiKey>>>>,
    buckets: Mutex<HashMap<String, Bucket>>,
    /// `[ingest] rate_limit_share`.
    share: f64,
}

impl ApiKeys {
    pub fn new(share: f64) -> ApiKeys {
        ApiKeys {
            table: RwLock::default(),
            buckets: Mutex::default(),
            share,
        }
    }

    /// Installs a freshly loaded table; revoked keys lose their buckets.
    pub fn replace(&self, keys: Vec<ApiKey>) {
        let table: HashMap<String, Arc<ApiKey>> = keys
            .into_iter()
            .map(|key| (key.id.clone(), Arc::new(key)))
            .collect();
        self.buckets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|id, _| table.contains_key(id));
        *self.table.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(table);
    }

    /// The key `text` stands for, if it is a key in force and its secret matches.
    pub fn verify(&self, text: &str) -> Option<Arc<ApiKey>> {
        let (id, secret) = keys::parse_key(text)?;
        let key = self
            .table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()?;
        key.verify(secret).then_some(key)
    }

    /// Lets `pushes` pushes of the caller through its rate limit, or refuses them all with 429
    /// (counted per tenant).
    pub fn admit(&self, caller: &Caller, pushes: usize) -> Result<(), ApiError> {
        self.admit_at(caller, pushes, Instant::now())
    }

    fn admit_at(&self, caller: &Caller, pushes: usize, now: Instant) -> Result<(), ApiError> {
        let Caller::Key(key) = caller else {
            return Ok(());
        };
        let Some(limit) = Limit::of(key, self.share) else {
            return Ok(());
        };
        if pushes == 0 {
            return Ok(());
        }
        let taken = self
            .buckets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.id.clone())
            .or_insert(Bucket {
                tokens: limit.burst,
                at: now,
            })
            .take(limit, pushes, now);
        taken.map_err(|wait| {
            metrics::counter!("pushfleet_ingest_rate_limited_total", "tenant" => key.tenant.clone())
                .increment(1);
            ApiError::RateLimited {
                key_id: key.id.clone(),
                per_second: limit.per_second,
                burst: limit.burst,
                // Whole seconds, as Retry-After counts them, and never "now".
                retry_after: Duration::from_secs(wait.as_secs_f64().ceil().max(1.0) as u64),
            }
        })
    }
}

async fn load(pool: &Pool) -> Result<Vec<ApiKey>, DbError> {
    let client = pool.get().await?;
    keys::active(&**client).await
}

/// The key table at start-up. When keys are required, a table that cannot be read stops the
/// start; otherwise ingest starts with no keys and the first reload tries again.
pub async fn load_at_start(
    pool: &Pool,
    settings: &IngestSettings,
) -> Result<Vec<ApiKey>, StartError> {
    match load(pool).await {
        Ok(keys) => Ok(keys),
        Err(error) if settings.require_api_key => Err(StartError::ApiKeys(error)),
        Err(error) => {
            warn!(%error, "API keys not loaded yet; requests with a key get 401 until they are");
            Ok(Vec::new())
        }
    }
}

/// Installs the table loaded at start-up and reloads it for as long as `state` lives.
pub fn keep_fresh(state: &Shared, keys: Vec<ApiKey>) {
    state.api_keys.replace(keys);
    let interval = Duration::from_millis(state.live().settings.ingest.api_keys_refresh_ms);
    tokio::spawn(refresh(
        Arc::downgrade(&state.api_keys),
        state.db.clone(),
        interval,
    ));
}

async fn refresh(keys: Weak<ApiKeys>, pool: Pool, interval: Duration) {
    let mut failing = false;
    loop {
        tokio::time::sleep(interval).await;
        // Ingest stopped: its state, and so the table, is gone.
        let Some(keys) = keys.upgrade() else {
            return;
        };
        match load(&pool).await {
            Ok(loaded) => {
                keys.replace(loaded);
                if std::mem::take(&mut failing) {
                    info!("API keys reloaded again");
                }
            }
            Err(error) if !failing => {
                failing = true;
                warn!(%error, "API keys not reloaded; the last table stays in force");
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const SECRET: &str = "5f0c9c1f3b0e4f8a9d2c7b6a5e4d3c2b1a0f9e8d7c6b5a493827161504f3e2d1";

    fn key(pushes_per_second: u32, burst: u32) -> ApiKey {
        let mut key = ApiKey::new(
            "0123456789abcdef",
            "acme",
            &["com.example"],
            &[Scope::Push],
            SECRET,
        );
        key.pushes_per_second = pushes_per_second;
        key.burst = burst;
        key
    }

    fn keys_with(key: ApiKey, share: f64) -> (ApiKeys, Caller) {
        let keys = ApiKeys::new(share);
        keys.replace(vec![key]);
        let caller = Caller::Key(
            keys.verify(&format!("pfk_0123456789abcdef_{SECRET}"))
                .expect("the key verifies"),
        );
        (keys, caller)
    }

    #[test]
    fn keys_are_found_by_id_and_checked_by_secret() {
        let (keys, _) = keys_with(key(0, 0), 1.0);
        assert!(keys
            .verify(&format!("pfk_0123456789abcdef_{SECRET}"))
            .is_some());
        let wrong = format!("pfk_0123456789abcdef_{}", SECRET.replace('5', "6"));
        assert!(keys.verify(&wrong).is_none());
        assert!(keys
            .verify(&format!("pfk_0123456789abcdee_{SECRET}"))
            .is_none());
        assert!(keys.verify("nonsense").is_none());
        keys.replace(Vec::new());
        assert!(keys
            .verify(&format!("pfk_0123456789abcdef_{SECRET}"))
            .is_none());
    }

    #[test]
    fn the_bucket_allows_the_burst_then_the_rate() {
        let (keys, caller) = keys_with(key(2, 4), 1.0);
        let start = Instant::now();
        for _ in 0..4 {
            keys.admit_at(&caller, 1, start).expect("within the burst");
        }
        let refused = keys.admit_at(&caller, 1, start).unwrap_err();
        assert!(
            matches!(refused, ApiError::RateLimited { retry_after, .. } if retry_after == Duration::from_secs(1)),
            "{refused:?}"
        );
        // Two per second come back.
        let later = start + Duration::from_millis(1000);
        keys.admit_at(&caller, 2, later).expect("refilled");
        assert!(keys.admit_at(&caller, 1, later).is_err());
        // Anonymous callers and unlimited keys are never limited.
        assert!(keys.admit_at(&Caller::Anonymous, 1000, later).is_ok());
        let (unlimited, caller) = keys_with(key(0, 0), 1.0);
        assert!(unlimited.admit_at(&caller, 1_000_000, later).is_ok());
    }

    #[test]
    fn a_fanout_larger_than_the_burst_passes_on_a_full_bucket_and_is_paid_for() {
        let (keys, caller) = keys_with(key(1, 2), 1.0);
        let start = Instant::now();
        keys.admit_at(&caller, 5, start).expect("a full bucket");
        // Three pushes in debt: three seconds repay them, and the next push waits one more.
        let refused = keys
            .admit_at(&caller, 1, start + Duration::from_secs(3))
            .unwrap_err();
        assert!(
            matches!(refused, ApiError::RateLimited { retry_after, .. } if retry_after == Duration::from_secs(1)),
            "{refused:?}"
        );
        keys.admit_at(&caller, 1, start + Duration::from_secs(4))
            .expect("debt repaid");
    }

    #[test]
    fn each_ingest_enforces_its_share() {
        let (keys, caller) = keys_with(key(10, 0), 0.5);
        let start = Instant::now();
        for _ in 0..5 {
            keys.admit_at(&caller, 1, start).expect("half the burst");
        }
        let refused = keys.admit_at(&caller, 1, start).unwrap_err();
        assert!(
            matches!(refused, ApiError::RateLimited { per_second, burst, .. } if per_second == 5.0 && burst == 5.0),
            "{refused:?}"
        );
        // A share of a burst below one push still lets one through.
        assert_eq!(
            Limit::of(&key(1, 1), 0.1),
            Some(Limit {
                per_second: 0.1,
                burst: 1.0
            })
        );
    }

    #[test]
    fn revoked_keys_lose_their_buckets() {
        let (keys, caller) = keys_with(key(1, 1), 1.0);
        keys.admit(&caller, 1).unwrap();
        assert_eq!(keys.buckets.lock().unwrap().len(), 1);
        keys.replace(Vec::new());
        assert!(keys.buckets.lock().unwrap().is_empty());
    }

    #[test]
    fn bearer_credentials_are_read() {
        let headers = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            headers
        };
        assert!(matches!(
            credentials(&headers("Bearer pfk_x")),
            Credentials::Bearer("pfk_x")
        ));
        assert!(matches!(
            credentials(&headers("bearer  pfk_x ")),
            Credentials::Bearer("pfk_x")
        ));
        assert!(matches!(
            credentials(&headers("Basic dXNlcjpwdw==")),
            Credentials::Other
        ));
        assert!(matches!(credentials(&headers("pfk_x")), Credentials::Other));
        assert!(matches!(credentials(&HeaderMap::new()), Credentials::None));
    }

    #[test]
    fn callers_are_limited_to_their_apps() {
        let (_, caller) = keys_with(key(0, 0), 1.0);
        assert!(caller.sees("com.example") && !caller.sees("com.other"));
        assert!(caller.check_app("com.example").is_ok());
        assert!(matches!(
            caller.check_app("com.other"),
            Err(ApiError::AppNotAllowed { app_id, .. }) if app_id == "com.other"
        ));
        assert_eq!(caller.key_id(), Some("0123456789abcdef"));
        assert!(Caller::Anonymous.sees("anything") && Caller::Anonymous.apps().is_none());
    }

    #[test]
    fn only_open_non_loopback_listeners_are_refused() {
        let open = |listen: &str, change: fn(&mut IngestSettings)| {
            let mut settings = IngestSettings::default();
            change(&mut settings);
            open_to_anyone(&settings, listen.parse().unwrap())
        };
        assert!(open("0.0.0.0:8400", |_| {}));
        assert!(open("[::]:8400", |_| {}));
        assert!(open("192.0.2.7:8400", |_| {}));
        assert!(!open("127.0.0.1:8400", |_| {}));
        assert!(!open("[::1]:8400", |_| {}));
        assert!(!open("[::ffff:127.0.0.1]:8400", |_| {}));
        assert!(!open("0.0.0.0:8400", |s| s.require_api_key = true));
        assert!(!open("0.0.0.0:8400", |s| s.allowed_hosts =
            vec!["10.0.0.0/8".into()]));
        assert!(!open("0.0.0.0:8400", |s| s.allow_anonymous = true));
    }
}
