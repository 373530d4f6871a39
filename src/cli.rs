//! The command line: `baton serve`, `baton check`, and the definitions the man page and shell
//! completions are generated from.
//!
//! Exit codes: 0 success; 1 failure (bad configuration, sockets, runtime errors, a failed
//! upgrade), with a one-line message per problem on stderr; 2 bad command-line usage; 3 (`baton
//! status`) not running; 4 (`baton status`) this user may not ask (LSB: status unknown), with the
//! reason on stderr.

// The doc comments of the argument structs are clap's `--help` text, where `[IPv6]` and
// `[default: ...]` are meant literally, not as intra-doc links.
#![allow(rustdoc::broken_intra_doc_links)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::config::{parse_duration, Config, Settings, DEFAULT_CONFIG_PATH};
use crate::control::{Client, ClientError, ProcessHandle};
use crate::logging::Destination;
use crate::pidfile::Probe;

/// `baton status` when nothing runs (LSB).
pub const EXIT_NOT_RUNNING: u8 = 3;
/// `baton status` when this user may not ask (LSB: "program or service status is unknown").
pub const EXIT_NOT_ALLOWED: u8 = 4;

/// A static-file HTTP server that upgrades itself without dropping a connection.
///
/// baton takes its listening sockets from systemd (socket activation) or binds them itself,
/// reports readiness with sd_notify, logs to the journal, and stops gracefully: on SIGTERM it
/// stops accepting, lets in-flight requests finish and exits 0.
#[derive(Debug, Parser)]
#[command(
    name = "baton",
    version = crate::VERSION,
    propagate_version = true,
    max_term_width = 100,
    disable_help_subcommand = true
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
    Serve(Box<ServeArgs>),
    /// Check a configuration file and print every problem in it.
    ///
    /// Exits 0 when the configuration is valid, 1 otherwise.
    Check(CheckArgs),
    /// Upgrade a running baton with zero downtime and wait for the outcome.
    ///
    /// The process starts its executable anew (a replaced binary runs the new code; the new
    /// process reads the configuration afresh), hands it the listening sockets, and drains once
    /// the new process serves. Exits 0 and prints the new pid and generation once it serves;
    /// exits 1 with the reason when the upgrade failed or timed out, in which case the old
    /// process goes on serving. This is what baton.service runs as ExecReload=.
    Reload(ReloadArgs),
    /// Show a running baton's pid, generation, uptime and listeners.
    ///
    /// Exits 0 when it runs, 3 when it does not, 4 when this user may not ask (as LSB init
    /// scripts do), 1 on other errors.
    Status(TargetArgs),
    /// Stop a running baton gracefully and wait until it has exited.
    ///
    /// Exits 0 once the process has exited, 1 when it did not within the timeout.
    Stop(StopArgs),
    /// Print the help of baton or of one of its commands.
    Help(HelpArgs),
    /// Write the man page and shell completions (used to build the package).
    #[command(hide = true)]
    Generate(GenerateArgs),
}

/// The commands `baton help COMMAND` knows: every one but the hidden `generate`.
pub const COMMANDS: [&str; 6] = ["serve", "check", "reload", "status", "stop", "help"];

// clap's own help command takes no --help (`baton help --help` is an error) and offers the
// hidden commands; this one is an ordinary command.
#[derive(Debug, Args)]
pub struct HelpArgs {
    /// The command to show the help of
    #[arg(value_name = "COMMAND", value_parser = clap::builder::PossibleValuesParser::new(COMMANDS))]
    pub command: Option<String>,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Directory to write baton.8, baton.bash, _baton and baton.fish into
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// Which running baton to address. Without any of these: the default pidfile's baton (a
/// daemon), else the main process of `baton.service` (systemd).
#[derive(Debug, Args, Clone)]
pub struct TargetArgs {
    /// The pid of the baton process (e.g. $MAINPID under systemd)
    #[arg(long, value_name = "PID", conflicts_with_all = ["pidfile", "unit"])]
    pub pid: Option<u32>,

