//! Requests for Sylk clients, as Sylk Pushserver builds them for its own apps. Calls and cancellations are data-only
//! pushes whose top-level keys the app reads directly; messages and transfers are user-visible.

use bytes::Bytes;
use pushfleet_core::job::{sylk_session_id, Job};
use pushfleet_core::policy::{ApnsPushType, Event, EventPolicy};
use serde::Serialize;

use super::{
    apns_expiration, bundle_id, encode, Android, AndroidNotification, ApnsRequest, FcmApns,
    FcmBody, FcmMessage, FcmNotification,
};

/// Shown by Android next to transfer notifications, as the reference does.
const NOTIFICATION_IMAGE: &str = "https://icanblink.com/apple-touch-icon-180x180.png";

pub(super) fn apns_request(app_id: &str, job: &Job, policy: &EventPolicy) -> ApnsRequest {
    let bundle = bundle_id(app_id);
    // The topic follows the push type: PushKit pushes are only accepted on `<bundle>.voip`.
    let topic = if policy.apns_push_type == ApnsPushType::Voip && !bundle.ends_with(".voip") {
        format!("{bundle}.voip")
    } else {
        bundle.to_string()
    };
    ApnsRequest {
        push_type: policy.apns_push_type.as_str(),
        priority: policy.apns_priority,
        topic,
        expiration: apns_expiration(job),
        payload: apns_payload(job),
        collapse_id: None,
    }
}

// APNs payloads keep the reference's nulls: an absent optional field is sent as `null`.

/// Calls: no `aps`, the app reads the top-level keys in its PushKit handler.
#[derive(Serialize)]
struct ApnsCall<'a> {
    /// Conference requests only, where it is sent even when `null`.
    #[serde(skip_serializing_if = "Option::is_none")]
    account: Option<Option<&'a str>>,
    #[serde(rename = "call-id")]
    call_id: &'a str,
    event: &'a str,
    from_display_name: Option<&'a str>,
    from_uri: &'a str,
    #[serde(rename = "media-type")]
    media_type: Option<&'a str>,
    #[serde(rename = "session-id")]
    session_id: &'a str,
    to_uri: &'a str,
}

/// No `aps` either: the app reads the top-level keys in its background handler.
#[derive(Serialize)]
struct ApnsCancel<'a> {
    #[serde(rename = "call-id")]
    call_id: &'a str,
    event: &'a str,
    reason: Option<&'a str>,
    #[serde(rename = "session-id")]
    session_id: &'a str,
}

/// Messages and transfers: a user-visible alert, with the details under `data`.
#[derive(Serialize)]
struct ApnsAlertPush<'a, D> {
    aps: Aps<'a>,
    data: D,
}

#[derive(Serialize)]
struct Aps<'a> {
    alert: Alert<'a>,
    badge: i64,
    /// Messages only.
    #[serde(rename = "content-available", skip_serializing_if = "Option::is_none")]
    content_available: Option<u8>,
    /// Messages only.
    #[serde(skip_serializing_if = "Option::is_none")]
    message_id: Option<&'a str>,
    #[serde(rename = "mutable-content")]
    mutable_content: u8,
    sound: &'a str,
}

#[derive(Serialize)]
struct Alert<'a> {
    body: String,
    /// The contact's own string (`pn-msg-str`, `pn-groupchat-str`): the app localises it.
    #[serde(rename = "loc-key", skip_serializing_if = "Option::is_none")]
    loc_key: Option<&'a str>,
    title: &'a str,
}

#[derive(Serialize)]
struct MessageData<'a> {
    content: Option<&'a str>,
    content_type: Option<&'a str>,
    event: &'a str,
    from_display_name: Option<&'a str>,
    from_uri: &'a str,
    message_id: &'a str,
    to_uri: &'a str,
}

#[derive(Serialize)]
struct TransferData<'a> {
    event: &'a str,
    #[serde(rename = "file-id")]
    file_id: &'a str,
    from_display_name: Option<&'a str>,
    from_uri: &'a str,
    #[serde(rename = "media-type")]
    media_type: Option<&'a str>,
    metadata: TransferMetadata<'a>,
    to_uri: &'a str,
}

#[derive(Serialize)]
struct TransferMetadata<'a> {
    filename: Option<&'a str>,
    filetype: Option<&'a str>,
}

