//! Configuration: one TOML file per process (`--config <file>`), overridden by environment variables
//! named `PUSHFLEET__<SECTION>__<KEY>`, validated right after loading so that a mistake is reported
//! in one line at start-up rather than as a failed push later. Every key is documented in README.md.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::policy::{EventPolicies, EventPolicyOverride};

pub const ENV_PREFIX: &str = "PUSHFLEET__";

/// A configuration problem, worded for the person who has to fix the file: each names the key,
/// section or environment variable at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The text is not TOML at all.
    #[error("not valid TOML: {0}")]
    Syntax(String),
    /// TOML that does not fit the settings: an unknown key, a value of the wrong type.
    #[error("{0}")]
    Shape(String),
    /// A value outside what the key accepts.
    #[error("{key}: {problem}")]
    Invalid { key: String, problem: String },
    /// A file the configuration names cannot be opened.
    #[error("{key}: cannot read {}: {source}", path.display())]
    UnreadableFile {
        key: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("environment override {variable}: {problem}")]
    Environment { variable: String, problem: String },
    /// Any of the above, in the file it was found in.
    #[error("{}: {source}", path.display())]
    InFile {
        path: PathBuf,
        source: Box<ConfigError>,
    },
}

impl ConfigError {
    pub fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key: key.into(),
            problem: problem.into(),
        }
    }

    /// The key (or environment variable) at fault, when the problem is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } | ConfigError::UnreadableFile { key, .. } => Some(key),
            ConfigError::Environment { variable, .. } => Some(variable),
            ConfigError::InFile { source, .. } => source.key(),
            _ => None,
        }
    }
}

/// Fails with `problem` about `key` unless `holds`.
fn ensure(holds: bool, key: &str, problem: &str) -> Result<(), ConfigError> {
    if holds {
        Ok(())
    } else {
        Err(ConfigError::invalid(key, problem))
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub ingest: IngestSettings,
    #[serde(default)]
    pub http: HttpSettings,
    #[serde(default)]
    pub rabbitmq: RabbitSettings,
    #[serde(default)]
    pub postgres: PostgresSettings,
    #[serde(default)]
    pub worker: WorkerSettings,
    #[serde(default)]
    pub retry: RetrySettings,
    #[serde(default)]
    pub log: LogSettings,
    #[serde(default)]
    pub audit: AuditSettings,
    #[serde(default)]
    pub wakeup: WakeupSettings,
    /// The UnifiedPush-over-XMPP gateway; absent, `/UP` answers 404 and no worker connects.
    #[serde(default)]
    pub xmpp: Option<XmppSettings>,
    /// Per-event overrides of the event policy, keyed by event name.
    #[serde(default)]
    pub events: BTreeMap<String, EventPolicyOverride>,
    #[serde(default)]
    pub apps: Vec<AppSettings>,
}

/// Whether `POST /push` waits for the provider's answer (what Sylk clients expect) or answers 202.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseMode {
    Sync,
    Async,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestSettings {
    pub listen: SocketAddr,
    /// HTTPS instead of HTTP: the certificate chain (PEM, leaf first) and its key, re-read on
    /// SIGHUP. Both or neither.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub mode: ResponseMode,
    pub sync_timeout_ms: u64,
    /// Request bodies above this size get 413.
    pub max_body_bytes: usize,
    /// How long a publish may wait for the broker before the caller gets 503.
    pub publish_timeout_ms: u64,
    /// Job messages per lane that may await the broker's confirm at once; jobs accepted while
    /// all of them wait share the next message. 1 coalesces the most, more answers sooner.
    pub publishes_in_flight: usize,
    /// Addresses and networks (`10.0.0.0/8`, `192.0.2.7`) allowed to call the API; empty allows
    /// everyone. Checked by ingest at start-up.
    pub allowed_hosts: Vec<String>,
    /// On SIGTERM, how long requests in progress (sync waits included) may take to finish before
    /// their connections are closed.
    pub shutdown_timeout_ms: u64,
    /// Devices a v2 account may hold; a new one beyond that gets 409.
    pub max_devices_per_account: usize,
    /// A second listener for `/metrics`, `/health` and `/ready`; when set, the API listener no
    /// longer serves them, so that admitting Prometheus does not admit it to push.
    pub admin_listen: Option<SocketAddr>,
    /// Addresses and networks allowed on the admin listener; empty allows everyone.
    pub admin_allowed_hosts: Vec<String>,
    /// Answers carry the device token itself, as the reference's did, instead of its
    /// fingerprint: only for clients that need it.
    pub raw_tokens_in_answers: bool,
    /// Every API request must carry a valid API key (`Authorization: Bearer …`); probes and the
    /// greeting excepted.
    pub require_api_key: bool,
    /// Serve a non-loopback address with neither `require_api_key` nor `allowed_hosts`: without
    /// it ingest refuses to start rather than open the API to whoever reaches the port.
    pub allow_anonymous: bool,
    /// How often the API key table is reloaded: the longest a revoked key keeps working and a
    /// new one waits.
    pub api_keys_refresh_ms: u64,
    /// The fraction of each key's rate limit this ingest allows, when several ingest hosts
    /// share the traffic.
    pub rate_limit_share: f64,
}

impl Default for IngestSettings {
    fn default() -> Self {
        IngestSettings {
            listen: "127.0.0.1:8400".parse().expect("valid default address"),
            tls_cert_file: None,
            tls_key_file: None,
            mode: ResponseMode::Sync,
            sync_timeout_ms: 5000,
            max_body_bytes: 64 * 1024,
            publish_timeout_ms: 1000,
            publishes_in_flight: 2,
            allowed_hosts: Vec::new(),
            shutdown_timeout_ms: 10_000,
            max_devices_per_account: 20,
            admin_listen: None,
            admin_allowed_hosts: Vec::new(),
            raw_tokens_in_answers: false,
            require_api_key: false,
            allow_anonymous: false,
            api_keys_refresh_ms: 2000,
            rate_limit_share: 1.0,
        }
    }
}

/// Limits of every HTTP listener (ingest's API, the worker's probes and metrics), so that idle,
/// slow or too many clients cannot take a listener down.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// A request head (request line and headers) must be complete this long after the
    /// connection opened or its first byte came; otherwise the connection is closed.
    pub header_read_timeout_ms: u64,
    /// A request body must be complete this long after its head; otherwise 408.
    pub request_body_timeout_ms: u64,
    /// A keep-alive connection without a request in progress is closed after this long.
    pub idle_timeout_ms: u64,
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// Requests in progress at once (probes excepted); further ones get 503 at once.
    pub max_in_flight_requests: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            header_read_timeout_ms: 5_000,
            request_body_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            max_connections: 4096,
            max_in_flight_requests: 4096,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RabbitSettings {
    /// The broker, for a single node; replaced by `urls` when that is set (a file sets one of
    /// the two).
    pub url: String,
    /// The nodes of a RabbitMQ cluster: processes connect to the first that answers, starting
    /// from a node chosen per process, and fail over to the others (see `topology::connect`).
    pub urls: Option<Vec<String>>,
    /// Prefix of every exchange and queue name, so that several deployments (or test runs) can
    /// share one virtual host.
    pub namespace: String,
    /// Jobs a worker has in flight per lane, and the unacknowledged messages it holds per lane
    /// (a message carries one job or a batch of them).
    pub prefetch: u16,
    pub connect_timeout_ms: u64,
    /// The delays a job can wait before its next attempt: one retry queue per delay and lane.
    /// A computed back-off is rounded up to the next tier.
    pub retry_tiers_ms: Vec<u64>,
    /// Deliveries of one message before a consumed queue dead-letters it instead of handing it
    /// out again: a message that brings its consumer down every time does not loop.
    pub delivery_limit: u32,
    /// Messages (single jobs or batches) a lane holds at most; beyond it the broker refuses the
    /// publish and the caller gets 503. 0: no limit.
    pub lane_max_length: u64,
    /// How long the dead letters kept for operators (`<ns>.dead`, `<ns>.audit.dead`) stay.
    pub dead_letter_max_age_secs: u64,
    /// Extra trust roots (PEM) for `amqps://` nodes, next to Mozilla's.
    pub ca_file: Option<PathBuf>,
}

impl RabbitSettings {
    /// The broker nodes to connect to: `urls`, or the single `url`.
    pub fn nodes(&self) -> &[String] {
        self.urls
            .as_deref()
            .unwrap_or(std::slice::from_ref(&self.url))
    }
}

impl Default for RabbitSettings {
    fn default() -> Self {
        RabbitSettings {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            urls: None,
            namespace: "pushfleet".into(),
            prefetch: 256,
            connect_timeout_ms: 5000,
            retry_tiers_ms: vec![1_000, 2_000, 5_000, 15_000, 60_000, 300_000],
            delivery_limit: 20,
            lane_max_length: 1_000_000,
            dead_letter_max_age_secs: 7 * 24 * 3600,
            ca_file: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresSettings {
    /// `?sslmode=` chooses TLS (see `tls::SslMode`); without it connections are plain.
    pub url: String,
    pub pool_size: usize,
    pub connect_timeout_ms: u64,
    /// Extra trust roots (PEM) for `sslmode=verify-ca`/`verify-full` (and `require`), next to
    /// Mozilla's.
    pub ca_file: Option<PathBuf>,
}

impl Default for PostgresSettings {
    fn default() -> Self {
        PostgresSettings {
            url: "postgres://postgres@127.0.0.1:5432/pushfleet".into(),
            pool_size: 8,
            connect_timeout_ms: 5000,
            ca_file: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSettings {
    /// Address of the worker's own HTTP endpoint (`/metrics`, `/health`).
    pub listen: SocketAddr,
    /// Name written into `delivery_attempts.worker`; defaults to `<hostname>-<pid>`.
    pub id: Option<String>,
    /// Per-request timeout towards APNs, FCM and the OAuth endpoint.
    pub request_timeout_ms: u64,
    /// The audit sink writes at most this many outcomes per transaction...
    pub audit_batch_size: usize,
    /// ...and waits at most this long to fill a batch.
    pub audit_flush_ms: u64,
    /// Whether this process runs the audit sink (Postgres writer) next to the senders.
    pub audit_sink: bool,
    /// HTTP/2 connections a worker may open per app when the open ones are saturated; apps
    /// with interchangeable connections (one FCM endpoint, one APNs team and key) share them.
    pub max_connections_per_app: usize,
    /// Requests in flight on one connection; the provider's own SETTINGS_MAX_CONCURRENT_STREAMS
    /// is respected below this bound.
    pub max_streams_per_connection: usize,
    /// How often the list of tokens providers declared dead is reloaded from Postgres.
    pub invalid_tokens_refresh_secs: u64,
    /// On SIGTERM, how long the jobs in hand may take to finish before the worker closes its
    /// connections anyway (unfinished jobs go back to their queue).
    pub shutdown_timeout_ms: u64,
    /// How often the apps' credential and CA files are checked for changes (a rotated key or
    /// certificate), which then take effect as on SIGHUP; 0 checks only on SIGHUP.
    pub credentials_check_secs: u64,
    /// An HTTP proxy (`http://host:port`) through which every connection to APNs, FCM and the
    /// OAuth endpoint is tunnelled with CONNECT.
    pub https_proxy: Option<String>,
    /// A file holding `user:password` for the proxy's Basic authentication.
    pub https_proxy_credentials_file: Option<PathBuf>,
}

/// The audit trail's lifetime.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSettings {
    /// Audit rows and dead-token entries are kept at least this many days; a monthly partition
    /// goes once its last day is older.
    pub retention_days: u32,
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings { retention_days: 90 }
    }
}

impl AuditSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        ensure(
            (1..=36_500).contains(&self.retention_days),
            "[audit] retention_days",
            "must be between 1 and 36500",
        )
    }
}

/// Registration wake-ups: background pushes that make an app register again before its
/// registration expires, asked for through the API or by `pushfleet wakeup-scheduler`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WakeupSettings {
    /// A device is woken at most once in this window, however often a wake-up is asked for.
    pub wakeup_min_interval_secs: u64,
    /// The scheduler wakes a device once this fraction of its registration's lifetime passed.
    pub register_wakeup_threshold: f64,
    /// How often the scheduler looks for devices to wake.
    pub scheduler_interval_secs: u64,
    /// Devices one scheduler instance claims per round.
    pub scheduler_batch_size: u32,
}

impl Default for WakeupSettings {
    fn default() -> Self {
        WakeupSettings {
            wakeup_min_interval_secs: 600,
            register_wakeup_threshold: 0.5,
            scheduler_interval_secs: 60,
            scheduler_batch_size: 500,
        }
    }
}

impl WakeupSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        ensure(
            self.wakeup_min_interval_secs <= 7 * 24 * 3600,
            "[wakeup] wakeup_min_interval_secs",
            "must be between 0 and 604800 (a week)",
        )?;
        ensure(
            self.register_wakeup_threshold > 0.0 && self.register_wakeup_threshold < 1.0,
            "[wakeup] register_wakeup_threshold",
            "must be above 0 and below 1 (a fraction of the registration's lifetime)",
        )?;
        ensure(
            (1..=86_400).contains(&self.scheduler_interval_secs),
            "[wakeup] scheduler_interval_secs",
            "must be between 1 and 86400",
        )?;
        ensure(
            (1..=100_000).contains(&self.scheduler_batch_size),
            "[wakeup] scheduler_batch_size",
            "must be between 1 and 100000",
        )
    }
}

