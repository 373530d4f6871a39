//! Without systemd: `baton serve --daemon`, the locked pidfile, and `status`/`stop`/`reload`
//! from a shell, with real processes throughout.
//!
//! The test process is a child subreaper (common::reaper), so daemons, orphaned on purpose by
//! their double fork, are adopted and reaped here.
//!
//! A daemon is a keeper (src/keeper.rs) with the serving generation as its child: the pidfile
//! names the generation, whose parent is the keeper; the keeper reaps the generations.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::http;
use common::load::Load;
use common::{reaper, tcp_listener, TempDir};
use nix::sys::signal::Signal;

const TIMEOUT: Duration = Duration::from_secs(30);

/// A port that was free a moment ago (baton binds it itself in daemon mode).
fn free_addr() -> SocketAddr {
    tcp_listener().1
}

/// Runs `baton ARGS` (as `user` when given, via setpriv) to completion: (code, stdout, stderr).
fn baton_as(user: Option<u32>, args: &[&str]) -> (i32, String, String) {
    reaper::init();
    let mut cmd = match user {
        Some(uid) => {
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
            ])
            .arg(common::baton_bin());
            c
        }
        None => Command::new(common::baton_bin()),
    };
    cmd.args(args);
    common::run(cmd)
}

fn baton(args: &[&str]) -> (i32, String, String) {
    baton_as(None, args)
}

/// A daemon's files.
struct Daemon {
    dir: TempDir,
    addr: SocketAddr,
}

impl Daemon {
    fn new(tag: &str) -> Daemon {
        Daemon {
            dir: TempDir::new(tag),
            addr: free_addr(),
        }
    }

    fn pidfile(&self) -> PathBuf {
        self.dir.join("baton.pid")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("baton.log")
    }

    fn pidfile_arg(&self) -> String {
        self.pidfile().display().to_string()
    }

