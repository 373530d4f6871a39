//! The local interfaces against a hostile neighbour (issue 9): the control socket, the
//! pidfile, baton's private environment variables, and the CLI, with real processes. An
//! unprivileged neighbour is uid 65534 (setpriv).
//!
//! The test process is a child subreaper (common::reaper): new generations are adopted here.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::http;
use common::{reaper, run, run_baton, tcp_listener, Baton, Spawn, TempDir};
use nix::sys::signal::Signal;

const NOBODY: u32 = 65534;

/// `setpriv` to uid/gid 65534 without groups, then `program args`.
fn as_nobody(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
        program,
    ])
    .args(args);
    c
}

/// Starts a plain first generation on a handed-over loopback listener (no probation).
fn start(args: &[&str], env: &[(&str, &str)]) -> (Baton, SocketAddr) {
    common::start_generation(args, env)
}

fn pid_of(addr: SocketAddr) -> u32 {
    http::get(addr, "/-/version").unwrap().json()["pid"]
        .as_u64()
        .unwrap() as u32
}

fn kill(pid: u32, signal: Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
}

fn wait_gone(pid: u32) -> bool {
    match baton::control::ProcessHandle::open(pid) {
        Ok(handle) => handle.wait_exit(Duration::from_secs(30)).unwrap(),
        Err(_) => true,
    }
}

