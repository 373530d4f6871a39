//! The life of one serving process: sockets, ready, serve, upgrade or stop, drain, exit.
//!
//! [`prepare`] does everything that must happen before a thread exists: it takes the sockets
//! passed by the service manager (or by the previous generation), removes the protocol's
//! variables from the environment, and records what a later upgrade needs. [`Process::run`]
//! builds the tokio runtime and runs the event loop:
//!
//! | phase       | on SIGTERM/SIGINT, `baton stop` | on SIGUSR2/SIGHUP, `baton reload` | on the upgrade's end |
//! |-------------|---------------------------------|-----------------------------------|----------------------|
//! | `Serving`   | stop                            | start an upgrade → `Upgrading`    | —                    |
//! | `Upgrading` | kill the new process, stop      | ignored (a `reload` joins it)     | ok: hand over, drain, exit 0; failed: `READY=1` + `STATUS=` with the reason → `Serving` |
//!
//! The upgrade itself, step by step, is [`crate::upgrade`].
//!
//! What the service manager hears (sd_notify), in order: `READY=1` + `STATUS=` once every
//! listener accepts, `WATCHDOG=1` at half the watchdog interval when one is set; then either
//! `STOPPING=1` + `STATUS=` when a stop begins, or `RELOADING=1` + `MONOTONIC_USEC` at an
//! upgrade, followed by `MAINPID=` + `BARRIER=1` (handed over: nothing more) or `READY=1` +
//! `STATUS=` naming the failure.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::activation::{self, Listener};
use crate::config::Config;
use crate::control::{self, Request};
use crate::daemon::Readiness;
use crate::http::{self, Info};
use crate::metrics::Metrics;
use crate::notify;
use crate::pidfile::{Pidfile, PIDFILE_FD_ENV};
use crate::server::{self, DrainReport, Server};
use crate::signals::{Event, Signals};
use crate::upgrade::{self, Counts, HandedOver, Handshake, Upgrader};

/// The environment variable that carries the generation from one process to the next.
pub const GENERATION_ENV: &str = "BATON_GENERATION";

/// A process ready to serve: its configuration, its sockets, and its place in the line of
/// generations.
pub struct Process {
    pub config: Config,
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
}

