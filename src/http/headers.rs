//! The response headers an operator configures: `Cache-Control` by path or content type, any
//! extra headers (security headers, CORS), and the charset of text types.
//!
//! They are added to the answers from the root (files, their 304s, error pages), whichever
//! path served them: hyper's (`ServeDir`, the memory cache) or the zero-copy one, which writes
//! [`Headers::extra_lines`] into its head. A header the file response sets itself is not
//! duplicated: a configured header replaces it.

use std::str::FromStr;

use axum::http::header::{self, HeaderName};
use axum::http::{HeaderMap, HeaderValue};

/// One `Cache-Control` rule: `PATTERN=VALUE`, where a pattern starting with `/` is a glob over
/// the request path (`/assets/**`, `*.html`: `*` stays within a path segment, `**` crosses
/// them) and any other is a content type (`text/html`, `image/*`).
#[derive(Debug, Clone)]
pub struct CacheRule {
    source: String,
    pattern: Pattern,
    value: HeaderValue,
}

#[derive(Debug, Clone)]
enum Pattern {
    Path(globset::GlobMatcher),
    /// The type and subtype, lowercase; the subtype `*` matches any.
    Type(String, String),
}

impl PartialEq for CacheRule {
    fn eq(&self, other: &CacheRule) -> bool {
        self.source == other.source
    }
}

impl Eq for CacheRule {}

impl FromStr for CacheRule {
    type Err = String;

    fn from_str(s: &str) -> Result<CacheRule, String> {
        let Some((pattern, value)) = s.split_once('=') else {
            return Err(format!(
                "'{s}' is not PATTERN=VALUE; write it like \"/assets/**=max-age=31536000, \
                 immutable\" or \"text/html=no-cache\""
            ));
        };
        let (pattern, value) = (pattern.trim(), value.trim());
        let value = HeaderValue::from_str(value)
            .ok()
            .filter(|_| !value.is_empty())
            .ok_or_else(|| {
                format!("'{value}' is not a Cache-Control value; write it like \"max-age=3600\"")
            })?;
        let pattern = if pattern.starts_with('/') {
            let glob = globset::GlobBuilder::new(pattern)
                .literal_separator(true)
                .build()
                .map_err(|e| format!("'{pattern}' is not a path pattern: {}", e.kind()))?;
            Pattern::Path(glob.compile_matcher())
        } else {
            let lower = pattern.to_ascii_lowercase();
            match lower.split_once('/') {
                Some((kind, subtype))
                    if !kind.is_empty()
                        && !subtype.is_empty()
                        && kind != "*"
                        && !lower.contains(';') =>
                {
                    Pattern::Type(kind.to_owned(), subtype.to_owned())
                }
                _ => {
                    return Err(format!(
                        "'{pattern}' is neither a path pattern (starting with /) nor a content \
                         type such as text/html or image/*"
                    ))
                }
            }
        };
        Ok(CacheRule {
            source: s.to_owned(),
            pattern,
            value,
        })
    }
}

impl std::fmt::Display for CacheRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source)
    }
}

impl CacheRule {
    /// Whether the rule applies to the file at `path` (`None`: a substitute for it, which
    /// only type rules match) of this type.
    fn matches(&self, path: Option<&str>, content_type: Option<&HeaderValue>) -> bool {
        match &self.pattern {
            Pattern::Path(glob) => path.is_some_and(|path| glob.is_match(path)),
            Pattern::Type(kind, subtype) => {
                let Some(essence) = content_type.and_then(|v| v.to_str().ok()) else {
                    return false;
                };
                let essence = essence.split(';').next().unwrap_or_default().trim();
                let Some((k, s)) = essence.split_once('/') else {
                    return false;
                };
                k.eq_ignore_ascii_case(kind) && (subtype == "*" || s.eq_ignore_ascii_case(subtype))
            }
        }
    }
}

