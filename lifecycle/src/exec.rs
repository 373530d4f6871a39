//! From fork to execve: how a new generation gets its fds and starts.
//!
//! Two places start a generation with fds at 3.. (`LISTEN_FDS` and what follows): the keeper
//! ([`crate::keeper`]) forks each generation as its child, and an upgrade ([`crate::upgrade`])
//! forks an intermediate from a threaded process (tokio), which starts N with a vfork-style
//! clone. Between fork and exec in a threaded process only async-signal-safe calls are allowed:
//! no allocation, no locks. So everything execve needs is made before the fork
//! ([`ExecPlan::new`]), and the child ([`ExecPlan::exec`]) only moves fds, resets signals,
//! writes its pid into room kept for it and calls execve. The keeper is single-threaded and
//! would not need this care, but one careful path is easier to trust than two.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Everything `execve` needs, allocated before the fork (see the module docs).
pub(crate) struct ExecPlan {
    path: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _env: Vec<Vec<u8>>,
    envp: Vec<*const libc::c_char>,
    /// `LISTEN_PID=` followed by room for the digits: a leaked box (freed in Drop) that only
    /// raw pointers touch, because the child writes its pid into it after the fork.
    listen_pid: *mut [u8],
    /// `<PREFIX>_FOR_PID=` and room for the digits, likewise.
    for_pid: *mut [u8],
    /// The fds the new process gets at 3.., in this order.
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

// SAFETY: the raw pointers point into allocations the plan owns alone (its CStrings, its
// environment and the two slots) and that live as long as it does; nothing else refers to
// them, so the plan may move to another thread (the blocking pool) with them.
unsafe impl Send for ExecPlan {}

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";
/// Room for any pid's digits; the byte after them stays NUL.
const PID_DIGITS: usize = 20;

/// Why [`ExecPlan::exec`] returned.
pub(crate) struct ExecFailed {
    /// The errno of the call that failed.
    pub errno: i32,
    /// Where the last of the handed fds is now (at `2 + n` once they are in place, else where it
    /// was): both callers hand their report channel last, and say there why the exec failed.
    pub report_fd: RawFd,
}

impl ExecPlan {
    /// `exe` with `args` (`argv[0]` is `exe`), `env` (`NAME=value` each) and then `LISTEN_PID`
    /// and `<PREFIX>_FOR_PID` (the child's pid, filled in after the fork), `fds` at 3.. in order.
    pub(crate) fn new(
        exe: &Path,
        args: &[OsString],
        env: Vec<Vec<u8>>,
        fds: Vec<RawFd>,
    ) -> io::Result<ExecPlan> {
        let path = c_string(exe.as_os_str().as_bytes())?;
        let mut argv = vec![path.clone()];
        for a in args {
            argv.push(c_string(a.as_bytes())?);
        }
        let argv_ptrs = argv
            .iter()
            .map(|a| a.as_ptr())
            .chain([std::ptr::null()])
            .collect();
        let env = env
            .into_iter()
            .map(|e| c_string(&e).map(CString::into_bytes_with_nul))
            .collect::<io::Result<Vec<Vec<u8>>>>()?;
        let slot = |prefix: &[u8]| {
            let mut slot = prefix.to_vec();
            slot.resize(prefix.len() + PID_DIGITS + 1, 0);
            Box::into_raw(slot.into_boxed_slice())
        };
        let listen_pid = slot(LISTEN_PID_PREFIX);
        // `<PREFIX>_FOR_PID=`: the service's own name for it (crate::env).
        let for_pid = slot(format!("{}=", crate::env::Var::FOR_PID).as_bytes());
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

    /// In the child, after the fork (or clone): the fds into place ([`place_fds`]), a process
    /// group of its own, a clean signal state, `LISTEN_PID` and `<PREFIX>_FOR_PID`, execve.
    /// Returns only on failure.
    ///
    /// # Safety
    /// Call it in a child process only, between fork and exec: it takes over the fd table.
    /// It makes async-signal-safe calls alone (fcntl, dup2, close_range, sigaction,
    /// sigprocmask, setpgid, getpid, execve) and allocates nothing, so a child of a threaded
    /// process may call it. Signals should be blocked when the child is started (see
    /// [`reset_signals`]).
    pub(crate) unsafe fn exec(&mut self) -> ExecFailed {
        // SAFETY: this function's contract: in a child between fork and exec, async-signal-safe calls only.
        unsafe {
            let last = self.fds.last().copied().unwrap_or(-1);
            if let Err(errno) = place_fds(&mut self.fds) {
                return ExecFailed {
                    errno,
                    report_fd: last,
                };
            }
            // A process group of its own: a terminal's ^C reaches the keeper alone (which forwards
            // it once), and killing a failed N kills whatever it started too. Before the signals
            // are unblocked, so that no job-control signal to the parent's group stops it first.
            libc::setpgid(0, 0);
            reset_signals();
            // Writing the digits in place allocates nothing. The environment is the caller's
            // memory, or shared with a suspended parent (the upgrade's `CLONE_VFORK`), which
            // does not read it. Each slot lies within its allocation: prefix, then PID_DIGITS + 1
            // bytes, the last of which stays NUL.
            let pid = libc::getpid() as u64;
            for slot in [self.listen_pid, self.for_pid] {
                // The prefix is what precedes the room for the digits and the final NUL.
                let digits = slot.cast::<u8>().add(slot.len() - PID_DIGITS - 1);
                write_decimal(std::slice::from_raw_parts_mut(digits, PID_DIGITS), pid);
            }
            libc::execve(
                self.path.as_ptr(),
                self.argv_ptrs.as_ptr(),
                self.envp.as_ptr(),
            );
            ExecFailed {
                errno: errno(),
                report_fd: 2 + self.fds.len() as RawFd,
            }
        }
    }
}

/// Puts `fds` at 3, 4, ... in their order, with FD_CLOEXEC clear, and closes every fd above
/// them: fds this process inherited without FD_CLOEXEC (from whatever started the first
/// generation) must not travel on from generation to generation. Returns the errno of a failed
/// call. On kernels without close_range(2) (< 5.9) the stray fds stay.
///
/// `fds` is scratch space: it ends up holding the numbers of temporary copies (closed by then).
/// No allocation, async-signal-safe calls only.
///
/// # Safety
/// Takes over the fd table: every fd at 3.. that is not in `fds` may be replaced or closed.
/// Call it in a child between fork and exec.
pub(crate) unsafe fn place_fds(fds: &mut [RawFd]) -> Result<(), i32> {
    // SAFETY: this function's contract: in a child between fork and exec, which owns its fd table.
    unsafe {
        let n = fds.len() as RawFd;
        // Move every fd above the target range first, so that placing one cannot overwrite another
        // still to be placed, then down into 3.. (dup2 clears FD_CLOEXEC on the copy; the copies
        // above keep theirs).
        for fd in fds.iter_mut() {
            *fd = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 3 + n);
            if *fd < 0 {
                return Err(errno());
            }
        }
        for (i, fd) in fds.iter().enumerate() {
            if libc::dup2(*fd, 3 + i as RawFd) < 0 {
                return Err(errno());
            }
        }
        libc::syscall(libc::SYS_close_range, 3 + n, libc::c_uint::MAX, 0);
        Ok(())
    }
}

/// One more than the highest signal number on Linux (_NSIG: 64 signals, real-time included).
const SIGNALS: libc::c_int = 65;

/// Puts back the default action of every signal (the parent may handle any, and Rust ignores
/// SIGPIPE, which exec would keep), then unblocks all. Forked with signals blocked, the child
/// thus never runs its parent's handlers (tokio's would report the signal to the parent
/// through the pipe they share). Async-signal-safe.
fn reset_signals() {
    // SAFETY: sigaction and sigprocmask on a zeroed (valid: SIG_DFL, empty mask, no flags)
    // struct and an emptied set; plain syscalls.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        // Every signal: a service may handle any (its signal map, its own handlers). SIGKILL,
        // SIGSTOP and the ones the C library reserves refuse with EINVAL, which is fine.
        for signal in 1..SIGNALS {
            libc::sigaction(signal, &dfl, std::ptr::null_mut());
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
}

/// This process's environment as `NAME=value` entries, without the variables in `except`.
pub(crate) fn inherited_env(except: &[&str]) -> Vec<Vec<u8>> {
    std::env::vars_os()
        .filter(|(k, _)| !except.iter().any(|e| OsStr::new(e) == k))
        .map(|(k, v)| [k.as_bytes(), b"=", v.as_bytes()].concat())
        .collect()
}

fn c_string(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "NUL byte in an argument or the environment",
        )
    })
}

