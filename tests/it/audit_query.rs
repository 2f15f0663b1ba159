//! The audit query API: 1,000 pushes of two apps, several accounts and every terminal state,
//! read back through `GET /audit` by each filter and combination and compared with SQL; paging
//! while rows are added; CSV; the summary; bad filters; the indexes and partition pruning the
//! common queries rely on.

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use lapin::options::ConfirmSelectOptions;
use pushfleet_core::audit::query::{self, format_time, PageRequest};
use pushfleet_core::clock::now_ms;
use pushfleet_core::job::{AttemptRecord, Terminal, JOB_VERSION};
use pushfleet_core::keys::{self, CreatedKey, NewKey, Scope};
use pushfleet_core::tokens::token_fingerprint;
use pushfleet_core::topology;
use pushfleet_core::{DeliveryStatus, Event, Lane, OutcomeEvent, Platform, Topology};
use pushfleet_worker::outcomes::OutcomeBatcher;
use serde_json::Value;
use uuid::Uuid;

use crate::support::*;

/// Parameters of an SQL condition, owned.
type SqlParams = Vec<Box<dyn tokio_postgres::types::ToSql + Sync>>;

const STATUSES: [DeliveryStatus; 6] = [
    DeliveryStatus::Delivered,
    DeliveryStatus::Rejected,
    DeliveryStatus::TokenInvalid,
    DeliveryStatus::Expired,
    DeliveryStatus::Failed,
    DeliveryStatus::Cancelled,
];

/// What the pushes of one test are made of: names nobody else uses.
pub struct Population {
    pub apps: [String; 2],
    pub accounts: Vec<String>,
    pub devices: Vec<String>,
    pub tokens: Vec<String>,
    pub call_ids: Vec<String>,
}

impl Population {
    pub fn new() -> Population {
        let run = Uuid::new_v4().simple().to_string();
        Population {
            apps: [format!("org.audit-{run}.a"), format!("org.audit-{run}.b")],
            accounts: (0..4)
                .map(|i| format!("acc{i}-{run}@example.com"))
                .collect(),
            devices: (0..6).map(|i| format!("dev{i}-{run}")).collect(),
            tokens: (0..10).map(|_| apns_token()).collect(),
            call_ids: (0..50).map(|_| call_id()).collect(),
        }
    }

    /// The outcomes of push `i` received at `received_at_ms`: its attempts, then its terminal.
    pub fn push(&self, i: usize, received_at_ms: u64) -> Vec<OutcomeEvent> {
        let status = STATUSES[i % STATUSES.len()];
        let event = Event::ALL[i % Event::ALL.len()];
        let outcome = OutcomeEvent {
            v: JOB_VERSION,
            job_id: Uuid::new_v4(),
            app_id: self.apps[i % 2].clone(),
            platform: if i.is_multiple_of(3) {
                Platform::Apple
            } else {
                Platform::Firebase
            },
            event,
            lane: if event.is_incoming_call() || event == Event::Cancel {
                Lane::Calls
            } else {
                Lane::Messages
            },
            call_id: self.call_ids[i % self.call_ids.len()].clone(),
            // Every seventh is a v1 push: no account.
            account: (!i.is_multiple_of(7)).then(|| self.accounts[i % self.accounts.len()].clone()),
            device_id: Some(self.devices[i % self.devices.len()].clone()),
            token_fingerprint: token_fingerprint(&self.tokens[i % self.tokens.len()]),
            received_at_ms,
            attempt: None,
            terminal: None,
            token_invalidation: None,
            api_key_id: None,
        };
        let (attempts, provider_status) = match status {
            DeliveryStatus::Delivered => (1 + (i % 2) as u32, Some(200)),
            DeliveryStatus::Rejected => (1, Some(400)),
            DeliveryStatus::TokenInvalid => (1, Some(410)),
            DeliveryStatus::Failed => (3, Some(503)),
            DeliveryStatus::Expired | DeliveryStatus::Cancelled => (0, None),
        };
        let mut outcomes: Vec<OutcomeEvent> = (1..=attempts)
            .map(|number| OutcomeEvent {
                attempt: Some(AttemptRecord {
                    number,
                    at_ms: received_at_ms + u64::from(number) * 5,
                    provider_status: if number == attempts {
                        provider_status
                    } else {
                        Some(503)
                    },
                    reason: None,
                    duration_ms: 3,
                    worker: "it-audit".into(),
                }),
                ..outcome.clone()
            })
            .collect();
        outcomes.push(OutcomeEvent {
            terminal: Some(Terminal {
                status,
                attempts,
                provider_status,
                reason: provider_status
                    .filter(|s| *s != 200)
                    .map(|s| format!("status {s}")),
                provider_message_id: (status == DeliveryStatus::Delivered)
                    .then(|| Uuid::new_v4().to_string()),
                finished_at_ms: received_at_ms + 20 + (i as u64 % 97),
            }),
            ..outcome
        });
        outcomes
    }
}

