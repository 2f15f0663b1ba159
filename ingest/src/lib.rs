//! pushfleet-ingest: the HTTP API that SIP proxies, SylkServer and app servers call. It validates
//! Sylk-compatible push requests, turns each into a job in RabbitMQ, and either waits for the
//! worker's answer (sync mode, what Sylk clients expect) or answers 202 at once (async mode).
#![forbid(unsafe_code)]

pub mod acl;
pub mod broker;
pub mod error;
pub mod rfc8599;
pub mod routes;
pub mod tokens;
pub mod v1;
pub mod v2;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pushfleet_core::{db, Settings};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

use crate::acl::AccessList;
use crate::broker::Broker;

/// A running ingest server.
pub struct Ingest {
    pub addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<Result<(), String>>,
}

impl Ingest {
    /// Connects to Postgres and the broker (an error if either is unreachable) and serves on
    /// `listener`.
    pub async fn start(settings: Settings, listener: TcpListener) -> Result<Ingest, String> {
        let addr = listener
            .local_addr()
            .map_err(|e| format!("listener: {e}"))?;
        let acl = AccessList::parse(&settings.ingest.allowed_hosts)?;
        // The v2 token API and audit queries need the database from the first request on.
        let db = db::pool(&settings.postgres)?;
        db::ping(&db, &settings.postgres).await?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let broker = Broker::start(
            settings.rabbitmq.clone(),
            Duration::from_millis(settings.ingest.publish_timeout_ms),
            shutdown_rx.clone(),
        )
        .await?;
        let state = Arc::new(routes::AppState::new(settings, broker, db, acl));
        let app = routes::router(state).into_make_service_with_connect_info::<SocketAddr>();
        let mut stop = shutdown_rx;
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|stop| *stop).await;
                })
                .await
                .map_err(|e| format!("HTTP server: {e}"))
        });
        info!(%addr, "ingest listening");
        Ok(Ingest {
            addr,
            shutdown,
            server,
        })
    }

    /// Binds the configured address and starts.
    pub async fn bind(settings: Settings) -> Result<Ingest, String> {
        let listen = settings.ingest.listen;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        Ingest::start(settings, listener).await
    }

    /// Stops accepting, lets in-flight requests finish, closes the broker link.
    pub async fn stop(self) -> Result<(), String> {
        let _ = self.shutdown.send(true);
        self.server
            .await
            .map_err(|e| format!("HTTP server task: {e}"))?
    }
}