/// The UnifiedPush-over-XMPP gateway: an XEP-0114 component on an XMPP server that hands out
/// endpoints under `endpoint_base` to distributors and forwards what is POSTed to them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XmppSettings {
    /// The component's domain, as the XMPP server knows it (`up.example.org`).
    pub component: String,
    /// The XMPP server's component port (`host:port`).
    pub server: String,
    /// The shared secret of the component, on the first line of this file.
    pub secret_file: PathBuf,
    /// The public URL of ingest's `/UP`: endpoints are `{endpoint_base}?token=…`.
    pub endpoint_base: String,
}

impl XmppSettings {
    /// Reads the component secret: the first line of `secret_file`, not empty.
    pub fn secret(&self) -> Result<String, ConfigError> {
        let key = "[xmpp] secret_file";
        let text = std::fs::read_to_string(&self.secret_file).map_err(|source| {
            ConfigError::UnreadableFile {
                key: key.into(),
                path: self.secret_file.clone(),
                source,
            }
        })?;
        let secret = text.lines().next().unwrap_or_default().trim();
        if secret.is_empty() {
            return Err(ConfigError::invalid(
                key,
                format!("{} holds no secret", self.secret_file.display()),
            ));
        }
        Ok(secret.to_string())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let domain_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.';
        ensure(
            !self.component.is_empty()
                && self.component.len() <= 253
                && self.component.chars().all(domain_char)
                && !self.component.starts_with('.')
                && !self.component.ends_with('.'),
            "[xmpp] component",
            "must be a domain name such as up.example.org",
        )?;
        let port = self
            .server
            .rsplit_once(':')
            .filter(|(host, _)| !host.is_empty())
            .and_then(|(_, port)| port.parse::<u16>().ok());
        ensure(
            port.is_some_and(|p| p > 0),
            "[xmpp] server",
            "must be host:port of the XMPP server's component port, e.g. 127.0.0.1:5347",
        )?;
        let base = url::Url::parse(&self.endpoint_base).ok();
        ensure(
            base.as_ref().is_some_and(|u| {
                matches!(u.scheme(), "https" | "http")
                    && u.host_str().is_some()
                    && u.query().is_none()
                    && u.fragment().is_none()
            }),
            "[xmpp] endpoint_base",
            "must be an http(s) URL without query, e.g. https://push.example.org/UP",
        )?;
        self.secret().map(|_| ())
    }
}

/// The proxy's Basic credentials, from `https_proxy_credentials_file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyCredentials {
    pub user: String,
    pub password: String,
}

impl WorkerSettings {
    /// Reads `https_proxy_credentials_file`: one `user:password` line.
    pub fn proxy_credentials(&self) -> Result<Option<ProxyCredentials>, ConfigError> {
        let Some(path) = &self.https_proxy_credentials_file else {
            return Ok(None);
        };
        let key = "[worker] https_proxy_credentials_file";
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::UnreadableFile {
            key: key.into(),
            path: path.clone(),
            source,
        })?;
        let line = text.lines().next().unwrap_or_default().trim();
        match line.split_once(':') {
            Some((user, password)) if !user.is_empty() => Ok(Some(ProxyCredentials {
                user: user.to_string(),
                password: password.to_string(),
            })),
            _ => Err(ConfigError::invalid(
                key,
                format!("{} must hold user:password", path.display()),
            )),
        }
    }
}

/// Retries of pushes that may succeed later (429, 5xx, no answer): exponential back-off with
/// jitter, a `Retry-After` taking precedence, never past the job's deadline.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySettings {
    /// Sends per job, the first included; a job still failing after them ends `failed`.
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub multiplier: f64,
    /// Randomisation of each delay: 0.3 spreads it over ±30 %.
    pub jitter: f64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            max_attempts: 8,
            initial_backoff_ms: 1_000,
            max_backoff_ms: 300_000,
            multiplier: 2.0,
            jitter: 0.3,
        }
    }
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            listen: "127.0.0.1:8401".parse().expect("valid default address"),
            id: None,
            request_timeout_ms: 10_000,
            audit_batch_size: 500,
            audit_flush_ms: 50,
            audit_sink: true,
            max_connections_per_app: 4,
            max_streams_per_connection: 1000,
            invalid_tokens_refresh_secs: 30,
            shutdown_timeout_ms: 10_000,
            credentials_check_secs: 10,
            https_proxy: None,
            https_proxy_credentials_file: None,
        }
    }
}

