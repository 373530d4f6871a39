//! HTTP/2 on real processes and sockets: h2c with prior knowledge on the listeners
//! `http2.cleartext` names (HTTP/1.1 still on the same listener, and not on the others), its
//! limits, and upgrades under HTTP/2 load from h2load (Debian's nghttp2-client), several
//! streams per connection: zero failed requests.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{http, reaper, run, run_baton, start_generation, TempDir};

const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// `curl` for one URL: (HTTP version, status, body), or the curl error.
fn curl(args: &[&str], url: &str) -> Result<(String, u16, Vec<u8>), String> {
    let dir = TempDir::new("http2-curl");
    let body = dir.join("body");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "-o", body.to_str().unwrap()])
        .args(["-w", "%{http_version} %{http_code}"])
        .args(args)
        .arg(url);
    let (code, out, err) = run(cmd);
    if code != 0 {
        return Err(format!("curl exited {code}: {err}"));
    }
    let (version, status) = out.trim().split_once(' ').unwrap();
    Ok((
        version.to_owned(),
        status.parse().unwrap(),
        std::fs::read(&body).unwrap_or_default(),
    ))
}

fn root() -> TempDir {
    let root = TempDir::new("http2-root");
    std::fs::write(root.join("a.txt"), "hello\n").unwrap();
    std::fs::write(root.join("big.bin"), vec![7u8; 3 << 20]).unwrap();
    std::fs::write(root.join("mid.bin"), vec![8u8; 256 << 10]).unwrap();
    root
}

fn metric(addr: SocketAddr, name: &str) -> u64 {
    let text = http::get(addr, "/-/metrics").unwrap().text();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

#[test]
fn h2c_with_prior_knowledge_where_the_configuration_says() {
    reaper::init();
    let root = root();
    let (_baton, addr) = start_generation(
        &["--root", root.path().to_str().unwrap(), "--h2c", "http"],
        &[],
    );
    let base = format!("http://{addr}");
    for (path, len) in [("/a.txt", 6), ("/big.bin", 3 << 20), ("/-/healthy", 3)] {
        let (version, status, body) =
            curl(&["--http2-prior-knowledge"], &format!("{base}{path}")).unwrap();
        assert_eq!(
            (version.as_str(), status, body.len()),
            ("2", 200, len),
            "{path}"
        );
    }
    let (version, status, _) =
        curl(&["--http2-prior-knowledge"], &format!("{base}/missing")).unwrap();
    assert_eq!((version.as_str(), status), ("2", 404));
    // HTTP/1.1 on the same listener, the large file by the zero-copy path as before.
    let (version, status, body) = curl(&["--http1.1"], &format!("{base}/big.bin")).unwrap();
    assert_eq!(
        (version.as_str(), status, body.len()),
        ("1.1", 200, 3 << 20)
    );
    assert_eq!(
        metric(
            addr,
            "baton_http_requests_by_protocol_total{protocol=\"HTTP/2\"}"
        ),
        4
    );
}

/// Compression and the access log work the same over HTTP/2; the log names the protocol.
#[test]
fn compression_and_the_access_log_over_http2() {
    reaper::init();
    let root = root();
    let css: String = (0..2000)
        .map(|i| format!(".c{i} {{ color: red }}\n"))
        .collect();
    std::fs::write(root.join("site.css"), &css).unwrap();
    let log = root.join("../access.log");
    let (baton, addr) = start_generation(
        &[
            "--root",
            root.path().to_str().unwrap(),
            "--h2c",
            "http",
            "--access-log",
            log.to_str().unwrap(),
        ],
        &[],
    );
    let url = format!("http://{addr}/site.css");
    let (version, status, body) = curl(&["--http2-prior-knowledge", "--compressed"], &url).unwrap();
    assert_eq!((version.as_str(), status), ("2", 200));
    assert!(
        body == css.as_bytes(),
        "curl's decoding of the compressed answer differs"
    );
    let (_, _, raw) = curl(
        &["--http2-prior-knowledge", "-H", "Accept-Encoding: gzip"],
        &url,
    )
    .unwrap();
    assert!(
        raw.len() < css.len() / 4,
        "not compressed: {} bytes",
        raw.len()
    );
    common::wait_lines(&log, &baton, |lines| {
        lines
            .iter()
            .any(|line| line.contains("\"GET /site.css HTTP/2.0\" 200"))
    });
}

#[test]
fn a_listener_not_named_speaks_http1_only() {
    reaper::init();
    let root = root();
    let (_baton, addr) = start_generation(&["--root", root.path().to_str().unwrap()], &[]);
    let h2 = curl(
        &["--http2-prior-knowledge"],
        &format!("http://{addr}/a.txt"),
    );
    assert!(
        !matches!(&h2, Ok((version, 200, _)) if version == "2"),
        "HTTP/2 answered on a listener http2.cleartext does not name: {h2:?}"
    );
    let (version, status, _) = curl(&[], &format!("http://{addr}/a.txt")).unwrap();
    assert_eq!((version.as_str(), status), ("1.1", 200));
}

/// The summary of one h2load run of `n` requests over 4 connections with `streams` streams
/// each at once: (requests, succeeded, failed).
fn h2load_run(addr: SocketAddr, path: &str, n: u32, streams: u32) -> (u64, u64, u64) {
    let mut cmd = Command::new("h2load");
    cmd.args([
        "-n",
        &n.to_string(),
        "-c",
        "4",
        "-m",
        &streams.to_string(),
        "-t",
        "1",
    ])
    .arg(format!("http://{addr}{path}"));
    common::h2load(cmd)
}

#[test]
fn ten_upgrades_under_http2_load_lose_nothing() {
    reaper::init();
    let mut version = Command::new("h2load");
    version.arg("--version");
    assert!(
        run(version).0 == 0,
        "h2load is needed: apt-get install nghttp2-client"
    );
    let root = root();
    let (baton, addr) = start_generation(
        &[
            "--root",
            root.path().to_str().unwrap(),
            "--h2c",
            "http",
            "--drain-timeout",
            "10s",
        ],
        &[],
    );
    // h2load runs back to back (each on fresh connections) until the upgrades are done, so
    // that every upgrade meets HTTP/2 connections with streams in flight: eight at once for a
    // 256 KiB file, or one after the other for a small one. h2load makes no new connection
    // after a GOAWAY: the requests it still had for the connection count as failed.
    let done = Arc::new(AtomicBool::new(false));
    let load = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut runs = Vec::new();
            while !done.load(Ordering::SeqCst) || runs.len() < 2 {
                runs.push(match runs.len() % 2 {
                    0 => h2load_run(addr, "/mid.bin", 800, 8),
                    _ => h2load_run(addr, "/a.txt", 4000, 1),
                });
            }
            runs
        })
    };
    let mut pid = baton.pid();
    for generation in 2..=11u64 {
        let (code, out, err) = run_baton(&["reload", "--pid", &pid.to_string()]);
        assert_eq!(code, 0, "reload to generation {generation} failed: {err}");
        let new_pid = common::reload_new_pid(&out);
        let status = reaper::wait_exit(pid, EXIT_TIMEOUT)
            .unwrap_or_else(|| panic!("generation {} (pid {pid}) did not exit", generation - 1));
        assert!(status.success(), "pid {pid}: {status:?}");
        pid = new_pid;
    }
    done.store(true, Ordering::SeqCst);
    let runs = load.join().unwrap();
    let (total, succeeded, failed) = runs
        .iter()
        .fold((0, 0, 0), |a, r| (a.0 + r.0, a.1 + r.1, a.2 + r.2));
    assert_eq!(
        failed,
        0,
        "{failed} of {total} requests failed over {} h2load runs",
        runs.len()
    );
    assert_eq!(succeeded, total, "{runs:?}");
    assert!(
        runs.len() >= 2,
        "the load did not span the upgrades: {runs:?}"
    );
    assert_eq!(metric(addr, "baton_generation"), 11);
    common::stop_and_wait_exit(pid, EXIT_TIMEOUT);
}

