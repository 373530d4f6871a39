//! A reload applies listener changes, with real processes and sockets: a listener added,
//! changed, renamed and removed, each under load on the listeners that stay; a socket unit's
//! socket that the configuration moves (it cannot move: a warning says where to change it);
//! a port below 1024 without the capability (the reload fails, the old generation serves on).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::http;
use common::load::Load;
use common::{reaper, run_baton, tcp_listener, wait_until, Baton, Spawn, TempDir};

const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// A free loopback port that nobody holds: baton binds it itself.
fn free_port() -> SocketAddr {
    let (listener, addr) = tcp_listener();
    drop(listener);
    addr
}

fn write_listen(config: &Path, listeners: &[(&str, String)]) {
    let list: Vec<String> = listeners
        .iter()
        .map(|(name, addr)| format!("\"{name}={addr}\""))
        .collect();
    std::fs::write(
        config,
        format!("[server]\nlisten = [{}]\n", list.join(", ")),
    )
    .unwrap();
}

fn pid_of(addr: SocketAddr) -> u32 {
    http::get(addr, "/-/version").unwrap().json()["pid"]
        .as_u64()
        .unwrap() as u32
}

fn refused(addr: SocketAddr) -> bool {
    matches!(std::net::TcpStream::connect(addr), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// `baton reload --pid PID` must succeed; returns the new pid and the reload's stderr, after
/// the old generation exited 0.
fn reload_ok(pid: u32, generation: u64) -> (u32, String) {
    let (code, out, err) = run_baton(&["reload", "--pid", &pid.to_string()]);
    assert_eq!(code, 0, "reload failed: {out}{err}");
    let new_pid = common::reload_new_pid(&out);
    assert!(
        out.contains(&format!("to generation {generation} ")),
        "{out}"
    );
    let status = reaper::wait_exit(pid, EXIT_TIMEOUT)
        .unwrap_or_else(|| panic!("old pid {pid} did not exit"));
    assert!(status.success(), "old pid {pid}: {status:?}");
    (new_pid, err)
}

/// The listeners the serving process reports, as `name=address` (without the fd notes).
fn listening(addr: SocketAddr) -> Vec<String> {
    let v = http::get(addr, "/-/version").unwrap().json();
    let mut names: Vec<String> = v["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let l = l.as_str().unwrap();
            l.split(' ').next().unwrap().to_owned()
        })
        .collect();
    names.sort();
    names
}

fn no_failures(loads: Vec<Load>) {
    for load in loads {
        load.wait_progress(20);
        let report = load.stop();
        assert!(report.ok > 0);
        assert!(report.failures.is_empty(), "{:#?}", report.failures);
    }
}

fn stop(addr: SocketAddr) {
    let pid = pid_of(addr);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(reaper::wait_exit(pid, EXIT_TIMEOUT).is_some_and(|s| s.success()));
}

#[test]
fn a_changed_listen_address_is_bound_and_the_old_port_closes() {
    // The case: http=A becomes http=B; the reload used to keep serving A only.
    reaper::init();
    let dir = TempDir::new("listen-move");
    let config = dir.join("baton.toml");
    let (a, b) = (free_port(), free_port());
    write_listen(&config, &[("http", a.to_string())]);
    let cfg = config.display().to_string();
    let mut baton = Spawn::serve(&["--config", &cfg, "--upgrade-probation", "0s"]).start();
    baton.serves = Some(a);
    baton.wait_ready();
    write_listen(&config, &[("http", b.to_string())]);
    let load = Load::start(a, 2, 2);
    load.wait_progress(20);
    let (new_pid, _) = reload_ok(baton.pid(), 2);
    baton.serves = Some(b);
    // The old generation is gone, and with it the old port; the new one serves B.
    assert!(
        refused(a),
        "{a} still accepts after the old generation exited"
    );
    assert_eq!(pid_of(b), new_pid);
    let report = load.stop();
    // The load ran on A, which went away with the old generation: what it saw there after the
    // handover are refusals, and at most one reset per client: a connection that was queued
    // on A at the very moment the old generation closed it (the kernel resets what a closing
    // listener still queues). Never a broken answer.
    assert!(report.ok > 0);
    let resets = report
        .failures
        .iter()
        .filter(|f| f.contains("reset"))
        .count();
    assert!(
        report
            .failures
            .iter()
            .all(|f| f.contains("refused") || f.contains("reset"))
            && resets <= 4,
        "{:#?}",
        report.failures
    );
    stop(b);
    drop(baton);
}

#[test]
fn listeners_added_changed_renamed_and_removed_under_load() {
    reaper::init();
    let dir = TempDir::new("listen-edit");
    let config = dir.join("baton.toml");
    let cfg = config.display().to_string();
    let (pa, pb, pc, pc2) = (free_port(), free_port(), free_port(), free_port());
    write_listen(&config, &[("a", pa.to_string()), ("b", pb.to_string())]);
    let mut baton = Spawn::serve(&["--config", &cfg, "--upgrade-probation", "0s"]).start();
    baton.serves = Some(pa);
    baton.wait_ready();
    let mut pid = baton.pid();

    // Added: c is bound by the new generation; a and b go on without a failure.
    write_listen(
        &config,
        &[
            ("a", pa.to_string()),
            ("b", pb.to_string()),
            ("c", pc.to_string()),
        ],
    );
    let loads = vec![Load::start(pa, 2, 1), Load::start(pb, 2, 1)];
    loads[0].wait_progress(20);
    pid = reload_ok(pid, 2).0;
    assert_eq!(pid_of(pc), pid);
    no_failures(loads);
    assert_eq!(
        listening(pa),
        [format!("a={pa}"), format!("b={pb}"), format!("c={pc}")]
    );

    // Changed: c moves; its old port closes with the old generation.
    write_listen(
        &config,
        &[
            ("a", pa.to_string()),
            ("b", pb.to_string()),
            ("c", pc2.to_string()),
        ],
    );
    let loads = vec![Load::start(pa, 2, 1), Load::start(pb, 2, 1)];
    loads[0].wait_progress(20);
    pid = reload_ok(pid, 3).0;
    assert!(refused(pc), "the old address of c still accepts");
    assert_eq!(pid_of(pc2), pid);
    no_failures(loads);

    // Renamed: b becomes bee on the same socket, which never stops accepting.
    write_listen(
        &config,
        &[
            ("a", pa.to_string()),
            ("bee", pb.to_string()),
            ("c", pc2.to_string()),
        ],
    );
    let loads = vec![Load::start(pa, 2, 1), Load::start(pb, 2, 1)];
    loads[0].wait_progress(20);
    pid = reload_ok(pid, 4).0;
    assert_eq!(pid_of(pb), pid);
    no_failures(loads);
    assert_eq!(
        listening(pa),
        [format!("a={pa}"), format!("bee={pb}"), format!("c={pc2}")]
    );

    // Removed: bee goes; its port closes once the old generation is gone.
    write_listen(&config, &[("a", pa.to_string()), ("c", pc2.to_string())]);
    let loads = vec![Load::start(pa, 2, 1), Load::start(pc2, 2, 1)];
    loads[0].wait_progress(20);
    pid = reload_ok(pid, 5).0;
    assert!(refused(pb), "the removed listener's port still accepts");
    assert_eq!(pid_of(pa), pid);
    no_failures(loads);
    assert_eq!(listening(pa), [format!("a={pa}"), format!("c={pc2}")]);
    stop(pa);
    drop(baton);
}

#[test]
fn a_socket_unit_listener_cannot_move_and_check_and_reload_say_where_to_change_it() {
    reaper::init();
    let dir = TempDir::new("listen-unit");
    let config = dir.join("baton.toml");
    let cfg = config.display().to_string();
    // The socket unit's socket, handed in as systemd would (named after its unit).
    let (unit_socket, ua) = tcp_listener();
    write_listen(&config, &[("http", ua.to_string())]);
    let mut baton = Spawn::serve(&["--config", &cfg, "--upgrade-probation", "0s"])
        .fd(unit_socket, Some("baton.socket"))
        .start();
    baton.serves = Some(ua);
    baton.wait_ready();
    let warning =
        "listener http: the address comes from baton.socket (ListenStream=); change it there";

    // Unchanged: check says nothing more.
    let (code, _, err) = run_baton(&["check", "--config", &cfg, "--pid", &baton.pid().to_string()]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("warning"), "{err}");

    let moved = free_port();
    write_listen(&config, &[("http", moved.to_string())]);
    let (code, out, err) =
        run_baton(&["check", "--config", &cfg, "--pid", &baton.pid().to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains(warning)).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("baton: warning: "), "{err}");

    let load = Load::start(ua, 2, 2);
    load.wait_progress(20);
    let (pid, err) = reload_ok(baton.pid(), 2);
    assert!(err.contains(warning), "reload's answer: {err}");
    assert!(
        baton
            .stderr
            .wait_for(warning, Duration::from_secs(5))
            .is_some(),
        "no warning in the log:\n{}",
        baton.stderr.text()
    );
    // The inherited socket serves on; the configured address is not bound.
    assert_eq!(pid_of(ua), pid);
    assert!(refused(moved));
    load.wait_progress(20);
    let report = load.stop();
    assert!(report.failures.is_empty(), "{:#?}", report.failures);

    // The next generation still knows which unit the socket belongs to.
    let (code, _, err) = run_baton(&["reload", "--pid", &pid.to_string()]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(warning), "second reload: {err}");
    assert!(wait_until(EXIT_TIMEOUT, || reaper::wait_exit(
        pid,
        Duration::ZERO
    )
    .is_some()));
    stop(ua);
    drop(baton);
}

#[test]
fn a_port_below_1024_without_the_capability_fails_the_reload_and_the_old_generation_serves_on() {
    reaper::init();
    let dir = TempDir::new("listen-80");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let config = dir.join("baton.toml");
    let cfg = config.display().to_string();
    let port = free_port();
    write_listen(&config, &[("http", port.to_string())]);
    let mut args = vec![
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        common::baton_bin(),
        "serve",
        "--config",
        &cfg,
        "--upgrade-probation",
        "0s",
    ];
    let child = std::process::Command::new("setpriv")
        .args(args.drain(..))
        .env_remove("NOTIFY_SOCKET")
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .env_remove("XDG_RUNTIME_DIR")
        .env("HOME", "/")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("setpriv");
    let mut baton = Baton::adopt(child);
    baton.serves = Some(port);
    baton.wait_ready();
    let pid = baton.pid();
    write_listen(
        &config,
        &[
            ("http", port.to_string()),
            ("low", "127.0.0.1:80".to_owned()),
        ],
    );
    let load = Load::start(port, 2, 2);
    load.wait_progress(20);
    let (code, out, err) = run_baton(&["reload", "--pid", &pid.to_string()]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("cannot bind 127.0.0.1:80")
            && err.contains("ports below 1024 need root or CAP_NET_BIND_SERVICE")
            && err.contains("the old process keeps serving"),
        "{err}"
    );
    assert_eq!(pid_of(port), pid);
    load.wait_progress(50);
    let report = load.stop();
    assert!(report.failures.is_empty(), "{:#?}", report.failures);
    baton.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(baton.wait_exit(EXIT_TIMEOUT).is_some_and(|s| s.success()));
}
