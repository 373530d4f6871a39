//! Zero-downtime upgrades for any Rust service, native to systemd and at home without it.
//!
//! `baton-lifecycle` runs the life of a network service's process: it takes the listening
//! sockets by name (from systemd's socket activation, the previous generation, or bound
//! itself), tells the service manager when it is ready, and on `systemctl reload` (or SIGUSR2,
//! or [`Handle::upgrade`]) starts the possibly new binary, hands it the very same sockets, waits
//! until it serves, keeps it on probation (rolling back if it dies), makes it the unit's main
//! process and drains its own connections. Without systemd it daemonizes, holds a locked
//! pidfile, and runs a small keeper that restarts a crashed generation while clients wait in the
//! listen backlog. It has no HTTP in it: the service plugs in as an accept loop (raw TCP, UDP,
//! axum, tonic, hyper with the `hyper` feature).
//!
//! # Example: a TCP echo server that upgrades itself
//!
//! ```no_run
//! use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let options = baton_lifecycle::Options::new("echo", env!("CARGO_PKG_VERSION"))
//!         .listen("echo=127.0.0.1:7000".parse()?);
//!     // SAFETY: first thing in main, no other thread exists.
//!     let lifecycle = unsafe { baton_lifecycle::start(options) }?;
//!     let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//!     let exit = runtime.block_on(lifecycle.serve(|mut accept| async move {
//!         let listener = accept.tcp("echo").expect("the echo listener");
//!         loop {
//!             let (stream, _) = tokio::select! {
//!                 _ = accept.stopping() => return,
//!                 accepted = listener.accept() => match accepted {
//!                     Ok(accepted) => accepted,
//!                     Err(_) => {
//!                         // Out of fds, most likely: wait instead of spinning.
//!                         tokio::time::sleep(std::time::Duration::from_millis(100)).await;
//!                         continue;
//!                     }
//!                 },
//!             };
//!             let connection = accept.connection();
//!             tokio::spawn(async move {
//!                 let (read, mut write) = stream.into_split();
//!                 let mut lines = BufReader::new(read).lines();
//!                 loop {
//!                     tokio::select! {
//!                         // Finish the line in hand, then close: the drain waits for us.
//!                         _ = connection.draining() => return,
//!                         line = lines.next_line() => match line {
//!                             Ok(Some(line)) => {
//!                                 if write.write_all(format!("{line}\n").as_bytes()).await.is_err() {
//!                                     return;
//!                                 }
//!                             }
//!                             _ => return,
//!                         },
//!                     }
//!                 }
//!             });
//!         }
//!     }))?;
//!     eprintln!("echo: {exit:?}");
//!     Ok(())
//! }
//! ```
//!
//! The complete program is `examples/echo.rs`; `examples/axum.rs` serves an axum router, with
//! the `hyper` feature's `hyper::serve_connection`; `examples/tonic.rs` serves tonic's gRPC
//! health service with `serve_with_incoming_shutdown`, its drain being tonic's own.
//!
//! # Under systemd
//!
//! A socket unit holds the sockets (named with `FileDescriptorName=`, matched to the names of
//! [`Options::listen`]); the service is `Type=notify` with `NotifyAccess=main`. `ExecReload=`
//! must wait for the upgrade's outcome, because `systemctl reload` on systemd 252 returns at
//! once otherwise: the service's binary offers a client of the control socket for it (the echo
//! example's `echo reload PID`, baton's `baton reload`, both a few lines on
//! [`control::Client`]). `KillMode=control-group` stops a draining old generation with the
//! unit; `FileDescriptorStoreMax=` keeps self-bound sockets across a crash ([`fdstore`]).
//!
//! ```ini
//! # echo.socket
//! [Socket]
//! ListenStream=127.0.0.1:7000
//! FileDescriptorName=echo
//!
//! [Install]
//! WantedBy=sockets.target
//!
//! # echo.service
//! [Unit]
//! Requires=echo.socket
//! After=echo.socket
//!
//! [Service]
//! Type=notify
//! NotifyAccess=main
//! ExecStart=/usr/bin/echo-server
//! ExecReload=/usr/bin/echo-server reload $MAINPID
//! # Bounds the start and each reload (the new generation's start and its probation).
//! TimeoutStartSec=90s
//! KillMode=control-group
//! Restart=on-failure
//! RuntimeDirectory=echo
//! FileDescriptorStoreMax=16
//! ```
//!
//! No `PIDFile=`: the main pid moves with `MAINPID=`, and a pidfile races it. A process the
//! service starts for its own ends (a helper, a CGI) inherits `NOTIFY_SOCKET`: remove it there
//! (`Command::env_remove("NOTIFY_SOCKET")`), or the helper's messages may reach systemd.
//!
//! The upgrade, as the service manager sees it: `RELOADING=1`, then `READY=1` once the new
//! generation serves on probation, then `MAINPID=<new>` + `BARRIER=1` from the old process
//! (the new one cannot announce itself under `NotifyAccess=main`, and is double-forked so that
//! it is PID 1's child before it becomes the main pid), then `READY=1` from the new one. If the
//! new binary fails before it serves, the old one sends `READY=1` with a `STATUS=` naming the
//! reason and serves on; if it dies during the probation, the old one accepts again on its own
//! copies of the sockets. The full protocol is in [`upgrade`] and [`generation`].
//!
//! A service with its own connection handling can spare its clients the reconnect at each
//! upgrade: the old generation passes idle connections on to the new one over a socket pair
//! ([`handoff`], with [`workload::Serving::pass_on`] and [`workload::Serving::adopt`]); baton
//! does so for its plain HTTP/1.1 keep-alive connections.
//!
//! # Readiness
//!
//! [`Lifecycle::serve`] (or [`Lifecycle::run`]) is the ready step: until it is called, a new
//! generation has not told the old one it is ready, so the old one serves on; a service that
//! must warm up (caches, connections to its backends) does so before calling it, on its
//! runtime of any flavour. `READY=1` (with the `STATUS=` of [`Handle::set_status`], or
//! `serving generation G (pid P) on ...`) follows once the accept loop runs and this process is
//! the main pid.
//!
//! # Without systemd
//!
//! With [`Options::daemon`] (or [`Options::keeper`], or as PID 1 of a container) [`start`] turns
//! the process into the keeper ([`keeper`]): it holds the sockets and the pidfile, runs the
//! service as its child with the same arguments, restarts it when it crashes, and plays
//! systemd's part of the upgrade protocol; SIGUSR2 to the pid in the pidfile upgrades.
//!
//! # The environment contract
//!
//! [`start`] takes (and removes from the environment) what the service manager or the previous
//! process passed: `LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES` ([`activation`]), and the
//! library's own variables `<PREFIX>_*` ([`mod@env`]), honoured only when meant for this very
//! process; `NOTIFY_SOCKET` stays for [`notify`]. Changing the environment, forking and taking
//! fds are sound only while no other thread exists: that is why [`start`] (and the functions
//! of the modules that do it, such as [`generation::prepare`]) are `unsafe`.

