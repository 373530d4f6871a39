//! The zero-copy fast path (sendfile) on real processes and sockets: the same answers as
//! `ServeDir` (which still serves unix-socket listeners, so the two can be compared request by
//! request), whole bodies, the send timeout, files truncated or replaced while being sent,
//! keep-alive across the two paths, the drain and upgrades with large downloads in flight, and
//! keep-alive connections passed on to the new generation in an upgrade, even from a listener
//! the new configuration drops.

mod common;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::http::{self, Conn};
use common::{free_port, reaper, run_baton, tcp_listener, wait_until, Baton, Spawn, TempDir};
use nix::sys::signal::Signal;

const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i % 251) as u8).wrapping_add(seed))
        .collect()
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// baton on a handed-over loopback listener, ready.
fn start(args: &[&str]) -> (Baton, SocketAddr) {
    let (listener, addr) = tcp_listener();
    let mut baton = Spawn::serve(args).fd(listener, None).start();
    baton.wait_ready();
    (baton, addr)
}

/// The value of a counter in `/-/metrics`, over `conn`.
fn counter<S: Read + Write>(conn: &mut Conn<S>, name: &str) -> u64 {
    let text = conn.get("/-/metrics").unwrap().text();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

/// Responses the fast path wrote (from memory or with sendfile).
fn fast_count(addr: SocketAddr) -> u64 {
    counter(
        &mut Conn::tcp(addr).unwrap(),
        "baton_fast_path_responses_total",
    )
}

fn sendfile_count(addr: SocketAddr) -> u64 {
    counter(
        &mut Conn::tcp(addr).unwrap(),
        "baton_sendfile_responses_total",
    )
}

// ---------------------------------------------------------------- same answers as ServeDir ----

/// A request as raw bytes, and the whole answer read back: status line and header lines in
/// order (the `date` value blanked), body.
fn exchange<S: Read + Write>(
    stream: &mut S,
    request: &str,
    head_only: bool,
) -> (Vec<String>, Vec<u8>) {
    stream.write_all(request.as_bytes()).unwrap();
    let mut conn_bytes = Vec::new();
    let mut buf = [0u8; 65536];
    // The head.
    let head_end = loop {
        let n = stream.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "closed before a whole head: {:?}",
            String::from_utf8_lossy(&conn_bytes)
        );
        conn_bytes.extend_from_slice(&buf[..n]);
        if let Some(i) = conn_bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8(conn_bytes[..head_end].to_vec()).unwrap();
    let lines: Vec<String> = head
        .trim_end()
        .split("\r\n")
        .map(|l| {
            if l.starts_with("date: ") {
                "date: *".to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect();
    let len: usize = lines
        .iter()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map_or(0, |v| v.parse().unwrap());
    let mut body = conn_bytes[head_end..].to_vec();
    let status_no_body = lines[0].contains(" 304 ");
    let want = if head_only || status_no_body { 0 } else { len };
    while body.len() < want {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed inside the body");
        body.extend_from_slice(&buf[..n]);
    }
    assert_eq!(body.len(), want, "more bytes than the body");
    (lines, body)
}

/// baton with a TCP listener (fast path) and a unix one (hyper and ServeDir), on one root.
fn start_both(root: &TempDir, args: &[&str]) -> (Baton, SocketAddr, PathBuf) {
    let (tcp, addr) = tcp_listener();
    let sock = root.join("../baton-sendfile.sock");
    let _ = std::fs::remove_file(&sock);
    let unix = UnixListener::bind(&sock).unwrap();
    let mut all = vec!["--root", root.path().to_str().unwrap()];
    all.extend_from_slice(args);
    let mut baton = Spawn::serve(&all).fd(tcp, None).fd(unix, None).start();
    baton.wait_ready();
    (baton, addr, sock)
}

/// A method, a path and extra header lines.
type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>);

#[test]
fn fast_path_answers_are_serve_dirs_header_by_header() {
    let dir = TempDir::new("sendfile-headers");
    let root = TempDir(dir.join("www"));
    std::fs::create_dir_all(root.join("docs")).unwrap();
    std::fs::write(root.join("big.bin"), pattern(1 << 20, 0)).unwrap();
    std::fs::write(root.join("page.html"), pattern(300 << 10, 1)).unwrap();
    std::fs::write(root.join("cached.bin"), pattern(256 << 10, 3)).unwrap();
    std::fs::write(root.join("docs/index.html"), pattern(400 << 10, 2)).unwrap();
    let (_baton, addr, sock) = start_both(&root, &[]);

    // Each kind of file: sent with sendfile, at the cache's limit, small; each of the last two
    // first read into the cache by the fast path, then from memory.
    std::fs::write(root.join("small.bin"), pattern(1000, 4)).unwrap();
    let mut cases: Vec<(String, Vec<(&str, String)>)> = Vec::new();
    for (file, tail) in [
        ("/big.bin", "bytes=1048000-"),
        ("/cached.bin", "bytes=262000-"),
        ("/small.bin", "bytes=990-"),
    ] {
        // The validators of the file, as ServeDir states them.
        let (lines, _) = exchange(
            &mut UnixStream::connect(&sock).unwrap(),
            &format!("HEAD {file} HTTP/1.1\r\nHost: t\r\n\r\n"),
            true,
        );
        let value = |name: &str| {
            lines
                .iter()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                .unwrap_or_else(|| panic!("no {name} in {lines:?}"))
                .to_owned()
        };
        let (etag, last_modified) = (value("etag"), value("last-modified"));
        let weak = format!("W/{etag}");
        let list = format!("\"nope\", {etag}");
        let with = |headers: &[(&'static str, &str)]| -> Vec<(&'static str, String)> {
            headers.iter().map(|(k, v)| (*k, v.to_string())).collect()
        };
        for (method, target, extra) in [
            ("GET", file.to_owned(), with(&[])),
            ("HEAD", file.to_owned(), with(&[])),
            ("GET", format!("{file}?x=1"), with(&[])),
            ("GET", file.replacen("/", "/%2e/", 1), with(&[])),
            ("GET", file.to_owned(), with(&[("Range", "bytes=100-199")])),
            ("GET", file.to_owned(), with(&[("Range", "bytes=-1000")])),
            ("GET", file.to_owned(), with(&[("Range", tail)])),
            ("HEAD", file.to_owned(), with(&[("Range", "bytes=0-0")])),
            ("GET", file.to_owned(), with(&[("If-None-Match", &etag)])),
            ("GET", file.to_owned(), with(&[("If-None-Match", &weak)])),
            ("GET", file.to_owned(), with(&[("If-None-Match", &list)])),
            ("GET", file.to_owned(), with(&[("If-None-Match", "*")])),
            ("HEAD", file.to_owned(), with(&[("If-None-Match", &etag)])),
            (
                "GET",
                file.to_owned(),
                with(&[("If-None-Match", "\"other\"")]),
            ),
            (
                "GET",
                file.to_owned(),
                with(&[("If-Modified-Since", &last_modified)]),
            ),
            (
                "GET",
                file.to_owned(),
                with(&[("If-Modified-Since", "Mon, 01 Jan 2001 00:00:00 GMT")]),
            ),
            (
                "GET",
                file.to_owned(),
                with(&[("If-Modified-Since", "not a date")]),
            ),
            (
                "GET",
                file.to_owned(),
                with(&[
                    ("If-None-Match", "\"other\""),
                    ("If-Modified-Since", &last_modified),
                ]),
            ),
            (
                "GET",
                file.to_owned(),
                with(&[
                    ("If-Modified-Since", &last_modified),
                    ("Range", "bytes=0-9"),
                ]),
            ),
            ("GET", file.to_owned(), with(&[("Connection", "close")])),
        ] {
            cases.push((format!("{method} {target}"), extra));
        }
    }
    cases.push(("GET /%62ig.bin".to_owned(), vec![]));
    cases.push(("GET /page.html".to_owned(), vec![]));
    cases.push(("GET /docs/".to_owned(), vec![]));
    let before = fast_count(addr);
    for (line, extra) in &cases {
        let mut request = format!("{line} HTTP/1.1\r\nHost: t\r\n");
        for (k, v) in extra {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
        request.push_str("\r\n");
        let head_only = line.starts_with("HEAD");
        let fast = exchange(&mut TcpStream::connect(addr).unwrap(), &request, head_only);
        let reference = exchange(
            &mut UnixStream::connect(&sock).unwrap(),
            &request,
            head_only,
        );
        assert_eq!(fast.0, reference.0, "{request}");
        assert!(fast.1 == reference.1, "the bodies differ: {request}");
        assert!(
            fast.0[0].starts_with("HTTP/1.1 2") || fast.0[0].contains(" 304 "),
            "{request}"
        );
    }
    // Every case above took the fast path on TCP.
    assert_eq!(fast_count(addr) - before, cases.len() as u64);

    // What the fast path leaves to hyper is answered as before (and not counted).
    let before = fast_count(addr);
    for (request, status) in [
        ("GET /big.bin HTTP/1.1\r\nHost: t\r\nRange: bytes=0-1,5-6\r\n\r\n", 416),
        ("GET /big.bin HTTP/1.1\r\nHost: t\r\nRange: bytes=9999999-\r\n\r\n", 416),
        ("GET /big.bin HTTP/1.1\r\nHost: t\r\nIf-Match: \"x\"\r\n\r\n", 412),
        ("GET /big.bin HTTP/1.1\r\nHost: t\r\nIf-Unmodified-Since: Mon, 01 Jan 2001 00:00:00 GMT\r\n\r\n", 412),
        ("GET /big.bin HTTP/1.1\r\n\r\n", 400),
        ("POST /big.bin HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n", 405),
        ("GET /docs HTTP/1.1\r\nHost: t\r\n\r\n", 307),
        ("GET /small HTTP/1.1\r\nHost: t\r\n\r\n", 404),
        ("GET /small.bin HTTP/1.0\r\nHost: t\r\n\r\n", 200),
    ] {
        let fast = exchange(&mut TcpStream::connect(addr).unwrap(), request, false);
        let reference = exchange(&mut UnixStream::connect(&sock).unwrap(), request, false);
        assert_eq!(fast.0, reference.0, "{request}");
        assert!(fast.0[0].contains(&format!(" {status} ")), "{request}: {:?}", fast.0);
    }
    assert_eq!(fast_count(addr), before);
    let _ = std::fs::remove_file(&sock);
}

/// Large pre-compressed sidecars and the configured headers: the fast path sends what
/// `ServeDir` and the header step send, and leaves what is to be compressed on the fly to hyper.
#[test]
fn fast_path_sidecars_and_configured_headers_are_serve_dirs() {
    let dir = TempDir::new("sendfile-sidecars");
    let root = TempDir(dir.join("www"));
    std::fs::create_dir_all(root.join("assets")).unwrap();
    // The sidecar is served as it is: its bytes need not be a real gzip stream for this.
    std::fs::write(root.join("assets/app.js"), pattern(900 << 10, 4)).unwrap();
    std::fs::write(root.join("assets/app.js.gz"), pattern(400 << 10, 5)).unwrap();
    std::fs::write(root.join("assets/app.js.br"), pattern(300 << 10, 6)).unwrap();
    std::fs::write(root.join("page.html"), pattern(300 << 10, 7)).unwrap();
    std::fs::write(root.join("big.bin"), pattern(1 << 20, 8)).unwrap();
    // Small: from the memory cache, sidecar included; below compression.min_size (1024).
    std::fs::write(root.join("assets/small.js"), pattern(3000, 9)).unwrap();
    std::fs::write(root.join("assets/small.js.gz"), pattern(1200, 10)).unwrap();
    std::fs::write(root.join("tiny.css"), pattern(500, 11)).unwrap();
    let (_baton, addr, sock) = start_both(
        &root,
        &[
            "--cache-control",
            "/assets/**=public, max-age=31536000, immutable",
            "--cache-control",
            "text/html=no-cache",
            "--add-header",
            "X-Content-Type-Options: nosniff",
        ],
    );
    let (lines, _) = exchange(
        &mut UnixStream::connect(&sock).unwrap(),
        "HEAD /assets/app.js HTTP/1.1\r\nHost: t\r\nAccept-Encoding: gzip\r\n\r\n",
        true,
    );
    let gz_etag = lines
        .iter()
        .find_map(|l| l.strip_prefix("etag: "))
        .unwrap()
        .to_owned();
    let fast_cases: Vec<Case> = vec![
        // Twice: read into the cache, then from it.
        ("GET", "/assets/small.js", vec![("Accept-Encoding", "gzip")]),
        ("GET", "/assets/small.js", vec![("Accept-Encoding", "gzip")]),
        (
            "GET",
            "/assets/small.js",
            vec![("Accept-Encoding", "gzip"), ("Range", "bytes=5-10")],
        ),
        (
            "HEAD",
            "/assets/small.js",
            vec![("Accept-Encoding", "gzip")],
        ),
        ("GET", "/assets/small.js", vec![]),
        ("GET", "/tiny.css", vec![]),
        ("GET", "/assets/app.js", vec![("Accept-Encoding", "gzip")]),
        (
            "GET",
            "/assets/app.js",
            vec![("Accept-Encoding", "gzip, br")],
        ),
        (
            "GET",
            "/assets/app.js",
            vec![("Accept-Encoding", "br;q=0.1, gzip")],
        ),
        ("HEAD", "/assets/app.js", vec![("Accept-Encoding", "br")]),
        (
            "GET",
            "/assets/app.js",
            vec![("Accept-Encoding", "gzip"), ("Range", "bytes=5-10")],
        ),
        (
            "GET",
            "/assets/app.js",
            vec![("Accept-Encoding", "gzip"), ("If-None-Match", &gz_etag)],
        ),
        ("GET", "/assets/app.js", vec![]),
        ("GET", "/page.html", vec![]),
        (
            "GET",
            "/big.bin",
            vec![("Accept-Encoding", "gzip, br, zstd")],
        ),
    ];
    // Compressed on the fly: hyper's path on both listeners.
    let hyper_cases: Vec<Case> = vec![
        ("GET", "/page.html", vec![("Accept-Encoding", "gzip")]),
        ("GET", "/assets/app.js", vec![("Accept-Encoding", "zstd")]),
    ];
    for (cases, fast_path) in [(&fast_cases, true), (&hyper_cases, false)] {
        for (method, path, extra) in cases.iter() {
            let mut request = format!("{method} {path} HTTP/1.1\r\nHost: t\r\n");
            for (k, v) in extra {
                request.push_str(&format!("{k}: {v}\r\n"));
            }
            request.push_str("Connection: close\r\n\r\n");
            let head_only = *method == "HEAD";
            let before = fast_count(addr);
            let mut tcp = TcpStream::connect(addr).unwrap();
            let fast = if fast_path {
                exchange(&mut tcp, &request, head_only)
            } else {
                // Chunked: read it all, the server closes.
                tcp.write_all(request.as_bytes()).unwrap();
                let mut all = Vec::new();
                tcp.read_to_end(&mut all).unwrap();
                let text = String::from_utf8_lossy(&all).into_owned();
                let head: Vec<String> = text
                    .split("\r\n\r\n")
                    .next()
                    .unwrap()
                    .split("\r\n")
                    .map(|l| {
                        if l.starts_with("date: ") {
                            "date: *".into()
                        } else {
                            l.into()
                        }
                    })
                    .collect();
                (head, Vec::new())
            };
            assert_eq!(
                fast_count(addr) - before,
                u64::from(fast_path),
                "{request}: {:?}",
                fast.0
            );
            let has = |line: &str| fast.0.iter().any(|l| l == line);
            assert!(
                has("x-content-type-options: nosniff"),
                "{request}: {:?}",
                fast.0
            );
            if path.starts_with("/assets/") {
                let immutable = "cache-control: public, max-age=31536000, immutable";
                assert!(has(immutable), "{request}: {:?}", fast.0);
            }
            if !fast_path {
                assert!(has("transfer-encoding: chunked"), "{request}: {:?}", fast.0);
                continue;
            }
            let reference = exchange(
                &mut UnixStream::connect(&sock).unwrap(),
                &request,
                head_only,
            );
            assert_eq!(fast.0, reference.0, "{request}");
            assert!(fast.1 == reference.1, "the bodies differ: {request}");
        }
    }
    // The sidecar itself, whole.
    let mut conn = Conn::tcp(addr).unwrap();
    let r = conn
        .request("GET", "/assets/app.js", &[("Accept-Encoding", "gzip")])
        .unwrap();
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    assert!(r.body == pattern(400 << 10, 5));
    drop(_baton);
    let _ = std::fs::remove_file(&sock);

    // Without sidecars, `Vary` comes from compression on the fly, after the configured
    // headers, on what it would compress for another client and on the 304s of such files.
    let (_baton, addr, sock) = start_both(
        &root,
        &["--precompressed", "false", "--add-header", "X-A: 1"],
    );
    let (lines, _) = exchange(
        &mut UnixStream::connect(&sock).unwrap(),
        "HEAD /page.html HTTP/1.1\r\nHost: t\r\n\r\n",
        true,
    );
    let etag = lines
        .iter()
        .find_map(|l| l.strip_prefix("etag: "))
        .unwrap()
        .to_owned();
    for request in [
        "GET /page.html HTTP/1.1\r\nHost: t\r\n\r\n".to_owned(),
        format!("GET /page.html HTTP/1.1\r\nHost: t\r\nIf-None-Match: {etag}\r\n\r\n"),
        "GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n".to_owned(),
        "GET /assets/small.js HTTP/1.1\r\nHost: t\r\n\r\n".to_owned(),
        "GET /tiny.css HTTP/1.1\r\nHost: t\r\n\r\n".to_owned(),
    ] {
        let before = fast_count(addr);
        let fast = exchange(&mut TcpStream::connect(addr).unwrap(), &request, false);
        assert_eq!(fast_count(addr) - before, 1, "{request}");
        let reference = exchange(&mut UnixStream::connect(&sock).unwrap(), &request, false);
        assert_eq!(fast.0, reference.0, "{request}");
        let varies = fast.0.iter().any(|l| l == "vary: accept-encoding");
        // What compression on the fly would compress for another client: not below its
        // minimum size, not a binary type.
        assert_eq!(
            varies,
            request.contains("page.html") || request.contains("small.js"),
            "{request}: {:?}",
            fast.0
        );
    }
    let _ = std::fs::remove_file(&sock);
}

// ---------------------------------------------------------------- whole bodies, timeouts ----

/// The fds of `pid` that lead to `file` (`/proc/PID/fd` links), deleted or not.
fn fds_of(pid: u32, file: &std::path::Path) -> Vec<String> {
    let file = file.to_string_lossy().into_owned();
    common::open_files(pid)
        .into_iter()
        .filter(|target| target.starts_with(&file))
        .collect()
}

#[test]
fn a_cached_file_goes_out_from_its_kept_fd_until_it_changes_or_is_deleted() {
    let dir = TempDir::new("sendfile-held");
    let root = dir.join("www");
    std::fs::create_dir_all(&root).unwrap();
    let file = root.join("held.bin");
    let live = root.join("live.bin");
    std::fs::write(&file, pattern(64 << 10, 1)).unwrap();
    std::fs::write(&live, pattern(20 << 10, 3)).unwrap();
    let (baton, addr) = start(&["--root", root.to_str().unwrap()]);
    let mut conn = Conn::tcp(addr).unwrap();
    let sent_before = sendfile_count(addr);
    let mut etag = None;
    for _ in 0..2 {
        let response = conn.get("/held.bin").unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(hash(&response.body), hash(&pattern(64 << 10, 1)));
        etag = response.header("etag").map(str::to_owned);
    }
    assert_eq!(sendfile_count(addr) - sent_before, 2, "both from the fd");
    assert_eq!(
        fds_of(baton.pid(), &file).len(),
        1,
        "the cache keeps one fd"
    );
    assert_eq!(conn.get("/live.bin").unwrap().status, 200);
    assert_eq!(fds_of(baton.pid(), &live).len(), 1);

    // Rewritten in place (the same inode, a new mtime and ctime): a new entry, with new
    // validators, in place of the old one and its fd.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .write_all(&pattern(64 << 10, 2))
        .unwrap();
    let response = conn.get("/held.bin").unwrap();
    assert_eq!(hash(&response.body), hash(&pattern(64 << 10, 2)));
    assert_ne!(
        response.header("etag").map(str::to_owned),
        etag,
        "new validators"
    );
    assert_eq!(
        fds_of(baton.pid(), &file).len(),
        1,
        "the old entry's fd is closed"
    );

    // Deleted: a later request, for any file, gets the fd closed, so that its disk space is
    // freed; the fd of a file still there stays.
    std::fs::remove_file(&file).unwrap();
    assert_eq!(conn.get("/held.bin").unwrap().status, 404);
    let released = wait_until(Duration::from_secs(10), || {
        assert_eq!(conn.get("/live.bin").unwrap().status, 200);
        fds_of(baton.pid(), &file).is_empty()
    });
    assert!(released, "still open: {:?}", fds_of(baton.pid(), &file));
    assert_eq!(
        fds_of(baton.pid(), &live).len(),
        1,
        "a live file's fd stays"
    );
    drop(conn);
    drop(baton);
}

#[test]
fn an_entry_hyper_filled_keeps_no_fd_and_the_fast_path_sends_its_copy() {
    let dir = TempDir::new("sendfile-hyper-entry");
    let root = TempDir(dir.join("www"));
    std::fs::create_dir_all(root.path()).unwrap();
    let file = root.join("mid.bin");
    std::fs::write(&file, pattern(64 << 10, 5)).unwrap();
    let (baton, addr, sock) = start_both(&root, &[]);
    let request = "GET /mid.bin HTTP/1.1\r\nHost: t\r\n\r\n";
    let (_, body) = exchange(&mut UnixStream::connect(&sock).unwrap(), request, false);
    assert_eq!(hash(&body), hash(&pattern(64 << 10, 5)));
    assert!(
        fds_of(baton.pid(), &file).is_empty(),
        "only the fast path uses a kept fd"
    );
    let (fast, sent) = (fast_count(addr), sendfile_count(addr));
    let (_, body) = exchange(&mut TcpStream::connect(addr).unwrap(), request, false);
    assert_eq!(hash(&body), hash(&pattern(64 << 10, 5)));
    assert_eq!(fast_count(addr) - fast, 1);
    assert_eq!(
        sendfile_count(addr) - sent,
        0,
        "from the entry's copy in memory"
    );
    drop(baton);
}

#[test]
fn a_64_mib_download_arrives_byte_identical() {
    let root = TempDir::new("sendfile-64m");
    let body = pattern(64 << 20, 3);
    std::fs::write(root.join("big.bin"), &body).unwrap();
    let (_baton, addr) = start(&["--root", root.path().to_str().unwrap()]);
    let r = http::get(addr, "/big.bin").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), body.len());
    assert_eq!(hash(&r.body), hash(&body), "the body differs");
    assert_eq!(sendfile_count(addr), 1);
}

#[test]
fn a_cold_file_is_read_ahead_and_sent_whole() {
    let root = TempDir::new("sendfile-cold");
    let body = pattern(16 << 20, 13);
    let path = root.join("cold.bin");
    std::fs::write(&path, &body).unwrap();
    let (_baton, addr) = start(&["--root", root.path().to_str().unwrap()]);
    // Written back and dropped from the page cache (clean pages go; a file system that keeps
    // them makes this an ordinary download).
    let file = std::fs::File::open(&path).unwrap();
    file.sync_all().unwrap();
    nix::fcntl::posix_fadvise(
        &file,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .unwrap();
    let r = http::get(addr, "/cold.bin").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(hash(&r.body), hash(&body), "the body differs");
    assert_eq!(sendfile_count(addr), 1);
}

#[test]
fn a_slow_reader_that_makes_progress_is_not_cut() {
    let root = TempDir::new("sendfile-slow");
    let body = pattern(8 << 20, 4);
    std::fs::write(root.join("big.bin"), &body).unwrap();
    let (_baton, addr) = start(&[
        "--root",
        root.path().to_str().unwrap(),
        "--send-timeout",
        "1s",
    ]);
    let (mut conn, len) = http::start_download(addr, "/big.bin");
    assert_eq!(len, body.len());
    // Small pieces with pauses: about 5 s in all, five times the send timeout.
    let t = Instant::now();
    let mut got = Vec::with_capacity(len);
    while got.len() < len {
        std::thread::sleep(Duration::from_millis(100));
        let n = (160 << 10).min(len - got.len());
        got.extend(conn.read_body(n).expect("cut off while reading"));
    }
    assert!(t.elapsed() > Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(hash(&got), hash(&body), "the body differs");
    // Still good for another request, nothing timed out, and it was the fast path.
    assert_eq!(counter(&mut conn, "baton_send_timeouts_total"), 0);
    assert_eq!(counter(&mut conn, "baton_sendfile_responses_total"), 1);
}

#[test]
fn a_client_that_never_reads_is_closed_by_the_send_timeout() {
    let root = TempDir::new("sendfile-stall");
    std::fs::write(root.join("big.bin"), pattern(64 << 20, 5)).unwrap();
    let (_baton, addr) = start(&[
        "--root",
        root.path().to_str().unwrap(),
        "--send-timeout",
        "1s",
    ]);
    let (stalled, len) = http::start_download(addr, "/big.bin");
    let mut watcher = Conn::tcp(addr).unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || counter(
            &mut watcher,
            "baton_send_timeouts_total"
        ) == 1),
        "no send timeout counted"
    );
    assert_eq!(counter(&mut watcher, "baton_sendfile_responses_total"), 1);
    // Reading now finds the end of the connection (a close or a reset) before the whole body.
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    let mut stream = stalled.stream();
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    assert!(got < len, "the whole body arrived after the send timeout");
}

/// A connection whose receive buffer is as small as the kernel allows, set before the connect
/// so that the window it offers is small from the start: the server's writes soon block.
fn tiny_window(addr: SocketAddr) -> TcpStream {
    use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::os::fd::AsRawFd;
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    // The kernel raises it to its minimum (a few KiB).
    socket::setsockopt(&fd, sockopt::RcvBuf, &1).unwrap();
    let SocketAddr::V4(v4) = addr else {
        panic!("{addr} is not IPv4")
    };
    socket::connect(fd.as_raw_fd(), &SockaddrIn::from(v4)).unwrap();
    TcpStream::from(fd)
}

#[test]
fn a_client_that_never_reads_cached_files_is_closed_by_the_send_timeout() {
    // The two ways a cached file leaves: under 16 KiB from memory, larger from its kept fd.
    let root = TempDir::new("sendfile-stall-cached");
    std::fs::write(root.join("small.bin"), pattern(12 << 10, 21)).unwrap();
    std::fs::write(root.join("kept.bin"), pattern(200 << 10, 22)).unwrap();
    let (baton, addr) = start(&[
        "--root",
        root.path().to_str().unwrap(),
        "--send-timeout",
        "1s",
    ]);
    let mut watcher = Conn::tcp(addr).unwrap();
    for (cut, path, size, sendfile) in [
        (1, "/small.bin", 12 << 10, false),
        (2, "/kept.bin", 200 << 10, true),
    ] {
        // Cached by a first request; the larger one keeps its fd open, the smaller one not.
        assert_eq!(http::get(addr, path).unwrap().status, 200);
        let held = common::open_files(baton.pid())
            .iter()
            .any(|target| target.ends_with(path));
        assert_eq!(held, sendfile, "{path}: fd kept open: {held}");
        let fast = counter(&mut watcher, "baton_fast_path_responses_total");
        let sent = counter(&mut watcher, "baton_sendfile_responses_total");
        // A thousand pipelined requests, far more than the socket buffers hold (4 MiB at
        // most on the sending side), and not a byte read.
        let mut stalled = tiny_window(addr);
        let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
        stalled.write_all(request.repeat(1000).as_bytes()).unwrap();
        assert!(
            wait_until(Duration::from_secs(15), || counter(
                &mut watcher,
                "baton_send_timeouts_total"
            ) == cut),
            "{path}: no send timeout counted"
        );
        // The fast path wrote them, from memory or from the kept fd.
        assert!(counter(&mut watcher, "baton_fast_path_responses_total") > fast);
        let sendfiles = counter(&mut watcher, "baton_sendfile_responses_total") - sent;
        assert_eq!(
            sendfiles > 0,
            sendfile,
            "{path}: {sendfiles} sent with sendfile"
        );
        // Reading now finds the end of the connection (a close or a reset) before the
        // thousandth answer.
        let got =
            http::read_until_closed(&mut stalled, Duration::from_secs(10)).unwrap_or_else(|e| {
                panic!("{path}: the connection is still open after its send timeout: {e}")
            });
        assert!(
            got < 1000 * size,
            "{path}: every answer arrived after the send timeout"
        );
    }
}

// ---------------------------------------------------------------- connection phases ----

#[test]
fn header_time_and_idle_time_are_kept_apart_on_the_fast_path() {
    let root = TempDir::new("sendfile-phases");
    let big = pattern(1 << 20, 14);
    std::fs::write(root.join("big.bin"), &big).unwrap();
    let (_baton, addr) = start(&[
        "--root",
        root.path().to_str().unwrap(),
        "--header-read-timeout",
        "300ms",
        "--idle-timeout",
        "30s",
    ]);
    // A slowloris and a silent client are cut at the header timeout.
    let mut partial = Conn::tcp(addr).unwrap();
    partial
        .write_raw(b"GET /big.bin HTTP/1.1\r\nHost: t\r\n")
        .unwrap();
    let mut silent = Conn::tcp(addr).unwrap();
    let t = Instant::now();
    partial.expect_close().unwrap();
    silent.expect_close().unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    // Idle between two fast-path requests for longer than the header timeout: not cut.
    let mut conn = Conn::tcp(addr).unwrap();
    assert_eq!(hash(&conn.get("/big.bin").unwrap().body), hash(&big));
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(hash(&conn.get("/big.bin").unwrap().body), hash(&big));
    assert_eq!(counter(&mut conn, "baton_sendfile_responses_total"), 2);
}

#[test]
fn an_idle_fast_path_connection_is_closed_at_the_idle_timeout_or_for_room() {
    let root = TempDir::new("sendfile-idle");
    let big = pattern(1 << 20, 15);
    std::fs::write(root.join("big.bin"), &big).unwrap();
    let root_arg = root.path().to_str().unwrap();
    let (_baton, addr) = start(&["--root", root_arg, "--idle-timeout", "300ms"]);
    let mut conn = Conn::tcp(addr).unwrap();
    assert_eq!(hash(&conn.get("/big.bin").unwrap().body), hash(&big));
    let t = Instant::now();
    conn.expect_close().unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );

    // At the limit, the idle fast-path connection makes room for a new client.
    let (_baton, addr) = start(&[
        "--root",
        root_arg,
        "--max-connections",
        "1",
        "--idle-timeout",
        "60s",
    ]);
    let mut idle = Conn::tcp(addr).unwrap();
    assert_eq!(hash(&idle.get("/big.bin").unwrap().body), hash(&big));
    let mut fresh = Conn::tcp(addr).unwrap();
    fresh
        .stream()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let r = fresh
        .get("/big.bin")
        .expect("the new client was not served");
    assert_eq!(hash(&r.body), hash(&big));
    idle.expect_close()
        .expect("the idle connection was not closed cleanly");
    assert_eq!(counter(&mut fresh, "baton_idle_closed_for_room_total"), 1);
}

// ---------------------------------------------------------------- files changing ----

#[test]
fn a_file_truncated_while_sent_ends_the_connection_with_a_short_body() {
    let root = TempDir::new("sendfile-truncate");
    let body = pattern(64 << 20, 6);
    std::fs::write(root.join("big.bin"), &body).unwrap();
    let (baton, addr) = start(&["--root", root.path().to_str().unwrap()]);
    // A raw socket: every byte that arrives is counted, none left in a client's buffer.
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
        .write_all(b"GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut all = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    while all.len() < 1 << 20 {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed early");
        all.extend_from_slice(&buf[..n]);
    }
    // Truncate to 2 MiB: what was already sent stays as it was, the rest is gone.
    std::fs::OpenOptions::new()
        .write(true)
        .open(root.join("big.bin"))
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    stream
        .read_to_end(&mut all)
        .expect("a clean end of the connection (no reset, no hang)");
    let head_end = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&all[..head_end]).into_owned();
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(len, body.len());
    let got = &all[head_end..];
    assert!(got.len() < len, "a body of the full length: padded");
    assert!(
        got.len() >= 2 << 20,
        "less than the file still has: {}",
        got.len()
    );
    assert!(
        got[..] == body[..got.len()],
        "the bytes sent differ from the file"
    );
    baton
        .stderr
        .wait_for("event=\"file_truncated\"", Duration::from_secs(5))
        .expect("the fast path saw the file end early");
}

