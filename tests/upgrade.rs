//! Zero-downtime upgrades with real processes: under load, as systemd sees them
//! (NotifyAccess=main), through every fault, and over a hundred generations.
//!
//! The test process is a child subreaper (see common::reaper), as systemd is for a service:
//! each new generation is orphaned by its double fork and adopted here.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::http;
use common::load::Load;
use common::notify::Receiver;
use common::{reaper, run_baton, tcp_listener, Baton, Spawn, TempDir};
use nix::sys::signal::Signal;

const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The first generation, on a handed-over loopback listener (see common::start_generation).
fn start(args: &[&str], env: &[(&str, &str)]) -> (Baton, SocketAddr) {
    common::start_generation(args, env)
}

fn version(addr: SocketAddr) -> serde_json::Value {
    http::get(addr, "/-/version").unwrap().json()
}

fn pid_of(addr: SocketAddr) -> u32 {
    version(addr)["pid"].as_u64().unwrap() as u32
}

fn kill(pid: u32, signal: Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
}

/// The pid of the new process an upgrade started, from the old process's `upgrade-spawned` event.
fn spawned_pid(baton: &Baton) -> u32 {
    let line = baton
        .stderr
        .wait_for("event=\"upgrade-spawned\"", Duration::from_secs(10))
        .expect("an upgrade-spawned event");
    line.split("new_pid=")
        .nth(1)
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no new_pid in {line:?}"))
}

/// `baton reload --pid PID`: (exit code, stdout, stderr).
fn reload(pid: u32) -> (i32, String, String) {
    run_baton(&["reload", "--pid", &pid.to_string()])
}

/// Reloads and returns the new pid, checking everything the reload promises.
fn upgrade_ok(pid: u32, addr: SocketAddr, generation: u64) -> u32 {
    let (code, out, err) = reload(pid);
    assert_eq!(code, 0, "reload failed: {err}");
    let new_pid = common::reload_new_pid(&out);
    assert!(
        out.contains(&format!("to generation {generation} (pid {new_pid})")),
        "{out}"
    );
    // reload returns once the old process stopped accepting: every new connection is N's.
    let v = version(addr);
    assert_eq!(
        (v["pid"].as_u64(), v["generation"].as_u64()),
        (Some(new_pid as u64), Some(generation))
    );
    // The old generation drains and exits 0.
    let status = reaper::wait_exit(pid, EXIT_TIMEOUT)
        .unwrap_or_else(|| panic!("old pid {pid} did not exit"));
    assert!(status.success(), "old pid {pid}: {status:?}");
    new_pid
}

/// Stops whatever generation serves `addr` and waits for it.
fn stop_current(addr: SocketAddr) {
    let pid = pid_of(addr);
    kill(pid, Signal::SIGTERM);
    assert!(reaper::wait_exit(pid, EXIT_TIMEOUT).is_some_and(|s| s.success()));
}

#[test]
fn twenty_upgrades_under_load_lose_nothing() {
    let (baton, addr) = start(&["--drain-timeout", "10s"], &[]);
    let load = Load::start(addr, 6, 3);
    load.wait_progress(200);
    let mut pid = baton.pid();
    let mut pids = vec![pid];
    for generation in 2..=21 {
        pid = upgrade_ok(pid, addr, generation);
        pids.push(pid);
        load.wait_progress(50);
    }
    let report = load.stop();
    assert!(
        report.failures.is_empty(),
        "{} failures out of {}: {:#?}",
        report.failures.len(),
        report.ok + report.failures.len() as u64,
        report.failures
    );
    assert!(
        report.ok > 1000,
        "too little load to mean anything: {}",
        report.ok
    );
    pids.sort();
    pids.dedup();
    assert_eq!(pids.len(), 21, "every generation has its own pid");
    let metrics = http::get(addr, "/-/metrics").unwrap().text();
    for needle in [
        "baton_generation 21",
        "baton_upgrades_total{result=\"ok\"} 20",
        "baton_upgrades_total{result=\"failed\"} 0",
    ] {
        assert!(metrics.contains(needle), "{needle} not in:\n{metrics}");
    }
    stop_current(addr);
    drop(baton);
}

#[test]
fn systemd_sees_reloading_mainpid_then_ready_from_the_new_pid() {
    notify_sequence("0s");
}

