//! The fast path: files go out written by baton itself, the smallest from the memory cache in one
//! send, the others with sendfile(2).
//!
//! Speaks HTTP/1.1 (RFC 9112) on TCP connections, server side, for one kind of request only;
//! everything else goes to hyper, which serves the rest of the connection as it always did.
//! hyper has no zero-copy body (hyper issue 3026, tower-http issue 381), so a response written
//! with sendfile(2) has to be written by baton, head included. Small files take this path too:
//! a connection hyper never takes holds no hyper buffers (at a thousand keep-alive connections,
//! 18 MiB of RSS instead of 29 MiB), and a request costs one parse and one send.
//!
//! Before hyper takes a connection, `serve` reads the request head itself (httparse, the
//! parser hyper uses, with the same defaults) and takes the fast path only for
//!
//! - `GET` or `HEAD`, HTTP/1.1, no request body (no `Transfer-Encoding`, no `Content-Length`
//!   but `0`), no `Expect`, no `Upgrade`, a `Host` header hyper's service would accept, an
//!   origin-form target outside `/-/`;
//! - a path that leads, through the same lookup beneath the root as [`crate::http::Confined`],
//!   to a regular file, which is not to be compressed on the fly;
//! - conditions `ServeDir` answers with 304 (`If-None-Match`, `If-Modified-Since`) or none;
//!   `If-Match`, `If-Unmodified-Since`, `If-Range`, a repeated header of these or of `Range`
//!   take hyper's path;
//! - no `Range`, or a single satisfiable one (parsed by the very crate `ServeDir` uses: 206).
//!
//! The answer has `ServeDir`'s status and headers, in `ServeDir`'s order, plus hyper's `date`
//! and its `connection: close` (a test compares the two header by header). A file below
//! [`crate::http::SENDFILE_FROM`] (16 KiB) leaves with its head in one sendmsg(2), from the
//! memory cache (filled by the first request, as on hyper's path), as does a larger cached one
//! whose entry keeps no fd (the fd budget was spent). A larger one that the cache holds
//! ([`crate::http::MAX_CACHED_FILE`]) goes out from the fd its entry keeps, an even larger one
//! (or one that changed while being read) from the fd just opened: what the file holds when it
//! is sent, as nginx sends it. Either way the head leaves with `MSG_MORE`, so that it shares a
//! packet with the first bytes of the file; then sendfile(2) in a writable-readiness loop
//! (`try_io`, which clears tokio's readiness on `WouldBlock`), at most `MAX_CHUNK` (2 MiB) a
//! call, yielding to the runtime after each `MAX_CHUNK` so that one fast client cannot hold a
//! worker. A file that ends early (truncated while being sent) closes the connection: the client
//! sees a short body, never a padded one. A file renamed over while being sent is still the fd
//! that was opened: the old content, whole. `ENOSYS`/`EINVAL` from sendfile (a file system
//! without it) fall back to reading and writing the file through a buffer.
//!
//! The open and `fstat` run on the runtime, as in [`crate::http::Beneath`] (a few microseconds
//! for a cached tree). The file's pages are another matter: sendfile on a worker would wait for
//! the disk with every connection of that worker. So before each chunk its first page is probed
//! (`preadv2` of one byte with `RWF_NOWAIT`), and a chunk not in the page cache is read ahead
//! (`readahead(2)`) on the blocking pool first. A file a cache entry keeps open, once found in
//! the page cache, is not probed again for the next 100 ms (`WARM_FOR_MS`).
//!
//! The connection keeps its phases for the watcher of [`super`]: a head being read is header
//! time, a response in flight is busy, the send timer runs while a write stays pending, and
//! between requests the connection is idle. The first request the fast path does not take goes
//! to hyper with the bytes already read put back in front (`Rewind`), and hyper serves the
//! connection from then on.

use std::cell::Cell;
use std::future::Future;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};

use super::{ConnState, ResponseDone, Shared, TrackedIo};
use crate::access_log::{self, Client};
use crate::http::{FastBody, FastFile, SentFile};
use baton_lifecycle::handoff::PassOn;

// Why cached files from 16 KiB on go out with sendfile from a kept fd, not from memory: the
// server's own CPU per request is about the same either way (at 64 KiB, `wrk -t2 -c64`: 13-14
// µs from memory, 15 µs with an open per request), but the client's is not. On loopback at 64
// KiB and 1,000 connections, wrk spent 22.8-24.6 µs per response from memory against 18.8-23.1
// µs from nginx's sendfile, and 21.0-22.7 µs from baton's: a receiver copies pages just written
// by another core more slowly than page-cache pages. Beyond the cache, ServeDir vs sendfile:
// 1 MiB 773-810 vs 112-159 µs, 16 MiB 12.7-13.5 vs 1.7-1.8 ms of server CPU per request.

/// The most one sendfile(2) call sends, and the most sent between two yields to the runtime
/// (nginx's `sendfile_max_chunk`).
const MAX_CHUNK: usize = 2 << 20;

/// A request head longer than this is left to hyper (its limits apply).
const MAX_HEAD: usize = 8 * 1024;

/// The buffer for a request head starts this large (most heads are shorter) and doubles.
const FIRST_READ: usize = 1024;

/// A request with more header lines than this is left to hyper.
const MAX_HEADERS: usize = 32;

