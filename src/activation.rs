//! Listening sockets: taken over from the service manager (socket activation) or bound.
//!
//! Protocol: [sd_listen_fds(3)]. When `LISTEN_PID` is this process's pid, fds
//! `3 .. 3+LISTEN_FDS` are listening sockets named by the colon-separated `LISTEN_FDNAMES`
//! (systemd's `FileDescriptorName=`, by default the socket unit's name). The same protocol
//! carries the sockets from one baton generation to the next during an upgrade.
//!
//! [`take_activated`] reads and removes the `LISTEN_*` variables; it changes the environment,
//! so it must run before any thread is started. [`resolve`] then checks each fd (a listening
//! stream socket of a family baton can serve), matches the fds to the configured listeners by
//! name, and binds the configured listeners that were not handed over.
//!
//! Matching rules:
//! - an fd named like a configured listener serves that listener; several fds may share a name
//!   (e.g. an IPv4 and an IPv6 `ListenStream=` in one socket unit);
//! - with a single configured listener, fds without a name of their own (no `LISTEN_FDNAMES`,
//!   an empty name, or the default `*.socket` name) serve it;
//! - an fd named `bound/NAME` is a listener baton bound itself, kept in systemd's fd store or
//!   handed over by the previous generation ([`crate::fdstore`]): it serves the listener
//!   `NAME`, unless a socket unit's fd serves that listener too; one whose listener is no longer
//!   configured (or is served by a socket unit now, or is no listening socket) is closed and
//!   noted for removal from the store ([`crate::fdstore::remove_later`]) instead of failing the
//!   start;
//! - any other fd is an error: it would otherwise sit unserved;
//! - a configured listener with no fd is bound from its address.
//!
//! A listener keeps its self-bound status across upgrades: [`Listener::handover_name`] is the
//! name the next generation gets in `LISTEN_FDNAMES`.
//!
//! [sd_listen_fds(3)]: https://www.freedesktop.org/software/systemd/man/sd_listen_fds.html

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::Path;

use nix::sys::socket::{self, sockopt, AddressFamily, SockaddrLike, SockaddrStorage};
use nix::sys::stat::{fstat, SFlag};

use crate::config::{ListenAddress, ListenSpec};
use crate::fdstore;

/// The environment variables of the protocol; all are removed once read.
const LISTEN_VARS: [&str; 4] = [
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "LISTEN_PIDFDID",
];

/// The backlog for sockets baton binds itself (systemd's default for socket units is 4096;
/// the kernel caps it at net.core.somaxconn).
const BACKLOG: i32 = 4096;

/// An fd received through socket activation, not yet checked.
#[derive(Debug)]
pub struct ActivatedFd {
    pub fd: OwnedFd,
    pub name: String,
}

/// A listening socket ready to serve.
#[derive(Debug)]
pub struct Listener {
    /// The configured listener it serves.
    pub name: String,
    pub socket: Socket,
    /// The fd number the socket arrived on, when it was handed over.
    pub activated_fd: Option<RawFd>,
    /// Bound by baton (here, or by an earlier process and kept in the fd store or handed over
    /// as `bound/NAME`), not by a socket unit: it belongs in systemd's fd store.
    pub self_bound: bool,
}

impl Listener {
    /// The fd name the next generation gets for this socket in `LISTEN_FDNAMES`: the
    /// listener's name, or `bound/NAME` for a self-bound one ([`crate::fdstore`]).
    pub fn handover_name(&self) -> String {
        if self.self_bound {
            fdstore::stored_name(&self.name)
        } else {
            self.name.clone()
        }
    }
}

#[derive(Debug)]
pub enum Socket {
    Tcp(std::net::TcpListener),
    Unix(StdUnixListener),
}

impl Socket {
    pub fn local_address(&self) -> String {
        match self {
            Socket::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|e| format!("?({e})")),
            Socket::Unix(l) => match l.local_addr() {
                Ok(a) => match a.as_pathname() {
                    Some(p) => format!("unix:{}", p.display()),
                    None => "unix:(unnamed)".to_owned(),
                },
                Err(e) => format!("unix:?({e})"),
            },
        }
    }
}