#[test]
fn on_probation_the_old_pid_says_ready_and_switches_the_main_pid_after_the_window() {
    notify_sequence("1s");
}

/// What a NotifyAccess=main service manager hears from an upgrade with this probation.
fn notify_sequence(probation: &str) {
    let dir = TempDir::new("upgrade-notify");
    let receiver = Receiver::new(dir.path());
    let (baton, addr) = start(
        &["--upgrade-probation", probation],
        &[("NOTIFY_SOCKET", receiver.path.to_str().unwrap())],
    );
    let old = baton.pid();
    receiver.set_main_pid(old);
    receiver
        .wait_accepted(Duration::from_secs(10), |m| m.has("READY=1"))
        .unwrap();
    let new = upgrade_ok(old, addr, 2);
    receiver
        .wait_accepted(Duration::from_secs(10), |m| {
            m.pid == new as i32 && m.has("READY=1")
        })
        .expect("READY=1 from the new main pid");
    assert_eq!(receiver.main_pid(), Some(new as i32));

    let messages = receiver.messages();
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
    let mut expected = vec![
        (old as i32, "READY=1"),
        (old as i32, "RELOADING=1"),
        (old as i32, new_main.as_str()),
        (old as i32, "BARRIER=1"),
        (new as i32, "READY=1"),
    ];
    if probation != "0s" {
        // The reload is over once N serves; O, still the main pid, says so and stands by.
        expected.insert(2, (old as i32, "READY=1"));
        let standing_by = messages[2].get("STATUS").unwrap();
        assert!(
            standing_by.starts_with(&format!(
                "generation 2 (pid {new}) serves, on probation for {probation}"
            )),
            "{standing_by}"
        );
    }
    assert_eq!(summary, expected, "{messages:#?}");
    let mut messages = messages;
    if probation != "0s" {
        messages.remove(2);
    }
    let reloading = &messages[1];
    assert!(
        reloading
            .get("MONOTONIC_USEC")
            .is_some_and(|v| v.parse::<u64>().is_ok()),
        "RELOADING=1 without MONOTONIC_USEC: {reloading:?}"
    );
    assert_eq!(messages[3].fds, 1, "BARRIER=1 carries one fd");
    assert!(messages[4]
        .get("STATUS")
        .unwrap()
        .starts_with(&format!("serving generation 2 (pid {new})")));
    // The old process said nothing after the handover, not even STOPPING=1, and is gone.
    assert!(reaper::status(old).is_some());
    stop_current(addr);
}

/// Runs a failing upgrade under load: the reload fails with `reason`, the old process keeps
/// serving, and no request is lost.
fn failed_upgrade(args: &[&str], prepare: impl FnOnce(u32), reason: &str) {
    let (mut baton, addr) = start(args, &[]);
    let load = Load::start(addr, 4, 2);
    load.wait_progress(100);
    prepare(baton.pid());
    let (code, _, err) = reload(baton.pid());
    assert_eq!(code, 1, "the reload should fail: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains(&format!("upgrade of pid {} failed: ", baton.pid())),
        "{err}"
    );
    assert!(err.contains(reason), "want {reason:?} in {err}");
    assert!(
        err.trim_end().ends_with("the old process keeps serving"),
        "{err}"
    );
    load.wait_progress(100);
    let report = load.stop();
    assert!(report.failures.is_empty(), "{:#?}", report.failures);
    let v = version(addr);
    assert_eq!(
        (v["pid"].as_u64(), v["generation"].as_u64()),
        (Some(baton.pid() as u64), Some(1))
    );
    // The intermediate process of the double fork was reaped by the old process itself.
    assert_eq!(
        children(baton.pid()),
        "",
        "the old process kept a child (a zombie intermediate?)"
    );
    assert!(
        baton
            .stderr
            .wait_for("event=\"upgrade-failed\"", Duration::from_secs(5))
            .is_some(),
        "the failure is logged as an event"
    );
    let metrics = http::get(addr, "/-/metrics").unwrap().text();
    assert!(
        metrics.contains("baton_upgrades_total{result=\"failed\"} 1"),
        "{metrics}"
    );
    // The next upgrade still works once the cause is gone... unless the cause is the binary.
    baton.signal(Signal::SIGTERM);
    assert!(baton.wait_exit(EXIT_TIMEOUT).unwrap().success());
}

fn script(dir: &TempDir, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}

