//! Registration wake-ups: background pushes that make an app register again, asked for through
//! the API (at most once per `wakeup_min_interval_secs` per device) or sent by the scheduler to
//! the devices past `register_wakeup_threshold` of their registration, each once.

use std::time::Duration;

use pushfleet_core::wakeup::Scheduler;
use pushfleet_fakes::journal::RecordedRequest;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::support::*;

fn account() -> String {
    format!("{}@example.com", uuid::Uuid::new_v4().simple())
}

async fn register(stack: &Stack, account: &str, body: Value) {
    let (status, answer) = stack
        .call("POST", &format!("/v2/tokens/{account}"), Some(&body))
        .await;
    assert_eq!(status, 200, "{answer}");
}

fn results(answer: &Value) -> Vec<(String, String)> {
    answer["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| {
            (
                item["device_id"].as_str().unwrap().to_string(),
                item["result"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

async fn delivered(
    journal: &pushfleet_fakes::journal::Journal,
    token: &str,
) -> Vec<RecordedRequest> {
    for _ in 0..100 {
        let sent = journal.requests_for_token(token);
        if !sent.is_empty() {
            return sent;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Vec::new()
}

#[tokio::test]
async fn a_wakeup_is_a_background_push_and_a_second_within_the_window_is_suppressed() {
    let stack = Stack::start().await;
    let account = account();
    let (voip, background, fcm, voip_only) =
        (apns_token(), apns_token(), fcm_token(), apns_token());
    register(
        &stack,
        &account,
        json!({"app-id": SYLK, "platform": "apple", "token": format!("{voip}-{background}"),
               "device-id": "iphone"}),
    )
    .await;
    register(
        &stack,
        &account,
        json!({"app-id": SYLK, "platform": "firebase", "token": fcm, "device-id": "android"}),
    )
    .await;
    register(
        &stack,
        &account,
        json!({"app-id": SYLK, "platform": "apple", "token": voip_only, "device-id": "old-iphone"}),
    )
    .await;

    let (status, answer) = stack
        .call("POST", &format!("/v2/tokens/{account}/wakeup"), None)
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        results(&answer),
        [
            ("iphone".to_string(), "queued".to_string()),
            ("android".into(), "queued".into()),
            ("old-iphone".into(), "unreachable".into()),
        ]
    );
    let apns = stack.fakes.apns.journal();
    let sent = delivered(apns, &background).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].header("apns-push-type"), Some("background"));
    assert_eq!(sent[0].header("apns-priority"), Some("5"));
    assert_eq!(sent[0].header("apns-topic"), Some(SYLK));
    assert_eq!(
        sent[0].json.as_ref().unwrap()["aps"],
        json!({"content-available": 1})
    );
    assert!(apns.requests_for_token(&voip).is_empty());
    assert!(apns.requests_for_token(&voip_only).is_empty());
    let android = delivered(stack.fakes.fcm.journal(), &fcm).await;
    assert_eq!(android.len(), 1);
    let message = &android[0].json.as_ref().unwrap()["message"];
    assert_eq!(message["android"]["priority"], "normal");
    assert_eq!(message["data"]["event"], "wakeup");

    // Asked again at once (as a proxy would every minute): nothing more is sent.
    let (status, answer) = stack
        .call("POST", &format!("/v2/tokens/{account}/wakeup/iphone"), None)
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(results(&answer), [("iphone".into(), "suppressed".into())]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(apns.requests_for_token(&background).len(), 1);
    let (status, _) = stack
        .call("POST", &format!("/v2/tokens/{account}/wakeup/tablet"), None)
        .await;
    assert_eq!(status, 404);

    // The same by RFC 8599 parameters, for a device the token API does not hold.
    let (remote, voip) = (apns_token(), apns_token());
    let device = json!({"pn-provider": "apns", "pn-param": format!("TEAM.{SYLK}.remote&voip"),
                        "pn-prid": format!("{remote}:remote&{voip}:voip")});
    let (status, answer) = stack.call("POST", "/rfc8599/wakeup", Some(&device)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["data"]["result"], "queued");
    let sent = delivered(apns, &remote).await;
    assert_eq!(sent[0].header("apns-push-type"), Some("background"));
    let (status, answer) = stack.call("POST", "/rfc8599/wakeup", Some(&device)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["data"]["result"], "suppressed");
    let voip_only = json!({"pn-provider": "apns", "pn-param": format!("TEAM.{SYLK}.voip"),
                           "pn-prid": apns_token()});
    let (status, answer) = stack
        .call("POST", "/rfc8599/wakeup", Some(&voip_only))
        .await;
    assert_eq!(status, 400, "{answer}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(apns.requests_for_token(&remote).len(), 1);
    assert!(apns.requests_for_token(&voip).is_empty());
    let mut audited = Vec::new();
    for _ in 0..100 {
        audited = stack
            .query(
                "SELECT status FROM deliveries WHERE event = 'wakeup' AND account = $1",
                &[&account],
            )
            .await;
        if audited.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let statuses: Vec<String> = audited.iter().map(|r| r.get(0)).collect();
    assert_eq!(statuses, ["delivered", "delivered"]);
    stack.stop().await;
}

#[tokio::test]
async fn two_schedulers_wake_exactly_the_devices_past_the_threshold_each_once() {
    // Schedulers claim every due device of the database: one test runs them all.
    let stack = Stack::start_with(StackOptions {
        mode: "async",
        extra_config: "\n[wakeup]\nscheduler_interval_secs = 1\n".into(),
        ..Default::default()
    })
    .await;
    let account = account();
    // Registrations of 4 s pass half their lifetime after 2 s; one of an hour does not.
    let (due_apple, due_android, later, voip_only) =
        (apns_token(), fcm_token(), apns_token(), apns_token());
    let devices = [
        json!({"app-id": SYLK, "platform": "apple", "token": format!("{}-{due_apple}", apns_token()),
               "device-id": "due-iphone", "expires": 4}),
        json!({"app-id": SYLK, "platform": "firebase", "token": due_android,
               "device-id": "due-android", "expires": 4}),
        json!({"app-id": SYLK, "platform": "apple", "token": format!("{}-{later}", apns_token()),
               "device-id": "later", "expires": 3600}),
        json!({"app-id": SYLK, "platform": "apple", "token": voip_only,
               "device-id": "voip-only", "expires": 4}),
    ];
    for device in devices {
        register(&stack, &account, device).await;
    }
    let settings = stack.settings.clone();
    let (stop, stopped) = watch::channel(false);
    let mut schedulers = Vec::new();
    for _ in 0..2 {
        let scheduler = Scheduler::connect(settings.clone())
            .await
            .expect("scheduler");
        let stopped = stopped.clone();
        schedulers.push(tokio::spawn(async move { scheduler.run(stopped).await }));
    }
    tokio::time::sleep(Duration::from_millis(5500)).await;
    stop.send(true).unwrap();
    for scheduler in schedulers {
        scheduler.await.unwrap().expect("scheduler ran");
    }
    let apns = stack.fakes.apns.journal();
    let fcm = stack.fakes.fcm.journal();
    assert_eq!(apns.requests_for_token(&due_apple).len(), 1);
    assert_eq!(fcm.requests_for_token(&due_android).len(), 1);
    assert!(apns.requests_for_token(&later).is_empty());
    assert!(apns.requests_for_token(&voip_only).is_empty());
    let woken = stack
        .query(
            "SELECT device_id FROM device_tokens WHERE account = $1 AND scheduled_wakeup_for IS NOT NULL
              ORDER BY device_id",
            &[&account],
        )
        .await;
    let woken: Vec<String> = woken.iter().map(|r| r.get(0)).collect();
    assert_eq!(woken, ["due-android", "due-iphone"]);

    // The same from the command line, as operators run it.
    let account = self::account();
    let background = apns_token();
    register(
        &stack,
        &account,
        json!({"app-id": SYLK, "platform": "apple",
               "token": format!("{}-{background}", apns_token()),
               "device-id": "iphone", "expires": 5}),
    )
    .await;
    // Past half of its 5 s registration by the time the scheduler starts.
    tokio::time::sleep(Duration::from_millis(2700)).await;
    let config = stack.config_path.display().to_string();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let run = pushfleet_client::run(
        "pushfleet",
        vec!["wakeup-scheduler".into(), "--config".into(), config],
        &mut out,
        &mut err,
    );
    // It runs until stopped: here, until the test has seen it work.
    let stopped = tokio::time::timeout(Duration::from_millis(2500), run).await;
    assert!(stopped.is_err(), "{}", String::from_utf8_lossy(&err));
    assert!(String::from_utf8_lossy(&out).contains("wake-up scheduler running"));
    let sent = delivered(stack.fakes.apns.journal(), &background).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].header("apns-push-type"), Some("background"));

    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = pushfleet_client::run(
        "pushfleet",
        vec!["wakeup-scheduler".into()],
        &mut out,
        &mut err,
    )
    .await;
    assert_eq!(code, 2, "{}", String::from_utf8_lossy(&err));
    let code = pushfleet_client::run(
        "pushfleet",
        vec![
            "wakeup-scheduler".into(),
            "--config".into(),
            "/nonexistent.toml".into(),
        ],
        &mut out,
        &mut err,
    )
    .await;
    assert_eq!(code, 1);
    stack.stop().await;
}
