//! The keeper (src/keeper.rs), with real processes and sockets: a crashed generation is
//! restarted while clients wait in the backlog, a generation that cannot start makes the keeper
//! give up and free the port, and an upgrade leaves no process on a deleted binary.
//!
//! `baton serve --keeper` runs the keeper in the foreground: it is the test's child, the
//! generations are its children, and the pidfile names the serving generation.

mod common;

use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::http;
use common::load::Load;
use common::{children, tcp_listener, wait_serving, wait_until, Baton, Spawn, TempDir};
use nix::sys::signal::Signal;

const TIMEOUT: Duration = Duration::from_secs(30);

fn free_addr() -> SocketAddr {
    tcp_listener().1
}

fn signal(pid: u32, signal: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).unwrap();
}

fn start_keeper(dir: &TempDir, addr: SocketAddr, extra: &[&str]) -> (Baton, PathBuf) {
    let pidfile = dir.join("baton.pid");
    let mut args = vec![
        "--keeper",
        "--listen",
        &*Box::leak(addr.to_string().into_boxed_str()),
        "--pidfile",
        &*Box::leak(pidfile.display().to_string().into_boxed_str()),
    ];
    args.extend_from_slice(extra);
    let mut b = Spawn::serve(&args).start();
    b.serves = Some(addr);
    (b, pidfile)
}

/// The executable `pid` runs.
fn exe(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

#[test]
fn sigkilled_generation_is_restarted_and_no_client_is_refused() {
    let dir = TempDir::new("keeper-kill");
    let addr = free_addr();
    let (mut keeper, pidfile) = start_keeper(&dir, addr, &[]);
    let first = wait_serving(&pidfile, addr, None, &keeper);
    let fresh_workers = 4;
    let load = Load::start(addr, 0, fresh_workers);
    load.wait_progress(300);
    signal(first, Signal::SIGKILL);
    let second = wait_serving(&pidfile, addr, Some(first), &keeper);
    load.wait_progress(300);
    let report = load.stop();
    // Connections that queued in the backlog while nothing accepted were served by the new
    // generation; only requests in flight on the killed process (at most one per worker) fail.
    assert!(
        report.failures.len() <= fresh_workers,
        "{} failures: {:#?}",
        report.failures.len(),
        report.failures
    );
    for f in &report.failures {
        assert!(
            !f.to_lowercase().contains("refused"),
            "a client was refused: {:#?}",
            report.failures
        );
    }
    let v = http::get(addr, "/-/version").unwrap().json();
    assert_eq!(
        (v["pid"].as_u64(), v["generation"].as_u64()),
        (Some(second as u64), Some(2))
    );
    assert!(
        keeper
            .stderr
            .wait_for(
                &format!("generation 1 (pid {first}) was killed by SIGKILL"),
                TIMEOUT
            )
            .is_some(),
        "{}",
        keeper.stderr.text()
    );
    let metrics = http::get(addr, "/-/metrics").unwrap().text();
    assert!(
        metrics.lines().any(|l| l == "baton_restarts_total 1"),
        "{metrics}"
    );
    let (code, out, err) = common::run_baton(&["status", "--pidfile", pidfile.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("pid {second}, generation 2"))
            && out.contains(&format!("keeper pid {}, 1 restart(s)", keeper.pid())),
        "{out}"
    );
    // SIGTERM to the keeper: forwarded, drained, and the whole service ends cleanly.
    keeper.signal(Signal::SIGTERM);
    let status = keeper.wait_exit(TIMEOUT).expect("the keeper did not exit");
    assert_eq!(status.code(), Some(0), "{}", keeper.stderr.text());
    assert!(!pidfile.exists());
    assert!(!Path::new(&format!("/proc/{second}")).exists());
}

#[test]
fn a_generation_that_dies_at_every_start_makes_the_keeper_give_up_and_free_the_port() {
    let dir = TempDir::new("keeper-giveup");
    let root = dir.join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("index.html"), "hi").unwrap();
    let addr = free_addr();
    // startsecs 0: the first generation's start counted as a success, so its kill is a crash
    // followed by a restart, and each restart after it fails.
    let (mut keeper, pidfile) = start_keeper(
        &dir,
        addr,
        &[
            "--root",
            root.to_str().unwrap(),
            "--startretries",
            "2",
            "--startsecs",
            "0s",
        ],
    );
    let first = wait_serving(&pidfile, addr, None, &keeper);
    // Every later generation reads the configuration afresh and finds no root: it fails at
    // start, after the keeper bound the socket.
    std::fs::remove_dir_all(&root).unwrap();
    signal(first, Signal::SIGKILL);
    let status = keeper
        .wait_exit(TIMEOUT)
        .unwrap_or_else(|| panic!("the keeper did not give up: {}", keeper.stderr.text()));
    assert_eq!(status.code(), Some(1), "{}", keeper.stderr.text());
    keeper.stderr.wait_closed(Duration::from_secs(5));
    let text = keeper.stderr.text();
    for n in 1..=2 {
        assert!(
            text.contains(&format!("failed start {n} of 3, restarting in {n}.0 s")),
            "{text}"
        );
    }
    let gave_up: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("event=\"keeper-gave-up\""))
        .collect();
    assert_eq!(gave_up.len(), 1, "{text}");
    assert!(
        gave_up[0].contains("giving up after 3 failed start(s) in a row (keeper.startretries = 2)")
            && gave_up[0].contains(&format!("server.root {}", root.display()))
            && gave_up[0].contains("closing the sockets and exiting"),
        "{}",
        gave_up[0]
    );
    // The port is free (a load balancer sees a refusal, not a hang), and so is the pidfile.
    std::net::TcpListener::bind(addr).expect("the keeper left the port bound");
    assert!(!pidfile.exists());
}