#[test]
fn a_file_replaced_while_sent_is_sent_whole_as_it_was() {
    let root = TempDir::new("sendfile-replace");
    let old = pattern(32 << 20, 7);
    let new = pattern(32 << 20, 8);
    std::fs::write(root.join("big.bin"), &old).unwrap();
    let (_baton, addr) = start(&["--root", root.path().to_str().unwrap()]);
    let (mut conn, len) = http::start_download(addr, "/big.bin");
    let mut got = conn.read_body(1 << 20).unwrap();
    std::fs::write(root.join("big.bin.tmp"), &new).unwrap();
    std::fs::rename(root.join("big.bin.tmp"), root.join("big.bin")).unwrap();
    got.extend(conn.read_body(len - got.len()).unwrap());
    assert_eq!(hash(&got), hash(&old), "not the old content, whole");
    // The same connection then gets the new file.
    let r = conn.get("/big.bin").unwrap();
    assert_eq!(hash(&r.body), hash(&new), "not the new content");
}

// ---------------------------------------------------------------- keep-alive across paths ----

#[test]
fn keep_alive_serves_large_then_small_requests_on_one_connection() {
    let root = TempDir::new("sendfile-keepalive");
    let big = pattern(4 << 20, 9);
    std::fs::write(root.join("big.bin"), &big).unwrap();
    std::fs::write(root.join("small.txt"), "small\n").unwrap();
    let (_baton, addr) = start(&["--root", root.path().to_str().unwrap()]);
    let mut conn = Conn::tcp(addr).unwrap();
    let r = conn.get("/big.bin").unwrap();
    assert_eq!((r.status, hash(&r.body)), (200, hash(&big)));
    let r = conn
        .request("GET", "/big.bin", &[("Range", "bytes=10-19")])
        .unwrap();
    assert_eq!((r.status, &r.body[..]), (206, &big[10..20]));
    let r = conn.get("/small.txt").unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "small\n"));
    let r = conn.get("/-/healthy").unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
    // hyper serves the rest of the connection, large files too.
    let r = conn.get("/big.bin").unwrap();
    assert_eq!((r.status, hash(&r.body)), (200, hash(&big)));
    assert_eq!(counter(&mut conn, "baton_sendfile_responses_total"), 2);
    // The small file came from memory.
    assert_eq!(counter(&mut conn, "baton_fast_path_responses_total"), 3);

    // Pipelined: two large requests and a small one in one write, answered in order.
    let mut conn = Conn::tcp(addr).unwrap();
    conn.write_raw(
        b"GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\nHEAD /big.bin HTTP/1.1\r\nHost: t\r\n\r\n\
          GET /small.txt HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    .unwrap();
    let r = conn.read_response(false).unwrap();
    assert_eq!((r.status, hash(&r.body)), (200, hash(&big)));
    let r = conn.read_response(true).unwrap();
    assert_eq!(r.status, 200);
    let r = conn.read_response(false).unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "small\n"));
    // The HEAD sent no body.
    assert_eq!(counter(&mut conn, "baton_sendfile_responses_total"), 3);
    assert_eq!(counter(&mut conn, "baton_fast_path_responses_total"), 6);
}

