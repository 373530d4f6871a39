//! Limits against slow and greedy clients that need real sockets at the connection limit: the
//! send timeout, and idle keep-alive connections making room for a new client.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::http::{self, Conn};
use common::{tcp_listener, wait_until, Baton, Spawn, TempDir};

/// baton on a handed-over loopback listener, ready.
fn start(args: &[&str]) -> (Baton, SocketAddr) {
    let (listener, addr) = tcp_listener();
    let mut baton = Spawn::serve(args).fd(listener, None).start();
    baton.wait_ready();
    (baton, addr)
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// The value of a counter in `/-/metrics`, read over `conn` (a connection that already holds a
/// slot, so that the read does not need one).
fn counter(conn: &mut Conn<TcpStream>, name: &str) -> u64 {
    let text = conn.get("/-/metrics").unwrap().text();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

/// Sends a GET on a fresh connection and waits at most `limit` for the whole answer.
fn get_within(addr: SocketAddr, path: &str, limit: Duration) -> (Conn<TcpStream>, Duration) {
    let mut conn = Conn::tcp(addr).unwrap();
    conn.stream().set_read_timeout(Some(limit)).unwrap();
    let t = Instant::now();
    let r = conn
        .get(path)
        .unwrap_or_else(|e| panic!("no answer within {limit:?}: {e}"));
    assert_eq!(r.status, 200);
    conn.stream()
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    (conn, t.elapsed())
}

/// Whether the server has closed `conn` (EOF without a byte); panics on a reset or data.
fn closed(conn: &mut Conn<TcpStream>) -> bool {
    conn.stream().set_nonblocking(true).unwrap();
    let mut buf = [0u8; 1];
    let r = conn.stream().read(&mut buf);
    conn.stream().set_nonblocking(false).unwrap();
    match r {
        Ok(0) => true,
        Err(e) if e.kind() == ErrorKind::WouldBlock => false,
        other => panic!("not a clean close: {other:?}"),
    }
}

// ---------------------------------------------------------------- send timeout ----

#[test]
fn non_reading_clients_at_the_limit_are_freed_after_the_send_timeout() {
    let root = TempDir::new("send-timeout");
    std::fs::write(root.join("big.bin"), pattern(64 << 20)).unwrap();
    let (_baton, addr) = start(&[
        "--root",
        root.path().to_str().unwrap(),
        "--max-connections",
        "4",
        "--send-timeout",
        "1s",
    ]);
    // Four clients take every slot and never read their 64 MiB.
    let stalled: Vec<_> = (0..4)
        .map(|_| http::start_download(addr, "/big.bin"))
        .collect();
    let t = Instant::now();
    // A fifth client waits in the backlog until a stalled one is cut.
    let (mut fresh, took) = get_within(addr, "/-/healthy", Duration::from_secs(10));
    let since_stalled = t.elapsed();
    assert!(
        since_stalled >= Duration::from_millis(800) && took < Duration::from_secs(5),
        "served {took:?} after asking, {since_stalled:?} after the stalled downloads began"
    );
    // All four are cut (the others just after the first); none of them got its whole file.
    assert!(
        wait_until(Duration::from_secs(10), || counter(
            &mut fresh,
            "baton_send_timeouts_total"
        ) == 4),
        "baton_send_timeouts_total is {}",
        counter(&mut fresh, "baton_send_timeouts_total")
    );
    drop(stalled);
    // The freed slots serve new clients again.
    for _ in 0..3 {
        get_within(addr, "/-/healthy", Duration::from_secs(5));
    }
}

#[test]
fn a_slow_reader_that_makes_progress_is_not_cut() {
    let root = TempDir::new("slow-reader");
    let body = pattern(8 << 20);
    std::fs::write(root.join("big.bin"), &body).unwrap();
    let (_baton, addr) = start(&[
        "--root",
        root.path().to_str().unwrap(),
        "--send-timeout",
        "1s",
    ]);
    let (mut conn, len) = http::start_download(addr, "/big.bin");
    assert_eq!(len, body.len());
    // 256 KiB every 200 ms: about 6 s for the file, six times the send timeout, with each
    // write of the server blocked for much of it.
    let t = Instant::now();
    let mut got = Vec::with_capacity(len);
    while got.len() < len {
        std::thread::sleep(Duration::from_millis(200));
        let n = (256 << 10).min(len - got.len());
        got.extend(conn.read_body(n).expect("cut off while reading"));
    }
    assert!(t.elapsed() > Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(got == body, "the body differs");
    // The connection is still good for another request.
    assert_eq!(counter(&mut conn, "baton_send_timeouts_total"), 0);
}

// ---------------------------------------------------------------- room at the limit ----

#[test]
fn idle_keep_alive_connections_make_room_oldest_first() {
    let (_baton, addr) = start(&[
        "--max-connections",
        "4",
        "--idle-timeout",
        "60s",
        "--header-read-timeout",
        "60s",
    ]);
    // Three keep-alive clients do one request each and stay idle, oldest first...
    let mut idle: Vec<Conn<TcpStream>> = (0..3)
        .map(|_| {
            let mut c = Conn::tcp(addr).unwrap();
            assert_eq!(c.get("/-/healthy").unwrap().status, 200);
            c
        })
        .collect();
    // ...and a fourth keeps sending a request every 300 ms.
    let mut active = Conn::tcp(addr).unwrap();
    assert_eq!(active.get("/-/healthy").unwrap().status, 200);
    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicUsize::new(0));
    let busy = {
        let (stop, requests) = (stop.clone(), requests.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(300));
                let r = active.get("/-/healthy").expect("the active client was cut");
                assert_eq!(r.status, 200);
                assert!(!r.closes(), "the active client was told to close");
                requests.fetch_add(1, Ordering::SeqCst);
            }
        })
    };

    // Each new client is served within a second or two, not after the 60 s idle timeout, and
    // takes the slot of the connection idle longest; it then stays idle itself (newer than the
    // remaining old ones).
    let mut fresh = Vec::new();
    for i in 0..3 {
        let (conn, took) = get_within(addr, "/-/healthy", Duration::from_secs(5));
        assert!(took < Duration::from_secs(2), "client {i} waited {took:?}");
        fresh.push(conn);
        // The oldest idle one is closed cleanly (EOF, no reset), the newer ones are untouched.
        assert!(
            wait_until(Duration::from_secs(5), || closed(&mut idle[i])),
            "idle client {i} not closed"
        );
        for (j, conn) in idle.iter_mut().enumerate().skip(i + 1) {
            assert!(!closed(conn), "idle client {j} closed before client {i}");
        }
    }
    assert_eq!(
        counter(&mut fresh[2], "baton_idle_closed_for_room_total"),
        3
    );
    // The active client lived through it all, sending meanwhile.
    stop.store(true, Ordering::SeqCst);
    busy.join().expect("the active client failed");
    assert!(requests.load(Ordering::SeqCst) >= 1);
}

