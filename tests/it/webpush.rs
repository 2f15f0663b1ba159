//! UnifiedPush / WebPush delivery against the fake push service, which decrypts every push with
//! the subscription's private key and verifies the VAPID token: the device sees the app's
//! payload, each push service answer ends in its terminal state, a cancel replaces its ring,
//! and endpoints on internal addresses are refused at registration and never contacted.

use std::time::Duration;

use pushfleet_core::webpush::topic;
use pushfleet_fakes::{FakeWebPush, Scripted, WebPushMode, WebPushOptions, WebPushSubscription};
use serde_json::{json, Value};

use crate::support::*;

/// A UnifiedPush app allowed to reach the fake on 127.0.0.1, and one that is not.
const UP: &str = "org.example.up";
const STRICT: &str = "org.example.up.strict";

fn webpush_apps() -> String {
    format!(
        r#"
[[apps]]
id = "{UP}"
platform = "unifiedpush"
type = "sylk"
[apps.webpush]
vapid_key_file = "vapid-key.pem"
vapid_subject = "mailto:push@example.org"
allowed_endpoint_hosts = ["127.0.0.1"]
ca_file = "ca.pem"

[[apps]]
id = "{STRICT}"
platform = "webpush"
type = "sylk"
[apps.webpush]
vapid_key_file = "vapid-key.pem"
vapid_subject = "https://example.org/contact"
ca_file = "ca.pem"

[retry]
initial_backoff_ms = 200
max_backoff_ms = 1000
jitter = 0.0
max_attempts = 3
"#
    )
}

async fn stack(mode: &'static str) -> Stack {
    Stack::start_with(StackOptions {
        mode,
        extra_config: webpush_apps(),
        ..Default::default()
    })
    .await
}

fn subscribe(stack: &Stack) -> WebPushSubscription {
    stack
        .fakes
        .webpush
        .subscribe_for_key(&stack.files.vapid_public_key)
}

/// Registers the subscription as a device of `account`.
async fn register(
    stack: &Stack,
    account: &str,
    app: &str,
    sub: &WebPushSubscription,
) -> (u16, Value) {
    let body = json!({
        "app-id": app, "platform": "unifiedpush", "token": sub.endpoint,
        "device-id": "phone", "p256dh": sub.p256dh, "auth": sub.auth,
    });
    stack
        .call("POST", &format!("/v2/tokens/{account}"), Some(&body))
        .await
}

fn up_push(sub: &WebPushSubscription, event: &str, call_id: &str) -> Value {
    let mut body = v1_body(UP, "unifiedpush", &sub.endpoint, event, call_id);
    body["p256dh"] = json!(sub.p256dh);
    body["auth"] = json!(sub.auth);
    body
}

async fn one_request(fake: &FakeWebPush, id: &str) -> pushfleet_fakes::WebPushRequest {
    fake.wait_for_requests(1, Duration::from_secs(10))
        .await
        .unwrap();
    let mut requests = fake.requests_for(id);
    assert_eq!(requests.len(), 1, "{requests:?}");
    requests.remove(0)
}

