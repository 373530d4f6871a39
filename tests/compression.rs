//! Compression and configured headers on a real server and a real root: pre-compressed
//! sidecars chosen by `Accept-Encoding`, bodies compressed on the fly that decompress to the
//! original (with our decoder and with curl's), ranges and 304s per coding, `Cache-Control`
//! rules, extra headers and the charset, on each way a file is served (the memory cache,
//! `ServeDir`, the zero-copy path), and one line per bad value from `baton check`.

mod common;

use std::net::SocketAddr;

use common::http::{Conn, Response};
use common::{run, run_baton, tcp_listener, Baton, Spawn, TempDir};

/// Text that compresses, `len` bytes.
fn text(len: usize, seed: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut n = seed;
    while out.len() < len {
        n = n.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let line = format!(
            "<p class=\"row-{}\">item {} of the list</p>\n",
            n % 17,
            n % 1000
        );
        out.extend_from_slice(line.as_bytes());
    }
    out.truncate(len);
    out
}

/// Bytes that do not compress, `len` of them.
fn noise(len: usize) -> Vec<u8> {
    let mut n: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            n ^= n << 13;
            n ^= n >> 7;
            n ^= n << 17;
            n as u8
        })
        .collect()
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(future)
}

fn encode(coding: &str, body: &[u8]) -> Vec<u8> {
    use async_compression::tokio::bufread::{BrotliEncoder, GzipEncoder, ZstdEncoder};
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    block_on(async {
        match coding {
            "br" => BrotliEncoder::new(body).read_to_end(&mut out).await,
            "gzip" => GzipEncoder::new(body).read_to_end(&mut out).await,
            "zstd" => ZstdEncoder::new(body).read_to_end(&mut out).await,
            _ => unreachable!(),
        }
    })
    .unwrap();
    out
}

fn decode(coding: &str, body: &[u8]) -> Vec<u8> {
    use async_compression::tokio::bufread::{BrotliDecoder, GzipDecoder, ZstdDecoder};
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    block_on(async {
        match coding {
            "br" => BrotliDecoder::new(body).read_to_end(&mut out).await,
            "gzip" => GzipDecoder::new(body).read_to_end(&mut out).await,
            "zstd" => ZstdDecoder::new(body).read_to_end(&mut out).await,
            _ => unreachable!(),
        }
    })
    .unwrap_or_else(|e| panic!("not {coding}: {e}"));
    out
}

/// baton serving `root` on a loopback listener, ready.
fn start(root: &TempDir, args: &[&str]) -> (Baton, SocketAddr) {
    let (listener, addr) = tcp_listener();
    let mut all = vec!["--root", root.path().to_str().unwrap()];
    all.extend_from_slice(args);
    let mut baton = Spawn::serve(&all).fd(listener, None).start();
    baton.wait_ready();
    (baton, addr)
}

fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    Conn::tcp(addr)
        .unwrap()
        .request(method, path, headers)
        .unwrap()
}

fn get(addr: SocketAddr, path: &str, accept: &str) -> Response {
    request(addr, "GET", path, &[("Accept-Encoding", accept)])
}

fn header<'a>(response: &'a Response, name: &str) -> &'a str {
    response
        .header(name)
        .unwrap_or_else(|| panic!("no {name} in {:?}", response.headers))
}

/// A root with a small and a large text file, each with `.br` and `.gz` sidecars (no `.zst`),
/// a text file without sidecars, a binary file, and a tiny text file.
fn web_root(tag: &str) -> TempDir {
    let root = TempDir::new(tag);
    for (name, len) in [("app.js", 40_000), ("big.html", 600_000)] {
        let body = text(len, len as u32);
        std::fs::write(root.join(name), &body).unwrap();
        for coding in ["br", "gzip"] {
            let ext = if coding == "br" { "br" } else { "gz" };
            std::fs::write(root.join(&format!("{name}.{ext}")), encode(coding, &body)).unwrap();
        }
    }
    std::fs::write(root.join("plain.css"), text(30_000, 7)).unwrap();
    std::fs::write(root.join("large.css"), text(700_000, 8)).unwrap();
    std::fs::write(root.join("data.bin"), noise(30_000)).unwrap();
    std::fs::write(root.join("tiny.txt"), "short\n").unwrap();
    root
}

