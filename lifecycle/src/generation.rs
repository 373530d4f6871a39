//! The life of one serving process: sockets, ready, serve, upgrade or stop, drain, exit.
//!
//! [`prepare`] does everything that must happen before a thread exists: it takes the sockets
//! passed by the service manager (or by the previous generation), removes the protocol's
//! variables from the environment, and records what a later upgrade needs. [`Process::run`]
//! builds the tokio runtime and runs the event loop of one `Generation` through its phases:
//!
//! | phase       | on SIGTERM/SIGINT, `baton stop` | on SIGUSR2/SIGHUP, `baton reload` | on its own events |
//! |-------------|---------------------------------|-----------------------------------|-------------------|
//! | `Serving`   | stop                            | start an upgrade → `Upgrading`    | —                 |
//! | `Upgrading` | call it off (N killed) or, past the commit, stop N with us; stop | ignored (a `reload` joins it) | N serves: stop accepting, drain → `Probation`; failed: `READY=1` + `STATUS=` with the reason → `Serving` |
//! | `Probation` | stop N and this process         | end the probation as passed, hand over, pass the request on to N | window passed (or N asks): hand over → drain, exit 0; N died: accept again on our sockets, `READY=1` + `STATUS=` naming the rollback → `Serving` |
//!
//! A new generation starts not being the main pid: it accepts after the commit, and only when
//! its predecessor says `main` does it send `READY=1` and take upgrade requests (one that comes
//! earlier asks the predecessor to end the probation first).
//!
//! The upgrade itself, step by step, is [`crate::upgrade`].
//!
//! What the service manager hears (sd_notify), in order: `READY=1` + `STATUS=` (and `FDSTORE=1`
//! for self-bound listeners) once this process is the main pid and accepts, `WATCHDOG=1` at half
//! the watchdog interval when one is set; then either `STOPPING=1` + `STATUS=` when a stop
//! begins, or `RELOADING=1` + `MONOTONIC_USEC` at an upgrade, then `READY=1` + `STATUS=` once
//! the new generation serves on probation, then `MAINPID=` + `BARRIER=1` (handed over: nothing
//! more) or `READY=1` + `STATUS=` naming the failure or the rollback.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::activation::{self, ListenSpec, Listener};
use crate::control::{self, Request};
use crate::daemon::Readiness;
use crate::env::Var;
use crate::handoff;
use crate::notify;
use crate::pidfile::{Pidfile, PIDFILE_FD_ENV};
use crate::signals::{Event, SignalMap, Signals};
use crate::upgrade::{
    self, Counts, HandedOver, Handshake, Predecessor, PredecessorEvent, Successor, SuccessorEvent,
    Upgrader,
};
use crate::workload::{DrainReport, Serving, Stats, Workload};

/// The environment variable that carries the generation from one process to the next.
pub const GENERATION_ENV: Var = Var::GENERATION;

/// What a generation needs to know beyond its sockets.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The listeners to serve: matched by name to the sockets passed in, else bound.
    pub listeners: Vec<ListenSpec>,
    /// The executable an upgrade starts; `None`: the one running (`/proc/self/exe`).
    pub exec: Option<std::path::PathBuf>,
    /// How long the new generation may take to serve before the upgrade is called off.
    pub upgrade_timeout: Duration,
    /// How long the old generation stands by after the new one serves; zero: no probation.
    pub probation: Duration,
    /// How long a stopping generation waits for its connections.
    pub drain_timeout: Duration,
    /// The configuration file this generation runs with, for the start's log line.
    pub config: Option<std::path::PathBuf>,
    /// Which signals stop, upgrade, and reopen the logs.
    pub signals: SignalMap,
    /// Whether to listen on a control socket (`<runtime dir>/control/<pid>`) for `reload`,
    /// `status` and `stop` requests from the service's CLI.
    pub control_socket: bool,
    /// The listen backlog of the stream sockets bound here ([`activation::DEFAULT_BACKLOG`]).
    pub backlog: u32,
}

/// How a generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Exit {
    /// Stopped (a stop signal, a stop request, the service manager): the connections drained.
    Stopped,
    /// Handed over to the next generation, now the main process; the connections drained.
    HandedOver { pid: i32, generation: u64 },
}

/// What a [`Workload`] is built from, once the sockets are taken and the runtime runs.
#[derive(Debug, Clone)]
pub struct StartInfo {
    /// 1 for a fresh start, +1 per upgrade.
    pub generation: u64,
    pub started: SystemTime,
    /// `NAME=ADDRESS` of each listener, in order.
    pub listeners: Vec<String>,
    /// The lifecycle's counters, for the service's metrics.
    pub stats: Arc<Stats>,
}

/// A process ready to serve: its settings, its sockets, and its place in the line of
/// generations.
pub struct Process {
    pub settings: Settings,
    pub listeners: Vec<Listener>,
    /// 1 for a fresh start, +1 per upgrade.
    pub generation: u64,
    pub started: SystemTime,
    upgrader: Upgrader,
    /// Present when this process was started by an upgrade.
    handshake: Option<Handshake>,
    counts: Counts,
    /// The locked pidfile, when there is one.
    pidfile: Option<Arc<Pidfile>>,
    /// The foreground process waiting for a daemon's start.
    readiness: Option<Readiness>,
    /// Requests from inside the process ([`crate::Handle`]), as the control socket's.
    requests: Option<tokio::sync::mpsc::UnboundedReceiver<Request>>,
    /// Cancelled when the generation stops for good (a stop, or the handover).
    shutdown: CancellationToken,
}

