//! With several broker URLs (`[rabbitmq] urls`), ingest and the worker move to another node when
//! theirs goes away. Two TCP proxies in front of the machine's broker stand for two nodes; each
//! is cut in turn, so that whichever one the services use, they lose it at least once. The real
//! three-node cluster test is `tests/cluster/`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::support::*;

#[tokio::test]
async fn ingest_and_worker_move_to_another_node_when_theirs_goes_away() {
    let nodes = [
        TcpProxy::start("127.0.0.1:5672".into()).await,
        TcpProxy::start("127.0.0.1:5672".into()).await,
    ];
    let base = rabbitmq_url();
    let vhost = base.rsplit('/').next().unwrap().to_string();
    let urls: Vec<String> = nodes
        .iter()
        .map(|node| format!("\"amqp://guest:guest@127.0.0.1:{}/{vhost}\"", node.port))
        .collect();
    let stack = Stack::start_with(StackOptions {
        mode: "async",
        env: vec![(
            "PUSHFLEET__RABBITMQ__URLS".into(),
            format!("[{}]", urls.join(", ")),
        )],
        ..Default::default()
    })
    .await;
    assert_eq!(stack.settings.rabbitmq.nodes().len(), 2);

    let mut accepted = Vec::new();
    let mut refused = 0;
    assert!(
        push(&stack, &mut accepted).await,
        "pushes flow before any cut"
    );

    for node in &nodes {
        node.cut();
        // Either this node carried no connection and nothing happens, or ingest answers 503
        // until it has reconnected through the other one.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut in_a_row = 0;
        while in_a_row < 10 {
            if push(&stack, &mut accepted).await {
                in_a_row += 1;
            } else {
                refused += 1;
                in_a_row = 0;
                assert!(
                    Instant::now() < deadline,
                    "ingest did not move to the other node"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        node.restore();
    }

    // The worker moved too: every accepted push is delivered, once.
    let calls = accepted;
    let deadline = Instant::now() + Duration::from_secs(30);
    let rows = loop {
        let rows = stack
            .query(
                "SELECT call_id, status FROM deliveries WHERE call_id = ANY($1)",
                &[&calls],
            )
            .await;
        if rows.len() >= calls.len() || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut per_call: HashMap<String, Vec<String>> = HashMap::new();
    for row in &rows {
        per_call
            .entry(row.get(0))
            .or_default()
            .push(row.get::<_, String>(1));
    }
    for call in &calls {
        assert_eq!(
            per_call.get(call).map(Vec::as_slice),
            Some(&["delivered".to_string()][..]),
            "{call} (of {} accepted, {refused} refused)",
            calls.len()
        );
    }
    stack.stop().await;
}

/// One push; true when ingest accepted it (its call id is kept), false for a 503.
async fn push(stack: &Stack, accepted: &mut Vec<String>) -> bool {
    let call = call_id();
    let (status, answer) = stack
        .push(&v1_body(SYLK, "apple", &apns_token(), "message", &call))
        .await;
    match status {
        202 => {
            accepted.push(call);
            true
        }
        503 => false,
        other => panic!("unexpected answer {other}: {answer}"),
    }
}
