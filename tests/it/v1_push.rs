//! The v1 push path end to end: request → queue → provider → answer → audit row.

use pushfleet_core::clock::now_ms;
use pushfleet_core::job::sylk_session_id;
use pushfleet_core::tokens::token_fingerprint;
use pushfleet_fakes::{AuthKind, RecordedRequest};
use serde_json::{json, Value};

use crate::support::*;

/// What the fake provider must have received for one case.
fn assert_apns_request(req: &RecordedRequest, app_type: &str, event: &str, call_id: &str) {
    let header = |n: &str| {
        req.header(n)
            .unwrap_or_else(|| panic!("{event}: no {n} header"))
            .to_string()
    };
    let (push_type, priority, topic) = match (app_type, event) {
        ("linphone", _) => ("voip", "10", format!("{LINPHONE}.voip")),
        (_, "incoming_session" | "incoming_conference_request") => {
            ("voip", "10", format!("{SYLK}.voip"))
        }
        (_, "cancel") => ("background", "5", SYLK.to_string()),
        _ => ("alert", "5", SYLK.to_string()),
    };
    assert_eq!(header("apns-push-type"), push_type, "{app_type} {event}");
    assert_eq!(header("apns-priority"), priority, "{app_type} {event}");
    assert_eq!(header("apns-topic"), topic, "{app_type} {event}");
    // The deadline, as an absolute epoch (the reference's literal "120" meant 1970).
    let expiration: u64 = header("apns-expiration").parse().unwrap();
    let now = now_ms() / 1000;
    assert!(
        expiration > now && expiration <= now + 24 * 3600 + 1,
        "{event}: expiration {expiration}"
    );
    assert!(
        req.header("content-available").is_none(),
        "no bogus content-available header"
    );

    let payload = req.json.as_ref().expect("JSON payload");
    match (app_type, event) {
        ("linphone", _) => {
            assert_eq!(payload["aps"]["loc-key"], "IC_SIL", "silent call");
            assert_eq!(payload["aps"]["call-id"], call_id);
            assert_eq!(payload["from-uri"], "alice@example.com");
        }
        (_, "incoming_session" | "incoming_conference_request" | "cancel") => {
            assert_eq!(payload["event"], event);
            assert_eq!(payload["call-id"], call_id);
            assert_eq!(payload["session-id"], sylk_session_id(call_id));
            assert!(
                payload.get("aps").is_none(),
                "VoIP/cancel payloads have no aps"
            );
            if event != "cancel" {
                assert_eq!(payload["media-type"], "audio");
                assert_eq!(payload["from_uri"], "alice@example.com");
                assert_eq!(payload["from_display_name"], "Alice");
                assert_eq!(payload["to_uri"], "bob@example.com");
            }
        }
        (_, "message") => {
            assert_eq!(payload["aps"]["alert"]["title"], "Alice");
            assert_eq!(payload["aps"]["alert"]["body"], "From alice@example.com");
            assert_eq!(payload["data"]["event"], "message");
            assert_eq!(payload["data"]["message_id"], call_id);
        }
        (_, "transfer") => {
            assert_eq!(payload["aps"]["alert"]["title"], "New audio message");
            assert_eq!(payload["data"]["event"], "transfer");
            assert_eq!(payload["data"]["file-id"], call_id);
        }
        _ => unreachable!(),
    }
}

