//! The audit sink: drains the durable `audit` queue into Postgres in batches. Workers never
//! wait on Postgres; if the database is away, outcomes wait in RabbitMQ and the sink catches up
//! when it returns. Writes are idempotent, so a redelivered outcome never doubles a row.

use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use lapin::Connection;
use pushfleet_core::job::{system_time, OutcomeEvent};
use pushfleet_core::topology::Topology;
use tokio::sync::watch;
use tracing::{info, warn};
use uuid::Uuid;

pub struct AuditSink {
    pool: Pool,
    topology: Topology,
    batch_size: usize,
    flush_after: Duration,
}

impl AuditSink {
    pub fn new(
        pool: Pool,
        topology: Topology,
        batch_size: usize,
        flush_after: Duration,
    ) -> AuditSink {
        AuditSink {
            pool,
            topology,
            batch_size,
            flush_after,
        }
    }

    /// Consumes until the connection fails or `shutdown` flips; the batch in hand is written
    /// before returning.
    pub async fn run(
        &self,
        connection: &Connection,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), lapin::Error> {
        let channel = connection.create_channel().await?;
        // Room for a full batch being written while the next one arrives.
        let prefetch = u16::try_from(self.batch_size * 2).unwrap_or(u16::MAX);
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let mut consumer = channel
            .basic_consume(
                self.topology.audit_queue().into(),
                "pushfleet-audit-sink".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        loop {
            let mut batch: Vec<Delivery> = Vec::with_capacity(self.batch_size);
            // Wait for the first outcome, then give the batch `flush_after` to fill.
            tokio::select! {
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => batch.push(delivery),
                    Some(Err(e)) => return Err(e),
                    None => return Ok(()),
                },
                _ = shutdown.changed() => return Ok(()),
            }
            let deadline = tokio::time::Instant::now() + self.flush_after;
            while batch.len() < self.batch_size {
                match tokio::time::timeout_at(deadline, consumer.next()).await {
                    Ok(Some(Ok(delivery))) => batch.push(delivery),
                    Ok(Some(Err(e))) => {
                        // Unacked deliveries return to the queue with the channel.
                        return Err(e);
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            self.write(batch, &mut shutdown).await;
        }
    }

    /// Writes one batch, retrying while Postgres is unavailable, then acks it.
    async fn write(&self, batch: Vec<Delivery>, shutdown: &mut watch::Receiver<bool>) {
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut acks = Vec::with_capacity(batch.len());
        for delivery in batch {
            match serde_json::from_slice::<OutcomeEvent>(&delivery.data) {
                Ok(outcome) => {
                    outcomes.push(outcome);
                    acks.push(delivery);
                }
                Err(e) => {
                    warn!(error = %e, "unreadable outcome sent to the dead-letter queue");
                    let _ = delivery.reject(BasicRejectOptions { requeue: false }).await;
                }
            }
        }
        let mut delay = Duration::from_millis(200);
        loop {
            let started = Instant::now();
            match write_outcomes(&self.pool, &outcomes).await {
                Ok(()) => {
                    metrics::histogram!("pushfleet_audit_write_seconds")
                        .record(started.elapsed().as_secs_f64());
                    metrics::counter!("pushfleet_audit_outcomes_written_total")
                        .increment(outcomes.len() as u64);
                    break;
                }
                Err(e) => {
                    metrics::counter!("pushfleet_audit_write_errors_total").increment(1);
                    warn!(error = %e, pending = outcomes.len(), "audit write failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        // Not acked: the outcomes stay in the queue for the next sink.
                        _ = shutdown.changed() => return,
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        if let Some(last) = acks.last() {
            let _ = last.ack(BasicAckOptions { multiple: true }).await;
        }
    }
}

/// Inserts attempts and terminal rows of a batch in one transaction; duplicates are ignored.
pub async fn write_outcomes(pool: &Pool, outcomes: &[OutcomeEvent]) -> Result<(), String> {
    let mut client = pool.get().await.map_err(|e| e.to_string())?;
    let tx = client.transaction().await.map_err(|e| e.to_string())?;

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
        .map_err(|e| format!("delivery_attempts: {e}"))?;
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
                  lane, status, attempts, provider_status, provider_reason, provider_message_id, latency_ms, finished_at)
             SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], $6::text[],
                  $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::int4[], $13::int4[], $14::text[],
                  $15::text[], $16::int8[], $17::timestamptz[])
             ON CONFLICT DO NOTHING",
            &[
                &ids, &received, &app_id, &platform, &event, &call_id, &account, &device_id, &fingerprint,
                &lane, &status, &attempts, &provider_status, &provider_reason, &message_id, &latency, &finished_at,
            ],
        )
        .await
        .map_err(|e| format!("deliveries: {e}"))?;
    }
    tx.commit().await.map_err(|e| e.to_string())
}

/// Keeps this month's and next month's partitions in place, checking a few times a day.
pub async fn maintain_partitions(pool: Pool, mut shutdown: watch::Receiver<bool>) {
    loop {
        match pushfleet_core::db::ensure_partitions(&pool).await {
            Ok(()) => info!("audit partitions in place"),
            Err(e) => {
                warn!(error = %e, "could not create audit partitions; rows go to the default partition")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(6 * 3600)) => {}
            _ = shutdown.changed() => return,
        }
    }
}
