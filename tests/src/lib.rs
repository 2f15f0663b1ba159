//! Faithful fake push providers for pushfleet's tests, sandbox and benchmarks: APNs,
//! FCM HTTP v1 and Google's OAuth2 token endpoint, each an HTTP/2 + TLS server on
//! 127.0.0.1 behind a throw-away test CA.
//!
//! ```text
//! use pushfleet_fakes::*;
//! let fakes = FakeProviders::start(FakeOptions::default()).await?;
//! let ca_pem = fakes.ca_pem();                       // trust this root in the client
//! let key = fakes.apns.create_token_key("TEAMID1234"); // ApnsTokenKey { key_id, team_id, p8_pem }
//! let (cert_pem, key_pem) = fakes.apns.issue_client_certificate("com.example.app");
//! let sa_json = fakes.fcm.service_account_json("my-project"); // token_uri → fakes.oauth
//!
//! fakes.apns.set_token_state(tok, ApnsTokenState::Unregistered { timestamp_ms: 1 });
//! fakes.fcm.set_token_state(tok, FcmTokenState::Unregistered);
//! fakes.fcm.script(tok, Scripted::status(503).retry_after(2).times(1));
//! fakes.apns.script(tok, Scripted::drop_connection());
//!
//! let seen = fakes.apns.journal().wait_for_requests(2, Duration::from_secs(5)).await?;
//! assert_eq!(fakes.oauth.token_fetches(), 1);
//! assert_eq!(fakes.apns.distinct_jwt_count(), 1);
//! let files = fakes.write_sandbox_files(dir)?; // ca.pem, AuthKey_<id>.p8, …
//! ```
//!
//! # The fakes
//! * [`FakeApns`]: `POST /3/device/<token>`. Token auth (ES256 JWT: missing, invalid,
//!   expired, too-frequent updates, one team per connection) and certificate auth (a client
//!   certificate from [`FakeApns::issue_client_certificate`]); header, path and payload checks
//!   in pushy's order; token registry ([`ApnsTokenState`]). HTTP/2 only (ALPN `h2` or prior
//!   knowledge), SETTINGS_MAX_CONCURRENT_STREAMS from [`ApnsOptions`].
//! * [`FakeOAuth`]: `POST /token`, the JWT-bearer grant verified against the fixed test
//!   service-account key ([`oauth::service_account_key_pem`]); counts fetches.
//! * [`FakeFcm`]: `POST /v1/projects/{p}/messages:send`, Google's error shapes, data/priority/
//!   ttl/target validation, `validate_only`, token registry ([`FcmTokenState`]).
//!
//! # Control
//! Per-token and global [`Scripted`] outcomes (status and reason, Retry-After, delay, GOAWAY,
//! dropped connection, each for N requests), a global response delay, and a [`FakeClock`]
//! whose offset ages JWTs and access tokens. Every fake keeps a journal of
//! [`RecordedRequest`]s (capped, switchable off for benchmarks) and always-on counters
//! (`accepted_count`, `request_count`).
//!
//! The same control is reachable over HTTP for the `pushfleet-fakes` binary: every server
//! answers `GET /_fake/stats` with its counters, and APNs and FCM take JSON on
//! `POST /_fake/token-state` (`{"token","state"[,"timestamp_ms"]}`, states as in
//! [`ApnsTokenState`] / [`FcmTokenState`] in snake_case), `POST /_fake/script`
//! (`{"token"?,"status"?,"reason"?,"retry_after"?,"delay_ms"?,"times"?,"action"?: "drop"|"goaway"}`)
//! and `POST /_fake/delay` (`{"ms"}`).
//!
//! Known gaps: APNs' stream limit does not drop to 1 before the first valid JWT, GOAWAY
//! carries no JSON debug data, and RST_STREAM REFUSED_STREAM is not scripted.

pub mod apns;
pub mod fcm;
pub mod journal;
pub mod oauth;
pub mod script;
mod server;
pub mod tls;
pub mod webpush;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

pub use apns::{ApnsOptions, ApnsTokenKey, ApnsTokenState, FakeApns};
pub use fcm::{DeliveredMessage, FakeFcm, FcmOptions, FcmTokenState};
pub use journal::{AuthKind, Journal, RecordedRequest, DEFAULT_JOURNAL_CAPACITY};
pub use oauth::FakeOAuth;
pub use script::{FakeClock, ScriptAction, Scripted};
pub use tls::TestCa;
pub use webpush::{
    FakeWebPush, VapidSeen, WebPushMode, WebPushOptions, WebPushRequest, WebPushSubscription,
};

/// Settings for [`FakeProviders::start`]. Ports 0 pick free ports.
#[derive(Clone, Debug)]
pub struct FakeOptions {
    pub apns: ApnsOptions,
    pub fcm: FcmOptions,
    pub webpush: WebPushOptions,
    pub oauth_port: u16,
    /// `expires_in` of issued access tokens (Google: 3599).
    pub oauth_expires_in: u64,
    /// Record requests in the journals. Counters run regardless.
    pub journal: bool,
    /// Requests kept per fake; the oldest are dropped beyond it.
    pub journal_capacity: usize,
}

impl Default for FakeOptions {
    fn default() -> Self {
        Self {
            apns: ApnsOptions::default(),
            fcm: FcmOptions::default(),
            webpush: WebPushOptions::default(),
            oauth_port: 0,
            oauth_expires_in: 3599,
            journal: true,
            journal_capacity: DEFAULT_JOURNAL_CAPACITY,
        }
    }
}