/// Marks an answer that stands in for the requested file (the fallback, a listing): the
/// path's `Cache-Control` rules are not for it.
#[derive(Debug, Clone, Copy)]
pub struct Substitute;

/// An extra response header, `NAME: VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraHeader {
    pub name: HeaderName,
    pub value: HeaderValue,
}

/// Headers that describe the message itself, its validators or the connection: set by baton
/// and hyper from what is sent, never by configuration (a configured `Vary` would drop the
/// `Accept-Encoding` caches need to keep codings apart).
const NOT_CONFIGURABLE: [HeaderName; 13] = [
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::CONNECTION,
    header::CONTENT_ENCODING,
    header::CONTENT_RANGE,
    header::DATE,
    header::TRAILER,
    header::UPGRADE,
    header::CONTENT_TYPE,
    header::VARY,
    header::ETAG,
    header::LAST_MODIFIED,
    header::ACCEPT_RANGES,
];

impl FromStr for ExtraHeader {
    type Err = String;

    fn from_str(s: &str) -> Result<ExtraHeader, String> {
        let Some((name, value)) = s.split_once(':') else {
            return Err(format!(
                "'{s}' is not NAME: VALUE; write it like \"X-Content-Type-Options: nosniff\""
            ));
        };
        let (name, value) = (name.trim(), value.trim());
        let name = HeaderName::from_str(name)
            .map_err(|_| format!("'{name}' is not a header name; use letters, digits and -"))?;
        if NOT_CONFIGURABLE.contains(&name) || name == "keep-alive" {
            return Err(format!(
                "{name} is set by baton from what it sends and cannot be configured; remove it"
            ));
        }
        if name == header::CACHE_CONTROL {
            return Err(
                "cache-control is set by headers.cache_control rules (\"/**=VALUE\" for every \
                 path); move it there"
                    .to_owned(),
            );
        }
        let value = HeaderValue::from_str(value).map_err(|_| {
            format!("the value of {name} has a control character; use visible text only")
        })?;
        Ok(ExtraHeader { name, value })
    }
}

impl std::fmt::Display for ExtraHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}",
            self.name,
            String::from_utf8_lossy(self.value.as_bytes())
        )
    }
}

/// The configured response headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Headers {
    /// The first rule that matches gives the `Cache-Control` of a file's answer.
    pub cache_control: Vec<CacheRule>,
    /// Added to every answer from the root.
    pub extra: Vec<ExtraHeader>,
    /// Added to `text/*` types (and JavaScript) that name none; empty: none added.
    pub charset: String,
}

impl Default for Headers {
    fn default() -> Headers {
        Headers {
            cache_control: Vec::new(),
            extra: Vec::new(),
            charset: "utf-8".to_owned(),
        }
    }
}

impl Headers {
    /// The `Content-Type` of a file of this media type, the charset added to a text type.
    pub fn content_type(&self, mime: HeaderValue) -> HeaderValue {
        if self.charset.is_empty() || !is_text(&mime) {
            return mime;
        }
        let Ok(text) = mime.to_str() else { return mime };
        if text.to_ascii_lowercase().contains("charset=") {
            return mime;
        }
        HeaderValue::from_str(&format!("{text}; charset={}", self.charset)).unwrap_or(mime)
    }

    /// The headers this answer from the root gets, for the request path `path`.
    ///
    /// `Cache-Control` rules are for the requested file's own answers (200, 206, 304): an error
    /// (a 404 page under `/assets/**=immutable` would be kept a year) gets none, and a
    /// [`Substitute`] (the fallback, a listing) only the rules by type, not the path's.
    pub fn apply(&self, path: &str, response: &mut axum::http::Response<axum::body::Body>) {
        let own = matches!(response.status().as_u16(), 200 | 206 | 304);
        let substitute = response.extensions().get::<Substitute>().is_some();
        let path = (own && !substitute).then_some(path);
        self.apply_headers(path, own, response.headers_mut());
    }

