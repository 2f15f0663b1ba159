//! The Sylk v2 token API against real Postgres, RabbitMQ and the fake providers: registration,
//! listing, removal, pushes to one device and fanned out to an account, dead tokens, the audit
//! query.

use pushfleet_core::tokens::token_fingerprint;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::*;

fn account() -> String {
    format!("bob-{}@example.com", Uuid::new_v4().simple())
}

fn tokens_path(account: &str) -> String {
    format!("/v2/tokens/{account}")
}

fn add_body(app: &str, platform: &str, token: &str, device: &str) -> Value {
    json!({"app-id": app, "platform": platform, "token": token, "device-id": device,
           "silent": "0", "user-agent": "Sylk/3.5"})
}

fn push_body(event: &str, call_id: &str) -> Value {
    json!({"call-id": call_id, "from": "alice@example.com", "from-display-name": "Alice",
           "to": "bob@example.com", "media-type": "audio", "event": event})
}

async fn register(stack: &Stack, account: &str, body: &Value) {
    let (status, answer) = stack.call("POST", &tokens_path(account), Some(body)).await;
    assert_eq!(status, 200, "{answer}");
}

/// The stored row of a device: (token, background_token, invalidated).
async fn stored(
    stack: &Stack,
    account: &str,
    device: &str,
) -> Option<(String, Option<String>, bool)> {
    let client = stack.pool.get().await.unwrap();
    client
        .query_opt(
            "SELECT token, background_token, invalidated_at IS NOT NULL FROM device_tokens
              WHERE account = $1 AND device_id = $2",
            &[&account, &device],
        )
        .await
        .unwrap()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
}

