//! The messages that travel through RabbitMQ: push jobs (ingest → worker), outcome events
//! (worker → audit sink) and synchronous replies (worker → the waiting ingest request).
//! Each carries a version so that a rolling upgrade can tell old messages from new ones.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::Platform;
use crate::policy::{Event, Lane};
use crate::tokens::token_fingerprint;

pub const JOB_VERSION: u8 = 1;

/// One push to one device, as accepted by ingest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Job {
    pub v: u8,
    pub id: Uuid,
    pub app_id: String,
    pub platform: Platform,
    pub event: Event,
    pub lane: Lane,
    pub received_at_ms: u64,
    /// After this instant the push is worthless: it is recorded as `expired`, never sent.
    pub deadline_ms: u64,
    /// Attempts already made (0 for a fresh job).
    #[serde(default)]
    pub attempt: u32,
    pub push: PushData,
    /// The API key the push was sent with (its public id); none for an anonymous request and
    /// in jobs from before API keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_id: Option<String>,
    /// When the job waits before being sent, and how a call rings a phone without VoIP push.
    #[serde(default, skip_serializing_if = "Handling::is_plain")]
    pub handling: Handling,
    /// A sync caller waits for this job's answer at the `reply_to` of the message carrying it.
    /// A message of several jobs has one `reply_to` for all, so each job says whether it is
    /// answered; a message of one job (as every message was before batches) is answered
    /// whenever it has a `reply_to`. See [`wants_reply`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reply: bool,
}

/// How a job is sent beyond "once, now": held back for a while (`pn-timeout`, the next ring),
/// rung by repeated alerts, or sent as a registration wake-up.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Handling {
    /// Not sent before this instant: the job waits in the broker's delay queues until then. A
    /// cancel of the call meanwhile means it is never sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_until_ms: Option<u64>,
    /// An incoming call to an iOS device without a VoIP token: rung by alert pushes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ringing: Option<Ringing>,
    /// A background push that makes the app register again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub wakeup: bool,
    /// A UnifiedPush push to a distributor over XMPP: sent by the worker holding the component,
    /// as a `<message>` with the content (`push.content`) as its body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xmpp: Option<XmppTarget>,
}

/// Where the XMPP gateway sends a push: the distributor's full JID and its public token (the
/// message's `<subject>`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct XmppTarget {
    pub jid: String,
    pub public_token: String,
}

impl Handling {
    pub fn is_plain(&self) -> bool {
        *self == Handling::default()
    }
}

/// Ringing by alerts: one every `interval_ms` (0: a single alert) until the call is cancelled,
/// then a final alert naming how it ended, and nothing past the job's deadline.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Ringing {
    pub interval_ms: u64,
    /// Alerts delivered so far.
    #[serde(default)]
    pub rings: u32,
    /// Set on the copy that sends the final alert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<CallEnd>,
}

/// How a call rung by alerts ended, from the `reason` of its cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallEnd {
    Missed,
    AnsweredElsewhere,
    DeclinedElsewhere,
}

impl CallEnd {
    /// A cancel's `reason`: the three names, anything else (or none) is a missed call.
    pub fn from_reason(reason: Option<&str>) -> CallEnd {
        match reason {
            Some("answered_elsewhere") => CallEnd::AnsweredElsewhere,
            Some("declined_elsewhere") => CallEnd::DeclinedElsewhere,
            _ => CallEnd::Missed,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CallEnd::Missed => "missed",
            CallEnd::AnsweredElsewhere => "answered_elsewhere",
            CallEnd::DeclinedElsewhere => "declined_elsewhere",
        }
    }
}

/// Per-contact alert strings (APNs `loc-key`s) and sounds, as Linphone registers them in its
/// Contact (`pn-call-str`, `pn-msg-snd`…). Absent ones take the defaults of the payload.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ContactStrings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_str: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_str: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groupchat_str: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing_call_str: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_accepted_elsewhere_str: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_declined_elsewhere_str: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_snd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_snd: Option<String>,
}

