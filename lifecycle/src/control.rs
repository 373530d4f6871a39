//! The control socket: how `baton reload`, `baton status` and `baton stop` talk to a running
//! process and learn the outcome.
//!
//! Each serving process listens on a unix socket at a path named after its pid,
//! `<dir>/control/<pid>`, where `<dir>` is the runtime directory: `$RUNTIME_DIRECTORY` when
//! systemd sets it (`RuntimeDirectory=baton`), `/run/baton` for root, `$XDG_RUNTIME_DIR/baton`
//! otherwise, `/tmp/baton-<uid>` as a last resort ([`directories`]). The `control` directory is
//! created mode 0700 and must be owned by this process's user, inside a parent that nobody
//! else may write: no other user can take the name, replace the socket, or even connect (root
//! can, by its capabilities). The socket itself is mode 0600.
//!
//! One socket per pid, not one address handed from generation to generation: the answer to
//! SO_PEERCRED on a socket is the process that called `listen(2)`, so a handed-over socket
//! would keep naming the first generation; and two instances on one machine (different
//! pidfiles, different units) never share a path. A new generation binds its own socket, the
//! old one keeps answering on its own until it exits and removes it; the client finds the
//! socket from the pid (from `--pid` or the pidfile) and insists that the server's SO_PEERCRED
//! pid is that pid, so a stale file or anything else at that path is caught instead of obeyed.
//! The server answers only root and its own user (SO_PEERCRED again).
//!
//! A control socket that cannot be set up is a warning, never a failed start or upgrade: the
//! process then serves without one (signals still work).
//!
//! Earlier versions listened on the abstract name `@baton/control/<pid>`, which anyone could
//! bind first; the client still tries it last, with the same pid check, so that the `baton
//! reload` of a new package can upgrade a process of an old one.
//!
//! Protocol: the client sends one line, the server answers one JSON line.
//!
//! | request   | answer                                                                      |
//! |-----------|-----------------------------------------------------------------------------|
//! | `upgrade` | once the new process serves: `{"ok":true,"pid":N,"generation":G,"took_ms":T,"probation_ms":P,"promoted":B}` (`promoted`: it is the main pid already, i.e. no probation) or `{"ok":false,"error":"..."}` |
//! | `upgrade wait` | the same, but only once the probation is over: `"promoted":true`, or `{"ok":false,"error":"... rolled back ..."}` |
//! | `status`  | `{"ok":true,"pid":..,"generation":..,"version":..,"started":..,"uptime_secs":..,"listeners":[..],"state":".."}` |
//! | `stop`    | `{"ok":true}`, then the process stops as on SIGTERM                          |
//!
//! A client the server does not answer gets `{"ok":false,"refused":true,"error":"..."}`.

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{
    SocketAddr, UnixListener as StdUnixListener, UnixStream as StdUnixStream,
};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest request line the server reads.
const MAX_REQUEST: u64 = 256;

/// The abstract socket name earlier versions listened on (the client's fallback).
pub fn legacy_name(pid: u32) -> String {
    format!("{}/control/{pid}", crate::env::identity().name)
}

/// The base directories baton keeps its runtime files in, best first, for the user `uid`:
/// `$RUNTIME_DIRECTORY` (systemd's `RuntimeDirectory=`), `/run/baton` for root,
/// `$XDG_RUNTIME_DIR/baton` when that is `uid`'s, `/run/user/<uid>/baton`,
/// `/tmp/baton-<uid>`.
fn bases(uid: u32, own: bool) -> Vec<PathBuf> {
    let name = &crate::env::identity().name;
    let mut bases = Vec::new();
    if let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY").filter(|d| !d.is_empty()) {
        // Several directories are separated by colons; the first is baton's.
        let first = dir
            .to_str()
            .map(|d| d.split(':').next().unwrap_or(d).to_owned());
        if let Some(first) = first.filter(|d| !d.is_empty()) {
            bases.push(PathBuf::from(first));
        }
    }
    if uid == 0 {
        bases.push(Path::new("/run").join(name));
    } else {
        if own {
            if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
                bases.push(Path::new(&dir).join(name));
            }
        }
        bases.push(PathBuf::from(format!("/run/user/{uid}/{name}")));
        // A systemd unit's RuntimeDirectory=baton, seen from a shell without the variable.
        bases.push(Path::new("/run").join(name));
    }
    bases.push(PathBuf::from(format!("/tmp/{name}-{uid}")));
    let mut unique = Vec::new();
    for b in bases {
        if !unique.contains(&b) {
            unique.push(b);
        }
    }
    unique
}

/// Where this process may put its control socket, best first (see the module docs).
pub fn directories() -> Vec<PathBuf> {
    let uid = nix::unistd::geteuid().as_raw();
    bases(uid, true)
        .into_iter()
        .map(|b| b.join("control"))
        .collect()
}

