//! Listening sockets: taken over from the service manager (socket activation) or bound.
//!
//! Protocol: [sd_listen_fds(3)]. When `LISTEN_PID` is this process's pid, fds
//! `3 .. 3+LISTEN_FDS` are listening sockets named by the colon-separated `LISTEN_FDNAMES`
//! (systemd's `FileDescriptorName=`, by default the socket unit's name). The same protocol
//! carries the sockets from one baton generation to the next during an upgrade.
//!
//! The fds are taken through the [`listenfd`] crate, which also speaks the development variant
//! of [systemfd]: `LISTEN_FDS_FIRST_FD` names the first fd, and with `--no-pid` there is no
//! `LISTEN_PID` (systemfd execs `cargo watch`, which runs baton as a grandchild, so no pid it
//! could give would be baton's). baton's own rules decide first (see [`take_activated`]):
//! - `LISTEN_PID` set: the fds are baton's only when it is baton's pid, as before;
//!   systemd never sets `LISTEN_FDS_FIRST_FD`, so its fds start at 3;
//! - `LISTEN_PID` unset and `LISTEN_FDS_FIRST_FD` set (systemfd `--no-pid`): the fds are
//!   baton's;
//! - `LISTEN_PID` unset and no `LISTEN_FDS_FIRST_FD`: the variables are left from another
//!   process and ignored, as sd_listen_fds(3) wants (listenfd alone would take fds 3.. then);
//! - a malformed value is a one-line error rather than no sockets (listenfd alone would
//!   ignore it, and baton would then fail to bind the address the launcher holds).
//!
//! [`take_activated`] reads and removes the `LISTEN_*` variables; it changes the environment,
//! so it must run before any thread is started. [`resolve`] then checks each fd (a listening
//! stream socket, TCP or unix, or an unconnected UDP socket), matches the fds to the configured
//! listeners by name, and binds the configured listeners that were not handed over.
//!
//! A listener is a stream listener (`IP:PORT`, `unix:/path`) or a UDP listener
//! (`udp:IP:PORT`, [`Socket::Udp`], for a service such as DNS or QUIC). An fd matched to a
//! listener of the other kind (a datagram socket for a stream listener, or the other way
//! round) is an error for a socket unit's fd (`ListenStream=` versus `ListenDatagram=`) and
//! stale for a stored one, which is then bound afresh; otherwise UDP sockets follow the same
//! rules as the others below, and are handed over and stored like them.
//!
//! Matching rules (the same at a fresh start and at an upgrade, where the new generation reads
//! its configuration afresh):
//! - an fd named like a configured listener serves that listener; several fds may share a name
//!   (e.g. an IPv4 and an IPv6 `ListenStream=` in one socket unit). A socket unit's socket cannot
//!   change here: when the configuration gives that listener another address, the socket is
//!   served all the same and a one-line warning names the unit setting to change instead;
//! - with a single configured listener, fds without a name of their own (no `LISTEN_FDNAMES`,
//!   an empty name, or the default `*.socket` name) serve it;
//! - a socket unit's fd of another name serves the listener configured with its very address
//!   (a renamed listener);
//! - an fd named `bound/NAME` is a listener baton bound itself, kept in systemd's fd store or
//!   handed over by the previous generation ([`crate::fdstore`]): it serves the listener `NAME`
//!   while that listener's address is still the socket's, else the listener configured with
//!   its very address (renamed); unless a socket unit's fd serves that listener. One that
//!   serves no listener (removed, moved to another address, served by a socket unit now, or no
//!   listening socket) is closed at once and noted for removal from the store
//!   ([`crate::fdstore::remove_later`]); during an upgrade the old generation still holds its
//!   copy, which goes when it exits (or serves again after a rollback);
//! - any other fd is an error: it would otherwise sit unserved;
//! - a configured listener with no fd is bound from its address.
//!
//! A listener keeps its self-bound status across upgrades: [`Listener::handover_name`] is the
//! name the next generation gets in `LISTEN_FDNAMES`.
//!
//! [sd_listen_fds(3)]: https://www.freedesktop.org/software/systemd/man/sd_listen_fds.html
//! [systemfd]: https://github.com/mitsuhiko/systemfd

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use nix::sys::socket::{self, sockopt, AddressFamily, SockaddrLike, SockaddrStorage};
use nix::sys::stat::{fstat, SFlag};

use crate::env::Var;
use crate::fdstore;

/// The socket units the fds came from, as one generation tells the next: one entry per fd,
/// separated by `/` (which no unit name contains), empty when unknown or bound by baton.
pub const SOCKET_UNITS_ENV: Var = Var::SOCKET_UNITS;

/// The environment variables of the protocol; all are removed once read.
static LISTEN_VARS: std::sync::LazyLock<[&str; 6]> = std::sync::LazyLock::new(|| {
    [
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "LISTEN_PIDFDID",
        SOCKET_UNITS_ENV.name(),
        "LISTEN_FDS_FIRST_FD",
    ]
});

/// The first fd of the protocol (`SD_LISTEN_FDS_START`), and the lowest `LISTEN_FDS_FIRST_FD`
/// accepted: fds 0 to 2 are stdin, stdout and stderr.
const FIRST_FD: RawFd = 3;

/// Warnings about the sockets found at start, logged (and told to the old generation during an
/// upgrade) once logging is set up: see [`take_warnings`].
static WARNINGS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn warn_later(message: String) {
    let mut warnings = WARNINGS.lock().unwrap_or_else(|e| e.into_inner());
    if !warnings.contains(&message) {
        warnings.push(message);
    }
}

/// The warnings [`resolve`] found (each one line), once.
pub fn take_warnings() -> Vec<String> {
    std::mem::take(&mut *WARNINGS.lock().unwrap_or_else(|e| e.into_inner()))
}

/// The one-line warning for a listener whose configured address differs from the address of
/// the socket a socket unit passes for it: baton cannot change that socket.
///
/// The unit setting named is `ListenDatagram=` for a UDP socket (`have` or `want` written
/// `udp:ADDR`), else `ListenStream=`.
pub fn unit_address_warning(listener: &str, unit: Option<&str>, have: &str, want: &str) -> String {
    let setting = if have.starts_with(UDP_PREFIX) || want.starts_with(UDP_PREFIX) {
        DATAGRAM_SETTING
    } else {
        STREAM_SETTING
    };
    format!(
        "listener {listener}: the address comes from {} ({setting}); change it there \
         (it listens on {have}, the configuration says {want}, which is not used)",
        unit.unwrap_or("its socket unit")
    )
}

/// How a UDP address starts in [`ListenSpec`] and in [`Socket::local_address`].
const UDP_PREFIX: &str = "udp:";

/// The socket unit settings for stream and datagram sockets, for messages.
const STREAM_SETTING: &str = "ListenStream=";
const DATAGRAM_SETTING: &str = "ListenDatagram=";

/// The listen backlog of the stream sockets the library binds itself ([`resolve_with`],
/// [`crate::Options::backlog`]): systemd's default for socket units (`Backlog=`), where nginx
/// uses 511. The kernel caps it at `net.core.somaxconn` (4096 since Linux 5.4, 128 before), so a
/// larger one needs that sysctl raised. It is the queue of connections the kernel completes
/// while the server is busy, upgrading or restarted by the keeper; one that overflows drops
/// SYNs, which clients retry only after a second.
pub const DEFAULT_BACKLOG: u32 = 4096;