impl Listener {
    /// Another fd for the same socket (the same open file description), as a listener of the
    /// same name that was not handed over.
    pub fn try_clone(&self) -> io::Result<Listener> {
        Ok(Listener {
            name: self.name.clone(),
            socket: match &self.socket {
                Socket::Tcp(l) => Socket::Tcp(l.try_clone()?),
                Socket::Unix(l) => Socket::Unix(l.try_clone()?),
            },
            activated_fd: None,
            self_bound: self.self_bound,
        })
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.socket {
            Socket::Tcp(l) => l.as_fd(),
            Socket::Unix(l) => l.as_fd(),
        }
    }
}

impl fmt::Display for Listener {
    /// `http=127.0.0.1:8080 (fd 3, handed over)` or `http=127.0.0.1:8080 (bound)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.socket.local_address())?;
        match (self.activated_fd, self.self_bound) {
            (Some(fd), false) => write!(f, " (fd {fd}, handed over)"),
            (Some(fd), true) => write!(f, " (fd {fd}, handed over, self-bound)"),
            (None, _) => write!(f, " (bound)"),
        }
    }
}

/// A problem with the sockets; the message is one line that names the fd or address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivationError(pub String);

impl fmt::Display for ActivationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ActivationError {}

fn error<T>(msg: impl Into<String>) -> Result<T, ActivationError> {
    Err(ActivationError(msg.into()))
}

/// Takes the fds passed with `LISTEN_FDS` if they are meant for this process, and removes the
/// `LISTEN_*` variables so that no child inherits them.
///
/// Returns an empty list when `LISTEN_PID` is unset or names another process (the fds are not
/// ours then, as sd_listen_fds(3) specifies).
///
/// # Safety contract
/// Changes the environment: call it before any other thread exists.
pub fn take_activated() -> Result<Vec<ActivatedFd>, ActivationError> {
    let raw = |name| std::env::var(name).unwrap_or_default();
    let (pid, count, names) = (raw("LISTEN_PID"), raw("LISTEN_FDS"), raw("LISTEN_FDNAMES"));
    // Not for this process (or no LISTEN_PID at all): every LISTEN_* variable is ignored, as
    // sd_listen_fds(3) says, whatever LISTEN_FDS and LISTEN_FDNAMES hold.
    let ours = pid.trim().parse::<u32>().ok() == Some(std::process::id());
    let result = sd_notify::listen_fds_with_names()
        .map(|fds| fds.filter(|_| ours).collect::<Vec<_>>())
        .or_else(|e| if ours { Err(e) } else { Ok(Vec::new()) });
    for var in LISTEN_VARS {
        // SAFETY (of the contract above): no other thread reads the environment yet.
        unsafe { std::env::remove_var(var) };
    }
    let fds = result.map_err(|e| {
        if e.raw_os_error() == Some(libc::EBADF) {
            return ActivationError(format!(
                "socket activation: LISTEN_FDS={count} announces fds 3 to {} but not all of them are open; \
                 whatever started baton passed fewer fds than it announced",
                count.parse::<i64>().map_or(0, |n| n.saturating_add(2))
            ));
        }
        ActivationError(format!(
            "socket activation: bad environment LISTEN_PID={pid:?} LISTEN_FDS={count:?} \
             LISTEN_FDNAMES={names:?} ({e}); whatever started baton must pass a pid, a count of \
             fds, and one name per fd"
        ))
    })?;
    fds.into_iter()
        .map(|(raw_fd, name)| {
            // The fd must be open, or OwnedFd would later close a number that is not ours.
            if unsafe { libc::fcntl(raw_fd, libc::F_GETFD) } < 0 {
                return error(format!(
                    "socket activation: fd {raw_fd} (LISTEN_FDS={count}) is not open; \
                 whatever started baton passed fewer fds than it announced"
                ));
            }
            // SAFETY: the fd is open and, per LISTEN_PID, was handed to this process to own.
            let fd = unsafe { OwnedFd::from_raw_fd(raw_fd) };
            // sd-notify reports a missing LISTEN_FDNAMES as "unknown".
            let name = if names.is_empty() {
                String::new()
            } else {
                name
            };
            Ok(ActivatedFd { fd, name })
        })
        .collect()
}

