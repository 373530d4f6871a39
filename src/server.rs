//! Serving connections: accept loops, limits against slow and greedy clients, and the drain.
//!
//! Speaks HTTP/1.1 through hyper's connection-level API, so that baton, not a framework,
//! decides when a connection ends:
//!
//! - **Connection limit**: each accept first takes a permit from a semaphore of
//!   `limits.max_connections`; at the limit new clients wait in the kernel's listen backlog
//!   instead of being accepted and starved.
//! - **Header-read timeout**: a connection that has started a request (or was just accepted)
//!   must deliver the whole request head within `limits.header_read_timeout`, or it is closed.
//! - **Idle timeout**: a keep-alive connection with no request for `limits.idle_timeout` is
//!   closed. (hyper's own header timer cannot tell these two apart: it runs from the moment a
//!   connection waits for its next request, so baton tracks the phases itself.)
//! - **Drain** ([`Server::drain`], DESIGN.md section 5): every response from then on carries
//!   `Connection: close`, so a client that keeps sending gets its answer and a clean end of the
//!   connection instead of a reset. Closing an idle keep-alive connection at once would race
//!   with a client that is just sending its next request on it, so idle connections get
//!   `shutdown.idle_grace` to send one more request before they are closed. Whatever is still
//!   open at the drain deadline is closed forcibly and counted.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::http::App;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::activation::{Listener, Socket};
use crate::config;
use crate::metrics::Metrics;

/// What [`Server::drain`] observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Connections open when the drain began.
    pub open_at_start: usize,
    /// Connections closed forcibly at the deadline.
    pub forced: u64,
    pub duration: Duration,
}

/// Settings of a [`Server`].
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub limits: config::Limits,
    pub idle_grace: Duration,
    pub access_log: bool,
}

/// A running set of accept loops and their connections.
pub struct Server {
    shared: Arc<Shared>,
    /// Listeners not accepting yet.
    pending: Vec<(String, Pending)>,
    /// Permits for connections: `limits.max_connections`.
    limit: Arc<Semaphore>,
    stop_accepting: CancellationToken,
    accept_loops: Vec<tokio::task::JoinHandle<()>>,
    connections: TaskTracker,
}

enum Pending {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

struct Shared {
    app: App,
    metrics: Arc<Metrics>,
    settings: Settings,
    epoch: Instant,
    draining: AtomicBool,
    drain_started: CancellationToken,
    force_close: CancellationToken,
    forced: AtomicU64,
}

impl Shared {
    /// Milliseconds since the server started, plus one: 0 stays free to mean "unset".
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }
}

impl Server {
    /// Takes over the listeners without accepting yet (a new generation must not accept before
    /// its predecessor commits the handoff). Must be called inside the tokio runtime.
    pub fn new(
        listeners: Vec<Listener>,
        app: App,
        metrics: Arc<Metrics>,
        settings: Settings,
    ) -> io::Result<Server> {
        let shared = Arc::new(Shared {
            app,
            metrics,
            settings,
            epoch: Instant::now(),
            draining: AtomicBool::new(false),
            drain_started: CancellationToken::new(),
            force_close: CancellationToken::new(),
            forced: AtomicU64::new(0),
        });
        let pending = listeners
            .into_iter()
            .map(|listener| {
                Ok(match listener.socket {
                    Socket::Tcp(l) => (
                        listener.name,
                        Pending::Tcp(tokio::net::TcpListener::from_std(l)?),
                    ),
                    Socket::Unix(l) => (
                        listener.name,
                        Pending::Unix(tokio::net::UnixListener::from_std(l)?),
                    ),
                })
            })
            .collect::<io::Result<_>>()?;
        Ok(Server {
            limit: Arc::new(Semaphore::new(
                settings.limits.max_connections.min(Semaphore::MAX_PERMITS),
            )),
            shared,
            pending,
            stop_accepting: CancellationToken::new(),
            accept_loops: Vec::new(),
            connections: TaskTracker::new(),
        })
    }

    /// Starts the accept loops.
    pub fn start_accepting(&mut self) {
        let limit = self.limit.clone();
        for (name, listener) in self.pending.drain(..) {
            let ctx = AcceptContext {
                name,
                shared: self.shared.clone(),
                limit: limit.clone(),
                stop: self.stop_accepting.clone(),
                connections: self.connections.clone(),
            };
            self.accept_loops.push(match listener {
                Pending::Tcp(l) => tokio::spawn(ctx.run(l)),
                Pending::Unix(l) => tokio::spawn(ctx.run(l)),
            });
        }
    }

    /// Stops accepting and closes this process's copies of the listening sockets. Sockets
    /// shared with another process (the service manager, a new generation) stay open there, and
    /// connections queued on them wait for it.
    pub async fn stop_accepting(&mut self) {
        self.pending.clear();
        self.stop_accepting.cancel();
        for task in self.accept_loops.drain(..) {
            let _ = task.await;
        }
    }

