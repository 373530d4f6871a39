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
//! - **Send timeout**: a connection whose client accepts no byte of its response for
//!   `limits.send_timeout` is closed and counted (`baton_send_timeouts_total`). The timer starts
//!   when a write stays pending and stops at the next write that goes through (nginx's
//!   `send_timeout`); when it runs out, the kernel's send queue (`SIOCOUTQ`) is asked as well,
//!   and if the client took any bytes meanwhile the timer starts again, so a slow reader that
//!   makes progress is never cut. No write is pending on a connection between requests, so the
//!   timer cannot fire there.
//! - **Room at the limit**: when every permit is taken and a client is waiting, the accept loop
//!   accepts it and asks the keep-alive connection that has been idle longest (between
//!   requests: no request in flight, no response being written, no unread input) to close,
//!   which ends it cleanly (a FIN, not a reset) and frees its permit for the new client; counted
//!   in `baton_idle_closed_for_room_total`. Closing an idle connection races with a client that
//!   is just sending its next request on it (nginx has the same race). To keep that small, only
//!   connections idle for at least [`IDLE_FOR_ROOM`] are chosen, the choice is checked again
//!   right before closing (and dropped if a byte of a new request has arrived, in hyper's buffer
//!   or in the kernel's), and one connection at a time is closed. Without an idle connection the
//!   accepted client waits for a permit like the ones still in the backlog.
//! - **Drain** ([`Server::drain`], DESIGN.md section 5): every response from then on carries
//!   `Connection: close`, so a client that keeps sending gets its answer and a clean end of the
//!   connection instead of a reset. Closing an idle keep-alive connection at once would race
//!   with a client that is just sending its next request on it, so idle connections get
//!   `shutdown.idle_grace` to send one more request before they are closed. Whatever is still
//!   open at the drain deadline is closed forcibly and counted.
//! - **Passing on** (in an upgrade whose new generation adopts connections,
//!   [`baton_lifecycle::handoff`]): instead of being closed, a connection still on the fast
//!   path goes over to the new generation as soon as it is between two requests (at once if it
//!   is idle, after its response otherwise), with the bytes of a next request already read;
//!   its client never notices, and no response of the drain says `Connection: close`. The new
//!   generation serves it as its listener's accept loop would (counted in
//!   `baton_connections_passed_on_total` and `baton_connections_adopted_total`). Connections
//!   hyper serves (TLS, HTTP/2, unix sockets, a request the fast path left to hyper) hold state
//!   in hyper and drain as above, as does one whose passing fails (the new generation's queue
//!   is full, or it died).
//!
//! On TCP connections, requests for large files take the zero-copy fast path ([`fast`]:
//! sendfile(2), written by baton) until the first request that is not for it; hyper serves the
//! connection from then on. Every limit above holds on both paths.
//!
//! Each accept loop knows its listener's name, and so its [`Role`] ([`crate::http::admin`]):
//! every connection carries it to [`App::call_as`], and an admin listener's connections skip
//! the fast path (they serve no file).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::http::admin::Role;
use crate::http::App;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CONNECTION};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::{self, AccessLog, Client};
use crate::activation::{Listener, Socket};
use crate::config;
use crate::metrics::Metrics;
use baton_lifecycle::handoff::{Adopted, Connection, PassOn};

/// A keep-alive connection is closed to make room only after it has been idle this long: a
/// client that is in the middle of a burst of requests sends its next one sooner.
pub const IDLE_FOR_ROOM: Duration = Duration::from_millis(250);

/// While a client waits for room at the limit, how often the accept loop looks again for a
/// connection to close (connections do not report becoming idle).
const ROOM_RECHECK: Duration = Duration::from_millis(50);

/// How soon the watcher looks again at a draining connection that the fast path is to pass on
/// once its response is out (in case passing it fails: then it closes as any other).
const PASS_ON_RECHECK_MS: u64 = 50;

/// An idle connection asked to close that is still open after this long no longer holds up
/// the choice of another.
const EVICT_PATIENCE: Duration = Duration::from_secs(1);

pub use baton_lifecycle::workload::DrainReport;

pub mod fast;
mod tls;
pub mod workers;
use fast::{Rewind, Stream};
use workers::Workers;

/// Settings of a [`Server`].
#[derive(Clone)]
pub struct Settings {
    pub limits: config::Limits,
    pub idle_grace: Duration,
    /// Where each request is logged once its response is finished; `None`: nowhere, and no
    /// work per request.
    pub access_log: Option<Arc<AccessLog>>,
    /// HTTP/2: the listeners that take it in clear text, and its limits.
    pub http2: config::Http2,
    /// How long a drain lets a busy HTTP/2 connection go on before its GOAWAY (see
    /// [`HTTP2_QUIET`]).
    pub http2_busy_grace: Duration,
    /// The listeners that speak TLS, by name, with their configuration ([`crate::tls`]).
    pub tls: std::collections::HashMap<String, Arc<rustls::ServerConfig>>,
    /// Connection workers ([`workers`]); 0: one per CPU.
    pub workers: usize,
}

/// A draining HTTP/2 connection gets its GOAWAY once no stream has been open for this long, or
/// after [`Settings::http2_busy_grace`]. A GOAWAY sent at once would end the run of a client
/// that has more requests to make on the connection (h2load counts those as failed; browsers
/// and proxies open a new connection): a busy client mostly finishes, a quiet one is told.
pub const HTTP2_QUIET: Duration = Duration::from_millis(250);

/// The HTTP versions a connection may speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Versions {
    /// HTTP/1.x only.
    Http1,
    /// HTTP/1.x, or HTTP/2 with prior knowledge (h2c: the connection starts with the HTTP/2
    /// preface), on a listener `http2.cleartext` names.
    Http1OrPrior,
    /// HTTP/2: TLS negotiated it (ALPN `h2`).
    Http2,
}

/// The start of the HTTP/2 connection preface (RFC 9113 section 3.4): no HTTP/1 request
/// begins so.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

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
    workers: Arc<Workers>,
    /// Connections the previous generation passes on, served once accepting starts.
    adopted: Option<Adopted>,
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
    /// The open connections, by id (in accept order), for closing idle ones to make room.
    conns: Mutex<HashMap<u64, Arc<ConnState>>>,
    next_id: AtomicU64,
    /// The next generation, which adopts the connections this one passes on during its drain.
    pass_on: OnceLock<PassOn>,
    /// Connections passed on.
    passed_on: AtomicU64,
}

impl Shared {
    /// Where the drain passes this connection on to, rather than closing it: the next
    /// generation, unless passing it failed once. Set just before the drain starts.
    fn passes_on(&self, state: &ConnState) -> Option<&PassOn> {
        self.pass_on
            .get()
            .filter(|_| !state.pass_failed.load(Ordering::SeqCst))
    }