#[test]
fn fault_exec_path_missing() {
    failed_upgrade(
        &["--exec", "/nonexistent/baton"],
        |_| {},
        "cannot execute /nonexistent/baton: No such file or directory",
    );
}

#[test]
fn fault_not_executable() {
    let dir = TempDir::new("noexec");
    let path = dir.join("baton");
    std::fs::write(&path, "not a program").unwrap();
    let path = path.display().to_string();
    failed_upgrade(&["--exec", &path], |_| {}, "Permission denied");
}

#[test]
fn fault_new_binary_exits_at_once() {
    let dir = TempDir::new("exits");
    let exe = script(&dir, "baton", "exit 3");
    failed_upgrade(&["--exec", &exe], |_| {}, "exited before it was ready");
}

#[test]
fn fault_new_binary_never_ready() {
    let dir = TempDir::new("hangs");
    let exe = script(&dir, "baton", "exec sleep 600");
    let (mut baton, _) = start(&["--exec", &exe, "--upgrade-timeout", "1s"], &[]);
    let (code, _, err) = reload(baton.pid());
    assert_eq!(code, 1);
    assert!(err.contains("was not ready within 1s; killed it"), "{err}");
    // The hung process is gone: killed, and reaped by its parent, the double fork's
    // intermediate, which the old process reaped in turn.
    let new_pid = spawned_pid(&baton);
    wait_gone(new_pid);
    assert_eq!(children(baton.pid()), "", "no zombie left");
    baton.signal(Signal::SIGTERM);
    assert!(baton.wait_exit(EXIT_TIMEOUT).unwrap().success());
    // And under load, the same fault loses nothing.
    failed_upgrade(
        &["--exec", &exe, "--upgrade-timeout", "1s"],
        |_| {},
        "was not ready within 1s",
    );
}

#[test]
fn fault_new_process_killed_during_handshake() {
    let dir = TempDir::new("killed");
    // A real baton, slow to start: killed while O waits for its "ready".
    let sleeper = dir.join("sleep.pid");
    let exe = script(
        &dir,
        "baton",
        &format!(
            "sleep 600 & echo $! > {}; wait; exec {} \"$@\"",
            sleeper.display(),
            common::baton_bin()
        ),
    );
    let (mut baton, addr) = start(&["--exec", &exe], &[]);
    let load = Load::start(addr, 4, 2);
    load.wait_progress(100);
    let old = baton.pid();
    let reloading = std::thread::spawn(move || reload(old));
    let new_pid = spawned_pid(&baton);
    // Kill it once it is certainly inside its slow start, i.e. while O waits for "ready".
    let sleep_pid =
        || -> Option<u32> { std::fs::read_to_string(&sleeper).ok()?.trim().parse().ok() };
    assert!(common::wait_until(Duration::from_secs(10), || sleep_pid().is_some()));
    kill(new_pid, Signal::SIGKILL);
    let (code, _, err) = reloading.join().unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "the new process (pid {new_pid}, {exe}) exited before it was ready"
        )),
        "{err}"
    );
    load.wait_progress(100);
    let report = load.stop();
    assert!(report.failures.is_empty(), "{:#?}", report.failures);
    assert_eq!(pid_of(addr), old);
    // The orphaned `sleep` child of the killed script is not baton's; clean it up.
    kill(sleep_pid().unwrap(), Signal::SIGKILL);
    baton.signal(Signal::SIGTERM);
    assert!(baton.wait_exit(EXIT_TIMEOUT).unwrap().success());
}

#[test]
fn fault_config_error_only_the_new_process_sees() {
    let dir = TempDir::new("config");
    let config = dir.join("baton.toml");
    std::fs::write(&config, "[shutdown]\ndrain_timeout = \"5s\"\n").unwrap();
    let config_str = config.display().to_string();
    failed_upgrade(
        &["--config", &config_str],
        |_| std::fs::write(&config, "[shutdown]\ndrain_timeout = \"later\"\n").unwrap(),
        &format!("the new process failed to start: config {config_str}: shutdown.drain_timeout: 'later' is not a duration"),
    );
}