#[test]
fn sidecars_are_chosen_by_accept_encoding() {
    let root = web_root("compression-sidecars");
    let (_baton, addr) = start(&root, &[]);
    for name in ["app.js", "big.html"] {
        let path = format!("/{name}");
        let original = std::fs::read(root.join(name)).unwrap();
        let identity = get(addr, &path, "identity");
        assert_eq!(identity.status, 200);
        assert!(identity.body == original, "{name}: identity");
        assert_eq!(identity.header("content-encoding"), None, "{name}");
        assert_eq!(header(&identity, "vary"), "accept-encoding", "{name}");

        for (accept, coding, file) in [
            ("br", "br", format!("{name}.br")),
            ("gzip", "gzip", format!("{name}.gz")),
            ("x-gzip", "gzip", format!("{name}.gz")),
            // Equal ratings: br before gzip, as ServeDir ranks them.
            ("gzip, deflate, br", "br", format!("{name}.br")),
            ("br;q=0.5, gzip", "gzip", format!("{name}.gz")),
            ("br;q=0, gzip;q=0.1", "gzip", format!("{name}.gz")),
        ] {
            let response = get(addr, &path, accept);
            let what = format!("{name} with Accept-Encoding: {accept}");
            assert_eq!(response.status, 200, "{what}");
            assert_eq!(header(&response, "content-encoding"), coding, "{what}");
            assert_eq!(header(&response, "vary"), "accept-encoding", "{what}");
            let sidecar = std::fs::read(root.join(&file)).unwrap();
            assert!(response.body == sidecar, "{what}: not the bytes of {file}");
            assert_eq!(
                header(&response, "content-length"),
                sidecar.len().to_string(),
                "{what}"
            );
            // The sidecar has the type of the file it compresses, and a tag of its own.
            assert_eq!(
                header(&response, "content-type"),
                header(&identity, "content-type"),
                "{what}"
            );
            assert_ne!(
                header(&response, "etag"),
                header(&identity, "etag"),
                "{what}"
            );
            assert!(decode(coding, &response.body) == original, "{what}");
        }
        // No .zst sidecar: zstd is compressed on the fly.
        let zstd = get(addr, &path, "zstd");
        assert_eq!(header(&zstd, "content-encoding"), "zstd", "{name}");
        assert!(decode("zstd", &zstd.body) == original, "{name}: zstd");
        let identity_tag = header(&identity, "etag");
        assert_eq!(
            header(&zstd, "etag"),
            format!("W/{}-zstd\"", identity_tag.trim_end_matches('"')),
            "{name}: the identity's tag, coded"
        );
    }

    // Types not worth compressing are not looked for: a sidecar beside one is not served,
    // whether the file comes from the cache, ServeDir (a range) or the zero-copy path.
    std::fs::write(root.join("data.bin.gz"), b"a sidecar of binary content").unwrap();
    std::fs::write(root.join("large.bin"), noise(400_000)).unwrap();
    std::fs::write(root.join("large.bin.gz"), b"a sidecar of binary content").unwrap();
    for (path, range) in [
        ("/data.bin", None),
        ("/data.bin", Some("bytes=0-9")),
        ("/large.bin", None),
    ] {
        let mut headers = vec![("Accept-Encoding", "gzip")];
        headers.extend(range.map(|r| ("Range", r)));
        let response = request(addr, "GET", path, &headers);
        assert_eq!(
            response.header("content-encoding"),
            None,
            "{path} {range:?}"
        );
        let file = std::fs::read(root.join(&path[1..])).unwrap();
        let want = if range.is_some() {
            &file[..10]
        } else {
            &file[..]
        };
        assert!(response.body == want, "{path} {range:?}");
    }

    // Sidecars switched off: every coding is made on the fly.
    let (_plain, addr) = start(&root, &["--precompressed", "false"]);
    let response = get(addr, "/app.js", "br");
    assert_eq!(header(&response, "content-encoding"), "br");
    let sidecar = std::fs::read(root.join("app.js.br")).unwrap();
    assert!(
        response.body != sidecar,
        "the sidecar was served though switched off"
    );
    assert!(decode("br", &response.body) == std::fs::read(root.join("app.js")).unwrap());
}

