//! The control socket: how `baton reload`, `baton status` and `baton stop` talk to a running
//! process and learn the outcome.
//!
//! Each serving process listens on the abstract unix socket `@baton/control/<pid>` (Linux's
//! abstract namespace: per network namespace, no file to create or clean up, so a new generation
//! simply binds its own). Both ends check the other's credentials (SO_PEERCRED): the server
//! answers only root and its own user; the client insists that the server's pid is the pid it
//! meant, so a stale pid or a squatter on the name is caught instead of obeyed.
//!
//! Protocol: the client sends one line, the server answers one JSON line.
//!
//! | request   | answer                                                                      |
//! |-----------|-----------------------------------------------------------------------------|
//! | `upgrade` | once the new process serves: `{"ok":true,"pid":N,"generation":G,"took_ms":T,"probation_ms":P,"promoted":B}` (`promoted`: it is the main pid already, i.e. no probation) or `{"ok":false,"error":"..."}` |
//! | `upgrade wait` | the same, but only once the probation is over: `"promoted":true`, or `{"ok":false,"error":"... rolled back ..."}` |
//! | `status`  | `{"ok":true,"pid":..,"generation":..,"version":..,"started":..,"uptime_secs":..,"listeners":[..],"state":".."}` |
//! | `stop`    | `{"ok":true}`, then the process stops as on SIGTERM                          |

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{
    SocketAddr, UnixListener as StdUnixListener, UnixStream as StdUnixStream,
};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The abstract socket name of process `pid`.
pub fn name(pid: u32) -> String {
    format!("baton/control/{pid}")
}

/// A request from a client, with the way back to it.
#[derive(Debug)]
pub enum Request {
    /// `wait`: answer only once the probation is over.
    Upgrade {
        reply: oneshot::Sender<Value>,
        wait: bool,
    },
    Status(oneshot::Sender<Value>),
    Stop(oneshot::Sender<Value>),
}

/// The control socket of this process: requests arrive on `requests`.
pub struct Control {
    pub requests: mpsc::Receiver<Request>,
    clients: tokio_util::task::TaskTracker,
}

impl Control {
    /// Stops taking requests and waits (up to `timeout`) until every answer already given has
    /// been written: a process must not exit with a `baton reload` answer still in memory.
    pub async fn close(&mut self, timeout: Duration) {
        self.requests.close();
        self.clients.close();
        let _ = tokio::time::timeout(timeout, self.clients.wait()).await;
    }
}

/// Binds this process's control socket. Call inside the runtime.
pub fn listen() -> io::Result<Control> {
    let pid = std::process::id();
    let address = SocketAddr::from_abstract_name(name(pid))?;
    let listener = StdUnixListener::bind_addr(&address).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on the control socket @{}: {e}", name(pid)),
        )
    })?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    let (tx, rx) = mpsc::channel(16);
    let clients = tokio_util::task::TaskTracker::new();
    let tracker = clients.clone();
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of fds, most likely: back off instead of spinning on a pending client.
                    tracing::warn!("control socket: accept failed: {e}; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let tx = tx.clone();
            tracker.spawn(async move {
                if let Err(e) = serve_client(stream, tx).await {
                    tracing::debug!("control client: {e}");
                }
            });
        }
    });
    Ok(Control {
        requests: rx,
        clients,
    })
}

async fn serve_client(
    mut stream: tokio::net::UnixStream,
    tx: mpsc::Sender<Request>,
) -> io::Result<()> {
    let peer =
        nix::sys::socket::getsockopt(&stream.as_fd(), nix::sys::socket::sockopt::PeerCredentials)?;
    let own = nix::unistd::geteuid().as_raw();
    if peer.uid() != 0 && peer.uid() != own {
        let reply = json!({"ok": false, "error": format!("uid {} may not control this process (only root and uid {own})", peer.uid())});
        return write_reply(&mut stream, &reply).await;
    }
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(&mut stream);
    tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request"))??;
    let (reply_tx, reply_rx) = oneshot::channel();
    let request = match line.trim() {
        "upgrade" => Request::Upgrade {
            reply: reply_tx,
            wait: false,
        },
        "upgrade wait" => Request::Upgrade {
            reply: reply_tx,
            wait: true,
        },
        "status" => Request::Status(reply_tx),
        "stop" => Request::Stop(reply_tx),
        other => {
            let reply = json!({"ok": false, "error": format!("unknown request {other:?}; use upgrade, upgrade wait, status or stop")});
            return write_reply(&mut stream, &reply).await;
        }
    };
    if tx.send(request).await.is_err() {
        let reply = json!({"ok": false, "error": format!(
            "pid {} is stopping (stopped or handed over to a new generation); address the current main process",
            std::process::id()
        )});
        return write_reply(&mut stream, &reply).await;
    }
    let reply = reply_rx
        .await
        .unwrap_or_else(|_| json!({"ok": false, "error": "the process is shutting down"}));
    write_reply(&mut stream, &reply).await
}

