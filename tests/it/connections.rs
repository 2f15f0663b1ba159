//! Provider connections: stream limits, more connections when saturated, GOAWAY and dropped
//! connections, rejected credentials.

use std::collections::HashSet;
use std::time::Duration;

use pushfleet_fakes::{FakeOptions, Scripted};

use crate::support::*;

async fn push_all(stack: &Stack, tokens: &[String]) -> Vec<(u16, String)> {
    let pushes = tokens.iter().map(|token| async {
        let call = call_id();
        let (status, answer) = stack
            .push(&v1_body(SYLK, "apple", token, "incoming_session", &call))
            .await;
        assert_eq!(status, 200, "{answer}");
        (status, call)
    });
    futures_util::future::join_all(pushes).await
}

#[tokio::test]
async fn a_provider_allowing_one_stream_gets_a_queue_not_errors() {
    let mut fakes = FakeOptions::default().with_response_delay(Duration::from_millis(20));
    fakes.apns.max_concurrent_streams = 1;
    let stack = Stack::start_with(StackOptions {
        fakes,
        ..Default::default()
    })
    .await;
    let tokens: Vec<String> = (0..20).map(|_| apns_token()).collect();
    push_all(&stack, &tokens).await;
    assert_eq!(stack.fakes.apns.accepted_count(), 20);
    stack.stop().await;
}

#[tokio::test]
async fn saturated_connections_open_more_up_to_the_bound() {
    let stack = Stack::start_with(StackOptions {
        fakes: FakeOptions::default().with_response_delay(Duration::from_millis(300)),
        env: vec![
            (
                "PUSHFLEET__WORKER__MAX_STREAMS_PER_CONNECTION".into(),
                "4".into(),
            ),
            (
                "PUSHFLEET__WORKER__MAX_CONNECTIONS_PER_APP".into(),
                "3".into(),
            ),
        ],
        ..Default::default()
    })
    .await;
    let tokens: Vec<String> = (0..30).map(|_| apns_token()).collect();
    push_all(&stack, &tokens).await;
    let requests = stack.fakes.apns.journal().requests();
    let connections: HashSet<u64> = requests.iter().map(|r| r.connection_id).collect();
    assert_eq!(connections.len(), 3, "three connections, no more");
    // Never more than 4 requests at once on one connection: with 300 ms answers, requests on
    // the same connection less than 300 ms apart overlap.
    for connection in &connections {
        let mut times: Vec<_> = requests
            .iter()
            .filter(|r| r.connection_id == *connection)
            .map(|r| r.received_instant)
            .collect();
        times.sort();
        for window in times.windows(5) {
            assert!(
                window[4].duration_since(window[0]) >= Duration::from_millis(250),
                "more than 4 streams in flight on connection {connection}"
            );
        }
    }
    stack.stop().await;
}

#[tokio::test]
async fn after_shutdown_and_goaway_the_push_goes_out_on_a_new_connection_once() {
    let stack = Stack::start_with(StackOptions {
        fakes: FakeOptions::default().with_response_delay(Duration::from_millis(100)),
        ..Default::default()
    })
    .await;
    let shut = apns_token();
    stack
        .fakes
        .apns
        .script(&shut, Scripted::status(503).reason("Shutdown").goaway());
    let mut tokens: Vec<String> = (0..10).map(|_| apns_token()).collect();
    tokens.push(shut.clone());
    let results = push_all(&stack, &tokens).await;

    let requests = stack.fakes.apns.journal().requests_for_token(&shut);
    assert_eq!(requests.len(), 2);
    assert_ne!(requests[0].connection_id, requests[1].connection_id);
    let call = &results.last().unwrap().1;
    let rows = stack.deliveries(call, 1).await;
    assert_eq!(
        (rows[0].status.as_str(), rows[0].attempts),
        ("delivered", 2)
    );
    // The answered pushes on the old connection were not sent again.
    for token in &tokens[..10] {
        assert_eq!(
            stack.fakes.apns.journal().requests_for_token(token).len(),
            1
        );
    }
    stack.stop().await;
}

#[tokio::test]
async fn a_dropped_connection_is_retried_and_delivered() {
    let stack = Stack::start().await;
    let (token, call) = (apns_token(), call_id());
    stack.fakes.apns.script(&token, Scripted::drop_connection());
    let (status, answer) = stack
        .push(&v1_body(SYLK, "apple", &token, "incoming_session", &call))
        .await;
    assert_eq!(status, 200, "{answer}");
    let rows = stack.deliveries(&call, 1).await;
    assert_eq!(
        (rows[0].status.as_str(), rows[0].attempts),
        ("delivered", 2)
    );
    assert_eq!(stack.attempts(rows[0].id).await[0], (1, None));
    stack.stop().await;
}

#[tokio::test]
async fn a_stale_provider_token_is_replaced_once_and_the_push_delivered() {
    let stack = Stack::start().await;
    let (token, call) = (apns_token(), call_id());
    stack
        .fakes
        .apns
        .script(&token, Scripted::status(403).reason("ExpiredProviderToken"));
    let (status, answer) = stack
        .push(&v1_body(SYLK, "apple", &token, "message", &call))
        .await;
    assert_eq!(status, 200, "{answer}");
    let rows = stack.deliveries(&call, 1).await;
    assert_eq!(
        (rows[0].status.as_str(), rows[0].attempts),
        ("delivered", 1)
    );
    assert_eq!(stack.fakes.apns.distinct_jwt_count(), 2, "one new JWT");
    stack.stop().await;
}

#[tokio::test]
async fn a_refused_third_party_credential_fails_without_a_refresh_loop() {
    let stack = Stack::start().await;
    let (token, call) = (fcm_token(), call_id());
    stack.fakes.fcm.script(
        &token,
        Scripted::status(401)
            .reason("THIRD_PARTY_AUTH_ERROR")
            .times(5),
    );
    let (status, _) = stack
        .push(&v1_body(SYLK, "firebase", &token, "message", &call))
        .await;
    assert_eq!(status, 401);
    let rows = stack.deliveries(&call, 1).await;
    assert_eq!((rows[0].status.as_str(), rows[0].attempts), ("failed", 1));
    assert_eq!(
        stack.fakes.fcm.journal().requests_for_token(&token).len(),
        1
    );
    assert_eq!(stack.fakes.oauth.token_fetches(), 1);
    let metrics = stack.worker_metrics().await;
    assert!(
        metrics.contains("pushfleet_credential_failures_total"),
        "the credential alarm metric"
    );
    stack.stop().await;
}