#[test]
fn bodies_compressed_on_the_fly_decompress_to_the_original() {
    let root = web_root("compression-on-the-fly");
    let (_baton, addr) = start(&root, &[]);
    // plain.css is served from the memory cache, large.css by ServeDir (too large for the
    // cache, and the zero-copy path leaves what is to be compressed to hyper).
    for name in ["plain.css", "large.css"] {
        let path = format!("/{name}");
        let original = std::fs::read(root.join(name)).unwrap();
        let identity = get(addr, &path, "identity");
        let tag = header(&identity, "etag").to_owned();
        for coding in ["br", "zstd", "gzip"] {
            let response = get(addr, &path, coding);
            let what = format!("{name} as {coding}");
            assert_eq!(response.status, 200, "{what}");
            assert_eq!(header(&response, "content-encoding"), coding, "{what}");
            assert_eq!(header(&response, "vary"), "accept-encoding", "{what}");
            // Streamed without a length, or from the cache with the compressed length.
            let length = response.header("content-length");
            assert!(
                length.is_none_or(|l| l == response.body.len().to_string()),
                "{what}: {length:?}"
            );
            assert_eq!(response.header("accept-ranges"), None, "{what}");
            assert_eq!(
                header(&response, "etag"),
                format!("W/{}-{coding}\"", tag.trim_end_matches('"')),
                "{what}"
            );
            assert!(
                response.body.len() < original.len() / 2,
                "{what}: not smaller"
            );
            assert!(decode(coding, &response.body) == original, "{what}");
        }
        // HEAD: the same headers, no body.
        let head = request(addr, "HEAD", &path, &[("Accept-Encoding", "gzip")]);
        assert_eq!(header(&head, "content-encoding"), "gzip", "HEAD {name}");
    }
    // What is not worth it goes out as it is: binary types, and text below min_size.
    for path in ["/data.bin", "/tiny.txt"] {
        let response = get(addr, path, "br, gzip, zstd");
        assert_eq!(response.status, 200, "{path}");
        assert_eq!(response.header("content-encoding"), None, "{path}");
        assert!(
            response.body == std::fs::read(root.join(&path[1..])).unwrap(),
            "{path}"
        );
    }

    // A real client: curl asks for what it can decode and decodes it.
    for accept in ["br", "zstd", "gzip"] {
        let mut curl = std::process::Command::new("curl");
        curl.args(["-sS", "--compressed", "-H"])
            .arg(format!("Accept-Encoding: {accept}"))
            .arg(format!("http://{addr}/large.css"));
        let output = curl.output().expect("curl (apt-get install curl)");
        assert!(output.status.success(), "curl {accept}");
        assert!(
            output.stdout == std::fs::read(root.join("large.css")).unwrap(),
            "curl {accept}: not the file"
        );
    }

    // Switched off: identity for everyone.
    let (_off, addr) = start(&root, &["--compress", "false", "--precompressed", "false"]);
    let response = get(addr, "/plain.css", "br, gzip");
    assert_eq!(response.header("content-encoding"), None);
    assert_eq!(response.header("vary"), None);
}

