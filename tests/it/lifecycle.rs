//! Nothing lost when processes die or dependencies go away: a worker killed mid-run, a worker
//! asked to stop, Postgres unreachable for a while.

use std::time::{Duration, Instant};

use pushfleet_fakes::FakeOptions;
use uuid::Uuid;

use crate::support::*;

/// Accepts `n` pushes in async mode; returns their job ids and call-ids.
pub async fn accept_pushes(stack: &Stack, n: usize) -> Vec<(Uuid, String)> {
    let mut accepted = Vec::with_capacity(n);
    for chunk in 0..n.div_ceil(20) {
        let pushes = (0..20.min(n - chunk * 20)).map(|_| async {
            let call = call_id();
            let (status, answer) = stack
                .push(&v1_body(SYLK, "apple", &apns_token(), "message", &call))
                .await;
            assert_eq!(status, 202, "{answer}");
            let id = answer["data"]["job_id"].as_str().unwrap().parse().unwrap();
            (id, call)
        });
        accepted.extend(futures_util::future::join_all(pushes).await);
    }
    accepted
}

/// Waits until every job has its terminal row; returns the number of rows per job.
pub async fn wait_for_terminal_rows(
    stack: &Stack,
    jobs: &[(Uuid, String)],
    within: Duration,
) -> Vec<(Uuid, i64, String)> {
    let ids: Vec<Uuid> = jobs.iter().map(|(id, _)| *id).collect();
    let deadline = Instant::now() + within;
    loop {
        let rows: Vec<(Uuid, i64, String)> = stack
            .query(
                "SELECT id, count(*), min(status) FROM deliveries WHERE id = ANY($1) GROUP BY id",
                &[&ids],
            )
            .await
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        if rows.len() == ids.len() || Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn assert_each_delivered_once(jobs: &[(Uuid, String)], rows: &[(Uuid, i64, String)]) {
    assert_eq!(rows.len(), jobs.len(), "jobs without a terminal row");
    for (id, count, status) in rows {
        assert_eq!(*count, 1, "{id}: {count} rows");
        assert_eq!(status, "delivered", "{id}");
    }
}

fn slow_provider() -> FakeOptions {
    FakeOptions::default().with_response_delay(Duration::from_millis(100))
}

#[tokio::test]
async fn a_worker_killed_mid_run_leaves_every_job_in_exactly_one_terminal_state() {
    let mut stack = Stack::start_with(StackOptions {
        mode: "async",
        start_worker: false,
        fakes: slow_provider(),
        ..Default::default()
    })
    .await;
    let jobs = accept_pushes(&stack, 300).await;
    let mut worker = spawn_worker_process(&stack.config_path);
    // Kill it once it is busy: pushes in flight, outcomes published, acks pending.
    let busy = Instant::now() + Duration::from_secs(30);
    while stack.fakes.apns.accepted_count() < 60 && Instant::now() < busy {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.start_kill().unwrap();
    let _ = worker.wait().await;
    let sent_before = stack.fakes.apns.accepted_count();
    assert!(
        sent_before > 0 && sent_before < 300,
        "killed mid-run ({sent_before})"
    );

    // Another worker takes over what the dead one held.
    stack.start_worker().await;
    let rows = wait_for_terminal_rows(&stack, &jobs, Duration::from_secs(60)).await;
    assert_each_delivered_once(&jobs, &rows);
    stack.stop().await;
}

#[tokio::test]
async fn sigterm_finishes_the_jobs_in_hand_and_exits_zero() {
    let mut stack = Stack::start_with(StackOptions {
        mode: "async",
        start_worker: false,
        fakes: FakeOptions::default().with_response_delay(Duration::from_millis(500)),
        ..Default::default()
    })
    .await;
    let jobs = accept_pushes(&stack, 20).await;
    let mut worker = spawn_worker_process(&stack.config_path);
    let busy = Instant::now() + Duration::from_secs(30);
    while stack.fakes.apns.request_count() == 0 && Instant::now() < busy {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pid = worker.id().expect("running").to_string();
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(signalled.success());
    let exit = tokio::time::timeout(Duration::from_secs(20), worker.wait())
        .await
        .expect("worker stops within 20 s")
        .unwrap();
    assert_eq!(exit.code(), Some(0), "clean exit");
    // Jobs it had not started went back to the queue; a new worker finishes them.
    stack.start_worker().await;
    let rows = wait_for_terminal_rows(&stack, &jobs, Duration::from_secs(60)).await;
    assert_each_delivered_once(&jobs, &rows);
    // The jobs it finished were acked before it exited: none was sent a second time.
    assert_eq!(stack.fakes.apns.request_count(), jobs.len() as u64);
    stack.stop().await;
}

/// A provider that never answers in time cannot hold a stopping worker past
/// `[worker] shutdown_timeout_ms`: the jobs it had in hand go back to the queue, and the next
/// worker delivers each of them once.
#[tokio::test]
async fn a_stopping_worker_gives_up_its_jobs_at_the_shutdown_deadline() {
    let mut stack = Stack::start_with(StackOptions {
        mode: "async",
        start_worker: false,
        fakes: FakeOptions::default().with_response_delay(Duration::from_secs(4)),
        env: vec![
            (
                "PUSHFLEET__WORKER__SHUTDOWN_TIMEOUT_MS".into(),
                "500".into(),
            ),
            (
                "PUSHFLEET__WORKER__REQUEST_TIMEOUT_MS".into(),
                "8000".into(),
            ),
        ],
        ..Default::default()
    })
    .await;
    let jobs = accept_pushes(&stack, 5).await;
    stack.start_worker().await;
    let busy = Instant::now() + Duration::from_secs(30);
    while stack.fakes.apns.request_count() < 5 && Instant::now() < busy {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stopping = Instant::now();
    stack.worker.take().unwrap().stop().await;
    let took = stopping.elapsed();
    assert!(took < Duration::from_millis(3000), "stop took {took:?}");
    stack.start_worker().await;
    let rows = wait_for_terminal_rows(&stack, &jobs, Duration::from_secs(60)).await;
    assert_each_delivered_once(&jobs, &rows);
    stack.stop().await;
}

#[tokio::test]
async fn with_postgres_away_deliveries_go_on_and_the_audit_catches_up() {
    let proxy = TcpProxy::start("127.0.0.1:5432".into()).await;
    let database = postgres_url().rsplit('/').next().unwrap().to_string();
    let stack = Stack::start_with(StackOptions {
        postgres_url: Some(format!(
            "postgres://postgres@127.0.0.1:{}/{database}",
            proxy.port
        )),
        ..Default::default()
    })
    .await;
    proxy.cut();
    let mut calls = Vec::new();
    for _ in 0..30 {
        let call = call_id();
        let (status, answer) = stack
            .push(&v1_body(
                SYLK,
                "apple",
                &apns_token(),
                "incoming_session",
                &call,
            ))
            .await;
        assert_eq!(
            status, 200,
            "delivered while the database is away: {answer}"
        );
        calls.push(call);
    }
    assert_eq!(stack.fakes.apns.accepted_count(), 30);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let written = stack
        .query(
            "SELECT count(*) FROM deliveries WHERE call_id = ANY($1)",
            &[&calls],
        )
        .await[0]
        .get::<_, i64>(0);
    assert_eq!(written, 0, "nothing can be written while it is away");

    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut written = 0;
    while written < 30 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        written = stack
            .query(
                "SELECT count(*) FROM deliveries WHERE call_id = ANY($1) AND status = 'delivered'",
                &[&calls],
            )
            .await[0]
            .get::<_, i64>(0);
    }
    assert_eq!(written, 30, "every row arrives once the database is back");
    stack.stop().await;
}
