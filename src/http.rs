//! The HTTP service baton ships: static files plus three operational endpoints.
//!
//! | path          | answer                                                                 |
//! |---------------|------------------------------------------------------------------------|
//! | `/-/healthy`  | `200 ok`                                                               |
//! | `/-/version`  | JSON: `version`, `pid`, `generation`, `started` (RFC 3339), `listeners` |
//! | `/-/metrics`  | Prometheus text exposition ([`crate::metrics`])                        |
//! | anything else | a file below the root (tower-http's `ServeDir`: index.html, content types, ranges, conditional GET, HEAD; error pages, a fallback and listings: [`pages`]), or, with no root, the embedded page at `/` |
//!
//! Which listener answers the endpoints is [`admin`]'s business: by default every one, and
//! with a listener named `admin` only that one (and `/-/healthy` everywhere); a `/-/` path that
//! is no endpoint of the listener is a file of the root.
//!
//! Nothing outside the root is reachable: `ServeDir` refuses `..`, and [`Confined`] opens every
//! file beneath a directory fd of the root, once, and serves that very fd
//! ([`beneath`]: a symlink that leads outside, even one swapped in mid-request, is 404).
//!
//! ```
//! # use std::sync::Arc;
//! let info = baton::http::Info::current(1, vec!["http=127.0.0.1:8080 (bound)".into()]);
//! let metrics = Arc::new(baton::metrics::Metrics::new(1, std::time::SystemTime::now()));
//! let settings = baton::http::Settings::default(); // no root: the embedded page
//! let app = baton::http::App::new(Arc::new(info), metrics, &settings).unwrap();
//! ```

pub mod admin;
pub mod beneath;
pub mod encoding;
pub mod headers;
pub mod pages;

use std::cell::RefCell;
use std::convert::Infallible;
use std::ffi::OsString;
use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue, Request, Response};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use serde::Serialize;
use tower_http::services::fs::{Backend, DefaultServeDirFallback, File, Metadata, ServeDir};

use beneath::{Kind, Root, Stat};
use encoding::{Coding, Compression, OnTheFly};
use headers::Headers;

use crate::config;
use crate::metrics::Metrics;
use admin::Role;
use pages::Pages;

/// What the process reports about itself.
#[derive(Debug, Clone, Serialize)]
pub struct Info {
    pub version: &'static str,
    pub pid: u32,
    pub generation: u64,
    /// RFC 3339.
    pub started: String,
    pub listeners: Vec<String>,
}

impl Info {
    /// This process, started now.
    pub fn current(generation: u64, listeners: Vec<String>) -> Info {
        Info {
            version: crate::VERSION,
            pid: std::process::id(),
            generation,
            started: rfc3339(std::time::SystemTime::now()),
            listeners,
        }
    }
}

/// Formats a time as RFC 3339 in UTC with millisecond precision.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    let t = t
        .replace_nanosecond(t.millisecond() as u32 * 1_000_000)
        .unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// How the HTTP service is configured (built from [`crate::config::Config`]; each generation
/// reads it afresh, so a reload applies it).
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// The directory served; `None` serves the embedded page at `/`.
    pub root: Option<PathBuf>,
    /// Error pages, the fallback, listings (`[files]`).
    pub pages: pages::Settings,
    /// Where the endpoints answer (`[admin]`).
    pub admin: admin::Admin,
    /// Pre-compressed sidecars and compression on the fly.
    pub compression: Compression,
    /// `Cache-Control`, extra headers, the charset of text.
    pub headers: Headers,
}

/// What answers from the root get on their way out: [`Settings::compression`] and
/// [`Settings::headers`].
#[derive(Debug)]
pub(crate) struct Web {
    pub compression: Compression,
    pub headers: Headers,
}

#[derive(Clone)]
struct AppState {
    info: Arc<Info>,
    metrics: Arc<Metrics>,
}

/// The whole service a [`crate::server::Server`] runs: a router, and optionally the files,
/// which are most requests and so go straight to [`Confined`] instead of through the router's
/// matching to its fallback. Any axum `Router` is an `App` too (`App::from(router)`).
#[derive(Clone)]
pub struct App {
    router: Router,
    files: Option<Confined>,
    /// The same files, with error pages, the fallback and listings.
    pages: Option<Arc<Pages>>,
    admin: Arc<admin::Admin>,
}

/// The future of one answer.
pub type AppFuture = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

impl App {
    /// baton's service: the `/-/` endpoints, and the files below the root (or, with no root,
    /// the embedded page at `/`). Fails if the root cannot be opened.
    pub fn new(info: Arc<Info>, metrics: Arc<Metrics>, settings: &Settings) -> io::Result<App> {
        let files = settings
            .root
            .as_deref()
            .map(|root| Confined::with_settings(root, settings))
            .transpose()?;
        let pages = files
            .clone()
            .map(|files| Arc::new(Pages::new(files, &settings.pages)));
        Ok(App {
            router: router(info, metrics, None),
            files,
            pages,
            admin: Arc::new(settings.admin.clone()),
        })
    }

    /// Answers one request as a listener of [`Role::All`] does (no admin listener).
    pub fn call(&self, request: Request<Body>) -> AppFuture {
        self.call_as(Role::All, request)
    }

    /// Answers one request that came in on a listener of `role`.
    pub fn call_as(&self, role: Role, request: Request<Body>) -> AppFuture {
        let path = request.uri().path();
        let endpoint = path.starts_with("/-/") && self.admin.answers(role, path);
        match &self.pages {
            _ if role == Role::Admin && !endpoint => Box::pin(std::future::ready(
                pages::default_response(axum::http::StatusCode::NOT_FOUND),
            )),
            Some(pages) if !endpoint => match &self.files {
                Some(files) => files.outgoing(request, |request| pages.serve(request)),
                None => pages.serve(request),
            },
            // No root: the embedded page at `/`, and the endpoints this listener answers.
            None if !endpoint && config::ENDPOINTS.contains(&path) => Box::pin(std::future::ready(
                pages::default_response(axum::http::StatusCode::NOT_FOUND),
            )),
            _ => {
                let future = tower::ServiceExt::oneshot(self.router.clone(), request);
                Box::pin(async move {
                    let Ok(response) = future.await;
                    response
                })
            }
        }
    }