/// A small text file is compressed once and the compressed form kept with its cached content:
/// the same bytes again, with their length; a new version of the file is compressed anew.
#[test]
fn a_cached_file_keeps_its_compressed_form_until_it_changes() {
    let root = web_root("compression-cached");
    let (_baton, addr) = start(&root, &[]);
    let first = get(addr, "/plain.css", "br");
    let again = get(addr, "/plain.css", "br");
    assert_eq!(
        header(&again, "content-length"),
        again.body.len().to_string()
    );
    assert!(first.body == again.body, "the kept form differs");
    assert_eq!(header(&first, "etag"), header(&again, "etag"));
    // Rewritten in place (the same inode): its new content, compressed.
    let new = text(31_000, 99);
    std::fs::write(root.join("plain.css"), &new).unwrap();
    let changed = get(addr, "/plain.css", "br");
    assert!(
        decode("br", &changed.body) == new,
        "the old content's compressed form"
    );
    assert_ne!(header(&changed, "etag"), header(&first, "etag"));
    // Each coding has its own form.
    for coding in ["gzip", "zstd"] {
        let response = get(addr, "/plain.css", coding);
        assert!(decode(coding, &response.body) == new, "{coding}");
    }
}

/// `Vary: Accept-Encoding` wherever the answer could differ by it: on 304s of compressible
/// files, and with sidecars off on what would be compressed for another client, the same on
/// the zero-copy path as on hyper's (the large file without Accept-Encoding goes the zero-copy
/// way); and a `no-transform` rule keeps a file as it is, cached or not.
#[test]
fn vary_and_no_transform() {
    let root = web_root("compression-vary");
    std::fs::create_dir_all(root.join("nt")).unwrap();
    std::fs::write(root.join("nt/data.json"), text(20_000, 3)).unwrap();
    let (_baton, addr) = start(
        &root,
        &[
            "--precompressed",
            "false",
            "--cache-control",
            "/nt/**=no-transform",
        ],
    );
    for path in ["/plain.css", "/large.css"] {
        let response = get(addr, path, "identity");
        assert_eq!(header(&response, "vary"), "accept-encoding", "{path}");
        let tag = header(&response, "etag").to_owned();
        let not_modified = request(addr, "GET", path, &[("If-None-Match", &tag)]);
        assert_eq!(not_modified.status, 304, "{path}");
        assert_eq!(
            header(&not_modified, "vary"),
            "accept-encoding",
            "304 of {path}"
        );
    }
    // Not compressible, no sidecars: nothing varies.
    assert_eq!(get(addr, "/data.bin", "identity").header("vary"), None);
    for _ in 0..2 {
        let kept = get(addr, "/nt/data.json", "br, gzip");
        assert_eq!(kept.header("content-encoding"), None);
        assert_eq!(header(&kept, "cache-control"), "no-transform");
    }
}

#[test]
fn ranges_stay_ranges_of_what_is_sent() {
    let root = web_root("compression-ranges");
    let (_baton, addr) = start(&root, &[]);
    // A range of a pre-compressed resource is a range of the sidecar's bytes.
    for name in ["app.js", "big.html"] {
        let gz = std::fs::read(root.join(&format!("{name}.gz"))).unwrap();
        let response = request(
            addr,
            "GET",
            &format!("/{name}"),
            &[("Accept-Encoding", "gzip"), ("Range", "bytes=10-29")],
        );
        assert_eq!(response.status, 206, "{name}");
        assert_eq!(header(&response, "content-encoding"), "gzip", "{name}");
        assert_eq!(
            header(&response, "content-range"),
            format!("bytes 10-29/{}", gz.len()),
            "{name}"
        );
        assert!(response.body == gz[10..30], "{name}");
    }
    // Without a sidecar a range is of the identity, sent as it is.
    let css = std::fs::read(root.join("plain.css")).unwrap();
    let response = request(
        addr,
        "GET",
        "/plain.css",
        &[("Accept-Encoding", "br"), ("Range", "bytes=0-99")],
    );
    assert_eq!(response.status, 206);
    assert_eq!(response.header("content-encoding"), None);
    assert!(response.body == css[..100]);
}

