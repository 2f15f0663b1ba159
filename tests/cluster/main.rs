//! No single broker node can wedge pushfleet: ingest and a worker configured with the three
//! nodes of a RabbitMQ cluster keep accepting and delivering pushes while the node they use is
//! stopped, and every accepted push ends with exactly one audit row. The test starts its own
//! cluster with `ops/cluster` (and stops it, also when it fails), so it runs as a test binary of
//! its own.

#[allow(dead_code)]
#[path = "../it/support.rs"]
mod support;

#[allow(dead_code)]
mod cluster;

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::Cluster;
use support::*;

/// The connection names the services give the broker (`[worker] id` of the test stack).
/// The worker connection that consumes and acks jobs (see `worker::links`).
const WORKER: &str = "it-worker-consume";
const INGEST: &str = "pushfleet-ingest";

/// Figures go straight to stderr so that they show without `--nocapture`.
fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "cluster failover: {line}");
}

/// What one push got: when it was answered, and its status.
struct Sent {
    call_id: String,
    at: Instant,
    status: u16,
}

/// When ingest (its `/ready`) or the worker (its connection gauge) was seen disconnected: the
/// first and the last time.
#[derive(Default, Clone, Copy)]
struct Outage {
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Outage {
    fn saw(&mut self, at: Instant) {
        self.first.get_or_insert(at);
        self.last = Some(at);
    }

    fn span(self) -> String {
        match (self.first, self.last) {
            (Some(first), Some(last)) => format!("{} ms", (last - first).as_millis() + 10),
            _ => "under 10 ms".into(),
        }
    }
}

/// The audit rows of `calls`: (call id, status, accept-to-audit ms), waiting up to `wait` for
/// one row per call.
async fn audit_rows(stack: &Stack, calls: &[String], wait: Duration) -> Vec<(String, String, i64)> {
    let deadline = Instant::now() + wait;
    loop {
        let rows = stack
            .query(
                "SELECT call_id, status, latency_ms FROM deliveries WHERE call_id = ANY($1)",
                &[&calls],
            )
            .await;
        if rows.len() >= calls.len() || Instant::now() > deadline {
            return rows
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn pushes_flow_while_the_node_in_use_is_stopped() {
    // The services' warnings, shown when the test fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    // Async by default: see the README's "Scaling out" for sync mode during a failover.
    let mode: &'static str = match std::env::var("PUSHFLEET_TEST_CLUSTER_MODE").as_deref() {
        Ok("sync") => "sync",
        _ => "async",
    };
    // How long the node stays down once the services have left it; `ops/test` keeps it short.
    let down_secs: u64 = std::env::var("PUSHFLEET_TEST_CLUSTER_DOWN_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let stack = Stack::start_with(StackOptions {
        mode,
        sync_timeout_ms: 2000,
        env: vec![("PUSHFLEET__RABBITMQ__URLS".into(), cluster.urls.clone())],
        ..Default::default()
    })
    .await;
    let cluster = Arc::new(cluster);
    let prefetch = i64::from(stack.settings.rabbitmq.prefetch);

    // The queues were declared on the whole cluster: a replica on every node, for the jobs, the
    // outcomes waiting for the audit and the ledger.
    let queues = cluster.ctl(1, &["list_queues", "--silent", "name", "members"]);
    for name in ["calls", "messages", "audit", "ledger"] {
        let queue = format!("{}.{name}", stack.settings.rabbitmq.namespace);
        let members = queues
            .lines()
            .find(|line| line.starts_with(&format!("{queue}\t")))
            .unwrap_or_else(|| panic!("{queue} missing: {queues}"));
        assert_eq!(members.matches('@').count(), 3, "{members}");
    }

    let before = cluster.connections(1);
    let node = *before
        .get(WORKER)
        .unwrap_or_else(|| panic!("no worker connection: {before:?}"));
    assert_eq!(
        before.get(INGEST),
        Some(&node),
        "the connections of one process share a node: {before:?}"
    );
    let other = if node == 1 { 2 } else { 1 };
    report(&format!(
        "{mode} mode; ingest and worker connected to node {node} (port {})",
        cluster.ports[node - 1]
    ));

    // Pushes from four clients, calls and messages, all along.
    let sending = Arc::new(AtomicBool::new(true));
    let sent = Arc::new(Mutex::new(Vec::<Sent>::new()));
    let stack = Arc::new(stack);
    let mut senders = Vec::new();
    for client in 0..4 {
        let (stack, sending, sent) = (stack.clone(), sending.clone(), sent.clone());
        senders.push(tokio::spawn(async move {
            let event = if client % 2 == 0 {
                "incoming_session"
            } else {
                "message"
            };
            while sending.load(Ordering::Relaxed) {
                let call_id = call_id();
                let body = v1_body(SYLK, "apple", &apns_token(), event, &call_id);
                let (status, answer) = stack.push(&body).await;
                assert!(
                    matches!(status, 200 | 202 | 503),
                    "unexpected answer {status}: {answer}"
                );
                sent.lock().unwrap().push(Sent {
                    call_id,
                    at: Instant::now(),
                    status,
                });
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    let accepted_since = |since: Instant| -> Vec<String> {
        sent.lock()
            .unwrap()
            .iter()
            .filter(|s| s.status != 503 && s.at > since)
            .map(|s| s.call_id.clone())
            .collect()
    };

    // The services' view of the broker, every 10 ms.
    let watching = Arc::new(AtomicBool::new(true));
    let outages = Arc::new(Mutex::new((Outage::default(), Outage::default())));
    let watcher = {
        let (stack, watching, outages) = (stack.clone(), watching.clone(), outages.clone());
        let metrics = format!(
            "http://{}/metrics",
            stack.worker.as_ref().unwrap().http_addr
        );
        tokio::spawn(async move {
            while watching.load(Ordering::Relaxed) {
                let ready = stack.http.get(stack.url("/ready")).send().await;
                let ingest_up = ready.is_ok_and(|r| r.status() == 200);
                let text = match stack.http.get(&metrics).send().await {
                    Ok(response) => response.text().await.unwrap_or_default(),
                    Err(_) => String::new(),
                };
                let worker_up = text
                    .lines()
                    .any(|l| l == "pushfleet_broker_connected{service=\"worker\"} 1");
                let now = Instant::now();
                {
                    let mut outages = outages.lock().unwrap();
                    if !ingest_up {
                        outages.0.saw(now);
                    }
                    if !worker_up {
                        outages.1.saw(now);
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    tokio::time::sleep(Duration::from_secs(3)).await;
    let stop_at = Instant::now();
    {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || cluster.ctl(node, &["stop_app"]))
            .await
            .unwrap();
    }
    let stopped_in = stop_at.elapsed();

    // Both move to one of the two other nodes.
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let cluster = cluster.clone();
        let now = tokio::task::spawn_blocking(move || cluster.connections(other))
            .await
            .unwrap();
        let moved = |name| now.get(name).is_some_and(|&n| n != node);
        if moved(WORKER) && moved(INGEST) {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "the services did not move off node {node}: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let moved_at = Instant::now();

    // With the node still down, pushes keep being accepted and are delivered.
    tokio::time::sleep(Duration::from_secs(down_secs)).await;
    let accepted_while_down = accepted_since(moved_at);
    let rows = audit_rows(&stack, &accepted_while_down, Duration::from_secs(10)).await;
    let delivered_while_down = rows.iter().filter(|(_, s, _)| s == "delivered").count();
    let restart_at = Instant::now();
    let (ingest, worker) = *outages.lock().unwrap();

    {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || {
            cluster.ctl(node, &["start_app"]);
            cluster.ctl(other, &["await_online_nodes", "3"]);
        })
        .await
        .unwrap();
    }
    let restarted_in = restart_at.elapsed();
    let back_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    sending.store(false, Ordering::Relaxed);
    for sender in senders {
        sender.await.unwrap();
    }
    watching.store(false, Ordering::Relaxed);
    watcher.await.unwrap();

    let sent = std::mem::take(&mut *sent.lock().unwrap());
    let accepted: Vec<&Sent> = sent.iter().filter(|s| s.status != 503).collect();
    let refused: Vec<&Sent> = sent.iter().filter(|s| s.status == 503).collect();
    let refusal_window = match (refused.first(), refused.last()) {
        (Some(first), Some(last)) => last.at - first.at,
        _ => Duration::ZERO,
    };
    let back = match [ingest, worker].iter().filter_map(|o| o.last).max() {
        Some(last) => format!(
            "both connected again {} ms after the stop began",
            (last.saturating_duration_since(stop_at) + Duration::from_millis(10)).as_millis()
        ),
        None => "both connected again within one 10 ms poll".into(),
    };

    // Every accepted push ends with exactly one terminal audit row.
    let calls: Vec<String> = accepted.iter().map(|s| s.call_id.clone()).collect();
    let rows = audit_rows(&stack, &calls, Duration::from_secs(60)).await;
    let sends: i64 = stack
        .query(
            "SELECT count(*) FROM delivery_attempts a JOIN deliveries d ON d.id = a.job_id \
             WHERE d.call_id = ANY($1)",
            &[&calls],
        )
        .await[0]
        .get(0);
    let mut per_call: HashMap<&str, Vec<&str>> = HashMap::new();
    for (call, status, _) in &rows {
        per_call.entry(call).or_default().push(status);
    }
    let slowest = rows.iter().map(|(_, _, ms)| *ms).max().unwrap_or(0);
    let missing = calls
        .iter()
        .filter(|c| !per_call.contains_key(c.as_str()))
        .count();
    let doubled = per_call.values().filter(|rows| rows.len() > 1).count();
    let undelivered: Vec<_> = per_call
        .iter()
        .filter(|(_, rows)| rows.iter().any(|s| *s != "delivered"))
        .collect();
    let resent = sends - calls.len() as i64;

    let ms = |d: Duration| d.as_millis();
    report(&format!(
        "{} pushes accepted ({} answered 200, {} 202); {} answered 503 over {} ms",
        accepted.len(),
        accepted.iter().filter(|s| s.status == 200).count(),
        accepted.iter().filter(|s| s.status == 202).count(),
        refused.len(),
        ms(refusal_window),
    ));
    report(&format!(
        "stop_app of node {node} took {} ms; ingest disconnected {}, worker disconnected {}; \
         {back}, ingest on node {}, worker on node {}",
        ms(stopped_in),
        ingest.span(),
        worker.span(),
        after[INGEST],
        after[WORKER],
    ));
    report(&format!(
        "while node {node} was down: {} pushes accepted, {delivered_while_down} of them \
         delivered before it came back (in {} ms)",
        accepted_while_down.len(),
        ms(restarted_in),
    ));
    report(&format!(
        "audit: {} rows for {} accepted pushes, {missing} missing, {doubled} doubled; {sends} \
         sends to the provider ({resent} sent again); slowest accept-to-audit {slowest} ms",
        rows.len(),
        calls.len(),
    ));

    assert!(
        accepted.iter().any(|s| s.at < stop_at),
        "pushes flowed before the stop"
    );
    assert!(
        refusal_window < Duration::from_secs(5),
        "503s for {refusal_window:?}"
    );
    assert!(
        !accepted_while_down.is_empty() && delivered_while_down == accepted_while_down.len(),
        "pushes accepted while node {node} was down were not all delivered while it was: \
         {delivered_while_down} of {}",
        accepted_while_down.len()
    );
    // A failover is one reconnect, not a string of them: each was seen disconnected for a short
    // while at most (`outages` was read before the node came back).
    for (name, outage) in [("ingest", ingest), ("worker", worker)] {
        if let (Some(first), Some(last)) = (outage.first, outage.last) {
            assert!(
                last - first < Duration::from_secs(5),
                "{name} disconnected for {:?} while node {node} was down",
                last - first
            );
        }
    }
    assert!(
        accepted.iter().any(|s| s.at > back_at),
        "pushes flowed after the node came back"
    );
    assert_eq!(missing, 0, "accepted pushes without an audit row");
    assert_eq!(doubled, 0, "accepted pushes with more than one audit row");
    assert!(undelivered.is_empty(), "not delivered: {undelivered:?}");
    // A job sent but not yet acked when its connection died is sent again (at-least-once): at
    // most the jobs in flight then, a prefetch per lane.
    assert!(
        resent <= 2 * prefetch,
        "{resent} pushes sent again, more than were in flight"
    );

    let Ok(stack) = Arc::try_unwrap(stack) else {
        panic!("the stack is still shared");
    };
    stack.stop().await;
    drop(cluster);
}
