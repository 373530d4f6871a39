//! What a running generation gives its service: a [`Handle`] to ask for an upgrade or a stop
//! and to count connections, and, for [`crate::Lifecycle::serve`], an [`Accept`] per period of
//! accepting, with the workload ([`AcceptLoops`]) that runs those accept loops and drains their
//! connections.
//!
//! A period of accepting is a session: the first one, and one more after each rollback (the old
//! generation accepts again on its own copies of the sockets). A connection counts in the
//! session that accepted it, so a session's drain waits for its own connections only.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::activation::{Listener, Socket};
use crate::control::Request;
use crate::workload::{DrainReport, Serving, Workload};
use crate::Error;

/// A cloneable handle on the running generation.
#[derive(Clone)]
pub struct Handle {
    requests: mpsc::UnboundedSender<Request>,
    /// The sessions of accepting: a rollback starts a new one.
    current: Arc<Mutex<Arc<Session>>>,
    /// Cancelled when the generation stops for good.
    shutdown: CancellationToken,
}

impl Handle {
    /// A handle whose requests go to the generation reading `requests`' other end.
    /// `shutdown` is the generation's ([`crate::generation::Process::shutdown_token`]).
    pub(crate) fn new(
        requests: mpsc::UnboundedSender<Request>,
        shutdown: CancellationToken,
    ) -> Handle {
        Handle {
            requests,
            current: Arc::new(Mutex::new(Arc::new(Session::new()))),
            shutdown,
        }
    }
}

/// What an upgrade asked with [`Handle::upgrade`] led to.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Upgraded {
    pub pid: i32,
    pub generation: u64,
    /// Whether the new generation is the main process already (else it is on probation).
    pub promoted: bool,
    /// What the new generation found about its sockets (e.g. an address that differs from the
    /// configured one).
    pub warnings: Vec<String>,
}

impl Handle {
    /// Starts an upgrade (as SIGUSR2 does) and returns once the new generation serves, or
    /// with the reason it failed. `wait`: only once its probation is over.
    pub async fn upgrade(&self, wait: bool) -> Result<Upgraded, Error> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Upgrade { reply, wait })?;
        let answer = answer
            .await
            .map_err(|_| Error::Upgrade("the generation stopped before answering".into()))?;
        if answer["ok"] == serde_json::Value::Bool(true) {
            let pid = answer["pid"].as_i64().and_then(|p| i32::try_from(p).ok());
            let generation = answer["generation"].as_u64();
            let (Some(pid), Some(generation)) = (pid, generation) else {
                return Err(Error::Upgrade(format!(
                    "the upgrade's answer names no new process: {answer}; this is a bug in baton-lifecycle"
                )));
            };
            let warnings = answer["warnings"]
                .as_array()
                .map(|w| {
                    w.iter()
                        .filter_map(|w| w.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            Ok(Upgraded {
                pid,
                generation,
                promoted: answer["promoted"].as_bool().unwrap_or(false),
                warnings,
            })
        } else {
            Err(Error::Upgrade(
                answer["error"]
                    .as_str()
                    .unwrap_or("upgrade failed")
                    .to_owned(),
            ))
        }
    }

    /// Stops the generation gracefully (as SIGTERM does).
    pub fn stop(&self) {
        let (reply, _) = oneshot::channel();
        let _ = self.send(Request::Stop(reply));
    }

    /// The base of every `STATUS=` line from now on (systemctl status shows it).
    pub fn set_status(&self, status: impl Into<String>) {
        let _ = self.send(Request::SetStatus(status.into()));
    }

    /// Bytes for the next generation (sessions, caches, counters), read there with
    /// [`crate::Lifecycle::state`]; passed in a sealed memfd at each upgrade, at most
    /// [`crate::upgrade::MAX_STATE`] bytes. Set it again whenever it changes.
    pub fn set_handover_state(&self, state: Vec<u8>) -> Result<(), Error> {
        if state.len() > crate::upgrade::MAX_STATE {
            return Err(Error::Upgrade(format!(
                "the state to hand over has {} bytes; at most {} fit: hand over less",
                state.len(),
                crate::upgrade::MAX_STATE
            )));
        }
        self.send(Request::SetState(state))
    }

    /// The generation's state, as `<service> status` shows it (JSON).
    pub async fn status(&self) -> Result<serde_json::Value, Error> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Status(reply))?;
        answer
            .await
            .map_err(|_| Error::Serve("the generation stopped before answering".into()))
    }

    /// Counts a connection of the accepting session until the guard is dropped: the drain
    /// waits for it.
    pub fn connection(&self) -> Connection {
        Connection::new(self.session())
    }

    /// Cancelled when this generation stops for good: a stop began, or it handed over to its
    /// successor (after the probation). Background work tied to the generation ends on it; an
    /// accept loop ends on [`Accept::stopping`] instead, which also fires when a probation
    /// begins (and a rollback starts a new accept loop).
    pub fn stopping(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    fn session(&self) -> Arc<Session> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn send(&self, request: Request) -> Result<(), Error> {
        self.requests
            .send(request)
            .map_err(|_| Error::Serve("the generation is not running".into()))
    }
}

