//! TLS accept loop shared by the fakes: TCP → rustls → hyper (HTTP/2 or HTTP/1.1) → axum.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// Connection ids are unique across every fake in the process, so journals can be merged.
static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// Per-connection facts and controls, put into every request's extensions.
pub(crate) struct ConnInfo {
    pub(crate) id: u64,
    /// DER of the client certificate, when the client presented one the CA vouches for.
    pub(crate) peer_cert: Option<Vec<u8>>,
    next_stream: AtomicU64,
    drop_now: Notify,
    goaway: Notify,
    /// APNs binds provider-token state to the connection.
    pub(crate) apns_auth: Mutex<crate::apns::ConnAuth>,
}

impl ConnInfo {
    pub(crate) fn next_stream_order(&self) -> u64 {
        self.next_stream.fetch_add(1, Ordering::Relaxed)
    }

    /// Closes the TCP connection at once, unanswered streams included.
    pub(crate) fn drop_connection(&self) {
        self.drop_now.notify_one();
    }

    /// Starts a graceful HTTP/2 shutdown (GOAWAY); open streams may still finish.
    pub(crate) fn goaway(&self) {
        self.goaway.notify_one();
    }
}

#[derive(Clone, Copy)]
pub(crate) struct ConnSettings {
    pub(crate) http2_only: bool,
    pub(crate) max_concurrent_streams: u32,
}

/// A running server; dropping the last handle stops it and closes its connections.
pub(crate) struct ServerHandle {
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
}

impl ServerHandle {
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub(crate) fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

pub(crate) async fn bind(port: u16) -> Result<TcpListener> {
    TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("binding 127.0.0.1:{port}"))
}

/// Serves `router` over TLS on `listener` until the handle is dropped.
pub(crate) fn spawn(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    router: Router,
    settings: ConnSettings,
) -> Result<ServerHandle> {
    let addr = listener.local_addr()?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let acceptor = TlsAcceptor::from(tls);
    let mut stop = shutdown_rx.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _peer)) => {
                        let _ = tcp.set_nodelay(true);
                        tokio::spawn(serve_connection(
                            tcp,
                            acceptor.clone(),
                            router.clone(),
                            settings,
                            shutdown_rx.clone(),
                        ));
                    }
                    // Out of file descriptors and the like: back off instead of spinning.
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                },
            }
        }
    });
    Ok(ServerHandle { addr, shutdown })
}

async fn serve_connection(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    router: Router,
    settings: ConnSettings,
    mut stop: watch::Receiver<bool>,
) {
    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!("TLS handshake failed: {e}");
            return;
        }
        Err(_) => return,
    };
    let peer_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|c| c.as_ref().to_vec());
    let info = Arc::new(ConnInfo {
        id: NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
        peer_cert,
        next_stream: AtomicU64::new(0),
        drop_now: Notify::new(),
        goaway: Notify::new(),
        apns_auth: Mutex::new(Default::default()),
    });

    let service = {
        let info = info.clone();
        hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(info.clone());
            router.clone().oneshot(req)
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    if settings.http2_only {
        builder = builder.http2_only();
    }
    builder
        .http2()
        .max_concurrent_streams(settings.max_concurrent_streams);
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    let mut goaway_sent = false;
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!("connection {} ended: {e}", info.id);
                }
                break;
            }
            // Dropping the connection future closes the socket with no GOAWAY, like a
            // crashed or unplugged server.
            _ = info.drop_now.notified() => break,
            _ = info.goaway.notified(), if !goaway_sent => {
                goaway_sent = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = stop.changed() => break,
        }
    }
}
