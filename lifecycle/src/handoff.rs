//! Passing open connections on to the next generation, so that their clients keep them through
//! an upgrade instead of reconnecting.
//!
//! For each upgrade O makes a `SOCK_SEQPACKET` socket pair and hands N one end with the
//! listening sockets, announced in `<PREFIX>_CONNECTIONS_FD=<fd>:<N's generation>` (a private
//! variable; the generation keeps a stale one out, which an older N that does not know the
//! variable would pass on to its own successor). N's
//! [`crate::workload::Serving`] takes it ([`Adopted`]) or not; N's `ready` says which
//! (`"adopts":true`), and only then does O's draining [`crate::workload::Serving`] get the other
//! end ([`PassOn`]). Either side may decline: a connection that is not passed on drains as it
//! always did.
//!
//! One message per connection, sent with `sendmsg(2)`: the socket itself in an `SCM_RIGHTS`
//! control message, and as data `<listener name>\n<bytes>`, where the bytes are what O read
//! from the connection and did not answer yet (the start of the next request, usually none).
//! The kernel's receive queue holds whatever the client sent after that, untouched. A message
//! is at most [`MAX_MESSAGE`] bytes; N drops (closes) whatever does not carry exactly one
//! socket.
//!
//! A workload passes a connection on only where it holds nothing else of it: between two
//! requests, with no response being written, and where its protocol state is just the bytes
//! above (plain HTTP/1, not TLS). It then closes its own copy of the socket without
//! `shutdown(2)` (which would end the connection for N as well).
//!
//! If N dies on probation, the connections it adopted die with it, as do those its clients
//! opened to N directly: the old generation takes over the listening sockets again, not them.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, socketpair, sockopt, AddressFamily, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType, SockaddrLike, SockaddrStorage,
};
use tokio::io::unix::AsyncFd;

use crate::env::Var;

/// The environment variable that carries N's end of the pair.
pub const CONNECTIONS_FD_ENV: Var = Var::CONNECTIONS_FD;

/// The largest message: a listener's name, its newline and the unanswered bytes.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// O's end: passes connections on to N. Cheap to clone; every clone sends on the same socket.
#[derive(Debug, Clone)]
pub struct PassOn {
    socket: Arc<OwnedFd>,
}

impl PassOn {
    /// Passes `socket` on to N, with the name of the listener that accepted it and the bytes
    /// read from it that no response answered yet. Never blocks: `WouldBlock` when N's queue
    /// is full, `BrokenPipe` (or `ConnectionRefused`) once N is gone, `InvalidInput` for a
    /// name with a newline or a message over [`MAX_MESSAGE`]. On `Ok` the connection is N's:
    /// close this process's copy, without `shutdown(2)`.
    pub fn send(
        &self,
        socket: BorrowedFd<'_>,
        listener: &str,
        unanswered: &[u8],
    ) -> io::Result<()> {
        if listener.contains('\n') || listener.len() + 1 + unanswered.len() > MAX_MESSAGE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a listener name with a newline, or a message too long to pass a connection on",
            ));
        }
        let fds = [socket.as_raw_fd()];
        let iov = [
            IoSlice::new(listener.as_bytes()),
            IoSlice::new(b"\n"),
            IoSlice::new(unanswered),
        ];
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        loop {
            match sendmsg::<()>(
                self.socket.as_raw_fd(),
                &iov,
                &[ControlMessage::ScmRights(&fds)],
                flags,
                None,
            ) {
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A connection a previous generation passed on.
#[derive(Debug)]
pub struct Connection {
    /// The connected socket (close-on-exec, in whatever blocking mode O left it).
    pub socket: OwnedFd,
    /// The name of the listener that accepted it.
    pub listener: String,
    /// Bytes O read from it and did not answer: they come before what the socket delivers.
    pub unanswered: Vec<u8>,
}

impl Connection {
    /// The socket as a non-blocking TCP stream, if it is one (checked: the peer could pass
    /// anything).
    pub fn into_tcp(self) -> io::Result<(std::net::TcpStream, String, Vec<u8>)> {
        let stream_type = getsockopt(&self.socket, sockopt::SockType)?;
        let family =
            nix::sys::socket::getsockname::<SockaddrStorage>(self.socket.as_raw_fd())?.family();
        if stream_type != SockType::Stream
            || !matches!(family, Some(AddressFamily::Inet | AddressFamily::Inet6))
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the connection passed on is not a TCP socket",
            ));
        }
        let stream = std::net::TcpStream::from(self.socket);
        stream.set_nonblocking(true)?;
        Ok((stream, self.listener, self.unanswered))
    }
}

