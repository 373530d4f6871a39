//! The service of one process: sd_notify as systemd sees it, graceful stop, limits against slow
//! and greedy clients, static files, and the command line.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::symlink;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::http::{self, Conn};
use common::notify::Receiver;
use common::{run_baton, start, tcp_listener, Spawn, TempDir};
use nix::sys::signal::Signal;

const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------- sd_notify ----

#[test]
fn notify_ready_then_stopping_from_the_main_pid() {
    let dir = TempDir::new("notify");
    let receiver = Receiver::new(dir.path());
    let (listener, addr) = tcp_listener();
    let mut baton = Spawn::serve(&[])
        .fd(listener, None)
        .env("NOTIFY_SOCKET", receiver.path.to_str().unwrap())
        .start();
    receiver.set_main_pid(baton.pid());
    let ready = receiver
        .wait_accepted(Duration::from_secs(20), |m| m.has("READY=1"))
        .expect("READY=1 from the main pid");
    let status = ready.get("STATUS").expect("STATUS= with READY=1");
    assert!(
        status.starts_with(&format!(
            "serving generation 1 (pid {}) on http=",
            baton.pid()
        )),
        "{status}"
    );
    // READY=1 means every listener accepts.
    assert_eq!(http::get(addr, "/-/healthy").unwrap().status, 200);

    baton.signal(Signal::SIGTERM);
    receiver
        .wait_accepted(Duration::from_secs(20), |m| m.has("STOPPING=1"))
        .expect("STOPPING=1 from the main pid");
    assert!(baton.wait_exit(EXIT_TIMEOUT).unwrap().success());
    let messages = receiver.messages();
    assert!(
        messages.iter().all(|m| m.accepted),
        "a message systemd would drop: {messages:?}"
    );
    let kinds: Vec<&str> = messages
        .iter()
        .map(|m| m.text.lines().next().unwrap_or(""))
        .collect();
    assert_eq!(kinds, ["READY=1", "STOPPING=1"], "{messages:?}");
}

#[test]
fn watchdog_pings_at_half_the_interval() {
    let dir = TempDir::new("watchdog");
    let receiver = Receiver::new(dir.path());
    let (listener, _) = tcp_listener();
    let baton = Spawn::serve(&[])
        .fd(listener, None)
        .env("NOTIFY_SOCKET", receiver.path.to_str().unwrap())
        .env("WATCHDOG_USEC", "200000")
        .start();
    receiver.set_main_pid(baton.pid());
    let start = Instant::now();
    assert!(common::wait_until(Duration::from_secs(10), || {
        receiver
            .accepted()
            .iter()
            .filter(|m| m.has("WATCHDOG=1"))
            .count()
            >= 3
    }));
    // Three pings at 100 ms: the first is immediate, so at least 200 ms in all.
    assert!(start.elapsed() >= Duration::from_millis(150));
}

// ---------------------------------------------------------------- graceful stop ----

/// A file of `len` bytes whose content is checkable.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[test]
fn slow_request_in_flight_at_sigterm_completes() {
    let root = TempDir::new("slow");
    let body = pattern(64 << 20);
    std::fs::write(root.join("big.bin"), &body).unwrap();
    let (mut baton, addr) = start(&[
        "--root",
        root.path().to_str().unwrap(),
        "--drain-timeout",
        "20s",
    ]);

    let (mut conn, len) = http::start_download(addr, "/big.bin");
    let mut received = conn.read_body(1 << 20).unwrap();

    baton.signal(Signal::SIGTERM);
    baton
        .stderr
        .wait_for("event=\"stop\"", Duration::from_secs(10))
        .expect("stop event");
    // New connections are refused now (this process owned the only copy of the socket)...
    assert!(common::wait_until(Duration::from_secs(10), || http::get(
        addr, "/"
    )
    .is_err()));
    // ...but the response in flight goes on to its last byte, then the connection ends cleanly.
    received.extend(
        conn.read_body(len - received.len())
            .unwrap_or_else(|e| panic!("{e}; stderr:\n{}", baton.stderr.text())),
    );
    assert!(received == body, "the body arrived damaged");
    conn.expect_close().unwrap();
    assert!(baton.wait_exit(EXIT_TIMEOUT).unwrap().success());
    assert!(
        baton.stderr.text().contains("0 closed at the deadline"),
        "{}",
        baton.stderr.text()
    );
}