// ---------------------------------------------------------------- drain and upgrade ----

#[test]
fn a_drain_lets_large_downloads_finish_and_closes_keep_alive_clients_cleanly() {
    let root = TempDir::new("sendfile-drain");
    let big = pattern(64 << 20, 10);
    let mid = pattern(1 << 20, 11);
    std::fs::write(root.join("big.bin"), &big).unwrap();
    std::fs::write(root.join("mid.bin"), &mid).unwrap();
    let (mut baton, addr) = start(&[
        "--root",
        root.path().to_str().unwrap(),
        "--drain-timeout",
        "20s",
    ]);
    let (mut download, len) = http::start_download(addr, "/big.bin");
    let mut received = download.read_body(1 << 20).unwrap();

    // Keep-alive clients fetching a 1 MiB file over the fast path in a loop: each ends with an
    // answer that says Connection: close, then a clean close.
    const CLIENTS: usize = 4;
    let answered = Arc::new(AtomicUsize::new(0));
    let mid = Arc::new(mid);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (answered, mid) = (answered.clone(), mid.clone());
            std::thread::spawn(move || -> Result<usize, String> {
                let mut conn = Conn::tcp(addr).map_err(|e| e.to_string())?;
                let mut n = 0;
                loop {
                    let r = conn
                        .get("/mid.bin")
                        .map_err(|e| format!("request {n} failed: {e}"))?;
                    if r.status != 200 || r.body[..] != mid[..] {
                        return Err(format!("status {} or a wrong body", r.status));
                    }
                    n += 1;
                    answered.fetch_add(1, Ordering::SeqCst);
                    if r.closes() {
                        conn.expect_close()
                            .map_err(|e| format!("after Connection: close: {e}"))?;
                        return Ok(n);
                    }
                }
            })
        })
        .collect();
    assert!(wait_until(Duration::from_secs(10), || answered
        .load(Ordering::SeqCst)
        > CLIENTS * 10));
    baton.signal(Signal::SIGTERM);
    for client in clients {
        let n = client
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("client: {e}"));
        assert!(n > 1);
    }
    // The download in flight goes on to its last byte, then the connection ends cleanly.
    received.extend(download.read_body(len - received.len()).unwrap());
    assert_eq!(hash(&received), hash(&big), "the body arrived damaged");
    download.expect_close().unwrap();
    assert!(baton.wait_exit(EXIT_TIMEOUT).unwrap().success());
    assert!(
        baton.stderr.text().contains("0 closed at the deadline"),
        "{}",
        baton.stderr.text()
    );
}