#[tokio::test]
async fn tokens_are_registered_listed_and_removed() {
    let stack = Stack::start().await;
    let account = account();
    let (voip, background) = (apns_token(), apns_token());
    // Device ids are kept exactly as given (the reference strips characters off both ends).
    let device = "<urn:uuid:dev9-abcd>";
    let (status, answer) = stack
        .call(
            "POST",
            &tokens_path(&account),
            Some(&add_body(
                SYLK,
                "ios",
                &format!("{voip}-{background}"),
                device,
            )),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer,
        json!({"app-id": SYLK, "platform": "apple", "token_fingerprint": token_fingerprint(&voip),
               "device-id": device, "silent": false, "user-agent": "Sylk/3.5"})
    );
    assert_eq!(
        stored(&stack, &account, device).await,
        Some((voip.clone(), Some(background.clone()), false))
    );
    let fcm = fcm_token();
    register(
        &stack,
        &account,
        &add_body(SYLK, "android", &fcm, "dev-fcm"),
    )
    .await;

    // The listing never shows a raw token.
    let (status, list) = stack.call("GET", &tokens_path(&account), None).await;
    assert_eq!(status, 200, "{list}");
    let text = list.to_string();
    assert!(!text.contains(&voip) && !text.contains(&fcm), "{text}");
    let devices = list["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2);
    assert_eq!(devices[0]["device-id"], device);
    assert_eq!(devices[0]["token_fingerprint"], token_fingerprint(&voip));
    assert_eq!(
        devices[0]["background_token_fingerprint"],
        token_fingerprint(&background)
    );
    assert_eq!(devices[1]["platform"], "firebase");
    assert!(devices[1]["invalidated_at"].is_null());

    // Removal: the reference's answers for a missing device and an unknown account.
    let remove = |device: &str| json!({"app-id": SYLK, "device-id": device});
    let (status, answer) = stack
        .call("DELETE", &tokens_path(&account), Some(&remove("nope")))
        .await;
    assert_eq!((status, answer), (404, json!({"result": "Not found"})));
    let (status, answer) = stack
        .call(
            "DELETE",
            &tokens_path("nobody@example.com"),
            Some(&remove(device)),
        )
        .await;
    assert_eq!((status, answer), (404, json!({"result": "User not found"})));
    let (status, answer) = stack
        .call("DELETE", &tokens_path(&account), Some(&remove(device)))
        .await;
    assert_eq!(
        (status, answer),
        (200, json!({"app-id": SYLK, "device-id": device}))
    );
    assert_eq!(stored(&stack, &account, device).await, None);
    let (status, answer) = stack
        .call(
            "DELETE",
            &tokens_path(&account),
            Some(&json!({"device-id": "x"})),
        )
        .await;
    assert_eq!(
        (status, answer["description"].as_str()),
        (400, Some("field required: app-id"))
    );
    // Without a device-id, every device of the app goes.
    let (status, _) = stack
        .call(
            "DELETE",
            &tokens_path(&account),
            Some(&json!({"app-id": SYLK})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, answer) = stack.call("GET", &tokens_path(&account), None).await;
    assert_eq!(status, 404, "{answer}");
    assert_eq!(answer["data"]["account"], account);
    stack.stop().await;
}

#[tokio::test]
async fn registrations_are_validated_like_the_reference() {
    let stack = Stack::start().await;
    let path = tokens_path(&account());
    let good = add_body(SYLK, "apple", &apns_token(), "d1");
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({"platform": "apple"}), 400, "Field 'app-id' required"),
        (json!({"app-id": SYLK}), 400, "Field 'platform' required"),
        (
            json!({"app-id": SYLK, "platform": "Apple"}),
            404,
            "The 'Apple' platform is not configured",
        ),
        (
            json!({"app-id": "com.unknown", "platform": "ios"}),
            404,
            "Apple com.unknown app is not configured",
        ),
        (
            json!({"app-id": SYLK, "platform": "apple", "device-id": "d"}),
            400,
            "field required: token",
        ),
        (
            json!({"app-id": SYLK, "platform": "apple", "token": "t"}),
            400,
            "field required: device-id",
        ),
        (
            json!({"app-id": SYLK, "platform": "apple", "token": "", "device-id": "d"}),
            400,
            "token must not be empty: token",
        ),
        (
            {
                let mut b = good.clone();
                b["silent"] = json!("abc");
                b
            },
            400,
            "value could not be parsed to a boolean: silent",
        ),
    ];
    for (body, status, description) in cases {
        let (got, answer) = stack.call("POST", &path, Some(&body)).await;
        assert_eq!(
            (got, answer["description"].as_str()),
            (status, Some(description)),
            "{body}"
        );
        assert_eq!(answer["data"], "", "{body}");
    }
    let (status, answer) = stack.post_raw(&path, b"{not json".to_vec()).await;
    assert_eq!(
        (status, answer),
        (
            400,
            json!({"detail": "There was an error parsing the body"})
        )
    );
    let (status, _) = stack.post_raw(&path, b"[]".to_vec()).await;
    assert_eq!(status, 400);
    let (status, _) = stack.post_raw(&path, Vec::new()).await;
    assert_eq!(status, 400);
    let (status, answer) = stack.call("PUT", &path, Some(&good)).await;
    assert_eq!(
        (status, answer),
        (405, json!({"detail": "Method Not Allowed"}))
    );
    let (status, _) = stack.call("GET", &format!("{path}/push"), None).await;
    assert_eq!(status, 405);
    let (status, answer) = stack.call("GET", "/audit?limit=0", None).await;
    assert_eq!(
        (status, answer["description"].as_str()),
        (400, Some("must be a whole number from 1 to 1000: limit"))
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_registration_revives_a_dead_token() {
    let stack = Stack::start().await;
    let account = account();
    let token = fcm_token();
    register(&stack, &account, &add_body(SYLK, "firebase", &token, "d1")).await;
    let client = stack.pool.get().await.unwrap();
    client
        .execute(
            "UPDATE device_tokens SET invalidated_at = now(), invalid_reason = 'Unregistered'
              WHERE account = $1",
            &[&account],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO invalid_tokens (app_id, platform, token_fingerprint, reason)
             VALUES ($1, 'firebase', $2, 'UNREGISTERED')",
            &[&SYLK, &pushfleet_core::tokens::token_fingerprint(&token)],
        )
        .await
        .unwrap();
    register(&stack, &account, &add_body(SYLK, "firebase", &token, "d1")).await;
    assert_eq!(
        stored(&stack, &account, "d1").await,
        Some((token.clone(), None, false))
    );
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM invalid_tokens
              WHERE app_id = $1 AND token_fingerprint = $2",
            &[&SYLK, &pushfleet_core::tokens::token_fingerprint(&token)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    stack.stop().await;
}

#[tokio::test]
async fn a_push_to_one_device_uses_its_stored_token() {
    let stack = Stack::start().await;
    let account = account();
    let (voip, background) = (apns_token(), apns_token());
    register(
        &stack,
        &account,
        &add_body(SYLK, "apple", &format!("{voip}-{background}"), "iphone"),
    )
    .await;
    register(
        &stack,
        &account,
        &add_body(SYLK, "firebase", &fcm_token(), "pixel"),
    )
    .await;

    let call = call_id();
    let path = format!("{}/push/iphone", tokens_path(&account));
    let (status, answer) = stack
        .call("POST", &path, Some(&push_body("incoming_session", &call)))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["description"], "push notification responses");
    let data = answer["data"].as_array().unwrap();
    assert_eq!(data.len(), 1, "only the named device: {answer}");
    assert_eq!(
        (
            data[0]["code"].as_u64(),
            data[0]["token_fingerprint"].as_str()
        ),
        (Some(200), Some(token_fingerprint(&voip).as_str()))
    );
    assert_eq!(data[0]["device_id"], "iphone");
    assert_eq!(
        stack.fakes.apns.journal().requests_for_token(&voip).len(),
        1
    );

    // cancel and message go to the background token.
    for event in ["cancel", "message"] {
        let (status, answer) = stack
            .call("POST", &path, Some(&push_body(event, &call)))
            .await;
        assert_eq!(status, 200, "{event}: {answer}");
        assert_eq!(
            answer["data"][0]["token_fingerprint"],
            token_fingerprint(&background),
            "{event}"
        );
    }
    assert_eq!(
        stack
            .fakes
            .apns
            .journal()
            .requests_for_token(&background)
            .len(),
        2
    );
    let rows = stack.deliveries(&call, 3).await;
    assert_eq!(rows.len(), 3);
    assert!(rows
        .iter()
        .all(|r| r.device_id.as_deref() == Some("iphone")));

    // What cannot be sent is a 4xx naming what was asked for; nothing is sent.
    let (status, answer) = stack
        .call(
            "POST",
            &format!("{}/push/ipad", tokens_path(&account)),
            Some(&push_body("incoming_session", &call)),
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(
        answer,
        json!({"code": 404, "description": "Push request was not sent: device not found",
               "data": {"device_id": "ipad"}})
    );
    let (status, answer) = stack
        .call(
            "POST",
            "/v2/tokens/nobody@example.com/push",
            Some(&push_body("incoming_session", &call)),
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(
        answer,
        json!({"code": 404, "description": "Push request was not sent: user not found",
               "data": {"account": "nobody@example.com"}})
    );
    let mut no_call = push_body("incoming_session", &call);
    no_call.as_object_mut().unwrap().remove("call-id");
    let (status, answer) = stack.call("POST", &path, Some(&no_call)).await;
    assert_eq!(
        (status, answer["description"].as_str()),
        (400, Some("field required: call-id"))
    );
    let sent = stack.fakes.fcm.journal().requests().len();
    let mut fax = push_body("incoming_session", &call_id());
    fax["media-type"] = json!("fax");
    let (status, answer) = stack
        .call(
            "POST",
            &format!("{}/push", tokens_path(&account)),
            Some(&fax),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(
        answer["description"],
        "media-type must be 'audio', 'video', 'chat', 'sms', 'file-transfer', 'image'"
    );
    assert_eq!(
        stack.fakes.fcm.journal().requests().len(),
        sent,
        "nothing sent"
    );
    stack.stop().await;
}

#[tokio::test]
async fn an_account_push_fans_out_and_skips_dead_tokens() {
    let stack = Stack::start().await;
    let account = account();
    let (iphone, pixel, dead) = (apns_token(), fcm_token(), fcm_token());
    stack
        .fakes
        .fcm
        .set_token_state(&dead, pushfleet_fakes::FcmTokenState::Unregistered);
    register(
        &stack,
        &account,
        &add_body(SYLK, "apple", &iphone, "iphone"),
    )
    .await;
    register(
        &stack,
        &account,
        &add_body(SYLK, "firebase", &pixel, "pixel"),
    )
    .await;
    register(
        &stack,
        &account,
        &add_body(SYLK, "firebase", &dead, "old-phone"),
    )
    .await;

    let call = call_id();
    let path = format!("{}/push", tokens_path(&account));
    let (status, answer) = stack
        .call("POST", &path, Some(&push_body("incoming_session", &call)))
        .await;
    // The last device's 410 counts as 200 overall; its own item still says 410.
    assert_eq!(status, 200, "{answer}");
    let codes: Vec<(String, u64)> = answer["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["device_id"].as_str().unwrap().to_string(),
                d["code"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        codes,
        [
            ("iphone".to_string(), 200),
            ("pixel".into(), 200),
            ("old-phone".into(), 410)
        ]
    );
    let rows = stack.deliveries(&call, 3).await;
    let mut outcomes: Vec<(Option<String>, String, String)> = rows
        .iter()
        .map(|r| (r.device_id.clone(), r.platform.clone(), r.status.clone()))
        .collect();
    outcomes.sort();
    assert_eq!(
        outcomes,
        [
            (Some("iphone".into()), "apple".into(), "delivered".into()),
            (
                Some("old-phone".into()),
                "firebase".into(),
                "token_invalid".into()
            ),
            (Some("pixel".into()), "firebase".into(), "delivered".into()),
        ]
    );
    let job_ids: Vec<String> = answer["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["job_id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        rows.iter().all(|r| job_ids.contains(&r.id.to_string())),
        "one job per device"
    );
    assert!(
        stored(&stack, &account, "old-phone").await.unwrap().2,
        "marked dead"
    );

    // The dead token is skipped from now on, reported as a gone token.
    let second = call_id();
    let (status, answer) = stack
        .call("POST", &path, Some(&push_body("incoming_session", &second)))
        .await;
    assert_eq!(status, 200, "{answer}");
    let skipped = &answer["data"][2];
    assert_eq!(
        (skipped["device_id"].as_str(), skipped["code"].as_u64()),
        (Some("old-phone"), Some(410))
    );
    assert!(skipped["job_id"].is_null());
    assert_eq!(stack.deliveries(&second, 2).await.len(), 2);
    assert_eq!(stack.fakes.fcm.journal().requests_for_token(&dead).len(), 1);

    // The audit query finds the call's rows with their attempts.
    let (status, audit) = stack
        .call(
            "GET",
            &format!("/audit?call_id={}&attempts=1", call.replace('@', "%40")),
            None,
        )
        .await;
    assert_eq!(status, 200, "{audit}");
    let deliveries = audit["rows"].as_array().unwrap();
    assert_eq!(deliveries.len(), 3);
    assert!(deliveries.iter().all(|d| d["account"] == account.as_str()));
    assert!(deliveries
        .iter()
        .all(|d| !d["attempts"].as_array().unwrap().is_empty()));
    stack.stop().await;
}

#[tokio::test]
async fn an_apns_410_older_than_the_registration_leaves_the_token_alive() {
    let stack = Stack::start().await;
    let account = account();
    let (old, fresh) = (apns_token(), apns_token());
    let now_ms = pushfleet_core::clock::now_ms() as i64;
    // Apple says the first stopped being valid an hour before it was registered, the second
    // a minute after.
    for (token, at) in [(&old, now_ms - 3_600_000), (&fresh, now_ms + 60_000)] {
        stack.fakes.apns.set_token_state(
            token,
            pushfleet_fakes::ApnsTokenState::Unregistered { timestamp_ms: at },
        );
    }
    register(&stack, &account, &add_body(SYLK, "apple", &old, "old")).await;
    register(&stack, &account, &add_body(SYLK, "apple", &fresh, "fresh")).await;
    let (status, answer) = stack
        .call(
            "POST",
            &format!("{}/push", tokens_path(&account)),
            Some(&push_body("incoming_session", &call_id())),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["data"][0]["code"], 410);
    assert_eq!(answer["data"][1]["code"], 410);
    assert!(
        !stored(&stack, &account, "old").await.unwrap().2,
        "registered since"
    );
    assert!(stored(&stack, &account, "fresh").await.unwrap().2, "dead");
    stack.stop().await;
}

/// A job that reaches a worker after its deadline is answered `expired`, with the 410 the
/// reference gives a push that can no longer be delivered: that says nothing about the token,
/// which stays registered and off the dead-token list.
#[tokio::test]
async fn a_push_that_expires_before_sending_leaves_the_token_registered() {
    let stack = Stack::start_with(StackOptions {
        start_worker: false,
        sync_timeout_ms: 20_000,
        extra_config: "[events.incoming_session]\nttl_secs = 2\n".into(),
        ..Default::default()
    })
    .await;
    let account = account();
    let token = apns_token();
    register(&stack, &account, &add_body(SYLK, "apple", &token, "phone")).await;
    let call = call_id();
    let path = format!("{}/push/phone", tokens_path(&account));
    let body = push_body("incoming_session", &call);
    let ((status, answer), worker) = tokio::join!(
        stack.call("POST", &path, Some(&body)),
        hand_over_after_the_deadline(&stack)
    );
    assert_eq!(status, 200, "{answer}");
    let item = &answer["data"][0];
    assert_eq!(item["code"], 410, "{answer}");
    assert_eq!(item["reason"], "push expired before it could be sent");
    assert_eq!(stack.deliveries(&call, 1).await[0].status, "expired");
    assert!(
        !stored(&stack, &account, "phone").await.unwrap().2,
        "a live token was marked dead"
    );
    let listed: i64 = stack
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM invalid_tokens WHERE token_fingerprint = $1",
            &[&pushfleet_core::tokens::token_fingerprint(&token)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(listed, 0);
    worker.stop().await;
    stack.stop().await;
}

/// Takes the first calls job off its queue, holds it until its deadline has passed, and puts it
/// back without the broker's expiry, as a worker busy past the deadline would leave it; then
/// starts a worker.
async fn hand_over_after_the_deadline(stack: &Stack) -> pushfleet_worker::Worker {
    use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions};
    use pushfleet_core::topology::{self, Topology};

    let connection = topology::connect(&stack.settings.rabbitmq, "it-hold")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let queue = Topology::new(&stack.settings.rabbitmq).lane_queue(pushfleet_core::Lane::Calls);
    let delivery = loop {
        let got = channel
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap();
        match got {
            Some(message) => break message.delivery,
            None => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    };
    let job: pushfleet_core::Job = serde_json::from_slice(&delivery.data).unwrap();
    let left = job
        .deadline_ms
        .saturating_sub(pushfleet_core::clock::now_ms());
    tokio::time::sleep(std::time::Duration::from_millis(left + 200)).await;
    let reply_to = delivery.properties.reply_to().clone().expect("a sync job");
    channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            &delivery.data,
            topology::job_properties(job.id).with_reply_to(reply_to),
        )
        .await
        .unwrap();
    delivery.ack(BasicAckOptions::default()).await.unwrap();
    let _ = connection.close(200, "handed over".into()).await;
    start_worker(&stack.settings).await
}

#[tokio::test]
async fn a_device_that_cannot_take_the_push_is_skipped_in_an_account_push() {
    let stack = Stack::start().await;
    let account = account();
    let (sylk, linphone) = (apns_token(), fcm_token());
    register(&stack, &account, &add_body(SYLK, "apple", &sylk, "iphone")).await;
    register(
        &stack,
        &account,
        &add_body(LINPHONE, "firebase", &linphone, "android"),
    )
    .await;
    // Linphone apps only ring: the message reaches the Sylk device, the Linphone one says why not.
    let call = call_id();
    let path = format!("{}/push", tokens_path(&account));
    let (status, answer) = stack
        .call("POST", &path, Some(&push_body("message", &call)))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["data"][0]["code"], 200);
    assert_eq!(
        (
            answer["data"][1]["device_id"].as_str(),
            answer["data"][1]["code"].as_u64()
        ),
        (Some("android"), Some(404))
    );
    assert_eq!(
        answer["data"][1]["reason"],
        "event not found (must be incoming_sesion)"
    );
    assert_eq!(stack.deliveries(&call, 1).await.len(), 1);
    assert!(stack
        .fakes
        .fcm
        .journal()
        .requests_for_token(&linphone)
        .is_empty());
    // Addressed to that device alone, or when no device can take it, it is the answer.
    let (status, answer) = stack
        .call(
            "POST",
            &format!("{}/push/android", tokens_path(&account)),
            Some(&push_body("message", &call)),
        )
        .await;
    assert_eq!(
        (status, answer["description"].as_str()),
        (404, Some("event not found (must be incoming_sesion)"))
    );
    stack.stop().await;
}

#[tokio::test]
async fn async_mode_lists_one_job_per_device() {
    let stack = Stack::start_async().await;
    let account = account();
    register(
        &stack,
        &account,
        &add_body(SYLK, "apple", &apns_token(), "a"),
    )
    .await;
    register(
        &stack,
        &account,
        &add_body(LINPHONE, "firebase", &fcm_token(), "b"),
    )
    .await;
    let call = call_id();
    let (status, answer) = stack
        .call(
            "POST",
            &format!("{}/push", tokens_path(&account)),
            Some(&push_body("incoming_session", &call)),
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["description"], "accepted for delivery");
    let jobs = answer["data"]["job_ids"].as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    let rows = stack.deliveries(&call, 2).await;
    assert_eq!(rows.len(), 2);
    assert!(rows
        .iter()
        .all(|r| r.status == "delivered" && jobs.contains(&json!(r.id.to_string()))));
    stack.stop().await;
}

#[tokio::test]
async fn the_access_list_guards_every_route() {
    let stack = Stack::start_with(StackOptions {
        allowed_hosts: vec!["192.0.2.0/24".into(), "2001:db8::1".into()],
        start_worker: false,
        ..Default::default()
    })
    .await;
    let denied = json!({"code": 403, "description": "access denied by access list", "data": {}});
    let account = account();
    let token = apns_token();
    let calls: [(&str, String, Option<Value>); 8] = [
        ("POST", "/push".into(), Some(json!({"bad": "body"}))),
        (
            "POST",
            tokens_path(&account),
            Some(add_body(SYLK, "apple", &token, "d")),
        ),
        (
            "DELETE",
            tokens_path(&account),
            Some(json!({"app-id": SYLK})),
        ),
        ("GET", tokens_path(&account), None),
        (
            "POST",
            format!("{}/push", tokens_path(&account)),
            Some(push_body("cancel", "c")),
        ),
        (
            "POST",
            format!("{}/push/d", tokens_path(&account)),
            Some(push_body("cancel", "c")),
        ),
        ("POST", "/rfc8599/push".into(), Some(json!({}))),
        ("GET", "/audit?call_id=c".into(), None),
    ];
    for (method, path, body) in calls {
        let answer = stack.call(method, &path, body.as_ref()).await;
        assert_eq!(answer, (403, denied.clone()), "{method} {path}");
    }
    assert_eq!(stored(&stack, &account, "d").await, None);
    stack.stop().await;

    // A list that lets the caller in; an entry that is not a network stops the start-up.
    let allowed = Stack::start_with(StackOptions {
        allowed_hosts: vec!["127.0.0.0/8".into()],
        start_worker: false,
        ..Default::default()
    })
    .await;
    let (status, _) = allowed
        .call(
            "POST",
            &tokens_path(&account),
            Some(&add_body(SYLK, "apple", &token, "d")),
        )
        .await;
    assert_eq!(status, 200);
    let mut settings = allowed.settings.clone();
    settings.ingest.allowed_hosts = vec!["10.0.0.1, 10.0.0.2".into()];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = pushfleet_ingest::Ingest::start(settings, listener)
        .await
        .err()
        .expect("start fails");
    assert!(
        matches!(&error, pushfleet_ingest::StartError::AccessList(invalid)
            if invalid.entry == "10.0.0.1, 10.0.0.2"),
        "{error}"
    );
    assert_eq!(
        error.to_string(),
        "[ingest] allowed_hosts: \"10.0.0.1, 10.0.0.2\" is not an IP address or network"
    );
    allowed.stop().await;
}

#[tokio::test]
async fn an_unreachable_database_stops_ingest_at_start() {
    let port = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    };
    let text = format!(
        "[rabbitmq]\nurl = \"{}\"\n[postgres]\nurl = \"postgres://postgres@127.0.0.1:{port}/pushfleet\"\nconnect_timeout_ms = 2000\n",
        rabbitmq_url()
    );
    let settings =
        pushfleet_core::Settings::from_toml(&text, Vec::new(), std::path::Path::new(".")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = pushfleet_ingest::Ingest::start(settings, listener)
        .await
        .err()
        .expect("start fails");
    assert!(
        matches!(&error, pushfleet_ingest::StartError::Database(
            pushfleet_core::db::DbError::Unreachable { url, .. }
        ) if url.starts_with("postgres://postgres@127.0.0.1:")),
        "{error}"
    );
    assert!(!error.to_string().contains('\n'), "{error}");
}