#[tokio::test]
async fn a_registered_subscription_gets_an_encrypted_push_it_can_decrypt() {
    let stack = stack("sync").await;
    let sub = subscribe(&stack);
    let account = format!("bob-{}@example.com", call_id());
    let (status, answer) = register(&stack, &account, UP, &sub).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["platform"], "unifiedpush");

    let call = call_id();
    let (status, answer) = stack
        .call(
            "POST",
            &format!("/v2/tokens/{account}/push"),
            Some(&json!({
                "event": "incoming_session", "call-id": call, "from": "alice@example.com",
                "from-display-name": "Alice", "to": account, "media-type": "video",
            })),
        )
        .await;
    assert_eq!(status, 201, "{answer}");

    let seen = one_request(&stack.fakes.webpush, &sub.id).await;
    assert_eq!(seen.status, 201);
    assert_eq!(seen.version, "HTTP/2.0");
    assert_eq!(seen.decrypt_error, None);
    assert_eq!(seen.header("content-encoding"), Some("aes128gcm"));
    let payload = seen.json().expect("the device decrypts a JSON payload");
    assert_eq!(payload["event"], "incoming_session");
    assert_eq!(payload["call-id"], call.as_str());
    assert_eq!(payload["from_uri"], "alice@example.com");
    assert_eq!(payload["from_display_name"], "Alice");
    assert_eq!(payload["media-type"], "video");
    assert_eq!(payload["session-id"].as_str().map(str::len), Some(36));

    let vapid = seen.vapid.clone().expect("a VAPID token");
    assert!(vapid.valid, "{vapid:?}");
    assert_eq!(vapid.key, stack.files.vapid_public_key);
    assert_eq!(vapid.aud, stack.fakes.webpush.url());
    assert_eq!(vapid.sub, "mailto:push@example.org");

    let ttl: u64 = seen.header("ttl").unwrap().parse().unwrap();
    assert!((55..=60).contains(&ttl), "TTL {ttl}");
    assert_eq!(seen.header("urgency"), Some("high"));
    assert_eq!(seen.header("topic"), Some(topic(&call).as_str()));

    let rows = stack.deliveries(&call, 1).await;
    assert_eq!(rows[0].status, "delivered");
    assert_eq!(rows[0].platform, "unifiedpush");
    assert_eq!(rows[0].provider_status, Some(201));
    assert!(rows[0]
        .provider_message_id
        .as_deref()
        .is_some_and(|id| id.starts_with(&stack.fakes.webpush.url())));
    stack.stop().await;
}

#[tokio::test]
async fn v1_pushes_name_the_endpoint_with_or_without_keys() {
    let stack = stack("sync").await;
    let sub = subscribe(&stack);
    let call = call_id();
    let mut body = up_push(&sub, "message", &call);
    body["platform"] = json!("webpush");
    body["content"] = json!("hello 👋 \"there\"");
    body["content-type"] = json!("text/plain");
    let (status, answer) = stack.push(&body).await;
    assert_eq!(status, 201, "{answer}");
    let seen = one_request(&stack.fakes.webpush, &sub.id).await;
    let payload = seen.json().expect("decrypted");
    assert_eq!(payload["content"], "hello 👋 \"there\"");
    assert_eq!(payload["message_id"], call.as_str());
    assert_eq!(seen.header("urgency"), Some("normal"));
    let ttl: u64 = seen.header("ttl").unwrap().parse().unwrap();
    assert!(ttl > 86_000, "a message lives a day: {ttl}");

    // A subscription without keys gets the JSON as it is.
    let plain = subscribe(&stack);
    let call = call_id();
    let body = v1_body(UP, "unifiedpush", &plain.endpoint, "cancel", &call);
    let (status, answer) = stack.push(&body).await;
    assert_eq!(status, 201, "{answer}");
    stack
        .fakes
        .webpush
        .wait_for_requests(2, Duration::from_secs(10))
        .await
        .unwrap();
    let seen = &stack.fakes.webpush.requests_for(&plain.id)[0];
    assert_eq!(seen.header("content-encoding"), None);
    assert_eq!(seen.header("content-type"), Some("application/json"));
    assert_eq!(seen.json().unwrap()["event"], "cancel");
    assert!(seen.vapid.as_ref().is_some_and(|v| v.valid));
    stack.stop().await;
}

