//! Remote result logging: an app's log server, run here, receives every terminal outcome of its
//! app exactly once while all goes well, and at least once across a worker restart while it was
//! away; a log server that hangs does not slow pushes, and fills only its own bounded buffer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use uuid::Uuid;

use crate::support::*;

/// What the log server saw: each record it accepted, and the Authorization headers.
#[derive(Default)]
struct Received {
    records: Vec<Value>,
    authorizations: Vec<String>,
}

#[derive(Clone)]
struct LogServer {
    received: Arc<Mutex<Received>>,
    /// While false the server answers 503.
    up: Arc<AtomicBool>,
}

impl LogServer {
    async fn start() -> (LogServer, String) {
        let server = LogServer {
            received: Arc::default(),
            up: Arc::new(AtomicBool::new(true)),
        };
        let app = Router::new()
            .route("/log", post(take))
            .with_state(server.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/log", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (server, url)
    }

    /// How many times each job id was received.
    fn jobs(&self) -> HashMap<String, usize> {
        let mut jobs = HashMap::new();
        for record in &self.received.lock().unwrap().records {
            *jobs
                .entry(record["job_id"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
        jobs
    }

    async fn wait_for(&self, jobs: usize) -> HashMap<String, usize> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let received = self.jobs();
            if received.len() >= jobs || Instant::now() > deadline {
                return received;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn take(
    State(server): State<LogServer>,
    headers: HeaderMap,
    Json(batch): Json<Vec<Value>>,
) -> (StatusCode, Json<Value>) {
    if !server.up.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({})));
    }
    assert!(batch.len() <= pushfleet_worker::remote_log::MAX_OUTCOMES_PER_REQUEST);
    let mut received = server.received.lock().unwrap();
    if let Some(auth) = headers.get("authorization") {
        received
            .authorizations
            .push(auth.to_str().unwrap().to_string());
    }
    received.records.extend(batch);
    (StatusCode::OK, Json(json!({"log_id": Uuid::new_v4()})))
}

/// The Sylk Apple app (`[[apps]]` #0) logs to `url`.
fn logging_to(url: &str, extra: &[(&str, &str)]) -> StackOptions {
    let mut env = vec![
        ("PUSHFLEET__APPS__0__LOG_URL".to_string(), url.to_string()),
        (
            "PUSHFLEET__APPS__0__LOG_AUTH".to_string(),
            "Bearer log-secret".to_string(),
        ),
        (
            "PUSHFLEET__APPS__0__LOG_KEY".to_string(),
            "log_id".to_string(),
        ),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    StackOptions {
        mode: "async",
        env,
        ..Default::default()
    }
}

/// Sends `count` pushes of `app`/`platform`; returns their call-id.
async fn push_many(stack: &Stack, platform: &str, count: usize) -> String {
    let call = call_id();
    for _ in 0..count {
        let token = if platform == "apple" {
            apns_token()
        } else {
            fcm_token()
        };
        let (status, answer) = stack
            .push(&v1_body(SYLK, platform, &token, "message", &call))
            .await;
        assert!(status == 200 || status == 202, "{status}: {answer}");
    }
    call
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(name) && line.contains(&format!("app=\"{SYLK}\"")))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn every_outcome_of_the_app_reaches_its_log_server_once() {
    let (server, url) = LogServer::start().await;
    let mut stack = Stack::start_with(logging_to(&url, &[])).await;
    let apple = push_many(&stack, "apple", 30).await;
    let firebase = push_many(&stack, "firebase", 10).await;
    stack.deliveries(&apple, 30).await;
    stack.deliveries(&firebase, 10).await;
    let jobs = server.wait_for(30).await;
    // A moment more: nothing comes twice, nothing of the other app comes at all.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let jobs_after = server.jobs();
    assert_eq!(jobs, jobs_after);
    let audited: HashMap<String, usize> = stack
        .deliveries(&apple, 30)
        .await
        .iter()
        .map(|row| (row.id.to_string(), 1))
        .collect();
    assert_eq!(jobs_after, audited, "exactly the app's outcomes, once each");
    {
        let received = server.received.lock().unwrap();
        assert!(received
            .authorizations
            .iter()
            .all(|a| a == "Bearer log-secret"));
        let record = &received.records[0];
        assert_eq!(record["app_id"], SYLK);
        assert_eq!(record["platform"], "apple");
        assert_eq!(record["call_id"], apple.as_str());
        assert_eq!(record["status"], "delivered");
        assert_eq!(record["token_fingerprint"].as_str().unwrap().len(), 16);
        assert!(record.get("token").is_none());
    }
    // Other tests of this process count under the same app: at least this test's.
    assert!(
        metric(
            &stack.worker_metrics().await,
            "pushfleet_remote_log_posted_total"
        ) >= 30.0
    );

    // The log server goes away; the worker restarts; the server comes back: nothing is lost.
    server.up.store(false, Ordering::SeqCst);
    let later = push_many(&stack, "apple", 10).await;
    stack.deliveries(&later, 10).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(
        &stack.worker_metrics().await,
        "pushfleet_remote_log_failed_total",
    ) == 0.0
    {
        assert!(Instant::now() < deadline, "no failed request counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.worker.take().unwrap().stop().await;
    server.up.store(true, Ordering::SeqCst);
    stack.start_worker().await;
    let jobs = server.wait_for(40).await;
    for row in stack.deliveries(&later, 10).await {
        assert!(
            jobs.get(&row.id.to_string()).copied().unwrap_or(0) >= 1,
            "{} not logged after the restart",
            row.id
        );
    }
    stack.stop().await;
}

#[tokio::test]
async fn a_push_that_expired_in_its_queue_is_logged_too() {
    let (server, url) = LogServer::start().await;
    let mut options = logging_to(&url, &[]);
    options.start_worker = false;
    options.extra_config = "\n[events.message]\nttl_secs = 1\n".into();
    let mut stack = Stack::start_with(options).await;
    let call = push_many(&stack, "apple", 1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stack.start_worker().await;
    let rows = stack.deliveries(&call, 1).await;
    assert_eq!(rows[0].status, "expired");
    let jobs = server.wait_for(1).await;
    assert_eq!(jobs.get(&rows[0].id.to_string()), Some(&1), "{jobs:?}");
    let record = server.received.lock().unwrap().records[0].clone();
    assert_eq!(
        (record["status"].as_str(), record["attempt_count"].as_u64()),
        (Some("expired"), Some(0))
    );
    stack.stop().await;
}

/// Sync pushes one after the other; the slowest and the mean answer time.
async fn timed_pushes(stack: &Stack, count: usize) -> (Duration, Duration) {
    let call = call_id();
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    for _ in 0..count {
        let at = Instant::now();
        let (status, answer) = stack
            .push(&v1_body(SYLK, "apple", &apns_token(), "message", &call))
            .await;
        assert_eq!(status, 200, "{answer}");
        slowest = slowest.max(at.elapsed());
    }
    (slowest, started.elapsed() / count as u32)
}

#[tokio::test]
async fn a_log_server_that_hangs_does_not_slow_pushes() {
    // Accepts connections and never answers.
    let hanging = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/log", hanging.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((connection, _)) = hanging.accept().await {
            connections.push(connection);
        }
    });
    let baseline = Stack::start().await;
    let (_, baseline_mean) = timed_pushes(&baseline, 30).await;
    baseline.stop().await;

    let mut options = logging_to(
        &url,
        &[
            ("PUSHFLEET__APPS__0__LOG_TIMEOUT_MS", "300"),
            ("PUSHFLEET__APPS__0__LOG_BUFFER", "5"),
        ],
    );
    options.mode = "sync";
    let stack = Stack::start_with(options).await;
    let (slowest, mean) = timed_pushes(&stack, 30).await;
    assert!(
        mean < baseline_mean * 3 + Duration::from_millis(50),
        "mean push {mean:?} with the log server down, {baseline_mean:?} without"
    );
    assert!(
        slowest < Duration::from_millis(1500),
        "slowest push {slowest:?}"
    );
    // The buffer of 5 kept the newest; the rest were dropped and counted.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = stack.worker_metrics().await;
        let dropped = metric(&text, "pushfleet_remote_log_dropped_total");
        let failed = metric(&text, "pushfleet_remote_log_failed_total");
        if dropped >= 25.0 && failed >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dropped {dropped}, failed {failed}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.stop().await;
    held.abort();
}
