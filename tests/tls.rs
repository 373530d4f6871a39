//! TLS on real processes and sockets, with a throw-away CA made here (rcgen): HTTPS GET and
//! ranges with `curl --cacert`, ALPN choosing h2 or http/1.1, each bad certificate refused by
//! `baton check` and by a reload (the old generation serving on), a key from
//! `$CREDENTIALS_DIRECTORY`, and a certificate swapped on disk then reloaded under HTTPS load:
//! the new one served (its serial checked), no request failed; clients that stall in the
//! handshake (silent, half a record, a byte at a time) cut at the header timeout; a request
//! hyper rejects over TLS in the access log with its request line; and a plain
//! keep-alive connection passed on by an upgrade that gives its listener TLS stays plain.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{reaper, run, run_baton, start_generation, TempDir};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, SanType,
    SerialNumber,
};

const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// A CA, its PEM, and what it signs.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "baton test CA");
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A certificate for localhost and 127.0.0.1 with this serial, valid between the two years:
    /// (certificate PEM, key PEM).
    fn leaf(&self, serial: u8, valid: (i32, i32)) -> (String, String) {
        self.leaf_for("localhost", serial, valid)
    }

    /// The same for the DNS name `host` (and 127.0.0.1).
    fn leaf_for(&self, host: &str, serial: u8, valid: (i32, i32)) -> (String, String) {
        let mut params = CertificateParams::new(vec![host.to_owned()]).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, host);
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.serial_number = Some(SerialNumber::from(vec![serial]));
        params.not_before = rcgen::date_time_ymd(valid.0, 1, 1);
        params.not_after = rcgen::date_time_ymd(valid.1, 1, 1);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

const VALID: (i32, i32) = (2020, 2099);

/// A root to serve, a CA, and a certificate with serial 1 written to `cert.pem`/`key.pem`.
struct Setup {
    dir: TempDir,
    ca: Ca,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        reaper::init();
        let dir = TempDir::new(tag);
        std::fs::create_dir_all(dir.join("www")).unwrap();
        std::fs::write(dir.join("www/a.txt"), "hello over TLS\n").unwrap();
        let ca = Ca::new();
        std::fs::write(dir.join("ca.pem"), &ca.pem).unwrap();
        let setup = Setup { dir, ca };
        setup.certificate(1, VALID);
        setup
    }

    /// Writes a new certificate (and key) over `cert.pem` and `key.pem`.
    fn certificate(&self, serial: u8, valid: (i32, i32)) {
        let (cert, key) = self.ca.leaf(serial, valid);
        // Renamed into place, as certbot's symlinks change at once.
        for (name, pem) in [("cert.pem", cert), ("key.pem", key)] {
            let tmp = self.dir.join(&format!("{name}.new"));
            std::fs::write(&tmp, pem).unwrap();
            std::fs::rename(&tmp, self.dir.join(name)).unwrap();
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes `baton.toml`: the root, and `tls` as the `[tls.http]` table's body.
    fn config(&self, tls: &str) -> PathBuf {
        let path = self.path("baton.toml");
        let text = format!(
            "[server]\nroot = {:?}\n[tls.http]\n{tls}\n",
            self.path("www")
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn good_config(&self) -> PathBuf {
        self.config(&format!(
            "cert = {:?}\nkey = {:?}\n",
            self.path("cert.pem"),
            self.path("key.pem")
        ))
    }

    /// `curl` over HTTPS to localhost at `addr`: (HTTP version, status, body).
    fn curl(&self, addr: SocketAddr, args: &[&str], path: &str) -> (String, u16, Vec<u8>) {
        let body = self.path("body");
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "10", "--cacert"])
            .arg(self.path("ca.pem"))
            .arg("--resolve")
            .arg(format!("localhost:{}:127.0.0.1", addr.port()))
            .args([
                "-o",
                body.to_str().unwrap(),
                "-w",
                "%{http_version} %{http_code}",
            ])
            .args(args)
            .arg(format!("https://localhost:{}{path}", addr.port()));
        let (code, out, err) = run(cmd);
        assert_eq!(code, 0, "curl {args:?} {path}: {err}");
        let (version, status) = out.trim().split_once(' ').unwrap();
        (
            version.to_owned(),
            status.parse().unwrap(),
            std::fs::read(&body).unwrap(),
        )
    }
}

/// The serial number of the certificate `addr` presents, as openssl prints it.
fn served_serial(addr: SocketAddr) -> String {
    serial_for(addr, "localhost")
}

/// The same for a client that asks for `host` (SNI).
fn serial_for(addr: SocketAddr, host: &str) -> String {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!(
        "openssl s_client -connect 127.0.0.1:{} -servername {host} </dev/null 2>/dev/null \
         | openssl x509 -noout -serial",
        addr.port()
    ));
    run(cmd).1.trim().to_owned()
}