#![deny(unsafe_op_in_unsafe_fn)]

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;

pub mod activation;
pub mod control;
pub mod daemon;
pub mod env;
mod exec;
pub mod fdstore;
pub mod generation;
mod handle;
pub mod handoff;
#[cfg(feature = "hyper")]
pub mod hyper;
pub mod keeper;
pub mod logging;
pub mod manager;
mod nofile;
pub mod notify;
pub mod pidfile;
pub mod signals;
pub mod upgrade;
pub mod workload;

pub use activation::{ListenAddress, ListenSpec};
pub use generation::Exit;
pub use handle::{Accept, Connection, Handle, Upgraded};
pub use signals::SignalMap;
pub use workload::{DrainReport, Serving, Stats, Workload};

pub use env::Identity;
use generation::{Process, StartInfo};
use handle::AcceptLoops;
use pidfile::Pidfile;

/// How a service wants its lifecycle: its name, its listeners, and the knobs of the upgrade.
#[derive(Debug, Clone)]
pub struct Options {
    identity: Identity,
    settings: generation::Settings,
    pidfile: Option<PathBuf>,
    daemon: bool,
    keeper: bool,
    log: Option<(String, Option<PathBuf>)>,
    startsecs: Duration,
    startretries: u32,
    raise_nofile: bool,
}

