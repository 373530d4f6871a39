//! Content codings (RFC 9110 sections 8.4 and 12.5.3): which coding a request gets, and
//! compression on the fly.
//!
//! A file is sent compressed in one of two ways, for a client whose `Accept-Encoding` allows it:
//!
//! - **pre-compressed**: a sidecar beside a file of a compressible type (`app.js.br`, `.zst`,
//!   `.gz`), which tower-http's `ServeDir` chooses (and the memory cache and the zero-copy path
//!   choose the same way: [`Compression::sidecars`]). The sidecar is a file of its own: its
//!   `ETag`, `Content-Length` and ranges are its own. Types not worth compressing are not
//!   looked for (a browser's `Accept-Encoding` would otherwise cost every image three lookups).
//! - **on the fly**: a response of a compressible type ([`compressible`]), whole (200, not a
//!   range), of at least [`Compression::min_size`] bytes, that no sidecar answered, is
//!   compressed as it is sent ([`compress`], with async-compression, the crate tower-http's
//!   `CompressionLayer` uses; a small file's compressed form is kept with its cached content,
//!   [`compress_bytes`]). Its `ETag` is the identity's with the coding appended, weak
//!   (`W/"…-br"`): another compression of the same content may differ in its bytes, as nginx
//!   says by weakening its tags; a cache that keeps both holds two tags, and a conditional
//!   request with the coded tag is answered 304 ([`IfNoneMatch`]).
//!
//! Both add `Vary: Accept-Encoding`. The preference among codings the client rates equally is
//! `ServeDir`'s: zstd, then br, then gzip.

use std::io;
use std::str::FromStr;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use futures_util::TryStreamExt;

/// A content coding baton compresses with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Coding {
    // Declared in ServeDir's order of preference, least preferred first.
    Gzip,
    Br,
    Zstd,
}

impl Coding {
    /// Every coding, most preferred first.
    pub const ALL: [Coding; 3] = [Coding::Zstd, Coding::Br, Coding::Gzip];

    /// The token of `Accept-Encoding` and `Content-Encoding`.
    pub fn token(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Br => "br",
            Coding::Zstd => "zstd",
        }
    }

    /// The extension of a pre-compressed sidecar, as `ServeDir` looks for it.
    pub fn extension(self) -> &'static str {
        match self {
            Coding::Gzip => ".gz",
            Coding::Br => ".br",
            Coding::Zstd => ".zst",
        }
    }

    fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(self.token())
    }
}

impl FromStr for Coding {
    type Err = String;

    fn from_str(s: &str) -> Result<Coding, String> {
        Coding::ALL
            .into_iter()
            .find(|c| c.token() == s)
            .ok_or_else(|| {
                format!("'{s}' is not a content coding baton knows; use zstd, br or gzip")
            })
    }
}

/// How responses are compressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compression {
    /// Compress responses of compressible types as they are sent.
    pub on_the_fly: bool,
    /// Serve `FILE.br`, `FILE.zst`, `FILE.gz` beside `FILE` to the clients that accept them.
    pub precompressed: bool,
    /// The codings used, both ways.
    pub codings: Vec<Coding>,
    /// Smaller responses are sent as they are: below a packet, compression saves no time.
    pub min_size: u64,
}

impl Default for Compression {
    fn default() -> Compression {
        Compression {
            on_the_fly: true,
            precompressed: true,
            codings: Coding::ALL.to_vec(),
            min_size: 1024,
        }
    }
}

impl Compression {
    /// The coding a response compressed on the fly gets for these request headers, if any.
    pub fn on_the_fly_coding(&self, headers: &HeaderMap) -> Option<Coding> {
        if !self.on_the_fly {
            return None;
        }
        accepted(headers, &self.codings).next()
    }

    /// The sidecars to look for a file of `content_type`, in the order `ServeDir` tries them.
    pub fn sidecars<'a>(
        &'a self,
        headers: &'a HeaderMap,
        content_type: &HeaderValue,
    ) -> impl Iterator<Item = Coding> + 'a {
        (self.precompressed && headers.contains_key(header::ACCEPT_ENCODING))
            .then(|| compressible(content_type))
            .filter(|&worth_it| worth_it)
            .map(|_| accepted(headers, &self.codings))
            .into_iter()
            .flatten()
    }
}