    /// [`Headers::apply`] on the headers: the path rules with `path`, the type rules if
    /// `rules`.
    fn apply_headers(&self, path: Option<&str>, rules: bool, headers: &mut HeaderMap) {
        if let Some(mime) = headers.get(header::CONTENT_TYPE).filter(|m| is_text(m)) {
            let typed = self.content_type(mime.clone());
            headers.insert(header::CONTENT_TYPE, typed);
        }
        // A 304 has no type: the one its 200 would have, for the type rules.
        let guessed;
        let content_type = match headers.get(header::CONTENT_TYPE) {
            Some(typed) => Some(typed),
            None if rules && !self.cache_control.is_empty() => {
                guessed = path.and_then(type_of_path);
                guessed.as_ref()
            }
            None => None,
        };
        let rule = rules
            .then(|| {
                self.cache_control
                    .iter()
                    .find(|rule| rule.matches(path, content_type))
            })
            .flatten();
        if let Some(rule) = rule {
            headers.insert(header::CACHE_CONTROL, rule.value.clone());
        }
        // A name given more than once (Link) keeps all its values.
        let mut previous: Option<&HeaderName> = None;
        for extra in self.grouped() {
            if previous == Some(&extra.name) {
                headers.append(extra.name.clone(), extra.value.clone());
            } else {
                headers.insert(extra.name.clone(), extra.value.clone());
            }
            previous = Some(&extra.name);
        }
    }

    /// The extra headers, those of one name together (in the order of their first mention),
    /// as a header map holds them, so that both ways of sending an answer list them alike.
    fn grouped(&self) -> impl Iterator<Item = &ExtraHeader> + '_ {
        self.extra.iter().enumerate().flat_map(move |(i, first)| {
            let seen = self.extra[..i].iter().any(|e| e.name == first.name);
            self.extra[i..]
                .iter()
                .filter(move |e| !seen && e.name == first.name)
        })
    }

    /// Whether [`Headers::apply`] changes nothing but the charset.
    pub fn none_configured(&self) -> bool {
        self.cache_control.is_empty() && self.extra.is_empty()
    }

    /// The `Cache-Control` of the file at `path` of this type, if a rule gives one.
    pub fn cache_control_for(
        &self,
        path: &str,
        content_type: Option<&HeaderValue>,
    ) -> Option<&HeaderValue> {
        self.cache_control
            .iter()
            .find(|rule| rule.matches(Some(path), content_type))
            .map(|rule| &rule.value)
    }

    /// The configured header lines of an answer the zero-copy path writes itself (its
    /// `Content-Type` comes with the charset already, from [`Headers::content_type`]).
    pub fn extra_lines(
        &self,
        path: &str,
        content_type: &HeaderValue,
        mut line: impl FnMut(&str, &[u8]),
    ) {
        if let Some(value) = self.cache_control_for(path, Some(content_type)) {
            line("cache-control", value.as_bytes());
        }
        for extra in self.grouped() {
            line(extra.name.as_str(), extra.value.as_bytes());
        }
    }
}

/// The media type a request path's file is served with (`index.html` for a directory).
fn type_of_path(path: &str) -> Option<HeaderValue> {
    let file = if path.ends_with('/') || path.is_empty() {
        "index.html"
    } else {
        path
    };
    mime_guess::from_path(file)
        .first_raw()
        .map(HeaderValue::from_static)
}

