//! Socket activation: fds handed over by the tests' own spawner and by
//! `systemd-socket-activate`, matched by name, and every kind of bad fd refused clearly.

mod common;

use std::net::SocketAddr;
use std::os::unix::net::UnixListener;
use std::process::Command;
use std::time::Duration;

use common::http::{self, Conn};
use common::{tcp_listener, Baton, Spawn, TempDir};

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
    // The configured addresses are never bound: the fds replace them.
    let mut baton = Spawn::serve(&[
        "--listen",
        "admin=127.0.0.1:1",
        "--listen",
        "http=127.0.0.1:1",
    ])
    .fd(web, Some("http"))
    .fd(admin, Some("admin"))
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
            format!("admin={admin_addr} (fd 4, handed over)")
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

/// A port that was free a moment ago, for tools that bind by themselves.
fn free_port() -> u16 {
    tcp_listener().1.port()
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
            "--fdname=http:admin".into(),
        ],
        &[
            "--listen",
            "http=127.0.0.1:1",
            "--listen",
            "admin=unix:/nonexistent/x.sock",
        ],
    );
    let v = connect_retrying(web).get("/-/version").unwrap().json();
    assert_eq!(v["listeners"][0], format!("http={web} (fd 3, handed over)"));
    assert_eq!(
        v["listeners"][1],
        format!("admin=unix:{} (fd 4, handed over)", sock.display())
    );
    let r = Conn::unix(&sock).unwrap().get("/-/healthy").unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
}