/// The squatter (run as uid 65534 by `control_socket_names_cannot_be_taken`): binds the
/// abstract names `@baton/control/<pid>` that earlier versions listened on, for the pids from
/// `BATON_TEST_SQUAT_FROM` on, and tries to create every control socket path it can think of;
/// prints what it got and waits for EOF on stdin. A no-op in a normal test run.
#[test]
fn zz_squatter_helper() {
    let Ok(from) = std::env::var("BATON_TEST_SQUAT_FROM") else {
        return;
    };
    let from: u32 = from.parse().unwrap();
    let count: u32 = std::env::var("BATON_TEST_SQUAT_COUNT")
        .unwrap()
        .parse()
        .unwrap();
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    use std::os::linux::net::SocketAddrExt;
    let mut held = Vec::new();
    let mut paths = 0;
    for i in 0..count {
        let pid = 300 + (from - 300 + i) % (pid_max - 300);
        let name = format!("baton/control/{pid}");
        if let Ok(l) = std::os::unix::net::SocketAddr::from_abstract_name(&name)
            .and_then(|a| std::os::unix::net::UnixListener::bind_addr(&a))
        {
            held.push(l);
        }
        for dir in ["/run/baton/control", "/run/baton"] {
            if let Ok(l) = std::os::unix::net::UnixListener::bind(format!("{dir}/{pid}")) {
                paths += 1;
                held.push(l);
            }
        }
    }
    println!("squatting {} names, {paths} paths", held.len());
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

#[test]
fn control_socket_names_cannot_be_taken() {
    reaper::init();
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let count = 8000.min(pid_max - 400);
    let from = last + 1;
    let in_range = |pid: u32| (pid + pid_max - from) % pid_max < count;
    let mut squatter = as_nobody(
        &std::env::current_exe().unwrap().display().to_string(),
        &[
            "--exact",
            "zz_squatter_helper",
            "--nocapture",
            "--test-threads",
            "1",
        ],
    );
    squatter
        .env("BATON_TEST_SQUAT_FROM", from.to_string())
        .env("BATON_TEST_SQUAT_COUNT", count.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0);
    let mut squatter = squatter.spawn().unwrap();
    let mut out = BufReader::new(squatter.stdout.take().unwrap());
    let report = loop {
        let mut line = String::new();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the squatter said nothing"
        );
        // libtest prints `test NAME ... ` first, on the same line.
        if let Some(at) = line.find("squatting ") {
            break line[at..].to_owned();
        }
    };
    let names: u32 = report.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(
        names > count / 2,
        "the squatter got too few names: {report}"
    );
    assert!(report.contains(" 0 paths"), "{report}");

    let (baton, addr) = start(&[], &[]);
    let first = baton.pid();
    assert!(
        in_range(first),
        "pid {first} was not squatted ({from}..+{count}): the test proves nothing"
    );
    // A plain request, a reload (the new generation binds a socket of its own), a status.
    assert_eq!(http::get(addr, "/-/healthy").unwrap().status, 200);
    let (code, out, err) = run_baton(&["reload", "--pid", &first.to_string()]);
    assert_eq!(code, 0, "reload refused: {out} {err}");
    let second = pid_of(addr);
    assert_ne!(second, first);
    assert!(wait_gone(first));
    let (code, out, err) = run_baton(&["status", "--pid", &second.to_string()]);
    assert_eq!(code, 0, "{out} {err}");
    assert!(out.contains("generation 2"), "{out}");

    // The neighbour may neither ask nor stop.
    let (code, out, err) = run(as_nobody(
        common::baton_bin(),
        &["status", "--pid", &second.to_string()],
    ));
    assert_eq!(code, 4, "{out} {err}");
    assert_eq!(out, "");
    assert!(err.contains("permission denied"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let (code, _, err) = run(as_nobody(
        common::baton_bin(),
        &["stop", "--pid", &second.to_string()],
    ));
    assert_eq!(code, 1, "{err}");
    assert_eq!(http::get(addr, "/-/healthy").unwrap().status, 200);

    let (code, _, err) = run_baton(&["stop", "--pid", &second.to_string()]);
    assert_eq!(code, 0, "{err}");
    assert!(wait_gone(second));
    let sockets = std::fs::read_dir("/run/baton/control").unwrap();
    assert!(
        !sockets
            .flatten()
            .any(|e| e.file_name() == second.to_string().as_str()),
        "the socket of pid {second} was left behind"
    );
    drop(squatter.stdin.take());
    let _ = squatter.kill();
    let _ = squatter.wait();
    drop(baton);
}

#[test]
fn control_directory_is_private() {
    let (baton, _addr) = start(&[], &[]);
    let dir = Path::new("/run/baton/control");
    let mode = std::fs::symlink_metadata(dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    let socket = dir.join(baton.pid().to_string());
    let mode = std::fs::symlink_metadata(&socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    kill(baton.pid(), Signal::SIGTERM);
}

#[test]
fn a_control_socket_that_cannot_be_set_up_is_a_warning() {
    // Every place this process could use is unusable: a RUNTIME_DIRECTORY that is a file, and
    // a user (54321, no account) whose default directories cannot be created: no
    // /run/user/54321, /run/baton/control is root's, /tmp/baton-54321 is made root's below.
    let dir = TempDir::new("ctl-nowhere");
    let file = dir.join("not-a-dir");
    std::fs::write(&file, "").unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let squatted = Path::new("/tmp/baton-54321");
    let made = std::fs::create_dir(squatted).is_ok();
    reaper::init();
    let (listener, addr) = tcp_listener();
    use std::os::fd::AsRawFd;
    // LISTEN_PID must be the pid of baton itself: the shell sets it and execs setpriv, which
    // execs baton, all in one process.
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$; export LISTEN_PID; exec setpriv --reuid=54321 --regid=54321 --clear-groups \"$0\" serve --config /dev/null")
        .arg(common::baton_bin())
        .env("LISTEN_FDS", "1")
        .env("RUNTIME_DIRECTORY", &file)
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let raw = listener.as_raw_fd();
    // SAFETY: dup2 only, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // dup2(3, 3) would leave FD_CLOEXEC set: clear it either way.
            if libc::dup2(raw, 3) < 0 || libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut baton = Baton::adopt(cmd.spawn().unwrap());
    drop(listener);
    baton.wait_ready();
    assert!(
        baton
            .stderr
            .text()
            .contains("event=\"control-unavailable\""),
        "{}",
        baton.stderr.text()
    );
    assert_eq!(http::get(addr, "/-/healthy").unwrap().status, 200);
    baton.signal(Signal::SIGTERM);
    assert!(baton.wait_exit(Duration::from_secs(30)).unwrap().success());
    if made {
        let _ = std::fs::remove_dir(squatted);
    }
}

/// Holds `path`'s lock like a running instance, from this test process.
fn lock(path: &Path) -> std::fs::File {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: flock on an fd we own.
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
    f
}

/// Whether `pid` has `path` open.
fn has_open(pid: u32, path: &Path) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == path))
        })
        .unwrap_or(false)
}