#[test]
fn ten_sigusr2_within_a_millisecond_start_one_upgrade() {
    let (baton, addr) = start(&[], &[]);
    let old = baton.pid();
    for _ in 0..10 {
        kill(old, Signal::SIGUSR2);
    }
    let status =
        reaper::wait_exit(old, EXIT_TIMEOUT).expect("the old generation handed over and exited");
    assert!(status.success());
    let v = version(addr);
    assert_eq!(v["generation"], 2, "exactly one upgrade: {v}");
    let log = baton.stderr.text();
    assert_eq!(log.matches("event=\"upgrade-spawned\"").count(), 1, "{log}");
    stop_current(addr);
}

#[test]
fn sighup_upgrades_too() {
    let (baton, addr) = start(&[], &[]);
    kill(baton.pid(), Signal::SIGHUP);
    assert!(reaper::wait_exit(baton.pid(), EXIT_TIMEOUT)
        .unwrap()
        .success());
    assert_eq!(version(addr)["generation"], 2);
    stop_current(addr);
}

#[test]
fn sigterm_during_an_upgrade_stops_cleanly() {
    let dir = TempDir::new("term");
    let exe = script(&dir, "baton", "exec sleep 600");
    let (mut baton, addr) = start(&["--exec", &exe], &[]);
    let old = baton.pid();
    let reloading = std::thread::spawn(move || reload(old));
    let new_pid = spawned_pid(&baton);
    baton.signal(Signal::SIGTERM);
    assert!(baton.wait_exit(EXIT_TIMEOUT).unwrap().success());
    let aborted =
        "upgrade aborted (called off: the process is stopping); the new process was killed";
    baton.stderr.expect_line(aborted, EXIT_TIMEOUT);
    // No leftover process: the would-be successor was killed and reaped.
    wait_gone(new_pid);
    let (code, _, err) = reloading.join().unwrap();
    assert_eq!(code, 1, "{err}");
    // Nothing serves anymore: this process held the only copy of the socket.
    assert!(http::get(addr, "/-/healthy").is_err());
}

/// Waits until a new generation has closed its handshake channel (it does once the old
/// generation is gone): the fd named by BATON_UPGRADE_FD in its initial environment no longer
/// refers to the channel's socket.
fn wait_handshake_closed(pid: u32) {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let fd = environ
        .split(|b| *b == 0)
        .find_map(|e| e.strip_prefix(b"BATON_UPGRADE_FD="))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .expect("a new generation has BATON_UPGRADE_FD");
    let link = |_: ()| std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok();
    let channel = link(());
    assert!(
        common::wait_until(Duration::from_secs(10), || channel.is_none()
            || link(()) != channel),
        "generation {pid} keeps its handshake channel open"
    );
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The inodes of the TCP sockets on this machine that are not listening.
fn tcp_connection_inodes() -> std::collections::HashSet<String> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    // st 0A is LISTEN.
                    (fields.len() > 9 && fields[3] != "0A").then(|| fields[9].to_owned())
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The open fds of `pid` once it holds no client connection: the clients of a test have
/// closed theirs, and the server closes its side on its own schedule (a connection worker
/// thread), so a count taken at once may include one.
fn fd_count_without_clients(pid: u32) -> usize {
    let clients = || {
        let connections = tcp_connection_inodes();
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .filter_map(|target| {
                let target = target.to_string_lossy().into_owned();
                Some(
                    target
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .to_owned(),
                )
            })
            .filter(|inode| connections.contains(inode))
            .count()
    };
    assert!(
        common::wait_until(EXIT_TIMEOUT, || clients() == 0),
        "pid {pid} still holds {} client connections",
        clients()
    );
    fd_count(pid)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// The names of the variables in a process's environment, sorted, duplicates kept.
fn environ_names(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let mut names: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|e| !e.is_empty())
        .map(|e| String::from_utf8_lossy(e.split(|b| *b == b'=').next().unwrap()).into_owned())
        .collect();
    names.sort();
    names
}

/// Children of `pid` (zombies included).
/// Waits until `pid` is gone and reaped (a zombie still has its /proc entry).
fn wait_gone(pid: u32) {
    assert!(
        common::wait_until(EXIT_TIMEOUT, || !Path::new(&format!("/proc/{pid}"))
            .exists()),
        "pid {pid} is still there"
    );
}

fn children(pid: u32) -> String {
    let tasks = Path::new("/proc").join(pid.to_string()).join("task");
    std::fs::read_dir(tasks)
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("children")).ok())
        .collect::<String>()
        .trim()
        .to_owned()
}