#[test]
fn sni_chooses_the_certificate_of_the_host_asked_for() {
    let setup = Setup::new("tls-sni");
    for (name, host, serial) in [("other", "other.test", 7), ("wild", "*.wild.test", 8)] {
        let (cert, key) = setup.ca.leaf_for(host, serial, VALID);
        std::fs::write(setup.path(&format!("{name}.pem")), cert).unwrap();
        std::fs::write(setup.path(&format!("{name}.key")), key).unwrap();
    }
    let p = |name: &str| format!("{:?}", setup.path(name));
    let config = setup.config(&format!(
        "cert = {}\nkey = {}\nsni = [{{ cert = {}, key = {} }}, {{ cert = {}, key = {} }}]\n",
        p("cert.pem"),
        p("key.pem"),
        p("other.pem"),
        p("other.key"),
        p("wild.pem"),
        p("wild.key"),
    ));
    let (_baton, addr) = start_generation(&["--config", config.to_str().unwrap()], &[]);
    assert_eq!(serial_for(addr, "other.test"), "serial=07");
    assert_eq!(serial_for(addr, "www.wild.test"), "serial=08");
    assert_eq!(
        serial_for(addr, "a.b.wild.test"),
        "serial=01",
        "a wildcard is one label"
    );
    assert_eq!(serial_for(addr, "unknown.test"), "serial=01");
    assert_eq!(served_serial(addr), "serial=01");
}

