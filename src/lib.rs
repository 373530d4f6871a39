//! baton: a systemd-native HTTP service that upgrades itself without dropping a connection.
//!
//! The binary `baton` is a thin wrapper around [`cli::main`]. The process lifecycle (sockets,
//! readiness, the upgrade with its probation and rollback, the drain, the pidfile, daemon mode
//! and the keeper) is the crate [`baton_lifecycle`], which has no HTTP in it; its modules are
//! re-exported here under their old names. This crate adds the HTTP service:
//!
//! | module         | concern                                   | protocol                    |
//! |----------------|-------------------------------------------|-----------------------------|
//! | [`config`]     | defaults, TOML file, flags (each defined once) | TOML                   |
//! | [`service`]    | baton's [`baton_lifecycle::Workload`]: the server over the files |        |
//! | [`server`]     | connections, limits, graceful drain       | HTTP/1.1 (hyper)            |
//! | [`http`]       | the workload: files, `/-/` endpoints      | HTTP                        |
//! | [`metrics`]    | counters and gauges                       | Prometheus text format      |
//! | [`access_log`] | one line per request, off the serving path | combined, JSON, journal    |
//! | [`cli`]        | `baton serve/check/reload/status/stop`    |                             |
//! | [`manual`]     | baton(8) and shell completions            | roff, generated from a `clap::Command` |
//!
//! and from [`baton_lifecycle`]: [`activation`] (sd_listen_fds(3)), [`notify`] (sd_notify(3)),
//! [`fdstore`], [`logging`] (journald), [`signals`], [`upgrade`] (re-exec, socket handoff,
//! commit/rollback), [`control`] (`baton reload/status/stop`), [`daemon`], [`pidfile`],
//! [`keeper`], [`manager`], and [`lifecycle`] (one process from start to exit, the crate's
//! `generation` module).
//!
//! # Serving your own router with the lifecycle
//!
//! Any service gets the same lifecycle from [`baton_lifecycle`] directly: see its docs and
//! its examples (`echo`, a raw TCP server, and `axum`). baton's own serve path is
//! [`baton_lifecycle::generation::Process::run`] with [`service::Service`]:
//!
//! ```no_run
//! use baton::config::Config;
//!
//! fn main() -> anyhow::Result<()> {
//!     let config = Config::load(None, &Default::default())?;
//!     baton::logging::init(&config.log_level, None).map_err(anyhow::Error::msg)?;
//!     // Before any thread: take the sockets systemd passed, or bind the configured ones.
//!     let settings = baton::service::generation_settings(&config);
//!     // SAFETY: no other thread exists yet.
//!     let process = unsafe { baton::lifecycle::prepare(settings, None) }?;
//!     process.run(|info| baton::service::Service::new(&config, info))?;
//!     Ok(())
//! }
//! ```

/// The version baton reports (`baton --version`, `/-/version`, the logs): the crate's, unless
/// the build stamps another one with `BATON_VERSION=...` (packaging/build-deb.sh --version).
pub const VERSION: &str = match option_env!("BATON_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

pub mod access_log;
pub mod cli;
pub mod config;
pub mod http;
pub mod manual;
pub mod metrics;
pub mod server;
pub mod service;
pub mod tls;

// The lifecycle, under the names baton's modules have always had.
pub use baton_lifecycle::generation as lifecycle;
pub use baton_lifecycle::{
    activation, control, daemon, fdstore, keeper, logging, manager, notify, pidfile, signals,
    upgrade,
};
