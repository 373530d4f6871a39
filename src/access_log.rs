//! The access log: one line per request, in its own destination, never in the way of serving.
//!
//! `log.access` (`--access-log DEST`) chooses where it goes: `off` (the default), `stderr`,
//! `journal` (the journal's native protocol, one datagram per request), an absolute path (a
//! file opened `O_APPEND|O_CREAT`, mode 0640, reopened on SIGUSR1 for logrotate), or `on`: the
//! journal when the event log goes there (stderr is the journal stream systemd set up), else
//! stderr. The old spelling `server.access_log = true/false` (and the bare `--access-log`)
//! means `on`/`off`.
//!
//! `log.access_format` (`--access-log-format`) is `combined`, nginx's default format exactly
//! (`$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent
//! "$http_referer" "$http_user_agent"`, with `"`, `\` and bytes outside printable ASCII as
//! `\xHH` as nginx writes them), or `json`: one object per line with every field, the
//! duration, the host and the generation too. In the journal, `MESSAGE=` is the combined line
//! and every field is a `BATON_*` field.
//!
//! The connection code hands a small [`Entry`] to a bounded queue with `try_send`, once the
//! response's last byte is written (or the connection ended mid-response, with the bytes sent
//! until then); a writer thread formats and writes it. A full queue or a failed write (a full
//! disk, a journal that does not keep up) drops the line and counts it in
//! `baton_access_log_dropped_total`: a request is never delayed by its log line.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hyper::header::HeaderValue;
use prometheus_client::metrics::counter::Counter;

/// Lines waiting for the writer; beyond this they are dropped (and counted).
pub const QUEUE: usize = 8192;

/// Where journald listens for native-protocol datagrams.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// How long the writer waits for the journal to take one datagram before dropping it.
const JOURNAL_TIMEOUT: Duration = Duration::from_secs(1);

/// Where the access log goes (`log.access`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Destination {
    #[default]
    Off,
    /// The journal when the event log goes there, else stderr.
    On,
    Stderr,
    Journal,
    File(PathBuf),
}

impl FromStr for Destination {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "off" | "false" => Destination::Off,
            "on" | "true" => Destination::On,
            "stderr" => Destination::Stderr,
            "journal" => Destination::Journal,
            "" => return Err(Destination::ADVICE.to_owned()),
            path => Destination::File(PathBuf::from(path)),
        })
    }
}

impl From<bool> for Destination {
    fn from(on: bool) -> Self {
        if on {
            Destination::On
        } else {
            Destination::Off
        }
    }
}

impl Destination {
    /// What to write instead of a bad value.
    pub const ADVICE: &'static str =
        "write off, on, stderr, journal or an absolute path such as /var/log/baton/access.log";

    /// `On` made concrete: the journal when stderr is the journal stream, else stderr.
    pub fn resolve(&self) -> Destination {
        match self {
            Destination::On if baton_lifecycle::logging::stderr_is_journal() => {
                Destination::Journal
            }
            Destination::On => Destination::Stderr,
            other => other.clone(),
        }
    }

    /// The problem with this destination, if any (`baton check`): a path must be absolute and
    /// its directory must exist.
    pub fn problem(&self) -> Option<String> {
        let Destination::File(path) = self else {
            return None;
        };
        if !path.is_absolute() {
            return Some(format!(
                "'{}' is neither a destination nor an absolute path; {}",
                path.display(),
                Destination::ADVICE
            ));
        }
        if path.is_dir() {
            return Some(format!(
                "{} is a directory, not a file (a bare --access-log before DIR takes DIR as its \
                 destination: write --access-log=on, or put DIR first)",
                path.display()
            ));
        }
        match path.parent().map(std::fs::metadata) {
            Some(Ok(m)) if m.is_dir() => None,
            _ => Some(format!(
                "{}: its directory does not exist; create it or choose another path",
                path.display()
            )),
        }
    }
}

/// How a line looks (`log.access_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// nginx's (and Apache's) combined log format.
    #[default]
    Combined,
    /// One JSON object per line.
    Json,
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "combined" => Ok(Format::Combined),
            "json" => Ok(Format::Json),
            _ => Err(format!(
                "'{s}' is not an access log format; write combined or json"
            )),
        }
    }
}