    /// The pidfile of the baton process; its pid counts only while the file is locked
    /// [default: /run/baton/baton.pid for root, $XDG_RUNTIME_DIR/baton/baton.pid otherwise]
    #[arg(long, value_name = "PATH", conflicts_with = "unit")]
    pub pidfile: Option<PathBuf>,

    /// The systemd unit whose main process to address [default, when the default pidfile is not held: baton.service]
    #[arg(long, value_name = "NAME")]
    pub unit: Option<String>,
}

/// The unit the commands address when nothing else is named and no daemon holds the default
/// pidfile.
pub const DEFAULT_UNIT: &str = "baton.service";

/// Why a target could not be found.
enum TargetError {
    NotRunning(String),
    Refused(String),
    Failed(String),
}

impl TargetArgs {
    /// The pid to address: given; the main pid of a systemd unit; or read from a pidfile whose
    /// lock is held. With nothing named, the default pidfile, then `baton.service`.
    fn resolve(&self) -> Result<u32, TargetError> {
        if let Some(pid) = self.pid {
            return Ok(pid);
        }
        if let Some(unit) = &self.unit {
            return match unit_main_pid(unit) {
                Ok(Some(pid)) => Ok(pid),
                Ok(None) => Err(TargetError::NotRunning(format!(
                    "{unit} has no main process"
                ))),
                Err(e) => Err(TargetError::Failed(e)),
            };
        }
        let from_pidfile = self.pid_in_pidfile();
        if self.pidfile.is_some() {
            return from_pidfile;
        }
        match from_pidfile {
            Err(TargetError::NotRunning(why)) => match unit_main_pid(DEFAULT_UNIT) {
                Ok(Some(pid)) => Ok(pid),
                // No systemd, or the unit does not run: the pidfile's story is the one to tell.
                _ => Err(TargetError::NotRunning(format!(
                    "{why}, and {DEFAULT_UNIT} has no main process (--unit NAME for another unit)"
                ))),
            },
            other => other,
        }
    }

    fn pid_in_pidfile(&self) -> Result<u32, TargetError> {
        let path = self
            .pidfile
            .clone()
            .unwrap_or_else(crate::pidfile::default_path);
        match crate::pidfile::probe(&path) {
            Ok(Probe::Running(pid)) => Ok(pid),
            Ok(Probe::Starting) => Err(TargetError::Failed(format!(
                "pidfile {} is locked but names no pid yet: baton is starting; try again",
                path.display()
            ))),
            Ok(Probe::NotRunning {
                stale_pid: Some(pid),
            }) => Err(TargetError::NotRunning(format!(
                "no baton holds pidfile {} (it names pid {pid}, which is not baton's)",
                path.display()
            ))),
            Ok(Probe::NotRunning { stale_pid: None }) => Err(TargetError::NotRunning(format!(
                "no baton holds pidfile {}",
                path.display()
            ))),
            Err(e) if e.is_permission_denied() => Err(TargetError::Refused(e.to_string())),
            Err(e) => Err(TargetError::Failed(e.to_string())),
        }
    }
}

#[derive(Debug, Args)]
pub struct ReloadArgs {
    #[command(flatten)]
    pub target: TargetArgs,