impl ContactStrings {
    /// The RFC 8599 parameter names, in field order.
    pub const PARAMS: [&'static str; 8] = [
        "pn-call-str",
        "pn-msg-str",
        "pn-groupchat-str",
        "pn-missing-call-str",
        "pn-call-accepted-elsewhere-str",
        "pn-call-declined-elsewhere-str",
        "pn-call-snd",
        "pn-msg-snd",
    ];

    pub fn is_empty(&self) -> bool {
        *self == ContactStrings::default()
    }

    /// The field a parameter of [`ContactStrings::PARAMS`] fills.
    pub fn slot(&mut self, param: &str) -> Option<&mut Option<String>> {
        Some(match param {
            "pn-call-str" => &mut self.call_str,
            "pn-msg-str" => &mut self.msg_str,
            "pn-groupchat-str" => &mut self.groupchat_str,
            "pn-missing-call-str" => &mut self.missing_call_str,
            "pn-call-accepted-elsewhere-str" => &mut self.call_accepted_elsewhere_str,
            "pn-call-declined-elsewhere-str" => &mut self.call_declined_elsewhere_str,
            "pn-call-snd" => &mut self.call_snd,
            "pn-msg-snd" => &mut self.msg_snd,
            _ => return None,
        })
    }

    /// The final alert's string for a call that ended so.
    pub fn final_str(&self, end: CallEnd) -> &str {
        match end {
            CallEnd::Missed => self.missing_call_str.as_deref().unwrap_or("Missing call"),
            CallEnd::AnsweredElsewhere => self
                .call_accepted_elsewhere_str
                .as_deref()
                .unwrap_or("Call accepted elsewhere"),
            CallEnd::DeclinedElsewhere => self
                .call_declined_elsewhere_str
                .as_deref()
                .unwrap_or("Call declined elsewhere"),
        }
    }
}

impl Job {
    pub fn remaining(&self, now_ms: u64) -> Duration {
        Duration::from_millis(self.deadline_ms.saturating_sub(now_ms))
    }

    pub fn is_expired(&self, now_ms: u64) -> bool {
        now_ms >= self.deadline_ms
    }
}

/// The push request's own fields, normalised (Sylk v1 names in snake case).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PushData {
    pub token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    pub call_id: String,
    pub from: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_display_name: Option<String>,
    pub to: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default = "default_true")]
    pub silent: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default = "default_badge")]
    pub badge: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filetype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// A message to a group chat: alerts use the group-chat string.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub group_chat: bool,
    #[serde(default, skip_serializing_if = "ContactStrings::is_empty")]
    pub strings: ContactStrings,
    /// A WebPush subscription's keys (RFC 8291, base64url): with them the push is encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webpush_keys: Option<WebPushKeys>,
}

/// The public key and authentication secret of a WebPush subscription, base64url.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WebPushKeys {
    pub p256dh: String,
    pub auth: String,
}

fn default_true() -> bool {
    true
}

fn default_badge() -> i64 {
    1
}

/// The terminal states of a job: every accepted job ends in exactly one. Operators, alert rules
/// and auditors rely on these names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    Delivered,
    Rejected,
    TokenInvalid,
    Expired,
    Failed,
    Cancelled,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Rejected => "rejected",
            DeliveryStatus::TokenInvalid => "token_invalid",
            DeliveryStatus::Expired => "expired",
            DeliveryStatus::Failed => "failed",
            DeliveryStatus::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for DeliveryStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One send to a provider.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AttemptRecord {
    pub number: u32,
    pub at_ms: u64,
    /// HTTP status from the provider; `None` when no answer came (connection error, timeout).
    pub provider_status: Option<u16>,
    pub reason: Option<String>,
    pub duration_ms: u64,
    pub worker: String,
}

/// How a job ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Terminal {
    pub status: DeliveryStatus,
    pub attempts: u32,
    pub provider_status: Option<u16>,
    pub reason: Option<String>,
    /// `apns-id` or the FCM message name.
    pub provider_message_id: Option<String>,
    pub finished_at_ms: u64,
}

