//! The test kit: real baton processes, a credential-checking NOTIFY_SOCKET receiver, and HTTP
//! clients that tell a clean close from a reset.
#![allow(dead_code)] // each test binary uses a different part of the kit

pub mod http;
pub mod load;
pub mod notify;
pub mod reaper;

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn baton_bin() -> &'static str {
    env!("CARGO_BIN_EXE_baton")
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("baton-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Lines a child wrote to a pipe, shared with a reader thread; waitable.
#[derive(Clone, Default)]
pub struct Lines(Arc<(Mutex<LinesState>, Condvar)>);

/// The lines so far, and whether the pipe is closed.
type LinesState = (Vec<String>, bool);

impl Lines {
    fn push(&self, line: String) {
        let (lock, cv) = &*self.0;
        lock.lock().unwrap().0.push(line);
        cv.notify_all();
    }

    fn close(&self) {
        let (lock, cv) = &*self.0;
        lock.lock().unwrap().1 = true;
        cv.notify_all();
    }

    /// Waits until the writer closed the pipe (all its lines are in).
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let (lock, cv) = &*self.0;
        let guard = lock.lock().unwrap();
        !cv.wait_timeout_while(guard, timeout, |(_, closed)| !*closed)
            .unwrap()
            .1
            .timed_out()
    }

    pub fn all(&self) -> Vec<String> {
        self.0 .0.lock().unwrap().0.clone()
    }

    pub fn text(&self) -> String {
        self.all().join("\n")
    }

    /// The first line that contains `needle`, waited for up to `timeout`; fails the test with
    /// every line there is otherwise.
    pub fn expect_line(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for(needle, timeout).unwrap_or_else(|| {
            panic!(
                "no line contains {needle:?} within {timeout:?}:\n{}",
                self.text()
            )
        })
    }

    /// Waits until a line contains `needle`; returns it.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Option<String> {
        let (lock, cv) = &*self.0;
        let deadline = Instant::now() + timeout;
        let mut lines = lock.lock().unwrap();
        loop {
            if let Some(l) = lines.0.iter().find(|l| l.contains(needle)) {
                return Some(l.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            lines = cv.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }
}

/// How to start baton.
pub struct Spawn {
    pub args: Vec<String>,
    /// Sockets passed with LISTEN_FDS at fds 3, 4, ... (names go to LISTEN_FDNAMES when any is
    /// given).
    pub fds: Vec<(OwnedFd, Option<String>)>,
    pub env: Vec<(String, String)>,
    /// Raw LISTEN_FDS override (for malformed values).
    pub listen_fds_raw: Option<String>,
    /// Whether LISTEN_PID is set (to the child's pid); systemfd --no-pid sets none.
    pub listen_pid: bool,
    /// Where the fds go, announced in LISTEN_FDS_FIRST_FD as systemfd does; unset: fd 3 and no
    /// LISTEN_FDS_FIRST_FD, as systemd does.
    pub first_fd: Option<i32>,
}

impl Spawn {
    /// `baton serve ARGS`; with no `--config` among them, `--config /dev/null` (the built-in
    /// defaults), so that a machine's /etc/baton/baton.toml cannot change the test.
    pub fn serve(args: &[&str]) -> Spawn {
        let mut all = vec!["serve".to_owned()];
        if !args.contains(&"--config") {
            all.extend(["--config".to_owned(), "/dev/null".to_owned()]);
        }
        all.extend(args.iter().map(|s| s.to_string()));
        Spawn {
            args: all,
            fds: Vec::new(),
            env: Vec::new(),
            listen_fds_raw: None,
            listen_pid: true,
            first_fd: None,
        }
    }

    pub fn fd(mut self, fd: impl Into<OwnedFd>, name: Option<&str>) -> Spawn {
        self.fds.push((fd.into(), name.map(str::to_owned)));
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Spawn {
        self.env.push((k.to_owned(), v.to_owned()));
        self
    }

    /// Starts it. With fds, `LISTEN_PID` must be the child's own pid, which is known only after
    /// fork: a shell sets it to `$$` and execs baton, keeping the pid.
    pub fn start(self) -> Baton {
        let activated = !self.fds.is_empty() || self.listen_fds_raw.is_some();
        let mut cmd = if activated && self.listen_pid {
            let mut c = Command::new("/bin/sh");
            c.arg("-c")
                .arg("LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\"")
                .arg(baton_bin())
                .args(&self.args);
            c
        } else {
            let mut c = Command::new(baton_bin());
            c.args(&self.args);
            c
        };
        cmd.env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if activated {
            let count = self
                .listen_fds_raw
                .clone()
                .unwrap_or_else(|| self.fds.len().to_string());
            cmd.env("LISTEN_FDS", count);
            if let Some(first) = self.first_fd {
                cmd.env("LISTEN_FDS_FIRST_FD", first.to_string());
            }
            if self.fds.iter().any(|(_, n)| n.is_some()) {
                let names: Vec<String> = self
                    .fds
                    .iter()
                    .map(|(_, n)| n.clone().unwrap_or_default())
                    .collect();
                cmd.env("LISTEN_FDNAMES", names.join(":"));
            }
            let raw: Vec<i32> = self.fds.iter().map(|(fd, _)| fd.as_raw_fd()).collect();
            let first = self.first_fd.unwrap_or(3);
            // SAFETY: only async-signal-safe calls (fcntl, dup2, close) between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    // Move every source out of the target range first, then into place;
                    // dup2 leaves the copies without FD_CLOEXEC.
                    let mut high = [0i32; 16];
                    for (i, fd) in raw.iter().enumerate() {
                        high[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 100);
                        if high[i] < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    for (i, fd) in high.iter().take(raw.len()).enumerate() {
                        if libc::dup2(*fd, first + i as i32) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        libc::close(*fd);
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("spawn baton");
        // The fds now live in the child; the parent's copies must not keep sockets open.
        drop(self.fds);
        Baton::adopt(child)
    }
}

impl Baton {
    /// Takes over a started child whose stdout and stderr are piped.
    pub fn adopt(mut child: Child) -> Baton {
        let stderr = Lines::default();
        let stdout = Lines::default();
        for (pipe, lines) in [
            (
                Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
                stderr.clone(),
            ),
            (Box::new(child.stdout.take().unwrap()), stdout.clone()),
        ] {
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    match line {
                        Ok(l) => lines.push(l),
                        Err(_) => break,
                    }
                }
                lines.close();
            });
        }
        Baton {
            child,
            stderr,
            stdout,
            serves: None,
        }
    }
}

/// A running baton process; killed on drop if still running.
pub struct Baton {
    pub child: Child,
    pub stderr: Lines,
    pub stdout: Lines,
    /// Where it serves, when known: after upgrades another pid serves there, and a test that
    /// fails midway must not leave that one running.
    pub serves: Option<std::net::SocketAddr>,
}

pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

impl Baton {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the `ready` event; panics with the stderr so far if it does not come.
    pub fn wait_ready(&mut self) {
        if self
            .stderr
            .wait_for("event=\"ready\"", READY_TIMEOUT)
            .is_none()
        {
            let status = self.child.try_wait();
            panic!(
                "baton did not become ready (exit: {status:?}); stderr:\n{}",
                self.stderr.text()
            );
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), sig).unwrap();
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if reaper::active() {
            return reaper::wait_exit(self.pid(), timeout);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Runs to completion (for commands that fail at start): exit status and stderr.
    pub fn finish(mut self, timeout: Duration) -> (ExitStatus, String) {
        let status = self
            .wait_exit(timeout)
            .unwrap_or_else(|| panic!("baton did not exit; stderr:\n{}", self.stderr.text()));
        self.stderr.wait_closed(Duration::from_secs(5));
        (status, self.stderr.text())
    }
}

impl Drop for Baton {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The generation serving now, whichever it is (a failed upgrade test).
            if let Some(pid) = self
                .serves
                .and_then(|addr| http::get(addr, "/-/version").ok())
                .and_then(|r| r.json()["pid"].as_i64())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if reaper::active() {
            if reaper::status(self.pid()).is_none() {
                let _ = self.child.kill();
            }
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `baton ARGS` to completion: (exit code, stdout, stderr).
pub fn run_baton(args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(baton_bin());
    cmd.args(args);
    run(cmd)
}

/// Runs a command to completion: (exit code, stdout, stderr). Works under the subreaper too,
/// where std's own wait would find nothing to wait for.
pub fn run(mut cmd: Command) -> (i32, String, String) {
    cmd.env_remove("RUST_LOG").env_remove("NOTIFY_SOCKET");
    if !reaper::active() {
        let out = cmd.output().expect("run a command");
        return (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
    }
    let mut b = Baton::adopt(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run a command"),
    );
    let status = b
        .wait_exit(Duration::from_secs(120))
        .expect("the command did not finish");
    b.stdout.wait_closed(Duration::from_secs(5));
    b.stderr.wait_closed(Duration::from_secs(5));
    (
        status.code().unwrap_or(-1),
        b.stdout.all().iter().map(|l| format!("{l}\n")).collect(),
        b.stderr.all().iter().map(|l| format!("{l}\n")).collect(),
    )
}

/// A loopback TCP listener on an ephemeral port, for handing to baton.
pub fn tcp_listener() -> (std::net::TcpListener, std::net::SocketAddr) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

/// A port that was free a moment ago, for what binds by itself (a tool, or baton's own
/// listeners).
pub fn free_port() -> u16 {
    tcp_listener().1.port()
}

/// `baton serve ARGS` on a handed-over loopback listener, ready.
pub fn start(args: &[&str]) -> (Baton, std::net::SocketAddr) {
    let (listener, addr) = tcp_listener();
    let mut baton = Spawn::serve(args).fd(listener, None).start();
    baton.wait_ready();
    (baton, addr)
}

/// The complete lines of the file at `path` (a line still being written is left out) once
/// `ready` says they are all there, within 20 s; on a timeout the test fails with the lines there
/// are and baton's stderr.
pub fn wait_lines(path: &Path, baton: &Baton, ready: impl Fn(&[String]) -> bool) -> Vec<String> {
    let mut lines = Vec::new();
    let ok = wait_until(Duration::from_secs(20), || {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        lines = text[..text.rfind('\n').map_or(0, |end| end + 1)]
            .lines()
            .map(str::to_owned)
            .collect();
        ready(&lines)
    });
    assert!(
        ok,
        "{} has {lines:?}; stderr:\n{}",
        path.display(),
        baton.stderr.text()
    );
    lines
}

/// Waits until `f` returns true, polling; false on timeout.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The children of `pid`, from every one of its threads.
pub fn children(pid: u32) -> Vec<u32> {
    let mut all = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = task.unwrap().path().join("children");
        if let Ok(text) = std::fs::read_to_string(path) {
            all.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    all
}

/// What the fds of `pid` lead to (`/proc/PID/fd` links: paths, `socket:[N]`, ...).
pub fn open_files(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .map(|target| target.to_string_lossy().into_owned())
        .collect()
}

/// The pid a pidfile names, if any.
pub fn pidfile_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Waits until the pidfile names a pid other than `not`, and that pid answers `/-/version` on
/// `addr`; returns it. `keeper` is the process whose stderr explains a failure.
pub fn wait_serving(
    pidfile: &Path,
    addr: std::net::SocketAddr,
    not: Option<u32>,
    keeper: &Baton,
) -> u32 {
    let mut pid = None;
    let ok = wait_until(Duration::from_secs(30), || {
        pid = pidfile_pid(pidfile)
            .filter(|p| Some(*p) != not)
            .filter(|p| {
                http::get(addr, "/-/version")
                    .ok()
                    .is_some_and(|r| r.json()["pid"] == *p)
            });
        pid.is_some()
    });
    assert!(
        ok,
        "no new generation serves (pidfile: {:?}); stderr:\n{}",
        std::fs::read_to_string(pidfile),
        keeper.stderr.text()
    );
    pid.unwrap()
}

/// The new pid `baton reload` names in its answer (`... to generation G (pid N) ...`).
pub fn reload_new_pid(out: &str) -> u32 {
    out.split("(pid ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no new pid in {out:?}"))
}

/// SIGTERM to `pid`, a generation this test started or upgraded to, and its clean exit.
pub fn stop_and_wait_exit(pid: u32, timeout: Duration) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    assert!(reaper::wait_exit(pid, timeout).is_some_and(|s| s.success()));
}

/// `baton reload --pid old`, which must succeed, then the old generation's exit, which must be
/// a success (without a probation it exits once it has drained): the new generation's pid.
pub fn reload_and_wait_exit(old: u32, timeout: Duration) -> u32 {
    let (code, out, err) = run_baton(&["reload", "--pid", &old.to_string()]);
    assert_eq!(code, 0, "reload failed: {err}");
    let new = reload_new_pid(&out);
    let status = reaper::wait_exit(old, timeout).expect("the old generation did not exit");
    assert!(status.success(), "{status:?}");
    new
}

/// A first generation on a handed-over loopback listener, ready. Without a probation unless
/// `args` name one, so that an upgrade is over when its old process exits.
pub fn start_generation(args: &[&str], env: &[(&str, &str)]) -> (Baton, std::net::SocketAddr) {
    reaper::init();
    let (listener, addr) = tcp_listener();
    let mut args = args.to_vec();
    if !args.contains(&"--upgrade-probation") {
        args.extend(["--upgrade-probation", "0s"]);
    }
    let mut spawn = Spawn::serve(&args).fd(listener, None);
    for (k, v) in env {
        spawn = spawn.env(k, v);
    }
    let mut baton = spawn.start();
    baton.serves = Some(addr);
    baton.wait_ready();
    (baton, addr)
}

/// Runs h2load (Debian's nghttp2-client) and returns its summary: (requests, succeeded,
/// failed). h2load counts a failed request as both failed and errored: the failed ones are
/// taken.
pub fn h2load(cmd: Command) -> (u64, u64, u64) {
    let (code, out, err) = run(cmd);
    assert!(
        code != 127 && !err.contains("No such file"),
        "h2load is needed: apt-get install nghttp2-client"
    );
    let line = out
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or_else(|| panic!("no summary from h2load (exit {code}):\n{out}{err}"));
    let field = |name: &str| -> u64 {
        line.split(", ")
            .find_map(|part| part.trim_start_matches("requests: ").strip_suffix(name))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no '{name}' in {line:?}"))
    };
    (field(" total"), field(" succeeded"), field(" failed"))
}
