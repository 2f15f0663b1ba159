//! No alert, recording rule or dashboard panel names a metric that nothing exports: the names in
//! `ops/alerts.yml` and `ops/grafana/pushfleet.json` are checked against what ingest, a worker
//! and RabbitMQ's Prometheus plugin actually serve, after pushes that make the metrics appear.

use std::collections::BTreeSet;
use std::path::PathBuf;

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use pushfleet_core::clock::now_ms;
use pushfleet_core::job::{Job, PushData, JOB_VERSION};
use pushfleet_core::{Event, Lane, Platform, Topology};
use pushfleet_fakes::{FcmTokenState, Scripted};
use serde_json::Value;
use uuid::Uuid;

use crate::support::{
    apns_token, call_id, fcm_token, v1_body, Services, Stack, StackOptions, SYLK,
};

/// RabbitMQ's metrics as ops/prometheus.yml scrapes them.
const RABBITMQ_ENDPOINTS: [&str; 2] = [
    "http://127.0.0.1:15692/metrics",
    "http://127.0.0.1:15692/metrics/detailed?family=queue_coarse_metrics&family=queue_consumer_count",
];

/// Prometheus makes these itself, for every target.
const SCRAPE_METRICS: [&str; 1] = ["up"];

fn ops_file(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../ops")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The metric names a PromQL text mentions: identifiers of the families pushfleet, RabbitMQ
/// and the process collector export (label names, functions and keywords never start so).
fn metric_names(promql: &str) -> BTreeSet<String> {
    // Label values ("...") may look like names; they are not.
    let mut unquoted = String::new();
    let mut in_string = false;
    let mut escaped = false;
    for c in promql.chars() {
        match (in_string, escaped, c) {
            (true, false, '\\') => escaped = true,
            (true, false, '"') => in_string = false,
            (true, ..) => escaped = false,
            (false, _, '"') => in_string = true,
            (false, ..) => unquoted.push(c),
        }
    }
    unquoted
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| {
            ["pushfleet_", "pushfleet:", "rabbitmq_", "process_"]
                .iter()
                .any(|prefix| word.starts_with(prefix))
                || SCRAPE_METRICS.contains(word)
        })
        .map(str::to_string)
        .collect()
}

/// The `expr` of every rule in the alerts file (indented block or one line), and the names of
/// its recording rules.
fn alert_expressions(yaml: &str) -> (Vec<String>, BTreeSet<String>) {
    let mut exprs = Vec::new();
    let mut recorded = BTreeSet::new();
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if let Some(name) = trimmed.strip_prefix("- record:") {
            recorded.insert(name.trim().to_string());
        }
        let Some(rest) = trimmed.strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest != "|" {
            exprs.push(rest.to_string());
            continue;
        }
        let indent = line.len() - trimmed.len();
        let mut block = String::new();
        while let Some(next) = lines.peek() {
            let next_indent = next.len() - next.trim_start().len();
            if !next.trim().is_empty() && next_indent <= indent {
                break;
            }
            block.push_str(next);
            block.push('\n');
            lines.next();
        }
        exprs.push(block);
    }
    (exprs, recorded)
}

/// Every `expr` of the dashboard's panels (targets, nested rows).
fn dashboard_expressions(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", Value::String(expr)) => out.push(expr.clone()),
                    _ => dashboard_expressions(value, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| dashboard_expressions(v, out)),
        _ => {}
    }
}

/// The families a Prometheus text exports, and the samples' own names.
fn exported(text: &str, into: &mut BTreeSet<String>) {
    for line in text.lines() {
        let name = match line
            .strip_prefix("# TYPE ")
            .or(line.strip_prefix("# HELP "))
        {
            Some(rest) => rest.split(' ').next(),
            None if line.starts_with('#') => None,
            None => line.split(['{', ' ']).next(),
        };
        if let Some(name) = name.filter(|n| !n.is_empty()) {
            into.insert(name.to_string());
        }
    }
}

fn is_exported(name: &str, exported: &BTreeSet<String>) -> bool {
    exported.contains(name)
        || ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|suffix| name.strip_suffix(suffix))
            .any(|family| exported.contains(family))
}

