//! Delivery semantics: retries, deadlines, dead letters, dead tokens, cancel and duplicates.

use std::time::{Duration, SystemTime};

use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use pushfleet_core::clock::now_ms;
use pushfleet_core::tokens::token_fingerprint;
use pushfleet_core::Topology;
use pushfleet_fakes::{ApnsTokenState, FcmTokenState, Scripted};
use serde_json::Value;
use uuid::Uuid;

use crate::support::*;

fn stack_options(mode: &'static str, extra: &str) -> StackOptions {
    StackOptions {
        mode,
        extra_config: extra.to_string(),
        ..Default::default()
    }
}

fn job_id(answer: &Value) -> Uuid {
    answer["data"]["job_id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no job id in {answer}"))
}

#[tokio::test]
async fn a_503_then_200_is_delivered_on_attempt_two_with_both_attempts_audited() {
    let stack = Stack::start().await;
    let (token, call) = (apns_token(), call_id());
    stack
        .fakes
        .apns
        .script(&token, Scripted::status(503).reason("ServiceUnavailable"));
    // The sync caller waits through the retry and gets the final answer.
    let (status, answer) = stack
        .push(&v1_body(SYLK, "apple", &token, "message", &call))
        .await;
    assert_eq!(status, 200, "{answer}");

    let rows = stack.deliveries(&call, 1).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].status.as_str(), rows[0].attempts),
        ("delivered", 2)
    );
    assert_eq!(
        stack.attempts(rows[0].id).await,
        vec![(1, Some(503)), (2, Some(200))]
    );
    assert_eq!(
        stack.fakes.apns.journal().requests_for_token(&token).len(),
        2
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_429_with_retry_after_waits_at_least_that_long() {
    let stack = Stack::start_with(stack_options("async", "")).await;
    let (token, call) = (fcm_token(), call_id());
    stack
        .fakes
        .fcm
        .script(&token, Scripted::status(429).retry_after(2));
    let (status, answer) = stack
        .push(&v1_body(SYLK, "firebase", &token, "message", &call))
        .await;
    assert_eq!(status, 202, "{answer}");

    let rows = stack.deliveries(&call, 1).await;
    assert_eq!(
        (rows[0].status.as_str(), rows[0].attempts),
        ("delivered", 2)
    );
    let requests = stack.fakes.fcm.journal().requests_for_token(&token);
    assert_eq!(requests.len(), 2);
    let waited = requests[1]
        .received_at
        .duration_since(requests[0].received_at)
        .unwrap();
    assert!(waited >= Duration::from_secs(2), "retried after {waited:?}");
    stack.stop().await;
}

#[tokio::test]
async fn a_deadline_passing_during_retries_ends_expired_and_nothing_is_sent_after_it() {
    let extra = "\n[events.incoming_session]\nttl_secs = 3\n";
    let stack = Stack::start_with(stack_options("async", extra)).await;
    let (token, call) = (apns_token(), call_id());
    stack
        .fakes
        .apns
        .script(&token, Scripted::status(500).times(100));
    let (status, answer) = stack
        .push(&v1_body(SYLK, "apple", &token, "incoming_session", &call))
        .await;
    assert_eq!(status, 202, "{answer}");
    let accepted = SystemTime::now();

    let rows = stack.deliveries(&call, 1).await;
    assert_eq!(rows[0].status, "expired", "{rows:?}");
    let requests = stack.fakes.apns.journal().requests_for_token(&token);
    assert!(requests.len() >= 2, "retried before expiring");
    assert_eq!(rows[0].attempts as usize, requests.len());
    let deadline = accepted + Duration::from_secs(3);
    for request in &requests {
        assert!(
            request.received_at < deadline,
            "a request after the deadline"
        );
    }
    // Nothing more arrives later either.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        stack.fakes.apns.journal().requests_for_token(&token).len(),
        requests.len()
    );
    stack.stop().await;
}

#[tokio::test]
async fn retries_give_up_after_max_attempts_as_failed_with_a_dead_letter_copy() {
    let extra = "\n[retry]\nmax_attempts = 2\n";
    let stack = Stack::start_with(stack_options("async", extra)).await;
    let (token, call) = (fcm_token(), call_id());
    stack
        .fakes
        .fcm
        .script(&token, Scripted::status(503).times(10));
    stack
        .push(&v1_body(SYLK, "firebase", &token, "message", &call))
        .await;
    let rows = stack.deliveries(&call, 1).await;
    assert_eq!((rows[0].status.as_str(), rows[0].attempts), ("failed", 2));
    assert_eq!(
        stack.fakes.fcm.journal().requests_for_token(&token).len(),
        2
    );
    assert_eq!(dead_letter_count(&stack).await, 1);
    stack.stop().await;
}