/// Publishes outcomes as workers do: batched on the outcome fanout, confirmed.
pub async fn publish(stack: &Stack, outcomes: Vec<OutcomeEvent>) {
    let rabbitmq = &stack.settings.rabbitmq;
    let topology = Topology::new(rabbitmq);
    let connection = topology::connect(rabbitmq, "it-audit").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let (batcher, publishing) = OutcomeBatcher::start(channel, &topology);
    let saves: Vec<_> = outcomes
        .into_iter()
        .map(|outcome| {
            let batcher = batcher.clone();
            tokio::spawn(async move { batcher.save(&outcome).await })
        })
        .collect();
    for save in saves {
        save.await.unwrap().expect("outcome confirmed");
    }
    drop(batcher);
    publishing.await.unwrap();
    let _ = connection.close(200, "done".into()).await;
}

/// Waits until the apps have `count` audit rows.
pub async fn wait_for_rows(stack: &Stack, apps: &[String], count: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows: i64 = stack
            .query(
                "SELECT count(*) FROM deliveries WHERE app_id = ANY($1)",
                &[&apps.to_vec()],
            )
            .await[0]
            .get(0);
        if rows >= count {
            return;
        }
        assert!(Instant::now() < deadline, "{rows} of {count} rows audited");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until no new audit row of the apps came for a second.
async fn wait_until_quiet(stack: &Stack, apps: &[String]) {
    let count = || async {
        stack
            .query(
                "SELECT count(*) FROM deliveries WHERE app_id = ANY($1)",
                &[&apps.to_vec()],
            )
            .await[0]
            .get::<_, i64>(0)
    };
    let mut last = count().await;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = count().await;
        if now == last {
            return;
        }
        last = now;
    }
}

pub async fn audit_key(apps: &[String]) -> CreatedKey {
    let pool = migrated_pool().await;
    let mut client = pool.get().await.unwrap();
    keys::create(
        &mut **client,
        &NewKey {
            tenant: format!("auditor-{}", Uuid::new_v4().simple()),
            apps: apps.to_vec(),
            scopes: vec![Scope::Audit],
            pushes_per_second: 0,
            burst: 0,
        },
    )
    .await
    .expect("key created")
}

/// A GET with the key; the status, the body as text, and the next-cursor header.
async fn get_text(
    stack: &Stack,
    key: &CreatedKey,
    path_and_query: &str,
    accept: Option<&str>,
) -> (u16, String, Option<String>) {
    let mut request = stack
        .http
        .get(stack.url(path_and_query))
        .bearer_auth(&key.key);
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    let response = request.send().await.expect("ingest answers");
    let status = response.status().as_u16();
    let next = response
        .headers()
        .get("x-next-cursor")
        .map(|v| v.to_str().unwrap().to_string());
    (status, response.text().await.unwrap(), next)
}

async fn get_json(stack: &Stack, key: &CreatedKey, path_and_query: &str) -> (u16, Value) {
    let (status, text, _) = get_text(stack, key, path_and_query, None).await;
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("answer {status} is not JSON: {text:?}"));
    (status, json)
}

fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every job id a query returns, page by page (`limit` rows each).
async fn all_ids(stack: &Stack, key: &CreatedKey, query: &str, limit: usize) -> Vec<Uuid> {
    let mut ids = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut path = format!("/audit?limit={limit}&{query}");
        if let Some(cursor) = &after {
            path.push_str(&format!("&after={cursor}"));
        }
        let (status, page) = get_json(stack, key, &path).await;
        assert_eq!(status, 200, "{path}: {page}");
        let rows = page["rows"].as_array().unwrap();
        assert!(rows.len() <= limit);
        ids.extend(
            rows.iter()
                .map(|r| r["job_id"].as_str().unwrap().parse::<Uuid>().unwrap()),
        );
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => return ids,
        }
    }
}

