//! Scripted outcomes and the fake clock.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What a scripted outcome does to the request it catches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScriptAction {
    /// Answer (with the scripted status, or normally).
    Respond,
    /// Close the TCP connection without answering; other streams on it die too.
    DropConnection,
    /// Answer, then send HTTP/2 GOAWAY and let the connection's open streams finish.
    GoAway,
}

/// One scripted outcome for a device token (or for every token), used `times` times.
///
/// ```text
/// fakes.fcm.script(tok, Scripted::status(503).retry_after(2).times(1));
/// fakes.apns.script(tok, Scripted::status(503).reason("Shutdown").goaway());
/// fakes.apns.script(tok, Scripted::normal().delay_ms(2000)); // slow, then the usual answer
/// fakes.apns.script(tok, Scripted::drop_connection());
/// ```
#[derive(Clone, Debug)]
pub struct Scripted {
    pub(crate) status: Option<u16>,
    pub(crate) reason: Option<String>,
    pub(crate) retry_after: Option<String>,
    pub(crate) delay: Duration,
    pub(crate) action: ScriptAction,
    pub(crate) times: u32,
}

impl Scripted {
    /// Answer with this HTTP status. Without [`Scripted::reason`] the provider's usual
    /// reason for it is used (APNs: 429 TooManyRequests, 500 InternalServerError,
    /// 503 ServiceUnavailable, 410 Unregistered…; FCM: 429 QUOTA_EXCEEDED, 503 UNAVAILABLE,
    /// 500 INTERNAL, 404 UNREGISTERED, 401 THIRD_PARTY_AUTH_ERROR…).
    pub fn status(status: u16) -> Self {
        Self {
            status: Some(status),
            ..Self::normal()
        }
    }

    /// Answer as the token's registry state says; useful with [`Scripted::delay_ms`] or
    /// [`Scripted::goaway`].
    pub fn normal() -> Self {
        Self {
            status: None,
            reason: None,
            retry_after: None,
            delay: Duration::ZERO,
            action: ScriptAction::Respond,
            times: 1,
        }
    }

    /// Close the connection carrying the request without any answer.
    pub fn drop_connection() -> Self {
        Self {
            action: ScriptAction::DropConnection,
            ..Self::normal()
        }
    }

    /// APNs `reason` or FCM `errorCode`. For FCM, `"UNAUTHENTICATED"` gives the OAuth-style
    /// 401 (no FcmError detail) and `""` an error without any FcmError detail.
    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// Adds `Retry-After: <seconds>`.
    pub fn retry_after(self, seconds: u64) -> Self {
        self.retry_after_raw(seconds.to_string())
    }

    /// Adds `Retry-After` with any value (e.g. an HTTP date).
    pub fn retry_after_raw(mut self, value: impl Into<String>) -> Self {
        self.retry_after = Some(value.into());
        self
    }

    /// Waits this long before answering (or before dropping the connection).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    pub fn delay_ms(self, ms: u64) -> Self {
        self.delay(Duration::from_millis(ms))
    }

    /// Sends GOAWAY on the connection after answering.
    pub fn goaway(mut self) -> Self {
        self.action = ScriptAction::GoAway;
        self
    }

    /// How many requests this outcome catches (default 1); then the next script, or the
    /// token's normal state, applies.
    pub fn times(mut self, n: u32) -> Self {
        self.times = n.max(1);
        self
    }
}

/// Per-token queues of scripted outcomes, plus one queue for every token.
#[derive(Default)]
pub(crate) struct ScriptBook {
    per_token: Mutex<HashMap<String, VecDeque<Scripted>>>,
    global: Mutex<VecDeque<Scripted>>,
}

impl ScriptBook {
    pub(crate) fn push(&self, token: &str, s: Scripted) {
        self.per_token
            .lock()
            .unwrap()
            .entry(token.to_string())
            .or_default()
            .push_back(s);
    }

    pub(crate) fn push_global(&self, s: Scripted) {
        self.global.lock().unwrap().push_back(s);
    }

    pub(crate) fn clear(&self) {
        self.per_token.lock().unwrap().clear();
        self.global.lock().unwrap().clear();
    }

    /// Consumes one use of the next outcome for `token`, falling back to the global queue.
    pub(crate) fn take(&self, token: Option<&str>) -> Option<Scripted> {
        if let Some(token) = token {
            let mut map = self.per_token.lock().unwrap();
            if let Some(queue) = map.get_mut(token) {
                let taken = take_one(queue);
                if queue.is_empty() {
                    map.remove(token);
                }
                if taken.is_some() {
                    return taken;
                }
            }
        }
        take_one(&mut self.global.lock().unwrap())
    }
}

fn take_one(queue: &mut VecDeque<Scripted>) -> Option<Scripted> {
    let front = queue.front_mut()?;
    front.times -= 1;
    if front.times == 0 {
        queue.pop_front()
    } else {
        Some(front.clone())
    }
}

/// The fakes' notion of "now": the system clock plus a settable offset.
///
/// Moving it forward ages every JWT and access token the fakes have seen, so token expiry
/// and APNs' 20-minute rule can be tested without waiting.
#[derive(Clone, Default, Debug)]
pub struct FakeClock {
    offset_ms: Arc<AtomicI64>,
}

impl FakeClock {
    /// Milliseconds since the Unix epoch, offset included.
    pub fn now_ms(&self) -> i64 {
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        real + self.offset_ms.load(Ordering::Relaxed)
    }

    pub fn now_secs(&self) -> i64 {
        self.now_ms().div_euclid(1000)
    }

    /// Moves the clock forward by `by` (cumulative).
    pub fn advance(&self, by: Duration) {
        self.offset_ms
            .fetch_add(by.as_millis() as i64, Ordering::Relaxed);
    }

    /// Sets the offset from the system clock, in seconds (may be negative).
    pub fn set_offset_secs(&self, secs: i64) {
        self.offset_ms.store(secs * 1000, Ordering::Relaxed);
    }

    pub fn offset_secs(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed) / 1000
    }
}

/// A scripted outcome as the `POST /_fake/script` control endpoint takes it.
#[derive(serde::Deserialize)]
pub(crate) struct ScriptSpec {
    /// Without a token the outcome applies to any request.
    pub(crate) token: Option<String>,
    status: Option<u16>,
    reason: Option<String>,
    retry_after: Option<u64>,
    delay_ms: Option<u64>,
    times: Option<u32>,
    /// `"respond"` (default), `"drop"` or `"goaway"`.
    action: Option<String>,
}

impl ScriptSpec {
    pub(crate) fn to_scripted(&self) -> Result<Scripted, String> {
        let mut s = match self.action.as_deref() {
            None | Some("respond") | Some("goaway") => match self.status {
                Some(status) => Scripted::status(status),
                None => Scripted::normal(),
            },
            Some("drop") => Scripted::drop_connection(),
            Some(other) => return Err(format!("unknown action {other:?}")),
        };
        if self.action.as_deref() == Some("goaway") {
            s = s.goaway();
        }
        if let Some(r) = &self.reason {
            s = s.reason(r.clone());
        }
        if let Some(ra) = self.retry_after {
            s = s.retry_after(ra);
        }
        if let Some(ms) = self.delay_ms {
            s = s.delay_ms(ms);
        }
        if let Some(n) = self.times {
            s = s.times(n);
        }
        Ok(s)
    }
}

/// Body of `POST /_fake/delay`.
#[derive(serde::Deserialize)]
pub(crate) struct DelaySpec {
    pub(crate) ms: u64,
}