    /// The role of the listener `name` among the listeners `all`.
    pub fn role<'a>(&self, name: &str, all: impl Iterator<Item = &'a str>) -> Role {
        self.admin.role(name, all)
    }
}

impl App {
    /// The files below the root, if any (the fast path of [`crate::server`] looks up large
    /// files itself).
    pub(crate) fn files(&self) -> Option<&Confined> {
        self.files.as_ref()
    }
}

impl From<Router> for App {
    fn from(router: Router) -> App {
        App {
            router,
            files: None,
            pages: None,
            admin: Default::default(),
        }
    }
}

/// The router: the `/-/` endpoints, then `files` (or the embedded page).
pub fn router(info: Arc<Info>, metrics: Arc<Metrics>, files: Option<Confined>) -> Router {
    let ops = Router::new()
        .route("/-/healthy", get(healthy))
        .route("/-/version", get(version))
        .route("/-/metrics", get(metrics_text));
    let app = match files {
        Some(files) => ops.fallback_service(files),
        None => ops
            .route("/", get(index))
            .fallback(|| async { pages::default_response(axum::http::StatusCode::NOT_FOUND) }),
    };
    app.with_state(AppState { info, metrics })
}

async fn healthy() -> &'static str {
    "ok\n"
}

async fn version(State(state): State<AppState>) -> Json<Arc<Info>> {
    Json(state.info)
}

