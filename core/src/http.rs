//! Serving HTTP (ingest's API, the worker's probes and metrics) so that no client can wedge a
//! listener: a connection must deliver each request head within `header_read_timeout_ms` and may
//! sit idle between requests for `idle_timeout_ms`; a request body that is read must arrive
//! within `request_body_timeout_ms`; at most `max_connections` connections are served at once,
//! further ones wait in the listen backlog until one closes. HTTP/1.1 and HTTP/2 (prior
//! knowledge) are served on the same port, and handlers see the peer as `ConnectInfo`. With TLS
//! (`serve_tls`) the handshake counts against the first request head's time, and ALPN offers
//! both protocols.
//!
//! Shutdown stops accepting, closes idle connections, lets requests in progress finish up to a
//! grace period and then closes whatever is left.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::response::Response;
use axum::Router;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::service::Service;
use hyper::{Request, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{sleep_until, Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, error, info};

use crate::config::HttpSettings;
use crate::tls::ServerTls;

type BoxError = Box<dyn StdError + Send + Sync>;

/// The `[http]` settings as durations.
#[derive(Debug, Clone, Copy)]
struct Limits {
    header_read: Duration,
    body: Duration,
    idle: Duration,
}

impl From<&HttpSettings> for Limits {
    fn from(settings: &HttpSettings) -> Limits {
        Limits {
            header_read: Duration::from_millis(settings.header_read_timeout_ms),
            body: Duration::from_millis(settings.request_body_timeout_ms),
            idle: Duration::from_millis(settings.idle_timeout_ms),
        }
    }
}

/// What the listener tells its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Finish the request in progress, take no new one.
    Draining,
    /// The grace period is over.
    Closing,
}

/// Serves `app` on `listener` until `stop` resolves, then drains: idle connections are closed at
/// once, requests in progress get up to `grace` to finish, and the connections still open after
/// that are closed. Returns when every connection is gone.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    settings: &HttpSettings,
    stop: impl Future<Output = ()>,
    grace: Duration,
) {
    serve_tls(listener, app, settings, None, stop, grace).await
}

/// `serve`, over TLS when `tls` is given.
pub async fn serve_tls(
    listener: TcpListener,
    app: Router,
    settings: &HttpSettings,
    tls: Option<ServerTls>,
    stop: impl Future<Output = ()>,
    grace: Duration,
) {
    let limits = Limits::from(settings);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The connection task below times request heads itself: hyper's header timer would also run
    // between keep-alive requests and cut idle connections after the (short) header timeout.
    builder.http1().header_read_timeout(None);
    // As axum::serve: extended CONNECT for HTTP/2.
    builder.http2().enable_connect_protocol();
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let (phase, phase_rx) = watch::channel(Phase::Serving);
    tokio::pin!(stop);
    loop {
        // At the cap nothing is accepted: new connections wait in the kernel's listen backlog
        // and are served in order as slots free up, which idle and slow ones do within their
        // timeouts.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut stop => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors, most likely: retrying at once would spin.
                error!(error = %e, "accept failed");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    () = &mut stop => break,
                }
            }
        };
        let connection = Connection {
            app: TowerToHyperService::new(app.clone()),
            peer,
            limits,
            tracker: Arc::new(Tracker::new()),
        };
        let tls = tls.as_ref().map(ServerTls::acceptor);
        tokio::spawn(connection.run(stream, tls, builder.clone(), phase_rx.clone(), slot));
    }
    drop(listener);
    drop(phase_rx);
    let open = phase.receiver_count();
    let _ = phase.send(Phase::Draining);
    if open > 0 {
        debug!(connections = open, "draining HTTP connections");
    }
    if tokio::time::timeout(grace, phase.closed()).await.is_err() {
        info!(
            connections = phase.receiver_count(),
            grace_ms = grace.as_millis() as u64,
            "closing the HTTP connections still busy at the shutdown deadline"
        );
        let _ = phase.send(Phase::Closing);
        phase.closed().await;
    }
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// One accepted connection and what its requests need.
struct Connection {
    app: TowerToHyperService<Router>,
    peer: SocketAddr,
    limits: Limits,
    tracker: Arc<Tracker>,
}

/// What a connection's timer does when it runs out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    /// A request head did not arrive in time (or nothing came at all): nothing is in progress,
    /// the socket is closed.
    HeadTimeout,
    /// Idle past the keep-alive timeout, over HTTP/1.1: closed.
    Idle,
    /// Idle past the keep-alive timeout, over HTTP/2: GOAWAY, so the client knows which of its
    /// streams were not taken.
    IdleGoAway,
    /// The GOAWAY was not followed by the end of the connection.
    GoAwayIgnored,
}

