//! The fault suite: a steady load of pushes while the faults of a production fleet happen one
//! after the other — a worker killed with SIGKILL, the RabbitMQ cluster node in use restarted,
//! Postgres stopped and started again — with poison input and slow clients all along.
//! Afterwards every accepted push has exactly one terminal audit row, and every refused request
//! got a 4xx (bad input) or a 503 (an outage), never anything else.
//!
//! It starts its own three-node cluster (`ops/cluster`) and stops the machine's Postgres for a
//! while, so it runs as a test binary of its own, after the parallel suite. `ops/test` runs the
//! short form; `ops/faults` the long one (`PUSHFLEET_FAULT_SECS`, default 40), and writes its
//! figures into the README.

#[allow(dead_code)]
#[path = "../it/support.rs"]
mod support;

#[allow(dead_code)]
#[path = "../cluster/cluster.rs"]
mod cluster;

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use cluster::Cluster;
use support::*;

/// Figures go straight to stderr so that they show without `--nocapture`; `ops/faults` picks
/// up the lines with this prefix.
fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "fault suite: {line}");
}

/// What the load saw.
#[derive(Default)]
struct Tally {
    /// Job ids of the pushes ingest accepted (202).
    accepted: Mutex<Vec<Uuid>>,
    /// 503s while a dependency was away.
    unavailable: AtomicU64,
    /// Poison requests answered with a 4xx.
    refused: AtomicU64,
    /// Slow connections the server closed.
    slow_closed: AtomicU64,
}

/// A worker process of the fleet, on the cluster, with its own id.
fn spawn_worker(config: &Path, urls: &str, n: usize) -> tokio::process::Child {
    spawn_worker_process_with(
        config,
        &[
            ("PUSHFLEET__RABBITMQ__URLS", urls),
            ("PUSHFLEET__WORKER__ID", &format!("fault-worker-{n}")),
        ],
    )
}

/// The machine's Postgres, stopped or started with Debian's cluster tools.
fn postgres(action: &str) {
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("a Debian PostgreSQL cluster (the suite stops and starts it; needs root)")
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .max_by_key(|v| v.parse::<u32>().unwrap_or(0))
        .expect("a PostgreSQL version");
    let status = Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", action])
        .args(if action == "stop" {
            &["-m", "fast"][..]
        } else {
            &[][..]
        })
        .status()
        .expect("pg_ctlcluster runs");
    assert!(status.success(), "pg_ctlcluster {action}");
}

/// Requests no caller should send, each with the class of answer it must get.
fn poison() -> Vec<(&'static str, Vec<u8>)> {
    let body =
        |call_id: &str, token: &str| v1_body(SYLK, "apple", token, "incoming_session", call_id);
    let with = |key: &str, value: Value| {
        let mut b = body(&call_id(), &apns_token());
        b[key] = value;
        b.to_string().into_bytes()
    };
    vec![
        ("NUL in call-id", with("call-id", json!("a\u{0}b"))),
        (
            "control character in from",
            with("from", json!("alice\u{1b}[2J@example.com")),
        ),
        (
            "1 MB display name",
            with("from-display-name", json!("x".repeat(1 << 20))),
        ),
        (
            "APNs token of the wrong shape",
            with("token", json!("not-a-token")),
        ),
        ("FCM token of the wrong shape", {
            let mut b = v1_body(SYLK, "firebase", "bad token!", "message", &call_id());
            b["token"] = json!("bad token!");
            b.to_string().into_bytes()
        }),
        ("invalid UTF-8", b"{\"call-id\": \"\xff\xfe\"}".to_vec()),
        (
            "a lone surrogate escape",
            b"{\"call-id\": \"\\ud800\"}".to_vec(),
        ),
        ("not JSON", b"<xml/>".to_vec()),
    ]
}

