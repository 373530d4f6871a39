//! A real UDP socket passed by socket activation arrives in the child as the UDP listener of
//! its name, and serves there: through `systemd-socket-activate --datagram` (systemd's own
//! launcher, when installed), and through `LISTEN_FDS` set by the test itself, next to a TCP
//! listener, to show the fds are told apart by name.
//!
//! The child is this test binary again, running only [`child`] with [`CHILD_ENV`] set to the
//! listeners to configure: it takes the fds ([`activation::take_activated`],
//! [`activation::resolve`]), prints one `LISTENER` line per listener, and echoes one datagram
//! on each UDP listener.

use std::io::Read;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use baton_lifecycle::activation::{self, ListenSpec, Socket};

/// Set in the child: the listeners to configure, separated by spaces.
const CHILD_ENV: &str = "BATON_LIFECYCLE_TEST_UDP_CHILD";

/// How long the child waits for a datagram, and the parent for its echo.
const PATIENCE: Duration = Duration::from_secs(20);

/// The child's part; does nothing in a plain test run.
#[test]
fn child() {
    let Ok(specs) = std::env::var(CHILD_ENV) else {
        return;
    };
    let specs: Vec<ListenSpec> = specs.split(' ').map(|s| s.parse().unwrap()).collect();
    // SAFETY: take_activated changes the environment: the harness's main thread only waits
    // for this one test (--test-threads=1), and reads no variable meanwhile.
    let fds = unsafe { activation::take_activated() }.unwrap();
    let listeners = activation::resolve(&specs, fds).unwrap();
    for warning in activation::take_warnings() {
        println!("WARNING {warning}");
    }
    for l in &listeners {
        let kind = match l.socket {
            Socket::Tcp(_) => "tcp",
            Socket::Unix(_) => "unix",
            Socket::Udp(_) => "udp",
        };
        println!("LISTENER {l} {kind}");
    }
    for l in &listeners {
        let Socket::Udp(socket) = &l.socket else {
            continue;
        };
        let deadline = Instant::now() + PATIENCE;
        let mut buf = [0; 64];
        loop {
            // Nonblocking, as activation leaves every socket.
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let mut reply = format!("echo from {}: ", l.name).into_bytes();
                    reply.extend_from_slice(&buf[..n]);
                    socket.send_to(&reply, from).unwrap();
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "no datagram on {l}");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("{l}: {e}"),
            }
        }
    }
    println!("DONE");
}

/// Arguments that make this test binary run [`child`] only.
fn child_args() -> [&'static str; 5] {
    ["--exact", "child", "--nocapture", "--test-threads=1", "-q"]
}

/// Sends `ping` to `to` until an answer comes; returns it.
fn ping(to: SocketAddr, child: &mut Child) -> String {
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    let mut buf = [0; 128];
    loop {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("no answer from {to}");
        }
        client.send_to(b"ping", to).unwrap();
        match client.recv_from(&mut buf) {
            Ok((n, from)) => {
                assert_eq!(from, to);
                return String::from_utf8_lossy(&buf[..n]).into_owned();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("{e}"),
        }
    }
}

/// Waits for the child; returns its output, which must end with `DONE`.
fn finish(mut child: Child) -> String {
    let (mut out, mut err) = (String::new(), String::new());
    let mut stdout = child.stdout.take().unwrap();
    stdout.read_to_string(&mut out).unwrap();
    if let Some(mut stderr) = child.stderr.take() {
        stderr.read_to_string(&mut err).unwrap();
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}: {out} {err}");
    assert!(out.lines().any(|l| l == "DONE"), "{out}");
    assert!(!out.contains("WARNING"), "{out}");
    out
}

/// A UDP port that was free a moment ago.
fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn systemd_socket_activate_passes_a_udp_socket_by_name() {
    if Command::new("systemd-socket-activate")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        eprintln!("skipped: no systemd-socket-activate (Debian's systemd package has it)");
        return;
    }
    let addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let spec = format!("dns=udp:{addr}");
    // It binds, waits for the first datagram, then execs the child with LISTEN_PID set to it.
    let mut child = Command::new("systemd-socket-activate")
        .args(["--datagram", "--listen", &addr.to_string(), "--fdname=dns"])
        .arg(format!("--setenv={CHILD_ENV}={spec}"))
        .arg(std::env::current_exe().unwrap())
        .args(child_args())
        .stdout(Stdio::piped())
        // "Listening on ...", shown when the test fails.
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert_eq!(ping(addr, &mut child), "echo from dns: ping");
    let out = finish(child);
    assert!(
        out.lines()
            .any(|l| l == format!("LISTENER dns=udp:{addr} (fd 3, handed over) udp")),
        "{out}"
    );
}

/// `fd` again at 100 or above, so that moving it to 3 or 4 in the child clobbers nothing.
fn high(fd: OwnedFd) -> OwnedFd {
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(100))
        .map(|raw| unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) })
        .unwrap()
}

#[test]
fn a_udp_socket_passed_with_listen_fds_arrives_with_its_name() {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (tcp_addr, udp_addr) = (tcp.local_addr().unwrap(), udp.local_addr().unwrap());
    let (tcp, udp) = (high(tcp.into()), high(udp.into()));
    let passed: [RawFd; 2] = [tcp.as_raw_fd(), udp.as_raw_fd()];
    // The listeners in another order than the fds: names decide.
    let specs = format!("dns=udp:{udp_addr} http={tcp_addr}");
    let mut command = Command::new("sh");
    // LISTEN_PID must be the child's pid: the shell's, which exec keeps.
    command
        .args(["-c", "export LISTEN_PID=$$; exec \"$0\" \"$@\""])
        .arg(std::env::current_exe().unwrap())
        .args(child_args())
        .env("LISTEN_FDS", "2")
        .env("LISTEN_FDNAMES", "http:dns")
        .env_remove("LISTEN_FDS_FIRST_FD")
        .env(CHILD_ENV, specs)
        .stdout(Stdio::piped());
    // SAFETY: dup2 is async-signal-safe; the new fds 3 and 4 are not close-on-exec.
    unsafe {
        command.pre_exec(move || {
            for (i, fd) in passed.iter().enumerate() {
                if libc::dup2(*fd, 3 + i as RawFd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    // Only the child holds the sockets now.
    drop((tcp, udp));
    assert_eq!(ping(udp_addr, &mut child), "echo from dns: ping");
    let out = finish(child);
    for want in [
        format!("LISTENER dns=udp:{udp_addr} (fd 4, handed over) udp"),
        format!("LISTENER http={tcp_addr} (fd 3, handed over) tcp"),
    ] {
        assert!(out.lines().any(|l| l == want), "want {want:?} in {out}");
    }
}
