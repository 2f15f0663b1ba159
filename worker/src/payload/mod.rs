//! What pushfleet sends to APNs and FCM for each (app type, event): the request Sylk Pushserver
//! builds, key for key, so existing Sylk and Linphone clients keep working, minus the reference's
//! mistakes (expiry headers, FCM `ttl`, non-string FCM data, a bogus `content-available` header).
//! Pure functions: no clock reads except where a wrapper says so, no I/O.

mod alerts;
mod linphone;
mod sylk;

use std::borrow::Cow;

use bytes::Bytes;
use pushfleet_core::clock::now_ms;
use pushfleet_core::config::{AppSettings, AppType};
use pushfleet_core::job::Job;
use pushfleet_core::policy::{Event, EventPolicy};
use serde::Serialize;

/// The headers and body of one APNs request (the device token goes into the URL).
#[derive(Debug, Clone, PartialEq)]
pub struct ApnsRequest {
    pub push_type: &'static str,
    pub priority: u8,
    pub topic: String,
    /// `apns-expiration`, absolute epoch seconds; 0: deliver now or never.
    pub expiration: u64,
    /// `apns-collapse-id`: alerts of one ringing call replace each other on the device.
    pub collapse_id: Option<String>,
    /// The JSON body, encoded once: a resend shares these bytes.
    pub payload: Bytes,
}

/// The APNs request for `job`, stamped with the current time where the payload carries one.
pub fn apns_request(app: &AppSettings, job: &Job, policy: &EventPolicy) -> ApnsRequest {
    apns_request_at(app, job, policy, now_ms())
}

/// [`apns_request`] with an explicit clock, for reproducible payloads.
pub fn apns_request_at(
    app: &AppSettings,
    job: &Job,
    policy: &EventPolicy,
    now_ms: u64,
) -> ApnsRequest {
    let job = &shown(app, job);
    if job.event == Event::Wakeup {
        return alerts::apns_wakeup(&app.id, job, now_ms);
    }
    if let Some(ringing) = &job.handling.ringing {
        return alerts::apns_ringing(app, job, ringing, now_ms);
    }
    match app.app_type {
        AppType::Sylk => sylk::apns_request(&app.id, job, policy),
        AppType::Linphone => linphone::apns_request(&app.id, job, now_ms),
    }
}

/// The job as the app's payloads may show it: with `display_caller = false` the caller's URI
/// and display name are blanked, whatever the layout.
fn shown<'a>(app: &AppSettings, job: &'a Job) -> Cow<'a, Job> {
    if app.display_caller {
        return Cow::Borrowed(job);
    }
    let mut hidden = job.clone();
    hidden.push.from = String::new();
    hidden.push.from_display_name = None;
    Cow::Owned(hidden)
}

/// The full FCM v1 body, `{"message": {...}}`, encoded.
///
/// The policy is not consulted: it only shapes APNs requests, and on FCM every event is a
/// high-priority message whose lifetime comes from the job's deadline.
pub fn fcm_message(app: &AppSettings, job: &Job, _policy: &EventPolicy, now_ms: u64) -> Bytes {
    let job = &shown(app, job);
    if job.event == Event::Wakeup {
        return alerts::fcm_wakeup(job, now_ms);
    }
    match app.app_type {
        AppType::Sylk => sylk::fcm_message(job, now_ms),
        AppType::Linphone => linphone::fcm_message(job, now_ms),
    }
}

/// The JSON body of a WebPush message (encrypted by the provider when the subscription has
/// keys): what the app type's FCM message carries as `data`, so one app reads the same keys
/// whichever way it was woken.
pub fn webpush_body(app: &AppSettings, job: &Job, now_ms: u64) -> Bytes {
    let job = &shown(app, job);
    match app.app_type {
        AppType::Sylk => sylk::webpush_body(job),
        AppType::Linphone => linphone::webpush_body(job, now_ms),
    }
}

/// Encodes a payload. The payload structs declare their fields in byte order of the JSON names,
/// so the keys go out sorted: one stable byte form for equal payloads.
fn encode(payload: &impl Serialize) -> Bytes {
    // Room for a typical payload up front, rather than growing the buffer twice on the way.
    let mut out = Vec::with_capacity(512);
    serde_json::to_writer(&mut out, payload).expect("payloads of strings and numbers encode");
    Bytes::from(out)
}

/// `{"message": {...}}`, the FCM v1 envelope.
#[derive(Serialize)]
struct FcmBody<'a, D> {
    message: FcmMessage<'a, D>,
}

