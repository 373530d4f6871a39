//! bench/timeline.rs: a keep-alive HTTP/1.1 load that records every request, for
//! bench/upgrade-timeline.sh. Built there with `rustc -O` (the standard library only).
//!
//!     timeline ADDR PATH THREADS CONNECTIONS SECONDS OUT
//!
//! THREADS threads, each with CONNECTIONS/THREADS connections to ADDR (IPv4 or IPv6 literal
//! with port), send `GET PATH` one at a time per connection, as wrk does, for SECONDS. Each
//! answer must have a Content-Length; an answer with `Connection: close` (a draining server)
//! makes the connection reconnect. Writes one line per answered request to OUT:
//!
//!     start_us latency_us connect_us reconnected
//!
//! start_us: wall clock (µs since the epoch) when the request was written, as the benchmark
//! script's `EPOCHREALTIME`; latency_us: from that write to the last byte of the answer (as
//! wrk counts, without the connect); connect_us: the connect before it, if it came on a new
//! connection (0 otherwise); reconnected: 1 if it did.
//!
//! A reconnect is a blocking connect(2): immediate on loopback, where the kernel completes the
//! handshake within the call. A SYN the server's full backlog dropped would hold the whole
//! thread for a second, and show as such.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[repr(C)]
struct PollFd {
    fd: i32,
    events: i16,
    revents: i16,
}

extern "C" {
    fn poll(fds: *mut PollFd, n: std::os::raw::c_ulong, timeout: i32) -> i32;
}

const POLLIN: i16 = 1;

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    start: Instant,
    start_wall: u64,
    connect_us: u64,
    reconnected: bool,
}

struct Record {
    start_wall: u64,
    latency_us: u64,
    connect_us: u64,
    reconnected: bool,
}

fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn connect(addr: SocketAddr) -> io::Result<(TcpStream, u64)> {
    let t = Instant::now();
    let stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    stream.set_nonblocking(true)?;
    Ok((stream, t.elapsed().as_micros() as u64))
}

impl Conn {
    fn open(addr: SocketAddr, reconnected: bool) -> io::Result<Conn> {
        let (stream, connect_us) = connect(addr)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(4096),
            start: Instant::now(),
            start_wall: 0,
            connect_us,
            reconnected,
        })
    }

    fn send(&mut self, request: &[u8]) -> io::Result<()> {
        self.start = Instant::now();
        self.start_wall = wall_us();
        // A request is far smaller than an empty socket buffer: one write takes it.
        (&self.stream).write_all(request)
    }

    /// The end of an answer in `buf`: its length and whether it says `Connection: close`.
    fn answer(&self) -> io::Result<Option<(usize, bool)>> {
        let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            return Ok(None);
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| io::Error::other(format!("an answer without Content-Length: {head}")))?;
        let close = head.lines().any(|l| l == "connection: close");
        let total = end + 4 + length;
        Ok((self.buf.len() >= total).then_some((total, close)))
    }
}

/// Runs the load until `until`, recording into `records`; on an error, what was recorded before
/// it stays there.
fn run(
    addr: SocketAddr,
    request: &[u8],
    connections: usize,
    until: Instant,
    records: &mut Vec<Record>,
) -> io::Result<()> {
    let mut conns = (0..connections)
        .map(|_| Conn::open(addr, false))
        .collect::<io::Result<Vec<_>>>()?;
    for c in &mut conns {
        c.send(request)?;
    }
    let mut chunk = vec![0u8; 64 << 10];
    let mut fds: Vec<PollFd> = Vec::with_capacity(connections);
    while Instant::now() < until {
        fds.clear();
        fds.extend(conns.iter().map(|c| PollFd {
            fd: c.stream.as_raw_fd(),
            events: POLLIN,
            revents: 0,
        }));
        // SAFETY: `fds` is a live array of `fds.len()` pollfd structs.
        if unsafe { poll(fds.as_mut_ptr(), fds.len() as std::os::raw::c_ulong, 100) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for (i, fd) in fds.iter().enumerate() {
            if fd.revents == 0 {
                continue;
            }
            let c = &mut conns[i];
            let mut closed = false;
            loop {
                match (&c.stream).read(&mut chunk) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io::Error::other(format!("reading an answer: {e}"))),
                }
            }
            match c.answer()? {
                Some((len, close)) => {
                    records.push(Record {
                        start_wall: c.start_wall,
                        latency_us: c.start.elapsed().as_micros() as u64,
                        connect_us: if c.reconnected { c.connect_us } else { 0 },
                        reconnected: c.reconnected,
                    });
                    c.buf.drain(..len);
                    if close || closed {
                        *c = Conn::open(addr, true)?;
                    } else {
                        c.reconnected = false;
                    }
                    c.send(request)?;
                }
                // Closed before its answer: a lost request, which the benchmark must not hide.
                None if closed => {
                    return Err(io::Error::other("a connection closed before its answer"));
                }
                None => {}
            }
        }
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 7 {
        eprintln!("usage: timeline ADDR PATH THREADS CONNECTIONS SECONDS OUT");
        std::process::exit(2);
    }
    let parse = |i: usize| -> u64 {
        args[i].parse().unwrap_or_else(|_| {
            eprintln!("timeline: {} is not a number", args[i]);
            std::process::exit(2)
        })
    };
    let addr: SocketAddr = args[1].parse().unwrap_or_else(|e| {
        eprintln!("timeline: {}: {e}", args[1]);
        std::process::exit(2)
    });
    let request = format!("GET {} HTTP/1.1\r\nHost: {}\r\n\r\n", args[2], args[1]).into_bytes();
    let (threads, connections, seconds) = (parse(3).max(1) as usize, parse(4) as usize, parse(5));
    let until = Instant::now() + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let request = request.clone();
            let n = connections / threads + usize::from(t < connections % threads);
            std::thread::spawn(move || {
                let mut records = Vec::with_capacity(2_000_000);
                let result = run(addr, &request, n, until, &mut records);
                (records, result)
            })
        })
        .collect();
    let mut out = io::BufWriter::new(std::fs::File::create(&args[6]).unwrap_or_else(|e| {
        eprintln!("timeline: {}: {e}", args[6]);
        std::process::exit(2)
    }));
    let mut failed = false;
    for worker in workers {
        let Ok((records, result)) = worker.join() else {
            eprintln!("timeline: a thread panicked");
            failed = true;
            continue;
        };
        for r in records {
            let _ = writeln!(
                out,
                "{} {} {} {}",
                r.start_wall,
                r.latency_us,
                r.connect_us,
                u8::from(r.reconnected)
            );
        }
        if let Err(e) = result {
            eprintln!("timeline: {e}");
            failed = true;
        }
    }
    if out.flush().is_err() || failed {
        std::process::exit(1);
    }
}
