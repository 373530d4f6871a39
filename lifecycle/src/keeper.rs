//! The keeper: baton's own small service manager, for life without systemd.
//!
//! Without a service manager nothing outlives a serving process, so `baton serve --daemon`,
//! `baton serve --keeper`, and a baton that finds itself PID 1 without `NOTIFY_SOCKET` (a
//! container: `docker run`, `unshare --pid --fork`) run this instead: one small, single-threaded
//! process (no async runtime, no HTTP) that stays for the service's whole life (DESIGN.md
//! section 9). It
//!
//! - owns the listening sockets (bound here, or taken from `LISTEN_FDS`) and the pidfile lock,
//!   so that while no generation serves, new clients wait in the kernel's backlog instead of
//!   being refused;
//! - runs the serving generation (an ordinary `baton serve` process, [`crate::generation`]) as its
//!   child, handing it the sockets with `LISTEN_FDS`/`LISTEN_FDNAMES`/`LISTEN_PID`;
//! - is its generations' service manager: it offers them a `NOTIFY_SOCKET` ([`crate::manager`])
//!   and follows `READY=1`, `STATUS=`, `MAINPID=`, `BARRIER=1`, `STOPPING=1`, `RELOADING=1` with
//!   systemd's `NotifyAccess=main` rules, so a generation upgrades itself with the very same code
//!   as under systemd (its double fork re-parents the new generation to the keeper, the child
//!   subreaper), and the keeper always knows the main pid;
//! - is the child subreaper, reaps every child (as PID 1, orphans of anything), and forwards
//!   SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 to the main generation;
//! - restarts a generation that exits without being asked (a non-zero status or a signal), with
//!   supervisord's semantics: a start succeeded once the generation has been ready for
//!   `keeper.startsecs`; consecutive failed starts are retried after 1 s, 2 s, 3 s, ...; after
//!   `keeper.startretries` retries it gives up: one log line saying why, sockets closed, pidfile
//!   removed, exit status 1. Restarts are counted and passed to each generation
//!   (`BATON_RESTARTS`), which shows them in `baton status` and as `baton_restarts_total`;
//! - re-executes itself in place once an upgrade moved the main pid (`MAINPID=`), so that no
//!   process runs the old binary afterwards. Its sockets, notify socket and pidfile survive the
//!   `execve`; its state travels in `BATON_KEEPER_STATE`.
//!
//! The pidfile names the main generation (rewritten when the main pid moves, emptied while no
//! generation is ready), so `baton stop|status|reload --pidfile` and `kill -USR2 $(cat PIDFILE)`
//! address the serving process as before. A generation that exits with status 0 (after
//! SIGTERM, `baton stop`) or after `STOPPING=1` ends the service: the keeper waits for its other
//! children (a draining predecessor), removes the pidfile and exits 0.
//!
//! Generations learn that they run under a keeper from `BATON_KEEPER_PID`: they leave the
//! pidfile to the keeper, report a failed start on the pipe in `BATON_KEEPER_REPORT_FD`, and stop
//! (as on SIGTERM) if the keeper disappears ([`watch`]).

use std::ffi::{CString, OsString};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::activation;
use crate::daemon::Readiness;
use crate::env::Var;
use crate::exec::{inherited_env, ExecPlan};
use crate::manager::{Message, NotifySocket};
use crate::pidfile::{Pidfile, PIDFILE_FD_ENV};

/// Set in every generation's environment: the keeper's pid.
pub const KEEPER_PID_ENV: Var = Var::KEEPER_PID;
/// Set in every generation's environment: restarts so far (kept through upgrades).
pub const RESTARTS_ENV: Var = Var::RESTARTS;
/// A generation started by the keeper reports a failed start (`error <text>`) on this fd.
pub const REPORT_FD_ENV: Var = Var::KEEPER_REPORT_FD;
/// The keeper's state across its own re-exec (JSON).
pub const STATE_ENV: Var = Var::KEEPER_STATE;

/// Variables of the keeper's environment a generation must not inherit as they are, beyond
/// those an upgrade keeps from the next generation ([`crate::env::NOT_INHERITED`]): the
/// keeper's own, and the service manager's (the keeper is the generations' manager).
static KEEPER_PRIVATE_ENV: std::sync::LazyLock<[&str; 6]> = std::sync::LazyLock::new(|| {
    [
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        KEEPER_PID_ENV.name(),
        RESTARTS_ENV.name(),
        REPORT_FD_ENV.name(),
        STATE_ENV.name(),
    ]
});

/// The signals the keeper takes through its signalfd (blocked otherwise).
const SIGNALS: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGCHLD,
];

/// What the keeper needs to know.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The executable each generation runs (with this process's arguments); `None`: the one
    /// running.
    pub exec: Option<PathBuf>,
    /// The pidfile asked for; a daemon without one uses [`crate::pidfile::default_path`].
    pub pidfile: Option<PathBuf>,
    /// The listeners: matched by name to the sockets passed in, else bound.
    pub listeners: Vec<crate::activation::ListenSpec>,
    /// The log filter (`info`, `debug`, ...) and file, for the keeper's own lines.
    pub log_level: String,
    pub log_file: Option<PathBuf>,
    /// How long a generation must have been ready for its start to count as a success.
    pub startsecs: Duration,
    /// Failed starts retried in a row before giving up.
    pub startretries: u32,
    /// How long a stopping generation may take.
    pub drain_timeout: Duration,
    /// The listen backlog of the stream sockets bound here
    /// ([`crate::activation::DEFAULT_BACKLOG`]).
    pub backlog: u32,
}