#[test]
fn not_modified_answers_each_coding_with_its_own_tag() {
    let root = web_root("compression-304");
    let (_baton, addr) = start(&root, &[]);
    for name in ["plain.css", "large.css"] {
        let path = format!("/{name}");
        let br = get(addr, &path, "br");
        let br_tag = header(&br, "etag").to_owned();
        assert!(
            br_tag.starts_with("W/\"") && br_tag.ends_with("-br\""),
            "{br_tag}"
        );
        // The coded tag is current for a client that gets br.
        let again = request(
            addr,
            "GET",
            &path,
            &[("Accept-Encoding", "br"), ("If-None-Match", &br_tag)],
        );
        assert_eq!(again.status, 304, "{name}");
        assert_eq!(header(&again, "etag"), br_tag, "{name}");
        assert_eq!(header(&again, "vary"), "accept-encoding", "{name}");
        // Not for one that would get gzip: it gets the gzip answer and its tag.
        let other = request(
            addr,
            "GET",
            &path,
            &[("Accept-Encoding", "gzip"), ("If-None-Match", &br_tag)],
        );
        assert_eq!(other.status, 200, "{name}");
        assert_eq!(header(&other, "content-encoding"), "gzip", "{name}");
        assert!(header(&other, "etag").ends_with("-gzip\""), "{name}");
        // The identity's tag, for a client without codings.
        let identity = get(addr, &path, "identity");
        let tag = header(&identity, "etag").to_owned();
        let same = request(addr, "GET", &path, &[("If-None-Match", &tag)]);
        assert_eq!((same.status, header(&same, "etag")), (304, tag.as_str()));
    }
    // A sidecar's own tag.
    let sidecar = get(addr, "/app.js", "br");
    let tag = header(&sidecar, "etag").to_owned();
    let again = request(
        addr,
        "GET",
        "/app.js",
        &[("Accept-Encoding", "br"), ("If-None-Match", &tag)],
    );
    assert_eq!((again.status, header(&again, "etag")), (304, tag.as_str()));
}

#[test]
fn configured_headers_are_on_every_answer_from_the_root() {
    let root = web_root("compression-headers");
    std::fs::create_dir_all(root.join("assets")).unwrap();
    std::fs::write(root.join("assets/site.css"), "body{}").unwrap();
    std::fs::write(root.join("index.html"), "<p>home</p>").unwrap();
    let (_baton, addr) = start(
        &root,
        &[
            "--cache-control",
            "/assets/**=public, max-age=31536000, immutable",
            "--cache-control",
            "text/html=no-cache",
            "--add-header",
            "X-Content-Type-Options: nosniff",
            "--add-header",
            "Access-Control-Allow-Origin: *",
        ],
    );
    let check = |response: &Response, what: &str, cache: Option<&str>| {
        assert_eq!(
            header(response, "x-content-type-options"),
            "nosniff",
            "{what}"
        );
        assert_eq!(
            header(response, "access-control-allow-origin"),
            "*",
            "{what}"
        );
        assert_eq!(response.header("cache-control"), cache, "{what}");
    };
    // The memory cache, ServeDir (a range), and the zero-copy path (a large file).
    let small = get(addr, "/assets/site.css", "identity");
    check(
        &small,
        "cached",
        Some("public, max-age=31536000, immutable"),
    );
    assert_eq!(header(&small, "content-type"), "text/css; charset=utf-8");
    let index = get(addr, "/", "identity");
    check(&index, "index", Some("no-cache"));
    assert_eq!(header(&index, "content-type"), "text/html; charset=utf-8");
    let ranged = request(addr, "GET", "/", &[("Range", "bytes=0-2")]);
    assert_eq!(ranged.status, 206);
    check(&ranged, "range", Some("no-cache"));
    let large = get(addr, "/big.html", "identity");
    assert_eq!(large.body.len(), 600_000);
    check(&large, "zero-copy", Some("no-cache"));
    assert_eq!(header(&large, "content-type"), "text/html; charset=utf-8");
    let binary = get(addr, "/data.bin", "identity");
    check(&binary, "binary", None);
    assert_eq!(header(&binary, "content-type"), "application/octet-stream");
    // A 304 says what the 200 said (the type rule matched by the path's type).
    for path in ["/", "/big.html"] {
        let tag = header(&get(addr, path, "identity"), "etag").to_owned();
        let not_modified = request(addr, "GET", path, &[("If-None-Match", &tag)]);
        assert_eq!(not_modified.status, 304, "{path}");
        check(&not_modified, &format!("304 of {path}"), Some("no-cache"));
    }
    // The operational endpoints are not from the root.
    let healthy = get(addr, "/-/healthy", "identity");
    assert_eq!(healthy.header("x-content-type-options"), None);
    // An error is no file of the path: a year-long rule must not keep it.
    let missing = get(addr, "/assets/not-yet-deployed.js", "identity");
    assert_eq!(missing.status, 404);
    check(&missing, "404", None);
    // A path pattern sees the path as ServeDir resolves it.
    let odd = get(addr, "//assets/./site.css", "identity");
    assert_eq!(odd.status, 200);
    check(
        &odd,
        "//assets/./site.css",
        Some("public, max-age=31536000, immutable"),
    );

    // The fallback stands in for a file: the type's rule, not the path's.
    let (_spa, addr) = start(
        &root,
        &[
            "--fallback",
            "index.html",
            "--cache-control",
            "/assets/**=immutable",
            "--cache-control",
            "text/html=no-cache",
        ],
    );
    let route = get(addr, "/assets/deep/route", "identity");
    assert_eq!((route.status, route.text().as_str()), (200, "<p>home</p>"));
    assert_eq!(route.header("cache-control"), Some("no-cache"));

    // No charset when told so.
    let (_bare, addr) = start(&root, &["--charset", ""]);
    assert_eq!(
        header(&get(addr, "/", "identity"), "content-type"),
        "text/html"
    );
}