    /// Milliseconds since the server started, plus one: 0 stays free to mean "unset".
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Asks the keep-alive connection idle longest (for at least [`IDLE_FOR_ROOM`]) to close, so
    /// that a waiting client gets its permit; one at a time. Returns when to look again.
    fn make_room(&self) -> Duration {
        let now = self.now_ms();
        let min_idle = IDLE_FOR_ROOM.as_millis() as u64;
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let mut oldest: Option<(u64, u64, &Arc<ConnState>)> = None;
        for (&id, conn) in conns.iter() {
            let requested = conn.evict_requested.load(Ordering::SeqCst);
            if requested != 0 {
                if now < requested.saturating_add(EVICT_PATIENCE.as_millis() as u64) {
                    // Still closing, or about to say it is busy after all.
                    return ROOM_RECHECK;
                }
                // Asked long ago and still open (hyper saw it busy): not counted, not asked again.
                continue;
            }
            if !conn.is_idle() {
                continue;
            }
            let since = conn.idle_since.load(Ordering::SeqCst);
            if oldest.is_none_or(|(s, i, _)| (since, id) < (s, i)) {
                oldest = Some((since, id, conn));
            }
        }
        match oldest {
            Some((since, _, conn)) if now >= since.saturating_add(min_idle) => {
                conn.evict_requested.store(now, Ordering::SeqCst);
                conn.evict.notify_one();
                ROOM_RECHECK
            }
            Some((since, _, _)) => {
                Duration::from_millis(since.saturating_add(min_idle) - now).min(ROOM_RECHECK)
            }
            None => ROOM_RECHECK,
        }
    }
}

/// The error for a UDP listener: HTTP is served over stream sockets only (the configuration
/// refuses one already, see [`crate::config::Config::validate`]).
fn http_needs_a_stream(listener: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "listener {listener}: HTTP needs a TCP or unix stream listener (IP:PORT, [IPv6]:PORT \
             or unix:/path), not a UDP one"
        ),
    )
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
        let max_connections = settings.limits.max_connections.min(Semaphore::MAX_PERMITS);
        let workers = Workers::start(settings.workers).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot start the connection worker threads: {e}; set server.workers lower, \
                     or raise the process's task limit (TasksMax=, ulimit -u)"
                ),
            )
        })?;
        let workers = Arc::new(workers);
        tracing::debug!(workers = workers.len(), "connection workers started");
        let shared = Arc::new(Shared {
            app,
            metrics,
            settings,
            epoch: Instant::now(),
            draining: AtomicBool::new(false),
            drain_started: CancellationToken::new(),
            force_close: CancellationToken::new(),
            forced: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            pass_on: OnceLock::new(),
            passed_on: AtomicU64::new(0),
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
                    Socket::Udp(_) => return Err(http_needs_a_stream(&listener.name)),
                })
            })
            .collect::<io::Result<_>>()?;
        Ok(Server {
            limit: Arc::new(Semaphore::new(max_connections)),
            shared,
            pending,
            stop_accepting: CancellationToken::new(),
            accept_loops: Vec::new(),
            connections: TaskTracker::new(),
            workers,
            adopted: None,
        })
    }

    /// Starts the accept loops, and the adoption of the connections the previous generation
    /// passes on.
    pub fn start_accepting(&mut self) {
        let names: Vec<String> = self.pending.iter().map(|(n, _)| n.clone()).collect();
        let mut contexts = HashMap::new();
        for (name, listener) in std::mem::take(&mut self.pending) {
            let ctx = Arc::new(self.context(&name, &names));
            contexts.insert(name, ctx.clone());
            self.accept_loops.push(match listener {
                Pending::Tcp(l) => tokio::spawn(ctx.run(l)),
                Pending::Unix(l) => tokio::spawn(ctx.run(l)),
            });
        }
        if let Some(adopted) = self.adopted.take() {
            let template = self.context("", &names);
            self.accept_loops
                .push(tokio::spawn(adopt(adopted, contexts, template, names)));
        }
    }

    /// What the accept loop of the listener `name` (one of `names`) serves its connections
    /// with.
    fn context(&self, name: &str, names: &[String]) -> AcceptContext {
        let versions = match self
            .shared
            .settings
            .http2
            .cleartext
            .iter()
            .any(|n| n == name)
        {
            true => Versions::Http1OrPrior,
            false => Versions::Http1,
        };
        let tls = self
            .shared
            .settings
            .tls
            .get(name)
            .map(|config| tokio_rustls::TlsAcceptor::from(config.clone()));
        AcceptContext {
            tls,
            role: self.shared.app.role(name, names.iter().map(String::as_str)),
            versions,
            name: name.into(),
            shared: self.shared.clone(),
            limit: self.limit.clone(),
            stop: self.stop_accepting.clone(),
            connections: self.connections.clone(),
            workers: self.workers.clone(),
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
            passed_on: self.shared.passed_on.load(Ordering::SeqCst),
            duration: start.elapsed(),
        }
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> usize {
        self.connections.len()
    }
}

impl baton_lifecycle::workload::Serving for Server {
    fn start_accepting(&mut self) {
        Server::start_accepting(self)
    }

    async fn stop_accepting(&mut self) {
        Server::stop_accepting(self).await
    }

    async fn drain(self, timeout: Duration) -> DrainReport {
        Server::drain(&self, timeout).await
    }

    fn adopt(&mut self, connections: Adopted) -> Result<(), Adopted> {
        self.adopted = Some(connections);
        Ok(())
    }

    fn pass_on(&mut self, to: PassOn) {
        let _ = self.shared.pass_on.set(to);
    }
}

/// The accepting side of a listening socket.
trait Accept: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Stream + Unpin + Send + Sync + 'static;
    /// An accepted socket between two reactors (of the accept loop, of its worker).
    type Detached: Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<Self::Io>> + Send;
    fn detach(io: Self::Io) -> io::Result<Self::Detached>;
    /// Registers the socket with the reactor of the runtime this runs on.
    fn attach(socket: Self::Detached) -> io::Result<Self::Io>;
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    type Detached = std::net::TcpStream;
    async fn accept(&self) -> io::Result<Self::Io> {
        let (stream, _) = tokio::net::TcpListener::accept(self).await?;
        // Responses leave in one write; Nagle would only delay the last segment.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
    fn detach(io: Self::Io) -> io::Result<Self::Detached> {
        io.into_std()
    }
    fn attach(socket: Self::Detached) -> io::Result<Self::Io> {
        tokio::net::TcpStream::from_std(socket)
    }
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    type Detached = std::os::unix::net::UnixStream;
    async fn accept(&self) -> io::Result<Self::Io> {
        Ok(tokio::net::UnixListener::accept(self).await?.0)
    }
    fn detach(io: Self::Io) -> io::Result<Self::Detached> {
        io.into_std()
    }
    fn attach(socket: Self::Detached) -> io::Result<Self::Io> {
        tokio::net::UnixStream::from_std(socket)
    }
}

