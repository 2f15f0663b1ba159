//! pushfleet-worker: consumes push jobs from RabbitMQ, sends them to APNs and FCM, reports each
//! outcome, and (in the audit sink) writes the audit trail to Postgres.
#![forbid(unsafe_code)]

pub mod acks;
pub mod audit;
pub mod dead_tokens;
pub mod dispatch;
pub mod ledger_view;
pub mod outcomes;
pub mod payload;
pub mod providers;
pub mod replies;
pub mod retry;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use pushfleet_core::config::HttpSettings;
use pushfleet_core::db::{self, DbError};
use pushfleet_core::http;
use pushfleet_core::reconnect;
use pushfleet_core::service::metrics_recorder;
use pushfleet_core::topology::{self, BrokerError, Topology};
use pushfleet_core::Settings;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::audit::AuditSink;
use crate::dispatch::Dispatcher;
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
}

/// A running worker process: senders, optionally the audit sink, and its HTTP endpoint.
pub struct Worker {
    pub http_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Worker {
    /// Checks credentials, the broker and (for the audit sink) Postgres, then starts. Each
    /// check failing is a start-up error with a one-line reason.
    pub async fn start(settings: Settings, http: TcpListener) -> Result<Worker, StartError> {
        let worker_id = settings.worker.id.clone().unwrap_or_else(default_worker_id);
        let dispatcher = Arc::new(Dispatcher::new(&settings, worker_id.clone())?);
        let first_connection = topology::connect(&settings.rabbitmq, &worker_id).await?;
        let topology = Topology::new(&settings.rabbitmq);
        let channel = first_connection
            .create_channel()
            .await
            .map_err(BrokerError::from)?;
        topology
            .declare(&channel)
            .await
            .map_err(BrokerError::from)?;
        let _ = channel.close(200, "declared".into()).await;

        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        // Every worker reads the dead-token list; only audit sinks need Postgres at start-up.
        let pool = db::pool(&settings.postgres)?;
        let sink = if settings.worker.audit_sink {
            db::ping(&pool, &settings.postgres).await?;
            tasks.spawn(audit::maintain_partitions(
                pool.clone(),
                shutdown_rx.clone(),
            ));
            Some(Arc::new(AuditSink::new(
                pool.clone(),
                topology.clone(),
                settings.worker.audit_batch_size,
                Duration::from_millis(settings.worker.audit_flush_ms),
            )))
        } else {
            None
        };
        let dead_tokens = dispatcher.dead_tokens.clone();
        let refresh = Duration::from_secs(settings.worker.invalid_tokens_refresh_secs);
        let stop = shutdown_rx.clone();
        tasks.spawn(async move { dead_tokens.keep_loaded(pool, refresh, stop).await });

        let http_addr = http.local_addr().map_err(|source| StartError::Listen {
            addr: settings.worker.listen,
            source,
        })?;
        tasks.spawn(serve_http(http, settings.http.clone(), shutdown_rx.clone()));
        tasks.spawn(supervise(
            settings,
            worker_id,
            dispatcher,
            sink,
            Some(first_connection),
            shutdown_rx,
        ));
        info!(%http_addr, "worker started");
        Ok(Worker {
            http_addr,
            shutdown,
            tasks,
        })
    }

    pub async fn bind(settings: Settings) -> Result<Worker, StartError> {
        let addr = settings.worker.listen;
        let http = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Listen { addr, source })?;
        Worker::start(settings, http).await
    }

    /// Stops consuming, finishes the jobs in hand, flushes outcomes, closes connections.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "worker".into());
    format!("{host}-{}", std::process::id())
}

/// Owns the broker connection: runs the dispatcher and the sink on it, and reconnects when it
/// drops, until shutdown.
async fn supervise(
    settings: Settings,
    worker_id: String,
    dispatcher: Arc<Dispatcher>,
    sink: Option<Arc<AuditSink>>,
    mut connection: Option<lapin::Connection>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let conn = match connection.take() {
            Some(c) => c,
            None => {
                let connect = || topology::connect(&settings.rabbitmq, &worker_id);
                match reconnect::until_ok("RabbitMQ unreachable", &mut shutdown, connect).await {
                    Some(c) => {
                        info!("reconnected to RabbitMQ");
                        c
                    }
                    None => return,
                }
            }
        };
        metrics::gauge!("pushfleet_broker_connected", "service" => "worker").set(1.0);
        let declare = async {
            let channel = conn.create_channel().await?;
            Topology::new(&settings.rabbitmq).declare(&channel).await?;
            channel.close(200, "declared".into()).await
        };
        let work = async {
            declare.await?;
            let senders = dispatcher.run(&conn, settings.rabbitmq.prefetch, shutdown.clone());
            let ledger = dispatcher.ledger.run(&conn, shutdown.clone());
            match &sink {
                Some(sink) => {
                    // Any part failing ends the work, and the connection is opened anew.
                    tokio::try_join!(
                        senders,
                        ledger,
                        sink.run(&conn, shutdown.clone()),
                        sink.run_dead_letters(&conn, shutdown.clone())
                    )
                    .map(|_| ())
                }
                None => tokio::try_join!(senders, ledger).map(|_| ()),
            }
        };
        // A dead connection ends the work at once: its unacked jobs return to the queues, and
        // the loop reconnects.
        let result = tokio::select! {
            result = work => result,
            _ = topology::closed(&conn) => Ok(()),
        };
        metrics::gauge!("pushfleet_broker_connected", "service" => "worker").set(0.0);
        if *shutdown.borrow() {
            let _ = conn.close(200, "shutdown".into()).await;
            return;
        }
        match result {
            Err(e) => warn!(error = %e, "lost the RabbitMQ connection; reconnecting"),
            Ok(()) => warn!("RabbitMQ cancelled our consumers; reconnecting"),
        }
        let _ = conn.close(200, "reconnecting".into()).await;
    }
}

/// Probes and scrapes answer in milliseconds: a hung scraper must not hold up the worker's exit.
const HTTP_SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

async fn serve_http(
    listener: TcpListener,
    limits: HttpSettings,
    mut shutdown: watch::Receiver<bool>,
) {
    let metrics = metrics_recorder();
    let app = Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        metrics.render(),
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
