//! While RabbitMQ is unreachable, ingest answers 503 at once instead of hanging, and recovers
//! by itself. The outage is made with a TCP proxy in front of the broker that the test cuts.

use std::time::{Duration, Instant};

use crate::support::*;

#[tokio::test]
async fn broker_outage_gives_503_quickly_and_ingest_recovers() {
    let proxy = TcpProxy::start("127.0.0.1:5672".into()).await;
    let base = rabbitmq_url();
    let vhost = base.rsplit('/').next().unwrap().to_string();
    let url = format!("amqp://guest:guest@127.0.0.1:{}/{vhost}", proxy.port);
    let stack = Stack::start_with(StackOptions {
        rabbitmq_url: Some(url),
        ..Default::default()
    })
    .await;

    let body = || v1_body(SYLK, "apple", &apns_token(), "incoming_session", &call_id());
    let (status, answer) = stack.push(&body()).await;
    assert_eq!(status, 200, "{answer}");

    proxy.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        let started = Instant::now();
        let (status, answer) = stack.push(&body()).await;
        assert_eq!(status, 503, "{answer}");
        assert_eq!(answer["code"], 503);
        assert!(
            answer["description"]
                .as_str()
                .unwrap()
                .contains("unavailable"),
            "{answer}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "answered in {:?}",
            started.elapsed()
        );
    }
    let ready = stack.http.get(stack.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503);

    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, answer) = stack.push(&body()).await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ingest did not recover: {status} {answer}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stack.stop().await;
}

/// A lane holds at most `rabbitmq.lane_max_length` jobs: beyond it the broker refuses the
/// publish, and the caller gets 503 instead of the broker raising a memory alarm for everyone.
#[tokio::test]
async fn a_full_lane_refuses_pushes_with_503() {
    let stack = Stack::start_with(StackOptions {
        mode: "async",
        start_worker: false,
        env: vec![("PUSHFLEET__RABBITMQ__LANE_MAX_LENGTH".into(), "5".into())],
        ..Default::default()
    })
    .await;
    let body = || v1_body(SYLK, "apple", &apns_token(), "incoming_session", &call_id());
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(stack.push(&body()).await.0);
    }
    // A quorum queue enforces its length a message late: the 6th may still get in.
    assert!(statuses[..5].iter().all(|s| *s == 202), "{statuses:?}");
    assert!(
        statuses[5..].iter().filter(|s| **s == 202).count() <= 1,
        "{statuses:?}"
    );
    let (status, answer) = stack.push(&body()).await;
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer["description"].as_str().unwrap().contains("refused"),
        "{answer}"
    );
    // Other lanes are not affected.
    let (status, answer) = stack
        .push(&v1_body(
            SYLK,
            "apple",
            &apns_token(),
            "message",
            &call_id(),
        ))
        .await;
    assert_eq!(status, 202, "{answer}");
    stack.stop().await;
}
