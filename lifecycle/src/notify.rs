//! Telling the service manager what the process is doing: the sd_notify(3) protocol.
//!
//! Every message is one datagram to `$NOTIFY_SOCKET`, sent with the sd-notify crate. Without
//! `NOTIFY_SOCKET` nothing is sent and nothing fails, so the same code runs under systemd,
//! under `systemd-socket-activate`, and from a shell.
//!
//! Under `NotifyAccess=main` (the default of `Type=notify`) systemd accepts messages only from
//! the unit's main pid. An upgrade therefore goes: the old process, still the main pid, sends
//! `MAINPID=<new>` and a [`barrier`]; from then on it must be silent, because anything it sent
//! could only confuse the manager (`STOPPING=1` from it would stop the unit under
//! `NotifyAccess=all`). [`hand_over`] makes every later call in this process a no-op.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;

static HANDED_OVER: AtomicBool = AtomicBool::new(false);

fn send(states: &[NotifyState]) {
    if HANDED_OVER.load(Ordering::SeqCst) {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager ($NOTIFY_SOCKET): {e}");
    }
}

/// One datagram with `fds` attached (SCM_RIGHTS), e.g. `FDSTORE=1` ([`crate::fdstore`]).
/// Like every message, nothing is sent after [`hand_over`] or without `NOTIFY_SOCKET`.
pub fn send_with_fds(states: &[NotifyState], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if HANDED_OVER.load(Ordering::SeqCst) {
        return Ok(());
    }
    sd_notify::notify_with_fds(states, fds)
}

/// Whether a service manager listens (`NOTIFY_SOCKET` is set).
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// `READY=1` with a status line: the service accepts on every listener.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STATUS=`: a free-form line that `systemctl status` shows.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// `RELOADING=1` with `MONOTONIC_USEC` in the same datagram (as `Type=notify-reload` on
/// systemd >= 253 requires) and a status line. The reload ends with [`ready`].
pub fn reloading(status: &str) {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now, NotifyState::Status(status)]),
        Err(e) => tracing::warn!("cannot read CLOCK_MONOTONIC for RELOADING=1: {e}"),
    }
}

/// `STOPPING=1`: the service begins to stop.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// `WATCHDOG=1`: the keep-alive ping.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// `MAINPID=pid`: makes another process the unit's main pid. Only the current main pid may
/// send it, and `pid` must be alive in the unit's cgroup.
pub fn main_pid(pid: u32) -> io::Result<()> {
    if HANDED_OVER.load(Ordering::SeqCst) {
        return Err(io::Error::other("already handed over"));
    }
    sd_notify::notify(&[NotifyState::MainPid(pid)])
}

/// `BARRIER=1`: waits until the manager has processed every message sent before it.
///
/// The message carries the write end of a pipe; the manager closes it once it has handled the
/// earlier datagrams, and the read end then reports POLLHUP. Returns at once without
/// `NOTIFY_SOCKET`.
pub fn barrier(timeout: Duration) -> io::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    if !enabled() {
        return Ok(());
    }
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    sd_notify::notify_with_fds(&[NotifyState::Custom("BARRIER=1")], &[write.as_fd()])?;
    drop(write);
    let ms = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(read.as_fd(), PollFlags::empty())];
    loop {
        match poll(&mut fds, ms) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no answer to BARRIER=1",
                ))
            }
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Silences this process for good: called by the old generation once the new one is the main
/// pid.
pub fn hand_over() {
    HANDED_OVER.store(true, Ordering::SeqCst);
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`, for this pid), if any.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}
