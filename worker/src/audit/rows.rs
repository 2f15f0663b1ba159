//! The rows the audit sink writes: a batch of outcomes (attempts, terminal rows, dead tokens)
//! in one transaction, and the terminal row of a dead letter. Every write is idempotent, so an
//! outcome delivered twice never doubles a row.

use deadpool_postgres::Pool;
use lapin::message::Delivery;
use pushfleet_core::clock::{now_ms, system_time};
use pushfleet_core::db::{DbError, GenericClient};
use pushfleet_core::job::{Job, OutcomeEvent, Terminal, TokenInvalidation};
use pushfleet_core::tokens::{self, Invalidation};
use pushfleet_core::DeliveryStatus;
use serde_json::Value;
use tracing::info;
use uuid::Uuid;

/// Inserts attempts and terminal rows of a batch in one transaction; duplicates are ignored.
pub async fn write_outcomes(pool: &Pool, outcomes: &[OutcomeEvent]) -> Result<(), DbError> {
    let mut client = pool.get().await?;
    let tx = client
        .transaction()
        .await
        .map_err(DbError::query("audit transaction"))?;

    let attempts: Vec<_> = outcomes
        .iter()
        .filter_map(|o| o.attempt.as_ref().map(|a| (o.job_id, a)))
        .collect();
    if !attempts.is_empty() {
        let job_ids: Vec<Uuid> = attempts.iter().map(|(id, _)| *id).collect();
        let numbers: Vec<i32> = attempts.iter().map(|(_, a)| a.number as i32).collect();
        let at: Vec<_> = attempts.iter().map(|(_, a)| system_time(a.at_ms)).collect();
        let status: Vec<Option<i32>> = attempts
            .iter()
            .map(|(_, a)| a.provider_status.map(i32::from))
            .collect();
        let reason: Vec<Option<&str>> = attempts.iter().map(|(_, a)| a.reason.as_deref()).collect();
        let duration: Vec<i64> = attempts.iter().map(|(_, a)| a.duration_ms as i64).collect();
        let worker: Vec<&str> = attempts.iter().map(|(_, a)| a.worker.as_str()).collect();
        tx.execute(
            "INSERT INTO delivery_attempts
                 (job_id, attempt, attempted_at, provider_status, reason, duration_ms, worker)
             SELECT * FROM UNNEST($1::uuid[], $2::int4[], $3::timestamptz[], $4::int4[], $5::text[], $6::int8[], $7::text[])
             ON CONFLICT DO NOTHING",
            &[&job_ids, &numbers, &at, &status, &reason, &duration, &worker],
        )
        .await
        .map_err(DbError::query("delivery_attempts"))?;
    }

    let finished: Vec<_> = outcomes
        .iter()
        .filter_map(|o| o.terminal.as_ref().map(|t| (o, t)))
        .collect();
    if !finished.is_empty() {
        let col = |f: &dyn Fn(&OutcomeEvent) -> Option<String>| -> Vec<Option<String>> {
            finished.iter().map(|(o, _)| f(o)).collect()
        };
        let ids: Vec<Uuid> = finished.iter().map(|(o, _)| o.job_id).collect();
        let received: Vec<_> = finished
            .iter()
            .map(|(o, _)| system_time(o.received_at_ms))
            .collect();
        let app_id = col(&|o| Some(o.app_id.clone()));
        let platform = col(&|o| Some(o.platform.as_str().into()));
        let event = col(&|o| Some(o.event.as_str().into()));
        let call_id = col(&|o| Some(o.call_id.clone()));
        let account = col(&|o| o.account.clone());
        let device_id = col(&|o| o.device_id.clone());
        let fingerprint = col(&|o| Some(o.token_fingerprint.clone()));
        let lane = col(&|o| Some(o.lane.as_str().into()));
        let api_key_id = col(&|o| o.api_key_id.clone());
        let status: Vec<&str> = finished.iter().map(|(_, t)| t.status.as_str()).collect();
        let attempts: Vec<i32> = finished.iter().map(|(_, t)| t.attempts as i32).collect();
        let provider_status: Vec<Option<i32>> = finished
            .iter()
            .map(|(_, t)| t.provider_status.map(i32::from))
            .collect();
        let provider_reason: Vec<Option<&str>> =
            finished.iter().map(|(_, t)| t.reason.as_deref()).collect();
        let message_id: Vec<Option<&str>> = finished
            .iter()
            .map(|(_, t)| t.provider_message_id.as_deref())
            .collect();
        let latency: Vec<i64> = finished
            .iter()
            .map(|(o, t)| t.finished_at_ms.saturating_sub(o.received_at_ms) as i64)
            .collect();
        let finished_at: Vec<_> = finished
            .iter()
            .map(|(_, t)| system_time(t.finished_at_ms))
            .collect();
        tx.execute(
            "INSERT INTO deliveries
                 (id, received_at, app_id, platform, event, call_id, account, device_id, token_fingerprint,
                  lane, status, attempts, provider_status, provider_reason, provider_message_id, latency_ms, finished_at,
                  api_key_id)
             SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], $6::text[],
                  $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::int4[], $13::int4[], $14::text[],
                  $15::text[], $16::int8[], $17::timestamptz[], $18::text[])
             ON CONFLICT DO NOTHING",
            &[
                &ids, &received, &app_id, &platform, &event, &call_id, &account, &device_id, &fingerprint,
                &lane, &status, &attempts, &provider_status, &provider_reason, &message_id, &latency, &finished_at,
                &api_key_id,
            ],
        )
        .await
        .map_err(DbError::query("deliveries"))?;
    }

    for outcome in outcomes {
        if let Some(dead) = &outcome.token_invalidation {
            invalidate_token(&*tx, outcome, dead).await?;
        }
    }
    tx.commit()
        .await
        .map_err(DbError::query("audit transaction"))
}

