//! Requests of pushfleet's own, the same for every app type: the alert pushes that ring an iOS
//! device without a VoIP token (and the final one that says how the call ended), and the
//! background pushes that wake an app so that it registers again. Their keys follow Flexisip's
//! alert and background payloads, which Linphone clients read.

use bytes::Bytes;
use pushfleet_core::config::{AppSettings, AppType};
use pushfleet_core::job::{sylk_session_id, Job, Ringing};
use serde_json::{json, Value};

use super::{bundle_id, encode, format_send_time, Android, ApnsRequest, FcmBody, FcmMessage};

/// APNs refuses a longer `apns-collapse-id` (400 BadCollapseId).
const MAX_COLLAPSE_ID_BYTES: usize = 64;

/// The loc-key of a Linphone ringing alert when the contact registered none.
const LINPHONE_CALL_STR: &str = "IC_MSG";

/// One ringing alert, or the final one when `ringing.ended` is set. Alerts go to the plain
/// topic (PushKit takes only VoIP pushes), with `apns-expiration` 0 so that a ring the device
/// cannot take now is dropped rather than shown late, and the call-id as collapse id so that each
/// replaces the previous one on the lock screen.
pub(super) fn apns_ringing(
    app: &AppSettings,
    job: &Job,
    ringing: &Ringing,
    now_ms: u64,
) -> ApnsRequest {
    let p = &job.push;
    let caller = caller(job);
    let loc_args: Vec<&str> = caller.into_iter().collect();
    let alert = match (ringing.ended, &p.strings.call_str, app.app_type) {
        (Some(end), ..) => json!({"loc-key": p.strings.final_str(end), "loc-args": loc_args}),
        (None, Some(call_str), _) => json!({"loc-key": call_str, "loc-args": loc_args}),
        (None, None, AppType::Linphone) => {
            json!({"loc-key": LINPHONE_CALL_STR, "loc-args": loc_args})
        }
        // Other apps localise no Linphone key: words they can show as they are.
        (None, None, AppType::Sylk) => {
            json!({"title": "Incoming call", "body": caller.unwrap_or_default()})
        }
    };
    let sound = match ringing.ended {
        Some(_) => "default",
        None => p.strings.call_snd.as_deref().unwrap_or("default"),
    };
    let mut payload = json!({
        "aps": {"alert": alert, "badge": 1, "sound": sound},
        "call-id": p.call_id,
        "from-uri": p.from,
        "send-time": format_send_time(now_ms),
        "uuid": sylk_session_id(&p.call_id),
    });
    if let Some(name) = &p.from_display_name {
        payload["display-name"] = Value::from(name.as_str());
    }
    if let Some(end) = ringing.ended {
        payload["call-end"] = Value::from(end.as_str());
    }
    ApnsRequest {
        push_type: "alert",
        priority: 10,
        topic: plain_topic(&app.id),
        expiration: 0,
        collapse_id: Some(collapse_id(&p.call_id)),
        payload: encode(&payload),
    }
}

/// A registration wake-up: content-available only, which Apple wants at priority 5.
pub(super) fn apns_wakeup(app_id: &str, job: &Job, now_ms: u64) -> ApnsRequest {
    let payload = json!({
        "aps": {"content-available": 1},
        "event": "wakeup",
        "send-time": format_send_time(now_ms),
    });
    ApnsRequest {
        push_type: "background",
        priority: 5,
        topic: plain_topic(app_id),
        expiration: super::apns_expiration(job),
        collapse_id: None,
        payload: encode(&payload),
    }
}

/// A registration wake-up on FCM: a normal-priority data message.
pub(super) fn fcm_wakeup(job: &Job, now_ms: u64) -> Bytes {
    let send_time = format_send_time(now_ms);
    encode(&FcmBody {
        message: FcmMessage {
            android: Android::normal_priority(job, now_ms),
            apns: None,
            data: json!({"event": "wakeup", "send-time": send_time}),
            notification: None,
            token: &job.push.token,
        },
    })
}

/// The name an alert shows: the display name, else the URI; none when the app hides callers.
fn caller(job: &Job) -> Option<&str> {
    job.push
        .from_display_name
        .as_deref()
        .filter(|name| !name.is_empty())
        .or(Some(job.push.from.as_str()).filter(|from| !from.is_empty()))
}

/// The bundle id without a `.voip` suffix: alerts and background pushes are refused on the
/// VoIP topic.
fn plain_topic(app_id: &str) -> String {
    let bundle = bundle_id(app_id);
    bundle.strip_suffix(".voip").unwrap_or(bundle).to_string()
}