#[test]
fn keep_alive_clients_sending_during_stop_see_no_reset() {
    let (mut baton, addr) = start(&["--drain-timeout", "20s"]);
    const CLIENTS: usize = 16;
    let answered = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let answered = answered.clone();
            std::thread::spawn(move || -> Result<usize, String> {
                let mut conn = Conn::tcp(addr).map_err(|e| e.to_string())?;
                let mut n = 0;
                loop {
                    let r = conn
                        .get("/-/healthy")
                        .map_err(|e| format!("request {n} failed: {e}"))?;
                    if r.status != 200 {
                        return Err(format!("status {}", r.status));
                    }
                    n += 1;
                    answered.fetch_add(1, Ordering::SeqCst);
                    if r.closes() {
                        // The server said this is the last one: the end must be a clean close.
                        conn.expect_close()
                            .map_err(|e| format!("after Connection: close: {e}"))?;
                        return Ok(n);
                    }
                }
            })
        })
        .collect();
    // Every client is in full swing before the stop.
    assert!(common::wait_until(Duration::from_secs(10), || answered
        .load(Ordering::SeqCst)
        > CLIENTS * 50));
    let stop = Instant::now();
    baton.signal(Signal::SIGTERM);
    for client in clients {
        let n = client
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("client: {e}"));
        assert!(n > 1);
    }
    let status = baton.wait_exit(EXIT_TIMEOUT).unwrap();
    assert!(status.success(), "{status:?}");
    // Well within the drain timeout: busy connections end after their next answer.
    assert!(
        stop.elapsed() < Duration::from_secs(10),
        "{:?}",
        stop.elapsed()
    );
}

#[test]
fn drain_deadline_closes_what_is_left_and_exits_zero() {
    let root = TempDir::new("deadline");
    std::fs::write(root.join("big.bin"), pattern(64 << 20)).unwrap();
    let (mut baton, addr) = start(&[
        "--root",
        root.path().to_str().unwrap(),
        "--drain-timeout",
        "1s",
    ]);
    // A client that never reads: its response cannot finish.
    let _stalled = http::start_download(addr, "/big.bin");
    let stop = Instant::now();
    baton.signal(Signal::SIGTERM);
    let status = baton.wait_exit(EXIT_TIMEOUT).unwrap();
    assert!(status.success(), "{status:?}");
    let took = stop.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(10),
        "{took:?}"
    );
    // The process is gone; its last lines may still be on their way through the pipe.
    baton.stderr.wait_closed(EXIT_TIMEOUT);
    assert!(
        baton.stderr.text().contains("1 closed at the deadline"),
        "{}",
        baton.stderr.text()
    );
}

#[test]
fn second_sigint_exits_at_once() {
    let root = TempDir::new("second");
    std::fs::write(root.join("big.bin"), pattern(64 << 20)).unwrap();
    let (mut baton, addr) = start(&[
        "--root",
        root.path().to_str().unwrap(),
        "--drain-timeout",
        "60s",
    ]);
    let _stalled = http::start_download(addr, "/big.bin");
    baton.signal(Signal::SIGINT);
    baton
        .stderr
        .wait_for("event=\"stop\"", Duration::from_secs(10))
        .expect("stop event");
    let again = Instant::now();
    baton.signal(Signal::SIGINT);
    let status = baton.wait_exit(EXIT_TIMEOUT).unwrap();
    assert!(again.elapsed() < Duration::from_secs(5));
    assert_eq!(status.code(), Some(1));
    assert!(baton
        .stderr
        .text()
        .contains("SIGINT again: exiting without finishing the drain"));
}

// ---------------------------------------------------------------- limits ----