/// The server's first frame after the client's preface: (type, stream).
fn first_frame(stream: &mut std::net::TcpStream) -> (u8, u32) {
    use std::io::Read;
    let mut header = [0u8; 9];
    stream
        .read_exact(&mut header)
        .expect("no frame after the preface");
    let id = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
    (header[3], id)
}

#[test]
fn h2c_clients_that_have_not_spoken_yet_are_passed_on_and_speak_http2() {
    use std::io::Write;
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let root = root();
    let (baton, addr) = start_generation(
        &["--root", root.path().to_str().unwrap(), "--h2c", "http"],
        &[],
    );
    let old = baton.pid();
    // One silent client, one that has sent the first bytes of the preface (which the old
    // generation may have read: they go over with the connection).
    let connect = || {
        let stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
    };
    let (mut silent, mut started) = (connect(), connect());
    started.write_all(&PREFACE[..9]).unwrap();
    // Both are accepted by the old generation before the upgrade.
    assert!(http::get(addr, "/-/version").is_ok());
    let new = common::reload_and_wait_exit(old, EXIT_TIMEOUT);
    silent.write_all(PREFACE).unwrap();
    started.write_all(&PREFACE[9..]).unwrap();
    // The server's preface is a SETTINGS frame (type 4) on stream 0, as HTTP/2 wants.
    assert_eq!(first_frame(&mut silent), (4, 0));
    assert_eq!(first_frame(&mut started), (4, 0));
    assert_eq!(metric(addr, "baton_connections_adopted_total"), 2);
    common::stop_and_wait_exit(new, EXIT_TIMEOUT);
    drop(baton);
}

#[test]
fn bad_http2_settings_are_one_line_each() {
    // Other tests of this binary start baton under the subreaper; its commands are run as
    // its children are.
    reaper::init();
    let dir = TempDir::new("http2-check");
    for (toml, says) in [
        (
            "[http2]\ncleartext = [\"nope\"]\n",
            "http2.cleartext names 'nope', which is no listener",
        ),
        (
            "[http2]\nmax_concurrent_streams = 0\n",
            "http2.max_concurrent_streams 0 is out of bounds",
        ),
        (
            "[http2]\nmax_header_list_size = 10\n",
            "http2.max_header_list_size 10 is out of bounds",
        ),
    ] {
        let path = dir.join("baton.toml");
        std::fs::write(&path, toml).unwrap();
        let (code, out, err) = run_baton(&["check", "--config", path.to_str().unwrap()]);
        assert_eq!(code, 1, "{toml}");
        assert_eq!(
            err.lines().filter(|l| l.contains(says)).count(),
            1,
            "{toml}: {out}{err}"
        );
    }
}