    fn serve_args(&self) -> Vec<String> {
        [
            "serve",
            "--config",
            "/dev/null",
            "--daemon",
            "--pidfile",
            &self.pidfile_arg(),
            "--log-file",
            &self.log().display().to_string(),
            "--listen",
            &self.addr.to_string(),
            "--upgrade-probation",
            "1s",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// `baton serve --daemon ...`: (code, stdout, stderr).
    fn start(&self) -> (i32, String, String) {
        let args = self.serve_args();
        baton(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    fn start_ok(&self) -> u32 {
        let (code, out, err) = self.start();
        assert_eq!(
            code,
            0,
            "stdout: {out}\nstderr: {err}\nlog: {}",
            self.log_text()
        );
        assert_eq!(err, "", "a successful start says nothing");
        self.pid()
    }

    fn pid(&self) -> u32 {
        std::fs::read_to_string(self.pidfile())
            .unwrap_or_default()
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("pidfile {} names no pid", self.pidfile().display()))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    fn ctl(&self, command: &str) -> (i32, String, String) {
        baton(&[command, "--pidfile", &self.pidfile_arg()])
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A daemon a failed test left behind goes; only while the lock proves the pid is baton's.
        if let Ok(baton::pidfile::Probe::Running(pid)) = baton::pidfile::probe(&self.pidfile()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// Waits until `pid` is gone (reaped by whoever is its parent: the keeper, for generations).
fn wait_gone(pid: u32) -> bool {
    match baton::control::ProcessHandle::open(pid) {
        Ok(handle) => handle.wait_exit(TIMEOUT).unwrap(),
        Err(_) => true, // no such process
    }
}

/// The parent of `pid`.
fn ppid(pid: u32) -> u32 {
    proc_status_field(pid, "PPid").parse().unwrap()
}

fn proc_link(pid: u32, what: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/{what}"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn proc_status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap()
}

#[test]
fn daemon_starts_detached_and_serves_when_the_command_returns() {
    let d = Daemon::new("daemon-start");
    // An fd the caller leaks to its child (no CLOEXEC): the daemon must not keep it.
    let leaked = std::fs::File::open("/etc/hostname").unwrap();
    let leaked_fd = std::os::fd::AsRawFd::as_raw_fd(&leaked);
    unsafe { libc::fcntl(leaked_fd, libc::F_SETFD, 0) };
    let pid = d.start_ok();
    drop(leaked);
    // Serving at once: no retry.
    let v = http::get(d.addr, "/-/version").unwrap().json();
    assert_eq!(v["pid"], pid);

    // The daemon is the keeper; the pidfile names its child, the serving generation.
    let keeper = ppid(pid);
    assert_eq!(
        ppid(keeper),
        std::process::id(),
        "adopted by the subreaper (init without one): the foreground and intermediate are gone"
    );
    let session = |pid: u32| -> i32 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        stat.rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .nth(3)
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(
        session(pid),
        session(keeper),
        "the generation is in the keeper's session"
    );
    assert_ne!(
        session(keeper),
        nix::unistd::getsid(None).unwrap().as_raw(),
        "a session of its own"
    );
    assert_ne!(
        session(keeper),
        keeper as i32,
        "not a session leader after the second fork"
    );
    for pid in [keeper, pid] {
        assert_eq!(proc_link(pid, "cwd"), "/");
        assert_eq!(proc_status_field(pid, "Umask"), "0027");
        assert_eq!(proc_link(pid, "fd/0"), "/dev/null");
        assert_eq!(proc_link(pid, "fd/1"), d.log().display().to_string());
        assert_eq!(proc_link(pid, "fd/2"), d.log().display().to_string());
        let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .map(|e| {
                proc_link(
                    pid,
                    &format!("fd/{}", e.unwrap().file_name().to_str().unwrap()),
                )
            })
            .collect();
        for fd in &fds {
            assert!(
                fd.starts_with("socket:")
                    || fd.starts_with("anon_inode:")
                    || fd == "/dev/null"
                    || fd.starts_with(d.dir.path().to_str().unwrap()),
                "unexpected fd {fd} in pid {pid}: {fds:?}"
            );
        }
        assert!(
            !fds.iter().any(|f| f == "/etc/hostname"),
            "inherited fd kept: {fds:?}"
        );
    }
    let mode = std::fs::metadata(d.pidfile()).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode & 0o022,
        0,
        "pidfile mode {mode:o} is group/world-writable"
    );
    assert!(d.log_text().contains("event=\"ready\""), "{}", d.log_text());

    let (code, out, _) = d.ctl("stop");
    assert_eq!(
        (code, out.trim()),
        (0, format!("baton: pid {pid} stopped").as_str())
    );
    // Gone means exited: a zombie the reaper thread has not collected yet counts.
    assert!(
        reaper::status(keeper).is_some() || exited_unreaped(keeper),
        "stop returned before the keeper was gone"
    );
    assert!(
        reaper::wait_exit(keeper, Duration::from_secs(5)).is_some_and(|s| s.success()),
        "the keeper did not exit with status 0"
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "stop returned before the generation was gone"
    );
    assert!(!d.pidfile().exists(), "a clean stop removes the pidfile");
    // `stop` returned once the whole service (keeper included) was gone: a new start at once
    // takes the same pidfile and port.
    let again = d.start_ok();
    assert_eq!(
        http::get(d.addr, "/-/version").unwrap().json()["pid"],
        again
    );
    assert_eq!(d.ctl("stop").0, 0);
}

#[test]
fn second_instance_is_refused() {
    let d = Daemon::new("daemon-second");
    let pid = d.start_ok();
    let (code, _, err) = d.start();
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        format!(
            "baton: already running as pid {pid} (pidfile {})",
            d.pidfile().display()
        )
    );
    // Also in the foreground, and on another port: the pidfile decides.
    let other = free_addr().to_string();
    let (code, _, err) = baton(&[
        "serve",
        "--config",
        "/dev/null",
        "--pidfile",
        &d.pidfile_arg(),
        "--listen",
        &other,
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("already running as pid {pid}")),
        "{err}"
    );
    assert_eq!(
        http::get(d.addr, "/-/version").unwrap().json()["pid"],
        pid,
        "the first one is unharmed"
    );
    assert_eq!(d.ctl("stop").0, 0);
}

#[test]
fn stale_pidfile_of_a_killed_daemon_does_not_block() {
    let d = Daemon::new("daemon-stale");
    let pid = d.start_ok();
    // SIGKILL of the keeper (a killed generation would be restarted: tests/keeper.rs): the
    // generation notices and stops, leaving a pidfile nobody holds.
    let keeper = ppid(pid);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(keeper as i32), Signal::SIGKILL).unwrap();
    reaper::wait_exit(keeper, TIMEOUT).unwrap();
    // Orphaned, the generation is adopted and reaped here.
    assert!(
        reaper::wait_exit(pid, TIMEOUT).is_some_and(|s| s.success()),
        "the generation did not stop cleanly once its keeper was gone: {}",
        d.log_text()
    );
    assert_eq!(d.pid(), pid, "the pidfile survived the kill");
    let (code, out, _) = d.ctl("status");
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("not running") && out.contains(&format!("names pid {pid}")),
        "{out}"
    );
    let new = d.start_ok();
    assert_ne!(new, pid);
    assert_eq!(d.ctl("stop").0, 0);
}

#[test]
fn pidfile_naming_a_live_unrelated_process_does_not_block_or_hit_it() {
    let d = Daemon::new("daemon-unrelated");
    // A live process that is not baton, named by a stale pidfile.
    let mut bystander = Command::new("sleep").arg("600").spawn().unwrap();
    std::fs::write(d.pidfile(), format!("{}\n", bystander.id())).unwrap();
    let (code, out, _) = d.ctl("status");
    assert_eq!(code, 3, "{out}");
    let (code, _, err) = d.ctl("stop");
    assert_eq!(code, 1, "nothing to stop: {err}");
    assert!(err.contains("no baton holds pidfile"), "{err}");
    let pid = d.start_ok();
    assert_ne!(pid, bystander.id());
    assert_eq!(d.ctl("stop").0, 0);
    assert_eq!(bystander.try_wait().unwrap(), None, "the bystander was hit");
    bystander.kill().unwrap();
}

#[test]
fn bad_pidfile_locations_are_refused_clearly() {
    let d = Daemon::new("daemon-badpath");
    let target = d.dir.join("elsewhere");
    std::fs::write(&target, "").unwrap();
    let link = d.dir.join("link.pid");
    symlink(&target, &link).unwrap();
    let addr = d.addr.to_string();
    let serve = |pidfile: &Path| {
        baton(&[
            "serve",
            "--config",
            "/dev/null",
            "--daemon",
            "--pidfile",
            pidfile.to_str().unwrap(),
            "--listen",
            &addr,
        ])
    };
    let (code, _, err) = serve(&link);
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("it is a symlink, which baton refuses to follow"),
        "{err}"
    );
    let (code, _, err) = serve(&d.dir.join("missing/baton.pid"));
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "its directory {} does not exist",
            d.dir.join("missing").display()
        )),
        "{err}"
    );
    // Unwritable: a directory root owns, for an unprivileged user.
    let (code, _, err) = baton_as(
        Some(65534),
        &[
            "serve",
            "--config",
            "/dev/null",
            "--daemon",
            "--pidfile",
            d.dir.join("baton.pid").to_str().unwrap(),
            "--listen",
            &addr,
        ],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("Permission denied")
            && err.contains("choose a --pidfile in a directory this user may write"),
        "{err}"
    );
    assert!(
        http::get(d.addr, "/").is_err(),
        "nothing may serve after a refused start"
    );
}

