//! Input limits at the door: control characters, over-long values and malformed device tokens
//! get a 400 naming the field in every API, nothing is sent or stored for them, and the next good
//! push is delivered and audited. A v2 account holds at most `max_devices_per_account` devices,
//! also under concurrent registrations.

use futures_util::future::join_all;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::*;

const CONTROL: &str = "must not contain control characters";

fn account() -> String {
    format!("carol-{}@example.com", Uuid::new_v4().simple())
}

fn too_long(field: &str, max: usize) -> String {
    format!("ensure this value has at most {max} characters: {field}")
}

/// Asserts a 400 in the Sylk shape whose description is `description`.
#[track_caller]
fn assert_refused(what: &str, (status, answer): (u16, Value), description: &str) {
    assert_eq!(
        (status, answer["description"].as_str()),
        (400, Some(description)),
        "{what}: {answer}"
    );
    assert_eq!(
        (&answer["code"], &answer["data"]),
        (&json!(400), &json!("")),
        "{what}"
    );
}

/// (field, its limit) for the text fields of a push.
const PUSH_FIELDS: [(&str, usize); 11] = [
    ("call-id", 256),
    ("device-id", 256),
    ("from", 512),
    ("to", 512),
    ("from-display-name", 256),
    ("reason", 256),
    ("filename", 1024),
    ("filetype", 256),
    ("account", 256),
    ("content", 4096),
    ("content-type", 256),
];

/// The three ways a text can break the rules, with the description each gets.
fn bad_values(field: &str, max: usize) -> Vec<(String, String)> {
    let control = if field == "content" {
        format!("{CONTROL} other than tab, line feed and carriage return: {field}")
    } else {
        format!("{CONTROL}: {field}")
    };
    vec![
        ("a\u{0}b".to_string(), control.clone()),
        ("a\u{1b}[31mb".to_string(), control.clone()),
        ("next\u{85}line".to_string(), control),
        ("é".repeat(max + 1), too_long(field, max)),
    ]
}

#[tokio::test]
async fn v1_texts_beyond_their_limits_get_a_400_and_good_pushes_still_go_through() {
    let stack = Stack::start().await;
    let refused_token = apns_token();
    let message = |token: &str, call: &str| {
        let mut body = v1_body(SYLK, "apple", token, "message", call);
        body["content"] = json!("hello");
        body
    };
    for (field, max) in PUSH_FIELDS {
        for (value, description) in bad_values(field, max) {
            let mut body = message(&refused_token, &call_id());
            body[field] = json!(value);
            assert_refused(field, stack.push(&body).await, &description);
        }
        // At the limit is fine. (A message's text that long would not fit in the providers'
        // 4 KB payloads: a call carries no text.)
        let mut body = message(&apns_token(), &call_id());
        if field == "content" {
            body["event"] = json!("incoming_session");
        }
        body[field] = json!("x".repeat(max));
        let (status, answer) = stack.push(&body).await;
        assert_eq!(status, 200, "{field} of {max} characters: {answer}");
    }
    // The underscore spelling is the same field.
    let mut body = message(&refused_token, &call_id());
    body.as_object_mut().unwrap().remove("from-display-name");
    body["from_display_name"] = json!("A\u{7f}");
    assert_refused(
        "from_display_name",
        stack.push(&body).await,
        &format!("{CONTROL}: from-display-name"),
    );
    let mut body = message(&refused_token, &call_id());
    body["app-id"] = json!(format!("{SYLK}\u{0}"));
    assert_refused(
        "app-id",
        stack.push(&body).await,
        &format!("{CONTROL}: app-id"),
    );
    assert!(
        stack
            .fakes
            .apns
            .journal()
            .requests_for_token(&refused_token)
            .is_empty(),
        "nothing refused was sent"
    );

    // Lines in a message's text are fine, and the next push is delivered and audited.
    let call = call_id();
    let token = apns_token();
    let mut body = message(&token, &call);
    body["content"] = json!("first line\r\n\tsecond line");
    let (status, answer) = stack.push(&body).await;
    assert_eq!(status, 200, "{answer}");
    let rows = stack.deliveries(&call, 1).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status, "delivered");
    let sent = stack.fakes.apns.journal().requests_for_token(&token);
    assert_eq!(sent.len(), 1);
    let payload = sent[0].json.as_ref().expect("a JSON payload");
    assert_eq!(
        payload["data"]["content"], "first line\r\n\tsecond line",
        "the text is forwarded as given"
    );

    // A NUL in the audit query is the caller's 400, not a storage failure.
    let (status, answer) = stack.call("GET", "/audit?call_id=a%00b", None).await;
    assert_refused("audit", (status, answer), &format!("{CONTROL}: call_id"));
    stack.stop().await;
}

