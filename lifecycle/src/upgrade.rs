//! Zero-downtime upgrade: the old process (O) starts the new binary (N), hands it the very same
//! listening sockets, lets it serve on probation, and only then makes it the unit's main pid;
//! if N dies on probation, O takes the service back.
//!
//! The whole state machine, from O's side (DESIGN.md sections 4 and 10):
//!
//! ```text
//!  Serving ──SIGUSR2/SIGHUP/`baton reload`──▶ Upgrading ──N "serving"──▶ Probation ──window passed──▶ HandedOver ──▶ drain, exit 0
//!     ▲                                          │                          │
//!     ├──────── exec error, N exits, timeout, ───┘                          │ (N killed, READY=1 + STATUS naming the
//!     │         broken handshake                                            │  failure, O keeps serving)
//!     └──────── N dies: kill its group, accept again on O's own sockets ────┘ (READY=1 + STATUS naming the rollback)
//!
//!  Upgrading ──SIGTERM──▶ N killed (before the commit) or stopped with O (after it)
//!  Probation ──SIGTERM──▶ N told to stop; both drain
//!  Probation ──reload──▶ HandedOver early; the request goes on to N
//! ```
//!
//! Step by step ([`start`], then [`Successor`]):
//! 1. O sends `RELOADING=1` + `MONOTONIC_USEC` + `STATUS=`.
//! 2. O forks the intermediate (I), which starts N as `posix_spawn` would ([`Upgrader::spawn`]);
//!    N says its pid on the handshake channel before its execve; O opens a pidfd for N (which
//!    cannot be recycled meanwhile: N is I's child, and I leaves it unreaped until O says it
//!    holds the pidfd). I stays N's parent during the probation: if N dies, I reaps it and
//!    reports `exit <wait status>`. N runs in a process
//!    group of its own, gets the sockets at fds `3..` with `LISTEN_FDS`, `LISTEN_FDNAMES` and
//!    its own `LISTEN_PID`, a socket pair's end for passed-on connections
//!    (`BATON_CONNECTIONS_FD`, [`crate::handoff`]), the handshake channel at the last fd
//!    (`BATON_UPGRADE_FD`), and `BATON_GENERATION` one higher.
//! 3. N starts (fresh config, sockets, server) without accepting and without notifying, then
//!    says `ready` (saying whether its workload adopts connections). Anything that goes wrong
//!    in N before that is reported as `error <message>`.
//! 4. O says `commit`; N starts accepting and says `serving`. Up to the commit a stop calls the
//!    upgrade off.
//! 5. O stops accepting (its copies of the sockets stay open), passes connections on if N
//!    adopts them ([`Successor::take_pass_on`]), drains the rest, and stands by as the main pid
//!    for the probation, watching N's pidfd.
//! 6. The probation passed ([`Successor::promote`]): O releases and reaps I, so N is PID 1's
//!    child (or the nearest subreaper's) before it is ever named the main pid; sends
//!    `MAINPID=N` and a `BARRIER=1`; says `main`, and is silent towards systemd from then on
//!    ([`crate::notify::hand_over`]). N sends `READY=1` + `STATUS=`. `MAINPID=` is the point
//!    of no return. O finishes its drain, reports `drained <ms> <forced>` to N (for N's
//!    metrics), and exits 0.
//!    N died on probation ([`SuccessorEvent::Exited`]): O kills N's group and serves again.
//!
//! Messages on the channel are text lines. N → O: `pid <n>` and `exit <status>` (from I),
//! `exec-error <errno>`, `error <text>`, `ready` (or `ready {"warnings":[..],"adopts":true}`), `serving`, `promote` (N was asked to
//! upgrade: end my probation). O → N: `commit`, `main`, `stop`, `drained <ms> <forced>`.
//!
//! Before `commit` N accepts nothing, so killing it loses no request; a guard kills N on every
//! path that does not reach `MAINPID=` (timeout, error, SIGTERM, rollback, a dropped task).

use crate::env::Var;
use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::activation::Listener;
use crate::control::ProcessHandle;
use crate::exec::{write_decimal, ExecPlan};
use crate::notify;

/// The environment variable that carries N's end of the handshake channel.
pub const UPGRADE_FD_ENV: Var = Var::UPGRADE_FD;
/// CLOCK_MONOTONIC in microseconds when O began the upgrade, so that N can measure the handoff.
pub const UPGRADE_STARTED_ENV: Var = Var::UPGRADE_STARTED_USEC;
/// Upgrades counted so far by result, carried from generation to generation.
pub const UPGRADES_ENV: Var = Var::UPGRADES;
/// A sealed memfd with the state an old generation hands its successor
/// ([`Upgrader::set_state`], [`take_state_from_env`]).
pub const STATE_FD_ENV: Var = Var::STATE_FD;

/// Names the pid that the private variables are meant for ([`crate::env`]).
pub const FOR_PID_ENV: Var = Var::FOR_PID;

/// The longest line either side of the handshake reads (a longer one breaks the handshake).
pub const MAX_LINE: usize = 4096;

fn line_too_long() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("a handshake line longer than {MAX_LINE} bytes"),
    )
}

/// `BufRead::read_line`, but at most [`MAX_LINE`] bytes: a longer line is an error.
fn read_bounded_line(reader: &mut impl BufRead, line: &mut String) -> io::Result<usize> {
    let n = io::Read::take(&mut *reader, MAX_LINE as u64 + 1).read_line(line)?;
    if n == MAX_LINE + 1 && !line.ends_with('\n') {
        return Err(line_too_long());
    }
    Ok(n)
}

/// The lines of a handshake channel, each at most [`MAX_LINE`] bytes (without its `\n`): a
/// longer one is an error, so a runaway peer cannot make the other side buffer without end.
/// [`BoundedLines::next_line`] is cancel-safe, as tokio's `Lines::next_line` is: a partial line
/// stays in the struct.
pub struct BoundedLines<R> {
    /// Bytes read from the channel before it came here: they come first.
    buffered: Vec<u8>,
    reader: tokio::io::BufReader<R>,
    partial: Vec<u8>,
}

impl<R: tokio::io::AsyncRead + Unpin> BoundedLines<R> {
    pub fn new(read: R) -> BoundedLines<R> {
        BoundedLines::with_buffered(Vec::new(), read)
    }

    /// Lines from `buffered`, then from `read`: for a channel whose first bytes another reader
    /// took in already.
    pub fn with_buffered(buffered: Vec<u8>, read: R) -> BoundedLines<R> {
        BoundedLines {
            buffered,
            reader: tokio::io::BufReader::new(read),
            partial: Vec::new(),
        }
    }

    /// The next line without its `\n` (or `\r\n`); `None` at the end; an error for a line
    /// longer than [`MAX_LINE`] or not UTF-8.
    pub async fn next_line(&mut self) -> io::Result<Option<String>> {
        use tokio::io::AsyncBufReadExt;
        loop {
            let from_buffered = !self.buffered.is_empty();
            let available = match from_buffered {
                true => &self.buffered[..],
                false => self.reader.fill_buf().await?,
            };
            let (taken, done) = match available.iter().position(|b| *b == b'\n') {
                Some(i) => (i + 1, true),
                None if available.is_empty() => (0, true),
                None => (available.len(), false),
            };
            if self.partial.len() + taken > MAX_LINE + 1 {
                return Err(line_too_long());
            }
            self.partial.extend_from_slice(&available[..taken]);
            match from_buffered {
                true => drop(self.buffered.drain(..taken)),
                false => self.reader.consume(taken),
            }
            if !done {
                continue;
            }
            if self.partial.is_empty() {
                return Ok(None);
            }
            let mut line = std::mem::take(&mut self.partial);
            if line.last() == Some(&b'\n') {
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
            }
            return String::from_utf8(line)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
        }
    }

    /// The reader (what it had buffered is dropped).
    pub fn into_inner(self) -> R {
        self.reader.into_inner()
    }
}

/// How long the intermediate may take to report N's pid, and N to confirm it serves after
/// `commit`. Both involve no work beyond a few syscalls.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long O waits for systemd to process `MAINPID=`.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);

/// The words the intermediate and N write before N's exec, where nothing may allocate: shared
/// with [`NewToOld`] so that both spell them alike.
const PID_WORD: &str = "pid ";
const EXIT_WORD: &str = "exit ";
const EXEC_ERROR_WORD: &str = "exec-error ";
const FORK_FAILED_WORD: &str = "fork-failed ";

/// A line N (or its intermediate) sends O on the handshake channel.
///
/// The wire format is a contract between generations (an old binary talks to a new one during
/// an upgrade): one line each, the first word says what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NewToOld {
    /// `pid <n>`: N's pid, which N says itself before its execve.
    Pid(i32),
    /// `fork-failed <errno>`: the intermediate could not start N (its clone failed).
    ForkFailed(i32),
    /// `exit <wait status>`: N died; its intermediate reaped it.
    Exit(u32),
    /// `exec-error <errno>`: N's `execve` failed.
    ExecError(i32),
    /// `error <text>`: N failed to start (one line).
    Error(String),
    /// `ready` or `ready {"warnings":[..],"adopts":true}`: N started and waits for `commit`;
    /// with `adopts`, it takes the connections O passes on ([`crate::handoff`]). Anything after
    /// `ready ` that is not such an object means no warnings and no adoption (an older O reads
    /// only the first word).
    Ready { warnings: Vec<String>, adopts: bool },
    /// `serving`: N accepts since the commit.
    Serving,
    /// `promote`: N was asked for an upgrade itself and asks O to end the probation now.
    Promote,
}

impl NewToOld {
    /// The message in `line` (without its `\n`); `None` for anything else.
    pub fn parse(line: &str) -> Option<NewToOld> {
        let (word, rest) = match line.split_once(' ') {
            Some((word, rest)) => (word, Some(rest)),
            None => (line, None),
        };
        Some(match (word, rest) {
            ("pid", Some(n)) => NewToOld::Pid(n.parse().ok()?),
            ("fork-failed", Some(n)) => NewToOld::ForkFailed(n.parse().ok()?),
            ("exit", Some(n)) => NewToOld::Exit(n.parse().ok()?),
            ("exec-error", Some(n)) => NewToOld::ExecError(n.parse().ok()?),
            ("error", message) => NewToOld::Error(message.unwrap_or("").to_owned()),
            ("ready", extra) => {
                let (warnings, adopts) = extra.map(ready_extra).unwrap_or_default();
                NewToOld::Ready { warnings, adopts }
            }
            ("serving", None) => NewToOld::Serving,
            ("promote", None) => NewToOld::Promote,
            _ => return None,
        })
    }

    /// The line, with its `\n`.
    pub fn to_line(&self) -> String {
        format!("{self}\n")
    }
}