/// The path of the control socket of `pid` in `dir`.
pub fn socket_path(dir: &Path, pid: u32) -> PathBuf {
    dir.join(pid.to_string())
}

/// Makes `dir` (a `control` directory) ready: its parent exists and nobody but this user (or
/// root) may write it; `dir` itself is a directory of this user that nobody else may enter.
fn prepare_directory(dir: &Path) -> io::Result<()> {
    let uid = nix::unistd::geteuid().as_raw();
    let parent = dir.parent().unwrap_or(Path::new("/"));
    if std::fs::symlink_metadata(parent).is_err() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)?;
    }
    let meta = std::fs::symlink_metadata(parent)?;
    if !meta.is_dir() || (meta.uid() != uid && meta.uid() != 0) || meta.mode() & 0o022 != 0 {
        return Err(io::Error::other(format!(
            "{} is not a directory of uid {uid} or root that only its owner may write",
            parent.display()
        )));
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
        return Err(io::Error::other(format!(
            "{} is not a directory of uid {uid} that only it may enter (mode 0700)",
            dir.display()
        )));
    }
    Ok(())
}

/// Removes the sockets that processes which no longer exist left in `dir` (after a crash).
fn sweep(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if pid <= 0 || pid as u32 == std::process::id() {
            continue;
        }
        let gone = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
            == Err(nix::errno::Errno::ESRCH);
        // No listener either (a directory shared across pid namespaces keeps live ones).
        if gone
            && StdUnixStream::connect(entry.path())
                .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused)
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Binds the control socket of this process in the first directory that works.
fn bind() -> Result<(StdUnixListener, PathBuf), String> {
    let pid = std::process::id();
    let mut problems = Vec::new();
    for dir in directories() {
        let attempt = (|| -> io::Result<(StdUnixListener, PathBuf)> {
            prepare_directory(&dir)?;
            sweep(&dir);
            let path = socket_path(&dir, pid);
            // Named after our own pid in a directory only we may write: whatever is there was
            // left by a dead process that had this pid, unless a process of the same pid in
            // another pid namespace sharing this directory listens on it: leave that one be.
            if StdUnixStream::connect(&path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{} is in use by a live process (of another pid namespace?)",
                        path.display()
                    ),
                ));
            }
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            let listener = StdUnixListener::bind(&path)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            Ok((listener, path))
        })();
        match attempt {
            Ok(bound) => return Ok(bound),
            Err(e) => problems.push(format!("{}: {e}", dir.display())),
        }
    }
    Err(problems.join("; "))
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
    /// From inside the process only: the base of every `STATUS=` line from now on.
    SetStatus(String),
    /// From inside the process only: what an upgrade hands the next generation.
    SetState(Vec<u8>),
}

/// The control socket of this process: requests arrive on `requests`.
pub struct Control {
    pub requests: mpsc::Receiver<Request>,
    clients: tokio_util::task::TaskTracker,
    /// The socket's path, removed at [`Control::close`]; `None` without a socket.
    path: Option<PathBuf>,
    /// Without a socket nothing sends, but `requests` stays open.
    _idle: Option<mpsc::Sender<Request>>,
}

impl Control {
    /// Stops taking requests and waits (up to `timeout`) until every answer already given has
    /// been written: a process must not exit with a `baton reload` answer still in memory.
    /// Removes the socket.
    pub async fn close(&mut self, timeout: Duration) {
        self.requests.close();
        self.clients.close();
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(path);
        }
        let _ = tokio::time::timeout(timeout, self.clients.wait()).await;
    }

    /// The socket's path, if this process has one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

/// Binds this process's control socket. Call inside the runtime. Never fails: without a
/// socket (no usable directory) it logs a warning and the process serves without one.
pub fn listen(enabled: bool) -> Control {
    let (tx, rx) = mpsc::channel(16);
    let clients = tokio_util::task::TaskTracker::new();
    if !enabled {
        return Control {
            requests: rx,
            clients,
            path: None,
            _idle: Some(tx),
        };
    }
    let listener = bind().and_then(|(listener, path)| {
        listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixListener::from_std(listener))
            .map(|l| (l, path.clone()))
            .map_err(|e| format!("{}: {e}", path.display()))
    });
    let (listener, path) = match listener {
        Ok(bound) => bound,
        Err(e) => {
            tracing::warn!(
                event = "control-unavailable",
                "no control socket ({e}): `{name} reload|status|stop` cannot reach this process; signals still work",
                name = crate::env::identity().name
            );
            return Control {
                requests: rx,
                clients,
                path: None,
                _idle: Some(tx),
            };
        }
    };
    tracing::debug!("control socket {}", path.display());
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
    Control {
        requests: rx,
        clients,
        path: Some(path),
        _idle: None,
    }
}

