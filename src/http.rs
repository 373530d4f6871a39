//! The HTTP service baton ships: static files plus three operational endpoints.
//!
//! | path          | answer                                                                 |
//! |---------------|------------------------------------------------------------------------|
//! | `/-/healthy`  | `200 ok`                                                               |
//! | `/-/version`  | JSON: `version`, `pid`, `generation`, `started` (RFC 3339), `listeners` |
//! | `/-/metrics`  | Prometheus text exposition ([`crate::metrics`])                        |
//! | anything else | a file below the root (tower-http's `ServeDir`: index.html, content types, ranges, conditional GET, HEAD), or, with no root, the embedded page at `/` |
//!
//! Nothing outside the root is reachable: `ServeDir` refuses `..`, and [`Confined`] refuses
//! any path whose symlinks resolve outside the root.
//!
//! ```
//! # use std::sync::Arc;
//! let info = baton::http::Info::current(1, vec!["http=127.0.0.1:8080 (bound)".into()]);
//! let metrics = Arc::new(baton::metrics::Metrics::new(1, std::time::SystemTime::now()));
//! let app = baton::http::App::new(Arc::new(info), metrics, None);
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tower_http::services::ServeDir;

use crate::metrics::Metrics;

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
}

/// The future of one answer.
pub type AppFuture = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

impl App {
    /// baton's service: the `/-/` endpoints, and the files below `root` (or, with no root, the
    /// embedded page at `/`).
    pub fn new(info: Arc<Info>, metrics: Arc<Metrics>, root: Option<&Path>) -> App {
        App {
            router: router(info, metrics, None),
            files: root.map(Confined::new),
        }
    }

    /// Answers one request.
    pub fn call(&self, request: Request<Body>) -> AppFuture {
        match &self.files {
            Some(files) if !request.uri().path().starts_with("/-/") => {
                let future = tower::Service::call(&mut files.clone(), request);
                Box::pin(async move {
                    let Ok(response) = future.await;
                    response
                })
            }
            _ => {
                let future = tower::ServiceExt::oneshot(self.router.clone(), request);
                Box::pin(async move {
                    let Ok(response) = future.await;
                    response
                })
            }
        }
    }
}

impl From<Router> for App {
    fn from(router: Router) -> App {
        App {
            router,
            files: None,
        }
    }
}

/// The router: the `/-/` endpoints, then files from `root` (or the embedded page).
pub fn router(info: Arc<Info>, metrics: Arc<Metrics>, root: Option<&Path>) -> Router {
    let ops = Router::new()
        .route("/-/healthy", get(healthy))
        .route("/-/version", get(version))
        .route("/-/metrics", get(metrics_text));
    let app = match root {
        Some(root) => ops.fallback_service(Confined::new(root)),
        None => ops.route("/", get(index)),
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

/// `ServeDir` confined to its root, with a cache of small files in front of it.
///
/// A request whose path resolves (through symlinks) outside the root answers 404, as if the file
/// did not exist.
///
/// `ServeDir` does every open, stat and read on tokio's blocking pool; under load those hops, not
/// the file system, dominate a small file's cost. So plain GETs (no `Range`, no conditional
/// headers) of files up to [`MAX_CACHED_FILE`] are answered from memory: the cached response is
/// `ServeDir`'s own (same status, headers and bytes), stored the first time and reused while the
/// file's identity (device, inode, size, mtime) stays the same, which one `stat` per request
/// checks. Every other request, and every changed file, goes to `ServeDir`, so HTTP semantics
/// (ranges, conditional GET, HEAD, redirects, content types) are all tower-http's.
#[derive(Clone)]
pub struct Confined {
    root: Arc<PathBuf>,
    files: ServeDir,
    cache: Arc<FileCache>,
}

/// Files larger than this are always read by `ServeDir`.
pub const MAX_CACHED_FILE: u64 = 256 * 1024;
/// The most bytes of file content the cache holds.
const CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// Keyed by the request's raw path.
type FileCache = quick_cache::sync::Cache<String, Arc<CachedFile>, ByBytes>;

#[derive(Clone)]
struct ByBytes;

impl quick_cache::Weighter<String, Arc<CachedFile>> for ByBytes {
    fn weight(&self, _: &String, file: &Arc<CachedFile>) -> u64 {
        file.body.len() as u64 + 1
    }
}

/// A response `ServeDir` gave for a file, and the file's identity when it did.
struct CachedFile {
    /// The request's path below the root, as given (links not resolved): a hit stats it, so a
    /// link retargeted since leads to another file and misses.
    lookup: PathBuf,
    stamp: Stamp,
    headers: axum::http::HeaderMap,
    body: bytes::Bytes,
}

impl CachedFile {
    /// The response again: status 200, the same headers and bytes.
    fn response(&self) -> Response<Body> {
        let mut response = Response::new(Body::from(self.body.clone()));
        *response.headers_mut() = self.headers.clone();
        response
    }
}

/// What identifies a file's content without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok().filter(|m| m.is_file())?;
        Some(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
        })
    }
}

/// Where a request path leads.
enum Resolution {
    /// Outside the root: refused.
    Outside,
    /// A regular file inside the root (for `/dir/`, its index.html): the path as requested
    /// below the root, and where it leads.
    File { lookup: PathBuf, real: PathBuf },
    /// Anything else (missing, a directory without a trailing slash, ...): `ServeDir` decides.
    Other,
}