#[test]
fn status_exit_codes() {
    let d = Daemon::new("daemon-status");
    let (code, out, _) = d.ctl("status");
    assert_eq!(code, 3);
    assert_eq!(
        out.trim(),
        format!(
            "baton is not running: no baton holds pidfile {}",
            d.pidfile().display()
        )
    );
    let pid = d.start_ok();
    let (code, out, _) = d.ctl("status");
    assert_eq!(code, 0);
    assert!(
        out.starts_with(&format!(
            "baton {} is serving: pid {pid}, generation 1, up ",
            baton::VERSION
        )),
        "{out}"
    );
    // The keeper bound the socket and handed it over as a self-bound one (the generation may
    // move it on a reload and tell the keeper).
    assert!(
        out.contains(&format!(
            "listening on http={} (fd 3, handed over, self-bound); keeper pid {}, 0 restart(s)",
            d.addr,
            ppid(pid)
        )),
        "{out}"
    );
    assert_eq!(d.ctl("stop").0, 0);
    assert_eq!(d.ctl("status").0, 3);
}

#[test]
fn log_file_is_reopened_on_sigusr1() {
    let d = Daemon::new("daemon-logs");
    let pid = d.start_ok();
    let usr1_and_wait = |file: &Path, count: usize| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGUSR1).unwrap();
        assert!(common::wait_until(TIMEOUT, || std::fs::read_to_string(
            file
        )
        .unwrap_or_default()
        .matches("log file reopened")
        .count()
            >= count));
    };
    // logrotate's create mode: the file is renamed, a new one appears after SIGUSR1.
    let rotated = d.dir.join("baton.log.1");
    std::fs::rename(d.log(), &rotated).unwrap();
    usr1_and_wait(&d.log(), 1);
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(
        old.contains("event=\"ready\"") && !old.contains("log file reopened"),
        "{old}"
    );
    // copytruncate mode: copied, then truncated in place; appends land at the new end.
    std::fs::copy(d.log(), d.dir.join("baton.log.2")).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(d.log())
        .unwrap()
        .set_len(0)
        .unwrap();
    usr1_and_wait(&d.log(), 1);
    let text = std::fs::read(d.log()).unwrap();
    assert!(
        !text.contains(&0),
        "holes after copytruncate: the file is not opened for appending"
    );
    assert_eq!(d.ctl("stop").0, 0);
    assert!(d.log_text().contains("event=\"drained\""));
}