/// A socket the fast path can write to directly.
pub(super) trait Stream: AsRawFd + AsFd {
    /// Whether connections of this kind try the fast path at all.
    const FAST_PATH: bool;
    /// Waits until the socket may be readable.
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Waits until the socket may be writable.
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Runs a write syscall if the socket is believed writable, clearing that belief on
    /// `WouldBlock`.
    fn try_write_with(&self, f: impl FnOnce() -> io::Result<usize>) -> io::Result<usize>;
    /// Who is at the other end, for the access log.
    fn client(&self) -> Client;
}

impl Stream for tokio::net::TcpStream {
    const FAST_PATH: bool = true;
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        tokio::net::TcpStream::readable(self)
    }
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
        tokio::net::TcpStream::writable(self)
    }
    fn try_write_with(&self, f: impl FnOnce() -> io::Result<usize>) -> io::Result<usize> {
        self.try_io(Interest::WRITABLE, f)
    }
    fn client(&self) -> Client {
        self.peer_addr().map_or(Client::Unknown, Client::Tcp)
    }
}

/// Unix sockets always take hyper's path (local clients, rarely large files).
impl Stream for tokio::net::UnixStream {
    const FAST_PATH: bool = false;
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        tokio::net::UnixStream::readable(self)
    }
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
        tokio::net::UnixStream::writable(self)
    }
    fn try_write_with(&self, f: impl FnOnce() -> io::Result<usize>) -> io::Result<usize> {
        self.try_io(Interest::WRITABLE, f)
    }
    /// SO_PEERCRED: the peer's pid and uid.
    fn client(&self) -> Client {
        self.peer_cred()
            .map_or(Client::Unknown, |cred| Client::Unix {
                pid: cred.pid(),
                uid: cred.uid(),
            })
    }
}

/// How the fast path let go of a connection.
pub(super) enum End<I> {
    /// hyper serves the rest, starting with these bytes already read.
    Hyper(I, Vec<u8>),
    /// Closed (or to be closed): the client is gone, a response could not be finished, or it
    /// said `Connection: close`.
    Close,
    /// Passed on to the next generation: close this process's copy, nothing more.
    PassedOn,
}

/// A request the fast path answers.
struct Plan {
    file: FastFile,
    head_only: bool,
    /// Inclusive byte range for a 206.
    range: Option<(u64, u64)>,
    not_modified: bool,
    /// The client said `Connection: close`.
    close: bool,
    method: &'static str,
    target: String,
    /// With an access log: the request's `Referer`, `User-Agent` and `Host`.
    logged: Option<Box<[Option<hyper::header::HeaderValue>; 3]>>,
}

/// Serves requests on `io` while they are for the fast path (see the module docs), starting
/// with the bytes `buf` (read by a previous generation, which passed the connection on). In a
/// drain that passes connections on, it passes this one on between two requests.
pub(super) async fn serve<I>(
    mut io: TrackedIo<I>,
    shared: Arc<Shared>,
    state: Arc<ConnState>,
    mut buf: Vec<u8>,
) -> End<TrackedIo<I>>
where
    I: Stream + AsyncRead + AsyncWrite + Unpin + Send,
{
    loop {
        let (head_len, plan) = loop {
            // Until the drain starts, waits below end with it too, so that an idle connection
            // is passed on at once. Read first: the next generation is known before the drain
            // starts, so a drain seen here is one that passes connections on.
            let before_drain = !shared.draining.load(Ordering::SeqCst);
            if let Some(to) = shared.passes_on(&state) {
                if pass_on(to, &io, &buf, &shared, &state).await {
                    return End::PassedOn;
                }
            }
            if !buf.is_empty() {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut request = httparse::Request::new(&mut headers);
                match request.parse(&buf) {
                    Ok(httparse::Status::Complete(n)) => match plan(&request, &shared) {
                        Some(plan) => break (n, plan),
                        None => return End::Hyper(io, buf),
                    },
                    Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
                    // Malformed, too long, too many headers: hyper answers as it does today.
                    _ => return End::Hyper(io, buf),
                }
            }
            if buf.is_empty() {
                // No buffer is held while a connection waits for its next request (nginx
                // frees its own too): at a thousand connections, megabytes.
                tokio::select! {
                    biased;
                    readable = io.inner.readable() => if readable.is_err() {
                        return End::Close;
                    },
                    _ = shared.drain_started.cancelled(), if before_drain => continue,
                }
            }
            buf.reserve(buf.len().max(FIRST_READ));
            // Cancel-safe: a read that took bytes completes.
            let read = tokio::select! {
                biased;
                read = io.read_buf(&mut buf) => read,
                _ = shared.drain_started.cancelled(), if before_drain => continue,
            };
            match read {
                Ok(0) if buf.is_empty() => return End::Close,
                Ok(0) => return End::Hyper(io, buf),
                Ok(_) => {}
                Err(_) => return End::Close,
            }
        };
        let plan = match read_small(plan, &shared).await {
            Ok(plan) => plan,
            // Unreadable after all: hyper and ServeDir answer it, head included.
            Err(e) => {
                tracing::debug!(error = %e, "fast path: reading a small file failed: {e}");
                return End::Hyper(io, buf);
            }
        };
        buf.drain(..head_len);
        match respond(&mut io, &shared, &state, plan).await {
            Ok(true) if buf.is_empty() => buf = Vec::new(),
            // A pipelined request has begun: its head is in progress (header time, not idle).
            Ok(true) => state
                .awaiting_head_since
                .store(shared.now_ms(), Ordering::SeqCst),
            Ok(false) => {
                let _ = io.shutdown().await;
                return End::Close;
            }
            Err(e) => {
                tracing::debug!(error = %e, "fast path: connection ended with an error: {e}");
                return End::Close;
            }
        }
    }
}