#[derive(Clone)]
struct AcceptContext {
    name: Arc<str>,
    /// What the listener answers ([`crate::http::admin`]).
    role: Role,
    /// The HTTP versions its connections may speak (over TLS, ALPN chooses).
    versions: Versions,
    /// The listener speaks TLS.
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    stop: CancellationToken,
    connections: TaskTracker,
    workers: Arc<Workers>,
}

/// The accept loop was told to stop.
struct Stopped;

/// Serves the connections the previous generation passes on ([`baton_lifecycle::handoff`]),
/// each as its listener's accept loop would, until accepting stops (then the ones already
/// queued are served too, and the previous generation drains the rest itself) or the previous
/// generation is gone. They were plain there (the fast path passes on no other), HTTP/1 or, on
/// an h2c listener, not yet sure. `template` serves those of a listener this configuration no
/// longer names.
async fn adopt(
    mut adopted: Adopted,
    contexts: HashMap<String, Arc<AcceptContext>>,
    template: AcceptContext,
    names: Vec<String>,
) {
    let serve = |connection: Connection| {
        let (socket, listener, unanswered) = match connection.into_tcp() {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "refused a connection from the previous generation: {e}");
                return;
            }
        };
        // A plain connection, whatever the listener is now (its TLS, had the configuration
        // added it, would take the client by surprise); one on an h2c listener may still send
        // the HTTP/2 preface, if it has not sent its first request yet.
        let ctx = match contexts.get(&listener) {
            Some(ctx) => AcceptContext {
                versions: match ctx.tls {
                    Some(_) => Versions::Http1,
                    None => ctx.versions,
                },
                tls: None,
                ..(**ctx).clone()
            },
            None => AcceptContext {
                role: template
                    .shared
                    .app
                    .role(&listener, names.iter().map(String::as_str)),
                name: listener.into(),
                ..template.clone()
            },
        };
        ctx.shared.metrics.connections_adopted.inc();
        // Beyond the limit if need be: the connection is open already.
        let permit = ctx.limit.clone().try_acquire_owned().ok();
        ctx.spawn_connection::<tokio::net::TcpListener>(socket, permit, unanswered, true);
    };
    loop {
        let next = tokio::select! {
            _ = template.stop.cancelled() => {
                adopted.close().into_iter().for_each(serve);
                return;
            }
            next = adopted.next() => next,
        };
        match next {
            Ok(Some(connection)) => serve(connection),
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot take further connections from the previous generation: {e}");
                adopted.close().into_iter().for_each(serve);
                return;
            }
        }
    }
}