#[test]
fn a_hundred_upgrades_leave_no_trace() {
    let (baton, addr) = start(&["--drain-timeout", "5s"], &[]);
    let mut pid = upgrade_ok(baton.pid(), addr, 2);
    // Settle: a few requests so that the serving state is warm.
    for _ in 0..50 {
        http::get(addr, "/-/version").unwrap();
    }
    wait_handshake_closed(pid);
    let (fds, rss, env) = (
        fd_count_without_clients(pid),
        rss_kib(pid),
        environ_names(pid),
    );
    let mut unique = env.clone();
    unique.dedup();
    assert_eq!(unique, env, "a variable appears twice in the environment");
    let mut olds = Vec::new();
    for generation in 3..=101 {
        olds.push(pid);
        pid = upgrade_ok(pid, addr, generation);
    }
    for _ in 0..50 {
        http::get(addr, "/-/version").unwrap();
    }
    wait_handshake_closed(pid);
    assert_eq!(
        fd_count_without_clients(pid),
        fds,
        "open fds of generation 101 vs 2"
    );
    assert_eq!(
        environ_names(pid),
        env,
        "the environment changes from generation to generation"
    );
    let rss_now = rss_kib(pid);
    assert!(
        rss_now <= rss + rss / 5 + 512,
        "RSS grew: generation 2 {rss} KiB, generation 101 {rss_now} KiB"
    );
    assert_eq!(
        children(pid),
        "",
        "the serving process has children (zombies?)"
    );
    // Every old generation exited (upgrade_ok checked status 0) and was reaped by us.
    let reaped: Vec<i32> = reaper::reaped();
    for old in &olds {
        assert!(
            reaped.contains(&(*old as i32)),
            "old generation {old} not reaped"
        );
    }
    stop_current(addr);
}

#[test]
fn the_new_generation_reports_the_handoff_and_the_old_drain() {
    let root = TempDir::new("drain-metrics");
    std::fs::write(root.join("big.bin"), vec![7u8; 64 << 20]).unwrap();
    let (baton, addr) = start(
        &[
            "--root",
            root.path().to_str().unwrap(),
            "--drain-timeout",
            "1s",
        ],
        &[],
    );
    // A download that cannot finish: the old generation must cut it at its drain deadline.
    let _stalled = http::start_download(addr, "/big.bin");
    let new = upgrade_ok(baton.pid(), addr, 2);
    let metric = |name: &str| -> Option<f64> {
        let text = http::get(addr, "/-/metrics").ok()?.text();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
    };
    // The old generation reports its drain to the new one just before it exits.
    assert!(common::wait_until(Duration::from_secs(10), || metric(
        "baton_drain_forced_closes_total"
    ) == Some(
        1.0
    )));
    let drain = metric("baton_last_drain_seconds").unwrap();
    assert!(
        (0.9..5.0).contains(&drain),
        "last drain {drain} s, expected about the 1 s deadline"
    );
    let handoff = metric("baton_last_handoff_seconds").unwrap();
    assert!(handoff > 0.0 && handoff < 5.0, "handoff {handoff} s");
    assert_eq!(pid_of(addr), new);
    stop_current(addr);
}

#[test]
fn sigterm_to_the_old_process_after_the_handover_does_not_cut_its_drain() {
    // systemd signals every process of the unit on stop: the old generation, still draining,
    // gets SIGTERM too, and its in-flight responses must still complete.
    let root = TempDir::new("handover-term");
    let body: Vec<u8> = (0..64usize << 20).map(|i| (i % 253) as u8).collect();
    std::fs::write(root.join("big.bin"), &body).unwrap();
    let (mut baton, addr) = start(
        &[
            "--root",
            root.path().to_str().unwrap(),
            "--drain-timeout",
            "30s",
            "--upgrade-probation",
            "0s",
        ],
        &[],
    );
    let (mut download, _) = http::start_download(addr, "/big.bin");
    let mut received = download.read_body(1 << 20).unwrap();
    upgrade_old_kept(&baton, addr);
    baton.signal(Signal::SIGTERM);
    baton
        .stderr
        .wait_for(
            "already draining after the handover",
            Duration::from_secs(10),
        )
        .expect("the first SIGTERM is taken as a confirmation");
    received.extend(download.read_body(body.len() - received.len()).unwrap());
    assert!(received == body, "the download was cut");
    let status = baton.wait_exit(EXIT_TIMEOUT).unwrap();
    assert!(status.success(), "{status:?}: {}", baton.stderr.text());
    stop_current(addr);
}