/// One period of accepting, with its connections: the first, and one per rollback.
struct Session {
    connections: AtomicUsize,
    idle: Notify,
    accepting: CancellationToken,
    draining: CancellationToken,
    closing: CancellationToken,
}

impl Session {
    fn new() -> Session {
        Session {
            connections: AtomicUsize::new(0),
            idle: Notify::new(),
            accepting: CancellationToken::new(),
            draining: CancellationToken::new(),
            closing: CancellationToken::new(),
        }
    }
}

/// A connection counted for the drain (from [`Handle::connection`] or
/// [`Accept::connection`]); dropping it ends it.
pub struct Connection {
    session: Arc<Session>,
}

impl Connection {
    fn new(session: Arc<Session>) -> Connection {
        session.connections.fetch_add(1, Ordering::SeqCst);
        Connection { session }
    }

    /// Completes when the drain begins: finish the request in hand, then close.
    pub async fn draining(&self) {
        self.session.draining.cancelled().await
    }

    /// Completes at the drain's deadline: close now.
    pub async fn closing(&self) {
        self.session.closing.cancelled().await
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if self.session.connections.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.session.idle.notify_waiters();
        }
    }
}

/// What an accept loop gets from [`crate::Lifecycle::serve`]: the listeners and the session's
/// bookkeeping.
pub struct Accept {
    listeners: Vec<Listener>,
    handle: Handle,
    session: Arc<Session>,
}

impl Accept {
    /// Takes the TCP listener called `name` as a tokio listener.
    pub fn tcp(&mut self, name: &str) -> std::io::Result<tokio::net::TcpListener> {
        match self.take(name)? {
            Socket::Tcp(l) => tokio::net::TcpListener::from_std(l),
            _ => Err(not_a(name, "TCP")),
        }
    }

    /// Takes the UDP socket called `name` as a tokio socket.
    pub fn udp(&mut self, name: &str) -> std::io::Result<tokio::net::UdpSocket> {
        match self.take(name)? {
            Socket::Udp(s) => tokio::net::UdpSocket::from_std(s),
            _ => Err(not_a(name, "UDP")),
        }
    }

    /// Takes the unix stream listener called `name` as a tokio listener.
    pub fn unix(&mut self, name: &str) -> std::io::Result<tokio::net::UnixListener> {
        match self.take(name)? {
            Socket::Unix(l) => tokio::net::UnixListener::from_std(l),
            _ => Err(not_a(name, "unix stream")),
        }
    }

    /// Takes the listener called `name` as it is.
    pub fn take(&mut self, name: &str) -> std::io::Result<Socket> {
        let i = self
            .listeners
            .iter()
            .position(|l| l.name == name)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no listener called {name} (give it to Options::listen)"),
                )
            })?;
        Ok(self.listeners.remove(i).socket)
    }

    /// The remaining listeners.
    pub fn listeners(&mut self) -> Vec<Listener> {
        std::mem::take(&mut self.listeners)
    }

    /// Completes when this generation stops accepting: return from the accept loop.
    pub async fn stopping(&self) {
        self.session.accepting.cancelled().await
    }

    /// Counts a connection until the guard is dropped: the drain waits for it.
    pub fn connection(&self) -> Connection {
        Connection::new(self.session.clone())
    }

    /// The generation's handle.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

fn not_a(name: &str, kind: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("the listener {name} is not a {kind} socket"),
    )
}

