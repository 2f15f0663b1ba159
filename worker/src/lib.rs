//! pushfleet-worker: consumes push jobs from RabbitMQ, sends them to APNs and FCM, reports each
//! outcome, and (in the audit sink) writes the audit trail to Postgres.
#![forbid(unsafe_code)]

pub mod acks;
pub mod audit;
pub mod dead_tokens;
mod describe;
pub mod dispatch;
pub mod ledger_view;
pub mod links;
pub mod outcomes;
pub mod payload;
pub mod providers;
pub mod remote_log;
pub mod replies;
pub mod retry;
pub mod xmpp;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use deadpool_postgres::Pool;
use pushfleet_core::config::{HttpSettings, PostgresSettings};
use pushfleet_core::db::{self, DbError};
use pushfleet_core::http;
use pushfleet_core::reconnect;
use pushfleet_core::reload;
use pushfleet_core::service::{self, metrics_recorder};
use pushfleet_core::topology::{BrokerError, Topology};
use pushfleet_core::Settings;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::audit::AuditSink;
use crate::dispatch::Dispatcher;
use crate::links::Links;
use crate::providers::ProviderError;

/// Why a worker cannot start; each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Database(#[from] DbError),
    /// A credential file, CA file or endpoint of an app.
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// `[xmpp] secret_file`, read again at start.
    #[error(transparent)]
    Xmpp(#[from] pushfleet_core::config::ConfigError),
}

/// A running worker process: senders, optionally the audit sink, and its HTTP endpoint.
pub struct Worker {
    pub http_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    shutdown_timeout: Duration,
    tasks: JoinSet<()>,
    dispatcher: Arc<Dispatcher>,
    /// The settings in force: what a reload compares the file with.
    settings: Arc<Mutex<Settings>>,
}

impl Worker {
    /// Checks credentials, the broker and (for the audit sink) Postgres, then starts. Each
    /// check failing is a start-up error with a one-line reason.
    pub async fn start(settings: Settings, http: TcpListener) -> Result<Worker, StartError> {
        describe::describe();
        let worker_id = settings.worker.id.clone().unwrap_or_else(default_worker_id);
        let dispatcher = Arc::new(Dispatcher::new(&settings, worker_id.clone())?);
        let links = Links::open(&settings.rabbitmq, &worker_id, settings.worker.audit_sink).await?;
        let topology = Topology::new(&settings.rabbitmq);
        topology.declare(&links.publish).await?;
        // Before the first outcome: none may pass the fanout before the log queue is bound.
        let remote_log = remote_log::configured(&settings);
        if remote_log {
            topology.declare_remote_log(&links.publish).await?;
        }

        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        // Every worker reads the dead-token list; only audit sinks need Postgres at start-up.
        let pool = db::pool(&settings.postgres)?;
        let sink = if settings.worker.audit_sink {
            db::ping(&pool, &settings.postgres).await?;
            tasks.spawn(audit::maintain_partitions(
                pool.clone(),
                settings.audit.retention_days,
                shutdown_rx.clone(),
            ));
            Some(Arc::new(AuditSink::new(
                pool.clone(),
                topology.clone(),
                remote_log,
                settings.worker.audit_batch_size,
                Duration::from_millis(settings.worker.audit_flush_ms),
            )))
        } else {
            None
        };
        audit::describe();
        remote_log::describe();
        if remote_log {
            tasks.spawn(remote_log::run(
                settings.clone(),
                worker_id.clone(),
                shutdown_rx.clone(),
            ));
        }
        let dead_tokens = dispatcher.dead_tokens.clone();
        let refresh = Duration::from_secs(settings.worker.invalid_tokens_refresh_secs);
        let stop = shutdown_rx.clone();
        let dead_tokens_pool = pool.clone();
        tasks.spawn(async move {
            dead_tokens
                .keep_loaded(dead_tokens_pool, refresh, stop)
                .await
        });
        if let Some(gateway) = settings.xmpp.clone() {
            let secret = gateway.secret()?;
            tasks.spawn(xmpp::run(
                settings.clone(),
                gateway,
                secret,
                pool.clone(),
                worker_id.clone(),
                shutdown_rx.clone(),
            ));
        }
        let current = Arc::new(Mutex::new(settings.clone()));
        tasks.spawn(watch_credentials(
            dispatcher.clone(),
            current.clone(),
            shutdown_rx.clone(),
        ));

        let http_addr = http.local_addr().map_err(|source| StartError::Listen {
            addr: settings.worker.listen,
            source,
        })?;
        let connected = Arc::new(AtomicBool::new(false));
        tasks.spawn(serve_http(
            http,
            settings.http.clone(),
            Probes {
                connected: connected.clone(),
                pool,
                postgres: settings.postgres.clone(),
            },
            shutdown_rx.clone(),
        ));
        let shutdown_timeout = Duration::from_millis(settings.worker.shutdown_timeout_ms);
        tasks.spawn(supervise(
            settings,
            worker_id,
            dispatcher.clone(),
            sink,
            Some(links),
            connected,
            shutdown_rx,
        ));
        info!(%http_addr, "worker started");
        Ok(Worker {
            http_addr,
            shutdown,
            shutdown_timeout,
            tasks,
            dispatcher,
            settings: current,
        })
    }

