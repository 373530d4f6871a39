//! Socket activation: fds handed over by the tests' own spawner and by
//! `systemd-socket-activate`, matched by name, and every kind of bad fd refused clearly.

mod common;

use std::net::SocketAddr;
use std::os::unix::net::UnixListener;
use std::process::Command;
use std::time::Duration;

use common::http::{self, Conn};
use common::{free_port, tcp_listener, Baton, Spawn, TempDir};

fn version(addr: SocketAddr) -> serde_json::Value {
    http::get(addr, "/-/version").unwrap().json()
}

#[test]
fn single_unnamed_fd_serves_the_single_listener() {
    let (listener, addr) = tcp_listener();
    let mut baton = Spawn::serve(&[]).fd(listener, None).start();
    baton.wait_ready();
    assert_eq!(http::get(addr, "/-/healthy").unwrap().status, 200);
    let v = version(addr);
    assert_eq!(v["pid"], baton.pid());
    assert_eq!(v["generation"], 1);
    assert_eq!(
        v["listeners"][0],
        format!("http={addr} (fd 3, handed over)")
    );
}

#[test]
fn two_named_fds_serve_their_listeners() {
    let (web, web_addr) = tcp_listener();
    let (admin, admin_addr) = tcp_listener();
    // The configured addresses are never bound: the fds replace them. (A listener named
    // admin would take the /-/ endpoints from the others: crate::http::admin.)
    let mut baton = Spawn::serve(&[
        "--listen",
        "ops=127.0.0.1:1",
        "--listen",
        "http=127.0.0.1:1",
    ])
    .fd(web, Some("http"))
    .fd(admin, Some("ops"))
    .start();
    baton.wait_ready();
    let v = version(admin_addr);
    assert_eq!(v, version(web_addr));
    let listeners: Vec<&str> = v["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert_eq!(
        listeners,
        [
            format!("http={web_addr} (fd 3, handed over)"),
            format!("ops={admin_addr} (fd 4, handed over)")
        ]
    );
}

#[test]
fn unix_socket_fd() {
    let dir = TempDir::new("unix");
    let path = dir.join("http.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let mut baton = Spawn::serve(&[]).fd(listener, Some("http")).start();
    baton.wait_ready();
    let r = Conn::unix(&path).unwrap().get("/-/version").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["listeners"][0],
        format!("http=unix:{} (fd 3, handed over)", path.display())
    );
}

/// A bad start: non-zero exit, and exactly one line on stderr that contains `needle`.
fn refused(baton: Baton, needle: &str) {
    let (status, stderr) = baton.finish(Duration::from_secs(20));
    assert!(!status.success(), "baton accepted it; stderr:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "want one line of error, got:\n{stderr}");
    assert!(lines[0].starts_with("baton: "), "{stderr}");
    assert!(lines[0].contains(needle), "want {needle:?} in:\n{stderr}");
}

#[test]
fn regular_file_fd_is_refused() {
    let dir = TempDir::new("file-fd");
    let file = std::fs::File::create(dir.join("f")).unwrap();
    refused(
        Spawn::serve(&[]).fd(file, None).start(),
        "fd 3 is a regular file, not a socket",
    );
}

#[test]
fn udp_fd_is_refused() {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    refused(
        Spawn::serve(&[]).fd(udp, Some("http")).start(),
        "fd 3 ('http') is a datagram (UDP) socket, not a stream socket",
    );
}

#[test]
fn unknown_fd_name_is_refused() {
    let (listener, _) = tcp_listener();
    refused(
        Spawn::serve(&[]).fd(listener, Some("bogus")).start(),
        "fd 3 is named 'bogus' but no listener has that name (configured: http)",
    );
}

#[test]
fn malformed_listen_fds_is_refused() {
    let mut spawn = Spawn::serve(&[]);
    spawn.listen_fds_raw = Some("abc".into());
    refused(spawn.start(), "LISTEN_FDS=\"abc\"");
}

#[test]
fn bind_failure_is_one_line() {
    let (_taken, addr) = tcp_listener();
    let addr = addr.to_string();
    refused(
        Spawn::serve(&["--listen", &addr]).start(),
        &format!("listener http={addr}: cannot bind {addr}"),
    );
}

/// `systemd-socket-activate` binds, waits for the first connection, then execs baton with
/// LISTEN_FDS (and LISTEN_FDNAMES with --fdname).
fn socket_activate(tool_args: &[String], baton_args: &[&str]) -> Baton {
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.args(tool_args)
        .arg(common::baton_bin())
        .args(["serve", "--config", "/dev/null"])
        .args(baton_args);
    let child = cmd
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate (package systemd) must be installed");
    Baton::adopt(child)
}

fn connect_retrying(addr: SocketAddr) -> Conn<std::net::TcpStream> {
    let mut conn = None;
    assert!(common::wait_until(Duration::from_secs(10), || {
        conn = Conn::tcp(addr).ok();
        conn.is_some()
    }));
    conn.unwrap()
}

#[test]
fn systemd_socket_activate_tcp() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut baton = socket_activate(&["-l".into(), addr.to_string()], &[]);
    // The first connection is what starts baton; it is queued until baton accepts it.
    let r = connect_retrying(addr).get("/-/version").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["pid"],
        baton.pid(),
        "systemd-socket-activate execs baton in place"
    );
    assert_eq!(
        r.json()["listeners"][0],
        format!("http={addr} (fd 3, handed over)")
    );
    baton.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(baton.wait_exit(Duration::from_secs(10)).unwrap().success());
}