/// How often passing a connection on is tried again while the next generation's queue is full
/// (so at most 21 sends in all), and how long apart.
const PASS_ON_TRIES: u32 = 20;
const PASS_ON_RETRY: std::time::Duration = std::time::Duration::from_millis(5);

/// Passes the connection on to the next generation, with `unanswered`, the bytes read and not
/// answered yet. False if that failed: it then drains here, as without a next generation that
/// adopts connections.
async fn pass_on<I: Stream>(
    to: &PassOn,
    io: &TrackedIo<I>,
    unanswered: &[u8],
    shared: &Shared,
    state: &ConnState,
) -> bool {
    let send = || to.send(io.inner.as_fd(), &state.listener, unanswered);
    match send_while_full(send, PASS_ON_TRIES, PASS_ON_RETRY).await {
        Ok(()) => {
            shared.metrics.connections_passed_on.inc();
            shared.passed_on.fetch_add(1, Ordering::SeqCst);
            true
        }
        Err(failed) => {
            tracing::debug!(error = %failed, "cannot pass a connection on to the next generation: {failed}; it drains here");
            state.pass_failed.store(true, Ordering::SeqCst);
            false
        }
    }
}

/// `send()`, tried again up to `tries` more times, `interval` apart, while it fails with
/// `WouldBlock` (the next generation's queue is full: it takes connections in one task and
/// catches up within milliseconds). Any other error ends it at once.
async fn send_while_full(
    mut send: impl FnMut() -> io::Result<()>,
    tries: u32,
    interval: std::time::Duration,
) -> io::Result<()> {
    let mut tried = 0;
    loop {
        match send() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && tried < tries => {
                tried += 1;
                tokio::time::sleep(interval).await;
            }
            done => return done,
        }
    }
}

/// The fast path's answer to a complete request head, or `None` for hyper's path.
fn plan(request: &httparse::Request<'_, '_>, shared: &Shared) -> Option<Plan> {
    let files = shared.app.files()?;
    let method = match request.method? {
        "GET" => "GET",
        "HEAD" => "HEAD",
        _ => return None,
    };
    // HTTP/1.0 (keep-alive negotiation, a 1.0 status line) is left to hyper.
    if request.version? != 1 {
        return None;
    }
    let target = request.path?;
    if !target.starts_with('/') || target.starts_with("/-/") {
        return None;
    }
    // The target hyper would make of it (it answers 400 for what it cannot parse).
    hyper::Uri::try_from(target).ok()?;
    let path = target.split('?').next()?;

    let mut close = false;
    let mut lengths = 0;
    let (mut range, mut if_none_match, mut if_modified_since) = (None, None, None);
    // For the coding (the map allocates only if the header is there).
    let mut accept = hyper::HeaderMap::new();
    for header in request.headers.iter() {
        let name = header.name;
        let value = header.value;
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        if is("content-length") {
            lengths += 1;
            if value != b"0" {
                return None;
            }
        } else if is("transfer-encoding")
            || is("expect")
            || is("upgrade")
            || is("if-match")
            || is("if-unmodified-since")
            || is("if-range")
        {
            return None;
        } else if is("connection") {
            close |= value
                .split(|&b| b == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
        } else if is("range") {
            if !once(&mut range, value) {
                return None;
            }
        } else if is("if-none-match") {
            if !once(&mut if_none_match, value) {
                return None;
            }
        } else if is("if-modified-since") && !once(&mut if_modified_since, value) {
            return None;
        } else if is("accept-encoding") {
            accept.append(
                hyper::header::ACCEPT_ENCODING,
                hyper::header::HeaderValue::from_bytes(value).ok()?,
            );
        }
    }
    let hosts = request
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"))
        .map(|h| h.value);
    if lengths > 1 || super::host_error_of(hosts, true).is_some() {
        return None;
    }
    let logged = shared.settings.access_log.as_ref().map(|_| {
        let header = |name: &str| {
            request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .and_then(|h| access_log::logged_header(h.value))
        };
        Box::new([header("referer"), header("user-agent"), header("host")])
    });

    let file = files.open_fast(path, &accept)?;
    let not_modified = not_modified(&file, if_none_match, if_modified_since);
    let range = match range {
        Some(_) if not_modified => None,
        // ServeDir reads the header only as visible ASCII (`to_str`).
        Some(value) => {
            let value = std::str::from_utf8(value)
                .ok()
                .filter(|v| v.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)))?;
            let parsed = http_range_header::parse_range_header(value).ok()?;
            if parsed.ranges.len() > 1 {
                return None;
            }
            // Unsatisfiable: ServeDir's 416.
            let mut ranges = parsed.validate(file.stat.len).ok()?;
            let range = ranges.pop()?;
            Some((*range.start(), *range.end()))
        }
        None => None,
    };
    Some(Plan {
        file,
        head_only: method == "HEAD",
        range,
        not_modified,
        close,
        method,
        target: target.to_owned(),
        logged,
    })
}