#[tokio::test]
async fn tokens_must_have_their_platforms_shape() {
    let stack = Stack::start().await;
    let apns = "must be an APNs device token of 64 to 200 hex digits (an even number): token";
    let fcm = "must be an FCM registration token of letters, digits, '_', ':', '.' and '-': token";
    let cases = [
        ("apple", "tok".to_string(), apns.to_string()),
        ("apple", "a".repeat(62), apns.to_string()),
        ("apple", "a".repeat(65), apns.to_string()),
        ("apple", "a".repeat(202), apns.to_string()),
        ("apple", format!("{}zz", "a".repeat(62)), apns.to_string()),
        // v1 takes one token: a voip-background pair is for the token API.
        (
            "apple",
            format!("{}-{}", apns_token(), apns_token()),
            apns.to_string(),
        ),
        ("firebase", "with space".to_string(), fcm.to_string()),
        ("firebase", "fcm/1".to_string(), fcm.to_string()),
        ("firebase", "a".repeat(4097), too_long("token", 4096)),
        (
            "firebase",
            "fcm\u{0}1".to_string(),
            format!("{CONTROL}: token"),
        ),
    ];
    for (platform, token, description) in cases {
        let body = v1_body(SYLK, platform, &token, "incoming_session", &call_id());
        assert_refused(&token, stack.push(&body).await, &description);
    }
    // Apple's longer tokens, in either case, and the longest FCM ones pass.
    for (platform, token) in [
        ("apple", "AB".repeat(50)),
        ("apple", apns_token().to_uppercase()),
        ("firebase", format!("{}:{}", fcm_token(), "A".repeat(3000))),
    ] {
        let call = call_id();
        let body = v1_body(SYLK, platform, &token, "incoming_session", &call);
        let (status, answer) = stack.push(&body).await;
        assert_eq!(status, 200, "{platform} {}: {answer}", token.len());
        assert_eq!(stack.deliveries(&call, 1).await[0].status, "delivered");
    }
    stack.stop().await;
}

fn tokens_path(account: &str) -> String {
    format!("/v2/tokens/{account}")
}

fn registration(platform: &str, token: &str, device: &str) -> Value {
    json!({"app-id": SYLK, "platform": platform, "token": token, "device-id": device,
           "user-agent": "Sylk/3.5"})
}

fn call_data(call: &str) -> Value {
    json!({"call-id": call, "from": "alice@example.com", "to": "bob@example.com",
           "media-type": "audio", "event": "incoming_session"})
}

async fn devices(stack: &Stack, account: &str) -> i64 {
    stack
        .query(
            "SELECT count(*) FROM device_tokens WHERE account = $1",
            &[&account],
        )
        .await[0]
        .get(0)
}

