//! What every fake received, for tests to assert on.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, Result};
use bytes::Bytes;
use tokio::sync::watch;

/// How a request authenticated itself, as the fake understood it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthKind {
    /// No usable credential (the request may still have been answered with an error).
    None,
    /// APNs provider token: the JWT's key id and team id.
    ApnsJwt { key_id: String, team_id: String },
    /// APNs TLS client certificate, with the bundle it was issued for (`None` for a
    /// certificate this fake did not issue but the CA signed).
    ApnsCertificate { bundle: Option<String> },
    /// OAuth2 bearer access token (FCM).
    Bearer { access_token: String },
    /// OAuth2 JWT-bearer grant (token endpoint): the assertion's `iss`.
    JwtAssertion { client_email: String },
}

/// One request as a fake received it, and how it was answered.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// Order of recording across this fake, from 0.
    pub seq: u64,
    pub method: String,
    /// Path and query, as sent.
    pub path: String,
    /// Every header in the order it arrived (names lowercase).
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// The body parsed as JSON, when it is JSON.
    pub json: Option<serde_json::Value>,
    /// Which TCP connection carried it; ids are unique across all fakes.
    pub connection_id: u64,
    /// Position among the requests of that connection, from 0 (HTTP/2 streams in arrival order).
    pub stream_order: u64,
    pub received_at: SystemTime,
    pub received_instant: Instant,
    pub auth: AuthKind,
    /// The device token (APNs path, FCM `message.token`), if any.
    pub token: Option<String>,
    /// Status answered; `None` when the connection was dropped instead.
    pub status: Option<u16>,
    /// APNs `reason` / FCM `errorCode` (or canonical status) / OAuth `error`.
    pub reason: Option<String>,
    /// True when the fake counted this request as a delivered push.
    pub delivered: bool,
}

impl RecordedRequest {
    /// The first value of a header (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Default number of requests kept; older ones are dropped first.
pub const DEFAULT_JOURNAL_CAPACITY: usize = 100_000;

/// What one fake received; each fake hands it out through `journal()`.
pub struct Journal {
    enabled: AtomicBool,
    capacity: usize,
    entries: Mutex<VecDeque<RecordedRequest>>,
    seq: AtomicU64,
    recorded: watch::Sender<u64>,
}

impl Journal {
    pub(crate) fn new(enabled: bool, capacity: usize) -> Self {
        Self {
            enabled: AtomicBool::new(enabled),
            capacity: capacity.max(1),
            entries: Mutex::new(VecDeque::new()),
            seq: AtomicU64::new(0),
            recorded: watch::Sender::new(0),
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Turns recording on or off; counters elsewhere keep running.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    pub(crate) fn record(&self, mut entry: RecordedRequest) {
        if !self.enabled() {
            return;
        }
        entry.seq = self.seq.fetch_add(1, Ordering::Relaxed);
        {
            let mut entries = self.entries.lock().unwrap();
            if entries.len() >= self.capacity {
                entries.pop_front();
            }
            entries.push_back(entry);
        }
        self.recorded.send_modify(|n| *n += 1);
    }

    /// Every recorded request, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.entries.lock().unwrap().iter().cloned().collect()
    }

    /// The recorded requests for one device token.
    pub fn requests_for_token(&self, token: &str) -> Vec<RecordedRequest> {
        self.entries
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.token.as_deref() == Some(token))
            .cloned()
            .collect()
    }

    pub fn clear(&self) {
        self.entries.lock().unwrap().clear();
        self.recorded.send_replace(0);
    }

    /// Waits until `n` requests were recorded (since start or the last [`Journal::clear`]),
    /// then returns them.
    pub async fn wait_for_requests(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<RecordedRequest>> {
        let mut rx = self.recorded.subscribe();
        let reached = tokio::time::timeout(timeout, rx.wait_for(|count| *count >= n as u64)).await;
        match reached {
            Ok(Ok(_)) => Ok(self.requests()),
            _ => Err(anyhow!(
                "only {} of {n} requests arrived within {timeout:?}",
                *self.recorded.borrow()
            )),
        }
    }
}

/// Builds a journal entry from the parts every fake has at hand.
pub(crate) fn entry(
    parts: &axum::http::request::Parts,
    body: &Bytes,
    conn: &crate::server::ConnInfo,
    stream_order: u64,
    received_at: SystemTime,
    received_instant: Instant,
) -> RecordedRequest {
    RecordedRequest {
        seq: 0,
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| parts.uri.path().to_string()),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.clone(),
        json: serde_json::from_slice(body).ok(),
        connection_id: conn.id,
        stream_order,
        received_at,
        received_instant,
        auth: AuthKind::None,
        token: None,
        status: None,
        reason: None,
        delivered: false,
    }
}