#[test]
fn an_upgrade_with_large_downloads_in_flight_loses_none() {
    let root = TempDir::new("sendfile-upgrade");
    let big = Arc::new(pattern(32 << 20, 12));
    std::fs::write(root.join("big.bin"), &big[..]).unwrap();
    let (baton, addr) = common::start_generation(
        &[
            "--root",
            root.path().to_str().unwrap(),
            "--drain-timeout",
            "30s",
        ],
        &[],
    );
    let old = baton.pid();
    // Three downloads under way, read slowly so that they outlast the handoff and the idle
    // grace (1 s). Once the last byte is out, the old generation passes each connection on:
    // the next request on it is the new generation's.
    let new_pid = Arc::new(OnceLock::<u32>::new());
    let downloads: Vec<_> = (0..3)
        .map(|_| {
            let (mut conn, len) = http::start_download(addr, "/big.bin");
            let first = conn.read_body(1 << 20).unwrap();
            let (big, new_pid) = (big.clone(), new_pid.clone());
            std::thread::spawn(move || {
                let mut got = first;
                while got.len() < len {
                    std::thread::sleep(Duration::from_millis(50));
                    let n = (1 << 20).min(len - got.len());
                    got.extend(conn.read_body(n).expect("cut off"));
                }
                assert_eq!(hash(&got), hash(&big), "a download arrived damaged");
                let v = conn
                    .get("/-/version")
                    .expect("the connection was not passed on");
                assert!(!v.closes(), "{:?}", v.headers);
                assert_eq!(v.json()["pid"].as_u64(), Some(*new_pid.wait() as u64));
            })
        })
        .collect();
    let (code, out, err) = run_baton(&["reload", "--pid", &old.to_string()]);
    assert_eq!(code, 0, "reload failed: {err}");
    let new = common::reload_new_pid(&out);
    new_pid.set(new).unwrap();
    // New downloads go to the new generation, over its fast path.
    let r = http::get(addr, "/big.bin").unwrap();
    assert_eq!(hash(&r.body), hash(&big));
    for d in downloads {
        d.join().expect("a download failed");
    }
    let status = reaper::wait_exit(old, EXIT_TIMEOUT).expect("the old generation did not exit");
    assert!(status.success(), "{status:?}");
    common::stop_and_wait_exit(new, EXIT_TIMEOUT);
    drop(baton);
}

