//! The examples as real processes: `examples/echo.rs` (a current-thread runtime) and
//! `examples/axum.rs` (with the `hyper` feature) upgraded on SIGUSR2 under a client, as a
//! NotifyAccess=main service manager hears them, and through the faults of an upgrade.
//!
//! The examples are built once per test binary with the cargo that runs the tests, into the same
//! target directory and profile. The test process is then a child subreaper (see
//! tests/common/reaper.rs of baton), as systemd is for a service: each new generation is
//! orphaned by its double fork and adopted here.

#[allow(dead_code)]
#[path = "../../tests/common/http.rs"]
mod http;
#[allow(dead_code)]
#[path = "../../tests/common/notify.rs"]
mod notify;
#[allow(dead_code)]
#[path = "../../tests/common/reaper.rs"]
mod reaper;

#[path = "common/examples.rs"]
mod build_examples;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use notify::Receiver;

const TIMEOUT: Duration = Duration::from_secs(15);

/// The directory of the built examples, built once.
fn examples_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // axum needs the `hyper` feature; its test is compiled out without it.
        let names: &[&str] = if cfg!(feature = "hyper") {
            &["echo", "axum"]
        } else {
            &["echo"]
        };
        build_examples::build(names)
    })
}

fn example(name: &str) -> PathBuf {
    examples_dir().join(name)
}

fn kill(pid: u32, signal: Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
}

/// Waits until `f` returns true, polling; false on timeout.
fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
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
fn children(pid: u32) -> Vec<u32> {
    let mut all = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return all;
    };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            all.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    all
}

/// A fresh directory under the target's temp dir (the file system of the built examples, so
/// that they can be hard-linked), removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("lifecycle-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The lines every generation wrote to the shared stderr pipe; waitable.
#[derive(Clone, Default)]
struct Lines(Arc<(Mutex<Vec<String>>, Condvar)>);

impl Lines {
    fn push(&self, line: String) {
        let (lock, cv) = &*self.0;
        lock.lock().unwrap().push(line);
        cv.notify_all();
    }

    fn all(&self) -> Vec<String> {
        self.0 .0.lock().unwrap().clone()
    }

    fn text(&self) -> String {
        self.all().join("\n")
    }

    /// How many lines there are so far: a mark for [`Lines::wait`].
    fn mark(&self) -> usize {
        self.0 .0.lock().unwrap().len()
    }

    /// Waits until a line from the `from`th on satisfies `f`; returns it.
    fn wait(&self, from: usize, timeout: Duration, f: impl Fn(&str) -> bool) -> Option<String> {
        let (lock, cv) = &*self.0;
        let deadline = Instant::now() + timeout;
        let mut lines = lock.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().skip(from).find(|l| f(l)) {
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

/// A field of a log line: `key=value` or `key="value"`.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = line.split(&format!(" {key}=")).nth(1)?;
    match rest.strip_prefix('"') {
        Some(quoted) => quoted.split('"').next(),
        None => rest.split_whitespace().next(),
    }
}

/// Whether the line is the event `event` of generation `generation`.
fn is_event(line: &str, event: &str, generation: u64) -> bool {
    field(line, "event") == Some(event)
        && field(line, "generation") == Some(&generation.to_string())
}

/// An example started at `127.0.0.1:0`; every generation it becomes is killed on drop.
struct Example {
    child: Child,
    stderr: Lines,
    addr: SocketAddr,
}

impl Example {
    /// Starts `exe` on an ephemeral port and waits until generation 1 serves.
    fn start(exe: &Path, env: &[(&str, &str)], notify: Option<&Receiver>) -> Example {
        let mut cmd = Command::new(exe);
        cmd.arg("127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for name in [
            "RUST_LOG",
            "NOTIFY_SOCKET",
            "JOURNAL_STREAM",
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
            "ECHO_PREFIX",
        ] {
            cmd.env_remove(name);
        }
        cmd.envs(env.iter().copied());
        if let Some(receiver) = notify {
            cmd.env("NOTIFY_SOCKET", &receiver.path);
        }
        let mut child = cmd.spawn().expect("spawn the example");
        if let Some(receiver) = notify {
            receiver.set_main_pid(child.id());
        }
        let stderr = Lines::default();
        let pipe = child.stderr.take().unwrap();
        let lines = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                match line {
                    Ok(l) => lines.push(l),
                    Err(_) => break,
                }
            }
        });
        let mut example = Example {
            child,
            stderr,
            addr: "127.0.0.1:0".parse().unwrap(),
        };
        let ready = example.wait_event("ready", 1);
        assert_eq!(example.pid_of(&ready), example.child.id());
        let listening = example.wait_event("listening", 1);
        example.addr = field(&listening, "address")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {listening:?}"));
        example
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for `event` of `generation`; panics with everything logged so far if it does not
    /// come.
    fn wait_event(&self, event: &str, generation: u64) -> String {
        self.wait_event_from(0, event, generation)
    }

