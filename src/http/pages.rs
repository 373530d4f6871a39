//! What the root answers when a file is not simply there (`[files]` of the configuration):
//! error pages, a single-page application's fallback, directory listings, and short default
//! bodies for errors.
//!
//! [`Pages`] wraps [`Confined`]. A plain GET of a small file that exists (the cached fast path,
//! `Confined::plain`) is answered as before, with nothing added; everything else goes to
//! `ServeDir`, and only an error answer costs more:
//!
//! - **404** for a GET or HEAD: a directory without `index.html` is listed when `listing` is on
//!   ([`listing_page`]); else the `fallback` file (off by default, nginx's
//!   `try_files $uri /index.html`) answers with 200 and the request's own conditions; else the
//!   `not_found_page` (default `404.html`) answers with 404 when it exists in the root.
//! - **5xx** (an I/O error while serving a file, e.g. a socket in the root, which cannot be
//!   opened): the `error_page` (default `50x.html`) with the same status.
//! - Any other error answer with an empty body, and any of the above without its page, gets a
//!   short text body: `404 Not Found\n`, `text/plain; charset=utf-8`.
//!
//! Every page is a file below the root fetched through the same [`Confined`] (beneath the
//! root's fd, cached when small), so a page that is a symlink leading outside is simply
//! missing. A page is served with its content type and length but without `ETag`,
//! `Last-Modified` or `Accept-Ranges`: it stands for an error, not for the page's file. HEAD
//! gets the headers only.
//!
//! A listing reads the directory beneath the root ([`Root::list`]); entries that lead outside
//! the root or cannot be opened are left out. Names are HTML-escaped and links
//! percent-encoded, each relative to the directory (`./name`), so that no name is markup or a
//! scheme.

use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use super::beneath::{Kind, Root};
use super::{below_root, AppFuture, Confined};

/// The `[files]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Served with 404, relative to the root; empty: none.
    pub not_found_page: String,
    /// Served with a 5xx, relative to the root; empty: none.
    pub error_page: String,
    /// Answers a GET or HEAD of a path not found, with 200.
    pub fallback: Option<String>,
    /// List directories without index.html.
    pub listing: bool,
}

impl Default for Settings {
    /// As [`crate::config::Config::default`].
    fn default() -> Settings {
        Settings {
            not_found_page: "404.html".to_owned(),
            error_page: "50x.html".to_owned(),
            fallback: None,
            listing: false,
        }
    }
}

/// Everything but `A-Z a-z 0-9 - . _ ~` is percent-encoded in a link or page URI.
const LINK: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The files below the root, with error pages, the fallback and listings.
pub struct Pages {
    files: Confined,
    not_found_page: Option<Uri>,
    error_page: Option<Uri>,
    fallback: Option<Uri>,
    listing: bool,
}

/// The request URI of a file below the root (each component percent-encoded); `None` for
/// an empty name (switched off) or one `ServeDir` would not find.
fn page_uri(name: &str) -> Option<Uri> {
    let mut uri = String::new();
    for component in Path::new(name).components() {
        match component {
            std::path::Component::Normal(part) => {
                uri.push('/');
                uri.extend(utf8_percent_encode(part.to_str()?, LINK));
            }
            std::path::Component::CurDir => {}
            _ => return None,
        }
    }
    if uri.is_empty() {
        return None;
    }
    uri.parse().ok()
}

impl Pages {
    pub fn new(files: Confined, settings: &Settings) -> Pages {
        Pages {
            files,
            not_found_page: page_uri(&settings.not_found_page),
            error_page: page_uri(&settings.error_page),
            fallback: settings.fallback.as_deref().and_then(page_uri),
            listing: settings.listing,
        }
    }

    /// Answers one request for a file (see the module docs).
    pub fn serve(self: &Arc<Pages>, request: Request<Body>) -> AppFuture {
        let request = match self.files.plain(request) {
            Ok(answer) => return answer,
            Err(request) => request,
        };
        let method = request.method().clone();
        let uri = request.uri().clone();
        let kept = match &self.fallback {
            Some(_) if method == Method::GET || method == Method::HEAD => kept(request.headers()),
            _ => HeaderMap::new(),
        };
        let future = self.files.serve_dir(request);
        let pages = self.clone();
        Box::pin(async move {
            let response = future.await;
            let status = response.status();
            if status == StatusCode::NOT_FOUND {
                pages.not_found(method, uri, kept).await
            } else if status.is_server_error() {
                pages.server_error(status, method).await
            } else if status.is_client_error() && is_empty(&response) {
                with_default_body(response)
            } else {
                response
            }
        })
    }

    /// The answer to a request whose file is not found.
    async fn not_found(&self, method: Method, uri: Uri, kept: HeaderMap) -> Response<Body> {
        let head = method == Method::HEAD;
        if method != Method::GET && !head {
            return default_response(StatusCode::NOT_FOUND);
        }
        if self.listing && uri.path().ends_with('/') {
            if let Some(mut listing) = self.listing(uri.path()).await {
                listing.extensions_mut().insert(super::headers::Substitute);
                return listing;
            }
        }
        if let Some(fallback) = &self.fallback {
            let mut request = Request::new(Body::empty());
            *request.method_mut() = method.clone();
            *request.uri_mut() = fallback.clone();
            *request.headers_mut() = kept;
            let mut response = self.files.answer(request).await;
            if response.status().is_success() || response.status().is_redirection() {
                response.extensions_mut().insert(super::headers::Substitute);
                return response;
            }
        }
        self.page(&self.not_found_page, StatusCode::NOT_FOUND, head)
            .await
    }

    /// The answer to a request whose file could not be served.
    async fn server_error(&self, status: StatusCode, method: Method) -> Response<Body> {
        self.page(&self.error_page, status, method == Method::HEAD)
            .await
    }