#[tokio::test]
async fn a_cancel_carries_the_topic_of_its_ring() {
    let stack = stack("async").await;
    let sub = subscribe(&stack);
    let call = call_id();
    let other = call_id();
    // One after the other: a cancel that overtook its ring would leave the ring unsent.
    for (n, (event, call)) in [
        ("incoming_session", &call),
        ("cancel", &call),
        ("incoming_session", &other),
    ]
    .into_iter()
    .enumerate()
    {
        let (status, answer) = stack.push(&up_push(&sub, event, call)).await;
        assert_eq!(status, 202, "{answer}");
        stack
            .fakes
            .webpush
            .wait_for_requests(n + 1, Duration::from_secs(10))
            .await
            .unwrap();
    }
    let seen = stack.fakes.webpush.requests_for(&sub.id);
    let topic_of = |event: &str, call: &str| {
        seen.iter()
            .find(|r| {
                let p = r.json().unwrap();
                p["event"] == event && p["call-id"] == call
            })
            .and_then(|r| r.header("topic").map(str::to_string))
            .unwrap_or_else(|| panic!("no {event} for {call}"))
    };
    let ring = topic_of("incoming_session", &call);
    assert_eq!(topic_of("cancel", &call), ring);
    assert!(
        ring.len() <= 32
            && ring
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    );
    assert_ne!(topic_of("incoming_session", &other), ring);
    assert!(seen.iter().all(|r| r.header("urgency") == Some("high")));
    // One connection to the push service, one VAPID token for its origin.
    assert!(seen
        .iter()
        .all(|r| r.connection_id == seen[0].connection_id));
    let authorization = seen[0].header("authorization");
    assert!(seen
        .iter()
        .all(|r| r.header("authorization") == authorization));
    stack.stop().await;
}

