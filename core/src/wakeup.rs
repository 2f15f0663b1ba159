//! Registration wake-ups: a background push that makes an app register again before its SIP
//! registration expires. Asked for through the API (ingest) or found due by the scheduler
//! (`pushfleet wakeup-scheduler`), both through Postgres, so that any number of ingests and
//! scheduler instances wake a device at most once per `[wakeup] wakeup_min_interval_secs`, and
//! the scheduler once per registration.

use std::time::Duration;

use deadpool_postgres::Pool;
use lapin::options::BasicPublishOptions;
use tokio::sync::watch;
use tokio_postgres::{GenericClient, Row};
use tracing::{info, warn};
use uuid::Uuid;

use crate::clock::now_ms;
use crate::config::{Platform, Settings};
use crate::db::{self, DbError};
use crate::job::{Handling, Job, PushData, JOB_VERSION};
use crate::policy::{Event, EventPolicy};
use crate::topology::{self, BrokerError, Topology};

/// Only devices a background push can reach: an FCM token, or an APNs remote (background) token.
/// A VoIP token alone cannot take one (iOS kills an app whose VoIP push reports no call).
const WAKEABLE: &str =
    "(d.platform = 'firebase' OR d.background_token IS NOT NULL OR d.remote_only)";

/// A device to wake, and the token its background push goes to.
#[derive(Debug, Clone, PartialEq)]
pub struct WakeTarget {
    pub account: String,
    pub app_id: String,
    pub platform: Platform,
    pub device_id: String,
    pub token: String,
}

impl WakeTarget {
    fn from_row(row: &Row) -> Option<WakeTarget> {
        let platform = Platform::from_alias(row.get("platform"))?;
        let token: String = row.get("token");
        let background: Option<String> = row.get("background_token");
        // The remote token of a VoIP + remote pair; else the device's only token.
        let token = match platform {
            Platform::Apple => background.unwrap_or(token),
            Platform::Firebase | Platform::UnifiedPush => token,
        };
        Some(WakeTarget {
            account: row.get("account"),
            app_id: row.get("app_id"),
            platform,
            device_id: row.get("device_id"),
            token,
        })
    }

    /// The wake-up job for this device.
    pub fn job(&self, policy: &EventPolicy, api_key_id: Option<String>) -> Job {
        let now = now_ms();
        let id = Uuid::new_v4();
        Job {
            v: JOB_VERSION,
            id,
            app_id: self.app_id.clone(),
            platform: self.platform,
            event: Event::Wakeup,
            lane: policy.lane,
            received_at_ms: now,
            deadline_ms: now + policy.ttl.as_millis() as u64,
            attempt: 0,
            push: PushData {
                token: self.token.clone(),
                // A device named by RFC 8599 parameters has neither.
                device_id: Some(self.device_id.clone()).filter(|d| !d.is_empty()),
                // Audit rows are found by call-id: each wake-up has its own.
                call_id: format!("wakeup-{id}"),
                account: Some(self.account.clone()).filter(|a| !a.is_empty()),
                ..Default::default()
            },
            api_key_id,
            handling: Handling {
                wakeup: true,
                ..Default::default()
            },
            reply: false,
        }
    }
}

/// What became of one device of a wake-up request.
#[derive(Debug, Clone, PartialEq)]
pub enum WakeDecision {
    /// Claimed: its push is to be queued now.
    Wake(WakeTarget),
    /// Woken less than `wakeup_min_interval_secs` ago.
    Suppressed { device_id: String },
    /// Its token is dead, or it has no token a background push can reach.
    Unreachable { device_id: String, reason: String },
}

/// Claims the account's devices (one, or every device of `apps` when given) for a wake-up
/// asked through the API. The claim is one `UPDATE`: of two requests racing for a device, on
/// any ingest, one claims it and the other finds it suppressed.
pub async fn claim_requested(
    client: &impl GenericClient,
    account: &str,
    device_id: Option<&str>,
    apps: Option<&[String]>,
    min_interval: Duration,
) -> Result<Vec<WakeDecision>, DbError> {
    let sql = format!(
        "WITH candidates AS (
             SELECT d.id, d.device_id, d.invalidated_at IS NOT NULL AS dead, {WAKEABLE} AS wakeable
               FROM device_tokens d
              WHERE d.account = $1 AND ($2::text IS NULL OR d.device_id = $2)
                AND ($3::text[] IS NULL OR d.app_id = ANY($3))
         ), woken AS (
             UPDATE device_tokens d SET last_wakeup_at = now()
               FROM candidates c
              WHERE d.id = c.id AND d.invalidated_at IS NULL AND {WAKEABLE}
                AND (d.last_wakeup_at IS NULL
                     OR d.last_wakeup_at <= now() - make_interval(secs => $4))
             RETURNING d.id, d.account, d.app_id, d.platform, d.device_id, d.token,
                       d.background_token
         )
         SELECT c.device_id, c.dead, c.wakeable, w.account, w.app_id, w.platform, w.token,
                w.background_token, w.id IS NOT NULL AS woken
           FROM candidates c LEFT JOIN woken w ON w.id = c.id
          ORDER BY c.id"
    );
    let rows = client
        .query(
            &sql,
            &[&account, &device_id, &apps, &min_interval.as_secs_f64()],
        )
        .await
        .map_err(DbError::query("device_tokens wake-up"))?;
    Ok(rows
        .iter()
        .map(|row| {
            let device_id: String = row.get("device_id");
            if row.get("woken") {
                if let Some(target) = WakeTarget::from_row(row) {
                    return WakeDecision::Wake(target);
                }
            }
            let reason = if row.get("dead") {
                "token invalidated"
            } else if !row.get::<_, bool>("wakeable") {
                "no token that takes a background push (a VoIP token only)"
            } else {
                return WakeDecision::Suppressed { device_id };
            };
            WakeDecision::Unreachable {
                device_id,
                reason: reason.into(),
            }
        })
        .collect())
}