impl std::fmt::Display for NewToOld {
    /// The line without its `\n`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NewToOld::Pid(n) => write!(f, "{PID_WORD}{n}"),
            NewToOld::ForkFailed(n) => write!(f, "{FORK_FAILED_WORD}{n}"),
            NewToOld::Exit(n) => write!(f, "{EXIT_WORD}{n}"),
            NewToOld::ExecError(n) => write!(f, "{EXEC_ERROR_WORD}{n}"),
            NewToOld::Error(message) => write!(f, "error {message}"),
            NewToOld::Ready {
                warnings,
                adopts: false,
            } if warnings.is_empty() => f.write_str("ready"),
            NewToOld::Ready {
                warnings,
                adopts: false,
            } => write!(f, "ready {}", serde_json::json!({ "warnings": warnings })),
            NewToOld::Ready {
                warnings,
                adopts: true,
            } => write!(
                f,
                "ready {}",
                serde_json::json!({ "warnings": warnings, "adopts": true })
            ),
            NewToOld::Serving => f.write_str("serving"),
            NewToOld::Promote => f.write_str("promote"),
        }
    }
}

/// A line O sends N on the handshake channel (see [`NewToOld`] for the format).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldToNew {
    /// `commit`: N may accept.
    Commit,
    /// `main`: the probation is over, N is the main pid.
    Main,
    /// `stop`: the service stops during the probation.
    Stop,
    /// `drained <ms> <forced>`: O drained its connections in `duration` (whole milliseconds on
    /// the wire), closing `forced` of them at its deadline. Further words are ignored (room
    /// for a later version's additions).
    Drained { duration: Duration, forced: u64 },
}

impl OldToNew {
    /// The message in `line` (without its `\n`); `None` for anything else.
    pub fn parse(line: &str) -> Option<OldToNew> {
        let mut words = line.split(' ');
        Some(match (words.next(), words.next(), words.next()) {
            (Some("commit"), None, _) => OldToNew::Commit,
            (Some("main"), None, _) => OldToNew::Main,
            (Some("stop"), None, _) => OldToNew::Stop,
            (Some("drained"), Some(ms), Some(forced)) => OldToNew::Drained {
                duration: Duration::from_millis(ms.parse().ok()?),
                forced: forced.parse().ok()?,
            },
            _ => return None,
        })
    }

    /// The line, with its `\n`.
    pub fn to_line(&self) -> String {
        format!("{self}\n")
    }
}

impl std::fmt::Display for OldToNew {
    /// The line without its `\n`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OldToNew::Commit => f.write_str("commit"),
            OldToNew::Main => f.write_str("main"),
            OldToNew::Stop => f.write_str("stop"),
            OldToNew::Drained { duration, forced } => {
                write!(f, "drained {} {forced}", duration.as_millis())
            }
        }
    }
}

/// Why an upgrade failed ([`start`], [`Successor::promote`]). Its `Display` is the one-line
/// reason that O logs, puts in `STATUS=` and relays to whoever asked for the upgrade.
#[derive(Debug)]
#[non_exhaustive]
pub enum UpgradeError {
    /// A stop called the upgrade off before the commit.
    CalledOff,
    /// N could not be started (pipes, fork, the environment, the intermediate).
    Spawn { exe: PathBuf, source: io::Error },
    /// O's end of the handshake channel could not be set up, or taken back after the handover.
    Channel(io::Error),
    /// N was not ready within the upgrade timeout.
    NotReady { pid: i32, timeout: Duration },
    /// Reading N's first message failed.
    HandshakeBroke { pid: i32, source: io::Error },
    /// N exited before it was ready: how, when its intermediate said (`exit <status>`).
    ExitedBeforeReady {
        pid: i32,
        exe: PathBuf,
        how: Option<String>,
    },
    /// N's `execve` failed.
    Exec { exe: PathBuf, source: io::Error },
    /// N reported a failed start (`error <text>`).
    StartFailed(String),
    /// N said something else than `ready` (the line as it came).
    Unexpected { pid: i32, line: String },
    /// N did not answer `serving` to the commit: why.
    NotConfirmed { pid: i32, reason: String },
    /// The intermediate could not be reaped before the handover.
    ReapIntermediate(io::Error),
    /// N died while it was being made the main pid.
    ExitedDuringHandover { pid: i32 },
    /// The hand-over hook (the pidfile) failed.
    RecordPid { pid: i32, source: io::Error },
    /// `MAINPID=` could not be sent.
    MainPid { pid: i32, source: io::Error },
    /// N's pidfd could not be copied for the [`HandedOver`].
    Pidfd { pid: i32, source: io::Error },
}

impl std::fmt::Display for UpgradeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpgradeError::CalledOff => f.write_str("called off: the process is stopping"),
            UpgradeError::Spawn { exe, source } => {
                write!(f, "cannot start {}: {source}", exe.display())
            }
            UpgradeError::Channel(e) => write!(f, "handshake channel: {e}"),
            UpgradeError::NotReady { pid, timeout } => write!(
                f,
                "the new process (pid {pid}) was not ready within {}; killed it",
                humantime::format_duration(*timeout)
            ),
            UpgradeError::HandshakeBroke { pid, source } => {
                write!(f, "handshake with pid {pid} broke: {source}")
            }
            UpgradeError::ExitedBeforeReady { pid, exe, how } => {
                let exe = exe.display();
                write!(
                    f,
                    "the new process (pid {pid}, {exe}) exited before it was ready"
                )?;
                match how {
                    Some(how) => write!(f, ": {how}"),
                    None => Ok(()),
                }
            }
            UpgradeError::Exec { exe, source } => {
                write!(f, "cannot execute {}: {source}", exe.display())
            }
            UpgradeError::StartFailed(message) => {
                write!(f, "the new process failed to start: {message}")
            }
            UpgradeError::Unexpected { pid, line } => {
                write!(
                    f,
                    "the new process (pid {pid}) said {line:?} instead of ready"
                )
            }
            UpgradeError::NotConfirmed { pid, reason } => write!(
                f,
                "the new process (pid {pid}) did not confirm that it serves: {reason}; killed it"
            ),
            UpgradeError::ReapIntermediate(e) => {
                write!(f, "cannot reap the intermediate process: {e}")
            }
            UpgradeError::ExitedDuringHandover { pid } => {
                write!(f, "pid {pid} exited during the handover")
            }
            UpgradeError::RecordPid { pid, source } => {
                write!(f, "cannot record pid {pid}: {source}")
            }
            UpgradeError::MainPid { pid, source } => {
                write!(f, "MAINPID={pid} was not sent: {source}")
            }
            UpgradeError::Pidfd { pid, source } => write!(f, "pidfd of {pid}: {source}"),
        }
    }
}

impl std::error::Error for UpgradeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UpgradeError::Spawn { source, .. }
            | UpgradeError::HandshakeBroke { source, .. }
            | UpgradeError::Exec { source, .. }
            | UpgradeError::RecordPid { source, .. }
            | UpgradeError::MainPid { source, .. }
            | UpgradeError::Pidfd { source, .. }
            | UpgradeError::Channel(source)
            | UpgradeError::ReapIntermediate(source) => Some(source),
            _ => None,
        }
    }
}

pub use crate::env::EnvError;

/// What a process needs to start its successor, captured at start.
#[derive(Debug)]
pub struct Upgrader {
    /// The executable to run.
    pub exe: PathBuf,
    /// The arguments after `argv[0]`, as this process got them: N reads its config afresh.
    pub args: Vec<OsString>,
    /// This process's generation; N gets one more.
    pub generation: u64,
    /// Copies of the listening sockets (same open file descriptions), under their listeners'
    /// names: handed to N, and served again by this process if N dies on probation.
    sockets: Vec<Listener>,
    /// Further fds N inherits, each announced in an environment variable (the pidfile lock).
    extra: Vec<(OwnedFd, &'static str)>,
    pub timeout: Duration,
    /// What the next generation gets in a memfd ([`Upgrader::set_state`]).
    state: StateBlob,
}

/// The state to hand over, if set; shown by its length only.
#[derive(Default)]
struct StateBlob(std::sync::Mutex<Option<Vec<u8>>>);

impl StateBlob {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Vec<u8>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Debug for StateBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &*self.lock() {
            Some(bytes) => write!(f, "StateBlob({} bytes)", bytes.len()),
            None => f.write_str("StateBlob(none)"),
        }
    }
}

/// Upgrades counted by result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// The new generation passed its probation and became the main pid.
    pub ok: u64,
    /// The new generation never served (it did not start, or broke the handshake).
    pub failed: u64,
    /// The new generation served, then died on probation; the old one took over again.
    pub rolled_back: u64,
}

impl Counts {
    /// From `BATON_UPGRADES=ok:failed:rolled_back`; zero when absent or malformed.
    pub fn from_env() -> Counts {
        std::env::var(UPGRADES_ENV)
            .ok()
            .filter(|_| crate::env::private_env_trusted())
            .and_then(|v| Counts::parse(&v))
            .unwrap_or_default()
    }

    fn parse(v: &str) -> Option<Counts> {
        let mut parts = v.split(':').map(str::parse::<u64>);
        let counts = Counts {
            ok: parts.next()?.ok()?,
            failed: parts.next()?.ok()?,
            rolled_back: parts.next()?.ok()?,
        };
        parts.next().is_none().then_some(counts)
    }

    fn to_env(self) -> String {
        format!("{}:{}:{}", self.ok, self.failed, self.rolled_back)
    }
}

/// The executable this process runs, as a path that a package upgrade replaces: `argv[0]` made
/// absolute when it has a slash (so a symlinked install is followed anew), else what the kernel
/// says. Never `/proc/self/exe` at upgrade time, which names the old, possibly deleted, file.
pub fn current_executable() -> io::Result<PathBuf> {
    let arg0 = std::env::args_os().next().map(PathBuf::from);
    match arg0 {
        Some(p) if p.is_absolute() => Ok(p),
        Some(p) if p.as_os_str().as_bytes().contains(&b'/') => Ok(std::env::current_dir()?.join(p)),
        _ => std::env::current_exe(),
    }
}

impl Upgrader {
    pub fn new(exe: PathBuf, generation: u64, timeout: Duration) -> Upgrader {
        Upgrader {
            exe,
            args: std::env::args_os().skip(1).collect(),
            generation,
            sockets: Vec::new(),
            extra: Vec::new(),
            timeout,
            state: StateBlob::default(),
        }
    }

    /// Sets the bytes the next generation gets ([`take_state_from_env`]), replacing what was
    /// set before. They stay set after an upgrade failed, for the next attempt. More than
    /// [`MAX_STATE`] bytes make the upgrade fail.
    pub fn set_state(&self, bytes: Vec<u8>) {
        *self.state.lock() = Some(bytes);
    }

    /// Hands no state over any more.
    pub fn clear_state(&self) {
        *self.state.lock() = None;
    }

    /// Keeps a copy of a listening socket to hand over (and to take back after a rollback).
    pub fn add_listener(&mut self, listener: &Listener) -> io::Result<()> {
        self.sockets.push(listener.try_clone()?);
        Ok(())
    }

    /// New copies of the listening sockets, to accept on again after N died on probation.
    /// Connections that queued meanwhile are waiting on them.
    pub fn relisten(&self) -> io::Result<Vec<Listener>> {
        self.sockets.iter().map(Listener::try_clone).collect()
    }

    /// Closes this process's copies of the listening sockets (after the handover: only the new
    /// main pid accepts).
    pub fn close_sockets(&mut self) {
        self.sockets.clear();
    }

    /// The sockets it hands over, with the names the next generation gets in `LISTEN_FDNAMES`.
    pub fn sockets(&self) -> impl Iterator<Item = (BorrowedFd<'_>, String)> {
        self.sockets.iter().map(|l| (l.as_fd(), l.handover_name()))
    }