/// Checks the activated fds, matches them to `specs`, and binds the specs left over.
///
/// Stale stored fds (see the module docs) are closed here and noted for removal from systemd's
/// fd store.
pub fn resolve(
    specs: &[ListenSpec],
    activated: Vec<ActivatedFd>,
) -> Result<Vec<Listener>, ActivationError> {
    let (mut listeners, stale) = match_fds(specs, activated)?;
    for (name, fd, why) in stale {
        fdstore::remove_later(&name, fd, why);
    }
    for spec in specs {
        if !listeners.iter().any(|l| l.name == spec.name) {
            listeners.push(Listener {
                name: spec.name.clone(),
                socket: bind(&spec.address)
                    .map_err(|e| ActivationError(format!("listener {spec}: {e}")))?,
                activated_fd: None,
                self_bound: true,
            });
        }
    }
    Ok(listeners)
}

/// A stored fd that serves no listener: its name, the fd number it had, and why.
type Stale = (String, RawFd, String);

/// Matches the activated fds to `specs`: the listeners they serve, and the stored fds that serve
/// none (closed already).
fn match_fds(
    specs: &[ListenSpec],
    activated: Vec<ActivatedFd>,
) -> Result<(Vec<Listener>, Vec<Stale>), ActivationError> {
    let single = match specs {
        [only] => Some(only.name.as_str()),
        _ => None,
    };
    let configured = || {
        specs
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    // A socket unit's fds first: they win over a stored fd for the same listener.
    let (stored, unit): (Vec<_>, Vec<_>) = activated
        .into_iter()
        .partition(|a| fdstore::listener_of(&a.name).is_some());
    let mut listeners = Vec::new();
    for ActivatedFd { fd, name } in unit {
        let raw = fd.as_raw_fd();
        let target = match specs.iter().find(|s| s.name == name) {
            Some(spec) => spec.name.as_str(),
            None => match single {
                Some(only) if name.is_empty() || name.ends_with(".socket") => only,
                _ => {
                    return error(format!(
                        "socket activation: fd {raw} is named '{name}' but no listener has that name \
                         (configured: {}); add --listen {name}=ADDR or set FileDescriptorName= to one of them",
                        configured()
                    ))
                }
            },
        };
        let socket = check_fd(fd, &name)?;
        listeners.push(Listener {
            name: target.to_owned(),
            socket,
            activated_fd: Some(raw),
            self_bound: false,
        });
    }
    let mut stale = Vec::new();
    for ActivatedFd { fd, name } in stored {
        let raw = fd.as_raw_fd();
        let listener = fdstore::listener_of(&name).expect("partitioned on it");
        let (fd, why_stale) = match specs.iter().find(|s| s.name == listener) {
            None => (
                Some(fd),
                Some(format!(
                    "no listener '{listener}' is configured anymore (configured: {})",
                    configured()
                )),
            ),
            Some(_)
                if listeners
                    .iter()
                    .any(|l| l.name == listener && !l.self_bound) =>
            {
                (
                    Some(fd),
                    Some(format!(
                        "a socket unit's fd serves listener '{listener}' now"
                    )),
                )
            }
            // check_fd closes the fd when it fails.
            Some(spec) => match check_fd(fd, &name) {
                Err(e) => (None, Some(e.0)),
                Ok(socket) => {
                    if !same_address(&socket, &spec.address) {
                        fdstore::warn_later(format!(
                            "listener {listener}: keeping the socket handed over as '{name}' on {}, \
                             although the configuration says {}; rename the listener, or stop and \
                             start the service (which empties systemd's fd store), to bind the new address",
                            socket.local_address(),
                            spec.address
                        ));
                    }
                    listeners.push(Listener {
                        name: listener.to_owned(),
                        socket,
                        activated_fd: Some(raw),
                        self_bound: true,
                    });
                    (None, None)
                }
            },
        };
        if let Some(why) = why_stale {
            drop(fd);
            if !stale.iter().any(|(n, _, _)| *n == name) {
                stale.push((name, raw, why));
            }
        }
    }
    Ok((listeners, stale))
}

/// Whether `socket` listens where `address` says (port 0 matches any port).
fn same_address(socket: &Socket, address: &ListenAddress) -> bool {
    match (socket, address) {
        (Socket::Tcp(l), ListenAddress::Tcp(want)) => l.local_addr().is_ok_and(|have| {
            have.ip() == want.ip() && (want.port() == 0 || have.port() == want.port())
        }),
        (Socket::Unix(l), ListenAddress::Unix(want)) => l
            .local_addr()
            .is_ok_and(|have| have.as_pathname() == Some(want.as_path())),
        _ => false,
    }
}

/// Verifies that `fd` is a listening stream socket baton can serve HTTP on, and wraps it.
fn check_fd(fd: OwnedFd, name: &str) -> Result<Socket, ActivationError> {
    let raw = fd.as_raw_fd();
    let what = if name.is_empty() {
        format!("socket activation: fd {raw}")
    } else {
        format!("socket activation: fd {raw} ('{name}')")
    };
    let stat = fstat(&fd).map_err(|e| ActivationError(format!("{what}: fstat failed: {e}")))?;
    let kind = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
    if kind != SFlag::S_IFSOCK {
        let is = match kind {
            SFlag::S_IFREG => "a regular file",
            SFlag::S_IFDIR => "a directory",
            SFlag::S_IFIFO => "a pipe",
            SFlag::S_IFCHR => "a character device",
            _ => "not a socket",
        };
        return error(format!(
            "{what} is {is}, not a socket; pass listening stream sockets (ListenStream= in the socket unit)"
        ));
    }
    let ty = socket::getsockopt(&fd, sockopt::SockType)
        .map_err(|e| ActivationError(format!("{what}: cannot read its type: {e}")))?;
    if ty != socket::SockType::Stream {
        return error(format!(
            "{what} is a {} socket, not a stream socket; baton serves HTTP over stream sockets (ListenStream=, not ListenDatagram=)",
            match ty {
                socket::SockType::Datagram => "datagram (UDP)",
                socket::SockType::SeqPacket => "seqpacket",
                _ => "non-stream",
            }
        ));
    }
    let listening = socket::getsockopt(&fd, sockopt::AcceptConn)
        .map_err(|e| ActivationError(format!("{what}: cannot read SO_ACCEPTCONN: {e}")))?;
    if !listening {
        return error(format!(
            "{what} is a connected socket, not a listening one; use Accept=no in the socket unit"
        ));
    }
    let addr: SockaddrStorage = socket::getsockname(fd.as_raw_fd())
        .map_err(|e| ActivationError(format!("{what}: getsockname failed: {e}")))?;
    // tokio's from_std requires non-blocking sockets. O_NONBLOCK is on the open file
    // description, which an upgrade shares between two processes: both want it set.
    set_nonblocking(&fd).map_err(|e| ActivationError(format!("{what}: {e}")))?;
    match addr.family() {
        Some(AddressFamily::Inet | AddressFamily::Inet6) => Ok(Socket::Tcp(fd.into())),
        Some(AddressFamily::Unix) => Ok(Socket::Unix(fd.into())),
        other => error(format!(
            "{what} is a {} socket; baton serves IPv4, IPv6 and unix sockets",
            other.map_or("unknown".to_owned(), |f| format!("{f:?}"))
        )),
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Binds a listener baton was not handed.
pub fn bind(address: &ListenAddress) -> io::Result<Socket> {
    use socket2::{Domain, SockAddr, Socket as S, Type};
    match address {
        ListenAddress::Tcp(addr) => {
            let s = S::new(Domain::for_address(*addr), Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            if addr.is_ipv6() {
                // [::]:80 then means IPv6 only, as it does in nginx; list 0.0.0.0:80 as well
                // for both.
                s.set_only_v6(true)?;
            }
            s.bind(&(*addr).into())
                .map_err(|e| explain_bind(e, address))?;
            s.listen(BACKLOG)?;
            s.set_nonblocking(true)?;
            Ok(Socket::Tcp(s.into()))
        }
        ListenAddress::Unix(path) => {
            remove_stale_unix_socket(path)?;
            let s = S::new(Domain::UNIX, Type::STREAM, None)?;
            s.bind(&SockAddr::unix(path)?)
                .map_err(|e| explain_bind(e, address))?;
            s.listen(BACKLOG)?;
            s.set_nonblocking(true)?;
            Ok(Socket::Unix(StdUnixListener::from(OwnedFd::from(s))))
        }
    }
}

fn explain_bind(e: io::Error, address: &ListenAddress) -> io::Error {
    let hint = match e.kind() {
        io::ErrorKind::AddrInUse => "another process listens there: stop it or choose another address",
        io::ErrorKind::PermissionDenied => {
            "not permitted: ports below 1024 need root or CAP_NET_BIND_SERVICE, and the socket's directory must be writable"
        }
        io::ErrorKind::AddrNotAvailable => "no interface has that address",
        _ => "check the address",
    };
    io::Error::new(e.kind(), format!("cannot bind {address}: {e}; {hint}"))
}

/// A unix socket path left behind by a process that is gone would make bind fail; one that
/// still accepts connections belongs to a live server and is left alone.
fn remove_stale_unix_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if !m.file_type().is_socket() => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket: remove it or choose another path",
                path.display()
            ),
        )),
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "{} is in use by a running server: stop it or choose another path",
                    path.display()
                ),
            )),
            Err(_) => std::fs::remove_file(path),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp_listener() -> OwnedFd {
        OwnedFd::from(std::net::TcpListener::bind("127.0.0.1:0").unwrap())
    }

    fn spec(s: &str) -> ListenSpec {
        s.parse().unwrap()
    }

    #[test]
    fn single_unnamed_fd_serves_single_listener() {
        for name in ["", "baton.socket", "http"] {
            let l = resolve(
                &[spec("http=127.0.0.1:1")],
                vec![ActivatedFd {
                    fd: tcp_listener(),
                    name: name.into(),
                }],
            )
            .unwrap();
            assert_eq!(l.len(), 1);
            assert_eq!(l[0].name, "http");
            assert!(l[0].activated_fd.is_some());
        }
    }

    #[test]
    fn unknown_name_is_an_error() {
        let err = resolve(
            &[spec("http=127.0.0.1:1"), spec("admin=127.0.0.1:2")],
            vec![ActivatedFd {
                fd: tcp_listener(),
                name: "metrics".into(),
            }],
        )
        .unwrap_err();
        assert!(
            err.0.contains(
                "named 'metrics' but no listener has that name (configured: http, admin)"
            ),
            "{err}"
        );
    }

    fn names(stale: &[Stale]) -> Vec<&str> {
        stale.iter().map(|(n, _, _)| n.as_str()).collect()
    }

    fn fd(name: &str) -> ActivatedFd {
        ActivatedFd {
            fd: tcp_listener(),
            name: name.into(),
        }
    }

    #[test]
    fn a_stored_fd_serves_its_listener_and_stays_self_bound() {
        let specs = [spec("http=127.0.0.1:1"), spec("extra=127.0.0.1:0")];
        let (l, stale) = match_fds(&specs, vec![fd("bound/extra"), fd("http")]).unwrap();
        assert!(stale.is_empty());
        let extra = l.iter().find(|l| l.name == "extra").unwrap();
        assert!(extra.self_bound && extra.activated_fd.is_some());
        assert_eq!(extra.handover_name(), "bound/extra");
        assert!(
            extra.to_string().ends_with(", handed over, self-bound)"),
            "{extra}"
        );
        let http = l.iter().find(|l| l.name == "http").unwrap();
        assert!(!http.self_bound);
        assert_eq!(http.handover_name(), "http");
    }

    #[test]
    fn a_stored_fd_of_a_removed_listener_is_stale_not_an_error() {
        let specs = [spec("http=127.0.0.1:1")];
        // Also with a single listener, which takes unnamed and *.socket fds: not stored ones.
        let (l, stale) = match_fds(&specs, vec![fd("http"), fd("bound/gone")]).unwrap();
        assert_eq!(names(&stale), ["bound/gone"]);
        assert!(stale[0]
            .2
            .starts_with("no listener 'gone' is configured anymore"));
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].name, "http");
        // A socket unit's fd with an unknown name is still an error.
        let err = match_fds(&specs, vec![fd("gone")]).unwrap_err();
        assert!(err.0.contains("no listener has that name"), "{err}");
    }

    #[test]
    fn a_socket_unit_fd_wins_over_a_stored_one_for_the_same_listener() {
        let specs = [spec("http=127.0.0.1:1"), spec("extra=127.0.0.1:2")];
        // Whatever the order systemd passes them in.
        let (l, stale) =
            match_fds(&specs, vec![fd("bound/http"), fd("http"), fd("extra")]).unwrap();
        assert_eq!(names(&stale), ["bound/http"]);
        assert_eq!(l.len(), 2);
        assert!(l.iter().all(|l| !l.self_bound));
    }

    #[test]
    fn a_stored_fd_that_is_no_listening_socket_is_stale() {
        let specs = [spec("extra=127.0.0.1:0")];
        let udp = OwnedFd::from(std::net::UdpSocket::bind("127.0.0.1:0").unwrap());
        let (l, stale) = match_fds(
            &specs,
            vec![ActivatedFd {
                fd: udp,
                name: "bound/extra".into(),
            }],
        )
        .unwrap();
        assert!(l.is_empty());
        assert_eq!(names(&stale), ["bound/extra"]);
        assert!(stale[0].2.contains("datagram (UDP)"), "{stale:?}");
        // resolve then binds it afresh, as its own.
        let l = resolve(&specs, vec![]).unwrap();
        assert!(l[0].self_bound && l[0].activated_fd.is_none());
        assert_eq!(l[0].handover_name(), "bound/extra");
    }

    #[test]
    fn addresses_compare_with_port_zero_as_any() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let socket = Socket::Tcp(l);
        let addr = |s: &str| spec(&format!("x={s}")).address;
        assert!(same_address(&socket, &addr(&format!("127.0.0.1:{port}"))));
        assert!(same_address(&socket, &addr("127.0.0.1:0")));
        assert!(!same_address(&socket, &addr("127.0.0.2:0")));
        assert!(!same_address(
            &socket,
            &addr(&format!("127.0.0.1:{}", port ^ 1))
        ));
        assert!(!same_address(&socket, &addr("unix:/tmp/x.sock")));
    }

    #[test]
    fn bad_fds_are_named() {
        let file = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let err = check_fd(file, "x").unwrap_err();
        assert!(
            err.0.contains("is a character device, not a socket"),
            "{err}"
        );
        let udp = OwnedFd::from(std::net::UdpSocket::bind("127.0.0.1:0").unwrap());
        let err = check_fd(udp, "x").unwrap_err();
        assert!(err.0.contains("datagram (UDP)"), "{err}");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let conn = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let err = check_fd(OwnedFd::from(conn), "x").unwrap_err();
        assert!(
            err.0.contains("connected socket, not a listening one"),
            "{err}"
        );
    }

    #[test]
    fn unactivated_listeners_are_bound() {
        let dir = std::env::temp_dir().join(format!("baton-act-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let specs = [
            spec("http=127.0.0.1:0"),
            spec(&format!("local=unix:{}", path.display())),
        ];
        let l = resolve(&specs, vec![]).unwrap();
        assert_eq!(l.len(), 2);
        assert!(l[1]
            .to_string()
            .starts_with(&format!("local=unix:{}", path.display())));
        // A second server on the same path is refused while the first is live...
        let err = resolve(&specs[1..], vec![]).unwrap_err();
        assert!(err.0.contains("in use by a running server"), "{err}");
        // ...and a stale path is reclaimed once it is gone.
        drop(l);
        resolve(&specs[1..], vec![]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