impl Connection {
    async fn run(
        self,
        stream: TcpStream,
        tls: Option<TlsAcceptor>,
        builder: auto::Builder<TokioExecutor>,
        mut phase: watch::Receiver<Phase>,
        _slot: OwnedSemaphorePermit,
    ) {
        let Some(tls) = tls else {
            return self.serve(stream, builder, phase).await;
        };
        // The handshake is part of the first request's head: a client that stalls in it is
        // closed when that time is up, as one that stalls in its headers is.
        let (head_due, _) = self
            .tracker
            .next_expiry(&self.limits, None)
            .expect("a new connection waits for its first request head");
        let handshake = tokio::time::timeout_at(head_due, tls.accept(stream));
        let stream = tokio::select! {
            handshake = handshake => match handshake {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    debug!(peer = %self.peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(peer = %self.peer, "closing the connection: no TLS handshake in time");
                    return;
                }
            },
            _ = phase.wait_for(|phase| *phase != Phase::Serving) => return,
        };
        self.serve(stream, builder, phase).await
    }

    async fn serve<S>(
        self,
        stream: S,
        builder: auto::Builder<TokioExecutor>,
        mut phase: watch::Receiver<Phase>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let tracker = self.tracker.clone();
        let (peer, limits) = (self.peer, self.limits);
        let io = TokioIo::new(WatchedStream {
            inner: stream,
            tracker: tracker.clone(),
        });
        let conn = builder.serve_connection_with_upgrades(io, self);
        tokio::pin!(conn);
        let timer = sleep_until(Instant::now() + limits.header_read);
        tokio::pin!(timer);
        let mut goaway_at: Option<Instant> = None;
        loop {
            let next = tracker.next_expiry(&limits, goaway_at);
            if let Some((at, _)) = next {
                if timer.deadline() != at {
                    timer.as_mut().reset(at);
                }
            }
            tokio::select! {
                biased;
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        debug!(%peer, error = %e, "HTTP connection ended with an error");
                    }
                    return;
                }
                changed = phase.changed() => {
                    let now = changed
                        .map(|()| *phase.borrow_and_update())
                        .unwrap_or(Phase::Closing);
                    match now {
                        Phase::Serving => {}
                        Phase::Draining => {
                            let state = tracker.snapshot();
                            if state.http2 {
                                conn.as_mut().graceful_shutdown();
                                goaway_at.get_or_insert_with(Instant::now);
                            } else if state.in_flight > 0 {
                                // HTTP/1.1: the response in progress is the last one.
                                conn.as_mut().graceful_shutdown();
                            } else {
                                return;
                            }
                        }
                        Phase::Closing => return,
                    }
                }
                () = tracker.changed.notified() => {}
                () = &mut timer, if next.is_some() => {
                    // The state may have moved on since the deadline was computed.
                    let Some((at, expiry)) = tracker.next_expiry(&limits, goaway_at) else {
                        continue;
                    };
                    if at > Instant::now() {
                        continue;
                    }
                    match expiry {
                        Expiry::HeadTimeout => {
                            debug!(%peer, "closing the connection: no request head in time");
                            return;
                        }
                        Expiry::Idle => {
                            debug!(%peer, "closing the idle connection");
                            return;
                        }
                        Expiry::IdleGoAway => {
                            conn.as_mut().graceful_shutdown();
                            goaway_at = Some(Instant::now());
                        }
                        Expiry::GoAwayIgnored => return,
                    }
                }
            }
        }
    }
}

impl Service<Request<Incoming>> for Connection {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        let in_progress = self.tracker.request_started(request.version());
        let deadline = BodyDeadline {
            timeout: self.limits.body,
            expired: Arc::new(AtomicBool::new(false)),
        };
        request.extensions_mut().insert(ConnectInfo(self.peer));
        request.extensions_mut().insert(deadline.clone());
        let request = request.map(|body| DeadlineBody {
            inner: body,
            started: Instant::now(),
            timer: None,
            deadline,
        });
        let response = self.app.call(request);
        Box::pin(async move {
            let response = response.await;
            drop(in_progress);
            response
        })
    }
}

/// What a connection is waiting for; shared by its task, its socket and its requests.
struct Tracker {
    state: Mutex<TrackerState>,
    /// Set while an HTTP/1.1 connection is idle: the next bytes start a request head, which must
    /// then be complete within the header timeout, however slowly it trickles in.
    awaiting_head: AtomicBool,
    /// Wakes the connection task when its deadline may have moved earlier.
    changed: Notify,
}