#[test]
fn incomplete_request_head_is_cut_at_the_header_timeout() {
    let (_baton, addr) = start(&["--header-read-timeout", "300ms"]);
    // A slowloris: part of a head, then nothing.
    let mut partial = Conn::tcp(addr).unwrap();
    partial.write_raw(b"GET / HTTP/1.1\r\nHost: t\r\n").unwrap();
    // And a connection that never sends a byte.
    let mut silent = Conn::tcp(addr).unwrap();
    let t = Instant::now();
    partial.expect_close().unwrap();
    silent.expect_close().unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn idle_keep_alive_connection_is_closed_at_the_idle_timeout() {
    let (_baton, addr) = start(&["--idle-timeout", "300ms", "--header-read-timeout", "30s"]);
    let mut conn = Conn::tcp(addr).unwrap();
    assert_eq!(conn.get("/-/healthy").unwrap().status, 200);
    let t = Instant::now();
    conn.expect_close().unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn idle_time_between_requests_is_not_header_time() {
    let (_baton, addr) = start(&["--header-read-timeout", "200ms", "--idle-timeout", "30s"]);
    let mut conn = Conn::tcp(addr).unwrap();
    assert_eq!(conn.get("/-/healthy").unwrap().status, 200);
    // Idle for longer than the header timeout, then the next request on the same connection.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(conn.get("/-/healthy").unwrap().status, 200);
}

#[test]
fn connections_beyond_the_limit_wait_for_a_free_slot() {
    let root = TempDir::new("limit");
    std::fs::write(root.join("big.bin"), pattern(64 << 20)).unwrap();
    let (_baton, addr) = start(&[
        "--root",
        root.path().to_str().unwrap(),
        "--max-connections",
        "1",
    ]);
    // The only slot is busy: a download in flight (an idle keep-alive connection would make
    // room, see tests/limits.rs).
    let (first, _) = http::start_download(addr, "/big.bin");
    // The second connection waits, not served...
    let mut second = std::net::TcpStream::connect(addr).unwrap();
    second
        .write_all(b"GET /-/healthy HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    second
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 1];
    let err = second.read(&mut buf).unwrap_err();
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::WouldBlock,
        "served beyond the limit"
    );
    // ...until the first one goes away.
    drop(first);
    second
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reply = String::new();
    second.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

// ---------------------------------------------------------------- the endpoints ----

#[test]
fn operational_endpoints() {
    let (baton, addr) = start(&[]);
    let r = http::get(addr, "/-/healthy").unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));

    let v = http::get(addr, "/-/version").unwrap();
    assert_eq!(v.header("content-type"), Some("application/json"));
    let v = v.json();
    assert_eq!(v["version"], baton::VERSION);
    assert_eq!(v["pid"], baton.pid());
    assert_eq!(v["generation"], 1);
    let started = v["started"].as_str().unwrap();
    assert!(
        started.len() >= 20 && started.as_bytes()[10] == b'T' && started.ends_with('Z'),
        "not RFC 3339: {started}"
    );

    let page = http::get(addr, "/").unwrap();
    assert_eq!(page.status, 200);
    let html = page.text();
    for needle in [
        baton::VERSION.to_owned(),
        baton.pid().to_string(),
        format!("http={addr}"),
    ] {
        assert!(html.contains(&needle), "{needle} missing from the page");
    }

    http::get(addr, "/nonexistent").unwrap(); // a 4xx for the metrics
    let needles = [
        "baton_http_requests_total{class=\"2xx\"} 3",
        "baton_http_requests_total{class=\"4xx\"} 1",
        "baton_open_connections 1",
        "baton_generation 1",
        "baton_process_start_time_seconds ",
    ];
    // The client saw each earlier connection end; the server's task may count it a moment
    // later. (Each look is one more 2xx, so the count is checked on the first look only.)
    let first = http::get(addr, "/-/metrics").unwrap();
    assert_eq!(first.status, 200);
    let text = first.text();
    for needle in &needles[..2] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    let mut text = text;
    let settled = common::wait_until(Duration::from_secs(5), || {
        text = http::get(addr, "/-/metrics").unwrap().text();
        needles[2..].iter().all(|n| text.contains(n))
    });
    assert!(settled, "{:?} missing from:\n{text}", &needles[2..]);
}