#[tokio::test]
async fn every_accepted_push_ends_in_one_terminal_row_through_faults() {
    let secs: u64 = std::env::var("PUSHFLEET_FAULT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40)
        .max(30);
    let cluster = Arc::new(tokio::task::spawn_blocking(Cluster::start).await.unwrap());
    let stack = Arc::new(
        Stack::start_with(StackOptions {
            mode: "async",
            start_worker: false,
            env: vec![
                ("PUSHFLEET__RABBITMQ__URLS".into(), cluster.urls.clone()),
                // Slow clients are closed within a second.
                (
                    "PUSHFLEET__HTTP__HEADER_READ_TIMEOUT_MS".into(),
                    "1000".into(),
                ),
            ],
            ..Default::default()
        })
        .await,
    );
    let mut workers = vec![
        spawn_worker(&stack.config_path, &cluster.urls, 1),
        spawn_worker(&stack.config_path, &cluster.urls, 2),
    ];
    let tally = Arc::new(Tally::default());
    let running = Arc::new(AtomicBool::new(true));
    let load_started = Instant::now();
    let mut tasks = Vec::new();

    // The load: four clients, calls and messages.
    for client in 0..4 {
        let (stack, tally, running) = (stack.clone(), tally.clone(), running.clone());
        tasks.push(tokio::spawn(async move {
            let event = if client % 2 == 0 {
                "incoming_session"
            } else {
                "message"
            };
            while running.load(Ordering::Relaxed) {
                let body = v1_body(SYLK, "apple", &apns_token(), event, &call_id());
                let (status, answer) = stack.push(&body).await;
                match status {
                    202 => {
                        let id = answer["data"]["job_id"].as_str().unwrap().parse().unwrap();
                        tally.accepted.lock().unwrap().push(id);
                    }
                    503 => {
                        tally.unavailable.fetch_add(1, Ordering::Relaxed);
                    }
                    other => panic!("a good push got {other}: {answer}"),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    // Poison, all along: each gets a 4xx, never a 2xx or a 5xx.
    {
        let (stack, tally, running) = (stack.clone(), tally.clone(), running.clone());
        tasks.push(tokio::spawn(async move {
            while running.load(Ordering::Relaxed) {
                for (what, body) in poison() {
                    let (status, answer) = stack.post_raw("/push", body).await;
                    assert!((400..500).contains(&status), "{what}: {status} {answer}");
                    tally.refused.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    // Slow clients, all along: 50 connections that trickle a request head.
    {
        let (stack, tally, running) = (stack.clone(), tally.clone(), running.clone());
        tasks.push(tokio::spawn(async move {
            let addr = stack.ingest.as_ref().unwrap().addr;
            let mut slow = tokio::task::JoinSet::new();
            while running.load(Ordering::Relaxed) {
                while slow.len() < 50 {
                    let tally = tally.clone();
                    slow.spawn(async move {
                        let Ok(mut socket) = tokio::net::TcpStream::connect(addr).await else {
                            return;
                        };
                        for byte in b"POST /push HTTP/1.1\r\nHost: x\r\n".iter().cycle() {
                            if socket.write_all(&[*byte]).await.is_err() {
                                tally.slow_closed.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    });
                }
                tokio::select! {
                    _ = slow.join_next() => {}
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
            slow.shutdown().await;
        }));
    }

    // The faults, one after the other, in four equal phases of load around them.
    let phase = Duration::from_secs(secs.saturating_sub(12) / 4);
    let mut faults = Vec::new();
    tokio::time::sleep(phase).await;
    workers[0].start_kill().unwrap();
    let _ = workers[0].wait().await;
    faults.push("worker 1 killed (SIGKILL), worker 3 started 2 s later".to_string());
    tokio::time::sleep(Duration::from_secs(2)).await;
    workers.push(spawn_worker(&stack.config_path, &cluster.urls, 3));

    tokio::time::sleep(phase).await;
    let node = {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || cluster.node_of("pushfleet-ingest"))
            .await
            .unwrap()
    };
    {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || {
            cluster.ctl(node, &["stop_app"]);
            std::thread::sleep(Duration::from_secs(5));
            cluster.ctl(node, &["start_app"]);
        })
        .await
        .unwrap();
    }
    faults.push(format!("RabbitMQ node {node} (ingest's) stopped for 5 s"));

    tokio::time::sleep(phase).await;
    tokio::task::spawn_blocking(|| {
        postgres("stop");
        std::thread::sleep(Duration::from_secs(5));
        postgres("start");
    })
    .await
    .unwrap();
    faults.push("Postgres stopped for 5 s".to_string());

    tokio::time::sleep(phase).await;
    running.store(false, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("a load task failed");
    }
    let load_secs = load_started.elapsed().as_secs();

    // Every accepted push ends with exactly one terminal row.
    let accepted = tally.accepted.lock().unwrap().clone();
    let drained = Instant::now();
    let rows = terminal_rows(&stack, &accepted, Duration::from_secs(180)).await;
    let missing = accepted.iter().filter(|id| !rows.contains_key(id)).count();
    let doubled = rows.values().filter(|(count, _)| *count > 1).count();
    let mut statuses: HashMap<&str, usize> = HashMap::new();
    for (_, status) in rows.values() {
        *statuses.entry(status.as_str()).or_default() += 1;
    }
    let sends = stack.fakes.apns.journal().requests();
    let mut per_token: HashMap<&str, usize> = HashMap::new();
    for request in &sends {
        *per_token.entry(request.path.as_str()).or_default() += 1;
    }
    let sent_again = per_token.values().filter(|n| **n > 1).count();

    report(&format!(
        "{load_secs} s of load: {} pushes accepted, {} answered 503 during outages, {} poison requests refused with a 4xx, {} slow connections closed by the server",
        accepted.len(),
        tally.unavailable.load(Ordering::Relaxed),
        tally.refused.load(Ordering::Relaxed),
        tally.slow_closed.load(Ordering::Relaxed),
    ));
    report(&format!("faults: {}", faults.join("; ")));
    report(&format!(
        "audit: {} terminal rows for {} accepted pushes, {missing} missing, {doubled} doubled ({}); all written {:.1} s after the load stopped",
        rows.len(),
        accepted.len(),
        statuses
            .iter()
            .map(|(status, n)| format!("{n} {status}"))
            .collect::<Vec<_>>()
            .join(", "),
        drained.elapsed().as_secs_f64(),
    ));
    report(&format!(
        "{} sends to the provider, {sent_again} pushes sent more than once (at-least-once across the killed worker and the lost node)",
        sends.len()
    ));

    for mut worker in workers {
        let _ = worker.start_kill();
        let _ = worker.wait().await;
    }
    assert!(accepted.len() > 100, "the load ran: {}", accepted.len());
    assert_eq!(missing, 0, "accepted pushes without a terminal row");
    assert_eq!(doubled, 0, "pushes with more than one terminal row");
    assert!(
        tally.slow_closed.load(Ordering::Relaxed) > 0,
        "slow connections were closed by the server"
    );
    Arc::try_unwrap(stack)
        .ok()
        .expect("the load is over")
        .stop()
        .await;
}

/// Terminal rows per job id: (how many, the status), waiting up to `within` for all of them.
async fn terminal_rows(
    stack: &Stack,
    ids: &[Uuid],
    within: Duration,
) -> HashMap<Uuid, (i64, String)> {
    let deadline = Instant::now() + within;
    loop {
        // Postgres came back a moment ago: the pool's first connections may still fail.
        let rows = match stack.pool.get().await {
            Ok(client) => client
                .query(
                    "SELECT id, count(*), min(status) FROM deliveries WHERE id = ANY($1) GROUP BY id",
                    &[&ids],
                )
                .await
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        let found: HashMap<Uuid, (i64, String)> = rows
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        if found.len() >= ids.len() || Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