/// A small file not in the cache yet, whose content the answer needs: read and cached (or the
/// fd, to send with sendfile, if the file changed while being read).
async fn read_small(mut plan: Plan, shared: &Shared) -> io::Result<Plan> {
    if plan.head_only || plan.not_modified {
        return Ok(plan);
    }
    let Some(files) = shared.app.files() else {
        return Ok(plan);
    };
    plan.file.body = match plan.file.body {
        FastBody::Uncached(fd) => {
            let (stat, content_type) = (plan.file.stat, &plan.file.content_type);
            files.cache_small(fd, stat, content_type).await?
        }
        other => other,
    };
    Ok(plan)
}

/// Fills `slot` with `value`; false if it was filled already (a repeated header).
fn once<'a>(slot: &mut Option<&'a [u8]>, value: &'a [u8]) -> bool {
    slot.replace(value).is_none()
}

/// `ServeDir`'s 304 decision (RFC 9110 section 13.2.2, steps 3 and 4; `If-Match` and
/// `If-Unmodified-Since` never get here).
fn not_modified(file: &FastFile, if_none_match: Option<&[u8]>, since: Option<&[u8]>) -> bool {
    match if_none_match.filter(|v| !v.is_empty()) {
        Some(b"*") => true,
        Some(tags) => file
            .etag
            .as_ref()
            .is_some_and(|etag| any_etag(tags, |tag| weak_eq(etag.as_bytes(), tag))),
        None => {
            let Some(since) = since
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.parse::<httpdate::HttpDate>().ok())
            else {
                return false;
            };
            let last_modified = httpdate::HttpDate::from(file.stat.modified());
            last_modified <= since
        }
    }
}

/// Weak comparison of entity tags (RFC 9110 section 8.8.3.2).
fn weak_eq(ours: &[u8], theirs: &[u8]) -> bool {
    let ours = ours.strip_prefix(b"W/").unwrap_or(ours);
    theirs.strip_prefix(b"W/").unwrap_or(theirs) == ours
}

/// Whether `predicate` holds for any entity tag of a comma-separated list (commas inside
/// quotes belong to the tag), as `ServeDir` splits it.
fn any_etag(list: &[u8], mut predicate: impl FnMut(&[u8]) -> bool) -> bool {
    let trim = |s: &[u8]| -> Vec<u8> {
        let s = s.trim_ascii_start();
        let end = s
            .iter()
            .rposition(|&b| b != b' ' && b != b'\t')
            .map_or(0, |i| i + 1);
        s[..end].to_vec()
    };
    let mut start = 0;
    let mut in_quotes = false;
    for (i, &b) in list.iter().enumerate() {
        match b {
            b'"' => in_quotes = !in_quotes,
            b',' if !in_quotes => {
                let tag = trim(&list[start..i]);
                if !tag.is_empty() && predicate(&tag) {
                    return true;
                }
                start = i + 1;
            }
            _ => {}
        }
    }
    let tag = trim(&list[start..]);
    !tag.is_empty() && predicate(&tag)
}

/// Answers one request; `Ok(true)` when the connection may take another.
async fn respond<I>(
    io: &mut TrackedIo<I>,
    shared: &Arc<Shared>,
    state: &Arc<ConnState>,
    mut plan: Plan,
) -> io::Result<bool>
where
    I: Stream + AsyncRead + AsyncWrite + Unpin + Send,
{
    // As hyper's service call: busy from here until the last byte is written.
    state.in_flight.fetch_add(1, Ordering::SeqCst);
    state.awaiting_head_since.store(0, Ordering::SeqCst);
    state.input_since_call.store(false, Ordering::SeqCst);
    let done = ResponseDone {
        shared: shared.clone(),
        state: state.clone(),
        access: None,
    };
    // Logged when dropped: after the last byte, or with the bytes sent so far when the
    // connection ends mid-response (this future is dropped, or a write fails).
    let mut access = match (&shared.settings.access_log, plan.logged.take()) {
        (Some(log), Some(logged)) => {
            let [referer, user_agent, host] = *logged;
            Some(access_log::Pending::new(
                log.clone(),
                access_log::Entry {
                    client: state.client,
                    method: if plan.method == "HEAD" {
                        hyper::Method::HEAD
                    } else {
                        hyper::Method::GET
                    },
                    target: access_log::logged_target(&plan.target),
                    version: hyper::Version::HTTP_11,
                    status: 0,
                    bytes: 0,
                    end: std::time::SystemTime::UNIX_EPOCH,
                    duration: std::time::Duration::ZERO,
                    referer,
                    user_agent,
                    host,
                    unparsed: None,
                },
            ))
        }
        _ => None,
    };
    // A drain that passes the connection on keeps it alive.
    let close = plan.close
        || (shared.draining.load(Ordering::SeqCst) && shared.passes_on(state).is_none())
        || state.close_after.load(Ordering::SeqCst);
    let len = plan.file.stat.len;
    let (status, body) = match (plan.not_modified, plan.range) {
        (true, _) => (304, None),
        (false, Some((start, end))) => (206, Some((start, end + 1 - start))),
        (false, None) => (200, Some((0, len))),
    };
    let head = head(
        &plan,
        status,
        body.map_or(0, |(_, n)| n),
        close,
        shared.app.files().map(|files| files.headers()),
    );
    shared.metrics.record_status(status);
    shared.metrics.record_version(hyper::Version::HTTP_11);
    shared.metrics.fast_path_responses.inc();
    if let Some(access) = &mut access {
        access.set_status(status);
    }
    let body = body.filter(|&(_, n)| !plan.head_only && n > 0);
    let whole = match (body, plan.file.body) {
        (None, _) => {
            write_all(io, &head, &[], None).await?;
            true
        }
        (Some((start, n)), FastBody::Cached(content)) => {
            send_bytes(io, &head, &content, start, n, access.as_mut()).await?
        }
        // A file too large for the cache, or a small one that changed while being read
        // ([`read_small`]): what the fd holds now.
        (Some((start, n)), FastBody::Disk(file) | FastBody::Uncached(file)) => {
            let file = Arc::new(SentFile::opened(file));
            send_disk(io, &head, file, start, n, access.as_mut(), shared).await?
        }
        (Some((start, n)), FastBody::CachedFd(file)) => {
            send_disk(io, &head, file, start, n, access.as_mut(), shared).await?
        }
    };
    drop(access);
    drop(done);
    if !whole {
        tracing::info!(
            event = "file_truncated",
            path = %plan.target,
            "closing a connection: {} ended before its length while being sent",
            plan.target
        );
    }
    Ok(whole && !close && !state.close_after.load(Ordering::SeqCst))
}