impl WorkerSettings {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// A tracing filter such as `info` or `pushfleet_worker=debug,info`; `RUST_LOG` wins.
    pub level: String,
    /// `text` for people, `json` for log shippers.
    pub format: LogFormat,
    /// Log lines show callers' identities (SIP URIs, phone numbers, accounts) in full; by
    /// default they show a fingerprint of each.
    pub identities: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            level: "info".into(),
            format: LogFormat::Text,
            identities: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Platform {
    Apple,
    Firebase,
    /// WebPush (RFC 8030) endpoints, UnifiedPush distributors among them.
    #[serde(rename = "unifiedpush", alias = "webpush")]
    UnifiedPush,
}

impl Platform {
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Apple => "apple",
            Platform::Firebase => "firebase",
            Platform::UnifiedPush => "unifiedpush",
        }
    }

    /// The reference's `fix_platform_name`: case-sensitive aliases.
    pub fn from_alias(name: &str) -> Option<Platform> {
        match name {
            "apple" | "ios" | "apns" => Some(Platform::Apple),
            "firebase" | "android" | "fcm" => Some(Platform::Firebase),
            "unifiedpush" | "webpush" => Some(Platform::UnifiedPush),
            _ => None,
        }
    }

    /// "Apple" / "Firebase", as the reference capitalises it in messages.
    pub fn title(self) -> &'static str {
        match self {
            Platform::Apple => "Apple",
            Platform::Firebase => "Firebase",
            Platform::UnifiedPush => "UnifiedPush",
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which payload layout an app's client expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AppType {
    Sylk,
    Linphone,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSettings {
    pub id: String,
    pub platform: Platform,
    #[serde(rename = "type")]
    pub app_type: AppType,
    pub apns: Option<ApnsSettings>,
    pub fcm: Option<FcmSettings>,
    /// Remote result logging (Sylk's `log_remote_urls`): every terminal outcome of the app is
    /// POSTed here as JSON, in batches.
    #[serde(default)]
    pub log_url: Option<String>,
    /// The `Authorization` header value sent with each request (`Bearer …`).
    #[serde(default)]
    pub log_auth: Option<String>,
    /// How long one request to the log server may take.
    #[serde(default = "default_log_timeout_ms")]
    pub log_timeout_ms: u64,
    /// A field of the log server's JSON answer copied into pushfleet's own log line.
    #[serde(default)]
    pub log_key: Option<String>,
    /// Outcomes held for the log server while it is away; beyond it the oldest are dropped.
    #[serde(default = "default_log_buffer")]
    pub log_buffer: usize,
    /// False blanks the caller's URI and display name in every payload of this app.
    #[serde(default = "default_display_caller")]
    pub display_caller: bool,
    pub webpush: Option<WebPushSettings>,
}

fn default_display_caller() -> bool {
    true
}

/// One app's remote result logging, as the worker's remote-log consumer reads it at start-up.
type RemoteLog<'a> = (
    &'a str,
    &'a Option<String>,
    &'a Option<String>,
    u64,
    &'a Option<String>,
    usize,
);

fn remote_logs(apps: &[AppSettings]) -> Vec<RemoteLog<'_>> {
    apps.iter()
        .filter(|app| app.log_url.is_some())
        .map(|app| {
            (
                app.id.as_str(),
                &app.log_url,
                &app.log_auth,
                app.log_timeout_ms,
                &app.log_key,
                app.log_buffer,
            )
        })
        .collect()
}

fn default_log_timeout_ms() -> u64 {
    5000
}

fn default_log_buffer() -> usize {
    10_000
}

impl AppSettings {
    /// The files the app's client reads, by key: keys, certificates, service account, CA.
    pub fn files(&self) -> Vec<(&'static str, &Path)> {
        let mut files = Vec::new();
        if let Some(apns) = &self.apns {
            for (key, path) in [
                ("apns.ca_file", &apns.ca_file),
                ("apns.key_file", &apns.key_file),
                ("apns.cert_file", &apns.cert_file),
                ("apns.cert_key_file", &apns.cert_key_file),
            ] {
                if let Some(path) = path {
                    files.push((key, path.as_path()));
                }
            }
        }
        if let Some(fcm) = &self.fcm {
            files.push((
                "fcm.service_account_file",
                fcm.service_account_file.as_path(),
            ));
            if let Some(ca) = &fcm.ca_file {
                files.push(("fcm.ca_file", ca.as_path()));
            }
        }
        if let Some(webpush) = &self.webpush {
            files.push(("webpush.vapid_key_file", webpush.vapid_key_file.as_path()));
            if let Some(ca) = &webpush.ca_file {
                files.push(("webpush.ca_file", ca.as_path()));
            }
        }
        files
    }
}

pub const APNS_PRODUCTION: &str = "https://api.push.apple.com";
pub const FCM_PRODUCTION: &str = "https://fcm.googleapis.com";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsSettings {
    #[serde(default = "default_apns_endpoint")]
    pub endpoint: String,
    /// An extra trust root for the APNs server certificate (a sandbox or a proxy).
    pub ca_file: Option<PathBuf>,
    /// Token auth: the .p8 key, its key id and the team id.
    pub key_file: Option<PathBuf>,
    pub key_id: Option<String>,
    pub team_id: Option<String>,
    /// Certificate auth: PEM certificate and its key (the key may be in the same file).
    pub cert_file: Option<PathBuf>,
    pub cert_key_file: Option<PathBuf>,
    /// How often a fresh provider token is minted; Apple wants between 20 and 60 minutes.
    #[serde(default = "default_token_refresh_secs")]
    pub token_refresh_secs: u64,
}

fn default_apns_endpoint() -> String {
    APNS_PRODUCTION.into()
}

fn default_token_refresh_secs() -> u64 {
    50 * 60
}

/// How an APNs app proves itself.
pub enum ApnsAuth<'a> {
    Token {
        key_file: &'a Path,
        key_id: &'a str,
        team_id: &'a str,
    },
    Certificate {
        cert_file: &'a Path,
        key_file: &'a Path,
    },
}

