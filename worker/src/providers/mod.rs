//! The provider side of a worker: one client per configured app, talking to APNs or FCM over
//! long-lived HTTP/2 connections (shared by apps whose connections are interchangeable, see
//! [`Connections::shared`], with TLS settings shared per CA bundle, see [`SharedTls`]), what the
//! provider said as a [`ProviderResponse`], its meaning from the answer table ([`answers`]), and
//! the Sylk-shaped answer synchronous callers expect.

pub mod answers;
pub mod apns;
mod error;
pub mod fcm;
pub mod oauth;
pub mod webpush;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use pushfleet_core::clock::now_ms;
use pushfleet_core::config::{AppSettings, Platform, WorkerSettings};
use pushfleet_core::job::Job;
use pushfleet_core::policy::EventPolicy;
use serde_json::{json, Value};

pub use self::answers::{classify, Answer, Class};
use self::error::read_file;
pub use self::error::ProviderError;
use crate::payload;

/// What one send produced, whether or not the provider answered.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderResponse {
    /// `None` when no HTTP answer came (connect error, reset, timeout).
    pub status: Option<u16>,
    /// APNs `reason`; FCM `errorCode` from the FcmError detail, else `error.status`.
    pub reason: Option<String>,
    /// The parsed JSON body; `{}` when empty, a JSON string when the body was not JSON.
    pub body: Value,
    /// `apns-id` header / FCM message `name`.
    pub message_id: Option<String>,
    /// APNs 410: when the token stopped being valid, epoch milliseconds.
    pub apns_timestamp_ms: Option<u64>,
    pub url: String,
    pub transport_error: Option<String>,
    pub duration: Duration,
    /// What the answer means, from the answer table.
    pub answer: Answer,
}

impl ProviderResponse {
    /// A send that never got an HTTP answer.
    pub fn transport_failure(
        platform: Platform,
        url: String,
        error: String,
        started: Instant,
    ) -> ProviderResponse {
        ProviderResponse {
            status: None,
            reason: None,
            body: json!({}),
            message_id: None,
            apns_timestamp_ms: None,
            url,
            transport_error: Some(error),
            duration: started.elapsed(),
            answer: classify(platform, None, None, None),
        }
    }

    /// The provider's reason, or why no answer came.
    pub fn reason_text(&self) -> Option<&str> {
        self.reason.as_deref().or(self.transport_error.as_deref())
    }
}

/// A ready-to-use client for one app.
pub enum Provider {
    Apns(apns::ApnsClient),
    Fcm(fcm::FcmClient),
    /// Boxed: larger than the other two, which share their connections.
    WebPush(Box<webpush::WebPushClient>),
}

impl Provider {
    /// Loads credentials and builds the client; errors name the app and the file.
    pub fn for_app(app: &AppSettings, worker: &WorkerSettings) -> Result<Provider, ProviderError> {
        let transport = Transport::for_worker(worker)?;
        let limits = ConnectionLimits {
            connections: worker.max_connections_per_app,
            streams_per_connection: worker.max_streams_per_connection,
        };
        // Validation guarantees the section of the app's platform.
        let built = match (app.platform, &app.apns, &app.fcm) {
            (Platform::UnifiedPush, ..) => match &app.webpush {
                Some(settings) => webpush::WebPushClient::new(settings, worker.request_timeout())
                    .map(|client| Provider::WebPush(Box::new(client))),
                None => Err(ProviderError::MissingSection("webpush")),
            },
            (Platform::Apple, Some(settings), _) => {
                apns::ApnsClient::with_transport(settings, &transport, limits).map(Provider::Apns)
            }
            (Platform::Firebase, _, Some(settings)) => {
                fcm::FcmClient::with_transport(settings, &transport, limits).map(Provider::Fcm)
            }
            (Platform::Apple, ..) => Err(ProviderError::MissingSection("apns")),
            (Platform::Firebase, ..) => Err(ProviderError::MissingSection("fcm")),
        };
        built.map_err(|source| ProviderError::App {
            app: app.id.clone(),
            platform: app.platform,
            source: Box::new(source),
        })
    }