#[test]
fn clients_that_stall_in_the_handshake_are_cut_at_the_header_timeout() {
    let setup = Setup::new("tls-stall");
    let config = setup.good_config();
    let (_baton, addr) = start_generation(
        &[
            "--config",
            config.to_str().unwrap(),
            "--header-read-timeout",
            "1s",
        ],
        &[],
    );
    // One says nothing; one sends the start of a handshake record (announcing 512 bytes) and
    // stops; one trickles a byte every 100 ms into a record announced as 16 KiB, which it never
    // finishes: progress alone must not keep a handshake alive.
    let started = Instant::now();
    let mut silent = TcpStream::connect(addr).unwrap();
    let mut partial = TcpStream::connect(addr).unwrap();
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    let mut trickle = TcpStream::connect(addr).unwrap();
    trickle.write_all(&[0x16, 0x03, 0x01, 0x40, 0x00]).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (mut out, stop) = (trickle.try_clone().unwrap(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) && out.write_all(&[0x01]).is_ok() {
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    // Still open well before the timeout: cut by the timer, not refused on sight (none of them
    // sent anything wrong yet). The server is never early; a slow machine only makes it late.
    std::thread::sleep(Duration::from_millis(300));
    for (name, stream) in [
        ("silent", &silent),
        ("partial", &partial),
        ("trickling", &trickle),
    ] {
        stream.set_nonblocking(true).unwrap();
        let r = (&*stream).read(&mut [0u8; 64]);
        assert!(
            matches!(&r, Err(e) if e.kind() == ErrorKind::WouldBlock),
            "the {name} client was cut {:?} after it connected, before the 1 s header timeout: {r:?}",
            started.elapsed()
        );
        stream.set_nonblocking(false).unwrap();
    }
    for (name, stream) in [
        ("silent", &mut silent),
        ("partial", &mut partial),
        ("trickling", &mut trickle),
    ] {
        // (An alert before the close, if rustls sends one, is read and dropped.)
        assert!(
            common::http::read_until_closed(stream, Duration::from_secs(10)).is_ok(),
            "the {name} client was not cut within 10 s of a 1 s header timeout"
        );
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    // Counted as failed handshakes (just after each close), and the listener serves on.
    let failed = || {
        let (_, status, text) = setup.curl(addr, &["--http1.1"], "/-/metrics");
        assert_eq!(status, 200);
        let text = String::from_utf8(text).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("baton_tls_handshakes_total{result=\"failed\"} "))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no failed handshakes counted in:\n{text}"))
    };
    assert!(
        common::wait_until(Duration::from_secs(10), || failed() >= 3),
        "{} failed handshakes counted",
        failed()
    );
    let (_, status, body) = setup.curl(addr, &["--http1.1"], "/a.txt");
    assert_eq!(
        (status, body.as_slice()),
        (200, b"hello over TLS\n".as_slice())
    );
}

#[test]
fn https_get_ranges_and_alpn() {
    let setup = Setup::new("tls-get");
    let config = setup.good_config();
    let (_baton, addr) = start_generation(&["--config", config.to_str().unwrap()], &[]);
    let (version, status, body) = setup.curl(addr, &["--http1.1"], "/a.txt");
    assert_eq!((version.as_str(), status), ("1.1", 200));
    assert_eq!(body, b"hello over TLS\n");
    let (version, status, body) = setup.curl(addr, &["--http2"], "/a.txt");
    assert_eq!(
        (version.as_str(), status, body.len()),
        ("2", 200, 15),
        "ALPN h2"
    );
    let (_, status, body) = setup.curl(addr, &["--http1.1", "-r", "6-9"], "/a.txt");
    assert_eq!((status, body.as_slice()), (206, b"over".as_slice()));
    let (_, status, body) = setup.curl(addr, &["--http2", "-r", "0-4"], "/a.txt");
    assert_eq!((status, body.as_slice()), (206, b"hello".as_slice()));
    assert_eq!(served_serial(addr), "serial=01");
    // Plain HTTP on a TLS listener is no request.
    assert!(common::http::get(addr, "/a.txt").is_err());
}

/// A request hyper rejects over TLS, where hyper reads every byte of the connection itself (no
/// fast path), is logged with its request line as received.
#[test]
fn a_request_rejected_over_tls_is_logged_with_its_line() {
    let setup = Setup::new("tls-rejected");
    let config = setup.good_config();
    let log = setup.path("access.log");
    let (baton, addr) = start_generation(
        &[
            "--config",
            config.to_str().unwrap(),
            "--access-log",
            log.to_str().unwrap(),
        ],
        &[],
    );
    // A target over hyper's 65534 bytes: 414.
    let target = format!("/a.txt?{}", "q".repeat(70_000));
    let (version, status, _) = setup.curl(addr, &["--http1.1"], &target);
    assert_eq!((version.as_str(), status), ("1.1", 414));
    let want = format!(r#" "GET {}" 414 0 "-" "-""#, &target[..2048 - "GET ".len()]);
    common::wait_lines(&log, &baton, |lines| {
        lines.iter().any(|line| line.ends_with(&want))
    });
}

#[test]
fn a_key_from_the_credentials_directory() {
    let setup = Setup::new("tls-credential");
    let creds = TempDir::new("tls-credential-dir");
    std::fs::copy(setup.path("key.pem"), creds.join("site.key")).unwrap();
    let config = setup.config(&format!(
        "cert = {:?}\nkey = \"credential:site.key\"\n",
        setup.path("cert.pem")
    ));
    let config = config.to_str().unwrap();
    let (_baton, addr) = start_generation(
        &["--config", config],
        &[("CREDENTIALS_DIRECTORY", creds.path().to_str().unwrap())],
    );
    assert_eq!(setup.curl(addr, &[], "/a.txt").1, 200);
    // Without the directory the credential cannot be found: one line says why.
    let (code, _, err) = run_baton(&["check", "--config", config]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("credential:site.key needs $CREDENTIALS_DIRECTORY"),
        "{err}"
    );
}

#[test]
fn bad_certificates_are_refused_by_check_and_by_a_reload() {
    let setup = Setup::new("tls-bad");
    let other = Ca::new().leaf(9, VALID);
    std::fs::write(setup.path("other.key"), &other.1).unwrap();
    let (expired, expired_key) = setup.ca.leaf(3, (2001, 2002));
    std::fs::write(setup.path("expired.pem"), expired).unwrap();
    std::fs::write(setup.path("expired.key"), expired_key).unwrap();
    let (future, future_key) = setup.ca.leaf(4, (2090, 2099));
    std::fs::write(setup.path("future.pem"), future).unwrap();
    std::fs::write(setup.path("future.key"), future_key).unwrap();
    std::fs::write(setup.path("garbage.pem"), "not a certificate\n").unwrap();
    let p = |name: &str| format!("{:?}", setup.path(name));
    let cases = [
        (
            format!("cert = {}\nkey = {}\n", p("cert.pem"), p("other.key")),
            "does not go with",
        ),
        (
            format!("cert = {}\nkey = {}\n", p("expired.pem"), p("expired.key")),
            "expired on",
        ),
        (
            format!("cert = {}\nkey = {}\n", p("future.pem"), p("future.key")),
            "not valid before",
        ),
        (
            format!("cert = {}\nkey = {}\n", p("missing.pem"), p("key.pem")),
            "cannot read it",
        ),
        (
            format!("cert = {}\nkey = {}\n", p("garbage.pem"), p("key.pem")),
            "holds no PEM certificate",
        ),
        (
            format!("cert = {}\n", p("cert.pem")),
            "tls.http.key is missing",
        ),
        (
            format!("cert = \"cert.pem\"\nkey = {}\n", p("key.pem")),
            "is not an absolute path",
        ),
        (
            format!(
                "cert = {}\nkey = {}\nmin_version = \"1.1\"\n",
                p("cert.pem"),
                p("key.pem")
            ),
            "is not a TLS version baton speaks",
        ),
    ];
    for (tls, says) in &cases {
        let config = setup.config(tls);
        let (code, out, err) = run_baton(&["check", "--config", config.to_str().unwrap()]);
        assert_eq!(code, 1, "{tls}: {out}{err}");
        assert_eq!(
            err.lines().filter(|l| l.contains(says)).count(),
            1,
            "{tls}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{tls}: {err}");
    }

    // A running generation, then a reload with a wrong key, an expired certificate, one not
    // valid yet and a missing file: refused with the reason, and the old generation goes on
    // serving its certificate.
    let config = setup.good_config();
    let (baton, addr) = start_generation(&["--config", config.to_str().unwrap()], &[]);
    for (tls, says) in &cases[..4] {
        setup.config(tls);
        let (code, out, err) = run_baton(&["reload", "--pid", &baton.pid().to_string()]);
        assert_eq!(code, 1, "{tls}: the reload succeeded: {out}");
        assert!(
            err.contains(says),
            "{tls}: the reason is not in the reload's output: {err}"
        );
        assert_eq!(setup.curl(addr, &[], "/a.txt").1, 200);
        assert_eq!(served_serial(addr), "serial=01");
    }
}

/// The summary of one h2load run over HTTPS: (requests, succeeded, failed).
fn h2load(addr: SocketAddr, h1: bool) -> (u64, u64, u64) {
    let mut cmd = Command::new("h2load");
    cmd.args(["-n", "600", "-c", "4", "-t", "1"]);
    // HTTP/1.1 one request at a time: h2load counts the requests it pipelined behind an
    // answer with Connection: close (the drain's) as failed, though RFC 9112 has it retry them.
    cmd.args(if h1 { ["--h1", "-m1"] } else { ["-m", "4"] }.map(str::to_owned));
    cmd.arg(format!("https://127.0.0.1:{}/a.txt", addr.port()));
    common::h2load(cmd)
}

#[test]
fn a_certificate_renewed_on_disk_is_served_after_a_reload_under_load() {
    let setup = Setup::new("tls-renew");
    let config = setup.good_config();
    let (baton, addr) = start_generation(
        &[
            "--config",
            config.to_str().unwrap(),
            "--drain-timeout",
            "10s",
        ],
        &[],
    );
    assert_eq!(served_serial(addr), "serial=01");
    let done = Arc::new(AtomicBool::new(false));
    let load = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut runs = Vec::new();
            while !done.load(Ordering::SeqCst) || runs.len() < 4 {
                runs.push(h2load(addr, runs.len() % 2 == 1));
            }
            runs
        })
    };
    let mut pid = baton.pid();
    for serial in 2..=4u8 {
        setup.certificate(serial, VALID);
        let (code, out, err) = run_baton(&["reload", "--pid", &pid.to_string()]);
        assert_eq!(code, 0, "reload with certificate {serial}: {err}");
        let new_pid = common::reload_new_pid(&out);
        assert!(reaper::wait_exit(pid, EXIT_TIMEOUT).is_some_and(|s| s.success()));
        pid = new_pid;
        assert_eq!(served_serial(addr), format!("serial={serial:02X}"));
    }
    done.store(true, Ordering::SeqCst);
    let runs = load.join().unwrap();
    let failed: u64 = runs.iter().map(|r| r.2).sum();
    let total: u64 = runs.iter().map(|r| r.0).sum();
    assert_eq!(
        failed, 0,
        "{failed} of {total} HTTPS requests failed: {runs:?}"
    );
    assert!(runs.iter().all(|r| r.0 == r.1), "{runs:?}");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    assert!(reaper::wait_exit(pid, EXIT_TIMEOUT).is_some_and(|s| s.success()));
}