    /// The fds this upgrader keeps open.
    pub fn fds(&self) -> Vec<RawFd> {
        self.sockets
            .iter()
            .map(|l| l.as_fd().as_raw_fd())
            .chain(self.extra.iter().map(|(fd, _)| fd.as_raw_fd()))
            .collect()
    }

    /// Hands an fd to N as well, announced as `env_var=<fd number>`.
    pub fn add_fd(&mut self, fd: OwnedFd, env_var: &'static str) {
        self.extra.push((fd, env_var));
    }

    /// Double-forks N (see the module docs) and returns once O holds N's pidfd. Blocking (up
    /// to `STEP_TIMEOUT`, 10 s, for the intermediate's answer): call it off the async workers, as
    /// [`start`] does.
    pub fn spawn(&self, started_usec: i128, counts: Counts) -> io::Result<Spawned> {
        self.prepare(started_usec, counts)?.launch()
    }

    /// Everything the double fork needs, made here so that it can run on another thread: the
    /// channel, copies of the fds to hand over, the state's memfd, N's environment and the
    /// exec plan.
    fn prepare(&self, started_usec: i128, counts: Counts) -> io::Result<Launch> {
        let (parent_end, child_end) = StdUnixStream::pair()?; // both CLOEXEC
        let (pass_on, connections) = crate::handoff::pair()?;
        let state = self.state_memfd()?;
        let has_state = state.is_some();
        // N gets them at 3.. in this order; the channel comes last.
        let mut handed = self
            .sockets
            .iter()
            .map(|l| l.as_fd().try_clone_to_owned())
            .chain(self.extra.iter().map(|(fd, _)| fd.try_clone()))
            .collect::<io::Result<Vec<OwnedFd>>>()?;
        handed.push(connections);
        handed.extend(state);
        let mut fds: Vec<RawFd> = handed.iter().map(AsRawFd::as_raw_fd).collect();
        fds.push(child_end.as_raw_fd());
        if fds.len() > MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} fds to hand over; at most {MAX_FDS}", fds.len()),
            ));
        }
        let env = self.successor_env(started_usec, counts, fds.len(), has_state);
        let exec = ExecPlan::new(&self.exe, &self.args, env, fds)?;
        Ok(Launch {
            exec,
            successor_stack: SuccessorStack::new()?,
            parent_end,
            child_end,
            pass_on,
            _handed: handed,
        })
    }

    /// The state to hand over, in a sealed memfd, if one was set.
    fn state_memfd(&self) -> io::Result<Option<OwnedFd>> {
        let state = self.state.lock();
        let Some(bytes) = state.as_deref() else {
            return Ok(None);
        };
        if bytes.len() > MAX_STATE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the state to hand over has {} bytes; at most {MAX_STATE}",
                    bytes.len()
                ),
            ));
        }
        sealed_memfd(bytes).map(Some)
    }

    /// N's environment: this process's own without the private variables
    /// ([`crate::env::NOT_INHERITED`]),
    /// plus what announces the `n_fds` fds N gets at 3.. (the sockets, the extra fds, the
    /// pair for passed-on connections, the state if any, the channel last), its generation and
    /// the counts. `LISTEN_PID` and `BATON_FOR_PID` are N's to fill in ([`ExecPlan`]).
    fn successor_env(
        &self,
        started_usec: i128,
        counts: Counts,
        n_fds: usize,
        has_state: bool,
    ) -> Vec<Vec<u8>> {
        let first = 3;
        let n_sockets = self.sockets.len();
        let channel_fd = first + n_fds - 1;
        let mut env = crate::exec::inherited_env(&*crate::env::NOT_INHERITED);
        let names: Vec<String> = self.sockets.iter().map(Listener::handover_name).collect();
        env.push(format!("LISTEN_FDS={n_sockets}").into_bytes());
        env.push(format!("LISTEN_FDNAMES={}", names.join(":")).into_bytes());
        if self.sockets.iter().any(|l| l.unit.is_some()) {
            let units: Vec<&str> = self
                .sockets
                .iter()
                .map(|l| l.unit.as_deref().unwrap_or(""))
                .collect();
            env.push(format!("{}={}", Var::SOCKET_UNITS, units.join("/")).into_bytes());
        }
        for (i, (_, var)) in self.extra.iter().enumerate() {
            env.push(format!("{var}={}", first + n_sockets + i).into_bytes());
        }
        // Then the pair for passed-on connections, and the state's memfd, if any.
        let connections_fd = first + n_sockets + self.extra.len();
        env.push(crate::handoff::env_entry(
            connections_fd,
            self.generation + 1,
        ));
        if has_state {
            env.push(format!("{STATE_FD_ENV}={}", connections_fd + 1).into_bytes());
        }
        env.push(format!("{}={}", Var::GENERATION, self.generation + 1).into_bytes());
        env.push(format!("{UPGRADE_FD_ENV}={channel_fd}").into_bytes());
        env.push(format!("{UPGRADE_STARTED_ENV}={started_usec}").into_bytes());
        env.push(format!("{UPGRADES_ENV}={}", counts.to_env()).into_bytes());
        env
    }
}

/// N, ready to be double-forked ([`Upgrader::spawn`]); it owns all it needs, so that
/// [`start`] can run it on the blocking pool.
struct Launch {
    exec: ExecPlan,
    /// N's stack from its clone to its execve ([`clone_successor`]): mapped here, since
    /// nothing may allocate after the fork.
    successor_stack: SuccessorStack,
    parent_end: StdUnixStream,
    child_end: StdUnixStream,
    /// O's end of the pair for passed-on connections.
    pass_on: crate::handoff::PassOn,
    /// Copies of the fds that `exec` hands to N: open until the fork is done.
    _handed: Vec<OwnedFd>,
}

impl Launch {
    /// The double fork, then the intermediate's `pid <n>`; O opens N's pidfd and tells the
    /// intermediate so.
    fn launch(mut self) -> io::Result<Spawned> {
        // The intermediate waits for EOF on this pipe before it exits: until then a dead N stays
        // its unreaped zombie, so N's pid cannot be recycled before O holds a pidfd for it.
        let (go_read, go_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let forked = self.fork_intermediate(&go_read, &go_write);
        let intermediate = Intermediate {
            pid: forked?,
            go: Some(go_write),
        };
        drop((self.child_end, go_read, self._handed));
        let (pid, buffered, channel) = read_successor_pid(self.parent_end)?;
        // From now on N is killed through a pidfd, which cannot hit a recycled pid: N stays
        // the intermediate's child (a zombie at worst) until the intermediate is released.
        let pidfd = ProcessHandle::open(pid as u32)?;
        intermediate.holds_pidfd()?;
        Ok(Spawned {
            pid,
            pidfd,
            intermediate: Some(intermediate),
            channel,
            buffered,
            pass_on: Some(self.pass_on),
            promoted: false,
            killed: false,
        })
    }

    /// Forks the intermediate with every signal blocked: no signal handler may run in the
    /// children (tokio's would report the signal to this process through the pipe they
    /// share, and N shares the intermediate's memory until its execve). N resets the handlers
    /// before it unblocks.
    fn fork_intermediate(
        &mut self,
        go_read: &OwnedFd,
        go_write: &OwnedFd,
    ) -> io::Result<libc::pid_t> {
        let previous = set_signal_mask(!0)?;
        // SAFETY: see fork_and_exec; every signal is blocked.
        let forked = unsafe {
            fork_and_exec(
                &mut self.exec,
                self.successor_stack.usable(),
                self.child_end.as_raw_fd(),
                go_read.as_raw_fd(),
                go_write.as_raw_fd(),
            )
        };
        set_signal_mask(previous)?;
        forked
    }
}

/// Sets this thread's signal mask (a bit per signal, bit 0 for signal 1) and returns the one
/// before. The raw syscall, as `posix_spawn` uses: glibc's `sigprocmask` leaves its own two
/// signals (`SIGCANCEL`, `SIGSETXID`) unblocked, and every signal must be blocked around the
/// fork of the intermediate.
fn set_signal_mask(mask: u64) -> io::Result<u64> {
    let mut previous: u64 = 0;
    // SAFETY: both pointers are valid for the call; 8 bytes is the kernel's signal set.
    let r = unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &mask as *const u64,
            &mut previous as *mut u64,
            8,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(previous)
}

/// Reads N's `pid <n>` (within [`STEP_TIMEOUT`]), or the intermediate's `fork-failed`. N's
/// next messages may come with it; what came besides the pid line is returned to be read first
/// (it may be a part of a line only). Returns the channel in blocking mode without
/// a timeout.
fn read_successor_pid(channel: StdUnixStream) -> io::Result<(i32, Vec<u8>, StdUnixStream)> {
    channel.set_read_timeout(Some(STEP_TIMEOUT))?;
    let mut reader = BufReader::new(channel);
    let mut early = Vec::new();
    let pid = loop {
        let mut line = String::new();
        read_bounded_line(&mut reader, &mut line)?;
        match NewToOld::parse(line.trim_end()) {
            Some(NewToOld::Pid(pid)) if pid > 0 => break pid,
            _ if line.ends_with('\n') && early.is_empty() => early = line.into_bytes(),
            _ => {
                return Err(io::Error::other(format!(
                    "the intermediate process could not fork N: {:?}",
                    line.trim_end()
                )))
            }
        }
    };
    early.extend_from_slice(reader.buffer());
    let channel = reader.into_inner();
    channel.set_read_timeout(None)?;
    Ok((pid, early, channel))
}

/// The middle process of the double fork. It stays N's parent until it is released (EOF on
/// its pipe) right before `MAINPID=`, so that N is PID 1's (or the nearest subreaper's) child
/// by then; until then it reaps N if N dies and reports how (`exit <wait status>`). It is
/// reaped by O in every case, also when `spawn` fails half-way, so that it never lingers as a
/// zombie.
struct Intermediate {
    pid: libc::pid_t,
    go: Option<OwnedFd>,
}

impl Intermediate {
    /// Tells the intermediate that O holds N's pidfd: from now on it may reap N when N dies
    /// (before, N must stay an unreaped zombie, so that its pid cannot be recycled).
    fn holds_pidfd(&self) -> io::Result<()> {
        let go = self
            .go
            .as_ref()
            .ok_or_else(|| io::Error::other("released"))?;
        nix::unistd::write(go, b"p")?;
        Ok(())
    }

    fn release_and_reap(mut self) -> io::Result<()> {
        self.go = None;
        let result = self.reap();
        self.pid = 0;
        result
    }