impl ApnsSettings {
    /// Validation guarantees exactly one of the two is complete.
    pub fn auth(&self) -> ApnsAuth<'_> {
        match (&self.key_file, &self.key_id, &self.team_id) {
            (Some(key_file), Some(key_id), Some(team_id)) => ApnsAuth::Token {
                key_file,
                key_id,
                team_id,
            },
            _ => {
                let cert_file = self.cert_file.as_deref().expect("validated");
                ApnsAuth::Certificate {
                    cert_file,
                    key_file: self.cert_key_file.as_deref().unwrap_or(cert_file),
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmSettings {
    /// Google service-account JSON; its `token_uri` is where OAuth goes.
    pub service_account_file: PathBuf,
    #[serde(default = "default_fcm_endpoint")]
    pub endpoint: String,
    pub ca_file: Option<PathBuf>,
    /// The Firebase project; defaults to the service account's `project_id`.
    pub project_id: Option<String>,
}

fn default_fcm_endpoint() -> String {
    FCM_PRODUCTION.into()
}

/// A UnifiedPush/WebPush app: the endpoints come with each device, so only the application
/// server's own identity (VAPID, RFC 8292) and the hosts exempt from the public-address rule are
/// configured.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebPushSettings {
    /// The application server's P-256 private key (PEM, PKCS#8) that signs VAPID tokens.
    pub vapid_key_file: PathBuf,
    /// The contact push services see in each VAPID token: `mailto:` or `https:`.
    pub vapid_subject: String,
    /// Endpoint hosts (names or addresses, compared without case) that may resolve to
    /// loopback, private or otherwise non-public addresses: an on-premises distributor.
    #[serde(default)]
    pub allowed_endpoint_hosts: Vec<String>,
    /// Extra trust roots (PEM) for the endpoints' certificates, next to Mozilla's.
    pub ca_file: Option<PathBuf>,
}

impl WebPushSettings {
    /// Whether `host` is exempt from the public-address rule.
    pub fn allows_host(&self, host: &str) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.allowed_endpoint_hosts
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(host))
    }
}

impl Settings {
    /// Reads `path`, applies `PUSHFLEET__…` overrides from the process environment, validates.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Unreadable {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Settings::from_toml(&text, std::env::vars(), base).map_err(|e| ConfigError::InFile {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// Parses TOML text with the given environment; relative file paths resolve against `base`.
    pub fn from_toml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
        base: &Path,
    ) -> Result<Settings, ConfigError> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax(e.message().to_string()))?;
        let overrides: Vec<(String, String)> = env
            .into_iter()
            .filter_map(|(key, value)| Some((key.strip_prefix(ENV_PREFIX)?.to_string(), value)))
            .collect();
        let broker_keys = BrokerKeys::check(&table, &overrides)?;
        for (path, value) in &overrides {
            apply_override(&mut table, path, value)?;
        }
        broker_keys.settle(&mut table)?;
        let mut settings: Settings = table
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Shape(e.message().to_string()))?;
        settings.resolve_paths(base);
        settings.validate()?;
        Ok(settings)
    }

    /// The event policy with this file's overrides applied (validated at load).
    pub fn event_policies(&self) -> EventPolicies {
        EventPolicies::default()
            .with_overrides(&self.events)
            .expect("validated at load")
    }

    pub fn app(&self, id: &str, platform: Platform) -> Option<&AppSettings> {
        self.apps
            .iter()
            .find(|a| a.id == id && a.platform == platform)
    }

    /// What differs from `new` among the settings a running process only reads at start-up, by
    /// key or section: a reload applies the rest and reports these as needing a restart. Taking
    /// effect on reload: `[[apps]]` (and the files they name), `[ingest]` `mode`,
    /// `sync_timeout_ms`, `max_devices_per_account` and `raw_tokens_in_answers`, `[retry]`, and
    /// `[worker] credentials_check_secs`.
    pub fn changes_needing_restart(&self, new: &Settings) -> Vec<&'static str> {
        let (a, b) = (&self.ingest, &new.ingest);
        let (w, v) = (&self.worker, &new.worker);
        [
            ("[ingest] listen", a.listen == b.listen),
            (
                "[ingest] tls_cert_file, tls_key_file (their contents are re-read)",
                a.tls_cert_file == b.tls_cert_file && a.tls_key_file == b.tls_key_file,
            ),
            (
                "[ingest] max_body_bytes",
                a.max_body_bytes == b.max_body_bytes,
            ),
            (
                "[ingest] publish_timeout_ms",
                a.publish_timeout_ms == b.publish_timeout_ms,
            ),
            (
                "[ingest] publishes_in_flight",
                a.publishes_in_flight == b.publishes_in_flight,
            ),
            ("[ingest] allowed_hosts", a.allowed_hosts == b.allowed_hosts),
            (
                "[ingest] shutdown_timeout_ms",
                a.shutdown_timeout_ms == b.shutdown_timeout_ms,
            ),
            (
                "[ingest] admin_listen, admin_allowed_hosts",
                a.admin_listen == b.admin_listen && a.admin_allowed_hosts == b.admin_allowed_hosts,
            ),
            (
                "[ingest] require_api_key, allow_anonymous",
                a.require_api_key == b.require_api_key && a.allow_anonymous == b.allow_anonymous,
            ),
            (
                "[ingest] api_keys_refresh_ms, rate_limit_share",
                a.api_keys_refresh_ms == b.api_keys_refresh_ms
                    && a.rate_limit_share == b.rate_limit_share,
            ),
            ("[http]", self.http == new.http),
            ("[rabbitmq]", self.rabbitmq == new.rabbitmq),
            ("[postgres]", self.postgres == new.postgres),
            ("[log]", self.log == new.log),
            ("[events]", self.events == new.events),
            ("[audit]", self.audit == new.audit),
            ("[wakeup]", self.wakeup == new.wakeup),
            ("[xmpp]", self.xmpp == new.xmpp),
            (
                "[[apps]] log_url, log_auth, log_timeout_ms, log_key, log_buffer",
                remote_logs(&self.apps) == remote_logs(&new.apps),
            ),
            (
                "[worker] (but credentials_check_secs)",
                WorkerSettings {
                    credentials_check_secs: v.credentials_check_secs,
                    ..w.clone()
                } == *v,
            ),
        ]
        .into_iter()
        .filter(|(_, same)| !same)
        .map(|(key, _)| key)
        .collect()
    }

    /// These settings with what a reload may change taken from `new` (see
    /// [`Settings::changes_needing_restart`]): what a running process puts in force.
    pub fn reloaded_from(&self, new: &Settings) -> Settings {
        let mut next = self.clone();
        next.apps = new.apps.clone();
        next.retry = new.retry.clone();
        next.ingest.mode = new.ingest.mode;
        next.ingest.sync_timeout_ms = new.ingest.sync_timeout_ms;
        next.ingest.max_devices_per_account = new.ingest.max_devices_per_account;
        next.ingest.raw_tokens_in_answers = new.ingest.raw_tokens_in_answers;
        next.worker.credentials_check_secs = new.worker.credentials_check_secs;
        next
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        for p in [
            &mut self.ingest.tls_cert_file,
            &mut self.ingest.tls_key_file,
            &mut self.rabbitmq.ca_file,
            &mut self.postgres.ca_file,
            &mut self.worker.https_proxy_credentials_file,
        ]
        .into_iter()
        .flatten()
        {
            resolve(p);
        }
        if let Some(xmpp) = &mut self.xmpp {
            resolve(&mut xmpp.secret_file);
        }
        for app in &mut self.apps {
            if let Some(apns) = &mut app.apns {
                for p in [
                    &mut apns.ca_file,
                    &mut apns.key_file,
                    &mut apns.cert_file,
                    &mut apns.cert_key_file,
                ]
                .into_iter()
                .flatten()
                {
                    resolve(p);
                }
            }
            if let Some(fcm) = &mut app.fcm {
                resolve(&mut fcm.service_account_file);
                if let Some(ca) = &mut fcm.ca_file {
                    resolve(ca);
                }
            }
            if let Some(webpush) = &mut app.webpush {
                resolve(&mut webpush.vapid_key_file);
                if let Some(ca) = &mut webpush.ca_file {
                    resolve(ca);
                }
            }
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.ingest.validate()?;
        self.http.validate()?;
        self.rabbitmq.validate()?;
        self.postgres.validate()?;
        self.worker.validate()?;
        self.retry.validate()?;
        self.audit.validate()?;
        self.wakeup.validate()?;
        if let Some(xmpp) = &self.xmpp {
            xmpp.validate()?;
        }
        self.validate_tls()?;
        EventPolicies::default().with_overrides(&self.events)?;
        let mut seen = HashMap::new();
        for (index, app) in self.apps.iter().enumerate() {
            let label = format!("[[apps]] #{} ({} {})", index + 1, app.platform, app.id);
            if app.id.trim().is_empty() {
                return Err(ConfigError::invalid(
                    format!("[[apps]] #{} id", index + 1),
                    "is empty",
                ));
            }
            if let Some(first) = seen.insert((app.id.as_str(), app.platform), index) {
                return Err(ConfigError::invalid(
                    label,
                    format!("the same id and platform as [[apps]] #{}", first + 1),
                ));
            }
            app.validate(&label)?;
        }
        Ok(())
    }
}

impl IngestSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        ensure(
            (1..=60_000).contains(&self.sync_timeout_ms),
            "[ingest] sync_timeout_ms",
            "must be between 1 and 60000",
        )?;
        ensure(
            self.max_body_bytes >= 1024,
            "[ingest] max_body_bytes",
            "must be at least 1024",
        )?;
        ensure(
            (1..=64).contains(&self.publishes_in_flight),
            "[ingest] publishes_in_flight",
            "must be between 1 and 64",
        )?;
        ensure(
            (1..=600_000).contains(&self.shutdown_timeout_ms),
            "[ingest] shutdown_timeout_ms",
            "must be between 1 and 600000",
        )?;
        ensure(
            self.max_devices_per_account >= 1,
            "[ingest] max_devices_per_account",
            "must be at least 1",
        )?;
        ensure(
            (100..=300_000).contains(&self.api_keys_refresh_ms),
            "[ingest] api_keys_refresh_ms",
            "must be between 100 and 300000",
        )?;
        ensure(
            self.rate_limit_share > 0.0 && self.rate_limit_share <= 1.0,
            "[ingest] rate_limit_share",
            "must be above 0 and at most 1",
        )
    }
}

impl HttpSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        let timeouts = [
            ("[http] header_read_timeout_ms", self.header_read_timeout_ms),
            (
                "[http] request_body_timeout_ms",
                self.request_body_timeout_ms,
            ),
            ("[http] idle_timeout_ms", self.idle_timeout_ms),
        ];
        for (key, ms) in timeouts {
            ensure(
                (1..=3_600_000).contains(&ms),
                key,
                "must be between 1 and 3600000",
            )?;
        }
        let bounds = [
            ("[http] max_connections", self.max_connections),
            ("[http] max_in_flight_requests", self.max_in_flight_requests),
        ];
        for (key, bound) in bounds {
            ensure(
                (1..=1_000_000).contains(&bound),
                key,
                "must be between 1 and 1000000",
            )?;
        }
        Ok(())
    }
}

impl RabbitSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        let amqp = |url: &str| url.starts_with("amqp://") || url.starts_with("amqps://");
        match &self.urls {
            None if !amqp(&self.url) => {
                return Err(ConfigError::invalid(
                    "[rabbitmq] url",
                    format!(
                        "{:?}: expected amqp://user:password@host:port/vhost",
                        crate::topology::redact(&self.url)
                    ),
                ))
            }
            None => {}
            Some(urls) if urls.is_empty() => {
                return Err(ConfigError::invalid(
                    "[rabbitmq] urls",
                    "must list at least one node",
                ))
            }
            Some(urls) => {
                if let Some((index, url)) = urls.iter().enumerate().find(|(_, url)| !amqp(url)) {
                    return Err(ConfigError::invalid(
                        "[rabbitmq] urls",
                        format!(
                            "entry {} {:?}: expected amqp://user:password@host:port/vhost",
                            index + 1,
                            crate::topology::redact(url)
                        ),
                    ));
                }
            }
        }
        let namespace_chars = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
        ensure(
            !self.namespace.is_empty() && self.namespace.chars().all(namespace_chars),
            "[rabbitmq] namespace",
            "must be non-empty letters, digits, '-', '_' or '.'",
        )?;
        ensure(
            self.prefetch > 0,
            "[rabbitmq] prefetch",
            "must be at least 1",
        )?;
        let tiers = &self.retry_tiers_ms;
        ensure(
            !tiers.is_empty() && tiers[0] >= 100 && tiers.windows(2).all(|w| w[0] < w[1]),
            "[rabbitmq] retry_tiers_ms",
            "must list increasing delays of at least 100 ms",
        )?;
        ensure(
            self.delivery_limit > 0,
            "[rabbitmq] delivery_limit",
            "must be at least 1",
        )?;
        ensure(
            (1..=365 * 24 * 3600).contains(&self.dead_letter_max_age_secs),
            "[rabbitmq] dead_letter_max_age_secs",
            "must be between 1 and 31536000 (a year)",
        )
    }
}