impl FakeOptions {
    /// Same delay before every APNs and FCM answer.
    pub fn with_response_delay(mut self, delay: Duration) -> Self {
        self.apns.response_delay = delay;
        self.fcm.response_delay = delay;
        self
    }
}

/// All fakes, sharing one CA and one clock. Dropping it stops the servers.
pub struct FakeProviders {
    pub ca: Arc<TestCa>,
    pub clock: FakeClock,
    pub apns: FakeApns,
    pub fcm: FakeFcm,
    pub oauth: FakeOAuth,
    pub webpush: FakeWebPush,
}

/// What [`FakeProviders::write_sandbox_files`] wrote, and what a client needs besides.
#[derive(Clone, Debug, Serialize)]
pub struct SandboxFiles {
    pub apns_url: String,
    pub fcm_url: String,
    pub oauth_url: String,
    pub ca_pem: PathBuf,
    pub apns_key_p8: PathBuf,
    pub apns_key_id: String,
    pub apns_team_id: String,
    pub apns_bundle: String,
    pub apns_client_cert_pem: PathBuf,
    pub apns_client_key_pem: PathBuf,
    pub fcm_project_id: String,
    pub fcm_service_account_json: PathBuf,
    pub webpush_url: String,
    /// The application server's VAPID key (PKCS#8 PEM) and its public key.
    pub vapid_key_pem: PathBuf,
    pub vapid_public_key: String,
    /// A subscription on the fake push service, made for that VAPID key.
    pub webpush_endpoint: String,
    pub webpush_p256dh: String,
    pub webpush_auth: String,
}

/// Identities used by [`FakeProviders::write_sandbox_files_with`].
#[derive(Clone, Debug)]
pub struct SandboxSpec {
    pub team_id: String,
    pub bundle: String,
    pub project_id: String,
}

impl Default for SandboxSpec {
    fn default() -> Self {
        Self {
            team_id: "PFTEAM0001".into(),
            bundle: "org.pushfleet.sandbox".into(),
            project_id: "pushfleet-sandbox".into(),
        }
    }
}

impl FakeProviders {
    /// Generates the CA and starts APNs, OAuth and FCM.
    pub async fn start(options: FakeOptions) -> Result<Self> {
        let ca = Arc::new(TestCa::generate()?);
        let clock = FakeClock::default();
        let journal = (options.journal, options.journal_capacity);
        let apns = FakeApns::start(ca.clone(), clock.clone(), journal, options.apns.clone())
            .await
            .context("starting fake APNs")?;
        let oauth = FakeOAuth::start(
            ca.clone(),
            clock.clone(),
            journal,
            options.oauth_port,
            options.oauth_expires_in,
        )
        .await
        .context("starting fake OAuth")?;
        let fcm = FakeFcm::start(ca.clone(), oauth.clone(), journal, options.fcm.clone())
            .await
            .context("starting fake FCM")?;
        let webpush = FakeWebPush::start(ca.clone(), options.webpush.clone())
            .await
            .context("starting the fake push service")?;
        Ok(Self {
            ca,
            clock,
            apns,
            fcm,
            oauth,
            webpush,
        })
    }

    /// The test CA certificate (PEM) that clients must trust.
    pub fn ca_pem(&self) -> &str {
        self.ca.pem()
    }

    /// Turns every journal on or off (counters keep running).
    pub fn set_journal_enabled(&self, on: bool) {
        self.apns.journal().set_enabled(on);
        self.fcm.journal().set_enabled(on);
        self.oauth.journal().set_enabled(on);
    }

    /// Writes credentials for one APNs app and one FCM project, with default identities.
    pub fn write_sandbox_files(&self, dir: impl AsRef<Path>) -> Result<SandboxFiles> {
        self.write_sandbox_files_with(dir, &SandboxSpec::default())
    }

    /// Writes `ca.pem`, `AuthKey_<key id>.p8` (a fresh trusted key), `apns-client-cert.pem`
    /// and `apns-client-key.pem` (certificate auth), and `service-account.json` into `dir`.
    pub fn write_sandbox_files_with(
        &self,
        dir: impl AsRef<Path>,
        spec: &SandboxSpec,
    ) -> Result<SandboxFiles> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let write = |name: &str, content: &str| -> Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, content)
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };
        let key = self.apns.create_token_key(&spec.team_id);
        let (cert_pem, key_pem) = self.apns.issue_client_certificate(&spec.bundle);
        let (vapid_pem, vapid_public_key) = webpush::vapid_key();
        let subscription = self.webpush.subscribe_for_key(&vapid_public_key);
        Ok(SandboxFiles {
            apns_url: self.apns.url(),
            fcm_url: self.fcm.url(),
            oauth_url: self.oauth.url(),
            ca_pem: write("ca.pem", self.ca_pem())?,
            apns_key_p8: write(&format!("AuthKey_{}.p8", key.key_id), &key.p8_pem)?,
            apns_key_id: key.key_id,
            apns_team_id: key.team_id,
            apns_bundle: spec.bundle.clone(),
            apns_client_cert_pem: write("apns-client-cert.pem", &cert_pem)?,
            apns_client_key_pem: write("apns-client-key.pem", &key_pem)?,
            fcm_project_id: spec.project_id.clone(),
            fcm_service_account_json: write(
                "service-account.json",
                &self.fcm.service_account_json(&spec.project_id),
            )?,
            webpush_url: self.webpush.url(),
            vapid_key_pem: write("vapid-key.pem", &vapid_pem)?,
            vapid_public_key,
            webpush_endpoint: subscription.endpoint,
            webpush_p256dh: subscription.p256dh,
            webpush_auth: subscription.auth,
        })
    }
}

#[cfg(test)]
mod tests;