/// The codings among `enabled` that the request accepts, best first: by the client's q-value,
/// then zstd, br, gzip (`ServeDir`'s order); none the client rates below `identity`, which
/// `ServeDir` would send instead. `x-gzip` is gzip; `*` and unknown tokens are ignored, as
/// `ServeDir` ignores them.
fn accepted<'a>(
    headers: &'a HeaderMap,
    enabled: &'a [Coding],
) -> impl Iterator<Item = Coding> + 'a {
    let mut rated: Vec<(u16, Coding)> = Vec::new();
    let mut identity = 0;
    for value in headers.get_all(header::ACCEPT_ENCODING) {
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',') {
            let mut parts = item.splitn(2, ';');
            let token = parts.next().unwrap_or_default().trim();
            let coding = match token.to_ascii_lowercase().as_str() {
                "gzip" | "x-gzip" => Coding::Gzip,
                "br" => Coding::Br,
                "zstd" => Coding::Zstd,
                "identity" => {
                    identity = parts
                        .next()
                        .map_or(Some(1000), |q| qvalue(q.trim()))
                        .unwrap_or(identity);
                    continue;
                }
                _ => continue,
            };
            let q = match parts.next() {
                Some(q) => match qvalue(q.trim()) {
                    Some(q) => q,
                    None => continue,
                },
                None => 1000,
            };
            if q > 0 && enabled.contains(&coding) {
                rated.push((q, coding));
            }
        }
    }
    rated.retain(|&(q, _)| q >= identity);
    rated.sort_by(|a, b| b.cmp(a));
    rated.dedup_by_key(|(_, coding)| *coding);
    rated.into_iter().map(|(_, coding)| coding)
}