impl AcceptContext {
    async fn run<L: Accept>(self: Arc<Self>, listener: L) {
        // A client accepted at the limit, waiting for an idle connection to make room.
        let mut waiting: Option<L::Io> = None;
        loop {
            let permit = match self.limit.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(TryAcquireError::Closed) => return,
                Err(TryAcquireError::NoPermits) => {
                    let Some(io) = waiting.take() else {
                        // At the limit: wait for a permit, or for a client to arrive.
                        let permit = tokio::select! {
                            biased;
                            _ = self.stop.cancelled() => return,
                            permit = self.limit.clone().acquire_owned() => match permit {
                                Ok(permit) => permit,
                                Err(_) => return,
                            },
                            io = self.accept(&listener) => match io {
                                Ok(io) => {
                                    waiting = io;
                                    continue;
                                }
                                Err(Stopped) => return,
                            },
                        };
                        let io = match self.accept(&listener).await {
                            Ok(Some(io)) => io,
                            Ok(None) => continue,
                            Err(Stopped) => return,
                        };
                        self.serve::<L>(io, Some(permit));
                        continue;
                    };
                    let again = self.shared.make_room();
                    tokio::select! {
                        biased;
                        _ = self.stop.cancelled() => {
                            // It was accepted: it gets its answer (with Connection: close), not
                            // a reset, even beyond the limit.
                            self.serve::<L>(io, None);
                            return;
                        }
                        permit = self.limit.clone().acquire_owned() => match permit {
                            Ok(permit) => {
                                self.serve::<L>(io, Some(permit));
                                continue;
                            }
                            Err(_) => return,
                        },
                        _ = tokio::time::sleep(again) => {
                            waiting = Some(io);
                            continue;
                        }
                    }
                }
            };
            let io = match waiting.take() {
                Some(io) => io,
                None => match self.accept(&listener).await {
                    Ok(Some(io)) => io,
                    Ok(None) => continue,
                    Err(Stopped) => return,
                },
            };
            self.serve::<L>(io, Some(permit));
        }
    }

    /// Serves one accepted client on the next worker: its TLS handshake first on a TLS
    /// listener.
    fn serve<L: Accept>(&self, io: L::Io, permit: Option<OwnedSemaphorePermit>) {
        match L::detach(io) {
            Ok(socket) => self.spawn_connection::<L>(socket, permit, Vec::new(), false),
            Err(e) => {
                tracing::debug!(listener = %self.name, error = %e, "dropping a client: {e}");
            }
        }
    }

    /// Serves a connection on the next worker, starting with the bytes `unanswered` (read by
    /// a previous generation).
    fn spawn_connection<L: Accept>(
        &self,
        socket: L::Detached,
        permit: Option<OwnedSemaphorePermit>,
        unanswered: Vec<u8>,
        adopted: bool,
    ) {
        let (shared, role, versions) = (self.shared.clone(), self.role, self.versions);
        let (tls, listener) = (self.tls.clone(), self.name.clone());
        let connection = async move {
            let io = match L::attach(socket) {
                Ok(io) => io,
                Err(e) => {
                    tracing::warn!(error = %e, "dropping a client: cannot watch its socket: {e}");
                    return;
                }
            };
            let conn = Conn {
                listener,
                role,
                unanswered,
                adopted,
            };
            let Some(acceptor) = tls else {
                return serve_connection(io, shared, conn, versions, permit).await;
            };
            // Boxed: a TLS connection's state is several times a plain one's, and a task is
            // as large as its largest state.
            Box::pin(async move {
                let timeout = shared.settings.limits.header_read_timeout;
                match tls::handshake(&acceptor, io, timeout).await {
                    Some((io, versions)) => {
                        shared.metrics.tls_handshakes.inc();
                        serve_connection(io, shared, conn, versions, permit).await
                    }
                    None => {
                        shared.metrics.tls_handshakes_failed.inc();
                    }
                }
            })
            .await
        };
        self.connections.spawn_on(connection, self.workers.next());
    }

    /// Accepts one client; `Ok(None)` after a failure (backing off from one that concerns the
    /// listener).
    async fn accept<L: Accept>(&self, listener: &L) -> Result<Option<L::Io>, Stopped> {
        let io = tokio::select! {
            io = listener.accept() => io,
            _ = self.stop.cancelled() => return Err(Stopped),
        };
        match io {
            Ok(io) => Ok(Some(io)),
            Err(e) if is_per_connection_error(&e) => Ok(None),
            Err(e) => {
                // Out of fds or memory: back off rather than spin; the clients wait in the
                // backlog meanwhile.
                tracing::error!(listener = %self.name, error = %e, "accept failed: {e}; retrying in 100 ms");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => Ok(None),
                    _ = self.stop.cancelled() => Err(Stopped),
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

/// The phases of one connection, shared between its IO, its service and its watcher (all
/// polled by the connection's one task), and the accept loops looking for room.
struct ConnState {
    /// Requests handed to the app whose response (head and body) hyper has not finished with.
    in_flight: AtomicU32,
    /// When the connection began to wait for a request head it has not fully received; 0 when
    /// it is not waiting for one.
    awaiting_head_since: AtomicU64,
    /// Bytes arrived since the last request was handed to the app (a pipelined request, say).
    input_since_call: AtomicBool,
    /// When the last response body was finished.
    idle_since: AtomicU64,
    /// When a write first stayed pending since the last one that went through; 0 when writes
    /// go through.
    write_blocked_since: AtomicU64,
    /// The kernel's send queue (`SIOCOUTQ`) then, or at the last sign of progress; 0 when
    /// unknown.
    write_blocked_queue: AtomicU64,
    /// When an accept loop asked this connection to close to make room; 0: not asked.
    evict_requested: AtomicU64,
    evict: Notify,
    /// The watcher asked the fast path to close the connection after the response in flight.
    close_after: AtomicBool,
    /// Passing the connection on to the next generation failed: it drains here.
    pass_failed: AtomicBool,
    /// hyper has handed a request of this connection to the service.
    hyper_called: AtomicBool,
    /// With an access log, from when hyper takes the connection until its first call: the
    /// request line it is receiving, for [`note_rejected`]. Reads add to it while `recording`.
    first_line: Mutex<access_log::LineRecorder>,
    recording: AtomicBool,
    /// The socket, for `ioctl`s; valid while the connection's task runs.
    fd: RawFd,
    /// What the connection's listener answers.
    role: Role,
    /// Who is at the other end (only looked up with an access log).
    client: Client,
    /// The name of the listener that accepted it (the next generation serves it as that
    /// listener's).
    listener: Arc<str>,
}

impl ConnState {
    /// hyper takes the connection, `prefix` read already: with an access log, the request line
    /// it receives is recorded until its first call.
    fn record_line(&self, logging: bool, prefix: &[u8]) {
        // hyper takes a connection once, at its start or at the one switch from the fast path
        // or the sniffer: it has not called the service yet.
        debug_assert!(!self.hyper_called.load(Ordering::Relaxed));
        if !logging {
            return;
        }
        let mut recorder = self.first_line.lock().unwrap_or_else(|e| e.into_inner());
        *recorder = access_log::LineRecorder::default();
        self.recording
            .store(!recorder.push(prefix), Ordering::Relaxed);
    }

    /// The line [`ConnState::record_line`] recorded; empty if hyper has called the service
    /// since (the line of a later request is not known).
    fn recorded_line(&self) -> Box<[u8]> {
        if self.hyper_called.load(Ordering::Relaxed) {
            return Box::default();
        }
        let mut recorder = self.first_line.lock().unwrap_or_else(|e| e.into_inner());
        recorder.take()
    }

    /// Between requests: nothing in flight, nothing being written, nothing read.
    fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0
            && self.awaiting_head_since.load(Ordering::SeqCst) == 0
            && self.write_blocked_since.load(Ordering::SeqCst) == 0
            && !self.input_since_call.load(Ordering::SeqCst)
    }
}

/// Bytes the kernel has received on `fd` that nobody has read yet.
fn unread_bytes(fd: RawFd) -> Option<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int; fd belongs to a live socket (see ConnState::fd).
    (unsafe { libc::ioctl(fd, libc::FIONREAD as _, &mut n) } == 0).then_some(n as u64)
}

/// Bytes the kernel still holds for the peer: not yet acknowledged (TCP) or not yet read (unix).
fn unsent_bytes(fd: RawFd) -> Option<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int; fd belongs to a live socket.
    (unsafe { libc::ioctl(fd, libc::TIOCOUTQ as _, &mut n) } == 0).then_some(n as u64)
}

/// Takes a connection out of [`Shared::conns`] when it ends.
struct Registered {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.shared
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// The connection's protocol handler: the fast path, then hyper.
enum Phase<I: AsyncRead + AsyncWrite + Stream + Unpin + Send + 'static> {
    Fast(Pin<Box<dyn Future<Output = fast::End<TrackedIo<I>>> + Send>>),
    /// Reading the first bytes, to tell the HTTP/2 preface from an HTTP/1 request.
    Sniff(Pin<Box<dyn Future<Output = Option<Sniffed<I>>> + Send>>),
    Hyper(HyperConn<I>),
}

type Io<I> = TokioIo<Rewind<TrackedIo<I>>>;

/// A connection and its first bytes.
type Sniffed<I> = (TrackedIo<I>, Vec<u8>);

/// hyper's connection, of either version.
enum HyperConn<I: AsyncRead + AsyncWrite + Stream + Unpin + Send + 'static> {
    Http1(Pin<Box<hyper::server::conn::http1::Connection<Io<I>, ConnService>>>),
    Http2(Pin<Box<hyper::server::conn::http2::Connection<Io<I>, ConnService, TokioExecutor>>>),
}

impl<I: AsyncRead + AsyncWrite + Stream + Unpin + Send + 'static> HyperConn<I> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<hyper::Result<()>> {
        match self {
            HyperConn::Http1(conn) => conn.as_mut().poll(cx),
            HyperConn::Http2(conn) => conn.as_mut().poll(cx),
        }
    }

    /// HTTP/1: `Connection: close` on the answer in flight, or close when idle. HTTP/2: GOAWAY,
    /// the streams in flight finish, then close.
    fn graceful_shutdown(&mut self) {
        match self {
            HyperConn::Http1(conn) => conn.as_mut().graceful_shutdown(),
            HyperConn::Http2(conn) => conn.as_mut().graceful_shutdown(),
        }
    }
}