    /// Waits for the released intermediate's exit, which comes at once, unless it still waits
    /// for a N that never reached its execve (stopped, or stuck in it): after
    /// [`RELEASE_WAIT`] it is killed, which ends that wait. Such a N, killed already or never
    /// named to O, is left to its new parent.
    fn reap(&self) -> io::Result<()> {
        if let Ok(handle) = ProcessHandle::open(self.pid as u32) {
            if !handle.wait_exit(RELEASE_WAIT).unwrap_or(false) {
                tracing::warn!(
                    pid = self.pid,
                    "the intermediate process did not exit within {}; killed",
                    humantime::format_duration(RELEASE_WAIT)
                );
                handle.kill();
            }
        }
        loop {
            match nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(self.pid), None) {
                Err(nix::errno::Errno::EINTR) => continue,
                // SIGCHLD ignored (inherited): the kernel reaped it already.
                Ok(_) | Err(nix::errno::Errno::ECHILD) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Drop for Intermediate {
    fn drop(&mut self) {
        if self.pid > 0 {
            self.go = None;
            let _ = self.reap();
        }
    }
}

/// N from its start until it becomes the main pid: killed, with its process group, when
/// dropped before that.
pub struct Spawned {
    pub pid: i32,
    pidfd: ProcessHandle,
    intermediate: Option<Intermediate>,
    channel: StdUnixStream,
    /// What N wrote that came before or with its pid: the first bytes of its messages.
    buffered: Vec<u8>,
    /// O's end of the pair for passed-on connections, until N says whether it adopts them.
    pass_on: Option<crate::handoff::PassOn>,
    /// N is the main pid: nothing to kill.
    promoted: bool,
    /// N was killed already (`Spawned::kill`).
    killed: bool,
}

/// How long a killed N may take to die before its intermediate is released all the same.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// How long a released intermediate may take to exit before it is killed ([`Intermediate::reap`]).
const RELEASE_WAIT: Duration = Duration::from_secs(2);

impl Drop for Spawned {
    /// Kills N unless it became the main pid. Waiting for its death blocks (up to
    /// `KILL_WAIT`, 2 s): on a runtime that goes to the blocking pool, never to the caller's
    /// thread.
    fn drop(&mut self) {
        let Some(reap) = self.kill() else { return };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || reap.run())),
            Err(_) => reap.run(),
        }
    }
}

impl Spawned {
    /// Kills N (see [`Spawned::kill`]) and waits, on the blocking pool, until it is dead and its
    /// intermediate reaped.
    async fn kill_and_wait(&mut self) {
        if let Some(reap) = self.kill() {
            let _ = tokio::task::spawn_blocking(move || reap.run()).await;
        }
    }

    /// Kills N with its process group, unless it became the main pid or was killed already;
    /// returns what is left to do, the reap (blocking).
    fn kill(&mut self) -> Option<Reap> {
        if self.promoted || self.killed {
            return None;
        }
        self.killed = true;
        // N runs in a process group of its own: whatever it started goes with it, and none of
        // it keeps a copy of the listening sockets. The group cannot be a recycled one: N's
        // pid stays reserved while N is the intermediate's unreaped child or the group has
        // members.
        // SAFETY: plain syscall.
        unsafe { libc::kill(-self.pid, libc::SIGKILL) };
        self.pidfd.kill();
        // The intermediate reports N's end on the channel: if N filled it (a line O refused as
        // too long), that write would block, the intermediate would never exit, and its reap
        // would hang. Shut down, the channel makes the write fail at once (EPIPE).
        let _ = self.channel.shutdown(std::net::Shutdown::Both);
        Some(Reap {
            pidfd: self.pidfd.try_clone_fd().ok().map(ProcessHandle::from),
            intermediate: self.intermediate.take(),
        })
    }
}

/// What is left after N was killed: waiting for its death, and reaping its intermediate.
struct Reap {
    pidfd: Option<ProcessHandle>,
    intermediate: Option<Intermediate>,
}

impl Reap {
    /// Blocks up to [`KILL_WAIT`] plus the intermediate's exit.
    fn run(self) {
        // The intermediate reaps N once it is dead (and says how); a N that takes longer to die
        // is left to the reaper: releasing the intermediate (EOF on its pipe) ends its wait,
        // and then it is reaped here.
        if let Some(pidfd) = &self.pidfd {
            let _ = pidfd.wait_exit(KILL_WAIT);
        }
        drop(self.intermediate);
    }
}

/// The most fds N can be handed (sockets, the pidfile, the state, the channel).
const MAX_FDS: usize = 64;

/// Forks the intermediate, which starts N ([`clone_successor`]; N reports `pid <N>` on
/// `channel`), waits for EOF on `go` and exits. Returns the intermediate's pid.
///
/// # Safety
/// The children run only async-signal-safe code (fork, clone, fcntl, dup2, close, read,
/// sigprocmask, sigaction, getpid, write, execve, _exit) on memory prepared before the fork.
/// Call it with every signal blocked.
unsafe fn fork_and_exec(
    exec: &mut ExecPlan,
    successor_stack: &mut [u8],
    channel: RawFd,
    go: RawFd,
    go_write: RawFd,
) -> io::Result<libc::pid_t> {
    // SAFETY: this function's contract: signals blocked, the children make async-signal-safe calls only.
    unsafe {
        match libc::fork() {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                let pid = clone_successor(exec, channel, successor_stack);
                if pid > 0 {
                    // N said its pid itself (before its execve, which this process waited for).
                    // This process's own copy of the write end must go first, or no EOF would
                    // come; N's copy goes at its exec. Every other fd of O goes too (client
                    // connections among them), so that a connection O closes during the
                    // probation really ends.
                    libc::close(go_write);
                    close_all_but(channel, go);
                    stay_parent(pid, channel, go);
                    libc::_exit(0);
                }
                write_line(channel, FORK_FAILED_WORD, *libc::__errno_location() as u64);
                libc::_exit(1);
            }
            intermediate => Ok(intermediate),
        }
    }
}

/// Room for N's stack from its clone to its execve: [`exec_successor`] goes a few frames deep.
const SUCCESSOR_STACK: usize = 64 * 1024;

/// N's stack from its clone to its execve: a mapping of its own with an inaccessible page
/// below it, as a thread's stack has. N shares the intermediate's memory until its execve, so
/// without that page a stack overflow in N would write, unnoticed, into whatever lies below
/// (on the heap: the intermediate's); with it, N dies of SIGSEGV, which O reports as N's end.
struct SuccessorStack {
    /// The whole mapping, guard page first.
    mapping: std::ptr::NonNull<libc::c_void>,
    guard: usize,
}

// SAFETY: the mapping belongs to this value alone (unmapped on drop, lent out only through
// `&mut self`), like a `Box<[u8]>`.
unsafe impl Send for SuccessorStack {}

impl SuccessorStack {
    fn new() -> io::Result<SuccessorStack> {
        use nix::sys::mman::{mmap_anonymous, mprotect, MapFlags, ProtFlags};
        let guard = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .map_or(4096, |page| page as usize);
        const STACK: std::num::NonZeroUsize = match std::num::NonZeroUsize::new(SUCCESSOR_STACK) {
            Some(size) => size,
            None => panic!("SUCCESSOR_STACK is 0"),
        };
        let len = STACK.saturating_add(guard);
        // SAFETY: a new private anonymous mapping, aliasing nothing.
        let mapping = unsafe {
            mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_STACK,
            )
        }?;
        let stack = SuccessorStack { mapping, guard };
        // SAFETY: the first page of the mapping just made, which nothing refers to yet.
        unsafe { mprotect(mapping, guard, ProtFlags::PROT_NONE) }?;
        Ok(stack)
    }

    /// The stack above the guard page.
    fn usable(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `guard + SUCCESSOR_STACK` bytes, readable and writable above
        // the guard page, and borrowed mutably with `self`.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.mapping.as_ptr().cast::<u8>().add(self.guard),
                SUCCESSOR_STACK,
            )
        }
    }
}

impl Drop for SuccessorStack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, whole; no borrow of it outlives `self`.
        let _ = unsafe { nix::sys::mman::munmap(self.mapping, self.guard + SUCCESSOR_STACK) };
    }
}

/// What N gets from [`clone_successor`].
struct SuccessorArgs {
    exec: *mut ExecPlan,
    channel: RawFd,
}

/// Starts N from the intermediate as `posix_spawn` does: `clone(CLONE_VM | CLONE_VFORK)`,
/// N on a stack of its own ([`SuccessorStack`], with a guard page), sharing the intermediate's
/// memory until its execve. A fork would copy the page tables of the whole old generation (the
/// intermediate is a fork of it) only for the execve to tear them down again, on the CPU the
/// old generation serves on. Returns N's pid, or -1 with errno set.
///
/// N first says `pid <n>` on `channel` itself: the intermediate is suspended until N's execve
/// (`CLONE_VFORK`), and O must have N's pid, to kill it, also when N never gets that far (N
/// stopped, or stuck in an execve from a hung file system). N writes into the memory they
/// share (the plan's pid slots and fd scratch space, errno) while the intermediate waits, and
/// the intermediate reads none of it later. N's fd table and signal actions are copies of its
/// own (no `CLONE_FILES`, no `CLONE_SIGHAND`).
///
/// # Safety
/// In the intermediate only, with every signal blocked; see [`fork_and_exec`].
unsafe fn clone_successor(exec: &mut ExecPlan, channel: RawFd, stack: &mut [u8]) -> libc::pid_t {
    extern "C" fn successor(args: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `args` points to the `SuccessorArgs` on the suspended intermediate's stack,
        // which nothing else touches until N's execve; this runs in N, between clone and execve.
        unsafe {
            let args = &*args.cast::<SuccessorArgs>();
            write_line(args.channel, PID_WORD, libc::getpid() as u64);
            exec_successor(&mut *args.exec)
        }
    }
    let mut args = SuccessorArgs { exec, channel };
    // The stack grows down from its end, which the ABI wants 16-byte aligned.
    let end = stack.as_mut_ptr_range().end;
    let top = end.wrapping_sub(end as usize % 16);
    // SAFETY: `top` is the aligned end of a stack N alone uses; `args` and the plan outlive N's
    // use of them, since the intermediate is suspended until N's execve or exit (CLONE_VFORK).
    unsafe {
        libc::clone(
            successor,
            top.cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&mut args as *mut SuccessorArgs).cast(),
        )
    }
}