impl PostgresSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if !self.url.starts_with("postgres://") && !self.url.starts_with("postgresql://") {
            return Err(ConfigError::invalid(
                "[postgres] url",
                format!(
                    "{:?}: expected postgres://user@host:port/database",
                    crate::topology::redact(&self.url)
                ),
            ));
        }
        ensure(
            self.pool_size > 0,
            "[postgres] pool_size",
            "must be at least 1",
        )
    }
}

impl WorkerSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        ensure(
            self.audit_batch_size > 0,
            "[worker] audit_batch_size",
            "must be at least 1",
        )?;
        ensure(
            self.max_connections_per_app > 0,
            "[worker] max_connections_per_app",
            "must be at least 1",
        )?;
        ensure(
            self.max_streams_per_connection > 0,
            "[worker] max_streams_per_connection",
            "must be at least 1",
        )?;
        ensure(
            self.invalid_tokens_refresh_secs > 0,
            "[worker] invalid_tokens_refresh_secs",
            "must be at least 1",
        )?;
        ensure(
            (1..=600_000).contains(&self.shutdown_timeout_ms),
            "[worker] shutdown_timeout_ms",
            "must be between 1 and 600000",
        )?;
        ensure(
            self.credentials_check_secs <= 86_400,
            "[worker] credentials_check_secs",
            "must be at most 86400 (0: only on SIGHUP)",
        )?;
        if let Some(proxy) = &self.https_proxy {
            let authority = proxy
                .strip_prefix("http://")
                .map(|rest| rest.trim_end_matches('/'))
                .filter(|a| {
                    !a.is_empty() && !a.contains(['@', '/', '?', '#']) && !a.starts_with(':')
                });
            ensure(
                authority.is_some(),
                "[worker] https_proxy",
                &format!("{proxy:?}: expected http://host:port (credentials go in https_proxy_credentials_file)"),
            )?;
        }
        if self.https_proxy_credentials_file.is_some() {
            ensure(
                self.https_proxy.is_some(),
                "[worker] https_proxy_credentials_file",
                "needs [worker] https_proxy",
            )?;
            self.proxy_credentials()?;
        }
        Ok(())
    }
}

impl RetrySettings {
    fn validate(&self) -> Result<(), ConfigError> {
        ensure(
            self.max_attempts > 0,
            "[retry] max_attempts",
            "must be at least 1",
        )?;
        ensure(
            self.initial_backoff_ms > 0 && self.max_backoff_ms >= self.initial_backoff_ms,
            "[retry] initial_backoff_ms",
            "must be above 0 and at most max_backoff_ms",
        )?;
        ensure(
            (1.0..=10.0).contains(&self.multiplier),
            "[retry] multiplier",
            "must be between 1 and 10",
        )?;
        ensure(
            (0.0..1.0).contains(&self.jitter),
            "[retry] jitter",
            "must be at least 0 and below 1",
        )
    }
}

impl AppSettings {
    /// `label` names the app in messages: `[[apps]] #<n> (<platform> <id>)`.
    fn validate(&self, label: &str) -> Result<(), ConfigError> {
        if let Some(url) = &self.log_url {
            ensure(
                url.starts_with("https://") || url.starts_with("http://"),
                &format!("{label} log_url"),
                &format!("{url:?} must be an http:// or https:// URL"),
            )?;
        }
        if let Some(auth) = &self.log_auth {
            ensure(
                !auth.is_empty() && !auth.chars().any(char::is_control),
                &format!("{label} log_auth"),
                "must be a header value: not empty, no control characters",
            )?;
        }
        ensure(
            (1..=60_000).contains(&self.log_timeout_ms),
            &format!("{label} log_timeout_ms"),
            "must be between 1 and 60000",
        )?;
        ensure(
            (1..=10_000_000).contains(&self.log_buffer),
            &format!("{label} log_buffer"),
            "must be between 1 and 10000000",
        )?;
        match self.platform {
            Platform::Apple => match &self.apns {
                Some(apns) => apns.validate(label),
                None => Err(ConfigError::invalid(
                    format!("{label} [apps.apns]"),
                    "an apple app needs this section",
                )),
            },
            Platform::Firebase => match &self.fcm {
                Some(fcm) => fcm.validate(label),
                None => Err(ConfigError::invalid(
                    format!("{label} [apps.fcm]"),
                    "a firebase app needs this section",
                )),
            },
            Platform::UnifiedPush => match &self.webpush {
                Some(webpush) => webpush.validate(label),
                None => Err(ConfigError::invalid(
                    format!("{label} [apps.webpush]"),
                    "a unifiedpush app needs this section",
                )),
            },
        }
    }
}

impl ApnsSettings {
    fn validate(&self, label: &str) -> Result<(), ConfigError> {
        validate_url(label, "apns.endpoint", &self.endpoint)?;
        let token = [
            self.key_file.is_some(),
            self.key_id.is_some(),
            self.team_id.is_some(),
        ];
        let token_auth = token.iter().all(|x| *x);
        let cert_auth = self.cert_file.is_some();
        if token.iter().any(|x| *x) && !token_auth {
            return Err(ConfigError::invalid(
                format!("{label} apns.key_file"),
                "token auth needs all of apns.key_file, apns.key_id and apns.team_id",
            ));
        }
        if token_auth == cert_auth {
            return Err(ConfigError::invalid(
                format!("{label} apns"),
                format!(
                    "configure either token auth (apns.key_file + key_id + team_id) or certificate auth (apns.cert_file + cert_key_file), not {}",
                    if token_auth { "both" } else { "neither" }
                ),
            ));
        }
        ensure(
            (1200..=3600).contains(&self.token_refresh_secs),
            &format!("{label} apns.token_refresh_secs"),
            "must be between 1200 and 3600 (Apple refuses tokens older than an hour and refreshes more often than every 20 minutes)",
        )?;
        let files = [
            ("apns.key_file", &self.key_file),
            ("apns.cert_file", &self.cert_file),
            ("apns.cert_key_file", &self.cert_key_file),
            ("apns.ca_file", &self.ca_file),
        ];
        for (key, file) in files {
            if let Some(file) = file {
                readable(label, key, file)?;
            }
        }
        Ok(())
    }
}

impl FcmSettings {
    fn validate(&self, label: &str) -> Result<(), ConfigError> {
        validate_url(label, "fcm.endpoint", &self.endpoint)?;
        readable(
            label,
            "fcm.service_account_file",
            &self.service_account_file,
        )?;
        if let Some(ca) = &self.ca_file {
            readable(label, "fcm.ca_file", ca)?;
        }
        Ok(())
    }
}

impl WebPushSettings {
    fn validate(&self, label: &str) -> Result<(), ConfigError> {
        let subject = self.vapid_subject.as_str();
        let contact = subject
            .strip_prefix("mailto:")
            .or_else(|| subject.strip_prefix("https://"));
        ensure(
            contact.is_some_and(|rest| !rest.is_empty() && !rest.chars().any(char::is_whitespace)),
            &format!("{label} webpush.vapid_subject"),
            "must be a mailto: or https:// contact, such as \"mailto:push@example.org\"",
        )?;
        readable(label, "webpush.vapid_key_file", &self.vapid_key_file)?;
        if let Some(ca) = &self.ca_file {
            readable(label, "webpush.ca_file", ca)?;
        }
        for host in &self.allowed_endpoint_hosts {
            ensure(
                !host.is_empty() && !host.contains(['/', ' ', ':'])
                    || host.parse::<std::net::IpAddr>().is_ok(),
                &format!("{label} webpush.allowed_endpoint_hosts"),
                &format!("{host:?} must be a host name or an address, without scheme or port"),
            )?;
        }
        Ok(())
    }
}

fn validate_url(label: &str, key: &str, url: &str) -> Result<(), ConfigError> {
    ensure(
        url.starts_with("https://"),
        &format!("{label} {key}"),
        &format!("{url:?} must be an https:// URL"),
    )
}

fn readable(label: &str, key: &str, file: &Path) -> Result<(), ConfigError> {
    std::fs::File::open(file)
        .map(|_| ())
        .map_err(|source| ConfigError::UnreadableFile {
            key: format!("{label} {key}"),
            path: file.to_path_buf(),
            source,
        })
}

impl IngestSettings {
    /// The certificate and key files, when ingest serves HTTPS.
    pub fn tls_files(&self) -> Option<(&Path, &Path)> {
        Some((
            self.tls_cert_file.as_deref()?,
            self.tls_key_file.as_deref()?,
        ))
    }
}