impl Options {
    /// A service called `name` (its journal identifier, runtime directory `/run/<name>`, and
    /// environment prefix `<NAME>_`), at `version`, with no listener yet, a 30 s upgrade
    /// timeout, a 10 s probation and a 30 s drain.
    pub fn new(name: &str, version: &str) -> Options {
        Options {
            identity: Identity::new(name, version),
            settings: generation::Settings {
                listeners: Vec::new(),
                exec: None,
                upgrade_timeout: Duration::from_secs(30),
                probation: Duration::from_secs(10),
                drain_timeout: Duration::from_secs(30),
                config: None,
                signals: SignalMap::default(),
                control_socket: true,
                backlog: activation::DEFAULT_BACKLOG,
            },
            pidfile: None,
            daemon: false,
            keeper: false,
            log: None,
            startsecs: Duration::from_secs(1),
            startretries: 3,
            raise_nofile: true,
        }
    }

    /// Adds a listener: the socket passed under its name, else bound to its address
    /// (`NAME=IP:PORT` for TCP, `NAME=udp:IP:PORT`, `NAME=unix:/path`; see [`ListenSpec`]).
    pub fn listen(mut self, spec: ListenSpec) -> Options {
        self.settings.listeners.push(spec);
        self
    }

    /// The prefix of the library's environment variables and journal fields (default: the
    /// name in upper case).
    pub fn env_prefix(mut self, prefix: &str) -> Options {
        self.identity.env_prefix = prefix.to_owned();
        self
    }

    /// A locked pidfile that refuses a second instance and names the main process.
    pub fn pidfile(mut self, path: impl Into<PathBuf>) -> Options {
        self.pidfile = Some(path.into());
        self
    }

    /// Runs in the background (daemon(7)) under a keeper; implies a pidfile
    /// ([`pidfile::default_path`] unless one is set).
    pub fn daemon(mut self, daemon: bool) -> Options {
        self.daemon = daemon;
        self
    }

    /// Runs under a keeper in the foreground (a container's PID 1 always does).
    pub fn keeper(mut self, keeper: bool) -> Options {
        self.keeper = keeper;
        self
    }

    /// How long the new generation may take to serve before the upgrade is called off.
    pub fn upgrade_timeout(mut self, timeout: Duration) -> Options {
        self.settings.upgrade_timeout = timeout;
        self
    }

    /// How long the old generation stands by after the new one serves (zero: none).
    pub fn probation(mut self, probation: Duration) -> Options {
        self.settings.probation = probation;
        self
    }

    /// How long a stopping or handing-over generation waits for its connections.
    pub fn drain_timeout(mut self, timeout: Duration) -> Options {
        self.settings.drain_timeout = timeout;
        self
    }

    /// The configuration file the service runs with, for the start's log line.
    pub fn config_file(mut self, path: impl Into<PathBuf>) -> Options {
        self.settings.config = Some(path.into());
        self
    }

    /// The executable an upgrade starts (default: the one running).
    pub fn exec(mut self, exe: impl Into<PathBuf>) -> Options {
        self.settings.exec = Some(exe.into());
        self
    }

    /// Which signals stop, upgrade, and reopen the logs.
    pub fn signals(mut self, map: SignalMap) -> Options {
        self.settings.signals = map;
        self
    }

    /// Whether to listen on the control socket `<runtime dir>/control/<pid>` (default: yes).
    pub fn control_socket(mut self, enabled: bool) -> Options {
        self.settings.control_socket = enabled;
        self
    }