#[test]
fn a_connection_the_new_generation_cannot_take_any_more_drains_in_the_old_one() {
    let root = TempDir::new("pass-on-rollback");
    let (big, small) = (pattern(32 << 20, 14), pattern(1000, 15));
    std::fs::write(root.join("big.bin"), &big).unwrap();
    std::fs::write(root.join("small.bin"), &small).unwrap();
    let (baton, addr) = common::start_generation(
        &[
            "--root",
            root.path().to_str().unwrap(),
            "--drain-timeout",
            "30s",
            "--upgrade-probation",
            "60s",
        ],
        &[],
    );
    let old = baton.pid();
    let (mut download, len) = http::start_download(addr, "/big.bin");
    let mut got = download.read_body(1 << 20).unwrap();
    let (code, out, err) = run_baton(&["reload", "--pid", &old.to_string()]);
    assert_eq!(code, 0, "reload failed: {err}");
    let new = common::reload_new_pid(&out);
    // The new generation dies on probation: the old one serves again, and the download it
    // still sends can no longer be passed on once its last byte is out.
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(new as i32), Signal::SIGKILL);
    assert!(wait_until(Duration::from_secs(10), || {
        http::get(addr, "/-/version").is_ok_and(|r| r.json()["pid"].as_u64() == Some(old as u64))
    }));
    got.extend(download.read_body(len - got.len()).unwrap());
    assert_eq!(hash(&got), hash(&big), "the download arrived damaged");
    // So the old generation answers the next request itself, on the fast path, as any drain
    // does.
    let r = download.get("/small.bin").expect("the connection was lost");
    assert!(r.body == small, "a wrong body");
    assert!(r.closes(), "{:?}", r.headers);
    download.expect_close().unwrap();
    baton
        .stderr
        .expect_line("upgrade to generation 2 rolled back", EXIT_TIMEOUT);
    common::stop_and_wait_exit(old, EXIT_TIMEOUT);
    drop(baton);
}

