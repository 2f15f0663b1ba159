//! Requests for Linphone clients, as Sylk Pushserver builds them. Linphone only knows incoming-call
//! pushes, so every event is sent the same way: a VoIP push on APNs, a data message on FCM.

use bytes::Bytes;
use pushfleet_core::job::Job;
use serde::Serialize;

use super::{
    apns_expiration, bundle_id, encode, format_send_time, Android, ApnsRequest, FcmBody, FcmMessage,
};

/// Linphone's own hint of how long the push stays meaningful, kept as the reference sends it.
const PN_TTL_SECS: u64 = 2_592_000;

/// A silent call: the app rings from its PushKit handler.
#[derive(Serialize)]
struct SilentCall<'a> {
    aps: SilentAps<'a>,
    #[serde(rename = "from-uri")]
    from_uri: &'a str,
    pn_ttl: u64,
}

#[derive(Serialize)]
struct SilentAps<'a> {
    #[serde(rename = "call-id")]
    call_id: &'a str,
    #[serde(rename = "loc-key")]
    loc_key: &'static str,
    #[serde(rename = "send-time")]
    send_time: &'a str,
    sound: &'static str,
}

/// An audible call: an alert, with the call's keys at the top level.
#[derive(Serialize)]
struct AudibleCall<'a> {
    aps: AudibleAps<'a>,
    #[serde(rename = "call-id")]
    call_id: &'a str,
    pn_ttl: u64,
    #[serde(rename = "send-time")]
    send_time: &'a str,
}

#[derive(Serialize)]
struct AudibleAps<'a> {
    alert: Alert<'a>,
    badge: u8,
    sound: &'a str,
}

#[derive(Serialize)]
struct Alert<'a> {
    /// A string, not the list APNs documents: Linphone clients expect it this way.
    #[serde(rename = "loc-args")]
    loc_args: &'a str,
    #[serde(rename = "loc-key")]
    loc_key: &'a str,
}

#[derive(Serialize)]
struct FcmData<'a> {
    #[serde(rename = "call-id")]
    call_id: &'a str,
    #[serde(rename = "loc-args")]
    loc_args: &'a str,
    #[serde(rename = "loc-key")]
    loc_key: &'a str,
    #[serde(rename = "send-time")]
    send_time: &'a str,
    #[serde(rename = "sip-from")]
    sip_from: &'a str,
}

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
        encode(&SilentCall {
            aps: SilentAps {
                call_id: &p.call_id,
                loc_key: "IC_SIL",
                send_time: &send_time,
                sound: "",
            },
            from_uri: &p.from,
            pn_ttl: PN_TTL_SECS,
        })
    } else {
        encode(&AudibleCall {
            aps: AudibleAps {
                alert: Alert {
                    loc_args: &p.from,
                    loc_key: p.strings.call_str.as_deref().unwrap_or("IC_MSG"),
                },
                badge: 1,
                sound: p.strings.call_snd.as_deref().unwrap_or("msg.caf"),
            },
            call_id: &p.call_id,
            pn_ttl: PN_TTL_SECS,
            send_time: &send_time,
        })
    };
    ApnsRequest {
        push_type: "voip",
        priority: 10,
        topic,
        expiration: apns_expiration(job),
        payload,
        collapse_id: None,
    }
}

fn fcm_data<'a>(job: &'a Job, send_time: &'a str) -> FcmData<'a> {
    let p = &job.push;
    FcmData {
        call_id: &p.call_id,
        loc_args: &p.from,
        loc_key: p.strings.call_str.as_deref().unwrap_or_default(),
        send_time,
        sip_from: &p.from,
    }
}

pub(super) fn fcm_message(job: &Job, now_ms: u64) -> Bytes {
    let send_time = format_send_time(now_ms);
    encode(&FcmBody {
        message: FcmMessage {
            android: Android::high_priority(job, now_ms),
            apns: None,
            data: fcm_data(job, &send_time),
            notification: None,
            token: &job.push.token,
        },
    })
}

/// The WebPush body: the FCM data, as JSON.
pub(super) fn webpush_body(job: &Job, now_ms: u64) -> Bytes {
    encode(&fcm_data(job, &format_send_time(now_ms)))
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
        assert_encoded(
            &r.payload,
            json!({
                "aps": {
                    "sound": "",
                    "loc-key": "IC_SIL",
                    "call-id": "call-123@host",
                    "send-time": "2024-05-06 07:08:09",
                },
                "from-uri": "alice@example.com",
                "pn_ttl": 2_592_000,
            }),
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
        assert_encoded(
            &r.payload,
            json!({
                "aps": {
                    "alert": {"loc-key": "IC_MSG", "loc-args": "alice@example.com"},
                    "sound": "msg.caf",
                    "badge": 1,
                },
                "pn_ttl": 2_592_000,
                "call-id": "call-123@host",
                "send-time": "2024-05-06 07:08:09",
            }),
        );
    }

    #[test]
    fn fcm_is_a_v1_data_message() {
        let app = app("org.linphone.phone", Platform::Firebase, AppType::Linphone);
        let job = job(Platform::Firebase, Event::IncomingSession);
        let m = fcm_message(&app, &job, &policy(Event::IncomingSession), NOW_MS + 20_000);
        assert_encoded(
            &m,
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
            }}),
        );
    }
}