/// Reads, after the bytes `prefix` read before, until the bytes are the HTTP/2 preface's first
/// line or cannot be; `None` if the connection ends first.
async fn sniff<I: AsyncRead + Unpin>(mut io: I, mut prefix: Vec<u8>) -> Option<(I, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let line = &H2_PREFACE[..16];
    prefix.reserve(64);
    while prefix.len() < line.len() && line.starts_with(&prefix) {
        match io.read_buf(&mut prefix).await {
            Ok(0) | Err(_) if prefix.is_empty() => return None,
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    Some((io, prefix))
}

/// What ended a wait on the connection's protocol handler.
enum Event<I> {
    Step(Step),
    /// The fast path hands the connection to hyper.
    ToHyper(I, Vec<u8>),
    /// hyper is done with the connection.
    HyperEnded(hyper::Result<()>),
}

/// Where a connection comes from.
struct Conn {
    /// The name of the listener that accepted it.
    listener: Arc<str>,
    role: Role,
    /// What a previous generation read from it and did not answer (it passed it on).
    unanswered: Vec<u8>,
    /// A previous generation passed it on.
    adopted: bool,
}

/// Serves one connection: registers it (so that an accept loop can evict it when idle), runs
/// the fast path and hyper on it, and watches its deadlines until it ends, or until the fast
/// path passes it on to the next generation.
async fn serve_connection<I>(
    io: I,
    shared: Arc<Shared>,
    conn: Conn,
    versions: Versions,
    _permit: Option<OwnedSemaphorePermit>,
) where
    I: AsyncRead + AsyncWrite + Stream + Unpin + Send + Sync + 'static,
{
    shared.metrics.open_connections.inc();
    let client = match shared.settings.access_log {
        Some(_) => io.client(),
        None => Client::Unknown,
    };
    let Conn {
        listener,
        role,
        unanswered,
        adopted,
    } = conn;
    let idle = adopted && unanswered.is_empty();
    let (state, _registered) =
        register_connection(&shared, io.as_raw_fd(), role, client, listener, idle);
    let io = TrackedIo {
        inner: io,
        state: state.clone(),
        shared: shared.clone(),
    };
    let service = ConnService {
        shared: shared.clone(),
        state: state.clone(),
    };
    // Bounded by the configuration's checks (config::MAX_STREAMS, config::HEADER_LIST_SIZES).
    let streams = shared.settings.http2.max_concurrent_streams as u32;
    let header_list = shared.settings.http2.max_header_list_size as u32;
    let hyper_conn = |io, prefix: Vec<u8>| {
        let http2 = versions == Versions::Http2
            || (versions == Versions::Http1OrPrior && prefix.starts_with(&H2_PREFACE[..14]));
        let io = TokioIo::new(Rewind::new(io, prefix));
        if http2 {
            return HyperConn::Http2(Box::pin(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .max_concurrent_streams(streams)
                    .max_header_list_size(header_list)
                    .serve_connection(io, service.clone()),
            ));
        }
        HyperConn::Http1(Box::pin(
            hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .header_read_timeout(None)
                .serve_connection(io, service.clone()),
        ))
    };
    // The admin listener serves no file.
    let fast = I::FAST_PATH && shared.app.files().is_some() && role != Role::Admin;
    let logging = shared.settings.access_log.is_some();
    let mut phase = match versions {
        _ if fast => Phase::Fast(Box::pin(fast::serve(
            io,
            shared.clone(),
            state.clone(),
            unanswered,
        ))),
        Versions::Http1OrPrior => Phase::Sniff(Box::pin(sniff(io, unanswered))),
        _ => {
            state.record_line(logging, &unanswered);
            Phase::Hyper(hyper_conn(io, unanswered))
        }
    };

    let mut watch = Watch::new(&shared, &state);
    watch.http2 = matches!(phase, Phase::Hyper(HyperConn::Http2(_)));
    let sleep = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(sleep);
    loop {
        let now = shared.now_ms();
        let due = watch.next_due(now);
        sleep
            .as_mut()
            .reset(Instant::now() + Duration::from_millis(due.saturating_sub(now)));
        let conn = std::future::poll_fn(|cx| match &mut phase {
            Phase::Fast(fast) => fast.as_mut().poll(cx).map(|end| match end {
                fast::End::Hyper(io, prefix) => Event::ToHyper(io, prefix),
                fast::End::Close | fast::End::PassedOn => Event::Step(Step::Close),
            }),
            Phase::Sniff(sniffing) => sniffing.as_mut().poll(cx).map(|read| match read {
                Some((io, prefix)) => Event::ToHyper(io, prefix),
                None => Event::Step(Step::Close),
            }),
            Phase::Hyper(conn) => conn.poll(cx).map(Event::HyperEnded),
        });
        let event = tokio::select! {
            biased;
            _ = shared.force_close.cancelled() => {
                shared.forced.fetch_add(1, Ordering::SeqCst);
                Event::Step(Step::Close)
            }
            event = conn => event,
            _ = state.evict.notified() => Event::Step(watch.on_evict()),
            _ = shared.drain_started.cancelled(), if watch.drain_close_at.is_none() => {
                watch.on_drain();
                Event::Step(Step::Wait)
            }
            _ = sleep.as_mut() => Event::Step(watch.on_deadline()),
        };
        match event {
            Event::ToHyper(io, prefix) => {
                state.record_line(logging, &prefix);
                let conn = hyper_conn(io, prefix);
                watch.http2 = matches!(conn, HyperConn::Http2(_));
                phase = Phase::Hyper(conn);
            }
            Event::HyperEnded(Ok(())) => break,
            Event::HyperEnded(Err(e)) => {
                tracing::debug!(error = %e, "connection ended with an error: {e}");
                if let Some(status) = rejected_status(&e) {
                    note_rejected(&shared, &state, status);
                }
                break;
            }
            Event::Step(Step::Close) => break,
            // The fast path passes the connection on after the response in flight (or closes it
            // if that fails); the watcher looks again shortly.
            Event::Step(Step::Shutdown)
                if matches!(phase, Phase::Fast(_)) && shared.passes_on(&state).is_some() =>
            {
                watch.pass_recheck = Some(shared.now_ms().saturating_add(PASS_ON_RECHECK_MS));
            }
            Event::Step(Step::Shutdown) => {
                watch.shutdown_sent = true;
                match &mut phase {
                    // Closes the connection if it is idle; otherwise hyper finishes the
                    // current exchange and closes after it.
                    Phase::Hyper(conn) => conn.graceful_shutdown(),
                    // Nothing asked yet.
                    Phase::Sniff(_) => break,
                    // Idle (the watcher asks only when no head is in progress): close now,
                    // as hyper does; else after the response in flight.
                    Phase::Fast(_) if state.in_flight.load(Ordering::SeqCst) == 0 => break,
                    Phase::Fast(_) => state.close_after.store(true, Ordering::SeqCst),
                }
            }
            Event::Step(Step::Wait) => {}
        }
    }
    shared.metrics.open_connections.dec();
}

/// The status hyper answered a request it could not parse with (its h1 `Server::on_error`),
/// or `None` if it answered none (an HTTP/2 error, a closed connection, a timeout).
fn rejected_status(e: &hyper::Error) -> Option<u16> {
    if e.is_parse_too_large() {
        // hyper's two kinds of too large differ only in their messages.
        return Some(if e.to_string() == "URI too long" {
            414
        } else {
            431
        });
    }
    let answered = e.is_parse()
        && !e.is_parse_version_h2()
        && !e.is_parse_status()
        && !e.to_string().starts_with("internal error");
    answered.then_some(400)
}

/// Counts a request hyper rejected (see [`rejected_status`]) and logs it: nginx logs its own
/// 400s too, and they are what a scanner or a broken client leaves.
fn note_rejected(shared: &Shared, state: &ConnState, status: u16) {
    shared.metrics.record_status(status);
    if let Some(log) = &shared.settings.access_log {
        let entry = access_log::Entry::unparsed(state.client, status, state.recorded_line());
        drop(access_log::Pending::new(log.clone(), entry));
    }
}

/// A new connection's state, entered in [`Shared::conns`] until the returned guard drops.
fn register_connection(
    shared: &Arc<Shared>,
    fd: RawFd,
    role: Role,
    client: Client,
    listener: Arc<str>,
    idle: bool,
) -> (Arc<ConnState>, Registered) {
    let now = shared.now_ms();
    let state = Arc::new(ConnState {
        in_flight: AtomicU32::new(0),
        // A new client owes its first request head within the header timeout; a connection
        // passed on between two requests is idle (the idle timeout applies).
        awaiting_head_since: AtomicU64::new(if idle { 0 } else { now }),
        input_since_call: AtomicBool::new(false),
        idle_since: AtomicU64::new(now),
        write_blocked_since: AtomicU64::new(0),
        write_blocked_queue: AtomicU64::new(0),
        evict_requested: AtomicU64::new(0),
        evict: Notify::new(),
        close_after: AtomicBool::new(false),
        pass_failed: AtomicBool::new(false),
        hyper_called: AtomicBool::new(false),
        first_line: Mutex::default(),
        recording: AtomicBool::new(false),
        fd,
        role,
        client,
        listener,
    });
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    shared
        .conns
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, state.clone());
    let registered = Registered {
        shared: shared.clone(),
        id,
    };
    (state, registered)
}

/// What the connection's watcher does next.
enum Step {
    /// Close the connection now.
    Close,
    /// Ask hyper for a graceful shutdown (`Connection: close` on the next answer, or close
    /// when idle).
    Shutdown,
    /// Go on watching.
    Wait,
}

/// The deadlines of one connection: a request head within the header timeout, a response's
/// bytes taken within the send timeout, an idle keep-alive connection closed after the idle
/// timeout, and after a drain started, closed after the idle grace.
struct Watch<'a> {
    shared: &'a Shared,
    state: &'a ConnState,
    header_ms: u64,
    idle_ms: u64,
    send_ms: u64,
    /// The longest the watcher sleeps (see [`Watch::next_due`]).
    horizon: u64,
    shutdown_sent: bool,
    /// When a drain closes the connection (deferred while a head is in progress).
    drain_close_at: Option<u64>,
    /// When the drain started.
    drain_started_at: u64,
    /// The fast path is to pass the connection on after its response: until then, no idle or
    /// drain deadline closes it (but the header and send timeouts still do).
    pass_recheck: Option<u64>,
    /// The connection speaks HTTP/2.
    http2: bool,
}