#[derive(Serialize)]
struct FcmMessage<'a, D> {
    android: Android,
    #[serde(skip_serializing_if = "Option::is_none")]
    apns: Option<FcmApns>,
    /// FCM v1 rejects any `data` value that is not a string (including `null`), so absent fields
    /// are left out instead of being sent as `null` the way the reference does.
    data: D,
    #[serde(skip_serializing_if = "Option::is_none")]
    notification: Option<FcmNotification<'a>>,
    token: &'a str,
}

/// The `android` block every pushfleet FCM message carries.
#[derive(Serialize)]
struct Android {
    #[serde(skip_serializing_if = "Option::is_none")]
    notification: Option<AndroidNotification>,
    priority: &'static str,
    ttl: String,
}

impl Android {
    fn high_priority(job: &Job, now_ms: u64) -> Android {
        Android {
            notification: None,
            priority: "high",
            ttl: fcm_ttl(job, now_ms),
        }
    }

    /// Housekeeping: Android delivers it when the device is awake anyway or at its next
    /// maintenance window, without spending the app's high-priority budget.
    fn normal_priority(job: &Job, now_ms: u64) -> Android {
        Android {
            priority: "normal",
            ..Android::high_priority(job, now_ms)
        }
    }
}

#[derive(Serialize)]
struct AndroidNotification {
    channel_id: &'static str,
    default_sound: bool,
    notification_priority: &'static str,
    sound: &'static str,
}

/// Relayed by FCM to APNs when the Android token belongs to an iOS device registered via
/// Firebase: `{"headers": {"apns-priority": "5"}}`.
#[derive(Serialize)]
struct FcmApns {
    headers: FcmApnsHeaders,
}

#[derive(Serialize)]
struct FcmApnsHeaders {
    #[serde(rename = "apns-priority")]
    apns_priority: &'static str,
}

impl FcmApns {
    fn low_priority() -> FcmApns {
        FcmApns {
            headers: FcmApnsHeaders { apns_priority: "5" },
        }
    }
}

#[derive(Serialize)]
struct FcmNotification<'a> {
    body: String,
    image: &'static str,
    title: &'a str,
}

/// Sylk's topic rule: one trailing `.dev` or `.prod` label is an environment marker in the
/// configured app id, not part of the bundle id.
fn bundle_id(app_id: &str) -> &str {
    app_id
        .strip_suffix(".dev")
        .or_else(|| app_id.strip_suffix(".prod"))
        .unwrap_or(app_id)
}

/// APNs reads `apns-expiration` as an absolute instant; the job's deadline is exactly the moment
/// after which the push is worthless.
fn apns_expiration(job: &Job) -> u64 {
    job.deadline_ms / 1000
}

/// FCM's `android.ttl` is relative, so it is the time left until the deadline, rounded up so a
/// push with 300 ms left is still offered for a second rather than dropped at once ("0s").
fn fcm_ttl(job: &Job, now_ms: u64) -> String {
    const FCM_MAX_TTL_SECS: u64 = 2_419_200;
    let remaining_ms = job.deadline_ms.saturating_sub(now_ms);
    let secs = remaining_ms.div_ceil(1000).min(FCM_MAX_TTL_SECS);
    format!("{secs}s")
}