#[test]
fn a_connection_in_the_middle_of_a_response_is_not_closed_for_room() {
    let root = TempDir::new("room-busy");
    let body = pattern(16 << 20);
    std::fs::write(root.join("big.bin"), &body).unwrap();
    let (_baton, addr) = start(&[
        "--root",
        root.path().to_str().unwrap(),
        "--max-connections",
        "2",
        "--send-timeout",
        "60s",
    ]);
    // One slot: a download the client is not reading yet (its handler has long returned).
    let (mut download, len) = http::start_download(addr, "/big.bin");
    // The other: an idle keep-alive connection.
    let mut idle = Conn::tcp(addr).unwrap();
    assert_eq!(idle.get("/-/healthy").unwrap().status, 200);
    // A new client (another download, kept in flight) gets the idle connection's slot, never
    // the first download's.
    let t = Instant::now();
    let _second = http::start_download(addr, "/big.bin");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    idle.expect_close().unwrap();
    // A third one waits: nothing idle is left.
    let mut third = TcpStream::connect(addr).unwrap();
    third
        .write_all(b"GET /-/healthy HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    third
        .set_read_timeout(Some(Duration::from_millis(800)))
        .unwrap();
    let err = third.read(&mut [0u8; 1]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WouldBlock, "served beyond the limit");
    // The download completes, byte-exact.
    assert!(download.read_body(len).unwrap() == body, "the body differs");
}