/// The bytes the kernel holds unread on the server's end of the connection from `client` (an
/// IPv4 loopback connection to `server`), from /proc/net/tcp.
fn server_unread(server: SocketAddr, client: SocketAddr) -> Option<u64> {
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(a) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(a.ip().octets()),
            a.port()
        ),
        SocketAddr::V6(_) => unreachable!("IPv4 loopback only"),
    };
    let (local, remote) = (hex(server), hex(client));
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) != Some(&local.as_str()) || fields.get(2) != Some(&remote.as_str()) {
            return None;
        }
        let queues = fields.get(4)?;
        u64::from_str_radix(queues.split(':').nth(1)?, 16).ok()
    })
}

#[test]
fn an_upgrade_passes_keep_alive_connections_on_without_a_reconnect() {
    let root = TempDir::new("pass-on");
    let small = pattern(1000, 13);
    std::fs::write(root.join("small.bin"), &small).unwrap();
    let (baton, addr) = common::start_generation(
        &[
            "--root",
            root.path().to_str().unwrap(),
            "--drain-timeout",
            "30s",
            "--header-read-timeout",
            "1s",
        ],
        &[],
    );
    let old = baton.pid();
    // Idle keep-alive connections, each after one answer from the fast path.
    let mut idle: Vec<Conn<TcpStream>> = (0..8)
        .map(|_| {
            let mut conn = Conn::tcp(addr).unwrap();
            let r = conn.get("/small.bin").unwrap();
            assert!(r.body == small && !r.closes());
            conn
        })
        .collect();
    // One that has sent half of its next request, which the old generation has read: it goes
    // over with those bytes.
    let mut half = Conn::tcp(addr).unwrap();
    assert!(half.get("/small.bin").unwrap().body == small);
    half.write_raw(b"GET /-/version HTTP/1.1\r\nHo").unwrap();
    let client = half.stream().local_addr().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || server_unread(addr, client)
            == Some(0)),
        "the old generation did not read the half request"
    );
    // One that hyper serves (it asked for an endpoint): it stays and drains in the old one.
    let mut on_hyper = Conn::tcp(addr).unwrap();
    assert!(!on_hyper.get("/-/version").unwrap().closes());

    let (code, out, err) = run_baton(&["reload", "--pid", &old.to_string()]);
    assert_eq!(code, 0, "reload failed: {err}");
    let new = common::reload_new_pid(&out);
    half.write_raw(b"st: t\r\n\r\n").unwrap();
    let v = half
        .read_response(false)
        .expect("the half request was lost");
    assert_eq!(v.json()["pid"].as_u64(), Some(new as u64));
    // Closed cleanly after the idle grace (1 s), not kept to the drain's deadline (30 s).
    let before = Instant::now();
    on_hyper.expect_close().unwrap();
    assert!(
        before.elapsed() < Duration::from_secs(10),
        "{:?}",
        before.elapsed()
    );
    let status = reaper::wait_exit(old, EXIT_TIMEOUT).expect("the old generation did not exit");
    assert!(status.success(), "{status:?}");
    // The old generation's last lines may still be on their way through the pipe that the
    // new generation shares.
    for line in [
        "drained 10 connection(s) in ",
        "9 passed on to the next generation, 0 closed at the deadline",
    ] {
        baton.stderr.expect_line(line, EXIT_TIMEOUT);
    }
    let log = baton.stderr.text();
    // The drain lasted the idle grace (1 s) of the connection hyper serves, not the drain's
    // timeout.
    let took = log
        .split("drained 10 connection(s) in ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("no drain in the log: {log}"));
    let ms = |number: &str, per_ms: f64| number.parse::<f64>().ok().map(|n| n / per_ms);
    let took_ms = None
        .or_else(|| ms(took.strip_suffix("ns")?, 1e6))
        .or_else(|| ms(took.strip_suffix("µs")?, 1e3))
        .or_else(|| ms(took.strip_suffix("ms")?, 1.0))
        .or_else(|| ms(took.strip_suffix('s')?, 1e-3))
        .unwrap_or_else(|| panic!("a drain time of {took:?}"));
    assert!(took_ms < 5000.0, "the drain took {took}");

    // The same connections, no reconnect: the new generation answers on them, the idle ones
    // after the header timeout (1 s), which only a request in progress is bound by.
    std::thread::sleep(Duration::from_millis(1500));
    for conn in &mut idle {
        let v = conn
            .get("/-/version")
            .expect("an idle connection was not passed on");
        assert!(!v.closes(), "{:?}", v.headers);
        assert_eq!(v.json()["pid"].as_u64(), Some(new as u64));
        let r = conn.get("/small.bin").unwrap();
        assert!(r.body == small && !r.closes());
    }
    let mut metrics = Conn::tcp(addr).unwrap();
    assert_eq!(counter(&mut metrics, "baton_connections_adopted_total"), 9);
    assert_eq!(
        counter(&mut metrics, "baton_connections_passed_on_total"),
        0
    );

    common::stop_and_wait_exit(new, EXIT_TIMEOUT);
    // A stop passes nothing on: the connections end cleanly.
    for conn in &mut idle {
        conn.expect_close().unwrap();
    }
    drop(baton);
}