impl<'a> Watch<'a> {
    fn new(shared: &'a Shared, state: &'a ConnState) -> Watch<'a> {
        let limits = shared.settings.limits;
        let header_ms = limits.header_read_timeout.as_millis() as u64;
        let idle_ms = limits.idle_timeout.as_millis() as u64;
        let send_ms = limits.send_timeout.as_millis() as u64;
        Watch {
            shared,
            state,
            header_ms,
            idle_ms,
            send_ms,
            // Phases change behind the watcher's back (the IO and the service update them,
            // without waking it, which would cost every request a wakeup). A header, idle or
            // send deadline that starts now is at least the shortest timeout away, so the
            // watcher never sleeps longer.
            horizon: header_ms.min(idle_ms).min(send_ms),
            shutdown_sent: false,
            drain_close_at: None,
            drain_started_at: 0,
            pass_recheck: None,
            http2: false,
        }
    }

    /// The next time (ms, as [`Shared::now_ms`]) a deadline may be due.
    fn next_due(&self, now: u64) -> u64 {
        let state = self.state;
        let awaiting = state.awaiting_head_since.load(Ordering::SeqCst);
        let idle = awaiting == 0 && state.in_flight.load(Ordering::SeqCst) == 0;
        let mut due = now.saturating_add(self.horizon);
        if awaiting != 0 {
            due = due.min(awaiting.saturating_add(self.header_ms));
        }
        let blocked = state.write_blocked_since.load(Ordering::SeqCst);
        if blocked != 0 {
            due = due.min(blocked.saturating_add(self.send_ms));
        }
        if let Some(at) = self.pass_recheck.filter(|_| !self.shutdown_sent) {
            due = due.min(at);
        } else if !self.shutdown_sent {
            // Deferred while a head is in progress (see below): no busy loop over a past time.
            if let Some(at) = self.drain_close_at.filter(|_| awaiting == 0) {
                due = due.min(at);
            }
            if idle {
                due = due.min(
                    state
                        .idle_since
                        .load(Ordering::SeqCst)
                        .saturating_add(self.idle_ms),
                );
            }
        }
        due
    }

    /// An accept loop asks this connection to make room.
    fn on_evict(&mut self) -> Step {
        let state = self.state;
        // Checked again here, in the connection's own task: hyper cannot read or write
        // in between. Bytes in the kernel's buffer are a request on its way.
        if !self.shutdown_sent && state.is_idle() && unread_bytes(state.fd) == Some(0) {
            self.shared.metrics.idle_closed_for_room.inc();
            tracing::debug!(
                "closing the longest-idle keep-alive connection to make room for a new client"
            );
            return Step::Shutdown;
        }
        if !self.shutdown_sent {
            // Busy after all: the accept loop picks another.
            state.evict_requested.store(0, Ordering::SeqCst);
        }
        Step::Wait
    }

    /// The drain started: the connection closes after the idle grace.
    fn on_drain(&mut self) {
        let grace = self.shared.settings.idle_grace.as_millis() as u64;
        let now = self.shared.now_ms();
        self.drain_started_at = now;
        self.drain_close_at = Some(now.saturating_add(grace));
    }

    /// The sleep ended: whichever deadline passed.
    fn on_deadline(&mut self) -> Step {
        let (shared, state) = (self.shared, self.state);
        let limits = shared.settings.limits;
        let now = shared.now_ms();
        let awaiting = state.awaiting_head_since.load(Ordering::SeqCst);
        if awaiting != 0 && now >= awaiting.saturating_add(self.header_ms) {
            tracing::debug!(
                "closing a connection that sent no complete request head within {:?}",
                limits.header_read_timeout
            );
            return Step::Close;
        }
        let blocked = state.write_blocked_since.load(Ordering::SeqCst);
        if blocked != 0 && now >= blocked.saturating_add(self.send_ms) {
            let before = state.write_blocked_queue.load(Ordering::SeqCst);
            return match unsent_bytes(state.fd) {
                // The client took bytes, just not enough to let a write through (the
                // kernel wakes a writer only once a third of the buffer is free).
                Some(queue) if queue < before => {
                    state.write_blocked_since.store(now, Ordering::SeqCst);
                    state.write_blocked_queue.store(queue, Ordering::SeqCst);
                    Step::Wait
                }
                _ => {
                    shared.metrics.send_timeouts.inc();
                    tracing::info!(
                        event = "send_timeout",
                        "closing a connection whose client accepted no byte of its response for {}",
                        humantime::format_duration(limits.send_timeout)
                    );
                    Step::Close
                }
            };
        }
        if let Some(at) = self.pass_recheck {
            if now < at {
                return Step::Wait;
            }
            self.pass_recheck = None;
        }
        let idle = awaiting == 0 && state.in_flight.load(Ordering::SeqCst) == 0;
        let idle_expired = idle
            && now
                >= state
                    .idle_since
                    .load(Ordering::SeqCst)
                    .saturating_add(self.idle_ms);
        // A connection in the middle of sending a head is not idle: its request gets an
        // answer (with Connection: close); the header timeout still bounds it.
        let drain_due = awaiting == 0 && self.drain_close_at.is_some_and(|at| now >= at);
        if drain_due && self.http2 && !self.shutdown_sent {
            let quiet = idle
                && now
                    >= state
                        .idle_since
                        .load(Ordering::SeqCst)
                        .saturating_add(HTTP2_QUIET.as_millis() as u64);
            let busy_until = self
                .drain_started_at
                .saturating_add(shared.settings.http2_busy_grace.as_millis() as u64);
            if !quiet && now < busy_until {
                // Looked at again soon: streams open and close without waking the watcher.
                self.drain_close_at = Some(now.saturating_add(50).min(busy_until));
                return Step::Wait;
            }
        }
        if !self.shutdown_sent && (idle_expired || drain_due) {
            return Step::Shutdown;
        }
        Step::Wait
    }
}

