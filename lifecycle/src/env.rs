//! The inherited-environment contract: who this service is, and the private variables one
//! process hands the next.
//!
//! Everything a process learns from its parent besides its arguments arrives here: the service
//! manager's `LISTEN_*`, `NOTIFY_SOCKET` and `WATCHDOG_*` (read by [`crate::activation`] and
//! [`crate::notify`]), and the library's own variables, which an old generation sets for its
//! successor and the keeper for a generation or for its own re-exec. Those are named
//! `<PREFIX>_<NAME>` ([`Var`]); the prefix is the service's ([`Identity::env_prefix`], `BATON`
//! for baton), so two services built on this crate never read each other's.
//!
//! Private variables are honoured only when [`Var::FOR_PID`] names this very process
//! ([`private_env_trusted`]): a stray value inherited by a plain launch (an operator's shell, a
//! child of a generation) is ignored, and removed by [`init`].
//!
//! This module depends on nothing else of the crate: every other module takes its names, its
//! trust decision and its inherited fds ([`take_fd`]) here.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use std::sync::{LazyLock, OnceLock};

/// Who the service is: its name (the journal's `SYSLOG_IDENTIFIER`, the runtime directory
/// `/run/<name>`, the control socket's name), its version (logs, `status`), and the prefix of
/// its environment variables and journal fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub version: String,
    pub env_prefix: String,
}

impl Identity {
    /// `name` with its version; the prefix is the name in upper case, with `_` for anything but
    /// letters and digits (`my-svc` → `MY_SVC`).
    pub fn new(name: &str, version: &str) -> Identity {
        let env_prefix = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        Identity {
            name: name.to_owned(),
            version: version.to_owned(),
            env_prefix,
        }
    }
}

static IDENTITY: OnceLock<Identity> = OnceLock::new();
static NAMES: OnceLock<Vec<String>> = OnceLock::new();

/// Sets who this process is; the first call wins (returns false if another came first). Made by
/// [`crate::start`] (and by baton's CLI) before anything reads a variable.
pub fn set_identity(identity: Identity) -> bool {
    IDENTITY.set(identity).is_ok()
}

/// Who this process is: as set by [`set_identity`], else baton's own identity.
pub fn identity() -> &'static Identity {
    IDENTITY.get_or_init(|| Identity::new("baton", env!("CARGO_PKG_VERSION")))
}

/// One of the library's private environment variables: `<PREFIX>_<suffix>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Var(usize);

const SUFFIXES: [&str; 13] = [
    "FOR_PID",
    "GENERATION",
    "UPGRADE_FD",
    "UPGRADE_STARTED_USEC",
    "UPGRADES",
    "PIDFILE_FD",
    "KEEPER_PID",
    "RESTARTS",
    "KEEPER_REPORT_FD",
    "KEEPER_STATE",
    "SOCKET_UNITS",
    "STATE_FD",
    "CONNECTIONS_FD",
];

impl Var {
    /// Names the pid that the private variables are meant for, as `LISTEN_PID` does for the
    /// `LISTEN_*` variables.
    pub const FOR_PID: Var = Var(0);
    /// The generation: 1 for a fresh start, +1 per upgrade.
    pub const GENERATION: Var = Var(1);
    /// N's end of the upgrade's handshake channel.
    pub const UPGRADE_FD: Var = Var(2);
    /// CLOCK_MONOTONIC in microseconds when O began the upgrade, so that N measures the handoff.
    pub const UPGRADE_STARTED_USEC: Var = Var(3);
    /// Upgrades counted so far by result, carried from generation to generation.
    pub const UPGRADES: Var = Var(4);
    /// The locked pidfile's open description, handed to the next generation.
    pub const PIDFILE_FD: Var = Var(5);
    /// Set in every generation under a keeper: the keeper's pid.
    pub const KEEPER_PID: Var = Var(6);
    /// Set in every generation under a keeper: restarts so far.
    pub const RESTARTS: Var = Var(7);
    /// A generation started by the keeper reports a failed start on this fd.
    pub const KEEPER_REPORT_FD: Var = Var(8);
    /// The keeper's state across its own re-exec (JSON).
    pub const KEEPER_STATE: Var = Var(9);
    /// The socket units of the passed listeners, `/`-separated, in `LISTEN_FDNAMES` order.
    pub const SOCKET_UNITS: Var = Var(10);
    /// A memfd with the state an old generation hands its successor.
    pub const STATE_FD: Var = Var(11);
    /// N's end of the socket pair on which O passes open connections on ([`crate::handoff`]).
    pub const CONNECTIONS_FD: Var = Var(12);

