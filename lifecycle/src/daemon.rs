//! Running in the background without systemd: daemon(7).
//!
//! [`daemonize`] forks twice (the second fork, after `setsid`, makes sure the daemon can never
//! reacquire a controlling terminal), points stdin at /dev/null and stdout/stderr at the log file
//! or /dev/null, sets the umask to 027, changes to `/`, and closes every inherited fd it was not
//! asked to keep. It must run before any thread exists.
//!
//! The foreground process does not return: it waits on a pipe for the daemon's word and exits 0
//! once the daemon serves ([`Readiness::ready`]), or prints the daemon's own error and exits 1
//! ([`Readiness::fail`]), so that `baton serve --daemon` fails like a foreground start would.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The daemon's end of the pipe to the waiting foreground process.
#[derive(Debug)]
pub struct Readiness(File);

impl Readiness {
    /// Reports on `fd` (the keeper's report pipe of a generation, [`crate::keeper`]).
    pub fn from_fd(fd: OwnedFd) -> Readiness {
        Readiness(File::from(fd))
    }

    /// The daemon serves: the foreground process exits 0.
    pub fn ready(mut self) {
        let _ = writeln!(self.0, "ready {}", std::process::id());
    }

    /// The daemon could not start: the foreground process prints `message` and exits 1.
    pub fn fail(mut self, message: &str) {
        let _ = writeln!(self.0, "error {}", message.replace('\n', "; "));
    }
}

/// Detaches into the background. Returns in the daemon; the foreground process exits with the
/// daemon's outcome instead of returning. `keep` are fds the daemon needs (sockets, the
/// pidfile); `log_file` receives stdout and stderr.
///
/// # Safety
/// Call it before any other thread exists: it forks (only the calling thread survives) and
/// closes every fd but `keep` and stdio.
pub unsafe fn daemonize(log_file: Option<&Path>, keep: &[RawFd]) -> io::Result<Readiness> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // Open what can fail before forking, so that the error is the foreground's to print.
    let null = File::options().read(true).write(true).open("/dev/null")?;
    let out = match log_file {
        Some(path) => open_log(path)?,
        None => null.try_clone()?,
    };
    // SAFETY: no other thread exists (see the module docs), so the child may run any code.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { .. } => {
            drop(write);
            std::process::exit(wait_for_daemon(read));
        }
        nix::unistd::ForkResult::Child => {}
    }
    drop(read);
    nix::unistd::setsid()?;
    // SAFETY: as above.
    if let nix::unistd::ForkResult::Parent { .. } = unsafe { nix::unistd::fork() }? {
        // The intermediate leaves at once; the daemon is adopted by init.
        // SAFETY: _exit skips destructors, which belong to the daemon now.
        unsafe { libc::_exit(0) };
    }
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o027));
    std::env::set_current_dir("/")?;
    for (fd, target) in [(&null, 0), (&out, 1), (&out, 2)] {
        // SAFETY: dup2 onto the standard fds.
        if unsafe { libc::dup2(fd.as_raw_fd(), target) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    drop((null, out));
    close_inherited(&[keep, &[write.as_raw_fd()]].concat())?;
    Ok(Readiness(File::from(write)))
}

/// Opens (creating) a log file for appending, mode 0640.
pub fn open_log(path: &Path) -> io::Result<File> {
    File::options()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("log file {}: {e}", path.display())))
}

/// Closes every fd above stderr except `keep`: daemon(7) wants no inherited fds.
fn close_inherited(keep: &[RawFd]) -> io::Result<()> {
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2 && !keep.contains(fd))
        .collect();
    for fd in fds {
        // The directory handle used above is already closed; any other is ours to close.
        // SAFETY: closing fds nothing in this single-threaded process refers to.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// The foreground side: the daemon's word, as an exit code.
fn wait_for_daemon(read: OwnedFd) -> i32 {
    let mut text = String::new();
    let _ = File::from(read).read_to_string(&mut text);
    match text.lines().next() {
        Some(line) if line.starts_with("ready ") => 0,
        Some(line) => {
            eprintln!(
                "{}: {}",
                crate::env::identity().name,
                line.strip_prefix("error ").unwrap_or(line)
            );
            1
        }
        None => {
            eprintln!(
                "{}: the daemon exited during startup without a word; see its log file",
                crate::env::identity().name
            );
            1
        }
    }
}