    /// Give up waiting after this long
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "90s")]
    pub timeout: Duration,

    /// Wait for the end of the probation (upgrade.probation) too, and fail if the new process exited within it and the old one took over again
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    #[command(flatten)]
    pub target: TargetArgs,

    /// Give up waiting after this long; the drain itself is bounded by shutdown.drain_timeout
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "60s")]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The directory to serve, as with --root DIR [default: the embedded page, or server.root]
    #[arg(value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// Configuration file [default: /etc/baton/baton.toml when it exists, else built-in defaults]
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Run in the background (daemon(7)) under a keeper; returns once the first generation
    /// serves, or fails with its error
    #[arg(long)]
    pub daemon: bool,

    /// Run in the foreground under a keeper: a small process that holds the sockets and the
    /// pidfile, restarts a generation that crashes, and outlives upgrades (implied by --daemon
    /// and when baton is PID 1; never under systemd, i.e. with NOTIFY_SOCKET set)
    #[arg(long)]
    pub keeper: bool,

    /// The flags that are settings of the file too, section by section.
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Configuration file [default: /etc/baton/baton.toml]
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Also compare with the running baton (when one is found): warn about listeners whose
    /// socket comes from a socket unit, which a reload cannot change
    #[command(flatten)]
    pub target: TargetArgs,
}

impl ServeArgs {
    /// The directory to serve from the command line: DIR or --root, never both.
    fn root(&self) -> Result<Option<PathBuf>, String> {
        match (&self.dir, &self.settings.server.root) {
            (Some(dir), Some(root)) => Err(format!(
                "serve: DIR ({}) and --root ({}) both name the directory to serve; give only one",
                dir.display(),
                root.display()
            )),
            (dir, root) => Ok(dir.clone().or_else(|| root.clone())),
        }
    }

    /// The settings the flags give, with DIR as --root.
    fn flags(&self) -> Result<Settings, String> {
        let mut settings = self.settings.clone();
        settings.server.root = self.root()?;
        Ok(settings)
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
    baton_lifecycle::env::set_identity(crate::service::identity());
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Check(args) => check(args),
        Command::Reload(args) => reload(args),
        Command::Status(args) => status(args),
        Command::Stop(args) => stop(args),
        Command::Help(args) => help(args.command.as_deref()),
        Command::Generate(args) => match crate::manual::generate(&Cli::command(), &args.out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => report(format!("cannot write into {}: {e}", args.out.display())),
        },
    }
}

/// `baton help [COMMAND]`: the long help, as `--help` prints it.
fn help(command: Option<&str>) -> ExitCode {
    let mut cli = Cli::command();
    cli.build();
    let target = match command {
        Some(name) => match cli.find_subcommand_mut(name) {
            Some(sub) => sub,
            None => return report(format!("no command {name}")),
        },
        None => &mut cli,
    };
    match target.print_long_help() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(format!("cannot print the help: {e}")),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    // Bad usage, as clap reports it: exit 2, before anything else happens.
    let flags = match args.flags() {
        Ok(flags) => flags,
        Err(e) => {
            report(e);
            return ExitCode::from(2);
        }
    };
    let mut loaded = None;
    let configure = || {
        let config = Config::load(args.config.as_deref(), &flags).map_err(|e| e.to_string())?;
        if args.daemon {
            check_daemon_paths(&args, &config)?;
        }
        let options = crate::service::options(&config, args.daemon, args.keeper);
        loaded = Some(config);
        Ok(options)
    };
    // SAFETY: the CLI runs single-threaded until here; nothing has started a thread.
    let started = unsafe { baton_lifecycle::start_with(crate::service::identity(), configure) };
    let (lifecycle, config) = match (started, loaded) {
        (Ok(lifecycle), Some(config)) => (lifecycle, config),
        (Err(e), _) => return report(e),
        (Ok(_), None) => return report("the configuration was not loaded; this is a bug"),
    };
    let destination = lifecycle.log_destination();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("baton-worker")
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            let message = format!("cannot start the async runtime: {e}");
            lifecycle.abandon(&message);
            return report(message);
        }
    };
    let served =
        runtime.block_on(lifecycle.run(|info| crate::service::Service::new(&config, info)));
    match served {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => match destination {
            // One line per failure: a structured event in the journal or the log file, or a
            // plain line on stderr.
            Some(Destination::Journal | Destination::File) => {
                tracing::error!(event = "failed", "{e}");
                ExitCode::FAILURE
            }
            _ => report(e),
        },
    }
}

