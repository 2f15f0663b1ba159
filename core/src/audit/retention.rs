//! Keeping the audit for `[audit] retention_days` and no longer. Audit tables are partitioned
//! by month: the partitions of this month and the next are created ahead, rows that landed in a
//! default partition (a month whose partition was missing) are moved into their own, and a
//! partition is dropped whole once its last day is past retention. Dead-token entries older than
//! retention are deleted.

use std::time::SystemTime;

use crate::db::{DbError, GenericClient};

/// What one maintenance run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Maintained {
    /// The partitions dropped, by name.
    pub dropped: Vec<String>,
    /// Rows of the default partitions older than retention, deleted.
    pub default_rows_deleted: u64,
    /// Months whose rows were found in a default partition and got their partition.
    pub months_moved: u64,
    /// `invalid_tokens` rows deleted.
    pub invalid_tokens_pruned: u64,
    /// The first day of the oldest partition of `deliveries` kept: how far back the audit goes.
    pub oldest_retained_day: Option<SystemTime>,
}

/// The audit partitions (not the default ones) and the month each starts.
const PARTITIONS: &str = "SELECT quote_ident(c.relname), to_date(right(c.relname, 7), 'YYYY_MM'),
        p.relname = 'deliveries'
   FROM pg_inherits i
   JOIN pg_class c ON c.oid = i.inhrelid
   JOIN pg_class p ON p.oid = i.inhparent
  WHERE p.relname IN ('deliveries', 'delivery_attempts')
    AND c.relname ~ '_[0-9]{4}_[0-9]{2}$'
    AND c.relnamespace = p.relnamespace
    AND p.relnamespace = to_regnamespace(current_schema())::oid";

/// Runs the maintenance once; several processes may run it at once (they take turns).
pub async fn maintain(
    client: &mut impl GenericClient,
    retention_days: u32,
) -> Result<Maintained, DbError> {
    let tx = client
        .transaction()
        .await
        .map_err(DbError::query("audit retention"))?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('pushfleet_audit_retention'))",
        &[],
    )
    .await
    .map_err(DbError::query("audit retention lock"))?;
    let days = i32::try_from(retention_days).unwrap_or(i32::MAX);
    // The first day kept, as text so that no date type crosses the wire.
    let cutoff: String = tx
        .query_one("SELECT (current_date - $1::int)::text", &[&days])
        .await
        .map_err(DbError::query("audit retention"))?
        .get(0);
    let mut done = Maintained::default();

    // Rows that went to a default partition and are already past retention: nothing to move.
    for (table, column) in [
        ("deliveries_default", "received_at"),
        ("delivery_attempts_default", "attempted_at"),
    ] {
        done.default_rows_deleted += tx
            .execute(
                &format!("DELETE FROM {table} WHERE {column} < $1::text::date"),
                &[&cutoff],
            )
            .await
            .map_err(DbError::query("audit default partition"))?;
    }
    // The months still in a default partition get their partition (the rows are moved into it),
    // as do this month and the next.
    let stray = tx
        .query(
            "SELECT DISTINCT date_trunc('month', received_at)::date::text FROM deliveries_default
             UNION
             SELECT DISTINCT date_trunc('month', attempted_at)::date::text FROM delivery_attempts_default",
            &[],
        )
        .await
        .map_err(DbError::query("audit default partition"))?;
    done.months_moved = stray.len() as u64;
    for month in &stray {
        let month: String = month.get(0);
        tx.execute(
            "SELECT pushfleet_ensure_month_partitions($1::text::date)",
            &[&month],
        )
        .await
        .map_err(DbError::query("audit partitions"))?;
    }
    tx.batch_execute(
        "SELECT pushfleet_ensure_month_partitions(current_date);
         SELECT pushfleet_ensure_month_partitions((current_date + interval '1 month')::date);",
    )
    .await
    .map_err(DbError::query("audit partitions"))?;

    // A partition goes once the first day after it is at or before the cutoff.
    let expired = tx
        .query(
            &format!(
                "SELECT name FROM ({PARTITIONS}) AS p (name, first_day, of_deliveries)
                  WHERE (first_day + interval '1 month')::date <= $1::text::date"
            ),
            &[&cutoff],
        )
        .await
        .map_err(DbError::query("audit partitions"))?;
    for row in expired {
        let name: String = row.get(0);
        tx.batch_execute(&format!("DROP TABLE IF EXISTS {name}"))
            .await
            .map_err(DbError::query("audit partition drop"))?;
        done.dropped.push(name.trim_matches('"').to_string());
    }
    done.invalid_tokens_pruned = tx
        .execute(
            "DELETE FROM invalid_tokens WHERE invalidated_at < $1::text::date",
            &[&cutoff],
        )
        .await
        .map_err(DbError::query("invalid_tokens"))?;
    done.oldest_retained_day = tx
        .query_one(
            &format!(
                "SELECT min(first_day)::timestamptz FROM ({PARTITIONS}) AS kept (name, first_day, of_deliveries)
                  WHERE of_deliveries"
            ),
            &[],
        )
        .await
        .map_err(DbError::query("audit partitions"))?
        .get(0);
    tx.commit()
        .await
        .map_err(DbError::query("audit retention"))?;
    Ok(done)
}
