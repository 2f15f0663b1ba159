//! A real RabbitMQ restart in the middle of a run loses no accepted push. It stops the whole
//! broker, so it runs as a test binary of its own, after the parallel suite.

#[allow(dead_code)]
#[path = "../it/support.rs"]
mod support;

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use uuid::Uuid;

use support::*;

fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("rabbitmqctl runs (the test needs root on the broker's machine)");
    assert!(status.success(), "rabbitmqctl {args:?}");
}

#[tokio::test]
async fn a_broker_restart_during_a_run_loses_no_accepted_push() {
    let stack = Stack::start_with(StackOptions {
        mode: "async",
        ..Default::default()
    })
    .await;

    // Pushes keep coming while the broker goes down and up again.
    let sender = async {
        let mut accepted: Vec<(Uuid, String)> = Vec::new();
        let mut refused = 0;
        let until = Instant::now() + Duration::from_secs(12);
        while Instant::now() < until {
            let call = call_id();
            let (status, answer) = stack
                .push(&v1_body(SYLK, "apple", &apns_token(), "message", &call))
                .await;
            match status {
                202 => accepted.push((
                    answer["data"]["job_id"].as_str().unwrap().parse().unwrap(),
                    call,
                )),
                503 => refused += 1,
                other => panic!("unexpected answer {other}: {answer}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (accepted, refused)
    };
    let restart = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        tokio::task::spawn_blocking(|| {
            rabbitmqctl(&["stop_app"]);
            std::thread::sleep(Duration::from_secs(1));
            rabbitmqctl(&["start_app"]);
            rabbitmqctl(&["await_startup"]);
        })
        .await
        .unwrap();
    };
    let ((accepted, refused), ()) = tokio::join!(sender, restart);
    assert!(refused > 0, "the broker was really away");
    assert!(
        accepted.len() > 100,
        "pushes were accepted before and after"
    );

    let ids: Vec<Uuid> = accepted.iter().map(|(id, _)| *id).collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut done = HashSet::new();
    while done.len() < ids.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        done = stack
            .query(
                "SELECT id FROM deliveries WHERE id = ANY($1) AND status = 'delivered'",
                &[&ids],
            )
            .await
            .iter()
            .map(|r| r.get::<_, Uuid>(0))
            .collect();
    }
    let missing: Vec<_> = ids.iter().filter(|id| !done.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} accepted pushes lost: {missing:?}",
        missing.len(),
        ids.len()
    );
    stack.stop().await;
}