impl Settings {
    /// The TLS keys: files that exist and parse, and an `sslmode` the services support, so that
    /// a mistake stops the start instead of the first connection.
    fn validate_tls(&self) -> Result<(), ConfigError> {
        let ingest = &self.ingest;
        match (&ingest.tls_cert_file, &ingest.tls_key_file) {
            (Some(cert), Some(key)) => {
                crate::tls::certified_key(cert, key).map_err(|e| {
                    let key = format!("[ingest] {}", e.key());
                    match e {
                        crate::tls::ServerCertError::Certificate(e)
                        | crate::tls::ServerCertError::Key(e) => tls_file_error(&key, e),
                        mismatch => ConfigError::invalid(key, mismatch.to_string()),
                    }
                })?;
            }
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    "[ingest] tls_key_file",
                    "missing: HTTPS needs tls_cert_file and tls_key_file",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    "[ingest] tls_cert_file",
                    "missing: HTTPS needs tls_cert_file and tls_key_file",
                ))
            }
            (None, None) => {}
        }
        crate::tls::PostgresUrl::parse(&self.postgres.url)
            .map_err(|problem| ConfigError::invalid("[postgres] url", problem))?;
        for (key, ca_file) in [
            ("[postgres] ca_file", &self.postgres.ca_file),
            ("[rabbitmq] ca_file", &self.rabbitmq.ca_file),
        ] {
            if let Some(path) = ca_file {
                crate::tls::read_roots(path).map_err(|e| tls_file_error(key, e))?;
            }
        }
        Ok(())
    }
}

fn tls_file_error(key: &str, error: crate::tls::PemFileError) -> ConfigError {
    match error {
        crate::tls::PemFileError::Unreadable { path, source } => ConfigError::UnreadableFile {
            key: key.into(),
            path,
            source,
        },
        invalid => ConfigError::invalid(key, invalid.to_string()),
    }
}

/// Where `[rabbitmq] url` and `urls` come from. The two name the broker in different shapes, so
/// one place may set only one of them; an environment variable replaces whichever of the two
/// the file has, as it replaces any other key.
struct BrokerKeys {
    /// The environment variable that set `urls`, for messages about its value.
    urls_variable: Option<String>,
    /// The file's key that an environment variable replaces.
    replaced: Option<&'static str>,
}

impl BrokerKeys {
    fn check(
        file: &toml::Table,
        overrides: &[(String, String)],
    ) -> Result<BrokerKeys, ConfigError> {
        let section = file.get("rabbitmq").and_then(toml::Value::as_table);
        let in_file = |key: &str| section.is_some_and(|t| t.contains_key(key));
        if in_file("url") && in_file("urls") {
            return Err(ConfigError::invalid(
                "[rabbitmq] url, urls",
                "set one of them: url for a single node, urls for the nodes of a cluster",
            ));
        }
        let variable = |key: &str| {
            overrides
                .iter()
                .map(|(path, _)| path)
                .find(|path| path.eq_ignore_ascii_case(&format!("RABBITMQ__{key}")))
                .map(|path| format!("{ENV_PREFIX}{path}"))
        };
        let (url_variable, urls_variable) = (variable("URL"), variable("URLS"));
        let replaced =
            match (&url_variable, &urls_variable) {
                (Some(url), Some(urls)) => return Err(ConfigError::Environment {
                    variable: format!("{url}, {urls}"),
                    problem:
                        "set one of them: URL for a single node, URLS for the nodes of a cluster"
                            .into(),
                }),
                (Some(_), None) if in_file("urls") => Some("urls"),
                (None, Some(_)) if in_file("url") => Some("url"),
                _ => None,
            };
        Ok(BrokerKeys {
            urls_variable,
            replaced,
        })
    }

    /// Applied once the overrides are in: drops the replaced key and checks the shape of
    /// `urls`, which an environment variable gives as a TOML list.
    fn settle(self, table: &mut toml::Table) -> Result<(), ConfigError> {
        let Some(section) = table
            .get_mut("rabbitmq")
            .and_then(toml::Value::as_table_mut)
        else {
            return Ok(());
        };
        if let Some(key) = self.replaced {
            section.remove(key);
        }
        match section.get("urls") {
            Some(value) if !value.is_array() => {
                let problem = format!(
                    "expected a list of URLs such as [\"amqp://user:password@host-a:5672/%2f\", \"amqp://user:password@host-b:5672/%2f\"], got a {}",
                    value.type_str()
                );
                Err(match self.urls_variable {
                    Some(variable) => ConfigError::Environment { variable, problem },
                    None => ConfigError::invalid("[rabbitmq] urls", problem),
                })
            }
            _ => Ok(()),
        }
    }
}

