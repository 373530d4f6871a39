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
//! let app: axum::Router = baton::http::router(Arc::new(info), metrics, None);
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

/// `ServeDir` confined to its root: a request whose path resolves (through symlinks) outside
/// the root answers 404, as if the file did not exist.
#[derive(Clone)]
pub struct Confined {
    root: Arc<PathBuf>,
    files: ServeDir,
}

impl Confined {
    pub fn new(root: &Path) -> Confined {
        // The root itself may be a symlink; what it resolves to is the boundary.
        let canonical = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_owned());
        Confined {
            files: ServeDir::new(&canonical).append_index_html_on_directories(true),
            root: Arc::new(canonical),
        }
    }

    /// Whether the request's path stays inside the root once symlinks are resolved. Paths that
    /// do not exist pass: `ServeDir` answers them with 404 itself.
    fn allows(&self, uri_path: &str) -> bool {
        let Ok(decoded) = percent_encoding::percent_decode_str(uri_path).decode_utf8() else {
            return true; // ServeDir rejects it
        };
        let mut path = (*self.root).clone();
        for component in Path::new(decoded.trim_start_matches('/')).components() {
            match component {
                Component::Normal(part) => path.push(part),
                Component::CurDir => {}
                // ServeDir refuses these itself; refusing here too keeps this check whole.
                _ => return false,
            }
        }
        // A blocking call on the runtime: realpath on a cached tree is a few microseconds of
        // lstat, cheaper than a hop to the blocking pool.
        let inside = |p: &Path| match std::fs::canonicalize(p) {
            Ok(real) => real.starts_with(&*self.root),
            Err(_) => true,
        };
        inside(&path) && (!path.is_dir() || inside(&path.join("index.html")))
    }
}

impl tower::Service<Request<Body>> for Confined {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if !self.allows(request.uri().path()) {
            let mut response = Response::new(Body::from("Not Found\n"));
            *response.status_mut() = StatusCode::NOT_FOUND;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            return Box::pin(async move { Ok(response) });
        }
        let files = self.files.clone();
        Box::pin(async move {
            let Ok(response) = tower::ServiceExt::oneshot(files, request).await;
            Ok(response.map(Body::new))
        })
    }
}