/// [`crate::Lifecycle::serve`]'s workload: one accept loop per session.
pub(crate) struct AcceptLoops<F> {
    accept: F,
    handle: Handle,
    /// The first session is the one the handle was created with.
    fresh: bool,
}

impl<F> AcceptLoops<F> {
    pub(crate) fn new(accept: F, handle: Handle) -> AcceptLoops<F> {
        AcceptLoops {
            accept,
            handle,
            fresh: true,
        }
    }
}

impl<F, Fut> Workload for AcceptLoops<F>
where
    F: FnMut(Accept) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    type Serving = AcceptSession;

    fn serve(&mut self, listeners: Vec<Listener>) -> std::io::Result<AcceptSession> {
        let mut current = self
            .handle
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !std::mem::take(&mut self.fresh) {
            *current = Arc::new(Session::new());
        }
        let session = current.clone();
        drop(current);
        let accept = Accept {
            listeners,
            handle: self.handle.clone(),
            session: session.clone(),
        };
        Ok(AcceptSession {
            session,
            pending: Some(Box::pin((self.accept)(accept))),
            task: None,
        })
    }

    fn open_connections(&self) -> u64 {
        self.handle.session().connections.load(Ordering::SeqCst) as u64
    }
}

type AcceptFuture = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// One session of [`AcceptLoops`].
pub(crate) struct AcceptSession {
    session: Arc<Session>,
    pending: Option<AcceptFuture>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// How long connections may take to close after [`Connection::closing`] before the accept
/// loop is cut.
const GRACE: Duration = Duration::from_secs(1);

impl Serving for AcceptSession {
    fn start_accepting(&mut self) {
        if let Some(accept) = self.pending.take() {
            self.task = Some(tokio::spawn(accept));
        }
    }

    async fn ended(&mut self) -> String {
        let Some(task) = self.task.as_mut() else {
            return std::future::pending().await;
        };
        let outcome = task.await;
        // Finished: it must not be polled again (the drain skips it then).
        self.task = None;
        match outcome {
            Ok(()) => "the accept loop returned while the generation was serving".to_owned(),
            Err(e) if e.is_panic() => {
                let panic = e.into_panic();
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".to_owned());
                format!("the accept loop panicked: {message}")
            }
            Err(e) => format!("the accept loop ended: {e}"),
        }
    }

    async fn stop_accepting(&mut self) {
        // An accept loop that serves its connections itself (axum's or tonic's graceful
        // shutdown) goes on until they are done; the drain waits for it.
        self.pending = None;
        self.session.accepting.cancel();
    }

    async fn drain(self, timeout: Duration) -> DrainReport {
        let started = tokio::time::Instant::now();
        let session = self.session;
        let open_at_start = session.connections.load(Ordering::SeqCst);
        session.draining.cancel();
        let mut task = self.task;
        let mut done = async || {
            // A finished JoinHandle must not be polled again.
            if let Some(task) = task.as_mut().filter(|t| !t.is_finished()) {
                let _ = task.await;
            }
            loop {
                let notified = session.idle.notified();
                if session.connections.load(Ordering::SeqCst) == 0 {
                    return;
                }
                notified.await;
            }
        };
        let mut forced = 0;
        if tokio::time::timeout(timeout, done()).await.is_err() {
            forced = session.connections.load(Ordering::SeqCst) as u64;
            session.closing.cancel();
            let _ = tokio::time::timeout(GRACE, done()).await;
            if let Some(task) = &task {
                task.abort();
            }
        }
        DrainReport {
            open_at_start,
            forced,
            passed_on: 0,
            duration: started.elapsed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_too_large_to_hand_over_is_refused_when_set() {
        let (requests, mut received) = mpsc::unbounded_channel();
        let handle = Handle::new(requests, CancellationToken::new());
        let too_large = vec![0; crate::upgrade::MAX_STATE + 1];
        assert!(matches!(
            handle.set_handover_state(too_large),
            Err(Error::Upgrade(_))
        ));
        assert!(
            received.try_recv().is_err(),
            "nothing reached the generation"
        );
        handle.set_handover_state(b"sessions".to_vec()).unwrap();
        assert!(matches!(received.try_recv(), Ok(Request::SetState(s)) if s == b"sessions"));
    }
}