/// The intermediate once N has exec'd (or died): stays N's parent until O releases it (EOF on
/// `go`: O closed its end, or died) or N dies. Once O holds N's pidfd (a byte on `go`), it
/// reaps N when N dies and reports its wait status as `exit <status>` on `channel`, so
/// that O can say how N ended.
///
/// # Safety
/// Async-signal-safe calls only (poll, waitpid, write, raw syscalls); see fork_and_exec.
unsafe fn stay_parent(pid: libc::pid_t, channel: RawFd, go: RawFd) {
    // SAFETY: this function's contract: in the intermediate, async-signal-safe calls only.
    unsafe {
        // Without pidfd_open (Linux < 5.3) N's end is not watched: it is reaped at release.
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as RawFd;
        let mut fds = [
            // Not watched (a negative fd) until O holds its own pidfd.
            libc::pollfd {
                fd: -1,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: go,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            if libc::poll(fds.as_mut_ptr(), 2, -1) < 0 {
                if *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                return;
            }
            if fds[0].revents != 0 {
                let mut status = 0;
                if libc::waitpid(pid, &mut status, 0) == pid {
                    write_line(channel, EXIT_WORD, status as u32 as u64);
                }
                return;
            }
            if fds[1].revents != 0 {
                let mut byte = 0u8;
                let n = libc::read(go, (&mut byte as *mut u8).cast(), 1);
                if n == 1 {
                    fds[0].fd = pidfd;
                    continue;
                }
                if n < 0 && *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                return;
            }
        }
    }
}

/// N, between clone and exec: [`ExecPlan::exec`] (signals are blocked, see
/// `Launch::fork_intermediate`). Never returns; a failure is reported as `exec-error <errno>` on
/// the channel, the last of the handed fds (at its original number if the fds were not placed
/// yet).
///
/// # Safety
/// In N only, as [`ExecPlan::exec`].
unsafe fn exec_successor(exec: &mut ExecPlan) -> ! {
    // SAFETY: this function's contract: in N, between clone and exec.
    unsafe {
        let failed = exec.exec();
        write_line(failed.report_fd, EXEC_ERROR_WORD, failed.errno as u64);
        libc::_exit(127);
    }
}

/// Writes `<word><n>\n` on `fd` (the words end in a space): async-signal-safe, no allocation.
fn write_line(fd: RawFd, word: &str, n: u64) {
    let mut buf = [0u8; 32];
    let mut len = copy(&mut buf, 0, word.as_bytes());
    len += write_decimal(&mut buf[len..], n);
    buf[len] = b'\n';
    // SAFETY: a plain write of a buffer on the stack.
    unsafe { libc::write(fd, buf.as_ptr().cast(), len + 1) };
}

/// Closes every fd above stderr but `a` and `b`: plain close_range(2) calls, async-signal-safe.
/// On kernels without close_range (< 5.9) nothing is closed.
fn close_all_but(a: RawFd, b: RawFd) {
    let (low, high) = (a.min(b), a.max(b));
    let close = |first: RawFd, last: libc::c_uint| {
        if first >= 0 && (first as libc::c_uint) <= last {
            // SAFETY: a plain syscall on fd numbers this process owns.
            unsafe { libc::syscall(libc::SYS_close_range, first as libc::c_uint, last, 0) };
        }
    };
    close(3, (low - 1).max(0) as libc::c_uint);
    close(low + 1, (high - 1).max(0) as libc::c_uint);
    close(high + 1, libc::c_uint::MAX);
}

fn copy(buf: &mut [u8], at: usize, s: &[u8]) -> usize {
    buf[at..at + s.len()].copy_from_slice(s);
    s.len()
}

/// N once it serves, while O is still the main pid: on probation. Dropping it kills N (and
/// its process group).
pub struct Successor {
    pub pid: i32,
    pub generation: u64,
    /// From the start of the upgrade in O until N served.
    pub took: Duration,
    /// When N began to serve.
    pub serving_since: Instant,
    /// What N warned about at start (one line each), e.g. a socket it cannot change.
    pub warnings: Vec<String>,
    /// Where to pass connections on, if N adopts them ([`crate::handoff`]).
    pass_on: Option<crate::handoff::PassOn>,
    spawned: Spawned,
    lines: BoundedLines<tokio::net::unix::OwnedReadHalf>,
    write: tokio::net::unix::OwnedWriteHalf,
    /// Readable once N has exited.
    exit_watch: Option<tokio::io::unix::AsyncFd<OwnedFd>>,
    /// The channel reached its end: N and its intermediate are gone.
    channel_closed: bool,
}

impl Successor {
    /// Where to pass connections on instead of draining them, if N adopts them
    /// ([`crate::handoff`]); `None` after the first call.
    pub fn take_pass_on(&mut self) -> Option<crate::handoff::PassOn> {
        self.pass_on.take()
    }
}

/// What a successor on probation did.
#[derive(Debug, PartialEq, Eq)]
pub enum SuccessorEvent {
    /// N is gone; how, e.g. "killed by SIGSEGV" or "exited with status 3".
    Exited(String),
    /// N was asked for an upgrade itself and asks O to end the probation now.
    AsksPromotion,
}

/// N as the main pid, after the handover: what O keeps of it.
#[derive(Debug)]
pub struct HandedOver {
    pub pid: i32,
    pub generation: u64,
    /// From the start of the upgrade in O until N served.
    pub took: Duration,
    /// O's end of the channel, to report the drain to N.
    pub channel: tokio::net::UnixStream,
    /// N itself, to forward what O is asked after the handover.
    pub handle: ProcessHandle,
}

/// Runs steps 1 to 5 (see the module docs) for O: starts N and waits until it serves. On
/// error N is gone and the error says why, in one line; O never stopped accepting. Works on
/// any runtime flavour: what blocks runs on the blocking pool.
///
/// `cancel` calls the upgrade off (a stop) until the `commit`. Past the commit N may have
/// accepted connections, so the upgrade then goes on until N serves (or fails), and the caller
/// stops N gracefully ([`Successor::stop`]).
pub async fn start(
    upgrader: &Upgrader,
    counts: Counts,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<Successor, UpgradeError> {
    let started = Instant::now();
    let started_usec = monotonic_usec();
    let next = upgrader.generation + 1;
    notify::reloading(&format!(
        "upgrading: starting generation {next} from {}",
        upgrader.exe.display()
    ));
    let mut spawned = spawn_successor(upgrader, started_usec, counts).await?;
    let pid = spawned.pid;
    tracing::info!(
        event = "upgrade-spawned",
        generation = upgrader.generation,
        new_pid = pid,
        "started generation {next} as pid {pid}; waiting until it is ready"
    );
    let (channel, warnings, adopts) = match until_committed(&mut spawned, upgrader, cancel).await {
        Ok(committed) => committed,
        Err(e) => {
            // N is killed and its intermediate reaped before the failure is told: whoever asked
            // for the upgrade finds no trace of it.
            spawned.kill_and_wait().await;
            return Err(e);
        }
    };
    Ok(Successor {
        pid,
        generation: next,
        took: started.elapsed(),
        serving_since: Instant::now(),
        warnings,
        pass_on: spawned.pass_on.take().filter(|_| adopts),
        spawned,
        lines: channel.lines,
        write: channel.write,
        exit_watch: channel.exit_watch,
        channel_closed: false,
    })
}

/// Steps 3 and 4: N says it is ready (or fails, or the upgrade is called off), then O commits.
async fn until_committed(
    spawned: &mut Spawned,
    upgrader: &Upgrader,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<(OldEnd, Vec<String>, bool), UpgradeError> {
    let mut channel = OldEnd::open(spawned)?;
    let (warnings, adopts) = channel.wait_ready(spawned, upgrader, cancel).await?;
    if cancel.is_cancelled() {
        return Err(UpgradeError::CalledOff);
    }
    channel.commit(spawned.pid).await?;
    Ok((channel, warnings, adopts))
}

/// Step 2: the double fork ([`Upgrader::spawn`]), on the blocking pool.
async fn spawn_successor(
    upgrader: &Upgrader,
    started_usec: i128,
    counts: Counts,
) -> Result<Spawned, UpgradeError> {
    let cannot_start = |source| UpgradeError::Spawn {
        exe: upgrader.exe.clone(),
        source,
    };
    let launch = upgrader
        .prepare(started_usec, counts)
        .map_err(cannot_start)?;
    tokio::task::spawn_blocking(move || launch.launch())
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)))
        .map_err(cannot_start)
}

/// O's end of the handshake channel while N starts, and a watch on N's exit.
struct OldEnd {
    lines: BoundedLines<tokio::net::unix::OwnedReadHalf>,
    write: tokio::net::unix::OwnedWriteHalf,
    /// N's exit ends every wait, even when something else keeps the channel open.
    exit_watch: Option<tokio::io::unix::AsyncFd<OwnedFd>>,
}

impl OldEnd {
    fn open(spawned: &mut Spawned) -> Result<OldEnd, UpgradeError> {
        let channel = spawned
            .channel
            .try_clone()
            .and_then(|c| {
                c.set_nonblocking(true)?;
                tokio::net::UnixStream::from_std(c)
            })
            .map_err(UpgradeError::Channel)?;
        let (read, write) = channel.into_split();
        let exit_watch = spawned
            .pidfd
            .try_clone_fd()
            .ok()
            // SAFETY: the AsyncFd owns its copy of the pidfd, which stays open and unchanged
            // while registered.
            .and_then(|fd| unsafe { tokio::io::unix::AsyncFd::register(fd) }.ok());
        Ok(OldEnd {
            lines: BoundedLines::with_buffered(std::mem::take(&mut spawned.buffered), read),
            write,
            exit_watch,
        })
    }

