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
//! 2. O double-forks ([`Upgrader::spawn`]): the intermediate (I) reports N's pid on the handshake
//!    channel; O opens a pidfd for N (which cannot be recycled meanwhile: N is I's child, and I
//!    leaves it unreaped until O says it holds the pidfd). I stays N's parent during the
//!    probation: if N dies, I reaps it and reports `exit <wait status>`. N runs in a process
//!    group of its own, gets the sockets at fds `3..` with `LISTEN_FDS`, `LISTEN_FDNAMES` and
//!    its own `LISTEN_PID`, the handshake channel at the next fd (`BATON_UPGRADE_FD`), and
//!    `BATON_GENERATION` one higher.
//! 3. N starts (fresh config, sockets, server) without accepting and without notifying, then
//!    says `ready`. Anything that goes wrong in N before that is reported as `error <message>`.
//! 4. O says `commit`; N starts accepting and says `serving`. Up to the commit a stop calls the
//!    upgrade off.
//! 5. O stops accepting (its copies of the sockets stay open), drains, and stands by as the
//!    main pid for the probation, watching N's pidfd.
//! 6. The probation passed ([`Successor::promote`]): O releases and reaps I, so N is PID 1's
//!    child (or the nearest subreaper's) before it is ever named the main pid; sends
//!    `MAINPID=N` and a `BARRIER=1`; says `main`, and is silent towards systemd from then on
//!    ([`crate::notify::hand_over`]). N sends `READY=1` + `STATUS=`. `MAINPID=` is the point
//!    of no return. O finishes its drain, reports `drained <ms> <forced>` to N (for N's
//!    metrics), and exits 0.
//!    N died on probation ([`SuccessorEvent::Exited`]): O kills N's group and serves again.
//!
//! Messages on the channel are text lines. N → O: `pid <n>` and `exit <status>` (from I),
//! `exec-error <errno>`, `error <text>`, `ready` (or `ready {"warnings":[..]}`), `serving`, `promote` (N was asked to
//! upgrade: end my probation). O → N: `commit`, `main`, `stop`, `drained <ms> <forced>`.
//!
//! Before `commit` N accepts nothing, so killing it loses no request; a guard kills N on every
//! path that does not reach `MAINPID=` (timeout, error, SIGTERM, rollback, a dropped task).

use crate::env::Var;
use std::ffi::{CString, OsStr, OsString};
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::activation::Listener;
use crate::control::ProcessHandle;
use crate::notify;

/// The environment variable that carries N's end of the handshake channel.
pub const UPGRADE_FD_ENV: Var = Var::UPGRADE_FD;
/// CLOCK_MONOTONIC in microseconds when O began the upgrade, so that N can measure the handoff.
pub const UPGRADE_STARTED_ENV: Var = Var::UPGRADE_STARTED_USEC;
/// Upgrades counted so far by result, carried from generation to generation.
pub const UPGRADES_ENV: Var = Var::UPGRADES;

/// Names the pid that baton's private variables ([`PRIVATE_VARS`]) are meant for, as
/// `LISTEN_PID` does for the `LISTEN_*` variables: whoever sets them (an old generation for its
/// successor, the keeper for a generation or for its own re-exec) sets this too, to the pid of
/// the process that will read them.
pub const FOR_PID_ENV: Var = Var::FOR_PID;

/// baton's private variables: honoured only when meant for this very process
/// ([`private_env_trusted`]).
pub static PRIVATE_VARS: std::sync::LazyLock<[&str; 9]> = std::sync::LazyLock::new(|| {
    [
        UPGRADE_FD_ENV.name(),
        UPGRADE_STARTED_ENV.name(),
        UPGRADES_ENV.name(),
        crate::generation::GENERATION_ENV.name(),
        crate::pidfile::PIDFILE_FD_ENV.name(),
        crate::keeper::KEEPER_PID_ENV.name(),
        crate::keeper::RESTARTS_ENV.name(),
        crate::keeper::REPORT_FD_ENV.name(),
        crate::keeper::STATE_ENV.name(),
    ]
});

static TRUSTED: std::sync::OnceLock<(bool, Vec<String>)> = std::sync::OnceLock::new();

