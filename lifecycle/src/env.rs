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
//! ([`crate::upgrade::private_env_trusted`]): a stray value inherited by a plain launch (an
//! operator's shell, a child of a generation) is ignored and removed.
//!
//! This module depends on nothing else of the crate: every other module takes its names here.

use std::sync::OnceLock;

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

const SUFFIXES: [&str; 12] = [
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
