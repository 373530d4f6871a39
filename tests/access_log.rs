//! The access log as an operator meets it: its fields in both formats, over TCP and a unix
//! socket, the duration and bytes of large (sendfile) downloads read slowly or aborted, a full
//! disk costing no request, SIGUSR1 after logrotate renamed the file, goaccess reading it, and
//! bad values refused in one line.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::http::{self, Conn};
use common::{run_baton, start, wait_lines, wait_until, Baton, Spawn, TempDir};
use nix::sys::signal::Signal;

const DEADLINE: Duration = Duration::from_secs(20);

fn root_with_files(dir: &TempDir) -> PathBuf {
    let root = dir.join("www");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("a.txt"), "hello\n").unwrap();
    root
}

/// baton serving `root`, logging to `dir/access.log` (returned) with `extra` arguments.
fn start_logging(dir: &TempDir, root: &Path, extra: &[&str]) -> (Baton, SocketAddr, PathBuf) {
    let log = dir.join("access.log");
    let mut args = vec![
        "--root",
        root.to_str().unwrap(),
        "--access-log",
        log.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (baton, addr) = start(&args);
    (baton, addr, log)
}

/// A sparse file of `len` bytes (a hole reads as zeros; sendfile sends it all the same).
fn large_file(path: &Path, len: u64) {
    std::fs::File::create(path).unwrap().set_len(len).unwrap();
}

#[test]
fn combined_has_every_field_as_nginx_writes_it() {
    let dir = TempDir::new("access-combined");
    let root = root_with_files(&dir);
    let (baton, addr, log) = start_logging(&dir, &root, &[]);
    let mut conn = Conn::tcp(addr).unwrap();
    let local = conn.stream().local_addr().unwrap();
    let r = conn
        .request(
            "GET",
            "/a.txt?q=1",
            &[
                ("Referer", "http://ref.example/\"x\""),
                ("User-Agent", "tester/1.0 (\\)"),
            ],
        )
        .unwrap();
    assert_eq!(r.status, 200);
    let r = conn.get("/missing").unwrap();
    assert_eq!(r.status, 404);
    let lines = wait_lines(&log, &baton, |l| l.len() >= 2);
    let first = &lines[0];
    let prefix = format!("{} - - [", local.ip());
    assert!(first.starts_with(&prefix), "{first}");
    let (time, rest) = first[prefix.len()..].split_once("] ").unwrap();
    // $time_local: 30/Nov/2026:16:57:25 +0000
    let bytes = time.as_bytes();
    assert_eq!(bytes.len(), 26, "{time}");
    assert_eq!(
        (bytes[2], bytes[6], bytes[11]),
        (b'/', b'/', b':'),
        "{time}"
    );
    assert!(matches!(bytes[21], b'+' | b'-'), "{time}");
    assert_eq!(
        rest,
        r#""GET /a.txt?q=1 HTTP/1.1" 200 6 "http://ref.example/\x22x\x22" "tester/1.0 (\x5C)""#
    );
    assert!(
        // The default body of a 404: "404 Not Found\n".
        lines[1].ends_with(r#""GET /missing HTTP/1.1" 404 14 "-" "-""#),
        "{}",
        lines[1]
    );
    // Not in the event log.
    assert!(!baton.stderr.text().contains("GET /a.txt"));
}

#[test]
fn json_has_every_field() {
    let dir = TempDir::new("access-json");
    let root = root_with_files(&dir);
    let (baton, addr, log) = start_logging(&dir, &root, &["--access-log-format", "json"]);
    let mut conn = Conn::tcp(addr).unwrap();
    let local = conn.stream().local_addr().unwrap();
    let r = conn
        .request(
            "HEAD",
            "/a.txt",
            &[("Referer", "http://r/"), ("User-Agent", "ua\u{e9}")],
        )
        .unwrap();
    assert_eq!(r.status, 200);
    let lines = wait_lines(&log, &baton, |l| !l.is_empty());
    let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(v["client"], local.ip().to_string());
    assert_eq!(v["method"], "HEAD");
    assert_eq!(v["path"], "/a.txt");
    assert_eq!(v["protocol"], "HTTP/1.1");
    assert_eq!(v["status"], 200);
    assert_eq!(v["bytes"], 0, "HEAD sends no body");
    assert_eq!(v["referer"], "http://r/");
    assert_eq!(v["user_agent"], "ua\u{e9}");
    assert_eq!(v["host"], "test");
    assert_eq!(v["generation"], 1);
    assert!(v["duration_us"].as_u64().is_some(), "{v}");
    assert!(v["time"].as_str().unwrap().ends_with('Z'), "{v}");
    assert!(v["time_local"].as_str().unwrap().contains(':'), "{v}");
}

#[test]
fn a_unix_socket_client_is_its_pid_and_uid() {
    let dir = TempDir::new("access-unix");
    let log = dir.join("access.log");
    let socket = dir.join("s.sock");
    let listen = format!("unix:{}", socket.display());
    let mut baton =
        Spawn::serve(&["--listen", &listen, "--access-log", log.to_str().unwrap()]).start();
    baton.wait_ready();
    let mut conn = Conn::unix(&socket).unwrap();
    assert_eq!(conn.get("/-/healthy").unwrap().status, 200);
    let lines = wait_lines(&log, &baton, |l| !l.is_empty());
    let want = format!(
        "unix:pid={},uid={} - - [",
        std::process::id(),
        nix::unistd::getuid()
    );
    assert!(lines[0].starts_with(&want), "{} vs {want}", lines[0]);
    assert!(
        lines[0].contains(r#""GET /-/healthy HTTP/1.1" 200 3 "-" "-""#),
        "{}",
        lines[0]
    );
}

/// The JSON line of the request for `path`, once logged.
fn json_line(log: &Path, baton: &Baton, path: &str) -> serde_json::Value {
    let lines = wait_lines(log, baton, |l| l.iter().any(|l| l.contains(path)));
    let line = lines.iter().find(|l| l.contains(path)).unwrap();
    serde_json::from_str(line).unwrap()
}

#[test]
fn a_slow_sendfile_download_logs_its_real_duration_and_bytes() {
    const LEN: u64 = 64 << 20;
    let dir = TempDir::new("access-slow");
    let root = root_with_files(&dir);
    large_file(&root.join("big.bin"), LEN);
    large_file(&root.join("cut.bin"), LEN);
    let (baton, addr, log) = start_logging(&dir, &root, &["--access-log-format", "json"]);

    // Slow: four pauses of 300 ms early on, while the server still has most of the file to
    // send (the socket buffers hold a few MiB at most), then the rest at full speed.
    let started = Instant::now();
    let (mut conn, len) = http::start_download(addr, "/big.bin");
    assert_eq!(len as u64, LEN);
    let mut got = 0u64;
    let mut buf = vec![0; 1 << 20];
    for _ in 0..4 {
        conn.read_body(1 << 20).unwrap();
        got += 1 << 20;
        std::thread::sleep(Duration::from_millis(300));
    }
    while got < LEN {
        let n = (LEN - got).min(buf.len() as u64) as usize;
        buf.truncate(n);
        let chunk = conn.read_body(n).unwrap();
        got += chunk.len() as u64;
    }
    let client_took = started.elapsed();
    let v = json_line(&log, &baton, "/big.bin");
    eprintln!("slow download: client took {client_took:?}, logged {v}");
    assert_eq!(v["status"], 200);
    assert_eq!(v["bytes"], LEN, "{v}");
    let logged = Duration::from_micros(v["duration_us"].as_u64().unwrap());
    assert!(
        logged >= Duration::from_millis(1200),
        "logged {logged:?}, the client paused 1.2 s"
    );
    assert!(logged <= client_took, "logged {logged:?} > {client_took:?}");
    let metrics = http::get(addr, "/-/metrics").unwrap().text();
    assert!(
        !metrics.contains("baton_sendfile_responses_total 0"),
        "not the fast path:\n{metrics}"
    );

    // Aborted after 2 MiB: the line comes with the bytes sent until the connection died.
    let (mut conn, _) = http::start_download(addr, "/cut.bin");
    conn.read_body(2 << 20).unwrap();
    drop(conn);
    let v = json_line(&log, &baton, "/cut.bin");
    eprintln!("aborted download: logged {v}");
    let bytes = v["bytes"].as_u64().unwrap();
    assert!(
        (2 << 20..LEN).contains(&bytes),
        "an aborted download logged {bytes} bytes: {v}"
    );
}

/// Requests hyper cannot parse never reach the service: hyper answers them itself (400, 414,
/// 431). They are logged and counted all the same, with the request line as received, as nginx
/// logs its own 400s.
#[test]
fn requests_hyper_rejects_are_logged_with_their_request_line() {
    let dir = TempDir::new("access-rejected");
    let root = root_with_files(&dir);
    let (baton, addr, log) = start_logging(&dir, &root, &[]);
    // A control character in the method: 400.
    let mut conn = Conn::tcp(addr).unwrap();
    conn.write_raw(b"BA\x01D /a.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(conn.read_head().unwrap().0, 400);
    // A target longer than hyper takes (65534 bytes): 414, its line logged cut to 2048 bytes.
    let mut conn = Conn::tcp(addr).unwrap();
    let target = format!("/{}", "a".repeat(70_000));
    conn.write_raw(format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    assert_eq!(conn.read_head().unwrap().0, 414);
    // A head that has not ended when hyper's buffer (about 400 KiB) is full: 431. hyper closes
    // the connection with the rest unread, so the answer may be lost to a reset: the log is
    // what is checked.
    let mut conn = Conn::tcp(addr).unwrap();
    let big = format!(
        "GET /a.txt HTTP/1.1\r\nHost: x\r\nX-Big: {}",
        "b".repeat(500_000)
    );
    let _ = conn.write_raw(big.as_bytes());
    let lines = wait_lines(&log, &baton, |l| l.len() >= 3);
    // On a connection hyper has served already, the bad request's line is not known: "-".
    // (The fast path serves files only: `/-/` always takes hyper's path.)
    let mut conn = Conn::tcp(addr).unwrap();
    assert_eq!(conn.get("/-/healthy").unwrap().status, 200);
    conn.write_raw(b"GET /a.txt HTTP/1.1\r\nHost: x\r\nNo Colon\r\n\r\n")
        .unwrap();
    assert_eq!(conn.read_head().unwrap().0, 400);
    let all = wait_lines(&log, &baton, |l| l.len() >= 5);
    assert_eq!(all[..3], lines[..3]);
    assert!(
        lines[0].ends_with(r#" "BA\x01D /a.txt HTTP/1.1" 400 0 "-" "-""#),
        "{}",
        lines[0]
    );
    let cut = format!(r#" "GET {}" 414 0 "-" "-""#, &target[..2048 - "GET ".len()]);
    assert!(lines[1].ends_with(&cut), "{}", lines[1]);
    assert!(
        lines[2].ends_with(r#" "GET /a.txt HTTP/1.1" 431 0 "-" "-""#),
        "{}",
        lines[2]
    );
    assert!(
        all[3].contains(r#" "GET /-/healthy HTTP/1.1" 200 "#),
        "{}",
        all[3]
    );
    assert!(all[4].ends_with(r#" "-" 400 0 "-" "-""#), "{}", all[4]);
    // And counted: four 4xx answers.
    let metrics = http::get(addr, "/-/metrics").unwrap().text();
    assert!(
        metrics.contains("baton_http_requests_total{class=\"4xx\"} 4"),
        "{metrics}"
    );
}

#[test]
fn a_full_disk_costs_no_request() {
    let (baton, addr) = start(&["--access-log", "/dev/full"]);
    let mut conn = Conn::tcp(addr).unwrap();
    for _ in 0..200 {
        assert_eq!(conn.get("/-/healthy").unwrap().status, 200);
    }
    let mut dropped = 0;
    let counted = wait_until(DEADLINE, || {
        let text = http::get(addr, "/-/metrics").unwrap().text();
        dropped = text
            .lines()
            .find_map(|l| l.strip_prefix("baton_access_log_dropped_total "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        dropped >= 200
    });
    assert!(
        counted,
        "{dropped} lines counted as dropped; stderr:\n{}",
        baton.stderr.text()
    );
}

#[test]
fn sigusr1_reopens_the_file_after_logrotate_renamed_it() {
    let dir = TempDir::new("access-rotate");
    let log = dir.join("access.log");
    let (baton, addr) = start(&["--access-log", log.to_str().unwrap()]);
    http::get(addr, "/-/healthy?before").unwrap();
    wait_lines(&log, &baton, |l| l.iter().any(|l| l.contains("?before")));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&log).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o640, "{mode:o}");
    let rotated = dir.join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    baton.signal(Signal::SIGUSR1);
    // The reopen happens in the writer before its next batch: the first request after the
    // signal may still be written before the signal is handled, so poll until one lands.
    let mut n = 0;
    let reopened = wait_until(DEADLINE, || {
        n += 1;
        http::get(addr, &format!("/-/healthy?after{n}")).unwrap();
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("?after"))
    });
    assert!(
        reopened,
        "no line in the new file; stderr:\n{}",
        baton.stderr.text()
    );
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(old.contains("?before"), "{old}");
    // Once a line reached the new file, every later one goes there too.
    http::get(addr, "/-/healthy?last").unwrap();
    wait_lines(&log, &baton, |l| l.iter().any(|l| l.contains("?last")));
    assert!(!std::fs::read_to_string(&rotated).unwrap().contains("?last"));
}

#[test]
fn goaccess_reads_the_combined_log() {
    let goaccess = ["/usr/bin/goaccess", "/usr/local/bin/goaccess"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect(
            "goaccess is not installed: `apt-get install goaccess` (tests/run-all.sh installs it)",
        );
    let dir = TempDir::new("access-goaccess");
    let root = root_with_files(&dir);
    let (baton, addr, log) = start_logging(&dir, &root, &[]);
    let mut conn = Conn::tcp(addr).unwrap();
    for i in 0..5 {
        conn.request(
            "GET",
            &format!("/a.txt?{i}"),
            &[("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) \"quoted\"")],
        )
        .unwrap();
    }
    conn.get("/missing").unwrap();
    // A request line with bytes nginx escapes.
    let mut raw = TcpStream::connect(addr).unwrap();
    raw.write_all(
        b"GET /%22x%22 HTTP/1.1\r\nHost: t\r\nReferer: http://a/\"b\"\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut sink = Vec::new();
    raw.read_to_end(&mut sink).unwrap();
    wait_lines(&log, &baton, |l| l.len() >= 7);
    let out = dir.join("report.json");
    let result = std::process::Command::new(goaccess)
        .arg(&log)
        .args(["--log-format=COMBINED", "--no-global-config", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "goaccess failed: {}\n{}",
        String::from_utf8_lossy(&result.stderr),
        std::fs::read_to_string(&log).unwrap()
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let general = &report["general"];
    assert_eq!(general["total_requests"], 7, "{general}");
    assert_eq!(general["failed_requests"], 0, "{general}");
}

#[test]
fn bad_values_are_one_line_and_a_failure() {
    let (code, _, err) = run_baton(&[
        "serve",
        "--config",
        "/dev/null",
        "--access-log-format",
        "xml",
    ]);
    assert_eq!(code, 2, "{err}");
    let first = err.lines().next().unwrap_or_default();
    assert!(
        first.contains("--access-log-format") && first.contains("write combined or json"),
        "{err}"
    );

    let dir = TempDir::new("access-bad");
    let config = dir.join("baton.toml");
    std::fs::write(
        &config,
        "[log]\naccess = \"/nonexistent-dir/access.log\"\naccess_format = \"xml\"\n",
    )
    .unwrap();
    let (code, _, err) = run_baton(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(
            "log.access_format: 'xml' is not an access log format; write combined or json"
        ),
        "{err}"
    );
    std::fs::write(&config, "[log]\naccess = \"/nonexistent-dir/access.log\"\n").unwrap();
    let (code, _, err) = run_baton(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("log.access /nonexistent-dir/access.log: its directory does not exist"),
        "{err}"
    );
    let (code, _, err) = run_baton(&[
        "serve",
        "--config",
        "/dev/null",
        "--access-log",
        "relative.log",
    ]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("log.access 'relative.log' is neither"),
        "{err}"
    );

    // The old spelling still works.
    std::fs::write(&config, "[server]\naccess_log = true\n").unwrap();
    let (code, out, err) = run_baton(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
}