#[test]
fn a_bad_value_is_one_line_from_baton_check() {
    let dir = TempDir::new("compression-check");
    for (toml, says) in [
        (
            "[compression]\ncodings = [\"lzma\"]\n",
            "compression.codings[0]: 'lzma' is not a content coding",
        ),
        (
            "[compression]\ncodings = []\n",
            "compression.codings is empty",
        ),
        (
            "[compression]\nmin_size = -1\n",
            "compression.min_size: -1 is negative",
        ),
        (
            "[headers]\ncache_control = [\"/a\"]\n",
            "headers.cache_control[0]: '/a' is not PATTERN=VALUE",
        ),
        (
            "[headers]\ncache_control = [\"html=no-cache\"]\n",
            "is neither a path pattern",
        ),
        (
            "[headers]\nadd = [\"Content-Length: 1\"]\n",
            "headers.add[0]: content-length is set by baton",
        ),
        (
            "[headers]\nadd = [\"X-Frame-Options DENY\"]\n",
            "is not NAME: VALUE",
        ),
        (
            "[headers]\ncharset = \"utf 8\"\n",
            "headers.charset 'utf 8' is not a charset name",
        ),
    ] {
        let path = dir.join("baton.toml");
        std::fs::write(&path, toml).unwrap();
        let (code, out, err) = run_baton(&["check", "--config", path.to_str().unwrap()]);
        assert_eq!(code, 1, "{toml}");
        let text = format!("{out}{err}");
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(says)).collect();
        assert_eq!(lines.len(), 1, "{toml}: {text}");
        assert!(
            !text.lines().any(|l| l.contains("panicked")),
            "{toml}: {text}"
        );
    }
    // Following the advice of the empty list's message is accepted.
    let path = dir.join("baton.toml");
    std::fs::write(
        &path,
        "[compression]\ncodings = []\non_the_fly = false\nprecompressed = false\n",
    )
    .unwrap();
    let (code, _, err) = run_baton(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    // A fallback that is a directory would answer every unknown path with a redirect.
    let root = dir.join("www");
    std::fs::create_dir_all(root.join("app")).unwrap();
    let toml = format!("[server]\nroot = {root:?}\n[files]\nfallback = \"app\"\n");
    std::fs::write(&path, toml).unwrap();
    let (code, out, err) = run_baton(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("files.fallback 'app' is a directory of the root"),
        "{err}"
    );

    // And the same on the command line.
    let mut cmd = std::process::Command::new(common::baton_bin());
    cmd.args(["serve", "--compress-codings", "gzip,lzma"]);
    let (code, _, err) = run(cmd);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("'lzma' is not a content coding"), "{err}");
}