#[test]
fn pidfile_removed_while_a_start_waits_for_its_lock_gives_one_holder() {
    reaper::init();
    let dir = TempDir::new("pidfile-race");
    let pidfile = dir.join("baton.pid");
    let pidfile_arg = pidfile.display().to_string();
    // A stopping instance (played by this process) holds the lock...
    let held = lock(&pidfile);
    // ...while B starts: it opens the file and retries the lock.
    let (listener_b, addr_b) = tcp_listener();
    let mut b = Spawn::serve(&["--pidfile", &pidfile_arg])
        .fd(listener_b, None)
        .start();
    assert!(
        common::wait_until(Duration::from_secs(10), || has_open(b.pid(), &pidfile)),
        "B never opened the pidfile: {}",
        b.stderr.text()
    );
    // The instance stops: removes its pidfile, then its lock goes with it.
    std::fs::remove_file(&pidfile).unwrap();
    drop(held);
    // B holds the lock of whatever the path names now, or nothing; then C starts.
    let b_ready = b
        .stderr
        .wait_for("event=\"ready\"", Duration::from_secs(10))
        .is_some();
    let (listener_c, addr_c) = tcp_listener();
    let c = Spawn::serve(&["--pidfile", &pidfile_arg])
        .fd(listener_c, None)
        .start();
    let c_ready = c
        .stderr
        .wait_for("event=\"ready\"", Duration::from_secs(5))
        .is_some();
    assert!(
        !(b_ready && c_ready),
        "two instances hold the pidfile {pidfile_arg}: B (pid {}) on {addr_b} and C (pid {}) on {addr_c}",
        b.pid(),
        c.pid()
    );
    assert!(b_ready, "B did not start: {}", b.stderr.text());
    let (status, err) = c.finish(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("already running as pid {}", b.pid())),
        "{err}"
    );
    // The path names B's locked file.
    let probe = baton::pidfile::probe(&pidfile).unwrap();
    assert_eq!(probe, baton::pidfile::Probe::Running(b.pid()));
    assert_eq!(http::get(addr_b, "/-/healthy").unwrap().status, 200);
    b.signal(Signal::SIGTERM);
    assert!(b.wait_exit(Duration::from_secs(30)).unwrap().success());
}

#[test]
fn other_users_cannot_open_the_pidfile_to_block_a_start() {
    reaper::init();
    let dir = TempDir::new("pidfile-others");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let pidfile = dir.join("baton.pid");
    let pidfile_arg = pidfile.display().to_string();
    let (listener, _) = tcp_listener();
    let mut first = Spawn::serve(&["--pidfile", &pidfile_arg])
        .fd(listener, None)
        .start();
    first.wait_ready();
    let mode = std::fs::metadata(&pidfile).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // An unclean exit leaves the file behind.
    first.signal(Signal::SIGKILL);
    first.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(pidfile.exists());
    // A neighbour tries to hold its lock for a long time (flock(1) opens the file first).
    let (code, _, err) = run(as_nobody(
        "flock",
        &["--nonblock", &pidfile_arg, "sleep", "30"],
    ));
    assert_ne!(code, 0);
    assert!(err.contains("Permission denied"), "{err}");
    let (code, out, err) = run(as_nobody(
        common::baton_bin(),
        &["status", "--pidfile", &pidfile_arg],
    ));
    assert_eq!(code, 4, "{out} {err}");
    assert!(err.contains("Permission denied"), "{err}");
    // The next start takes over the stale file.
    let (listener, addr) = tcp_listener();
    let mut next = Spawn::serve(&["--pidfile", &pidfile_arg])
        .fd(listener, None)
        .start();
    next.wait_ready();
    assert_eq!(http::get(addr, "/-/healthy").unwrap().status, 200);
    next.signal(Signal::SIGTERM);
    assert!(next.wait_exit(Duration::from_secs(30)).unwrap().success());
}