/// Marks a token the provider declared dead (see [`tokens::invalidate`]), and counts it.
async fn invalidate_token(
    client: &impl GenericClient,
    outcome: &OutcomeEvent,
    dead: &TokenInvalidation,
) -> Result<(), DbError> {
    let invalidated = tokens::invalidate(
        client,
        &Invalidation {
            app_id: &outcome.app_id,
            platform: outcome.platform,
            token: &dead.token,
            reason: &dead.reason,
            since: dead.provider_timestamp_ms.map(system_time),
        },
    )
    .await?;
    if invalidated.listed {
        metrics::counter!(
            "pushfleet_tokens_invalidated_total",
            "app" => outcome.app_id.clone(), "platform" => outcome.platform.as_str(),
            "reason" => dead.reason.clone()
        )
        .increment(1);
    }
    info!(
        app = %outcome.app_id, token = %outcome.token_fingerprint, reason = %dead.reason,
        registrations = invalidated.registrations, "token marked invalid"
    );
    Ok(())
}

/// The audit row of a dead letter: the job's own when it can be read, else what can be made out.
pub enum DeadLetterRow {
    Job(Box<OutcomeEvent>),
    Unreadable {
        id: Uuid,
        fields: Value,
        reason: String,
    },
}

pub fn dead_letter_row(delivery: &Delivery, death: &str) -> DeadLetterRow {
    match serde_json::from_slice::<Job>(&delivery.data) {
        Ok(job) => DeadLetterRow::Job(Box::new(dead_letter_outcome(&job, death))),
        Err(e) => {
            let fields: Value = serde_json::from_slice(&delivery.data).unwrap_or(Value::Null);
            let id = fields["id"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .or_else(|| {
                    delivery
                        .properties
                        .message_id()
                        .as_ref()
                        .and_then(|m| m.as_str().parse().ok())
                })
                .unwrap_or_else(Uuid::new_v4);
            DeadLetterRow::Unreadable {
                id,
                fields,
                reason: format!("unreadable job: {e}"),
            }
        }
    }
}

/// The terminal outcome of a job the broker dead-lettered for `death` (an `x-first-death-reason`).
pub fn dead_letter_outcome(job: &Job, death: &str) -> OutcomeEvent {
    let (status, reason) = match death {
        "expired" => (DeliveryStatus::Expired, "expired in the queue".to_string()),
        "rejected" => (DeliveryStatus::Rejected, "rejected by a worker".to_string()),
        other => (
            DeliveryStatus::Failed,
            format!("dropped by the broker ({other})"),
        ),
    };
    let mut outcome = OutcomeEvent::for_job(job);
    outcome.terminal = Some(Terminal {
        status,
        attempts: job.attempt,
        provider_status: None,
        reason: Some(reason),
        provider_message_id: None,
        finished_at_ms: now_ms(),
    });
    outcome
}

pub async fn write_dead_letter(pool: &Pool, row: &DeadLetterRow) -> Result<(), DbError> {
    match row {
        DeadLetterRow::Job(outcome) => write_outcomes(pool, std::slice::from_ref(outcome)).await,
        DeadLetterRow::Unreadable { id, fields, reason } => {
            let text = |v: &Value| v.as_str().unwrap_or("").to_string();
            let received = fields["received_at_ms"]
                .as_u64()
                .map(system_time)
                .unwrap_or_else(std::time::SystemTime::now);
            let client = pool.get().await?;
            client
                .execute(
                    "INSERT INTO deliveries
                         (id, received_at, app_id, platform, event, call_id, token_fingerprint, lane,
                          status, attempts, provider_reason, latency_ms, finished_at, api_key_id)
                     VALUES ($1, $2, $3, $4, $5, $6, '', $7, 'rejected', 0, $8, 0, now(), $9)
                     ON CONFLICT DO NOTHING",
                    &[
                        id,
                        &received,
                        &text(&fields["app_id"]),
                        &text(&fields["platform"]),
                        &text(&fields["event"]),
                        &text(&fields["push"]["call_id"]),
                        &text(&fields["lane"]),
                        reason,
                        &fields["api_key_id"].as_str(),
                    ],
                )
                .await
                .map_err(DbError::query("deliveries"))?;
            Ok(())
        }
    }
}