fn apns_payload(job: &Job) -> Bytes {
    let p = &job.push;
    let event = job.event.as_str();
    match job.event {
        Event::IncomingSession | Event::IncomingConferenceRequest => encode(&ApnsCall {
            account: (job.event == Event::IncomingConferenceRequest)
                .then_some(p.account.as_deref()),
            call_id: &p.call_id,
            event,
            from_display_name: p.from_display_name.as_deref(),
            from_uri: &p.from,
            media_type: p.media_type.as_deref(),
            session_id: &sylk_session_id(&p.call_id),
            to_uri: &p.to,
        }),
        Event::Cancel | Event::Wakeup => encode(&ApnsCancel {
            call_id: &p.call_id,
            event,
            reason: p.reason.as_deref(),
            session_id: &sylk_session_id(&p.call_id),
        }),
        Event::Message => encode(&ApnsAlertPush {
            aps: Aps {
                alert: Alert {
                    body: from_line(job),
                    loc_key: message_loc_key(job),
                    title: message_title(job),
                },
                badge: p.badge,
                content_available: Some(1),
                message_id: Some(&p.call_id),
                mutable_content: 1,
                sound: p.strings.msg_snd.as_deref().unwrap_or("default"),
            },
            data: MessageData {
                content: p.content.as_deref(),
                content_type: p.content_type.as_deref(),
                event,
                from_display_name: p.from_display_name.as_deref(),
                from_uri: &p.from,
                message_id: &p.call_id,
                to_uri: &p.to,
            },
        }),
        Event::Transfer => encode(&ApnsAlertPush {
            aps: Aps {
                alert: Alert {
                    body: from_line(job),
                    loc_key: None,
                    title: transfer_title(job),
                },
                badge: p.badge,
                content_available: None,
                message_id: None,
                mutable_content: 1,
                sound: "default",
            },
            data: TransferData {
                event,
                file_id: &p.call_id,
                from_display_name: p.from_display_name.as_deref(),
                from_uri: &p.from,
                media_type: p.media_type.as_deref(),
                metadata: transfer_metadata(job),
                to_uri: &p.to,
            },
        }),
    }
}

/// The `data` of every Sylk FCM message; each event fills its own fields. FCM v1 takes string
/// values only, so a field left `None` is left out.
#[derive(Serialize, Default)]
struct FcmData<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    account: Option<&'a str>,
    #[serde(rename = "call-id", skip_serializing_if = "Option::is_none")]
    call_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<&'a str>,
    event: &'a str,
    #[serde(rename = "file-id", skip_serializing_if = "Option::is_none")]
    file_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    from_display_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    from_uri: Option<&'a str>,
    #[serde(rename = "media-type", skip_serializing_if = "Option::is_none")]
    media_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(rename = "session-id", skip_serializing_if = "Option::is_none")]
    session_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    to_uri: Option<&'a str>,
}

/// The data a Sylk app reads from each event: FCM's `data`, and the whole body of a WebPush
/// message.
fn fcm_data<'a>(job: &'a Job, session_id: &'a str) -> FcmData<'a> {
    let p = &job.push;
    let event = job.event.as_str();
    match job.event {
        Event::IncomingSession | Event::IncomingConferenceRequest => FcmData {
            account: match job.event {
                Event::IncomingConferenceRequest => p.account.as_deref(),
                _ => None,
            },
            call_id: Some(&p.call_id),
            event,
            from_display_name: Some(display_name(job).unwrap_or(&p.from)),
            from_uri: Some(&p.from),
            media_type: p.media_type.as_deref(),
            session_id: Some(session_id),
            to_uri: Some(&p.to),
            ..FcmData::default()
        },
        Event::Cancel | Event::Wakeup => FcmData {
            call_id: Some(&p.call_id),
            event,
            reason: p.reason.as_deref(),
            session_id: Some(session_id),
            ..FcmData::default()
        },
        Event::Message => FcmData {
            content: p.content.as_deref(),
            content_type: p.content_type.as_deref(),
            event,
            from_uri: Some(&p.from),
            message_id: Some(&p.call_id),
            to_uri: Some(&p.to),
            ..FcmData::default()
        },
        // FCM data values must be strings, so the transfer's `metadata` object travels as its
        // JSON text; the app parses it back (the nested object the reference sends is refused
        // by FCM v1 with 400 INVALID_ARGUMENT).
        Event::Transfer => FcmData {
            event,
            file_id: Some(&p.call_id),
            from_uri: Some(&p.from),
            media_type: p.media_type.as_deref(),
            metadata: Some(serde_json::to_string(&transfer_metadata(job)).expect("strings encode")),
            to_uri: Some(&p.to),
            ..FcmData::default()
        },
    }
}

