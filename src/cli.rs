//! The command line: `baton serve`, `baton check`, and the definitions the man page and shell
//! completions are generated from.
//!
//! Exit codes: 0 success; 1 failure (bad configuration, sockets, runtime errors), with a
//! one-line message per problem on stderr; 2 bad command-line usage.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, ListenSpec, Overrides, DEFAULT_CONFIG_PATH};
use crate::logging::Destination;

/// A static-file HTTP server that upgrades itself without dropping a connection.
///
/// baton takes its listening sockets from systemd (socket activation) or binds them itself,
/// reports readiness with sd_notify, logs to the journal, and stops gracefully: on SIGTERM it
/// stops accepting, lets in-flight requests finish and exits 0.
#[derive(Debug, Parser)]
#[command(
    name = "baton",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve HTTP until stopped.
    ///
    /// Listens on the sockets passed by systemd (LISTEN_FDS, matched by FileDescriptorName=) or
    /// binds the configured addresses. Signals: SIGTERM/SIGINT stop gracefully (a second one
    /// exits at once); SIGUSR1 reopens the log file.
    Serve(ServeArgs),
    /// Check a configuration file and print every problem in it.
    ///
    /// Exits 0 when the configuration is valid, 1 otherwise.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file [default: /etc/baton/baton.toml when it exists, else built-in defaults]
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Listen on ADDR (IP:PORT, [IPv6]:PORT or unix:/path) under NAME [default name: http];
    /// repeatable; replaces server.listen
    #[arg(long = "listen", value_name = "[NAME=]ADDR")]
    pub listen: Vec<ListenSpec>,

    /// Serve static files from DIR instead of the embedded page
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,

    /// Log one line per request
    #[arg(long)]
    pub access_log: bool,

    /// How long in-flight requests may take to finish on stop [default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub drain_timeout: Option<Duration>,

    /// Time a client has to send a complete request head [default: 10s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub header_read_timeout: Option<Duration>,

    /// Close keep-alive connections idle for this long [default: 60s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,

    /// Most client connections open at once; more wait in the listen backlog [default: 10000]
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,

    /// Log level or filter (error, warn, info, debug, trace); RUST_LOG wins [default: info]
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Configuration file [default: /etc/baton/baton.toml]
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e}; write a duration like 30s, 500ms or 2m"))
}

impl ServeArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            listeners: self.listen.clone(),
            root: self.root.clone(),
            access_log: self.access_log.then_some(true),
            max_connections: self.max_connections,
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            drain_timeout: self.drain_timeout,
            log_level: self.log_level.clone(),
            ..Overrides::default()
        }
    }
}

/// Prints one line per problem, prefixed with the program name.
fn report(error: impl std::fmt::Display) -> ExitCode {
    for line in error.to_string().lines() {
        eprintln!("baton: {line}");
    }
    ExitCode::FAILURE
}

/// Runs the command line; `main` is only this.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Check(args) => check(args),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let config = match Config::load(args.config.as_deref(), &args.overrides()) {
        Ok(config) => config,
        Err(errors) => return report(errors),
    };
    let destination = match crate::logging::init(&config.log_level) {
        Ok(destination) => destination,
        Err(e) => return report(e),
    };
    // One line per failure: a structured event in the journal, or a plain line on stderr.
    let fail = |e: anyhow::Error| match destination {
        Destination::Journal => {
            tracing::error!(event = "failed", "{e:#}");
            ExitCode::FAILURE
        }
        Destination::Stderr => report(format!("{e:#}")),
    };
    match crate::lifecycle::prepare(config) {
        Ok(process) => match process.run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        },
        Err(e) => fail(e),
    }
}

fn check(args: CheckArgs) -> ExitCode {
    let path = args.config.as_deref();
    match Config::load(path, &Overrides::default()) {
        Ok(config) => {
            let source = match &config.source {
                Some(p) => p.display().to_string(),
                None => format!("built-in defaults ({DEFAULT_CONFIG_PATH} does not exist)"),
            };
            let listeners: Vec<String> = config.listeners.iter().map(|l| l.to_string()).collect();
            println!(
                "config OK: {source}: listen {}; root {}",
                listeners.join(", "),
                config
                    .root
                    .as_ref()
                    .map_or("(embedded page)".to_owned(), |r| r.display().to_string())
            );
            ExitCode::SUCCESS
        }
        Err(errors) => report(errors),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