    /// Sends `job`: one attempt. Never fails: every problem is described in the response.
    ///
    /// A rejected credential (APNs 403 ExpiredProviderToken/InvalidProviderToken, FCM 401
    /// UNAUTHENTICATED) is replaced by the client itself and the push sent once more; a second
    /// refusal is the answer.
    pub async fn send(
        &self,
        app: &AppSettings,
        job: &Job,
        policy: &EventPolicy,
    ) -> ProviderResponse {
        let first = self.send_once(app, job, policy).await;
        if !self.credential_replaced(&first) {
            return first;
        }
        metrics::counter!(
            "pushfleet_credential_refreshes_total",
            "app" => app.id.clone(), "platform" => self.platform().as_str()
        )
        .increment(1);
        let mut second = self.send_once(app, job, policy).await;
        second.duration += first.duration;
        second
    }

    /// Whether the answer refused a credential the client has just replaced.
    fn credential_replaced(&self, response: &ProviderResponse) -> bool {
        let replaceable = match self {
            Provider::Apns(client) => client.uses_token_auth(),
            Provider::Fcm(_) => true,
            // A VAPID token is the key's own signature: a new one would be refused alike.
            Provider::WebPush(_) => false,
        };
        replaceable && response.answer.refresh_credential
    }

    async fn send_once(
        &self,
        app: &AppSettings,
        job: &Job,
        policy: &EventPolicy,
    ) -> ProviderResponse {
        match self {
            Provider::Apns(client) => {
                let request = payload::apns_request(app, job, policy);
                client.send(&request, &job.push.token, job.id).await
            }
            Provider::Fcm(client) => {
                let message = payload::fcm_message(app, job, policy, now_ms());
                client.send(&message).await
            }
            Provider::WebPush(client) => {
                client
                    .send(job, payload::webpush_body(app, job, now_ms()))
                    .await
            }
        }
    }

    pub fn platform(&self) -> Platform {
        match self {
            Provider::Apns(_) => Platform::Apple,
            Provider::Fcm(_) => Platform::Firebase,
            Provider::WebPush(_) => Platform::UnifiedPush,
        }
    }
}

/// The Sylk-shaped result for sync answers: (code, reason text, body), as the reference reports
/// it. The code is the answer table's; the text and body are each provider's.
pub fn sylk_result(platform: Platform, response: &ProviderResponse) -> (u16, String, Value) {
    let code = response.answer.sylk_code;
    let Some(status) = response.status else {
        let error = response
            .transport_error
            .as_deref()
            .unwrap_or("no answer from the provider");
        return (code, format!("Bad Gateway: {error}"), json!({}));
    };
    let (text, body) = match platform {
        Platform::Apple => apns::sylk_result(status, response),
        Platform::Firebase => fcm::sylk_result(status, response),
        Platform::UnifiedPush => webpush::sylk_result(status, response),
    };
    (code, text, body)
}

/// How many HTTP/2 connections a client may open to its provider, and how many requests each
/// carries at once. The provider's own SETTINGS_MAX_CONCURRENT_STREAMS, which may change at any
/// time, is respected below that by HTTP/2 itself: excess requests wait for a free stream.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub connections: usize,
    pub streams_per_connection: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            connections: 4,
            streams_per_connection: 1000,
        }
    }
}

struct Connection {
    http: reqwest::Client,
    in_flight: AtomicUsize,
}

type BuildClient = Box<dyn Fn() -> Result<reqwest::Client, ProviderError> + Send + Sync>;

/// The connections of one client to its provider. Requests fill the first connection up to its
/// bound; the next connection opens only when the open ones are saturated, and a request waits
/// when all of them are. One HTTP client is one HTTP/2 connection (kept alive with PINGs).
pub struct Connections {
    build: BuildClient,
    open: RwLock<Vec<Arc<Connection>>>,
    limits: ConnectionLimits,
    room: Arc<tokio::sync::Semaphore>,
    renewed_at: std::sync::Mutex<Instant>,
}