/// The socket of one connection, noting when a request head starts to arrive and when writes
/// stall.
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
        if buf.filled().len() > before {
            self.state.input_since_call.store(true, Ordering::SeqCst);
            if self.state.recording.load(Ordering::Relaxed) {
                let mut recorder = self
                    .state
                    .first_line
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let done = recorder.push(&buf.filled()[before..]);
                self.state.recording.store(!done, Ordering::Relaxed);
            }
        }
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

impl<I: AsRawFd> TrackedIo<I> {
    /// Starts the send timer when a write stays pending, stops it when one goes through.
    fn note_write(&self, result: &Poll<io::Result<usize>>) {
        match result {
            Poll::Pending => {
                if self.state.write_blocked_since.load(Ordering::SeqCst) == 0 {
                    let queue = unsent_bytes(self.inner.as_raw_fd()).unwrap_or(0);
                    self.state
                        .write_blocked_queue
                        .store(queue, Ordering::SeqCst);
                    self.state
                        .write_blocked_since
                        .store(self.shared.now_ms(), Ordering::SeqCst);
                }
            }
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.state.write_blocked_since.store(0, Ordering::SeqCst);
            }
            Poll::Ready(_) => {}
        }
    }
}

impl<I: AsyncWrite + AsRawFd + Unpin> AsyncWrite for TrackedIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note_write(&result);
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note_write(&result);
        result
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
    Pin<Box<dyn Future<Output = Result<Response<TrackedBody>, Infallible>> + Send>>;

/// A response body that marks its connection idle once hyper is done with it (finished, or
/// dropped with the connection), not when the handler returns: a connection still sending a
/// large file is busy. With an access log it counts the body's bytes, and the request is
/// logged when it is dropped.
struct TrackedBody {
    inner: axum::body::Body,
    done: ResponseDone,
}

struct ResponseDone {
    shared: Arc<Shared>,
    state: Arc<ConnState>,
    /// The request's access log line, written when this drops (the response is finished).
    access: Option<access_log::Pending>,
}

impl Drop for ResponseDone {
    fn drop(&mut self) {
        self.state
            .idle_since
            .store(self.shared.now_ms(), Ordering::SeqCst);
        self.state.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        if let (Some(access), Poll::Ready(Some(Ok(frame)))) = (&mut self.done.access, &frame) {
            if let Some(data) = frame.data_ref() {
                access.add_bytes(data.len() as u64);
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        self.state.in_flight.fetch_add(1, Ordering::SeqCst);
        self.state.hyper_called.store(true, Ordering::Relaxed);
        self.state.recording.store(false, Ordering::Relaxed);
        self.state.awaiting_head_since.store(0, Ordering::SeqCst);
        self.state.input_since_call.store(false, Ordering::SeqCst);
        let shared = self.shared.clone();
        let access =
            shared.settings.access_log.as_ref().map(|log| {
                access_log::Pending::new(log.clone(), entry(&request, self.state.client))
            });
        let mut done = ResponseDone {
            shared: shared.clone(),
            state: self.state.clone(),
            access,
        };
        let version = request.version();
        shared.metrics.record_version(version);
        let response: crate::http::AppFuture = match host_error(&request) {
            Some(reason) => Box::pin(std::future::ready(bad_request(reason, version))),
            None => shared
                .app
                .call_as(self.state.role, request.map(axum::body::Body::new)),
        };
        Box::pin(async move {
            let mut response = response.await;
            let status = response.status().as_u16();
            shared.metrics.record_status(status);
            // HTTP/2 has no Connection header: its drain is hyper's GOAWAY.
            if shared.draining.load(Ordering::SeqCst) && version < hyper::Version::HTTP_2 {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            if let Some(access) = &mut done.access {
                access.set_status(status);
            }
            Ok(response.map(|inner| TrackedBody { inner, done }))
        })
    }
}

/// The access log's view of a request, before its answer.
fn entry<B>(request: &Request<B>, client: Client) -> access_log::Entry {
    let header = |name| {
        let value = request.headers().get(name)?;
        access_log::logged_header(value.as_bytes())
    };
    let uri = request.uri();
    // HTTP/2 gives the target as scheme, authority and path: logged as its path, as nginx
    // logs it, and the authority as the host.
    let http2 = request.version() == hyper::Version::HTTP_2;
    let target = match uri.path_and_query() {
        Some(path) if http2 => access_log::logged_target(path.as_str()),
        _ => access_log::logged_target(&uri.to_string()),
    };
    let host = header(hyper::header::HOST).or_else(|| {
        let authority = uri.authority().filter(|_| http2)?;
        access_log::logged_header(authority.as_str().as_bytes())
    });
    access_log::Entry {
        client,
        method: request.method().clone(),
        target,
        version: request.version(),
        status: 0,
        bytes: 0,
        end: std::time::SystemTime::UNIX_EPOCH,
        duration: Duration::ZERO,
        referer: header(hyper::header::REFERER),
        user_agent: header(hyper::header::USER_AGENT),
        host,
        unparsed: None,
    }
}

/// Why a request's `Host` header makes it a bad request (RFC 9112 section 3.2): an HTTP/1.1
/// request without one, any request with more than one, or a value that is no `host[:port]`
/// (empty is allowed: a request target without authority).
///
/// HTTP/2 names the host in the `:authority` pseudo-header, which hyper puts in the URI: a
/// `Host` header is not needed there (RFC 9113 section 8.3.1), but checked if sent.
fn host_error<B>(request: &Request<B>) -> Option<&'static str> {
    let hosts = request.headers().get_all(hyper::header::HOST).iter();
    let needs_host = match request.version() {
        hyper::Version::HTTP_2 => request.uri().authority().is_none(),
        version => version >= hyper::Version::HTTP_11,
    };
    host_error_of(hosts.map(|h| h.as_bytes()), needs_host)
}

/// [`host_error`] of the values of a request's `Host` headers.
fn host_error_of<'a>(
    mut hosts: impl Iterator<Item = &'a [u8]>,
    http11: bool,
) -> Option<&'static str> {
    match (hosts.next(), hosts.next()) {
        (None, _) if http11 => Some("Bad Request: HTTP/1.1 needs a Host header\n"),
        (None, _) => None,
        (Some(_), Some(_)) => Some("Bad Request: more than one Host header\n"),
        (Some(host), None) => {
            let valid = host.is_empty()
                || (!host.contains(&b'@') && hyper::http::uri::Authority::try_from(host).is_ok());
            (!valid).then_some("Bad Request: the Host header is not a host\n")
        }
    }
}