/// Claims a wake-up of a device known only by its token (RFC 8599 parameters): false when the
/// token was woken less than `min_interval` ago. One statement, so racing requests claim once.
pub async fn claim_token(
    client: &impl GenericClient,
    app_id: &str,
    platform: Platform,
    token: &str,
    min_interval: Duration,
) -> Result<bool, DbError> {
    let claimed = client
        .query_opt(
            "INSERT INTO wakeup_claims AS w (app_id, platform, token_fingerprint, last_wakeup_at)
             VALUES ($1, $2, $3, now())
             ON CONFLICT (app_id, platform, token_fingerprint) DO UPDATE SET last_wakeup_at = now()
              WHERE w.last_wakeup_at <= now() - make_interval(secs => $4)
             RETURNING 1",
            &[
                &app_id,
                &platform.as_str(),
                &crate::tokens::token_fingerprint(token),
                &min_interval.as_secs_f64(),
            ],
        )
        .await
        .map_err(DbError::query("wakeup_claims"))?;
    Ok(claimed.is_some())
}

/// Claims up to `batch` devices whose registration passed `threshold` of its lifetime (from
/// its registration, `updated_at`, to `registration_expires_at`) and that were not woken for
/// this registration yet. `FOR UPDATE SKIP LOCKED`: several schedulers share the work, never a
/// device.
pub async fn claim_due(
    client: &impl GenericClient,
    threshold: f64,
    min_interval: Duration,
    batch: u32,
) -> Result<Vec<WakeTarget>, DbError> {
    let sql = format!(
        "UPDATE device_tokens d
            SET scheduled_wakeup_for = d.registration_expires_at, last_wakeup_at = now()
          WHERE d.id IN (
                SELECT d.id FROM device_tokens d
                 WHERE d.registration_expires_at > now() AND d.invalidated_at IS NULL
                   AND d.scheduled_wakeup_for IS DISTINCT FROM d.registration_expires_at
                   AND {WAKEABLE}
                   AND d.updated_at + (d.registration_expires_at - d.updated_at) * $1 <= now()
                   AND (d.last_wakeup_at IS NULL
                        OR d.last_wakeup_at <= now() - make_interval(secs => $2))
                 ORDER BY d.registration_expires_at
                 LIMIT $3
                   FOR UPDATE SKIP LOCKED)
         RETURNING d.account, d.app_id, d.platform, d.device_id, d.token, d.background_token"
    );
    let rows = client
        .query(
            &sql,
            &[&threshold, &min_interval.as_secs_f64(), &i64::from(batch)],
        )
        .await
        .map_err(DbError::query("device_tokens wake-up schedule"))?;
    Ok(rows.iter().filter_map(WakeTarget::from_row).collect())
}