async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn index(State(state): State<AppState>) -> Html<String> {
    let info = &state.info;
    let listeners: String = info
        .listeners
        .iter()
        .map(|l| format!("<li><code>{}</code></li>", escape(l)))
        .collect();
    Html(format!(
        include_str!("index.html"),
        version = info.version,
        pid = info.pid,
        generation = info.generation,
        started = info.started,
        listeners = listeners,
    ))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Files below the root: tower-http's `ServeDir` over a [`Beneath`] backend.
///
/// Nothing is looked up by name outside [`beneath::Root`]: tower-http 0.7 lets `ServeDir` take a
/// [`Backend`], and [`Beneath`] is one whose every open and stat resolves beneath the root's fd
/// (`openat2(RESOLVE_BENEATH)`), so a path that leads outside the root, at any moment, is 404,
/// and the file served is the very fd that was opened (its size, type, `Last-Modified` and
/// `ETag` come from `fstat` of it). `ServeDir` keeps every HTTP semantic it has (content types,
/// ranges and 416, conditional requests 304/412, HEAD, index.html, the trailing-slash redirect),
/// which is why this design beats writing the file response anew: the backend is the only part
/// that touches the file system, and it is the part that had to change.
///
/// Small files (up to [`MAX_CACHED_FILE`]) are served from memory: the cache is keyed by the
/// opened fd's device and inode and a hit needs its size, mtime and ctime to match that fd's
/// `fstat`, so a lookup that a swap redirected finds another inode (or nothing) and never the
/// cached bytes of a file it did not open. An entry is filled by reading the opened fd once;
/// from [`SENDFILE_FROM`] on it keeps that fd too, for the fast path's sendfile(2).
///
/// `ServeDir` costs several microseconds a request beyond the open (about half of a small
/// file's whole cost), so a plain GET (no range, no conditions) of a small file skips it: the
/// same open beneath the root, then the cached bytes with the headers `ServeDir` would send
/// (a test compares the two). Anything else, or a file that is not small, goes to `ServeDir`.
///
/// On their way out, answers get the configured headers ([`headers`]) and, for a client that
/// accepts it, compression ([`encoding`]): `ServeDir` and the cache pick pre-compressed
/// sidecars, [`OnTheFly`] compresses the rest.
#[derive(Clone)]
pub struct Confined {
    files: ServeDir<DefaultServeDirFallback, Beneath>,
    backend: Beneath,
    web: Arc<Web>,
}

impl Confined {
    /// Opens the root (its fd anchors every lookup until this value and its clones are gone),
    /// with the default compression and headers.
    pub fn new(root: &Path) -> io::Result<Confined> {
        Confined::with_settings(root, &Settings::default())
    }

    /// Opens the root, with the compression and headers of `settings`.
    pub fn with_settings(root: &Path, settings: &Settings) -> io::Result<Confined> {
        let backend = Beneath {
            root: Arc::new(Root::open(root)?),
            cache: Arc::new(FileCache::with_weighter(1024, CACHE_BYTES, ByBytes)),
        };
        let files = serve_dir(backend.clone(), &settings.compression);
        let web = Arc::new(Web {
            compression: settings.compression.clone(),
            headers: settings.headers.clone(),
        });
        Ok(Confined {
            files,
            backend,
            web,
        })
    }

    /// The answer `serve` gives to a request for a file, with the configured headers, and
    /// compressed if it should be.
    fn outgoing(
        &self,
        mut request: Request<Body>,
        serve: impl FnOnce(Request<Body>) -> AppFuture,
    ) -> AppFuture {
        let web = self.web.clone();
        let on_the_fly = OnTheFly::for_request(&web.compression, request.headers_mut());
        // Only path rules need the path; most configurations have none.
        let path =
            (!web.headers.cache_control.is_empty()).then(|| normalized_path(request.uri().path()));
        // ServeDir looks for sidecars of any file; baton only for the types worth compressing.
        if web.compression.precompressed
            && request.headers().contains_key(header::ACCEPT_ENCODING)
            && !compressible_path(request.uri().path())
        {
            request.headers_mut().remove(header::ACCEPT_ENCODING);
        }
        let uri = request.uri().clone();
        let future = serve(request);
        Box::pin(async move {
            let mut response = future.await;
            let path = path.as_deref().unwrap_or_default();
            web.headers.apply(path, &mut response);
            // ServeDir's 304 says nothing of codings; its 200 would have.
            let compression = &web.compression;
            if response.status() == axum::http::StatusCode::NOT_MODIFIED
                && (compression.precompressed || compression.on_the_fly)
                && compressible_path(uri.path())
            {
                encoding::vary_on_accept_encoding(response.headers_mut());
            }
            on_the_fly.apply(response)
        })
    }

    /// Whether a `Cache-Control` rule forbids transforming the file at `uri_path`.
    fn no_transform(&self, uri_path: &str, content_type: &HeaderValue) -> bool {
        let headers = &self.web.headers;
        !headers.cache_control.is_empty()
            && headers
                .cache_control_for(&normalized_path(uri_path), Some(content_type))
                .and_then(|value| value.to_str().ok())
                .is_some_and(|value| value.to_ascii_lowercase().contains("no-transform"))
    }

    /// The answer to a plain GET of a small regular file, from the cache (filled if need be);
    /// anything else comes back to go to `ServeDir`.
    #[allow(clippy::result_large_err)] // the request going back by value, not an error
    fn plain(&self, request: Request<Body>) -> Result<AppFuture, Request<Body>> {
        if !plain_get(&request) {
            return Err(request);
        }
        let uri_path = request.uri().path();
        let Some(mut path) = below_root(uri_path) else {
            return Err(request);
        };
        if uri_path.ends_with('/') {
            path.push("index.html");
        }
        // A hit needs no readable fd: the inode the path leads to (an O_PATH open beneath the
        // root, cheaper than a read open) is compared with the entry, which was filled by
        // reading an fd of that very inode.
        let small_file = |stat: &Stat| stat.kind == Kind::File && stat.len <= MAX_CACHED_FILE;
        let stat = match self.backend.root.stat(&path) {
            Ok(stat) if small_file(&stat) => stat,
            _ => return Err(request),
        };
        let content_type = content_type_of(&path);
        let compression = &self.web.compression;
        let vary = compression.precompressed;
        // The sidecar ServeDir would choose, if it is small too.
        let (mut stat, mut coding) = (stat, None);
        match self.sidecar(&path, request.headers(), &content_type) {
            Ok(Some((sidecar, found, candidate))) if small_file(&found) => {
                (path, stat, coding) = (sidecar, found, Some(candidate));
            }
            // A large sidecar, or an error ServeDir would not take for "not there".
            Ok(Some(_)) | Err(()) => return Err(request),
            Ok(None) => {}
        }
        let compressible = encoding::compressible(&content_type);
        // No sidecar: compressed here, once, and kept with the content (unless a rule says
        // no-transform).
        let on_the_fly = match coding {
            None if compressible && stat.len >= compression.min_size => compression
                .on_the_fly_coding(request.headers())
                .filter(|_| !self.no_transform(uri_path, &content_type)),
            _ => None,
        };
        let answer = Answer {
            content_type,
            coding,
            vary,
            on_the_fly,
        };
        if let Some(hit) = self.backend.cached(&stat) {
            return Ok(hit.answer(answer));
        }
        // A miss: what is read and cached is what this open finds (it may be another inode
        // than the one just looked at, if the path was swapped meanwhile).
        let (file, stat) = match self.backend.root.open_read(&path) {
            Ok((file, stat)) if small_file(&stat) => (file, stat),
            _ => return Err(request),
        };
        let backend = self.backend.clone();
        let mut files = self.files.clone();
        Ok(Box::pin(async move {
            match backend.load(file, stat, compressible, false).await {
                Ok(Ok(cached)) => cached.answer(answer).await,
                // Changed while being read, or unreadable: ServeDir decides.
                _ => {
                    let Ok(response) = tower::Service::call(&mut files, request).await;
                    response.map(Body::new)
                }
            }
        }))
    }
}

/// `ServeDir` over the root, with the sidecars of the enabled codings.
fn serve_dir(
    backend: Beneath,
    compression: &Compression,
) -> ServeDir<DefaultServeDirFallback, Beneath> {
    // The backend resolves paths relative to the root's fd: the base is empty.
    let mut files = ServeDir::with_backend("", backend).append_index_html_on_directories(true);
    if compression.precompressed {
        for coding in &compression.codings {
            files = match coding {
                Coding::Gzip => files.precompressed_gzip(),
                Coding::Br => files.precompressed_br(),
                Coding::Zstd => files.precompressed_zstd(),
            };
        }
    }
    files
}

/// A request path as the path patterns of the configuration see it: percent-decoded, without
/// `.` and empty segments (`//a/./b.html` is `/a/b.html`), a trailing `/` kept; as it was sent
/// where it is not UTF-8 or leads outside the root.
pub(crate) fn normalized_path(uri_path: &str) -> String {
    let Some(below) = below_root(uri_path) else {
        return uri_path.to_owned();
    };
    let mut path = String::with_capacity(uri_path.len());
    for part in below.iter() {
        path.push('/');
        path.push_str(&part.to_string_lossy());
    }
    if path.is_empty() || uri_path.ends_with('/') {
        path.push('/');
    }
    path
}

/// Whether the file a request path names (`index.html` of a directory) is of a type worth
/// compressing.
fn compressible_path(uri_path: &str) -> bool {
    let path = below_root(uri_path).unwrap_or_default();
    let file = match uri_path.ends_with('/') || path.as_os_str().is_empty() {
        true => path.join("index.html"),
        false => path,
    };
    encoding::compressible(&content_type_of(&file))
}

impl Confined {
    /// `ServeDir`'s answer, without the cache's shortcut.
    fn serve_dir(
        &self,
        request: Request<Body>,
    ) -> impl Future<Output = Response<Body>> + Send + 'static {
        let future = tower::Service::call(&mut self.files.clone(), request);
        async move {
            let Ok(response) = future.await;
            response.map(Body::new)
        }
    }

    /// The answer to `request`: from the cache, or from `ServeDir`.
    async fn answer(&self, request: Request<Body>) -> Response<Body> {
        let Ok(response) = tower::ServiceExt::oneshot(self.clone(), request).await;
        response
    }
}