    /// Re-reads the configuration file (what SIGHUP does): apps added, removed or changed and
    /// `[retry]` apply to the jobs taken from now on, jobs in flight finish with the client they
    /// started with, and changed credential files are read again. A file or a credential that
    /// cannot be used refuses the reload, and the configuration in force stays. False when
    /// refused.
    pub fn reload(&self, path: &Path) -> bool {
        let current = self
            .settings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(new) = reload::reread(path, &current) else {
            return false;
        };
        let next = current.reloaded_from(&new);
        match self.dispatcher.reload(&next.apps, &next.retry) {
            Ok(changes) => {
                *self.settings.lock().unwrap_or_else(PoisonError::into_inner) = next;
                reload::applied(&changes.to_string());
                true
            }
            Err(e) => {
                reload::refused(&e);
                false
            }
        }
    }

    pub async fn bind(settings: Settings) -> Result<Worker, StartError> {
        let addr = settings.worker.listen;
        let http = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Listen { addr, source })?;
        Worker::start(settings, http).await
    }

    /// Stops consuming, finishes the jobs in hand, flushes outcomes, closes connections. Jobs
    /// still unfinished after `[worker] shutdown_timeout_ms` are dropped with their
    /// connections, which returns them to their queues for another worker.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        let drained = tokio::time::timeout(self.shutdown_timeout, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                timeout_ms = self.shutdown_timeout.as_millis() as u64,
                "jobs still in hand at the shutdown deadline; returned to their queues"
            );
            self.tasks.shutdown().await;
        }
    }
}

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "worker".into());
    format!("{host}-{}", std::process::id())
}

