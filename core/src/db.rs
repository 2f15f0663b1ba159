//! Postgres access shared by the services: the connection pool and the schema migrations.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
/// What the token store's functions take: a connection or a transaction.
pub use tokio_postgres::GenericClient;
use tokio_postgres::NoTls;

use crate::config::PostgresSettings;
use crate::tls;

/// The migrations, in order; each runs once, in its own transaction.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/0001_init.sql")),
    (
        2,
        "token_hygiene",
        include_str!("../../migrations/0002_token_hygiene.sql"),
    ),
    (
        3,
        "api_keys",
        include_str!("../../migrations/0003_api_keys.sql"),
    ),
    (4, "audit", include_str!("../../migrations/0004_audit.sql")),
    (
        5,
        "call_options",
        include_str!("../../migrations/0005_call_options.sql"),
    ),
    (
        6,
        "unifiedpush",
        include_str!("../../migrations/0006_unifiedpush.sql"),
    ),
    (
        7,
        "xmpp_gateway",
        include_str!("../../migrations/0007_xmpp_gateway.sql"),
    ),
];

/// A database problem, with what was being done when it happened.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("[postgres] url: {0}")]
    BadUrl(#[source] tokio_postgres::Error),
    #[error("[postgres] pool: {0}")]
    Pool(#[from] deadpool_postgres::BuildError),
    #[error("[postgres] url: {0}")]
    SslMode(String),
    #[error("[postgres] ca_file: {0}")]
    CaFile(#[source] crate::tls::PemFileError),
    /// The start-up check: the database named in the settings does not answer.
    #[error("cannot connect to Postgres at {url}: {}", with_causes(source))]
    Unreachable {
        url: String,
        source: deadpool_postgres::PoolError,
    },
    /// No connection to be had right now (the database restarts, the pool is exhausted).
    #[error("no Postgres connection: {0}")]
    Connection(#[from] deadpool_postgres::PoolError),
    #[error("migration {version} ({name}): {source}")]
    Migration {
        version: i32,
        name: &'static str,
        source: tokio_postgres::Error,
    },
    #[error("{context}: {source}")]
    Query {
        context: &'static str,
        source: tokio_postgres::Error,
    },
}

impl DbError {
    /// For `map_err`: a failed statement, labelled with what it was for.
    pub fn query(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> DbError {
        move |source| DbError::Query { context, source }
    }

    /// Whether the database refused the data itself (SQLSTATE class 22, data exception, such as
    /// a NUL in text; class 23, integrity constraint violation): the same rows would fail again,
    /// however often they were retried. Anything else (no connection, a restart, a timeout) may
    /// pass later.
    pub fn is_data_error(&self) -> bool {
        let source = match self {
            DbError::Query { source, .. } | DbError::Migration { source, .. } => source,
            _ => return false,
        };
        source
            .code()
            .is_some_and(|state| is_data_sqlstate(state.code()))
    }
}

/// An error and what caused it, in one line: tokio-postgres leaves the cause out of its own
/// text ("error performing TLS handshake"), and the cause is what tells a wrong CA from a
/// server without TLS.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        let more = error.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = error.source();
    }
    text
}

fn is_data_sqlstate(code: &str) -> bool {
    code.starts_with("22") || code.starts_with("23")
}

/// A pool whose connections are checked before reuse, so that a database restart costs one
/// failed checkout instead of a stream of errors. The URL's `sslmode` decides on TLS.
pub fn pool(settings: &PostgresSettings) -> Result<Pool, DbError> {
    let url = tls::PostgresUrl::parse(&settings.url).map_err(DbError::SslMode)?;
    let config: tokio_postgres::Config = url.url.parse().map_err(DbError::BadUrl)?;
    let manager_config = || ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match tls::postgres_connector(url.sslmode, settings.ca_file.as_deref())
        .map_err(DbError::CaFile)?
    {
        Some(tls) => Manager::from_config(config, tls, manager_config()),
        None => Manager::from_config(config, NoTls, manager_config()),
    };
    Ok(Pool::builder(manager)
        .max_size(settings.pool_size)
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(Duration::from_millis(settings.connect_timeout_ms)))
        .wait_timeout(Some(Duration::from_millis(settings.connect_timeout_ms)))
        .build()?)
}

/// Checks that the database answers; the start-up check of every service.
pub async fn ping(pool: &Pool, settings: &PostgresSettings) -> Result<(), DbError> {
    let client = pool.get().await.map_err(|source| DbError::Unreachable {
        url: crate::topology::redact(&settings.url),
        source,
    })?;
    client
        .simple_query("SELECT 1")
        .await
        .map_err(DbError::query("Postgres does not answer"))?;
    Ok(())
}

/// Applies the migrations not yet applied; safe to run from several processes at once.
/// Returns the versions it applied.
pub async fn migrate(pool: &Pool) -> Result<Vec<i32>, DbError> {
    let mut client = pool.get().await?;
    let tx = client
        .transaction()
        .await
        .map_err(DbError::query("migrations"))?;
    // "already exists, skipping" NOTICEs of IF NOT EXISTS would be logged at INFO on every run.
    tx.batch_execute(
        "SET LOCAL client_min_messages = warning;
         SELECT pg_advisory_xact_lock(hashtext('pushfleet_migrations'));
         CREATE TABLE IF NOT EXISTS pushfleet_migrations (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         );",
    )
    .await
    .map_err(DbError::query("migrations table"))?;
    let applied: Vec<i32> = tx
        .query("SELECT version FROM pushfleet_migrations", &[])
        .await
        .map_err(DbError::query("migrations table"))?
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
            .map_err(|source| DbError::Migration {
                version: *version,
                name,
                source,
            })?;
        tx.execute(
            "INSERT INTO pushfleet_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await
        .map_err(DbError::query("migrations table"))?;
        done.push(*version);
    }
    tx.commit().await.map_err(DbError::query("migrations"))?;
    Ok(done)
}

/// Creates this month's and next month's audit partitions.
pub async fn ensure_partitions(pool: &Pool) -> Result<(), DbError> {
    let client = pool.get().await?;
    client
        .batch_execute(
            // One implicit transaction: SET LOCAL quietens its NOTICEs only.
            "SET LOCAL client_min_messages = warning;
             SELECT pushfleet_ensure_month_partitions(current_date);
             SELECT pushfleet_ensure_month_partitions((current_date + interval '1 month')::date);",
        )
        .await
        .map_err(DbError::query("audit partitions"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_errors_are_classes_22_and_23() {
        // 22021: character not in repertoire (a NUL in text); 23505: unique violation.
        assert!(is_data_sqlstate("22021"));
        assert!(is_data_sqlstate("23505"));
        // 08006: connection failure; 57P01: admin shutdown (a restart); 40001: serialization.
        assert!(!is_data_sqlstate("08006"));
        assert!(!is_data_sqlstate("57P01"));
        assert!(!is_data_sqlstate("40001"));
    }
}