#[test]
fn access_log_is_off_by_default_and_on_with_the_flag() {
    let (quiet, addr) = start(&[]);
    http::get(addr, "/-/healthy").unwrap();
    let (loud, addr2) = start(&["--access-log"]);
    http::get(addr2, "/-/healthy").unwrap();
    loud.stderr
        .wait_for("\"GET /-/healthy HTTP/1.1\" 200 3", Duration::from_secs(10))
        .expect("an access log line");
    assert!(!quiet.stderr.text().contains("GET /-/healthy"));
}

// ---------------------------------------------------------------- static files ----

#[test]
fn static_files_with_http_semantics() {
    let root = TempDir::new("files");
    std::fs::write(root.join("index.html"), "<h1>home</h1>").unwrap();
    std::fs::write(root.join("style.css"), "body{}").unwrap();
    std::fs::create_dir(root.join("sub")).unwrap();
    std::fs::write(root.join("sub/index.html"), "sub").unwrap();
    std::fs::write(root.join("data.bin"), pattern(10_000)).unwrap();
    let (_baton, addr) = start(&["--root", root.path().to_str().unwrap()]);

    let r = http::get(addr, "/").unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "<h1>home</h1>"));
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    assert_eq!(http::get(addr, "/sub/").unwrap().text(), "sub");
    assert_eq!(
        http::get(addr, "/style.css")
            .unwrap()
            .header("content-type"),
        Some("text/css; charset=utf-8")
    );
    assert_eq!(http::get(addr, "/missing").unwrap().status, 404);

    let mut conn = Conn::tcp(addr).unwrap();
    let r = conn
        .request("GET", "/data.bin", &[("Range", "bytes=10-19")])
        .unwrap();
    assert_eq!(r.status, 206);
    assert_eq!(r.body, pattern(10_000)[10..20]);

    let full = conn.get("/data.bin").unwrap();
    let modified = full
        .header("last-modified")
        .expect("Last-Modified")
        .to_owned();
    let r = conn
        .request("GET", "/data.bin", &[("If-Modified-Since", &modified)])
        .unwrap();
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());

    let r = conn.request("HEAD", "/data.bin", &[]).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("10000"));
}

#[test]
fn nothing_outside_the_root_is_reachable() {
    let outside = TempDir::new("outside");
    std::fs::write(outside.join("secret"), "secret").unwrap();
    let root = TempDir::new("confined");
    std::fs::write(root.join("inside.txt"), "inside").unwrap();
    symlink(root.join("inside.txt"), root.join("link-in")).unwrap();
    symlink(outside.join("secret"), root.join("link-out")).unwrap();
    symlink(outside.path(), root.join("dir-out")).unwrap();
    std::fs::create_dir(root.join("idx")).unwrap();
    symlink(outside.join("secret"), root.join("idx/index.html")).unwrap();
    let (_baton, addr) = start(&["--root", root.path().to_str().unwrap()]);

    assert_eq!(http::get(addr, "/link-in").unwrap().text(), "inside");
    for path in [
        "/link-out",
        "/dir-out/secret",
        "/idx/",
        "/../outside/secret",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/..%2f..%2fetc%2fpasswd",
    ] {
        let r = http::get(addr, path).unwrap();
        assert!(
            matches!(r.status, 400 | 404),
            "{path}: {} {}",
            r.status,
            r.text()
        );
        assert!(
            !r.text().contains("secret") && !r.text().contains("root:"),
            "{path} leaked"
        );
    }
}

