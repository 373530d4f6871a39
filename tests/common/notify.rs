//! A NOTIFY_SOCKET receiver that judges senders as systemd 252 does under `NotifyAccess=main`.
//!
//! The kernel attaches the sender's credentials (SCM_CREDENTIALS) to every datagram because
//! the socket has SO_PASSCRED set; a message counts only when its sender pid is the current main
//! pid, and `MAINPID=` from the main pid moves that role. A lone `BARRIER=1` is answered for any
//! sender, as systemd's manager does before it looks at units. File descriptors that come along
//! (`BARRIER=1`, `FDSTORE=1`) are closed once the message is handled, which is what releases the
//! barrier; the local address of each socket among them is recorded first.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, UnixAddr};

#[derive(Debug, Clone)]
pub struct Message {
    pub pid: i32,
    pub text: String,
    /// Whether a systemd with NotifyAccess=main would have acted on it.
    pub accepted: bool,
    pub fds: usize,
    /// The local address of each fd that came along and is a socket (`FDSTORE=1`): an IP
    /// socket's `IP:PORT`, a unix socket's `unix:PATH`.
    pub sockets: Vec<String>,
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
}

#[derive(Default)]
struct State {
    main_pid: Option<i32>,
    /// Messages that came before the test told the main pid (systemd knows it at fork).
    pending: Vec<(Message, Vec<OwnedFd>)>,
    messages: Vec<Message>,
}

impl State {
    /// Judges one message as systemd would: only credentials of the main pid count, and
    /// `MAINPID=` from it moves the role (to a live pid; systemd also checks the cgroup).
    fn judge(&mut self, mut message: Message) {
        // systemd's manager answers a barrier itself, before any unit or NotifyAccess= check
        // (manager_dispatch_notify_fd → manager_process_barrier_fd): any sender with valid
        // credentials, as long as BARRIER=1 is alone in its message.
        let barrier = message.text.lines().any(|l| l == "BARRIER=1");
        message.accepted = message.pid != 0
            && if barrier {
                message.text.lines().count() == 1
            } else {
                Some(message.pid) == self.main_pid
            };
        if message.accepted {
            if let Some(new) = message.get("MAINPID").and_then(|p| p.parse::<i32>().ok()) {
                if nix::sys::signal::kill(nix::unistd::Pid::from_raw(new), None).is_ok() {
                    self.main_pid = Some(new);
                }
            }
        }
        self.messages.push(message);
    }
}

pub struct Receiver {
    pub path: PathBuf,
    state: Arc<(Mutex<State>, Condvar)>,
    stop: Arc<AtomicBool>,
}

impl Receiver {
    pub fn new(dir: &Path) -> Receiver {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        setsockopt(&socket, sockopt::PassCred, &true).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let state = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        std::thread::spawn(move || receive(socket, st, sp));
        Receiver { path, state, stop }
    }

    /// The pid systemd would consider the main pid (the process it started).
    pub fn set_main_pid(&self, pid: u32) {
        let (lock, cv) = &*self.state;
        let mut state = lock.lock().unwrap();
        state.main_pid = Some(pid as i32);
        for (message, fds) in std::mem::take(&mut state.pending) {
            state.judge(message);
            drop(fds);
        }
        cv.notify_all();
    }

    pub fn main_pid(&self) -> Option<i32> {
        self.state.0.lock().unwrap().main_pid
    }

    pub fn messages(&self) -> Vec<Message> {
        self.state.0.lock().unwrap().messages.clone()
    }

    pub fn accepted(&self) -> Vec<Message> {
        self.messages().into_iter().filter(|m| m.accepted).collect()
    }

    /// Waits for an accepted message that satisfies `f`.
    pub fn wait_accepted(
        &self,
        timeout: Duration,
        f: impl Fn(&Message) -> bool,
    ) -> Option<Message> {
        let (lock, cv) = &*self.state;
        let deadline = Instant::now() + timeout;
        let mut state = lock.lock().unwrap();
        loop {
            if let Some(m) = state.messages.iter().find(|m| m.accepted && f(m)) {
                return Some(m.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            state = cv.wait_timeout(state, deadline - now).unwrap().0;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::fs::remove_file(&self.path);
    }
}

fn receive(socket: UnixDatagram, state: Arc<(Mutex<State>, Condvar)>, stop: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::SeqCst) {
        let mut cmsg =
            nix::cmsg_space!(nix::sys::socket::UnixCredentials, [std::os::fd::RawFd; 16]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<UnixAddr>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
            Err(e) => panic!("notify receiver: recvmsg: {e}"),
        };
        let mut pid = None;
        let mut fds = Vec::new();
        for c in msg.cmsgs().unwrap() {
            match c {
                ControlMessageOwned::ScmCredentials(cred) => pid = Some(cred.pid()),
                ControlMessageOwned::ScmRights(raw) => {
                    // SAFETY: the kernel just installed these fds in this process for us.
                    fds.extend(
                        raw.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    )
                }
                _ => {}
            }
        }
        let sockets = fds
            .iter()
            .filter_map(|fd| {
                let addr = socket2::SockRef::from(fd).local_addr().ok()?;
                match (addr.as_socket(), addr.as_pathname()) {
                    (Some(ip), _) => Some(ip.to_string()),
                    (None, Some(path)) => Some(format!("unix:{}", path.display())),
                    (None, None) => None,
                }
            })
            .collect();
        let len = msg.bytes;
        let text = String::from_utf8_lossy(&buf[..len]).into_owned();
        let (lock, cv) = &*state;
        let mut st = lock.lock().unwrap();
        // systemd drops messages without credentials (pid 0 here).
        let message = Message {
            pid: pid.unwrap_or(0),
            text,
            accepted: false,
            fds: fds.len(),
            sockets,
        };
        if st.main_pid.is_none() {
            st.pending.push((message, fds));
            continue;
        }
        st.judge(message);
        drop(st);
        // Handled: closing the fds releases a BARRIER=1.
        drop(fds);
        cv.notify_all();
    }
}
