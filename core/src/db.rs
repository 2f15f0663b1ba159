//! Postgres access shared by the services: the connection pool and the schema migrations.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::config::PostgresSettings;

/// The migrations, in order; each runs once, in its own transaction.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/0001_init.sql")),
    (
        2,
        "token_hygiene",
        include_str!("../../migrations/0002_token_hygiene.sql"),
    ),
];

/// A pool whose connections are checked before reuse, so that a database restart costs one
/// failed checkout instead of a stream of errors.
pub fn pool(settings: &PostgresSettings) -> Result<Pool, String> {
    let config: tokio_postgres::Config = settings
        .url
        .parse()
        .map_err(|e| format!("[postgres] url: {e}"))?;
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(settings.pool_size)
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(Duration::from_millis(settings.connect_timeout_ms)))
        .wait_timeout(Some(Duration::from_millis(settings.connect_timeout_ms)))
        .build()
        .map_err(|e| format!("[postgres] pool: {e}"))
}

/// Checks that the database answers; the start-up check of every service.
pub async fn ping(pool: &Pool, settings: &PostgresSettings) -> Result<(), String> {
    let client = pool.get().await.map_err(|e| {
        format!(
            "cannot connect to Postgres at {}: {e}",
            crate::topology::redact(&settings.url)
        )
    })?;
    client
        .simple_query("SELECT 1")
        .await
        .map_err(|e| format!("Postgres does not answer: {e}"))?;
    Ok(())
}

/// Applies the migrations not yet applied; safe to run from several processes at once.
/// Returns the versions it applied.
pub async fn migrate(pool: &Pool) -> Result<Vec<i32>, String> {
    let mut client = pool
        .get()
        .await
        .map_err(|e| format!("cannot connect to Postgres: {e}"))?;
    let tx = client.transaction().await.map_err(|e| e.to_string())?;
    tx.batch_execute(
        "SELECT pg_advisory_xact_lock(hashtext('pushfleet_migrations'));
         CREATE TABLE IF NOT EXISTS pushfleet_migrations (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         );",
    )
    .await
    .map_err(|e| format!("migrations table: {e}"))?;
    let applied: Vec<i32> = tx
        .query("SELECT version FROM pushfleet_migrations", &[])
        .await
        .map_err(|e| e.to_string())?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut done = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tx.batch_execute(sql)
            .await
            .map_err(|e| format!("migration {version} ({name}): {e}"))?;
        tx.execute(
            "INSERT INTO pushfleet_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await
        .map_err(|e| e.to_string())?;
        done.push(*version);
    }
    tx.commit().await.map_err(|e| e.to_string())?;
    Ok(done)
}

/// Creates this month's and next month's audit partitions.
pub async fn ensure_partitions(pool: &Pool) -> Result<(), String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    client
        .batch_execute(
            "SELECT pushfleet_ensure_month_partitions(current_date);
             SELECT pushfleet_ensure_month_partitions((current_date + interval '1 month')::date);",
        )
        .await
        .map_err(|e| format!("audit partitions: {e}"))
}