    /// Whether [`start`] raises the soft `RLIMIT_NOFILE` to the hard limit (default: yes), so
    /// that the number of connections is not capped at the usual soft limit of 1024. It
    /// happens before the sockets are bound and before the keeper starts (its generations
    /// inherit the limit); the generation (or the keeper) logs both values when it starts, or
    /// a warning when the raise failed. Programs the service starts inherit the raised limit:
    /// one that uses select(2) must lower it again.
    pub fn raise_nofile(mut self, raise: bool) -> Options {
        self.raise_nofile = raise;
        self
    }

    /// The listen backlog of the stream sockets bound here rather than passed in (default:
    /// [`activation::DEFAULT_BACKLOG`], 4096, as systemd's `Backlog=`); the kernel caps it at
    /// `net.core.somaxconn`. A socket unit's sockets keep the unit's backlog.
    pub fn backlog(mut self, backlog: u32) -> Options {
        self.settings.backlog = backlog;
        self
    }

    /// Sets up logging with `tracing`: to the journal with structured fields when stderr is
    /// the journal, else to `file` or stderr. Without it, the service sets up its own
    /// subscriber.
    pub fn log(mut self, level: &str, file: Option<PathBuf>) -> Options {
        self.log = Some((level.to_owned(), file));
        self
    }

    /// The keeper's restart policy: a start succeeded once ready for `startsecs`; `startretries`
    /// failed starts in a row are retried before it gives up.
    pub fn restarts(mut self, startsecs: Duration, startretries: u32) -> Options {
        self.startsecs = startsecs;
        self.startretries = startretries;
        self
    }
}

/// Why the lifecycle could not start or serve. The messages are one line each, for an
/// operator.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// An inherited variable is malformed (a broken handshake fd, a bad generation number).
    Environment(String),
    /// The service's configuration, as [`start_with`]'s `configure` reported it.
    Config(String),
    /// The pidfile: locked by a running instance, or not writable.
    Pidfile(pidfile::PidfileError),
    /// The sockets: taking the passed ones, or binding the others.
    Sockets(String),
    /// Going to the background.
    Daemon(std::io::Error),
    /// Logging could not be set up.
    Logging(String),
    /// Serving failed (the workload, the runtime, the signal handlers).
    Serve(String),
    /// An upgrade asked for with [`Handle::upgrade`] failed or was rolled back.
    Upgrade(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Environment(m)
            | Error::Config(m)
            | Error::Sockets(m)
            | Error::Logging(m)
            | Error::Serve(m)
            | Error::Upgrade(m) => f.write_str(m),
            Error::Pidfile(e) => write!(f, "{e}"),
            Error::Daemon(e) => write!(f, "cannot daemonize: {e}"),
        }
    }
}

impl std::error::Error for Error {}

/// Takes this process's place in the service: the inherited sockets and handshake, the
/// pidfile, daemon mode. In keeper mode ([`Options::daemon`], [`Options::keeper`], a
/// container's PID 1) it does not return: the process becomes the keeper and exits with the
/// service.
///
/// # Safety
/// Call it before any other thread exists (first thing in `main`, before building a tokio
/// runtime): it changes the environment, may fork, and takes the inherited fds the environment
/// names as its own. In daemon mode it closes every fd above stderr but its own: nothing else
/// in the process may own one then (open your files after `start`).
pub unsafe fn start(options: Options) -> Result<Lifecycle, Error> {
    let identity = options.identity.clone();
    // SAFETY: this function's own contract.
    unsafe { start_with(identity, || Ok(options)) }
}