fn assert_fcm_request(
    req: &RecordedRequest,
    app_type: &str,
    event: &str,
    call_id: &str,
    token: &str,
) {
    let message = &req.json.as_ref().expect("JSON body")["message"];
    assert_eq!(message["token"], token);
    assert_eq!(message["android"]["priority"], "high");
    let ttl = message["android"]["ttl"].as_str().unwrap();
    let secs: u64 = ttl.trim_end_matches('s').parse().unwrap();
    assert!(secs > 0 && secs <= 24 * 3600, "{event}: ttl {ttl}");
    let data = message["data"].as_object().expect("data");
    assert!(
        data.values().all(Value::is_string),
        "{event}: FCM data values must be strings: {data:?}"
    );
    match (app_type, event) {
        ("linphone", _) => {
            assert_eq!(data["call-id"], call_id);
            assert_eq!(data["sip-from"], "alice@example.com");
        }
        (_, "message") => {
            assert_eq!(data["event"], "message");
            assert_eq!(data["message_id"], call_id);
        }
        (_, "transfer") => {
            assert_eq!(data["event"], "transfer");
            assert_eq!(data["file-id"], call_id);
        }
        _ => {
            assert_eq!(data["event"], event);
            assert_eq!(data["call-id"], call_id);
            assert_eq!(data["session-id"], sylk_session_id(call_id));
        }
    }
}

#[tokio::test]
async fn every_app_type_platform_and_event_is_delivered_and_audited() {
    let stack = Stack::start().await;
    let cases: Vec<(&str, &str, &str)> = [
        "incoming_session",
        "incoming_conference_request",
        "cancel",
        "message",
        "transfer",
    ]
    .iter()
    .flat_map(|e| [("sylk", "apple", *e), ("sylk", "firebase", *e)])
    .chain([
        ("linphone", "apple", "incoming_session"),
        ("linphone", "firebase", "incoming_session"),
    ])
    .collect();

    for (app_type, platform, event) in cases {
        let app_id = if app_type == "sylk" { SYLK } else { LINPHONE };
        let token = if platform == "apple" {
            apns_token()
        } else {
            fcm_token()
        };
        let call_id = call_id();
        let (status, answer) = stack
            .push(&v1_body(app_id, platform, &token, event, &call_id))
            .await;
        assert_eq!(status, 200, "{app_type} {platform} {event}: {answer}");
        assert_eq!(answer["code"], 200);
        assert_eq!(answer["description"], "push notification response");
        assert_eq!(answer["data"]["call_id"], call_id.as_str());
        assert_eq!(
            answer["data"]["token_fingerprint"],
            token_fingerprint(&token)
        );
        assert_eq!(answer["data"]["platform"], platform);

        if platform == "apple" {
            let seen = stack.fakes.apns.journal().requests_for_token(&token);
            assert_eq!(
                seen.len(),
                1,
                "{app_type} {event}: exactly one APNs request"
            );
            assert_eq!(seen[0].path, format!("/3/device/{token}"));
            assert_apns_request(&seen[0], app_type, event, &call_id);
            assert_eq!(answer["data"]["reason"], "");
            assert_eq!(answer["data"]["body"], json!({}));
            // The answer names the token by its fingerprint, in the URL too.
            assert_eq!(
                answer["data"]["url"],
                format!(
                    "{}/3/device/token:{}",
                    stack.files.apns_url,
                    token_fingerprint(&token)
                )
            );
        } else {
            let seen = stack.fakes.fcm.journal().requests_for_token(&token);
            assert_eq!(seen.len(), 1, "{app_type} {event}: exactly one FCM request");
            assert_eq!(
                seen[0].path,
                format!("/v1/projects/{}/messages:send", stack.files.fcm_project_id)
            );
            assert_fcm_request(&seen[0], app_type, event, &call_id, &token);
            assert_eq!(answer["data"]["reason"], "OK");
            assert_eq!(answer["data"]["body"]["status_code"], 200);
        }

        let rows = stack.deliveries(&call_id, 1).await;
        assert_eq!(
            rows.len(),
            1,
            "{app_type} {platform} {event}: one audit row"
        );
        let row = &rows[0];
        assert_eq!(row.status, "delivered");
        assert_eq!(row.attempts, 1);
        assert_eq!(row.event, event);
        assert_eq!(row.platform, platform);
        assert_eq!(row.app_id, app_id);
        assert_eq!(row.provider_status, Some(200));
        assert!(
            row.provider_message_id.is_some(),
            "apns-id / FCM name recorded"
        );
        assert_eq!(row.token_fingerprint, token_fingerprint(&token));
        assert_eq!(row.device_id.as_deref(), Some("dev-1"));
        let lane = if ["message", "transfer"].contains(&event) {
            "messages"
        } else {
            "calls"
        };
        assert_eq!(row.lane, lane);
        let attempts = stack.attempts(row.id).await;
        assert_eq!(attempts, vec![(1, Some(200))]);
    }
    stack.stop().await;
}