/// An fd received through socket activation, not yet checked.
#[derive(Debug)]
pub struct ActivatedFd {
    pub fd: OwnedFd,
    pub name: String,
    /// The socket unit it came from, when known: its fd name when that is a unit name
    /// (`baton.socket`), or what the previous generation said ([`SOCKET_UNITS_ENV`]).
    pub unit: Option<String>,
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
    /// For a socket unit's socket, the unit's name when known (for messages).
    pub unit: Option<String>,
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

/// A socket a listener serves: a listening TCP or unix stream socket, or a bound UDP socket.
#[derive(Debug)]
pub enum Socket {
    Tcp(std::net::TcpListener),
    Unix(StdUnixListener),
    /// A bound, unconnected UDP socket (`udp:ADDR`), e.g. for DNS or QUIC: it has no
    /// connections to accept, and is handed over like the others.
    Udp(std::net::UdpSocket),
}

impl Socket {
    /// Where the socket listens, as a [`ListenAddress`] is written: `127.0.0.1:8080`,
    /// `unix:/path` or `udp:127.0.0.1:53`.
    pub fn local_address(&self) -> String {
        match self {
            Socket::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|e| format!("?({e})")),
            Socket::Udp(s) => s
                .local_addr()
                .map(|a| format!("{UDP_PREFIX}{a}"))
                .unwrap_or_else(|e| format!("{UDP_PREFIX}?({e})")),
            Socket::Unix(l) => match l.local_addr() {
                Ok(a) => match a.as_pathname() {
                    Some(p) => format!("unix:{}", p.display()),
                    None => "unix:(unnamed)".to_owned(),
                },
                Err(e) => format!("unix:?({e})"),
            },
        }
    }

    /// The socket unit setting that makes such a socket, for messages.
    fn unit_setting(&self) -> &'static str {
        match self {
            Socket::Tcp(_) | Socket::Unix(_) => STREAM_SETTING,
            Socket::Udp(_) => DATAGRAM_SETTING,
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
                Socket::Udp(s) => Socket::Udp(s.try_clone()?),
            },
            activated_fd: None,
            self_bound: self.self_bound,
            unit: self.unit.clone(),
        })
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.socket {
            Socket::Tcp(l) => l.as_fd(),
            Socket::Unix(l) => l.as_fd(),
            Socket::Udp(s) => s.as_fd(),
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

/// The protocol's variables as this process found them (`None`: unset).
#[derive(Debug, Default, Clone)]
struct ListenEnv {
    pid: Option<String>,
    fds: Option<String>,
    first_fd: Option<String>,
    names: Option<String>,
}

impl ListenEnv {
    fn from_env() -> ListenEnv {
        // A value that is not UTF-8 stays set and fails to parse, rather than counting as unset.
        let var = |name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
        ListenEnv {
            pid: var("LISTEN_PID"),
            fds: var("LISTEN_FDS"),
            first_fd: var("LISTEN_FDS_FIRST_FD"),
            names: var("LISTEN_FDNAMES"),
        }
    }
}

/// What the variables say.
#[derive(Debug, PartialEq, Eq)]
enum Intake {
    /// No fds for this process.
    NotOurs,
    /// Fds `first .. first+names.len()`, with their names (empty without `LISTEN_FDNAMES`).
    Fds { first: RawFd, names: Vec<String> },
}

/// baton's rules for the variables (see the module docs), for the process `my_pid`.
fn intake(env: &ListenEnv, my_pid: u32) -> Result<Intake, ActivationError> {
    const HINT: &str =
        "whatever started this process must pass the number of fds in LISTEN_FDS, and \
                        LISTEN_PID (systemd) or LISTEN_FDS_FIRST_FD (systemfd --no-pid)";
    match &env.pid {
        Some(pid) => match pid.parse::<u32>() {
            Ok(pid) if pid == my_pid => {}
            // Meant for another process (sd_listen_fds(3)).
            Ok(_) => return Ok(Intake::NotOurs),
            Err(_) => {
                return error(format!(
                    "socket activation: LISTEN_PID={pid:?} is not a process id; {HINT}"
                ))
            }
        },
        // Left from a process that started ours, or passed on by one: not ours to take.
        None if env.first_fd.is_none() => return Ok(Intake::NotOurs),
        // systemfd --no-pid.
        None => {}
    }
    let Some(count) = &env.fds else {
        return Ok(Intake::NotOurs);
    };
    let n = count.parse::<u32>().map_err(|_| {
        ActivationError(format!(
            "socket activation: LISTEN_FDS={count:?} is not a number of fds; {HINT}"
        ))
    })?;
    let first = match &env.first_fd {
        None => FIRST_FD,
        Some(first) => first
            .parse::<RawFd>()
            .ok()
            .filter(|f| *f >= FIRST_FD)
            .ok_or_else(|| {
                ActivationError(format!(
                    "socket activation: LISTEN_FDS_FIRST_FD={first:?} is not an fd number of 3 or more \
                     (0 to 2 are stdin, stdout and stderr); pass the number of the first socket, \
                     or leave it unset for 3"
                ))
            })?,
    };
    if RawFd::try_from(n)
        .ok()
        .and_then(|n| first.checked_add(n))
        .is_none()
    {
        return error(format!(
            "socket activation: LISTEN_FDS={count:?} from fd {first} goes past the largest fd number; {HINT}"
        ));
    }
    let names = match &env.names {
        _ if n == 0 => Vec::new(),
        None => vec![String::new(); n as usize],
        Some(names) => {
            let names: Vec<String> = names.split(':').map(str::to_owned).collect();
            if names.len() != n as usize {
                return error(format!(
                    "socket activation: LISTEN_FDNAMES={:?} gives {} names for LISTEN_FDS={n} fds; \
                     whatever started this process must pass one name per fd (or no LISTEN_FDNAMES)",
                    env.names.as_deref().unwrap_or_default(),
                    names.len()
                ));
            }
            names
        }
    };
    Ok(Intake::Fds { first, names })
}

/// Takes the fds passed with `LISTEN_FDS` if they are meant for this process (see the module
/// docs), and removes the `LISTEN_*` variables so that no child inherits them.
///
/// Returns an empty list when they are not meant for this process. The fds come from
/// [`listenfd`], once baton's rules have accepted the variables; each is checked to be open
/// and marked close-on-exec (baton hands sockets to its children explicitly).
///
/// # Safety
/// Changes the environment: call it before any other thread exists.
pub unsafe fn take_activated() -> Result<Vec<ActivatedFd>, ActivationError> {
    let units = std::env::var(SOCKET_UNITS_ENV).unwrap_or_default();
    let mut units = units.split('/').map(str::to_owned);
    let decided = intake(&ListenEnv::from_env(), std::process::id());
    let mut taken = match decided {
        // Reads LISTEN_FDS, LISTEN_PID and LISTEN_FDS_FIRST_FD, which baton has accepted.
        Ok(Intake::Fds { .. }) => listenfd::ListenFd::from_env(),
        _ => listenfd::ListenFd::empty(),
    };
    for var in *LISTEN_VARS {
        // SAFETY (of the contract above): no other thread reads the environment yet.
        unsafe { std::env::remove_var(var) };
    }
    let Intake::Fds { first, names } = decided? else {
        return Ok(Vec::new());
    };
    let count = names.len();
    if taken.len() != count {
        return error(format!(
            "socket activation: the listenfd crate found {} fds where it expects {count} from fd {first}; \
             this is a bug in baton-lifecycle",
            taken.len()
        ));
    }
    names
        .into_iter()
        .enumerate()
        .map(|(i, name)| {
            let expected = first + i as RawFd;
            let raw = match taken.take_raw_fd(i) {
                Ok(Some(raw)) if raw == expected => raw,
                other => {
                    return error(format!(
                        "socket activation: the listenfd crate gave {other:?} for fd {expected}; \
                         this is a bug in baton-lifecycle"
                    ))
                }
            };
            // The fd must be open, or OwnedFd would later close a number that is not ours.
            let flags = unsafe { libc::fcntl(raw, libc::F_GETFD) };
            if flags < 0 {
                return error(format!(
                    "socket activation: fd {raw} is not open, but LISTEN_FDS={count} from fd {first} \
                     announces it; whatever started this process passed fewer fds than it announced"
                ));
            }
            // SAFETY: the fd is open and, per the checks above, was handed to this process to own.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            if flags & libc::FD_CLOEXEC == 0 {
                nix::fcntl::fcntl(
                    &fd,
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::from_bits_truncate(
                        flags | libc::FD_CLOEXEC,
                    )),
                )
                .map_err(|e| {
                    ActivationError(format!(
                        "socket activation: fd {raw}: cannot set close-on-exec: {e}"
                    ))
                })?;
            }
            let unit = match units.next().filter(|u| !u.is_empty()) {
                Some(unit) => Some(unit),
                None => name.ends_with(".socket").then(|| name.clone()),
            };
            Ok(ActivatedFd { fd, name, unit })
        })
        .collect()
}