    /// Step 3: N's first message (one that came with its pid counts) within the upgrade
    /// timeout: `ready` gives N's warnings and whether it adopts connections; anything else
    /// fails the upgrade.
    async fn wait_ready(
        &mut self,
        spawned: &Spawned,
        upgrader: &Upgrader,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<(Vec<String>, bool), UpgradeError> {
        let pid = spawned.pid;
        let first = tokio::time::timeout(upgrader.timeout, async {
            tokio::select! {
                _ = cancel.cancelled() => Err(io::Error::other("called off")),
                line = self.lines.next_line() => line,
                _ = exited(&mut self.exit_watch) => Ok(last_words(&mut self.lines).await),
            }
        })
        .await;
        let exe = || upgrader.exe.clone();
        match first {
            Err(_) => Err(UpgradeError::NotReady {
                pid,
                timeout: upgrader.timeout,
            }),
            Ok(Err(_)) if cancel.is_cancelled() => Err(UpgradeError::CalledOff),
            Ok(Err(source)) => Err(UpgradeError::HandshakeBroke { pid, source }),
            Ok(Ok(None)) => Err(UpgradeError::ExitedBeforeReady {
                pid,
                exe: exe(),
                how: None,
            }),
            Ok(Ok(Some(line))) => match NewToOld::parse(&line) {
                Some(NewToOld::Ready { warnings, adopts }) => Ok((warnings, adopts)),
                Some(NewToOld::ExecError(errno)) => Err(UpgradeError::Exec {
                    exe: exe(),
                    source: io::Error::from_raw_os_error(errno),
                }),
                Some(NewToOld::Error(message)) => Err(UpgradeError::StartFailed(message)),
                Some(NewToOld::Exit(status)) => Err(UpgradeError::ExitedBeforeReady {
                    pid,
                    exe: exe(),
                    how: Some(describe_exit(pid, status)),
                }),
                _ => Err(UpgradeError::Unexpected { pid, line }),
            },
        }
    }

    /// Step 4: `commit`, and N's `serving` within [`STEP_TIMEOUT`]. Not cancellable: N may
    /// hold connections as soon as it read the line.
    async fn commit(&mut self, pid: i32) -> Result<(), UpgradeError> {
        self.confirm_serving(pid)
            .await
            .map_err(|e| UpgradeError::NotConfirmed {
                pid,
                reason: e.to_string(),
            })
    }

    async fn confirm_serving(&mut self, pid: i32) -> io::Result<()> {
        self.write
            .write_all(OldToNew::Commit.to_line().as_bytes())
            .await?;
        // A line N wrote before it exited counts: look at the channel first.
        let answer = tokio::select! {
            // What N said comes first, even if it died right after saying it.
            biased;
            line = tokio::time::timeout(STEP_TIMEOUT, self.lines.next_line()) => Some(line),
            _ = exited(&mut self.exit_watch) => None,
        };
        let said = |line: &Option<String>| line.as_deref().and_then(NewToOld::parse);
        match answer {
            Some(Ok(Ok(line))) => match said(&line) {
                Some(NewToOld::Serving) => Ok(()),
                Some(NewToOld::Exit(status)) => Err(io::Error::other(format!(
                    "it {}",
                    describe_exit(pid, status)
                ))),
                _ => Err(io::Error::other(format!(
                    "it said {line:?} instead of serving"
                ))),
            },
            Some(Ok(Err(e))) => Err(e),
            Some(Err(_)) => Err(io::Error::other(format!(
                "no answer within {STEP_TIMEOUT:?}"
            ))),
            None => match said(&last_words(&mut self.lines).await) {
                // It served, then died: the probation that follows sees the death and rolls back.
                Some(NewToOld::Serving) => Ok(()),
                Some(NewToOld::Exit(status)) => Err(io::Error::other(format!(
                    "it {}",
                    describe_exit(pid, status)
                ))),
                _ => Err(io::Error::other("it exited")),
            },
        }
    }
}

/// The warnings N sent with `ready`, and whether it adopts connections:
/// `ready {"warnings":[...],"adopts":true}` (a plain `ready` has neither; an older O reads only
/// the first word).
fn ready_extra(extra: &str) -> (Vec<String>, bool) {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(extra) else {
        return (Vec::new(), false);
    };
    let warnings = v["warnings"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|w| w.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    (warnings, v["adopts"] == serde_json::Value::Bool(true))
}

/// Resolves once the watched process has exited (never without a watch).
async fn exited(watch: &mut Option<tokio::io::unix::AsyncFd<OwnedFd>>) {
    match watch {
        Some(watch) => {
            let _ = watch.readable().await;
        }
        None => std::future::pending().await,
    }
}

/// The line N (or its intermediate, with `exit <status>`) wrote just before N died, if any.
async fn last_words(lines: &mut BoundedLines<tokio::net::unix::OwnedReadHalf>) -> Option<String> {
    match tokio::time::timeout(Duration::from_millis(200), lines.next_line()).await {
        Ok(Ok(line)) => line,
        _ => None,
    }
}

/// "killed by SIGSEGV" or "exited with status 3", from a wait status as the intermediate
/// reports it.
fn describe_exit(pid: i32, status: u32) -> String {
    use nix::sys::wait::WaitStatus;
    let raw = status as i32;
    match WaitStatus::from_raw(nix::unistd::Pid::from_raw(pid), raw) {
        Ok(WaitStatus::Exited(_, code)) => format!("exited with status {code}"),
        Ok(WaitStatus::Signaled(_, signal, _)) => format!("was killed by {}", signal.as_str()),
        _ => format!("ended (wait status {raw})"),
    }
}

impl Successor {
    /// The next thing N does while on probation. Cancel-safe.
    pub async fn next_event(&mut self) -> SuccessorEvent {
        loop {
            let line = tokio::select! {
                line = self.lines.next_line(), if !self.channel_closed => line,
                _ = exited(&mut self.exit_watch) => {
                    let how = loop {
                        match last_words(&mut self.lines).await.as_deref().map(NewToOld::parse) {
                            Some(Some(NewToOld::Exit(status))) => break describe_exit(self.pid, status),
                            Some(_) => continue,
                            None => break "exited".to_owned(),
                        }
                    };
                    return SuccessorEvent::Exited(how);
                }
            };
            match line {
                Ok(Some(line)) => match NewToOld::parse(&line) {
                    Some(NewToOld::Promote) => return SuccessorEvent::AsksPromotion,
                    Some(NewToOld::Exit(status)) => {
                        return SuccessorEvent::Exited(describe_exit(self.pid, status))
                    }
                    _ => continue,
                },
                // N and its intermediate closed the channel: wait for N's exit itself.
                Ok(None) | Err(_) => {
                    self.channel_closed = true;
                    if self.exit_watch.is_none() {
                        return SuccessorEvent::Exited("closed the handshake channel".to_owned());
                    }
                }
            }
        }
    }

    /// Step 6: makes N the main pid. Releases the intermediate (so N is PID 1's or the
    /// subreaper's child), runs `hand_over_hook` (the pidfile names N), sends `MAINPID=N` and a
    /// `BARRIER=1`, silences this process towards the service manager and tells N `main`.
    /// The hook runs on the calling task: keep it short.
    ///
    /// An error comes before `MAINPID=` went out: N is killed (dropped) and O may take over
    /// again. After `MAINPID=` there is no way back (dropping the future then no longer kills
    /// N).
    pub async fn promote(
        mut self,
        hand_over_hook: impl FnOnce(i32) -> io::Result<()>,
    ) -> Result<HandedOver, UpgradeError> {
        let pid = self.pid;
        self.release_intermediate().await?;
        self.ensure_alive()?;
        hand_over_hook(pid).map_err(|source| UpgradeError::RecordPid { pid, source })?;
        self.name_main_pid().await?;
        notify::hand_over();
        self.tell_main().await;
        self.into_handed_over()
    }

    /// Releases and reaps the intermediate, so that N is PID 1's (or the nearest subreaper's)
    /// child before it is named the main pid. The reap waits: on the blocking pool.
    async fn release_intermediate(&mut self) -> Result<(), UpgradeError> {
        let Some(intermediate) = self.spawned.intermediate.take() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || intermediate.release_and_reap())
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)))
            .map_err(UpgradeError::ReapIntermediate)
    }

    /// N may have died just now, unseen by its released parent: it is not too late.
    fn ensure_alive(&self) -> Result<(), UpgradeError> {
        if self
            .spawned
            .pidfd
            .wait_exit(Duration::ZERO)
            .unwrap_or(false)
        {
            return Err(UpgradeError::ExitedDuringHandover { pid: self.pid });
        }
        Ok(())
    }

    /// `MAINPID=N`, then `BARRIER=1` (on the blocking pool: up to [`BARRIER_TIMEOUT`]).
    async fn name_main_pid(&mut self) -> Result<(), UpgradeError> {
        let pid = self.pid;
        // Under NotifyAccess=main only O may name the new main pid, and systemd must have
        // processed it before O exits, or it would consider the unit dead and kill N too.
        notify::main_pid(pid as u32).map_err(|source| UpgradeError::MainPid { pid, source })?;
        // The point of no return: MAINPID= is out. Dropped from here on, the future leaves N.
        self.spawned.promoted = true;
        // Without the barrier's answer it is unknown whether systemd took it; going on is the
        // lesser risk (killing N would leave a main pid that may be dead), so a silent barrier
        // is logged, not a reason to roll back.
        let barrier = tokio::task::spawn_blocking(|| notify::barrier(BARRIER_TIMEOUT))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)));
        if let Err(e) = barrier {
            tracing::warn!(
                event = "barrier-unconfirmed",
                new_pid = pid,
                "systemd did not confirm MAINPID={pid} within {BARRIER_TIMEOUT:?} ({e}); handing over all the same"
            );
        }
        // N died between the check before and the manager's processing of MAINPID=: the
        // manager refuses a dead pid, so this process is still the main pid and must take
        // over again rather than drain and exit 0 with nothing serving.
        if let Err(e) = self.ensure_alive() {
            self.spawned.promoted = false;
            return Err(e);
        }
        Ok(())
    }

    /// `main` to N, which sends `READY=1` on it; if N is gone by now, it is the service
    /// manager's to see (the main pid exited).
    async fn tell_main(&mut self) {
        let pid = self.pid;
        let line = OldToNew::Main.to_line();
        if let Err(e) = self.write.write_all(line.as_bytes()).await {
            tracing::warn!(
                new_pid = pid,
                "cannot tell pid {pid} that it is the main pid: {e}"
            );
        }
    }

    /// What O keeps of N after the handover.
    fn into_handed_over(self) -> Result<HandedOver, UpgradeError> {
        let pid = self.pid;
        let handle = self
            .spawned
            .pidfd
            .try_clone_fd()
            .map(ProcessHandle::from)
            .map_err(|source| UpgradeError::Pidfd { pid, source })?;
        let channel = self
            .lines
            .into_inner()
            .reunite(self.write)
            .map_err(|e| UpgradeError::Channel(io::Error::other(e)))?;
        Ok(HandedOver {
            pid,
            generation: self.generation,
            took: self.took,
            channel,
            handle,
        })
    }

    /// Stops N gracefully (a stop during the probation): `stop` on the channel, then up to
    /// `timeout` for N to drain and exit; what is left then is killed.
    pub async fn stop(mut self, timeout: Duration) {
        let line = OldToNew::Stop.to_line();
        if self.write.write_all(line.as_bytes()).await.is_ok() {
            let _ = tokio::time::timeout(timeout, exited(&mut self.exit_watch)).await;
        }
        self.kill().await;
    }

    /// Kills N and what it started, and reaps it (through its intermediate; the wait runs on
    /// the blocking pool).
    pub async fn kill(mut self) {
        if let Some(reap) = self.spawned.kill() {
            let _ = tokio::task::spawn_blocking(move || reap.run()).await;
        }
    }
}

fn monotonic_usec() -> i128 {
    match sd_notify::NotifyState::monotonic_usec_now() {
        Ok(sd_notify::NotifyState::MonotonicUsec(usec)) => usec,
        _ => 0,
    }
}

/// N's side of the channel.
pub struct Handshake {
    channel: StdUnixStream,
    /// N's end of the pair for passed-on connections, if O made one ([`crate::handoff`]).
    connections: Option<OwnedFd>,
    /// When O began the upgrade (CLOCK_MONOTONIC, µs).
    pub started_usec: Option<i128>,
}

/// What N learns at commit time.
pub struct Committed {
    /// The channel stays open until O exits; O reports its drain on it.
    pub channel: tokio::net::UnixStream,
    /// From the start of the upgrade in O to now.
    pub handoff: Option<Duration>,
}

impl Committed {
    /// Tells O that N accepts now. From then on O stands by on probation.
    pub async fn serving(mut self) -> io::Result<Predecessor> {
        let line = NewToOld::Serving.to_line();
        self.channel.write_all(line.as_bytes()).await?;
        let (read, write) = self.channel.into_split();
        Ok(Predecessor {
            lines: BoundedLines::new(read),
            write,
        })
    }
}

/// N's link to O after the commit.
pub struct Predecessor {
    lines: BoundedLines<tokio::net::unix::OwnedReadHalf>,
    write: tokio::net::unix::OwnedWriteHalf,
}

/// What O tells N after the commit.
#[derive(Debug, PartialEq, Eq)]
pub enum PredecessorEvent {
    /// The probation is over: N is the main pid and sends `READY=1`.
    Main,
    /// The service stops during the probation: N stops too.
    Stop,
    /// O drained its connections in `duration`, closing `forced` of them at its deadline.
    Drained { duration: Duration, forced: u64 },
    /// O is gone.
    Gone,
}

impl Predecessor {
    /// The next word from O. Cancel-safe.
    pub async fn next(&mut self) -> PredecessorEvent {
        loop {
            let line = match self.lines.next_line().await {
                Ok(Some(line)) => line,
                Ok(None) | Err(_) => return PredecessorEvent::Gone,
            };
            match OldToNew::parse(&line) {
                Some(OldToNew::Main) => return PredecessorEvent::Main,
                Some(OldToNew::Stop) => return PredecessorEvent::Stop,
                Some(OldToNew::Drained { duration, forced }) => {
                    return PredecessorEvent::Drained { duration, forced }
                }
                Some(OldToNew::Commit) | None => {}
            }
            tracing::debug!("ignored {line:?} from the previous generation");
        }
    }

