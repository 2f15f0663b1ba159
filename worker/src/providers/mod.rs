//! The provider side of a worker: one long-lived HTTP client per configured app, talking to APNs
//! or FCM, what the provider said as a [`ProviderResponse`], its meaning from the answer table
//! ([`answers`]), and the Sylk-shaped answer synchronous callers expect.

pub mod answers;
pub mod apns;
mod error;
pub mod fcm;
pub mod oauth;
pub mod webpush;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
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
    WebPush(webpush::WebPushClient),
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
                    .map(Provider::WebPush),
                None => Err(ProviderError::MissingSection("webpush")),
            },
            (Platform::Apple, Some(settings), _) => {
                apns::ApnsClient::with_transport(settings, &transport)
                    .map(|client| Provider::Apns(client.with_limits(limits)))
            }
            (Platform::Firebase, _, Some(settings)) => {
                fcm::FcmClient::with_transport(settings, &transport)
                    .map(|client| Provider::Fcm(client.with_limits(limits)))
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

    pub fn with_limits(self, limits: ConnectionLimits) -> Connections {
        Connections {
            room: Arc::new(tokio::sync::Semaphore::new(
                limits.connections * limits.streams_per_connection,
            )),
            limits,
            ..self
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
}

impl Transport {
    /// Straight to the providers.
    pub fn direct(request_timeout: Duration) -> Transport {
        Transport {
            request_timeout,
            proxy: None,
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
        if let Some(credentials) = credentials {
            proxy = proxy.basic_auth(&credentials.user, &credentials.password);
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
    let request_timeout = transport.request_timeout;
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(request_timeout)
        .connect_timeout(request_timeout)
        // Idle connections are kept: reconnecting is what costs, and APNs treats rapid
        // connect/disconnect cycles as abuse.
        .pool_idle_timeout(None)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .http2_keep_alive_timeout(Duration::from_secs(10))
        .http2_keep_alive_while_idle(true);
    builder = match &transport.proxy {
        Some(proxy) => builder.proxy(proxy.clone()),
        // Only the configured proxy: an HTTPS_PROXY in the worker's environment is not ours.
        None => builder.no_proxy(),
    };
    if let Some(path) = ca_file {
        let pem = read_file(path)?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            ProviderError::bad_file(path, format!("not a PEM certificate bundle: {e}"))
        })?;
        if certs.is_empty() {
            return Err(ProviderError::bad_file(path, "no certificate found"));
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    Ok(builder)
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