/// Checks the activated fds, matches them to `specs`, and binds the specs left over.
///
/// Stale stored fds (see the module docs) are closed here and noted for removal from systemd's
/// fd store; a stored fd kept under another listener's name is noted too, so that the store
/// holds it under its new name only.
pub fn resolve(
    specs: &[ListenSpec],
    activated: Vec<ActivatedFd>,
) -> Result<Vec<Listener>, ActivationError> {
    resolve_with(specs, activated, DEFAULT_BACKLOG)
}

/// [`resolve`], binding the stream sockets with a listen backlog of `backlog` (see
/// [`DEFAULT_BACKLOG`]).
pub fn resolve_with(
    specs: &[ListenSpec],
    activated: Vec<ActivatedFd>,
    backlog: u32,
) -> Result<Vec<Listener>, ActivationError> {
    let (mut listeners, stale) = match_fds(specs, activated)?;
    for (name, fd, why) in stale {
        fdstore::remove_later(&name, fd, why);
    }
    for spec in specs {
        if !listeners.iter().any(|l| l.name == spec.name) {
            listeners.push(Listener {
                name: spec.name.clone(),
                socket: bind_with(&spec.address, backlog)
                    .map_err(|e| ActivationError(format!("listener {spec}: {e}")))?,
                activated_fd: None,
                self_bound: true,
                unit: None,
            });
        }
    }
    Ok(listeners)
}

/// A stored fd that serves no listener (or serves one under a new name): its name, the fd
/// number it had, and why.
type Stale = (String, RawFd, String);

/// Whether `spec` is the built-in listener (no `listen` configured): a socket unit's address
/// then differs from it by design, which is no reason to warn.
fn is_builtin(spec: &ListenSpec) -> bool {
    *spec == builtin_listener()
}

/// The name of a listener given as a bare address (`127.0.0.1:8080`).
pub const DEFAULT_LISTENER_NAME: &str = "http";

/// baton's built-in listener, `http=127.0.0.1:8080`: a socket unit's address differs from it by
/// design, so that difference is not warned about.
pub fn builtin_listener() -> ListenSpec {
    ListenSpec {
        name: DEFAULT_LISTENER_NAME.to_owned(),
        address: ListenAddress::Tcp(std::net::SocketAddr::from(([127, 0, 0, 1], 8080))),
    }
}

/// Matches the activated fds to `specs`: the listeners they serve, and the stored fds that serve
/// none (closed already).
///
/// A socket unit's fd serves the listener of its name (its address cannot change here: a
/// configured address that differs is warned about), else, with a single listener, an unnamed
/// one serves it, else it serves the listener configured with its very address (renamed).
/// A stored (self-bound) fd serves the listener configured with its address, preferably one of
/// its own name (renamed, or addresses swapped between listeners); one whose listener now
/// has another address, or is gone, is stale: closed here, and the listener is bound afresh.
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
    let mut listeners: Vec<Listener> = Vec::new();
    let mut unnamed = Vec::new();
    for ActivatedFd { fd, name, unit } in unit {
        let raw = fd.as_raw_fd();
        match specs.iter().find(|s| s.name == name) {
            Some(spec) => {
                let socket = check_fd(fd, &name)?;
                if let Some(why) = kind_mismatch(&socket, spec, raw, &name) {
                    return error(why);
                }
                listeners.push(Listener {
                    name: spec.name.clone(),
                    socket,
                    activated_fd: Some(raw),
                    self_bound: false,
                    unit,
                })
            }
            None => unnamed.push((check_fd(fd, &name)?, raw, name, unit)),
        }
    }
    for (socket, raw, name, unit) in unnamed {
        let target = match single {
            // A unit known by name had its fd named after it (then renamed by a handover).
            Some(only) if name.is_empty() || name.ends_with(".socket") || unit.is_some() => only,
            _ => match specs.iter().find(|s| {
                has_port(&s.address)
                    && same_address(&socket, &s.address)
                    && !listeners.iter().any(|l| l.name == s.name)
            }) {
                Some(spec) => spec.name.as_str(),
                None if name.is_empty() => {
                    return error(format!(
                        "socket activation: fd {raw} has no name, and with several listeners \
                         (configured: {}) this process cannot tell which one it serves; name the fds in \
                         order with FileDescriptorName= (systemd) or LISTEN_FDNAMES= (systemfd)",
                        configured()
                    ))
                }
                None => {
                    return error(format!(
                        "socket activation: fd {raw} is named '{name}' but no listener has that name \
                         (configured: {}); add --listen {name}=ADDR or set FileDescriptorName= to one of them; \
                         it listens on {}: to drop it, remove it from {} ({})",
                        configured(),
                        socket.local_address(),
                        unit.as_deref().unwrap_or("its socket unit"),
                        socket.unit_setting()
                    ))
                }
            },
        };
        let spec = specs
            .iter()
            .find(|s| s.name == target)
            .expect("a configured listener");
        if let Some(why) = kind_mismatch(&socket, spec, raw, &name) {
            return error(why);
        }
        listeners.push(Listener {
            name: target.to_owned(),
            socket,
            activated_fd: Some(raw),
            self_bound: false,
            unit,
        });
    }
    // A socket unit's sockets cannot change here: say where to change them.
    for spec in specs.iter().filter(|s| !is_builtin(s)) {
        let served: Vec<&Listener> = listeners.iter().filter(|l| l.name == spec.name).collect();
        if !served.is_empty()
            && !served
                .iter()
                .any(|l| same_address(&l.socket, &spec.address))
        {
            let have: Vec<String> = served.iter().map(|l| l.socket.local_address()).collect();
            warn_later(unit_address_warning(
                &spec.name,
                served[0].unit.as_deref(),
                &have.join(", "),
                &spec.address.to_string(),
            ));
        }
    }

    let mut stale = Vec::new();
    // Stored fds that are listening sockets, not yet taken.
    let mut candidates: Vec<(Option<Socket>, RawFd, String)> = Vec::new();
    for ActivatedFd { fd, name, .. } in stored {
        let raw = fd.as_raw_fd();
        let listener = fdstore::listener_of(&name).expect("partitioned on it");
        if listeners
            .iter()
            .any(|l| l.name == listener && !l.self_bound)
        {
            drop(fd);
            stale.push((
                name.clone(),
                raw,
                format!("a socket unit's fd serves listener '{listener}' now"),
            ));
            continue;
        }
        // check_fd closes the fd when it fails.
        match check_fd(fd, &name) {
            Err(e) => stale.push((name, raw, e.0)),
            Ok(socket) => candidates.push((Some(socket), raw, name)),
        }
    }
    let wanted =
        |spec: &ListenSpec, listeners: &[Listener]| !listeners.iter().any(|l| l.name == spec.name);
    // First a stored fd of the listener's own name on the address it wants (port 0: any),
    // then one of another name on its exact address.
    for own_name in [true, false] {
        for spec in specs {
            if !wanted(spec, &listeners) {
                continue;
            }
            let found = candidates.iter_mut().find(|(socket, _, name)| {
                let Some(socket) = socket else { return false };
                let named = fdstore::listener_of(name) == Some(spec.name.as_str());
                if own_name {
                    named && same_address(socket, &spec.address)
                } else {
                    has_port(&spec.address) && same_address(socket, &spec.address)
                }
            });
            if let Some((socket, raw, name)) = found {
                let socket = socket.take().expect("found a socket");
                if !own_name {
                    // The store must forget the old name: it holds the socket under the new
                    // one from now on (it ignores an fd it holds already).
                    stale.push((
                        name.clone(),
                        *raw,
                        format!(
                            "its socket on {} serves listener '{}' now (renamed)",
                            socket.local_address(),
                            spec.name
                        ),
                    ));
                }
                listeners.push(Listener {
                    name: spec.name.clone(),
                    socket,
                    activated_fd: Some(*raw),
                    self_bound: true,
                    unit: None,
                });
            }
        }
    }
    for (socket, raw, name) in candidates {
        let Some(socket) = socket else { continue };
        let listener = fdstore::listener_of(&name).expect("partitioned on it");
        let why = match specs.iter().find(|s| s.name == listener) {
            None => format!(
                "no listener '{listener}' is configured anymore (configured: {})",
                configured()
            ),
            Some(spec) => kind_mismatch(&socket, spec, raw, &name).unwrap_or_else(|| {
                format!(
                    "listener '{listener}' is configured on {} now, not on {}",
                    spec.address,
                    socket.local_address()
                )
            }),
        };
        drop(socket);
        stale.push((name, raw, why));
    }
    let mut seen = Vec::new();
    stale.retain(|(name, _, _)| {
        let first = !seen.contains(name);
        seen.push(name.clone());
        first
    });
    Ok((listeners, stale))
}

