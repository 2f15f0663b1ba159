//! Requests for Sylk clients (sylk-compat §2.2 and §2.5). Calls and cancellations are data-only
//! pushes whose top-level keys the app reads directly; messages and transfers are user-visible.

use pushfleet_core::job::{sylk_session_id, Job};
use pushfleet_core::policy::{ApnsPushType, Event, EventPolicy};
use serde_json::{json, Map, Value};

use super::{android_block, apns_expiration, bundle_id, nullable, string_map, ApnsRequest};

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
    }
}

fn apns_payload(job: &Job) -> Value {
    let p = &job.push;
    let event = job.event.as_str();
    let session_id = sylk_session_id(&p.call_id);
    match job.event {
        Event::IncomingSession | Event::IncomingConferenceRequest => {
            let mut payload = json!({
                "event": event,
                "call-id": p.call_id,
                "session-id": session_id,
                "media-type": nullable(&p.media_type),
                "from_uri": p.from,
                "from_display_name": nullable(&p.from_display_name),
                "to_uri": p.to,
            });
            if job.event == Event::IncomingConferenceRequest {
                payload["account"] = nullable(&p.account);
            }
            payload
        }
        // No `aps`: the app reads the top-level keys in its background handler.
        Event::Cancel => json!({
            "event": event,
            "call-id": p.call_id,
            "session-id": session_id,
            "reason": nullable(&p.reason),
        }),
        Event::Message => json!({
            "aps": {
                "alert": {"title": message_title(job), "body": format!("From {}", p.from)},
                "message_id": p.call_id,
                "sound": "default",
                "content-available": 1,
                "mutable-content": 1,
                "badge": p.badge,
            },
            "data": {
                "event": event,
                "message_id": p.call_id,
                "from_uri": p.from,
                "from_display_name": nullable(&p.from_display_name),
                "to_uri": p.to,
                "content": nullable(&p.content),
                "content_type": nullable(&p.content_type),
            },
        }),
        Event::Transfer => json!({
            "aps": {
                "alert": {"title": transfer_title(job), "body": format!("From {}", p.from)},
                "sound": "default",
                "mutable-content": 1,
                "badge": p.badge,
            },
            "data": {
                "event": event,
                "from_uri": p.from,
                "from_display_name": nullable(&p.from_display_name),
                "to_uri": p.to,
                "file-id": p.call_id,
                "media-type": nullable(&p.media_type),
                "metadata": transfer_metadata(job),
            },
        }),
    }
}

pub(super) fn fcm_message(job: &Job, now_ms: u64) -> Value {
    let p = &job.push;
    let event = Some(job.event.as_str().to_string());
    let call_id = Some(p.call_id.clone());
    let session_id = Some(sylk_session_id(&p.call_id));
    let data = match job.event {
        Event::IncomingSession | Event::IncomingConferenceRequest => {
            let account = match job.event {
                Event::IncomingConferenceRequest => p.account.clone(),
                _ => None,
            };
            string_map([
                ("event", event),
                ("call-id", call_id),
                ("session-id", session_id),
                ("media-type", p.media_type.clone()),
                ("from_uri", Some(p.from.clone())),
                ("from_display_name", Some(display_name_or_uri(job))),
                ("to_uri", Some(p.to.clone())),
                ("account", account),
            ])
        }
        Event::Cancel => string_map([
            ("event", event),
            ("call-id", call_id),
            ("session-id", session_id),
            ("reason", p.reason.clone()),
        ]),
        Event::Message => string_map([
            ("event", event),
            ("message_id", call_id),
            ("from_uri", Some(p.from.clone())),
            ("to_uri", Some(p.to.clone())),
            ("content", p.content.clone()),
            ("content_type", p.content_type.clone()),
        ]),
        // FCM data values must be strings, so the transfer's `metadata` object travels as its
        // JSON text; the app parses it back (the nested object the reference sends is refused
        // by FCM v1 with 400 INVALID_ARGUMENT).
        Event::Transfer => string_map([
            ("event", event),
            ("from_uri", Some(p.from.clone())),
            ("to_uri", Some(p.to.clone())),
            ("media-type", p.media_type.clone()),
            ("file-id", call_id),
            ("metadata", Some(transfer_metadata(job).to_string())),
        ]),
    };

    let mut message = Map::new();
    message.insert("token".into(), p.token.clone().into());
    message.insert("data".into(), data);
    let mut android = android_block(job, now_ms);
    match job.event {
        Event::Message => {
            message.insert("apns".into(), low_priority_apns());
        }
        Event::Transfer => {
            message.insert(
                "notification".into(),
                json!({
                    "title": transfer_title(job),
                    "body": format!("From {}", p.from),
                    "image": NOTIFICATION_IMAGE,
                }),
            );
            message.insert("apns".into(), low_priority_apns());
            android.insert(
                "notification".into(),
                json!({
                    "channel_id": "sylk-messages-sound",
                    "sound": "default",
                    "default_sound": true,
                    "notification_priority": "PRIORITY_HIGH",
                }),
            );
        }
        _ => {}
    }
    message.insert("android".into(), Value::Object(android));
    json!({ "message": message })
}