/// Whether baton's private variables ([`PRIVATE_VARS`]) are meant for this process. They are
/// when `BATON_FOR_PID` is this process's pid; without `BATON_FOR_PID` (set by baton builds
/// before it existed) when `LISTEN_PID` is, as an upgrade and the keeper always set it, or, for
/// the keeper's own re-exec, when the state names a child of this process as the main pid.
/// Otherwise (stray values inherited by a plain launch) they are removed from the environment
/// and ignored; [`report_ignored_private_env`] logs them once logging works.
///
/// The first call decides (and removes `BATON_FOR_PID`); later calls return the same answer.
///
/// # Safety contract
/// The first call changes the environment: make it before any other thread exists (every
/// reader of the variables calls it, and `baton serve` calls it first thing).
pub fn private_env_trusted() -> bool {
    TRUSTED
        .get_or_init(|| {
            let pid = std::process::id();
            let names_us = |var: &str| {
                std::env::var(var)
                    .ok()
                    .and_then(|v| v.trim().parse::<u32>().ok())
                    == Some(pid)
            };
            let trusted = match std::env::var_os(FOR_PID_ENV) {
                Some(_) => names_us(FOR_PID_ENV.name()),
                None => names_us("LISTEN_PID") || crate::keeper::legacy_state_is_ours(),
            };
            // SAFETY (of the contract above): no other thread reads the environment yet.
            unsafe { std::env::remove_var(FOR_PID_ENV) };
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

/// Logs the private variables [`private_env_trusted`] ignored, if any. Call once logging works.
pub fn report_ignored_private_env() {
    if let Some((_, ignored)) = TRUSTED.get() {
        if !ignored.is_empty() {
            tracing::info!(
                event = "private-env-ignored",
                "ignored {} (not meant for this process, pid {}: {FOR_PID_ENV} does not name it)",
                ignored.join(" "),
                std::process::id()
            );
        }
    }
}

/// Variables of O's environment that N must not inherit as they are.
pub(crate) static PRIVATE_ENV: std::sync::LazyLock<[&str; 12]> = std::sync::LazyLock::new(|| {
    [
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "LISTEN_PIDFDID",
        crate::activation::SOCKET_UNITS_ENV.name(),
        "WATCHDOG_PID", // names O; without it the watchdog applies to whichever pid reads it
        crate::generation::GENERATION_ENV.name(),
        UPGRADE_FD_ENV.name(),
        UPGRADE_STARTED_ENV.name(),
        UPGRADES_ENV.name(),
        crate::pidfile::PIDFILE_FD_ENV.name(),
        FOR_PID_ENV.name(),
    ]
});

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
    reader: tokio::io::BufReader<R>,
    partial: Vec<u8>,
}

impl<R: tokio::io::AsyncRead + Unpin> BoundedLines<R> {
    pub fn new(read: R) -> BoundedLines<R> {
        BoundedLines {
            reader: tokio::io::BufReader::new(read),
            partial: Vec::new(),
        }
    }

    /// The next line without its `\n` (or `\r\n`); `None` at the end; an error for a line
    /// longer than [`MAX_LINE`] or not UTF-8.
    pub async fn next_line(&mut self) -> io::Result<Option<String>> {
        use tokio::io::AsyncBufReadExt;
        loop {
            let available = self.reader.fill_buf().await?;
            let (taken, done) = match available.iter().position(|b| *b == b'\n') {
                Some(i) => (i + 1, true),
                None if available.is_empty() => (0, true),
                None => (available.len(), false),
            };
            if self.partial.len() + taken > MAX_LINE + 1 {
                return Err(line_too_long());
            }
            self.partial.extend_from_slice(&available[..taken]);
            self.reader.consume(taken);
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
        private_env_trusted();
        std::env::var(UPGRADES_ENV)
            .ok()
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
        }
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

    /// Double-forks N (see the module docs) and returns once the intermediate is reaped, so N
    /// is no longer our descendant. Blocking; call it off the async workers.
    pub fn spawn(&self, started_usec: i128, counts: Counts) -> io::Result<Spawned> {
        let (parent_end, child_end) = StdUnixStream::pair()?; // both CLOEXEC
        let n_sockets = self.sockets.len();
        let mut fds: Vec<RawFd> = self.sockets.iter().map(|l| l.as_fd().as_raw_fd()).collect();
        fds.extend(self.extra.iter().map(|(fd, _)| fd.as_raw_fd()));
        fds.push(child_end.as_raw_fd());
        let first = 3;
        let channel_fd = first + fds.len() as RawFd - 1;

        let mut env: Vec<Vec<u8>> = std::env::vars_os()
            .filter(|(k, _)| !PRIVATE_ENV.iter().any(|p| OsStr::new(p) == k))
            .map(|(k, v)| [k.as_bytes(), b"=", v.as_bytes()].concat())
            .collect();
        let names: Vec<String> = self.sockets.iter().map(Listener::handover_name).collect();
        env.push(format!("LISTEN_FDS={n_sockets}").into_bytes());
        env.push(format!("LISTEN_FDNAMES={}", names.join(":")).into_bytes());
        if self.sockets.iter().any(|l| l.unit.is_some()) {
            let units: Vec<&str> = self
                .sockets
                .iter()
                .map(|l| l.unit.as_deref().unwrap_or(""))
                .collect();
            env.push(
                format!(
                    "{}={}",
                    crate::activation::SOCKET_UNITS_ENV,
                    units.join("/")
                )
                .into_bytes(),
            );
        }
        for (i, (_, var)) in self.extra.iter().enumerate() {
            env.push(format!("{var}={}", first as usize + n_sockets + i).into_bytes());
        }
        env.push(
            format!(
                "{}={}",
                crate::generation::GENERATION_ENV,
                self.generation + 1
            )
            .into_bytes(),
        );
        env.push(format!("{UPGRADE_FD_ENV}={channel_fd}").into_bytes());
        env.push(format!("{UPGRADE_STARTED_ENV}={started_usec}").into_bytes());
        env.push(format!("{UPGRADES_ENV}={}", counts.to_env()).into_bytes());
        let exec = ExecPlan::new(&self.exe, &self.args, env, fds)?;
        // The intermediate waits for EOF on this pipe before it exits: until then a dead N stays
        // its unreaped zombie, so N's pid cannot be recycled before O holds a pidfd for it.
        let (go_read, go_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;

        // No signal handler may run in the children: tokio's would report the signal to this
        // process through the pipe they share. Block everything around the fork; N resets the
        // handlers before it unblocks.
        let all = nix::sys::signal::SigSet::all();
        let mut previous = nix::sys::signal::SigSet::empty();
        nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_SETMASK,
            Some(&all),
            Some(&mut previous),
        )?;
        // SAFETY: see ExecPlan::fork_and_exec.
        let forked = unsafe {
            exec.fork_and_exec(
                child_end.as_raw_fd(),
                go_read.as_raw_fd(),
                go_write.as_raw_fd(),
            )
        };
        nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_SETMASK,
            Some(&previous),
            None,
        )?;
        let intermediate = Intermediate {
            pid: forked?,
            go: Some(go_write),
        };
        drop((child_end, go_read));
        parent_end.set_read_timeout(Some(STEP_TIMEOUT))?;
        let mut reader = BufReader::new(parent_end);
        // The intermediate's `pid <n>` and N's first message (`exec-error`, `error`, even
        // `ready`) race: take them in either order. N sends one line before it needs an answer.
        let mut early = None;
        let pid = loop {
            let mut line = String::new();
            read_bounded_line(&mut reader, &mut line)?;
            let line = line.trim_end();
            match line.strip_prefix("pid ").map(str::parse::<i32>) {
                Some(Ok(pid)) if pid > 0 => break pid,
                _ if !line.is_empty() && early.is_none() => early = Some(line.to_owned()),
                _ => {
                    return Err(io::Error::other(format!(
                        "the intermediate process could not fork N: {line:?}"
                    )))
                }
            }
        };
        // N writes whole lines in one write each: what the reader holds beyond the pid line is
        // a message of N's, e.g. its exec error.
        if early.is_none() {
            early = String::from_utf8_lossy(reader.buffer())
                .lines()
                .next()
                .map(str::to_owned);
        }
        // From now on N is killed through a pidfd, which cannot hit a recycled pid: N stays
        // the intermediate's child (a zombie at worst) until the intermediate is released.
        let pidfd = ProcessHandle::open(pid as u32)?;
        intermediate.holds_pidfd()?;
        let channel = reader.into_inner();
        channel.set_read_timeout(None)?;
        Ok(Spawned {
            pid,
            pidfd,
            intermediate: Some(intermediate),
            channel,
            early,
            promoted: false,
        })
    }
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

    fn reap(&self) -> io::Result<()> {
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
    /// A message from N that came before its pid.
    early: Option<String>,
    promoted: bool,
}

/// How long a killed N may take to die before its intermediate is released all the same.
const KILL_WAIT: Duration = Duration::from_secs(2);

impl Drop for Spawned {
    fn drop(&mut self) {
        if self.promoted {
            return;
        }
        // Waiting for N's death blocks: off the async workers when on them.
        let in_workers = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if in_workers {
            tokio::task::block_in_place(|| self.kill_and_reap());
        } else {
            self.kill_and_reap();
        }
    }
}

impl Spawned {
    fn kill_and_reap(&mut self) {
        // N runs in a process group of its own: whatever it started goes with it, and none of
        // it keeps a copy of the listening sockets. The group cannot be a recycled one: N's
        // pid stays reserved while N is the intermediate's unreaped child or the group has
        // members.
        // SAFETY: plain syscall.
        unsafe { libc::kill(-self.pid, libc::SIGKILL) };
        self.pidfd.kill();
        // The intermediate reaps N once it is dead (and says how); a N that takes longer to die
        // is left to the reaper: releasing the intermediate (EOF on its pipe) ends its wait,
        // and then it is reaped here.
        let _ = self.pidfd.wait_exit(KILL_WAIT);
        drop(self.intermediate.take());
    }
}

/// Everything `execve` needs, allocated before the fork: between fork and exec in a threaded
/// process only async-signal-safe calls are allowed, so nothing may allocate there.
struct ExecPlan {
    path: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _env: Vec<Vec<u8>>,
    envp: Vec<*const libc::c_char>,
    /// `LISTEN_PID=` followed by room for the digits: a leaked box (freed in Drop) that only
    /// raw pointers touch, because N writes its pid into it after the fork.
    listen_pid: *mut [u8],
    /// `BATON_FOR_PID=` and room for the digits, likewise.
    for_pid: *mut [u8],
    fds: Vec<RawFd>,
}

impl Drop for ExecPlan {
    fn drop(&mut self) {
        // SAFETY: allocated by Box::into_raw in ExecPlan::new and freed only here.
        drop(unsafe { Box::from_raw(self.listen_pid) });
        // SAFETY: likewise.
        drop(unsafe { Box::from_raw(self.for_pid) });
    }
}

/// The most fds N can be handed (sockets, the pidfile, the channel).
const MAX_FDS: usize = 64;

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";
const FOR_PID_PREFIX: &[u8] = b"BATON_FOR_PID=";
/// Room for any pid's digits; the byte after them stays NUL.
const LISTEN_PID_DIGITS: usize = 20;

impl ExecPlan {
    fn new(
        exe: &Path,
        args: &[OsString],
        env: Vec<Vec<u8>>,
        fds: Vec<RawFd>,
    ) -> io::Result<ExecPlan> {
        let cstr = |b: &[u8]| {
            CString::new(b).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "NUL byte in an argument or the environment",
                )
            })
        };
        let path = cstr(exe.as_os_str().as_bytes())?;
        let mut argv = vec![path.clone()];
        for a in args {
            argv.push(cstr(a.as_bytes())?);
        }
        let argv_ptrs = argv
            .iter()
            .map(|a| a.as_ptr())
            .chain([std::ptr::null()])
            .collect();
        let env: Vec<Vec<u8>> = env
            .into_iter()
            .map(|mut e| {
                e.push(0);
                e
            })
            .collect();
        if env.iter().any(|e| e[..e.len() - 1].contains(&0)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "NUL byte in the environment",
            ));
        }
        if fds.len() > MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} fds to hand over; at most {MAX_FDS}", fds.len()),
            ));
        }
        let slot = |prefix: &[u8]| {
            let mut slot = prefix.to_vec();
            slot.resize(prefix.len() + LISTEN_PID_DIGITS + 1, 0);
            Box::into_raw(slot.into_boxed_slice())
        };
        let listen_pid = slot(LISTEN_PID_PREFIX);
        let for_pid = slot(FOR_PID_PREFIX);
        let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr().cast()).collect();
        envp.push(listen_pid.cast::<libc::c_char>().cast_const());
        envp.push(for_pid.cast::<libc::c_char>().cast_const());
        envp.push(std::ptr::null());
        Ok(ExecPlan {
            path,
            _argv: argv,
            argv_ptrs,
            _env: env,
            envp,
            listen_pid,
            for_pid,
            fds,
        })
    }

    /// Forks the intermediate, which forks N, reports `pid <N>` on `channel`, waits for EOF on
    /// `go` and exits. Returns the intermediate's pid.
    ///
    /// # Safety
    /// The children run only async-signal-safe code (fork, fcntl, dup2, close, read, sigprocmask,
    /// sigaction, getpid, write, execve, _exit) on memory prepared before the fork. Call it with
    /// every signal blocked.
    unsafe fn fork_and_exec(
        &self,
        channel: RawFd,
        go: RawFd,
        go_write: RawFd,
    ) -> io::Result<libc::pid_t> {
        match libc::fork() {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                let pid = libc::fork();
                if pid == 0 {
                    self.exec_in_child(channel);
                }
                let mut buf = [0u8; 32];
                let n = if pid > 0 {
                    let mut n = copy(&mut buf, 0, b"pid ");
                    n += write_decimal(&mut buf[n..], pid as u64);
                    n
                } else {
                    let mut n = copy(&mut buf, 0, b"fork-failed ");
                    n += write_decimal(&mut buf[n..], *libc::__errno_location() as u64);
                    n
                };
                buf[n] = b'\n';
                libc::write(channel, buf.as_ptr().cast(), n + 1);
                if pid > 0 {
                    // This process's own copy of the write end must go first, or no EOF would
                    // come; N's copy goes at its exec. Every other fd of O goes too (client
                    // connections among them), so that a connection O closes during the
                    // probation really ends.
                    libc::close(go_write);
                    close_all_but(channel, go);
                    Self::stay_parent(pid, channel, go);
                }
                libc::_exit(if pid > 0 { 0 } else { 1 });
            }
            intermediate => Ok(intermediate),
        }
    }

    /// The intermediate after the fork of N: stays N's parent until O releases it (EOF on
    /// `go`: O closed its end, or died) or N dies. Once O holds N's pidfd (a byte on `go`), it
    /// reaps N when N dies and reports its wait status as `exit <status>` on `channel`, so
    /// that O can say how N ended.
    ///
    /// # Safety
    /// Async-signal-safe calls only (poll, waitpid, write, raw syscalls); see fork_and_exec.
    unsafe fn stay_parent(pid: libc::pid_t, channel: RawFd, go: RawFd) {
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
                    let mut buf = [0u8; 32];
                    let mut n = copy(&mut buf, 0, b"exit ");
                    n += write_decimal(&mut buf[n..], status as u32 as u64);
                    buf[n] = b'\n';
                    libc::write(channel, buf.as_ptr().cast(), n + 1);
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

    /// In N, before exec: fds into place, clean signal state, `LISTEN_PID`, exec. Never
    /// returns; a failure is reported as `exec-error <errno>` on `channel` (its original fd,
    /// open until exec).
    unsafe fn exec_in_child(&self, channel: RawFd) -> ! {
        let fail = |channel: RawFd| -> ! {
            let errno = *libc::__errno_location();
            let mut buf = [0u8; 32];
            let mut len = copy(&mut buf, 0, b"exec-error ");
            len += write_decimal(&mut buf[len..], errno as u64);
            buf[len] = b'\n';
            libc::write(channel, buf.as_ptr().cast(), len + 1);
            libc::_exit(127);
        };
        let n = self.fds.len() as RawFd;
        // Move every fd above the target range first, then down into 3.. (dup2 clears
        // FD_CLOEXEC on the copy; the sources keep theirs and vanish at exec).
        let mut high = [0 as RawFd; MAX_FDS];
        for (i, fd) in self.fds.iter().enumerate() {
            high[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 3 + n);
            if high[i] < 0 {
                fail(channel);
            }
        }
        for (i, fd) in high.iter().take(self.fds.len()).enumerate() {
            if libc::dup2(*fd, 3 + i as RawFd) < 0 {
                fail(channel);
            }
        }
        // From here on the channel is the last of the handed fds. Everything above them goes:
        // fds this process inherited without FD_CLOEXEC (from whatever started the first
        // generation) must not travel on from generation to generation. close_range(2) is a
        // plain syscall; on kernels without it (< 5.9) the stray fds stay, as before.
        let channel = 3 + n - 1;
        libc::syscall(libc::SYS_close_range, 3 + n, libc::c_uint::MAX, 0);
        // Signals are blocked (see spawn). Put back the default action of every signal this
        // process handles or ignores (Rust ignores SIGPIPE, and exec would keep that), so that a
        // signal pending now cannot run O's handler here, then unblock.
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for signal in [
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGPIPE,
        ] {
            libc::sigaction(signal, &dfl, std::ptr::null_mut());
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        // A process group of its own, so that killing N after a failure kills whatever it
        // started too (no child of a failed N keeps the listening sockets).
        libc::setpgid(0, 0);
        // Our own (copy-on-write) copy of the environment: writing the digits in place
        // allocates nothing. The slot lies within the allocation: prefix, then
        // LISTEN_PID_DIGITS + 1 bytes, the last of which stays NUL.
        let pid = libc::getpid() as u64;
        let slot = self.listen_pid.cast::<u8>().add(LISTEN_PID_PREFIX.len());
        write_decimal(std::slice::from_raw_parts_mut(slot, LISTEN_PID_DIGITS), pid);
        // The same for the marker of baton's private variables.
        let slot = self.for_pid.cast::<u8>().add(FOR_PID_PREFIX.len());
        write_decimal(std::slice::from_raw_parts_mut(slot, LISTEN_PID_DIGITS), pid);
        libc::execve(
            self.path.as_ptr(),
            self.argv_ptrs.as_ptr(),
            self.envp.as_ptr(),
        );
        fail(channel);
    }
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

/// Writes `n` in decimal at the start of `buf`; returns the number of digits. No allocation.
fn write_decimal(buf: &mut [u8], mut n: u64) -> usize {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let digits = &tmp[i..];
    buf[..digits.len()].copy_from_slice(digits);
    digits.len()
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
    spawned: Spawned,
    lines: BoundedLines<tokio::net::unix::OwnedReadHalf>,
    write: tokio::net::unix::OwnedWriteHalf,
    /// Readable once N has exited.
    exit_watch: Option<tokio::io::unix::AsyncFd<OwnedFd>>,
    /// The channel reached its end: N and its intermediate are gone.
    channel_closed: bool,
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
/// error N is gone and the message says why, in one line; O never stopped accepting.
///
/// `cancel` calls the upgrade off (a stop) until the `commit`. Past the commit N may have
/// accepted connections, so the upgrade then goes on until N serves (or fails), and the caller
/// stops N gracefully ([`Successor::stop`]).
pub async fn start(
    upgrader: &Upgrader,
    counts: Counts,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<Successor, String> {
    const CALLED_OFF: &str = "called off: the process is stopping";
    let started = Instant::now();
    let started_usec = monotonic_usec();
    let next = upgrader.generation + 1;
    notify::reloading(&format!(
        "upgrading: starting generation {next} from {}",
        upgrader.exe.display()
    ));
    // The fork blocks briefly; keep it off the workers.
    let spawned = tokio::task::block_in_place(|| upgrader.spawn(started_usec, counts))
        .map_err(|e| format!("cannot start {}: {e}", upgrader.exe.display()))?;
    let pid = spawned.pid;
    tracing::info!(
        event = "upgrade-spawned",
        generation = upgrader.generation,
        new_pid = pid,
        "started generation {next} as pid {pid}; waiting until it is ready"
    );

    let channel = spawned
        .channel
        .try_clone()
        .and_then(|c| {
            c.set_nonblocking(true)?;
            tokio::net::UnixStream::from_std(c)
        })
        .map_err(|e| format!("handshake channel: {e}"))?;
    let (read, mut write) = channel.into_split();
    let mut lines = BoundedLines::new(read);
    // N's exit ends every wait, even when something else keeps the channel open.
    let mut exit_watch = spawned
        .pidfd
        .try_clone_fd()
        .ok()
        // SAFETY: the AsyncFd owns its copy of the pidfd, which stays open and unchanged
        // while registered.
        .and_then(|fd| unsafe { tokio::io::unix::AsyncFd::register(fd) }.ok());

    let first = match spawned.early.clone() {
        Some(line) => Ok(Ok(Some(line))),
        None => {
            tokio::time::timeout(upgrader.timeout, async {
                tokio::select! {
                    _ = cancel.cancelled() => Err(io::Error::other(CALLED_OFF)),
                    line = lines.next_line() => line,
                    _ = exited(&mut exit_watch) => Ok(last_words(&mut lines).await),
                }
            })
            .await
        }
    };
    let exe = upgrader.exe.display();
    let warnings: Vec<String>;
    match first {
        Err(_) => {
            return Err(format!(
                "the new process (pid {pid}) was not ready within {}; killed it",
                humantime::format_duration(upgrader.timeout)
            ))
        }
        Ok(Err(_)) if cancel.is_cancelled() => return Err(CALLED_OFF.to_owned()),
        Ok(Err(e)) => return Err(format!("handshake with pid {pid} broke: {e}")),
        Ok(Ok(None)) => {
            return Err(format!(
                "the new process (pid {pid}, {exe}) exited before it was ready"
            ))
        }
        Ok(Ok(Some(line))) => match line.split_once(' ').unwrap_or((line.as_str(), "")) {
            ("ready", extra) => warnings = ready_warnings(extra),
            ("exec-error", errno) => {
                let e = io::Error::from_raw_os_error(errno.parse().unwrap_or(0));
                return Err(format!("cannot execute {exe}: {e}"));
            }
            ("error", message) => {
                return Err(format!("the new process failed to start: {message}"))
            }
            ("exit", status) => {
                return Err(format!(
                    "the new process (pid {pid}, {exe}) exited before it was ready: {}",
                    describe_exit(pid, status)
                ))
            }
            _ => {
                return Err(format!(
                    "the new process (pid {pid}) said {line:?} instead of ready"
                ))
            }
        },
    }
    if cancel.is_cancelled() {
        return Err(CALLED_OFF.to_owned());
    }

    // The commit: N accepts from now on, next to O, and says so. Not cancellable: N may hold
    // connections as soon as it read the line.
    let confirmation = async {
        write.write_all(b"commit\n").await?;
        // A line N wrote before it exited counts: look at the channel first.
        let answer = tokio::select! {
            // What N said comes first, even if it died right after saying it.
            biased;
            line = tokio::time::timeout(STEP_TIMEOUT, lines.next_line()) => Some(line),
            _ = exited(&mut exit_watch) => None,
        };
        match answer {
            Some(Ok(Ok(Some(line)))) if line == "serving" => Ok(()),
            Some(Ok(Ok(Some(line)))) if line.starts_with("exit ") => Err(io::Error::other(
                format!("it {}", describe_exit(pid, &line[5..])),
            )),
            Some(Ok(Ok(other))) => Err(io::Error::other(format!(
                "it said {other:?} instead of serving"
            ))),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(_)) => Err(io::Error::other(format!(
                "no answer within {STEP_TIMEOUT:?}"
            ))),
            None => match last_words(&mut lines).await {
                // It served, then died: the probation that follows sees the death and rolls back.
                Some(line) if line == "serving" => Ok(()),
                words => {
                    let how = words
                        .as_deref()
                        .and_then(|w| w.strip_prefix("exit "))
                        .map(|status| describe_exit(pid, status))
                        .unwrap_or_else(|| "exited".to_owned());
                    Err(io::Error::other(format!("it {how}")))
                }
            },
        }
    };
    if let Err(e) = confirmation.await {
        return Err(format!(
            "the new process (pid {pid}) did not confirm that it serves: {e}; killed it"
        ));
    }
    Ok(Successor {
        pid,
        generation: next,
        took: started.elapsed(),
        serving_since: Instant::now(),
        warnings,
        spawned,
        lines,
        write,
        exit_watch,
        channel_closed: false,
    })
}

/// The warnings N sent with `ready`: `ready {"warnings":[...]}` (a plain `ready` has none; an
/// older O reads only the first word).
fn ready_warnings(extra: &str) -> Vec<String> {
    serde_json::from_str::<serde_json::Value>(extra)
        .ok()
        .and_then(|v| {
            v["warnings"].as_array().map(|a| {
                a.iter()
                    .filter_map(|w| w.as_str().map(str::to_owned))
                    .collect()
            })
        })
        .unwrap_or_default()
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
fn describe_exit(pid: i32, status: &str) -> String {
    use nix::sys::wait::WaitStatus;
    let raw = match status.trim().parse::<u32>() {
        Ok(raw) => raw as i32,
        Err(_) => return format!("exited ({status:?})"),
    };
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
                        match last_words(&mut self.lines).await {
                            Some(line) if line.starts_with("exit ") => {
                                break describe_exit(self.pid, &line[5..])
                            }
                            Some(_) => continue,
                            None => break "exited".to_owned(),
                        }
                    };
                    return SuccessorEvent::Exited(how);
                }
            };
            match line {
                Ok(Some(line)) if line == "promote" => return SuccessorEvent::AsksPromotion,
                Ok(Some(line)) if line.starts_with("exit ") => {
                    return SuccessorEvent::Exited(describe_exit(self.pid, &line[5..]))
                }
                Ok(Some(_)) => continue,
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
    ///
    /// An error comes before `MAINPID=` went out: N is killed (dropped) and O may take over
    /// again. After `MAINPID=` there is no way back.
    pub async fn promote(
        mut self,
        hand_over_hook: impl FnOnce(i32) -> io::Result<()>,
    ) -> Result<HandedOver, String> {
        let pid = self.pid;
        // Releasing the intermediate and the barrier (up to 5 s) block: off the workers.
        tokio::task::block_in_place(|| {
            if let Some(intermediate) = self.spawned.intermediate.take() {
                intermediate
                    .release_and_reap()
                    .map_err(|e| format!("cannot reap the intermediate process: {e}"))?;
            }
            // N may have died just now, unseen by its released parent: it is not too late.
            if self
                .spawned
                .pidfd
                .wait_exit(Duration::ZERO)
                .unwrap_or(false)
            {
                return Err(format!("pid {pid} exited during the handover"));
            }
            hand_over_hook(pid).map_err(|e| format!("cannot record pid {pid}: {e}"))?;
            // Under NotifyAccess=main only O may name the new main pid, and systemd must have
            // processed it before O exits, or it would consider the unit dead and kill N too.
            notify::main_pid(pid as u32).map_err(|e| format!("MAINPID={pid} was not sent: {e}"))?;
            // The point of no return: MAINPID= is out. Without the barrier's answer it is
            // unknown whether systemd took it; going on is the lesser risk (killing N would
            // leave a main pid that may be dead), so a silent barrier is logged, not a reason
            // to roll back.
            if let Err(e) = notify::barrier(BARRIER_TIMEOUT) {
                tracing::warn!(
                    event = "barrier-unconfirmed",
                    new_pid = pid,
                    "systemd did not confirm MAINPID={pid} within {BARRIER_TIMEOUT:?} ({e}); handing over all the same"
                );
            }
            // N died between the check above and the manager's processing of MAINPID=: the
            // manager refuses a dead pid, so this process is still the main pid and must take
            // over again rather than drain and exit 0 with nothing serving.
            if self
                .spawned
                .pidfd
                .wait_exit(Duration::ZERO)
                .unwrap_or(false)
            {
                return Err(format!("pid {pid} exited during the handover"));
            }
            Ok(())
        })?;
        self.spawned.promoted = true;
        notify::hand_over();
        // N sends READY=1 on this line; if it is gone by now, it is the service manager's to
        // see (the main pid exited).
        if let Err(e) = self.write.write_all(b"main\n").await {
            tracing::warn!(
                new_pid = pid,
                "cannot tell pid {pid} that it is the main pid: {e}"
            );
        }
        let handle = self
            .spawned
            .pidfd
            .try_clone_fd()
            .map(ProcessHandle::from)
            .map_err(|e| format!("pidfd of {pid}: {e}"))?;
        let channel = self
            .lines
            .into_inner()
            .reunite(self.write)
            .map_err(|e| format!("handshake channel: {e}"))?;
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
        if self.write.write_all(b"stop\n").await.is_ok() {
            let _ = tokio::time::timeout(timeout, exited(&mut self.exit_watch)).await;
        }
        tokio::task::block_in_place(move || drop(self));
    }

    /// Kills N and what it started, and reaps it (through its intermediate).
    pub fn kill(self) {
        tokio::task::block_in_place(move || drop(self));
    }
}

fn monotonic_usec() -> i128 {
    match sd_notify::NotifyState::monotonic_usec_now() {
        Ok(sd_notify::NotifyState::MonotonicUsec(usec)) => usec,
        _ => 0,
    }
}

/// Takes the fd a previous generation announced in the environment variable `var`: removes
/// the variable, checks that `value` names an open fd above stdio, and marks it FD_CLOEXEC so
/// that nothing this process starts inherits it.
///
/// # Safety contract
/// Changes the environment: call it before any other thread exists. The fd must have been
/// handed to this process alone (it becomes an `OwnedFd`).
pub(crate) fn take_fd(var: &str, value: Option<String>) -> Result<Option<OwnedFd>, String> {
    // SAFETY (of the contract above): no other thread reads the environment yet.
    unsafe { std::env::remove_var(var) };
    let Some(value) = value else { return Ok(None) };
    let fd: RawFd = value
        .parse()
        .ok()
        .filter(|fd| *fd >= 3 && unsafe { libc::fcntl(*fd, libc::F_GETFD) } >= 0)
        .ok_or_else(|| format!("{var}={value:?} is not an open fd"))?;
    // SAFETY: the fd is open and, per the contract, ours alone.
    unsafe {
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        Ok(Some(OwnedFd::from_raw_fd(fd)))
    }
}

/// N's side of the channel.
pub struct Handshake {
    channel: StdUnixStream,
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
        self.channel.write_all(b"serving\n").await?;
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
            let mut words = line.split(' ');
            match (words.next(), words.next(), words.next()) {
                (Some("main"), None, _) => return PredecessorEvent::Main,
                (Some("stop"), None, _) => return PredecessorEvent::Stop,
                (Some("drained"), Some(ms), Some(forced)) => {
                    if let (Ok(ms), Ok(forced)) = (ms.parse::<u64>(), forced.parse::<u64>()) {
                        return PredecessorEvent::Drained {
                            duration: Duration::from_millis(ms),
                            forced,
                        };
                    }
                }
                _ => {}
            }
            tracing::debug!("ignored {line:?} from the previous generation");
        }
    }

    /// Asks O to end the probation now (N was asked for an upgrade itself).
    pub async fn ask_promotion(&mut self) -> io::Result<()> {
        self.write.write_all(b"promote\n").await
    }
}