/// Whether `address` names a fixed port (or is a unix path): only such an address identifies
/// a socket across a rename.
fn has_port(address: &ListenAddress) -> bool {
    match address {
        ListenAddress::Tcp(a) | ListenAddress::Udp(a) => a.port() != 0,
        ListenAddress::Unix(_) => true,
    }
}

/// Whether `have`, an address as [`Socket::local_address`] writes it (e.g. from `baton
/// status`), is where `address` says (port 0 matches any port).
pub fn address_is(have: &str, address: &ListenAddress) -> bool {
    match address {
        ListenAddress::Tcp(want) => have.parse::<std::net::SocketAddr>().is_ok_and(|have| {
            have.ip() == want.ip() && (want.port() == 0 || have.port() == want.port())
        }),
        ListenAddress::Unix(want) => have.strip_prefix("unix:") == want.to_str(),
        ListenAddress::Udp(want) => have
            .strip_prefix(UDP_PREFIX)
            .and_then(|have| have.parse::<std::net::SocketAddr>().ok())
            .is_some_and(|have| {
                have.ip() == want.ip() && (want.port() == 0 || have.port() == want.port())
            }),
    }
}

/// What a running generation's sockets (as `baton status` reports them: `listener`, `address`,
/// `unit`, `self_bound`) mean for the configuration `specs` at the next reload: one line per
/// socket unit's socket whose address the configuration changes (a warning: the reload keeps
/// the socket), and one per socket unit's socket whose listener the configuration drops (an
/// error: the reload would fail).
pub fn compare_with_running(
    specs: &[ListenSpec],
    sockets: &[serde_json::Value],
) -> (Vec<String>, Vec<String>) {
    let (mut warnings, mut errors) = (Vec::new(), Vec::new());
    let unit_sockets: Vec<(&str, &str, Option<&str>)> = sockets
        .iter()
        .filter(|s| s["self_bound"] == false)
        .filter_map(|s| {
            Some((
                s["listener"].as_str()?,
                s["address"].as_str()?,
                s["unit"].as_str(),
            ))
        })
        .collect();
    for spec in specs.iter().filter(|s| !is_builtin(s)) {
        let served: Vec<_> = unit_sockets
            .iter()
            .filter(|(l, _, _)| *l == spec.name)
            .collect();
        if !served.is_empty() && !served.iter().any(|(_, a, _)| address_is(a, &spec.address)) {
            let have: Vec<&str> = served.iter().map(|(_, a, _)| *a).collect();
            warnings.push(unit_address_warning(
                &spec.name,
                served[0].2,
                &have.join(", "),
                &spec.address.to_string(),
            ));
        }
    }
    let single_and_unit = specs.len() == 1;
    for (listener, address, unit) in &unit_sockets {
        let kept = specs.iter().any(|s| s.name == *listener)
            || (single_and_unit && unit.is_some())
            || specs
                .iter()
                .any(|s| has_port(&s.address) && address_is(address, &s.address));
        if !kept {
            errors.push(format!(
                "listener {listener}: its socket on {address} comes from {} ({}) and no \
                 listener is configured for it, so a reload would fail; remove it there, or keep \
                 the listener",
                unit.unwrap_or("its socket unit"),
                if address.starts_with(UDP_PREFIX) {
                    DATAGRAM_SETTING
                } else {
                    STREAM_SETTING
                }
            ));
        }
    }
    (warnings, errors)
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
        (Socket::Udp(s), ListenAddress::Udp(want)) => s.local_addr().is_ok_and(|have| {
            have.ip() == want.ip() && (want.port() == 0 || have.port() == want.port())
        }),
        _ => false,
    }
}

/// Why `socket`, the fd `raw` named `name`, cannot serve `spec` because one is a stream socket
/// and the other a datagram one, if so: one line. (A TCP socket for a unix listener, or the
/// other way round, is served with a warning about the address instead, as a socket unit's
/// address cannot change here.)
fn kind_mismatch(socket: &Socket, spec: &ListenSpec, raw: RawFd, name: &str) -> Option<String> {
    let what = fd_label(raw, name);
    match (socket, &spec.address) {
        (Socket::Udp(_), ListenAddress::Udp(_))
        | (Socket::Tcp(_) | Socket::Unix(_), ListenAddress::Tcp(_) | ListenAddress::Unix(_)) => {
            None
        }
        (Socket::Udp(_), _) => Some(format!(
            "{what} is a datagram (UDP) socket, not a stream socket, but listener {} ({}) takes \
             a listening stream socket; pass one ({STREAM_SETTING}, not {DATAGRAM_SETTING})",
            spec.name, spec.address
        )),
        (_, ListenAddress::Udp(_)) => Some(format!(
            "{what} is a stream socket ({}), not a datagram socket, but listener {} ({}) takes a \
             UDP socket; pass one ({DATAGRAM_SETTING}, not {STREAM_SETTING})",
            socket.local_address(),
            spec.name,
            spec.address
        )),
    }
}

/// How messages name the fd `raw` named `name`.
fn fd_label(raw: RawFd, name: &str) -> String {
    if name.is_empty() {
        format!("socket activation: fd {raw}")
    } else {
        format!("socket activation: fd {raw} ('{name}')")
    }
}