/// Upgrades without waiting for the old process to exit (it has a download to finish).
fn upgrade_old_kept(baton: &Baton, addr: SocketAddr) -> u32 {
    let (code, out, err) = reload(baton.pid());
    assert_eq!(code, 0, "{err}");
    let new = pid_of(addr);
    assert_ne!(new, baton.pid(), "{out}");
    new
}

#[test]
fn a_new_process_that_never_confirms_it_serves_is_killed_and_the_old_one_serves_on() {
    let dir = TempDir::new("unconfirmed");
    // Speaks the handshake up to the commit (on the channel the old generation announces),
    // then goes silent.
    let exe = script(
        &dir,
        "baton",
        "echo ready >&$BATON_UPGRADE_FD; read commit <&$BATON_UPGRADE_FD; exec sleep 600",
    );
    let (mut baton, addr) = start(&["--exec", &exe], &[]);
    let (code, _, err) = reload(baton.pid());
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("did not confirm that it serves: no answer within"),
        "{err}"
    );
    wait_gone(spawned_pid(&baton));
    assert_eq!(pid_of(addr), baton.pid());
    baton.signal(Signal::SIGTERM);
    assert!(baton.wait_exit(EXIT_TIMEOUT).unwrap().success());
}

/// A free loopback port that the test itself does not hold: baton binds it alone.
fn unheld_port() -> SocketAddr {
    let (listener, addr) = tcp_listener();
    drop(listener);
    addr
}

/// `/-/metrics`' value of one sample.
fn metric(addr: SocketAddr, sample: &str) -> Option<f64> {
    let text = http::get(addr, "/-/metrics").ok()?.text();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{sample} ")))
        .and_then(|v| v.parse().ok())
}

/// No failure of `report` is a refused connection, and there are at most `at_most`.
fn none_refused(failures: &[String], at_most: usize) {
    assert!(
        !failures.iter().any(|f| f.contains("refused")),
        "a connection was refused: {failures:#?}"
    );
    assert!(failures.len() <= at_most, "{failures:#?}");
}

#[test]
fn a_new_process_that_dies_right_after_taking_over_is_rolled_back_without_an_outage() {
    // The old generation bound the socket itself and the test holds no copy of it: only the
    // old generation's own copy keeps it open when the new one dies.
    reaper::init();
    let dir = TempDir::new("dies-after-commit");
    let exe = script(
        &dir,
        "baton",
        "fd=$BATON_UPGRADE_FD; echo ready >&$fd; read commit <&$fd; echo serving >&$fd; exit 7",
    );
    let addr = unheld_port();
    let listen = addr.to_string();
    let mut baton = Spawn::serve(&["--listen", &listen, "--exec", &exe]).start();
    baton.serves = Some(addr);
    baton.wait_ready();
    let load = Load::start(addr, 2, 4);
    load.wait_progress(100);
    let (code, _, err) = run_baton(&["reload", "--wait", "--pid", &baton.pid().to_string()]);
    assert_eq!(code, 1, "{err}");
    let pid = spawned_pid(&baton);
    assert!(
        err.contains(&format!(
            "upgrade to generation 2 rolled back: pid {pid} exited with status 7"
        )),
        "{err}"
    );
    load.wait_progress(200);
    let report = load.stop();
    assert!(report.failures.is_empty(), "{:#?}", report.failures);
    assert_eq!(pid_of(addr), baton.pid());
    assert_eq!(
        metric(addr, "baton_upgrades_total{result=\"rolled_back\"}"),
        Some(1.0)
    );
    assert!(baton
        .stderr
        .wait_for("event=\"upgrade-rolled-back\"", Duration::from_secs(5))
        .is_some());
    assert_eq!(children(baton.pid()), "", "no zombie left");
    baton.signal(Signal::SIGTERM);
    assert!(baton.wait_exit(EXIT_TIMEOUT).unwrap().success());
}