/// What the worker reports after handling a job once: the attempt it made (if it sent anything)
/// and, when the job is done, its terminal state. The audit sink turns these into rows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutcomeEvent {
    pub v: u8,
    pub job_id: Uuid,
    pub app_id: String,
    pub platform: Platform,
    pub event: Event,
    pub lane: Lane,
    pub call_id: String,
    pub account: Option<String>,
    pub device_id: Option<String>,
    pub token_fingerprint: String,
    pub received_at_ms: u64,
    pub attempt: Option<AttemptRecord>,
    pub terminal: Option<Terminal>,
    /// Set when the provider declared the token dead: the audit sink marks it invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_invalidation: Option<TokenInvalidation>,
    /// The job's API key, for `deliveries.api_key_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_id: Option<String>,
}

/// A token the provider declared dead. The raw token travels only inside the broker, like the
/// job itself; audit rows keep its fingerprint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenInvalidation {
    pub token: String,
    pub reason: String,
    /// APNs 410: when the token stopped being valid. A registration after it wins.
    pub provider_timestamp_ms: Option<u64>,
}

impl OutcomeEvent {
    pub fn for_job(job: &Job) -> OutcomeEvent {
        OutcomeEvent {
            v: JOB_VERSION,
            job_id: job.id,
            app_id: job.app_id.clone(),
            platform: job.platform,
            event: job.event,
            lane: job.lane,
            call_id: job.push.call_id.clone(),
            account: job.push.account.clone(),
            device_id: job.push.device_id.clone(),
            token_fingerprint: token_fingerprint(&job.push.token),
            received_at_ms: job.received_at_ms,
            attempt: None,
            terminal: None,
            token_invalidation: None,
            api_key_id: job.api_key_id.clone(),
        }
    }
}

/// The answer a worker sends to an ingest request waiting in sync mode (RabbitMQ direct
/// reply-to, correlated by job id). `code`, `reason`, `body` and `url` are Sylk-shaped.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SyncReply {
    pub job_id: Uuid,
    pub status: DeliveryStatus,
    pub code: u16,
    pub reason: String,
    pub body: serde_json::Value,
    pub url: String,
    /// With `status` `token_invalid` after an APNs 410: when the token stopped being valid,
    /// epoch milliseconds. A registration after it keeps the token alive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalid_since_ms: Option<u64>,
}

/// Joins encoded JSON values into one JSON array: the body of a message carrying a batch of
/// outcome events or sync replies.
pub fn json_array<'a>(items: impl IntoIterator<Item = &'a [u8]>, out: &mut Vec<u8>) {
    out.clear();
    out.push(b'[');
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(item);
    }
    out.push(b']');
}

/// Reads a message holding a JSON array of `T` (a batch) or a single `T`, as senders that do
/// not batch publish them.
pub fn decode_batch<T: serde::de::DeserializeOwned>(data: &[u8]) -> serde_json::Result<Vec<T>> {
    match data.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => serde_json::from_slice(data),
        _ => serde_json::from_slice(data).map(|one| vec![one]),
    }
}

/// The most jobs one broker message carries, and the most bytes of their JSON: bounds what a
/// worker holds per unacked message and what a redelivery repeats.
pub const MAX_JOBS_PER_MESSAGE: usize = 64;
pub const MAX_JOB_BYTES_PER_MESSAGE: usize = 64 * 1024;

/// How many of the encoded jobs of sizes `sizes` (in queue order) the next message takes: as
/// many as fit in [`MAX_JOBS_PER_MESSAGE`] and [`MAX_JOB_BYTES_PER_MESSAGE`] (the array's
/// brackets and commas counted), and always the first one, however large.
pub fn jobs_in_next_message(sizes: impl IntoIterator<Item = usize>) -> usize {
    let mut bytes = 1; // the opening bracket
    let mut taken = 0;
    for size in sizes.into_iter().take(MAX_JOBS_PER_MESSAGE) {
        bytes += size + 1; // a comma or the closing bracket
        if taken > 0 && bytes > MAX_JOB_BYTES_PER_MESSAGE {
            break;
        }
        taken += 1;
    }
    taken
}