/// A path swapped back and forth between a regular file and a symlink to a secret outside the
/// root (rename(2) over it, as someone who may write inside the root can) never yields the
/// secret, whatever the request: plain GET (the cache), Range, If-None-Match.
#[test]
fn a_symlink_swapped_in_mid_request_never_leaks_outside_the_root() {
    const SIZE: usize = 2048;
    const REQUESTS: usize = 6000;
    let outside = TempDir::new("race-outside");
    let secret: Vec<u8> = b"TOPSECRET-".iter().copied().cycle().take(SIZE).collect();
    std::fs::write(outside.join("secret"), &secret).unwrap();
    let root = TempDir::new("race");
    let public: Vec<u8> = b"public-ok-".iter().copied().cycle().take(SIZE).collect();
    std::fs::write(root.join("public"), &public).unwrap();
    std::fs::copy(root.join("public"), root.join("swap")).unwrap();
    let (_baton, addr) = start(&["--root", root.path().to_str().unwrap()]);
    assert_eq!(http::get(addr, "/swap").unwrap().body, public);

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swaps = Arc::new(AtomicUsize::new(0));
    let swapper = {
        let (stop, swaps) = (stop.clone(), swaps.clone());
        let (root, secret) = (root.path().to_owned(), outside.join("secret"));
        std::thread::spawn(move || {
            let (file, link, swap) = (root.join("f.tmp"), root.join("l.tmp"), root.join("swap"));
            while !stop.load(Ordering::SeqCst) {
                std::fs::hard_link(root.join("public"), &file).unwrap();
                std::fs::rename(&file, &swap).unwrap();
                symlink(&secret, &link).unwrap();
                std::fs::rename(&link, &swap).unwrap();
                swaps.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let sent = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let sent = sent.clone();
            std::thread::spawn(move || {
                let (mut served, mut missing, mut leaked) = (0, 0, 0);
                let mut conn = Conn::tcp(addr).unwrap();
                loop {
                    let n = sent.fetch_add(1, Ordering::SeqCst);
                    if n >= REQUESTS || Instant::now() > deadline {
                        return (served, missing, leaked);
                    }
                    let headers: &[(&str, &str)] = match n % 3 {
                        0 => &[],
                        1 => &[("Range", "bytes=0-99")],
                        _ => &[("If-None-Match", "\"nope\"")],
                    };
                    let r = conn.request("GET", "/swap", headers).unwrap();
                    if r.body.windows(9).any(|w| w == b"TOPSECRET") {
                        leaked += 1;
                    }
                    match r.status {
                        200 | 206 => served += 1,
                        404 => missing += 1,
                        status => panic!("status {status}: {}", r.text()),
                    }
                    if r.closes() {
                        conn = Conn::tcp(addr).unwrap();
                    }
                }
            })
        })
        .collect();
    let (mut served, mut missing, mut leaked) = (0, 0, 0);
    for client in clients {
        let (s, m, l) = client.join().unwrap();
        (served, missing, leaked) = (served + s, missing + m, leaked + l);
    }
    stop.store(true, Ordering::SeqCst);
    swapper.join().unwrap();
    let swaps = swaps.load(Ordering::SeqCst);
    eprintln!("{served} served, {missing} not found, {leaked} leaked; {swaps} swaps");
    assert_eq!(
        leaked,
        0,
        "the secret leaked in {leaked} of {} responses",
        served + missing
    );
    // The race was on: both states of the path were seen, and thousands of requests ran.
    assert!(
        served > 0 && missing > 0,
        "{served} served, {missing} not found"
    );
    assert!(
        served + missing >= 1000,
        "only {} requests",
        served + missing
    );
}

// ---------------------------------------------------------------- HTTP framing ----

/// RFC 9112 section 3.2: an HTTP/1.1 request without Host, or any request with two, is 400.
#[test]
fn host_header_missing_or_repeated_is_400() {
    let (_baton, addr) = start(&[]);
    let raw = |head: &str| {
        let mut conn = Conn::tcp(addr).unwrap();
        conn.write_raw(head.as_bytes()).unwrap();
        conn.read_response(false).unwrap()
    };
    for head in [
        "GET /-/healthy HTTP/1.1\r\n\r\n",
        "GET /-/healthy HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        "GET /-/healthy HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
        "GET /-/healthy HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
    ] {
        let r = raw(head);
        assert_eq!(r.status, 400, "{head:?}: {}", r.text());
        assert!(!r.text().is_empty(), "{head:?}: a short body says why");
    }
    for head in [
        "GET /-/healthy HTTP/1.0\r\n\r\n",
        "GET /-/healthy HTTP/1.1\r\nHost: example.org:8080\r\n\r\n",
        "GET /-/healthy HTTP/1.1\r\nHost:\r\n\r\n",
        "GET /-/healthy HTTP/1.1\r\nhost: [::1]\r\n\r\n",
    ] {
        assert_eq!(raw(head).status, 200, "{head:?}");
    }
    let m = http::get(addr, "/-/metrics").unwrap().text();
    assert!(
        m.contains("baton_http_requests_total{class=\"4xx\"} 5"),
        "{m}"
    );
}

/// A name longer than the file system allows cannot exist: 404, counted as a client error.
#[test]
fn a_path_segment_too_long_for_the_file_system_is_404() {
    let root = TempDir::new("long");
    std::fs::write(root.join("a"), "a").unwrap();
    let (_baton, addr) = start(&["--root", root.path().to_str().unwrap()]);
    let long = "x".repeat(300);
    for path in [
        format!("/{long}"),
        format!("/{long}/a"),
        format!("/a/{long}"),
        format!("/{}", ["y"; 3000].join("/")),
    ] {
        let r = http::get(addr, &path).unwrap();
        assert_eq!(r.status, 404, "{}", &path[..20]);
    }
    let mut conn = Conn::tcp(addr).unwrap();
    let r = conn.request("HEAD", &format!("/{long}"), &[]).unwrap();
    assert_eq!(r.status, 404);
    let m = http::get(addr, "/-/metrics").unwrap().text();
    assert!(
        m.contains("baton_http_requests_total{class=\"4xx\"} 5"),
        "{m}"
    );
    let server_errors = m.lines().find(|l| l.contains("class=\"5xx\""));
    assert!(server_errors.is_none_or(|l| l.ends_with(" 0")), "{m}");
}

// ---------------------------------------------------------------- command line ----

#[test]
fn version_and_help() {
    let (code, out, _) = run_baton(&["--version"]);
    assert_eq!(
        (code, out.trim()),
        (0, format!("baton {}", baton::VERSION).as_str())
    );
    for cmd in [&["--help"][..], &["serve", "--help"], &["check", "--help"]] {
        let (code, out, _) = run_baton(cmd);
        assert_eq!(code, 0, "{cmd:?}");
        assert!(out.contains("Usage: baton"), "{cmd:?}: {out}");
    }
    let (_, out, _) = run_baton(&["serve", "--help"]);
    for flag in [
        "--listen",
        "--root",
        "--config",
        "--drain-timeout",
        "--header-read-timeout",
        "--idle-timeout",
        "--max-connections",
        "--access-log",
        "--log-level",
    ] {
        assert!(out.contains(flag), "serve --help lacks {flag}");
    }
}

#[test]
fn check_reports_every_error() {
    let dir = TempDir::new("check");
    let good = dir.join("good.toml");
    std::fs::write(&good, "[server]\nlisten = [\"http=127.0.0.1:8080\", \"admin=unix:/run/x.sock\"]\n[shutdown]\ndrain_timeout = \"5s\"\n").unwrap();
    let (code, out, err) = run_baton(&["check", "--config", good.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(&format!("config OK: {}", good.display())),
        "{out}"
    );

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[server]\nlisten = [\"nowhere\"]\nroot = \"/nonexistent\"\ncolour = 1\n[limits]\nidle_timeout = \"soon\"\n").unwrap();
    let (code, _, err) = run_baton(&["check", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with(&format!("baton: config {}: ", bad.display()))),
        "{err}"
    );
    assert!(err.contains("unknown key 'server.colour'"), "{err}");
    assert!(err.contains("'nowhere' is not a listen address"), "{err}");
    assert!(
        err.contains("limits.idle_timeout: 'soon' is not a duration"),
        "{err}"
    );

    // Parsed but wrong: the root is checked once the file parses.
    std::fs::write(&bad, "[server]\nroot = \"/nonexistent\"\n").unwrap();
    let (code, _, err) = run_baton(&["check", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("server.root /nonexistent"), "{err}");

    // serve refuses the same file the same way, before touching any socket.
    let (code, _, err2) = run_baton(&["serve", "--config", bad.to_str().unwrap()]);
    assert_eq!((code, err2), (1, err));
}

#[test]
fn bad_flag_values_are_usage_errors() {
    let (code, _, err) = run_baton(&["serve", "--drain-timeout", "forever"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("invalid value 'forever' for '--drain-timeout"),
        "{err}"
    );
}

#[test]
fn a_request_head_in_progress_at_the_drain_grace_still_gets_its_answer() {
    // On a fresh connection (the fast path reads the head) and on one hyper serves.
    for first_answered in [false, true] {
        let (mut baton, addr) = start(&["--drain-timeout", "20s"]);
        let mut conn = Conn::tcp(addr).unwrap();
        if first_answered {
            assert_eq!(conn.get("/-/healthy").unwrap().status, 200);
        }
        conn.write_raw(b"GET /-/healthy HTTP/1.1\r\nHost: t\r\n")
            .unwrap();
        // Accepted (counted open: it and the metrics request) before the stop: one still in
        // the listen backlog is reset with the listener.
        assert!(common::wait_until(Duration::from_secs(10), || {
            http::get(addr, "/-/metrics")
                .is_ok_and(|r| r.text().contains("\nbaton_open_connections 2\n"))
        }));
        baton.signal(Signal::SIGTERM);
        baton
            .stderr
            .wait_for("event=\"stop\"", Duration::from_secs(10))
            .expect("stop event");
        // Past the idle grace (1 s): the connection was not idle, it was sending a request.
        std::thread::sleep(Duration::from_millis(1500));
        conn.write_raw(b"\r\n").unwrap();
        let r = conn.read_response(false).unwrap();
        assert_eq!(r.status, 200, "first answered: {first_answered}");
        assert!(r.closes(), "answered with Connection: close");
        conn.expect_close().unwrap();
        assert!(baton.wait_exit(EXIT_TIMEOUT).unwrap().success());
    }
}

#[test]
fn cached_files_follow_changes_of_the_file_and_of_its_links() {
    let root = TempDir::new("cache");
    let outside = TempDir::new("cache-outside");
    std::fs::write(outside.join("secret"), "secret").unwrap();
    std::fs::write(root.join("a.txt"), "one").unwrap();
    std::fs::write(root.join("b.txt"), "bee").unwrap();
    symlink(root.join("a.txt"), root.join("link.txt")).unwrap();
    let (_baton, addr) = start(&["--root", root.path().to_str().unwrap()]);
    let body = |path: &str| {
        let r = http::get(addr, path).unwrap();
        (r.status, r.text())
    };
    for _ in 0..3 {
        assert_eq!(body("/a.txt"), (200, "one".to_owned()));
        assert_eq!(body("/link.txt"), (200, "one".to_owned()));
    }
    // Rewritten in place, and replaced by a rename: both are seen at once.
    std::fs::write(root.join("a.txt"), "two!").unwrap();
    assert_eq!(body("/a.txt"), (200, "two!".to_owned()));
    std::fs::write(root.join("new"), "three").unwrap();
    std::fs::rename(root.join("new"), root.join("a.txt")).unwrap();
    assert_eq!(body("/a.txt"), (200, "three".to_owned()));
    // A cached link retargeted inside the root serves the new target...
    std::fs::remove_file(root.join("link.txt")).unwrap();
    symlink(root.join("b.txt"), root.join("link.txt")).unwrap();
    assert_eq!(body("/link.txt"), (200, "bee".to_owned()));
    // ...and retargeted outside it, nothing.
    std::fs::remove_file(root.join("link.txt")).unwrap();
    symlink(outside.join("secret"), root.join("link.txt")).unwrap();
    let (status, text) = body("/link.txt");
    assert_eq!(status, 404);
    assert!(!text.contains("secret"));
    // Conditional and range requests bypass the cache and keep their meaning.
    let mut conn = Conn::tcp(addr).unwrap();
    let r = conn
        .request("GET", "/b.txt", &[("Range", "bytes=1-1")])
        .unwrap();
    assert_eq!((r.status, r.text().as_str()), (206, "e"));
}