/// Who sent a request: the TCP peer, or the process at the other end of a unix socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Client {
    Tcp(SocketAddr),
    Unix {
        pid: Option<i32>,
        uid: u32,
    },
    #[default]
    Unknown,
}

impl std::fmt::Display for Client {
    /// nginx's `$remote_addr`: the address without the port; `unix:pid=P,uid=U` for a unix
    /// socket's peer.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Client::Tcp(addr) => write!(f, "{}", addr.ip().to_canonical()),
            Client::Unix {
                pid: Some(pid),
                uid,
            } => write!(f, "unix:pid={pid},uid={uid}"),
            Client::Unix { pid: None, uid } => write!(f, "unix:uid={uid}"),
            Client::Unknown => f.write_str("-"),
        }
    }
}

/// The most bytes of the request target and of each logged header kept: an entry owns copies
/// of them (a `HeaderValue` cloned from a request shares the buffer of its whole head, up to
/// hundreds of KiB), and a line fits a journal datagram.
pub const MAX_FIELD: usize = 2048;

/// A copy of at most [`MAX_FIELD`] bytes of a logged header's value; `None` if they are no
/// header value.
pub fn logged_header(bytes: &[u8]) -> Option<HeaderValue> {
    HeaderValue::from_bytes(&bytes[..bytes.len().min(MAX_FIELD)]).ok()
}

/// A copy of at most [`MAX_FIELD`] bytes of a request target (cut on a character boundary).
pub fn logged_target(target: &str) -> Box<str> {
    let mut end = target.len().min(MAX_FIELD);
    while !target.is_char_boundary(end) {
        end -= 1;
    }
    target[..end].into()
}

/// One request, as the connection code saw it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub client: Client,
    pub method: hyper::Method,
    /// The request target, at most [`MAX_FIELD`] bytes of it.
    pub target: Box<str>,
    pub version: hyper::Version,
    pub status: u16,
    /// Body bytes written to the socket.
    pub bytes: u64,
    /// When the last byte was written (or the connection ended).
    pub end: SystemTime,
    /// From the request head to [`Entry::end`].
    pub duration: Duration,
    pub referer: Option<HeaderValue>,
    pub user_agent: Option<HeaderValue>,
    pub host: Option<HeaderValue>,
    /// Of a request hyper could not parse and answered itself (400, 414, 431): its request line
    /// as received, at most [`MAX_FIELD`] bytes (empty if unknown). `method`, `target` and
    /// `version` then say nothing, and are not logged.
    pub unparsed: Option<Box<[u8]>>,
}

impl Entry {
    /// A request hyper could not parse and answered with `status`, whose request line began
    /// with `line` (see [`LineRecorder`]; empty if unknown).
    pub fn unparsed(client: Client, status: u16, line: Box<[u8]>) -> Entry {
        Entry {
            client,
            method: hyper::Method::GET,
            target: "".into(),
            version: hyper::Version::HTTP_11,
            status,
            bytes: 0,
            end: SystemTime::UNIX_EPOCH,
            duration: Duration::ZERO,
            referer: None,
            user_agent: None,
            host: None,
            unparsed: Some(line),
        }
    }
}

/// The request line of a request being received, kept in case hyper rejects the request
/// before the service sees it ([`Entry::unparsed`]): the bytes up to the first CR or LF, at
/// most [`MAX_FIELD`] of them. Empty lines before it are skipped, as RFC 9112 section 2.2 lets
/// a server do (hyper does).
#[derive(Debug, Default)]
pub struct LineRecorder {
    line: Vec<u8>,
    done: bool,
}

impl LineRecorder {
    /// Takes the next bytes received; true once the line is complete (or cut).
    pub fn push(&mut self, mut input: &[u8]) -> bool {
        if self.done {
            return true;
        }
        if self.line.is_empty() {
            let start = input.iter().position(|&b| b != b'\r' && b != b'\n');
            input = &input[start.unwrap_or(input.len())..];
        }
        let end = input.iter().position(|&b| b == b'\r' || b == b'\n');
        let room = MAX_FIELD - self.line.len();
        self.line
            .extend_from_slice(&input[..end.unwrap_or(input.len()).min(room)]);
        self.done = end.is_some() || self.line.len() == MAX_FIELD;
        self.done
    }