#[tokio::test]
async fn jobs_expired_in_the_queue_get_an_expired_row_and_a_dead_letter() {
    let extra = "\n[events.message]\nttl_secs = 1\n";
    let mut stack = Stack::start_with(StackOptions {
        start_worker: false,
        ..stack_options("async", extra)
    })
    .await;
    let (token, call) = (apns_token(), call_id());
    let (status, answer) = stack
        .push(&v1_body(SYLK, "apple", &token, "message", &call))
        .await;
    assert_eq!(status, 202);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stack.start_worker().await;

    let rows = stack.deliveries(&call, 1).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].id, job_id(&answer));
    assert_eq!((rows[0].status.as_str(), rows[0].attempts), ("expired", 0));
    assert!(stack
        .fakes
        .apns
        .journal()
        .requests_for_token(&token)
        .is_empty());
    assert_eq!(dead_letter_count(&stack).await, 1);
    stack.stop().await;
}

#[tokio::test]
async fn an_unreadable_job_is_dead_lettered_and_audited_as_rejected() {
    let stack = Stack::start().await;
    let id = Uuid::new_v4();
    let call = call_id();
    let garbage = format!(r#"{{"v":99,"id":"{id}","app_id":"x","push":{{"call_id":"{call}"}}}}"#);
    let topology = Topology::new(&stack.settings.rabbitmq);
    let connection = pushfleet_core::topology::connect(&stack.settings.rabbitmq, "it")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .basic_publish(
            topology.jobs_exchange().into(),
            "calls".into(),
            BasicPublishOptions::default(),
            garbage.as_bytes(),
            BasicProperties::default().with_message_id(id.to_string().into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let rows = stack.deliveries(&call, 1).await;
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].id, rows[0].status.as_str()), (id, "rejected"));
    assert_eq!(dead_letter_count(&stack).await, 1);
    let _ = connection.close(200, "done".into()).await;
    stack.stop().await;
}