/// Relayed by FCM to APNs when the Android token belongs to an iOS device registered via Firebase.
fn low_priority_apns() -> Value {
    json!({"headers": {"apns-priority": "5"}})
}

/// The reference tests Python truthiness, so an empty display name counts as absent.
fn display_name(job: &Job) -> Option<&str> {
    job.push
        .from_display_name
        .as_deref()
        .filter(|name| !name.is_empty())
}

fn display_name_or_uri(job: &Job) -> String {
    display_name(job).unwrap_or(&job.push.from).to_string()
}

fn message_title(job: &Job) -> String {
    display_name(job).unwrap_or("New message").to_string()
}

fn transfer_title(job: &Job) -> String {
    match job.push.media_type.as_deref() {
        Some(media @ ("audio" | "video")) => format!("New {media} message"),
        _ => "New file".to_string(),
    }
}

fn transfer_metadata(job: &Job) -> Value {
    json!({
        "filename": nullable(&job.push.filename),
        "filetype": nullable(&job.push.filetype),
    })
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

    fn fcm(event: Event, edit: impl FnOnce(&mut pushfleet_core::Job)) -> serde_json::Value {
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
        assert_eq!(
            r.payload,
            json!({
                "event": "incoming_session",
                "call-id": "call-123@host",
                "session-id": SESSION_ID,
                "media-type": "audio",
                "from_uri": "alice@example.com",
                "from_display_name": null,
                "to_uri": "bob@example.com",
            })
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
        assert_eq!(
            r.payload,
            json!({
                "event": "incoming_conference_request",
                "call-id": "call-123@host",
                "session-id": SESSION_ID,
                "media-type": "audio",
                "from_uri": "alice@example.com",
                "from_display_name": "Alice",
                "to_uri": "bob@example.com",
                "account": "room@conference.example.com",
            })
        );
    }

    #[test]
    fn apns_cancel_is_background_on_the_plain_topic_with_null_reason() {
        let r = apns(Event::Cancel, |_| {});
        assert_eq!((r.push_type, r.priority), ("background", 5));
        assert_eq!(r.topic, "com.agprojects.sylk-ios");
        assert_eq!(
            r.payload,
            json!({
                "event": "cancel",
                "call-id": "call-123@host",
                "session-id": SESSION_ID,
                "reason": null,
            })
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
        assert_eq!(
            r.payload,
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
            })
        );
        let titled = apns(Event::Message, |j| {
            j.push.from_display_name = Some("Alice".into())
        });
        assert_eq!(titled.payload["aps"]["alert"]["title"], "Alice");
    }

    #[test]
    fn apns_transfer_names_the_media() {
        let r = apns(Event::Transfer, |j| {
            j.push.filename = Some("memo.m4a".into());
            j.push.filetype = Some("audio/mp4".into());
        });
        assert_eq!((r.push_type, r.priority), ("alert", 5));
        assert_eq!(r.topic, "com.agprojects.sylk-ios");
        assert_eq!(
            r.payload,
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
            })
        );
        let file = apns(Event::Transfer, |j| {
            j.push.media_type = Some("image".into())
        });
        assert_eq!(file.payload["aps"]["alert"]["title"], "New file");
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
        assert_eq!(
            m,
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
            }})
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
            m["message"]["data"],
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
        assert_eq!(
            m,
            json!({"message": {
                "token": "tok",
                "data": {"event": "cancel", "call-id": "call-123@host", "session-id": SESSION_ID},
                "android": {"priority": "high", "ttl": "60s"},
            }})
        );
        let with_reason = fcm(Event::Cancel, |j| j.push.reason = Some("answered".into()));
        assert_eq!(with_reason["message"]["data"]["reason"], "answered");
    }

    #[test]
    fn fcm_message_adds_the_apns_block() {
        let m = fcm(Event::Message, |j| {
            j.push.content = Some("hello".into());
            j.deadline_ms = NOW_MS + 86_400_000;
        });
        assert_eq!(
            m,
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
            }})
        );
    }

    #[test]
    fn fcm_transfer_is_a_notification_with_string_metadata() {
        let m = fcm(Event::Transfer, |j| {
            j.push.media_type = Some("video".into());
            j.push.filename = Some("clip.mp4".into());
        });
        assert_eq!(
            m,
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
            }})
        );
    }

    #[test]
    fn fcm_data_values_are_all_strings() {
        for event in pushfleet_core::policy::Event::ALL {
            let m = fcm(event, |_| {});
            let data = m["message"]["data"].as_object().expect("data object");
            assert!(data.values().all(|v| v.is_string()), "{event}: {data:?}");
        }
    }
}