/// The response head: `ServeDir`'s headers in its order, then what hyper adds.
fn head(
    plan: &Plan,
    status: u16,
    content_length: u64,
    close: bool,
    configured: Option<&crate::http::headers::Headers>,
) -> Vec<u8> {
    let file = &plan.file;
    let mut head = Vec::with_capacity(320);
    head.extend_from_slice(match status {
        304 => b"HTTP/1.1 304 Not Modified\r\n".as_slice(),
        206 => b"HTTP/1.1 206 Partial Content\r\n",
        _ => b"HTTP/1.1 200 OK\r\n",
    });
    let mut line = |name: &str, value: &[u8]| {
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    };
    if status == 304 {
        if let Some(etag) = &file.etag {
            line("etag", etag.as_bytes());
        }
        line("last-modified", file.last_modified.as_bytes());
    } else {
        line("content-type", file.content_type.as_bytes());
        line("accept-ranges", b"bytes");
        if let Some(coding) = file.coding {
            line("content-encoding", coding.token().as_bytes());
        }
        if file.vary {
            line("vary", b"accept-encoding");
        }
        line("last-modified", file.last_modified.as_bytes());
        if let Some(etag) = &file.etag {
            line("etag", etag.as_bytes());
        }
        if let Some((start, end)) = plan.range {
            let range = format!("bytes {start}-{end}/{}", file.stat.len);
            line("content-range", range.as_bytes());
        }
        line("content-length", content_length.to_string().as_bytes());
    }
    if let Some(configured) = configured.filter(|c| !c.none_configured()) {
        let path = plan.target.split('?').next().unwrap_or_default();
        let path = crate::http::normalized_path(path);
        configured.extra_lines(&path, &file.content_type, &mut line);
    }
    if (status == 304 && file.vary_not_modified) || (status != 304 && file.vary_late) {
        line("vary", b"accept-encoding");
    }
    if close {
        line("connection", b"close");
    }
    line("date", &http_date());
    head.extend_from_slice(b"\r\n");
    head
}

/// hyper's `date` for now: formatted once a second by each thread, as hyper caches its own.
fn http_date() -> [u8; 29] {
    thread_local! {
        static LAST: Cell<(u64, [u8; 29])> = const { Cell::new((u64::MAX, [0; 29])) };
    }
    let now = std::time::SystemTime::now();
    let second = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    LAST.with(|last| match last.get() {
        (of, date) if of == second => date,
        _ => {
            // Always 29 bytes: "Sun, 06 Nov 1994 08:49:37 GMT".
            let mut date = [0; 29];
            let _ = write!(
                &mut date.as_mut_slice(),
                "{}",
                httpdate::HttpDate::from(now)
            );
            last.set((second, date));
            date
        }
    })
}

/// The head, then `len` bytes of a cached file's `content` from `start`, in one send where
/// the socket takes it. Always whole (`Ok(true)`): the bytes cannot change.
async fn send_bytes<I>(
    io: &mut TrackedIo<I>,
    head: &[u8],
    content: &[u8],
    start: u64,
    len: u64,
    access: Option<&mut access_log::Pending>,
) -> io::Result<bool>
where
    I: Stream + AsyncRead + AsyncWrite + Unpin + Send,
{
    let (start, len) = (start as usize, len as usize);
    write_all(io, head, &content[start..start + len], access).await?;
    Ok(true)
}

/// The head, then `len` bytes of `file` from `start` with sendfile(2); `Ok(false)` if the file
/// ended first (truncated meanwhile).
async fn send_disk<I>(
    io: &mut TrackedIo<I>,
    head: &[u8],
    file: Arc<SentFile>,
    start: u64,
    len: u64,
    access: Option<&mut access_log::Pending>,
    shared: &Shared,
) -> io::Result<bool>
where
    I: Stream + AsyncRead + AsyncWrite + Unpin + Send,
{
    shared.metrics.sendfile_responses.inc();
    write_head(io, head).await?;
    send_file(io, file, start, len, access).await
}

/// Writes the response head and tells the kernel that the file follows (`MSG_MORE`), so that
/// the head and the first bytes of the file share a packet.
async fn write_head<I>(io: &mut TrackedIo<I>, head: &[u8]) -> io::Result<()>
where
    I: Stream + AsyncRead + AsyncWrite + Unpin + Send,
{
    write_parts(io, [head, &[]], libc::MSG_MORE, None).await
}