/// A keep-alive connection the old generation passes on stays plain HTTP when the new
/// configuration puts TLS on its listener: the client spoke plain HTTP on it and keeps doing
/// so, answered by the new generation without a reconnect, while new connections get TLS.
#[test]
fn a_connection_passed_on_stays_plain_when_its_listener_gains_tls() {
    let setup = Setup::new("tls-gained");
    let config = setup.path("baton.toml");
    std::fs::write(
        &config,
        format!("[server]\nroot = {:?}\n", setup.path("www")),
    )
    .unwrap();
    let (baton, addr) = start_generation(&["--config", config.to_str().unwrap()], &[]);
    let old = baton.pid();
    // Answered by the fast path, the only one that passes connections on.
    let mut conn = common::http::Conn::tcp(addr).unwrap();
    let first = conn.get("/a.txt").unwrap();
    assert!(first.body == b"hello over TLS\n" && !first.closes());

    setup.good_config();
    let new = common::reload_and_wait_exit(old, EXIT_TIMEOUT);
    // The old generation's last lines may still be on their way through the pipe that the
    // new generation shares: waited for, not read at once.
    baton
        .stderr
        .expect_line("1 passed on to the next generation", EXIT_TIMEOUT);

    // The same connection, in plain HTTP, now answered by the new generation.
    let again = conn.get("/a.txt").expect("the passed-on connection broke");
    assert_eq!(again.body, b"hello over TLS\n");
    let version = conn.get("/-/version").unwrap();
    assert_eq!(version.json()["pid"].as_u64(), Some(new as u64));
    // New connections get TLS, and plain HTTP is no request there any more.
    assert_eq!(setup.curl(addr, &["--http1.1"], "/a.txt").1, 200);
    assert!(common::http::get(addr, "/a.txt").is_err());
    common::stop_and_wait_exit(new, EXIT_TIMEOUT);
}