fn errno() -> i32 {
    // SAFETY: reads this thread's errno.
    unsafe { *libc::__errno_location() }
}

/// Writes `n` in decimal at the start of `buf`; returns the number of digits. No allocation.
pub(crate) fn write_decimal(buf: &mut [u8], mut n: u64) -> usize {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::{AsRawFd, OwnedFd};

    /// What `/proc/<pid>/fd/<fd>` names: `pipe:[inode]` for a pipe end.
    fn target(fd: RawFd) -> String {
        std::fs::read_link(format!("/proc/self/fd/{fd}"))
            .unwrap()
            .display()
            .to_string()
    }

    /// A shell that lists its own open fds from 3 on (`fd target` lines, through builtins
    /// and readlink, so that it opens none itself) and its pid variables, on the last fd.
    const LIST_FDS: &str = r#"exec 1>&"$REPORT"
i=3
while [ "$i" -lt 200 ]; do
  if [ -e "/proc/$$/fd/$i" ]; then echo "$i $(readlink "/proc/$$/fd/$i")"; fi
  i=$((i + 1))
done
echo "pid $$ $LISTEN_PID $BATON_FOR_PID""#;

    #[test]
    fn the_child_gets_exactly_the_planned_fds_at_3_in_order() {
        let (a, _a_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let (_b_read, b) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let (out_read, out_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        // Handed in an order unlike their numbers, and from high numbers, so that they move.
        let high = |fd: &OwnedFd| -> OwnedFd {
            // SAFETY: fcntl on an fd this test owns; the copy is owned once, here.
            unsafe {
                let copy = libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 60);
                assert!(copy >= 60);
                std::os::fd::FromRawFd::from_raw_fd(copy)
            }
        };
        let (a, b) = (high(&a), high(&b));
        // An fd without FD_CLOEXEC that is not handed: it must not reach the child.
        let stray = nix::unistd::dup(&a).unwrap();
        let handed = [b.as_raw_fd(), a.as_raw_fd(), out_write.as_raw_fd()];
        let expected: Vec<String> = handed
            .iter()
            .enumerate()
            .map(|(i, fd)| format!("{} {}", 3 + i, target(*fd)))
            .collect();
        let env = vec![b"REPORT=5".to_vec(), b"PATH=/usr/bin:/bin".to_vec()];
        let args = [OsString::from("-c"), OsString::from(LIST_FDS)];
        let mut plan = ExecPlan::new(Path::new("/bin/sh"), &args, env, handed.to_vec()).unwrap();
        // SAFETY: the child calls ExecPlan::exec alone (async-signal-safe, no allocation, as a
        // child of this threaded test process requires), then _exit.
        let pid = unsafe {
            match libc::fork() {
                0 => {
                    plan.exec();
                    libc::_exit(127)
                }
                pid => pid,
            }
        };
        assert!(pid > 0, "fork failed");
        drop((out_write, stray));
        let mut text = String::new();
        std::fs::File::from(out_read)
            .read_to_string(&mut text)
            .unwrap();
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert_eq!(status, 0, "the shell failed: {text}");
        let mut lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.pop(), Some(format!("pid {pid} {pid} {pid}").as_str()));
        assert_eq!(lines, expected);
    }

    #[test]
    fn a_nul_byte_is_refused_before_the_fork() {
        let env = vec![b"A=x\0y".to_vec()];
        assert!(ExecPlan::new(Path::new("/bin/true"), &[], env, vec![]).is_err());
        let args = [OsString::from("a\0b")];
        assert!(ExecPlan::new(Path::new("/bin/true"), &args, vec![], vec![]).is_err());
    }
}