async fn write_reply(stream: &mut tokio::net::UnixStream, reply: &Value) -> io::Result<()> {
    let mut line = reply.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes()).await
}

/// Why a client request failed.
#[derive(Debug)]
pub enum ClientError {
    /// Nothing listens for that pid: no such process, or not a baton.
    NotRunning(String),
    /// Anything else, explained.
    Failed(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::NotRunning(m) | ClientError::Failed(m) => f.write_str(m),
        }
    }
}

/// A connection to the control socket of `pid`, whose identity has been checked.
pub struct Client {
    pid: u32,
    stream: BufReader<StdUnixStream>,
}

impl Client {
    pub fn connect(pid: u32) -> Result<Client, ClientError> {
        let address = SocketAddr::from_abstract_name(name(pid))
            .map_err(|e| ClientError::Failed(e.to_string()))?;
        let stream = StdUnixStream::connect_addr(&address).map_err(|e| {
            ClientError::NotRunning(format!(
                "no baton process with pid {pid} answers on its control socket @{} ({e}); is {pid} the pid of a running baton?",
                name(pid)
            ))
        })?;
        let peer =
            nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
                .map_err(|e| {
                    ClientError::Failed(format!(
                        "cannot read the control socket's credentials: {e}"
                    ))
                })?;
        if peer.pid() as u32 != pid {
            return Err(ClientError::Failed(format!(
                "the control socket @{} belongs to pid {}, not {pid}; refusing to talk to it",
                name(pid),
                peer.pid()
            )));
        }
        Ok(Client {
            pid,
            stream: BufReader::new(stream),
        })
    }

    /// Sends `request` and waits up to `timeout` for the answer.
    pub fn request(&mut self, request: &str, timeout: Duration) -> Result<Value, ClientError> {
        let pid = self.pid;
        let stream = self.stream.get_mut();
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|_| stream.write_all(format!("{request}\n").as_bytes()))
            .map_err(|e| {
                ClientError::Failed(format!("cannot send {request:?} to pid {pid}: {e}"))
            })?;
        let mut line = String::new();
        match self.stream.read_line(&mut line) {
            Ok(0) => Err(ClientError::Failed(format!(
                "pid {pid} closed the control connection without an answer"
            ))),
            Ok(_) => serde_json::from_str(&line).map_err(|e| {
                ClientError::Failed(format!(
                    "pid {pid} answered something unreadable ({e}): {line:?}"
                ))
            }),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(ClientError::Failed(format!(
                    "no answer from pid {pid} within {}",
                    humantime::format_duration(timeout)
                )))
            }
            Err(e) => Err(ClientError::Failed(format!(
                "reading the answer of pid {pid}: {e}"
            ))),
        }
    }
}

/// A handle on a process that survives pid reuse: readable once the process has exited.
#[derive(Debug)]
pub struct ProcessHandle(OwnedFd);

impl From<OwnedFd> for ProcessHandle {
    /// A pidfd.
    fn from(pidfd: OwnedFd) -> ProcessHandle {
        ProcessHandle(pidfd)
    }
}

impl ProcessHandle {
    pub fn open(pid: u32) -> io::Result<ProcessHandle> {
        // SAFETY: pidfd_open returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just gave us this fd.
        Ok(ProcessHandle(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// SIGKILL, to exactly this process (a recycled pid cannot be hit).
    pub fn kill(&self) {
        let _ = self.signal(libc::SIGKILL);
    }

    /// Sends `signal` to exactly this process.
    pub fn signal(&self, signal: libc::c_int) -> io::Result<()> {
        // SAFETY: a plain syscall on an fd we own.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// A second fd for the same process (e.g. to wait for its exit asynchronously).
    pub fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        self.0.try_clone()
    }

    /// Waits until the process has exited; false on timeout.
    pub fn wait_exit(&self, timeout: Duration) -> io::Result<bool> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let mut fds = [PollFd::new(self.0.as_fd(), PollFlags::POLLIN)];
            match poll(
                &mut fds,
                PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX),
            ) {
                Ok(0) => return Ok(false),
                Ok(_) => return Ok(true),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub fn raw(&self) -> i32 {
        self.0.as_raw_fd()
    }
}