    /// The page at `uri` with `status`, or the default body.
    async fn page(&self, uri: &Option<Uri>, status: StatusCode, head: bool) -> Response<Body> {
        let Some(uri) = uri else {
            return default_response(status);
        };
        let mut request = Request::new(Body::empty());
        if head {
            *request.method_mut() = Method::HEAD;
        }
        *request.uri_mut() = uri.clone();
        let mut response = self.files.answer(request).await;
        if response.status() != StatusCode::OK {
            return default_response(status);
        }
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.remove(header::ETAG);
        headers.remove(header::LAST_MODIFIED);
        headers.remove(header::ACCEPT_RANGES);
        response
    }

    /// The listing of the directory `uri_path` (ending in `/`), if it is one below the root.
    async fn listing(&self, uri_path: &str) -> Option<Response<Body>> {
        let dir = below_root(uri_path)?;
        let root = self.files.backend.root.clone();
        let entries = tokio::task::spawn_blocking(move || list(&root, &dir))
            .await
            .ok()??;
        let mut response = Response::new(Body::from(listing_page(uri_path, &entries)));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        Some(response)
    }
}

/// The entries of the directory `dir` below the root, if it is one.
fn list(root: &Root, dir: &Path) -> Option<Vec<(String, Kind)>> {
    if root.stat(dir).ok()?.kind != Kind::Dir {
        return None;
    }
    // Hidden files (.env, .git/, .htpasswd) are left out, as nginx's autoindex leaves them.
    let mut entries = root.list(dir).ok()?;
    entries.retain(|(name, _)| !name.starts_with('.'));
    Some(entries)
}

/// The request headers a fallback answer keeps.
fn kept(headers: &HeaderMap) -> HeaderMap {
    let mut kept = HeaderMap::new();
    // Its conditions and range.
    for name in super::RANGE_AND_CONDITIONS {
        for value in headers.get_all(&name) {
            kept.append(name.clone(), value.clone());
        }
    }
    kept
}

fn is_empty(response: &Response<Body>) -> bool {
    hyper::body::Body::size_hint(response.body()).exact() == Some(0)
}

/// `404 Not Found\n` and the like, as plain text.
pub fn default_response(status: StatusCode) -> Response<Body> {
    let body = format!(
        "{} {}\n",
        status.as_str(),
        status.canonical_reason().unwrap_or("Error")
    );
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// `response`'s status and headers (an `Allow`, say) with the default body.
fn with_default_body(response: Response<Body>) -> Response<Body> {
    let (mut parts, _) = response.into_parts();
    let default = default_response(parts.status);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Response::from_parts(parts, default.into_body())
}

/// The HTML listing of the directory at `uri_path` (ending in `/`): `entries` sorted by name,
/// directories with a trailing `/`, each a link relative to the directory.
pub fn listing_page(uri_path: &str, entries: &[(String, Kind)]) -> String {
    let title = percent_encoding::percent_decode_str(uri_path).decode_utf8_lossy();
    let title = super::escape(&title);
    let mut sorted: Vec<&(String, Kind)> = entries.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut page = format!(
        "<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n\
         <title>Index of {title}</title>\n</head>\n<body>\n<h1>Index of {title}</h1>\n<ul>\n"
    );
    if uri_path != "/" {
        page.push_str("<li><a href=\"../\">../</a></li>\n");
    }
    for (name, kind) in sorted {
        let slash = if *kind == Kind::Dir { "/" } else { "" };
        let href = utf8_percent_encode(name, LINK);
        let text = super::escape(name);
        page.push_str(&format!(
            "<li><a href=\"./{href}{slash}\">{text}{slash}</a></li>\n"
        ));
    }
    page.push_str("</ul>\n</body>\n</html>\n");
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_escapes_names_and_encodes_links() {
        let entries = [
            ("<script>.html".to_owned(), Kind::File),
            ("b & \"c\" d.txt".to_owned(), Kind::File),
            ("sub".to_owned(), Kind::Dir),
            ("a:b".to_owned(), Kind::File),
            ("é.txt".to_owned(), Kind::File),
        ];
        let page = listing_page("/x%20y/", &entries);
        assert!(page.contains("<title>Index of /x y/</title>"), "{page}");
        assert!(!page.contains("<script>"), "{page}");
        let links: Vec<&str> = page.lines().filter(|l| l.starts_with("<li>")).collect();
        assert_eq!(
            links,
            [
                "<li><a href=\"../\">../</a></li>",
                "<li><a href=\"./%3Cscript%3E.html\">&lt;script&gt;.html</a></li>",
                "<li><a href=\"./a%3Ab\">a:b</a></li>",
                "<li><a href=\"./b%20%26%20%22c%22%20d.txt\">b &amp; &quot;c&quot; d.txt</a></li>",
                "<li><a href=\"./sub/\">sub/</a></li>",
                "<li><a href=\"./%C3%A9.txt\">é.txt</a></li>",
            ]
        );
        assert!(!listing_page("/", &[]).contains("../"));
    }

    #[test]
    fn page_uris() {
        assert_eq!(page_uri("404.html").unwrap(), "/404.html");
        assert_eq!(page_uri("errors/a b.html").unwrap(), "/errors/a%20b.html");
        assert_eq!(page_uri("./x.html").unwrap(), "/x.html");
        assert_eq!(page_uri("50%.html").unwrap(), "/50%25.html");
        assert!(page_uri("").is_none());
        assert!(page_uri("../x").is_none());
    }

    #[test]
    fn default_bodies() {
        let r = default_response(StatusCode::NOT_FOUND);
        assert_eq!(r.status(), 404);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/plain; charset=utf-8"
        );
        let r = default_response(StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(r.status(), 500);
    }
}