/// `text/*`, and JavaScript, whose type browsers still read a charset from.
fn is_text(mime: &HeaderValue) -> bool {
    let bytes = mime.as_bytes();
    let starts = |prefix: &[u8]| {
        bytes.len() >= prefix.len() && bytes[..prefix.len()].eq_ignore_ascii_case(prefix)
    };
    starts(b"text/") || starts(b"application/javascript")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> CacheRule {
        s.parse().unwrap()
    }

    #[test]
    fn cache_rules_match_paths_and_types() {
        let html = HeaderValue::from_static("text/html; charset=utf-8");
        let png = HeaderValue::from_static("image/png");
        let assets = rule("/assets/**=max-age=31536000, immutable");
        assert!(assets.matches(Some("/assets/app.js"), None));
        assert!(assets.matches(Some("/assets/a/b/c.css"), None));
        assert!(!assets.matches(Some("/other/assets/app.js"), None));
        assert_eq!(assets.value, "max-age=31536000, immutable");
        let star = rule("/*.html=no-cache");
        assert!(star.matches(Some("/index.html"), None));
        assert!(
            !star.matches(Some("/sub/index.html"), None),
            "* stays within a segment"
        );
        assert!(rule("text/html=no-cache").matches(Some("/"), Some(&html)));
        assert!(rule("image/*=max-age=60").matches(Some("/a.png"), Some(&png)));
        assert!(!rule("image/*=max-age=60").matches(Some("/"), Some(&html)));
        assert!(!rule("text/html=no-cache").matches(Some("/"), None));
    }

    #[test]
    fn bad_rules_and_headers_say_what_to_write() {
        for (bad, says) in [
            ("no-equals", "is not PATTERN=VALUE"),
            ("/a=", "is not a Cache-Control value"),
            ("/a[=x", "is not a path pattern"),
            ("html=no-cache", "neither a path pattern"),
            ("*/*=no-cache", "neither a path pattern"),
        ] {
            let e = bad.parse::<CacheRule>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        for (bad, says) in [
            ("X-Frame-Options DENY", "is not NAME: VALUE"),
            ("Bad Name: x", "is not a header name"),
            ("Content-Length: 5", "cannot be configured"),
            ("connection: close", "cannot be configured"),
            ("Vary: Origin", "cannot be configured"),
            ("ETag: \"x\"", "cannot be configured"),
            ("Cache-Control: no-store", "move it there"),
            ("X-A: a\u{1}b", "control character"),
        ] {
            let e = bad.parse::<ExtraHeader>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let ok: ExtraHeader = "X-Content-Type-Options:  nosniff ".parse().unwrap();
        assert_eq!(ok.to_string(), "x-content-type-options: nosniff");
    }

    #[test]
    fn a_name_given_twice_keeps_both_values_in_both_ways() {
        let headers = Headers {
            extra: ["Link: <a>", "X-A: 1", "Link: <b>"]
                .iter()
                .map(|h| h.parse().unwrap())
                .collect(),
            ..Headers::default()
        };
        let mut response = axum::http::Response::new(axum::body::Body::empty());
        let map = response.headers_mut();
        map.insert(header::LINK, HeaderValue::from_static("<old>"));
        headers.apply("/", &mut response);
        let listed: Vec<String> = response
            .headers()
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap()))
            .collect();
        assert_eq!(listed, ["link: <a>", "link: <b>", "x-a: 1"]);
        let mut lines = Vec::new();
        headers.extra_lines("/", &HeaderValue::from_static("text/html"), |k, v| {
            lines.push(format!("{k}: {}", String::from_utf8_lossy(v)))
        });
        assert_eq!(lines, listed);
    }

    #[test]
    fn text_types_get_the_charset_once() {
        let headers = Headers::default();
        let typed = |t: &'static str| headers.content_type(HeaderValue::from_static(t));
        assert_eq!(typed("text/html"), "text/html; charset=utf-8");
        assert_eq!(
            typed("application/javascript"),
            "application/javascript; charset=utf-8"
        );
        assert_eq!(
            typed("text/plain; charset=latin1"),
            "text/plain; charset=latin1"
        );
        assert_eq!(typed("image/png"), "image/png");
        let none = Headers {
            charset: String::new(),
            ..Headers::default()
        };
        assert_eq!(
            none.content_type(HeaderValue::from_static("text/css")),
            "text/css"
        );
    }
}