/// A daemon runs in /, and so does every later generation, which reads the same arguments:
/// relative paths would name other files there.
fn check_daemon_paths(args: &ServeArgs, config: &Config) -> Result<(), String> {
    let relative = [
        ("--config", args.config.as_deref()),
        ("server.root (--root or DIR)", config.root.as_deref()),
    ]
    .into_iter()
    .find_map(|(what, path)| {
        path.filter(|p| p.is_relative())
            .map(|p| (what, p.to_owned()))
    });
    match relative {
        Some((what, path)) => Err(format!(
            "{what} {} is a relative path, but a daemon runs in /: give the full path",
            path.display()
        )),
        None => Ok(()),
    }
}

/// `baton reload`: asks the process for an upgrade over its control socket and waits.
fn reload(args: ReloadArgs) -> ExitCode {
    let pid = match args.target.resolve() {
        Ok(pid) => pid,
        Err(TargetError::NotRunning(m) | TargetError::Refused(m) | TargetError::Failed(m)) => {
            return report(m)
        }
    };
    let request = if args.wait { "upgrade wait" } else { "upgrade" };
    let answer = Client::connect(pid).and_then(|mut c| c.request(request, args.timeout));
    match answer {
        Ok(v) if v["ok"] == true => {
            for warning in v["warnings"].as_array().into_iter().flatten() {
                if let Some(warning) = warning.as_str() {
                    eprintln!("baton: warning: {warning}");
                }
            }
            let probation = Duration::from_millis(v["probation_ms"].as_u64().unwrap_or(0));
            let verdict = match (v["promoted"] == true, probation.is_zero()) {
                (true, true) => String::new(),
                (true, false) => format!(
                    "; it passed its probation of {}",
                    humantime::format_duration(probation)
                ),
                (false, _) => format!(
                    "; on probation for {}: pid {pid} takes over again if it exits (--wait waits for the verdict)",
                    humantime::format_duration(probation)
                ),
            };
            // A reload that ended a probation early upgrades the generation that was on it.
            let from = match v["from"].as_u64() {
                Some(from) => format!("{from} (the successor of pid {pid})"),
                None => pid.to_string(),
            };
            println!(
                "baton: upgraded pid {from} to generation {} (pid {}) in {} ms{verdict}",
                v["generation"], v["pid"], v["took_ms"]
            );
            ExitCode::SUCCESS
        }
        Ok(v) => report(format!(
            "upgrade of pid {} failed: {}; the old process keeps serving",
            v["from"].as_u64().unwrap_or(u64::from(pid)),
            v["error"].as_str().unwrap_or("unknown error")
        )),
        Err(e) => report(e),
    }
}