#[tokio::test]
async fn apns_token_and_certificate_auth_and_one_provider_token_for_many_pushes() {
    let stack = Stack::start().await;
    let mut sylk_tokens = Vec::new();
    for _ in 0..5 {
        let token = apns_token();
        let (status, answer) = stack
            .push(&v1_body(
                SYLK,
                "ios",
                &token,
                "incoming_session",
                &call_id(),
            ))
            .await;
        assert_eq!(status, 200, "{answer}");
        sylk_tokens.push(token);
    }
    let token = apns_token();
    let (status, answer) = stack
        .push(&v1_body(
            LINPHONE,
            "apple",
            &token,
            "incoming_session",
            &call_id(),
        ))
        .await;
    assert_eq!(status, 200, "{answer}");

    for t in &sylk_tokens {
        let req = &stack.fakes.apns.journal().requests_for_token(t)[0];
        assert!(
            matches!(req.auth, AuthKind::ApnsJwt { ref key_id, .. } if *key_id == stack.files.apns_key_id),
            "{:?}",
            req.auth
        );
        assert!(req.header("authorization").unwrap().starts_with("bearer "));
    }
    let req = &stack.fakes.apns.journal().requests_for_token(&token)[0];
    assert!(
        matches!(req.auth, AuthKind::ApnsCertificate { .. }),
        "{:?}",
        req.auth
    );
    assert!(
        req.header("authorization").is_none(),
        "certificate auth sends no token"
    );
    assert_eq!(
        stack.fakes.apns.distinct_jwt_count(),
        1,
        "one provider token reused"
    );
    stack.stop().await;
}

#[tokio::test]
async fn the_oauth_token_is_fetched_once_for_many_fcm_pushes() {
    let stack = Stack::start().await;
    let pushes = (0..12).map(|i| {
        let app = if i % 2 == 0 { SYLK } else { LINPHONE };
        let body = v1_body(app, "android", &fcm_token(), "incoming_session", &call_id());
        let stack = &stack;
        async move { stack.push(&body).await }
    });
    for (status, answer) in futures_util::future::join_all(pushes).await {
        assert_eq!(status, 200, "{answer}");
    }
    assert_eq!(stack.fakes.fcm.accepted_count(), 12);
    assert_eq!(
        stack.fakes.oauth.token_fetches(),
        1,
        "access token cached across pushes and apps"
    );
    stack.stop().await;
}

#[tokio::test]
async fn provider_errors_are_answered_like_the_reference_and_audited() {
    let stack = Stack::start().await;
    // APNs: BadDeviceToken is answered as 410 (the reference's mapping) and audited token_invalid.
    let token = apns_token();
    stack
        .fakes
        .apns
        .set_token_state(&token, pushfleet_fakes::ApnsTokenState::Bad);
    let call = call_id();
    let (status, answer) = stack
        .push(&v1_body(SYLK, "apple", &token, "incoming_session", &call))
        .await;
    assert_eq!(status, 410, "{answer}");
    assert_eq!(answer["data"]["body"]["reason"], "BadDeviceToken");
    assert!(answer["data"]["reason"]
        .as_str()
        .unwrap()
        .starts_with("BadDeviceToken - "));
    assert_eq!(stack.deliveries(&call, 1).await[0].status, "token_invalid");

    // FCM: an unregistered token is answered 410 and audited token_invalid.
    let token = fcm_token();
    stack
        .fakes
        .fcm
        .set_token_state(&token, pushfleet_fakes::FcmTokenState::Unregistered);
    let call = call_id();
    let (status, answer) = stack
        .push(&v1_body(SYLK, "firebase", &token, "message", &call))
        .await;
    assert_eq!(status, 410, "{answer}");
    let rows = stack.deliveries(&call, 1).await;
    assert_eq!(
        (rows[0].status.as_str(), rows[0].provider_status),
        ("token_invalid", Some(404))
    );
    stack.stop().await;
}