/// Takes the sockets and the generation from the environment, cleans the environment, binds
/// what was not handed over, and records how to start a successor.
///
/// `pidfile` is the locked pidfile, if any.
///
/// # Safety
/// Call it before any other thread exists: it changes the environment and takes fds.
pub unsafe fn prepare(settings: Settings, pidfile: Option<Pidfile>) -> anyhow::Result<Process> {
    let started = SystemTime::now();
    // Stray private variables (not meant for this process) are dropped first.
    // SAFETY: this function's own contract (no other thread).
    unsafe { crate::env::init() };
    let exe = match &settings.exec {
        Some(exe) => exe.clone(),
        None => upgrade::current_executable().context("cannot tell which executable runs")?,
    };
    let generation = match std::env::var(GENERATION_ENV) {
        Ok(g) => g.parse::<u64>().ok().filter(|g| *g >= 1).with_context(|| {
            format!("{GENERATION_ENV}={g:?} is not a generation number (1 or more)")
        })?,
        Err(_) => 1,
    };
    let counts = Counts::from_env();
    for var in [GENERATION_ENV, upgrade::UPGRADES_ENV] {
        // SAFETY: no thread exists yet (see above).
        unsafe { std::env::remove_var(var) };
    }
    // SAFETY: this function's contract (no other thread).
    let activated = unsafe { activation::take_activated() }?;
    let listeners = activation::resolve_with(&settings.listeners, activated, settings.backlog)?;
    let mut upgrader = Upgrader::new(exe, generation, settings.upgrade_timeout);
    for listener in &listeners {
        upgrader
            .add_listener(listener)
            .context("cannot keep a copy of a listening socket for upgrades")?;
    }
    if let Some(pidfile) = &pidfile {
        // The next generation inherits the locked description: the lock is never free.
        let fd = pidfile
            .handover_fd()
            .context("cannot keep a copy of the pidfile for upgrades")?;
        upgrader.add_fd(fd, PIDFILE_FD_ENV.name());
    }
    Ok(Process {
        settings,
        listeners,
        generation,
        started,
        upgrader,
        handshake: None,
        counts,
        pidfile: pidfile.map(Arc::new),
        readiness: None,
        requests: None,
        shutdown: CancellationToken::new(),
    })
}

impl Process {
    /// Every fd this process needs: the sockets and their copies, the pidfile, the handshake
    /// channel. A daemon closes all others.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = self
            .listeners
            .iter()
            .map(|l| l.as_fd().as_raw_fd())
            .collect();
        fds.extend(self.upgrader.fds());
        fds.extend(self.handshake.iter().flat_map(|h| h.fds()));
        fds.extend(self.pidfile.as_ref().map(|p| p.fd()));
        fds
    }

    /// Makes this process the new generation of an upgrade ([`Handshake::take_from_env`]): it
    /// will wait for the old one's commit before it accepts.
    pub fn attach_handshake(&mut self, handshake: Handshake) {
        self.handshake = Some(handshake);
    }

    /// The locked pidfile, if any.
    pub fn pidfile(&self) -> Option<&Pidfile> {
        self.pidfile.as_deref()
    }

    /// Whether this process was started by an upgrade.
    pub fn is_upgrade(&self) -> bool {
        self.handshake.is_some()
    }

    /// Gives up before running: tells whoever waits, and returns the failure exit code.
    pub fn fail(self, message: &str) -> std::process::ExitCode {
        let e = anyhow::anyhow!("{message}");
        report_failure(self.handshake, self.readiness, &e);
        eprintln!("{}: {message}", crate::env::identity().name);
        std::process::ExitCode::FAILURE
    }

    /// Takes requests from inside the process too (a [`crate::Handle`]).
    pub fn take_requests(&mut self, requests: tokio::sync::mpsc::UnboundedReceiver<Request>) {
        self.requests = Some(requests);
    }

    /// A token cancelled when this generation stops for good: a stop began, or it handed over
    /// (not when it stops accepting for a probation it may still roll back).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Reports the start's outcome to a waiting foreground process (`--daemon`).
    pub fn report_to(&mut self, readiness: Readiness) {
        self.readiness = Some(readiness);
    }

    /// Builds a multi-threaded runtime and serves until stopped or handed over. Returns once
    /// the drain is over.
    pub fn run<W, F>(mut self, workload: F) -> anyhow::Result<Exit>
    where
        W: Workload,
        F: FnOnce(&StartInfo) -> anyhow::Result<W>,
    {
        let handshake = self.handshake.take();
        let readiness = self.readiness.take();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name(format!("{}-worker", crate::env::identity().name))
            .build()
            .context("cannot start the async runtime");
        let runtime = match runtime {
            Ok(runtime) => runtime,
            Err(e) => {
                report_failure(handshake, readiness, &e);
                return Err(e);
            }
        };
        runtime.block_on(self.serve_with(handshake, readiness, workload))
    }

    /// Serves on the current tokio runtime, of any flavour, until stopped or handed over.
    /// Returns once the drain is over.
    pub async fn serve<W, F>(mut self, workload: F) -> anyhow::Result<Exit>
    where
        W: Workload,
        F: FnOnce(&StartInfo) -> anyhow::Result<W>,
    {
        let handshake = self.handshake.take();
        let readiness = self.readiness.take();
        self.serve_with(handshake, readiness, workload).await
    }

    /// Gives up before serving: tells whoever waits (the old generation, the keeper, a
    /// foreground process), without printing anything.
    pub fn abandon(self, message: &str) {
        report_failure(
            self.handshake,
            self.readiness,
            &anyhow::anyhow!("{message}"),
        );
    }

    async fn serve_with<W, F>(
        self,
        handshake: Option<Handshake>,
        readiness: Option<Readiness>,
        workload: F,
    ) -> anyhow::Result<Exit>
    where
        W: Workload,
        F: FnOnce(&StartInfo) -> anyhow::Result<W>,
    {
        let mut generation = match Generation::start(self, handshake, readiness, workload).await {
            Ok(generation) => generation,
            Err((e, handshake, readiness)) => {
                report_failure(handshake, readiness, &e);
                return Err(e);
            }
        };
        let end = generation.serve_until_end().await;
        let failure = generation.failure.take();
        let exit = generation.finish(end).await;
        match failure {
            Some(reason) => Err(anyhow::anyhow!("{reason}")),
            None => Ok(exit),
        }
    }
}

/// Tells whoever waits for this start (the old generation, a foreground process) that it failed.
fn report_failure(handshake: Option<Handshake>, readiness: Option<Readiness>, e: &anyhow::Error) {
    let message = format!("{e:#}");
    if let Some(h) = handshake {
        h.fail(&message);
    }
    if let Some(r) = readiness {
        r.fail(&message);
    }
}

/// A `baton reload` client waiting for an upgrade's outcome.
struct Waiter {
    reply: oneshot::Sender<Value>,
    /// `--wait`: answer only once the probation is over.
    wait: bool,
}