#[derive(Debug, Clone, Copy)]
struct TrackerState {
    in_flight: usize,
    http2: bool,
    waiting: Waiting,
}

#[derive(Debug, Clone, Copy)]
enum Waiting {
    /// For a request head since this instant (the first request counts from the accept).
    Head(Instant),
    /// Idle since this instant.
    Idle(Instant),
    /// Requests are in progress.
    Busy,
}

impl Tracker {
    fn new() -> Tracker {
        Tracker {
            state: Mutex::new(TrackerState {
                in_flight: 0,
                http2: false,
                waiting: Waiting::Head(Instant::now()),
            }),
            awaiting_head: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    fn snapshot(&self) -> TrackerState {
        *self.state.lock().expect("lock")
    }

    fn request_started(self: &Arc<Self>, version: Version) -> InProgress {
        self.awaiting_head.store(false, Ordering::Relaxed);
        let mut state = self.state.lock().expect("lock");
        state.in_flight += 1;
        state.http2 |= version == Version::HTTP_2;
        state.waiting = Waiting::Busy;
        InProgress(self.clone())
    }

    fn request_finished(&self) {
        let mut state = self.state.lock().expect("lock");
        state.in_flight -= 1;
        if state.in_flight == 0 {
            state.waiting = Waiting::Idle(Instant::now());
            // HTTP/2 frames (pings, window updates) say nothing about a next request.
            if !state.http2 {
                self.awaiting_head.store(true, Ordering::Relaxed);
            }
            drop(state);
            self.changed.notify_one();
        }
    }

    fn bytes_arrived(&self) {
        if !self.awaiting_head.load(Ordering::Relaxed)
            || !self.awaiting_head.swap(false, Ordering::Relaxed)
        {
            return;
        }
        let mut state = self.state.lock().expect("lock");
        if let Waiting::Idle(_) = state.waiting {
            state.waiting = Waiting::Head(Instant::now());
            drop(state);
            self.changed.notify_one();
        }
    }

    /// When the connection's timer runs out next, and what happens then.
    fn next_expiry(
        &self,
        limits: &Limits,
        goaway_at: Option<Instant>,
    ) -> Option<(Instant, Expiry)> {
        let state = self.snapshot();
        match (state.waiting, goaway_at) {
            (Waiting::Busy, _) => None,
            (Waiting::Head(since), _) => Some((since + limits.header_read, Expiry::HeadTimeout)),
            (Waiting::Idle(since), Some(sent)) => {
                Some((since.max(sent) + limits.header_read, Expiry::GoAwayIgnored))
            }
            (Waiting::Idle(since), None) if state.http2 => {
                Some((since + limits.idle, Expiry::IdleGoAway))
            }
            (Waiting::Idle(since), None) => Some((since + limits.idle, Expiry::Idle)),
        }
    }
}

/// A request in progress on its connection, until dropped.
struct InProgress(Arc<Tracker>);

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

/// The connection's stream (over TLS: its plaintext), telling the tracker when bytes arrive.
struct WatchedStream<S> {
    inner: S,
    tracker: Arc<Tracker>,
}

impl<S: AsyncRead + Unpin> AsyncRead for WatchedStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.tracker.bytes_arrived();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WatchedStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// In a request's extensions: whether its body failed to arrive within the body timeout, so
/// that the answer can say so (a handler only sees its body read fail).
#[derive(Debug, Clone)]
pub struct BodyDeadline {
    timeout: Duration,
    expired: Arc<AtomicBool>,
}

impl BodyDeadline {
    pub fn expired(&self) -> bool {
        self.expired.load(Ordering::Relaxed)
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// A request body whose reading fails once the body timeout has passed since the request head
/// arrived.
struct DeadlineBody {
    inner: Incoming,
    started: Instant,
    /// Made only when the body does not arrive with its head, which most do.
    timer: Option<Pin<Box<Sleep>>>,
    deadline: BodyDeadline,
}

/// The error a body read gets past the body timeout.
#[derive(Debug, thiserror::Error)]
#[error("request body not received within {} ms", .0.as_millis())]
pub struct BodyTimedOut(Duration);

impl Body for DeadlineBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.deadline.expired() {
            return Poll::Ready(Some(Err(BodyTimedOut(this.deadline.timeout).into())));
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        let at = this.started + this.deadline.timeout;
        let timer = this.timer.get_or_insert_with(|| Box::pin(sleep_until(at)));
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.deadline.expired.store(true, Ordering::Relaxed);
        Poll::Ready(Some(Err(BodyTimedOut(this.deadline.timeout).into())))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