/// A q-value (`q=0.5`) in thousandths; `None` if it is not one.
fn qvalue(s: &str) -> Option<u16> {
    let value = s.strip_prefix("q=").or_else(|| s.strip_prefix("Q="))?;
    let (int, frac) = value.split_once('.').unwrap_or((value, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let thousandths = frac
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(3)
        .fold(0u16, |n, b| n * 10 + u16::from(b - b'0'));
    match int {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

/// Whether a response of this `Content-Type` is worth compressing: text, and the textual
/// types of the web (scripts, JSON, XML, SVG, web manifests, uncompressed fonts). Images,
/// video, archives and anything unknown (`application/octet-stream`) are sent as they are.
pub fn compressible(content_type: &HeaderValue) -> bool {
    let Ok(value) = content_type.to_str() else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    let is = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
    let ends = |suffix: &str| {
        subtype.len() >= suffix.len()
            && subtype.as_bytes()[subtype.len() - suffix.len()..]
                .eq_ignore_ascii_case(suffix.as_bytes())
    };
    if is(kind, "text") {
        !is(subtype, "event-stream")
    } else if is(kind, "application") {
        [
            "javascript",
            "x-javascript",
            "ecmascript",
            "json",
            "xml",
            "wasm",
            "rtf",
            "x-sh",
            "vnd.ms-fontobject",
        ]
        .iter()
        .any(|t| is(subtype, t))
            || ends("+json")
            || ends("+xml")
    } else if is(kind, "image") {
        ["svg+xml", "x-icon", "vnd.microsoft.icon", "bmp"]
            .iter()
            .any(|t| is(subtype, t))
    } else if is(kind, "font") {
        is(subtype, "ttf") || is(subtype, "otf")
    } else {
        false
    }
}

/// The `ETag` of a response compressed on the fly with `coding`: the identity's, the coding
/// appended inside the quotes, weak.
pub fn coded_etag(etag: &HeaderValue, coding: Coding) -> Option<HeaderValue> {
    let tag = etag.as_bytes();
    let tag = tag.strip_prefix(b"W/").unwrap_or(tag);
    if tag.len() < 2 || tag[0] != b'"' || tag.last() != Some(&b'"') {
        return None;
    }
    let mut coded = Vec::with_capacity(tag.len() + 8);
    coded.extend_from_slice(b"W/");
    coded.extend_from_slice(&tag[..tag.len() - 1]);
    coded.push(b'-');
    coded.extend_from_slice(coding.token().as_bytes());
    coded.push(b'"');
    HeaderValue::from_bytes(&coded).ok()
}

/// An `If-None-Match` rewritten for the identity: the tags a response compressed on the fly
/// with `coding` was given ([`coded_etag`]) become the identity's (weak, which `If-None-Match`
/// compares weakly), so that `ServeDir`, which knows only the identity's tag, answers 304 when
/// the coded response is still current.
pub struct IfNoneMatch {
    /// Whether a coded tag was among them (the 304 then carries the coded tag).
    pub had_coded_tag: bool,
}

impl IfNoneMatch {
    /// Rewrites the request's `If-None-Match` in place for a response that would be compressed
    /// with `coding`.
    pub fn strip(headers: &mut HeaderMap, coding: Coding) -> IfNoneMatch {
        let suffix = format!("-{}\"", coding.token());
        let mut had_coded_tag = false;
        let rewritten: Vec<HeaderValue> = headers
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .map(|value| {
                let Ok(text) = value.to_str() else {
                    return value.clone();
                };
                if !text.contains(suffix.as_str()) {
                    return value.clone();
                }
                let tags: Vec<String> = text
                    .split(',')
                    .map(|tag| {
                        let tag = tag.trim();
                        match tag.strip_suffix(suffix.as_str()) {
                            Some(identity) => {
                                had_coded_tag = true;
                                format!("{identity}\"")
                            }
                            None => tag.to_owned(),
                        }
                    })
                    .collect();
                HeaderValue::from_str(&tags.join(", ")).unwrap_or_else(|_| value.clone())
            })
            .collect();
        if had_coded_tag {
            headers.remove(header::IF_NONE_MATCH);
            for value in rewritten {
                headers.append(header::IF_NONE_MATCH, value);
            }
        }
        IfNoneMatch { had_coded_tag }
    }
}

/// Adds `accept-encoding` to the response's `Vary` unless it is there.
pub fn vary_on_accept_encoding(headers: &mut HeaderMap) {
    let listed = headers.get_all(header::VARY).iter().any(|value| {
        value.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("accept-encoding") || t.trim() == "*")
        })
    });
    if !listed {
        headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
}

/// What the on-the-fly step does with one response, decided from the request.
#[derive(Debug, Clone, Copy)]
pub struct OnTheFly {
    /// The coding the client would get; `None`: it accepts none of ours, or compression on
    /// the fly is off.
    pub coding: Option<Coding>,
    /// The request's `If-None-Match` held this coding's tag.
    pub had_coded_tag: bool,
    /// The smallest response compressed.
    pub min_size: u64,
    /// Compression on the fly is on at all (so compressible answers vary by `Accept-Encoding`
    /// even for a client that accepts nothing).
    pub enabled: bool,
}

impl OnTheFly {
    /// Decides for a request, rewriting its `If-None-Match` ([`IfNoneMatch`]).
    pub fn for_request(settings: &Compression, headers: &mut HeaderMap) -> OnTheFly {
        let coding = settings.on_the_fly_coding(headers);
        let had_coded_tag = coding.is_some_and(|coding| {
            headers.contains_key(header::IF_NONE_MATCH)
                && IfNoneMatch::strip(headers, coding).had_coded_tag
        });
        OnTheFly {
            coding,
            had_coded_tag,
            min_size: settings.min_size,
            enabled: settings.on_the_fly,
        }
    }

    /// Compresses the response if it is one to compress; fixes the `ETag` of a 304 that
    /// answered a coded tag.
    pub fn apply(self, response: Response<Body>) -> Response<Body> {
        if !self.enabled {
            return response;
        }
        let status = response.status();
        if status == StatusCode::NOT_MODIFIED {
            return match self.coding {
                Some(coding) if self.had_coded_tag => not_modified_coded(response, coding),
                _ => response,
            };
        }
        let headers = response.headers();
        let candidate = status == StatusCode::OK
            && !headers.contains_key(header::CONTENT_ENCODING)
            && !headers.contains_key(header::CONTENT_RANGE)
            && headers.get(header::CONTENT_TYPE).is_some_and(compressible)
            && !headers
                .get(header::CACHE_CONTROL)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.to_ascii_lowercase().contains("no-transform"));
        if !candidate {
            return response;
        }
        let length = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if length.is_some_and(|length| length < self.min_size) {
            // Small answers of a compressible type still differ by coding above the minimum,
            // but this one never does; caches need no Vary for it.
            return response;
        }
        let mut response = response;
        vary_on_accept_encoding(response.headers_mut());
        match self.coding {
            Some(coding) => compress(response, coding),
            None => response,
        }
    }
}

/// A 304 for a request whose `If-None-Match` held the coded tag: it names the coded tag.
fn not_modified_coded(mut response: Response<Body>, coding: Coding) -> Response<Body> {
    let headers = response.headers_mut();
    if let Some(coded) = headers
        .get(header::ETAG)
        .and_then(|etag| coded_etag(etag, coding))
    {
        headers.insert(header::ETAG, coded);
    }
    vary_on_accept_encoding(headers);
    response
}

/// The response with its body compressed with `coding` as it is sent: `Content-Encoding` set,
/// the length (unknown now) and `Accept-Ranges` (ranges are of the identity) removed, the
/// `ETag` coded.
pub fn compress(response: Response<Body>, coding: Coding) -> Response<Body> {
    use tokio_util::io::{ReaderStream, StreamReader};

    let (mut parts, body) = response.into_parts();
    mark_coded(&mut parts.headers, coding);
    parts.headers.remove(header::CONTENT_LENGTH);
    let input = StreamReader::new(TryStreamExt::map_err(
        body.into_data_stream(),
        io::Error::other,
    ));
    // Frames of up to 32 KiB: the default 4 KiB makes eight times as many writes.
    let body = Body::from_stream(ReaderStream::with_capacity(
        encoder(input, coding),
        32 << 10,
    ));
    Response::from_parts(parts, body)
}

/// The headers of an answer compressed on the fly with `coding`, but for its length.
pub fn mark_coded(headers: &mut HeaderMap, coding: Coding) {
    headers.remove(header::ACCEPT_RANGES);
    headers.insert(header::CONTENT_ENCODING, coding.header_value());
    vary_on_accept_encoding(headers);
    if let Some(coded) = headers
        .get(header::ETAG)
        .and_then(|etag| coded_etag(etag, coding))
    {
        headers.insert(header::ETAG, coded);
    }
}

/// `content` compressed with `coding`, whole, as [`compress`] would send it.
pub async fn compress_bytes(content: &[u8], coding: Coding) -> io::Result<bytes::Bytes> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::with_capacity(content.len() / 3 + 64);
    std::pin::pin!(encoder(content, coding))
        .read_to_end(&mut out)
        .await?;
    Ok(out.into())
}