/// Why the scheduler stopped.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error(transparent)]
    Database(#[from] DbError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// The wake-up scheduler: every `[wakeup] scheduler_interval_secs`, claims the devices due and
/// queues their wake-ups, until `shutdown`.
pub struct Scheduler {
    settings: Settings,
    pool: Pool,
}

impl Scheduler {
    /// Checks Postgres and RabbitMQ at once, so that a bad configuration fails at start-up.
    pub async fn connect(settings: Settings) -> Result<Scheduler, SchedulerError> {
        let pool = db::pool(&settings.postgres)?;
        db::ping(&pool, &settings.postgres).await?;
        Ok(Scheduler { settings, pool })
    }

    /// Runs rounds until `shutdown`. A lost broker connection is reopened (with back-off);
    /// the devices of the round it interrupted were not claimed and stay due.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) -> Result<(), SchedulerError> {
        let topology = Topology::new(&self.settings.rabbitmq);
        let name = "pushfleet-wakeup-scheduler";
        let mut connection = topology::connect(&self.settings.rabbitmq, name).await?;
        loop {
            let result = self.rounds(&connection, &topology, shutdown.clone()).await;
            let _ = connection.close(200, "shutdown".into()).await;
            let Err(e) = result else {
                return Ok(());
            };
            warn!(error = %e, "wake-up scheduler lost RabbitMQ; reconnecting");
            let reopened =
                crate::reconnect::until_ok("RabbitMQ still unreachable", &mut shutdown, || {
                    topology::connect(&self.settings.rabbitmq, name)
                });
            match reopened.await {
                Some(reopened) => connection = reopened,
                None => return Ok(()),
            }
        }
    }

    /// Rounds on one broker connection, until `shutdown` or a broker error.
    async fn rounds(
        &self,
        connection: &lapin::Connection,
        topology: &Topology,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), BrokerError> {
        let wakeup = &self.settings.wakeup;
        topology.declare(connection).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await?;
        let mut ticks = tokio::time::interval(Duration::from_secs(wakeup.scheduler_interval_secs));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        info!("wake-up scheduler running");
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.changed() => return Ok(()),
            }
            self.forget_old_claims().await;
            // One full batch after another until nothing is due.
            loop {
                match self.round(&channel, topology).await {
                    Ok(claimed) if claimed == wakeup.scheduler_batch_size as usize => continue,
                    Ok(_) => break,
                    Err(SchedulerError::Database(e)) => {
                        warn!(error = %e, "wake-up scheduler: Postgres unavailable; next round");
                        break;
                    }
                    Err(SchedulerError::Broker(e)) => return Err(e),
                }
            }
        }
    }

    /// Claims of tokens woken by RFC 8599 parameters matter only within the window; older
    /// ones are dropped so that the table holds one row per recently woken token.
    async fn forget_old_claims(&self) {
        let window = self.settings.wakeup.wakeup_min_interval_secs as f64;
        let forgotten = match self.pool.get().await {
            Ok(client) => client
                .execute(
                    "DELETE FROM wakeup_claims
                      WHERE last_wakeup_at < now() - make_interval(secs => $1)",
                    &[&window],
                )
                .await
                .map_err(DbError::query("wakeup_claims")),
            Err(e) => Err(DbError::from(e)),
        };
        if let Err(e) = forgotten {
            warn!(error = %e, "old wake-up claims not removed; next round");
        }
    }

    /// One batch: the claim and the publishes share a transaction, so that a device is marked
    /// woken only once its wake-up is queued (a crash or a broker error in between leaves it
    /// due), and other instances skip the rows it holds. Returns how many it queued.
    async fn round(
        &self,
        channel: &lapin::Channel,
        topology: &Topology,
    ) -> Result<usize, SchedulerError> {
        let wakeup = &self.settings.wakeup;
        let policy = *self.settings.event_policies().get(Event::Wakeup);
        let mut client = self.pool.get().await.map_err(DbError::from)?;
        let tx = tokio_postgres::Client::transaction(&mut client)
            .await
            .map_err(DbError::query("wake-up schedule"))?;
        let due = claim_due(
            &tx,
            wakeup.register_wakeup_threshold,
            Duration::from_secs(wakeup.wakeup_min_interval_secs),
            wakeup.scheduler_batch_size,
        )
        .await?;
        for target in &due {
            let job = target.job(&policy, None);
            if let Err(e) = publish(channel, topology, &job, policy.ttl).await {
                metrics::counter!("pushfleet_wakeups_total", "source" => "scheduler", "outcome" => "not_queued")
                    .increment(1);
                // Dropped, the transaction rolls back: every device of the batch stays due.
                return Err(e.into());
            }
        }
        tx.commit()
            .await
            .map_err(DbError::query("wake-up schedule"))?;
        metrics::counter!("pushfleet_wakeups_total", "source" => "scheduler", "outcome" => "queued")
            .increment(due.len() as u64);
        if !due.is_empty() {
            info!(woken = due.len(), "wake-ups queued");
        }
        Ok(due.len())
    }
}

/// Publishes a job into its lane with a confirm.
async fn publish(
    channel: &lapin::Channel,
    topology: &Topology,
    job: &Job,
    ttl: Duration,
) -> Result<(), BrokerError> {
    let body = serde_json::to_vec(job)?;
    let properties =
        topology::job_properties(job.id).with_expiration(ttl.as_millis().to_string().into());
    let published = channel
        .basic_publish(
            topology.jobs_exchange().into(),
            Topology::lane_key(job.lane).into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &body,
            properties,
        )
        .await;
    topology::confirm(published, Duration::from_secs(5)).await
}

/// Gives a device claimed through the API back (its push was not queued), for the next request.
pub async fn release(client: &impl GenericClient, target: &WakeTarget) {
    let released = client
        .execute(
            "UPDATE device_tokens SET last_wakeup_at = NULL
              WHERE account = $1 AND app_id = $2 AND device_id = $3",
            &[&target.account, &target.app_id, &target.device_id],
        )
        .await;
    if let Err(e) = released {
        warn!(error = %e, "a claimed wake-up could not be released");
    }
}