#[test]
fn systemd_socket_activate_named_and_unix() {
    let dir = TempDir::new("ssa");
    let sock = dir.join("admin.sock");
    let web: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _baton = socket_activate(
        &[
            "-l".into(),
            web.to_string(),
            "-l".into(),
            sock.display().to_string(),
            "--fdname=http:ops".into(),
        ],
        &[
            "--listen",
            "http=127.0.0.1:1",
            "--listen",
            "ops=unix:/nonexistent/x.sock",
        ],
    );
    let v = connect_retrying(web).get("/-/version").unwrap().json();
    assert_eq!(v["listeners"][0], format!("http={web} (fd 3, handed over)"));
    assert_eq!(
        v["listeners"][1],
        format!("ops=unix:{} (fd 4, handed over)", sock.display())
    );
    let r = Conn::unix(&sock).unwrap().get("/-/healthy").unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
}

/// The variant of systemfd `--no-pid` (the development loop
/// `systemfd --no-pid -s http::8080 -- cargo watch -x 'run -- serve'`): no LISTEN_PID, the first
/// fd in LISTEN_FDS_FIRST_FD.
fn no_pid(spawn: Spawn, first_fd: Option<i32>) -> Spawn {
    Spawn {
        listen_pid: false,
        first_fd,
        ..spawn
    }
}

#[test]
fn listen_fds_first_fd_without_listen_pid_is_served() {
    let (listener, addr) = tcp_listener();
    let mut baton = no_pid(Spawn::serve(&[]).fd(listener, None), Some(3)).start();
    baton.wait_ready();
    assert_eq!(
        version(addr)["listeners"][0],
        format!("http={addr} (fd 3, handed over)")
    );
    // Another first fd is honoured too, names and all.
    let (web, web_addr) = tcp_listener();
    let (admin, admin_addr) = tcp_listener();
    let spawn = Spawn::serve(&[
        "--listen",
        "admin=127.0.0.1:1",
        "--listen",
        "http=127.0.0.1:1",
    ])
    .fd(web, Some("http"))
    .fd(admin, Some("admin"));
    let mut baton = no_pid(spawn, Some(7)).start();
    baton.wait_ready();
    let v = version(admin_addr);
    assert_eq!(
        v["listeners"][0],
        format!("http={web_addr} (fd 7, handed over)")
    );
    assert_eq!(
        v["listeners"][1],
        format!("admin={admin_addr} (fd 8, handed over)")
    );
}

#[test]
fn listen_fds_without_listen_pid_or_first_fd_is_not_taken() {
    // sd_listen_fds(3): such variables were meant for another process; baton binds instead.
    let (listener, _) = tcp_listener();
    let mut baton = no_pid(
        Spawn::serve(&["--listen", "http=127.0.0.1:0"]).fd(listener, None),
        None,
    )
    .start();
    baton.wait_ready();
    let line = baton
        .stderr
        .wait_for("event=\"ready\"", Duration::from_secs(1))
        .unwrap();
    assert!(line.contains("(bound)"), "{line}");
    assert!(!line.contains("handed over"), "{line}");
}

#[test]
fn listen_fds_first_fd_below_3_is_refused() {
    // Fds 0 to 2 are stdio: a launcher that says the sockets start there is wrong.
    let (listener, _) = tcp_listener();
    let spawn = no_pid(Spawn::serve(&[]).fd(listener, None), None).env("LISTEN_FDS_FIRST_FD", "2");
    refused(
        spawn.start(),
        "LISTEN_FDS_FIRST_FD=\"2\" is not an fd number of 3 or more",
    );
}