    /// The variable's name, `<PREFIX>_<suffix>`, for this process's [`identity`].
    pub fn name(self) -> &'static str {
        let names = NAMES.get_or_init(|| {
            let prefix = &identity().env_prefix;
            SUFFIXES.iter().map(|s| format!("{prefix}_{s}")).collect()
        });
        &names[self.0]
    }

    /// The variable's value, if set and valid UTF-8.
    pub fn get(self) -> Option<String> {
        std::env::var(self.name()).ok()
    }

    /// Removes the variable from the environment.
    ///
    /// # Safety
    /// No other thread may exist (it changes the environment; see `std::env::remove_var`).
    pub unsafe fn remove(self) {
        // SAFETY: the caller promises that no other thread exists.
        unsafe { std::env::remove_var(self.name()) }
    }
}

impl AsRef<std::ffi::OsStr> for Var {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.name().as_ref()
    }
}

impl PartialEq<Var> for &str {
    fn eq(&self, var: &Var) -> bool {
        *self == var.name()
    }
}

impl PartialEq<Var> for String {
    fn eq(&self, var: &Var) -> bool {
        self == var.name()
    }
}

impl std::fmt::Display for Var {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The private variables: honoured only when meant for this very process
/// ([`private_env_trusted`]).
pub static PRIVATE_VARS: LazyLock<[&str; 11]> = LazyLock::new(|| {
    [
        Var::UPGRADE_FD.name(),
        Var::STATE_FD.name(),
        Var::CONNECTIONS_FD.name(),
        Var::UPGRADE_STARTED_USEC.name(),
        Var::UPGRADES.name(),
        Var::GENERATION.name(),
        Var::PIDFILE_FD.name(),
        Var::KEEPER_PID.name(),
        Var::RESTARTS.name(),
        Var::KEEPER_REPORT_FD.name(),
        Var::KEEPER_STATE.name(),
    ]
});

/// Variables of an old generation's environment that the new one must not inherit as they are
/// (the upgrade sets its own values).
pub static NOT_INHERITED: LazyLock<[&str; 14]> = LazyLock::new(|| {
    [
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "LISTEN_PIDFDID",
        Var::SOCKET_UNITS.name(),
        "WATCHDOG_PID", // names the old pid; without it the watchdog applies to whoever reads it
        Var::GENERATION.name(),
        Var::UPGRADE_FD.name(),
        Var::UPGRADE_STARTED_USEC.name(),
        Var::UPGRADES.name(),
        Var::STATE_FD.name(),
        Var::CONNECTIONS_FD.name(),
        Var::PIDFILE_FD.name(),
        Var::FOR_PID.name(),
    ]
});

/// The trust decision, and the stray variables [`init`] removed.
static TRUSTED: OnceLock<(bool, Vec<String>)> = OnceLock::new();

/// Whether the private variables ([`PRIVATE_VARS`]) are meant for this process. They are when
/// `<PREFIX>_FOR_PID` is this process's pid; without it (set by builds before it existed) when
/// `LISTEN_PID` is, as an upgrade and the keeper always set it, or, for the keeper's own
/// re-exec, when its state names a child of this process as the main pid.
///
/// Before [`init`] this only reads the environment; after it, it returns [`init`]'s answer.
pub fn private_env_trusted() -> bool {
    match TRUSTED.get() {
        Some((trusted, _)) => *trusted,
        None => decide(),
    }
}

fn decide() -> bool {
    let pid = std::process::id();
    let names_us = |var: &str| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
            == Some(pid)
    };
    match std::env::var_os(Var::FOR_PID) {
        Some(_) => names_us(Var::FOR_PID.name()),
        None => names_us("LISTEN_PID") || legacy_state_is_ours(),
    }
}

/// Decides once whether the private variables are meant for this process
/// ([`private_env_trusted`]), removes `<PREFIX>_FOR_PID`, and removes the private variables
/// when they are not (stray values inherited by a plain launch); [`report_ignored_private_env`]
/// logs them once logging works. Later calls do nothing.
///
/// # Safety
/// Changes the environment: call it before any other thread exists.
pub unsafe fn init() -> bool {
    TRUSTED
        .get_or_init(|| {
            let trusted = decide();
            // SAFETY: the caller promises that no other thread exists.
            unsafe { std::env::remove_var(Var::FOR_PID) };
            let mut ignored = Vec::new();
            if !trusted {
                for var in *PRIVATE_VARS {
                    if let Some(value) = std::env::var_os(var) {
                        ignored.push(format!("{var}={}", value.to_string_lossy()));
                        // SAFETY: as above.
                        unsafe { std::env::remove_var(var) };
                    }
                }
            }
            (trusted, ignored)
        })
        .0
}

