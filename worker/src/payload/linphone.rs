//! Requests for Linphone clients (sylk-compat §2.3 and §2.6). Linphone only knows incoming-call
//! pushes, so every event is sent the same way: a VoIP push on APNs, a data message on FCM.

use pushfleet_core::job::Job;
use serde_json::{json, Map, Value};

use super::{android_block, apns_expiration, bundle_id, format_send_time, string_map, ApnsRequest};

/// Linphone's own hint of how long the push stays meaningful, kept as the reference sends it.
const PN_TTL_SECS: u64 = 2_592_000;

pub(super) fn apns_request(app_id: &str, job: &Job, now_ms: u64) -> ApnsRequest {
    let bundle = bundle_id(app_id);
    let topic = if bundle.contains(".voip") {
        bundle.to_string()
    } else {
        format!("{bundle}.voip")
    };
    let p = &job.push;
    let send_time = format_send_time(now_ms);
    let payload = if p.silent {
        json!({
            "aps": {
                "sound": "",
                "loc-key": "IC_SIL",
                "call-id": p.call_id,
                "send-time": send_time,
            },
            "from-uri": p.from,
            "pn_ttl": PN_TTL_SECS,
        })
    } else {
        json!({
            "aps": {
                // A string, not the list APNs documents: Linphone clients expect it this way.
                "alert": {"loc-key": "IC_MSG", "loc-args": p.from},
                "sound": "msg.caf",
                "badge": 1,
            },
            "pn_ttl": PN_TTL_SECS,
            "call-id": p.call_id,
            "send-time": send_time,
        })
    };
    ApnsRequest {
        push_type: "voip",
        priority: 10,
        topic,
        expiration: apns_expiration(job),
        payload,
    }
}

pub(super) fn fcm_message(job: &Job, now_ms: u64) -> Value {
    let p = &job.push;
    let data = string_map([
        ("call-id", Some(p.call_id.clone())),
        ("sip-from", Some(p.from.clone())),
        ("loc-key", Some(String::new())),
        ("loc-args", Some(p.from.clone())),
        ("send-time", Some(format_send_time(now_ms))),
    ]);
    let mut message = Map::new();
    message.insert("token".into(), p.token.clone().into());
    message.insert("data".into(), data);
    message.insert("android".into(), Value::Object(android_block(job, now_ms)));
    json!({ "message": message })
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::{apns_request_at, fcm_message};
    use pushfleet_core::config::{AppType, Platform};
    use pushfleet_core::policy::Event;
    use serde_json::json;

    #[test]
    fn apns_silent_call_is_a_voip_push() {
        let app = app(
            "org.linphone.phone.prod",
            Platform::Apple,
            AppType::Linphone,
        );
        let job = job(Platform::Apple, Event::IncomingSession);
        let r = apns_request_at(&app, &job, &policy(Event::IncomingSession), NOW_MS);
        assert_eq!((r.push_type, r.priority), ("voip", 10));
        assert_eq!(r.topic, "org.linphone.phone.voip");
        assert_eq!(r.expiration, 1_714_979_349);
        assert_eq!(
            r.payload,
            json!({
                "aps": {
                    "sound": "",
                    "loc-key": "IC_SIL",
                    "call-id": "call-123@host",
                    "send-time": "2024-05-06 07:08:09",
                },
                "from-uri": "alice@example.com",
                "pn_ttl": 2_592_000,
            })
        );
    }

    #[test]
    fn apns_audible_call_has_an_alert_and_keeps_the_voip_topic() {
        let app = app(
            "org.linphone.phone.voip.dev",
            Platform::Apple,
            AppType::Linphone,
        );
        let mut job = job(Platform::Apple, Event::Cancel);
        job.push.silent = false;
        // Linphone ignores the event policy: even a cancel goes out as a VoIP push.
        let r = apns_request_at(&app, &job, &policy(Event::Cancel), NOW_MS);
        assert_eq!((r.push_type, r.priority), ("voip", 10));
        assert_eq!(r.topic, "org.linphone.phone.voip");
        assert_eq!(
            r.payload,
            json!({
                "aps": {
                    "alert": {"loc-key": "IC_MSG", "loc-args": "alice@example.com"},
                    "sound": "msg.caf",
                    "badge": 1,
                },
                "pn_ttl": 2_592_000,
                "call-id": "call-123@host",
                "send-time": "2024-05-06 07:08:09",
            })
        );
    }

    #[test]
    fn fcm_is_a_v1_data_message() {
        let app = app("org.linphone.phone", Platform::Firebase, AppType::Linphone);
        let job = job(Platform::Firebase, Event::IncomingSession);
        let m = fcm_message(&app, &job, &policy(Event::IncomingSession), NOW_MS + 20_000);
        assert_eq!(
            m,
            json!({"message": {
                "token": "tok",
                "data": {
                    "call-id": "call-123@host",
                    "sip-from": "alice@example.com",
                    "loc-key": "",
                    "loc-args": "alice@example.com",
                    "send-time": "2024-05-06 07:08:29",
                },
                "android": {"priority": "high", "ttl": "40s"},
            }})
        );
    }
}