/// The path below the root that `ServeDir` makes of a request path (percent-decoded; `.`
/// dropped; `None` for `..` and anything else it refuses).
fn below_root(uri_path: &str) -> Option<PathBuf> {
    let decoded = percent_encoding::percent_decode_str(uri_path.trim_start_matches('/'))
        .decode_utf8()
        .ok()?;
    let mut path = PathBuf::new();
    for component in Path::new(&*decoded).components() {
        match component {
            std::path::Component::Normal(part) => path.push(part),
            std::path::Component::CurDir => {}
            _ => return None,
        }
    }
    Some(path)
}

/// The request headers that make an answer other than the whole file: a range, and the
/// conditions.
pub(crate) const RANGE_AND_CONDITIONS: [header::HeaderName; 6] = [
    header::RANGE,
    header::IF_RANGE,
    header::IF_MATCH,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_UNMODIFIED_SINCE,
];

/// Whether the answer is the whole file, the same every time.
fn plain_get(request: &Request<Body>) -> bool {
    request.method() == axum::http::Method::GET
        && RANGE_AND_CONDITIONS
            .iter()
            .all(|h| !request.headers().contains_key(h))
}

/// A regular file the fast path answers for: where its content comes from, its `fstat`, and
/// the headers `ServeDir` derives from them.
pub(crate) struct FastFile {
    pub body: FastBody,
    pub stat: Stat,
    pub content_type: HeaderValue,
    pub last_modified: HeaderValue,
    pub etag: Option<HeaderValue>,
    /// The file is the pre-compressed sidecar of the requested one, in this coding.
    pub coding: Option<Coding>,
    /// Pre-compression is configured: `Vary: Accept-Encoding`, where `ServeDir` sends it.
    pub vary: bool,
    /// `Vary: Accept-Encoding` after the configured headers, as compression on the fly adds
    /// it (to a 200 it would compress for another client; to a 304 of a compressible file).
    pub vary_late: bool,
    /// The same for a 304.
    pub vary_not_modified: bool,
}

/// Where a [`FastFile`]'s content comes from.
pub(crate) enum FastBody {
    /// Too large for the memory cache, or changed while being read for it: sent from the fd
    /// (sendfile(2)).
    Disk(std::fs::File),
    /// The cache's copy, which an entry matching the file's `fstat` holds.
    Cached(Bytes),
    /// The fd a cache entry keeps open ([`SENDFILE_FROM`]): sent with sendfile(2).
    CachedFd(Arc<SentFile>),
    /// Small but not cached: read once ([`Confined::cache_small`]), then as the new entry
    /// says (from memory, or from the fd it keeps).
    Uncached(std::fs::File),
}

impl Confined {
    /// The pre-compressed sidecar of the file at `path` that `ServeDir` would choose for these
    /// `Accept-Encoding` headers: its path, `stat` (an `O_PATH` open) and coding; `Ok(None)`
    /// if none of the acceptable ones is a regular file; `Err` on an error `ServeDir` would
    /// not take for "not there".
    fn sidecar(
        &self,
        path: &Path,
        accept: &axum::http::HeaderMap,
        content_type: &HeaderValue,
    ) -> Result<Option<(PathBuf, Stat, Coding)>, ()> {
        for coding in self.web.compression.sidecars(accept, content_type) {
            let mut sidecar = path.to_path_buf().into_os_string();
            sidecar.push(coding.extension());
            match self.backend.root.stat(Path::new(&sidecar)) {
                Ok(stat) if stat.kind == Kind::File => {
                    return Ok(Some((sidecar.into(), stat, coding)))
                }
                Ok(_) => {}
                Err(e) if absent(&e) => {}
                Err(_) => return Err(()),
            }
        }
        Ok(None)
    }

    /// What `ServeDir` would serve for the request path `uri_path` (no query) and a request
    /// with these `Accept-Encoding` headers (`accept`), beneath the root, if it is a regular
    /// file that goes out as it is; `None` for anything else (a directory, a redirect, not
    /// found, one to compress on the fly: `ServeDir` and hyper answer those).
    ///
    /// A small file found in the cache needs no open for reading: as in [`Confined`]'s plain
    /// path, the inode the path leads to (an `O_PATH` open) must be the entry's, with the same
    /// `fstat`. Blocking calls on the runtime, as in [`Beneath`]'s `open`.
    pub(crate) fn open_fast(
        &self,
        uri_path: &str,
        accept: &axum::http::HeaderMap,
    ) -> Option<FastFile> {
        let mut path = below_root(uri_path)?;
        if uri_path.ends_with('/') {
            path.push("index.html");
        }
        let content_type = self.web.headers.content_type(content_type_of(&path));
        let compression = &self.web.compression;
        let compressible = encoding::compressible(&content_type);
        let root = &self.backend.root;
        let (path, stat, coding) = match self.sidecar(&path, accept, &content_type).ok()? {
            Some((sidecar, stat, coding)) => (sidecar, stat, Some(coding)),
            None => {
                let compress = compression.on_the_fly_coding(accept).is_some() && compressible;
                match root.stat(&path) {
                    Ok(stat) if stat.kind == Kind::File && !compress => (path, stat, None),
                    _ => return None,
                }
            }
        };
        let small = |stat: &Stat| stat.len <= MAX_CACHED_FILE;
        let hit = small(&stat).then(|| self.backend.cached(&stat)).flatten();
        let (body, stat, (last_modified, etag)) = match hit {
            // The entry's `fstat` is this one (`cached`), and the validators come from it alone.
            Some(hit) => (
                hit.fast_body(),
                stat,
                (hit.last_modified.clone(), hit.etag.clone()),
            ),
            // What is sent is what this open finds (the path may lead elsewhere by now).
            None => {
                let (body, opened) = match root.open_read(&path).ok()? {
                    (_, opened) if opened.kind != Kind::File => return None,
                    (file, opened) if small(&opened) => (FastBody::Uncached(file), opened),
                    (file, opened) => (FastBody::Disk(file), opened),
                };
                (body, opened, validators(&opened))
            }
        };
        let on_the_fly = compression.on_the_fly && compressible;
        Some(FastFile {
            body,
            stat,
            content_type,
            last_modified,
            etag,
            coding,
            vary: compression.precompressed,
            vary_late: !compression.precompressed
                && coding.is_none()
                && on_the_fly
                && stat.len >= compression.min_size,
            vary_not_modified: compressible && (compression.precompressed || on_the_fly),
        })
    }