/// Verifies that `fd` is a socket a listener can serve: a listening stream socket (IPv4, IPv6
/// or unix), or an unconnected IPv4 or IPv6 datagram (UDP) socket; and wraps it. Whether it
/// fits the listener it is matched to is [`kind_mismatch`]'s question.
fn check_fd(fd: OwnedFd, name: &str) -> Result<Socket, ActivationError> {
    let what = fd_label(fd.as_raw_fd(), name);
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
            "{what} is {is}, not a socket; pass listening stream sockets ({STREAM_SETTING} in the \
             socket unit), or UDP sockets ({DATAGRAM_SETTING}) for UDP listeners"
        ));
    }
    let ty = socket::getsockopt(&fd, sockopt::SockType)
        .map_err(|e| ActivationError(format!("{what}: cannot read its type: {e}")))?;
    let addr: SockaddrStorage = socket::getsockname(fd.as_raw_fd())
        .map_err(|e| ActivationError(format!("{what}: getsockname failed: {e}")))?;
    let family = addr.family();
    let inet = matches!(family, Some(AddressFamily::Inet | AddressFamily::Inet6));
    match ty {
        socket::SockType::Stream => {
            let listening = socket::getsockopt(&fd, sockopt::AcceptConn)
                .map_err(|e| ActivationError(format!("{what}: cannot read SO_ACCEPTCONN: {e}")))?;
            if !listening {
                return error(format!(
                    "{what} is a connected socket, not a listening one; use Accept=no in the socket unit"
                ));
            }
        }
        socket::SockType::Datagram if inet => {
            // A connected UDP socket receives from one peer only: not a server's socket.
            if socket::getpeername::<SockaddrStorage>(fd.as_raw_fd()).is_ok() {
                return error(format!(
                    "{what} is a connected datagram (UDP) socket; pass an unconnected one \
                     ({DATAGRAM_SETTING} with Accept=no in the socket unit)"
                ));
            }
        }
        socket::SockType::Datagram => {
            return error(format!(
                "{what} is a {} datagram socket; datagram sockets are served for IPv4 and IPv6 \
                 (udp:IP:PORT) only, stream sockets for IPv4, IPv6 and unix ({STREAM_SETTING})",
                family.map_or("unknown".to_owned(), |f| format!("{f:?}"))
            ));
        }
        _ => {
            return error(format!(
                "{what} is a {} socket, neither a stream nor a datagram socket; pass listening \
                 stream sockets ({STREAM_SETTING}), or UDP sockets ({DATAGRAM_SETTING}) for UDP \
                 listeners",
                match ty {
                    socket::SockType::SeqPacket => "seqpacket",
                    socket::SockType::Raw => "raw",
                    _ => "non-stream",
                }
            ));
        }
    }
    // tokio's from_std requires non-blocking sockets. O_NONBLOCK is on the open file
    // description, which an upgrade shares between two processes: both want it set.
    set_nonblocking(&fd).map_err(|e| ActivationError(format!("{what}: {e}")))?;
    match family {
        Some(AddressFamily::Inet | AddressFamily::Inet6) if ty == socket::SockType::Datagram => {
            Ok(Socket::Udp(fd.into()))
        }
        Some(AddressFamily::Inet | AddressFamily::Inet6) => Ok(Socket::Tcp(fd.into())),
        Some(AddressFamily::Unix) => Ok(Socket::Unix(fd.into())),
        other => error(format!(
            "{what} is a {} socket; listeners take IPv4, IPv6 and unix sockets",
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

/// Binds a listener baton was not handed, with the [`DEFAULT_BACKLOG`].
pub fn bind(address: &ListenAddress) -> io::Result<Socket> {
    bind_with(address, DEFAULT_BACKLOG)
}

/// Binds a listener baton was not handed; a stream socket listens with `backlog` (capped at
/// `i32::MAX`; the kernel caps it again at `net.core.somaxconn`).
pub fn bind_with(address: &ListenAddress, backlog: u32) -> io::Result<Socket> {
    use socket2::{Domain, SockAddr, Socket as S, Type};
    let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
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
            s.listen(backlog)?;
            s.set_nonblocking(true)?;
            Ok(Socket::Tcp(s.into()))
        }
        ListenAddress::Unix(path) => {
            remove_stale_unix_socket(path)?;
            let s = S::new(Domain::UNIX, Type::STREAM, None)?;
            s.bind(&SockAddr::unix(path)?)
                .map_err(|e| explain_bind(e, address))?;
            s.listen(backlog)?;
            s.set_nonblocking(true)?;
            Ok(Socket::Unix(StdUnixListener::from(OwnedFd::from(s))))
        }
        ListenAddress::Udp(addr) => {
            // No SO_REUSEADDR, unlike TCP: a UDP socket leaves no TIME_WAIT behind for it to
            // skip, and on Linux it would let a second process bind the very same port (when
            // both set it) and take the datagrams, instead of failing with "address in use".
            let s = S::new(Domain::for_address(*addr), Type::DGRAM, None)?;
            if addr.is_ipv6() {
                // As for TCP: udp:[::]:53 is IPv6 only; list udp:0.0.0.0:53 as well for both.
                s.set_only_v6(true)?;
            }
            s.bind(&(*addr).into())
                .map_err(|e| explain_bind(e, address))?;
            s.set_nonblocking(true)?;
            Ok(Socket::Udp(s.into()))
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

/// One listener: a name (matched against `LISTEN_FDNAMES`) and the address to bind when the
/// socket is not handed over by the service manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSpec {
    pub name: String,
    pub address: ListenAddress,
}

/// Where a listener listens, written `IP:PORT` or `[IPv6]:PORT` (TCP), `unix:/path` (unix
/// stream socket) or `udp:IP:PORT` / `udp:[IPv6]:PORT` (UDP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddress {
    Tcp(SocketAddr),
    Unix(PathBuf),
    /// A UDP socket (`udp:IP:PORT`), served as [`Socket::Udp`].
    Udp(SocketAddr),
}

impl fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddress::Tcp(addr) => write!(f, "{addr}"),
            ListenAddress::Unix(path) => write!(f, "unix:{}", path.display()),
            ListenAddress::Udp(addr) => write!(f, "{UDP_PREFIX}{addr}"),
        }
    }
}

impl ListenSpec {
    /// A TCP listener `name` on `address` when nothing is passed under that name.
    pub fn tcp(name: &str, address: SocketAddr) -> ListenSpec {
        ListenSpec {
            name: name.to_owned(),
            address: ListenAddress::Tcp(address),
        }
    }

    /// A UDP socket `name` on `address` when nothing is passed under that name.
    pub fn udp(name: &str, address: SocketAddr) -> ListenSpec {
        ListenSpec {
            name: name.to_owned(),
            address: ListenAddress::Udp(address),
        }
    }

    /// A unix stream listener `name` at `path` when nothing is passed under that name.
    pub fn unix(name: &str, path: impl Into<PathBuf>) -> ListenSpec {
        ListenSpec {
            name: name.to_owned(),
            address: ListenAddress::Unix(path.into()),
        }
    }
}

impl fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.address)
    }
}

impl FromStr for ListenSpec {
    type Err = String;

    /// Parses `[NAME=]ADDR`, ADDR being `IP:PORT`, `[IPv6]:PORT`, `unix:/path`, `udp:IP:PORT`
    /// or `udp:[IPv6]:PORT`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, addr) = match s.split_once('=') {
            Some((name, addr)) => (name, addr),
            None => (DEFAULT_LISTENER_NAME, s),
        };
        if !valid_listener_name(name) {
            return Err(format!(
                "listener name '{name}' is not valid: use 1 to 255 letters, digits, '.', '_' or '-' \
                 (the same as systemd's FileDescriptorName=)"
            ));
        }
        let address = if let Some(path) = addr.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!(
                    "'{addr}' is not a unix socket address: the path must be absolute, as in unix:/run/baton/http.sock"
                ));
            }
            ListenAddress::Unix(PathBuf::from(path))
        } else if let Some(udp) = addr.strip_prefix(UDP_PREFIX) {
            ListenAddress::Udp(udp.parse().map_err(|_| {
                format!(
                    "'{addr}' is not a UDP address: use udp:IP:PORT or udp:[IPv6]:PORT, as in udp:127.0.0.1:53"
                )
            })?)
        } else {
            ListenAddress::Tcp(addr.parse().map_err(|_| {
                format!("'{addr}' is not a listen address: use IP:PORT, [IPv6]:PORT or unix:/path")
            })?)
        };
        Ok(ListenSpec {
            name: name.to_owned(),
            address,
        })
    }
}