/// The WebPush body: the FCM data, as JSON.
pub(super) fn webpush_body(job: &Job) -> Bytes {
    encode(&fcm_data(job, &sylk_session_id(&job.push.call_id)))
}

pub(super) fn fcm_message(job: &Job, now_ms: u64) -> Bytes {
    let p = &job.push;
    let session_id = sylk_session_id(&p.call_id);
    let data = fcm_data(job, &session_id);

    let mut android = Android::high_priority(job, now_ms);
    let (apns, notification) = match job.event {
        Event::Message => (Some(FcmApns::low_priority()), None),
        Event::Transfer => {
            android.notification = Some(AndroidNotification {
                channel_id: "sylk-messages-sound",
                default_sound: true,
                notification_priority: "PRIORITY_HIGH",
                sound: "default",
            });
            let notification = FcmNotification {
                body: from_line(job),
                image: NOTIFICATION_IMAGE,
                title: transfer_title(job),
            };
            (Some(FcmApns::low_priority()), Some(notification))
        }
        _ => (None, None),
    };
    encode(&FcmBody {
        message: FcmMessage {
            android,
            apns,
            data,
            notification,
            token: &p.token,
        },
    })
}

/// "From <caller>", or nothing to say when the app hides callers.
fn from_line(job: &Job) -> String {
    if job.push.from.is_empty() {
        String::new()
    } else {
        format!("From {}", job.push.from)
    }
}

/// The contact's own string for a message, when it registered one.
fn message_loc_key(job: &Job) -> Option<&str> {
    let strings = &job.push.strings;
    if job.push.group_chat {
        strings.groupchat_str.as_deref()
    } else {
        strings.msg_str.as_deref()
    }
}

/// The reference tests Python truthiness, so an empty display name counts as absent.
fn display_name(job: &Job) -> Option<&str> {
    job.push
        .from_display_name
        .as_deref()
        .filter(|name| !name.is_empty())
}

fn message_title(job: &Job) -> &str {
    display_name(job).unwrap_or("New message")
}

fn transfer_title(job: &Job) -> &'static str {
    match job.push.media_type.as_deref() {
        Some("audio") => "New audio message",
        Some("video") => "New video message",
        _ => "New file",
    }
}