    /// The body of a small file [`Confined::open_fast`] opened (`stat` is its `fstat`): read
    /// and cached, or the cache's if another request cached it meanwhile; the file itself
    /// ([`FastBody::Disk`]) if it changed while being read.
    pub(crate) async fn cache_small(
        &self,
        file: std::fs::File,
        stat: Stat,
        content_type: &HeaderValue,
    ) -> io::Result<FastBody> {
        let compressible = encoding::compressible(content_type);
        // `load` gives only an entry with this very `fstat`.
        Ok(
            match self.backend.load(file, stat, compressible, true).await? {
                Ok(cached) => cached.fast_body(),
                Err(file) => FastBody::Disk(file),
            },
        )
    }

    /// The configured headers of the answers from the root.
    pub(crate) fn headers(&self) -> &Headers {
        &self.web.headers
    }
}

/// The `Content-Type` `ServeDir` gives a path.
///
/// mime_guess searches its table on every call (about 1% of the CPU of a 64 KiB response on the
/// fast path), and the answer depends on the extension only: each thread keeps its last one.
fn content_type_of(path: &Path) -> HeaderValue {
    thread_local! {
        static LAST: RefCell<Option<(OsString, HeaderValue)>> = const { RefCell::new(None) };
    }
    let extension = path.extension().unwrap_or_default();
    LAST.with_borrow_mut(|last| {
        let (of, content_type) = last.get_or_insert_with(|| (extension.to_owned(), guess(path)));
        if of.as_os_str() != extension {
            // The key's buffer is reused: no allocation once it has held the longest one.
            of.clear();
            of.push(extension);
            *content_type = guess(path);
        }
        content_type.clone()
    })
}

/// mime_guess's `Content-Type` for `path`.
fn guess(path: &Path) -> HeaderValue {
    mime_guess::from_path(path).first_raw().map_or(
        HeaderValue::from_static("application/octet-stream"),
        HeaderValue::from_static,
    )
}

/// `Last-Modified` and `ETag` as `ServeDir` writes them for a file with this `fstat`.
fn validators(stat: &Stat) -> (HeaderValue, Option<HeaderValue>) {
    let modified = stat.modified();
    let etag = modified
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .and_then(|since| {
            let tag = format!(
                "\"{:x}.{:08x}-{:x}\"",
                since.as_secs(),
                since.subsec_nanos(),
                stat.len
            );
            HeaderValue::from_str(&tag).ok()
        });
    let last_modified = httpdate::HttpDate::from(modified).to_string();
    (
        HeaderValue::from_str(&last_modified).unwrap_or(HeaderValue::from_static("")),
        etag,
    )
}

impl tower::Service<Request<Body>> for Confined {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let request = match self.plain(request) {
            Ok(answer) => return Box::pin(async move { Ok(answer.await) }),
            Err(request) => request,
        };
        let future = self.files.call(request);
        Box::pin(async move {
            let Ok(response) = future.await;
            Ok(response.map(Body::new))
        })
    }
}

/// Files larger than this are always read from disk.
pub const MAX_CACHED_FILE: u64 = 256 * 1024;
/// A cached file at least this large also keeps its fd, and the fast path sends it from there
/// with sendfile(2) instead of copying it from memory: one copy less, and the pages the
/// kernel sends are the page cache's, not ones just written. Measured at 64 KiB and 1,000
/// connections with `bench/http.sh` (docs/benchmarks.md): the client's CPU per response fell
/// from about 23 to about 19 µs, nginx's figure.
pub const SENDFILE_FROM: u64 = 16 * 1024;
/// The most bytes of file content the cache holds.
const CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// Keyed by device and inode.
type FileCache = quick_cache::sync::Cache<(u64, u64), Arc<CachedFile>, ByBytes>;

#[derive(Clone)]
struct ByBytes;

impl quick_cache::Weighter<(u64, u64), Arc<CachedFile>> for ByBytes {
    fn weight(&self, _: &(u64, u64), file: &Arc<CachedFile>) -> u64 {
        // Room for the compressed forms of text: together about as large as the content.
        let forms = 1 + u64::from(file.compressible);
        file.body.len() as u64 * forms + 1
    }
}

/// How a cached file is answered: as `ServeDir` would for the request.
struct Answer {
    /// The original's (a sidecar has the type of the file it compresses).
    content_type: HeaderValue,
    /// The coding of the sidecar served, if one is.
    coding: Option<Coding>,
    /// Pre-compression is configured: the answer could differ by `Accept-Encoding`.
    vary: bool,
    /// The coding to compress the content with (no sidecar answered, and it is worth it).
    on_the_fly: Option<Coding>,
}

/// A file's content, and its `fstat` when it was read.
struct CachedFile {
    stat: Stat,
    body: Bytes,
    /// The file it was read from, if at least [`SENDFILE_FROM`] bytes and within the budget.
    fd: Option<HeldFd>,
    /// `Last-Modified` and `ETag` as `ServeDir` writes them.
    last_modified: HeaderValue,
    etag: Option<HeaderValue>,
    /// Of a type worth compressing ([`encoding::compressible`]).
    compressible: bool,
    /// The content compressed, by [`Coding`], once a client asked for it.
    coded: [std::sync::OnceLock<Bytes>; 3],
}