/// A dead letter as RabbitMQ leaves one when a call job expires in its lane.
async fn expire_a_call_in_the_lane(stack: &Stack) {
    let job = Job {
        v: JOB_VERSION,
        id: Uuid::new_v4(),
        app_id: SYLK.into(),
        platform: Platform::Apple,
        event: Event::IncomingSession,
        lane: Lane::Calls,
        received_at_ms: now_ms() - 61_000,
        deadline_ms: now_ms() - 1_000,
        attempt: 0,
        push: PushData {
            token: apns_token(),
            call_id: call_id(),
            from: "alice@example.com".into(),
            to: "bob@example.com".into(),
            ..Default::default()
        },
        api_key_id: None,
        handling: Default::default(),
        reply: false,
    };
    let connection = pushfleet_core::topology::connect(&stack.settings.rabbitmq, "it-dead")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut headers = FieldTable::default();
    headers.insert(
        "x-first-death-reason".into(),
        AMQPValue::LongString("expired".into()),
    );
    channel
        .basic_publish(
            Topology::new(&stack.settings.rabbitmq)
                .dead_exchange()
                .into(),
            "".into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&job).unwrap(),
            BasicProperties::default().with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    stack.deliveries(&job.push.call_id, 1).await;
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test]
async fn alerts_and_dashboard_name_only_exported_metrics() {
    let stack = Stack::start_with(StackOptions {
        start_worker: false,
        ..Default::default()
    })
    .await;
    let services = Services::start(&stack.config_path).await;
    // Pushes that the fakes answer so that each kind of metric appears: delivered on each
    // platform (deliveries, latencies, provider requests, the audit trail), delivered after a
    // retry, after a refreshed provider token, a token gone; and a dead letter. The rest is
    // there from the start.
    let (retried, refreshed, gone) = (apns_token(), apns_token(), fcm_token());
    let fakes = &stack.fakes;
    fakes.apns.script(
        &retried,
        Scripted::status(503).reason("ServiceUnavailable").times(1),
    );
    fakes.apns.script(
        &refreshed,
        Scripted::status(403)
            .reason("ExpiredProviderToken")
            .times(1),
    );
    fakes
        .fcm
        .set_token_state(&gone, FcmTokenState::Unregistered);
    for (platform, token, expected) in [
        ("apple", apns_token(), 200),
        ("firebase", fcm_token(), 200),
        ("apple", retried, 200),
        ("apple", refreshed, 200),
        ("firebase", gone, 410),
    ] {
        let id = call_id();
        let (status, answer) = services
            .push(&v1_body(SYLK, platform, &token, "incoming_session", &id))
            .await;
        assert_eq!(status, expected, "{answer}");
        stack.deliveries(&id, 1).await;
    }
    expire_a_call_in_the_lane(&stack).await;

    let mut names = BTreeSet::new();
    let (ingest, worker) = services.metrics().await;
    exported(&ingest, &mut names);
    exported(&worker, &mut names);
    for url in RABBITMQ_ENDPOINTS {
        let text = reqwest::get(url)
            .await
            .unwrap_or_else(|e| {
                panic!("{url}: {e} (RabbitMQ's rabbitmq_prometheus plugin: ops/lib.sh enables it)")
            })
            .text()
            .await
            .unwrap();
        exported(&text, &mut names);
    }
    names.extend(SCRAPE_METRICS.map(String::from));

    let (mut exprs, recorded) = alert_expressions(&ops_file("alerts.yml"));
    assert!(exprs.len() > 20, "the alert rules were read: {exprs:?}");
    let dashboard: Value = serde_json::from_str(&ops_file("grafana/pushfleet.json")).unwrap();
    let before = exprs.len();
    dashboard_expressions(&dashboard, &mut exprs);
    assert!(
        exprs.len() > before + 10,
        "the dashboard's panels were read"
    );

    let mut unknown = BTreeSet::new();
    for expr in &exprs {
        for name in metric_names(expr) {
            if !recorded.contains(&name) && !is_exported(&name, &names) {
                unknown.insert(name);
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "named in ops/alerts.yml or ops/grafana/pushfleet.json but exported by nothing: {unknown:?}"
    );
    services.stop().await;
    stack.stop().await;
}

#[test]
fn names_are_found_in_promql() {
    let names = metric_names(
        r#"sum by (app) (rate(pushfleet_deliveries_total{outcome="pushfleet_x"}[5m])) / up
           and pushfleet:call_push_slow:ratio_rate5m > histogram_quantile(0.9, rabbitmq_y_bucket)"#,
    );
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "pushfleet:call_push_slow:ratio_rate5m",
            "pushfleet_deliveries_total",
            "rabbitmq_y_bucket",
            "up"
        ]
    );
    let mut exported_names = BTreeSet::new();
    exported(
        "# HELP a_seconds x\n# TYPE a_seconds histogram\na_seconds_bucket{le=\"1\"} 0\nb_total 3\n",
        &mut exported_names,
    );
    assert!(is_exported("a_seconds_bucket", &exported_names));
    assert!(is_exported("a_seconds_count", &exported_names));
    assert!(is_exported("b_total", &exported_names));
    assert!(!is_exported("c_total", &exported_names));
}