/// Messages waiting in the operators' dead-letter queue.
async fn dead_letter_count(stack: &Stack) -> u32 {
    let topology = Topology::new(&stack.settings.rabbitmq);
    let connection = pushfleet_core::topology::connect(&stack.settings.rabbitmq, "it")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut count = 0;
    for _ in 0..50 {
        count = message_count(&channel, &topology.dead_queue()).await;
        if count > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = connection.close(200, "done".into()).await;
    count
}

#[tokio::test]
async fn dead_tokens_are_marked_and_never_pushed_again() {
    let stack = Stack::start().await;
    let (fcm_dead, apns_dead, apns_reregistered) = (fcm_token(), apns_token(), apns_token());
    stack
        .fakes
        .fcm
        .set_token_state(&fcm_dead, FcmTokenState::Unregistered);
    let gone_at = now_ms() as i64 - 3_600_000;
    for token in [&apns_dead, &apns_reregistered] {
        stack.fakes.apns.set_token_state(
            token,
            ApnsTokenState::Unregistered {
                timestamp_ms: gone_at,
            },
        );
    }
    // Registered before Apple's timestamp: dead. Registered again after it: alive.
    let account = format!("{}@example.com", Uuid::new_v4().simple());
    for (device, token, age) in [
        ("old", &apns_dead, "2 hours"),
        ("new", &apns_reregistered, "1 minute"),
    ] {
        stack
            .query(
                "INSERT INTO device_tokens (account, app_id, device_id, platform, token, updated_at)
                 VALUES ($1, $2, $3, 'apple', $4, now() - $5::text::interval)",
                &[&account, &SYLK, &device, token, &age],
            )
            .await;
    }

    for (platform, token) in [
        ("firebase", &fcm_dead),
        ("apple", &apns_dead),
        ("apple", &apns_reregistered),
    ] {
        let call = call_id();
        let (status, _) = stack
            .push(&v1_body(SYLK, platform, token, "message", &call))
            .await;
        assert_eq!(status, 410, "{platform}");
        let rows = stack.deliveries(&call, 1).await;
        assert_eq!(
            (rows[0].status.as_str(), rows[0].attempts),
            ("token_invalid", 1)
        );
    }
    let marked = |token: &str| {
        let token = token.to_string();
        let stack = &stack;
        async move {
            let listed = stack
                .query(
                    "SELECT reason FROM invalid_tokens WHERE app_id = $1 AND token_fingerprint = $2",
                    &[&SYLK, &token_fingerprint(&token)],
                )
                .await
                .len();
            let registered = stack
                .query(
                    "SELECT invalid_reason FROM device_tokens WHERE token = $1 AND invalidated_at IS NOT NULL",
                    &[&token],
                )
                .await
                .len();
            (listed, registered)
        }
    };
    let mut waited = 0;
    while marked(&apns_dead).await != (1, 1) && waited < 50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += 1;
    }
    assert_eq!(marked(&apns_dead).await, (1, 1));
    assert_eq!(marked(&fcm_dead).await, (1, 0));
    assert_eq!(marked(&apns_reregistered).await, (0, 0));

    // The FCM verdict applies at once; the next push to it is not sent.
    let call = call_id();
    let (status, _) = stack
        .push(&v1_body(SYLK, "firebase", &fcm_dead, "message", &call))
        .await;
    assert_eq!(status, 410);
    let rows = stack.deliveries(&call, 1).await;
    assert_eq!(
        (rows[0].status.as_str(), rows[0].attempts),
        ("token_invalid", 0)
    );
    assert_eq!(
        stack
            .fakes
            .fcm
            .journal()
            .requests_for_token(&fcm_dead)
            .len(),
        1
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_cancel_supersedes_an_incoming_push_waiting_for_a_retry() {
    let stack = Stack::start_with(stack_options("async", "")).await;
    let (token, call) = (apns_token(), call_id());
    stack
        .fakes
        .apns
        .script(&token, Scripted::status(503).reason("ServiceUnavailable"));
    stack
        .push(&v1_body(SYLK, "apple", &token, "incoming_session", &call))
        .await;
    // Wait for the first attempt to fail, then cancel while the retry waits in the broker.
    let first = stack
        .fakes
        .apns
        .journal()
        .wait_for_requests(1, Duration::from_secs(10))
        .await;
    assert!(first.is_ok(), "the first attempt was made");
    let (status, _) = stack
        .push(&v1_body(SYLK, "apple", &token, "cancel", &call))
        .await;
    assert_eq!(status, 202);

    let rows = stack.deliveries(&call, 2).await;
    let by_event = |event: &str| {
        rows.iter()
            .find(|r| r.event == event)
            .unwrap_or_else(|| panic!("no {event} row in {rows:?}"))
    };
    assert_eq!(by_event("incoming_session").status, "cancelled");
    assert_eq!(by_event("cancel").status, "delivered");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let types: Vec<_> = stack
        .fakes
        .apns
        .journal()
        .requests_for_token(&token)
        .iter()
        .map(|r| r.header("apns-push-type").unwrap_or("").to_string())
        .collect();
    assert_eq!(types, ["voip", "background"], "the phone never rang again");
    stack.stop().await;
}

#[tokio::test]
async fn a_cancel_supersedes_a_queued_incoming_push() {
    let mut stack = Stack::start_with(StackOptions {
        start_worker: false,
        ..stack_options("async", "")
    })
    .await;
    let (token, call) = (fcm_token(), call_id());
    for event in ["incoming_session", "cancel"] {
        let (status, _) = stack
            .push(&v1_body(SYLK, "firebase", &token, event, &call))
            .await;
        assert_eq!(status, 202);
    }
    // The worker starts after both were queued: it learns of the cancel from the ledger.
    stack.start_worker().await;
    let rows = stack.deliveries(&call, 2).await;
    let statuses: Vec<_> = rows
        .iter()
        .map(|r| (r.event.as_str(), r.status.as_str()))
        .collect();
    assert!(
        statuses.contains(&("incoming_session", "cancelled")),
        "{statuses:?}"
    );
    assert!(statuses.contains(&("cancel", "delivered")), "{statuses:?}");
    let sent = stack.fakes.fcm.journal().requests_for_token(&token);
    assert_eq!(sent.len(), 1, "only the cancel was sent");
    stack.stop().await;
}

#[tokio::test]
async fn a_duplicate_is_delivered_once_and_audited_as_such() {
    let stack = Stack::start().await;
    let (token, call) = (apns_token(), call_id());
    let body = v1_body(SYLK, "apple", &token, "incoming_session", &call);
    let (first, _) = stack.push(&body).await;
    let (second, answer) = stack.push(&body).await;
    assert_eq!((first, second), (200, 200), "{answer}");
    assert!(
        answer["data"]["reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("duplicate of job"),
        "{answer}"
    );

    let rows = stack.deliveries(&call, 2).await;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].status, "delivered");
    assert_eq!(rows[1].status, "cancelled");
    let reason: String = stack
        .query(
            "SELECT provider_reason FROM deliveries WHERE id = $1",
            &[&rows[1].id],
        )
        .await[0]
        .get(0);
    assert_eq!(reason, format!("duplicate of job {}", rows[0].id));
    assert_eq!(
        stack.fakes.apns.journal().requests_for_token(&token).len(),
        1
    );

    // Another device, or another call, is not a duplicate.
    let other = apns_token();
    let (status, _) = stack
        .push(&v1_body(SYLK, "apple", &other, "incoming_session", &call))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        stack.fakes.apns.journal().requests_for_token(&other).len(),
        1
    );
    stack.stop().await;
}