impl CachedFile {
    fn new(stat: Stat, body: Bytes, fd: Option<HeldFd>, compressible: bool) -> CachedFile {
        let (last_modified, etag) = validators(&stat);
        CachedFile {
            stat,
            body,
            fd,
            last_modified,
            etag,
            compressible,
            coded: Default::default(),
        }
    }

    /// What the fast path sends: from the fd if the entry keeps one, else from memory.
    fn fast_body(&self) -> FastBody {
        match &self.fd {
            Some(held) => FastBody::CachedFd(held.sent.clone()),
            None => FastBody::Cached(self.body.clone()),
        }
    }

    /// The answer to a plain GET: [`CachedFile::response`], or the content compressed for
    /// `answer.on_the_fly` (compressed now if this is the first time).
    fn answer(self: &Arc<CachedFile>, answer: Answer) -> AppFuture {
        let Some(coding) = answer.on_the_fly else {
            return Box::pin(std::future::ready(self.response(answer)));
        };
        let slot = &self.coded[coding as usize];
        if let Some(coded) = slot.get() {
            return Box::pin(std::future::ready(
                self.coded_response(answer, coding, coded),
            ));
        }
        let file = self.clone();
        Box::pin(async move {
            match encoding::compress_bytes(&file.body, coding).await {
                Ok(coded) => {
                    // Two first requests may both compress; the first stored is kept.
                    let coded = file.coded[coding as usize].get_or_init(|| coded);
                    file.coded_response(answer, coding, coded)
                }
                Err(_) => file.response(answer),
            }
        })
    }

    /// The 200 with the content compressed with `coding`: as [`encoding::compress`] sends it,
    /// with its length.
    fn coded_response(&self, answer: Answer, coding: Coding, coded: &Bytes) -> Response<Body> {
        let mut response = self.response(Answer {
            on_the_fly: None,
            ..answer
        });
        *response.body_mut() = Body::from(coded.clone());
        let headers = response.headers_mut();
        encoding::mark_coded(headers, coding);
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(coded.len()));
        response
    }

    /// The 200 `ServeDir` gives for the whole file: same headers, same order.
    fn response(&self, answer: Answer) -> Response<Body> {
        let mut response = Response::new(Body::from(self.body.clone()));
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, answer.content_type);
        headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        if let Some(coding) = answer.coding {
            headers.insert(
                header::CONTENT_ENCODING,
                HeaderValue::from_static(coding.token()),
            );
        }
        if answer.vary {
            headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
        }
        headers.insert(header::LAST_MODIFIED, self.last_modified.clone());
        if let Some(etag) = &self.etag {
            headers.insert(header::ETAG, etag.clone());
        }
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(self.body.len()));
        response
    }
}

/// The [`Backend`] of [`Confined`]: every path it is given is relative to the root (the base
/// of its `ServeDir` is empty) and resolved by [`Root`], beneath the root's fd.
#[derive(Clone)]
pub struct Beneath {
    root: Arc<Root>,
    cache: Arc<FileCache>,
}

/// A path that cannot lead to a file below the root is simply not found: outside the root
/// (`EXDEV`), a symlink loop, a name too long for the file system, a file where a directory
/// should be, no permission. `ServeDir` answers 404 for `NotFound`, 500 for other errors.
fn not_found(e: io::Error) -> io::Error {
    if absent(&e) {
        return io::ErrorKind::NotFound.into();
    }
    e
}

/// Whether [`not_found`] makes this error a 404.
fn absent(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ENOENT
                | libc::EXDEV
                | libc::ELOOP
                | libc::ENAMETOOLONG
                | libc::ENOTDIR
                | libc::EACCES
                | libc::EINVAL
        )
    ) || e.kind() == io::ErrorKind::NotFound
}

impl Backend for Beneath {
    type File = Opened;
    type Metadata = Meta;
    type OpenFuture = Pin<Box<dyn Future<Output = io::Result<Opened>> + Send>>;
    type MetadataFuture = std::future::Ready<io::Result<Meta>>;

    fn open(&self, path: PathBuf) -> Self::OpenFuture {
        // Blocking calls on the runtime: an open and an fstat of a cached tree take a few
        // microseconds, less than a hop to the blocking pool.
        let opened = self.root.open_read(&path).map_err(not_found);
        let backend = self.clone();
        Box::pin(async move {
            let (file, stat) = opened?;
            if stat.kind != Kind::File {
                return Err(io::ErrorKind::NotFound.into());
            }
            if stat.len > MAX_CACHED_FILE {
                return Ok(Opened::disk(file, stat));
            }
            let compressible = encoding::compressible(&content_type_of(&path));
            Ok(match backend.load(file, stat, compressible, false).await? {
                Ok(cached) => Opened::memory(cached.body.clone(), stat),
                Err(file) => Opened::disk(file, stat),
            })
        })
    }

    fn metadata(&self, path: PathBuf) -> Self::MetadataFuture {
        std::future::ready(match self.root.stat(&path).map_err(not_found) {
            Ok(stat) if stat.kind == Kind::Other => Err(io::ErrorKind::NotFound.into()),
            result => result.map(Meta),
        })
    }
}

impl Beneath {
    /// The cache's entry for the file with this `fstat`: same inode, and the same size, mtime
    /// and ctime.
    fn cached(&self, stat: &Stat) -> Option<Arc<CachedFile>> {
        self.sweep_soon();
        self.cache
            .get(&(stat.dev, stat.ino))
            .filter(|hit| hit.stat == *stat)
    }