    /// The same, among the lines from the `from`th on.
    fn wait_event_from(&self, from: usize, event: &str, generation: u64) -> String {
        self.stderr
            .wait(from, TIMEOUT, |l| is_event(l, event, generation))
            .unwrap_or_else(|| {
                panic!(
                    "no event={event:?} of generation {generation}; stderr:\n{}",
                    self.stderr.text()
                )
            })
    }

    /// Waits for a line containing `needle`.
    fn wait_line(&self, needle: &str) -> String {
        self.stderr
            .wait(0, TIMEOUT, |l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in stderr:\n{}", self.stderr.text()))
    }

    /// The pid in `serving generation G (pid P)`.
    fn pid_of(&self, ready: &str) -> u32 {
        ready
            .split("(pid ")
            .nth(1)
            .and_then(|s| s.split(')').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {ready:?}"))
    }

    /// The new pid of an upgrade the old process started (`upgrade-spawned`).
    fn spawned_pid(&self, generation: u64) -> u32 {
        let line = self.wait_event("upgrade-spawned", generation);
        field(&line, "new_pid")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no new_pid in {line:?}"))
    }

    /// SIGUSR2 to `old`, which serves generation `to - 1`; returns the pid of generation `to`
    /// once it is the main process (the probation passed) and `old` exited 0.
    fn upgrade(&self, old: u32, to: u64) -> u32 {
        let from = self.stderr.mark();
        kill(old, Signal::SIGUSR2);
        self.finish_upgrade(from, old, to)
    }

    /// The rest of [`Example::upgrade`], begun when the stderr had `from` lines.
    fn finish_upgrade(&self, from: usize, old: u32, to: u64) -> u32 {
        let new = self.pid_of(&self.wait_event_from(from, "ready", to));
        assert_ne!(new, old);
        self.wait_event_from(from, "main", to);
        let status = reaper::wait_exit(old, TIMEOUT)
            .unwrap_or_else(|| panic!("old pid {old} did not exit:\n{}", self.stderr.text()));
        assert!(status.success(), "old pid {old}: {status:?}");
        // Orphaned by the double fork, adopted by the subreaper (systemd's part).
        assert!(descends_from_us(new), "pid {new} is not ours");
        new
    }

    /// SIGTERM to `pid`, which must exit 0.
    fn stop(&self, pid: u32) {
        kill(pid, Signal::SIGTERM);
        let status = self.wait_exit(pid);
        assert!(
            status.success(),
            "pid {pid}: {status:?}\n{}",
            self.stderr.text()
        );
    }

    fn wait_exit(&self, pid: u32) -> ExitStatus {
        reaper::wait_exit(pid, TIMEOUT)
            .unwrap_or_else(|| panic!("pid {pid} did not exit:\n{}", self.stderr.text()))
    }

    /// Every pid a generation or an upgrade named.
    fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.child.id()];
        for line in self.stderr.all() {
            let starting = line
                .split(", pid ")
                .nth(1)
                .filter(|_| field(&line, "event") == Some("start"))
                .and_then(|p| p.split_whitespace().next());
            pids.extend(
                [starting, field(&line, "new_pid")]
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
        pids
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        // Only our own descendants: a pid reaped by the double fork's intermediate process, not
        // here, may be another process's by now.
        for pid in self.pids() {
            if reaper::status(pid).is_none() && descends_from_us(pid) {
                kill(pid, Signal::SIGKILL);
            }
        }
    }
}

/// Whether `pid` is a live descendant of the test process.
fn descends_from_us(mut pid: u32) -> bool {
    let me = std::process::id();
    for _ in 0..8 {
        // `pid (comm) state ppid ...`; comm may hold anything, up to the last `)`.
        let Some(ppid) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let rest = stat.rsplit_once(')')?.1.to_owned();
                rest.split_whitespace().nth(1)?.parse::<u32>().ok()
            })
        else {
            return false;
        };
        if ppid == me {
            return true;
        }
        if ppid <= 1 {
            return false;
        }
        pid = ppid;
    }
    false
}