    /// Asks O to end the probation now (N was asked for an upgrade itself).
    pub async fn ask_promotion(&mut self) -> io::Result<()> {
        let line = NewToOld::Promote.to_line();
        self.write.write_all(line.as_bytes()).await
    }
}

/// The most state bytes [`take_state_from_env`] takes (and [`Upgrader::spawn`] hands over).
pub const MAX_STATE: usize = 64 << 20;

/// N's side of [`Upgrader::set_state`]: the bytes the previous generation handed over in a
/// memfd announced in `BATON_STATE_FD`, if any. Removes the variable and closes the fd. Like
/// the other private variables it is honoured only when meant for this process
/// ([`crate::env::private_env_trusted`]); more than [`MAX_STATE`] bytes are refused.
///
/// # Safety
/// Changes the environment: call it before any other thread exists.
pub unsafe fn take_state_from_env() -> Result<Option<Vec<u8>>, EnvError> {
    // SAFETY: the caller promises that no other thread exists.
    let Some(fd) = (unsafe { crate::env::take_fd(STATE_FD_ENV) })? else {
        return Ok(None);
    };
    read_state(fd, STATE_FD_ENV.name(), MAX_STATE).map(Some)
}

/// Reads at most `max` bytes from the start of the state memfd (where O left its offset).
fn read_state(fd: OwnedFd, var: &str, max: usize) -> Result<Vec<u8>, EnvError> {
    use std::io::Read;
    let file = std::fs::File::from(fd);
    let too_large = |size| EnvError::StateTooLarge {
        var: var.to_owned(),
        size,
        max,
    };
    let unreadable = |source| EnvError::StateUnreadable {
        var: var.to_owned(),
        source,
    };
    let size = file.metadata().map_err(unreadable)?.len();
    if size > max as u64 {
        return Err(too_large(size));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    (&file)
        .take(max as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() > max {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// A sealed memfd holding `bytes`, its offset at the start: what N reads in
/// [`take_state_from_env`].
fn sealed_memfd(bytes: &[u8]) -> io::Result<OwnedFd> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use nix::sys::memfd::{memfd_create, MFdFlags};
    use std::io::{Seek, SeekFrom};
    let name = format!("{}-state", crate::env::identity().name);
    let fd = memfd_create(
        name.as_str(),
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)?;
    fcntl(
        &file,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_SEAL
                | SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_WRITE,
        ),
    )?;
    file.seek(SeekFrom::Start(0))?;
    Ok(file.into())
}

/// O's report of its drain to N, as [`Predecessor::next`] reads it.
pub fn drained_line(duration: Duration, forced: u64) -> String {
    OldToNew::Drained { duration, forced }.to_line()
}

impl Handshake {
    /// Takes the channel announced in `BATON_UPGRADE_FD`, if any, and removes the variables.
    ///
    /// # Safety
    /// Changes the environment: call it before any other thread exists.
    pub unsafe fn take_from_env() -> Result<Option<Handshake>, EnvError> {
        // SAFETY: the caller promises that no other thread exists.
        let trusted = unsafe { crate::env::init() };
        let started = std::env::var(UPGRADE_STARTED_ENV).ok().filter(|_| trusted);
        // SAFETY: as above.
        unsafe { std::env::remove_var(UPGRADE_STARTED_ENV) };
        // SAFETY: as above; the fd was handed to this process alone.
        let Some(fd) = (unsafe { crate::env::take_fd(UPGRADE_FD_ENV) })? else {
            return Ok(None);
        };
        let channel = StdUnixStream::from(fd);
        // SAFETY: as above.
        let connections = unsafe { crate::handoff::take_from_env(channel.as_raw_fd()) };
        Ok(Some(Handshake {
            channel,
            connections,
            started_usec: started.and_then(|s| s.parse().ok()),
        }))
    }

    /// The channel's fd.
    pub fn fd(&self) -> RawFd {
        self.channel.as_raw_fd()
    }

    /// The fds this process must keep: the channel's, and the pair's for passed-on connections.
    pub fn fds(&self) -> Vec<RawFd> {
        let connections = self.connections.as_ref().map(AsRawFd::as_raw_fd);
        std::iter::once(self.fd()).chain(connections).collect()
    }

    /// N's end of the pair on which O passes connections on, if O made one; take it to adopt
    /// them ([`crate::handoff::Adopted`]), and say so with [`Handshake::ready`]'s `adopts`.
    pub fn take_connections(&mut self) -> Option<OwnedFd> {
        self.connections.take()
    }

    /// Reports a startup failure to O, which relays it to whoever asked for the upgrade.
    pub fn fail(mut self, message: &str) {
        let mut message = message.replace('\n', "; ");
        if message.len() > MAX_LINE - 64 {
            let mut end = MAX_LINE - 64;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push_str(" [...]");
        }
        let line = NewToOld::Error(message).to_line();
        let _ = self.channel.write_all(line.as_bytes());
    }

    /// Says `ready` (with the start's `warnings`, which O relays to whoever asked for the
    /// upgrade, and whether this process adopts the connections O passes on) and waits for
    /// `commit`. An error means O is gone or refused: N must exit.
    pub async fn ready(self, warnings: &[String], adopts: bool) -> io::Result<Committed> {
        self.channel.set_nonblocking(true)?;
        let mut channel = tokio::net::UnixStream::from_std(self.channel)?;
        let ready = NewToOld::Ready {
            warnings: warnings.to_vec(),
            adopts,
        };
        channel.write_all(ready.to_line().as_bytes()).await?;
        let mut lines = BoundedLines::new(&mut channel);
        let line = lines.next_line().await?;
        if line.as_deref().and_then(OldToNew::parse) != Some(OldToNew::Commit) {
            return Err(io::Error::other(format!(
                "the old process ended the handshake ({:?})",
                line.as_deref().unwrap_or_default().trim_end()
            )));
        }
        let handoff = self.started_usec.map(|start| {
            Duration::from_micros(u64::try_from(monotonic_usec() - start).unwrap_or(0))
        });
        Ok(Committed { channel, handoff })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes one byte at `at` in a child process: how the child ended.
    fn write_in_child(at: *mut u8) -> nix::sys::wait::WaitStatus {
        // SAFETY: the child makes only a volatile write and _exit, both async-signal-safe.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => unsafe {
                at.write_volatile(1);
                libc::_exit(0)
            },
            nix::unistd::ForkResult::Parent { child } => {
                nix::sys::wait::waitpid(child, None).unwrap()
            }
        }
    }

    #[test]
    fn the_successors_stack_has_a_guard_page_below_it() {
        use nix::sys::wait::WaitStatus;
        let mut stack = SuccessorStack::new().unwrap();
        let usable = stack.usable();
        assert_eq!(usable.len(), SUCCESSOR_STACK);
        // The whole stack is writable, its lowest byte and its highest.
        usable[0] = 1;
        usable[SUCCESSOR_STACK - 1] = 1;
        let lowest = usable.as_mut_ptr();
        assert!(matches!(write_in_child(lowest), WaitStatus::Exited(_, 0)));
        // One byte below it, an overflow's first write, kills the writer.
        let below = lowest.wrapping_sub(1);
        assert!(matches!(
            write_in_child(below),
            WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGSEGV, _)
        ));
    }

    #[test]
    fn handshake_lines_are_bounded() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let ok = "a".repeat(MAX_LINE);
            let input = format!("ready\r\n{ok}\n{ok}b\nnever");
            let mut lines = BoundedLines::new(input.as_bytes());
            assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("ready"));
            assert_eq!(lines.next_line().await.unwrap(), Some(ok.clone()));
            let e = lines.next_line().await.unwrap_err();
            assert!(e.to_string().contains("longer than 4096 bytes"), "{e}");
            let mut last = BoundedLines::new(&b"partial"[..]);
            assert_eq!(last.next_line().await.unwrap().as_deref(), Some("partial"));
            assert_eq!(last.next_line().await.unwrap(), None);
        });
        let mut line = String::new();
        let input = format!("{}\n", "p".repeat(MAX_LINE));
        let mut reader = std::io::BufReader::new(input.as_bytes());
        read_bounded_line(&mut reader, &mut line).unwrap();
        let input = "p".repeat(MAX_LINE + 1);
        let mut reader = std::io::BufReader::new(input.as_bytes());
        assert!(read_bounded_line(&mut reader, &mut String::new()).is_err());
    }

    /// Releases `intermediate` on another thread; how long the reap took, or None after 15 s.
    fn release_timed(intermediate: Intermediate) -> Option<Duration> {
        let (done, took) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let start = Instant::now();
            intermediate.release_and_reap().unwrap();
            let _ = done.send(start.elapsed());
        });
        took.recv_timeout(Duration::from_secs(15)).ok()
    }

    /// An intermediate exits when released (EOF on its pipe), and is reaped at once.
    #[test]
    fn a_released_intermediate_is_reaped_at_once() {
        let (go_read, go_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        // Reaped by the `Intermediate` under test (waitpid on its pid).
        #[allow(clippy::zombie_processes)]
        let child = std::process::Command::new("cat")
            .stdin(std::process::Stdio::from(go_read))
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id() as libc::pid_t;
        let took = release_timed(Intermediate {
            pid,
            go: Some(go_write),
        })
        .expect("the reap hung");
        assert!(took < RELEASE_WAIT, "{took:?}");
        assert_eq!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        );
    }

    /// An intermediate that does not exit when released (it still waits for a N that never
    /// reached its execve) is killed after `RELEASE_WAIT`: the reap cannot hang O's stop.
    #[test]
    fn an_intermediate_that_does_not_exit_is_killed_not_waited_for() {
        let (_go_read, go_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        // Reaped by the `Intermediate` under test (waitpid on its pid).
        #[allow(clippy::zombie_processes)]
        let child = std::process::Command::new("sleep")
            .arg("600")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let pid = nix::unistd::Pid::from_raw(child.id() as libc::pid_t);
        let took = release_timed(Intermediate {
            pid: pid.as_raw(),
            go: Some(go_write),
        });
        if took.is_none() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        let took = took.expect("the reap hung on an intermediate that does not exit");
        assert!(took >= RELEASE_WAIT && took < RELEASE_WAIT * 3, "{took:?}");
        assert_eq!(
            nix::sys::signal::kill(pid, None),
            Err(nix::errno::Errno::ESRCH)
        );
    }

    /// N's next messages may come with its pid line: whatever the pid reader took in beyond it
    /// (a whole line, a part of one, or the start of an endless one) must be read as if it had
    /// never been taken in.
    #[test]
    fn what_came_with_the_pid_is_read_first() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let endless = "a".repeat(3 * MAX_LINE);
        let cases: [(&str, &[&str], Result<&str, &str>); 5] = [
            ("ready\npid 7\n", &[], Ok("ready")),
            ("pid 7\nexec-error 2\nexit 256\n", &[], Ok("exec-error 2")),
            ("pid 7\nerr", &["or x\n"], Ok("error x")),
            ("pid 7\n", &["ready\n"], Ok("ready")),
            ("pid 7\n", &[&endless], Err("longer than 4096 bytes")),
        ];
        for (with_pid, later, expected) in cases {
            let (mut new, old) = StdUnixStream::pair().unwrap();
            let input = format!("{with_pid}{}", later.concat());
            let (pid, buffered, old) = if later.is_empty() || later[0].len() > MAX_LINE {
                // Everything is there before the pid reader starts, so it takes it all in.
                std::io::Write::write_all(&mut new, input.as_bytes()).unwrap();
                read_successor_pid(old).unwrap()
            } else {
                std::io::Write::write_all(&mut new, with_pid.as_bytes()).unwrap();
                let read = read_successor_pid(old).unwrap();
                std::io::Write::write_all(&mut new, later.concat().as_bytes()).unwrap();
                read
            };
            assert_eq!(pid, 7, "{with_pid:?}");
            old.set_nonblocking(true).unwrap();
            let got = rt.block_on(async {
                let old = tokio::net::UnixStream::from_std(old).unwrap();
                BoundedLines::with_buffered(buffered, old)
                    .next_line()
                    .await
                    .map(Option::unwrap)
                    .map_err(|e| e.to_string())
            });
            match expected {
                Ok(line) => assert_eq!(got.as_deref(), Ok(line), "{with_pid:?}"),
                Err(e) => assert!(got.as_ref().unwrap_err().contains(e), "{got:?}"),
            }
        }
    }

    #[test]
    fn messages_round_trip_and_junk_is_refused() {
        let from_new = [
            (NewToOld::Pid(4194304), "pid 4194304"),
            (NewToOld::ForkFailed(11), "fork-failed 11"),
            (NewToOld::Exit(9), "exit 9"),
            (NewToOld::ExecError(2), "exec-error 2"),
            (NewToOld::Error("no config: x".into()), "error no config: x"),
            (NewToOld::Error(String::new()), "error "),
            (
                NewToOld::Ready {
                    warnings: vec![],
                    adopts: false,
                },
                "ready",
            ),
            (
                NewToOld::Ready {
                    warnings: vec!["a \"b\"".into(), "c".into()],
                    adopts: false,
                },
                r#"ready {"warnings":["a \"b\"","c"]}"#,
            ),
            (
                NewToOld::Ready {
                    warnings: vec!["w".into()],
                    adopts: true,
                },
                r#"ready {"adopts":true,"warnings":["w"]}"#,
            ),
            (NewToOld::Serving, "serving"),
            (NewToOld::Promote, "promote"),
        ];
        for (message, line) in from_new {
            assert_eq!(message.to_string(), line);
            assert_eq!(message.to_line(), format!("{line}\n"));
            assert_eq!(NewToOld::parse(line), Some(message), "{line:?}");
        }
        // What older and newer peers may send and is read all the same.
        assert_eq!(
            NewToOld::parse("error"),
            Some(NewToOld::Error(String::new()))
        );
        assert_eq!(
            NewToOld::parse("ready {\"later\":1}"),
            Some(NewToOld::Ready {
                warnings: vec![],
                adopts: false
            })
        );
        // Only `true` adopts.
        assert_eq!(
            NewToOld::parse("ready {\"adopts\":\"yes\"}"),
            Some(NewToOld::Ready {
                warnings: vec![],
                adopts: false
            })
        );
        for junk in [
            "",
            "pid",
            "pid x",
            "pid 1 2",
            "exit",
            "exit -1",
            "exec-error",
            "exec-error e",
            "serving now",
            "Serving",
            "promote ",
            "readyx",
            "commit",
            "hello",
        ] {
            assert_eq!(NewToOld::parse(junk), None, "{junk:?}");
        }

        let from_old = [
            (OldToNew::Commit, "commit"),
            (OldToNew::Main, "main"),
            (OldToNew::Stop, "stop"),
            (
                OldToNew::Drained {
                    duration: Duration::from_millis(1500),
                    forced: 3,
                },
                "drained 1500 3",
            ),
        ];
        for (message, line) in from_old {
            assert_eq!(message.to_string(), line);
            assert_eq!(message.to_line(), format!("{line}\n"));
            assert_eq!(OldToNew::parse(line), Some(message), "{line:?}");
        }
        assert_eq!(
            drained_line(Duration::from_millis(7), 0),
            "drained 7 0\n",
            "the drain report keeps its format"
        );
        assert_eq!(
            OldToNew::parse("drained 7 0 later"),
            Some(OldToNew::Drained {
                duration: Duration::from_millis(7),
                forced: 0
            })
        );
        for junk in [
            "",
            "commit now",
            "main ",
            "stop x",
            "drained",
            "drained 1",
            "drained x 1",
            "drained 1 -1",
            "ready",
            "MAIN",
        ] {
            assert_eq!(OldToNew::parse(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn the_words_written_without_allocation_parse() {
        let mut buf = [0u8; 32];
        for (word, expected) in [
            (PID_WORD, NewToOld::Pid(77)),
            (EXIT_WORD, NewToOld::Exit(77)),
            (EXEC_ERROR_WORD, NewToOld::ExecError(77)),
            (FORK_FAILED_WORD, NewToOld::ForkFailed(77)),
        ] {
            let mut n = copy(&mut buf, 0, word.as_bytes());
            n += write_decimal(&mut buf[n..], 77);
            let line = std::str::from_utf8(&buf[..n]).unwrap();
            assert_eq!(NewToOld::parse(line), Some(expected));
        }
    }

    #[test]
    fn state_goes_through_a_sealed_memfd() {
        let bytes: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
        let fd = sealed_memfd(&bytes).unwrap();
        let copy = fd.try_clone().unwrap();
        // Sealed: nobody changes it on its way.
        assert!(nix::unistd::write(&copy, b"x").is_err());
        assert_eq!(read_state(fd, "STATE", MAX_STATE).unwrap(), bytes);
        let empty = sealed_memfd(b"").unwrap();
        assert_eq!(read_state(empty, "STATE", MAX_STATE).unwrap(), b"");
        let e = read_state(sealed_memfd(b"12345").unwrap(), "STATE", 4).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the state handed over in STATE has 5 bytes or more; at most 4 are taken"
        );
    }

    #[test]
    fn errors_print_the_reasons_as_before() {
        let e = UpgradeError::ExitedBeforeReady {
            pid: 12,
            exe: PathBuf::from("/usr/bin/baton"),
            how: None,
        };
        assert_eq!(
            e.to_string(),
            "the new process (pid 12, /usr/bin/baton) exited before it was ready"
        );
        let e = UpgradeError::NotReady {
            pid: 12,
            timeout: Duration::from_secs(90),
        };
        assert_eq!(
            e.to_string(),
            "the new process (pid 12) was not ready within 1m 30s; killed it"
        );
        let e = EnvError::NotAnFd {
            var: "BATON_UPGRADE_FD".into(),
            value: "x".into(),
        };
        assert_eq!(e.to_string(), "BATON_UPGRADE_FD=\"x\" is not an open fd");
    }

    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Whether `pid` is gone (reaped), waiting up to 10 s.
    fn gone(pid: i32) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
                == Err(nix::errno::Errno::ESRCH)
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn start_fails_fast_on_a_current_thread_runtime() {
        let upgrader = Upgrader::new(
            PathBuf::from("/nonexistent/baton-upgrade-test"),
            1,
            Duration::from_secs(30),
        );
        let cancel = tokio_util::sync::CancellationToken::new();
        let began = Instant::now();
        let e = current_thread()
            .block_on(start(&upgrader, Counts::default(), &cancel))
            .err()
            .expect("no such executable");
        assert!(matches!(e, UpgradeError::Exec { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "cannot execute /nonexistent/baton-upgrade-test: No such file or directory (os error 2)"
        );
        assert!(began.elapsed() < Duration::from_secs(10));
    }

    /// This very test binary as N, running only [`successor_generation`].
    fn test_binary_upgrader() -> Upgrader {
        let mut upgrader =
            Upgrader::new(std::env::current_exe().unwrap(), 1, Duration::from_secs(30));
        upgrader.args = [
            "upgrade::tests::successor_generation",
            "--exact",
            "--test-threads=1",
            "-q",
        ]
        .map(OsString::from)
        .to_vec();
        upgrader
    }

    /// N for the tests below: takes the state, says `ready` with it as its warning, serves,
    /// and exits when O says `main` or `stop`, or goes. Without a handshake (a plain test
    /// run) it does nothing.
    #[test]
    fn successor_generation() {
        if std::env::var_os(UPGRADE_FD_ENV).is_none() {
            return;
        }
        // SAFETY: this process runs this one test (`--test-threads=1`) and has started no
        // thread of its own yet.
        let state = unsafe { take_state_from_env() }.unwrap();
        // SAFETY: as above.
        let handshake = unsafe { Handshake::take_from_env() }.unwrap().unwrap();
        current_thread().block_on(async {
            let warning = match state {
                Some(bytes) => format!("state: {}", String::from_utf8_lossy(&bytes)),
                None => "no state".to_owned(),
            };
            let committed = handshake.ready(&[warning], false).await.unwrap();
            let mut predecessor = committed.serving().await.unwrap();
            loop {
                if let PredecessorEvent::Main | PredecessorEvent::Stop | PredecessorEvent::Gone =
                    predecessor.next().await
                {
                    std::process::exit(0);
                }
            }
        });
    }

    #[test]
    fn a_successor_gets_the_state_and_is_killed_on_a_current_thread_runtime() {
        let upgrader = test_binary_upgrader();
        upgrader.set_state(b"generation one was here".to_vec());
        let cancel = tokio_util::sync::CancellationToken::new();
        let pid = current_thread().block_on(async {
            let successor = start(&upgrader, Counts::default(), &cancel).await.unwrap();
            assert_eq!(successor.warnings, ["state: generation one was here"]);
            assert_eq!(successor.generation, 2);
            let pid = successor.pid;
            successor.kill().await;
            pid
        });
        assert!(gone(pid), "pid {pid} still there after the kill");

        // Without a state, and dropped rather than killed.
        upgrader.clear_state();
        let runtime = current_thread();
        let pid = runtime.block_on(async {
            let successor = start(&upgrader, Counts::default(), &cancel).await.unwrap();
            assert_eq!(successor.warnings, ["no state"]);
            successor.pid
            // dropped here, inside the runtime
        });
        drop(runtime);
        assert!(gone(pid), "pid {pid} still there after the drop");
    }

    #[test]
    fn decimal_without_allocation() {
        let mut buf = [0u8; 24];
        for n in [0u64, 7, 10, 4194304, u64::MAX] {
            let len = write_decimal(&mut buf, n);
            assert_eq!(&buf[..len], n.to_string().as_bytes());
        }
    }

    #[test]
    fn counts_round_trip_through_the_environment_format() {
        let counts = Counts {
            ok: 7,
            failed: 2,
            rolled_back: 1,
        };
        assert_eq!(Counts::parse(&counts.to_env()), Some(counts));
        for bad in ["", "1:2", "1:2:x", "1:2:3:4", "-1:0:0"] {
            assert_eq!(Counts::parse(bad), None, "{bad:?}");
        }
    }
}