#[test]
fn a_pidfile_of_an_older_version_is_tightened() {
    reaper::init();
    let dir = TempDir::new("pidfile-mode");
    let pidfile = dir.join("baton.pid");
    std::fs::write(&pidfile, "").unwrap();
    std::fs::set_permissions(&pidfile, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (listener, _) = tcp_listener();
    let mut b = Spawn::serve(&["--pidfile", pidfile.to_str().unwrap()])
        .fd(listener, None)
        .start();
    b.wait_ready();
    let mode = std::fs::metadata(&pidfile).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    b.signal(Signal::SIGTERM);
    assert!(b.wait_exit(Duration::from_secs(30)).unwrap().success());
}

/// A plain `baton serve` (no LISTEN_PID: it binds its own port) with `env`, and `fd5` at fd 5
/// when given: what a stray inherited environment looks like.
fn plain_start(env: &[(&str, String)], fd5: Option<std::os::fd::RawFd>) -> (Baton, SocketAddr) {
    reaper::init();
    let addr = tcp_listener().1;
    let mut cmd = Command::new(common::baton_bin());
    cmd.args([
        "serve",
        "--config",
        "/dev/null",
        "--listen",
        &addr.to_string(),
        "--log-level",
        "debug",
    ])
    .env_remove("NOTIFY_SOCKET")
    .env_remove("RUST_LOG")
    .env_remove("LISTEN_PID")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(raw) = fd5 {
        // SAFETY: dup2 and fcntl only, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(raw, 5) < 0 || libc::fcntl(5, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut baton = Baton::adopt(cmd.spawn().unwrap());
    baton.serves = Some(addr);
    baton.wait_ready();
    assert_eq!(http::get(addr, "/-/healthy").unwrap().status, 200);
    (baton, addr)
}

fn stop(mut baton: Baton) -> String {
    baton.signal(Signal::SIGTERM);
    assert!(baton.wait_exit(Duration::from_secs(30)).unwrap().success());
    baton.stderr.wait_closed(Duration::from_secs(5));
    baton.stderr.text()
}

fn ignored(log: &str, var: &str) {
    assert!(
        log.lines()
            .any(|l| l.contains("event=\"private-env-ignored\"") && l.contains(var)),
        "no line says {var} was ignored:\n{log}"
    );
}

#[test]
fn stray_upgrade_channel_is_ignored() {
    // Old behaviour: says `ready` on the stray socket and waits for a commit forever.
    let (_peer, stray) = std::os::unix::net::UnixStream::pair().unwrap();
    use std::os::fd::AsRawFd;
    let (baton, addr) = plain_start(
        &[
            ("BATON_UPGRADE_FD", "5".into()),
            ("BATON_UPGRADE_STARTED_USEC", "1".into()),
        ],
        Some(stray.as_raw_fd()),
    );
    let v = http::get(addr, "/-/version").unwrap().json();
    assert_eq!(v["generation"], 1);
    let log = stop(baton);
    ignored(&log, "BATON_UPGRADE_FD=5");
    ignored(&log, "BATON_UPGRADE_STARTED_USEC=1");
}

#[test]
fn stray_pidfile_fd_is_ignored_and_the_file_untouched() {
    // Old behaviour: takes the file for its pidfile and writes its pid over it.
    let dir = TempDir::new("stray-pidfile-fd");
    let precious = dir.join("precious");
    std::fs::write(&precious, "precious data\n").unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&precious)
        .unwrap();
    use std::os::fd::AsRawFd;
    let (baton, _) = plain_start(&[("BATON_PIDFILE_FD", "5".into())], Some(file.as_raw_fd()));
    let log = stop(baton);
    assert_eq!(
        std::fs::read_to_string(&precious).unwrap(),
        "precious data\n"
    );
    ignored(&log, "BATON_PIDFILE_FD=5");
}

#[test]
fn stray_keeper_report_fd_is_ignored_and_the_file_untouched() {
    let dir = TempDir::new("stray-report-fd");
    let precious = dir.join("precious");
    std::fs::write(&precious, "precious data\n").unwrap();
    let file = std::fs::OpenOptions::new()
        .append(true)
        .open(&precious)
        .unwrap();
    use std::os::fd::AsRawFd;
    let (baton, _) = plain_start(
        &[("BATON_KEEPER_REPORT_FD", "5".into())],
        Some(file.as_raw_fd()),
    );
    let log = stop(baton);
    assert_eq!(
        std::fs::read_to_string(&precious).unwrap(),
        "precious data\n"
    );
    ignored(&log, "BATON_KEEPER_REPORT_FD=5");
}

#[test]
fn stray_generation_and_counts_are_ignored() {
    // Old behaviour: generation u64::MAX (every upgrade refused: overflow), counts from the
    // stray values in the metrics.
    let (baton, addr) = plain_start(
        &[
            ("BATON_GENERATION", u64::MAX.to_string()),
            ("BATON_UPGRADES", "7:7:7".into()),
            ("BATON_RESTARTS", "7".into()),
        ],
        None,
    );
    assert_eq!(
        http::get(addr, "/-/version").unwrap().json()["generation"],
        1
    );
    let metrics = http::get(addr, "/-/metrics").unwrap().text();
    assert!(
        !metrics.lines().any(|l| (l.starts_with("baton_upgrades")
            || l.starts_with("baton_restarts"))
            && l.ends_with(" 7")),
        "{metrics}"
    );
    let (code, out, err) = run_baton(&["reload", "--pid", &baton.pid().to_string()]);
    assert_eq!(code, 0, "{out} {err}");
    assert!(out.contains("to generation 2"), "{out}");
    let new = pid_of(addr);
    assert!(wait_gone(baton.pid()));
    let log = baton.stderr.text();
    ignored(&log, "BATON_GENERATION=18446744073709551615");
    ignored(&log, "BATON_UPGRADES=7:7:7");
    ignored(&log, "BATON_RESTARTS=7");
    kill(new, Signal::SIGTERM);
    assert!(wait_gone(new));
}

#[test]
fn stray_keeper_variables_are_ignored() {
    // Old behaviour: a stray BATON_KEEPER_PID makes a plain start watch that process and stop
    // when it exits; a stray BATON_KEEPER_STATE makes it resume a keeper that never was.
    let mut short = Command::new("sleep").arg("0.3").spawn().unwrap();
    let (baton, addr) = plain_start(&[("BATON_KEEPER_PID", short.id().to_string())], None);
    let _ = short.wait();
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(http::get(addr, "/-/healthy").unwrap().status, 200);
    let (code, out, _) = run_baton(&["status", "--pid", &baton.pid().to_string()]);
    assert_eq!(code, 0);
    assert!(!out.contains("keeper pid"), "{out}");
    let log = stop(baton);
    ignored(&log, "BATON_KEEPER_PID=");

    let (baton, _) = plain_start(&[("BATON_KEEPER_STATE", "{}".into())], None);
    let log = stop(baton);
    ignored(&log, "BATON_KEEPER_STATE={}");
}

#[test]
fn stray_marker_for_another_pid_is_ignored() {
    // Private variables addressed to another pid are ignored like those without an address.
    let (_peer, stray) = std::os::unix::net::UnixStream::pair().unwrap();
    use std::os::fd::AsRawFd;
    let (baton, _) = plain_start(
        &[
            ("BATON_UPGRADE_FD", "5".into()),
            ("BATON_FOR_PID", "1".into()),
        ],
        Some(stray.as_raw_fd()),
    );
    let log = stop(baton);
    ignored(&log, "BATON_UPGRADE_FD=5");
}

#[test]
fn listen_variables_for_another_pid_are_ignored_even_with_names() {
    // sd_listen_fds(3): LISTEN_* for another pid are not ours, whatever else they say.
    let (baton, addr) = plain_start(
        &[
            ("LISTEN_PID", "1".into()),
            ("LISTEN_FDS", "1".into()),
            ("LISTEN_FDNAMES", "http".into()),
        ],
        None,
    );
    let text = http::get(addr, "/-/version").unwrap().json();
    assert_eq!(text["generation"], 1);
    let log = stop(baton);
    assert!(
        log.contains(&format!("listening on http={addr} (bound)")),
        "{log}"
    );
}

/// CPU time (user + system) of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn a_tiny_watchdog_interval_does_not_spin() {
    let (baton, addr) = plain_start(&[("WATCHDOG_USEC", "1".into())], None);
    let before = cpu_ticks(baton.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(baton.pid()) - before;
    // SAFETY: sysconf only.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    assert!(
        used * 10 < hz * 2,
        "{used} ticks ({hz}/s) of CPU in 2 s: the watchdog spins"
    );
    assert_eq!(http::get(addr, "/-/healthy").unwrap().status, 200);
    let log = stop(baton);
    assert!(log.contains("event=\"watchdog-clamped\""), "{log}");
}