fn transfer_metadata(job: &Job) -> TransferMetadata<'_> {
    TransferMetadata {
        filename: job.push.filename.as_deref(),
        filetype: job.push.filetype.as_deref(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::{apns_request_at, fcm_message};
    use pushfleet_core::config::{AppType, Platform};
    use pushfleet_core::policy::Event;
    use serde_json::json;

    const APP_ID: &str = "com.agprojects.sylk-ios.prod";
    const SESSION_ID: &str = "a78d482c-1b67-8af8-091a-5a8be2fcf260";

    fn apns(event: Event, edit: impl FnOnce(&mut pushfleet_core::Job)) -> super::ApnsRequest {
        let app = app(APP_ID, Platform::Apple, AppType::Sylk);
        let mut job = job(Platform::Apple, event);
        edit(&mut job);
        apns_request_at(&app, &job, &policy(event), NOW_MS)
    }

    fn fcm(event: Event, edit: impl FnOnce(&mut pushfleet_core::Job)) -> bytes::Bytes {
        let app = app("com.agprojects.sylk", Platform::Firebase, AppType::Sylk);
        let mut job = job(Platform::Firebase, event);
        edit(&mut job);
        fcm_message(&app, &job, &policy(event), NOW_MS)
    }

    #[test]
    fn apns_incoming_session_is_a_voip_push_with_top_level_keys() {
        let r = apns(Event::IncomingSession, |_| {});
        assert_eq!(r.push_type, "voip");
        assert_eq!(r.priority, 10);
        assert_eq!(r.topic, "com.agprojects.sylk-ios.voip");
        assert_eq!(r.expiration, 1_714_979_349);
        assert_encoded(
            &r.payload,
            json!({
                "event": "incoming_session",
                "call-id": "call-123@host",
                "session-id": SESSION_ID,
                "media-type": "audio",
                "from_uri": "alice@example.com",
                "from_display_name": null,
                "to_uri": "bob@example.com",
            }),
        );
    }

    #[test]
    fn apns_conference_request_adds_the_account() {
        let r = apns(Event::IncomingConferenceRequest, |j| {
            j.push.account = Some("room@conference.example.com".into());
            j.push.from_display_name = Some("Alice".into());
        });
        assert_eq!((r.push_type, r.priority), ("voip", 10));
        assert_eq!(r.topic, "com.agprojects.sylk-ios.voip");
        assert_encoded(
            &r.payload,
            json!({
                "event": "incoming_conference_request",
                "call-id": "call-123@host",
                "session-id": SESSION_ID,
                "media-type": "audio",
                "from_uri": "alice@example.com",
                "from_display_name": "Alice",
                "to_uri": "bob@example.com",
                "account": "room@conference.example.com",
            }),
        );
    }

    #[test]
    fn apns_cancel_is_background_on_the_plain_topic_with_null_reason() {
        let r = apns(Event::Cancel, |_| {});
        assert_eq!((r.push_type, r.priority), ("background", 5));
        assert_eq!(r.topic, "com.agprojects.sylk-ios");
        assert_encoded(
            &r.payload,
            json!({
                "event": "cancel",
                "call-id": "call-123@host",
                "session-id": SESSION_ID,
                "reason": null,
            }),
        );
    }

    #[test]
    fn apns_message_is_an_alert_with_data() {
        let r = apns(Event::Message, |j| {
            j.push.content = Some("hello".into());
            j.push.content_type = Some("text/plain".into());
            j.push.badge = 3;
        });
        assert_eq!((r.push_type, r.priority), ("alert", 5));
        assert_eq!(r.topic, "com.agprojects.sylk-ios");
        assert_eq!(r.expiration, 1_714_979_349);
        assert_encoded(
            &r.payload,
            json!({
                "aps": {
                    "alert": {"title": "New message", "body": "From alice@example.com"},
                    "message_id": "call-123@host",
                    "sound": "default",
                    "content-available": 1,
                    "mutable-content": 1,
                    "badge": 3,
                },
                "data": {
                    "event": "message",
                    "message_id": "call-123@host",
                    "from_uri": "alice@example.com",
                    "from_display_name": null,
                    "to_uri": "bob@example.com",
                    "content": "hello",
                    "content_type": "text/plain",
                },
            }),
        );
        let titled = apns(Event::Message, |j| {
            j.push.from_display_name = Some("Alice".into())
        });
        assert_eq!(parsed(&titled.payload)["aps"]["alert"]["title"], "Alice");
    }

    #[test]
    fn apns_transfer_names_the_media() {
        let r = apns(Event::Transfer, |j| {
            j.push.filename = Some("memo.m4a".into());
            j.push.filetype = Some("audio/mp4".into());
        });
        assert_eq!((r.push_type, r.priority), ("alert", 5));
        assert_eq!(r.topic, "com.agprojects.sylk-ios");
        assert_encoded(
            &r.payload,
            json!({
                "aps": {
                    "alert": {"title": "New audio message", "body": "From alice@example.com"},
                    "sound": "default",
                    "mutable-content": 1,
                    "badge": 1,
                },
                "data": {
                    "event": "transfer",
                    "from_uri": "alice@example.com",
                    "from_display_name": null,
                    "to_uri": "bob@example.com",
                    "file-id": "call-123@host",
                    "media-type": "audio",
                    "metadata": {"filename": "memo.m4a", "filetype": "audio/mp4"},
                },
            }),
        );
        let file = apns(Event::Transfer, |j| {
            j.push.media_type = Some("image".into())
        });
        assert_eq!(parsed(&file.payload)["aps"]["alert"]["title"], "New file");
    }

    #[test]
    fn apns_push_type_and_priority_follow_the_policy() {
        let app = app("com.x.app.dev", Platform::Apple, AppType::Sylk);
        let job = job(Platform::Apple, Event::IncomingSession);
        let mut policy = policy(Event::IncomingSession);
        policy.apns_push_type = pushfleet_core::policy::ApnsPushType::Alert;
        policy.apns_priority = 5;
        let r = apns_request_at(&app, &job, &policy, NOW_MS);
        assert_eq!((r.push_type, r.priority), ("alert", 5));
        assert_eq!(r.topic, "com.x.app");
    }

    #[test]
    fn fcm_incoming_session_falls_back_to_the_uri_for_the_display_name() {
        let m = fcm(Event::IncomingSession, |_| {});
        assert_encoded(
            &m,
            json!({"message": {
                "token": "tok",
                "data": {
                    "event": "incoming_session",
                    "call-id": "call-123@host",
                    "session-id": SESSION_ID,
                    "media-type": "audio",
                    "from_uri": "alice@example.com",
                    "from_display_name": "alice@example.com",
                    "to_uri": "bob@example.com",
                },
                "android": {"priority": "high", "ttl": "60s"},
            }}),
        );
    }

    #[test]
    fn fcm_conference_request_adds_the_account_and_drops_missing_media() {
        let m = fcm(Event::IncomingConferenceRequest, |j| {
            j.push.account = Some("room@conference.example.com".into());
            j.push.media_type = None;
            j.push.from_display_name = Some("Alice".into());
        });
        assert_eq!(
            parsed(&m)["message"]["data"],
            json!({
                "event": "incoming_conference_request",
                "call-id": "call-123@host",
                "session-id": SESSION_ID,
                "from_uri": "alice@example.com",
                "from_display_name": "Alice",
                "to_uri": "bob@example.com",
                "account": "room@conference.example.com",
            })
        );
    }

    #[test]
    fn fcm_cancel_leaves_out_a_missing_reason() {
        let m = fcm(Event::Cancel, |_| {});
        assert_encoded(
            &m,
            json!({"message": {
                "token": "tok",
                "data": {"event": "cancel", "call-id": "call-123@host", "session-id": SESSION_ID},
                "android": {"priority": "high", "ttl": "60s"},
            }}),
        );
        let with_reason = fcm(Event::Cancel, |j| j.push.reason = Some("answered".into()));
        assert_eq!(
            parsed(&with_reason)["message"]["data"]["reason"],
            "answered"
        );
    }

    #[test]
    fn fcm_message_adds_the_apns_block() {
        let m = fcm(Event::Message, |j| {
            j.push.content = Some("hello".into());
            j.deadline_ms = NOW_MS + 86_400_000;
        });
        assert_encoded(
            &m,
            json!({"message": {
                "token": "tok",
                "data": {
                    "event": "message",
                    "message_id": "call-123@host",
                    "from_uri": "alice@example.com",
                    "to_uri": "bob@example.com",
                    "content": "hello",
                },
                "apns": {"headers": {"apns-priority": "5"}},
                "android": {"priority": "high", "ttl": "86400s"},
            }}),
        );
    }

    #[test]
    fn fcm_transfer_is_a_notification_with_string_metadata() {
        let m = fcm(Event::Transfer, |j| {
            j.push.media_type = Some("video".into());
            j.push.filename = Some("clip.mp4".into());
        });
        assert_encoded(
            &m,
            json!({"message": {
                "token": "tok",
                "data": {
                    "event": "transfer",
                    "from_uri": "alice@example.com",
                    "to_uri": "bob@example.com",
                    "media-type": "video",
                    "file-id": "call-123@host",
                    "metadata": r#"{"filename":"clip.mp4","filetype":null}"#,
                },
                "notification": {
                    "title": "New video message",
                    "body": "From alice@example.com",
                    "image": "https://icanblink.com/apple-touch-icon-180x180.png",
                },
                "apns": {"headers": {"apns-priority": "5"}},
                "android": {
                    "priority": "high",
                    "ttl": "60s",
                    "notification": {
                        "channel_id": "sylk-messages-sound",
                        "sound": "default",
                        "default_sound": true,
                        "notification_priority": "PRIORITY_HIGH",
                    },
                },
            }}),
        );
    }

    #[test]
    fn fcm_data_values_are_all_strings() {
        for event in pushfleet_core::policy::Event::ALL {
            let m = parsed(&fcm(event, |_| {}));
            let data = m["message"]["data"].as_object().expect("data object");
            assert!(data.values().all(|v| v.is_string()), "{event}: {data:?}");
        }
    }
}