/// A request's place on a connection, given back when dropped.
pub struct Lease {
    connection: Arc<Connection>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl std::ops::Deref for Lease {
    type Target = reqwest::Client;
    fn deref(&self) -> &reqwest::Client {
        &self.connection.http
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.connection.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Connections {
    /// Builds the first client at once, so that a bad CA file or certificate fails at start-up.
    pub fn new(build: BuildClient, limits: ConnectionLimits) -> Result<Connections, ProviderError> {
        let first = build()?;
        Ok(Connections {
            build,
            open: RwLock::new(vec![Arc::new(Connection {
                http: first,
                in_flight: AtomicUsize::new(0),
            })]),
            room: Arc::new(tokio::sync::Semaphore::new(
                limits.connections * limits.streams_per_connection,
            )),
            limits,
            renewed_at: std::sync::Mutex::new(Instant::now()),
        })
    }

    /// The pool of every client sending with the same credential through the same TLS settings
    /// and transport to the same origin under the same limits (`key` says all of it): one set
    /// of HTTP/2 connections instead of one per app, so that a worker with many apps holds
    /// and warms up few connections, and pushes for different apps share their writes. `build`
    /// is used only when no such pool is alive.
    pub fn shared(
        key: PoolKey,
        build: BuildClient,
        limits: ConnectionLimits,
    ) -> Result<Arc<Connections>, ProviderError> {
        let mut pools = pool_registry()
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(pool) = pools.get(&key).and_then(Weak::upgrade) {
            return Ok(pool);
        }
        let pool = Arc::new(Connections::new(build, limits)?);
        pools.retain(|_, pool| pool.strong_count() > 0);
        pools.insert(key, Arc::downgrade(&pool));
        Ok(pool)
    }

    /// Replaces the open connections with a new one, unless that already happened after
    /// `since`: APNs wants a new provider token on a new connection. Requests in flight finish
    /// on the old ones.
    pub fn renew(&self, since: Instant) {
        let mut renewed_at = self.renewed_at.lock().expect("renewal lock");
        if *renewed_at > since {
            return;
        }
        match (self.build)() {
            Ok(http) => {
                *self.open.write().expect("connections lock") = vec![Arc::new(Connection {
                    http,
                    in_flight: AtomicUsize::new(0),
                })];
                *renewed_at = Instant::now();
            }
            Err(e) => tracing::warn!(error = %e, "cannot open a new provider connection"),
        }
    }

    /// Any client, for requests outside the pool's accounting (the OAuth token endpoint).
    pub fn first(&self) -> reqwest::Client {
        self.open.read().expect("connections lock")[0].http.clone()
    }

    pub async fn lease(&self) -> Lease {
        let permit = self
            .room
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let max = self.limits.streams_per_connection;
        let take = |connection: &Arc<Connection>| {
            let previous = connection.in_flight.fetch_add(1, Ordering::AcqRel);
            if previous < max {
                true
            } else {
                connection.in_flight.fetch_sub(1, Ordering::AcqRel);
                false
            }
        };
        if let Some(connection) = self
            .open
            .read()
            .expect("connections lock")
            .iter()
            .find(|c| take(c))
        {
            return Lease {
                connection: connection.clone(),
                _permit: permit,
            };
        }
        let mut open = self.open.write().expect("connections lock");
        if open.len() < self.limits.connections {
            if let Ok(http) = (self.build)() {
                open.push(Arc::new(Connection {
                    http,
                    in_flight: AtomicUsize::new(0),
                }));
                metrics::counter!("pushfleet_provider_connections_opened_total").increment(1);
            }
        }
        // The permit guarantees room overall; take the least loaded connection.
        let connection = open
            .iter()
            .min_by_key(|c| c.in_flight.load(Ordering::Acquire))
            .expect("at least one connection")
            .clone();
        connection.in_flight.fetch_add(1, Ordering::AcqRel);
        Lease {
            connection,
            _permit: permit,
        }
    }

    /// Sends the request `make` builds and reads its answer. A request the server did not
    /// process (refused stream, or above the last stream of a GOAWAY) is sent again at once on a
    /// connection with room: it cannot have reached the device.
    async fn send(
        &self,
        make: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<RawAnswer, reqwest::Error> {
        let mut resent = 0;
        loop {
            let lease = self.lease().await;
            match make(&lease).send().await {
                Ok(response) => return Ok(read_answer(response).await),
                Err(e) if resent < 2 && unprocessed(&e) => {
                    resent += 1;
                    metrics::counter!("pushfleet_provider_resends_total").increment(1);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// What makes two clients' connections interchangeable: the credential the connection carries
/// (APNs binds a connection to the team of its first provider token; an FCM bearer token goes
/// with each request, so none), the origin, the trust roots and ALPN, the transport and the
/// limits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub provider: &'static str,
    /// APNs token auth: (team id, key id).
    pub credential: Option<(String, String)>,
    /// `scheme://host:port` of the endpoint.
    pub origin: String,
    pub ca_pem: Option<Vec<u8>>,
    pub alpn: Alpn,
    pub transport: String,
    pub connections: usize,
    pub streams_per_connection: usize,
}

impl PoolKey {
    pub fn new(
        provider: &'static str,
        credential: Option<(String, String)>,
        endpoint: &reqwest::Url,
        tls: &SharedTls,
        transport: &Transport,
        limits: ConnectionLimits,
    ) -> PoolKey {
        PoolKey {
            provider,
            credential,
            origin: endpoint.origin().ascii_serialization(),
            ca_pem: tls.ca_pem.clone(),
            alpn: tls.alpn,
            transport: transport.id.clone(),
            connections: limits.connections,
            streams_per_connection: limits.streams_per_connection,
        }
    }
}

fn pool_registry() -> &'static Mutex<HashMap<PoolKey, Weak<Connections>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<PoolKey, Weak<Connections>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// Whether HTTP/2 says the server refused the request before processing it.
fn unprocessed(error: &reqwest::Error) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(error);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.is_remote());
        }
        source = e.source();
    }
    false
}

/// How a worker reaches the providers: its request timeout and, with `[worker] https_proxy`, the
/// HTTP proxy every connection (APNs, FCM, OAuth) is tunnelled through with CONNECT.
#[derive(Clone)]
pub struct Transport {
    pub request_timeout: Duration,
    pub proxy: Option<reqwest::Proxy>,
    /// The timeout, proxy URL and proxy credentials, telling transports apart for sharing
    /// connections ([`PoolKey`]); never printed.
    id: String,
}

impl Transport {
    /// Straight to the providers.
    pub fn direct(request_timeout: Duration) -> Transport {
        Transport {
            request_timeout,
            proxy: None,
            id: format!("{request_timeout:?}"),
        }
    }

    pub fn for_worker(worker: &WorkerSettings) -> Result<Transport, ProviderError> {
        let mut transport = Transport::direct(worker.request_timeout());
        let Some(url) = &worker.https_proxy else {
            return Ok(transport);
        };
        let bad = |problem: String| ProviderError::BadProxy {
            url: url.clone(),
            problem,
        };
        let mut proxy = reqwest::Proxy::all(url.as_str()).map_err(|e| bad(error_chain(&e)))?;
        let credentials = worker.proxy_credentials().map_err(|e| bad(e.to_string()))?;
        transport.id.push_str(&format!(" {url}"));
        if let Some(credentials) = credentials {
            proxy = proxy.basic_auth(&credentials.user, &credentials.password);
            transport
                .id
                .push_str(&format!(" {}:{}", credentials.user.len(), credentials.user));
            transport.id.push_str(&credentials.password);
        }
        transport.proxy = Some(proxy);
        Ok(transport)
    }
}

/// An HTTP client trusting the system's usual roots plus, when configured, `ca_file` (a sandbox,
/// a fake provider or an intercepting proxy), going through the transport's proxy if any.
fn client_builder(
    ca_file: Option<&Path>,
    transport: &Transport,
) -> Result<reqwest::ClientBuilder, ProviderError> {
    let mut builder = base_builder(transport).use_rustls_tls();
    if let Some(path) = ca_file {
        for cert in ca_certificates(path)? {
            builder = builder.add_root_certificate(cert);
        }
    }
    Ok(builder)
}

/// What [`client_builder`] builds, but with TLS settings shared by every client trusting the
/// same roots (see [`SharedTls`]). Only for clients without a TLS client certificate.
fn shared_tls_builder(tls: &SharedTls, transport: &Transport) -> reqwest::ClientBuilder {
    base_builder(transport).use_preconfigured_tls(tls.config.as_ref().clone())
}

/// The timeouts, keep-alive and proxy of every provider client.
fn base_builder(transport: &Transport) -> reqwest::ClientBuilder {
    let request_timeout = transport.request_timeout;
    let builder = reqwest::Client::builder()
        .timeout(request_timeout)
        .connect_timeout(request_timeout)
        // Idle connections are kept: reconnecting is what costs, and APNs treats rapid
        // connect/disconnect cycles as abuse.
        .pool_idle_timeout(None)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .http2_keep_alive_timeout(Duration::from_secs(10))
        .http2_keep_alive_while_idle(true);
    match &transport.proxy {
        Some(proxy) => builder.proxy(proxy.clone()),
        // Only the configured proxy: an HTTPS_PROXY in the worker's environment is not ours.
        None => builder.no_proxy(),
    }
}

/// The certificates of a `ca_file` (at least one).
fn ca_certificates(path: &Path) -> Result<Vec<reqwest::Certificate>, ProviderError> {
    parse_ca_certificates(path, &read_file(path)?)
}

fn parse_ca_certificates(
    path: &Path,
    pem: &[u8],
) -> Result<Vec<reqwest::Certificate>, ProviderError> {
    let certs = reqwest::Certificate::from_pem_bundle(pem)
        .map_err(|e| ProviderError::bad_file(path, format!("not a PEM certificate bundle: {e}")))?;
    if certs.is_empty() {
        return Err(ProviderError::bad_file(path, "no certificate found"));
    }
    Ok(certs)
}

/// Which protocols a client offers in the TLS handshake (ALPN).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alpn {
    /// `h2` alone: APNs speaks nothing but HTTP/2.
    Http2,
    /// `h2`, then `http/1.1`: HTTP/2 where the server offers it.
    Http2OrHttp1,
}

/// The TLS settings (trust roots, session cache) of clients that present no certificate of
/// their own: Mozilla's roots plus a `ca_file`, built once per distinct bundle and ALPN list and
/// shared by every client of the process using them, like [`apns::ProviderToken`]s. A client
/// building its own holds its own root store and a session cache sized for 256 servers, which a
/// worker with a thousand apps would hold a thousand times.
///
/// The bundle is told apart by its contents, so a `ca_file` rewritten in place (and the app
/// rebuilt by a reload) gets settings of its own.
#[derive(Clone)]
pub struct SharedTls {
    config: Arc<rustls::ClientConfig>,
    ca_pem: Option<Vec<u8>>,
    alpn: Alpn,
}

type TlsKey = (Option<Vec<u8>>, Alpn);

fn shared_tls_registry() -> &'static Mutex<HashMap<TlsKey, Weak<rustls::ClientConfig>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<TlsKey, Weak<rustls::ClientConfig>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

impl SharedTls {
    /// The settings for `ca_file` (none: Mozilla's roots alone) and `alpn`; a bad file is an
    /// error naming it.
    pub fn get(ca_file: Option<&Path>, alpn: Alpn) -> Result<SharedTls, ProviderError> {
        let pem = ca_file.map(read_file).transpose()?;
        let key = (pem, alpn);
        let mut registry = shared_tls_registry()
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(config) = registry.get(&key).and_then(Weak::upgrade) {
            return Ok(SharedTls {
                config,
                ca_pem: key.0,
                alpn,
            });
        }
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let (Some(path), Some(pem)) = (ca_file, &key.0) {
            parse_ca_certificates(path, pem)?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let added = cert
                    .map_err(|e| e.to_string())
                    .and_then(|der| roots.add(der).map_err(|e| e.to_string()));
                if let Err(problem) = added {
                    return Err(ProviderError::bad_file(
                        path,
                        format!("not a usable CA certificate: {problem}"),
                    ));
                }
            }
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| ProviderError::HttpClient {
            provider: "TLS",
            detail: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = match alpn {
            Alpn::Http2 => vec![b"h2".to_vec()],
            Alpn::Http2OrHttp1 => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        };
        let config = Arc::new(config);
        registry.retain(|_, config| config.strong_count() > 0);
        registry.insert(key.clone(), Arc::downgrade(&config));
        Ok(SharedTls {
            config,
            ca_pem: key.0,
            alpn,
        })
    }
}

/// reqwest's top-level message ("error sending request") hides the cause; the chain names it
/// (connection refused, certificate unknown, timed out...).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The URL holds the device token, which must not reach logs or audit rows through an error
/// message; the response's `url` field already says where the request went.
fn send_error(error: reqwest::Error) -> String {
    error_chain(&error.without_url())
}

/// What came back over HTTP, before provider-specific interpretation.
struct RawAnswer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
    /// Set when the status arrived but the body could not be read.
    body_error: Option<String>,
}

#[cfg(test)]
impl RawAnswer {
    /// An answer as a provider would send it, for the parsers' tests.
    fn for_test(status: u16, headers: &[(&str, &str)], body: Value) -> RawAnswer {
        let mut map = reqwest::header::HeaderMap::new();
        for (name, value) in headers {
            map.insert(
                reqwest::header::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                value.parse().expect("header value"),
            );
        }
        RawAnswer {
            status,
            headers: map,
            body,
            body_error: None,
        }
    }
}

async fn read_answer(response: reqwest::Response) -> RawAnswer {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let (body, body_error) = match response.bytes().await {
        Ok(bytes) => (parse_body(&bytes), None),
        Err(e) => (json!({}), Some(send_error(e))),
    };
    RawAnswer {
        status,
        headers,
        body,
        body_error,
    }
}

fn parse_body(bytes: &[u8]) -> Value {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return json!({});
    }
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

fn header_str<'a>(headers: &'a reqwest::header::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// `Retry-After` in its delta-seconds form, the one FCM uses; an HTTP date is ignored and the
/// caller falls back to its own back-off.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    header_str(headers, "retry-after")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

fn reason_phrase(status: u16) -> &'static str {
    reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;
    use pushfleet_core::config::{ApnsSettings, FcmSettings};
    use std::path::PathBuf;

    fn testdata(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/providers/testdata")
            .join(name)
    }

    fn temp_dir(what: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pushfleet-{what}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    fn apns(endpoint: &str, key_id: &str, ca_file: Option<PathBuf>) -> ApnsSettings {
        ApnsSettings {
            endpoint: endpoint.into(),
            ca_file,
            key_file: Some(testdata("apns-test-key.p8")),
            key_id: Some(key_id.into()),
            team_id: Some("TEAMPOOLED".into()),
            cert_file: None,
            cert_key_file: None,
            token_refresh_secs: 3000,
        }
    }

    fn apns_pool(settings: &ApnsSettings, limits: ConnectionLimits) -> Arc<Connections> {
        let transport = Transport::direct(Duration::from_secs(5));
        apns::ApnsClient::with_transport(settings, &transport, limits)
            .expect("builds")
            .connections()
            .clone()
    }

    #[test]
    fn apns_apps_of_one_team_and_key_share_their_connections() {
        let limits = ConnectionLimits::default();
        let ca = Some(testdata("test-ca.pem"));
        let one = apns_pool(
            &apns("https://127.0.0.1:8443/", "POOLKEY001", ca.clone()),
            limits,
        );
        let same = apns_pool(
            &apns("https://127.0.0.1:8443/x", "POOLKEY001", ca.clone()),
            limits,
        );
        assert!(Arc::ptr_eq(&one, &same));
        // The same bundle in another file is the same trust.
        let dir = temp_dir("ca");
        let copy = dir.join("copy.pem");
        std::fs::copy(testdata("test-ca.pem"), &copy).expect("copy");
        let copied = apns_pool(
            &apns("https://127.0.0.1:8443/", "POOLKEY001", Some(copy)),
            limits,
        );
        assert!(Arc::ptr_eq(&one, &copied));

        let others = [
            apns_pool(
                &apns("https://127.0.0.1:8443/", "POOLKEY002", ca.clone()),
                limits,
            ),
            apns_pool(
                &apns("https://127.0.0.1:9443/", "POOLKEY001", ca.clone()),
                limits,
            ),
            apns_pool(
                &apns(
                    "https://127.0.0.1:8443/",
                    "POOLKEY001",
                    Some(testdata("test-ca-2.pem")),
                ),
                limits,
            ),
            apns_pool(&apns("https://127.0.0.1:8443/", "POOLKEY001", None), limits),
            apns_pool(
                &apns("https://127.0.0.1:8443/", "POOLKEY001", ca.clone()),
                ConnectionLimits {
                    connections: 1,
                    streams_per_connection: 10,
                },
            ),
        ];
        for other in &others {
            assert!(!Arc::ptr_eq(&one, other));
        }
        // A pool no app holds any more is not kept.
        let weak = Arc::downgrade(&one);
        drop((one, same, copied));
        assert!(weak.upgrade().is_none());
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn fcm_apps_of_one_origin_share_their_connections() {
        let dir = temp_dir("fcm-pool");
        let account = dir.join("service-account.json");
        std::fs::write(
            &account,
            oauth::tests::service_account_json(None, "https://x/token"),
        )
        .expect("write");
        let client = |endpoint: &str, project: &str, ca_file: Option<PathBuf>| {
            let settings = FcmSettings {
                service_account_file: account.clone(),
                endpoint: endpoint.into(),
                ca_file,
                project_id: Some(project.into()),
            };
            fcm::FcmClient::with_transport(
                &settings,
                &Transport::direct(Duration::from_secs(5)),
                ConnectionLimits::default(),
            )
            .expect("builds")
        };
        let ca = Some(testdata("test-ca.pem"));
        let a = client("https://fcm.pool.example/", "project-a", ca.clone());
        let b = client("https://fcm.pool.example", "project-b", ca.clone());
        assert!(Arc::ptr_eq(a.connections(), b.connections()));
        assert_ne!(a.send_url(), b.send_url());
        let elsewhere = client("https://fcm2.pool.example/", "project-a", ca.clone());
        assert!(!Arc::ptr_eq(a.connections(), elsewhere.connections()));
        let other_ca = client("https://fcm.pool.example/", "project-a", None);
        assert!(!Arc::ptr_eq(a.connections(), other_ca.connections()));
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn tls_settings_follow_the_bundle_contents() {
        let dir = temp_dir("tls");
        let bundle = dir.join("ca.pem");
        std::fs::copy(testdata("test-ca.pem"), &bundle).expect("copy");
        let first = SharedTls::get(Some(&bundle), Alpn::Http2).expect("loads");
        let again = SharedTls::get(Some(&bundle), Alpn::Http2).expect("loads");
        assert!(Arc::ptr_eq(&first.config, &again.config));
        assert_eq!(first.config.alpn_protocols, vec![b"h2".to_vec()]);
        let both = SharedTls::get(Some(&bundle), Alpn::Http2OrHttp1).expect("loads");
        assert!(!Arc::ptr_eq(&first.config, &both.config));
        assert_eq!(
            both.config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        // Rewritten in place: new settings.
        std::fs::copy(testdata("test-ca-2.pem"), &bundle).expect("copy");
        let rotated = SharedTls::get(Some(&bundle), Alpn::Http2).expect("loads");
        assert!(!Arc::ptr_eq(&first.config, &rotated.config));

        std::fs::write(&bundle, "hello").expect("write");
        let Err(e) = SharedTls::get(Some(&bundle), Alpn::Http2) else {
            panic!("a file without certificates must fail");
        };
        assert!(
            matches!(&e, ProviderError::BadFile { path, problem }
                if path.ends_with("ca.pem") && problem.contains("no certificate")),
            "{e:?}"
        );
        let Err(e) = SharedTls::get(Some(&dir.join("missing.pem")), Alpn::Http2) else {
            panic!("a missing file must fail");
        };
        assert!(
            matches!(&e, ProviderError::Unreadable { path, .. } if path.ends_with("missing.pem")),
            "{e:?}"
        );
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn no_answer_is_a_502() {
        for platform in [Platform::Apple, Platform::Firebase] {
            let r = ProviderResponse::transport_failure(
                platform,
                "https://api.push.apple.com/3/device/abc".into(),
                "connection refused".into(),
                Instant::now(),
            );
            assert_eq!(
                sylk_result(platform, &r),
                (
                    502,
                    "Bad Gateway: connection refused".to_string(),
                    json!({})
                )
            );
        }
    }

    #[test]
    fn bodies_are_parsed_leniently() {
        assert_eq!(parse_body(b""), json!({}));
        assert_eq!(parse_body(b" \n"), json!({}));
        assert_eq!(
            parse_body(br#"{"reason":"Shutdown"}"#),
            json!({"reason": "Shutdown"})
        );
        assert_eq!(parse_body(b"upstream gone"), json!("upstream gone"));
    }

    #[test]
    fn retry_after_takes_seconds_only() {
        let mut headers = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert("retry-after", "120".parse().expect("header value"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(120)));
        headers.insert(
            "retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT"
                .parse()
                .expect("header value"),
        );
        assert_eq!(retry_after(&headers), None);
    }
}
