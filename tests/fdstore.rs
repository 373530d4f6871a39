//! systemd's fd store without systemd: what the credential-checking NOTIFY_SOCKET receiver sees
//! (`FDSTORE=1` with the self-bound listener's socket, from the main pid only, again after an
//! upgrade) and how a start treats the fds the store gives back (its listener's, or stale).
//! The real thing is tests/systemd/cases/25-fdstore.sh.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::notify::{Message, Receiver};
use common::{http, reaper, run_baton, tcp_listener, Spawn, TempDir};
use nix::sys::signal::Signal;

const TIMEOUT: Duration = Duration::from_secs(20);

/// `/-/version`'s listener entry for `name`, e.g. `extra=127.0.0.1:4242 (bound)`.
fn listener_entry(addr: SocketAddr, name: &str) -> String {
    let v = http::get(addr, "/-/version").unwrap().json();
    v["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l.as_str())
        .find(|l| l.starts_with(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no listener {name} in {v}"))
        .to_owned()
}

/// The address part of a listener entry.
fn entry_address(entry: &str) -> SocketAddr {
    entry
        .split_once('=')
        .and_then(|(_, rest)| rest.split(' ').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {entry:?}"))
}

fn fdstore_messages(receiver: &Receiver) -> Vec<Message> {
    receiver
        .messages()
        .into_iter()
        .filter(|m| m.has("FDSTORE=1") || m.has("FDSTOREREMOVE=1"))
        .collect()
}

#[test]
fn the_main_pid_pushes_only_self_bound_listeners_and_again_after_an_upgrade() {
    reaper::init();
    let dir = TempDir::new("fdstore-push");
    let receiver = Receiver::new(dir.path());
    let (listener, addr) = tcp_listener();
    let mut baton = Spawn::serve(&[
        "--listen",
        "http=127.0.0.1:1",
        "--listen",
        "extra=127.0.0.1:0",
    ])
    .fd(listener, Some("http"))
    .env("NOTIFY_SOCKET", receiver.path.to_str().unwrap())
    .start();
    baton.serves = Some(addr);
    let old = baton.pid();
    receiver.set_main_pid(old);
    receiver
        .wait_accepted(TIMEOUT, |m| m.has("READY=1"))
        .expect("READY=1 from the main pid");
    let extra = entry_address(&listener_entry(addr, "extra"));
    assert_eq!(http::get(extra, "/-/healthy").unwrap().status, 200);

    // One FDSTORE=1 datagram, for the listener baton bound, with its socket; none for the
    // socket-activated one. It comes before READY=1.
    let pushed = fdstore_messages(&receiver);
    assert_eq!(pushed.len(), 1, "{pushed:#?}");
    let m = &pushed[0];
    assert!(m.accepted && m.pid == old as i32, "{m:?}");
    assert_eq!(m.get("FDNAME"), Some("bound/extra"), "{m:?}");
    assert!(m.has("FDPOLL=0"), "{m:?}");
    assert_eq!((m.fds, m.sockets.clone()), (1, vec![extra.to_string()]));
    let messages = receiver.messages();
    let position = |what: &str| messages.iter().position(|m| m.has(what)).unwrap();
    assert!(
        position("FDSTORE=1") < position("READY=1"),
        "the push comes before READY=1: {messages:#?}"
    );

    // An upgrade: the new generation gets the socket as bound/extra and, once it is the main
    // pid, pushes it too (systemd ignores the duplicate). The old one pushes nothing more.
    let (code, out, err) = run_baton(&["reload", "--pid", &old.to_string()]);
    assert_eq!(code, 0, "reload failed: {out} {err}");
    let new = http::get(addr, "/-/version").unwrap().json()["pid"]
        .as_u64()
        .unwrap() as u32;
    assert_ne!(new, old);
    receiver
        .wait_accepted(TIMEOUT, |m| m.pid == new as i32 && m.has("READY=1"))
        .expect("READY=1 from the new main pid");
    let entry = listener_entry(addr, "extra");
    assert!(entry.ends_with(", handed over, self-bound)"), "{entry}");
    assert_eq!(entry_address(&entry), extra, "the same socket");
    let pushed = fdstore_messages(&receiver);
    assert_eq!(pushed.len(), 2, "{pushed:#?}");
    let m = &pushed[1];
    assert!(m.accepted && m.pid == new as i32, "{m:?}");
    assert_eq!(m.get("FDNAME"), Some("bound/extra"));
    assert_eq!(m.sockets, [extra.to_string()]);
    let dropped: Vec<_> = receiver
        .messages()
        .into_iter()
        .filter(|m| !m.accepted)
        .collect();
    assert!(
        dropped.is_empty(),
        "messages systemd would drop: {dropped:#?}"
    );
    assert!(reaper::wait_exit(old, TIMEOUT).is_some_and(|s| s.success()));

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(new as i32), Signal::SIGTERM).unwrap();
    assert!(reaper::wait_exit(new, TIMEOUT).is_some_and(|s| s.success()));
}

#[test]
fn a_stored_fd_serves_its_listener_and_a_stale_one_is_removed_from_the_store() {
    let dir = TempDir::new("fdstore-back");
    let receiver = Receiver::new(dir.path());
    let (http_fd, addr) = tcp_listener();
    let (stored, stored_addr) = tcp_listener();
    let (stale, stale_addr) = tcp_listener();
    // As systemd passes them after a restart: the socket unit's fd and two from the store, one
    // of a listener that is no longer configured.
    let mut baton = Spawn::serve(&[
        "--listen",
        "http=127.0.0.1:1",
        "--listen",
        &format!("extra={stored_addr}"),
    ])
    .fd(stale, Some("bound/gone"))
    .fd(http_fd, Some("http"))
    .fd(stored, Some("bound/extra"))
    .env("NOTIFY_SOCKET", receiver.path.to_str().unwrap())
    .start();
    receiver.set_main_pid(baton.pid());
    receiver
        .wait_accepted(TIMEOUT, |m| m.has("READY=1"))
        .unwrap_or_else(|| panic!("no READY=1; stderr:\n{}", baton.stderr.text()));

    // The stored socket serves its listener (not bound again: that would fail, it is in use).
    let entry = listener_entry(addr, "extra");
    assert!(
        entry.ends_with("(fd 5, handed over, self-bound)"),
        "{entry}"
    );
    assert_eq!(http::get(stored_addr, "/-/healthy").unwrap().status, 200);
    // The stale one is closed (nobody else holds it: connecting is refused) and logged...
    let err = std::net::TcpStream::connect(stale_addr).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    let line = baton
        .stderr
        .wait_for("event=\"fdstore-stale\"", TIMEOUT)
        .unwrap_or_else(|| panic!("no fdstore-stale event; stderr:\n{}", baton.stderr.text()));
    assert!(
        line.contains("no listener 'gone' is configured anymore")
            && line.contains("asked systemd to remove it from its fd store"),
        "{line}"
    );
    // ...and removed from the store, before the push of the live one.
    let sent: Vec<(String, Option<String>, usize)> = fdstore_messages(&receiver)
        .iter()
        .map(|m| {
            assert!(m.accepted, "{m:?}");
            (
                m.text.lines().next().unwrap().to_owned(),
                m.get("FDNAME").map(str::to_owned),
                m.fds,
            )
        })
        .collect();
    assert_eq!(
        sent,
        [
            ("FDSTOREREMOVE=1".into(), Some("bound/gone".into()), 0),
            ("FDSTORE=1".into(), Some("bound/extra".into()), 1),
        ]
    );
    baton.signal(Signal::SIGTERM);
    assert!(baton.wait_exit(TIMEOUT).unwrap().success());
}

#[test]
fn without_notify_socket_nothing_is_offered() {
    let (listener, addr) = tcp_listener();
    let mut baton = Spawn::serve(&[
        "--listen",
        "http=127.0.0.1:1",
        "--listen",
        "extra=127.0.0.1:0",
    ])
    .fd(listener, Some("http"))
    .start();
    baton.wait_ready();
    assert!(listener_entry(addr, "extra").ends_with("(bound)"));
    baton.signal(Signal::SIGTERM);
    assert!(baton.wait_exit(TIMEOUT).unwrap().success());
    baton.stderr.wait_closed(Duration::from_secs(5));
    let text = baton.stderr.text();
    assert!(!text.contains("fdstore"), "{text}");
}