/// The call-id, cut to what APNs accepts, on a character boundary.
fn collapse_id(call_id: &str) -> String {
    let mut end = call_id.len().min(MAX_COLLAPSE_ID_BYTES);
    while !call_id.is_char_boundary(end) {
        end -= 1;
    }
    call_id[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::{apns_request_at, fcm_message};
    use super::*;
    use pushfleet_core::config::{AppType, Platform};
    use pushfleet_core::job::{CallEnd, Ringing};
    use pushfleet_core::policy::Event;

    fn ringing(ended: Option<CallEnd>) -> Ringing {
        Ringing {
            interval_ms: 1000,
            rings: 1,
            ended,
        }
    }

    #[test]
    fn a_ring_is_an_alert_collapsed_by_call_id_that_expires_at_once() {
        let app = app("org.linphone.phone", Platform::Apple, AppType::Linphone);
        let mut job = job(Platform::Apple, Event::IncomingSession);
        job.push.strings.call_str = Some("MY_CALL".into());
        job.push.strings.call_snd = Some("ring.caf".into());
        job.handling.ringing = Some(ringing(None));
        let r = apns_request_at(&app, &job, &policy(Event::IncomingSession), NOW_MS);
        assert_eq!((r.push_type, r.priority, r.expiration), ("alert", 10, 0));
        assert_eq!(r.topic, "org.linphone.phone");
        assert_eq!(r.collapse_id.as_deref(), Some("call-123@host"));
        let body = parsed(&r.payload);
        assert_eq!(body["aps"]["alert"]["loc-key"], "MY_CALL");
        assert_eq!(
            body["aps"]["alert"]["loc-args"],
            json!(["alice@example.com"])
        );
        assert_eq!(body["aps"]["sound"], "ring.caf");
    }

    #[test]
    fn without_a_contact_string_each_app_type_gets_words_it_can_show() {
        let mut job = job(Platform::Apple, Event::IncomingSession);
        job.handling.ringing = Some(ringing(None));
        let linphone = app("org.linphone.phone", Platform::Apple, AppType::Linphone);
        let r = apns_request_at(&linphone, &job, &policy(Event::IncomingSession), NOW_MS);
        assert_eq!(parsed(&r.payload)["aps"]["alert"]["loc-key"], "IC_MSG");
        let sylk = app("com.agprojects.sylk", Platform::Apple, AppType::Sylk);
        let r = apns_request_at(&sylk, &job, &policy(Event::IncomingSession), NOW_MS);
        assert_eq!(
            parsed(&r.payload)["aps"]["alert"],
            json!({"title": "Incoming call", "body": "alice@example.com"})
        );
    }

    #[test]
    fn the_final_alert_names_how_the_call_ended() {
        let app = app("com.agprojects.sylk", Platform::Apple, AppType::Sylk);
        let mut job = job(Platform::Apple, Event::IncomingSession);
        job.push.strings.call_accepted_elsewhere_str = Some("ELSEWHERE".into());
        for (end, expected) in [
            (CallEnd::AnsweredElsewhere, "ELSEWHERE"),
            (CallEnd::Missed, "Missing call"),
            (CallEnd::DeclinedElsewhere, "Call declined elsewhere"),
        ] {
            job.handling.ringing = Some(ringing(Some(end)));
            let r = apns_request_at(&app, &job, &policy(Event::IncomingSession), NOW_MS);
            assert_eq!(parsed(&r.payload)["aps"]["alert"]["loc-key"], expected);
            assert_eq!(parsed(&r.payload)["call-end"], end.as_str());
        }
    }

    #[test]
    fn a_hidden_caller_leaves_no_trace() {
        let mut app = app("com.agprojects.sylk", Platform::Apple, AppType::Sylk);
        app.display_caller = false;
        let mut job = job(Platform::Apple, Event::IncomingSession);
        job.push.from_display_name = Some("Alice".into());
        job.handling.ringing = Some(ringing(None));
        let r = apns_request_at(&app, &job, &policy(Event::IncomingSession), NOW_MS);
        let text = String::from_utf8(r.payload.to_vec()).unwrap();
        assert!(!text.contains("alice") && !text.contains("Alice"), "{text}");
        assert_eq!(parsed(&r.payload)["aps"]["alert"]["body"], "");
        job.push.strings.call_str = Some("CALL".into());
        let r = apns_request_at(&app, &job, &policy(Event::IncomingSession), NOW_MS);
        assert_eq!(parsed(&r.payload)["aps"]["alert"]["loc-args"], json!([]));
        for event in [Event::IncomingSession, Event::Message, Event::Transfer] {
            job.handling.ringing = None;
            job.event = event;
            let r = apns_request_at(&app, &job, &policy(event), NOW_MS);
            let fcm = fcm_message(&app, &job, &policy(event), NOW_MS);
            for payload in [&r.payload, &fcm] {
                let text = std::str::from_utf8(payload).unwrap();
                assert!(!text.contains("alice") && !text.contains("Alice"), "{text}");
            }
        }
    }

    #[test]
    fn a_wakeup_is_a_background_push() {
        let app = app("com.agprojects.sylk", Platform::Apple, AppType::Sylk);
        let job = job(Platform::Apple, Event::Wakeup);
        let r = apns_request_at(&app, &job, &policy(Event::Wakeup), NOW_MS);
        assert_eq!((r.push_type, r.priority), ("background", 5));
        assert_eq!(r.topic, "com.agprojects.sylk");
        assert_eq!(parsed(&r.payload)["aps"], json!({"content-available": 1}));
        let fcm_app = app_on(Platform::Firebase);
        let m = parsed(&fcm_message(&fcm_app, &job, &policy(Event::Wakeup), NOW_MS));
        assert_eq!(m["message"]["android"]["priority"], "normal");
        assert_eq!(m["message"]["data"]["event"], "wakeup");
    }

    fn app_on(platform: Platform) -> pushfleet_core::config::AppSettings {
        app("com.agprojects.sylk", platform, AppType::Sylk)
    }

    #[test]
    fn collapse_ids_are_cut_on_a_character_boundary() {
        assert_eq!(collapse_id("short"), "short");
        let long = "é".repeat(40);
        let cut = collapse_id(&long);
        assert!(cut.len() <= 64 && long.starts_with(&cut));
    }
}