/// A client thread that runs one exchange after another, each on a fresh connection, counting
/// the answers by the key each exchange returns and recording every failure.
struct Client {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    seen: Arc<Mutex<BTreeMap<String, u64>>>,
    failures: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl Client {
    fn start(exchange: impl Fn(u64) -> Result<String, String> + Send + 'static) -> Client {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (s, o, k, f) = (stop.clone(), ok.clone(), seen.clone(), failures.clone());
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            let mut n = 0;
            while !s.load(Ordering::SeqCst) {
                n += 1;
                match exchange(n) {
                    Ok(key) => {
                        *k.lock().unwrap().entry(key).or_insert(0) += 1;
                        o.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => f
                        .lock()
                        .unwrap()
                        .push(format!("{:?} #{n}: {e}", started.elapsed())),
                }
            }
        });
        Client {
            stop,
            ok,
            seen,
            failures,
            thread: Some(thread),
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    /// Waits until `n` more exchanges succeeded.
    fn wait_progress(&self, n: u64) {
        let target = self.ok() + n;
        assert!(
            wait_until(TIMEOUT, || self.ok() >= target),
            "the client made no progress: {} ok, failures: {:#?}",
            self.ok(),
            self.failures.lock().unwrap()
        );
    }

    /// Stops it: (successful exchanges by key, failures).
    fn finish(mut self) -> (BTreeMap<String, u64>, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        let seen = self.seen.lock().unwrap().clone();
        let failures = self.failures.lock().unwrap().clone();
        (seen, failures)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// One line on a fresh connection: connect, send a unique line, read its echo, close.
fn echo_once(addr: SocketAddr, prefix: &str, n: u64) -> Result<String, String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let line = format!("line {n} of test pid {}", std::process::id());
    (&stream)
        .write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut echoed = String::new();
    BufReader::new(&stream)
        .read_line(&mut echoed)
        .map_err(|e| format!("read: {e}"))?;
    let want = format!("{prefix}{line}\n");
    if echoed != want {
        return Err(format!("sent {line:?}, got {echoed:?}"));
    }
    Ok(String::new())
}

/// A client of the echo example at `addr`, whose answers begin with `prefix`.
fn echo_client(addr: SocketAddr, prefix: &str) -> Client {
    let prefix = prefix.to_owned();
    Client::start(move |n| echo_once(addr, &prefix, n))
}

const PREFIX: &str = "echo: ";

/// Tests 1 and 5: the echo example runs on a current-thread runtime.
#[test]
fn ten_upgrades_of_echo_under_a_fresh_connection_per_line_lose_no_echo() {
    let echo = Example::start(&example("echo"), &[("ECHO_PREFIX", PREFIX)], None);
    let client = echo_client(echo.addr, PREFIX);
    client.wait_progress(50);
    let mut pid = echo.pid();
    let mut pids = vec![pid];
    for generation in 2..=11 {
        pid = echo.upgrade(pid, generation);
        pids.push(pid);
        // The old generation is gone: these echoes come from the new one.
        client.wait_progress(20);
    }
    let (seen, failures) = client.finish();
    let ok: u64 = seen.values().sum();
    assert!(
        failures.is_empty(),
        "{} failed echoes out of {}: {failures:#?}",
        failures.len(),
        ok + failures.len() as u64
    );
    assert!(ok >= 250, "too few echoes to mean anything: {ok}");
    // The private variables the old generation set for the new one carry the service's own
    // prefix: ECHO_FOR_PID names the new pid, and nothing is called BATON_. (/proc/PID/environ
    // is the environment the process was started with, before it took the variables.)
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let vars: Vec<String> = environ
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    assert!(
        vars.contains(&format!("ECHO_FOR_PID={pid}")),
        "generation 11 (pid {pid}) was not started with ECHO_FOR_PID={pid}: {vars:?}"
    );
    let baton: Vec<&String> = vars.iter().filter(|v| v.starts_with("BATON_")).collect();
    assert!(
        baton.is_empty(),
        "baton's variables in echo's environment: {baton:?}"
    );
    pids.sort();
    pids.dedup();
    assert_eq!(pids.len(), 11, "eleven generations, each its own pid");
    for generation in 2..=11 {
        echo.wait_event("promoted", generation - 1);
    }
    assert!(
        echo.stderr.all().iter().all(|l| !l.contains(" ERROR ")),
        "errors logged:\n{}",
        echo.stderr.text()
    );
    echo.stop(pid);
}

/// Test 2: what a NotifyAccess=main service manager hears from an upgrade of echo.
#[test]
fn echo_tells_the_service_manager_reloading_ready_mainpid_then_ready_from_the_new_pid() {
    let dir = TempDir::new("notify");
    let receiver = Receiver::new(dir.path());
    let echo = Example::start(&example("echo"), &[], Some(&receiver));
    let old = echo.pid();
    receiver
        .wait_accepted(TIMEOUT, |m| m.pid == old as i32 && m.has("READY=1"))
        .expect("READY=1 from the first pid");
    let new = echo.upgrade(old, 2);
    receiver
        .wait_accepted(TIMEOUT, |m| m.pid == new as i32 && m.has("READY=1"))
        .expect("READY=1 from the new main pid");
    assert_eq!(receiver.main_pid(), Some(new as i32));
    // Everything the old process sent is in: a datagram of ours, sent after it exited, came.
    let sentinel = std::os::unix::net::UnixDatagram::unbound().unwrap();
    sentinel.send_to(b"X_SENTINEL=1", &receiver.path).unwrap();
    let me = std::process::id() as i32;
    assert!(wait_until(TIMEOUT, || receiver
        .messages()
        .iter()
        .any(|m| m.pid == me)));
    let messages: Vec<_> = receiver
        .messages()
        .into_iter()
        .filter(|m| m.pid != me)
        .collect();
    let dropped: Vec<_> = messages.iter().filter(|m| !m.accepted).collect();
    assert!(
        dropped.is_empty(),
        "messages systemd would drop: {dropped:#?}"
    );
    let summary: Vec<(i32, &str)> = messages
        .iter()
        .map(|m| (m.pid, m.text.lines().next().unwrap_or("")))
        .collect();
    let new_main = format!("MAINPID={new}");
    let (o, n) = (old as i32, new as i32);
    assert_eq!(
        summary,
        [
            // echo binds its socket itself: it keeps it in the service manager's fd store.
            (o, "FDSTORE=1"),
            (o, "READY=1"),
            (o, "RELOADING=1"),
            // The reload is over once N serves; O, still the main pid, stands by.
            (o, "READY=1"),
            (o, new_main.as_str()),
            (o, "BARRIER=1"),
            (n, "FDSTORE=1"),
            (n, "READY=1"),
        ],
        "{messages:#?}"
    );
    for stored in [&messages[0], &messages[6]] {
        assert_eq!(stored.get("FDNAME"), Some("bound/echo"), "{stored:?}");
        assert_eq!(stored.sockets, [echo.addr.to_string()], "{stored:?}");
    }
    let messages: Vec<_> = messages
        .into_iter()
        .filter(|m| !m.has("FDSTORE=1"))
        .collect();
    assert!(
        messages[1]
            .get("MONOTONIC_USEC")
            .is_some_and(|v| v.parse::<u64>().is_ok()),
        "RELOADING=1 without MONOTONIC_USEC: {:?}",
        messages[1]
    );
    let standing_by = messages[2].get("STATUS").unwrap_or_default();
    assert!(
        standing_by.starts_with(&format!(
            "generation 2 (pid {new}) serves, on probation for 500ms"
        )),
        "{standing_by}"
    );
    assert_eq!(messages[4].fds, 1, "BARRIER=1 carries one fd");
    let serving = messages[5].get("STATUS").unwrap_or_default();
    assert!(
        serving.starts_with(&format!("serving generation 2 (pid {new})")),
        "{serving}"
    );
    // And it serves.
    assert_eq!(echo_once(echo.addr, "", 1), Ok(String::new()));
    echo.stop(new);
}

/// A copy of the echo example in its own directory (hard-linked when it can be), which an
/// upgrade executes again by that path.
fn echo_copy(dir: &TempDir) -> PathBuf {
    let exe = dir.path().join("echo");
    if std::fs::hard_link(example("echo"), &exe).is_err() {
        std::fs::copy(example("echo"), &exe).unwrap();
    }
    exe
}

/// Replaces `exe` by a shell script.
fn script(exe: &Path, body: &str) {
    std::fs::remove_file(exe).unwrap();
    std::fs::write(exe, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(exe, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Echo started from a copy; `break_it` spoils the copy, SIGUSR2 upgrades, and the upgrade
/// fails with `reason`: logged, the old process serves on (with no child left) and no echo
/// fails.
fn failed_upgrade(tag: &str, break_it: impl FnOnce(&Path), reason: impl FnOnce(&Path) -> String) {
    let dir = TempDir::new(tag);
    let exe = echo_copy(&dir);
    let echo = Example::start(&exe, &[("ECHO_PREFIX", PREFIX)], None);
    let client = echo_client(echo.addr, PREFIX);
    client.wait_progress(20);
    break_it(&exe);
    let old = echo.pid();
    kill(old, Signal::SIGUSR2);
    let failed = echo.wait_line("upgrade to generation 2 failed: ");
    assert!(is_event(&failed, "upgrade-failed", 1), "{failed}");
    let reason = reason(&exe);
    assert!(failed.contains(&reason), "want {reason:?} in {failed:?}");
    client.wait_progress(20);
    let (seen, failures) = client.finish();
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(seen.values().sum::<u64>() >= 40);
    assert!(reaper::status(old).is_none(), "the old process is gone");
    assert!(
        echo.stderr.all().iter().all(|l| !is_event(l, "ready", 2)),
        "a generation 2 served:\n{}",
        echo.stderr.text()
    );
    // The intermediate process of the double fork was reaped by the old process itself.
    assert!(
        wait_until(TIMEOUT, || children(old).is_empty()),
        "the old process kept a child: {:?}",
        children(old)
    );
    echo.stop(old);
}

/// Test 3, the fault matrix.
#[test]
fn fault_echo_binary_missing() {
    failed_upgrade(
        "missing",
        |exe| std::fs::remove_file(exe).unwrap(),
        |exe| {
            format!(
                "cannot execute {}: No such file or directory",
                exe.display()
            )
        },
    );
}

#[test]
fn fault_echo_binary_not_executable() {
    failed_upgrade(
        "noexec",
        |exe| {
            std::fs::remove_file(exe).unwrap();
            std::fs::write(exe, "not a program").unwrap();
            std::fs::set_permissions(exe, std::fs::Permissions::from_mode(0o644)).unwrap();
        },
        |exe| format!("cannot execute {}: Permission denied", exe.display()),
    );
}

#[test]
fn fault_echo_binary_exits_at_once() {
    failed_upgrade(
        "exits",
        |exe| script(exe, "exit 3"),
        |exe| {
            format!(
                ", {}) exited before it was ready: exited with status 3",
                exe.display()
            )
        },
    );
}

/// A new binary that never becomes ready: the old process serves on while it waits (the
/// example's upgrade timeout is the default 30 s, too long for a test), and once the hung
/// process dies the upgrade fails.
#[test]
fn fault_echo_binary_never_ready() {
    let dir = TempDir::new("hangs");
    let exe = echo_copy(&dir);
    let echo = Example::start(&exe, &[("ECHO_PREFIX", PREFIX)], None);
    let client = echo_client(echo.addr, PREFIX);
    client.wait_progress(20);
    script(&exe, "exec sleep 600");
    kill(echo.pid(), Signal::SIGUSR2);
    let new = echo.spawned_pid(1);
    // It hangs: `sleep` runs in its place, and the old process serves meanwhile.
    assert!(wait_until(TIMEOUT, || std::fs::read_to_string(format!(
        "/proc/{new}/cmdline"
    ))
    .is_ok_and(|c| c.starts_with("sleep"))));
    client.wait_progress(50);
    assert!(
        echo.stderr
            .all()
            .iter()
            .all(|l| !l.contains("upgrade to generation 2")),
        "{}",
        echo.stderr.text()
    );
    kill(new, Signal::SIGKILL);
    let failed = echo.wait_line("upgrade to generation 2 failed: ");
    let want = format!(
        "the new process (pid {new}, {}) exited before it was ready",
        exe.display()
    );
    assert!(failed.contains(&want), "want {want:?} in {failed:?}");
    client.wait_progress(20);
    let (_, failures) = client.finish();
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(wait_until(TIMEOUT, || children(echo.pid()).is_empty()));
    echo.stop(echo.pid());
}

/// A new generation killed on probation: the old one accepts again, and the next upgrade works.
#[test]
fn fault_echo_killed_on_probation_is_rolled_back() {
    let echo = Example::start(&example("echo"), &[("ECHO_PREFIX", PREFIX)], None);
    let client = echo_client(echo.addr, PREFIX);
    client.wait_progress(20);
    let old = echo.pid();
    kill(old, Signal::SIGUSR2);
    let probation = echo.wait_event("probation", 1);
    let new: u32 = field(&probation, "new_pid").unwrap().parse().unwrap();
    // Within the probation of 500 ms.
    kill(new, Signal::SIGKILL);
    let rolled_back = echo.wait_event("upgrade-rolled-back", 1);
    assert!(
        rolled_back.contains(&format!(
            "upgrade to generation 2 rolled back: pid {new} was killed by SIGKILL"
        )),
        "{rolled_back}"
    );
    // Reaped by its parent, the intermediate process of the double fork.
    assert!(wait_until(TIMEOUT, || !Path::new(&format!("/proc/{new}")).exists()));
    // The old process serves again: every echo from now on is its own.
    client.wait_progress(50);
    assert!(reaper::status(old).is_none());
    // Killed while serving, the new process may have cut the exchanges it had accepted (a reset
    // or an early close); no connect may fail.
    let (_, failures) = client.finish();
    let refused: Vec<_> = failures.iter().filter(|f| f.contains("connect")).collect();
    assert!(refused.is_empty(), "{failures:#?}");
    assert!(failures.len() <= 2, "{failures:#?}");
    // The next upgrade, of a generation that lives, works.
    let client = echo_client(echo.addr, PREFIX);
    let new = echo.upgrade(old, 2);
    client.wait_progress(20);
    let (_, failures) = client.finish();
    assert!(failures.is_empty(), "{failures:#?}");
    echo.stop(new);
}

/// Test 4: the axum example serves and upgrades; no request fails.
#[cfg(feature = "hyper")]
#[test]
fn axum_serves_and_upgrades_with_no_failed_request() {
    let axum = Example::start(&example("axum"), &[], None);
    let addr = axum.addr;
    let get = move || -> Result<String, String> {
        let r = http::get(addr, "/").map_err(|e| format!("GET /: {e}"))?;
        match (r.status, r.text()) {
            (200, body) if body.starts_with("hello from generation ") => Ok(body),
            (status, body) => Err(format!("GET /: {status} {body:?}")),
        }
    };
    let old = axum.pid();
    assert_eq!(get(), Ok(format!("hello from generation 1, pid {old}\n")));
    let client = Client::start(move |_| get());
    client.wait_progress(50);
    // A connection accepted by generation 1 (the client's later ones were), whose request
    // comes only once generation 1 drains: it is answered, then the connection closes.
    let mut late = http::Conn::tcp(addr).unwrap();
    client.wait_progress(20);
    let from = axum.stderr.mark();
    kill(old, Signal::SIGUSR2);
    axum.wait_event_from(from, "handed-over", 1);
    let answer = late.get("/").expect("the request on a draining connection");
    assert_eq!(
        (answer.status, answer.text()),
        (200, format!("hello from generation 1, pid {old}\n"))
    );
    late.expect_close().unwrap();
    let new = axum.finish_upgrade(from, old, 2);
    client.wait_progress(50);
    assert_eq!(get(), Ok(format!("hello from generation 2, pid {new}\n")));
    let (seen, failures) = client.finish();
    assert!(
        failures.is_empty(),
        "{failures:#?}\nstderr:\n{}",
        axum.stderr.text()
    );
    let by_generation: Vec<_> = seen.keys().cloned().collect();
    assert_eq!(
        by_generation,
        [
            format!("hello from generation 1, pid {old}\n"),
            format!("hello from generation 2, pid {new}\n"),
        ],
        "{seen:?}"
    );
    axum.stop(new);
}