/// `INGEST__MODE=async` sets `ingest.mode`; a numeric segment indexes an array
/// (`APPS__0__APNS__ENDPOINT`). Values are read as TOML when they parse (numbers, booleans),
/// as plain strings otherwise.
fn apply_override(table: &mut toml::Table, path: &str, value: &str) -> Result<(), ConfigError> {
    let problem = |problem: String| ConfigError::Environment {
        variable: format!("{ENV_PREFIX}{path}"),
        problem,
    };
    let segments: Vec<String> = path.split("__").map(|s| s.to_ascii_lowercase()).collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err(problem("empty name segment".into()));
    }
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));

    let mut node = table;
    let (last, parents) = segments.split_last().expect("at least one segment");
    let mut iter = parents.iter().peekable();
    while let Some(segment) = iter.next() {
        let child = node
            .entry(segment.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let child = match child {
            toml::Value::Array(items) => {
                let Some(Ok(index)) = iter.next().map(|s| s.parse::<usize>()) else {
                    return Err(problem(format!(
                        "{segment} is a list, expected an index after it"
                    )));
                };
                items
                    .get_mut(index)
                    .ok_or_else(|| problem(format!("{segment} has no entry {index}")))?
            }
            other => other,
        };
        node = match child {
            toml::Value::Table(t) => t,
            _ => return Err(problem(format!("{segment} is not a section"))),
        };
    }
    node.insert(last.clone(), parsed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::from_toml(
            text,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
            Path::new("."),
        )
    }

    #[test]
    fn a_reload_takes_the_apps_and_reports_what_needs_a_restart() {
        let old = load("", &[]).unwrap();
        let account = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        let new = load(
            &r#"
            [ingest]
            listen = "127.0.0.1:9400"
            mode = "async"
            [rabbitmq]
            prefetch = 8
            [worker]
            credentials_check_secs = 0
            request_timeout_ms = 3000
            [retry]
            max_attempts = 3
            [[apps]]
            id = "com.example.chat"
            platform = "firebase"
            type = "sylk"
            fcm = { service_account_file = "ACCOUNT" }
            "#
            .replace("ACCOUNT", &account.display().to_string()),
            &[],
        )
        .unwrap();
        assert_eq!(
            old.changes_needing_restart(&new),
            [
                "[ingest] listen",
                "[rabbitmq]",
                "[worker] (but credentials_check_secs)"
            ]
        );
        let next = old.reloaded_from(&new);
        assert_eq!(next.apps, new.apps);
        assert_eq!(next.retry.max_attempts, 3);
        assert_eq!(next.ingest.mode, ResponseMode::Async);
        assert_eq!(next.worker.credentials_check_secs, 0);
        // What needs a restart stays as it was.
        assert_eq!(next.ingest.listen, old.ingest.listen);
        assert_eq!(next.rabbitmq, old.rabbitmq);
        assert_eq!(next.worker.request_timeout_ms, 10_000);
        assert!(next.changes_needing_restart(&next).is_empty());
        let files: Vec<&str> = next.apps[0].files().iter().map(|(key, _)| *key).collect();
        assert_eq!(files, ["fcm.service_account_file"]);
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let s = load("", &[]).unwrap();
        assert_eq!(s.ingest.listen.to_string(), "127.0.0.1:8400");
        assert_eq!(s.ingest.mode, ResponseMode::Sync);
        assert_eq!(s.ingest.sync_timeout_ms, 5000);
        assert_eq!(s.ingest.max_devices_per_account, 20);
        assert!(!s.ingest.require_api_key && !s.ingest.allow_anonymous);
        assert_eq!(s.ingest.api_keys_refresh_ms, 2000);
        assert_eq!(s.ingest.rate_limit_share, 1.0);
        assert_eq!(s.rabbitmq.url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(
            s.postgres.url,
            "postgres://postgres@127.0.0.1:5432/pushfleet"
        );
    }

    #[test]
    fn audit_retention_and_remote_log_keys_are_checked() {
        assert_eq!(load("", &[]).unwrap().audit.retention_days, 90);
        let e = load("[audit]\nretention_days = 0", &[]).unwrap_err();
        assert_eq!(e.key(), Some("[audit] retention_days"));
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        let app = |extra: &str| {
            format!(
                "[[apps]]\nid = \"a\"\nplatform = \"firebase\"\ntype = \"sylk\"\n{extra}\n\
                 fcm = {{ service_account_file = \"{}\" }}",
                file.display()
            )
        };
        let s = load(
            &app("log_url = \"https://logs.example.com/p\"\nlog_auth = \"Bearer x\"\nlog_key = \"id\""),
            &[],
        )
        .unwrap();
        let a = &s.apps[0];
        assert_eq!(a.log_url.as_deref(), Some("https://logs.example.com/p"));
        assert_eq!((a.log_timeout_ms, a.log_buffer), (5000, 10_000));
        for (extra, key) in [
            ("log_url = \"ftp://x\"", "log_url"),
            ("log_timeout_ms = 0", "log_timeout_ms"),
            ("log_buffer = 0", "log_buffer"),
            ("log_auth = \"\"", "log_auth"),
        ] {
            let e = load(&app(extra), &[]).unwrap_err();
            assert!(e.key().is_some_and(|k| k.ends_with(key)), "{extra}: {e}");
        }
    }

    #[test]
    fn environment_overrides_sections_and_list_entries() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        let text = format!(
            r#"
            [[apps]]
            id = "com.example.chat"
            platform = "firebase"
            type = "sylk"
            fcm = {{ service_account_file = "{}" }}
            "#,
            file.display()
        );
        let s = load(
            &text,
            &[
                ("PUSHFLEET__INGEST__MODE", "async"),
                ("PUSHFLEET__INGEST__SYNC_TIMEOUT_MS", "250"),
                (
                    "PUSHFLEET__APPS__0__FCM__ENDPOINT",
                    "https://127.0.0.1:9999",
                ),
                ("UNRELATED", "x"),
            ],
        )
        .unwrap();
        assert_eq!(s.ingest.mode, ResponseMode::Async);
        assert_eq!(s.ingest.sync_timeout_ms, 250);
        assert_eq!(
            s.apps[0].fcm.as_ref().unwrap().endpoint,
            "https://127.0.0.1:9999"
        );
    }

    #[test]
    fn calls_wakeups_and_the_egress_proxy_are_validated() {
        let settings = load(
            "[events.incoming_session]\nremote_push_interval_secs = 30",
            &[],
        )
        .unwrap();
        assert_eq!(
            settings
                .event_policies()
                .get(crate::Event::IncomingSession)
                .remote_push_interval,
            Duration::from_secs(30)
        );
        let e = load(
            "[events.incoming_session]\nremote_push_interval_secs = 31",
            &[],
        )
        .unwrap_err();
        assert_eq!(
            e.key(),
            Some("[events.incoming_session] remote_push_interval_secs")
        );
        let e = load("[events.message]\nremote_push_interval_secs = 1", &[]).unwrap_err();
        assert_eq!(e.key(), Some("[events.message] remote_push_interval_secs"));
        assert!(load("[events.wakeup]\nttl_secs = 60", &[]).is_ok());
        for threshold in ["0", "1", "1.5"] {
            let e = load(
                &format!("[wakeup]\nregister_wakeup_threshold = {threshold}"),
                &[],
            )
            .unwrap_err();
            assert_eq!(e.key(), Some("[wakeup] register_wakeup_threshold"));
        }
        let e = load("[wakeup]\nscheduler_interval_secs = 0", &[]).unwrap_err();
        assert_eq!(e.key(), Some("[wakeup] scheduler_interval_secs"));
        for bad in [
            "https://proxy:3128",
            "http://user:pw@proxy:3128",
            "http://",
            "proxy:3128",
        ] {
            let e = load(&format!("[worker]\nhttps_proxy = \"{bad}\""), &[]).unwrap_err();
            assert_eq!(e.key(), Some("[worker] https_proxy"), "{bad}");
        }
        assert!(load(
            "[worker]\nhttps_proxy = \"http://proxy.example.com:3128\"",
            &[]
        )
        .is_ok());
        let e = load(
            "[worker]\nhttps_proxy_credentials_file = \"Cargo.toml\"",
            &[],
        )
        .unwrap_err();
        assert_eq!(e.key(), Some("[worker] https_proxy_credentials_file"));
        let dir = std::env::temp_dir().join(format!("pf-proxy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (good, bad) = (dir.join("good"), dir.join("bad"));
        std::fs::write(&good, "user:p:w\n").unwrap();
        std::fs::write(&bad, "no colon\n").unwrap();
        let with_file = |file: &Path| {
            load(
                &format!(
                    "[worker]\nhttps_proxy = \"http://proxy:3128\"\nhttps_proxy_credentials_file = \"{}\"",
                    file.display()
                ),
                &[],
            )
        };
        let credentials = with_file(&good)
            .unwrap()
            .worker
            .proxy_credentials()
            .unwrap();
        assert_eq!(
            credentials,
            Some(ProxyCredentials {
                user: "user".into(),
                password: "p:w".into()
            })
        );
        let e = with_file(&bad).unwrap_err();
        assert_eq!(e.key(), Some("[worker] https_proxy_credentials_file"));
        let e = with_file(&dir.join("missing")).unwrap_err();
        assert!(matches!(e, ConfigError::UnreadableFile { .. }), "{e:?}");
        let _ = std::fs::remove_dir_all(&dir);
        let app = "[[apps]]\nid = \"a\"\nplatform = \"firebase\"\ntype = \"sylk\"\n\
                   display_caller = false\n[apps.fcm]\nservice_account_file = \"Cargo.toml\"";
        assert!(!load(app, &[]).unwrap().apps[0].display_caller);
    }

    #[test]
    fn mistakes_name_the_key() {
        let e = load("[ingest]\nmode = \"later\"", &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Shape(_)), "{e:?}");
        let e = load("[ingest]\nlisten_addr = \"x\"", &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Shape(_)), "{e:?}");
        let e = load("[ingest]\nsync_timeout_ms = 0", &[]).unwrap_err();
        assert_eq!(e.key(), Some("[ingest] sync_timeout_ms"));
        let e = load("[ingest]\nmax_devices_per_account = 0", &[]).unwrap_err();
        assert_eq!(e.key(), Some("[ingest] max_devices_per_account"));
        for share in ["0", "-0.5", "1.5", "nan"] {
            let e = load(&format!("[ingest]\nrate_limit_share = {share}"), &[]).unwrap_err();
            assert_eq!(e.key(), Some("[ingest] rate_limit_share"), "{share}");
        }
        assert_eq!(
            load("[ingest]\nrate_limit_share = 0.25", &[])
                .unwrap()
                .ingest
                .rate_limit_share,
            0.25
        );
        let e = load("[ingest]\napi_keys_refresh_ms = 0", &[]).unwrap_err();
        assert_eq!(e.key(), Some("[ingest] api_keys_refresh_ms"));
        let e = load("[ingest\n", &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Syntax(_)), "{e:?}");
        let e = load(
            "[[apps]]\nid = \"a\"\nplatform = \"apple\"\ntype = \"sylk\"\n[apps.apns]\nkey_id = \"K\"",
            &[],
        )
        .unwrap_err();
        assert_eq!(e.key(), Some("[[apps]] #1 (apple a) apns.key_file"));
        let e = load(
            "[[apps]]\nid = \"a\"\nplatform = \"apple\"\ntype = \"sylk\"\n[apps.apns]\ncert_file = \"/nonexistent.pem\"",
            &[],
        )
        .unwrap_err();
        let ConfigError::UnreadableFile { key, path, .. } = &e else {
            panic!("{e:?}");
        };
        assert_eq!(key, "[[apps]] #1 (apple a) apns.cert_file");
        assert_eq!(path, Path::new("/nonexistent.pem"));
        let e = load("[events.ring]\nttl_secs = 5", &[]).unwrap_err();
        assert_eq!(e.key(), Some("[events.ring]"));
        let e = load("", &[("PUSHFLEET__INGEST____MODE", "x")]).unwrap_err();
        assert_eq!(e.key(), Some("PUSHFLEET__INGEST____MODE"));
    }

    #[test]
    fn a_cluster_is_given_as_a_list_of_urls() {
        let s = load("", &[]).unwrap();
        assert_eq!(
            s.rabbitmq.nodes(),
            ["amqp://guest:guest@127.0.0.1:5672/%2f"]
        );
        let s = load(
            "[rabbitmq]\nurls = [\"amqp://a:1/%2f\", \"amqps://b:2/%2f\"]",
            &[],
        )
        .unwrap();
        assert_eq!(s.rabbitmq.nodes(), ["amqp://a:1/%2f", "amqps://b:2/%2f"]);

        let e = load(
            "[rabbitmq]\nurl = \"amqp://a/%2f\"\nurls = [\"amqp://b/%2f\"]",
            &[],
        )
        .unwrap_err();
        assert_eq!(e.key(), Some("[rabbitmq] url, urls"));
        let e = load("[rabbitmq]\nurls = []", &[]).unwrap_err();
        assert_eq!(e.key(), Some("[rabbitmq] urls"));
        let e = load(
            "[rabbitmq]\nurls = [\"amqp://a/%2f\", \"http://u:secret@b/\"]",
            &[],
        )
        .unwrap_err();
        assert_eq!(e.key(), Some("[rabbitmq] urls"));
        assert!(e.to_string().contains("entry 2"), "{e}");
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    #[test]
    fn the_environment_replaces_the_files_broker_key() {
        let list = "[\"amqp://a:1/%2f\", \"amqp://b:2/%2f\"]";
        let s = load(
            "[rabbitmq]\nurl = \"amqp://old/%2f\"",
            &[("PUSHFLEET__RABBITMQ__URLS", list)],
        )
        .unwrap();
        assert_eq!(s.rabbitmq.nodes(), ["amqp://a:1/%2f", "amqp://b:2/%2f"]);
        let s = load(
            &format!("[rabbitmq]\nurls = {list}"),
            &[("PUSHFLEET__RABBITMQ__URL", "amqp://one/%2f")],
        )
        .unwrap();
        assert_eq!(s.rabbitmq.nodes(), ["amqp://one/%2f"]);

        let e = load(
            "",
            &[
                ("PUSHFLEET__RABBITMQ__URL", "amqp://one/%2f"),
                ("PUSHFLEET__RABBITMQ__URLS", list),
            ],
        )
        .unwrap_err();
        assert_eq!(
            e.key(),
            Some("PUSHFLEET__RABBITMQ__URL, PUSHFLEET__RABBITMQ__URLS")
        );
        let e = load(
            "",
            &[("PUSHFLEET__RABBITMQ__URLS", "amqp://a:1/%2f,amqp://b:2/%2f")],
        )
        .unwrap_err();
        assert_eq!(e.key(), Some("PUSHFLEET__RABBITMQ__URLS"));
        assert!(e.to_string().contains("expected a list"), "{e}");
    }

    #[test]
    fn passwords_in_urls_are_never_shown() {
        for text in [
            "[rabbitmq]\nurl = \"http://guest:s3cret@host/\"",
            "[postgres]\nurl = \"mysql://root:s3cret@host/db\"",
        ] {
            let e = load(text, &[]).unwrap_err().to_string();
            assert!(!e.contains("s3cret") && e.contains("***"), "{e}");
        }
    }

    #[test]
    fn messages_read_as_one_line() {
        let e = load("[retry]\njitter = 1.5", &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "[retry] jitter: must be at least 0 and below 1"
        );
    }
}