#[test]
fn keeper_upgrade_leaves_no_process_on_a_deleted_binary() {
    let dir = TempDir::new("keeper-exe");
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    let exe_path = bin.join("baton");
    std::fs::copy(common::baton_bin(), &exe_path).unwrap();
    let addr = free_addr();
    let pidfile = dir.join("baton.pid");
    let child = Command::new(&exe_path)
        .args(["serve", "--config", "/dev/null", "--keeper", "--listen"])
        .arg(addr.to_string())
        .arg("--pidfile")
        .arg(&pidfile)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut keeper = Baton::adopt(child);
    keeper.serves = Some(addr);
    let first = wait_serving(&pidfile, addr, None, &keeper);
    let load = Load::start(addr, 2, 2);
    load.wait_progress(100);
    // A package upgrade: the new binary is renamed over the old one, whose file is deleted.
    let new = bin.join("baton.new");
    std::fs::hard_link(common::baton_bin(), &new).unwrap();
    std::fs::rename(&new, &exe_path).unwrap();
    assert!(exe(keeper.pid()).ends_with(" (deleted)"));
    // SIGUSR2 to the keeper, forwarded to the main generation.
    keeper.signal(Signal::SIGUSR2);
    let second = wait_serving(&pidfile, addr, Some(first), &keeper);
    // Once the old generation drained and was reaped, and the keeper re-executed itself,
    // every baton process runs the new file.
    let keeper_pid = keeper.pid();
    let ok = wait_until(TIMEOUT, || {
        let mut pids = children(keeper_pid);
        pids.push(keeper_pid);
        pids.iter()
            .all(|p| exe(*p) == exe_path.display().to_string())
    });
    let mut pids = children(keeper_pid);
    pids.push(keeper_pid);
    assert!(
        ok,
        "{:?}; stderr:\n{}",
        pids.iter().map(|p| (p, exe(*p))).collect::<Vec<_>>(),
        keeper.stderr.text()
    );
    assert_eq!(
        children(keeper_pid),
        vec![second],
        "the old generation is gone"
    );
    assert!(keeper.stderr.text().contains("event=\"keeper-reexecuted\""));
    load.wait_progress(100);
    let report = load.stop();
    assert!(report.failures.is_empty(), "{:#?}", report.failures);
    // The re-executed keeper still supervises: a stop ends the service.
    let (code, _, err) = common::run_baton(&["stop", "--pidfile", pidfile.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let status = keeper.wait_exit(Duration::from_secs(1));
    assert!(
        status.is_some_and(|s| s.code() == Some(0) && s.signal().is_none()),
        "baton stop returned before the keeper exited: {status:?}"
    );
}

#[test]
fn a_listener_moved_by_a_reload_moves_in_the_keeper_too() {
    // The keeper holds the sockets for crash restarts; a reload that moves a listener tells it
    // (the fd store protocol), so the old port closes and a restart gets the new one.
    let dir = TempDir::new("keeper-move");
    let (a, b) = (free_addr(), free_addr());
    let config = dir.join("baton.toml");
    let write = |addr: SocketAddr| {
        std::fs::write(
            &config,
            format!("[server]\nlisten = [\"http={addr}\"]\n[upgrade]\nprobation = \"0s\"\n"),
        )
        .unwrap()
    };
    write(a);
    let pidfile = dir.join("baton.pid");
    let (config_arg, pidfile_arg) = (config.display().to_string(), pidfile.display().to_string());
    let mut keeper = Spawn::serve(&[
        "--keeper",
        "--config",
        &config_arg,
        "--pidfile",
        &pidfile_arg,
    ])
    .start();
    keeper.serves = Some(a);
    let first = wait_serving(&pidfile, a, None, &keeper);
    write(b);
    let (code, out, err) = common::run_baton(&["reload", "--wait", "--pidfile", &pidfile_arg]);
    assert_eq!(code, 0, "{out}{err}");
    keeper.serves = Some(b);
    let second = wait_serving(&pidfile, b, Some(first), &keeper);
    let refused = |addr: SocketAddr| {
        std::net::TcpStream::connect(addr)
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
    };
    assert!(
        wait_until(TIMEOUT, || refused(a)),
        "port {a} still open after the move; stderr:\n{}",
        keeper.stderr.text()
    );
    // The new main generation removed the old socket from the keeper, then gave it the new one.
    for event in ["keeper-socket-removed", "keeper-socket-added"] {
        assert!(
            keeper
                .stderr
                .wait_for(&format!("event=\"{event}\""), TIMEOUT)
                .is_some(),
            "no {event}:\n{}",
            keeper.stderr.text()
        );
    }
    // A crash: the restarted generation gets port B from the keeper (handed over, not bound).
    signal(second, Signal::SIGKILL);
    let third = wait_serving(&pidfile, b, Some(second), &keeper);
    let handed = format!("listening on http={b} (fd ");
    assert!(
        keeper
            .stderr
            .text()
            .lines()
            .any(|l| l.contains(&handed) && l.contains("generation=3")),
        "generation 3 (pid {third}) did not get {b} from the keeper:\n{}",
        keeper.stderr.text()
    );
    assert!(refused(a));
    signal(keeper.pid(), Signal::SIGTERM);
    assert!(keeper.wait_exit(TIMEOUT).unwrap().success());
}