#[test]
fn a_new_generation_killed_on_probation_hands_the_service_back() {
    let dir = TempDir::new("probation");
    let receiver = Receiver::new(dir.path());
    let (baton, addr) = start(
        &["--upgrade-probation", "3s"],
        &[("NOTIFY_SOCKET", receiver.path.to_str().unwrap())],
    );
    let old = baton.pid();
    receiver.set_main_pid(old);
    let load = Load::start(addr, 2, 4);
    load.wait_progress(100);
    let waiting =
        std::thread::spawn(move || run_baton(&["reload", "--wait", "--pid", &old.to_string()]));
    let new = spawned_pid(&baton);
    assert!(common::wait_until(Duration::from_secs(10), || pid_of(addr) == new));
    load.wait_progress(100);
    // The scenario: a crash half a second after the new generation took over.
    std::thread::sleep(Duration::from_millis(500));
    kill(new, Signal::SIGKILL);
    let killed = std::time::Instant::now();
    assert!(common::wait_until(Duration::from_secs(5), || pid_of(addr) == old));
    let back_after = killed.elapsed();
    assert!(
        back_after < Duration::from_secs(1),
        "served again after {back_after:?}"
    );
    let (code, _, err) = waiting.join().unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "upgrade to generation 2 rolled back: pid {new} was killed by SIGKILL"
        )) && err.contains("s after it took over"),
        "{err}"
    );
    load.wait_progress(200);
    // Only requests in flight on the killed process may fail; no connection is refused.
    none_refused(&load.stop().failures, 6);
    // The service manager: the main pid never moved, and the status names the rollback.
    assert_eq!(receiver.main_pid(), Some(old as i32));
    let status = receiver
        .wait_accepted(Duration::from_secs(5), |m| {
            m.get("STATUS").is_some_and(|s| s.contains("rolled back"))
        })
        .expect("a STATUS= naming the rollback");
    assert_eq!(status.pid, old as i32);
    assert!(receiver.messages().iter().all(|m| m.accepted));
    assert_eq!(
        metric(addr, "baton_upgrades_total{result=\"rolled_back\"}"),
        Some(1.0)
    );
    assert!(baton
        .stderr
        .wait_for("event=\"upgrade-rolled-back\"", Duration::from_secs(5))
        .is_some());

    // A probation that passes: the main pid is N's once the window is over.
    let (code, out, err) = run_baton(&["reload", "--wait", "--pid", &old.to_string()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("it passed its probation of 3s"), "{out}");
    let new = pid_of(addr);
    assert_ne!(new, old);
    assert_eq!(receiver.main_pid(), Some(new as i32));
    receiver
        .wait_accepted(Duration::from_secs(10), |m| {
            m.pid == new as i32 && m.has("READY=1")
        })
        .expect("READY=1 from the new main pid");
    assert!(reaper::wait_exit(old, EXIT_TIMEOUT).unwrap().success());
    assert_eq!(
        metric(addr, "baton_upgrades_total{result=\"ok\"}"),
        Some(1.0)
    );
    stop_current(addr);
}

#[test]
fn reloads_in_quick_succession_end_each_probation_early_and_lose_nothing() {
    // The default probation (10 s): every reload reaches the generation on probation, which
    // asks its predecessor to end the probation, then upgrades.
    reaper::init();
    let (listener, addr) = tcp_listener();
    let mut baton = Spawn::serve(&[]).fd(listener, None).start();
    baton.serves = Some(addr);
    baton.wait_ready();
    let load = Load::start(addr, 4, 2);
    load.wait_progress(100);
    let mut pids = vec![baton.pid()];
    for generation in 2..=6u64 {
        let (code, out, err) = reload(*pids.last().unwrap());
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("on probation for 10s"), "{out}");
        let v = version(addr);
        assert_eq!(v["generation"], generation, "{v}");
        pids.push(v["pid"].as_u64().unwrap() as u32);
        load.wait_progress(50);
    }
    // Every generation but the last was promoted early and exits 0 after its drain.
    for pid in &pids[..pids.len() - 1] {
        let status = reaper::wait_exit(*pid, EXIT_TIMEOUT).expect("an old generation exited");
        assert!(status.success(), "{pid}: {status:?}");
    }
    load.wait_progress(100);
    let report = load.stop();
    assert!(report.failures.is_empty(), "{:#?}", report.failures);
    // The last one is on probation: a stop reaches both.
    stop_current(addr);
    assert!(baton.wait_exit(EXIT_TIMEOUT).is_some());
}