    /// Closes the kept fds of deleted files on the blocking pool, if there are kept fds and
    /// the last sweep is a second old: every lookup asks, so a deleted file's fd is closed
    /// within about a second of the next request, whatever that request is for.
    fn sweep_soon(&self) {
        if HELD_FDS.load(Ordering::Relaxed) == 0 || !sweep_due() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let cache = self.cache.clone();
            drop(runtime.spawn_blocking(move || drop_deleted(&cache)));
        }
    }

    /// The cached content of a small regular file just opened (`stat` is its `fstat`): from
    /// the cache if an entry matches it, else read from `file` and cached. The file back if it
    /// changed while being read, or another version was cached meanwhile. A new entry keeps
    /// the fd (`keep_fd`, for the fast path's sendfile) if the file is large enough and the
    /// budget allows; one that hyper's path fills keeps none (nothing there would use it), and
    /// the fast path sends its copy in memory.
    async fn load(
        &self,
        file: std::fs::File,
        stat: Stat,
        compressible: bool,
        keep_fd: bool,
    ) -> io::Result<Result<Arc<CachedFile>, std::fs::File>> {
        let cache = &self.cache;
        let key = (stat.dev, stat.ino);
        if let Some(hit) = self.cached(&stat) {
            return Ok(Ok(hit));
        }
        // One request fills an entry while the others for the same file wait for it: a new
        // generation starts with an empty cache, and all its clients arrive at once.
        cache.remove_if(&key, |old| old.stat != stat);
        let guard = match cache.get_value_or_guard_async(&key).await {
            Ok(hit) if hit.stat == stat => return Ok(Ok(hit)),
            Ok(_) => return Ok(Err(file)),
            Err(guard) => guard,
        };
        let (file, read) = tokio::task::spawn_blocking(move || {
            let read = read_whole(&file, stat);
            (file, read)
        })
        .await
        .map_err(io::Error::other)?;
        Ok(match read? {
            Some(body) => {
                let keep = keep_fd && stat.len >= SENDFILE_FROM;
                let fd = keep.then(|| HeldFd::new(file)).flatten();
                let cached = Arc::new(CachedFile::new(stat, body, fd, compressible));
                let _ = guard.insert(cached.clone());
                Ok(cached)
            }
            None => Err(file),
        })
    }
}

/// An fd of a file a cache entry keeps open. How many there are at once is bounded by a
/// share of the fd limit, so that the cache never takes the fds connections need.
struct HeldFd {
    sent: Arc<SentFile>,
}

/// A file the fast path sends with sendfile(2).
pub(crate) struct SentFile {
    pub file: std::fs::File,
    /// Of a file a cache entry keeps open: when a probe last found it in the page cache, in
    /// [`monotonic_ms`] (0: never). `None` for a file opened for one request.
    warm_at_ms: Option<std::sync::atomic::AtomicU64>,
}

impl SentFile {
    /// A file opened for one request: every chunk of it is probed.
    pub(crate) fn opened(file: std::fs::File) -> SentFile {
        SentFile {
            file,
            warm_at_ms: None,
        }
    }

    /// A file a cache entry keeps open.
    pub(crate) fn held(file: std::fs::File) -> SentFile {
        SentFile {
            file,
            warm_at_ms: Some(0.into()),
        }
    }

    /// Whether a cache entry keeps this file open (else it was opened for one request).
    pub(crate) fn kept(&self) -> bool {
        self.warm_at_ms.is_some()
    }

    /// When a probe last found this kept file in the page cache, if it is one and one did.
    pub(crate) fn warm_at_ms(&self) -> Option<u64> {
        self.warm_at_ms
            .as_ref()
            .map(|at| at.load(Ordering::Relaxed))
            .filter(|&at| at != 0)
    }

    /// Notes that a probe found this file in the page cache at `now_ms` (kept files only).
    pub(crate) fn found_warm(&self, now_ms: u64) {
        if let Some(at) = &self.warm_at_ms {
            at.store(now_ms, Ordering::Relaxed);
        }
    }
}

/// How many [`HeldFd`]s there are.
static HELD_FDS: AtomicUsize = AtomicUsize::new(0);

