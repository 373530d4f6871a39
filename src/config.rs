//! Configuration: the embedded defaults, the TOML file, and command-line overrides.
//!
//! Precedence, lowest first: the defaults compiled in ([`Config::default`]), the file
//! (`--config PATH`, else `/etc/baton/baton.toml` when it exists), then command-line flags.
//! Every problem in a file is collected and reported at once ([`ConfigErrors`]), so that
//! `baton check` can list them all; unknown keys are errors, not silently ignored.
//!
//! Each setting is declared once, in the `settings!` invocation below: its key, its type, its
//! flag and the [`Config`] field it sets. The file and the flags are both read into
//! [`Settings`] (every value optional) and laid over the defaults by the same
//! [`Config::apply`].
//!
//! [`KEYS`] lists every key with its type, default and meaning: baton(8)'s CONFIGURATION
//! section is rendered from it, and the tests check that the parser reads exactly those keys
//! and that their defaults are [`Config::default`]'s. The file format, in short:
//!
//! ```toml
//! [server]
//! listen = ["http=127.0.0.1:8080"]   # "[NAME=]ADDR", ADDR: IP:PORT, [IPv6]:PORT or unix:/path
//! root = "/var/www/html"             # serve static files from here; unset: the embedded page
//! access_log = false                 # old spelling of log.access: true is "on", false "off"
//! pidfile = "/run/baton/baton.pid"   # locked for the process's life; used with --daemon or when set
//! workers = 0                        # threads serving connections; 0: one per CPU
//!
//! [limits]
//! max_connections = 10000            # further clients wait in the backlog; idle ones make room
//! header_read_timeout = "10s"        # from a request's first byte (or accept) to its full head
//! idle_timeout = "60s"               # an idle keep-alive connection is closed after this
//! send_timeout = "60s"               # a client that accepts no byte of a response this long is cut
//!
//! [shutdown]
//! drain_timeout = "30s"              # in-flight requests may finish for this long on stop
//! idle_grace = "1s"                  # idle keep-alive connections may send one more request
//!
//! [log]
//! level = "info"                     # or a RUST_LOG-style filter; RUST_LOG overrides it
//! file = "/var/log/baton.log"        # text logs appended here; SIGUSR1 reopens it
//! access = "off"                     # access log: off, on, stderr, journal or /path (SIGUSR1 reopens)
//! access_format = "combined"         # or "json"
//!
//! [upgrade]
//! exec = "/usr/bin/baton"            # the binary a reload starts; default: this executable
//! timeout = "60s"                    # the new process must be ready within this
//! probation = "10s"                  # the old process takes over again if the new one exits within this
//!
//! [keeper]                           # without systemd: the keeper (see crate::keeper)
//! startsecs = "1s"                   # a start succeeded once the generation was ready this long
//! startretries = 3                   # consecutive failed starts retried before giving up
//!
//! [files]                            # what the root answers beyond its files (crate::http::pages)
//! not_found_page = "404.html"        # served with 404 when it exists in the root; "" switches it off
//! error_page = "50x.html"            # served with the 5xx when it exists in the root; "" off
//! fallback = "index.html"            # unset by default; a single-page app's answer to unknown paths
//! listing = false                    # list a directory that has no index.html
//!
//! [admin]                            # the /-/ endpoints (crate::http::admin)
//! endpoints = true                   # false: none anywhere; /-/ paths are files of the root
//! listener = "admin"                 # a listener of this name, if any, takes the endpoints
//! public = ["/-/healthy"]            # still answered on every listener
//!
//! [compression]
//! on_the_fly = true                  # compress text types as they are sent (zstd, br, gzip)
//! precompressed = true               # serve FILE.zst, FILE.br, FILE.gz beside FILE
//! codings = ["zstd", "br", "gzip"]   # the codings used, both ways
//! min_size = 1024                    # smaller answers are not compressed on the fly
//!
//! [headers]
//! cache_control = ["/assets/**=max-age=31536000, immutable", "text/html=no-cache"]
//! add = ["X-Content-Type-Options: nosniff"]  # on every answer from the root
//! charset = "utf-8"                  # of text types that name none
//!
//! [http2]
//! cleartext = ["http"]               # listeners that take h2c (prior knowledge) too
//! max_concurrent_streams = 128       # streams a client may have open on one connection
//! max_header_list_size = 16384       # the most bytes of a request's headers
//! ```
//!
//! ```
//! let config = baton::config::Config::from_toml_str(
//!     "[server]\nlisten = [\"http=127.0.0.1:0\", \"admin=unix:/run/baton/admin.sock\"]\n",
//!     None,
//! )
//! .unwrap();
//! assert_eq!(config.listeners[1].name, "admin");
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::http::encoding::{Coding, Compression};
pub use crate::http::headers::{CacheRule, ExtraHeader, Headers};

/// Where the configuration is looked for when no `--config` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/baton/baton.toml";

/// The most connections `limits.max_connections` may allow.
pub const MAX_CONNECTIONS: usize = 1_000_000;
/// The longest any timeout may be.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// The name a listener gets when `--listen` or the config names none.
pub use baton_lifecycle::activation::{ListenAddress, ListenSpec, DEFAULT_LISTENER_NAME};

/// One key of the configuration file, as baton(8) documents it ([`KEYS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// The table, as in `[limits]`.
    pub section: &'static str,
    /// The key inside its table.
    pub name: &'static str,
    /// The value's type, in words.
    pub kind: &'static str,
    /// The default: a TOML value the parser turns into [`Config::default`]'s setting, or
    /// `None` when the key is unset by default.
    pub default: Option<&'static str>,
    /// What an unset key means, or more about the default.
    pub unset: &'static str,
    /// A TOML value other than the default (the tests parse it).
    pub example: &'static str,
    /// What the key does.
    pub help: &'static str,
}

impl Key {
    /// `section.name`, as error messages name the key.
    pub fn path(&self) -> String {
        format!("{}.{}", self.section, self.name)
    }
}