#[tokio::test]
async fn async_mode_answers_202_and_still_delivers() {
    let stack = Stack::start_with(StackOptions {
        mode: "async",
        ..Default::default()
    })
    .await;
    let call = call_id();
    let token = fcm_token();
    let (status, answer) = stack
        .push(&v1_body(SYLK, "fcm", &token, "incoming_session", &call))
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["description"], "accepted for delivery");
    let job_id = answer["data"]["job_id"].as_str().unwrap().to_string();
    let rows = stack.deliveries(&call, 1).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status, "delivered");
    assert_eq!(rows[0].id.to_string(), job_id);
    stack.stop().await;
}

#[tokio::test]
async fn a_slow_provider_turns_a_sync_request_into_202_and_the_push_still_lands() {
    let stack = Stack::start_with(StackOptions {
        sync_timeout_ms: 300,
        ..Default::default()
    })
    .await;
    let token = apns_token();
    stack.fakes.apns.script(
        &token,
        pushfleet_fakes::Scripted::normal().delay_ms(1500).times(1),
    );
    let call = call_id();
    let started = std::time::Instant::now();
    let (status, answer) = stack
        .push(&v1_body(SYLK, "apple", &token, "incoming_session", &call))
        .await;
    assert_eq!(status, 202, "{answer}");
    assert!(started.elapsed() < std::time::Duration::from_millis(1400));
    let rows = stack.deliveries(&call, 1).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status, "delivered");
    stack.stop().await;
}

#[tokio::test]
async fn concurrent_sync_requests_each_get_their_own_answer() {
    let stack = Stack::start().await;
    // Every third token is dead: its caller must get the 410, nobody else.
    let requests: Vec<(String, String, bool)> = (0..90)
        .map(|i| (apns_token(), call_id(), i % 3 == 0))
        .collect();
    for (token, _, dead) in &requests {
        if *dead {
            stack
                .fakes
                .apns
                .set_token_state(token, pushfleet_fakes::ApnsTokenState::Bad);
        }
    }
    let bodies: Vec<_> = requests
        .iter()
        .map(|(token, call, _)| v1_body(SYLK, "apple", token, "incoming_session", call))
        .collect();
    let answers = futures_util::future::join_all(bodies.iter().map(|body| stack.push(body))).await;
    for ((token, call, dead), (status, answer)) in requests.iter().zip(answers) {
        assert_eq!(status, if *dead { 410 } else { 200 }, "{answer}");
        assert_eq!(answer["data"]["call_id"], call.as_str());
        assert_eq!(
            answer["data"]["token_fingerprint"],
            token_fingerprint(token)
        );
    }
    stack.stop().await;
}

/// A worker started in a process where another one used the same service account and token
/// endpoint (here: a second stack whose fake OAuth server takes the first one's port) fetches
/// its own access token with its own client, and its first FCM push goes out at once.
#[tokio::test]
async fn a_later_worker_does_not_inherit_an_earlier_ones_fcm_token() {
    let oauth_port = free_port();
    let stack_on = |oauth_port| {
        Stack::start_with(StackOptions {
            fakes: pushfleet_fakes::FakeOptions {
                oauth_port,
                ..Default::default()
            },
            ..Default::default()
        })
    };
    for round in 0..2 {
        let stack = stack_on(oauth_port).await;
        let call = call_id();
        let (status, answer) = stack
            .push(&v1_body(SYLK, "firebase", &fcm_token(), "message", &call))
            .await;
        assert_eq!(status, 200, "round {round}: {answer}");
        stack.stop().await;
        // The first stack's token endpoint lets go of its port before the second binds it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpListener::bind(("127.0.0.1", oauth_port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "port {oauth_port} stays taken"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}
