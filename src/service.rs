//! baton's workload for the lifecycle: the HTTP [`Server`] over the static files and the `/-/`
//! endpoints, built once the sockets are taken and served again after a rollback.
//!
//! The lifecycle ([`baton_lifecycle::generation`]) owns everything process-level: the sockets,
//! readiness, the upgrade, probation and rollback, the drain's bookkeeping. This module only
//! tells it how to serve a set of listening sockets.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use baton_lifecycle::activation::Listener;
use baton_lifecycle::generation::{self, StartInfo};
use baton_lifecycle::workload::Workload;

use crate::access_log::AccessLog;
use crate::config::Config;
use crate::http::{App, Info};
use crate::metrics::Metrics;
use crate::server::{self, Server};

/// The static-file server of one generation.
pub struct Service {
    app: App,
    metrics: Arc<Metrics>,
    settings: server::Settings,
}

impl Service {
    /// Opens the root and sets up the metrics for the generation `info` describes.
    pub fn new(config: &Config, info: &StartInfo) -> anyhow::Result<Service> {
        let metrics = Arc::new(Metrics::new(info.generation, info.started));
        metrics.track(info.stats.clone());
        let generation = info.generation;
        let info = Arc::new(Info::current(info.generation, info.listeners.clone()));
        let app = App::new(info, metrics.clone(), &http_settings(config)).with_context(|| {
            let root = config.root.as_deref().map(|r| r.display().to_string());
            format!("cannot open the root {}", root.unwrap_or_default())
        })?;
        let access_log = AccessLog::start(
            &config.access_log,
            config.access_log_format,
            generation,
            metrics.access_log_dropped.clone(),
        )?;
        Ok(Service {
            app,
            metrics,
            settings: server::Settings {
                limits: config.limits,
                idle_grace: config.shutdown.idle_grace,
                access_log,
                http2: config.http2.clone(),
                // Half the drain, so that what a busy HTTP/2 client has not finished by then
                // still has time after its GOAWAY; ten seconds at most.
                http2_busy_grace: (config.shutdown.drain_timeout / 2).min(Duration::from_secs(10)),
                tls: crate::tls::server_configs(config)?,
                workers: config.workers,
            },
        })
    }
}

impl Workload for Service {
    type Serving = Server;

    fn serve(&mut self, listeners: Vec<Listener>) -> std::io::Result<Server> {
        Server::new(
            listeners,
            self.app.clone(),
            self.metrics.clone(),
            self.settings.clone(),
        )
    }

    /// SIGUSR1: the access log file is opened anew, as the event log's is.
    fn reopen_logs(&self) {
        if let Some(log) = &self.settings.access_log {
            log.reopen();
        }
    }

    fn open_connections(&self) -> u64 {
        self.metrics.open_connections.get().max(0) as u64
    }
}

/// What the HTTP service needs of baton's configuration.
pub fn http_settings(config: &Config) -> crate::http::Settings {
    crate::http::Settings {
        root: config.root.clone(),
        compression: config.compression.clone(),
        headers: config.headers.clone(),
        pages: crate::http::pages::Settings {
            not_found_page: config.files.not_found_page.clone(),
            error_page: config.files.error_page.clone(),
            fallback: config.files.fallback.clone(),
            listing: config.files.listing,
        },
        admin: crate::http::admin::Admin {
            endpoints: config.admin.endpoints,
            listener: config.admin.listener.clone(),
            public: config.admin.public.clone(),
        },
    }
}

/// What the lifecycle needs of baton's configuration.
pub fn generation_settings(config: &Config) -> generation::Settings {
    generation::Settings {
        listeners: config.listeners.clone(),
        exec: config.upgrade.exec.clone(),
        upgrade_timeout: config.upgrade.timeout,
        probation: config.upgrade.probation,
        drain_timeout: config.shutdown.drain_timeout,
        config: config.source.clone(),
        signals: Default::default(),
        control_socket: true,
        backlog: baton_lifecycle::activation::DEFAULT_BACKLOG,
    }
}

/// baton, at this build's version ([`crate::VERSION`]).
pub fn identity() -> baton_lifecycle::Identity {
    baton_lifecycle::Identity::new("baton", crate::VERSION)
}

/// The lifecycle's options for `baton serve` with `config` (`--daemon`, `--keeper`).
pub fn options(config: &Config, daemon: bool, keeper: bool) -> baton_lifecycle::Options {
    let settings = generation_settings(config);
    let mut options = baton_lifecycle::Options::new("baton", crate::VERSION)
        .upgrade_timeout(settings.upgrade_timeout)
        .probation(settings.probation)
        .drain_timeout(settings.drain_timeout)
        .daemon(daemon)
        .keeper(keeper)
        .log(&config.log_level, config.log_file.clone())
        .restarts(config.keeper.startsecs, config.keeper.startretries);
    for listener in settings.listeners {
        options = options.listen(listener);
    }
    if let Some(exe) = settings.exec {
        options = options.exec(exe);
    }
    if let Some(path) = &config.pidfile {
        options = options.pidfile(path);
    }
    if let Some(source) = settings.config {
        options = options.config_file(source);
    }
    options
}

/// What the keeper needs of baton's configuration.
pub fn keeper_settings(config: &Config) -> baton_lifecycle::keeper::Settings {
    baton_lifecycle::keeper::Settings {
        exec: config.upgrade.exec.clone(),
        pidfile: config.pidfile.clone(),
        listeners: config.listeners.clone(),
        log_level: config.log_level.clone(),
        log_file: config.log_file.clone(),
        startsecs: config.keeper.startsecs,
        startretries: config.keeper.startretries,
        drain_timeout: config.shutdown.drain_timeout,
        backlog: baton_lifecycle::activation::DEFAULT_BACKLOG,
    }
}