/// The job ids SQL finds among the apps' rows with `condition` (`$2`… its parameters).
async fn sql_ids(
    stack: &Stack,
    apps: &[String],
    condition: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Vec<Uuid> {
    let sql = format!(
        "SELECT id FROM deliveries WHERE app_id = ANY($1) AND ({condition}) ORDER BY received_at, id"
    );
    let apps = apps.to_vec();
    let mut all: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&apps];
    all.extend_from_slice(params);
    stack
        .query(&sql, &all)
        .await
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// CSV, by `format=csv` and by `Accept`, parses with a standard reader and matches JSON.
async fn check_csv(stack: &Stack, key: &CreatedKey) {
    let (_, json) = get_json(stack, key, "/audit?limit=1000&attempts=1").await;
    let rows = json["rows"].as_array().unwrap();
    for (path, accept) in [
        ("/audit?limit=1000&attempts=1&format=csv", None),
        ("/audit?limit=1000&attempts=1", Some("text/csv")),
    ] {
        let (status, text, next) = get_text(stack, key, path, accept).await;
        assert_eq!(status, 200, "{text}");
        assert_eq!(next.as_deref(), json["next"].as_str(), "{path}");
        let mut reader = csv::Reader::from_reader(text.as_bytes());
        let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
        let mut expected_header: Vec<String> =
            query::COLUMNS.iter().map(|c| c.to_string()).collect();
        expected_header.push("attempts".into());
        assert_eq!(header, expected_header);
        let records: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
        assert_eq!(records.len(), rows.len(), "{path}");
        for (record, row) in records.iter().zip(rows) {
            for (column, field) in header.iter().zip(record.iter()) {
                let value = &row[column.as_str()];
                if column == "attempts" {
                    let parsed: Value = serde_json::from_str(field).unwrap();
                    assert_eq!(&parsed, value);
                    continue;
                }
                let text = match value {
                    Value::Null => String::new(),
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                assert_eq!(field, text, "{column} of {row}");
            }
        }
    }
}

/// `/audit/summary?by=app,status,event` over the window against SQL; the rows counted.
async fn check_summary(
    stack: &Stack,
    key: &CreatedKey,
    apps: &[String],
    since: SystemTime,
    until: SystemTime,
) -> i64 {
    let apps = apps.to_vec();
    let (status, summary) = get_json(
        stack,
        key,
        &format!(
            "/audit/summary?by=app,status,event&since={}&until={}",
            encode(&format_time(since)),
            encode(&format_time(until))
        ),
    )
    .await;
    assert_eq!(status, 200, "{summary}");
    let expected = stack
        .query(
            "SELECT app_id, status, event, count(*),
                    count(*) FILTER (WHERE status = 'expired'),
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms)
                        FILTER (WHERE provider_status IS NOT NULL),
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms)
                        FILTER (WHERE provider_status IS NOT NULL)
               FROM deliveries
              WHERE app_id = ANY($1) AND received_at >= $2 AND received_at < $3
              GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
            &[&apps, &since, &until],
        )
        .await;
    let groups = summary["groups"].as_array().unwrap();
    assert_eq!(groups.len(), expected.len(), "{summary}");
    let mut total = 0;
    for (group, row) in groups.iter().zip(&expected) {
        assert_eq!(group["app"], row.get::<_, String>(0));
        assert_eq!(group["status"], row.get::<_, String>(1));
        assert_eq!(group["event"], row.get::<_, String>(2));
        assert_eq!(group["count"], row.get::<_, i64>(3));
        assert_eq!(group["expired_before_delivery"], row.get::<_, i64>(4));
        // JSON numbers parse to within a unit in the last place.
        let near = |json: &Value, sql: Option<f64>| match (json.as_f64(), sql) {
            (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * b.abs().max(1.0),
            (a, b) => a == b,
        };
        assert!(near(&group["latency_median_ms"], row.get(5)), "{group}");
        assert!(near(&group["latency_p99_ms"], row.get(6)), "{group}");
        total += row.get::<_, i64>(3);
    }
    assert_eq!(summary["total"], total);
    total
}

#[tokio::test]
async fn every_filter_returns_what_sql_finds_in_pages_csv_and_summary() {
    // Keys are loaded when ingest starts.
    let people = Population::new();
    let apps = people.apps.to_vec();
    let key = audit_key(&apps).await;
    let stack = Stack::start().await;
    // 1,000 pushes over the last 1,000 seconds.
    let start_ms = now_ms() - 1_000_000;
    let outcomes: Vec<OutcomeEvent> = (0..1000)
        .flat_map(|i| people.push(i, start_ms + i as u64 * 1000))
        .collect();
    publish(&stack, outcomes).await;
    wait_for_rows(&stack, &apps, 1000).await;

    // Each filter and combinations of them, against SQL.
    let at = |i: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(start_ms + i * 1000);
    let (since, until) = (at(200), at(700));
    let token = &people.tokens[3];
    let fingerprint = token_fingerprint(token);
    let fingerprint_of = token_fingerprint(&people.tokens[4]);
    let statuses = vec!["failed".to_string(), "expired".to_string()];
    let cases: Vec<(String, String, SqlParams)> = vec![
        (String::new(), "true".into(), vec![]),
        (
            format!("app={}", people.apps[0]),
            "app_id = $2".into(),
            vec![Box::new(people.apps[0].clone())],
        ),
        ("platform=apple".into(), "platform = 'apple'".into(), vec![]),
        (
            "platform=android".into(),
            "platform = 'firebase'".into(),
            vec![],
        ),
        (
            format!("account={}", encode(&people.accounts[1])),
            "account = $2".into(),
            vec![Box::new(people.accounts[1].clone())],
        ),
        (
            format!("device_id={}", people.devices[2]),
            "device_id = $2".into(),
            vec![Box::new(people.devices[2].clone())],
        ),
        (
            format!("token={token}"),
            "token_fingerprint = $2".into(),
            vec![Box::new(fingerprint.clone())],
        ),
        (
            format!("token_fingerprint={fingerprint_of}"),
            "token_fingerprint = $2".into(),
            vec![Box::new(fingerprint_of.clone())],
        ),
        (
            format!("call_id={}", encode(&people.call_ids[7])),
            "call_id = $2".into(),
            vec![Box::new(people.call_ids[7].clone())],
        ),
        (
            format!("call-id={}", encode(&people.call_ids[8])),
            "call_id = $2".into(),
            vec![Box::new(people.call_ids[8].clone())],
        ),
        ("event=message".into(), "event = 'message'".into(), vec![]),
        (
            "status=failed&status=expired".into(),
            "status = ANY($2)".into(),
            vec![Box::new(statuses.clone())],
        ),
        (
            "status=token_invalid".into(),
            "status = 'token_invalid'".into(),
            vec![],
        ),
        (
            format!(
                "since={}&until={}",
                encode(&format_time(since)),
                encode(&format_time(until))
            ),
            "received_at >= $2 AND received_at < $3".into(),
            vec![Box::new(since), Box::new(until)],
        ),
        (
            format!("app={}&platform=apple&status=delivered", people.apps[0]),
            "app_id = $2 AND platform = 'apple' AND status = 'delivered'".into(),
            vec![Box::new(people.apps[0].clone())],
        ),
        (
            format!(
                "account={}&event=incoming_session&since={}",
                encode(&people.accounts[2]),
                encode(&format_time(since))
            ),
            "account = $2 AND event = 'incoming_session' AND received_at >= $3".into(),
            vec![Box::new(people.accounts[2].clone()), Box::new(since)],
        ),
        (
            format!(
                "device_id={}&status=rejected&status=cancelled&until={}",
                people.devices[1],
                encode(&format_time(until))
            ),
            "device_id = $2 AND status IN ('rejected', 'cancelled') AND received_at < $3".into(),
            vec![Box::new(people.devices[1].clone()), Box::new(until)],
        ),
        (
            format!("token={token}&platform=apple&event=message"),
            "token_fingerprint = $2 AND platform = 'apple' AND event = 'message'".into(),
            vec![Box::new(fingerprint.clone())],
        ),
    ];
    for (query, condition, params) in &cases {
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(|p| &**p).collect();
        let expected = sql_ids(&stack, &apps, condition, &refs).await;
        assert!(
            !expected.is_empty(),
            "{query}: the population should match something"
        );
        let found = all_ids(&stack, &key, query, 1000).await;
        assert_eq!(found, expected, "{query}");
    }

    // Rows carry their attempts when asked, and the count under attempt_count.
    let call = encode(&people.call_ids[0]);
    let (status, page) = get_json(&stack, &key, &format!("/audit?call_id={call}&attempts=1")).await;
    assert_eq!(status, 200, "{page}");
    for row in page["rows"].as_array().unwrap() {
        let attempts = row["attempts"].as_array().expect("attempts listed");
        assert_eq!(
            attempts.len() as u64,
            row["attempt_count"].as_u64().unwrap(),
            "{row}"
        );
    }
    let (_, page) = get_json(&stack, &key, &format!("/audit?call_id={call}")).await;
    assert!(page["rows"][0].get("attempts").is_none(), "{page}");

    // Paging by 50 while rows are added: every row once, in order.
    let expected = sql_ids(&stack, &apps, "true", &[]).await;
    let adding = {
        let later: Vec<OutcomeEvent> = (1000..1100)
            .flat_map(|i| people.push(i, now_ms()))
            .collect();
        let stack_settings = stack.settings.clone();
        tokio::spawn(async move {
            let rabbitmq = &stack_settings.rabbitmq;
            let topology = Topology::new(rabbitmq);
            let connection = topology::connect(rabbitmq, "it-audit-more").await.unwrap();
            let channel = connection.create_channel().await.unwrap();
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            let (batcher, publishing) = OutcomeBatcher::start(channel, &topology);
            for outcome in later {
                batcher.save(&outcome).await.expect("confirmed");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            drop(batcher);
            publishing.await.unwrap();
            let _ = connection.close(200, "done".into()).await;
        })
    };
    let paged = all_ids(&stack, &key, "", 50).await;
    adding.await.unwrap();
    let unique: HashSet<&Uuid> = paged.iter().collect();
    assert_eq!(unique.len(), paged.len(), "a row came twice");
    let position: std::collections::HashMap<&Uuid, usize> =
        paged.iter().enumerate().map(|(i, id)| (id, i)).collect();
    let mut last = None;
    for id in &expected {
        let at = *position
            .get(id)
            .unwrap_or_else(|| panic!("{id} missing from the pages"));
        assert!(last.is_none_or(|l| l < at), "{id} out of order");
        last = Some(at);
    }
    wait_for_rows(&stack, &apps, 1100).await;

    check_csv(&stack, &key).await;
    let total = check_summary(&stack, &key, &apps, since, until).await;
    assert_eq!(total, 500);

    stack.stop().await;
}

#[tokio::test]
async fn bad_filters_are_a_400_naming_them() {
    let key = audit_key(&Population::new().apps).await;
    let stack = Stack::start().await;
    for (query, named) in [
        ("/audit?since=yesterday", "since"),
        ("/audit?until=2026-13-01T00:00:00Z", "until"),
        ("/audit?limit=1001", "limit"),
        ("/audit?limit=-1", "limit"),
        ("/audit?status=lost", "status"),
        ("/audit?event=ring", "event"),
        ("/audit?platform=windows", "platform"),
        ("/audit?token_fingerprint=zz", "token_fingerprint"),
        ("/audit?after=garbage", "after"),
        ("/audit?acount=bob", "acount"),
        ("/audit?format=xml", "format"),
        ("/audit?attempts=maybe", "attempts"),
        ("/audit/summary?by=colour", "by"),
        ("/audit/summary?since=now", "since"),
    ] {
        let (status, body) = get_json(&stack, &key, query).await;
        assert_eq!(status, 400, "{query}: {body}");
        let description = body["description"].as_str().unwrap();
        assert!(description.contains(named), "{query}: {description}");
    }
    stack.stop().await;
}

#[tokio::test]
async fn common_queries_use_an_index_and_prune_partitions() {
    let pool = migrated_pool().await;
    let mut client = pool.get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    // A tiny test table would be scanned whole; the question is whether an index can serve.
    tx.batch_execute("SET LOCAL enable_seqscan = off")
        .await
        .unwrap();
    let month = tx
        .query_one("SELECT to_char(now(), 'YYYY_MM')", &[])
        .await
        .unwrap()
        .get::<_, String>(0);
    let now = SystemTime::now();
    let hour_ago = now - Duration::from_secs(3600);
    let params = |q: &str| -> Vec<(String, String)> {
        let mut p: Vec<(String, String)> = q
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        p.push(("since".into(), format_time(hour_ago)));
        p.push(("until".into(), format_time(now)));
        p
    };
    for query in [
        "app=org.example",
        "account=bob",
        "device_id=d1",
        "token_fingerprint=0123456789abcdef",
        "call_id=c1",
        "status=failed",
        "event=message",
        "",
    ] {
        let request = PageRequest::from_params(&params(query)).unwrap();
        let (sql, values) = query::page_sql(&request, None);
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            values.iter().map(|p| &**p as _).collect();
        let plan: Vec<String> = tx
            .query(&format!("EXPLAIN {sql}"), &refs)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let plan = plan.join("\n");
        assert!(plan.contains("Index"), "{query}: no index used:\n{plan}");
        assert!(
            plan.contains(&format!("deliveries_{month}")),
            "{query}: this month's partition not read:\n{plan}"
        );
        let read = partitions_read(&plan);
        assert_eq!(
            read,
            [format!("deliveries_{month}")],
            "{query}: only this month's partition should be read:\n{plan}"
        );
    }
    tx.rollback().await.unwrap();
}

/// The partitions of `deliveries` a plan reads (tables, not their indexes).
fn partitions_read(plan: &str) -> Vec<String> {
    let mut names: Vec<String> = plan
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| {
            word.strip_prefix("deliveries_").is_some_and(|rest| {
                rest == "default"
                    || (rest.len() == 7
                        && rest.as_bytes()[4] == b'_'
                        && rest.bytes().filter(u8::is_ascii_digit).count() == 6)
            })
        })
        .map(String::from)
        .collect();
    names.sort();
    names.dedup();
    names
}

#[tokio::test]
async fn the_command_line_reads_the_database_or_the_api_page_by_page() {
    let people = Population::new();
    let apps = people.apps.to_vec();
    let key = audit_key(&apps).await;
    let stack = Stack::start().await;
    let start = now_ms() - 100_000;
    publish(
        &stack,
        (0..120)
            .flat_map(|i| people.push(i, start + i as u64 * 100))
            .collect(),
    )
    .await;
    wait_for_rows(&stack, &apps, 120).await;
    let config = stack.config_path.display().to_string();
    let (a, b) = (people.apps[0].as_str(), people.apps[1].as_str());

    // From the database of --config, every page, as CSV, with a progress line per page.
    let (code, out, err) = pushfleet(&[
        "audit", "--config", &config, "--app", a, "--app", b, "--limit", "50", "--all", "--format",
        "csv",
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let mut reader = csv::Reader::from_reader(out.as_bytes());
    assert_eq!(reader.records().count(), 120);
    assert!(err.contains("page 3, 120 rows"), "{err}");

    // One page only: the cursor of the next is on stderr.
    let (code, out, err) = pushfleet(&[
        "audit", "--config", &config, "--app", a, "--status", "failed", "--limit", "5", "--format",
        "json",
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let page: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(page["rows"].as_array().unwrap().len(), 5);
    assert!(page["rows"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["status"] == "failed"));
    let next = page["next"].as_str().expect("more rows");
    assert!(err.contains(&format!("--after {next}")), "{err}");

    // Over the API with a key: the same rows.
    let base = stack.url("");
    let (code, out, err) = pushfleet(&[
        "audit",
        "--url",
        &base,
        "--api-key",
        &key.key,
        "--account",
        &people.accounts[1],
        "--all",
        "--limit",
        "7",
        "--format",
        "json",
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let all: Value = serde_json::from_str(&out).unwrap();
    let expected = sql_ids(&stack, &apps, "account = $2", &[&people.accounts[1]]).await;
    let found: Vec<Uuid> = all["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["job_id"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(found, expected);

    // The summary, from either side.
    for source in [["--config", config.as_str()], ["--url", base.as_str()]] {
        let mut args = vec!["audit", "summary"];
        args.extend(source);
        args.extend([
            "--api-key",
            &key.key,
            "--app",
            a,
            "--app",
            b,
            "--by",
            "status",
            "--format",
            "json",
        ]);
        if source[0] == "--config" {
            args.retain(|a| *a != "--api-key" && *a != key.key);
        }
        let (code, out, err) = pushfleet(&args).await;
        assert_eq!(code, 0, "{err}{out}");
        let summary: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(summary["total"], 120, "{summary}");
        assert_eq!(summary["groups"].as_array().unwrap().len(), 6, "{summary}");
    }

    let (code, out, err) = pushfleet(&[
        "audit",
        "summary",
        "--config",
        &config,
        "--app",
        a,
        "--by",
        "status,event",
        "--format",
        "csv",
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let mut reader = csv::Reader::from_reader(out.as_bytes());
    assert_eq!(
        reader.headers().unwrap().iter().take(3).collect::<Vec<_>>(),
        ["status", "event", "count"]
    );
    let counted: i64 = reader
        .records()
        .map(|r| r.unwrap()[2].parse::<i64>().unwrap())
        .sum();
    assert_eq!(counted, 60);

    // A bad filter is a usage error.
    let (code, _, err) = pushfleet(&["audit", "--config", &config, "--since", "soon"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("since"), "{err}");
    stack.stop().await;
}

/// What a real push of the mixed population is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Made {
    Delivered,
    TokenInvalid,
    Rejected,
    Failed,
    Expired,
    /// A duplicate of a delivered push: the first is delivered, the second cancelled.
    Cancelled,
}

const MADE: [Made; 6] = [
    Made::Delivered,
    Made::TokenInvalid,
    Made::Rejected,
    Made::Failed,
    Made::Expired,
    Made::Cancelled,
];

/// The devices registered for the v2 pushes: per account, app and platform one that delivers
/// and one whose provider keeps failing.
struct Devices {
    /// (account, app, platform, made) → device id
    ids: std::collections::HashMap<(usize, usize, &'static str, bool), String>,
}

async fn register_devices(stack: &Stack, people: &Population) -> Devices {
    let mut ids = std::collections::HashMap::new();
    let mut n = 0;
    for account in 0..people.accounts.len() {
        for app in 0..2 {
            for platform in ["apple", "firebase"] {
                for failing in [false, true] {
                    let token = if platform == "apple" {
                        apns_token()
                    } else {
                        fcm_token()
                    };
                    if failing {
                        let script = pushfleet_fakes::Scripted::status(503).times(10_000);
                        match platform {
                            "apple" => stack.fakes.apns.script(&token, script),
                            _ => stack.fakes.fcm.script(&token, script),
                        }
                    }
                    let device = people.devices[n % people.devices.len()].clone();
                    n += 1;
                    let (status, answer) = stack
                        .call(
                            "POST",
                            &format!("/v2/tokens/{}", encode(&people.accounts[account])),
                            Some(&serde_json::json!({
                                "app-id": people.apps[app], "platform": platform,
                                "token": token, "device-id": device,
                            })),
                        )
                        .await;
                    assert_eq!(status, 200, "{answer}");
                    ids.insert((account, app, platform, failing), device);
                }
            }
        }
    }
    Devices { ids }
}

/// Sends push `i` (its kind is `MADE[i % 6]`), through v1 or, for some delivered and failed
/// ones, v2 to a registered device of an account.
async fn real_push(stack: &Stack, people: &Population, devices: &Devices, i: usize) {
    let made = MADE[i % MADE.len()];
    let j = i / MADE.len();
    let platform = if j.is_multiple_of(2) {
        "apple"
    } else {
        "firebase"
    };
    let app_index = (j / 2) % 2;
    let app = people.apps[app_index].as_str();
    let call = format!("{}-{i}", people.call_ids[j % people.call_ids.len()]);
    let event = match made {
        Made::Expired => "transfer",
        Made::Cancelled => "incoming_session",
        _ => [
            "incoming_session",
            "message",
            "cancel",
            "incoming_conference_request",
        ][j % 4],
    };
    let accepted = |status: u16, answer: &Value| {
        assert!(
            status == 200 || status == 202,
            "{made:?}: {status} {answer}"
        );
    };
    if matches!(made, Made::Delivered | Made::Failed) && !j.is_multiple_of(3) {
        let account = j % people.accounts.len();
        let device = &devices.ids[&(account, app_index, platform, made == Made::Failed)];
        let (status, answer) = stack
            .call(
                "POST",
                &format!(
                    "/v2/tokens/{}/push/{}",
                    encode(&people.accounts[account]),
                    encode(device)
                ),
                Some(&serde_json::json!({
                    "app-id": app, "platform": platform, "call-id": call, "event": event,
                    "from": "alice@example.com", "to": "bob@example.com", "media-type": "audio",
                })),
            )
            .await;
        return accepted(status, &answer);
    }
    let token = if platform == "apple" {
        apns_token()
    } else {
        fcm_token()
    };
    let script = match (made, platform) {
        (Made::TokenInvalid, "apple") => Some(pushfleet_fakes::Scripted::status(410)),
        (Made::TokenInvalid, _) => Some(pushfleet_fakes::Scripted::status(404)),
        (Made::Rejected, "apple") => {
            Some(pushfleet_fakes::Scripted::status(400).reason("BadTopic"))
        }
        (Made::Rejected, _) => {
            Some(pushfleet_fakes::Scripted::status(400).reason("INVALID_ARGUMENT"))
        }
        (Made::Failed, _) => Some(pushfleet_fakes::Scripted::status(503).times(10)),
        _ => None,
    };
    if let Some(script) = script {
        match platform {
            "apple" => stack.fakes.apns.script(&token, script),
            _ => stack.fakes.fcm.script(&token, script),
        }
    }
    let mut body = v1_body(app, platform, &token, event, &call);
    body["device-id"] = people.devices[j % people.devices.len()].clone().into();
    let (status, answer) = stack.push(&body).await;
    accepted(status, &answer);
    if made == Made::Cancelled {
        // Once the first is sent, the same push again is a duplicate.
        stack.deliveries(&call, 1).await;
        let (status, answer) = stack.push(&body).await;
        accepted(status, &answer);
    }
}

/// Sends pushes `range` of the population, 16 at a time.
async fn real_pushes(
    stack: &Stack,
    people: &Population,
    devices: &Devices,
    range: impl Iterator<Item = usize>,
) {
    use futures_util::StreamExt;
    futures_util::stream::iter(range)
        .map(|i| real_push(stack, people, devices, i))
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
}

#[tokio::test]
async fn real_pushes_in_every_terminal_state_read_back_as_sql_finds_them() {
    let people = Population::new();
    let apps = people.apps.to_vec();
    let key = audit_key(&apps).await;
    let mut stack = Stack::start_with(StackOptions {
        mode: "async",
        start_worker: false,
        extra_apps: apps.clone(),
        // One attempt: a 503 is final. Transfers expire in their queue while no worker runs.
        extra_config: "\n[retry]\nmax_attempts = 1\n\n[events.transfer]\nttl_secs = 1\n".into(),
        ..Default::default()
    })
    .await;
    let started = SystemTime::now();
    let devices = register_devices(&stack, &people).await;
    let expiring = (0..1000).filter(|i| MADE[i % 6] == Made::Expired);
    real_pushes(&stack, &people, &devices, expiring).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stack.start_worker().await;
    let others = (0..1000).filter(|i| MADE[i % 6] != Made::Expired);
    real_pushes(&stack, &people, &devices, others).await;
    // Every push, and the first of each duplicate pair.
    let pairs = (0..1000).filter(|i| MADE[i % 6] == Made::Cancelled).count() as i64;
    wait_for_rows(&stack, &apps, 1000 + pairs).await;
    wait_until_quiet(&stack, &apps).await;
    let rows = stack
        .query(
            "SELECT status, count(*) FROM deliveries WHERE app_id = ANY($1) GROUP BY 1 ORDER BY 1",
            &[&apps],
        )
        .await;
    let counts: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let statuses: Vec<&str> = counts.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        statuses,
        [
            "cancelled",
            "delivered",
            "expired",
            "failed",
            "rejected",
            "token_invalid"
        ],
        "{counts:?}"
    );
    let accounts: i64 = stack
        .query(
            "SELECT count(DISTINCT account) FROM deliveries WHERE app_id = ANY($1)",
            &[&apps],
        )
        .await[0]
        .get(0);
    assert_eq!(accounts, people.accounts.len() as i64);

    // Filters taken from the rows themselves, alone and combined.
    let sample = stack
        .query(
            "SELECT account, device_id, token_fingerprint, call_id FROM deliveries
              WHERE app_id = ANY($1) AND account IS NOT NULL AND status = 'delivered'
              ORDER BY received_at LIMIT 1",
            &[&apps],
        )
        .await;
    let (account, device, fingerprint, call): (String, String, String, String) = (
        sample[0].get(0),
        sample[0].get(1),
        sample[0].get(2),
        sample[0].get(3),
    );
    let middle = started + (SystemTime::now().duration_since(started).unwrap() / 2);
    let cases: Vec<(String, String, SqlParams)> = vec![
        (String::new(), "true".into(), vec![]),
        (
            format!("app={}", apps[1]),
            "app_id = $2".into(),
            vec![Box::new(apps[1].clone())],
        ),
        (
            "platform=firebase".into(),
            "platform = 'firebase'".into(),
            vec![],
        ),
        (
            format!("account={}", encode(&account)),
            "account = $2".into(),
            vec![Box::new(account.clone())],
        ),
        (
            format!("device_id={}", encode(&device)),
            "device_id = $2".into(),
            vec![Box::new(device.clone())],
        ),
        (
            format!("token_fingerprint={fingerprint}"),
            "token_fingerprint = $2".into(),
            vec![Box::new(fingerprint.clone())],
        ),
        (
            format!("call_id={}", encode(&call)),
            "call_id = $2".into(),
            vec![Box::new(call.clone())],
        ),
        ("event=transfer".into(), "event = 'transfer'".into(), vec![]),
        ("status=expired".into(), "status = 'expired'".into(), vec![]),
        (
            "status=cancelled&status=token_invalid".into(),
            "status IN ('cancelled', 'token_invalid')".into(),
            vec![],
        ),
        (
            format!("since={}", encode(&format_time(middle))),
            "received_at >= $2".into(),
            vec![Box::new(middle)],
        ),
        (
            format!(
                "app={}&platform=apple&status=rejected&until={}",
                apps[0],
                encode(&format_time(middle))
            ),
            "app_id = $2 AND platform = 'apple' AND status = 'rejected' AND received_at < $3"
                .into(),
            vec![Box::new(apps[0].clone()), Box::new(middle)],
        ),
        (
            format!(
                "account={}&status=failed&event=message",
                encode(&people.accounts[1])
            ),
            "account = $2 AND status = 'failed' AND event = 'message'".into(),
            vec![Box::new(people.accounts[1].clone())],
        ),
    ];
    for (query, condition, params) in &cases {
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(|p| &**p).collect();
        let expected = sql_ids(&stack, &apps, condition, &refs).await;
        assert!(!expected.is_empty(), "{query}: nothing to find");
        let found = all_ids(&stack, &key, query, 1000).await;
        assert!(
            found == expected,
            "{query}: {} rows found, {} expected",
            found.len(),
            expected.len()
        );
    }

    // Paging by 50 while more pushes come in: every earlier row once, in order.
    let expected = sql_ids(&stack, &apps, "true", &[]).await;
    let (paged, ()) = tokio::join!(
        all_ids(&stack, &key, "", 50),
        real_pushes(
            &stack,
            &people,
            &devices,
            (1000..1060).filter(|i| MADE[i % 6] != Made::Expired)
        )
    );
    let unique: HashSet<&Uuid> = paged.iter().collect();
    assert_eq!(unique.len(), paged.len(), "a row came twice");
    let at: std::collections::HashMap<&Uuid, usize> =
        paged.iter().enumerate().map(|(i, id)| (id, i)).collect();
    let positions: Vec<usize> = expected
        .iter()
        .map(|id| *at.get(id).unwrap_or_else(|| panic!("{id} missing")))
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "out of order");

    check_csv(&stack, &key).await;
    let counted = check_summary(&stack, &key, &apps, started, SystemTime::now()).await;
    assert!(counted >= 1000 + pairs, "{counted}");
    stack.stop().await;
}
