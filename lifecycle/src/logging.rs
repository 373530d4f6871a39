//! Logging: structured events to the journal under systemd, readable lines elsewhere.
//!
//! systemd connects a service's stderr to the journal and says so in `JOURNAL_STREAM`
//! (`<device>:<inode>` of that stream). When stderr is that very stream, events go to journald
//! natively (tracing-journald), with `SYSLOG_IDENTIFIER=baton`, syslog priorities (INFO is 6)
//! and every event field as a journal field prefixed `BATON_` (`BATON_EVENT`,
//! `BATON_GENERATION`, ...), which `journalctl -o json` shows. Otherwise events are text lines
//! on stderr.
//!
//! Lifecycle events carry an `event` field (`start`, `listening`, `ready`, `stop`, `drained`,
//! ...) so they can be found with `journalctl BATON_EVENT=ready`.
//!
//! With `--log-file PATH` (or `log.file`) the text lines are appended to that file instead;
//! [`reopen`] (on SIGUSR1) opens the path anew, so that logrotate's `create` mode works, and
//! appending keeps `copytruncate` working too.
//!
//! The level comes from `RUST_LOG` when set, else from `--log-level` / `log.level`.

use std::fs::File;
use std::io::{self, IsTerminal, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Where the events went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Journal,
    Stderr,
    File,
}

/// The log file, when logging goes to one.
struct LogFile {
    path: PathBuf,
    file: Mutex<File>,
}

static LOG_FILE: OnceLock<LogFile> = OnceLock::new();

/// The writer tracing uses for the log file: a short lock per event.
struct LogFileWriter;

struct LogFileGuard(MutexGuard<'static, File>);

impl Write for LogFileGuard {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogFileWriter {
    type Writer = LogFileGuard;
    fn make_writer(&'a self) -> LogFileGuard {
        let log = LOG_FILE.get().expect("log file set before the subscriber");
        LogFileGuard(log.file.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Opens the log file anew by its path (after logrotate moved it away). Returns false when
/// logging does not go to a file. stderr follows when it pointed at the old file (a daemon's
/// does), so that anything written there lands in the new file too.
pub fn reopen() -> io::Result<bool> {
    let Some(log) = LOG_FILE.get() else {
        return Ok(false);
    };
    let new = crate::daemon::open_log(&log.path)?;
    let mut current = log.file.lock().unwrap_or_else(|e| e.into_inner());
    let same = |a: &File| -> bool {
        match (
            nix::sys::stat::fstat(a.as_fd()),
            nix::sys::stat::fstat(io::stderr().as_fd()),
        ) {
            (Ok(x), Ok(y)) => x.st_dev == y.st_dev && x.st_ino == y.st_ino,
            _ => false,
        }
    };
    if same(&current) {
        // SAFETY: dup2 onto stderr.
        unsafe { libc::dup2(new.as_raw_fd(), 2) };
    }
    *current = new;
    Ok(true)
}

/// Whether stderr is connected to the journal (`JOURNAL_STREAM` names stderr's device and
/// inode, as systemd.exec(5) specifies).
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(io::stderr().as_fd()) else {
        return false;
    };
    dev.parse() == Ok(stat.st_dev) && ino.parse() == Ok(stat.st_ino)
}

/// The filter: `RUST_LOG` if set, else `level`.
pub fn filter(level: &str) -> Result<EnvFilter, String> {
    match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => EnvFilter::try_new(&directives)
            .map_err(|e| format!("RUST_LOG={directives:?} is not a valid filter: {e}")),
        _ => EnvFilter::try_new(level).map_err(|e| {
            format!("log level {level:?} is not valid ({e}); use error, warn, info, debug or trace")
        }),
    }
}

/// Installs the global subscriber. Call once, early. With `log_file`, events go there.
pub fn init(level: &str, log_file: Option<&Path>) -> Result<Destination, String> {
    let filter = filter(level)?;
    if let Some(path) = log_file {
        let file = crate::daemon::open_log(path).map_err(|e| e.to_string())?;
        let _ = LOG_FILE.set(LogFile {
            path: path.to_owned(),
            file: Mutex::new(file),
        });
        tracing_subscriber::registry()
            .with(filter)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(LogFileWriter)
                    .with_ansi(false)
                    .with_target(false),
            )
            .try_init()
            .map_err(|e| e.to_string())?;
        return Ok(Destination::File);
    }
    if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer
                    .with_syslog_identifier(crate::env::identity().name.clone())
                    .with_field_prefix(Some(crate::env::identity().env_prefix.clone()))
                    .with_priority_mappings(tracing_journald::PriorityMappings {
                        info: tracing_journald::Priority::Informational,
                        debug: tracing_journald::Priority::Debug,
                        ..tracing_journald::PriorityMappings::new()
                    });
                tracing_subscriber::registry()
                    .with(filter)
                    .with(layer)
                    .try_init()
                    .map_err(|e| e.to_string())?;
                return Ok(Destination::Journal);
            }
            // No journald socket (e.g. a container without journald): fall back to stderr,
            // which the journal stream still captures as plain text.
            Err(e) => eprintln!(
                "{}: journald is not reachable ({e}); logging to stderr",
                crate::env::identity().name
            ),
        }
    }
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(io::stderr)
                .with_ansi(io::stderr().is_terminal())
                .with_target(false),
        )
        .try_init()
        .map_err(|e| e.to_string())?;
    Ok(Destination::Stderr)
}
