//! baton: a systemd-native HTTP service that upgrades itself without dropping a connection.
//!
//! The binary `baton` is a thin wrapper around [`cli::main`]; everything it does is here, one
//! module per concern of a service's life:
//!
//! | module         | concern                                   | protocol                    |
//! |----------------|-------------------------------------------|-----------------------------|
//! | [`config`]     | defaults, TOML file, flags                | TOML                        |
//! | [`activation`] | listening sockets, handed over or bound   | sd_listen_fds(3)            |
//! | [`notify`]     | readiness, status, stop, watchdog         | sd_notify(3)                |
//! | [`fdstore`]    | self-bound listeners kept across a crash  | sd_notify(3) `FDSTORE=1`    |
//! | [`logging`]    | journal or text                           | journald native protocol    |
//! | [`signals`]    | SIGTERM/SIGINT, SIGUSR2/SIGHUP, SIGUSR1   | POSIX signals               |
//! | [`server`]     | connections, limits, graceful drain       | HTTP/1.1 (hyper)            |
//! | [`http`]       | the workload: files, `/-/` endpoints      | HTTP                        |
//! | [`metrics`]    | counters and gauges                       | Prometheus text format      |
//! | [`upgrade`]    | re-exec, socket handoff, commit/rollback  | LISTEN_FDS + MAINPID + a handshake |
//! | [`control`]    | `baton reload/status/stop` to a process   | JSON lines on a unix socket in the runtime directory |
//! | [`daemon`]     | running in the background without systemd | daemon(7)                   |
//! | [`pidfile`]    | single instance, the daemon's address     | flock(2) on a pidfile       |
//! | [`keeper`]     | without systemd: sockets, restarts, PID 1 | sd_notify (receiving side) + LISTEN_FDS |
//! | [`manager`]    | the keeper's NOTIFY_SOCKET                | sd_notify(3), SCM_CREDENTIALS |
//! | [`lifecycle`]  | one process from start to exit            |                             |
//! | [`cli`]        | `baton serve/check/reload/status/stop`    |                             |
//! | [`manual`]     | baton(8) and shell completions            | roff, generated from [`cli`] |
//!
//! Everything process-level (reading `LISTEN_*`, binding) happens in plain synchronous code
//! before the tokio runtime or any thread exists; see [`lifecycle::prepare`].
//!
//! # Serving your own router with baton's lifecycle
//!
//! ```no_run
//! use baton::config::Config;
//!
//! fn main() -> anyhow::Result<()> {
//!     let config = Config::load(None, &Default::default())?;
//!     baton::logging::init(&config.log_level, None).map_err(anyhow::Error::msg)?;
//!     // Before any thread: take the sockets systemd passed, or bind the configured ones.
//!     let process = baton::lifecycle::prepare(config, None)?;
//!     process.run()
//! }
//! ```

/// The version baton reports (`baton --version`, `/-/version`, the logs): the crate's, unless
/// the build stamps another one with `BATON_VERSION=...` (packaging/build-deb.sh --version).
pub const VERSION: &str = match option_env!("BATON_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

pub mod cli;
pub mod config;
pub mod http;
pub mod manual;
pub mod metrics;
pub mod server;
pub mod service;

// The lifecycle, under the names baton's modules have always had.
pub use baton_lifecycle::generation as lifecycle;
pub use baton_lifecycle::{
    activation, control, daemon, fdstore, keeper, logging, manager, notify, pidfile, signals,
    upgrade,
};