/// The broker expiration of a message carrying jobs that expire at `expires_at_ms`: that of the
/// earliest. A job of an expired message that still has time is published again by the audit
/// sink; the others are recorded `expired`.
pub fn message_expiration_ms(expires_at_ms: impl IntoIterator<Item = u64>, now_ms: u64) -> u64 {
    expires_at_ms
        .into_iter()
        .min()
        .map_or(0, |earliest| earliest.saturating_sub(now_ms))
}

/// The jobs of a job message, and whether it is a batch (a JSON array, from ingest) rather than
/// a single job (a fresh job when ingest had nothing else to send, a retry copy, a job from
/// before batches).
pub fn decode_jobs(data: &[u8]) -> serde_json::Result<(Vec<Job>, bool)> {
    let batch = data.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    decode_batch(data).map(|jobs| (jobs, batch))
}

/// Whether a job of a message with `reply_to` (or none) is answered: every job of a batch that
/// asks for it, a single job whenever the message has a `reply_to`.
pub fn wants_reply(job: &Job, batch: bool, has_reply_to: bool) -> bool {
    has_reply_to && (job.reply || !batch)
}

/// The Sylk apps' `session-id`: the MD5 of the call-id formatted 8-4-4-4-12. Not a valid UUID,
/// but clients key CallKit on it, so it is reproduced exactly.
pub fn sylk_session_id(call_id: &str) -> String {
    let hex = format!("{:x}", md5::compute(call_id.as_bytes()));
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_and_single_values_decode() {
        let mut body = Vec::new();
        json_array([&b"1"[..], b"2", b"3"], &mut body);
        assert_eq!(body, b"[1,2,3]");
        assert_eq!(decode_batch::<u32>(&body).unwrap(), vec![1, 2, 3]);
        assert_eq!(decode_batch::<u32>(b" 7").unwrap(), vec![7]);
        json_array([], &mut body);
        assert_eq!(decode_batch::<u32>(&body).unwrap(), Vec::<u32>::new());
        assert!(decode_batch::<u32>(b"[1,").is_err());
        assert!(decode_batch::<u32>(b"nonsense").is_err());
    }

    fn job(deadline_ms: u64) -> Job {
        Job {
            v: JOB_VERSION,
            id: Uuid::new_v4(),
            app_id: "a".into(),
            platform: Platform::Apple,
            event: Event::Message,
            lane: Lane::Messages,
            received_at_ms: 1,
            deadline_ms,
            attempt: 0,
            push: PushData::default(),
            api_key_id: None,
            handling: Default::default(),
            reply: false,
        }
    }

    #[test]
    fn a_message_takes_jobs_up_to_its_bounds() {
        assert_eq!(jobs_in_next_message([]), 0);
        assert_eq!(jobs_in_next_message([400]), 1);
        assert_eq!(jobs_in_next_message([400; 10]), 10);
        assert_eq!(
            jobs_in_next_message([400; MAX_JOBS_PER_MESSAGE + 40]),
            MAX_JOBS_PER_MESSAGE
        );
        // 1 KiB jobs: the byte bound comes first.
        let fit = (MAX_JOB_BYTES_PER_MESSAGE - 1) / 1025;
        assert_eq!(jobs_in_next_message([1024; 300]), fit);
        // A job larger than the bound still goes, alone.
        assert_eq!(
            jobs_in_next_message([MAX_JOB_BYTES_PER_MESSAGE * 2, 10, 10]),
            1
        );
        assert_eq!(
            jobs_in_next_message([10, MAX_JOB_BYTES_PER_MESSAGE * 2, 10]),
            1
        );
    }

    #[test]
    fn a_message_expires_with_its_earliest_job() {
        assert_eq!(message_expiration_ms([5_000, 2_000, 9_000], 1_000), 1_000);
        assert_eq!(message_expiration_ms([30_000], 1_000), 29_000);
        // Already past: expires at once (the sink then records it `expired`).
        assert_eq!(message_expiration_ms([500, 60_000], 1_000), 0);
    }

    #[test]
    fn old_single_job_messages_decode_and_answer_by_reply_to() {
        let single = job(2);
        let body = serde_json::to_vec(&single).unwrap();
        assert!(!String::from_utf8_lossy(&body).contains("reply"));
        let (jobs, batch) = decode_jobs(&body).unwrap();
        assert_eq!((jobs, batch), (vec![single.clone()], false));
        // A single job is answered whenever its message has a reply-to, flag or not.
        assert!(wants_reply(&single, false, true));
        assert!(!wants_reply(&single, false, false));

        let mut asking = job(3);
        asking.reply = true;
        let encoded = [
            serde_json::to_vec(&single).unwrap(),
            serde_json::to_vec(&asking).unwrap(),
        ];
        let mut body = Vec::new();
        json_array(encoded.iter().map(Vec::as_slice), &mut body);
        let (jobs, batch) = decode_jobs(&body).unwrap();
        assert!(batch);
        assert_eq!(jobs, vec![single, asking]);
        // In a batch only the jobs that ask are answered, and only with a reply-to.
        assert!(!wants_reply(&jobs[0], true, true));
        assert!(wants_reply(&jobs[1], true, true));
        assert!(!wants_reply(&jobs[1], true, false));
    }

    #[test]
    fn session_id_matches_the_reference() {
        assert_eq!(
            sylk_session_id("call-123@host"),
            "a78d482c-1b67-8af8-091a-5a8be2fcf260"
        );
    }

    #[test]
    fn job_round_trips_and_defaults_are_tolerant() {
        let json = r#"{"v":1,"id":"6f1c1c3e-4a43-4c3e-9d6f-5a1f8a2b0c11","app_id":"a","platform":"apple",
            "event":"cancel","lane":"calls","received_at_ms":1,"deadline_ms":2,
            "push":{"token":"t","call_id":"c","from":"f","to":"t"}}"#;
        let job: Job = serde_json::from_str(json).unwrap();
        assert_eq!(job.attempt, 0);
        assert_eq!(job.api_key_id, None);
        assert!(job.push.silent);
        assert_eq!(job.push.badge, 1);
        let again: Job = serde_json::from_slice(&serde_json::to_vec(&job).unwrap()).unwrap();
        assert_eq!(job, again);
    }

    #[test]
    fn the_api_key_travels_from_job_to_outcome() {
        let json = r#"{"v":1,"id":"6f1c1c3e-4a43-4c3e-9d6f-5a1f8a2b0c11","app_id":"a","platform":"apple",
            "event":"cancel","lane":"calls","received_at_ms":1,"deadline_ms":2,
            "push":{"token":"t","call_id":"c","from":"f","to":"t"},"api_key_id":"0123456789abcdef"}"#;
        let job: Job = serde_json::from_str(json).unwrap();
        assert_eq!(job.api_key_id.as_deref(), Some("0123456789abcdef"));
        let outcome = OutcomeEvent::for_job(&job);
        assert_eq!(outcome.api_key_id, job.api_key_id);
        let encoded = serde_json::to_value(&outcome).unwrap();
        assert_eq!(encoded["api_key_id"], "0123456789abcdef");
        // An outcome from a worker that predates keys still decodes.
        let mut old = encoded;
        old.as_object_mut().unwrap().remove("api_key_id");
        let decoded: OutcomeEvent = serde_json::from_value(old).unwrap();
        assert_eq!(decoded.api_key_id, None);
        // An anonymous job is encoded as before.
        let mut anonymous = job;
        anonymous.api_key_id = None;
        assert!(!serde_json::to_string(&anonymous)
            .unwrap()
            .contains("api_key_id"));
    }
}