#[tokio::test]
async fn each_answer_of_a_push_service_ends_in_its_terminal_state() {
    let stack = stack("async").await;
    let fake = &stack.fakes.webpush;
    // (mode, script or unsubscribe, expected status, expected attempts, requests seen)
    type Setup = fn(&FakeWebPush, &str);
    let cases: Vec<(WebPushMode, Setup, &str, i32, usize)> = vec![
        (WebPushMode::Autopush, |_, _| {}, "delivered", 1, 1),
        (WebPushMode::Ntfy, |_, _| {}, "delivered", 1, 1),
        (WebPushMode::NextPush, |_, _| {}, "delivered", 1, 1),
        (WebPushMode::XmppGateway, |_, _| {}, "delivered", 1, 1),
        (
            WebPushMode::Autopush,
            |f, id| f.unsubscribe(id),
            "token_invalid",
            1,
            1,
        ),
        (
            WebPushMode::Autopush,
            |f, id| f.script(id, Scripted::status(404)),
            "token_invalid",
            1,
            1,
        ),
        (
            WebPushMode::NextPush,
            |f, id| f.unsubscribe(id),
            "token_invalid",
            1,
            1,
        ),
        (
            WebPushMode::Autopush,
            |f, id| f.script(id, Scripted::status(400)),
            "rejected",
            1,
            1,
        ),
        (
            WebPushMode::Autopush,
            |f, id| f.script(id, Scripted::status(413)),
            "rejected",
            1,
            1,
        ),
        // A redirect is an answer, never followed.
        (
            WebPushMode::Autopush,
            |f, id| f.script(id, Scripted::status(307)),
            "rejected",
            1,
            1,
        ),
        (
            WebPushMode::Autopush,
            |f, id| f.script(id, Scripted::status(429).retry_after(1)),
            "delivered",
            2,
            2,
        ),
        (
            WebPushMode::Autopush,
            |f, id| f.script(id, Scripted::status(503)),
            "delivered",
            2,
            2,
        ),
        (
            WebPushMode::Autopush,
            |f, id| f.script(id, Scripted::status(500).times(5)),
            "failed",
            3,
            3,
        ),
    ];
    for (mode, setup, expected, attempts, requests) in cases {
        fake.set_mode(mode);
        let sub = subscribe(&stack);
        setup(fake, &sub.id);
        let call = call_id();
        let started = std::time::Instant::now();
        let (status, answer) = stack.push(&up_push(&sub, "message", &call)).await;
        assert_eq!(status, 202, "{answer}");
        let rows = stack.deliveries(&call, 1).await;
        let case = format!("{mode:?} {expected}");
        assert_eq!(rows.len(), 1, "{case}");
        assert_eq!(
            (rows[0].status.as_str(), rows[0].attempts),
            (expected, attempts),
            "{case}"
        );
        assert_eq!(fake.requests_for(&sub.id).len(), requests, "{case}");
        if expected == "delivered" && attempts == 2 && mode == WebPushMode::Autopush {
            let seen = fake.requests_for(&sub.id);
            if seen[0].status == 429 {
                assert!(
                    started.elapsed() >= Duration::from_secs(1),
                    "Retry-After honoured"
                );
            }
        }
    }

    // A subscription made for another application server's key: VAPID refused, a credential
    // problem, not retried.
    fake.set_mode(WebPushMode::Autopush);
    let foreign = fake.subscribe_for_key(&pushfleet_fakes::webpush::vapid_key().1);
    let call = call_id();
    stack.push(&up_push(&foreign, "message", &call)).await;
    let rows = stack.deliveries(&call, 1).await;
    assert_eq!(
        (rows[0].status.as_str(), rows[0].provider_status),
        ("failed", Some(401))
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_gone_subscription_invalidates_the_device() {
    let stack = stack("sync").await;
    let sub = subscribe(&stack);
    let account = format!("carol-{}@example.com", call_id());
    assert_eq!(register(&stack, &account, UP, &sub).await.0, 200);
    stack.fakes.webpush.unsubscribe(&sub.id);
    let call = call_id();
    let (status, answer) = stack
        .call(
            "POST",
            &format!("/v2/tokens/{account}/push/phone"),
            Some(&json!({"event": "message", "call-id": call, "from": "a@example.com", "to": account, "media-type": "chat"})),
        )
        .await;
    assert_eq!(
        (status, &answer["data"][0]["code"]),
        (200, &json!(410)),
        "{answer}"
    );
    let rows = stack
        .query(
            "SELECT invalidated_at IS NOT NULL, p256dh FROM device_tokens WHERE account = $1",
            &[&account],
        )
        .await;
    assert!(rows[0].get::<_, bool>(0));
    assert_eq!(
        rows[0].get::<_, Option<String>>(1).as_deref(),
        Some(sub.p256dh.as_str())
    );
    stack.stop().await;
}

#[tokio::test]
async fn internal_endpoints_are_refused_at_registration_and_never_contacted() {
    let stack = stack("sync").await;
    let fake = &stack.fakes.webpush;
    let sub = subscribe(&stack);
    let account = format!("dave-{}@example.com", call_id());
    let port = sub
        .endpoint
        .split(':')
        .nth(2)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let refused = [
        // The fake itself, on loopback, for an app that does not list 127.0.0.1.
        sub.endpoint.clone(),
        format!("https://localhost:{port}/push/{}", sub.id),
        format!("https://[::1]:{port}/push/{}", sub.id),
        format!("https://[::ffff:127.0.0.1]:{port}/push/{}", sub.id),
        "https://10.0.0.1/push/abc".to_string(),
        "https://169.254.169.254/latest/meta-data".to_string(),
        "https://100.64.1.1/push".to_string(),
        format!("http://127.0.0.1:{port}/push/{}", sub.id),
        format!("https://push.example.org/{}", "a".repeat(1000)),
        "not a url".to_string(),
    ];
    for endpoint in &refused {
        let body = json!({
            "app-id": STRICT, "platform": "unifiedpush", "token": endpoint, "device-id": "phone",
        });
        let (status, answer) = stack
            .call("POST", &format!("/v2/tokens/{account}"), Some(&body))
            .await;
        assert_eq!(status, 400, "{endpoint}: {answer}");
        assert!(
            answer["description"].as_str().unwrap().contains("endpoint"),
            "{endpoint}: {answer}"
        );
        // The same through v1.
        let mut push = v1_body(STRICT, "unifiedpush", endpoint, "message", &call_id());
        push["content"] = json!("x");
        let (status, answer) = stack.push(&push).await;
        assert_eq!(status, 400, "{endpoint}: {answer}");
    }
    // Listed for the other app, the same endpoint is fine.
    assert_eq!(register(&stack, &account, UP, &sub).await.0, 200);
    assert_eq!(fake.request_count(), 0, "nothing was contacted");

    // Keys that cannot be used are refused too.
    for (p256dh, auth, field) in [
        ("AAAA", sub.auth.as_str(), "p256dh"),
        (sub.p256dh.as_str(), "AAAA", "auth"),
    ] {
        let body = json!({
            "app-id": UP, "platform": "unifiedpush", "token": sub.endpoint,
            "device-id": "phone2", "p256dh": p256dh, "auth": auth,
        });
        let (status, answer) = stack
            .call("POST", &format!("/v2/tokens/{account}"), Some(&body))
            .await;
        assert_eq!(status, 400, "{answer}");
        assert!(
            answer["description"].as_str().unwrap().ends_with(field),
            "{answer}"
        );
    }
    let mut body = up_push(&sub, "message", &call_id());
    body.as_object_mut().unwrap().remove("auth");
    assert_eq!(stack.push(&body).await.0, 400);

    // A payload too large to encrypt is refused before it is queued.
    let mut body = up_push(&sub, "message", &call_id());
    body["content"] = json!("x".repeat(3900));
    let (status, answer) = stack.push(&body).await;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(fake.request_count(), 0);
    stack.stop().await;
}

#[tokio::test]
async fn the_worker_checks_the_endpoint_again_before_it_connects() {
    let stack = stack("sync").await;
    let fake = &stack.fakes.webpush;
    let sub = subscribe(&stack);
    // A device stored without ingest's check (an import, or a host that resolved elsewhere
    // when it registered).
    let account = format!("erin-{}@example.com", call_id());
    let localhost = sub.endpoint.replace("127.0.0.1", "localhost");
    stack
        .query(
            "INSERT INTO device_tokens (account, app_id, device_id, platform, token, p256dh, auth)
             VALUES ($1, $2, 'phone', 'unifiedpush', $3, $4, $5),
                    ($1, $2, 'tablet', 'unifiedpush', $6, $4, $5)",
            &[
                &account,
                &STRICT,
                &sub.endpoint,
                &sub.p256dh,
                &sub.auth,
                &localhost,
            ],
        )
        .await;
    for device in ["phone", "tablet"] {
        let call = call_id();
        let (status, answer) = stack
            .call(
                "POST",
                &format!("/v2/tokens/{account}/push/{device}"),
                Some(&json!({"event": "message", "call-id": call, "from": "a@example.com", "to": account, "media-type": "chat"})),
            )
            .await;
        assert_eq!(status, 400, "{device}: {answer}");
        let rows = stack.deliveries(&call, 1).await;
        assert_eq!(rows[0].status, "rejected", "{device}");
    }
    assert_eq!(fake.request_count(), 0, "nothing was contacted");
    let metrics = stack.worker_metrics().await;
    assert!(
        metrics.contains("pushfleet_webpush_endpoints_refused_total{stage=\"worker\""),
        "{metrics}"
    );
    assert!(metrics.contains("# HELP pushfleet_webpush_endpoints_refused_total"));
    stack.stop().await;
}

#[tokio::test]
async fn a_push_service_that_speaks_only_http1_is_served() {
    let stack = stack("sync").await;
    let http1 = FakeWebPush::start(
        stack.fakes.ca.clone(),
        WebPushOptions {
            mode: WebPushMode::Ntfy,
            http1_only: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let sub = http1.subscribe_for_key(&stack.files.vapid_public_key);
    let call = call_id();
    let (status, answer) = stack.push(&up_push(&sub, "incoming_session", &call)).await;
    assert_eq!(status, 200, "{answer}");
    let seen = one_request(&http1, &sub.id).await;
    assert_eq!(seen.version, "HTTP/1.1");
    assert_eq!(seen.json().unwrap()["call-id"], call.as_str());
    let vapid = seen.vapid.unwrap();
    assert!(vapid.valid && vapid.aud == http1.url(), "{vapid:?}");
    let rows = stack.deliveries(&call, 1).await;
    assert!(rows[0]
        .provider_message_id
        .as_deref()
        .is_some_and(|id| id.starts_with("ntfy")));
    stack.stop().await;
}