/// The encoder of `coding` over `input`. Levels for a server compressing as it sends: brotli's
/// default (11) costs about a hundred times level 4 for a few per cent; zstd and gzip keep
/// theirs (3 and 6).
fn encoder<R>(input: R, coding: Coding) -> impl tokio::io::AsyncRead + Send
where
    R: tokio::io::AsyncBufRead + Send,
{
    use async_compression::tokio::bufread::{BrotliEncoder, GzipEncoder, ZstdEncoder};
    use async_compression::Level;
    use tokio_util::either::Either;
    match coding {
        Coding::Br => Either::Left(BrotliEncoder::with_quality(input, Level::Precise(4))),
        Coding::Zstd => Either::Right(Either::Left(ZstdEncoder::new(input))),
        Coding::Gzip => Either::Right(Either::Right(GzipEncoder::new(input))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_str(value).unwrap(),
        );
        headers
    }

    fn best(value: &str, enabled: &[Coding]) -> Vec<Coding> {
        accepted(&accept(value), enabled).collect()
    }

    #[test]
    fn codings_are_ranked_by_q_then_as_serve_dir_ranks_them() {
        let all = &Coding::ALL;
        use Coding::*;
        assert_eq!(best("gzip, deflate, br, zstd", all), [Zstd, Br, Gzip]);
        assert_eq!(best("gzip;q=1.0, br;q=0.9", all), [Gzip, Br]);
        assert_eq!(best("br;q=0.5, gzip;q=0.8, zstd;q=0", all), [Gzip, Br]);
        assert_eq!(best("x-gzip", all), [Gzip]);
        assert_eq!(best("BR", all), [Br]);
        assert_eq!(best("identity, *", all), []);
        // Rated below identity: ServeDir sends the file as it is.
        assert_eq!(best("gzip;q=0.5, identity", all), []);
        assert_eq!(best("gzip;q=0.5, br, identity;q=0.5", all), [Br, Gzip]);
        assert_eq!(best("gzip, identity;q=0", all), [Gzip]);
        assert_eq!(best("br;q=2, gzip;q=0.1234, zstd;level=3", all), []);
        assert_eq!(best("gzip, br", &[Gzip]), [Gzip]);
        assert_eq!(best("", all), []);
    }

    #[test]
    fn q_values_parse_as_rfc_9110_writes_them() {
        assert_eq!(qvalue("q=1"), Some(1000));
        assert_eq!(qvalue("q=1.000"), Some(1000));
        assert_eq!(qvalue("q=0.5"), Some(500));
        assert_eq!(qvalue("Q=0.05"), Some(50));
        assert_eq!(qvalue("q=0"), Some(0));
        assert_eq!(qvalue("q=1.5"), None);
        assert_eq!(qvalue("q=0.0001"), None);
        assert_eq!(qvalue("level=1"), None);
    }

    #[test]
    fn text_is_compressible_and_binary_is_not() {
        for yes in [
            "text/html",
            "text/css; charset=utf-8",
            "application/javascript",
            "application/json",
            "application/manifest+json",
            "image/svg+xml",
            "font/ttf",
        ] {
            assert!(compressible(&HeaderValue::from_static(yes)), "{yes}");
        }
        for no in [
            "application/octet-stream",
            "image/png",
            "font/woff2",
            "application/zip",
            "text/event-stream",
            "video/mp4",
            "nonsense",
        ] {
            assert!(!compressible(&HeaderValue::from_static(no)), "{no}");
        }
    }

    #[test]
    fn a_coded_etag_round_trips_through_if_none_match() {
        let etag = HeaderValue::from_static("\"5f.0000001a-3e8\"");
        let coded = coded_etag(&etag, Coding::Br).unwrap();
        assert_eq!(coded, "W/\"5f.0000001a-3e8-br\"");
        let weak = coded_etag(&HeaderValue::from_static("W/\"x\""), Coding::Gzip).unwrap();
        assert_eq!(weak, "W/\"x-gzip\"");
        assert_eq!(coded_etag(&HeaderValue::from_static("x"), Coding::Br), None);

        let mut headers = HeaderMap::new();
        headers.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_str(&format!("\"other\", {}", coded.to_str().unwrap())).unwrap(),
        );
        // Another coding's tag is left alone: it does not name what this request would get.
        assert!(!IfNoneMatch::strip(&mut headers.clone(), Coding::Gzip).had_coded_tag);
        assert!(IfNoneMatch::strip(&mut headers, Coding::Br).had_coded_tag);
        assert_eq!(
            headers[header::IF_NONE_MATCH],
            "\"other\", W/\"5f.0000001a-3e8\""
        );
    }

    #[test]
    fn vary_is_added_once() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::VARY,
            HeaderValue::from_static("Origin, Accept-Encoding"),
        );
        vary_on_accept_encoding(&mut headers);
        assert_eq!(headers.get_all(header::VARY).iter().count(), 1);
        let mut headers = HeaderMap::new();
        vary_on_accept_encoding(&mut headers);
        assert_eq!(headers[header::VARY], "accept-encoding");
    }
}