    /// Lets the open connections finish (see the module docs) for at most `timeout`, then closes
    /// the rest. Call [`Server::stop_accepting`] first.
    pub async fn drain(&self, timeout: Duration) -> DrainReport {
        let start = Instant::now();
        let open_at_start = self.connections.len();
        self.shared.draining.store(true, Ordering::SeqCst);
        self.shared.drain_started.cancel();
        self.connections.close();
        if tokio::time::timeout(timeout, self.connections.wait())
            .await
            .is_err()
        {
            self.shared.force_close.cancel();
            self.connections.wait().await;
        }
        DrainReport {
            open_at_start,
            forced: self.shared.forced.load(Ordering::SeqCst),
            duration: start.elapsed(),
        }
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> usize {
        self.connections.len()
    }
}

/// The accepting side of a listening socket.
trait Accept: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> io::Result<Self::Io> {
        let (stream, _) = tokio::net::TcpListener::accept(self).await?;
        // Responses leave in one write; Nagle would only delay the last segment.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> io::Result<Self::Io> {
        Ok(tokio::net::UnixListener::accept(self).await?.0)
    }
}

struct AcceptContext {
    name: String,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    stop: CancellationToken,
    connections: TaskTracker,
}

impl AcceptContext {
    async fn run<L: Accept>(self, listener: L) {
        loop {
            let permit = tokio::select! {
                permit = self.limit.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
                _ = self.stop.cancelled() => return,
            };
            let io = tokio::select! {
                io = listener.accept() => io,
                _ = self.stop.cancelled() => return,
            };
            match io {
                Ok(io) => {
                    self.connections
                        .spawn(serve_connection(io, self.shared.clone(), permit));
                }
                Err(e) if is_per_connection_error(&e) => {}
                Err(e) => {
                    // Out of fds or memory: back off rather than spin; the clients wait in the
                    // backlog meanwhile.
                    tracing::error!(listener = %self.name, error = %e, "accept failed: {e}; retrying in 100 ms");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        _ = self.stop.cancelled() => return,
                    }
                }
            }
        }
    }
}

/// Errors that concern one failed connection, not the listener.
fn is_per_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// The phases of one connection, shared between its IO, its service and its watcher.
struct ConnState {
    /// Requests handed to the app and not yet answered.
    in_flight: AtomicU32,
    /// When the connection began to wait for a request head it has not fully received; 0 when
    /// it is not waiting for one.
    awaiting_head_since: AtomicU64,
    /// When the last response was produced.
    idle_since: AtomicU64,
}

async fn serve_connection<I>(io: I, shared: Arc<Shared>, _permit: OwnedSemaphorePermit)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    shared.metrics.open_connections.inc();
    let now = shared.now_ms();
    let state = Arc::new(ConnState {
        in_flight: AtomicU32::new(0),
        awaiting_head_since: AtomicU64::new(now),
        idle_since: AtomicU64::new(now),
    });
    let io = TokioIo::new(TrackedIo {
        inner: io,
        state: state.clone(),
        shared: shared.clone(),
    });
    let service = ConnService {
        shared: shared.clone(),
        state: state.clone(),
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .header_read_timeout(None)
        .serve_connection(io, service);
    tokio::pin!(conn);

    let limits = shared.settings.limits;
    let header_ms = limits.header_read_timeout.as_millis() as u64;
    let idle_ms = limits.idle_timeout.as_millis() as u64;
    // Phases change behind the watcher's back (the IO and the service update them, without
    // waking it, which would cost every request a wakeup). A header or idle deadline that starts
    // now is at least the shorter timeout away, so the watcher never sleeps longer than that.
    let horizon = header_ms.min(idle_ms);
    let mut shutdown_sent = false;
    let mut drain_close_at: Option<u64> = None;
    let sleep = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(sleep);
    loop {
        let now = shared.now_ms();
        let awaiting = state.awaiting_head_since.load(Ordering::SeqCst);
        let idle = awaiting == 0 && state.in_flight.load(Ordering::SeqCst) == 0;
        let mut due = now.saturating_add(horizon);
        if awaiting != 0 {
            due = due.min(awaiting.saturating_add(header_ms));
        }
        if !shutdown_sent {
            // Deferred while a head is in progress (see below): no busy loop over a past time.
            if let Some(at) = drain_close_at.filter(|_| awaiting == 0) {
                due = due.min(at);
            }
            if idle {
                due = due.min(
                    state
                        .idle_since
                        .load(Ordering::SeqCst)
                        .saturating_add(idle_ms),
                );
            }
        }
        sleep
            .as_mut()
            .reset(Instant::now() + Duration::from_millis(due.saturating_sub(now)));
        tokio::select! {
            biased;
            _ = shared.force_close.cancelled() => {
                shared.forced.fetch_add(1, Ordering::SeqCst);
                break;
            }
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error: {e}");
                }
                break;
            }
            _ = shared.drain_started.cancelled(), if drain_close_at.is_none() => {
                drain_close_at = Some(shared.now_ms().saturating_add(shared.settings.idle_grace.as_millis() as u64));
            }
            _ = sleep.as_mut() => {
                let now = shared.now_ms();
                let awaiting = state.awaiting_head_since.load(Ordering::SeqCst);
                if awaiting != 0 && now >= awaiting.saturating_add(header_ms) {
                    tracing::debug!("closing a connection that sent no complete request head within {:?}", limits.header_read_timeout);
                    break;
                }
                let idle = awaiting == 0 && state.in_flight.load(Ordering::SeqCst) == 0;
                let idle_expired = idle && now >= state.idle_since.load(Ordering::SeqCst).saturating_add(idle_ms);
                // A connection in the middle of sending a head is not idle: its request gets an
                // answer (with Connection: close); the header timeout still bounds it.
                let drain_due = awaiting == 0 && drain_close_at.is_some_and(|at| now >= at);
                if !shutdown_sent && (idle_expired || drain_due) {
                    // Closes the connection if it is idle; otherwise hyper finishes the current
                    // exchange and closes after it.
                    conn.as_mut().graceful_shutdown();
                    shutdown_sent = true;
                }
            }
        }
    }
    shared.metrics.open_connections.dec();
}