#[test]
fn non_root_user_runs_a_daemon() {
    let d = Daemon::new("daemon-nobody");
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let args = d.serve_args();
    let (code, out, err) = baton_as(
        Some(65534),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_eq!(code, 0, "{out} {err}");
    let pid = d.pid();
    assert_eq!(
        proc_status_field(pid, "Uid").split_whitespace().next(),
        Some("65534")
    );
    assert_eq!(http::get(d.addr, "/-/healthy").unwrap().status, 200);
    let (code, _, err) = baton_as(Some(65534), &["reload", "--pidfile", &d.pidfile_arg()]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = baton_as(Some(65534), &["stop", "--pidfile", &d.pidfile_arg()]);
    assert_eq!(code, 0, "{err}");
    assert!(!d.pidfile().exists());
}

#[test]
fn upgrade_under_load_keeps_the_lock_and_refuses_every_second_start() {
    let d = Daemon::new("daemon-upgrade");
    let first = d.start_ok();
    let load = Load::start(d.addr, 4, 2);
    load.wait_progress(200);
    // Meanwhile, a stubborn operator keeps trying to start a second instance.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attempts = {
        let (stop, pidfile) = (stop.clone(), d.pidfile_arg());
        std::thread::spawn(move || {
            let mut results = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let other = free_addr().to_string();
                results.push(baton(&[
                    "serve",
                    "--config",
                    "/dev/null",
                    "--daemon",
                    "--pidfile",
                    &pidfile,
                    "--listen",
                    &other,
                ]));
            }
            results
        })
    };
    let mut pid = first;
    for generation in 2..=6 {
        // --wait: the pidfile names the new pid once the probation passed.
        let (code, out, err) = baton(&["reload", "--wait", "--pidfile", &d.pidfile_arg()]);
        assert_eq!(code, 0, "{err}");
        let new = d.pid();
        assert_ne!(new, pid);
        assert!(
            out.contains(&format!("to generation {generation} (pid {new})")),
            "{out}"
        );
        assert_eq!(http::get(d.addr, "/-/version").unwrap().json()["pid"], new);
        // The old generation is the keeper's child: the keeper reaps it.
        assert!(
            wait_gone(pid),
            "generation pid {pid} did not exit after the upgrade"
        );
        pid = new;
        load.wait_progress(100);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let results = attempts.join().unwrap();
    assert!(!results.is_empty());
    for (code, _, err) in &results {
        assert_eq!(
            *code, 1,
            "a second instance started during an upgrade: {err}"
        );
        assert!(err.contains("already running as pid"), "{err}");
    }
    let report = load.stop();
    assert!(report.failures.is_empty(), "{:#?}", report.failures);
    assert_eq!(d.pid(), pid, "the pidfile names the serving generation");
    assert_eq!(d.ctl("stop").0, 0);
    assert!(!d.pidfile().exists());
}

#[test]
fn commands_find_a_daemon_on_the_default_pidfile_without_arguments() {
    let dir = TempDir::new("daemon-default");
    let addr = free_addr().to_string();
    let log = dir.join("baton.log").display().to_string();
    let (code, _, err) = baton(&[
        "serve",
        "--config",
        "/dev/null",
        "--daemon",
        "--log-file",
        &log,
        "--listen",
        &addr,
        "--upgrade-probation",
        "0s",
    ]);
    assert_eq!(code, 0, "{err}");
    let pidfile = baton::pidfile::default_path();
    let first = common::pidfile_pid(&pidfile).expect("the default pidfile names the daemon");
    let (code, out, err) = baton(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("is serving: pid {first}")), "{out}");
    let (code, out, err) = baton(&["reload"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("to generation 2"), "{out}");
    let (code, out, err) = baton(&["stop"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!pidfile.exists(), "the pidfile goes with the service");
    let (code, _, _) = baton(&["status"]);
    assert_eq!(code, 3);
}

/// Whether `pid` has exited but is not reaped yet (a zombie).
fn exited_unreaped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let rest = &stat[stat.rfind(')')? + 1..];
            rest.split_whitespace().next().map(|state| state == "Z")
        })
        .unwrap_or(true)
}