#[cfg(test)]
mod webpush_settings {
    use std::path::Path;

    use super::{ConfigError, Platform, Settings};

    fn load(section: &str) -> Result<Settings, ConfigError> {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        let text = format!(
            "[[apps]]\nid = \"up\"\nplatform = \"webpush\"\ntype = \"sylk\"\n[apps.webpush]\nvapid_key_file = \"{}\"\n{section}",
            file.display()
        );
        Settings::from_toml(&text, Vec::new(), Path::new("."))
    }

    #[test]
    fn a_webpush_app_names_its_vapid_key_and_contact() {
        let s = load("vapid_subject = \"mailto:ops@example.org\"\nallowed_endpoint_hosts = [\"Push.Internal\", \"10.1.2.3\", \"::1\"]").unwrap();
        assert_eq!(s.apps[0].platform, Platform::UnifiedPush);
        let webpush = s.apps[0].webpush.as_ref().unwrap();
        assert!(webpush.allows_host("push.internal"));
        assert!(webpush.allows_host("10.1.2.3"));
        assert!(webpush.allows_host("[::1]"));
        assert!(!webpush.allows_host("push.example.org"));
        assert!(load("vapid_subject = \"https://example.org/contact\"").is_ok());
    }

    #[test]
    fn mistakes_name_the_key() {
        for (section, key) in [
            (
                "vapid_subject = \"ops@example.org\"",
                "webpush.vapid_subject",
            ),
            ("vapid_subject = \"mailto:\"", "webpush.vapid_subject"),
            (
                "vapid_subject = \"mailto:a@b\"\nallowed_endpoint_hosts = [\"https://x\"]",
                "webpush.allowed_endpoint_hosts",
            ),
            (
                "vapid_subject = \"mailto:a@b\"\nca_file = \"/nonexistent.pem\"",
                "webpush.ca_file",
            ),
        ] {
            let e = load(section).unwrap_err();
            assert_eq!(
                e.key(),
                Some(format!("[[apps]] #1 (unifiedpush up) {key}").as_str()),
                "{section}: {e}"
            );
        }
        let e = Settings::from_toml(
            "[[apps]]\nid = \"up\"\nplatform = \"unifiedpush\"\ntype = \"sylk\"",
            Vec::new(),
            Path::new("."),
        )
        .unwrap_err();
        assert_eq!(e.key(), Some("[[apps]] #1 (unifiedpush up) [apps.webpush]"));
    }
}

#[cfg(test)]
mod http_settings {
    use std::path::Path;

    use super::{ConfigError, Settings};

    fn load(text: &str) -> Result<Settings, ConfigError> {
        Settings::from_toml(text, Vec::new(), Path::new("."))
    }

    #[test]
    fn defaults_and_overrides() {
        let s = load("").unwrap();
        assert_eq!(s.http.header_read_timeout_ms, 5000);
        assert_eq!(s.http.request_body_timeout_ms, 10_000);
        assert_eq!(s.http.idle_timeout_ms, 60_000);
        assert_eq!(s.http.max_connections, 4096);
        assert_eq!(s.http.max_in_flight_requests, 4096);
        assert_eq!(s.ingest.shutdown_timeout_ms, 10_000);
        let s = load("[http]\nmax_connections = 2\nidle_timeout_ms = 1500").unwrap();
        assert_eq!((s.http.max_connections, s.http.idle_timeout_ms), (2, 1500));
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            (
                "[http]\nheader_read_timeout_ms = 0",
                "[http] header_read_timeout_ms",
            ),
            (
                "[http]\nrequest_body_timeout_ms = 0",
                "[http] request_body_timeout_ms",
            ),
            (
                "[http]\nidle_timeout_ms = 3600001",
                "[http] idle_timeout_ms",
            ),
            ("[http]\nmax_connections = 0", "[http] max_connections"),
            (
                "[http]\nmax_in_flight_requests = 0",
                "[http] max_in_flight_requests",
            ),
            (
                "[ingest]\nshutdown_timeout_ms = 0",
                "[ingest] shutdown_timeout_ms",
            ),
        ] {
            let e = load(text).unwrap_err();
            assert_eq!(e.key(), Some(key), "{text}: {e}");
        }
        assert_eq!(
            load("[http]\nmax_connections = 0").unwrap_err().to_string(),
            "[http] max_connections: must be between 1 and 1000000"
        );
        let e = load("[http]\nheader_timeout_ms = 1").unwrap_err();
        assert!(matches!(e, ConfigError::Shape(_)), "{e:?}");
    }
}

#[cfg(test)]
mod example_file {
    use super::Settings;

    /// The shipped example must stay in step with the settings structs (unknown keys fail).
    #[test]
    fn example_config_has_only_known_keys() {
        let text = include_str!("../../config/example.toml");
        let settings: Settings = toml::from_str(text).expect("config/example.toml parses");
        assert_eq!(settings.apps.len(), 3);
    }
}

#[cfg(test)]
mod xmpp_tests {
    use super::*;

    fn load(secret_file: &Path, keys: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let mut section = vec![
            ("component", "\"up.example.org\"".to_string()),
            ("server", "\"127.0.0.1:5347\"".to_string()),
            (
                "secret_file",
                format!("{:?}", secret_file.display().to_string()),
            ),
            (
                "endpoint_base",
                "\"https://push.example.org/UP\"".to_string(),
            ),
        ];
        for (key, value) in keys {
            section.retain(|(k, _)| k != key);
            section.push((key, value.to_string()));
        }
        let text = section
            .iter()
            .map(|(k, v)| format!("{k} = {v}\n"))
            .collect::<String>();
        Settings::from_toml(&format!("[xmpp]\n{text}"), Vec::new(), Path::new("."))
    }

    fn secret(text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("pushfleet-xmpp-{}", uuid::Uuid::new_v4()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn the_gateway_is_off_without_the_section_and_read_with_it() {
        assert_eq!(
            Settings::from_toml("", Vec::new(), Path::new("."))
                .unwrap()
                .xmpp,
            None
        );
        let file = secret("s3cret\nignored\n");
        let s = load(&file, &[]).unwrap();
        let xmpp = s.xmpp.unwrap();
        assert_eq!(xmpp.component, "up.example.org");
        assert_eq!(xmpp.secret().unwrap(), "s3cret");
        std::fs::remove_file(file).unwrap();
    }

    #[test]
    fn mistakes_name_the_xmpp_key() {
        let file = secret("s3cret\n");
        for (key, value, named) in [
            ("component", "\"\"", "[xmpp] component"),
            ("component", "\"up example\"", "[xmpp] component"),
            ("server", "\"127.0.0.1\"", "[xmpp] server"),
            ("server", "\":5347\"", "[xmpp] server"),
            ("server", "\"host:0\"", "[xmpp] server"),
            (
                "endpoint_base",
                "\"ftp://push.example.org/UP\"",
                "[xmpp] endpoint_base",
            ),
            (
                "endpoint_base",
                "\"https://push.example.org/UP?x=1\"",
                "[xmpp] endpoint_base",
            ),
            ("endpoint_base", "\"not a url\"", "[xmpp] endpoint_base"),
            (
                "secret_file",
                "\"/nonexistent/secret\"",
                "[xmpp] secret_file",
            ),
        ] {
            let e = load(&file, &[(key, value)]).unwrap_err();
            assert_eq!(e.key(), Some(named), "{key} = {value}: {e}");
        }
        let empty = secret("\n");
        let e = load(&empty, &[]).unwrap_err();
        assert_eq!(e.key(), Some("[xmpp] secret_file"));
        assert!(e.to_string().contains("no secret"), "{e}");
        let e = Settings::from_toml(
            "[xmpp]\ncomponent = \"up.example.org\"",
            Vec::new(),
            Path::new("."),
        )
        .unwrap_err();
        assert!(e.to_string().contains("server"), "{e}");
        std::fs::remove_file(file).unwrap();
        std::fs::remove_file(empty).unwrap();
    }
}