/// Whether a keeper state without `<PREFIX>_FOR_PID` (from a keeper binary before it existed)
/// is this process's own: it re-executed itself, so the main generation it names is our child.
fn legacy_state_is_ours() -> bool {
    let Some(main) = std::env::var(Var::KEEPER_STATE)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|state| state["main"][0].as_i64())
    else {
        return false;
    };
    // The parent pid is the fourth field of /proc/PID/stat, after the command in parentheses.
    std::fs::read_to_string(format!("/proc/{main}/stat"))
        .ok()
        .and_then(|stat| {
            let rest = &stat[stat.rfind(')')? + 1..];
            rest.split_whitespace().nth(1)?.parse::<u32>().ok()
        })
        == Some(std::process::id())
}

/// Logs the private variables [`init`] ignored, if any. Call once logging works.
pub fn report_ignored_private_env() {
    if let Some((_, ignored)) = TRUSTED.get() {
        if !ignored.is_empty() {
            tracing::info!(
                event = "private-env-ignored",
                "ignored {} (not meant for this process, pid {}: {} does not name it)",
                ignored.join(" "),
                std::process::id(),
                Var::FOR_PID
            );
        }
    }
}

/// Takes the fd a previous process announced in the private variable `var`, if it is meant for
/// this process: removes the variable, checks that it names an open fd above stdio, and marks
/// it FD_CLOEXEC so that nothing this process starts inherits it.
///
/// # Safety
/// Changes the environment: call it before any other thread exists. The fd must have been
/// handed to this process alone (it becomes an `OwnedFd`).
pub unsafe fn take_fd(var: Var) -> Result<Option<OwnedFd>, EnvError> {
    // SAFETY: the caller promises that no other thread exists.
    let Some(value) = (unsafe { take_value(var) }) else {
        return Ok(None);
    };
    let fd: RawFd = value
        .parse()
        .ok()
        .filter(|&fd| is_open_above_stdio(fd))
        .ok_or_else(|| EnvError::NotAnFd {
            var: var.name().to_owned(),
            value,
        })?;
    // SAFETY: the fd is open and, per the contract, ours alone.
    Ok(Some(unsafe { own_fd(fd) }))
}

/// The value of the private variable `var` if it is meant for this process; removes the
/// variable either way.
///
/// # Safety
/// Changes the environment: call it before any other thread exists.
pub(crate) unsafe fn take_value(var: Var) -> Option<String> {
    // SAFETY: the caller promises that no other thread exists.
    let trusted = unsafe { init() };
    let value = std::env::var(var).ok().filter(|_| trusted);
    // SAFETY: as above.
    unsafe { std::env::remove_var(var) };
    value
}

/// Whether `fd` is an open fd above stdio.
pub(crate) fn is_open_above_stdio(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only asks whether the fd is open.
    fd >= 3 && unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0
}

/// `fd`, owned, and marked FD_CLOEXEC so that nothing this process starts inherits it.
///
/// # Safety
/// `fd` is open and was handed to this process alone.
pub(crate) unsafe fn own_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: per the contract, an open fd that nothing else owns.
    unsafe {
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        OwnedFd::from_raw_fd(fd)
    }
}

/// Why something a previous generation handed over in the environment cannot be taken
/// ([`crate::upgrade::Handshake::take_from_env`], [`crate::upgrade::take_state_from_env`]).
#[derive(Debug)]
#[non_exhaustive]
pub enum EnvError {
    /// The variable does not name an open fd above stderr.
    NotAnFd { var: String, value: String },
    /// The state is larger than [`crate::upgrade::MAX_STATE`] (`max`).
    StateTooLarge { var: String, size: u64, max: usize },
    /// The state could not be read.
    StateUnreadable { var: String, source: io::Error },
}

impl std::fmt::Display for EnvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EnvError::NotAnFd { var, value } => write!(f, "{var}={value:?} is not an open fd"),
            EnvError::StateTooLarge { var, size, max } => write!(
                f,
                "the state handed over in {var} has {size} bytes or more; at most {max} are taken"
            ),
            EnvError::StateUnreadable { var, source } => {
                write!(f, "cannot read the state handed over in {var}: {source}")
            }
        }
    }
}

impl std::error::Error for EnvError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            EnvError::StateUnreadable { source, .. } => Some(source),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_from_name() {
        assert_eq!(Identity::new("my-svc.2", "1").env_prefix, "MY_SVC_2");
        assert_eq!(Identity::new("baton", "1").env_prefix, "BATON");
    }

    #[test]
    fn names_carry_the_prefix() {
        assert_eq!(Var::GENERATION.name(), "BATON_GENERATION");
        assert_eq!(
            Var::UPGRADE_STARTED_USEC.name(),
            "BATON_UPGRADE_STARTED_USEC"
        );
        assert_eq!(Var::KEEPER_STATE.to_string(), "BATON_KEEPER_STATE");
    }
}
