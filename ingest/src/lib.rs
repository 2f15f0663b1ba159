//! pushfleet-ingest: the HTTP API that SIP proxies, SylkServer and app servers call. It validates
//! Sylk-compatible push requests, turns each into a job in RabbitMQ, and either waits for the
//! worker's answer (sync mode, what Sylk clients expect) or answers 202 at once (async mode).
#![forbid(unsafe_code)]

pub mod acl;
#[cfg(test)]
mod arbitrary;
mod audit;
mod auth;
mod broker;
mod call_options;
mod describe;
mod endpoint;
mod error;
mod fcm_projects;
mod fields;
mod limits;
mod ops;
mod pipeline;
mod request;
mod rfc8599;
mod routes;
mod state;
mod unifiedpush;
mod v1;
mod v2;
mod validate;
mod wakeup;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pushfleet_core::db::{self, DbError};
use pushfleet_core::http;
use pushfleet_core::reload::{self, AppChanges};
use pushfleet_core::tls::{ServerCertError, ServerTls};
use pushfleet_core::topology::BrokerError;
use pushfleet_core::Settings;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::acl::{AccessList, InvalidEntry};
use crate::broker::{Broker, OpenError};
use crate::state::AppState;

/// Why ingest did not start. Each names what it could not use.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The listener handed over has no local address.
    #[error("listener: {0}")]
    Listener(#[source] std::io::Error),
    #[error(transparent)]
    AccessList(#[from] InvalidEntry),
    #[error("[ingest] {key}: {0}", key = .0.key())]
    Tls(#[from] ServerCertError),
    /// A non-loopback listener that would serve anyone: the operator must choose.
    #[error("ingest listens on {addr}, which is not a loopback address, with neither [ingest] require_api_key = true nor [ingest] allowed_hosts set: set one of them, or [ingest] allow_anonymous = true to serve anyone who reaches it")]
    OpenListener { addr: SocketAddr },
    /// `require_api_key` is set and the key table cannot be read.
    #[error("cannot load the API keys: {0} (has `pushfleet-worker migrate` run?)")]
    ApiKeys(#[source] DbError),
    #[error(transparent)]
    Database(#[from] DbError),
    /// No connection to RabbitMQ (`BrokerError::Unreachable` or `ConnectTimeout`).
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// Connected, but the topology or the reply consumer could not be set up.
    #[error("RabbitMQ set-up failed: {0}")]
    BrokerSetUp(#[source] lapin::Error),
}

impl From<OpenError> for StartError {
    fn from(error: OpenError) -> StartError {
        match error {
            OpenError::Connect(e) => StartError::Broker(e),
            OpenError::SetUp(e) => StartError::BrokerSetUp(e),
        }
    }
}

/// Why ingest did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    #[error("HTTP server task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// After the HTTP drain, how long the broker link gets to close cleanly.
const BROKER_CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// A running ingest server.
pub struct Ingest {
    pub addr: SocketAddr,
    /// The admin listener's address, when `[ingest] admin_listen` is set.
    pub admin_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<Result<(), StopError>>,
    tls: Option<ServerTls>,
    state: Arc<AppState>,
}

impl Ingest {
    /// Connects to Postgres and the broker (an error if either is unreachable) and serves on
    /// `listener`.
    pub async fn start(settings: Settings, listener: TcpListener) -> Result<Ingest, StartError> {
        describe::describe();
        let addr = listener.local_addr().map_err(StartError::Listener)?;
        let acl = AccessList::parse("allowed_hosts", &settings.ingest.allowed_hosts)?;
        if auth::open_to_anyone(&settings.ingest, addr) {
            return Err(StartError::OpenListener { addr });
        }
        let tls = match settings.ingest.tls_files() {
            Some((cert, key)) => Some(ServerTls::load(cert, key)?),
            None => None,
        };
        let admin = match settings.ingest.admin_listen {
            Some(addr) => Some((
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Listen { addr, source })?,
                AccessList::parse("admin_allowed_hosts", &settings.ingest.admin_allowed_hosts)?,
            )),
            None => None,
        };
        let admin_addr = match &admin {
            Some((listener, _)) => Some(listener.local_addr().map_err(StartError::Listener)?),
            None => None,
        };
        // The v2 token API and audit queries need the database from the first request on.
        let db = db::pool(&settings.postgres)?;
        db::ping(&db, &settings.postgres).await?;
        let api_keys = auth::load_at_start(&db, &settings.ingest).await?;
        let (shutdown, mut shutdown_rx) = watch::channel(false);
        // The broker link outlives the HTTP drain: sync requests still in progress at shutdown
        // wait for their answers over it.
        let (close_broker, close_broker_rx) = watch::channel(false);
        let broker = Broker::start(
            settings.rabbitmq.clone(),
            Duration::from_millis(settings.ingest.publish_timeout_ms),
            settings.ingest.publishes_in_flight,
            close_broker_rx,
        )
        .await?;
        let http = settings.http.clone();
        let grace = Duration::from_millis(settings.ingest.shutdown_timeout_ms);
        let state = Arc::new(AppState::new(settings, broker.clone(), db));
        let admin =
            admin.map(|(listener, acl)| (listener, routes::admin_router(state.clone(), acl)));
        auth::keep_fresh(&state, api_keys);
        let app = routes::router(state.clone(), acl);
        let mut admin_shutdown = shutdown_rx.clone();
        let served_tls = tls.clone();
        let server = tokio::spawn(async move {
            let stop = async move {
                let _ = shutdown_rx.wait_for(|stop| *stop).await;
            };
            let admin_stop = async move {
                let _ = admin_shutdown.wait_for(|stop| *stop).await;
            };
            let admin = async {
                if let Some((listener, app)) = admin {
                    http::serve(listener, app, &http, admin_stop, grace).await;
                }
            };
            tokio::join!(
                http::serve_tls(listener, app, &http, served_tls, stop, grace),
                admin
            );
            let _ = close_broker.send(true);
            let closed = async {
                while broker.is_connected() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            if tokio::time::timeout(BROKER_CLOSE_TIMEOUT, closed)
                .await
                .is_err()
            {
                warn!("the RabbitMQ connection did not close in time");
            }
            Ok(())
        });
        info!(%addr, admin = ?admin_addr, https = tls.is_some(), "ingest listening");
        Ok(Ingest {
            addr,
            admin_addr,
            shutdown,
            server,
            tls,
            state,
        })
    }

    /// Re-reads the configuration file (what SIGHUP does): apps added, removed or changed, and
    /// the `[ingest]` keys a reload may change, apply to the requests that start from now on;
    /// the HTTPS certificate is re-read. A file that does not load is refused, and the settings
    /// in force stay. False when anything was refused.
    pub fn reload(&self, path: &Path) -> bool {
        let current = self.state.live();
        let Some(new) = reload::reread(path, &current.settings) else {
            return false;
        };
        self.state.reload(&new);
        reload::applied(&AppChanges::between(&current.settings.apps, &new.apps).to_string());
        // A certificate that does not load is logged by the TLS reload, which keeps the
        // previous one; the settings above are in force either way.
        let reloaded_tls = self.reload_tls().is_ok();
        if !reloaded_tls {
            reload::count_failure();
        }
        reloaded_tls
    }

    /// Whether ingest serves HTTPS, with a certificate `reload_tls` can replace.
    pub fn serves_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Re-reads `[ingest] tls_cert_file` and `tls_key_file` (what SIGHUP does): connections
    /// from now on get the new certificate. Files that cannot be used leave the current
    /// certificate in place; the error is logged and returned. Without TLS, nothing to do.
    pub fn reload_tls(&self) -> Result<(), ServerCertError> {
        match &self.tls {
            Some(tls) => tls.reload(),
            None => Ok(()),
        }
    }

    /// Binds the configured address and starts.
    pub async fn bind(settings: Settings) -> Result<Ingest, StartError> {
        let addr = settings.ingest.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Listen { addr, source })?;
        Ingest::start(settings, listener).await
    }

    /// Stops accepting and closes idle connections, lets in-flight requests finish for up to
    /// `[ingest] shutdown_timeout_ms`, closes the connections still open, then the broker link.
    pub async fn stop(self) -> Result<(), StopError> {
        let _ = self.shutdown.send(true);
        self.server.await?
    }
}