/// Writes `head` then `body` (each may be empty), in as few sends as the socket allows.
async fn write_all<I>(
    io: &mut TrackedIo<I>,
    head: &[u8],
    body: &[u8],
    access: Option<&mut access_log::Pending>,
) -> io::Result<()>
where
    I: Stream + AsyncRead + AsyncWrite + Unpin + Send,
{
    write_parts(io, [head, body], 0, access).await
}

/// Sends `parts` one after the other (sendmsg(2) with both), with `MSG_NOSIGNAL` and `flags`;
/// the bytes of the second part sent are counted in `access`.
async fn write_parts<I>(
    io: &mut TrackedIo<I>,
    mut parts: [&[u8]; 2],
    flags: libc::c_int,
    mut access: Option<&mut access_log::Pending>,
) -> io::Result<()>
where
    I: Stream + AsyncRead + AsyncWrite + Unpin + Send,
{
    let flags = libc::MSG_NOSIGNAL | flags;
    let fd = io.inner.as_raw_fd();
    while parts.iter().any(|part| !part.is_empty()) {
        let result = io.inner.try_write_with(|| {
            let iov = parts.map(|part| libc::iovec {
                iov_base: part.as_ptr().cast_mut().cast(),
                iov_len: part.len(),
            });
            // SAFETY: a zeroed msghdr is valid (no address, no control data); `iov` describes
            // two live buffers of their lengths, and outlives the call.
            let n = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = iov.as_ptr().cast_mut();
                msg.msg_iovlen = iov.len() as _;
                // `fd` is the connection's socket, open while `io` is borrowed.
                libc::sendmsg(fd, &msg, flags)
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match result {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                io.note_write(&Poll::Ready(Ok(n)));
                let of_head = n.min(parts[0].len());
                parts[0] = &parts[0][of_head..];
                parts[1] = &parts[1][n - of_head..];
                if let Some(access) = access.as_deref_mut() {
                    access.add_bytes((n - of_head) as u64);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                io.note_write(&Poll::Pending);
                io.inner.writable().await?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends `len` bytes of `file` from `start` with sendfile(2); `Ok(false)` if the file ended
/// first (truncated meanwhile).
async fn send_file<I>(
    io: &mut TrackedIo<I>,
    file: Arc<SentFile>,
    start: u64,
    len: u64,
    mut access: Option<&mut access_log::Pending>,
) -> io::Result<bool>
where
    I: Stream + AsyncRead + AsyncWrite + Unpin + Send,
{
    let end = start + len;
    let mut offset = start as libc::off_t;
    let mut since_yield = 0;
    // Where the next chunk begins: its first page is checked for being in the page cache.
    let mut next_probe = offset;
    while (offset as u64) < end {
        let count = (end - offset as u64).min(MAX_CHUNK as u64) as usize;
        if offset >= next_probe && may_be_cold(&file, offset as u64) {
            // A cold file: the disk read happens on the blocking pool, not in sendfile on a
            // worker every connection of it shares.
            let file = file.clone();
            let at = offset;
            let _ = tokio::task::spawn_blocking(move || {
                // SAFETY: readahead only reads the fd, which `file` keeps open.
                unsafe { libc::readahead(file.file.as_raw_fd(), at, count) };
                // readahead may return before its reads complete: wait here, not in sendfile
                // on the worker, for the chunk's last page (the reads go in order).
                let _ = file.file.read_at(&mut [0u8], at as u64 + count as u64 - 1);
            })
            .await;
        }
        if offset >= next_probe {
            next_probe = offset + count as libc::off_t;
        }
        let result = io.inner.try_write_with(|| {
            let file = file.file.as_fd();
            nix::sys::sendfile::sendfile(io.inner.as_fd(), file, Some(&mut offset), count)
                .map_err(io::Error::from)
        });
        match result {
            Ok(0) => return Ok(false),
            Ok(n) => {
                io.note_write(&Poll::Ready(Ok(n)));
                if let Some(access) = access.as_deref_mut() {
                    access.add_bytes(n as u64);
                }
                since_yield += n;
                if since_yield >= MAX_CHUNK {
                    since_yield = 0;
                    tokio::task::yield_now().await;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                io.note_write(&Poll::Pending);
                io.inner.writable().await?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if offset as u64 == start
                    && matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL)) =>
            {
                return copy_buffered(io, file, start, end, access).await;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// The buffered path, for files sendfile(2) cannot send: reads on the blocking pool, writes
/// through the tracked socket. `Ok(false)` if the file ended early.
async fn copy_buffered<I>(
    io: &mut TrackedIo<I>,
    file: Arc<SentFile>,
    mut offset: u64,
    end: u64,
    mut access: Option<&mut access_log::Pending>,
) -> io::Result<bool>
where
    I: Stream + AsyncRead + AsyncWrite + Unpin + Send,
{
    const BUFFER: usize = 256 * 1024;
    let mut buf = vec![0; BUFFER];
    while offset < end {
        let want = (end - offset).min(BUFFER as u64) as usize;
        let file = file.clone();
        let (read, back) = tokio::task::spawn_blocking(move || {
            let read = file.file.read_at(&mut buf[..want], offset);
            (read, buf)
        })
        .await
        .map_err(io::Error::other)?;
        buf = back;
        let n = read?;
        if n == 0 {
            return Ok(false);
        }
        io.write_all(&buf[..n]).await?;
        if let Some(access) = access.as_deref_mut() {
            access.add_bytes(n as u64);
        }
        offset += n as u64;
    }
    Ok(true)
}

/// How long a file a cache entry keeps open, once a probe found it in the page cache, is taken
/// to be there still without another probe. Such a file is at most
/// [`crate::http::MAX_CACHED_FILE`] long (one chunk), and each response that skips the probe
/// reads it again, which keeps its pages at the warm end of the page cache's LRU. Skipping the
/// probe saves a system call on a file every connection shares: 0.7-1.0 µs, 4-5% of baton's CPU
/// per 64 KiB response at 1,000 connections (`bench/http.sh`, docs/benchmarks.md). A page
/// dropped within the window anyway (by `drop_caches`, say) costs one sendfile a disk read on
/// the worker, a risk the rest of a chunk always had: the probe looks at its first page only.
const WARM_FOR_MS: u64 = 100;

/// Whether the page at `offset` of `file` may have to come from the disk: probed
/// ([`in_page_cache`]), unless `file` is one a cache entry keeps and a probe found it in the
/// page cache less than [`WARM_FOR_MS`] ago.
fn may_be_cold(file: &SentFile, offset: u64) -> bool {
    if !file.kept() {
        return !in_page_cache(&file.file, offset);
    }
    let now = crate::http::monotonic_ms();
    if file.warm_at_ms().is_some_and(|at| still_warm(at, now)) {
        return false;
    }
    let warm = in_page_cache(&file.file, offset);
    if warm {
        file.found_warm(now);
    }
    !warm
}

/// Whether a file found in the page cache at `warm_at` is taken to be there still at `now`
/// (monotonic milliseconds): for less than [`WARM_FOR_MS`].
fn still_warm(warm_at: u64, now: u64) -> bool {
    now.saturating_sub(warm_at) < WARM_FOR_MS
}

/// Whether the page at `offset` of `file` is in the page cache (a read would not wait for the
/// disk). `true` when the kernel cannot tell (no `RWF_NOWAIT` for buffered reads).
fn in_page_cache(file: &std::fs::File, offset: u64) -> bool {
    let mut byte = 0u8;
    let iov = libc::iovec {
        iov_base: (&mut byte as *mut u8).cast(),
        iov_len: 1,
    };
    // SAFETY: one iovec describing a live one-byte buffer; the fd is open (`file` is borrowed).
    let n = unsafe {
        libc::preadv2(
            file.as_raw_fd(),
            &iov,
            1,
            offset as libc::off_t,
            libc::RWF_NOWAIT,
        )
    };
    n >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN)
}

/// The IO hyper gets after the fast path: the bytes the fast path read, then the socket.
pub(super) struct Rewind<I> {
    prefix: Vec<u8>,
    pos: usize,
    inner: I,
}

impl<I> Rewind<I> {
    pub(super) fn new(inner: I, prefix: Vec<u8>) -> Rewind<I> {
        Rewind {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let pos = self.pos;
            buf.put_slice(&self.prefix[pos..pos + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_date_is_formatted_again_when_the_second_changes() {
        let started = std::time::Instant::now();
        let mut seen = std::collections::BTreeSet::new();
        // Calls until two seconds have been seen (a second boundary crossed), each checked
        // against the clock read around it.
        while seen.len() < 2 {
            assert!(started.elapsed() < std::time::Duration::from_secs(5));
            let before = httpdate::fmt_http_date(std::time::SystemTime::now());
            let date = String::from_utf8(http_date().to_vec()).unwrap();
            let after = httpdate::fmt_http_date(std::time::SystemTime::now());
            assert!(
                date == before || date == after,
                "{date} is neither {before} nor {after}"
            );
            seen.insert(date);
        }
    }

    /// A datagram socket whose peer never reads, sent to until its queue is full.
    fn full_socket() -> (
        std::os::unix::net::UnixDatagram,
        std::os::unix::net::UnixDatagram,
    ) {
        let (ours, theirs) = std::os::unix::net::UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let full = (0..1_000_000)
            .map(|_| ours.send(b"connection"))
            .find_map(Result::err)
            .expect("the queue never filled");
        assert_eq!(full.kind(), io::ErrorKind::WouldBlock, "{full}");
        (ours, theirs)
    }

    #[tokio::test]
    async fn a_full_queue_is_tried_again_until_it_has_room() {
        let (ours, theirs) = full_socket();
        let mut tries = 0;
        let sent = send_while_full(
            || {
                tries += 1;
                if tries == 3 {
                    // The next generation takes one connection off its queue.
                    theirs.recv(&mut [0u8; 64]).unwrap();
                }
                ours.send(b"connection").map(drop)
            },
            PASS_ON_TRIES,
            std::time::Duration::from_millis(1),
        )
        .await;
        assert!(sent.is_ok(), "{sent:?}");
        assert_eq!(tries, 3);
    }

    #[tokio::test]
    async fn a_queue_that_stays_full_is_given_up_after_the_last_try() {
        let (ours, _theirs) = full_socket();
        let mut tries = 0;
        let interval = std::time::Duration::from_millis(2);
        let started = std::time::Instant::now();
        let sent = send_while_full(
            || {
                tries += 1;
                ours.send(b"connection").map(drop)
            },
            5,
            interval,
        )
        .await;
        assert_eq!(sent.unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert_eq!(tries, 6, "the first try and five more");
        assert!(
            started.elapsed() >= interval * 5,
            "the tries were not apart"
        );
    }

    #[tokio::test]
    async fn any_other_error_is_not_tried_again() {
        let (ours, theirs) = full_socket();
        drop(theirs);
        let mut tries = 0;
        let sent = send_while_full(
            || {
                tries += 1;
                ours.send(b"connection").map(drop)
            },
            PASS_ON_TRIES,
            std::time::Duration::from_millis(1),
        )
        .await;
        assert_ne!(sent.unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert_eq!(tries, 1);
    }

    #[test]
    fn entity_tag_lists_split_as_serve_dir_does() {
        let mut tags = Vec::new();
        any_etag(b" \"a,b\" , W/\"c\",,\"d\"\t", |t| {
            tags.push(String::from_utf8(t.to_vec()).unwrap());
            false
        });
        assert_eq!(tags, ["\"a,b\"", "W/\"c\"", "\"d\""]);
        assert!(weak_eq(b"\"x\"", b"W/\"x\""));
        assert!(!weak_eq(b"\"x\"", b"\"y\""));
    }

    #[tokio::test]
    async fn rewind_gives_the_prefix_first() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut io = Rewind::new(a, b"GET / HTTP/1.1\r\n".to_vec());
        b.write_all(b"Host: x\r\n\r\n").await.unwrap();
        drop(b);
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    }

    /// A file written, written back and dropped from the page cache, or `None` where the file
    /// system cannot tell cold pages (`RWF_NOWAIT`).
    fn cold_file(name: &str, len: usize) -> Option<std::fs::File> {
        let path = std::env::temp_dir().join(format!("baton-{name}-{}", std::process::id()));
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(&vec![7u8; len]).unwrap();
        file.sync_all().unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        drop_from_page_cache(&file);
        if in_page_cache(&file, 0) {
            eprintln!("this file system does not report cold pages (RWF_NOWAIT)");
            return None;
        }
        Some(file)
    }

    fn drop_from_page_cache(file: &std::fs::File) {
        nix::fcntl::posix_fadvise(
            file,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
    }

    #[test]
    fn the_warm_window_is_a_hundred_milliseconds() {
        assert!(still_warm(1000, 1000));
        assert!(still_warm(1000, 1000 + WARM_FOR_MS - 1));
        assert!(!still_warm(1000, 1000 + WARM_FOR_MS));
        assert!(!still_warm(1000, 60_000));
        // Noted by another thread after this one read the clock.
        assert!(still_warm(1001, 1000));
    }

    #[test]
    fn a_kept_file_found_warm_is_not_probed_again_for_a_while() {
        let Some(file) = cold_file("warm", 64 << 10) else {
            return;
        };
        let held = SentFile::held(file.try_clone().unwrap());
        // Never found warm: probed, and cold.
        assert!(may_be_cold(&held, 0));
        assert_eq!(held.warm_at_ms(), None);
        // Found warm just now: taken to be warm without a probe (the page is in fact cold).
        held.found_warm(crate::http::monotonic_ms());
        assert!(!may_be_cold(&held, 0));
        // Found warm a window ago: probed again.
        held.found_warm(crate::http::monotonic_ms().saturating_sub(WARM_FOR_MS));
        assert!(may_be_cold(&held, 0));
        // A file opened for one request keeps no time: always probed.
        let opened = SentFile::opened(file);
        opened.found_warm(crate::http::monotonic_ms());
        assert_eq!(opened.warm_at_ms(), None);
        assert!(may_be_cold(&opened, 0));
    }

    #[test]
    fn a_probe_that_finds_a_kept_file_warm_notes_the_time() {
        let Some(file) = cold_file("probed", 64 << 10) else {
            return;
        };
        // Read back in.
        let _ = file.read_at(&mut [0u8], 0);
        let held = SentFile::held(file);
        let before = crate::http::monotonic_ms();
        assert!(!may_be_cold(&held, 0), "just read, so in the page cache");
        assert!(held.warm_at_ms().is_some_and(|at| at >= before));
        // Dropped from the cache since: within the window, not probed.
        drop_from_page_cache(&held.file);
        assert!(!in_page_cache(&held.file, 0));
        assert!(!may_be_cold(&held, 0));
    }

    #[test]
    fn pages_in_and_out_of_the_page_cache_are_told_apart() {
        let path = std::env::temp_dir().join(format!("baton-fast-{}", std::process::id()));
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(&vec![7u8; 1 << 20]).unwrap();
        let _ = std::fs::remove_file(&path);
        // Just written: in the page cache.
        assert!(in_page_cache(&file, 0));
        assert!(in_page_cache(&file, 4096));
        // Written back and dropped from the cache: cold, unless the file system cannot tell
        // (then every page counts as cached, and sendfile simply reads it).
        let Some(file) = cold_file("cold", 1 << 20) else {
            return;
        };
        // What send_file does for a cold chunk. readahead(2) starts the reads and may return
        // before they complete (the page is then locked, and RWF_NOWAIT still says EAGAIN):
        // the page comes in soon after.
        // SAFETY: the fd is open (`file`).
        assert!(unsafe { libc::readahead(file.as_raw_fd(), 0, 1 << 20) } == 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !in_page_cache(&file, 0) {
            assert!(
                std::time::Instant::now() < deadline,
                "not in the page cache 10 s after readahead"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}