/// Owns the broker connections: runs the dispatcher and the sink on them, and reconnects when
/// one drops, until shutdown.
async fn supervise(
    settings: Settings,
    worker_id: String,
    dispatcher: Arc<Dispatcher>,
    sink: Option<Arc<AuditSink>>,
    mut opened: Option<Links>,
    connected: Arc<AtomicBool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let audit_sink = sink.is_some();
    loop {
        let links = match opened.take() {
            Some(links) => links,
            None => {
                let open = || Links::open(&settings.rabbitmq, &worker_id, audit_sink);
                match reconnect::until_ok("RabbitMQ unreachable", &mut shutdown, open).await {
                    Some(links) => {
                        info!("reconnected to RabbitMQ");
                        links
                    }
                    None => return,
                }
            }
        };
        metrics::gauge!("pushfleet_broker_connected", "service" => "worker").set(1.0);
        connected.store(true, Ordering::Relaxed);
        let work = async {
            Topology::new(&settings.rabbitmq)
                .declare(&links.publish)
                .await?;
            let senders = dispatcher.run(&links, settings.rabbitmq.prefetch, shutdown.clone());
            let ledger = dispatcher.ledger.run(&links, shutdown.clone());
            match (&sink, &links.audit) {
                (Some(sink), Some(audit)) => {
                    // Any part failing ends the work, and the connections are opened anew.
                    tokio::try_join!(
                        senders,
                        ledger,
                        sink.run(audit, &links.publish, shutdown.clone()),
                        sink.run_dead_letters(audit, &links.publish, shutdown.clone())
                    )
                    .map(|_| ())
                }
                _ => tokio::try_join!(senders, ledger).map(|_| ()),
            }
        };
        // A dead connection ends the work at once: unacked jobs return to the queues, and the
        // loop reconnects.
        let result: Result<(), BrokerError> = tokio::select! {
            result = work => result,
            _ = links.any_closed() => Ok(()),
        };
        metrics::gauge!("pushfleet_broker_connected", "service" => "worker").set(0.0);
        connected.store(false, Ordering::Relaxed);
        if *shutdown.borrow() {
            links.close("shutdown").await;
            return;
        }
        match result {
            Err(e) => warn!(error = %e, "lost the RabbitMQ connection; reconnecting"),
            Ok(()) => warn!("RabbitMQ cancelled our consumers; reconnecting"),
        }
        links.close("reconnecting").await;
    }
}

/// Re-reads the apps' credential and CA files when they change on disk (a rotated key or
/// certificate), every `[worker] credentials_check_secs`.
async fn watch_credentials(
    dispatcher: Arc<Dispatcher>,
    settings: Arc<Mutex<Settings>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let every = settings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .worker
            .credentials_check_secs;
        // 0: only on SIGHUP; the setting is looked at again in a while, as a reload may set it.
        let wait = Duration::from_secs(if every == 0 { 60 } else { every });
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
        if every == 0 {
            continue;
        }
        match dispatcher.refresh_credentials() {
            None => {}
            Some(Ok(changes)) => reload::applied(&format!("credential files: {changes}")),
            Some(Err(e)) => reload::refused(&e),
        }
    }
}

/// Probes and scrapes answer in milliseconds: a hung scraper must not hold up the worker's exit.
const HTTP_SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// A probe answers in time for whoever calls it, whatever the pool's own timeouts.
const DB_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// What `/ready` looks at.
#[derive(Clone)]
struct Probes {
    connected: Arc<AtomicBool>,
    pool: Pool,
    postgres: PostgresSettings,
}

impl Probes {
    async fn postgres_up(&self) -> bool {
        service::probe_postgres(&self.pool, &self.postgres, "worker", DB_PROBE_TIMEOUT).await
    }
}

/// The worker's own listener, for operators only: liveness, readiness (connected to RabbitMQ
/// and consuming, Postgres answering) and the Prometheus metrics.
async fn serve_http(
    listener: TcpListener,
    limits: HttpSettings,
    probes: Probes,
    mut shutdown: watch::Receiver<bool>,
) {
    let metrics = metrics_recorder();
    let scraped = probes.clone();
    let app = Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route(
            "/ready",
            get(move || async move {
                let not_ready = |what: &str| {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        Json(json!({ "status": format!("not connected to {what}") })),
                    )
                };
                if !probes.connected.load(Ordering::Relaxed) {
                    not_ready("RabbitMQ")
                } else if !probes.postgres_up().await {
                    not_ready("Postgres")
                } else {
                    (StatusCode::OK, Json(json!({"status": "ready"})))
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let (metrics, probes) = (metrics.clone(), scraped.clone());
                async move {
                    probes.postgres_up().await;
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        service::render_metrics(&metrics),
                    )
                        .into_response()
                }
            }),
        );
    let stop = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    http::serve(listener, app, &limits, stop, HTTP_SHUTDOWN_GRACE).await;
}