/// 400 with a short reason, closing the connection: a client this confused about the request
/// is not worth keeping.
fn bad_request(reason: &'static str, version: hyper::Version) -> Response<axum::body::Body> {
    let mut response = Response::new(axum::body::Body::from(reason));
    *response.status_mut() = hyper::StatusCode::BAD_REQUEST;
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // An HTTP/2 connection carries other streams: only this one fails.
    if version < hyper::Version::HTTP_2 {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;

    const REFUSED: &str = "HTTP needs a TCP or unix stream listener (IP:PORT, [IPv6]:PORT or \
                           unix:/path), not a UDP one";

    /// What hyper's HTTP/1 server writes for `input` (then the end of the input, if `end`),
    /// and how its connection ends.
    async fn hyper_on(input: Vec<u8>, end: bool) -> (Option<u16>, hyper::Result<()>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let service = hyper::service::service_fn(|_: Request<Incoming>| async {
            Ok::<_, Infallible>(Response::new(http_body_util::Empty::<Bytes>::new()))
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(server), service);
        let writer = async move {
            client.write_all(&input).await.unwrap();
            if end {
                client.shutdown().await.unwrap();
            }
            let mut out = Vec::new();
            let _ = client.read_to_end(&mut out).await;
            out
        };
        let (ended, out) = tokio::join!(conn, writer);
        let status = out
            .strip_prefix(b"HTTP/1.1 ")
            .and_then(|rest| std::str::from_utf8(rest.get(..3)?).ok()?.parse().ok());
        (status, ended)
    }

    /// `rejected_status` says what hyper answers a request it cannot parse with, for every
    /// kind of such request, and `None` where hyper answers nothing.
    #[tokio::test]
    async fn rejected_status_is_what_hyper_writes() {
        let many_headers: String = (0..101).map(|i| format!("X-{i}: v\r\n")).collect();
        let cases: Vec<(&str, Vec<u8>, Option<u16>)> = vec![
            (
                "bad method",
                b"BA\x01D / HTTP/1.1\r\n\r\n".to_vec(),
                Some(400),
            ),
            (
                "bad header",
                b"GET / HTTP/1.1\r\nNo Colon\r\n\r\n".to_vec(),
                Some(400),
            ),
            ("bad version", b"GET / HTTP/9.9\r\n\r\n".to_vec(), Some(400)),
            (
                "bad content-length",
                b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n".to_vec(),
                Some(400),
            ),
            (
                "URI too long",
                format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(70_000)).into_bytes(),
                Some(414),
            ),
            (
                "head too large",
                format!("GET / HTTP/1.1\r\nX: {}", "b".repeat(500_000)).into_bytes(),
                Some(431),
            ),
            (
                "too many headers",
                format!("GET / HTTP/1.1\r\n{many_headers}\r\n").into_bytes(),
                Some(431),
            ),
            ("HTTP/2 preface", H2_PREFACE.to_vec(), None),
            ("cut short", b"GET / HT".to_vec(), None),
        ];
        for (what, input, want) in cases {
            let (written, ended) = hyper_on(input, true).await;
            assert_eq!(written, want, "{what}: hyper wrote {written:?}");
            let e = ended.expect_err(what);
            assert_eq!(rejected_status(&e), want, "{what}: {e}");
        }
        // A request hyper parses is no error.
        let request = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
        let (written, ended) = hyper_on(request.to_vec(), false).await;
        assert_eq!(written, Some(200));
        assert!(ended.is_ok());
    }

    #[test]
    fn the_configuration_refuses_a_udp_listener() {
        let config = Config::from_toml_str(
            "[server]\nlisten = [\"http=127.0.0.1:8080\", \"dns=udp:127.0.0.1:53\"]\n",
            None,
        )
        .unwrap();
        let err = config.validate().unwrap_err();
        assert_eq!(
            err.errors,
            [format!("listener dns=udp:127.0.0.1:53: {REFUSED}")]
        );
        assert!(!err.to_string().contains('\n'), "{err}");
    }

    #[tokio::test]
    async fn a_udp_socket_is_an_invalid_input_for_the_server() {
        let metrics = Arc::new(Metrics::new(1, std::time::SystemTime::now()));
        let info = Arc::new(crate::http::Info::current(1, Vec::new()));
        let app = App::new(info, metrics.clone(), &Default::default()).unwrap();
        let settings = Settings {
            limits: Config::default().limits,
            idle_grace: Duration::from_secs(1),
            access_log: None,
            http2: Config::default().http2,
            http2_busy_grace: Duration::from_secs(5),
            tls: Default::default(),
            workers: 1,
        };
        let specs = [
            "http=127.0.0.1:0".parse().unwrap(),
            "dns=udp:127.0.0.1:0".parse().unwrap(),
        ];
        let listeners = crate::activation::resolve(&specs, Vec::new()).unwrap();
        let Err(err) = Server::new(listeners, app, metrics, settings) else {
            panic!("a UDP socket was taken for HTTP");
        };
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(err.to_string(), format!("listener dns: {REFUSED}"));
    }
}