    /// The line so far.
    pub fn take(&mut self) -> Box<[u8]> {
        std::mem::take(&mut self.line).into()
    }
}

/// A request being answered: logged when dropped, i.e. once the response is finished or
/// abandoned, with the bytes counted until then.
pub struct Pending {
    log: Arc<AccessLog>,
    started: Instant,
    entry: Option<Box<Entry>>,
}

impl Pending {
    /// Starts timing a request.
    pub fn new(log: Arc<AccessLog>, entry: Entry) -> Pending {
        Pending {
            log,
            started: Instant::now(),
            entry: Some(Box::new(entry)),
        }
    }

    pub fn set_status(&mut self, status: u16) {
        if let Some(entry) = &mut self.entry {
            entry.status = status;
        }
    }

    /// Adds body bytes sent.
    pub fn add_bytes(&mut self, n: u64) {
        if let Some(entry) = &mut self.entry {
            entry.bytes += n;
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(mut entry) = self.entry.take() {
            entry.duration = self.started.elapsed();
            entry.end = SystemTime::now();
            self.log.send(entry);
        }
    }
}

enum Message {
    Entry(Box<Entry>),
    /// Wakes the writer (for a reopen).
    Wake,
}

/// The handle the connections log through. When the last one drops (the generation is done),
/// the writer writes what is queued and ends; the drop waits for that, [`FLUSH_TIMEOUT`] at
/// most, so that the last requests before an exit are not lost.
pub struct AccessLog {
    /// `None` only while dropping.
    queue: Option<SyncSender<Message>>,
    /// Disconnected when the writer has ended.
    ended: std::sync::Mutex<Option<Receiver<()>>>,
    reopen: Arc<AtomicBool>,
    dropped: Counter,
}

/// The longest the last drop of an [`AccessLog`] waits for the queued lines to be written.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

impl Drop for AccessLog {
    fn drop(&mut self) {
        drop(self.queue.take());
        let ended = self.ended.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(ended) = ended.take() {
            let _ = ended.recv_timeout(FLUSH_TIMEOUT);
        }
    }
}

impl AccessLog {
    /// Opens `destination` (`Off`: `None`) and starts the writer thread. Lines that cannot
    /// be queued or written are counted in `dropped`.
    pub fn start(
        destination: &Destination,
        format: Format,
        generation: u64,
        dropped: Counter,
    ) -> io::Result<Option<Arc<AccessLog>>> {
        let sink = match destination.resolve() {
            Destination::Off | Destination::On => return Ok(None),
            Destination::Stderr => Sink::Stderr,
            Destination::Journal => Sink::journal(Path::new(JOURNAL_SOCKET))?,
            Destination::File(path) => Sink::File {
                file: open(&path)?,
                path,
            },
        };
        Ok(Some(AccessLog::with_sink(
            sink, format, generation, dropped,
        )))
    }

    fn with_sink(sink: Sink, format: Format, generation: u64, dropped: Counter) -> Arc<AccessLog> {
        let (queue, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let (ending, ended) = std::sync::mpsc::channel::<()>();
        let reopen = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            sink,
            format,
            generation,
            reopen: reopen.clone(),
            dropped: dropped.clone(),
        };
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                writer.run(rx);
                drop(ending);
            })
            .expect("cannot start the access log's thread");
        Arc::new(AccessLog {
            queue: Some(queue),
            ended: std::sync::Mutex::new(Some(ended)),
            reopen,
            dropped,
        })
    }

    /// Queues one line, or drops and counts it when the queue is full.
    pub fn send(&self, entry: Box<Entry>) {
        let Some(queue) = &self.queue else {
            return;
        };
        match queue.try_send(Message::Entry(entry)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }

    /// Asks the writer to open the file anew (after logrotate renamed it); nothing for the
    /// journal or stderr.
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::SeqCst);
        // A full queue means the writer is busy, and it looks at the flag before each batch.
        if let Some(queue) = &self.queue {
            let _ = queue.try_send(Message::Wake);
        }
    }
}