/// A connection on a listener that the new configuration no longer has is passed on all the
/// same, and served as the new configuration would serve a listener of that name: here, beside
/// an admin listener, its files and the public endpoints, not the others.
#[test]
fn a_connection_on_a_listener_the_new_configuration_drops_is_passed_on() {
    reaper::init();
    let root = TempDir::new("pass-on-dropped");
    let small = pattern(1000, 17);
    std::fs::write(root.join("small.bin"), &small).unwrap();
    let etc = TempDir::new("pass-on-dropped-etc");
    let config = etc.join("baton.toml");
    let (web, admin, other) = (free_port(), free_port(), free_port());
    let write_config = |listeners: &[(&str, u16)]| {
        let listen: Vec<String> = listeners
            .iter()
            .map(|(name, port)| format!("\"{name}=127.0.0.1:{port}\""))
            .collect();
        std::fs::write(
            &config,
            format!(
                "[server]\nroot = {:?}\nlisten = [{}]\n",
                root.path(),
                listen.join(", ")
            ),
        )
        .unwrap();
    };
    write_config(&[("http", web), ("admin", admin), ("other", other)]);
    let mut baton = Spawn::serve(&[
        "--config",
        config.to_str().unwrap(),
        "--upgrade-probation",
        "0s",
    ])
    .start();
    baton.wait_ready();
    let old = baton.pid();
    let other_addr: SocketAddr = format!("127.0.0.1:{other}").parse().unwrap();
    let mut conn = Conn::tcp(other_addr).unwrap();
    assert!(conn.get("/small.bin").unwrap().body == small);

    write_config(&[("http", web), ("admin", admin)]);
    let new = common::reload_and_wait_exit(old, EXIT_TIMEOUT);
    // The old generation's last lines may still be on their way through the pipe that the
    // new generation shares: waited for, not read at once.
    baton
        .stderr
        .expect_line("1 passed on to the next generation", EXIT_TIMEOUT);

    assert!(
        conn.get("/small.bin")
            .expect("the passed-on connection broke")
            .body
            == small
    );
    assert_eq!(conn.get("/-/healthy").unwrap().status, 200);
    assert_eq!(
        conn.get("/-/version").unwrap().status,
        404,
        "only the admin listener answers it"
    );
    let admin_addr: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let version = http::get(admin_addr, "/-/version").unwrap();
    assert_eq!(version.json()["pid"].as_u64(), Some(new as u64));
    // The dropped listener's socket is closed in the new generation.
    assert!(
        Conn::tcp(other_addr).is_err(),
        "the dropped listener still accepts"
    );
    common::stop_and_wait_exit(new, EXIT_TIMEOUT);
}