/// A request for an upgrade: a signal or a `baton reload`.
struct UpgradeRequest {
    cause: &'static str,
    waiter: Option<Waiter>,
}

/// Where this process is in the upgrade state machine (see the module docs).
enum Phase {
    Serving,
    /// Starting the next generation ([`upgrade::start`]).
    Upgrading {
        task: JoinHandle<Result<Successor, String>>,
        waiters: Vec<Waiter>,
        /// Calls the upgrade off up to the commit.
        cancel: CancellationToken,
    },
    /// The next generation serves; this one stands by as the main pid until `deadline`.
    Probation {
        successor: Box<Successor>,
        deadline: tokio::time::Instant,
        /// Clients waiting for the end of the probation.
        waiters: Vec<Waiter>,
    },
}

/// How the serving phase ended.
enum End {
    /// `by_signal`: a stop signal asked for it, so a second one exits at once.
    Stop {
        cause: &'static str,
        by_signal: bool,
    },
    /// With the upgrade requests that ended the probation early, for the new main pid.
    HandedOver {
        to: HandedOver,
        forward: Vec<UpgradeRequest>,
    },
}

/// What the event loop reacts to.
enum Action {
    Stop {
        cause: &'static str,
        by_signal: bool,
    },
    Upgrade(UpgradeRequest),
    Status(oneshot::Sender<Value>),
    SetStatus(String),
    SetState(Vec<u8>),
    ServingEnded(String),
    ReopenLogs,
    Started(Result<Box<Successor>, String>),
    SuccessorExited(String),
    EndProbation(&'static str),
    Predecessor(PredecessorEvent),
}

/// One generation, serving: the state the event loop works on.
struct Generation<W: Workload> {
    generation: u64,
    started: SystemTime,
    /// `serving generation G (pid P) on ...`: the base of every STATUS= line.
    status: String,
    /// The listening sockets for `baton status` (and `baton check`): listener, address, and
    /// whether a socket unit passes it.
    sockets: Vec<Value>,
    info: StartInfo,
    stats: Arc<Stats>,
    signals: Signals,
    /// Passed on to a successor on probation, which serves but is not the main pid yet.
    reopen_signal: Option<nix::sys::signal::Signal>,
    control: control::Control,
    /// What serves; a rollback asks it to serve the sockets again.
    workload: W,
    /// The server that accepts; `None` while a successor serves.
    server: Option<W::Serving>,
    /// Servers that stopped accepting and drain.
    draining: Vec<JoinHandle<DrainReport>>,
    upgrader: Arc<Upgrader>,
    pidfile: Option<Arc<Pidfile>>,
    probation: Duration,
    drain_timeout: Duration,
    /// A new generation's link to the old one: until the probation is over, and for the old
    /// one's drain report after it.
    predecessor: Option<Predecessor>,
    /// The service manager's main pid (a new generation is not, until its probation is over).
    is_main: bool,
    /// Upgrade requests that came while this generation was on probation.
    deferred: Vec<UpgradeRequest>,
    phase: Phase,
    /// `baton reload` requests forwarded to the successor after the handover.
    forwarded: Vec<JoinHandle<()>>,
    readiness: Option<Readiness>,
    /// Requests from a [`crate::Handle`].
    requests: Option<tokio::sync::mpsc::UnboundedReceiver<Request>>,
    /// See [`Process::shutdown_token`].
    shutdown: CancellationToken,
    /// Why serving ended on its own, if it did: the generation then stops and fails.
    failure: Option<String>,
}

type StartError = (anyhow::Error, Option<Handshake>, Option<Readiness>);

impl<W: Workload> Generation<W> {
    /// Everything that can fail at start, before serving anything; then accepts (a new
    /// generation once its predecessor commits) and, as the main pid, says `READY=1`.
    async fn start<F>(
        process: Process,
        handshake: Option<Handshake>,
        readiness: Option<Readiness>,
        workload: F,
    ) -> Result<Generation<W>, StartError>
    where
        F: FnOnce(&StartInfo) -> anyhow::Result<W>,
    {
        let generation = process.generation;
        log_start(&process);
        let names: Vec<String> = process.listeners.iter().map(|l| l.to_string()).collect();
        let sockets = describe_sockets(&process.listeners);
        let listening = listening_lines(&process.listeners);
        let stats = Arc::new(Stats::new(process.counts));
        let info = StartInfo {
            generation,
            started: process.started,
            listeners: names.clone(),
            stats: stats.clone(),
        };
        let parts = async {
            let signals = Signals::install(&process.settings.signals)
                .context("cannot install signal handlers")?;
            let control = control::listen(process.settings.control_socket);
            let mut workload = workload(&info)?;
            let server = workload
                .serve(process.listeners)
                .context("cannot serve the listeners")?;
            anyhow::Ok((signals, control, workload, server))
        }
        .await;
        let (mut signals, control, workload, mut server) = match parts {
            Ok(parts) => parts,
            Err(e) => return Err((e, handshake, readiness)),
        };
        for line in listening {
            line.log(generation);
        }
        // What the start found about the sockets (e.g. a socket unit's address that differs from
        // the configuration): logged here, and told to whoever asked for this upgrade.
        crate::nofile::log_outcome();
        let warnings = activation::take_warnings();
        for warning in &warnings {
            tracing::warn!(event = "listener-warning", generation, "{warning}");
        }
        let predecessor = match handshake {
            Some(handshake) => {
                let accepted =
                    accept_after_commit(handshake, &warnings, &mut signals, &mut server, &stats);
                match accepted.await {
                    Ok(predecessor) => Some(predecessor),
                    Err(e) => return Err((e, None, readiness)),
                }
            }
            None => {
                server.start_accepting();
                None
            }
        };
        let status = format!(
            "serving generation {generation} (pid {}) on {}",
            std::process::id(),
            names.join(", ")
        );
        tracing::info!(event = "ready", generation, listeners = %names.join(", "), "{status}");
        let mut started = Generation {
            generation,
            started: process.started,
            status,
            sockets,
            info,
            stats,
            workload,
            signals,
            reopen_signal: process.settings.signals.reopen_logs.first().copied(),
            control,
            server: Some(server),
            draining: Vec::new(),
            upgrader: Arc::new(process.upgrader),
            pidfile: process.pidfile,
            probation: process.settings.probation,
            drain_timeout: process.settings.drain_timeout,
            is_main: predecessor.is_none(),
            predecessor,
            deferred: Vec::new(),
            phase: Phase::Serving,
            forwarded: Vec::new(),
            readiness,
            requests: process.requests,
            shutdown: process.shutdown,
            failure: None,
        };
        if started.is_main {
            started.become_main();
        }
        Ok(started)
    }

