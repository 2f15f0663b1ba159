//! Retention and erasure: a partition past retention is dropped, rows stranded in the default
//! partition are moved into the partition made for them, old dead-token entries are pruned,
//! the auditor role exists, and `pushfleet audit erase` removes one person and no one else.

use std::time::{Duration, SystemTime};

use pushfleet_core::clock::now_ms;
use pushfleet_core::tokens::token_fingerprint;
use pushfleet_worker::audit::maintain_once;
use uuid::Uuid;

use crate::audit_query::{publish, wait_for_rows, Population};
use crate::support::*;

async fn table_of(pool: &deadpool_postgres::Pool, id: Uuid) -> Option<String> {
    let client = pool.get().await.unwrap();
    client
        .query_opt(
            "SELECT tableoid::regclass::text FROM deliveries WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

async fn insert_delivery(pool: &deadpool_postgres::Pool, id: Uuid, received_at: &str) {
    let client = pool.get().await.unwrap();
    client
        .execute(
            "INSERT INTO deliveries (id, received_at, app_id, platform, event, call_id,
                                     token_fingerprint, lane, status, attempts, latency_ms, finished_at)
             VALUES ($1, $2::text::timestamptz, 'org.retention', 'apple', 'message', 'c',
                     '0123456789abcdef', 'messages', 'delivered', 1, 5, $2::text::timestamptz)",
            &[&id, &received_at],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO delivery_attempts (job_id, attempt, attempted_at, duration_ms, worker)
             VALUES ($1, 1, $2::text::timestamptz, 3, 'it')",
            &[&id, &received_at],
        )
        .await
        .unwrap();
}

async fn exists(pool: &deadpool_postgres::Pool, table: &str) -> bool {
    let client = pool.get().await.unwrap();
    client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn old_partitions_are_dropped_and_stranded_rows_get_their_partition() {
    let pool = migrated_pool().await;
    // A partition from long before the retention, with a row in it.
    let old = Uuid::new_v4();
    {
        let client = pool.get().await.unwrap();
        client
            .execute(
                "SELECT pushfleet_ensure_month_partitions('2001-03-10')",
                &[],
            )
            .await
            .unwrap();
    }
    insert_delivery(&pool, old, "2001-03-15T12:00:00Z").await;
    // Unless another test's worker dropped the partition in between, as it should.
    let landed = table_of(&pool, old).await;
    assert!(
        matches!(
            landed.as_deref(),
            Some("deliveries_2001_03" | "deliveries_default")
        ),
        "{landed:?}"
    );
    // A row of a month nobody made a partition for lands in the default partition; a month of
    // its own per run, far ahead.
    let month = 1 + (Uuid::new_v4().as_u128() % 12) as u32;
    let year = 2060 + (Uuid::new_v4().as_u128() % 30) as u32;
    let stranded = Uuid::new_v4();
    let partition = format!("deliveries_{year}_{month:02}");
    let received_at = format!("{year}-{month:02}-20T08:00:00Z");
    insert_delivery(&pool, stranded, &received_at).await;
    let before = table_of(&pool, stranded).await;
    assert!(
        before.as_deref() == Some("deliveries_default") || before.as_deref() == Some(&partition),
        "{before:?}"
    );
    // An entry of the dead-token list older than the retention, and a fresh one.
    let (stale, fresh) = (apns_token(), apns_token());
    {
        let client = pool.get().await.unwrap();
        for (token, age) in [(&stale, "100 days"), (&fresh, "1 day")] {
            client
                .execute(
                    "INSERT INTO invalid_tokens (app_id, platform, token_fingerprint, reason, invalidated_at)
                     VALUES ('org.retention', 'apple', $1, 'Unregistered', now() - $2::text::interval)",
                    &[&token_fingerprint(token), &age],
                )
                .await
                .unwrap();
        }
    }

    let done = maintain_once(&pool, 90).await.expect("maintenance");
    // Another test's worker may have run the same maintenance first: the state is what counts.
    assert!(!exists(&pool, "deliveries_2001_03").await, "{done:?}");
    assert!(
        !exists(&pool, "delivery_attempts_2001_03").await,
        "{done:?}"
    );
    assert_eq!(table_of(&pool, old).await, None);
    assert_eq!(
        table_of(&pool, stranded).await.as_deref(),
        Some(partition.as_str())
    );
    let client = pool.get().await.unwrap();
    let attempt_table: String = client
        .query_one(
            "SELECT tableoid::regclass::text FROM delivery_attempts WHERE job_id = $1",
            &[&stranded],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        attempt_table,
        format!("delivery_attempts_{year}_{month:02}")
    );
    let listed = |token: &str| {
        let fingerprint = token_fingerprint(token);
        let client = &client;
        async move {
            client
                .query_one(
                    "SELECT count(*) FROM invalid_tokens WHERE token_fingerprint = $1",
                    &[&fingerprint],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    assert_eq!(listed(&stale).await, 0);
    assert_eq!(listed(&fresh).await, 1);
    let oldest = done.oldest_retained_day.expect("partitions are kept");
    assert!(
        oldest <= SystemTime::now()
            && oldest > SystemTime::now() - Duration::from_secs(130 * 86_400)
    );

    // The auditor role reads the audit and nothing else.
    let grants: Vec<(String, String)> = client
        .query(
            "SELECT table_name::text, privilege_type::text FROM information_schema.role_table_grants
              WHERE grantee = 'pushfleet_auditor' ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let tables: Vec<&str> = grants.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        tables,
        [
            "audit_deliveries",
            "deliveries",
            "delivery_attempts",
            "erasures",
            "invalid_tokens"
        ]
    );
    assert!(grants.iter().all(|(_, p)| p == "SELECT"), "{grants:?}");
    // Every audit table, view and column says what it holds.
    let undocumented: Vec<String> = client
        .query(
            "WITH audit AS (
                 SELECT oid, relname FROM pg_class
                  WHERE relname IN ('deliveries', 'delivery_attempts', 'invalid_tokens',
                                    'erasures', 'audit_deliveries')
                    AND relnamespace = to_regnamespace(current_schema())::oid)
             SELECT relname::text FROM audit WHERE obj_description(oid, 'pg_class') IS NULL
             UNION ALL
             SELECT relname || '.' || attname FROM audit
               JOIN pg_attribute ON attrelid = oid AND attnum > 0 AND NOT attisdropped
              WHERE col_description(oid, attnum) IS NULL",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(undocumented.is_empty(), "no COMMENT on {undocumented:?}");
    let can_login: bool = client
        .query_one(
            "SELECT rolcanlogin FROM pg_roles WHERE rolname = 'pushfleet_auditor'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!can_login);
}

#[tokio::test]
async fn erase_removes_one_account_and_leaves_the_others() {
    let stack = Stack::start().await;
    let people = Population::new();
    let apps = people.apps.to_vec();
    let (erased_account, kept_account) = (&people.accounts[0], &people.accounts[1]);
    // Devices of both accounts, registered as the v2 API stores them.
    {
        let client = stack.pool.get().await.unwrap();
        for (account, token) in [
            (erased_account, &people.tokens[0]),
            (erased_account, &people.tokens[4]),
            (kept_account, &people.tokens[1]),
        ] {
            client
                .execute(
                    "INSERT INTO device_tokens (account, app_id, device_id, platform, token)
                     VALUES ($1, $2, $3, 'apple', $4)",
                    &[account, &people.apps[0], &Uuid::new_v4().to_string(), token],
                )
                .await
                .unwrap();
        }
    }
    let start = now_ms() - 100_000;
    let outcomes = (0..40)
        .flat_map(|i| people.push(i, start + i as u64 * 100))
        .collect();
    publish(&stack, outcomes).await;
    wait_for_rows(&stack, &apps, 40).await;
    let count = |sql: &'static str| {
        let stack = &stack;
        let apps = apps.clone();
        async move { stack.query(sql, &[&apps]).await[0].get::<_, i64>(0) }
    };
    let fingerprints: Vec<String> = [&people.tokens[0], &people.tokens[4]]
        .iter()
        .map(|t| token_fingerprint(t))
        .collect();
    let erased_rows: i64 = stack
        .query(
            "SELECT count(*) FROM deliveries WHERE app_id = ANY($1)
                AND (account = $2 OR token_fingerprint = ANY($3))",
            &[&apps, erased_account, &fingerprints],
        )
        .await[0]
        .get(0);
    assert!(erased_rows > 0);
    let erased_jobs: Vec<Uuid> = stack
        .query(
            "SELECT id FROM deliveries WHERE app_id = ANY($1)
                AND (account = $2 OR token_fingerprint = ANY($3))",
            &[&apps, erased_account, &fingerprints],
        )
        .await
        .iter()
        .map(|r| r.get(0))
        .collect();
    let all_before = count("SELECT count(*) FROM deliveries WHERE app_id = ANY($1)").await;

    let (mut out, mut err) = (Vec::new(), Vec::new());
    let config = stack.config_path.display().to_string();
    let code = pushfleet_client::run(
        "pushfleet",
        [
            "audit",
            "erase",
            "--config",
            &config,
            "--account",
            erased_account,
            "--by",
            "dpo@example.com",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect(),
        &mut out,
        &mut err,
    )
    .await;
    let out = String::from_utf8(out).unwrap();
    assert_eq!(code, 0, "{out} {}", String::from_utf8_lossy(&err));
    assert!(
        out.contains("2 device tokens") && out.contains(&format!("{erased_rows} deliveries")),
        "{out}"
    );

    let left: i64 = stack
        .query(
            "SELECT count(*) FROM deliveries WHERE app_id = ANY($1)
                AND (account = $2 OR token_fingerprint = ANY($3))",
            &[&apps, erased_account, &fingerprints],
        )
        .await[0]
        .get(0);
    assert_eq!(left, 0);
    assert_eq!(
        count("SELECT count(*) FROM deliveries WHERE app_id = ANY($1)").await,
        all_before - erased_rows
    );
    let kept: i64 = stack
        .query(
            "SELECT count(*) FROM deliveries WHERE account = $1",
            &[kept_account],
        )
        .await[0]
        .get(0);
    assert!(kept > 0);
    let tokens = |account: &String| {
        let stack = &stack;
        let account = account.clone();
        async move {
            stack
                .query(
                    "SELECT count(*) FROM device_tokens WHERE account = $1",
                    &[&account],
                )
                .await[0]
                .get::<_, i64>(0)
        }
    };
    assert_eq!(tokens(erased_account).await, 0);
    assert_eq!(tokens(kept_account).await, 1);
    // No attempt of an erased push is left behind.
    let attempts_left: i64 = stack
        .query(
            "SELECT count(*) FROM delivery_attempts WHERE job_id = ANY($1)",
            &[&erased_jobs],
        )
        .await[0]
        .get(0);
    assert_eq!(attempts_left, 0);
    // The erasure is on record, without the account.
    let record = stack
        .query(
            "SELECT erased_by, selector, device_tokens, deliveries, row_to_json(e)::text
               FROM erasures e WHERE erased_by = 'dpo@example.com' ORDER BY id DESC LIMIT 1",
            &[],
        )
        .await;
    let record = &record[0];
    assert_eq!(record.get::<_, String>(1), "account");
    assert_eq!(record.get::<_, i64>(2), 2);
    assert_eq!(record.get::<_, i64>(3), erased_rows);
    assert!(!record.get::<_, String>(4).contains(erased_account.as_str()));

    // By token, then by device id: that token's pushes and registration go, nothing else.
    let erase = |selector: &'static str, value: String| {
        let config = config.clone();
        async move {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let code = pushfleet_client::run(
                "pushfleet",
                ["audit", "erase", "--config", &config, selector, &value]
                    .iter()
                    .map(|a| a.to_string())
                    .collect(),
                &mut out,
                &mut err,
            )
            .await;
            assert_eq!(code, 0, "{}", String::from_utf8_lossy(&err));
            String::from_utf8(out).unwrap()
        }
    };
    let kept_fingerprint = token_fingerprint(&people.tokens[1]);
    let of_token = |fingerprint: String| {
        let stack = &stack;
        let apps = apps.clone();
        async move {
            stack
                .query(
                    "SELECT count(*) FROM deliveries WHERE app_id = ANY($1) AND token_fingerprint = $2",
                    &[&apps, &fingerprint],
                )
                .await[0]
                .get::<_, i64>(0)
        }
    };
    let before = count("SELECT count(*) FROM deliveries WHERE app_id = ANY($1)").await;
    let of_kept = of_token(kept_fingerprint.clone()).await;
    assert!(of_kept > 0);
    let out = erase("--token", people.tokens[1].clone()).await;
    assert!(out.contains("1 device tokens"), "{out}");
    assert_eq!(of_token(kept_fingerprint).await, 0);
    assert_eq!(tokens(kept_account).await, 0);
    assert_eq!(
        count("SELECT count(*) FROM deliveries WHERE app_id = ANY($1)").await,
        before - of_kept
    );
    let device = people.devices[5].clone();
    let of_device: i64 = stack
        .query(
            "SELECT count(*) FROM deliveries WHERE device_id = $1",
            &[&device],
        )
        .await[0]
        .get(0);
    assert!(of_device > 0);
    erase("--device-id", device.clone()).await;
    let left: i64 = stack
        .query(
            "SELECT count(*) FROM deliveries WHERE device_id = $1",
            &[&device],
        )
        .await[0]
        .get(0);
    assert_eq!(left, 0);
    stack.stop().await;
}