/// Opens the access log file: appending, created with mode 0640.
fn open(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("access log {}: {e}", path.display())))
}

enum Sink {
    Stderr,
    File { path: PathBuf, file: File },
    Journal { socket: UnixDatagram, path: PathBuf },
}

impl Sink {
    fn journal(path: &Path) -> io::Result<Sink> {
        // Nobody listening would cost every line, counted but never said: refuse at start.
        UnixDatagram::unbound()?.connect(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "no journal listens at {}: {e}; log to stderr or a file where there is no \
                     journald",
                    path.display()
                ),
            )
        })?;
        let socket = UnixDatagram::unbound()?;
        socket.set_write_timeout(Some(JOURNAL_TIMEOUT))?;
        Ok(Sink::Journal {
            socket,
            path: path.to_owned(),
        })
    }
}

struct Writer {
    sink: Sink,
    format: Format,
    generation: u64,
    reopen: Arc<AtomicBool>,
    dropped: Counter,
}

/// The most lines written with one write(2).
const BATCH: usize = 256;

/// How long the writer lets lines gather once it is awake: under load it wakes this often and
/// takes what came, so that the requests hand their lines over without waking it (a futex wake
/// each) every time.
const GATHER: Duration = Duration::from_millis(10);

impl Writer {
    /// Parked on the queue while idle; awake, writes what came, waits [`GATHER`] for more,
    /// and parks again once a wait brought nothing.
    fn run(mut self, rx: Receiver<Message>) {
        let mut text = String::new();
        let mut batch = Vec::with_capacity(BATCH);
        while let Ok(first) = rx.recv() {
            batch.push(first);
            loop {
                let open = fill(&rx, &mut batch);
                let full = batch.len() == BATCH;
                self.write(&mut batch, &mut text);
                if !open {
                    return;
                }
                if full {
                    continue;
                }
                std::thread::sleep(GATHER);
                match rx.try_recv() {
                    Ok(message) => batch.push(message),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
        }
    }

    /// Writes the lines of `batch` (emptied) in one write(2), or one datagram each to the
    /// journal; counts the ones that could not be written.
    fn write(&mut self, batch: &mut Vec<Message>, text: &mut String) {
        if self.reopen.swap(false, Ordering::SeqCst) {
            self.reopen_file();
        }
        text.clear();
        let mut lines = 0;
        for message in batch.drain(..) {
            let Message::Entry(entry) = message else {
                continue;
            };
            if let Sink::Journal { socket, path } = &self.sink {
                let datagram = journal_datagram(&entry, self.generation);
                if socket.send_to(&datagram, path).is_err() {
                    self.dropped.inc();
                }
                continue;
            }
            match self.format {
                Format::Combined => combined(&entry, text),
                Format::Json => json(&entry, self.generation, text),
            }
            text.push('\n');
            lines += 1;
        }
        if lines == 0 {
            return;
        }
        let written = match &mut self.sink {
            Sink::Stderr => io::stderr().lock().write_all(text.as_bytes()),
            Sink::File { file, .. } => file.write_all(text.as_bytes()),
            Sink::Journal { .. } => Ok(()),
        };
        if written.is_err() {
            self.dropped.inc_by(lines);
        }
    }

    fn reopen_file(&mut self) {
        let Sink::File { path, file } = &mut self.sink else {
            return;
        };
        match open(path) {
            Ok(new) => {
                *file = new;
                tracing::info!(
                    event = "access-log-reopened",
                    "SIGUSR1: access log reopened"
                );
            }
            Err(e) => {
                tracing::error!("SIGUSR1: cannot reopen the {e}; still writing to the old file")
            }
        }
    }
}

/// Moves what is queued into `batch`, up to [`BATCH`]; false once every sender is gone.
fn fill(rx: &Receiver<Message>, batch: &mut Vec<Message>) -> bool {
    while batch.len() < BATCH {
        match rx.try_recv() {
            Ok(message) => batch.push(message),
            Err(TryRecvError::Empty) => return true,
            Err(TryRecvError::Disconnected) => return false,
        }
    }
    true
}

/// nginx's escaping of a logged variable: `"`, `\`, control bytes and bytes beyond ASCII as
/// `\xHH`.
fn escape(bytes: &[u8], out: &mut String) {
    for &b in bytes {
        if !(0x20..0x7f).contains(&b) || b == b'"' || b == b'\\' {
            let _ = write!(out, "\\x{b:02X}");
        } else {
            out.push(b as char);
        }
    }
}

fn protocol(version: hyper::Version) -> &'static str {
    match version {
        hyper::Version::HTTP_09 => "HTTP/0.9",
        hyper::Version::HTTP_10 => "HTTP/1.0",
        hyper::Version::HTTP_2 => "HTTP/2.0",
        hyper::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// nginx's `$time_local`: `30/Nov/2026:16:57:25 +0100`.
fn time_local(t: SystemTime, out: &mut String) {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as libc::time_t;
    // SAFETY: localtime_r writes only into `tm`; an all-zero tm is a valid value.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    unsafe { libc::localtime_r(&secs, &mut tm) };
    let offset = tm.tm_gmtoff / 60;
    let sign = if offset < 0 { '-' } else { '+' };
    let _ = write!(
        out,
        "{:02}/{}/{}:{:02}:{:02}:{:02} {sign}{:02}{:02}",
        tm.tm_mday,
        MONTHS[tm.tm_mon.clamp(0, 11) as usize],
        tm.tm_year + 1900,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        offset.abs() / 60,
        offset.abs() % 60
    );
}

/// The request line, as nginx's `$request` (`-` when unknown).
fn request_line(entry: &Entry, out: &mut String) {
    match entry.unparsed.as_deref() {
        Some([]) => return out.push('-'),
        Some(line) => return escape(line, out),
        None => {}
    }
    escape(entry.method.as_str().as_bytes(), out);
    out.push(' ');
    escape(entry.target.as_bytes(), out);
    out.push(' ');
    out.push_str(protocol(entry.version));
}

/// The combined log format, exactly as nginx writes it.
pub fn combined(entry: &Entry, out: &mut String) {
    let _ = write!(out, "{} - - [", entry.client);
    time_local(entry.end, out);
    out.push_str("] \"");
    request_line(entry, out);
    let _ = write!(out, "\" {} {} \"", entry.status, entry.bytes);
    header(entry.referer.as_ref(), out);
    out.push_str("\" \"");
    header(entry.user_agent.as_ref(), out);
    out.push('"');
}

fn header(value: Option<&HeaderValue>, out: &mut String) {
    match value {
        Some(v) => escape(v.as_bytes(), out),
        None => out.push('-'),
    }
}

fn lossy(value: Option<&HeaderValue>) -> Option<String> {
    value.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// One JSON object with every field.
pub fn json(entry: &Entry, generation: u64, out: &mut String) {
    let mut time = String::new();
    time_local(entry.end, &mut time);
    let parsed = entry.unparsed.is_none();
    let mut value = serde_json::json!({
        "time": crate::http::rfc3339(entry.end),
        "time_local": time,
        "client": entry.client.to_string(),
        "method": parsed.then(|| entry.method.as_str()),
        "path": parsed.then_some(&*entry.target),
        "protocol": parsed.then(|| protocol(entry.version)),
        "status": entry.status,
        "bytes": entry.bytes,
        "duration_us": entry.duration.as_micros() as u64,
        "referer": lossy(entry.referer.as_ref()),
        "user_agent": lossy(entry.user_agent.as_ref()),
        "host": lossy(entry.host.as_ref()),
        "generation": generation,
    });
    if let Some(line) = &entry.unparsed {
        value["request"] = String::from_utf8_lossy(line).into();
    }
    let _ = write!(out, "{value}");
}

/// One field of a journal datagram: `KEY=value\n`, or for a value with a newline the binary
/// form `KEY\n`, its length as 64-bit little endian, the value, `\n`.
fn journal_field(datagram: &mut Vec<u8>, key: &str, value: &[u8]) {
    datagram.extend_from_slice(key.as_bytes());
    if value.contains(&b'\n') {
        datagram.push(b'\n');
        datagram.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        datagram.push(b'=');
    }
    datagram.extend_from_slice(value);
    datagram.push(b'\n');
}

/// The native-protocol datagram for one request.
fn journal_datagram(entry: &Entry, generation: u64) -> Vec<u8> {
    let mut line = String::new();
    combined(entry, &mut line);
    let mut d = Vec::with_capacity(512 + line.len());
    journal_field(&mut d, "MESSAGE", line.as_bytes());
    journal_field(&mut d, "PRIORITY", b"6");
    journal_field(&mut d, "SYSLOG_IDENTIFIER", b"baton");
    journal_field(&mut d, "BATON_EVENT", b"access");
    journal_field(&mut d, "BATON_CLIENT", entry.client.to_string().as_bytes());
    match &entry.unparsed {
        Some(line) => journal_field(&mut d, "BATON_REQUEST", line),
        None => {
            journal_field(&mut d, "BATON_METHOD", entry.method.as_str().as_bytes());
            journal_field(&mut d, "BATON_PATH", entry.target.as_bytes());
            journal_field(&mut d, "BATON_PROTOCOL", protocol(entry.version).as_bytes());
        }
    }
    journal_field(&mut d, "BATON_STATUS", entry.status.to_string().as_bytes());
    journal_field(&mut d, "BATON_BYTES", entry.bytes.to_string().as_bytes());
    let micros = entry.duration.as_micros().to_string();
    journal_field(&mut d, "BATON_DURATION_US", micros.as_bytes());
    for (key, value) in [
        ("BATON_REFERER", &entry.referer),
        ("BATON_USER_AGENT", &entry.user_agent),
        ("BATON_HOST", &entry.host),
    ] {
        if let Some(value) = value {
            journal_field(&mut d, key, value.as_bytes());
        }
    }
    journal_field(
        &mut d,
        "BATON_GENERATION",
        generation.to_string().as_bytes(),
    );
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            client: Client::Tcp("127.0.0.1:5555".parse().unwrap()),
            method: hyper::Method::GET,
            target: "/a%20b.txt?x=1".into(),
            version: hyper::Version::HTTP_11,
            status: 200,
            bytes: 1234,
            end: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            duration: Duration::from_micros(4321),
            referer: Some(HeaderValue::from_static("http://x/\"q\"")),
            user_agent: Some(HeaderValue::from_bytes(b"curl/8 \xff\\").unwrap()),
            host: Some(HeaderValue::from_static("example.org")),
            unparsed: None,
        }
    }

    #[test]
    fn combined_is_nginx_with_its_escapes() {
        let mut line = String::new();
        combined(&entry(), &mut line);
        let (head, rest) = line.split_once(" [").unwrap();
        assert_eq!(head, "127.0.0.1 - -");
        let (time, rest) = rest.split_once("] ").unwrap();
        assert_eq!(time.len(), "14/Nov/2023:22:13:20 +0000".len(), "{time}");
        assert!(time.contains("/Nov/2023:"), "{time}");
        assert_eq!(
            rest,
            r#""GET /a%20b.txt?x=1 HTTP/1.1" 200 1234 "http://x/\x22q\x22" "curl/8 \xFF\x5C""#
        );
        let mut line = String::new();
        let mut e = entry();
        e.referer = None;
        e.user_agent = None;
        e.client = Client::Unix {
            pid: Some(12),
            uid: 0,
        };
        combined(&e, &mut line);
        assert!(line.starts_with("unix:pid=12,uid=0 - - ["), "{line}");
        assert!(line.ends_with(r#" 200 1234 "-" "-""#), "{line}");
    }

    #[test]
    fn json_has_every_field() {
        let mut line = String::new();
        json(&entry(), 7, &mut line);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["client"], "127.0.0.1");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["path"], "/a%20b.txt?x=1");
        assert_eq!(v["protocol"], "HTTP/1.1");
        assert_eq!(v["status"], 200);
        assert_eq!(v["bytes"], 1234);
        assert_eq!(v["duration_us"], 4321);
        assert_eq!(v["referer"], "http://x/\"q\"");
        assert_eq!(v["host"], "example.org");
        assert_eq!(v["generation"], 7);
        assert_eq!(v["time"], "2023-11-14T22:13:20Z");
    }

    #[test]
    fn a_request_hyper_could_not_parse_is_logged_as_received() {
        let client = Client::Tcp("127.0.0.1:5555".parse().unwrap());
        let line = line_of(&[b"BAD\x01 /\"x\" HTTP/1.1\r\nHost: a\r\n\r\n"]);
        assert_eq!(&*line, b"BAD\x01 /\"x\" HTTP/1.1");
        let e = Entry::unparsed(client, 400, line);
        let mut text = String::new();
        combined(&e, &mut text);
        assert!(
            text.ends_with(r#"] "BAD\x01 /\x22x\x22 HTTP/1.1" 400 0 "-" "-""#),
            "{text}"
        );
        let mut text = String::new();
        json(&e, 7, &mut text);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["request"], "BAD\u{1} /\"x\" HTTP/1.1");
        assert_eq!(v["status"], 400);
        for absent in ["method", "path", "protocol"] {
            assert_eq!(v[absent], serde_json::Value::Null, "{absent}");
        }
        let datagram = String::from_utf8(journal_datagram(&e, 7)).unwrap();
        assert!(datagram.contains("\nBATON_REQUEST=BAD\u{1} /\"x\" HTTP/1.1\n"));
        assert!(datagram.contains("\nBATON_STATUS=400\n"));
        assert!(!datagram.contains("BATON_METHOD"), "{datagram}");
        // No request line at all: nginx's "-".
        let e = Entry::unparsed(client, 400, line_of(&[b"\r\n"]));
        let mut text = String::new();
        combined(&e, &mut text);
        assert!(text.ends_with(r#"] "-" 400 0 "-" "-""#), "{text}");
    }

    /// What a recorder makes of `reads`, one after the other.
    fn line_of(reads: &[&[u8]]) -> Box<[u8]> {
        let mut recorder = LineRecorder::default();
        for read in reads {
            recorder.push(read);
        }
        recorder.take()
    }

    #[test]
    fn a_request_line_ends_at_cr_or_lf_and_is_cut_to_the_field_limit() {
        assert_eq!(&*line_of(&[b"GET / HTTP/1.1\nHost: a"]), b"GET / HTTP/1.1");
        assert_eq!(&*line_of(&[b"GET / HT"]), b"GET / HT");
        assert_eq!(&*line_of(&[b""]), b"");
        // Over several reads, and nothing after the line's end.
        assert_eq!(
            &*line_of(&[b"GE", b"T / HTTP/1.1", b"\r\nHost: a", b"x"]),
            b"GET / HTTP/1.1"
        );
        // Empty lines before a request are skipped, as hyper skips them.
        assert_eq!(
            &*line_of(&[b"\r\n\r", b"\nGET / HTTP/1.1\r\n"]),
            b"GET / HTTP/1.1"
        );
        // Cut at the limit, in one read or in several.
        let long = [b'a'; MAX_FIELD + 10];
        assert_eq!(line_of(&[&long]).len(), MAX_FIELD);
        assert_eq!(
            line_of(&[&long[..MAX_FIELD - 1], b"bb", b"c"]).len(),
            MAX_FIELD
        );
        let mut recorder = LineRecorder::default();
        assert!(!recorder.push(b"GET /"));
        assert!(recorder.push(b" HTTP/1.1\r"));
        assert!(recorder.push(b"more"));
    }

    #[test]
    fn a_journal_value_with_a_newline_takes_the_binary_form() {
        let mut d = Vec::new();
        journal_field(&mut d, "A", b"one");
        journal_field(&mut d, "B", b"x\ny");
        let mut want = b"A=one\nB\n".to_vec();
        want.extend_from_slice(&3u64.to_le_bytes());
        want.extend_from_slice(b"x\ny\n");
        assert_eq!(d, want);
    }

    /// The writer sends each request as one datagram to the journal's socket (here a socket
    /// the test binds).
    #[test]
    fn the_journal_gets_the_fields() {
        let dir = std::env::temp_dir().join(format!("baton-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("socket");
        let journal = UnixDatagram::bind(&path).unwrap();
        journal
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let dropped = Counter::default();
        let log = AccessLog::with_sink(
            Sink::journal(&path).unwrap(),
            Format::Combined,
            3,
            dropped.clone(),
        );
        log.send(Box::new(entry()));
        let mut buf = vec![0; 65536];
        let n = journal.recv(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let fields: Vec<&str> = text.lines().collect();
        for want in [
            "PRIORITY=6",
            "SYSLOG_IDENTIFIER=baton",
            "BATON_CLIENT=127.0.0.1",
            "BATON_METHOD=GET",
            "BATON_PATH=/a%20b.txt?x=1",
            "BATON_STATUS=200",
            "BATON_BYTES=1234",
            "BATON_DURATION_US=4321",
            "BATON_REFERER=http://x/\"q\"",
            "BATON_HOST=example.org",
            "BATON_GENERATION=3",
        ] {
            assert!(fields.contains(&want), "{want} missing from {fields:?}");
        }
        let message = fields
            .iter()
            .find_map(|f| f.strip_prefix("MESSAGE="))
            .unwrap();
        assert!(
            message.starts_with("127.0.0.1 - - [") && message.contains("\"GET /a%20b.txt?x=1"),
            "{message}"
        );
        assert!(fields
            .iter()
            .any(|f| f.starts_with("BATON_USER_AGENT=curl/8")));
        assert_eq!(dropped.get(), 0);
        // No journal listening: the line is dropped and counted, nothing else happens.
        drop(journal);
        std::fs::remove_file(&path).unwrap();
        log.send(Box::new(entry()));
        assert!(
            (0..500).any(|_| {
                std::thread::sleep(Duration::from_millis(10));
                dropped.get() == 1
            }),
            "the failed send was not counted"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The last drop waits for the queued lines: none is lost at exit.
    #[test]
    fn the_last_drop_writes_what_is_queued() {
        let dir = std::env::temp_dir().join(format!("baton-flush-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let log = AccessLog::start(
            &Destination::File(path.clone()),
            Format::Combined,
            1,
            Counter::default(),
        )
        .unwrap()
        .unwrap();
        for _ in 0..1000 {
            log.send(Box::new(entry()));
        }
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1000);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_journal_nobody_listens_at_is_refused_at_start() {
        let Err(e) = Sink::journal(Path::new("/nonexistent/journal/socket")) else {
            panic!("accepted a journal socket that is not there");
        };
        assert!(
            e.to_string()
                .starts_with("no journal listens at /nonexistent/"),
            "{e}"
        );
    }

    #[test]
    fn logged_values_are_owned_copies_and_bounded() {
        let long = "é".repeat(MAX_FIELD);
        let target = logged_target(&long);
        assert!(target.len() <= MAX_FIELD && long.starts_with(&*target));
        assert_eq!(&*logged_target("/a?b"), "/a?b");
        let value = HeaderValue::from_bytes(&vec![b'a'; 100_000]).unwrap();
        assert_eq!(logged_header(value.as_bytes()).unwrap().len(), MAX_FIELD);
        // The largest entry still fits one journal datagram (208 KiB by default).
        let bad = HeaderValue::from_bytes(&[0x80; MAX_FIELD]).unwrap();
        let mut big = entry();
        (big.referer, big.user_agent, big.host) = (Some(bad.clone()), Some(bad.clone()), Some(bad));
        big.target = "\u{1}".repeat(MAX_FIELD).into();
        assert!(journal_datagram(&big, 1).len() < 100 * 1024);
    }

    #[test]
    fn destinations_and_formats_parse() {
        assert_eq!("off".parse(), Ok(Destination::Off));
        assert_eq!("true".parse(), Ok(Destination::On));
        assert_eq!("journal".parse(), Ok(Destination::Journal));
        assert_eq!(
            "/var/log/x.log".parse(),
            Ok(Destination::File("/var/log/x.log".into()))
        );
        assert!(Destination::File("x".into()).problem().is_some());
        assert!(Destination::File("/nonexistent-dir/x.log".into())
            .problem()
            .unwrap()
            .contains("directory does not exist"));
        assert_eq!(Destination::File("/dev/full".into()).problem(), None);
        assert!(Destination::File("/tmp".into())
            .problem()
            .unwrap()
            .contains("--access-log=on"));
        assert_eq!("json".parse(), Ok(Format::Json));
        assert!("xml"
            .parse::<Format>()
            .unwrap_err()
            .contains("combined or json"));
    }
}
