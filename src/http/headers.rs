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
    fn matches(&self, path: &str, content_type: Option<&HeaderValue>) -> bool {
        match &self.pattern {
            Pattern::Path(glob) => glob.is_match(path),
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

/// An extra response header, `NAME: VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraHeader {
    pub name: HeaderName,
    pub value: HeaderValue,
}

/// Headers that describe the message itself or the connection: set by baton and hyper from
/// what is sent, never by configuration.
const NOT_CONFIGURABLE: [HeaderName; 9] = [
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::CONNECTION,
    header::CONTENT_ENCODING,
    header::CONTENT_RANGE,
    header::DATE,
    header::TRAILER,
    header::UPGRADE,
    header::CONTENT_TYPE,
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
    pub fn apply(&self, path: &str, headers: &mut HeaderMap) {
        if let Some(mime) = headers.get(header::CONTENT_TYPE).filter(|m| is_text(m)) {
            let typed = self.content_type(mime.clone());
            headers.insert(header::CONTENT_TYPE, typed);
        }
        // A 304 has no type: the one its 200 would have, for the type rules.
        let guessed;
        let content_type = match headers.get(header::CONTENT_TYPE) {
            Some(typed) => Some(typed),
            None if !self.cache_control.is_empty() => {
                guessed = type_of_path(path);
                guessed.as_ref()
            }
            None => None,
        };
        if let Some(value) = self.cache_control_for(path, content_type) {
            headers.insert(header::CACHE_CONTROL, value.clone());
        }
        for extra in &self.extra {
            headers.insert(extra.name.clone(), extra.value.clone());
        }
    }

    /// Whether [`Headers::apply`] changes nothing but the charset.
    pub fn none_configured(&self) -> bool {
        self.cache_control.is_empty() && self.extra.is_empty()
    }

    fn cache_control_for(
        &self,
        path: &str,
        content_type: Option<&HeaderValue>,
    ) -> Option<&HeaderValue> {
        self.cache_control
            .iter()
            .find(|rule| rule.matches(path, content_type))
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
        for extra in &self.extra {
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
        assert!(assets.matches("/assets/app.js", None));
        assert!(assets.matches("/assets/a/b/c.css", None));
        assert!(!assets.matches("/other/assets/app.js", None));
        assert_eq!(assets.value, "max-age=31536000, immutable");
        let star = rule("/*.html=no-cache");
        assert!(star.matches("/index.html", None));
        assert!(
            !star.matches("/sub/index.html", None),
            "* stays within a segment"
        );
        assert!(rule("text/html=no-cache").matches("/", Some(&html)));
        assert!(rule("image/*=max-age=60").matches("/a.png", Some(&png)));
        assert!(!rule("image/*=max-age=60").matches("/", Some(&html)));
        assert!(!rule("text/html=no-cache").matches("/", None));
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
            ("X-A: a\u{1}b", "control character"),
        ] {
            let e = bad.parse::<ExtraHeader>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let ok: ExtraHeader = "X-Content-Type-Options:  nosniff ".parse().unwrap();
        assert_eq!(ok.to_string(), "x-content-type-options: nosniff");
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