/// Every key [`Config::from_toml_str`] reads, in the order baton(8) lists them. The tests check
/// that the parser reads exactly these keys, that each default parses to [`Config::default`]'s
/// setting and that each example changes it.
pub const KEYS: &[Key] = &[
    Key {
        section: "server",
        name: "listen",
        kind: "array of \"[NAME=]ADDR\" strings",
        default: Some(r#"["http=127.0.0.1:8080"]"#),
        unset: "",
        example: r#"["http=0.0.0.0:80", "admin=unix:/run/baton/admin.sock"]"#,
        help: "The listeners. ADDR is IP:PORT, [IPv6]:PORT or unix:/path; NAME (default http) \
               matches a socket passed by systemd (FileDescriptorName=), whose address wins \
               under socket activation. --listen replaces the list.",
    },
    Key {
        section: "server",
        name: "root",
        kind: "path",
        default: None,
        unset: "the embedded page is served at /",
        example: r#""/srv/www""#,
        help: "The directory to serve; nothing outside it is reachable, symlinks included. \
               --root or baton serve DIR replaces it.",
    },
    Key {
        section: "server",
        name: "access_log",
        kind: "boolean",
        default: Some("false"),
        unset: "",
        example: "true",
        help: "The old spelling of log.access: true is \"on\", false \"off\". log.access wins \
               when both are set.",
    },
    Key {
        section: "server",
        name: "pidfile",
        kind: "absolute path",
        default: None,
        unset: "no pidfile, but with --daemon /run/baton/baton.pid for root and \
                $XDG_RUNTIME_DIR/baton/baton.pid for other users",
        example: r#""/run/baton/other.pid""#,
        help: "Locked with flock(2) for the process's life and holding its pid; a second \
               instance is refused.",
    },
    Key {
        section: "server",
        name: "workers",
        kind: "integer, 0 to 1024",
        default: Some("0"),
        unset: "",
        example: "4",
        help: "Threads that serve connections, each an event loop of its own that keeps a \
               connection from accept to close (nginx's worker_processes); 0 is one per CPU \
               the process may run on.",
    },
    Key {
        section: "limits",
        name: "max_connections",
        kind: "integer, 1 to 1000000",
        default: Some("10000"),
        unset: "",
        example: "500",
        help: "Client connections open at once; more wait in the listen backlog. At the limit \
               the longest-idle keep-alive connection is closed to make room.",
    },
    Key {
        section: "limits",
        name: "header_read_timeout",
        kind: "duration",
        default: Some(r#""10s""#),
        unset: "",
        example: r#""5s""#,
        help: "Time a client has to send a complete request head.",
    },
    Key {
        section: "limits",
        name: "idle_timeout",
        kind: "duration",
        default: Some(r#""60s""#),
        unset: "",
        example: r#""2m""#,
        help: "Keep-alive connections idle this long are closed.",
    },
    Key {
        section: "limits",
        name: "send_timeout",
        kind: "duration",
        default: Some(r#""60s""#),
        unset: "",
        example: r#""20s""#,
        help: "A connection whose client accepts no byte of its response this long is closed.",
    },
    Key {
        section: "shutdown",
        name: "drain_timeout",
        kind: "duration, 0 allowed",
        default: Some(r#""30s""#),
        unset: "",
        example: r#""5s""#,
        help: "On stop and after an upgrade, in-flight requests may finish for this long; keep \
               it below TimeoutStopSec= of baton.service.",
    },
    Key {
        section: "shutdown",
        name: "idle_grace",
        kind: "duration, 0 allowed",
        default: Some(r#""1s""#),
        unset: "",
        example: r#""0s""#,
        help: "During a drain, idle keep-alive connections may send one more request for this \
               long.",
    },
    Key {
        section: "log",
        name: "level",
        kind: "string",
        default: Some(r#""info""#),
        unset: "",
        example: r#""info,hyper=warn""#,
        help: "error, warn, info, debug, trace, or a filter such as \"info,hyper=warn\"; \
               RUST_LOG wins over it.",
    },
    Key {
        section: "log",
        name: "file",
        kind: "absolute path",
        default: None,
        unset: "the journal under systemd, else stderr",
        example: r#""/var/log/baton.log""#,
        help: "Append text logs to this file; SIGUSR1 reopens it (for logrotate).",
    },
    Key {
        section: "log",
        name: "access",
        kind: "\"off\", \"on\", \"stderr\", \"journal\" or an absolute path",
        default: Some(r#""off""#),
        unset: "",
        example: r#""/var/log/baton/access.log""#,
        help: "The access log, one line per request once its last byte is sent: off; stderr; \
               journal (MESSAGE= is the line, BATON_* fields hold every value); a file, \
               appended to and reopened on SIGUSR1 (for logrotate); on: the journal when the \
               event log goes there (under systemd), else stderr. Lines that cannot be \
               written at once are dropped and counted in baton_access_log_dropped_total, \
               never delaying a request. --access-log without a value means on.",
    },
    Key {
        section: "log",
        name: "access_format",
        kind: "\"combined\" or \"json\"",
        default: Some(r#""combined""#),
        unset: "",
        example: r#""json""#,
        help: "combined: nginx's combined format (client, time, request line, status, body \
               bytes, referer, user agent), which log analyzers read; json: one object per \
               line that adds the duration, the host and the generation.",
    },
    Key {
        section: "upgrade",
        name: "exec",
        kind: "absolute path",
        default: None,
        unset: "the executable baton was started as, by that path",
        example: r#""/usr/local/bin/baton""#,
        help: "The binary an upgrade starts, so that a replaced binary runs the new code.",
    },
    Key {
        section: "upgrade",
        name: "timeout",
        kind: "duration",
        default: Some(r#""60s""#),
        unset: "",
        example: r#""30s""#,
        help: "The new process must be ready within this, or the upgrade fails and the old one \
               keeps serving.",
    },
    Key {
        section: "upgrade",
        name: "probation",
        kind: "duration, 0 allowed",
        default: Some(r#""10s""#),
        unset: "",
        example: r#""0s""#,
        help: "Once the new process serves, the old one stands by this long and takes over \
               again if the new one exits; 0 switches at once.",
    },
    Key {
        section: "keeper",
        name: "startsecs",
        kind: "duration, 0 allowed",
        default: Some(r#""1s""#),
        unset: "",
        example: r#""5s""#,
        help: "Without systemd: a start counts as successful once the generation has been \
               ready this long.",
    },
    Key {
        section: "keeper",
        name: "startretries",
        kind: "integer, 0 to 1000",
        default: Some("3"),
        unset: "",
        example: "10",
        help: "Without systemd: consecutive failed starts retried (after 1s, 2s, 3s, ...) \
               before the keeper gives up.",
    },
    Key {
        section: "files",
        name: "not_found_page",
        kind: "file name below the root, or \"\"",
        default: Some(r#""404.html""#),
        unset: "",
        example: r#""errors/missing.html""#,
        help: "Served with status 404 for a path not found, when it exists in the root (opened \
               beneath it like every file); \"\" switches it off. Without it the answer is \
               \"404 Not Found\" in plain text.",
    },
    Key {
        section: "files",
        name: "error_page",
        kind: "file name below the root, or \"\"",
        default: Some(r#""50x.html""#),
        unset: "",
        example: r#""errors/oops.html""#,
        help: "Served with the status of a server error (5xx) while serving a file, when it \
               exists in the root; \"\" switches it off.",
    },
    Key {
        section: "files",
        name: "fallback",
        kind: "file name below the root",
        default: None,
        unset: "no fallback: a path not found is 404",
        example: r#""index.html""#,
        help: "A GET or HEAD of a path not found below the root is answered with this file and \
               status 200, as a single-page application needs (nginx's try_files $uri \
               /index.html). A directory listing, when on, comes first.",
    },
    Key {
        section: "files",
        name: "listing",
        kind: "boolean",
        default: Some("false"),
        unset: "",
        example: "true",
        help: "A directory without index.html is answered with an HTML list of its entries \
               (sorted by name, directories with a trailing /; entries that lead outside the \
               root or cannot be read are left out).",
    },
    Key {
        section: "admin",
        name: "endpoints",
        kind: "boolean",
        default: Some("true"),
        unset: "",
        example: "false",
        help: "Answer /-/healthy, /-/version and /-/metrics; false: none of them anywhere, and \
               the root's own /-/ paths are served as files.",
    },
    Key {
        section: "admin",
        name: "listener",
        kind: "listener name",
        default: Some(r#""admin""#),
        unset: "",
        example: r#""ops""#,
        help: "When a listener of this name exists (as in --listen admin=127.0.0.1:9090), it \
               answers the endpoints and nothing else (404 otherwise), and the other listeners \
               serve the root's own /-/ paths, except admin.public. When no listener has this \
               name, every listener answers the endpoints, as without the setting.",
    },
    Key {
        section: "admin",
        name: "public",
        kind: "array of endpoint paths",
        default: Some(r#"["/-/healthy"]"#),
        unset: "",
        example: r#"[]"#,
        help: "Endpoints answered on every listener even when the admin listener exists, so \
               that the health check stays reachable on the main one; [] keeps them all on \
               the admin listener.",
    },
    Key {
        section: "compression",
        name: "on_the_fly",
        kind: "boolean",
        default: Some("true"),
        unset: "",
        example: "false",
        help: "Compress answers of text types (HTML, CSS, JavaScript, JSON, SVG, ...) as they \
               are sent, for clients whose Accept-Encoding allows it; images and other binary \
               types are sent as they are. The ETag gets the coding appended (\"...-br\").",
    },
    Key {
        section: "compression",
        name: "precompressed",
        kind: "boolean",
        default: Some("true"),
        unset: "",
        example: "false",
        help: "Serve FILE.zst, FILE.br or FILE.gz beside FILE, when it exists, to clients that \
               accept that coding (with its own ETag, length and ranges).",
    },
    Key {
        section: "compression",
        name: "codings",
        kind: "array of \"zstd\", \"br\", \"gzip\"",
        default: Some(r#"["zstd", "br", "gzip"]"#),
        unset: "",
        example: r#"["gzip"]"#,
        help: "The codings used, for sidecars and on the fly. Among those a client rates \
               equally, zstd is preferred, then br, then gzip.",
    },
    Key {
        section: "compression",
        name: "min_size",
        kind: "integer, bytes",
        default: Some("1024"),
        unset: "",
        example: "256",
        help: "Answers smaller than this are not compressed on the fly.",
    },
    Key {
        section: "headers",
        name: "cache_control",
        kind: "array of \"PATTERN=VALUE\" strings",
        default: Some("[]"),
        unset: "",
        example: r#"["/assets/**=max-age=31536000, immutable", "text/html=no-cache"]"#,
        help: "Cache-Control of the answers from the root. PATTERN is a glob over the request \
               path when it starts with / (* within a segment, ** across them) or a content \
               type such as text/html or image/*; the first rule that matches wins. Errors get \
               none; the fallback and listings only the rules by type.",
    },
    Key {
        section: "headers",
        name: "add",
        kind: "array of \"NAME: VALUE\" strings",
        default: Some("[]"),
        unset: "",
        example: r#"["X-Content-Type-Options: nosniff", "Access-Control-Allow-Origin: *"]"#,
        help: "Headers added to every answer from the root (replacing one of the same name; \
               a name given twice keeps both values). Content-Type, Content-Length, \
               Content-Encoding, Content-Range, Vary, ETag, Last-Modified, Accept-Ranges, \
               Connection, Transfer-Encoding, Date, Trailer and Upgrade are baton's own; \
               Cache-Control comes from headers.cache_control.",
    },
    Key {
        section: "headers",
        name: "charset",
        kind: "string",
        default: Some(r#""utf-8""#),
        unset: "",
        example: r#""iso-8859-1""#,
        help: "The charset of text types (and JavaScript) that name none; \"\" adds none.",
    },
    Key {
        section: "http2",
        name: "cleartext",
        kind: "array of listener names",
        default: Some("[]"),
        unset: "",
        example: r#"["http"]"#,
        help: "Listeners that take HTTP/2 with prior knowledge (h2c, a connection that starts \
               with the HTTP/2 preface) besides HTTP/1. Over TLS, ALPN chooses HTTP/2 without \
               this. The [limits] timeouts apply to HTTP/2 connections too.",
    },
    Key {
        section: "http2",
        name: "max_concurrent_streams",
        kind: "integer, 1 to 10000",
        default: Some("128"),
        unset: "",
        example: "256",
        help: "Streams (requests) a client may have open at once on one HTTP/2 connection.",
    },
    Key {
        section: "http2",
        name: "max_header_list_size",
        kind: "integer, bytes, 1024 to 1048576",
        default: Some("16384"),
        unset: "",
        example: "32768",
        help: "The most bytes of an HTTP/2 request's headers (each name and value, plus 32).",
    },
    Key {
        section: "tls.NAME",
        name: "cert",
        kind: "absolute path, or \"credential:NAME\"",
        default: None,
        unset: "the listener NAME speaks plain HTTP",
        example: r#""/etc/letsencrypt/live/example.com/fullchain.pem""#,
        help: "The certificate chain (PEM, leaf first) of the listener NAME, which then speaks \
               TLS 1.2 and 1.3 with ALPN h2 and http/1.1. credential:FILE reads \
               $CREDENTIALS_DIRECTORY/FILE (systemd LoadCredential=). Refused when unreadable, \
               expired or not yet valid; read afresh by every reload.",
    },
    Key {
        section: "tls.NAME",
        name: "key",
        kind: "absolute path, or \"credential:NAME\"",
        default: None,
        unset: "required with cert",
        example: r#""credential:example.key""#,
        help: "The private key (PEM: PKCS#8, PKCS#1 or SEC1) of the certificate; one that does \
               not match it is refused.",
    },
    Key {
        section: "tls.NAME",
        name: "min_version",
        kind: "\"1.2\" or \"1.3\"",
        default: None,
        unset: "TLS 1.2 and 1.3",
        example: r#""1.3""#,
        help: "The lowest TLS version the listener accepts.",
    },
    Key {
        section: "tls.NAME",
        name: "sni",
        kind: "array of { cert, key } tables",
        default: None,
        unset: "one certificate for every host name",
        example: r#"[{ cert = "/etc/ssl/other.pem", key = "/etc/ssl/other.key" }]"#,
        help: "More certificates, each chosen when a client asks (SNI) for one of its DNS \
               names (subjectAltName, *.example.com for one label); the cert and key above \
               serve the others.",
    },
];

/// The fully resolved configuration of one `baton serve` process.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this came from, if any.
    pub source: Option<PathBuf>,
    pub listeners: Vec<ListenSpec>,
    /// Static files are served from here; `None` serves the embedded page at `/`.
    pub root: Option<PathBuf>,
    /// Where the access log goes (`log.access`, or the old `server.access_log`).
    pub access_log: crate::access_log::Destination,
    pub access_log_format: crate::access_log::Format,
    pub limits: Limits,
    pub shutdown: Shutdown,
    /// A level (`info`) or an `EnvFilter` directive; `RUST_LOG` overrides it.
    pub log_level: String,
    /// Text logs go to this file instead of the journal or stderr.
    pub log_file: Option<PathBuf>,
    /// The pidfile; used with `--daemon` (at [`crate::pidfile::default_path`] when unset) or
    /// when set.
    pub pidfile: Option<PathBuf>,
    /// Connection workers ([`crate::server::workers`]); 0: one per CPU.
    pub workers: usize,
    pub upgrade: Upgrade,
    pub keeper: Keeper,
    pub files: Files,
    pub admin: Admin,
    /// Pre-compressed sidecars and compression on the fly.
    pub compression: Compression,
    /// `Cache-Control`, extra headers and the charset of the answers from the root.
    pub headers: Headers,
    pub http2: Http2,
    /// The listeners that speak TLS, by name (`[tls.NAME]`, [`crate::tls`]).
    pub tls: std::collections::BTreeMap<String, crate::tls::Listener>,
}

/// `[tls.NAME]` as the file holds it.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TlsSection {
    cert: Option<String>,
    key: Option<String>,
    min_version: Option<String>,
    sni: Vec<PairSection>,
}

/// One of `tls.NAME.sni`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PairSection {
    cert: Option<String>,
    key: Option<String>,
}

/// The `[tls.NAME]` tables, each problem one line in `errors`.
fn check_tls(
    tables: std::collections::BTreeMap<String, TlsSection>,
    errors: &mut Vec<String>,
) -> std::collections::BTreeMap<String, crate::tls::Listener> {
    use crate::tls::MinVersion;
    let mut listeners = std::collections::BTreeMap::new();
    for (name, table) in tables {
        let at = format!("tls.{name}");
        let default = tls_pair(&at, table.cert, table.key, errors);
        let min_version = match table.min_version.map(|v| v.parse::<MinVersion>()) {
            None => Some(MinVersion::Tls12),
            Some(Ok(version)) => Some(version),
            Some(Err(e)) => {
                errors.push(format!("{at}.min_version: {e}"));
                None
            }
        };
        let sni: Vec<Option<crate::tls::Pair>> = table
            .sni
            .into_iter()
            .enumerate()
            .map(|(i, p)| tls_pair(&format!("{at}.sni[{i}]"), p.cert, p.key, errors))
            .collect();
        if let (Some(default), Some(min_version), true) =
            (default, min_version, sni.iter().all(Option::is_some))
        {
            let sni = sni.into_iter().flatten().collect();
            listeners.insert(
                name,
                crate::tls::Listener {
                    default,
                    min_version,
                    sni,
                },
            );
        }
    }
    listeners
}

/// A certificate and key of `[tls.NAME]` (`at`), both given and well formed.
fn tls_pair(
    at: &str,
    cert: Option<String>,
    key: Option<String>,
    errors: &mut Vec<String>,
) -> Option<crate::tls::Pair> {
    let mut source = |what: &str, file: &str, value: Option<String>| match value
        .map(|v| v.parse::<crate::tls::Source>())
    {
        Some(Ok(source)) => Some(source),
        Some(Err(e)) => {
            errors.push(format!("{at}.{what}: {e}"));
            None
        }
        None => {
            errors.push(format!("{at}.{what} is missing: give the PEM {file} file"));
            None
        }
    };
    let cert = source("cert", "certificate chain", cert);
    let key = source("key", "private key", key);
    Some(crate::tls::Pair {
        cert: cert?,
        key: key?,
    })
}

/// HTTP/2: where it is spoken in clear text, and its limits (over TLS, ALPN chooses it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Http2 {
    /// Listeners that take HTTP/2 with prior knowledge (h2c) besides HTTP/1.
    pub cleartext: Vec<String>,
    /// Streams a client may have open at once on one connection (at most [`MAX_STREAMS`]).
    pub max_concurrent_streams: usize,
    /// The most bytes of a request's header list (names, values, 32 bytes each more), in
    /// [`HEADER_LIST_SIZES`].
    pub max_header_list_size: usize,
}

/// The most `http2.max_concurrent_streams` may be.
pub const MAX_STREAMS: usize = 10_000;
/// The bounds of `http2.max_header_list_size`.
pub const HEADER_LIST_SIZES: std::ops::RangeInclusive<usize> = 1024..=1024 * 1024;

/// What the root answers beyond its files: error pages, a fallback, directory listings
/// ([`crate::http::pages`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files {
    /// Served with 404, relative to the root; empty: none.
    pub not_found_page: String,
    /// Served with a 5xx, relative to the root; empty: none.
    pub error_page: String,
    /// Answers a GET or HEAD of a path not found, with 200; relative to the root.
    pub fallback: Option<String>,
    pub listing: bool,
}

/// Where the `/-/` endpoints answer ([`crate::http::admin`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    pub endpoints: bool,
    /// The listener that takes the endpoints, when one has this name.
    pub listener: String,
    /// Endpoints answered on every listener all the same.
    pub public: Vec<String>,
}

/// The endpoints `admin.public` may name.
pub const ENDPOINTS: [&str; 3] = ["/-/healthy", "/-/version", "/-/metrics"];

/// How the keeper restarts a generation that exits without being asked to
/// ([`crate::keeper`]); supervisord's `startsecs` and `startretries`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keeper {
    /// A start counts as successful once the generation has been ready this long.
    pub startsecs: Duration,
    /// Consecutive failed starts retried (after 1 s, 2 s, 3 s, ...) before the keeper gives up.
    pub startretries: u32,
}

/// The most `keeper.startretries` may be.
pub const MAX_START_RETRIES: u32 = 1000;

/// Protection against slow or greedy clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// A connection whose client accepts no byte of its response for this long (the socket
    /// stays unwritable and its send queue does not shrink) is closed; nginx's `send_timeout`.
    pub send_timeout: Duration,
}

/// How a stopping (or handed-over) process drains its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shutdown {
    pub drain_timeout: Duration,
    pub idle_grace: Duration,
}

/// How a reload starts the next generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// The binary to execute; `None`: the executable this process was started from.
    pub exec: Option<PathBuf>,
    pub timeout: Duration,
    /// After the new process serves, the old one stays the main pid this long and takes over
    /// again if the new one exits; zero: the switch follows at once.
    pub probation: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            source: None,
            listeners: vec![baton_lifecycle::activation::builtin_listener()],
            root: None,
            access_log: crate::access_log::Destination::Off,
            access_log_format: crate::access_log::Format::Combined,
            limits: Limits {
                max_connections: 10_000,
                header_read_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(60),
                send_timeout: Duration::from_secs(60),
            },
            shutdown: Shutdown {
                drain_timeout: Duration::from_secs(30),
                idle_grace: Duration::from_secs(1),
            },
            log_level: "info".to_owned(),
            log_file: None,
            pidfile: None,
            workers: 0,
            upgrade: Upgrade {
                exec: None,
                timeout: Duration::from_secs(60),
                probation: Duration::from_secs(10),
            },
            keeper: Keeper {
                startsecs: Duration::from_secs(1),
                startretries: 3,
            },
            files: Files {
                not_found_page: "404.html".to_owned(),
                error_page: "50x.html".to_owned(),
                fallback: None,
                listing: false,
            },
            admin: Admin {
                endpoints: true,
                listener: "admin".to_owned(),
                public: vec![ENDPOINTS[0].to_owned()],
            },
            compression: Compression::default(),
            headers: Headers::default(),
            http2: Http2 {
                cleartext: Vec::new(),
                // nginx's http2_max_concurrent_streams.
                max_concurrent_streams: 128,
                // hyper's default, as nginx's large_client_header_buffers (4 x 8k) allow.
                max_header_list_size: 16 * 1024,
            },
            tls: Default::default(),
        }
    }
}

/// Declares every setting once: its file key (`[section]` and field name), its type, its
/// command-line flag (the `#[arg]` attributes and doc comment, which are `--help`'s text; none
/// with `#[arg(skip)]`) and the [`Config`] field it sets.
///
/// For each section it generates the public [`clap::Args`] struct of optional values
/// (`ServerSettings`, ...), flattened into `baton serve` through [`Settings`], and a private
/// twin that serde reads the section of the file into. The twin holds each value in the raw
/// form TOML gives ([`FileValue::Raw`]), so that a type mismatch stays toml's own error (with
/// line and column) while a bad value is checked afterwards with its key, all of them at once.
macro_rules! settings {
    ($(
        $(#[$section_doc:meta])*
        [$section:ident] $Settings:ident, $Section:ident {
            $(
                $(#[$attr:meta])*
                $field:ident: $ty:ty => $($target:ident).+,
            )*
        }
    )*) => {
        $(
            $(#[$section_doc])*
            // The flags' doc comments are clap's help text, where `[IPv6]` and `[default: ...]`
            // are meant literally, not as intra-doc links.
            #[allow(rustdoc::broken_intra_doc_links)]
            #[derive(Debug, Clone, Default, PartialEq, clap::Args)]
            pub struct $Settings {
                $(
                    $(#[$attr])*
                    pub $field: Option<$ty>,
                )*
            }

            #[derive(Debug, Default, Deserialize)]
            #[serde(default)]
            struct $Section {
                $($field: Option<<$ty as FileValue>::Raw>,)*
            }

            impl $Section {
                fn check(self, errors: &mut Vec<String>) -> $Settings {
                    $Settings {
                        $($field: self.$field.and_then(|raw| {
                            FileValue::from_file(
                                raw,
                                concat!(stringify!($section), ".", stringify!($field)),
                                errors,
                            )
                        }),)*
                    }
                }
            }

            impl $Settings {
                fn apply(&self, config: &mut Config) {
                    $(if let Some(value) = &self.$field {
                        // `into`: a setting of type T goes into a field of type T or Option<T>.
                        config.$($target).+ = value.clone().into();
                    })*
                }
            }
        )*

        /// Every setting of the file, each also a flag of `baton serve` except
        /// `shutdown.idle_grace`, `admin.endpoints` and `admin.public`; a set one wins over the layer below ([`Config::apply`]).
        #[derive(Debug, Clone, Default, PartialEq, clap::Args)]
        pub struct Settings {
            $(
                #[command(flatten)]
                pub $section: $Settings,
            )*
        }

        // The file's shape.
        #[derive(Debug, Default, Deserialize)]
        #[serde(default)]
        struct FileConfig {
            $($section: $Section,)*
            /// `[tls.NAME]`: a table per listener, outside the flat sections.
            tls: std::collections::BTreeMap<String, TlsSection>,
        }

        impl FileConfig {
            fn check(self, errors: &mut Vec<String>) -> Settings {
                Settings {
                    $($section: self.$section.check(errors),)*
                }
            }
        }

        impl Settings {
            fn apply(&self, config: &mut Config) {
                $(self.$section.apply(config);)*
            }
        }
    };
}

settings! {
    /// `[server]`: the listeners, what is served, the pidfile.
    [server] ServerSettings, ServerSection {
        /// Listen on ADDR (IP:PORT, [IPv6]:PORT or unix:/path) under NAME [default name: http];
        /// repeatable; replaces server.listen
        #[arg(long = "listen", value_name = "[NAME=]ADDR")]
        listen: Vec<ListenSpec> => listeners,

        /// Serve static files from DIR instead of the embedded page (or give DIR without --root)
        #[arg(long, value_name = "DIR")]
        root: PathBuf => root,

        // The old spelling of log.access (whose flag is --access-log).
        #[arg(skip)]
        access_log: bool => access_log,

        /// Lock this pidfile for the process's life and write the pid into it; a second instance
        /// is refused [default with --daemon: /run/baton/baton.pid for root,
        /// $XDG_RUNTIME_DIR/baton/baton.pid otherwise]
        #[arg(long, value_name = "PATH")]
        pidfile: PathBuf => pidfile,

        /// Threads that serve connections, each with its own event loop; 0: one per CPU [default: 0]
        #[arg(long, value_name = "N")]
        workers: usize => workers,
    }

    /// `[limits]`: protection against slow or greedy clients.
    [limits] LimitsSettings, LimitsSection {
        /// Most client connections open at once; more wait in the listen backlog [default: 10000]
        #[arg(long, value_name = "N")]
        max_connections: usize => limits.max_connections,

        /// Time a client has to send a complete request head [default: 10s]
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        header_read_timeout: Duration => limits.header_read_timeout,

        /// Close keep-alive connections idle for this long [default: 60s]
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        idle_timeout: Duration => limits.idle_timeout,

        /// Close a connection whose client accepts no byte of its response for this long [default: 60s]
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        send_timeout: Duration => limits.send_timeout,
    }

    /// `[shutdown]`: how a stopping process drains its connections.
    [shutdown] ShutdownSettings, ShutdownSection {
        /// How long in-flight requests may take to finish on stop [default: 30s]
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        drain_timeout: Duration => shutdown.drain_timeout,

        #[arg(skip)]
        idle_grace: Duration => shutdown.idle_grace,
    }

    /// `[log]`: what is logged, and where.
    [log] LogSettings, LogSection {
        /// Log level or filter (error, warn, info, debug, trace); RUST_LOG wins [default: info]
        #[arg(long = "log-level", value_name = "LEVEL")]
        level: String => log_level,

        /// Append text logs to this file; SIGUSR1 reopens it (for logrotate)
        #[arg(long = "log-file", value_name = "PATH")]
        file: PathBuf => log_file,

        /// Access log: off, on, stderr, journal or an absolute file path (SIGUSR1 reopens it); without a value: on, i.e. the journal under systemd, else stderr [default: off]
        #[arg(long = "access-log", value_name = "DEST", num_args = 0..=1, default_missing_value = "on")]
        access: crate::access_log::Destination => access_log,

        /// Access log format: combined (nginx's) or json [default: combined]
        #[arg(long = "access-log-format", value_name = "FORMAT")]
        access_format: crate::access_log::Format => access_log_format,
    }

    /// `[upgrade]`: how a reload starts the next generation.
    [upgrade] UpgradeSettings, UpgradeSection {
        /// The binary an upgrade starts [default: this executable, by the path it was started with]
        #[arg(long, value_name = "PATH")]
        exec: PathBuf => upgrade.exec,

        /// How long a new process may take to become ready during an upgrade [default: 60s]
        #[arg(long = "upgrade-timeout", value_name = "DURATION", value_parser = parse_duration)]
        timeout: Duration => upgrade.timeout,

        /// After an upgrade, the old process stands by this long and takes over again if the new one exits; 0 switches it off [default: 10s]
        #[arg(long = "upgrade-probation", value_name = "DURATION", value_parser = parse_duration)]
        probation: Duration => upgrade.probation,
    }

    /// `[keeper]`: how the keeper restarts generations, without systemd.
    [keeper] KeeperSettings, KeeperSection {
        /// Keeper: a start counts as successful once the generation has been ready this long [default: 1s]
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        startsecs: Duration => keeper.startsecs,

        /// Keeper: consecutive failed starts retried (after 1s, 2s, 3s, ...) before giving up [default: 3]
        #[arg(long, value_name = "N")]
        startretries: u32 => keeper.startretries,
    }

    /// `[files]`: error pages, the fallback, directory listings.
    [files] FilesSettings, FilesSection {
        /// Served with 404 when it exists in the root; "" switches it off [default: 404.html]
        #[arg(long, value_name = "FILE")]
        not_found_page: String => files.not_found_page,

        /// Served with a 5xx when it exists in the root; "" switches it off [default: 50x.html]
        #[arg(long, value_name = "FILE")]
        error_page: String => files.error_page,

        /// Answer a GET or HEAD of a path not found with this file of the root, 200 (single-page apps)
        #[arg(long, value_name = "FILE")]
        fallback: String => files.fallback,

        /// List a directory that has no index.html
        #[arg(long, num_args = 0, default_missing_value = "true")]
        listing: bool => files.listing,
    }

    /// `[admin]`: where the `/-/` endpoints answer.
    [admin] AdminSettings, AdminSection {
        #[arg(skip)]
        endpoints: bool => admin.endpoints,

        /// The listener that takes the /-/ endpoints when one has this name [default: admin]
        #[arg(long = "admin-listener", value_name = "NAME")]
        listener: String => admin.listener,

        #[arg(skip)]
        public: Vec<String> => admin.public,
    }

    /// `[compression]`: compressed answers for the clients that accept them.
    [compression] CompressionSettings, CompressionSection {
        /// Compress answers of text types as they are sent, for clients that accept it [default: true]
        #[arg(long = "compress", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
        on_the_fly: bool => compression.on_the_fly,

        /// Serve FILE.zst, FILE.br, FILE.gz beside FILE to the clients that accept them [default: true]
        #[arg(long = "precompressed", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
        precompressed: bool => compression.precompressed,

        /// The codings used, both ways, comma-separated: zstd, br, gzip (all three by default)
        #[arg(long = "compress-codings", value_name = "LIST", value_delimiter = ',')]
        codings: Vec<Coding> => compression.codings,

        /// Answers smaller than this many bytes are not compressed on the fly [default: 1024]
        #[arg(long = "compress-min-size", value_name = "BYTES")]
        min_size: u64 => compression.min_size,
    }

    /// `[headers]`: response headers of the answers from the root.
    [headers] HeadersSettings, HeadersSection {
        /// Cache-Control by path pattern (/assets/**) or content type (text/html), as
        /// PATTERN=VALUE; repeatable, the first match wins; replaces headers.cache_control
        #[arg(long = "cache-control", value_name = "PATTERN=VALUE")]
        cache_control: Vec<CacheRule> => headers.cache_control,

        /// Add this header to every answer from the root; repeatable; replaces headers.add
        #[arg(long = "add-header", value_name = "NAME: VALUE")]
        add: Vec<ExtraHeader> => headers.extra,

        /// The charset text types get when they name none; "" for none [default: utf-8]
        #[arg(long, value_name = "CHARSET")]
        charset: String => headers.charset,
    }

    /// `[http2]`: HTTP/2 in clear text, and its limits.
    [http2] Http2Settings, Http2Section {
        /// Take HTTP/2 with prior knowledge (h2c) on this listener too; repeatable; replaces http2.cleartext
        #[arg(long = "h2c", value_name = "NAME")]
        cleartext: Vec<String> => http2.cleartext,

        /// HTTP/2: streams a client may have open at once on a connection [default: 128]
        #[arg(long = "h2-max-streams", value_name = "N")]
        max_concurrent_streams: usize => http2.max_concurrent_streams,

        /// HTTP/2: the most bytes of a request's headers [default: 16384]
        #[arg(long = "h2-max-header-list-size", value_name = "BYTES")]
        max_header_list_size: usize => http2.max_header_list_size,
    }
}

/// A duration on the command line.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e}; write a duration like 30s, 500ms or 2m"))
}

/// The type of a setting as the file holds it.
trait FileValue: Sized {
    /// What TOML gives: a mismatch of this type is toml's error; the rest is checked by
    /// [`FileValue::from_file`], so that every bad value is reported, not only the first.
    type Raw: serde::de::DeserializeOwned;

    /// The value of `key`, or `None` with one line for each problem pushed to `errors`.
    fn from_file(raw: Self::Raw, key: &str, errors: &mut Vec<String>) -> Option<Self>;
}

macro_rules! taken_as_given {
    ($($ty:ty),*) => {$(
        impl FileValue for $ty {
            type Raw = $ty;
            fn from_file(raw: $ty, _: &str, _: &mut Vec<String>) -> Option<$ty> {
                Some(raw)
            }
        }
    )*};
}

taken_as_given!(bool, String, PathBuf);

/// A value parsed from a string, with the key and what to write instead when it is bad.
macro_rules! parsed_from_string {
    ($($ty:ty),*) => {$(
        impl FileValue for $ty {
            type Raw = String;
            fn from_file(raw: String, key: &str, errors: &mut Vec<String>) -> Option<Self> {
                raw.parse().map_err(|e| errors.push(format!("{key}: {e}"))).ok()
            }
        }
    )*};
}

parsed_from_string!(crate::access_log::Destination, crate::access_log::Format);

// Lists of strings that parse as their flags do (listeners, codings, rules, headers, names).
impl<T: std::str::FromStr> FileValue for Vec<T>
where
    T::Err: fmt::Display,
{
    type Raw = Vec<String>;
    fn from_file(raw: Vec<String>, key: &str, errors: &mut Vec<String>) -> Option<Self> {
        let mut items = Vec::new();
        for (i, item) in raw.iter().enumerate() {
            match item.parse() {
                Ok(item) => items.push(item),
                Err(e) => errors.push(format!("{key}[{i}]: {e}")),
            }
        }
        Some(items)
    }
}

impl FileValue for u64 {
    type Raw = i64;
    fn from_file(raw: i64, key: &str, errors: &mut Vec<String>) -> Option<Self> {
        u64::try_from(raw)
            .map_err(|_| errors.push(format!("{key}: {raw} is negative; use 0 or more")))
            .ok()
    }
}

impl FileValue for Duration {
    type Raw = String;
    fn from_file(raw: String, key: &str, errors: &mut Vec<String>) -> Option<Self> {
        humantime::parse_duration(&raw)
            .map_err(|e| {
                errors.push(format!(
                    "{key}: '{raw}' is not a duration ({e}); write it like \"30s\" or \"500ms\""
                ))
            })
            .ok()
    }
}

// TOML integers are i64; the bounds are checked here, with the key, rather than by serde.
impl FileValue for usize {
    type Raw = i64;
    fn from_file(raw: i64, key: &str, errors: &mut Vec<String>) -> Option<Self> {
        usize::try_from(raw)
            .map_err(|_| errors.push(format!("{key}: {raw} is negative; use a positive number")))
            .ok()
    }
}

// Only keeper.startretries is a u32, hence the advice in the messages.
impl FileValue for u32 {
    type Raw = i64;
    fn from_file(raw: i64, key: &str, errors: &mut Vec<String>) -> Option<Self> {
        u32::try_from(raw)
            .map_err(|_| {
                errors.push(if raw < 0 {
                    format!("{key}: {raw} is negative; use 0 (never retry) or more")
                } else {
                    format!("{key}: {raw} is more than {MAX_START_RETRIES}; use a smaller number")
                })
            })
            .ok()
    }
}

/// Every problem found in a configuration, one line each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    pub source: Option<PathBuf>,
    pub errors: Vec<String>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let origin = match &self.source {
            Some(path) => format!("config {}", path.display()),
            None => "config".to_owned(),
        };
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{origin}: {error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

enum ReadError {
    Io(std::io::Error),
    /// What it is instead ("a FIFO", ...).
    NotRegular(&'static str),
}

/// Reads a regular file (or the null device) as text, without ever blocking on a FIFO.
fn read_regular(path: &Path) -> Result<String, ReadError> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(ReadError::Io)?;
    let meta = file.metadata().map_err(ReadError::Io)?;
    let kind = meta.file_type();
    let null = kind.is_char_device() && meta.rdev() == libc::makedev(1, 3);
    if !kind.is_file() && !null {
        return Err(ReadError::NotRegular(if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else if kind.is_dir() {
            "a directory"
        } else {
            "a special file"
        }));
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(ReadError::Io)?;
    Ok(text)
}

impl Config {
    /// Loads the configuration the way `baton serve` does: `path` if given (it must exist),
    /// else [`DEFAULT_CONFIG_PATH`] when it exists, else the embedded defaults; then applies
    /// `flags` and checks the result.
    pub fn load(path: Option<&Path>, flags: &Settings) -> Result<Config, ConfigErrors> {
        let mut config = match path {
            Some(path) => Self::from_file(path)?,
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                Self::from_file(Path::new(DEFAULT_CONFIG_PATH))?
            }
            None => Config::default(),
        };
        config.apply(flags);
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses one file (without overrides or filesystem checks).
    ///
    /// The file must be a regular file (or `/dev/null`, the empty configuration): a FIFO, a
    /// socket or a device is refused before anything is read from it, so a FIFO cannot block
    /// the start. It is opened with `O_NONBLOCK` (opening a FIFO then neither waits for a
    /// writer) and checked with `fstat` on the opened fd, so what is checked is what is read.
    pub fn from_file(path: &Path) -> Result<Config, ConfigErrors> {
        let fail = |message: String| ConfigErrors {
            source: Some(path.to_owned()),
            errors: vec![message],
        };
        let text = read_regular(path).map_err(|e| match e {
            ReadError::Io(e) => fail(format!(
                "cannot read it: {e}; pass an existing file with --config PATH"
            )),
            ReadError::NotRegular(kind) => fail(format!(
                "it is {kind}, not a regular file; pass a configuration file with --config PATH"
            )),
        })?;
        Self::from_toml_str(&text, Some(path))
    }

    /// Parses TOML text; `source` only names the file in errors.
    pub fn from_toml_str(text: &str, source: Option<&Path>) -> Result<Config, ConfigErrors> {
        let fail = |errors| ConfigErrors {
            source: source.map(Path::to_owned),
            errors,
        };
        let mut unknown = Vec::new();
        let deserializer =
            toml::Deserializer::parse(text).map_err(|e| fail(vec![one_line(&e.to_string())]))?;
        let mut file: FileConfig = serde_ignored::deserialize(deserializer, |key| {
            unknown.push(format!(
                "unknown key '{key}'; see baton(8) or `baton serve --help` for the keys"
            ))
        })
        .map_err(|e| fail(vec![one_line(&e.to_string())]))?;
        let mut errors = unknown;
        let tls = std::mem::take(&mut file.tls);
        let settings = file.check(&mut errors);
        let tls = check_tls(tls, &mut errors);
        if !errors.is_empty() {
            return Err(fail(errors));
        }
        let mut config = Config {
            source: source.map(Path::to_owned),
            tls,
            ..Config::default()
        };
        config.apply(&settings);
        Ok(config)
    }

    /// Lays `settings` over this configuration: each one that is set wins.
    pub fn apply(&mut self, settings: &Settings) {
        settings.apply(self);
    }

    /// Checks what the parser cannot: consistency and the filesystem.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        if self.listeners.is_empty() {
            errors.push(
                "server.listen is empty: give at least one listener, e.g. \"http=127.0.0.1:8080\""
                    .to_owned(),
            );
        }
        for (i, a) in self.listeners.iter().enumerate() {
            if self.listeners[..i].iter().any(|b| b.name == a.name) {
                errors.push(format!(
                    "listener name '{}' is used twice: give each listener its own name, as in admin=127.0.0.1:9090",
                    a.name
                ));
            }
            if let ListenAddress::Udp(_) = a.address {
                errors.push(format!(
                    "listener {a}: HTTP needs a TCP or unix stream listener (IP:PORT, [IPv6]:PORT or unix:/path), not a UDP one"
                ));
            }
        }
        if let Some(root) = &self.root {
            match std::fs::metadata(root) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => errors.push(format!(
                    "server.root {} is not a directory: point it at the directory to serve",
                    root.display()
                )),
                Err(e) => errors.push(format!(
                    "server.root {}: {e}: point it at an existing directory",
                    root.display()
                )),
            }
        }
        let compression = &self.compression;
        if compression.codings.is_empty() && (compression.on_the_fly || compression.precompressed) {
            errors.push(
                "compression.codings is empty: list at least one of zstd, br, gzip, or set \
                 compression.on_the_fly and compression.precompressed to false"
                    .to_owned(),
            );
        }
        let charset = &self.headers.charset;
        if !charset
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        {
            errors.push(format!(
                "headers.charset '{charset}' is not a charset name; write it like \"utf-8\", \
                 or \"\" for none"
            ));
        }
        if self.workers > crate::server::workers::MAX_WORKERS {
            errors.push(format!(
                "server.workers {} is more than {}: use a smaller number, or 0 for one per CPU",
                self.workers,
                crate::server::workers::MAX_WORKERS
            ));
        }
        if self.limits.max_connections == 0 {
            errors.push(
                "limits.max_connections is 0: nothing could be served; use at least 1".to_owned(),
            );
        }
        if self.limits.max_connections > MAX_CONNECTIONS {
            errors.push(format!(
                "limits.max_connections {} is more than {MAX_CONNECTIONS}: use a smaller number",
                self.limits.max_connections
            ));
        }
        for (key, value, may_be_zero) in [
            (
                "limits.header_read_timeout",
                self.limits.header_read_timeout,
                false,
            ),
            ("limits.idle_timeout", self.limits.idle_timeout, false),
            ("limits.send_timeout", self.limits.send_timeout, false),
            ("upgrade.timeout", self.upgrade.timeout, false),
            ("upgrade.probation", self.upgrade.probation, true),
            ("shutdown.drain_timeout", self.shutdown.drain_timeout, true),
            ("shutdown.idle_grace", self.shutdown.idle_grace, true),
            ("keeper.startsecs", self.keeper.startsecs, true),
        ] {
            if value.is_zero() && !may_be_zero {
                errors.push(format!(
                    "{key} is 0: use a positive duration such as \"10s\""
                ));
            }
            if value > MAX_DURATION {
                errors.push(format!(
                    "{key} {} is longer than a day: use a shorter duration",
                    humantime::format_duration(value)
                ));
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            errors.push(format!(
                "log.level '{}' is not a level or filter ({e}); use error, warn, info, debug or trace",
                self.log_level
            ));
        }
        for (key, path) in [
            ("log.file", &self.log_file),
            ("server.pidfile", &self.pidfile),
        ] {
            if let Some(path) = path {
                if !path.is_absolute() {
                    errors.push(format!(
                        "{key} {} is not an absolute path: a daemon runs in /, so give the full path",
                        path.display()
                    ));
                }
            }
        }
        if let Some(problem) = self.access_log.problem() {
            errors.push(format!("log.access {problem}"));
        }
        if self.keeper.startretries > MAX_START_RETRIES {
            errors.push(format!(
                "keeper.startretries {} is more than {MAX_START_RETRIES}: use a smaller number",
                self.keeper.startretries
            ));
        }
        if let Some(exec) = &self.upgrade.exec {
            if !exec.is_absolute() {
                errors.push(format!(
                    "upgrade.exec {} is not an absolute path: give the full path of the binary",
                    exec.display()
                ));
            }
        }
        for (key, name, may_be_empty) in [
            (
                "files.not_found_page",
                Some(&self.files.not_found_page),
                true,
            ),
            ("files.error_page", Some(&self.files.error_page), true),
            ("files.fallback", self.files.fallback.as_ref(), false),
        ] {
            if let Some(name) = name {
                if let Some(problem) = page_name_problem(name, may_be_empty) {
                    errors.push(format!("{key} '{name}' {problem}"));
                }
            }
        }
        // A directory as the fallback would answer every unknown path with a redirect to it.
        if let (Some(root), Some(fallback)) = (&self.root, &self.files.fallback) {
            if page_name_problem(fallback, false).is_none() && root.join(fallback).is_dir() {
                errors.push(format!(
                    "files.fallback '{fallback}' is a directory of the root: name a file, as in \
                     \"{}/index.html\"",
                    fallback.trim_end_matches('/')
                ));
            }
        }
        for name in &self.http2.cleartext {
            if !self.listeners.iter().any(|l| &l.name == name) {
                errors.push(format!(
                    "http2.cleartext names '{name}', which is no listener: name one of server.listen"
                ));
            }
        }
        if !(1..=MAX_STREAMS).contains(&self.http2.max_concurrent_streams) {
            errors.push(format!(
                "http2.max_concurrent_streams {} is out of bounds: use 1 to {MAX_STREAMS}",
                self.http2.max_concurrent_streams
            ));
        }
        if !HEADER_LIST_SIZES.contains(&self.http2.max_header_list_size) {
            errors.push(format!(
                "http2.max_header_list_size {} is out of bounds: use {} to {} bytes",
                self.http2.max_header_list_size,
                HEADER_LIST_SIZES.start(),
                HEADER_LIST_SIZES.end()
            ));
        }
        for (name, tls) in &self.tls {
            match self.listeners.iter().find(|l| &l.name == name) {
                None => errors.push(format!(
                    "tls.{name} names no listener: add one to server.listen, as in \
                     \"{name}=0.0.0.0:443\", or rename the table"
                )),
                Some(l) if matches!(l.address, ListenAddress::Udp(_)) => errors.push(format!(
                    "tls.{name}: listener {l} is UDP; TLS needs a TCP or unix stream listener"
                )),
                Some(_) => {
                    if let Err(e) = crate::tls::server_config(name, tls) {
                        errors.push(e.to_string());
                    }
                }
            }
        }
        let name = &self.admin.listener;
        if !(1..=255).contains(&name.len())
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            errors.push(format!(
                "admin.listener '{name}' is not a listener name: use 1 to 255 letters, digits, \
                 '.', '_' or '-', as in \"admin\""
            ));
        }
        for path in &self.admin.public {
            if !ENDPOINTS.contains(&path.as_str()) {
                errors.push(format!(
                    "admin.public '{path}' is not an endpoint: use {}",
                    ENDPOINTS.join(", ")
                ));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors {
                source: self.source.clone(),
                errors,
            })
        }
    }
}

/// Why `name` cannot name a file below the root, if it cannot.
fn page_name_problem(name: &str, may_be_empty: bool) -> Option<&'static str> {
    if name.is_empty() {
        return (!may_be_empty)
            .then_some("is empty: name a file below the root, as \"index.html\"");
    }
    let path = Path::new(name);
    if path.is_absolute()
        || name.contains('\0')
        || path.components().any(|c| {
            !matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        })
    {
        return Some("is not a file below the root: give its path relative to the root, as \"404.html\" or \"errors/404.html\", without '..'");
    }
    if name.ends_with('/') {
        return Some("names a directory: name a file below the root, as \"index.html\"");
    }
    None
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_spec_forms() {
        let s: ListenSpec = "127.0.0.1:80".parse().unwrap();
        assert_eq!(s.name, "http");
        assert_eq!(
            s.address,
            ListenAddress::Tcp("127.0.0.1:80".parse().unwrap())
        );
        let s: ListenSpec = "admin=[::1]:9000".parse().unwrap();
        assert_eq!(s.name, "admin");
        assert_eq!(s.address, ListenAddress::Tcp("[::1]:9000".parse().unwrap()));
        let s: ListenSpec = "unix:/run/x.sock".parse().unwrap();
        assert_eq!(s.address, ListenAddress::Unix("/run/x.sock".into()));
        assert_eq!(s.to_string(), "http=unix:/run/x.sock");
        assert!("localhost:80".parse::<ListenSpec>().is_err());
        assert!("unix:relative".parse::<ListenSpec>().is_err());
        assert!("bad name=127.0.0.1:1".parse::<ListenSpec>().is_err());
        assert!("=127.0.0.1:1".parse::<ListenSpec>().is_err());
    }

    #[test]
    fn every_error_is_reported() {
        let err = Config::from_toml_str(
            r#"
            [server]
            listen = ["nonsense", "a=1.2.3.4:5"]
            colour = "blue"
            [limits]
            idle_timeout = "soon"
            max_connections = -1
            "#,
            Some(Path::new("/x.toml")),
        )
        .unwrap_err();
        let text = err.to_string();
        assert_eq!(err.errors.len(), 4, "{text}");
        assert!(
            text.contains("config /x.toml: unknown key 'server.colour'"),
            "{text}"
        );
        assert!(
            text.contains("server.listen[0]: 'nonsense' is not a listen address"),
            "{text}"
        );
        assert!(
            text.contains("limits.idle_timeout: 'soon' is not a duration"),
            "{text}"
        );
        assert!(
            text.contains("limits.max_connections: -1 is negative"),
            "{text}"
        );
    }

    #[test]
    fn syntax_error_is_one_line() {
        let err = Config::from_toml_str("[server\n", None).unwrap_err();
        assert_eq!(err.errors.len(), 1);
        assert!(!err.to_string().contains('\n'));
    }

    #[test]
    fn validation_and_overrides() {
        let mut c = Config::from_toml_str(
            "[server]\nlisten = [\"a=127.0.0.1:1\", \"a=127.0.0.1:2\"]\n",
            None,
        )
        .unwrap();
        let err = c.validate().unwrap_err();
        assert!(err.errors[0].contains("'a' is used twice"));
        c.apply(&Settings {
            server: ServerSettings {
                listen: Some(vec!["127.0.0.1:3".parse().unwrap()]),
                ..ServerSettings::default()
            },
            shutdown: ShutdownSettings {
                drain_timeout: Some(Duration::from_secs(2)),
                ..ShutdownSettings::default()
            },
            ..Settings::default()
        });
        c.validate().unwrap();
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.shutdown.drain_timeout, Duration::from_secs(2));
    }

    #[test]
    fn limits_are_bounded() {
        let c = Config::from_toml_str(
            "[limits]\nmax_connections = 9223372036854775807\nheader_read_timeout = \"1000000h\"\n",
            None,
        )
        .unwrap();
        let text = c.validate().unwrap_err().to_string();
        assert!(
            text.contains("limits.max_connections 9223372036854775807 is more than 1000000"),
            "{text}"
        );
        assert!(
            text.contains("limits.header_read_timeout 114years 28days 4h is longer than a day"),
            "{text}"
        );
    }

    #[test]
    fn send_timeout_is_a_limit() {
        let c = Config::from_toml_str("[limits]\nsend_timeout = \"5s\"\n", None).unwrap();
        assert_eq!(c.limits.send_timeout, Duration::from_secs(5));
        assert_eq!(
            Config::default().limits.send_timeout,
            Duration::from_secs(60)
        );
        let err = Config::from_toml_str("[limits]\nsend_timeout = \"soon\"\n", None).unwrap_err();
        assert!(
            err.errors[0].starts_with("limits.send_timeout: 'soon' is not a duration"),
            "{err}"
        );
        let c = Config::from_toml_str("[limits]\nsend_timeout = \"0s\"\n", None).unwrap();
        let err = c.validate().unwrap_err();
        assert_eq!(
            err.errors,
            ["limits.send_timeout is 0: use a positive duration such as \"10s\""]
        );
        let mut c = Config::default();
        c.apply(&Settings {
            limits: LimitsSettings {
                send_timeout: Some(Duration::from_secs(2)),
                ..LimitsSettings::default()
            },
            ..Settings::default()
        });
        assert_eq!(c.limits.send_timeout, Duration::from_secs(2));
        let c = Config::from_toml_str("[limits]\nsend_timeout = \"2days\"\n", None).unwrap();
        assert!(c.validate().unwrap_err().errors[0].contains("longer than a day"));
    }

    #[test]
    fn keeper_settings() {
        let c = Config::from_toml_str("[keeper]\nstartsecs = \"3s\"\nstartretries = 5\n", None)
            .unwrap();
        assert_eq!(c.keeper.startsecs, Duration::from_secs(3));
        assert_eq!(c.keeper.startretries, 5);
        let err =
            Config::from_toml_str("[keeper]\nstartsecs = \"soon\"\nstartretries = -1\n", None)
                .unwrap_err();
        assert_eq!(err.errors.len(), 2, "{err}");
        assert!(err.errors[0].starts_with("keeper.startsecs: 'soon' is not a duration"));
        assert!(err.errors[1].starts_with("keeper.startretries: -1 is negative"));
        let c = Config::from_toml_str("[keeper]\nstartretries = 5000\n", None).unwrap();
        let err = c.validate().unwrap_err();
        assert!(err.errors[0].contains("more than 1000"), "{err}");
    }

    /// The dotted paths of every leaf key of the file's shape ([`FileConfig`]), read from its
    /// `Deserialize` implementation: the keys the parser accepts.
    fn parsed_keys() -> Vec<String> {
        use serde::de::{self, value::StrDeserializer, IntoDeserializer, MapAccess, Visitor};
        use std::cell::RefCell;

        #[derive(Debug)]
        struct Error(String);
        impl fmt::Display for Error {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl std::error::Error for Error {}
        impl de::Error for Error {
            fn custom<T: fmt::Display>(msg: T) -> Self {
                Error(msg.to_string())
            }
        }

        /// Visits every field of every struct once, recording the paths of the leaves.
        struct Tracer<'a> {
            path: String,
            leaves: &'a RefCell<Vec<String>>,
        }
        impl Tracer<'_> {
            fn leaf(&self) {
                self.leaves.borrow_mut().push(self.path.clone());
            }
        }
        struct Fields<'a> {
            path: String,
            fields: std::slice::Iter<'static, &'static str>,
            current: &'static str,
            leaves: &'a RefCell<Vec<String>>,
        }
        impl<'de> MapAccess<'de> for Fields<'_> {
            type Error = Error;
            fn next_key_seed<K: de::DeserializeSeed<'de>>(
                &mut self,
                seed: K,
            ) -> Result<Option<K::Value>, Error> {
                let Some(field) = self.fields.next() else {
                    return Ok(None);
                };
                self.current = field;
                let key: StrDeserializer<'_, Error> = field.into_deserializer();
                seed.deserialize(key).map(Some)
            }
            fn next_value_seed<V: de::DeserializeSeed<'de>>(
                &mut self,
                seed: V,
            ) -> Result<V::Value, Error> {
                let path = if self.path.is_empty() {
                    self.current.to_owned()
                } else {
                    format!("{}.{}", self.path, self.current)
                };
                seed.deserialize(Tracer {
                    path,
                    leaves: self.leaves,
                })
            }
        }
        impl<'de> de::Deserializer<'de> for Tracer<'_> {
            type Error = Error;
            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
                Err(Error(format!(
                    "{}: a type the key tracer does not know; teach it",
                    self.path
                )))
            }
            fn deserialize_struct<V: Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                visitor: V,
            ) -> Result<V::Value, Error> {
                visitor.visit_map(Fields {
                    path: self.path,
                    fields: fields.iter(),
                    current: "",
                    leaves: self.leaves,
                })
            }
            fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
                visitor.visit_some(self)
            }
            /// A table of tables by name (`[tls.NAME]`): one entry, named NAME.
            fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
                visitor.visit_map(Fields {
                    path: self.path,
                    fields: ["NAME"].iter(),
                    current: "",
                    leaves: self.leaves,
                })
            }
            fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
                self.leaf();
                visitor.visit_bool(false)
            }
            fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
                self.leaf();
                visitor.visit_i64(0)
            }
            fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
                self.leaf();
                visitor.visit_str("")
            }
            fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
                self.deserialize_str(visitor)
            }
            fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
                self.leaf();
                visitor.visit_seq(
                    de::value::SeqDeserializer::<std::iter::Empty<bool>, Error>::new(
                        std::iter::empty(),
                    ),
                )
            }
            serde::forward_to_deserialize_any! {
                i8 i16 i32 i128 u8 u16 u32 u64 u128 f32 f64 char bytes byte_buf unit
                unit_struct newtype_struct tuple tuple_struct enum identifier ignored_any
            }
        }

        let leaves = RefCell::new(Vec::new());
        FileConfig::deserialize(Tracer {
            path: String::new(),
            leaves: &leaves,
        })
        .expect("the key tracer walks FileConfig");
        leaves.into_inner()
    }

    #[test]
    fn the_key_table_is_what_the_parser_reads() {
        let mut table: Vec<String> = KEYS.iter().map(Key::path).collect();
        let mut parsed = parsed_keys();
        assert!(
            parsed.len() > 10,
            "the tracer found too few keys: {parsed:?}"
        );
        let missing: Vec<_> = parsed.iter().filter(|k| !table.contains(k)).collect();
        assert!(
            missing.is_empty(),
            "keys the parser reads but config::KEYS (and so baton(8)) lacks: {missing:?}"
        );
        let extra: Vec<_> = table.iter().filter(|k| !parsed.contains(k)).collect();
        assert!(
            extra.is_empty(),
            "keys in config::KEYS that the parser does not read: {extra:?}"
        );
        table.sort();
        parsed.sort();
        table.dedup();
        assert_eq!(table, parsed, "a key is listed twice in config::KEYS");
        // Grouped by section, so that baton(8) shows each table once.
        let mut sections: Vec<&str> = KEYS.iter().map(|k| k.section).collect();
        sections.dedup();
        let mut unique = sections.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(sections.len(), unique.len(), "config::KEYS mixes sections");
    }

    /// The flags come from the same declaration as the keys: each flag is one key of
    /// [`KEYS`], and the default its help names is that key's.
    #[test]
    fn every_flag_is_a_key_with_the_same_default() {
        use clap::Args;
        let command = Settings::augment_args(clap::Command::new("settings"));
        let mut flagged = Vec::new();
        let mut compared = 0;
        for arg in command.get_arguments() {
            // Field names are the keys' names, and unique across the sections.
            let keys: Vec<&Key> = KEYS.iter().filter(|k| k.name == arg.get_id()).collect();
            let [key] = keys[..] else {
                panic!(
                    "flag {} matches {} keys of config::KEYS",
                    arg.get_id(),
                    keys.len()
                );
            };
            flagged.push(key.path());
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            if let (Some(shown), Some(default)) = (
                help.split_once("[default: ")
                    .and_then(|(_, rest)| rest.split_once(']'))
                    .map(|(value, _)| value),
                key.default,
            ) {
                assert_eq!(
                    shown,
                    default.trim_matches('"'),
                    "--help of {} names another default than config::KEYS",
                    key.path()
                );
                compared += 1;
            }
        }
        let unflagged: Vec<String> = KEYS
            .iter()
            .map(Key::path)
            .filter(|k| !flagged.contains(k))
            .collect();
        assert_eq!(
            unflagged,
            [
                "server.access_log",
                "shutdown.idle_grace",
                "admin.endpoints",
                "admin.public",
                "tls.NAME.cert",
                "tls.NAME.key",
                "tls.NAME.min_version",
                "tls.NAME.sni"
            ],
            "keys without a flag"
        );
        assert!(
            compared >= 10,
            "only {compared} defaults found in the flags' help"
        );
    }

    #[test]
    fn the_key_table_defaults_and_examples_parse() {
        for key in KEYS {
            let toml = |value: &str| {
                let mut toml = format!("[{}]\n{} = {value}\n", key.section, key.name);
                // A TLS table needs its certificate and key.
                for (name, path) in [("cert", "\"/c.pem\""), ("key", "\"/k.pem\"")] {
                    if key.section == "tls.NAME" && key.name != name {
                        toml.push_str(&format!("{name} = {path}\n"));
                    }
                }
                toml
            };
            if let Some(default) = key.default {
                let c = Config::from_toml_str(&toml(default), None)
                    .unwrap_or_else(|e| panic!("{}: default {default}: {e}", key.path()));
                assert_eq!(
                    c,
                    Config::default(),
                    "{}: the default {default} is not the built-in one",
                    key.path()
                );
            } else {
                assert!(
                    !key.unset.is_empty(),
                    "{}: say what unset means",
                    key.path()
                );
            }
            let c = Config::from_toml_str(&toml(key.example), None)
                .unwrap_or_else(|e| panic!("{}: example {}: {e}", key.path(), key.example));
            assert_ne!(
                c,
                Config::default(),
                "{}: the example {} changes nothing",
                key.path(),
                key.example
            );
        }
    }

    #[test]
    fn the_shipped_file_shows_every_key() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/baton.toml");
        let text = std::fs::read_to_string(path).unwrap();
        Config::from_toml_str(&text, None).expect("the shipped file parses");
        let mut section = "";
        let mut shown = Vec::new();
        for line in text.lines() {
            // A table shown commented out (`#[tls.NAME]`) counts too.
            let header = line.trim_start_matches('#');
            if let Some(name) = header.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name;
            } else if let Some((key, _)) = line.trim_start_matches('#').split_once(" = ") {
                shown.push(format!("{section}.{key}"));
            }
        }
        for key in KEYS {
            assert!(
                shown.contains(&key.path()),
                "packaging/baton.toml does not show {}",
                key.path()
            );
        }
    }

    #[test]
    fn files_and_admin_settings() {
        let c = Config::from_toml_str(
            "[files]\nnot_found_page = \"\"\nfallback = \"app/index.html\"\nlisting = true\n\
             [admin]\nendpoints = false\nlistener = \"ops\"\npublic = []\n",
            None,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.files.not_found_page, "");
        assert_eq!(c.files.fallback.as_deref(), Some("app/index.html"));
        assert!(c.files.listing && !c.admin.endpoints);
        assert_eq!(
            (c.admin.listener.as_str(), c.admin.public.len()),
            ("ops", 0)
        );
        // Values of the right type that are wrong: one line each, with the key.
        let c = Config::from_toml_str(
            "[files]\nnot_found_page = \"../x.html\"\nerror_page = \"/etc/passwd\"\n\
             fallback = \"\"\n[admin]\nlistener = \"a b\"\npublic = [\"/-/nope\"]\n",
            None,
        )
        .unwrap();
        let err = c.validate().unwrap_err();
        let starts: Vec<&str> = err
            .errors
            .iter()
            .map(|e| e.split(' ').next().unwrap())
            .collect();
        assert_eq!(
            starts,
            [
                "files.not_found_page",
                "files.error_page",
                "files.fallback",
                "admin.listener",
                "admin.public"
            ],
            "{err}"
        );
        assert!(!err.errors.iter().any(|e| e.contains('\n')), "{err}");
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(Config::from_toml_str("", None).unwrap(), Config::default());
    }
}