    /// `READY=1`: this process is the main pid and serves.
    fn become_main(&mut self) {
        self.is_main = true;
        // Keep the self-bound listeners in systemd's fd store, so a crash-restart gets them back.
        let sockets: Vec<_> = self.upgrader.sockets().collect();
        crate::fdstore::on_main_pid(sockets.iter().map(|(fd, name)| (*fd, name.as_str())));
        notify::ready(&self.status);
        if let Some(r) = self.readiness.take() {
            r.ready();
        }
        if let Some(interval) = notify::watchdog_interval() {
            tokio::spawn(watchdog(interval));
        }
    }

    /// The event loop: serves, upgrades, stands by on probation, rolls back, until a stop or
    /// a handover.
    async fn serve_until_end(&mut self) -> End {
        loop {
            let action = self.next_action().await;
            if let Some(end) = self.handle(action).await {
                return end;
            }
        }
    }

    async fn next_action(&mut self) -> Action {
        let Generation {
            signals,
            control,
            phase,
            predecessor,
            requests,
            server,
            ..
        } = self;
        let serving_ended = async {
            match server {
                Some(server) => server.ended().await,
                None => std::future::pending().await,
            }
        };
        let from_handle = async {
            match requests {
                Some(r) => match r.recv().await {
                    Some(request) => request,
                    None => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        };
        let phase_event = async {
            match phase {
                Phase::Serving => std::future::pending().await,
                Phase::Upgrading { task, .. } => Action::Started(
                    task.await
                        .unwrap_or_else(|e| Err(format!("the upgrade task failed: {e}")))
                        .map(Box::new),
                ),
                Phase::Probation {
                    successor,
                    deadline,
                    ..
                } => tokio::select! {
                    event = successor.next_event() => match event {
                        SuccessorEvent::Exited(how) => Action::SuccessorExited(how),
                        SuccessorEvent::AsksPromotion => Action::EndProbation("the new generation was asked to upgrade"),
                    },
                    _ = tokio::time::sleep_until(*deadline) => Action::EndProbation("the probation passed"),
                },
            }
        };
        let from_predecessor = async {
            match predecessor {
                Some(p) => p.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = signals.recv() => match event {
                Event::Stop(signal) => Action::Stop { cause: signal, by_signal: true },
                Event::Upgrade(signal) => Action::Upgrade(UpgradeRequest { cause: signal, waiter: None }),
                Event::ReopenLogs => Action::ReopenLogs,
            },
            request = async { tokio::select! {
                Some(request) = control.requests.recv() => request,
                request = from_handle => request,
            } } => match request {
                Request::Upgrade { reply, wait } => Action::Upgrade(UpgradeRequest {
                    cause: control_causes().0,
                    waiter: Some(Waiter { reply, wait }),
                }),
                Request::Status(reply) => Action::Status(reply),
                Request::SetStatus(status) => Action::SetStatus(status),
                Request::SetState(state) => Action::SetState(state),
                Request::Stop(reply) => {
                    // Under a keeper, `baton stop` waits for the keeper too.
                    let _ = reply.send(json!({"ok": true, "keeper_pid": crate::keeper::pid_from_env()}));
                    Action::Stop { cause: control_causes().1, by_signal: true }
                }
            },
            action = phase_event => action,
            reason = serving_ended => Action::ServingEnded(reason),
            event = from_predecessor => Action::Predecessor(event),
        }
    }

    /// During a probation the successor serves (and writes its logs) while this process is the
    /// main pid, the one logrotate's `systemctl kill --kill-whom=main` reaches: it gets the
    /// signal too. It is ready, so it handles the signal rather than dying of it.
    fn pass_reopen_on(&self) {
        let (Phase::Probation { successor, .. }, Some(signal)) = (&self.phase, self.reopen_signal)
        else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(successor.pid);
        match nix::sys::signal::kill(pid, signal) {
            Ok(()) => tracing::info!(
                event = "reopen-passed-on",
                generation = successor.generation,
                "{signal}: passed on to generation {} (pid {}), serving on probation",
                successor.generation,
                successor.pid
            ),
            Err(e) => tracing::warn!(
                "{signal}: cannot pass it on to generation {} (pid {}): {e}",
                successor.generation,
                successor.pid
            ),
        }
    }

    async fn handle(&mut self, action: Action) -> Option<End> {
        match action {
            Action::Stop { cause, by_signal } => return Some(End::Stop { cause, by_signal }),
            Action::ReopenLogs => {
                self.pass_reopen_on();
                self.workload.reopen_logs();
                match crate::logging::reopen() {
                    Ok(true) => {
                        tracing::info!(event = "log-reopened", "SIGUSR1: log file reopened")
                    }
                    Ok(false) => tracing::info!(
                        "SIGUSR1: logging goes to stderr or the journal; nothing to reopen"
                    ),
                    Err(e) => tracing::error!(
                        "SIGUSR1: cannot reopen the log file: {e}; still writing to the old one"
                    ),
                }
            }
            Action::Status(reply) => {
                let _ = reply.send(self.status_reply());
            }
            Action::SetState(state) => self.upgrader.set_state(state),
            Action::ServingEnded(reason) => {
                tracing::error!(
                    event = "serving-ended",
                    generation = self.generation,
                    "{reason}; stopping"
                );
                self.failure = Some(reason);
                return Some(End::Stop {
                    cause: "the end of serving",
                    by_signal: false,
                });
            }
            Action::SetStatus(status) => {
                self.status = status;
                if self.is_main && matches!(self.phase, Phase::Serving) {
                    notify::status(&self.status);
                }
            }
            Action::Upgrade(request) => return self.request_upgrade(request).await,
            Action::Started(Ok(successor)) => return self.begin_probation(*successor).await,
            Action::Started(Err(reason)) => self.upgrade_failed(&reason),
            Action::SuccessorExited(how) => {
                if let Phase::Probation {
                    successor, waiters, ..
                } = std::mem::replace(&mut self.phase, Phase::Serving)
                {
                    let (pid, after) = (successor.pid, successor.serving_since.elapsed());
                    successor.kill().await;
                    let reason = format!(
                        "pid {pid} {how} {:.1} s after it took over",
                        after.as_secs_f64()
                    );
                    return self.roll_back(&reason, waiters);
                }
            }
            Action::EndProbation(why) => return self.promote(why, Vec::new()).await,
            Action::Predecessor(event) => return self.on_predecessor(event).await,
        }
        None
    }

    /// A signal or `baton reload`: starts an upgrade, joins the one under way, or ends a
    /// probation early as passed and leaves the upgrade to the successor.
    async fn request_upgrade(&mut self, request: UpgradeRequest) -> Option<End> {
        let cause = request.cause;
        let generation = self.generation;
        if !self.is_main {
            // On probation: only the main pid may name a new main pid. Ask the predecessor to
            // end the probation; the upgrade follows once this process is the main pid.
            self.deferred.push(request);
            if self.deferred.len() == 1 {
                tracing::info!(
                    event = "upgrade-deferred",
                    generation,
                    cause,
                    "{cause}: on probation; asking the previous generation to end it, then upgrading"
                );
                if let Some(p) = &mut self.predecessor {
                    if let Err(e) = p.ask_promotion().await {
                        tracing::warn!(
                            "cannot ask the previous generation to end the probation: {e}"
                        );
                    }
                }
            }
            return None;
        }
        match &mut self.phase {
            Phase::Upgrading { waiters, .. } => {
                tracing::warn!(
                    event = "upgrade-ignored",
                    generation,
                    "{cause}: an upgrade is already in progress; ignored"
                );
                waiters.extend(request.waiter);
                None
            }
            Phase::Probation { .. } => {
                tracing::info!(
                    event = "probation-ended-early",
                    generation,
                    cause,
                    "{cause} during the probation: ending it as passed; the new generation upgrades"
                );
                self.promote("ended early by a new upgrade", vec![request])
                    .await
            }
            Phase::Serving => {
                tracing::info!(event = "upgrade", generation, cause, exe = %self.upgrader.exe.display(), "{cause}: upgrading to generation {}", generation + 1);
                let upgrader = self.upgrader.clone();
                let counts = self.stats.upgrades();
                let cancel = CancellationToken::new();
                let token = cancel.clone();
                let task = tokio::spawn(async move {
                    upgrade::start(&upgrader, counts, &token)
                        .await
                        .map_err(|e| e.to_string())
                });
                self.phase = Phase::Upgrading {
                    task,
                    waiters: request.waiter.into_iter().collect(),
                    cancel,
                };
                None
            }
        }
    }

    /// The upgrade failed before the new process served: this one serves on.
    fn upgrade_failed(&mut self, reason: &str) {
        let Phase::Upgrading { waiters, .. } = std::mem::replace(&mut self.phase, Phase::Serving)
        else {
            return;
        };
        let generation = self.generation;
        self.stats.upgrade_failed();
        notify::ready(&format!(
            "{}; upgrade to generation {} failed: {reason}",
            self.status,
            generation + 1
        ));
        tracing::error!(event = "upgrade-failed", generation, reason = %reason, "upgrade to generation {} failed: {reason}; still serving", generation + 1);
        for waiter in waiters {
            let _ = waiter.reply.send(json!({"ok": false, "error": reason}));
        }
    }

    /// The new generation serves: this one stops accepting, drains, and stands by as the main
    /// pid for the probation (or hands over at once without one).
    async fn begin_probation(&mut self, mut successor: Successor) -> Option<End> {
        let Phase::Upgrading { waiters, .. } = std::mem::replace(&mut self.phase, Phase::Serving)
        else {
            return None;
        };
        // Every new connection is the successor's from now on. The upgrader keeps this
        // process's copies of the sockets, so nothing is shut down for it. The open ones go
        // over too where the workload can pass them on.
        self.stop_accepting(successor.take_pass_on()).await;
        let generation = self.generation;
        let (pid, next, probation) = (successor.pid, successor.generation, self.probation);
        let (waiting, answered): (Vec<Waiter>, Vec<Waiter>) = if probation.is_zero() {
            (waiters, Vec::new())
        } else {
            waiters.into_iter().partition(|w| w.wait)
        };
        for warning in &successor.warnings {
            tracing::warn!(
                event = "upgrade-warning",
                generation,
                new_pid = pid,
                "generation {next} (pid {pid}): {warning}"
            );
        }
        for waiter in answered {
            let _ = waiter.reply.send(upgraded_reply(
                pid,
                next,
                successor.took,
                probation,
                false,
                &successor.warnings,
            ));
        }
        self.phase = Phase::Probation {
            deadline: tokio::time::Instant::now() + probation,
            successor: Box::new(successor),
            waiters: waiting,
        };
        if probation.is_zero() {
            return self.promote("no probation", Vec::new()).await;
        }
        let line = format!(
            "generation {next} (pid {pid}) serves, on probation for {}; generation {generation} (pid {}) stands by to take over again",
            humantime::format_duration(probation),
            std::process::id()
        );
        notify::ready(&line);
        tracing::info!(
            event = "probation",
            generation,
            new_pid = pid,
            new_generation = next,
            probation_ms = probation.as_millis() as u64,
            "{line}"
        );
        None
    }

    /// Ends the probation as passed: the successor becomes the main pid. If it cannot (it
    /// died just now), this process takes over again.
    async fn promote(&mut self, why: &'static str, forward: Vec<UpgradeRequest>) -> Option<End> {
        let Phase::Probation {
            successor, waiters, ..
        } = std::mem::replace(&mut self.phase, Phase::Serving)
        else {
            return None;
        };
        let (pid, next, took) = (successor.pid, successor.generation, successor.took);
        let warnings = successor.warnings.clone();
        let pidfile = self.pidfile.clone();
        // The pidfile names the new pid before it becomes the main pid.
        let record = |pid: i32| match &pidfile {
            Some(p) => p.write_pid(pid as u32),
            None => Ok(()),
        };
        match successor.promote(record).await {
            Ok(to) => {
                tracing::info!(
                    event = "promoted",
                    generation = self.generation,
                    new_pid = pid,
                    new_generation = next,
                    "{why}: generation {next} (pid {pid}) is the main process now"
                );
                for waiter in waiters {
                    let _ = waiter.reply.send(upgraded_reply(
                        pid,
                        next,
                        took,
                        self.probation,
                        true,
                        &warnings,
                    ));
                }
                Some(End::HandedOver { to, forward })
            }
            Err(reason) => {
                let reason = reason.to_string();
                let end = self.roll_back(&reason, waiters);
                for request in forward {
                    if let Some(waiter) = request.waiter {
                        let _ = waiter.reply.send(json!({"ok": false, "error": format!("the previous upgrade was rolled back ({reason}); reload again")}));
                    }
                }
                end
            }
        }
    }

    /// The successor died on probation (and was killed with its process group): this process
    /// accepts again on its own copies of the sockets, where connections queued meanwhile.
    fn roll_back(&mut self, reason: &str, waiters: Vec<Waiter>) -> Option<End> {
        let generation = self.generation;
        let workload = &mut self.workload;
        let served = self
            .upgrader
            .relisten()
            .and_then(|listeners| workload.serve(listeners));
        let mut server = match served {
            Ok(server) => server,
            Err(e) => {
                tracing::error!(event = "rollback-failed", generation, "the new generation died on probation ({reason}) and this one cannot accept again: {e}; stopping");
                return Some(End::Stop {
                    cause: "a failed rollback",
                    by_signal: false,
                });
            }
        };
        server.start_accepting();
        self.server = Some(server);
        if let Some(pidfile) = &self.pidfile {
            // The new pid may have been written already: name ours again.
            if let Err(e) = pidfile.write_pid(std::process::id()) {
                tracing::error!(
                    "cannot rewrite the pidfile {}: {e}",
                    pidfile.path().display()
                );
            }
        }
        self.stats.upgrade_rolled_back();
        let what = format!(
            "upgrade to generation {} rolled back: {reason}",
            generation + 1
        );
        notify::ready(&format!("{}; {what}", self.status));
        tracing::error!(event = "upgrade-rolled-back", generation, reason = %reason, "{what}; serving again");
        for waiter in waiters {
            let _ = waiter.reply.send(json!({"ok": false, "error": what}));
        }
        None
    }

    /// What the predecessor says to a new generation.
    async fn on_predecessor(&mut self, event: PredecessorEvent) -> Option<End> {
        match event {
            PredecessorEvent::Main => {
                self.stats.upgrade_succeeded();
                self.become_main();
                tracing::info!(
                    event = "main",
                    generation = self.generation,
                    "the probation passed: this process is the main process"
                );
                let deferred = std::mem::take(&mut self.deferred);
                let mut end = None;
                for request in deferred {
                    end = end.or(self.request_upgrade(request).await);
                }
                end
            }
            PredecessorEvent::Stop => Some(End::Stop {
                cause: "the previous generation stopping the service",
                by_signal: false,
            }),
            PredecessorEvent::Drained { duration, forced } => {
                self.stats.predecessor_drained(duration, forced);
                None
            }
            PredecessorEvent::Gone => {
                self.predecessor = None;
                if self.is_main {
                    return None;
                }
                tracing::error!(
                    event = "predecessor-lost",
                    generation = self.generation,
                    "the previous generation exited before it made this process the main process; stopping"
                );
                Some(End::Stop {
                    cause: "the loss of the previous generation",
                    by_signal: false,
                })
            }
        }
    }

    /// Stops accepting: the server goes on draining in the background, after passing on what
    /// it can to a successor that adopts connections.
    async fn stop_accepting(&mut self, pass_on: Option<handoff::PassOn>) {
        if let Some(mut server) = self.server.take() {
            server.stop_accepting().await;
            if let Some(to) = pass_on {
                server.pass_on(to);
            }
            let timeout = self.drain_timeout;
            self.draining
                .push(tokio::spawn(async move { server.drain(timeout).await }));
        }
    }

    fn status_reply(&self) -> Value {
        let state = match &self.phase {
            _ if !self.is_main => "on probation",
            Phase::Serving => "serving",
            Phase::Upgrading { .. } => "upgrading",
            Phase::Probation { .. } => "standing by",
        };
        let mut reply = json!({
            "ok": true,
            "pid": std::process::id(),
            "generation": self.generation,
            "version": crate::env::identity().version,
            "started": humantime::format_rfc3339_millis(self.started).to_string(),
            "uptime_secs": self.started.elapsed().map(|d| d.as_secs()).unwrap_or(0),
            "listeners": self.info.listeners,
            "sockets": self.sockets,
            "state": state,
            "keeper_pid": crate::keeper::pid_from_env(),
            "restarts": crate::keeper::restarts_from_env(),
        });
        if let Phase::Probation { successor, .. } = &self.phase {
            reply["successor"] = json!({"pid": successor.pid, "generation": successor.generation});
        }
        reply
    }

    /// After the loop: a stop takes a successor down with it; then this process stops
    /// accepting, forwards what the new main pid must see, drains, and reports.
    async fn finish(mut self, end: End) -> Exit {
        self.shutdown.cancel();
        let successor_to_stop = match &end {
            End::Stop { cause, .. } => self.call_off_upgrade(cause).await,
            End::HandedOver { .. } => None,
        };
        for request in std::mem::take(&mut self.deferred) {
            if let Some(waiter) = request.waiter {
                let _ = waiter
                    .reply
                    .send(json!({"ok": false, "error": "the process is stopping"}));
            }
        }
        self.announce_end(&end, successor_to_stop.as_ref());
        self.stop_accepting(None).await;
        // This process's copies of the sockets go with its accept loops: a copy left open would
        // queue new clients where nobody accepts them anymore. (After a handover the new main
        // pid holds its own.)
        match Arc::get_mut(&mut self.upgrader) {
            Some(upgrader) => upgrader.close_sockets(),
            None => tracing::warn!(
                "the upgrader is still shared; its copies of the sockets stay open until exit"
            ),
        }
        let (exit, channel, stop_requested) = match end {
            End::Stop { by_signal, .. } => (Exit::Stopped, None, by_signal),
            End::HandedOver { to, forward } => {
                for request in forward {
                    self.forward_upgrade(&to, request);
                }
                let exit = Exit::HandedOver {
                    pid: to.pid,
                    generation: to.generation,
                };
                (exit, Some(to.channel), false)
            }
        };
        let report = self.drain(successor_to_stop, stop_requested).await;
        self.report_drain(report, channel).await;
        exit
    }

    /// A stop ends the upgrade under way: it is called off before the commit, and a successor
    /// that serves already (or is on probation) is returned, to be stopped with this process.
    async fn call_off_upgrade(&mut self, cause: &str) -> Option<Successor> {
        match std::mem::replace(&mut self.phase, Phase::Serving) {
            Phase::Serving => None,
            Phase::Upgrading {
                task,
                waiters,
                cancel,
            } => {
                cancel.cancel();
                let outcome = task
                    .await
                    .unwrap_or_else(|e| Err(format!("the upgrade task failed: {e}")));
                for waiter in waiters {
                    let _ = waiter.reply.send(
                        json!({"ok": false, "error": format!("{cause}: the upgrade was aborted")}),
                    );
                }
                match outcome {
                    Ok(successor) => Some(successor),
                    Err(reason) => {
                        tracing::warn!(
                            event = "upgrade-aborted",
                            generation = self.generation,
                            "{cause}: upgrade aborted ({reason}); the new process was killed"
                        );
                        None
                    }
                }
            }
            Phase::Probation {
                successor, waiters, ..
            } => {
                for waiter in waiters {
                    let _ = waiter.reply.send(json!({"ok": false, "error": format!("{cause}: the service stopped during the probation")}));
                }
                Some(*successor)
            }
        }
    }

    /// `STOPPING=1` (as the main pid) and the log lines of a stop or a handover.
    fn announce_end(&self, end: &End, successor_to_stop: Option<&Successor>) {
        let generation = self.generation;
        let drain_timeout = humantime::format_duration(self.drain_timeout);
        let open_connections = self.workload.open_connections();
        match end {
            End::Stop { cause, .. } => {
                // On probation this process is not the main pid: the manager would drop it.
                if self.is_main {
                    notify::stopping(&format!(
                        "stopping: draining connections (up to {drain_timeout})"
                    ));
                }
                if let Some(s) = successor_to_stop {
                    tracing::info!(
                        generation,
                        new_pid = s.pid,
                        "{cause}: stopping generation {} (pid {}) too",
                        s.generation,
                        s.pid
                    );
                }
                tracing::info!(
                    event = "stop",
                    generation,
                    signal = *cause,
                    open_connections,
                    "{cause}: stopping; draining connections for up to {drain_timeout}"
                );
            }
            End::HandedOver { to: h, .. } => tracing::info!(
                event = "handed-over",
                generation,
                new_pid = h.pid,
                new_generation = h.generation,
                handoff_ms = h.took.as_millis() as u64,
                open_connections,
                "handed over to generation {} (pid {}) in {:?}; draining connections for up to {drain_timeout}",
                h.generation,
                h.pid,
                h.took
            ),
        }
    }

    /// Logs the drain; tells the successor how it went, or, after a clean stop, removes the
    /// pidfile (after a handover it is the successor's).
    async fn report_drain(&self, report: DrainReport, channel: Option<tokio::net::UnixStream>) {
        tracing::info!(
            event = "drained",
            generation = self.generation,
            open_at_start = report.open_at_start,
            forced = report.forced,
            passed_on = report.passed_on,
            drain_ms = report.duration.as_millis() as u64,
            "drained {} connection(s) in {:?}, {} passed on to the next generation, {} closed at the deadline; exiting",
            report.open_at_start,
            report.duration,
            report.passed_on,
            report.forced
        );
        match channel {
            Some(mut channel) => {
                let line = upgrade::drained_line(report.duration, report.forced);
                let _ = channel.write_all(line.as_bytes()).await;
            }
            None => {
                if let Some(pidfile) = &self.pidfile {
                    pidfile.remove();
                }
            }
        }
    }

    /// An upgrade request that ended the probation goes on to the new main pid.
    fn forward_upgrade(&mut self, to: &HandedOver, request: UpgradeRequest) {
        let pid = to.pid;
        match request.waiter {
            None => {
                if let Err(e) = to.handle.signal(libc::SIGUSR2) {
                    tracing::warn!("cannot pass the upgrade on to pid {pid}: {e}");
                }
            }
            Some(waiter) => {
                let timeout = self.upgrader.timeout + self.probation + Duration::from_secs(30);
                let line = if waiter.wait {
                    "upgrade wait"
                } else {
                    "upgrade"
                };
                self.forwarded.push(tokio::task::spawn_blocking(move || {
                    let mut reply = control::Client::connect(pid as u32)
                        .and_then(|mut c| c.request(line, timeout))
                        .unwrap_or_else(|e| json!({"ok": false, "error": format!("pid {pid}, the new main process: {e}")}));
                    // The upgrade started from there, not from the process that was asked.
                    reply["from"] = json!(pid);
                    let _ = waiter.reply.send(reply);
                }));
            }
        }
    }

    /// Lets every server drain (and a successor stop) while answering signals: after a stop
    /// signal, a second one exits at once.
    async fn drain(
        &mut self,
        successor: Option<Successor>,
        mut stop_requested: bool,
    ) -> DrainReport {
        let generation = self.generation;
        let draining = std::mem::take(&mut self.draining);
        let forwarded = std::mem::take(&mut self.forwarded);
        let drain_timeout = self.drain_timeout;
        let (control, signals, workload) = (&mut self.control, &mut self.signals, &self.workload);
        let all = async move {
            let successor_stopped = async {
                if let Some(s) = successor {
                    s.stop(drain_timeout + Duration::from_secs(5)).await;
                }
            };
            let replies_written = async {
                for task in forwarded {
                    let _ = task.await;
                }
                control.close(Duration::from_secs(2)).await;
            };
            let servers = async {
                let mut total = DrainReport::default();
                for task in draining {
                    if let Ok(report) = task.await {
                        total.open_at_start += report.open_at_start;
                        total.forced += report.forced;
                        total.passed_on += report.passed_on;
                        total.duration = total.duration.max(report.duration);
                    }
                }
                total
            };
            tokio::join!(servers, successor_stopped, replies_written).0
        };
        tokio::pin!(all);
        loop {
            tokio::select! {
                report = &mut all => return report,
                event = signals.recv() => match event {
                    Event::Stop(signal) if stop_requested => {
                        tracing::warn!(
                            event = "stop-now",
                            generation,
                            open_connections = workload.open_connections(),
                            "{signal} again: exiting without finishing the drain"
                        );
                        std::process::exit(1);
                    }
                    Event::Stop(signal) => {
                        stop_requested = true;
                        tracing::info!(
                            generation,
                            "{signal}: already draining after the handover; a second one exits at once"
                        );
                    }
                    Event::Upgrade(signal) => tracing::warn!(
                        event = "upgrade-ignored",
                        generation,
                        "{signal}: this process is draining; upgrade the current one instead"
                    ),
                    Event::ReopenLogs => {
                        workload.reopen_logs();
                        let _ = crate::logging::reopen();
                    }
                },
            }
        }
    }
}

fn log_start(process: &Process) {
    let identity = crate::env::identity();
    let generation = process.generation;
    tracing::info!(
        event = "start",
        generation,
        version = %identity.version,
        config = process.settings.config.as_ref().map(|p| p.display().to_string()),
        "{} {} starting: generation {generation}, pid {}",
        identity.name,
        identity.version,
        std::process::id()
    );
}

/// The listening sockets as `status` shows them.
fn describe_sockets(listeners: &[Listener]) -> Vec<Value> {
    listeners
        .iter()
        .map(|l| {
            json!({
                "listener": l.name,
                "address": l.socket.local_address(),
                "self_bound": l.self_bound,
                "unit": l.unit,
            })
        })
        .collect()
}

/// One `listening on ...` log line, taken before the sockets go to the workload.
struct ListeningLine {
    name: String,
    address: String,
    fd: Option<i32>,
    description: String,
}

impl ListeningLine {
    fn log(&self, generation: u64) {
        tracing::info!(
            event = "listening",
            generation,
            listener = %self.name,
            address = %self.address,
            fd = self.fd,
            "listening on {}",
            self.description
        );
    }
}

fn listening_lines(listeners: &[Listener]) -> Vec<ListeningLine> {
    listeners
        .iter()
        .map(|l| ListeningLine {
            name: l.name.clone(),
            address: l.socket.local_address(),
            fd: l.activated_fd,
            description: l.to_string(),
        })
        .collect()
}

/// A new generation: says `ready`, waits for its predecessor's commit (until then it may still
/// be called off), starts accepting, and tells the predecessor it serves.
async fn accept_after_commit<S: Serving>(
    mut handshake: Handshake,
    warnings: &[String],
    signals: &mut Signals,
    server: &mut S,
    stats: &Stats,
) -> anyhow::Result<Predecessor> {
    let adopts = match handshake.take_connections().map(handoff::Adopted::new) {
        Some(Ok(adopted)) => server.adopt(adopted).is_ok(),
        Some(Err(e)) => {
            tracing::warn!("cannot take the connections the old process passes on: {e}; it drains them instead");
            false
        }
        None => false,
    };
    let committed = tokio::select! {
        // A commit that arrived is taken even if a stop arrived too: O goes on with the
        // upgrade and stops this process gracefully if it is stopping.
        biased;
        committed = handshake.ready(warnings, adopts) => committed.context("the upgrade was called off by the old process")?,
        _ = next_stop(signals) => anyhow::bail!("stopped before the old process handed over"),
    };
    if let Some(took) = committed.handoff {
        stats.handed_over(took);
    }
    server.start_accepting();
    // Only now may `baton reload` return: this process accepts. If the old process is gone,
    // this one never became the main pid, and must not go on as a stray next to whatever the
    // service manager starts instead.
    committed.serving().await.map_err(|e| {
        anyhow::anyhow!("the old process went away right after the commit ({e}); stopping")
    })
}

/// `<name> reload` and `<name> stop`: the causes the logs give for control-socket requests.
fn control_causes() -> (&'static str, &'static str) {
    static CAUSES: std::sync::OnceLock<(&str, &str)> = std::sync::OnceLock::new();
    *CAUSES.get_or_init(|| {
        let name = &crate::env::identity().name;
        // Once per process: the causes are `&'static str` like the signals' names.
        let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
        (leak(format!("{name} reload")), leak(format!("{name} stop")))
    })
}

/// The answer to `baton reload` once the new generation serves.
fn upgraded_reply(
    pid: i32,
    generation: u64,
    took: Duration,
    probation: Duration,
    promoted: bool,
    warnings: &[String],
) -> Value {
    json!({
        "ok": true,
        "pid": pid,
        "generation": generation,
        "took_ms": took.as_millis() as u64,
        "probation_ms": probation.as_millis() as u64,
        "promoted": promoted,
        "warnings": warnings,
    })
}

async fn next_stop(signals: &mut Signals) -> &'static str {
    loop {
        if let Event::Stop(signal) = signals.recv().await {
            return signal;
        }
    }
}

/// The shortest time between two watchdog pings, whatever `WATCHDOG_USEC` says: a tiny value
/// (`WATCHDOG_USEC=1`) must not turn the pings into a busy loop.
pub const MIN_WATCHDOG_PING: Duration = Duration::from_millis(50);

/// How often to ping for a watchdog `interval`: half of it, as sd_watchdog_enabled(3)
/// recommends, but never more often than every [`MIN_WATCHDOG_PING`].
pub fn watchdog_ping_period(interval: Duration) -> Duration {
    (interval / 2).max(MIN_WATCHDOG_PING)
}

/// Pings the watchdog at half the interval systemd asked for (see [`watchdog_ping_period`]).
/// Silent once this process handed over (see [`notify::hand_over`]).
async fn watchdog(interval: Duration) {
    let period = watchdog_ping_period(interval);
    if period > interval / 2 {
        tracing::warn!(
            event = "watchdog-clamped",
            "the watchdog interval {interval:?} (WATCHDOG_USEC) is too short: pinging every {period:?} instead of every {:?}; the service manager may take the service for hung",
            interval / 2
        );
    }
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        notify::watchdog();
    }
}