impl HeldFd {
    /// The file kept open, or `None` when the budget is spent (the file is closed).
    fn new(file: std::fs::File) -> Option<HeldFd> {
        static BUDGET: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let budget = *BUDGET.get_or_init(|| {
            let (soft, _) =
                nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                    .unwrap_or((1024, 1024));
            held_fd_budget(soft)
        });
        if HELD_FDS.fetch_add(1, Ordering::Relaxed) >= budget {
            HELD_FDS.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(HeldFd {
            sent: Arc::new(SentFile::held(file)),
        })
    }
}

impl Drop for HeldFd {
    fn drop(&mut self) {
        HELD_FDS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Milliseconds on the monotonic clock since the first call, from 1.
pub(crate) fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + 1
}

/// Whether it is time to look for entries of deleted files: at most once a second.
fn sweep_due() -> bool {
    static NEXT_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = monotonic_ms();
    let next = NEXT_MS.load(Ordering::Relaxed);
    now >= next
        && NEXT_MS
            .compare_exchange(next, now + 1000, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// Drops the entries whose kept fd is of a file deleted since (or replaced by a rename, as a
/// deploy does): the fd would keep its disk space in use until the entry is evicted.
fn drop_deleted(cache: &FileCache) {
    use std::os::unix::fs::MetadataExt;
    cache.retain(|_, cached| match &cached.fd {
        Some(held) => held.sent.file.metadata().is_ok_and(|m| m.nlink() > 0),
        None => true,
    });
}

/// How many fds the cache may keep open under a soft `RLIMIT_NOFILE` of `limit`: a sixteenth
/// of it, at most 1024 (64 MiB of cache in entries of 64 KiB).
fn held_fd_budget(limit: u64) -> usize {
    (limit / 16).min(1024) as usize
}

/// The whole content of `file` if it still matches `stat` once read; `None` (and the file
/// rewound) if it changed meanwhile.
fn read_whole(file: &std::fs::File, stat: Stat) -> io::Result<Option<Bytes>> {
    use std::io::{Read, Seek};
    let mut body = Vec::with_capacity(stat.len as usize + 1);
    let mut reader = file;
    reader.take(stat.len + 1).read_to_end(&mut body)?;
    if body.len() as u64 == stat.len && Stat::of(file.as_fd())? == stat {
        return Ok(Some(body.into()));
    }
    reader.rewind()?;
    Ok(None)
}

/// What [`Beneath`] says about a file: its `fstat`.
pub struct Meta(Stat);

impl Metadata for Meta {
    fn is_dir(&self) -> bool {
        self.0.kind == Kind::Dir
    }

    fn modified(&self) -> io::Result<std::time::SystemTime> {
        Ok(self.0.modified())
    }

    fn len(&self) -> u64 {
        self.0.len
    }
}

/// A file [`Beneath`] opened: read from the fd, or its content from the cache.
pub struct Opened {
    content: Content,
    stat: Stat,
}

enum Content {
    Disk(tokio::fs::File),
    Memory(std::io::Cursor<Bytes>),
}

impl Opened {
    fn disk(file: std::fs::File, stat: Stat) -> Opened {
        Opened {
            content: Content::Disk(tokio::fs::File::from_std(file)),
            stat,
        }
    }

    fn memory(body: Bytes, stat: Stat) -> Opened {
        Opened {
            content: Content::Memory(std::io::Cursor::new(body)),
            stat,
        }
    }
}

impl tokio::io::AsyncRead for Opened {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.content {
            Content::Disk(file) => Pin::new(file).poll_read(cx, buf),
            Content::Memory(bytes) => Pin::new(bytes).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncSeek for Opened {
    fn start_seek(mut self: Pin<&mut Self>, position: io::SeekFrom) -> io::Result<()> {
        match &mut self.content {
            Content::Disk(file) => Pin::new(file).start_seek(position),
            Content::Memory(bytes) => Pin::new(bytes).start_seek(position),
        }
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        match &mut self.content {
            Content::Disk(file) => Pin::new(file).poll_complete(cx),
            Content::Memory(bytes) => Pin::new(bytes).poll_complete(cx),
        }
    }
}

impl File for Opened {
    type Metadata = Meta;
    type MetadataFuture<'a> = std::future::Ready<io::Result<Meta>>;

    fn metadata(&self) -> Self::MetadataFuture<'_> {
        std::future::ready(Ok(Meta(self.stat)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn content_types_follow_each_extension_through_the_threads_memo() {
        let expected = |path: &Path| {
            mime_guess::from_path(path)
                .first_raw()
                .unwrap_or("application/octet-stream")
        };
        // Hits and misses of the memo in turn: the same extension twice, another one, no
        // extension and an empty one, another case, an extension that is not UTF-8.
        let paths: [&[u8]; 14] = [
            b"a.html",
            b"b.html",
            b"c.css",
            b"d.html",
            b"e",
            b"g",
            b"j.",
            b"f.tar.gz",
            b"h.html",
            b"h.HTML",
            b"i.css",
            b"x.\xff",
            b"y.\xff",
            b"z.css",
        ];
        for path in paths {
            let path = Path::new(std::ffi::OsStr::from_bytes(path));
            assert_eq!(content_type_of(path), expected(path), "{path:?}");
        }
    }

    #[test]
    fn the_cache_keeps_a_sixteenth_of_the_fd_limit_open_at_most_1024() {
        assert_eq!(held_fd_budget(256), 16);
        assert_eq!(held_fd_budget(1024), 64);
        assert_eq!(held_fd_budget(16 * 1024 + 16), 1024);
        assert_eq!(held_fd_budget(1 << 20), 1024);
        assert_eq!(held_fd_budget(15), 0);
    }

    type Answer = (StatusCode, Vec<(String, Vec<u8>)>, Bytes);

    /// A whole response: status, headers in order, body.
    async fn answer(response: Response<Body>) -> Answer {
        let headers = response
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect();
        let status = response.status();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        (status, headers, body)
    }

    fn get(path: &str) -> Request<Body> {
        Request::get(path).body(Body::empty()).unwrap()
    }

    #[test]
    fn paths_are_normalized_for_the_rules() {
        for (sent, seen) in [
            ("/", "/"),
            ("//a/./b.html", "/a/b.html"),
            ("/a%20b/", "/a b/"),
            ("/assets//x.css", "/assets/x.css"),
            ("/../etc", "/../etc"),
        ] {
            assert_eq!(normalized_path(sent), seen, "{sent}");
        }
        assert!(compressible_path("/"));
        assert!(compressible_path("/app%2Ejs"));
        assert!(!compressible_path("/a.png"));
    }

    /// The cached answers to plain GETs are byte for byte what tower-http's own `ServeDir`
    /// gives for the same files.
    #[test]
    fn cached_answers_are_serve_dirs() {
        let dir = std::env::temp_dir().join(format!("baton-http-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("index.html"), "<p>home</p>").unwrap();
        std::fs::write(dir.join("sub/index.html"), "sub").unwrap();
        std::fs::write(dir.join("style.css"), "body{}").unwrap();
        std::fs::write(dir.join("data.unknown-ext"), [0u8, 1, 2]).unwrap();
        std::fs::write(dir.join("empty.txt"), "").unwrap();
        std::os::unix::fs::symlink("style.css", dir.join("link.js")).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let confined = Confined::new(&dir).unwrap();
            let reference = ServeDir::new(&dir)
                .append_index_html_on_directories(true)
                .precompressed_zstd()
                .precompressed_br()
                .precompressed_gzip();
            for path in [
                "/",
                "/index.html",
                "/sub/",
                "/style.css",
                "/data.unknown-ext",
                "/empty.txt",
                "/link.js",
                "/%73tyle.css",
            ] {
                let Ok(want) = tower::ServiceExt::oneshot(reference.clone(), get(path)).await;
                let want = answer(want.map(Body::new)).await;
                assert_eq!(want.0, StatusCode::OK, "{path}");
                // The miss that fills the cache, then the hit.
                for _ in 0..2 {
                    let Ok(got) = tower::ServiceExt::oneshot(confined.clone(), get(path)).await;
                    assert_eq!(answer(got).await, want, "{path}");
                }
            }
            // Five files: the link shares its target's entry.
            assert_eq!(confined.backend.cache.len(), 5);
        });
        let _ = std::fs::remove_dir_all(&dir);
    }
}
