//! The life of one serving process: sockets, ready, serve, stop.
//!
//! [`prepare`] does everything that must happen before a thread exists: it takes the sockets
//! passed by the service manager (or by the previous generation) and removes the protocol's
//! variables from the environment. [`Process::run`] then builds the tokio runtime, serves, and
//! reacts to signals until the process has drained and may exit.
//!
//! What the service manager hears (sd_notify), in order:
//! `READY=1` + `STATUS=` once every listener accepts, `WATCHDOG=1` at half the watchdog
//! interval when one is set, `STOPPING=1` + `STATUS=` when the stop begins.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use axum::Router;

use crate::activation::{self, Listener};
use crate::config::Config;
use crate::http::{self, Info};
use crate::metrics::Metrics;
use crate::notify;
use crate::server::{self, Server};
use crate::signals::{Event, Signals};

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
}

/// Takes the sockets and the generation from the environment, cleans the environment, and binds
/// what was not handed over.
///
/// Must run before any thread is started (it changes the environment).
pub fn prepare(config: Config) -> anyhow::Result<Process> {
    let started = SystemTime::now();
    let generation = match std::env::var(GENERATION_ENV) {
        Ok(g) => g.parse::<u64>().ok().filter(|g| *g >= 1).with_context(|| {
            format!("{GENERATION_ENV}={g:?} is not a generation number (1 or more)")
        })?,
        Err(_) => 1,
    };
    // SAFETY: no thread exists yet (see above).
    unsafe { std::env::remove_var(GENERATION_ENV) };
    let activated = activation::take_activated()?;
    let listeners = activation::resolve(&config.listeners, activated)?;
    Ok(Process {
        config,
        listeners,
        generation,
        started,
    })
}

impl Process {
    /// Builds the runtime and serves until stopped. Returns once the drain is over.
    pub fn run(self) -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("baton-worker")
            .build()
            .context("cannot start the async runtime")?;
        runtime.block_on(self.serve())
    }

    async fn serve(self) -> anyhow::Result<()> {
        let mut signals = Signals::install().context("cannot install signal handlers")?;
        tracing::info!(
            event = "start",
            generation = self.generation,
            version = env!("CARGO_PKG_VERSION"),
            config = self.config.source.as_ref().map(|p| p.display().to_string()),
            "baton {} starting: generation {}, pid {}",
            env!("CARGO_PKG_VERSION"),
            self.generation,
            std::process::id()
        );
        let listener_names: Vec<String> = self.listeners.iter().map(|l| l.to_string()).collect();
        let info = Arc::new(Info::current(self.generation, listener_names.clone()));
        let metrics = Arc::new(Metrics::new(self.generation, self.started));
        let app: Router = http::router(info.clone(), metrics.clone(), self.config.root.as_deref());
        for listener in &self.listeners {
            tracing::info!(
                event = "listening",
                generation = self.generation,
                listener = %listener.name,
                address = %listener.socket.local_address(),
                fd = listener.activated_fd,
                "listening on {listener}"
            );
        }
        let settings = server::Settings {
            limits: self.config.limits,
            idle_grace: self.config.shutdown.idle_grace,
            access_log: self.config.access_log,
        };
        let mut server = Server::start(self.listeners, app, metrics, settings)
            .context("cannot serve the listeners")?;

        let status = format!(
            "serving generation {} (pid {}) on {}",
            self.generation,
            info.pid,
            listener_names.join(", ")
        );
        notify::ready(&status);
        tracing::info!(
            event = "ready",
            generation = self.generation,
            listeners = %listener_names.join(", "),
            root = self.config.root.as_ref().map(|r| r.display().to_string()),
            "{status}"
        );
        if let Some(interval) = notify::watchdog_interval() {
            tokio::spawn(watchdog(interval));
        }

        let stop_signal = loop {
            match signals.recv().await {
                Event::Stop(signal) => break signal,
                Event::Upgrade(signal) => {
                    tracing::warn!(
                        event = "upgrade-ignored",
                        "{signal}: upgrades are not available in this build; ignored"
                    )
                }
                Event::ReopenLogs => {
                    tracing::info!(
                        "SIGUSR1: logging goes to stderr or the journal; nothing to reopen"
                    )
                }
            }
        };

        let drain_timeout = self.config.shutdown.drain_timeout;
        notify::stopping(&format!(
            "stopping: draining connections (up to {})",
            humantime::format_duration(drain_timeout)
        ));
        tracing::info!(
            event = "stop",
            generation = self.generation,
            signal = stop_signal,
            open_connections = server.open_connections(),
            "{stop_signal}: stopping; draining connections for up to {}",
            humantime::format_duration(drain_timeout)
        );
        server.stop_accepting().await;
        let report = tokio::select! {
            report = server.drain(drain_timeout) => report,
            signal = next_stop(&mut signals) => {
                tracing::warn!(
                    event = "stop-now",
                    generation = self.generation,
                    open_connections = server.open_connections(),
                    "{signal} again: exiting without finishing the drain"
                );
                std::process::exit(1);
            }
        };
        tracing::info!(
            event = "drained",
            generation = self.generation,
            open_at_start = report.open_at_start,
            forced = report.forced,
            drain_ms = report.duration.as_millis() as u64,
            "drained {} connection(s) in {:?}, {} closed at the deadline; exiting",
            report.open_at_start,
            report.duration,
            report.forced
        );
        Ok(())
    }
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