/// The systemfd binary (`cargo install systemfd`; tests/run-all.sh installs it).
fn systemfd() -> std::path::PathBuf {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(std::env::var_os("CARGO_HOME").map(|h| std::path::PathBuf::from(h).join("bin")))
        .chain(std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo/bin")));
    for dir in candidates {
        let path = dir.join("systemfd");
        if path.is_file() {
            return path;
        }
    }
    panic!("systemfd is not installed: cargo install systemfd (tests/run-all.sh does)");
}

/// Kills a process group on drop: systemfd's shell loop and the baton it runs.
struct Group(i32);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The pid serving `addr`, once it is not `not`.
fn serving_pid(addr: SocketAddr, not: Option<i64>, runner: &Baton) -> i64 {
    let mut pid = None;
    let ok = common::wait_until(Duration::from_secs(30), || {
        pid = http::get(addr, "/-/version")
            .ok()
            .and_then(|r| r.json()["pid"].as_i64())
            .filter(|p| Some(*p) != not);
        pid.is_some()
    });
    assert!(
        ok,
        "no new baton serves {addr}; stderr:\n{}",
        runner.stderr.text()
    );
    pid.unwrap()
}

#[test]
fn systemfd_dev_loop_restarts_refuse_no_connection() {
    use nix::sys::signal::{kill, Signal};
    use std::os::unix::process::CommandExt;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // `systemfd --no-pid -s http::ADDR -- cargo watch -x 'run -- serve'`, with a shell loop in
    // the place of cargo watch: whenever baton exits, the next one starts, as cargo watch
    // restarts it on a change. systemfd binds, then execs the loop, which keeps the socket.
    let mut cmd = Command::new(systemfd());
    cmd.args([
        "--no-pid",
        "-s",
        &format!("http::{addr}"),
        "--",
        "/bin/sh",
        "-c",
    ])
    .arg(r#"for n in 1 2 3; do "$0" serve --config /dev/null; done"#)
    .arg(common::baton_bin())
    .process_group(0)
    .env_remove("RUST_LOG")
    .env_remove("NOTIFY_SOCKET")
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let runner = Baton::adopt(cmd.spawn().expect("run systemfd"));
    let _group = Group(runner.pid() as i32);

    let first = serving_pid(addr, None, &runner);
    assert_ne!(
        first,
        i64::from(runner.pid()),
        "baton runs as the loop's child: no LISTEN_PID could name it"
    );
    let v = version(addr);
    let listener = v["listeners"][0].as_str().unwrap();
    assert!(
        listener.starts_with(&format!("http={addr} (fd ")) && listener.ends_with(", handed over)"),
        "baton serves the socket systemfd holds: {listener}"
    );

    // A clean restart (SIGTERM, as cargo watch stops the old run): not one request fails.
    let load = common::load::Load::start(addr, 1, 2);
    load.wait_progress(50);
    kill(nix::unistd::Pid::from_raw(first as i32), Signal::SIGTERM).unwrap();
    let second = serving_pid(addr, Some(first), &runner);
    load.wait_progress(50);
    let report = load.stop();
    assert!(
        report.failures.is_empty(),
        "{} answered, failures across a SIGTERM restart: {:#?}",
        report.ok,
        report.failures
    );

    // A crash (SIGKILL): requests baton had accepted die with it, but no connection is refused:
    // new ones wait in the backlog of the socket systemfd's loop keeps open.
    let load = common::load::Load::start(addr, 0, 3);
    load.wait_progress(50);
    kill(nix::unistd::Pid::from_raw(second as i32), Signal::SIGKILL).unwrap();
    let third = serving_pid(addr, Some(second), &runner);
    load.wait_progress(50);
    let report = load.stop();
    let refused: Vec<&String> = report
        .failures
        .iter()
        .filter(|f| f.contains("refused") || f.contains("os error 111"))
        .collect();
    assert!(
        refused.is_empty(),
        "{} answered; refused across a crash restart: {refused:#?}",
        report.ok
    );
    eprintln!(
        "crash restart: {} answered, {} accepted requests lost with the killed baton: {:?}",
        report.ok,
        report.failures.len(),
        report.failures
    );
    kill(nix::unistd::Pid::from_raw(third as i32), Signal::SIGTERM).unwrap();
}