/// [`start`] for a service whose options come from a configuration that may fail to load:
/// `configure` runs once the process knows whether it is a new generation, so that its error
/// fails the upgrade with that message (the old generation serves on) instead of going
/// unnoticed. `identity` (the service's name and version) is needed before that, to read the
/// environment; it wins over the one in the options.
///
/// # Safety
/// As for [`start`]: before any other thread exists; `configure` must not start one either
/// (the environment changes after it), nor keep an fd that daemon mode would close.
pub unsafe fn start_with<F>(identity: Identity, configure: F) -> Result<Lifecycle, Error>
where
    F: FnOnce() -> Result<Options, String>,
{
    if !env::set_identity(identity.clone()) && *env::identity() != identity {
        return Err(Error::Environment(format!(
            "the service's identity was read as {:?} before start_with set it to {:?}: call start first",
            env::identity().name,
            identity.name
        )));
    }
    // SAFETY (of this function's contract): no other thread exists, for all calls below.
    unsafe { env::init() };
    if keeper::resuming() {
        exit_with(unsafe { keeper::resume() });
    }
    // A new generation reports any failure to the old one, which relays it to whoever asked.
    let mut handshake = unsafe { upgrade::Handshake::take_from_env() }
        .map_err(|e| Error::Environment(e.to_string()))?;
    let is_upgrade = handshake.is_some();
    // A generation started by a keeper reports a failed start to it, and leaves the pidfile
    // and daemonizing to it.
    let keeper_pid = keeper::pid_from_env();
    let mut keeper_report = unsafe { keeper::take_report_fd() }.map_err(Error::Environment)?;
    let mut fail_early = |e: Error| {
        let message = e.to_string();
        if let Some(h) = handshake.take() {
            h.fail(&message);
        }
        if let Some(r) = keeper_report.take() {
            r.fail(&message);
        }
        e
    };
    let state = unsafe { upgrade::take_state_from_env() }
        .map_err(|e| fail_early(Error::Environment(e.to_string())))?;
    let options = configure().map_err(|e| fail_early(Error::Config(e)))?;
    // Before the sockets are bound and the keeper starts; logged once logging is set up.
    if options.raise_nofile {
        nofile::raise();
    }
    if !is_upgrade && keeper::wanted(options.daemon || options.keeper) {
        exit_with(unsafe { keeper::run(keeper_settings(&options), options.daemon) });
    }
    // The pidfile: inherited, already locked, by a new generation; locked anew by a first one;
    // the keeper's alone under a keeper.
    let pidfile_path = options
        .pidfile
        .clone()
        .or_else(|| options.daemon.then(pidfile::default_path));
    let inherited = unsafe { Pidfile::inherit(pidfile_path.as_deref().unwrap_or("".as_ref())) }
        .map_err(|e| fail_early(Error::Pidfile(e)))?;
    let pidfile = match (inherited, &pidfile_path) {
        (Some(inherited), _) => Some(inherited),
        (None, _) if keeper_pid.is_some() => None,
        (None, Some(path)) if !is_upgrade => Some(
            Pidfile::acquire(path, options.pidfile.is_none())
                .map_err(|e| fail_early(Error::Pidfile(e)))?,
        ),
        (None, _) => None,
    };
    let mut process = unsafe { generation::prepare(options.settings.clone(), pidfile) }
        .map_err(|e| fail_early(Error::Sockets(format!("{e:#}"))))?;
    if let Some(h) = handshake.take() {
        process.attach_handshake(h);
    }
    if let Some(r) = keeper_report.take() {
        process.report_to(r);
    }
    let log_file = options.log.as_ref().and_then(|(_, file)| file.clone());
    // A new generation is a daemon already; under a keeper, the keeper is.
    if options.daemon && !is_upgrade && keeper_pid.is_none() {
        match unsafe { daemon::daemonize(log_file.as_deref(), &process.fds()) } {
            Ok(readiness) => process.report_to(readiness),
            Err(e) => return Err(Error::Daemon(e)),
        }
    }
    if let Some(pidfile) = process.pidfile() {
        if !process.is_upgrade() {
            if let Err(e) = pidfile.write_pid(std::process::id()) {
                let message = format!(
                    "pidfile {}: cannot write the pid: {e}",
                    pidfile.path().display()
                );
                process.abandon(&message);
                return Err(Error::Environment(message));
            }
        }
    }
    let mut destination = None;
    if let Some((level, file)) = &options.log {
        match logging::init(level, file.as_deref()) {
            Ok(d) => destination = Some(d),
            Err(e) => {
                process.abandon(&e);
                return Err(Error::Logging(e));
            }
        }
    }
    env::report_ignored_private_env();
    if let Some(keeper) = keeper_pid {
        keeper::watch(keeper);
    }
    let (requests, receiver) = mpsc::unbounded_channel();
    process.take_requests(receiver);
    let shutdown = process.shutdown_token();
    Ok(Lifecycle {
        process,
        state,
        destination,
        handle: Handle::new(requests, shutdown),
    })
}

