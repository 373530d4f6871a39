//! The receiving side of sd_notify(3): the `NOTIFY_SOCKET` the keeper offers its generations.
//!
//! Protocol: each message is one datagram of `KEY=VALUE` lines on a unix datagram socket with
//! `SO_PASSCRED` set, so that the kernel attaches the sender's credentials (SCM_CREDENTIALS) and
//! the receiver can apply systemd's `NotifyAccess=main` rule: only the main pid's messages count
//! ([`crate::keeper`] applies it). File descriptors may come along (SCM_RIGHTS): `BARRIER=1`
//! carries the write end of a pipe, which the manager answers by closing it. Every received fd
//! is closed when its [`Message`] is dropped.
//!
//! The socket is a path in a fresh 0700 directory (mkdtemp) under the runtime directory, not an
//! abstract name: an abstract name could be bound first, or written to, by any local user;
//! the directory lets only the keeper's own user reach the socket.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, UnixAddr};

/// The keeper's notify socket.
pub struct NotifySocket {
    pub socket: UnixDatagram,
    /// The private directory holding it.
    pub dir: PathBuf,
    pub path: PathBuf,
}

/// One notification.
#[derive(Debug)]
pub struct Message {
    /// The sender's pid from its credentials (0 when none came: never the main pid).
    pub pid: i32,
    pub text: String,
    /// How many fds came along; they are closed with the message.
    pub fds: usize,
    _fds: Vec<OwnedFd>,
}

impl Message {
    pub fn has(&self, assignment: &str) -> bool {
        self.text.lines().any(|l| l == assignment)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.text
            .lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
    }

    /// Takes the fds that came along (they are closed with the message otherwise).
    pub fn take_fds(&mut self) -> Vec<OwnedFd> {
        self.fds = 0;
        std::mem::take(&mut self._fds)
    }

    /// `BARRIER=1` alone, as sd_notify_barrier(3) sends it.
    pub fn is_lone_barrier(&self) -> bool {
        self.pid != 0
            && self
                .text
                .lines()
                .filter(|l| !l.is_empty())
                .eq(["BARRIER=1"])
    }
}

/// Where the private directory goes: `$XDG_RUNTIME_DIR`, `/run/baton` for root, the temp dir.
fn bases() -> Vec<PathBuf> {
    let mut bases = Vec::new();
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        bases.push(PathBuf::from(dir));
    }
    if nix::unistd::geteuid().is_root() {
        use std::os::unix::fs::DirBuilderExt;
        let run = Path::new("/run").join(&crate::env::identity().name);
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&run);
        bases.push(run);
    }
    bases.push(std::env::temp_dir());
    bases
}

impl NotifySocket {
    /// Creates the socket in a new private directory.
    pub fn create() -> Result<NotifySocket, String> {
        let mut last = String::new();
        for base in bases() {
            // mkdtemp: a new directory, mode 0700, under a name nobody could have taken.
            let dir = match nix::unistd::mkdtemp(
                &base.join(format!("{}-keeper.XXXXXX", crate::env::identity().name)),
            ) {
                Ok(dir) => dir,
                Err(e) => {
                    last = format!("{}: {e}", base.display());
                    continue;
                }
            };
            let path = dir.join("notify");
            match Self::bind(&path) {
                Ok(socket) => return Ok(NotifySocket { socket, dir, path }),
                Err(e) => {
                    last = format!("{}: {e}", path.display());
                    let _ = std::fs::remove_dir(&dir);
                }
            }
        }
        Err(format!(
            "cannot create the keeper's notify socket ({last}); set XDG_RUNTIME_DIR to a writable directory"
        ))
    }

    fn bind(path: &Path) -> std::io::Result<UnixDatagram> {
        let socket = UnixDatagram::bind(path)?;
        setsockopt(&socket, sockopt::PassCred, &true)?;
        socket.set_nonblocking(true)?;
        // Generations send large STATUS= lines at most; room for a burst of them.
        let _ = setsockopt(&socket, sockopt::RcvBuf, &(1 << 20));
        Ok(socket)
    }

    /// The socket a previous keeper image left open at `fd`.
    pub fn from_fd(fd: OwnedFd, dir: PathBuf) -> NotifySocket {
        let socket = UnixDatagram::from(fd);
        let path = dir.join("notify");
        NotifySocket { socket, dir, path }
    }

    /// The next message, if one is queued.
    pub fn receive(&self) -> Option<Message> {
        let mut buf = vec![0u8; 8192];
        loop {
            let mut cmsg =
                nix::cmsg_space!(nix::sys::socket::UnixCredentials, [std::os::fd::RawFd; 16]);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = match recvmsg::<UnixAddr>(
                self.socket.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => return None,
                Err(e) => {
                    tracing::warn!("notify socket: recvmsg failed: {e}");
                    return None;
                }
            };
            let mut pid = 0;
            let mut fds = Vec::new();
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    match c {
                        ControlMessageOwned::ScmCredentials(cred) => pid = cred.pid(),
                        ControlMessageOwned::ScmRights(raw) => {
                            // SAFETY: the kernel just installed these fds in this process.
                            fds.extend(
                                raw.into_iter()
                                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                            )
                        }
                        _ => {}
                    }
                }
            }
            let len = msg.bytes;
            let text = String::from_utf8_lossy(&buf[..len]).into_owned();
            return Some(Message {
                pid,
                text,
                fds: fds.len(),
                _fds: fds,
            });
        }
    }

    /// Removes the socket and its directory (the keeper's end).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_barrier_and_fds() {
        let n = NotifySocket::create().unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&n.dir).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o700);
        let client = UnixDatagram::unbound().unwrap();
        client.send_to(b"READY=1\nSTATUS=hi", &n.path).unwrap();
        let m = n.receive().unwrap();
        assert_eq!(m.pid, std::process::id() as i32);
        assert!(m.has("READY=1"));
        assert_eq!(m.get("STATUS"), Some("hi"));
        assert!(!m.is_lone_barrier());
        // A barrier: closing the received fd releases the sender.
        let (read, write) = nix::unistd::pipe().unwrap();
        let fds = [write.as_raw_fd()];
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
        let iov = [std::io::IoSlice::new(b"BARRIER=1")];
        let addr = UnixAddr::new(&n.path).unwrap();
        nix::sys::socket::sendmsg(
            client.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::empty(),
            Some(&addr),
        )
        .unwrap();
        drop(write);
        let m = n.receive().unwrap();
        assert!(m.is_lone_barrier());
        assert_eq!(m.fds, 1);
        drop(m);
        let mut buf = [0u8; 1];
        assert_eq!(
            nix::unistd::read(&read, &mut buf).unwrap(),
            0,
            "EOF: released"
        );
        assert!(n.receive().is_none());
        n.remove();
        assert!(!n.dir.exists());
    }
}