#[tokio::test]
async fn v2_registrations_and_paths_keep_the_limits() {
    let stack = Stack::start().await;
    let account = account();
    let path = tokens_path(&account);
    let apns_shape = "must be an APNs device token of 64 to 200 hex digits (an even number): token";
    let pair_shape = "must be an APNs device token, or a '<voip>-<background>' pair of them, \
                      each of 64 to 200 hex digits (an even number): token";
    let mut cases: Vec<(Value, String)> = vec![
        (registration("apple", "tok", "d1"), apns_shape.into()),
        (
            registration("apple", &format!("{}-tok", apns_token()), "d1"),
            pair_shape.into(),
        ),
        (
            registration("apple", &format!("tok-{}", apns_token()), "d1"),
            pair_shape.into(),
        ),
        (
            registration("firebase", "fcm token", "d1"),
            "must be an FCM registration token of letters, digits, '_', ':', '.' and '-': token"
                .into(),
        ),
        (
            registration("firebase", &format!("{}\u{0}", fcm_token()), "d1"),
            format!("{CONTROL}: token"),
        ),
    ];
    for (field, max) in [("device-id", 256), ("user-agent", 512)] {
        for (value, description) in bad_values(field, max) {
            let mut body = registration("firebase", &fcm_token(), "d1");
            body[field] = json!(value);
            cases.push((body, description));
        }
    }
    let mut body = registration("firebase", &fcm_token(), "d1");
    body["app-id"] = json!("x".repeat(257));
    cases.push((body, too_long("app-id", 256)));
    for (body, description) in cases {
        let answer = stack.call("POST", &path, Some(&body)).await;
        assert_refused(&body.to_string(), answer, &description);
    }
    assert_eq!(devices(&stack, &account).await, 0, "nothing was stored");

    // The account of the path, in every v2 route; and the device of a push path.
    let nul = "carol%00@example.com";
    let control = "carol%1B@example.com";
    let long = "c".repeat(257);
    let good = registration("firebase", &fcm_token(), "d1");
    let remove = json!({"app-id": SYLK, "device-id": "d1"});
    let push = call_data(&call_id());
    for bad in [nul, control, long.as_str()] {
        let description = if bad == long {
            too_long("account", 256)
        } else {
            format!("{CONTROL}: account")
        };
        let routes = [
            ("POST", tokens_path(bad), Some(&good)),
            ("GET", tokens_path(bad), None),
            ("DELETE", tokens_path(bad), Some(&remove)),
            ("POST", format!("{}/push", tokens_path(bad)), Some(&push)),
            ("POST", format!("{}/push/d1", tokens_path(bad)), Some(&push)),
        ];
        for (method, route, body) in routes {
            let answer = stack.call(method, &route, body).await;
            assert_refused(&format!("{method} {route}"), answer, &description);
        }
    }
    let answer = stack
        .call("POST", &format!("{path}/push/d%001"), Some(&push))
        .await;
    assert_refused(
        "device of the path",
        answer,
        &format!("{CONTROL}: device-id"),
    );
    let answer = stack
        .call(
            "DELETE",
            &path,
            Some(&json!({"app-id": SYLK, "device-id": "d\u{0}1"})),
        )
        .await;
    assert_refused("removal", answer, &format!("{CONTROL}: device-id"));

    // Registration within the limits works, with an Apple pair and a long Apple token.
    let (voip, background) = (apns_token(), "0f".repeat(100));
    let (status, answer) = stack
        .call(
            "POST",
            &path,
            Some(&registration(
                "apple",
                &format!("{voip}-{background}"),
                "iphone",
            )),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = stack.call("POST", &path, Some(&good)).await;
    assert_eq!(status, 200, "{answer}");

    // The call data of a v2 push: a bad text is a 400 before anything is sent.
    for (field, max) in [("call-id", 256), ("from", 512), ("reason", 256)] {
        for (value, description) in bad_values(field, max) {
            let mut body = call_data(&call_id());
            body[field] = json!(value);
            let answer = stack
                .call("POST", &format!("{path}/push"), Some(&body))
                .await;
            assert_refused(field, answer, &description);
        }
    }
    assert!(stack
        .fakes
        .apns
        .journal()
        .requests_for_token(&voip)
        .is_empty());

    // The next good push reaches both devices and is audited with the account's devices.
    let call = call_id();
    let (status, answer) = stack
        .call("POST", &format!("{path}/push"), Some(&call_data(&call)))
        .await;
    assert_eq!(status, 200, "{answer}");
    let rows = stack.deliveries(&call, 2).await;
    let mut devices: Vec<(Option<String>, String)> = rows
        .iter()
        .map(|r| (r.device_id.clone(), r.status.clone()))
        .collect();
    devices.sort();
    assert_eq!(
        devices,
        vec![
            (Some("d1".into()), "delivered".into()),
            (Some("iphone".into()), "delivered".into())
        ]
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_stored_token_beyond_the_limits_skips_its_device_only() {
    let stack = Stack::start().await;
    let account = account();
    let path = tokens_path(&account);
    let good = fcm_token();
    let (status, answer) = stack
        .call(
            "POST",
            &path,
            Some(&registration("firebase", &good, "pixel")),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    // As an import, or a registration from before the limits, may have stored it.
    stack
        .query(
            "INSERT INTO device_tokens (account, app_id, device_id, platform, token, silent)
             VALUES ($1, $2, 'old-iphone', 'apple', 'aaaa', true)",
            &[&account, &SYLK],
        )
        .await;
    let call = call_id();
    let (status, answer) = stack
        .call("POST", &format!("{path}/push"), Some(&call_data(&call)))
        .await;
    assert_eq!(status, 200, "{answer}");
    let items = answer["data"].as_array().unwrap();
    let item = |device: &str| {
        items
            .iter()
            .find(|i| i["device_id"] == device)
            .unwrap_or_else(|| panic!("no item for {device}: {answer}"))
    };
    assert_eq!(item("pixel")["code"], 200);
    assert_eq!(item("old-iphone")["code"], 400);
    assert!(item("old-iphone")["reason"]
        .as_str()
        .unwrap()
        .ends_with(": token"));
    assert!(item("old-iphone")["job_id"].is_null());
    let rows = stack.deliveries(&call, 1).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].device_id.as_deref(), Some("pixel"));
    // Addressed alone, its problem is the answer.
    let (status, answer) = stack
        .call(
            "POST",
            &format!("{path}/push/old-iphone"),
            Some(&call_data(&call_id())),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    stack.stop().await;
}

#[tokio::test]
async fn rfc8599_values_are_checked_once_decoded() {
    let stack = Stack::start().await;
    let refused = apns_token();
    let contact = |prid: &str| {
        format!("<sip:bob@192.0.2.10;pn-provider=apns;pn-param=TEAM.{SYLK}.voip;pn-prid={prid}>")
    };
    let with_call = |params: Value| {
        let mut body = call_data(&call_id());
        for (key, value) in params.as_object().unwrap() {
            body[key] = value.clone();
        }
        body
    };
    let cases = [
        (
            json!({"contact": contact(&format!("{refused}%00"))}),
            format!("{CONTROL}: pn-prid"),
        ),
        (
            json!({"contact": format!("<sip:bob@h;pn-provider=fcm;pn-param=p%0Aq;pn-prid={}>", fcm_token())}),
            format!("{CONTROL}: pn-param"),
        ),
        (
            json!({"pn-provider": "apns", "pn-param": format!("TEAM.{SYLK}.voip"), "pn-prid": "y"}),
            "must be an APNs device token of 64 to 200 hex digits (an even number): pn-prid".into(),
        ),
        (
            json!({"pn-provider": "fcm", "pn-param": "p", "pn-prid": "a b", "app-id": SYLK}),
            "must be an FCM registration token of letters, digits, '_', ':', '.' and '-': pn-prid"
                .into(),
        ),
        (
            json!({"pn-type": "apple", "app-id": format!("{LINPHONE}.voip.prod"), "pn-tok": "EEEE"}),
            "must be an APNs device token of 64 to 200 hex digits (an even number): pn-tok".into(),
        ),
        (
            json!({"contact": contact(&refused), "call-id": "a\u{0}b"}),
            format!("{CONTROL}: call-id"),
        ),
        (
            json!({"contact": contact(&refused), "from": "f".repeat(513)}),
            too_long("from", 512),
        ),
    ];
    for (params, description) in cases {
        let answer = stack.push_rfc8599(&with_call(params.clone())).await;
        assert_refused(&params.to_string(), answer, &description);
    }
    assert!(stack
        .fakes
        .apns
        .journal()
        .requests_for_token(&refused)
        .is_empty());

    // Escapes that decode to good text are fine, and the push is delivered and audited.
    let token = apns_token();
    let call = call_id();
    let mut body = call_data(&call);
    body["contact"] = json!(format!(
        "<sip:bob@192.0.2.10;pn-provider=apns;pn-param=TEAM.%63om.agprojects.sylk.voip;pn-prid={token}>"
    ));
    let (status, answer) = stack.push_rfc8599(&body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["data"]["token_fingerprint"],
        pushfleet_core::tokens::token_fingerprint(&token)
    );
    let rows = stack.deliveries(&call, 1).await;
    assert_eq!((rows.len(), rows[0].status.as_str()), (1, "delivered"));
    stack.stop().await;
}

async fn register(stack: &Stack, account: &str, device: &str, token: &str) -> (u16, Value) {
    stack
        .call(
            "POST",
            &tokens_path(account),
            Some(&registration("firebase", token, device)),
        )
        .await
}

#[tokio::test]
async fn an_account_holds_at_most_max_devices_per_account() {
    let stack = Stack::start().await;
    let account = account();
    for n in 1..=20 {
        let (status, answer) = register(&stack, &account, &format!("dev-{n}"), &fcm_token()).await;
        assert_eq!(status, 200, "device {n}: {answer}");
    }
    let (status, answer) = register(&stack, &account, "dev-21", &fcm_token()).await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(
        (&answer["code"], &answer["data"]),
        (&json!(409), &json!(""))
    );
    let description = answer["description"].as_str().unwrap();
    assert!(
        description.contains("20 devices") && description.contains("max_devices_per_account"),
        "{description}"
    );
    assert_eq!(devices(&stack, &account).await, 20);

    // Re-registering a device the account has always works, also when it is full.
    let new_token = fcm_token();
    let (status, answer) = register(&stack, &account, "dev-1", &new_token).await;
    assert_eq!(status, 200, "{answer}");
    let stored: String = stack
        .query(
            "SELECT token FROM device_tokens WHERE account = $1 AND device_id = 'dev-1'",
            &[&account],
        )
        .await[0]
        .get(0);
    assert_eq!(stored, new_token);

    // A removal makes room; the refusal was counted under its own label.
    let (status, _) = stack
        .call(
            "DELETE",
            &tokens_path(&account),
            Some(&json!({"app-id": SYLK, "device-id": "dev-2"})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, answer) = register(&stack, &account, "dev-21", &fcm_token()).await;
    assert_eq!(status, 200, "{answer}");
    let metrics = stack
        .http
        .get(stack.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("pushfleet_ingest_requests_total")
                && l.contains("error=\"too_many_devices\"")
                && l.contains("status=\"409\"")),
        "{metrics}"
    );
    stack.stop().await;
}

#[tokio::test]
async fn concurrent_registrations_cannot_overshoot_the_limit() {
    let stack = Stack::start_with(StackOptions {
        env: vec![(
            "PUSHFLEET__INGEST__MAX_DEVICES_PER_ACCOUNT".into(),
            "5".into(),
        )],
        ..Default::default()
    })
    .await;
    for round in 0..3 {
        let account = account();
        let answers = join_all((0..16).map(|n| {
            let (stack, account) = (&stack, &account);
            async move { register(stack, account, &format!("dev-{n}"), &fcm_token()).await }
        }))
        .await;
        let mut statuses: Vec<u16> = answers.iter().map(|(status, _)| *status).collect();
        statuses.sort();
        assert_eq!(
            statuses,
            [vec![200; 5], vec![409; 11]].concat(),
            "round {round}: {answers:?}"
        );
        assert_eq!(devices(&stack, &account).await, 5, "round {round}");
    }
    stack.stop().await;
}