/// The socket of one connection, noting when a request head starts to arrive.
struct TrackedIo<I> {
    inner: I,
    state: Arc<ConnState>,
    shared: Arc<Shared>,
}

impl<I: AsyncRead + Unpin> AsyncRead for TrackedIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before
            && self.state.in_flight.load(Ordering::SeqCst) == 0
            && self.state.awaiting_head_since.load(Ordering::SeqCst) == 0
        {
            let now = self.shared.now_ms();
            self.state.awaiting_head_since.store(now, Ordering::SeqCst);
        }
        result
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for TrackedIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Hands each request to the app, and stamps the connection's phases and the drain onto it.
#[derive(Clone)]
struct ConnService {
    shared: Arc<Shared>,
    state: Arc<ConnState>,
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<axum::body::Body>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<axum::body::Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        self.state.in_flight.fetch_add(1, Ordering::SeqCst);
        self.state.awaiting_head_since.store(0, Ordering::SeqCst);
        let shared = self.shared.clone();
        let state = self.state.clone();
        let access = shared.settings.access_log.then(|| {
            (
                request.method().clone(),
                request.uri().clone(),
                std::time::Instant::now(),
            )
        });
        let response: crate::http::AppFuture = match host_error(&request) {
            Some(reason) => Box::pin(std::future::ready(bad_request(reason))),
            None => shared.app.call(request.map(axum::body::Body::new)),
        };
        Box::pin(async move {
            let mut response = response.await;
            let status = response.status().as_u16();
            shared.metrics.record_status(status);
            if shared.draining.load(Ordering::SeqCst) {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            state.idle_since.store(shared.now_ms(), Ordering::SeqCst);
            state.in_flight.fetch_sub(1, Ordering::SeqCst);
            if let Some((method, uri, started)) = access {
                tracing::info!(
                    event = "request",
                    method = %method,
                    path = %uri,
                    status,
                    micros = started.elapsed().as_micros() as u64,
                    "{method} {uri} {status}"
                );
            }
            Ok(response)
        })
    }
}

/// Why a request's `Host` header makes it a bad request (RFC 9112 section 3.2): an HTTP/1.1
/// request without one, any request with more than one, or a value that is no `host[:port]`
/// (empty is allowed: a request target without authority).
fn host_error<B>(request: &Request<B>) -> Option<&'static str> {
    let mut hosts = request.headers().get_all(hyper::header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if request.version() >= hyper::Version::HTTP_11 => {
            Some("Bad Request: HTTP/1.1 needs a Host header\n")
        }
        (None, _) => None,
        (Some(_), Some(_)) => Some("Bad Request: more than one Host header\n"),
        (Some(host), None) => {
            let valid = host.is_empty()
                || (!host.as_bytes().contains(&b'@')
                    && hyper::http::uri::Authority::try_from(host.as_bytes()).is_ok());
            (!valid).then_some("Bad Request: the Host header is not a host\n")
        }
    }
}

/// 400 with a short reason, closing the connection: a client this confused about the request
/// is not worth keeping.
fn bad_request(reason: &'static str) -> Response<axum::body::Body> {
    let mut response = Response::new(axum::body::Body::from(reason));
    *response.status_mut() = hyper::StatusCode::BAD_REQUEST;
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    response
}