/// `baton status`.
fn status(args: TargetArgs) -> ExitCode {
    let pid = match args.resolve() {
        Ok(pid) => pid,
        Err(TargetError::NotRunning(m)) => {
            println!("baton is not running: {m}");
            return ExitCode::from(EXIT_NOT_RUNNING);
        }
        Err(TargetError::Refused(m)) => {
            report(m);
            return ExitCode::from(EXIT_NOT_ALLOWED);
        }
        Err(TargetError::Failed(m)) => return report(m),
    };
    match Client::connect(pid).and_then(|mut c| c.request("status", Duration::from_secs(10))) {
        Ok(v) => {
            let listeners: Vec<&str> = v["listeners"]
                .as_array()
                .map(|a| a.iter().filter_map(|l| l.as_str()).collect())
                .unwrap_or_default();
            let keeper = match v["keeper_pid"].as_u64() {
                Some(k) => format!("; keeper pid {k}, {} restart(s)", v["restarts"]),
                None => String::new(),
            };
            let successor = match v["successor"]["pid"].as_u64() {
                Some(s) => format!(
                    "; generation {} (pid {s}) serves on probation",
                    v["successor"]["generation"]
                ),
                None => String::new(),
            };
            println!(
                "baton {} is {}: pid {}, generation {}, up {} (since {}), listening on {}{successor}{keeper}",
                v["version"].as_str().unwrap_or("?"),
                v["state"].as_str().unwrap_or("?"),
                v["pid"],
                v["generation"],
                humantime::format_duration(Duration::from_secs(
                    v["uptime_secs"].as_u64().unwrap_or(0)
                )),
                v["started"].as_str().unwrap_or("?"),
                listeners.join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(ClientError::NotRunning(m)) => {
            println!("baton is not running: {m}");
            ExitCode::from(EXIT_NOT_RUNNING)
        }
        Err(ClientError::Refused(m)) => {
            report(m);
            ExitCode::from(EXIT_NOT_ALLOWED)
        }
        Err(e) => report(e),
    }
}

/// `baton stop`: asks for a graceful stop and waits for the process to be gone.
fn stop(args: StopArgs) -> ExitCode {
    let pid = match args.target.resolve() {
        Ok(pid) => pid,
        Err(TargetError::NotRunning(m) | TargetError::Refused(m) | TargetError::Failed(m)) => {
            return report(m)
        }
    };
    let result = Client::connect(pid).and_then(|mut client| {
        // Opened before the request, so that a recycled pid cannot fool the wait.
        let handle = ProcessHandle::open(pid)
            .map_err(|e| ClientError::Failed(format!("cannot watch pid {pid}: {e}")))?;
        let answer = client.request("stop", Duration::from_secs(10))?;
        if answer["ok"] != true {
            return Err(ClientError::Failed(format!(
                "pid {pid} refused to stop: {}",
                answer["error"]
            )));
        }
        let deadline = std::time::Instant::now() + args.timeout;
        let waited = handle.wait_exit(args.timeout).and_then(|gone| {
            // Under a keeper the service is gone only once the keeper is (it removes the
            // pidfile and releases its lock last): a new start may follow at once.
            match answer["keeper_pid"].as_u64() {
                Some(keeper) if gone => match ProcessHandle::open(keeper as u32) {
                    Ok(k) => {
                        k.wait_exit(deadline.saturating_duration_since(std::time::Instant::now()))
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(true),
                    Err(e) => Err(e),
                },
                _ => Ok(gone),
            }
        });
        match waited {
            Ok(true) => Ok(()),
            Ok(false) => Err(ClientError::Failed(format!(
                "pid {pid} is still draining after {}; it will exit at its drain deadline",
                humantime::format_duration(args.timeout)
            ))),
            Err(e) => Err(ClientError::Failed(format!(
                "cannot wait for pid {pid}: {e}"
            ))),
        }
    });
    match result {
        Ok(()) => {
            println!("baton: pid {pid} stopped");
            ExitCode::SUCCESS
        }
        Err(e) => report(e),
    }
}

fn check(args: CheckArgs) -> ExitCode {
    let path = args.config.as_deref();
    match Config::load(path, &Settings::default()) {
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
            check_against_running(&args.target, &config)
        }
        Err(errors) => report(errors),
    }
}

/// What the configuration means for the running baton's sockets at the next reload: a socket
/// unit's socket cannot change (a warning), nor be dropped (an error). Nothing is said when no
/// baton runs, unless one was named.
fn check_against_running(target: &TargetArgs, config: &Config) -> ExitCode {
    let named = target.pid.is_some() || target.pidfile.is_some();
    let status = match target.resolve() {
        Ok(pid) => Client::connect(pid)
            .and_then(|mut c| c.request("status", Duration::from_secs(10)))
            .map_err(|e| e.to_string()),
        Err(TargetError::NotRunning(m) | TargetError::Refused(m) | TargetError::Failed(m)) => {
            Err(m)
        }
    };
    let status = match status {
        Ok(status) => status,
        Err(m) if named => {
            eprintln!("baton: warning: cannot compare with the running baton: {m}");
            return ExitCode::SUCCESS;
        }
        Err(_) => return ExitCode::SUCCESS,
    };
    let sockets = status["sockets"].as_array().cloned().unwrap_or_default();
    let (warnings, errors) = crate::activation::compare_with_running(&config.listeners, &sockets);
    for warning in warnings {
        eprintln!("baton: warning: {warning}");
    }
    if errors.is_empty() {
        return ExitCode::SUCCESS;
    }
    for error in errors {
        eprintln!("baton: {error}");
    }
    ExitCode::FAILURE
}

/// The main pid of a systemd unit, as `systemctl show` reports it; `None` when the unit has
/// none (not running) or there is no systemd to ask.
fn unit_main_pid(unit: &str) -> Result<Option<u32>, String> {
    let out = match std::process::Command::new("systemctl")
        .args(["show", "--property=MainPID", "--value", "--", unit])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
    {
        Ok(out) => out,
        // No systemctl: no systemd.
        Err(_) => return Ok(None),
    };
    if !out.status.success() {
        // Not booted with systemd, or no such unit.
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    match text.trim().parse::<u32>() {
        Ok(0) => Ok(None),
        Ok(pid) => Ok(Some(pid)),
        Err(_) => Err(format!(
            "systemctl show {unit} said {:?} for MainPID; expected a pid",
            text.trim()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KEYS;
    use crate::manual::{files, public_command, render, GENERATED_DIR, REGENERATE};

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    fn page() -> String {
        let mut page = Vec::new();
        render(&Cli::command(), &mut page).unwrap();
        String::from_utf8(page).unwrap()
    }

    #[test]
    fn committed_files_are_fresh() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(GENERATED_DIR);
        let files = files(&Cli::command()).unwrap();
        for (name, contents) in &files {
            let committed = std::fs::read(dir.join(name)).unwrap_or_default();
            assert!(
                committed == *contents,
                "{GENERATED_DIR}/{name} is stale: regenerate it with `{REGENERATE}`"
            );
        }
        let mut present: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        present.retain(|p| !files.iter().any(|(name, _)| name == p));
        assert!(
            present.is_empty(),
            "{GENERATED_DIR} holds files baton generate does not write: {present:?}"
        );
    }

    #[test]
    fn the_page_lists_every_key_and_has_examples() {
        let page = page();
        let configuration = page
            .split("\n.SH CONFIGURATION\n")
            .nth(1)
            .expect("a CONFIGURATION section");
        let configuration = configuration.split("\n.SH ").next().unwrap();
        for key in KEYS {
            let term = format!("\\fB{}\\fR", key.path());
            assert!(
                configuration.contains(&term),
                "{} is missing: {configuration}",
                key.path()
            );
        }
        assert!(page.contains("\n.SH EXAMPLES\n"));
        assert!(page.contains("baton serve ."));
        assert!(
            !page.contains("generate"),
            "the hidden command is in the page"
        );
    }

    #[test]
    fn completions_offer_no_hidden_command() {
        for (name, contents) in files(&Cli::command()).unwrap().iter().skip(1) {
            let text = String::from_utf8_lossy(contents);
            assert!(
                !text.contains("generate"),
                "{name} offers the hidden generate command"
            );
            for visible in COMMANDS {
                assert!(text.contains(visible), "{name} lacks {visible}");
            }
            // fish writes `-l root`, the others `--root`.
            assert!(text.contains("root") && text.contains("timeout"), "{name}");
        }
    }

    #[test]
    fn the_public_command_is_the_full_one_without_hidden_commands() {
        let public = public_command(&Cli::command());
        public.clone().debug_assert();
        let full = Cli::command();
        let visible: Vec<_> = full
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(|s| s.get_name())
            .collect();
        let names: Vec<_> = public.get_subcommands().map(|s| s.get_name()).collect();
        assert_eq!(names, visible);
        assert_eq!(names, COMMANDS, "COMMANDS lists the commands");
    }
}