/// "YYYY-MM-DD HH:MM:SS" in UTC, the shape of Linphone's `send-time`.
fn format_send_time(epoch_ms: u64) -> String {
    let secs = epoch_ms / 1000;
    let (days, day_secs) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        day_secs / 3600,
        day_secs % 3600 / 60,
        day_secs % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
pub(crate) mod test_support {
    use pushfleet_core::config::{AppSettings, AppType, Platform};
    use pushfleet_core::job::{Job, PushData};
    use pushfleet_core::policy::{Event, EventPolicies, EventPolicy};
    use uuid::Uuid;

    /// 2024-05-06 07:08:09.500 UTC
    pub const NOW_MS: u64 = 1_714_979_289_500;

    pub fn app(id: &str, platform: Platform, app_type: AppType) -> AppSettings {
        AppSettings {
            id: id.into(),
            platform,
            app_type,
            apns: None,
            fcm: None,
            log_url: None,
            log_auth: None,
            log_timeout_ms: 5000,
            log_key: None,
            log_buffer: 10_000,
            display_caller: true,
            webpush: None,
        }
    }

    pub fn job(platform: Platform, event: Event) -> Job {
        let policy = EventPolicies::default();
        Job {
            v: 1,
            id: Uuid::parse_str("6f1c1c3e-4a43-4c3e-9d6f-5a1f8a2b0c11").expect("literal uuid"),
            app_id: "com.agprojects.sylk-ios.prod".into(),
            platform,
            event,
            lane: policy.get(event).lane,
            received_at_ms: NOW_MS - 500,
            deadline_ms: NOW_MS + 59_500,
            attempt: 0,
            push: PushData {
                token: "tok".into(),
                call_id: "call-123@host".into(),
                from: "alice@example.com".into(),
                to: "bob@example.com".into(),
                media_type: Some("audio".into()),
                silent: true,
                badge: 1,
                ..Default::default()
            },
            api_key_id: None,
            handling: Default::default(),
            reply: false,
        }
    }

    pub fn policy(event: Event) -> EventPolicy {
        *EventPolicies::default().get(event)
    }

    /// Compares an encoded payload with `expected` as text: serde_json writes the keys of a
    /// `json!` map sorted, so equal text means equal content, in the order the wire has.
    #[track_caller]
    pub fn assert_encoded(payload: &[u8], expected: serde_json::Value) {
        let text = std::str::from_utf8(payload).expect("UTF-8 JSON");
        assert_eq!(text, expected.to_string());
    }

    /// An encoded payload parsed back, to look at one field.
    pub fn parsed(payload: &[u8]) -> serde_json::Value {
        serde_json::from_slice(payload).expect("JSON payload")
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use pushfleet_core::config::{AppType, Platform};
    use pushfleet_core::policy::Event;

    #[test]
    fn send_time_is_utc_calendar_time() {
        assert_eq!(format_send_time(NOW_MS), "2024-05-06 07:08:09");
        assert_eq!(format_send_time(0), "1970-01-01 00:00:00");
        assert_eq!(format_send_time(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(format_send_time(4_107_542_399_000), "2100-02-28 23:59:59");
    }

    #[test]
    fn bundle_id_strips_one_environment_label() {
        assert_eq!(
            bundle_id("com.agprojects.sylk-ios.prod"),
            "com.agprojects.sylk-ios"
        );
        assert_eq!(bundle_id("com.x.app.dev"), "com.x.app");
        assert_eq!(bundle_id("com.x.app.dev.prod"), "com.x.app.dev");
        assert_eq!(bundle_id("com.x.production"), "com.x.production");
    }

    #[test]
    fn fcm_ttl_counts_down_to_the_deadline() {
        let mut job = job(Platform::Firebase, Event::IncomingSession);
        assert_eq!(fcm_ttl(&job, NOW_MS), "60s");
        assert_eq!(fcm_ttl(&job, job.deadline_ms - 300), "1s");
        assert_eq!(fcm_ttl(&job, job.deadline_ms), "0s");
        assert_eq!(fcm_ttl(&job, job.deadline_ms + 5_000), "0s");
        job.deadline_ms = NOW_MS + 40 * 86_400_000;
        assert_eq!(fcm_ttl(&job, NOW_MS), "2419200s");
    }

    /// Ingest refuses pushes by an upper bound of the body's size: no body may exceed it,
    /// whatever the event, app type or text.
    #[test]
    fn webpush_bodies_stay_within_ingests_bound() {
        let nasty = "\"\\\u{1}é🎧<>&".repeat(40);
        for app_type in [AppType::Sylk, AppType::Linphone] {
            let app = app("a", Platform::UnifiedPush, app_type);
            for event in [
                Event::IncomingSession,
                Event::IncomingConferenceRequest,
                Event::Cancel,
                Event::Message,
                Event::Transfer,
            ] {
                for text in ["", "plain", nasty.as_str()] {
                    let mut job = job(Platform::UnifiedPush, event);
                    let p = &mut job.push;
                    p.call_id = format!("{text}call");
                    p.from = format!("{text}from");
                    p.to = format!("{text}to");
                    for field in [
                        &mut p.from_display_name,
                        &mut p.reason,
                        &mut p.account,
                        &mut p.content,
                        &mut p.content_type,
                        &mut p.filename,
                        &mut p.filetype,
                        &mut p.media_type,
                    ] {
                        *field = Some(text.to_string());
                    }
                    let body = webpush_body(&app, &job, NOW_MS);
                    let bound = pushfleet_core::webpush::cleartext_bound(&job.push);
                    assert!(
                        body.len() <= bound,
                        "{app_type:?} {event:?}: {} > {bound}",
                        body.len()
                    );
                }
            }
        }
    }

    #[test]
    fn apns_expiration_is_the_deadline_in_epoch_seconds() {
        let job = job(Platform::Apple, Event::IncomingSession);
        assert_eq!(apns_expiration(&job), 1_714_979_349);
    }
}