fn keeper_settings(options: &Options) -> keeper::Settings {
    let (log_level, log_file) = options.log.clone().unwrap_or(("info".to_owned(), None));
    keeper::Settings {
        exec: options.settings.exec.clone(),
        pidfile: options.pidfile.clone(),
        listeners: options.settings.listeners.clone(),
        log_level,
        log_file,
        startsecs: options.startsecs,
        startretries: options.startretries,
        drain_timeout: options.settings.drain_timeout,
        backlog: options.settings.backlog,
    }
}

fn exit_with(code: std::process::ExitCode) -> ! {
    std::process::exit(if code == std::process::ExitCode::SUCCESS {
        0
    } else {
        1
    })
}

/// This process's place in the service, from [`start`] until it serves.
pub struct Lifecycle {
    process: Process,
    /// What the previous generation handed over ([`Handle::set_handover_state`]).
    state: Option<Vec<u8>>,
    /// Where [`Options::log`] sends the logs, if it was set.
    destination: Option<logging::Destination>,
    handle: Handle,
}

impl Lifecycle {
    /// 1 for a fresh start, +1 per upgrade.
    pub fn generation(&self) -> u64 {
        self.process.generation
    }

    /// `NAME=ADDRESS` of every listener, in order.
    pub fn listeners(&self) -> Vec<String> {
        self.process
            .listeners
            .iter()
            .map(|l| l.to_string())
            .collect()
    }

    /// The state the previous generation handed over with [`Handle::set_handover_state`], if
    /// this process was started by an upgrade and it set one.
    pub fn state(&self) -> Option<&[u8]> {
        self.state.as_deref()
    }

    /// Where the logs go, when [`Options::log`] set them up: a service reports its own last
    /// error there (the journal, a file) or on stderr.
    pub fn log_destination(&self) -> Option<logging::Destination> {
        self.destination
    }

    /// A handle to request an upgrade or a stop, set the status, and count connections.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Gives up before serving: tells whoever waits for this start (the old generation, the
    /// keeper, a foreground process) why, so an upgrade fails with `message`.
    pub fn abandon(self, message: &str) {
        self.process.abandon(message)
    }

    /// Serves with `accept` until stopped or handed over; works on any tokio runtime flavour.
    ///
    /// `accept` is called once the sockets may be accepted on (a new generation: once its
    /// predecessor committed the handover), and again after a rollback. It gets the
    /// listeners by name and returns the accept loop, which should return when
    /// [`Accept::stopping`] fires; connections it spawns hold an [`Accept::connection`] so the
    /// drain waits for them. `READY=1` follows the first call.
    pub async fn serve<F, Fut>(self, accept: F) -> Result<Exit, Error>
    where
        F: FnMut(Accept) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let handle = self.handle.clone();
        self.run(move |_| Ok(AcceptLoops::new(accept, handle)))
            .await
    }

    /// Serves with a [`Workload`] built once the sockets are taken (`build` gets what it
    /// needs to know, such as the generation and the lifecycle's [`Stats`]).
    pub async fn run<W, F>(self, build: F) -> Result<Exit, Error>
    where
        W: Workload,
        F: FnOnce(&StartInfo) -> anyhow::Result<W>,
    {
        self.process
            .serve(build)
            .await
            .map_err(|e| Error::Serve(format!("{e:#}")))
    }
}