impl Confined {
    pub fn new(root: &Path) -> Confined {
        // The root itself may be a symlink; what it resolves to is the boundary.
        let canonical = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_owned());
        Confined {
            files: ServeDir::new(&canonical).append_index_html_on_directories(true),
            root: Arc::new(canonical),
            cache: Arc::new(FileCache::with_weighter(1024, CACHE_BYTES, ByBytes)),
        }
    }

    /// Resolves the request's path below the root, symlinks included.
    fn resolve(&self, uri_path: &str) -> Resolution {
        let Ok(decoded) = percent_encoding::percent_decode_str(uri_path).decode_utf8() else {
            return Resolution::Other; // ServeDir rejects it
        };
        let mut path = (*self.root).clone();
        for component in Path::new(decoded.trim_start_matches('/')).components() {
            match component {
                Component::Normal(part) => path.push(part),
                Component::CurDir => {}
                // ServeDir refuses these itself; refusing here too keeps this check whole.
                _ => return Resolution::Outside,
            }
        }
        // Blocking calls on the runtime: realpath and stat on a cached tree are a few
        // microseconds, cheaper than a hop to the blocking pool.
        let real = match std::fs::canonicalize(&path) {
            Ok(real) if real.starts_with(&*self.root) => real,
            Ok(_) => return Resolution::Outside,
            Err(_) => return Resolution::Other,
        };
        if !real.is_dir() {
            return Resolution::File { lookup: path, real };
        }
        if !decoded.ends_with('/') {
            return Resolution::Other; // ServeDir redirects to the slashed path
        }
        let lookup = path.join("index.html");
        match std::fs::canonicalize(&lookup) {
            Ok(real) if real.starts_with(&*self.root) => Resolution::File { lookup, real },
            Ok(_) => Resolution::Outside,
            Err(_) => Resolution::Other,
        }
    }
}

/// Whether `ServeDir` would answer this request with the whole file, the same every time.
fn plain_get(request: &Request<Body>) -> bool {
    request.method() == axum::http::Method::GET
        && [
            header::RANGE,
            header::IF_RANGE,
            header::IF_MATCH,
            header::IF_NONE_MATCH,
            header::IF_MODIFIED_SINCE,
            header::IF_UNMODIFIED_SINCE,
        ]
        .iter()
        .all(|h| !request.headers().contains_key(h))
}

fn not_found() -> Response<Body> {
    let mut response = Response::new(Body::from("Not Found\n"));
    *response.status_mut() = StatusCode::NOT_FOUND;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

impl tower::Service<Request<Body>> for Confined {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let plain = plain_get(&request);
        if plain {
            // A hit costs one stat: the requested path still leads to the very file the entry
            // was made from (same device, inode, size and mtime), which was inside the root
            // then; a changed file or a retargeted link leads elsewhere and misses.
            if let Some(hit) = self.cache.get(request.uri().path()) {
                if Stamp::of(&hit.lookup) == Some(hit.stamp) {
                    let response = hit.response();
                    return Box::pin(async move { Ok(response) });
                }
            }
        }
        let cacheable = match self.resolve(request.uri().path()) {
            Resolution::Outside => return Box::pin(async { Ok(not_found()) }),
            Resolution::File { lookup, real } if plain => Stamp::of(&real)
                .filter(|stamp| stamp.len <= MAX_CACHED_FILE)
                .map(|stamp| (request.uri().path().to_owned(), lookup, real, stamp)),
            _ => None,
        };
        let files = self.files.clone();
        let cache = self.cache.clone();
        Box::pin(async move {
            let Some((key, lookup, path, stamp)) = cacheable else {
                let Ok(response) = tower::ServiceExt::oneshot(files, request).await;
                return Ok(response.map(Body::new));
            };
            // One request fills an entry while the others for the same path wait for it: a new
            // generation starts with an empty cache, and all its clients arrive at once.
            cache.remove_if(key.as_str(), |old| old.stamp != stamp);
            let guard = match cache.get_value_or_guard_async(key.as_str()).await {
                Ok(hit) if hit.stamp == stamp => return Ok(hit.response()),
                // Filled from another version of the file meanwhile: ServeDir answers.
                Ok(_) => None,
                Err(guard) => Some(guard),
            };
            let Ok(response) = tower::ServiceExt::oneshot(files, request).await;
            let Some(guard) = guard.filter(|_| response.status() == StatusCode::OK) else {
                return Ok(response.map(Body::new));
            };
            let (parts, body) = response.into_parts();
            let bytes = match http_body_util::BodyExt::collect(body).await {
                Ok(collected) => collected.to_bytes(),
                Err(e) => {
                    tracing::warn!(path = %path.display(), "cannot read {}: {e}", path.display());
                    let mut response = Response::new(Body::from("Internal Server Error\n"));
                    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    return Ok(response);
                }
            };
            // Only what was read from an unchanged file may be reused; otherwise the guard
            // goes unfilled and the next request tries again.
            if bytes.len() as u64 == stamp.len && Stamp::of(&lookup) == Some(stamp) {
                let _ = guard.insert(Arc::new(CachedFile {
                    lookup,
                    stamp,
                    headers: parts.headers.clone(),
                    body: bytes.clone(),
                }));
            }
            Ok(Response::from_parts(parts, Body::from(bytes)))
        })
    }
}