fn valid_listener_name(name: &str) -> bool {
    (1..=255).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
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

    const ME: u32 = 4242;

    fn env(pid: Option<&str>, fds: Option<&str>, first: Option<&str>) -> ListenEnv {
        ListenEnv {
            pid: pid.map(str::to_owned),
            fds: fds.map(str::to_owned),
            first_fd: first.map(str::to_owned),
            names: None,
        }
    }

    fn fds_at(first: RawFd, n: usize) -> Intake {
        Intake::Fds {
            first,
            names: vec![String::new(); n],
        }
    }

    #[test]
    fn systemd_variables_work_as_before() {
        let me = ME.to_string();
        assert_eq!(
            intake(&env(Some(&me), Some("2"), None), ME),
            Ok(fds_at(3, 2))
        );
        let mut named = env(Some(&me), Some("2"), None);
        named.names = Some("http:bound/extra".into());
        assert_eq!(
            intake(&named, ME),
            Ok(Intake::Fds {
                first: 3,
                names: vec!["http".into(), "bound/extra".into()]
            })
        );
        named.names = Some("http".into());
        let err = intake(&named, ME).unwrap_err();
        assert!(
            err.0
                .contains("LISTEN_FDNAMES=\"http\" gives 1 names for LISTEN_FDS=2 fds"),
            "{err}"
        );
        // LISTEN_PID without LISTEN_FDS: nothing to take.
        assert_eq!(intake(&env(Some(&me), None, None), ME), Ok(Intake::NotOurs));
    }

    #[test]
    fn listen_fds_without_listen_pid_or_first_fd_is_ignored() {
        // As before (sd_listen_fds(3): such variables are for another process), although
        // listenfd alone would take fd 3 then.
        assert_eq!(intake(&env(None, Some("1"), None), ME), Ok(Intake::NotOurs));
        assert_eq!(
            intake(&env(None, Some("abc"), None), ME),
            Ok(Intake::NotOurs)
        );
    }

    #[test]
    fn listen_pid_of_another_process_is_ignored() {
        for first in [None, Some("3")] {
            assert_eq!(
                intake(&env(Some("1"), Some("1"), first), ME),
                Ok(Intake::NotOurs)
            );
        }
    }

    #[test]
    fn systemfd_without_pid_is_taken() {
        // systemfd --no-pid -s http::8080
        assert_eq!(
            intake(&env(None, Some("1"), Some("3")), ME),
            Ok(fds_at(3, 1))
        );
        // Elsewhere than 3 is honoured, with or without LISTEN_PID.
        assert_eq!(
            intake(&env(None, Some("2"), Some("7")), ME),
            Ok(fds_at(7, 2))
        );
        assert_eq!(
            intake(&env(Some(&ME.to_string()), Some("1"), Some("5")), ME),
            Ok(fds_at(5, 1))
        );
        // LISTEN_FDS_FIRST_FD alone: nothing to take.
        assert_eq!(intake(&env(None, None, Some("3")), ME), Ok(Intake::NotOurs));
    }

    #[test]
    fn malformed_variables_are_one_line_errors() {
        let me = ME.to_string();
        for (e, needle) in [
            (
                env(Some("x"), Some("1"), None),
                "LISTEN_PID=\"x\" is not a process id",
            ),
            (
                env(Some(""), Some("1"), None),
                "LISTEN_PID=\"\" is not a process id",
            ),
            (
                env(Some(&me), Some("abc"), None),
                "LISTEN_FDS=\"abc\" is not a number of fds",
            ),
            (
                env(None, Some("-1"), Some("3")),
                "LISTEN_FDS=\"-1\" is not a number of fds",
            ),
            (
                env(None, Some("1"), Some("2")),
                "LISTEN_FDS_FIRST_FD=\"2\" is not an fd number of 3 or more",
            ),
            (env(None, Some("1"), Some("0")), "LISTEN_FDS_FIRST_FD=\"0\""),
            (
                env(None, Some("1"), Some("-3")),
                "LISTEN_FDS_FIRST_FD=\"-3\"",
            ),
            (env(None, Some("1"), Some("")), "LISTEN_FDS_FIRST_FD=\"\""),
            (
                env(None, Some("4294967295"), Some("3")),
                "goes past the largest fd number",
            ),
            (
                env(None, Some("2"), Some("2147483647")),
                "goes past the largest fd number",
            ),
        ] {
            let err = intake(&e, ME).unwrap_err();
            assert!(err.0.contains(needle), "{e:?}: want {needle:?} in {err}");
            assert!(!err.0.contains('\n'), "{err}");
        }
    }

    #[test]
    fn single_unnamed_fd_serves_single_listener() {
        for name in ["", "baton.socket", "http"] {
            let l = resolve(
                &[spec("http=127.0.0.1:1")],
                vec![ActivatedFd {
                    fd: tcp_listener(),
                    name: name.into(),
                    unit: None,
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
                unit: None,
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

    #[test]
    fn an_unnamed_fd_with_several_listeners_asks_for_names() {
        // systemfd gives no names.
        let err = resolve(
            &[spec("http=127.0.0.1:1"), spec("admin=127.0.0.1:2")],
            vec![ActivatedFd {
                fd: tcp_listener(),
                name: String::new(),
                unit: None,
            }],
        )
        .unwrap_err();
        assert!(
            err.0
                .contains("has no name, and with several listeners (configured: http, admin)")
                && err.0.contains("LISTEN_FDNAMES= (systemfd)"),
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
            unit: None,
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
                unit: None,
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

    fn fd_on(name: &str) -> (ActivatedFd, String) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let fd = ActivatedFd {
            fd: OwnedFd::from(l),
            name: name.into(),
            unit: None,
        };
        (fd, addr)
    }

    #[test]
    fn a_stored_fd_follows_its_address_to_a_renamed_listener() {
        let (old, addr) = fd_on("bound/http");
        let specs = [spec(&format!("web={addr}"))];
        let (l, stale) = match_fds(&specs, vec![old]).unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].name, "web");
        assert!(l[0].self_bound && l[0].activated_fd.is_some());
        assert_eq!(l[0].socket.local_address(), addr);
        // The store forgets the old name, so that the push as bound/web is not a duplicate.
        assert_eq!(names(&stale), ["bound/http"]);
        assert!(
            stale[0].2.contains("serves listener 'web' now (renamed)"),
            "{stale:?}"
        );
    }

    #[test]
    fn a_stored_fd_whose_listener_moved_is_stale_and_addresses_can_swap() {
        let (a, addr_a) = fd_on("bound/a");
        let (b, addr_b) = fd_on("bound/b");
        let (c, addr_c) = fd_on("bound/c");
        let specs = [
            spec(&format!("a={addr_b}")),
            spec(&format!("b={addr_a}")),
            spec("c=127.0.0.1:1"),
        ];
        let (l, stale) = match_fds(&specs, vec![a, b, c]).unwrap();
        let on = |n: &str| {
            l.iter()
                .find(|l| l.name == n)
                .map(|l| l.socket.local_address())
        };
        assert_eq!(on("a"), Some(addr_b));
        assert_eq!(on("b"), Some(addr_a));
        assert_eq!(on("c"), None, "c is bound afresh by resolve");
        let why_c = stale.iter().find(|s| s.0 == "bound/c").unwrap();
        assert!(
            why_c.2 == format!("listener 'c' is configured on 127.0.0.1:1 now, not on {addr_c}"),
            "{why_c:?}"
        );
        assert_eq!(stale.len(), 3, "{stale:?}");
    }

    #[test]
    fn a_socket_unit_fd_keeps_its_address_with_a_warning_naming_the_unit() {
        let (mut fd, addr) = fd_on("baton.socket");
        fd.unit = Some("baton.socket".into());
        let (l, _) = match_fds(&[spec("http=127.0.0.1:1")], vec![fd]).unwrap();
        assert_eq!(l[0].socket.local_address(), addr);
        assert!(!l[0].self_bound);
        let warnings = take_warnings();
        assert!(
            warnings.iter().any(|w| w.starts_with(
                "listener http: the address comes from baton.socket (ListenStream=); change it there"
            )),
            "{warnings:?}"
        );
        // The built-in listener (no `listen` configured) is no reason to warn.
        let (fd, _) = fd_on("baton.socket");
        match_fds(&[builtin_listener()], vec![fd]).unwrap();
        assert!(!take_warnings().iter().any(|w| w.contains("127.0.0.1:8080")));
    }

    #[test]
    fn a_socket_unit_fd_follows_its_address_to_a_renamed_listener() {
        let (fd, addr) = fd_on("http");
        let specs = [spec(&format!("web={addr}")), spec("admin=127.0.0.1:0")];
        let (l, _) = match_fds(&specs, vec![fd]).unwrap();
        assert_eq!(l[0].name, "web");
        // Dropped from the configuration: an error that says where to drop it.
        let (fd, _) = fd_on("http");
        let err = match_fds(&specs, vec![fd]).unwrap_err();
        assert!(
            err.0
                .contains("remove it from its socket unit (ListenStream=)"),
            "{err}"
        );
    }

    #[test]
    fn running_sockets_are_compared_with_the_configuration() {
        let sockets = vec![
            serde_json::json!({"listener": "http", "address": "127.0.0.1:80", "self_bound": false, "unit": "baton.socket"}),
            serde_json::json!({"listener": "extra", "address": "127.0.0.1:81", "self_bound": true, "unit": null}),
        ];
        let (w, e) = compare_with_running(&[spec("http=127.0.0.1:8081")], &sockets);
        assert_eq!(w.len(), 1);
        assert!(w[0].starts_with("listener http: the address comes from baton.socket"));
        assert!(e.is_empty());
        let (w, e) = compare_with_running(&[spec("http=127.0.0.1:80")], &sockets);
        assert!(w.is_empty() && e.is_empty());
        let (w, e) =
            compare_with_running(&[spec("a=127.0.0.1:1"), spec("b=127.0.0.1:2")], &sockets);
        assert!(w.is_empty());
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(address_is(
            "unix:/run/x.sock",
            &spec("x=unix:/run/x.sock").address
        ));
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
        let seqpacket =
            socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None).unwrap();
        let err = check_fd(OwnedFd::from(seqpacket), "x").unwrap_err();
        assert!(
            err.0
                .contains("is a seqpacket socket, neither a stream nor a datagram socket"),
            "{err}"
        );
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

    fn udp_socket() -> (std::net::UdpSocket, String) {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = s.local_addr().unwrap().to_string();
        (s, addr)
    }

    fn udp_fd(name: &str) -> (ActivatedFd, String) {
        let (s, addr) = udp_socket();
        let fd = ActivatedFd {
            fd: OwnedFd::from(s),
            name: name.into(),
            unit: None,
        };
        (fd, addr)
    }

    fn is_nonblocking(fd: BorrowedFd<'_>) -> bool {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).unwrap()).contains(OFlag::O_NONBLOCK)
    }

    #[test]
    fn udp_specs_parse_and_print() {
        let s = spec("dns=udp:127.0.0.1:53");
        assert_eq!(s.name, "dns");
        assert_eq!(
            s.address,
            ListenAddress::Udp("127.0.0.1:53".parse().unwrap())
        );
        assert_eq!(s.to_string(), "dns=udp:127.0.0.1:53");
        let s = spec("udp:[::1]:853");
        assert_eq!(s.name, DEFAULT_LISTENER_NAME);
        assert_eq!(s.address, ListenAddress::Udp("[::1]:853".parse().unwrap()));
        assert_eq!(s.address.to_string(), "udp:[::1]:853");
        for text in ["quic=udp:0.0.0.0:443", "q=udp:[::]:0", "http=127.0.0.1:80"] {
            assert_eq!(spec(text).to_string(), text);
            assert_eq!(spec(&spec(text).to_string()), spec(text));
        }
        // A TCP address and a UDP one on the same port are different addresses.
        assert_ne!(spec("a=udp:127.0.0.1:53"), spec("a=127.0.0.1:53"));
        for bad in [
            "dns=udp:localhost:53",
            "dns=udp:127.0.0.1",
            "dns=udp:",
            "udp:[::1]",
            "dns=udp:unix:/run/x.sock",
            "dns=udp:/run/x.sock",
        ] {
            let err = bad.parse::<ListenSpec>().unwrap_err();
            let addr = bad.split_once('=').map_or(bad, |(_, a)| a);
            assert_eq!(
                err,
                format!(
                    "'{addr}' is not a UDP address: use udp:IP:PORT or udp:[IPv6]:PORT, as in udp:127.0.0.1:53"
                )
            );
        }
        // The other messages are as before.
        assert_eq!(
            "nonsense".parse::<ListenSpec>().unwrap_err(),
            "'nonsense' is not a listen address: use IP:PORT, [IPv6]:PORT or unix:/path"
        );
        assert!("unix:relative"
            .parse::<ListenSpec>()
            .unwrap_err()
            .contains("the path must be absolute"));
        assert!("bad name=udp:127.0.0.1:53"
            .parse::<ListenSpec>()
            .unwrap_err()
            .starts_with("listener name 'bad name' is not valid"));
    }

    #[test]
    fn a_passed_udp_fd_serves_the_udp_listener_of_its_name() {
        let (dns, dns_addr) = udp_fd("dns");
        let (http, http_addr) = fd_on("http");
        let dns_raw = dns.fd.as_raw_fd();
        let specs = [
            spec(&format!("http={http_addr}")),
            spec(&format!("dns=udp:{dns_addr}")),
        ];
        let (l, stale) = match_fds(&specs, vec![dns, http]).unwrap();
        assert!(stale.is_empty(), "{stale:?}");
        let dns = l.iter().find(|l| l.name == "dns").unwrap();
        assert!(matches!(dns.socket, Socket::Udp(_)), "{dns:?}");
        assert_eq!(dns.activated_fd, Some(dns_raw));
        assert!(!dns.self_bound);
        assert_eq!(dns.handover_name(), "dns");
        assert_eq!(dns.socket.local_address(), format!("udp:{dns_addr}"));
        assert_eq!(
            dns.to_string(),
            format!("dns=udp:{dns_addr} (fd {dns_raw}, handed over)")
        );
        assert!(is_nonblocking(dns.as_fd()));
        assert!(same_address(&dns.socket, &specs[1].address));
        assert!(!same_address(
            &dns.socket,
            &spec(&format!("x={dns_addr}")).address
        ));
        // A copy for the upgrade is the same socket.
        let copy = dns.try_clone().unwrap();
        assert!(matches!(copy.socket, Socket::Udp(_)));
        assert_eq!(copy.socket.local_address(), dns.socket.local_address());
        assert!(copy.activated_fd.is_none());
        let http = l.iter().find(|l| l.name == "http").unwrap();
        assert!(matches!(http.socket, Socket::Tcp(_)));
    }

    #[test]
    fn udp_fds_follow_the_same_matching_rules() {
        // A single UDP listener takes an unnamed fd or the socket unit's default name.
        for name in ["", "dns.socket"] {
            let (fd, addr) = udp_fd(name);
            let l = resolve(&[spec("dns=udp:127.0.0.1:0")], vec![fd]).unwrap();
            assert_eq!(l.len(), 1);
            assert_eq!(l[0].name, "dns");
            assert_eq!(l[0].socket.local_address(), format!("udp:{addr}"));
        }
        // A socket unit's fd of another name serves the listener on its very address.
        let (fd, addr) = udp_fd("old");
        let specs = [spec(&format!("dns=udp:{addr}")), spec("http=127.0.0.1:0")];
        let (l, _) = match_fds(&specs, vec![fd]).unwrap();
        assert_eq!(l[0].name, "dns");
        // A stored one serves its listener and stays self-bound...
        let (fd, addr) = udp_fd("bound/dns");
        let specs = [spec(&format!("dns=udp:{addr}"))];
        let (l, stale) = match_fds(&specs, vec![fd]).unwrap();
        assert!(stale.is_empty(), "{stale:?}");
        assert!(l[0].self_bound && l[0].activated_fd.is_some());
        assert_eq!(l[0].handover_name(), "bound/dns");
        // ...follows its address to a renamed listener...
        let (fd, addr) = udp_fd("bound/dns");
        let (l, stale) = match_fds(&[spec(&format!("resolver=udp:{addr}"))], vec![fd]).unwrap();
        assert_eq!(l[0].name, "resolver");
        assert!(
            stale[0].2.contains(&format!(
                "its socket on udp:{addr} serves listener 'resolver' now"
            )),
            "{stale:?}"
        );
        // ...and is stale once its listener moved.
        let (fd, addr) = udp_fd("bound/dns");
        let (l, stale) = match_fds(&[spec("dns=udp:127.0.0.2:53")], vec![fd]).unwrap();
        assert!(l.is_empty());
        assert_eq!(
            stale[0].2,
            format!("listener 'dns' is configured on udp:127.0.0.2:53 now, not on udp:{addr}")
        );
        // An unknown name is an error that names the datagram setting.
        let (fd, _) = udp_fd("other");
        let err = match_fds(
            &[spec("dns=udp:127.0.0.1:0"), spec("b=127.0.0.1:0")],
            vec![fd],
        )
        .unwrap_err();
        assert!(
            err.0.contains("no listener has that name") && err.0.contains("(ListenDatagram=)"),
            "{err}"
        );
    }

    #[test]
    fn udp_listeners_are_bound_when_not_passed() {
        let l = resolve(&[spec("dns=udp:127.0.0.1:0")], vec![]).unwrap();
        assert_eq!(l.len(), 1);
        let Socket::Udp(socket) = &l[0].socket else {
            panic!("{:?}", l[0])
        };
        assert!(l[0].self_bound && l[0].activated_fd.is_none());
        assert_eq!(l[0].handover_name(), "bound/dns");
        assert!(is_nonblocking(socket.as_fd()));
        let addr = socket.local_addr().unwrap();
        assert!(l[0]
            .to_string()
            .starts_with(&format!("dns=udp:{addr} (bound)")));
        // It receives.
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"ping", addr).unwrap();
        let mut buf = [0; 8];
        let mut got = None;
        for _ in 0..200 {
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    got = Some((buf[..n].to_vec(), from));
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, Some((b"ping".to_vec(), client.local_addr().unwrap())));
        // No SO_REUSEADDR: a second socket on the same port is refused, as for TCP.
        let err = bind(&ListenAddress::Udp(addr)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        assert!(
            err.to_string()
                .starts_with(&format!("cannot bind udp:{addr}: ")),
            "{err}"
        );
        // The same port over TCP is another socket.
        let tcp = bind(&ListenAddress::Tcp(addr));
        if let Ok(tcp) = tcp {
            assert_eq!(tcp.local_address(), addr.to_string());
        }
    }

    #[test]
    fn a_datagram_fd_for_a_stream_listener_and_the_reverse_are_errors() {
        // A socket unit's UDP fd for a TCP listener, by name or as the single listener.
        for name in ["http", "", "baton.socket"] {
            let (fd, _) = udp_fd(name);
            let err = match_fds(&[spec("http=127.0.0.1:0")], vec![fd]).unwrap_err();
            assert!(
                err.0.contains("is a datagram (UDP) socket, not a stream socket, but listener http (127.0.0.1:0) takes a listening stream socket; pass one (ListenStream=, not ListenDatagram=)"),
                "{err}"
            );
            assert!(!err.0.contains('\n'), "{err}");
        }
        // A TCP fd for a UDP listener.
        for name in ["dns", ""] {
            let (fd, addr) = fd_on(name);
            let err = match_fds(&[spec("dns=udp:127.0.0.1:0")], vec![fd]).unwrap_err();
            assert!(
                err.0.contains(&format!("is a stream socket ({addr}), not a datagram socket, but listener dns (udp:127.0.0.1:0) takes a UDP socket; pass one (ListenDatagram=, not ListenStream=)")),
                "{err}"
            );
            assert!(!err.0.contains('\n'), "{err}");
        }
        // An fd named like no listener is not taken for one of the other kind on its address.
        let (fd, addr) = udp_fd("other");
        let err = match_fds(
            &[spec(&format!("a={addr}")), spec("b=127.0.0.1:0")],
            vec![fd],
        )
        .unwrap_err();
        assert!(err.0.contains("no listener has that name"), "{err}");
    }

    #[test]
    fn a_stored_fd_of_the_other_kind_is_stale_and_bound_afresh() {
        // A stored UDP socket for a listener that is TCP now.
        let (fd, _) = udp_fd("bound/x");
        let specs = [spec("x=127.0.0.1:0")];
        let (l, stale) = match_fds(&specs, vec![fd]).unwrap();
        assert!(l.is_empty());
        assert_eq!(names(&stale), ["bound/x"]);
        assert!(
            stale[0]
                .2
                .contains("is a datagram (UDP) socket, not a stream socket"),
            "{stale:?}"
        );
        // A stored TCP socket for a listener that is UDP now.
        let (fd, _) = fd_on("bound/x");
        let specs = [spec("x=udp:127.0.0.1:0")];
        let (l, stale) = match_fds(&specs, vec![fd]).unwrap();
        assert!(l.is_empty());
        assert!(
            stale[0].2.contains("is a stream socket") && stale[0].2.contains("takes a UDP socket"),
            "{stale:?}"
        );
        let l = resolve(&specs, vec![]).unwrap();
        assert!(matches!(l[0].socket, Socket::Udp(_)) && l[0].self_bound);
    }

    #[test]
    fn datagram_sockets_other_than_unconnected_udp_are_refused() {
        let (s, _) = udp_socket();
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.connect(peer.local_addr().unwrap()).unwrap();
        let err = check_fd(OwnedFd::from(s), "dns").unwrap_err();
        assert!(
            err.0
                .contains("('dns') is a connected datagram (UDP) socket; pass an unconnected one"),
            "{err}"
        );
        let (unix, _) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let err = check_fd(OwnedFd::from(unix), "dns").unwrap_err();
        assert!(
            err.0.contains("is a Unix datagram socket; datagram sockets are served for IPv4 and IPv6 (udp:IP:PORT) only"),
            "{err}"
        );
        // An unconnected UDP socket is one.
        let (s, addr) = udp_socket();
        let socket = check_fd(OwnedFd::from(s), "dns").unwrap();
        assert_eq!(socket.local_address(), format!("udp:{addr}"));
    }

    #[test]
    fn udp_sockets_of_a_running_generation_are_compared_with_the_configuration() {
        let sockets = vec![serde_json::json!({
            "listener": "dns", "address": "udp:127.0.0.1:53", "self_bound": false, "unit": "dns.socket"
        })];
        let (w, e) = compare_with_running(&[spec("dns=udp:127.0.0.1:53")], &sockets);
        assert!(w.is_empty() && e.is_empty(), "{w:?} {e:?}");
        let (w, e) = compare_with_running(&[spec("dns=udp:127.0.0.1:0")], &sockets);
        assert!(w.is_empty() && e.is_empty(), "{w:?} {e:?}");
        let (w, e) = compare_with_running(&[spec("dns=udp:127.0.0.1:5353")], &sockets);
        assert_eq!(
            w,
            ["listener dns: the address comes from dns.socket (ListenDatagram=); change it there \
              (it listens on udp:127.0.0.1:53, the configuration says udp:127.0.0.1:5353, which is not used)"]
        );
        assert!(e.is_empty());
        // TCP on the same port is not the same address.
        let (w, _) = compare_with_running(&[spec("dns=127.0.0.1:53")], &sockets);
        assert_eq!(w.len(), 1);
        let (_, e) =
            compare_with_running(&[spec("a=127.0.0.1:53"), spec("b=127.0.0.1:1")], &sockets);
        assert_eq!(e.len(), 1);
        assert!(
            e[0].contains("comes from dns.socket (ListenDatagram=)"),
            "{e:?}"
        );
        assert!(address_is("udp:[::1]:53", &spec("x=udp:[::1]:53").address));
        assert!(!address_is(
            "127.0.0.1:53",
            &spec("x=udp:127.0.0.1:53").address
        ));
        assert!(!address_is(
            "udp:127.0.0.1:53",
            &spec("x=127.0.0.1:53").address
        ));
        assert!(has_port(&spec("x=udp:127.0.0.1:53").address));
        assert!(!has_port(&spec("x=udp:127.0.0.1:0").address));
    }
}