#[test]
fn a_stop_during_the_probation_stops_both_generations() {
    let (mut baton, addr) = start(&["--upgrade-probation", "60s"], &[]);
    let old = baton.pid();
    let (code, out, err) = reload(old);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("on probation for 1m"), "{out}");
    let new = pid_of(addr);
    assert_ne!(new, old);
    let (code, out, err) = run_baton(&["status", "--pid", &old.to_string()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("is standing by: pid")
            && out.contains(&format!("generation 2 (pid {new}) serves on probation")),
        "{out}"
    );
    let (code, out, err) = run_baton(&["status", "--pid", &new.to_string()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("is on probation: pid"), "{out}");
    baton.signal(Signal::SIGTERM);
    assert!(baton.wait_exit(EXIT_TIMEOUT).unwrap().success());
    // The old process waited for the new one, which drained and exited on its word (and was
    // reaped by its intermediate, the old process's child).
    wait_gone(new);
    // Both have exited: every line is in once the pipe is closed.
    baton.stderr.wait_closed(EXIT_TIMEOUT);
    let log = baton.stderr.text();
    assert!(
        log.contains(&format!("stopping generation 2 (pid {new}) too")),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("event=\"drained\"") && l.contains("generation=2")),
        "the new generation drained: {log}"
    );
    assert!(
        http::get(addr, "/-/healthy").is_err()
            || common::wait_until(Duration::from_secs(5), || http::get(addr, "/-/healthy")
                .is_err())
    );
}

#[test]
fn a_reload_applies_the_changed_configuration() {
    let dir = TempDir::new("reconfig");
    for (site, text) in [("one", "first site"), ("two", "second site")] {
        std::fs::create_dir(dir.join(site)).unwrap();
        std::fs::write(dir.join(site).join("index.html"), text).unwrap();
    }
    let config = dir.join("baton.toml");
    let write_config = |site: &str| {
        std::fs::write(
            &config,
            format!("[server]\nroot = \"{}\"\n", dir.join(site).display()),
        )
        .unwrap()
    };
    write_config("one");
    let config_arg = config.display().to_string();
    let (baton, addr) = start(&["--config", &config_arg], &[]);
    assert_eq!(http::get(addr, "/").unwrap().text(), "first site");
    write_config("two");
    upgrade_ok(baton.pid(), addr, 2);
    assert_eq!(http::get(addr, "/").unwrap().text(), "second site");
    stop_current(addr);
}

#[test]
fn fds_inherited_by_the_first_generation_do_not_travel_on() {
    // Whatever started the first generation may leak an fd into it (no FD_CLOEXEC).
    let dir = TempDir::new("stray");
    let stray_path = dir.join("stray");
    let file = std::fs::File::create(&stray_path).unwrap();
    // Far above the fds the spawner places (3..), and without FD_CLOEXEC (F_DUPFD clears it).
    let stray = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::F_DUPFD, 300) };
    assert!(stray >= 300);
    let (baton, addr) = start(&[], &[]);
    unsafe { libc::close(stray) };
    drop(file);
    let holds_stray = |pid: u32| {
        common::open_files(pid)
            .iter()
            .any(|target| std::path::Path::new(target) == stray_path)
    };
    assert!(
        holds_stray(baton.pid()),
        "the first generation should have inherited it"
    );
    let new = upgrade_ok(baton.pid(), addr, 2);
    assert!(!holds_stray(new), "the new generation inherited a stray fd");
    stop_current(addr);
}

#[test]
fn the_intermediate_process_keeps_none_of_the_old_generations_fds_during_the_probation() {
    // It stays the new generation's parent through the probation; a client connection the old
    // generation closes meanwhile must really end, so it may hold nothing but its own pipes.
    let (baton, addr) = start(&["--upgrade-probation", "60s"], &[]);
    let mut client = http::Conn::tcp(addr).unwrap();
    assert_eq!(client.get("/-/healthy").unwrap().status, 200);
    let (code, _, err) = reload(baton.pid());
    assert_eq!(code, 0, "{err}");
    let children = common::children(baton.pid());
    assert_eq!(children.len(), 1, "the intermediate: {children:?}");
    let fds = common::open_files(children[0]);
    // stdin, stdout, stderr, the handshake channel, its pipe from the old generation, and
    // N's pidfd.
    assert!(fds.len() <= 6, "{fds:#?}");
    drop(client);
    baton.signal(Signal::SIGTERM);
    assert!(reaper::wait_exit(baton.pid(), EXIT_TIMEOUT).is_some());
}