/// Takes the sockets and the generation from the environment, cleans the environment, binds
/// what was not handed over, and records how to start a successor.
///
/// `pidfile` is the locked pidfile, if any. Must run before any thread is started (it changes
/// the environment).
pub fn prepare(config: Config, pidfile: Option<Pidfile>) -> anyhow::Result<Process> {
    let started = SystemTime::now();
    let exe = match &config.upgrade.exec {
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
    let activated = activation::take_activated()?;
    let listeners = activation::resolve(&config.listeners, activated)?;
    let mut upgrader = Upgrader::new(exe, generation, config.upgrade.timeout);
    for listener in &listeners {
        upgrader
            .add_socket(listener, &listener.name)
            .context("cannot keep a copy of a listening socket for upgrades")?;
    }
    if let Some(pidfile) = &pidfile {
        // The next generation inherits the locked description: the lock is never free.
        let fd = pidfile
            .handover_fd()
            .context("cannot keep a copy of the pidfile for upgrades")?;
        upgrader.add_fd(fd, PIDFILE_FD_ENV);
    }
    Ok(Process {
        config,
        listeners,
        generation,
        started,
        upgrader,
        handshake: None,
        counts,
        pidfile: pidfile.map(Arc::new),
        readiness: None,
    })
}

/// How the serving phase ended.
enum End {
    Stop(&'static str),
    /// With the `baton reload` clients to answer once this process stopped accepting.
    HandedOver(HandedOver, Vec<oneshot::Sender<Value>>),
}

/// The upgrade in progress: the task running [`upgrade::run`] and who waits for its outcome.
struct Upgrading {
    task: JoinHandle<Result<HandedOver, String>>,
    waiters: Vec<oneshot::Sender<Value>>,
    /// Calls the upgrade off; past `MAINPID=` it completes as a handover all the same.
    cancel: CancellationToken,
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
        fds.extend(self.handshake.as_ref().map(|h| h.fd()));
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
        eprintln!("baton: {message}");
        std::process::ExitCode::FAILURE
    }

    /// Reports the start's outcome to a waiting foreground process (`--daemon`).
    pub fn report_to(&mut self, readiness: Readiness) {
        self.readiness = Some(readiness);
    }

    /// Builds the runtime and serves until stopped or handed over. Returns once the drain is over.
    pub fn run(mut self) -> anyhow::Result<()> {
        let handshake = self.handshake.take();
        let readiness = self.readiness.take();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("baton-worker")
            .build()
            .context("cannot start the async runtime");
        let runtime = match runtime {
            Ok(runtime) => runtime,
            Err(e) => {
                report_failure(handshake, readiness, &e);
                return Err(e);
            }
        };
        runtime.block_on(self.serve(handshake, readiness))
    }

    async fn serve(
        self,
        handshake: Option<Handshake>,
        mut readiness: Option<Readiness>,
    ) -> anyhow::Result<()> {
        let generation = self.generation;
        tracing::info!(
            event = "start",
            generation,
            version = crate::VERSION,
            config = self.config.source.as_ref().map(|p| p.display().to_string()),
            "baton {} starting: generation {generation}, pid {}",
            crate::VERSION,
            std::process::id()
        );
        let listener_names: Vec<String> = self.listeners.iter().map(|l| l.to_string()).collect();
        let self_listeners: Vec<(String, String, Option<i32>)> = self
            .listeners
            .iter()
            .map(|l| (l.name.clone(), l.socket.local_address(), l.activated_fd))
            .collect();
        let info = Arc::new(Info::current(generation, listener_names.clone()));
        let metrics = Arc::new(Metrics::new(generation, self.started));
        metrics.set_upgrades(self.counts.ok, self.counts.failed);

        // Everything that can fail at start, before serving anything.
        let started = async {
            let signals = Signals::install().context("cannot install signal handlers")?;
            let control = control::listen()?;
            let app = http::App::new(info.clone(), metrics.clone(), self.config.root.as_deref());
            let settings = server::Settings {
                limits: self.config.limits,
                idle_grace: self.config.shutdown.idle_grace,
                access_log: self.config.access_log,
            };
            let server = Server::new(self.listeners, app, metrics.clone(), settings)
                .context("cannot serve the listeners")?;
            anyhow::Ok((signals, control, server))
        }
        .await;
        let (mut signals, mut control, mut server) = match started {
            Ok(parts) => parts,
            Err(e) => {
                report_failure(handshake, readiness, &e);
                return Err(e);
            }
        };
        for (listener, description) in self_listeners.iter().zip(&listener_names) {
            tracing::info!(
                event = "listening",
                generation,
                listener = %listener.0,
                address = %listener.1,
                fd = listener.2,
                "listening on {description}"
            );
        }

        let status = format!(
            "serving generation {generation} (pid {}) on {}",
            info.pid,
            listener_names.join(", ")
        );
        let ready = |server: &mut Server| {
            server.start_accepting();
            notify::ready(&status);
            tracing::info!(
                event = "ready",
                generation,
                listeners = %listener_names.join(", "),
                root = self.config.root.as_ref().map(|r| r.display().to_string()),
                "{status}"
            );
        };
        // A new generation waits for its predecessor's commit before it accepts or notifies:
        // until then it is not the main pid, and it may still be called off.
        if let Some(handshake) = handshake {
            let committed = tokio::select! {
                // A commit that arrived is taken even if a stop arrived too: O has handed over.
                biased;
                committed = handshake.ready() => committed.context("the upgrade was called off by the old process")?,
                _ = next_stop(&mut signals) => anyhow::bail!("stopped before the old process handed over"),
            };
            if let Some(took) = committed.handoff {
                metrics.last_handoff_seconds.set(took.as_secs_f64());
            }
            metrics.upgrade_succeeded();
            ready(&mut server);
            // Only now may `baton reload` return: READY=1 is out.
            let mut channel = committed.channel;
            let _ = channel.write_all(b"serving\n").await;
            tokio::spawn(record_predecessor_drain(channel, metrics.clone()));
        } else {
            ready(&mut server);
        }
        if let Some(r) = readiness.take() {
            r.ready();
        }
        if let Some(interval) = notify::watchdog_interval() {
            tokio::spawn(watchdog(interval));
        }

        let upgrader = Arc::new(self.upgrader);
        let mut upgrading: Option<Upgrading> = None;
        let mut end = loop {
            let upgrade_done = async {
                match &mut upgrading {
                    Some(u) => (&mut u.task).await,
                    None => std::future::pending().await,
                }
            };
            let trigger = tokio::select! {
                event = signals.recv() => match event {
                    Event::Stop(signal) => break End::Stop(signal),
                    Event::Upgrade(signal) => (signal, None),
                    Event::ReopenLogs => {
                        match crate::logging::reopen() {
                            Ok(true) => tracing::info!(event = "log-reopened", "SIGUSR1: log file reopened"),
                            Ok(false) => tracing::info!("SIGUSR1: logging goes to stderr or the journal; nothing to reopen"),
                            Err(e) => tracing::error!("SIGUSR1: cannot reopen the log file: {e}; still writing to the old one"),
                        }
                        continue;
                    }
                },
                Some(request) = control.requests.recv() => match request {
                    Request::Upgrade(reply) => ("baton reload", Some(reply)),
                    Request::Status(reply) => {
                        let state = if upgrading.is_some() { "upgrading" } else { "serving" };
                        let _ = reply.send(status_reply(&info, self.started, state));
                        continue;
                    }
                    Request::Stop(reply) => {
                        // Under a keeper, `baton stop` waits for the keeper too.
                        let _ = reply.send(json!({"ok": true, "keeper_pid": crate::keeper::pid_from_env()}));
                        break End::Stop("baton stop");
                    }
                },
                result = upgrade_done => {
                    let Upgrading { waiters, .. } = upgrading.take().expect("an upgrade was running");
                    match result.unwrap_or_else(|e| Err(format!("the upgrade task failed: {e}"))) {
                        Ok(handed_over) => break End::HandedOver(handed_over, waiters),
                        Err(reason) => {
                            metrics.upgrade_failed();
                            if let Some(pidfile) = &self.pidfile {
                                // The new pid may have been written already: name ours again.
                                if let Err(e) = pidfile.write_pid(std::process::id()) {
                                    tracing::error!("cannot rewrite the pidfile {}: {e}", pidfile.path().display());
                                }
                            }
                            notify::ready(&format!("{status}; upgrade to generation {} failed: {reason}", generation + 1));
                            tracing::error!(event = "upgrade-failed", generation, reason = %reason, "upgrade to generation {} failed: {reason}; still serving", generation + 1);
                            for waiter in waiters {
                                let _ = waiter.send(json!({"ok": false, "error": reason}));
                            }
                        }
                    }
                    continue;
                }
            };
            let (cause, waiter) = trigger;
            match &mut upgrading {
                Some(u) => {
                    tracing::warn!(
                        event = "upgrade-ignored",
                        generation,
                        "{cause}: an upgrade is already in progress; ignored"
                    );
                    u.waiters.extend(waiter);
                }
                None => {
                    tracing::info!(event = "upgrade", generation, cause, exe = %upgrader.exe.display(), "{cause}: upgrading to generation {}", generation + 1);
                    let (upgrader, (ok, failed)) = (upgrader.clone(), metrics.upgrades());
                    let pidfile = self.pidfile.clone();
                    let cancel = CancellationToken::new();
                    let token = cancel.clone();
                    let task = tokio::spawn(async move {
                        // The pidfile names the new pid before it becomes the main pid.
                        let record = |pid: i32| match &pidfile {
                            Some(p) => p.write_pid(pid as u32),
                            None => Ok(()),
                        };
                        upgrade::run(&upgrader, Counts { ok, failed }, record, &token).await
                    });
                    upgrading = Some(Upgrading {
                        task,
                        waiters: waiter.into_iter().collect(),
                        cancel,
                    });
                }
            }
        };

        // A stop during an upgrade calls it off; but past MAINPID= the new process is the
        // service already, and this one can only hand over.
        if let (End::Stop(signal), Some(u)) = (&end, upgrading.take()) {
            u.cancel.cancel();
            match u.task.await {
                Ok(Ok(handed_over)) => {
                    tracing::warn!(
                        event = "upgrade-completed-on-stop",
                        generation,
                        new_pid = handed_over.pid,
                        "{signal} came as the upgrade passed its point of no return: generation {} (pid {}) is the service now; stop that one to stop the service",
                        handed_over.generation,
                        handed_over.pid
                    );
                    end = End::HandedOver(handed_over, u.waiters);
                }
                outcome => {
                    let reason = match outcome {
                        Ok(Err(reason)) => reason,
                        Err(e) => format!("the upgrade task failed: {e}"),
                        Ok(Ok(_)) => unreachable!(),
                    };
                    tracing::warn!(
                        event = "upgrade-aborted",
                        generation,
                        "{signal}: upgrade aborted ({reason}); the new process was killed"
                    );
                    for waiter in u.waiters {
                        let _ = waiter.send(json!({"ok": false, "error": format!("{signal}: the upgrade was aborted")}));
                    }
                }
            }
        }
        let drain_timeout = self.config.shutdown.drain_timeout;
        match &end {
            End::Stop(signal) => {
                notify::stopping(&format!(
                    "stopping: draining connections (up to {})",
                    humantime::format_duration(drain_timeout)
                ));
                tracing::info!(
                    event = "stop",
                    generation,
                    signal = *signal,
                    open_connections = server.open_connections(),
                    "{signal}: stopping; draining connections for up to {}",
                    humantime::format_duration(drain_timeout)
                );
            }
            End::HandedOver(h, _) => tracing::info!(
                event = "handed-over",
                generation,
                new_pid = h.pid,
                new_generation = h.generation,
                handoff_ms = h.took.as_millis() as u64,
                open_connections = server.open_connections(),
                "handed over to generation {} (pid {}) in {:?}; draining connections for up to {}",
                h.generation,
                h.pid,
                h.took,
                humantime::format_duration(drain_timeout)
            ),
        }
        // The upgrader's copies of the listening sockets must go with the accept loops: a copy
        // left open would queue new clients where nobody accepts them anymore.
        drop(upgrader);
        server.stop_accepting().await;
        if let End::HandedOver(h, waiters) = &mut end {
            // Only now does every new connection reach the new generation.
            let reply = match &h.unconfirmed {
                None => json!({
                    "ok": true,
                    "pid": h.pid,
                    "generation": h.generation,
                    "took_ms": h.took.as_millis() as u64,
                }),
                Some(reason) => json!({"ok": false, "error": reason}),
            };
            for waiter in waiters.drain(..) {
                let _ = waiter.send(reply.clone());
            }
        }
        // The drain starts now; the control socket's last answers are written meanwhile.
        let drain = async {
            tokio::join!(
                server.drain(drain_timeout),
                control.close(Duration::from_secs(2))
            )
            .0
        };
        tokio::pin!(drain);
        // After a stop, a second stop signal exits at once. After a handover, the first stop
        // signal (systemd signals every process of the unit) is the one that only confirms the
        // drain under way.
        let mut stop_requested = matches!(end, End::Stop(_));
        let report = loop {
            tokio::select! {
                report = &mut drain => break report,
                event = signals.recv() => match event {
                    Event::Stop(signal) if stop_requested => {
                        tracing::warn!(
                            event = "stop-now",
                            generation,
                            open_connections = server.open_connections(),
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
                        let _ = crate::logging::reopen();
                    }
                },
            }
        };
        tracing::info!(
            event = "drained",
            generation,
            open_at_start = report.open_at_start,
            forced = report.forced,
            drain_ms = report.duration.as_millis() as u64,
            "drained {} connection(s) in {:?}, {} closed at the deadline; exiting",
            report.open_at_start,
            report.duration,
            report.forced
        );
        match end {
            End::HandedOver(mut h, _) => {
                let _ = h.channel.write_all(drained_line(&report).as_bytes()).await;
            }
            // The pidfile goes with a clean stop; after a handover it is the successor's.
            End::Stop(_) => {
                if let Some(pidfile) = &self.pidfile {
                    pidfile.remove();
                }
            }
        }
        Ok(())
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

fn drained_line(report: &DrainReport) -> String {
    format!(
        "drained {} {}\n",
        report.duration.as_millis(),
        report.forced
    )
}

/// N's side: the old generation reports its drain on the handshake channel before it exits.
async fn record_predecessor_drain(channel: tokio::net::UnixStream, metrics: Arc<Metrics>) {
    let mut lines = tokio::io::BufReader::new(channel).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut parts = line.split(' ');
        if let (Some("drained"), Some(ms), Some(forced)) =
            (parts.next(), parts.next(), parts.next())
        {
            if let (Ok(ms), Ok(forced)) = (ms.parse::<u64>(), forced.parse::<u64>()) {
                metrics.last_drain_seconds.set(ms as f64 / 1000.0);
                metrics.drain_forced_closes.inc_by(forced);
            }
        }
    }
}

fn status_reply(info: &Info, started: SystemTime, state: &str) -> Value {
    json!({
        "ok": true,
        "pid": info.pid,
        "generation": info.generation,
        "version": info.version,
        "started": info.started,
        "uptime_secs": started.elapsed().map(|d| d.as_secs()).unwrap_or(0),
        "listeners": info.listeners,
        "state": state,
        "keeper_pid": crate::keeper::pid_from_env(),
        "restarts": crate::keeper::restarts_from_env(),
    })
}

async fn next_stop(signals: &mut Signals) -> &'static str {
    loop {
        if let Event::Stop(signal) = signals.recv().await {
            return signal;
        }
    }
}

/// Pings the watchdog at half the interval systemd asked for, as sd_watchdog_enabled(3)
/// recommends.
async fn watchdog(interval: Duration) {
    let mut ticks = tokio::time::interval(interval / 2);
    loop {
        ticks.tick().await;
        notify::watchdog();
    }
}