/// O's report of its drain to N, as [`Predecessor::next`] reads it.
pub fn drained_line(duration: Duration, forced: u64) -> String {
    format!("drained {} {forced}\n", duration.as_millis())
}

impl Handshake {
    /// Takes the channel announced in `BATON_UPGRADE_FD`, if any, and removes the variables.
    ///
    /// # Safety contract
    /// Changes the environment: call it before any other thread exists.
    pub fn take_from_env() -> Result<Option<Handshake>, String> {
        private_env_trusted();
        let fd = std::env::var(UPGRADE_FD_ENV).ok();
        let started = std::env::var(UPGRADE_STARTED_ENV).ok();
        // SAFETY (of the contract above): no other thread reads the environment yet.
        unsafe { std::env::remove_var(UPGRADE_STARTED_ENV) };
        let Some(fd) = take_fd(UPGRADE_FD_ENV.name(), fd)? else {
            return Ok(None);
        };
        let channel = StdUnixStream::from(fd);
        Ok(Some(Handshake {
            channel,
            started_usec: started.and_then(|s| s.parse().ok()),
        }))
    }

    /// The channel's fd.
    pub fn fd(&self) -> RawFd {
        self.channel.as_raw_fd()
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
        let line = format!("error {message}\n");
        let _ = self.channel.write_all(line.as_bytes());
    }

    /// Says `ready` (with the start's `warnings`, which O relays to whoever asked for the
    /// upgrade) and waits for `commit`. An error means O is gone or refused: N must exit.
    pub async fn ready(self, warnings: &[String]) -> io::Result<Committed> {
        self.channel.set_nonblocking(true)?;
        let mut channel = tokio::net::UnixStream::from_std(self.channel)?;
        let line = if warnings.is_empty() {
            "ready\n".to_owned()
        } else {
            format!("ready {}\n", serde_json::json!({ "warnings": warnings }))
        };
        channel.write_all(line.as_bytes()).await?;
        let mut lines = BoundedLines::new(&mut channel);
        let line = lines
            .next_line()
            .await?
            .map(|l| l + "\n")
            .unwrap_or_default();
        if line != "commit\n" {
            return Err(io::Error::other(format!(
                "the old process ended the handshake ({:?})",
                line.trim_end()
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
