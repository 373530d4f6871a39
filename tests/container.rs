//! baton as PID 1 of a pid namespace, as `docker run` or `podman run` start it: the keeper
//! (src/keeper.rs) stays PID 1 through upgrades, reaps every generation, and a SIGTERM to PID 1
//! drains and ends the container cleanly.
//!
//! `unshare --pid --fork --mount-proc` makes the namespace (the test runs as root). Pids differ
//! between namespaces: the pidfile and `/-/version` name pids inside it. From outside, a
//! signal goes to PID 1 (forwarded to the main generation) or to the generation's outer pid
//! (found through `NSpid:` in /proc); `baton reload` runs inside the namespace with `nsenter`,
//! because the control socket's SO_PEERCRED check compares pids as the client's namespace sees
//! them (`docker exec` enters the namespace the same way).

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::http;
use common::load::Load;
use common::{children, tcp_listener, wait_serving, wait_until, Baton, TempDir};
use nix::sys::signal::Signal;

const TIMEOUT: Duration = Duration::from_secs(30);

fn status_field(pid: u32, field: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_owned())
        })
}

/// The pid inside the namespace of the outer pid `pid` (the last of `NSpid:`).
fn inner_pid(pid: u32) -> Option<u32> {
    status_field(pid, "NSpid")?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// The outer pid of the child of `pid1` that is `inner` inside the namespace.
fn outer_pid(pid1: u32, inner: u32) -> Option<u32> {
    children(pid1)
        .into_iter()
        .find(|p| inner_pid(*p) == Some(inner))
}

fn kill(pid: u32, signal: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).unwrap();
}

#[test]
fn pid1_keeper_upgrades_ten_times_under_load_and_stops_cleanly() {
    let dir = TempDir::new("container");
    let root = dir.join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("index.html"), "hello").unwrap();
    let addr: SocketAddr = tcp_listener().1;
    let pidfile = dir.join("baton.pid");
    let child = Command::new("unshare")
        // --kill-child: if the test fails and kills unshare, PID 1 and its namespace go too.
        .args(["--pid", "--fork", "--mount-proc", "--kill-child"])
        .arg(common::baton_bin())
        .args([
            "serve",
            "--config",
            "/dev/null",
            "--upgrade-probation",
            "1s",
            "--listen",
        ])
        .arg(addr.to_string())
        .arg("--root")
        .arg(&root)
        .arg("--pidfile")
        .arg(&pidfile)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("unshare");
    let mut unshare = Baton::adopt(child);
    unshare.serves = Some(addr);
    let mut main = wait_serving(&pidfile, addr, None, &unshare);
    // PID 1 of the namespace, as the outside sees it: unshare's only child.
    let pid1 = children(unshare.pid())[0];
    assert_eq!(inner_pid(pid1), Some(1));
    assert!(
        unshare.stderr.text().contains("event=\"keeper-start\""),
        "PID 1 without NOTIFY_SOCKET runs the keeper: {}",
        unshare.stderr.text()
    );
    assert_eq!(http::get(addr, "/").unwrap().text(), "hello");

    let load = Load::start(addr, 4, 2);
    load.wait_progress(200);
    let mut seen = vec![main];
    for i in 0..10 {
        match i % 3 {
            // SIGUSR2 to PID 1: the keeper forwards it to the main generation.
            0 => kill(pid1, Signal::SIGUSR2),
            // SIGUSR2 to the main generation itself (`kill -USR2 $(cat PIDFILE)` inside).
            1 => kill(
                outer_pid(pid1, main).expect("the main generation"),
                Signal::SIGUSR2,
            ),
            // `baton reload` inside the namespace.
            _ => {
                let mut cmd = Command::new("nsenter");
                cmd.arg("--target")
                    .arg(pid1.to_string())
                    .arg("--pid")
                    .arg("--")
                    .arg(common::baton_bin())
                    .args(["reload", "--pidfile"])
                    .arg(&pidfile);
                let (code, out, err) = common::run(cmd);
                assert_eq!(code, 0, "{out} {err}");
                assert!(out.contains("upgraded pid"), "{out}");
            }
        }
        let new = wait_serving(&pidfile, addr, Some(main), &unshare);
        // The old generation accepts until the new one confirmed it serves, then drains,
        // exits, and is reaped by PID 1.
        assert!(
            wait_until(TIMEOUT, || outer_pid(pid1, main).is_none()),
            "generation pid {main} (inside) is still there"
        );
        let v = http::get(addr, "/-/version").unwrap().json();
        assert_eq!(v["pid"], new, "each generation reports its own pid");
        assert!(!seen.contains(&new));
        seen.push(new);
        main = new;
        load.wait_progress(100);
    }
    let report = load.stop();
    assert!(report.failures.is_empty(), "{:#?}", report.failures);

    // Every old generation drained and was reaped by PID 1: one child left, no zombie.
    assert!(
        wait_until(TIMEOUT, || children(pid1).len() == 1),
        "children of PID 1: {:?}",
        children(pid1)
    );
    for p in children(pid1).into_iter().chain([pid1]) {
        let state = status_field(p, "State").unwrap_or_default();
        assert!(!state.starts_with('Z'), "pid {p} is a zombie: {state}");
    }
    assert_eq!(inner_pid(children(pid1)[0]), Some(main));
    assert_eq!(
        unshare
            .stderr
            .text()
            .matches("event=\"keeper-reexecuted\"")
            .count(),
        10,
        "the keeper re-executes itself after each upgrade"
    );

    // SIGTERM to PID 1: forwarded, drained, and the namespace ends with status 0.
    kill(pid1, Signal::SIGTERM);
    let status = unshare
        .wait_exit(TIMEOUT)
        .expect("the container did not end");
    assert_eq!(status.code(), Some(0), "{}", unshare.stderr.text());
    // Every process of the namespace has ended: every line is in once the pipe is closed.
    unshare.stderr.wait_closed(TIMEOUT);
    let text = unshare.stderr.text();
    assert!(text.contains("event=\"drained\""), "{text}");
    assert!(text.contains("event=\"keeper-stopped\""), "{text}");
    assert!(!pidfile.exists());
    std::net::TcpListener::bind(addr).expect("the port is free");
}