#[test]
fn a_long_handshake_line_breaks_the_upgrade_at_once() {
    let dir = TempDir::new("long-line");
    let fake = dir.join("fake-baton");
    // A "new generation" that writes one endless line on the handshake channel.
    std::fs::write(
        &fake,
        "#!/bin/sh\nhead -c 1000000 /dev/zero | tr '\\0' a >&$BATON_UPGRADE_FD\nexec sleep 30\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (baton, addr) = start(
        &["--exec", fake.to_str().unwrap(), "--upgrade-timeout", "30s"],
        &[],
    );
    let started = std::time::Instant::now();
    let (code, out, err) = run_baton(&["reload", "--pid", &baton.pid().to_string()]);
    assert_eq!(code, 1, "{out} {err}");
    assert!(err.contains("longer than 4096 bytes"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(15), "{err}");
    assert_eq!(pid_of(addr), baton.pid(), "the old process keeps serving");
    stop(baton);
}

#[test]
fn a_fifo_or_other_special_file_as_config_is_refused_at_once() {
    reaper::init();
    let dir = TempDir::new("fifo-config");
    let fifo = dir.join("baton.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    for (command, path) in [
        ("serve", fifo.clone()),
        ("check", fifo.clone()),
        ("serve", dir.path().to_owned()),
    ] {
        let mut cmd = Command::new(common::baton_bin());
        cmd.args([command, "--config", path.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let b = Baton::adopt(cmd.spawn().unwrap());
        let (status, err) = b.finish(Duration::from_secs(10));
        assert_eq!(status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("not a regular file"), "{err}");
    }
    // /dev/null stays the empty configuration.
    let (code, out, err) = run_baton(&["check", "--config", "/dev/null"]);
    assert_eq!(code, 0, "{out} {err}");
}

#[test]
fn the_children_of_a_failed_new_process_are_killed_with_it() {
    // (Done on main already: the new process runs in its own process group.) A "new
    // generation" that starts a child, which inherits the listening socket, and never says
    // ready.
    let dir = TempDir::new("failed-children");
    let fake = dir.join("fake-baton");
    let child_file = dir.join("child");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\nsleep 300 &\necho $! > {}\nexec sleep 300\n",
            child_file.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (baton, addr) = start(
        &["--exec", fake.to_str().unwrap(), "--upgrade-timeout", "2s"],
        &[],
    );
    let (code, _, err) = run_baton(&["reload", "--pid", &baton.pid().to_string()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not ready within 2s"), "{err}");
    let child: u32 = std::fs::read_to_string(&child_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        wait_gone(child),
        "the child {child} of the failed new process lives on"
    );
    assert_eq!(pid_of(addr), baton.pid());
    stop(baton);
}

#[test]
fn an_old_generation_without_the_marker_can_still_hand_over() {
    // A process of an older build sets LISTEN_PID for the new one but no BATON_FOR_PID: the
    // handshake channel it announces still counts, because LISTEN_PID names this process.
    reaper::init();
    let (listener, addr) = tcp_listener();
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut spawn = Spawn::serve(&[])
        .fd(listener, None)
        .fd(theirs, None)
        .env("BATON_UPGRADE_FD", "4")
        .env("BATON_GENERATION", "5");
    spawn.listen_fds_raw = Some("1".into());
    let mut baton = spawn.start();
    baton.serves = Some(addr);
    ours.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut lines = BufReader::new(ours.try_clone().unwrap());
    let mut line = String::new();
    lines.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n", "{}", baton.stderr.text());
    use std::io::Write;
    (&ours).write_all(b"commit\n").unwrap();
    line.clear();
    lines.read_line(&mut line).unwrap();
    assert_eq!(line, "serving\n");
    assert_eq!(
        http::get(addr, "/-/version").unwrap().json()["generation"],
        5
    );
    baton.signal(Signal::SIGKILL);
}