/// N's end: the connections O passes on, in the order it sent them.
#[derive(Debug)]
pub struct Adopted {
    socket: AsyncFd<OwnedFd>,
    buf: Vec<u8>,
}

impl Adopted {
    /// Wraps N's end of the pair. Must be called inside a tokio runtime; fails for anything but
    /// a `SOCK_SEQPACKET` socket.
    pub fn new(fd: OwnedFd) -> io::Result<Adopted> {
        if getsockopt(&fd, sockopt::SockType)? != SockType::SeqPacket {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the fd for passed-on connections is not a SOCK_SEQPACKET socket",
            ));
        }
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        // SAFETY: the AsyncFd owns the fd, which stays open and unchanged while registered.
        let socket = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }?;
        Ok(Adopted {
            socket,
            buf: vec![0u8; MAX_MESSAGE],
        })
    }

    /// Takes no further connections: O's next sends fail (it drains those connections itself),
    /// and the ones it sent already are returned, so that none is lost in the queue.
    pub fn close(self) -> Vec<Connection> {
        let mut buf = self.buf;
        let socket = self.socket.into_inner();
        let _ = nix::sys::socket::shutdown(socket.as_raw_fd(), nix::sys::socket::Shutdown::Read);
        let mut queued = Vec::new();
        loop {
            match receive(socket.as_fd(), &mut buf) {
                Ok(Some(Received::Connection(connection))) => queued.push(connection),
                Ok(Some(Received::Malformed(_))) => {}
                Ok(None) | Err(_) => return queued,
            }
        }
    }

    /// The next connection; `None` once O closed its end (it exited). A malformed message
    /// (no socket, several, cut short) is dropped, its sockets closed. Cancel-safe.
    pub async fn next(&mut self) -> io::Result<Option<Connection>> {
        loop {
            let mut guard = self.socket.readable().await?;
            let buf = &mut self.buf;
            let received = guard.try_io(|socket| receive(socket.get_ref().as_fd(), buf));
            match received {
                Ok(Ok(Some(Received::Connection(connection)))) => return Ok(Some(connection)),
                Ok(Ok(Some(Received::Malformed(why)))) => {
                    tracing::warn!(
                        "dropped a connection message from the previous generation: {why}"
                    );
                }
                Ok(Ok(None)) => return Ok(None),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
    }
}

enum Received {
    Connection(Connection),
    Malformed(&'static str),
}

/// One message; `Ok(None)` at the end of the stream, `WouldBlock` when none is queued.
fn receive(socket: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<Received>> {
    let mut cmsg = nix::cmsg_space!([RawFd; 253]);
    let (bytes, flags, mut fds) = {
        let mut iov = [IoSliceMut::new(buf)];
        let msg = loop {
            match recvmsg::<()>(
                socket.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(msg) => break msg,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        // With MSG_CTRUNC nix gives no control messages. The buffer holds the most fds a
        // message can carry (SCM_MAX_FD), so the kernel cuts them short only when this
        // process is out of fds, and then installs none of a message with a single one.
        let mut fds = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    // SAFETY: the kernel just installed these fds in this process; nothing
                    // else knows them.
                    fds.extend(
                        raw.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
        }
        (msg.bytes, msg.flags, fds)
    };
    if flags.contains(MsgFlags::MSG_CTRUNC) {
        return Ok(Some(Received::Malformed(
            "its socket did not fit (this process is out of fds)",
        )));
    }
    if bytes == 0 && fds.is_empty() {
        return Ok(None);
    }
    if flags.contains(MsgFlags::MSG_TRUNC) {
        return Ok(Some(Received::Malformed("the message was cut short")));
    }
    if fds.len() != 1 {
        return Ok(Some(Received::Malformed(
            "not exactly one socket in the message",
        )));
    }
    let data = &buf[..bytes];
    let Some(newline) = data.iter().position(|&b| b == b'\n') else {
        return Ok(Some(Received::Malformed("no listener name in the message")));
    };
    let Ok(listener) = std::str::from_utf8(&data[..newline]) else {
        return Ok(Some(Received::Malformed(
            "a listener name that is not UTF-8",
        )));
    };
    Ok(Some(Received::Connection(Connection {
        socket: fds.remove(0),
        listener: listener.to_owned(),
        unanswered: data[newline + 1..].to_vec(),
    })))
}

/// A new pair for one upgrade: O's end (close-on-exec) and N's (handed over at exec).
pub(crate) fn pair() -> io::Result<(PassOn, OwnedFd)> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    Ok((
        PassOn {
            socket: Arc::new(ours),
        },
        theirs,
    ))
}

/// How O announces N's end at `fd` to N of generation `generation`.
pub(crate) fn env_entry(fd: usize, generation: u64) -> Vec<u8> {
    format!("{CONNECTIONS_FD_ENV}={fd}:{generation}").into_bytes()
}

/// N's end, announced in `<PREFIX>_CONNECTIONS_FD`, if it is meant for this process (trusted
/// private variables, this generation's number) and is a `SOCK_SEQPACKET` socket other than
/// `channel`; removes the variable. Anything else means no adoption, not an error: O drains
/// its connections itself then.
///
/// # Safety
/// Changes the environment: call it before any other thread exists, and before the
/// generation's variable is taken.
pub(crate) unsafe fn take_from_env(channel: RawFd) -> Option<OwnedFd> {
    // SAFETY: the caller promises that no other thread exists.
    let value = unsafe { crate::env::take_value(CONNECTIONS_FD_ENV) }?;
    let fd = checked_entry(&value, Var::GENERATION.get().as_deref(), channel)?;
    // SAFETY: an open socket, handed to this process alone for this upgrade.
    Some(unsafe { crate::env::own_fd(fd) })
}

/// The fd in `<fd>:<generation>` if it is meant for `generation`, is not `channel`, and is an
/// open `SOCK_SEQPACKET` socket; it is only looked at, not taken.
fn checked_entry(value: &str, generation: Option<&str>, channel: RawFd) -> Option<RawFd> {
    let (fd, meant_for) = value.split_once(':')?;
    if Some(meant_for) != generation {
        return None;
    }
    let fd: RawFd = fd
        .parse()
        .ok()
        .filter(|&fd| fd != channel && crate::env::is_open_above_stdio(fd))?;
    // SAFETY: the fd is open (checked above); it is only borrowed for the check.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    (getsockopt(&borrowed, sockopt::SockType).ok()? == SockType::SeqPacket).then_some(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_connection_passes_with_its_listener_and_unanswered_bytes() {
        runtime().block_on(async {
            let (pass_on, theirs) = pair().unwrap();
            let mut adopted = Adopted::new(theirs).unwrap();
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server, _) = listener.accept().unwrap();
            pass_on.send(server.as_fd(), "web", b"GET / HT").unwrap();
            drop(server);
            let connection = adopted.next().await.unwrap().unwrap();
            assert_eq!(connection.listener, "web");
            assert_eq!(connection.unanswered, b"GET / HT");
            // Received close-on-exec: a process this one starts does not inherit it.
            let flags = nix::fcntl::fcntl(&connection.socket, nix::fcntl::FcntlArg::F_GETFD);
            assert_eq!(flags.unwrap() & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
            let (mut stream, _, _) = connection.into_tcp().unwrap();
            // The same connection: what the client sends arrives at the adopted socket.
            client.write_all(b"TP/1.1\r\n").unwrap();
            let mut got = [0u8; 8];
            stream.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"TP/1.1\r\n");
            stream.write_all(b"ok").unwrap();
            let mut answer = [0u8; 2];
            client.read_exact(&mut answer).unwrap();
            assert_eq!(&answer, b"ok");
            drop(pass_on);
            assert!(adopted.next().await.unwrap().is_none(), "O's end closed");
        });
    }

    #[test]
    fn messages_without_exactly_one_socket_are_dropped() {
        runtime().block_on(async {
            let (pass_on, theirs) = pair().unwrap();
            let mut adopted = Adopted::new(theirs).unwrap();
            let raw = pass_on.socket.as_raw_fd();
            // No socket, then two.
            nix::sys::socket::send(raw, b"web\n", MsgFlags::empty()).unwrap();
            let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
            let fds = [a.as_raw_fd(), b.as_raw_fd()];
            let iov = [IoSlice::new(b"web\n")];
            sendmsg::<()>(
                raw,
                &iov,
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::empty(),
                None,
            )
            .unwrap();
            // Then a good one, which is the first to come out.
            let (c, _d) = std::os::unix::net::UnixStream::pair().unwrap();
            pass_on.send(c.as_fd(), "admin", b"").unwrap();
            let connection = adopted.next().await.unwrap().unwrap();
            assert_eq!(connection.listener, "admin");
            let e = connection.into_tcp().unwrap_err();
            assert!(e.to_string().contains("not a TCP socket"), "{e}");
        });
    }

    #[test]
    fn names_with_newlines_and_oversized_messages_are_refused() {
        let (pass_on, _theirs) = pair().unwrap();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = pass_on.send(a.as_fd(), "we\nb", b"").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e = pass_on
            .send(a.as_fd(), "web", &vec![b'x'; MAX_MESSAGE])
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        pass_on
            .send(a.as_fd(), "web", &vec![b'x'; MAX_MESSAGE - 3])
            .unwrap_err();
        // "web", its newline and the bytes: exactly the most a message holds.
        pass_on
            .send(a.as_fd(), "web", &vec![b'x'; MAX_MESSAGE - 4])
            .unwrap();
    }

    #[test]
    fn closing_returns_the_queued_connections_and_refuses_further_ones() {
        runtime().block_on(async {
            let (pass_on, theirs) = pair().unwrap();
            let adopted = Adopted::new(theirs).unwrap();
            let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
            pass_on.send(a.as_fd(), "web", b"1").unwrap();
            pass_on.send(a.as_fd(), "web", b"2").unwrap();
            let queued = adopted.close();
            let unanswered: Vec<&[u8]> = queued.iter().map(|c| &c.unanswered[..]).collect();
            assert_eq!(unanswered, [b"1", b"2"]);
            let e = pass_on.send(a.as_fd(), "web", b"3").unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
        });
    }

    #[test]
    fn only_this_generations_seqpacket_socket_is_taken_from_the_environment() {
        let (_pass_on, theirs) = pair().unwrap();
        let (stream, _other) = std::os::unix::net::UnixStream::pair().unwrap();
        let (fd, channel) = (theirs.as_raw_fd(), stream.as_raw_fd());
        assert_eq!(
            checked_entry(&format!("{fd}:3"), Some("3"), channel),
            Some(fd)
        );
        // Meant for another generation: a stale variable an older one passed on.
        assert_eq!(checked_entry(&format!("{fd}:2"), Some("3"), channel), None);
        assert_eq!(checked_entry(&format!("{fd}:3"), None, channel), None);
        assert_eq!(checked_entry(&format!("{fd}"), Some("3"), channel), None);
        // Not close-on-exec, as an exec hands it over.
        nix::fcntl::fcntl(
            &theirs,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .unwrap();
        assert_eq!(
            checked_entry(&format!("{fd}:3"), Some("3"), channel),
            Some(fd)
        );
        // The handshake channel, even were it a SOCK_SEQPACKET socket; another socket, an fd
        // that is not open, stdin.
        assert_eq!(checked_entry(&format!("{fd}:3"), Some("3"), fd), None);
        assert_eq!(checked_entry(&format!("{channel}:3"), Some("3"), fd), None);
        assert_eq!(checked_entry(&format!("{channel}:3"), Some("3"), -1), None);
        // An fd number no process here has open (a closed fd's number could be reused at once
        // by a test running beside this one).
        assert_eq!(checked_entry("1000000:3", Some("3"), channel), None);
        assert_eq!(checked_entry("0:3", Some("3"), channel), None);
    }

    #[test]
    fn a_full_queue_is_would_block_not_a_wait() {
        let (pass_on, _theirs) = pair().unwrap();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let full = (0..100_000)
            .map(|_| pass_on.send(a.as_fd(), "web", b""))
            .find_map(Result::err)
            .expect("the queue never filled");
        assert_eq!(full.kind(), io::ErrorKind::WouldBlock, "{full}");
    }

    #[test]
    fn the_environment_entry_names_the_fd_and_the_generation() {
        let entry = String::from_utf8(env_entry(7, 4)).unwrap();
        assert_eq!(entry, format!("{CONNECTIONS_FD_ENV}=7:4"));
    }

    #[test]
    fn a_gone_receiver_is_a_broken_pipe() {
        let (pass_on, theirs) = pair().unwrap();
        drop(theirs);
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = pass_on.send(a.as_fd(), "web", b"").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
    }

    #[test]
    fn only_a_seqpacket_socket_is_taken() {
        runtime().block_on(async {
            let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
            let e = Adopted::new(a.into()).unwrap_err();
            assert!(e.to_string().contains("SOCK_SEQPACKET"), "{e}");
        });
    }
}