/// Whether this `baton serve` should be a keeper: asked for (`--daemon`, `--keeper`), or PID 1
/// of a pid namespace; never under a service manager (`NOTIFY_SOCKET`), and never in a
/// generation (which has a keeper already).
pub fn wanted(asked: bool) -> bool {
    let in_generation =
        std::env::var_os(KEEPER_PID_ENV).is_some() && crate::env::private_env_trusted();
    if crate::notify::enabled() || in_generation {
        return false;
    }
    asked || nix::unistd::getpid().as_raw() == 1
}

/// Whether this process is a keeper that just re-executed itself.
pub fn resuming() -> bool {
    crate::env::private_env_trusted() && std::env::var_os(STATE_ENV).is_some()
}

/// The keeper's pid, in a generation running under one.
pub fn pid_from_env() -> Option<u32> {
    if !crate::env::private_env_trusted() {
        return None;
    }
    std::env::var(KEEPER_PID_ENV).ok()?.parse().ok()
}

/// Restarts of the service so far, in a generation running under a keeper.
pub fn restarts_from_env() -> u64 {
    std::env::var(RESTARTS_ENV)
        .ok()
        .filter(|_| crate::env::private_env_trusted())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A generation's side: takes the report pipe the keeper passed, as the [`Readiness`] a daemon
/// would report to.
///
/// # Safety
/// Changes the environment: call it before any other thread exists.
pub unsafe fn take_report_fd() -> Result<Option<Readiness>, String> {
    // SAFETY: the caller promises that no other thread exists.
    let fd = unsafe { crate::env::take_fd(REPORT_FD_ENV) }.map_err(|e| e.to_string())?;
    Ok(fd.map(Readiness::from_fd))
}

/// A generation's side: stops this process (SIGTERM to itself: drain, exit) if the keeper
/// disappears, so that no generation is left holding the sockets without a keeper and a new
/// start can bind them again. Starts a thread; call after the process-level setup.
pub fn watch(keeper: u32) {
    let handle = match crate::control::ProcessHandle::open(keeper) {
        Ok(handle) => handle,
        Err(e) => {
            tracing::warn!("cannot watch the keeper (pid {keeper}): {e}; this generation will not notice if it disappears");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name(format!("{}-keeper-watch", crate::env::identity().name))
        .spawn(move || {
            while !matches!(handle.wait_exit(Duration::from_secs(3600)), Ok(true) | Err(_)) {}
            tracing::error!(
                event = "keeper-gone",
                "the keeper (pid {keeper}) is gone; stopping, as nothing would restart or stop this generation"
            );
            let _ = nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGTERM);
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot watch the keeper (pid {keeper}): {e}");
    }
}

/// One serving process, as the keeper sees it.
#[derive(Debug)]
struct Generation {
    pid: i32,
    generation: u64,
    /// When it sent `READY=1` (or became the main pid through `MAINPID=`).
    ready_at: Option<Instant>,
    /// It sent `STOPPING=1`: its exit is expected.
    stopping: bool,
    /// The read end of its report pipe (first starts only).
    report: Option<std::fs::File>,
    /// What it reported before it failed.
    error: Option<String>,
}

impl Generation {
    /// `: <what it reported>`, or nothing, to end a line about its exit.
    fn error_suffix(&self) -> String {
        self.error
            .as_ref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default()
    }

    /// Reads what the generation reported; called when it exited, so all of it is there.
    fn read_report(&mut self) {
        let Some(mut pipe) = self.report.take() else {
            return;
        };
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        for line in text.lines() {
            if let Some(e) = line.strip_prefix("error ") {
                self.error = Some(e.to_owned());
            }
        }
    }
}

/// What survives the keeper's re-exec.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    exe: PathBuf,
    args: Vec<String>,
    listeners: Vec<(RawFd, String)>,
    notify_fd: RawFd,
    notify_dir: PathBuf,
    pidfile: Option<PathBuf>,
    log_level: String,
    log_file: Option<PathBuf>,
    startsecs_ms: u64,
    startretries: u32,
    drain_timeout_ms: u64,
    main: Option<(i32, u64, Option<u64>)>,
    former: Vec<(i32, u64)>,
    generation: u64,
    restarts: u64,
    failures: u32,
    stopping: bool,
}

struct Keeper {
    exe: PathBuf,
    /// `argv[1..]`, passed to every generation (and to the keeper's own re-exec).
    args: Vec<OsString>,
    listeners: Vec<(OwnedFd, String)>,
    notify: NotifySocket,
    pidfile: Option<Pidfile>,
    signals: SignalFd,
    log_level: String,
    log_file: Option<PathBuf>,
    startsecs: Duration,
    startretries: u32,
    drain_timeout: Duration,
    main: Option<Generation>,
    /// Generations that handed over and drain: (pid, generation).
    former: Vec<(i32, u64)>,
    /// The highest generation number given out or seen.
    generation: u64,
    restarts: u64,
    /// Consecutive failed starts.
    failures: u32,
    restart_at: Option<Instant>,
    /// When the service began to stop.
    stopping: Option<Instant>,
    /// Why the keeper gives up, once it does.
    gave_up: Option<String>,
    /// The foreground process of `--daemon`, until the first generation is ready.
    readiness: Option<Readiness>,
    reexec_pending: bool,
}

/// Runs `baton serve` as a keeper: takes the pidfile and the sockets, daemonizes if asked,
/// and supervises generations until the service stops.
///
/// # Safety
/// Call it before any other thread exists: it changes the environment, forks and closes fds.
pub unsafe fn run(config: Settings, daemon: bool) -> ExitCode {
    // SAFETY: this function's own contract (no other thread).
    let held = match unsafe { take_exe_pidfile_listeners(&config, daemon) } {
        Ok(held) => held,
        Err(message) => return fail(&message),
    };
    let (exe, pidfile, listeners) = held;
    let mut readiness = None;
    if daemon && nix::unistd::getpid().as_raw() != 1 {
        // SAFETY: as above.
        match unsafe { daemonize(&config, &listeners, pidfile.as_ref()) } {
            Ok(r) => readiness = Some(r),
            Err(message) => return fail(&message),
        }
    }
    let (notify, signals) = match become_manager(&config) {
        Ok(manager) => manager,
        Err(message) => {
            if let Some(r) = readiness {
                r.fail(&message);
            }
            return fail(&message);
        }
    };
    log_start(&listeners, &notify);
    // Raised by [`crate::start_with`] before it got here; the generations inherit the limit.
    crate::nofile::log_outcome();
    let held = Held {
        exe,
        listeners,
        pidfile,
        notify,
        signals,
    };
    Keeper::started(&config, held, readiness).run()
}

/// The listening sockets, each with the name it is handed over by.
type Listeners = Vec<(OwnedFd, String)>;

/// What the keeper holds for the whole service's life (and through its re-exec).
struct Held {
    exe: PathBuf,
    listeners: Listeners,
    pidfile: Option<Pidfile>,
    notify: NotifySocket,
    signals: SignalFd,
}

/// A start that failed before the keeper logs: said on stderr.
fn fail(message: &str) -> ExitCode {
    eprintln!("{}: {message}", crate::env::identity().name);
    ExitCode::FAILURE
}

/// The first step of [`run`]: which executable the generations run, the pidfile's lock, then
/// the sockets.
///
/// # Safety
/// As [`run`]: takes the activated fds out of the environment.
unsafe fn take_exe_pidfile_listeners(
    config: &Settings,
    daemon: bool,
) -> Result<(PathBuf, Option<Pidfile>, Listeners), String> {
    let exe = match &config.exec {
        Some(exe) => exe.clone(),
        None => crate::upgrade::current_executable()
            .map_err(|e| format!("cannot tell which executable runs: {e}"))?,
    };
    let pidfile_path = config
        .pidfile
        .clone()
        .or_else(|| daemon.then(crate::pidfile::default_path));
    let pidfile = match &pidfile_path {
        Some(path) => {
            Some(Pidfile::acquire(path, config.pidfile.is_none()).map_err(|e| e.to_string())?)
        }
        None => None,
    };
    // SAFETY: the caller promises that no other thread exists.
    let listeners = unsafe { activation::take_activated() }
        .and_then(|fds| activation::resolve_with(&config.listeners, fds, config.backlog))
        .map_err(|e| e.to_string())?;
    let listeners = listeners
        .into_iter()
        .map(|l| {
            // Self-bound sockets carry their `bound/` name, as in systemd's fd store: a
            // generation may move or drop them on a reload, and tells the keeper so.
            let name = l.handover_name();
            let fd = match l.socket {
                activation::Socket::Tcp(s) => OwnedFd::from(s),
                activation::Socket::Unix(s) => OwnedFd::from(s),
                activation::Socket::Udp(s) => OwnedFd::from(s),
            };
            (fd, name)
        })
        .collect();
    Ok((exe, pidfile, listeners))
}

/// `--daemon`: the foreground process waits for the first generation's readiness, the keeper
/// goes on in the background with its sockets and the pidfile's lock.
///
/// # Safety
/// As [`run`]: forks.
unsafe fn daemonize(
    config: &Settings,
    listeners: &[(OwnedFd, String)],
    pidfile: Option<&Pidfile>,
) -> Result<Readiness, String> {
    let mut keep: Vec<RawFd> = listeners.iter().map(|(fd, _)| fd.as_raw_fd()).collect();
    keep.extend(pidfile.map(|p| p.fd()));
    // SAFETY: the caller promises that no other thread exists.
    unsafe { crate::daemon::daemonize(config.log_file.as_deref(), &keep) }
        .map_err(|e| format!("cannot daemonize: {e}"))
}

/// Becomes the generations' service manager: the keeper's log, its notify socket, its
/// signalfd, and the child subreaper bit (so that an upgrade's double fork re-parents the new
/// generation here).
fn become_manager(config: &Settings) -> Result<(NotifySocket, SignalFd), String> {
    crate::logging::init(&config.log_level, config.log_file.as_deref())?;
    crate::env::report_ignored_private_env();
    let notify = NotifySocket::create()?;
    let signals = block_signals()?;
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| format!("cannot become the child subreaper (PR_SET_CHILD_SUBREAPER): {e}"))?;
    Ok((notify, signals))
}

fn log_start(listeners: &[(OwnedFd, String)], notify: &NotifySocket) {
    let names: Vec<&str> = listeners.iter().map(|(_, n)| n.as_str()).collect();
    tracing::info!(
        event = "keeper-start",
        pid = std::process::id(),
        listeners = %names.join(","),
        notify_socket = %notify.path.display(),
        "{} {} keeper starting (pid {}): holding {} listener(s) and the notify socket {}",
        crate::env::identity().name,
        crate::env::identity().version,
        std::process::id(),
        listeners.len(),
        notify.path.display()
    );
}

/// Goes on as the keeper after its own re-exec (after an upgrade).
///
/// # Safety
/// Call it before any other thread exists: it changes the environment and takes fds.
pub unsafe fn resume() -> ExitCode {
    // SAFETY: this function's own contract (no other thread).
    let state = match unsafe { take_state() } {
        Ok(state) => state,
        Err(e) => {
            eprintln!("{}: keeper: cannot read the state of the previous keeper image ({e}); this is a bug", crate::env::identity().name);
            return ExitCode::FAILURE;
        }
    };
    let _ = crate::logging::init(&state.log_level, state.log_file.as_deref());
    // SAFETY: as above.
    let held = match unsafe { take_back(&state) } {
        Ok(held) => held,
        Err(e) => {
            tracing::error!("keeper: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _ = nix::sys::prctl::set_child_subreaper(true);
    let mut keeper = Keeper::resumed(state, held);
    keeper.log_resumed();
    keeper.run()
}

/// What the previous keeper image left in [`STATE_ENV`], taken out of the environment.
///
/// # Safety
/// As [`resume`]: changes the environment.
unsafe fn take_state() -> serde_json::Result<State> {
    let text = std::env::var(STATE_ENV).unwrap_or_default();
    // SAFETY: the caller promises that no other thread exists.
    unsafe { std::env::remove_var(STATE_ENV) };
    serde_json::from_str(&text)
}

/// Takes back what the keeper held before its re-exec: the sockets, the notify socket and the
/// pidfile (their fds survived execve), and a new signalfd. Only the signalfd can fail the
/// resumption; a pidfile that is gone is said and done without.
///
/// # Safety
/// As [`resume`]: owns the fds named in `state`, once.
unsafe fn take_back(state: &State) -> Result<Held, String> {
    // SAFETY: these fds were handed to this image alone by the previous one (same process),
    // which cleared their FD_CLOEXEC for this; each is owned once, here.
    let own = |fd: RawFd| unsafe {
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        OwnedFd::from_raw_fd(fd)
    };
    let listeners = state
        .listeners
        .iter()
        .map(|(fd, name)| (own(*fd), name.clone()))
        .collect();
    let notify = NotifySocket::from_fd(own(state.notify_fd), state.notify_dir.clone());
    let pidfile = match &state.pidfile {
        // SAFETY: this function's own contract (no other thread).
        Some(path) => match unsafe { Pidfile::inherit(path) } {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("keeper: the pidfile did not survive the re-exec: {e}");
                None
            }
        },
        None => None,
    };
    Ok(Held {
        exe: state.exe.clone(),
        listeners,
        pidfile,
        notify,
        signals: block_signals()?,
    })
}

/// Blocks the keeper's signals (they are read from the signalfd instead; blocked signals are
/// queued even for PID 1, which the kernel spares signals it has no handler for) and opens the
/// signalfd.
fn block_signals() -> Result<SignalFd, String> {
    let mut mask = SigSet::empty();
    for s in SIGNALS {
        mask.add(s);
    }
    mask.thread_block()
        .map_err(|e| format!("cannot block signals: {e}"))?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| format!("cannot open a signalfd: {e}"))
}

/// "exited with status 1", "killed by SIGKILL".
fn describe(status: &WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exited with status {code}"),
        WaitStatus::Signaled(_, signal, core) => format!(
            "was killed by {}{}",
            signal.as_str(),
            if *core { " (core dumped)" } else { "" }
        ),
        other => format!("{other:?}"),
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// Whether `pid` is a live child of this process (its own or adopted). waitid with WNOWAIT
/// leaves it as it is; ECHILD means it is not ours. Unlike /proc, this works whatever /proc is
/// mounted in a pid namespace.
fn is_child(pid: i32) -> bool {
    use nix::sys::wait::{waitid, Id};
    matches!(
        waitid(
            Id::Pid(Pid::from_raw(pid)),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT
        ),
        Ok(WaitStatus::StillAlive)
    )
}

fn set_cloexec(fd: RawFd, on: bool) {
    // SAFETY: fcntl on an fd this process owns.
    unsafe { libc::fcntl(fd, libc::F_SETFD, if on { libc::FD_CLOEXEC } else { 0 }) };
}

impl Keeper {
    /// A new service's keeper: no generation yet, the first one to start at once.
    fn started(config: &Settings, held: Held, readiness: Option<Readiness>) -> Keeper {
        Keeper {
            exe: held.exe,
            args: std::env::args_os().skip(1).collect(),
            listeners: held.listeners,
            notify: held.notify,
            pidfile: held.pidfile,
            signals: held.signals,
            log_level: config.log_level.clone(),
            log_file: config.log_file.clone(),
            startsecs: config.startsecs,
            startretries: config.startretries,
            drain_timeout: config.drain_timeout,
            main: None,
            former: Vec::new(),
            generation: 0,
            restarts: 0,
            failures: 0,
            restart_at: Some(Instant::now()),
            stopping: None,
            gave_up: None,
            readiness,
            reexec_pending: false,
        }
    }

    /// The keeper as it was before its re-exec ([`Keeper::state`]); a main generation that
    /// was ready keeps how long it has served, and none means a start is due now.
    fn resumed(state: State, held: Held) -> Keeper {
        let now = Instant::now();
        let main = state.main.map(|(pid, generation, ready_ms)| Generation {
            pid,
            generation,
            ready_at: ready_ms.map(|ms| now.checked_sub(Duration::from_millis(ms)).unwrap_or(now)),
            stopping: false,
            report: None,
            error: None,
        });
        Keeper {
            exe: held.exe,
            args: state.args.into_iter().map(OsString::from).collect(),
            listeners: held.listeners,
            notify: held.notify,
            pidfile: held.pidfile,
            signals: held.signals,
            log_level: state.log_level,
            log_file: state.log_file,
            startsecs: Duration::from_millis(state.startsecs_ms),
            startretries: state.startretries,
            drain_timeout: Duration::from_millis(state.drain_timeout_ms),
            restart_at: main.is_none().then_some(now),
            main,
            former: state.former,
            generation: state.generation,
            restarts: state.restarts,
            failures: state.failures,
            stopping: state.stopping.then_some(now),
            gave_up: None,
            readiness: None,
            reexec_pending: false,
        }
    }

    fn log_resumed(&self) {
        tracing::info!(
            event = "keeper-reexecuted",
            pid = std::process::id(),
            exe = %self.exe.display(),
            "keeper re-executed in place from {} ({} {}); main pid {}",
            self.exe.display(),
            crate::env::identity().name,
            crate::env::identity().version,
            self.main.as_ref().map_or("none".to_owned(), |m| m.pid.to_string())
        );
    }

    /// The keeper's loop: reap, give up or stop when it is time, re-exec after an upgrade,
    /// (re)start a generation when one is due, else wait for what comes.
    fn run(&mut self) -> ExitCode {
        loop {
            let children = self.reap();
            if let Some(reason) = self.gave_up.take() {
                return self.exit(ExitCode::FAILURE, &reason);
            }
            if let Some(since) = self.stopping {
                if self.main.is_none() {
                    if !children {
                        return self.exit(ExitCode::SUCCESS, "");
                    }
                    if since.elapsed() > self.drain_timeout + Duration::from_secs(10) {
                        tracing::warn!("keeper: children are still running past the drain timeout; exiting without them");
                        return self.exit(ExitCode::SUCCESS, "");
                    }
                }
            }
            if self.reexec_pending {
                self.reexec_pending = false;
                self.reexec();
            }
            if self
                .restart_at
                .is_some_and(|at| at <= Instant::now() && self.stopping.is_none())
            {
                self.restart_at = None;
                self.start_generation();
                continue;
            }
            self.wait();
        }
    }

    /// Sleeps until a signal, a notification, or the restart time; handles what came.
    fn wait(&mut self) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let timeout = match (self.restart_at, self.stopping) {
            (Some(at), None) => at.saturating_duration_since(Instant::now()),
            (_, Some(_)) => Duration::from_millis(500),
            (None, None) => Duration::from_secs(60),
        };
        let mut fds = [
            PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.notify.socket.as_fd(), PollFlags::POLLIN),
        ];
        let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                tracing::error!("keeper: poll failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // Notifications first: a MAINPID= must be known before the old main's exit is reaped.
        while let Some(message) = self.notify.receive() {
            self.on_message(message);
        }
        while let Ok(Some(info)) = self.signals.read_signal() {
            if let Ok(signal) = Signal::try_from(info.ssi_signo as i32) {
                self.on_signal(signal);
            }
        }
    }

    fn on_signal(&mut self, signal: Signal) {
        match signal {
            Signal::SIGCHLD => {} // reaped at the top of the loop
            Signal::SIGTERM | Signal::SIGINT => {
                if self.stopping.is_none() {
                    tracing::info!(
                        event = "keeper-stop",
                        "{}: stopping the service{}",
                        signal.as_str(),
                        self.main.as_ref().map_or(String::new(), |m| format!(
                            " (forwarded to generation {}, pid {})",
                            m.generation, m.pid
                        ))
                    );
                    self.stopping = Some(Instant::now());
                    self.restart_at = None;
                }
                self.forward(signal);
            }
            Signal::SIGHUP | Signal::SIGUSR2 | Signal::SIGUSR1 => {
                if signal == Signal::SIGUSR1 {
                    let _ = crate::logging::reopen();
                }
                match &self.main {
                    Some(m) if m.ready_at.is_some() => self.forward(signal),
                    _ => {
                        tracing::warn!("{}: no generation is serving yet; ignored", signal.as_str())
                    }
                }
            }
            _ => {}
        }
    }

    fn forward(&self, signal: Signal) {
        if let Some(m) = &self.main {
            // The main pid is our child (or adopted): it cannot be recycled before we reap it.
            if let Err(e) = nix::sys::signal::kill(Pid::from_raw(m.pid), signal) {
                tracing::warn!("cannot forward {} to pid {}: {e}", signal.as_str(), m.pid);
            }
        }
    }

    /// Handles one notification with systemd's `NotifyAccess=main` rules.
    fn on_message(&mut self, mut message: Message) {
        // A lone BARRIER=1 is answered (its fd closed, which `message` does when dropped) for
        // any sender, as systemd's manager does.
        if message.is_lone_barrier() {
            return;
        }
        let Some(main) = self.main.as_ref().filter(|m| m.pid == message.pid) else {
            tracing::debug!(
                sender = message.pid,
                "notification from pid {}, which is not the main pid: ignored ({:?})",
                message.pid,
                message.text
            );
            return;
        };
        let (pid, generation) = (main.pid, main.generation);
        if message.has("FDSTOREREMOVE=1") || message.has("FDSTORE=1") {
            self.fd_store(&mut message, pid, generation);
        } else if message.fds > 0 && !message.has("BARRIER=1") {
            tracing::warn!(
                "pid {} passed {} fd(s) without FDSTORE=1: closed",
                message.pid,
                message.fds
            );
        }
        self.follow_main_state(&message);
        if let Some(new) = message.get("MAINPID") {
            self.switch_main(new);
        }
    }

    /// `STATUS=`, `STOPPING=1`, `RELOADING=1` and `READY=1` from the main generation.
    fn follow_main_state(&mut self, message: &Message) {
        let Some(main) = self.main.as_mut() else {
            return;
        };
        if let Some(status) = message.get("STATUS") {
            tracing::debug!(pid = main.pid, "STATUS={status}");
        }
        if message.has("STOPPING=1") {
            main.stopping = true;
        }
        if message.has("RELOADING=1") {
            tracing::info!(
                event = "keeper-reloading",
                "generation {} (pid {}) is upgrading",
                main.generation,
                main.pid
            );
        }
        if message.has("READY=1") && main.ready_at.is_none() {
            self.main_ready();
        }
    }

    /// The main generation serves: the pidfile names it, and a waiting `--daemon` foreground
    /// process exits 0.
    fn main_ready(&mut self) {
        let Some(main) = self.main.as_mut() else {
            return;
        };
        main.ready_at = Some(Instant::now());
        // It started: nothing more comes on its report pipe.
        main.report = None;
        let (pid, generation) = (main.pid, main.generation);
        self.record_pid(Some(pid));
        tracing::info!(
            event = "keeper-ready",
            pid,
            generation,
            "generation {generation} (pid {pid}) serves"
        );
        if let Some(r) = self.readiness.take() {
            r.ready();
        }
    }

    /// The keeper's fd store, with systemd's protocol: the main generation pushes the sockets it
    /// bound itself (`FDSTORE=1` + `FDNAME=bound/NAME`) and removes those a reload moved or
    /// dropped (`FDSTOREREMOVE=1` + `FDNAME=`). So the keeper's sockets follow the
    /// configuration: a crash-restarted generation gets the current ones, and a port that was
    /// given up does not stay open here, queueing clients nobody accepts.
    fn fd_store(&mut self, message: &mut Message, pid: i32, generation: u64) {
        let Some(name) = message.get("FDNAME").map(str::to_owned) else {
            tracing::warn!("pid {pid} sent {:?} without FDNAME=: ignored", message.text);
            return;
        };
        if message.has("FDSTOREREMOVE=1") {
            let before = self.listeners.len();
            self.listeners.retain(|(_, n)| *n != name);
            if self.listeners.len() < before {
                tracing::info!(
                    event = "keeper-socket-removed",
                    generation,
                    "generation {generation} (pid {pid}) gave up listener '{name}': the keeper closed its copy"
                );
            }
            return;
        }
        let same_socket = |a: &OwnedFd, b: &OwnedFd| match (
            nix::sys::stat::fstat(a.as_fd()),
            nix::sys::stat::fstat(b.as_fd()),
        ) {
            (Ok(a), Ok(b)) => (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino),
            _ => false,
        };
        for fd in message.take_fds() {
            match self.listeners.iter_mut().find(|(_, n)| *n == name) {
                Some((held, _)) if same_socket(held, &fd) => {}
                Some((held, _)) => {
                    *held = fd;
                    tracing::info!(
                        event = "keeper-socket-replaced",
                        generation,
                        "generation {generation} (pid {pid}) moved listener '{name}': the keeper holds the new socket"
                    );
                }
                None => {
                    self.listeners.push((fd, name.clone()));
                    tracing::info!(
                        event = "keeper-socket-added",
                        generation,
                        "generation {generation} (pid {pid}) added listener '{name}': the keeper holds it too"
                    );
                }
            }
        }
    }

    /// `MAINPID=` from the main pid: the new pid must be a live child of the keeper (the upgrade's
    /// double fork re-parents it here; systemd checks the cgroup instead).
    fn switch_main(&mut self, value: &str) {
        let old = self.main.as_ref().map_or(0, |m| m.pid);
        let Some(new) = value.parse::<i32>().ok().filter(|p| *p > 0) else {
            tracing::warn!("MAINPID={value:?} from pid {old} is not a pid: ignored");
            return;
        };
        if !is_child(new) {
            tracing::warn!(
                "MAINPID={new} from pid {old}: pid {new} is not a child of the keeper: ignored"
            );
            return;
        }
        let old = self.main.take().expect("a main pid sent this");
        self.former.push((old.pid, old.generation));
        self.generation = self.generation.max(old.generation + 1);
        self.main = Some(Generation {
            pid: new,
            generation: old.generation + 1,
            // The upgrade handshake proved it ready before the old main named it.
            ready_at: Some(Instant::now()),
            stopping: false,
            report: None,
            error: None,
        });
        self.record_pid(Some(new));
        tracing::info!(
            event = "keeper-main-pid",
            old_pid = old.pid,
            new_pid = new,
            generation = old.generation + 1,
            "main pid {} -> {new} (generation {})",
            old.pid,
            old.generation + 1
        );
        self.reexec_pending = true;
    }

    /// Writes the main pid into the pidfile, or empties it while no generation is ready.
    fn record_pid(&self, pid: Option<i32>) {
        if let Some(p) = &self.pidfile {
            let result = match pid {
                Some(pid) => p.write_pid(pid as u32),
                None => p.clear(),
            };
            if let Err(e) = result {
                tracing::error!("cannot write the pidfile {}: {e}", p.path().display());
            }
        }
    }

    /// Reaps every child that exited; returns whether children remain.
    fn reap(&mut self) -> bool {
        loop {
            match nix::sys::wait::waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => return true,
                Ok(status) => {
                    let Some(pid) = status.pid() else { continue };
                    let pid = pid.as_raw();
                    if self.main.as_ref().is_some_and(|m| m.pid == pid) {
                        let main = self.main.take().expect("checked");
                        self.main_exited(main, &status);
                    } else if let Some(i) = self.former.iter().position(|(p, _)| *p == pid) {
                        let (_, generation) = self.former.remove(i);
                        tracing::info!(
                            event = "keeper-reaped",
                            pid,
                            generation,
                            "generation {generation} (pid {pid}), which had handed over, {}",
                            describe(&status)
                        );
                    } else {
                        tracing::debug!("reaped pid {pid}: {}", describe(&status));
                    }
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return false, // ECHILD: no children
            }
        }
    }

    /// The main generation exited: the service stops (it was asked to, or the generation said
    /// so), or the generation is restarted (at once after a good run; after a failed start with
    /// a growing delay, until the keeper gives up).
    fn main_exited(&mut self, mut main: Generation, status: &WaitStatus) {
        main.read_report();
        let how = describe(status);
        self.record_pid(None);
        let clean = matches!(status, WaitStatus::Exited(_, 0));
        if self.stopping.is_some() || main.stopping || clean {
            return self.service_stops(&main, &how);
        }
        let served = main.ready_at.map(|t| t.elapsed());
        match served {
            Some(served) if served >= self.startsecs => {
                self.restart_after_serving(&main, &how, served)
            }
            _ => self.start_failed(&main, &how, served),
        }
    }

    fn service_stops(&mut self, main: &Generation, how: &str) {
        let (pid, generation) = (main.pid, main.generation);
        tracing::info!(
            event = "keeper-generation-exited",
            pid,
            generation,
            "generation {generation} (pid {pid}) {how}; the service stops"
        );
        if let Some(r) = self.readiness.take() {
            r.fail(&format!(
                "the service stopped during its start: pid {pid} {how}"
            ));
        }
        self.stopping.get_or_insert_with(Instant::now);
    }

    /// A generation that had served for `keeper.startsecs` started well: the count of failed
    /// starts begins again, and the restart is at once.
    fn restart_after_serving(&mut self, main: &Generation, how: &str, served: Duration) {
        let (pid, generation) = (main.pid, main.generation);
        self.failures = 0;
        self.restart_at = Some(Instant::now());
        tracing::warn!(
            event = "keeper-restart",
            pid,
            generation,
            status = %how,
            "generation {generation} (pid {pid}) {how}{} after serving for {}; restarting it",
            main.error_suffix(),
            secs(served)
        );
    }

    /// A failed start (the generation had not served for `keeper.startsecs`): retried after
    /// 1 s, 2 s, ... until `keeper.startretries`; the first start of `--daemon` is not retried,
    /// as its foreground process waits to say why.
    fn start_failed(&mut self, main: &Generation, how: &str, served: Option<Duration>) {
        let (pid, generation, error) = (main.pid, main.generation, main.error_suffix());
        self.failures += 1;
        let when = match served {
            Some(d) => format!("{} after it became ready", secs(d)),
            None => "before it was ready".to_owned(),
        };
        if let Some(r) = self.readiness.take() {
            let reason = main
                .error
                .clone()
                .unwrap_or_else(|| format!("the first generation (pid {pid}) {how} {when}"));
            r.fail(&reason);
            self.gave_up = Some(format!(
                "giving up: the first generation (pid {pid}) {how} {when}{error}"
            ));
            return;
        }
        if self.failures > self.startretries {
            self.gave_up = Some(format!(
                "giving up after {} failed start(s) in a row (keeper.startretries = {}): generation {generation} (pid {pid}) {how} {when}{error}",
                self.failures, self.startretries
            ));
            return;
        }
        let backoff = Duration::from_secs(self.failures as u64);
        self.restart_at = Some(Instant::now() + backoff);
        tracing::warn!(
            event = "keeper-restart",
            pid,
            generation,
            status = %how,
            "generation {generation} (pid {pid}) {how} {when}{error}; failed start {} of {}, restarting in {}",
            self.failures,
            self.startretries + 1,
            secs(backoff)
        );
    }

    /// Starts a new generation as a child, with the sockets at fds 3.. .
    fn start_generation(&mut self) {
        let generation = self.generation + 1;
        let restart = self.generation > 0;
        if restart {
            self.restarts += 1;
        }
        self.generation = generation;
        match self.spawn(generation) {
            Ok((pid, report)) => {
                tracing::info!(
                    event = "keeper-spawn",
                    pid,
                    generation,
                    restarts = self.restarts,
                    "{} generation {generation} as pid {pid} from {}",
                    if restart { "restarted:" } else { "started" },
                    self.exe.display()
                );
                self.main = Some(Generation {
                    pid,
                    generation,
                    ready_at: None,
                    stopping: false,
                    report: Some(report),
                    error: None,
                });
            }
            Err(e) => {
                // As a start that failed at once.
                self.failures += 1;
                let message = format!("cannot start generation {generation}: {e}");
                if self.failures > self.startretries || self.readiness.is_some() {
                    if let Some(r) = self.readiness.take() {
                        r.fail(&message);
                    }
                    self.gave_up = Some(format!("giving up: {message}"));
                } else {
                    tracing::error!("{message}; retrying in {} s", self.failures);
                    self.restart_at =
                        Some(Instant::now() + Duration::from_secs(self.failures as u64));
                }
            }
        }
    }

    /// Forks a generation with the sockets at 3.. and its report pipe after them; returns its
    /// pid and the pipe's read end.
    fn spawn(&self, generation: u64) -> io::Result<(i32, std::fs::File)> {
        let (report_read, report_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let mut fds: Vec<RawFd> = self
            .listeners
            .iter()
            .map(|(fd, _)| fd.as_raw_fd())
            .collect();
        fds.push(report_write.as_raw_fd());
        let env = self.generation_env(generation);
        let mut plan = ExecPlan::new(&self.exe, &self.args, env, fds)?;
        // SAFETY: the keeper is single-threaded (no runtime, no helper threads), so the child
        // may run any code until it execs; it runs ExecPlan::exec, which is safe even without.
        match unsafe { nix::unistd::fork() }? {
            nix::unistd::ForkResult::Parent { child } => {
                drop(report_write);
                Ok((child.as_raw(), std::fs::File::from(report_read)))
            }
            nix::unistd::ForkResult::Child => self.exec_generation(&mut plan),
        }
    }

    /// A generation's environment: the keeper's own without what is private to it, plus what
    /// announces its fds (the sockets, then the report pipe), its notify socket, generation and
    /// restarts. `LISTEN_PID` and `BATON_FOR_PID` are filled in after the fork ([`ExecPlan`]).
    fn generation_env(&self, generation: u64) -> Vec<Vec<u8>> {
        let except: Vec<&str> = crate::env::NOT_INHERITED
            .iter()
            .chain(KEEPER_PRIVATE_ENV.iter())
            .copied()
            .collect();
        let mut env = inherited_env(&except);
        let n = self.listeners.len();
        let names: Vec<&str> = self.listeners.iter().map(|(_, n)| n.as_str()).collect();
        for var in [
            format!("LISTEN_FDS={n}"),
            format!("LISTEN_FDNAMES={}", names.join(":")),
            format!("NOTIFY_SOCKET={}", self.notify.path.display()),
            format!("{KEEPER_PID_ENV}={}", std::process::id()),
            format!("{}={generation}", Var::GENERATION),
            format!("{RESTARTS_ENV}={}", self.restarts),
            format!("{REPORT_FD_ENV}={}", 3 + n),
        ] {
            env.push(var.into_bytes());
        }
        env
    }

    /// The child's side of [`Keeper::spawn`]: [`ExecPlan::exec`]; a failure is reported as
    /// `error <text>` on the report pipe, as a generation reports a failed start.
    fn exec_generation(&self, plan: &mut ExecPlan) -> ! {
        // SAFETY: in the child, between fork and exec.
        let failed = unsafe { plan.exec() };
        let error = io::Error::from_raw_os_error(failed.errno);
        let line = format!("error cannot execute {}: {error}\n", self.exe.display());
        // SAFETY: plain writes and _exit in the child.
        unsafe {
            libc::write(failed.report_fd, line.as_ptr().cast(), line.len());
            libc::_exit(127)
        }
    }

    /// Re-executes the keeper in place (same pid, same children), so that after an upgrade no
    /// process runs the old binary. On failure the keeper goes on as it is.
    fn reexec(&mut self) {
        let kept: Vec<RawFd> = self
            .listeners
            .iter()
            .map(|(fd, _)| fd.as_raw_fd())
            .chain([self.notify.socket.as_raw_fd()])
            .chain(self.pidfile.as_ref().map(|p| p.fd()))
            .collect();
        let e = self.exec_self(&kept).unwrap_or_else(|e| e);
        for fd in &kept {
            set_cloexec(*fd, true);
        }
        tracing::error!(
            event = "keeper-reexec-failed",
            "cannot re-execute the keeper from {}: {e}; the keeper goes on with the binary it runs",
            self.exe.display()
        );
    }

    /// execve of the keeper's executable with its state in [`STATE_ENV`] and the `kept` fds
    /// open across it. Returns only on failure: the error, whether from execve or before it.
    fn exec_self(&self, kept: &[RawFd]) -> io::Result<io::Error> {
        let json = serde_json::to_string(&self.state()).map_err(io::Error::other)?;
        let path = CString::new(self.exe.as_os_str().as_bytes())?;
        let mut argv = vec![path.clone()];
        for a in &self.args {
            argv.push(CString::new(a.as_bytes())?);
        }
        let env = self.reexec_env(&json)?;
        tracing::info!(
            event = "keeper-reexec",
            exe = %self.exe.display(),
            "re-executing the keeper from {} so that no process runs the old binary",
            self.exe.display()
        );
        for fd in kept {
            set_cloexec(*fd, false);
        }
        // The signal mask (all keeper signals blocked) and pending signals survive execve:
        // nothing that arrives meanwhile is lost.
        let e = nix::unistd::execve(&path, &argv, &env).unwrap_err();
        Ok(io::Error::from(e))
    }

    /// The keeper's environment for its next image: its own, with the state, the pidfile's fd
    /// and `BATON_FOR_PID` (this very process reads them after execve) set anew.
    fn reexec_env(&self, state_json: &str) -> io::Result<Vec<CString>> {
        let except = [
            STATE_ENV.name(),
            PIDFILE_FD_ENV.name(),
            crate::upgrade::FOR_PID_ENV.name(),
        ];
        let mut env = inherited_env(&except)
            .into_iter()
            .map(CString::new)
            .collect::<Result<Vec<CString>, _>>()?;
        env.push(CString::new(format!("{STATE_ENV}={state_json}"))?);
        env.push(CString::new(format!(
            "{}={}",
            crate::upgrade::FOR_PID_ENV,
            std::process::id()
        ))?);
        if let Some(p) = &self.pidfile {
            env.push(CString::new(format!("{PIDFILE_FD_ENV}={}", p.fd()))?);
        }
        Ok(env)
    }

    /// What survives the re-exec ([`Keeper::resumed`] reads it back).
    fn state(&self) -> State {
        State {
            exe: self.exe.clone(),
            args: self
                .args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            listeners: self
                .listeners
                .iter()
                .map(|(fd, name)| (fd.as_raw_fd(), name.clone()))
                .collect(),
            notify_fd: self.notify.socket.as_raw_fd(),
            notify_dir: self.notify.dir.clone(),
            pidfile: self.pidfile.as_ref().map(|p| p.path().to_owned()),
            log_level: self.log_level.clone(),
            log_file: self.log_file.clone(),
            startsecs_ms: self.startsecs.as_millis() as u64,
            startretries: self.startretries,
            drain_timeout_ms: self.drain_timeout.as_millis() as u64,
            main: self.main.as_ref().map(|m| {
                (
                    m.pid,
                    m.generation,
                    m.ready_at.map(|t| t.elapsed().as_millis() as u64),
                )
            }),
            former: self.former.clone(),
            generation: self.generation,
            restarts: self.restarts,
            failures: self.failures,
            stopping: self.stopping.is_some(),
        }
    }

    /// Ends the keeper: sockets closed, pidfile removed, notify socket removed.
    fn exit(&mut self, code: ExitCode, reason: &str) -> ExitCode {
        if !reason.is_empty() {
            tracing::error!(
                event = "keeper-gave-up",
                "{reason}; closing the sockets and exiting"
            );
            if let Some(r) = self.readiness.take() {
                r.fail(reason);
            }
        } else {
            tracing::info!(
                event = "keeper-stopped",
                restarts = self.restarts,
                "the service stopped; keeper exiting"
            );
        }
        self.listeners.clear();
        if let Some(p) = &self.pidfile {
            p.remove();
        }
        self.notify.remove();
        code
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_well() {
        let pid = Pid::from_raw(7);
        assert_eq!(
            describe(&WaitStatus::Exited(pid, 3)),
            "exited with status 3"
        );
        assert_eq!(
            describe(&WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            "was killed by SIGKILL"
        );
    }
}