async fn serve_client(
    mut stream: tokio::net::UnixStream,
    tx: mpsc::Sender<Request>,
) -> io::Result<()> {
    let peer =
        nix::sys::socket::getsockopt(&stream.as_fd(), nix::sys::socket::sockopt::PeerCredentials)?;
    let own = nix::unistd::geteuid().as_raw();
    if peer.uid() != 0 && peer.uid() != own {
        let reply = json!({"ok": false, "refused": true, "error": format!("uid {} may not control pid {} (only root and uid {own} may)", peer.uid(), std::process::id())});
        return write_reply(&mut stream, &reply).await;
    }
    let mut line = String::new();
    let mut reader =
        tokio::io::AsyncReadExt::take(tokio::io::BufReader::new(&mut stream), MAX_REQUEST);
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
    /// This user may not control that process (its control socket is another user's).
    Refused(String),
    /// Anything else, explained.
    Failed(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::NotRunning(m) | ClientError::Refused(m) | ClientError::Failed(m) => {
                f.write_str(m)
            }
        }
    }
}

/// A connection to the control socket of `pid`, whose identity has been checked.
pub struct Client {
    pid: u32,
    stream: BufReader<StdUnixStream>,
}

/// The owner of process `pid`, as `/proc` shows it.
fn owner(pid: u32) -> Option<u32> {
    std::fs::metadata(format!("/proc/{pid}"))
        .ok()
        .map(|m| m.uid())
}

impl Client {
    /// Finds the control socket of `pid` (see the module docs: the runtime directories of
    /// its user, then the abstract name of earlier versions) and checks that `pid` listens on
    /// it. The directories are the service's: set its identity first
    /// ([`crate::env::set_identity`]) when this process has not called [`crate::start`].
    pub fn connect(pid: u32) -> Result<Client, ClientError> {
        let me = nix::unistd::geteuid().as_raw();
        let uid = owner(pid).unwrap_or(me);
        let mut paths: Vec<PathBuf> = bases(uid, uid == me)
            .into_iter()
            .map(|b| socket_path(&b.join("control"), pid))
            .collect();
        if uid != me {
            // Our own runtime directory too: /proc may hide the owner (hidepid).
            for b in bases(me, true) {
                let p = socket_path(&b.join("control"), pid);
                if !paths.contains(&p) {
                    paths.push(p);
                }
            }
        }
        let mut denied = None;
        let mut impostor = None;
        let mut tried = Vec::new();
        let attempts = paths
            .iter()
            .map(|p| (p.display().to_string(), StdUnixStream::connect(p)))
            .chain(std::iter::once_with(|| {
                let name = legacy_name(pid);
                let stream = SocketAddr::from_abstract_name(&name)
                    .and_then(|a| StdUnixStream::connect_addr(&a));
                (format!("@{name}"), stream)
            }));
        for (place, stream) in attempts {
            let stream = match stream {
                Ok(stream) => stream,
                Err(e) => {
                    if e.kind() == io::ErrorKind::PermissionDenied && denied.is_none() {
                        denied = Some(place.clone());
                    }
                    tried.push(place);
                    continue;
                }
            };
            let peer =
                nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
                    .map_err(|e| {
                    ClientError::Failed(format!(
                        "cannot read the control socket's credentials: {e}"
                    ))
                })?;
            if peer.pid() as u32 != pid {
                // Not the process we mean (a stale file, a squatter on the abstract name).
                impostor.get_or_insert(format!("{place} belongs to pid {}", peer.pid()));
                continue;
            }
            return Ok(Client {
                pid,
                stream: BufReader::new(stream),
            });
        }
        if let Some(place) = denied {
            let who = if uid == 0 {
                "root's, and only root may use it; run this as root".to_owned()
            } else {
                format!(
                    "uid {uid}'s, and only that user and root may use it; run this as one of them"
                )
            };
            return Err(ClientError::Refused(format!(
                "permission denied: the control socket of pid {pid} ({place}) is {who}"
            )));
        }
        if let Some(impostor) = impostor {
            return Err(ClientError::Failed(format!(
                "no control socket of pid {pid} found, and {impostor}, not {pid}; refusing to talk to it"
            )));
        }
        Err(ClientError::NotRunning(format!(
            "no {name} process with pid {pid} answers on a control socket (tried {}); is {pid} the pid of a running {name}?",
            tried.join(", "),
            name = crate::env::identity().name
        )))
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
            Ok(_) => {
                let answer: Value = serde_json::from_str(&line).map_err(|e| {
                    ClientError::Failed(format!(
                        "pid {pid} answered something unreadable ({e}): {line:?}"
                    ))
                })?;
                if answer["refused"] == true {
                    return Err(ClientError::Refused(format!(
                        "pid {pid} refused: {}",
                        answer["error"].as_str().unwrap_or("no reason given")
                    )));
                }
                Ok(answer)
            }
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
