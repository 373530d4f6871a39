//! What the root answers beyond its files (`[files]`: error pages, the SPA fallback, directory
//! listings) and where the `/-/` endpoints answer (`[admin]`), on real processes and sockets.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::symlink;
use std::os::unix::net::UnixListener;

use common::http::{self, Conn};
use common::{run_baton, start, tcp_listener, Baton, Spawn, TempDir};

fn head(addr: SocketAddr, path: &str) -> http::Response {
    let mut conn = Conn::tcp(addr).unwrap();
    conn.request("HEAD", path, &[]).unwrap()
}

// ---------------------------------------------------------------- error pages ----

#[test]
fn error_pages_from_the_root_with_the_original_status() {
    let root = TempDir::new("pages");
    std::fs::write(root.join("404.html"), "<h1>gone</h1>").unwrap();
    std::fs::write(root.join("50x.html"), "<h1>oops</h1>").unwrap();
    std::fs::write(root.join("a.txt"), "a").unwrap();
    // A socket cannot be opened for reading (ENXIO): a real I/O error, a 500.
    let _socket = UnixListener::bind(root.join("sock")).unwrap();
    let (_baton, addr) = start(&["--root", root.path().to_str().unwrap()]);

    assert_eq!(http::get(addr, "/a.txt").unwrap().text(), "a");
    for path in ["/missing", "/deep/er/missing.html", "/a.txt/below"] {
        let r = http::get(addr, path).unwrap();
        assert_eq!(
            (r.status, r.text().as_str()),
            (404, "<h1>gone</h1>"),
            "{path}"
        );
        assert!(r.header("content-type").unwrap().starts_with("text/html"));
        assert_eq!(
            r.header("etag"),
            None,
            "the page's validators are not the error's"
        );
        assert_eq!(r.header("last-modified"), None);
    }
    let r = head(addr, "/missing");
    assert_eq!(r.status, 404);
    assert!(r.body.is_empty());
    assert_eq!(r.header("content-length"), Some("13"));

    let r = http::get(addr, "/sock").unwrap();
    assert_eq!((r.status, r.text().as_str()), (500, "<h1>oops</h1>"));
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    // The pages themselves are files like the others.
    assert_eq!(http::get(addr, "/404.html").unwrap().status, 200);
}

#[test]
fn without_a_page_the_answer_is_a_short_text() {
    let outside = TempDir::new("pages-outside");
    std::fs::write(outside.join("secret.html"), "secret").unwrap();
    let root = TempDir::new("no-pages");
    // A page that leads outside the root is no page.
    symlink(outside.join("secret.html"), root.join("404.html")).unwrap();
    let _socket = UnixListener::bind(root.join("sock")).unwrap();
    let (_baton, addr) = start(&["--root", root.path().to_str().unwrap()]);

    let r = http::get(addr, "/missing").unwrap();
    assert_eq!((r.status, r.text().as_str()), (404, "404 Not Found\n"));
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    let r = http::get(addr, "/sock").unwrap();
    assert_eq!(
        (r.status, r.text().as_str()),
        (500, "500 Internal Server Error\n")
    );
    let r = head(addr, "/missing");
    assert_eq!(r.status, 404);
    assert!(r.body.is_empty());
    let mut conn = Conn::tcp(addr).unwrap();
    let r = conn.request("POST", "/missing", &[]).unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(r.text(), "405 Method Not Allowed\n");

    // Switched off: the root's 404.html is not used.
    let root = TempDir::new("pages-off");
    std::fs::write(root.join("404.html"), "<h1>gone</h1>").unwrap();
    let (_baton, addr) = start(&[
        "--root",
        root.path().to_str().unwrap(),
        "--not-found-page",
        "",
    ]);
    assert_eq!(
        http::get(addr, "/missing").unwrap().text(),
        "404 Not Found\n"
    );

    // No root: the embedded page, and the same short text.
    let (_baton, addr) = start(&[]);
    let r = http::get(addr, "/missing").unwrap();
    assert_eq!((r.status, r.text().as_str()), (404, "404 Not Found\n"));
}

// ---------------------------------------------------------------- SPA fallback ----

#[test]
fn the_fallback_answers_unknown_paths_with_200() {
    let outside = TempDir::new("spa-outside");
    std::fs::write(outside.join("secret"), "secret").unwrap();
    let root = TempDir::new("spa");
    std::fs::write(root.join("index.html"), "<app>").unwrap();
    std::fs::create_dir(root.join("assets")).unwrap();
    std::fs::write(root.join("assets/app.js"), "js").unwrap();
    symlink(outside.join("secret"), root.join("link-out")).unwrap();

    // Off by default.
    let (_baton, addr) = start(&["--root", r_of(&root)]);
    assert_eq!(http::get(addr, "/deep/route").unwrap().status, 404);

    let (_baton, addr) = start(&["--root", r_of(&root), "--fallback", "index.html"]);
    for path in [
        "/deep/route/42",
        "/settings",
        "/assets/missing.js",
        "/link-out",
    ] {
        let r = http::get(addr, path).unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "<app>"), "{path}");
        assert!(r.header("content-type").unwrap().starts_with("text/html"));
    }
    assert_eq!(http::get(addr, "/assets/app.js").unwrap().text(), "js");
    for path in ["/../spa-outside/secret", "/%2e%2e/%2e%2e/etc/passwd"] {
        let r = http::get(addr, path).unwrap();
        assert!(
            !r.text().contains("secret") && !r.text().contains("root:"),
            "{path}"
        );
        assert!(matches!(r.status, 200 | 400 | 404), "{path}: {}", r.status);
    }
    let r = head(addr, "/deep/route");
    assert_eq!((r.status, r.body.len()), (200, 0));
    assert_eq!(r.header("content-length"), Some("5"));
    // The request's conditions hold for the fallback's file.
    let etag = http::get(addr, "/x")
        .unwrap()
        .header("etag")
        .unwrap()
        .to_owned();
    let mut conn = Conn::tcp(addr).unwrap();
    let r = conn
        .request("GET", "/other/route", &[("If-None-Match", &etag)])
        .unwrap();
    assert_eq!(r.status, 304);

    // A fallback that is missing (or leads outside) leaves the 404.
    let (_baton, addr) = start(&["--root", r_of(&root), "--fallback", "link-out"]);
    let r = http::get(addr, "/deep").unwrap();
    assert_eq!((r.status, r.text().as_str()), (404, "404 Not Found\n"));
}

fn r_of(dir: &TempDir) -> &str {
    dir.path().to_str().unwrap()
}

// ---------------------------------------------------------------- listing ----

/// The `(href, text)` of each entry of a listing, in order.
fn entries(html: &str) -> Vec<(String, String)> {
    html.lines()
        .filter_map(|l| l.strip_prefix("<li><a href=\""))
        .map(|l| {
            let (href, rest) = l.split_once("\">").unwrap();
            let text = rest.strip_suffix("</a></li>").unwrap();
            (href.to_owned(), text.to_owned())
        })
        .collect()
}

#[test]
fn directory_listing_sorted_escaped_and_confined() {
    let outside = TempDir::new("list-outside");
    std::fs::write(outside.join("secret"), "secret").unwrap();
    let root = TempDir::new("list");
    let names = [
        "<script>.html",
        "a & b.txt",
        "quote\"d.txt",
        "spaced name.txt",
        "été.txt",
    ];
    for name in names {
        std::fs::write(root.join(name), name).unwrap();
    }
    std::fs::create_dir(root.join("sub")).unwrap();
    std::fs::write(root.join("sub/inner.txt"), "inner").unwrap();
    std::fs::create_dir(root.join("withindex")).unwrap();
    std::fs::write(root.join("withindex/index.html"), "index").unwrap();
    symlink(outside.join("secret"), root.join("link-out")).unwrap();
    symlink(outside.path(), root.join("dir-out")).unwrap();
    symlink("sub/inner.txt", root.join("link-in")).unwrap();
    let _socket = UnixListener::bind(root.join("sock")).unwrap();
    // Hidden files are not listed (nginx's autoindex leaves them out too).
    std::fs::write(root.join(".env"), "SECRET=1").unwrap();
    std::fs::create_dir(root.join(".git")).unwrap();

    // Off by default.
    let (_baton, addr) = start(&["--root", r_of(&root)]);
    assert_eq!(http::get(addr, "/").unwrap().status, 404);
    assert_eq!(http::get(addr, "/sub/").unwrap().status, 404);

    let (_baton, addr) = start(&["--root", r_of(&root), "--listing"]);
    let r = http::get(addr, "/").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    let html = r.text();
    assert!(!html.contains("<script>"), "{html}");
    assert!(!html.contains("secret") && !html.contains("-out"), "{html}");
    assert!(!html.contains(".env") && !html.contains(".git"), "{html}");
    let listed = entries(&html);
    let texts: Vec<&str> = listed.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(
        texts,
        [
            "&lt;script&gt;.html",
            "a &amp; b.txt",
            "link-in",
            "quote&quot;d.txt",
            "spaced name.txt",
            "sub/",
            "withindex/",
            "été.txt",
        ],
        "{html}"
    );
    // Every link works when followed.
    for ((href, _), name) in listed.iter().zip([
        "<script>.html",
        "a & b.txt",
        "inner",
        "quote\"d.txt",
        "spaced name.txt",
        "",
        "index",
        "été.txt",
    ]) {
        let path = format!("/{}", href.strip_prefix("./").unwrap());
        let r = http::get(addr, &path).unwrap();
        assert_eq!(r.status, 200, "{path}");
        if !name.is_empty() {
            assert_eq!(r.text(), name, "{path}");
        }
    }
    let sub = http::get(addr, "/sub/").unwrap().text();
    assert_eq!(
        entries(&sub),
        [
            ("../".to_owned(), "../".to_owned()),
            ("./inner.txt".to_owned(), "inner.txt".to_owned())
        ]
    );
    assert_eq!(http::get(addr, "/withindex/").unwrap().text(), "index");
    // A directory outside the root is not listed either.
    assert_eq!(http::get(addr, "/dir-out/").unwrap().status, 404);
    let r = head(addr, "/sub/");
    assert_eq!((r.status, r.body.len()), (200, 0));
}

// ---------------------------------------------------------------- admin ----

/// baton with two handed-over listeners, named http and admin.
fn start_with_admin(args: &[&str]) -> (Baton, SocketAddr, SocketAddr) {
    let (http, http_addr) = tcp_listener();
    let (admin, admin_addr) = tcp_listener();
    let http_spec = format!("http={http_addr}");
    let admin_spec = format!("admin={admin_addr}");
    let mut all = vec!["--listen", &http_spec, "--listen", &admin_spec];
    all.extend_from_slice(args);
    let mut baton = Spawn::serve(&all)
        .fd(http, Some("http"))
        .fd(admin, Some("admin"))
        .start();
    baton.wait_ready();
    (baton, http_addr, admin_addr)
}

/// A root with files of its own under `/-/`.
fn root_with_dash() -> TempDir {
    let root = TempDir::new("dash");
    std::fs::write(root.join("index.html"), "home").unwrap();
    std::fs::create_dir(root.join("-")).unwrap();
    std::fs::write(root.join("-/x"), "root's x").unwrap();
    std::fs::write(root.join("-/metrics"), "root's metrics").unwrap();
    root
}

fn answer(addr: SocketAddr, path: &str) -> (u16, String) {
    let r = http::get(addr, path).unwrap();
    (r.status, r.text())
}

#[test]
fn an_admin_listener_takes_the_endpoints() {
    let root = root_with_dash();
    let (_baton, web, admin) = start_with_admin(&["--root", r_of(&root)]);

    // The web listener: the root's own /-/ paths, and the health check.
    assert_eq!(answer(web, "/-/metrics"), (200, "root's metrics".into()));
    assert_eq!(answer(web, "/-/x"), (200, "root's x".into()));
    assert_eq!(answer(web, "/-/version").0, 404);
    assert_eq!(answer(web, "/-/healthy"), (200, "ok\n".into()));
    assert_eq!(answer(web, "/"), (200, "home".into()));

    // The admin listener: the endpoints and nothing else.
    assert_eq!(answer(admin, "/-/healthy"), (200, "ok\n".into()));
    let (status, metrics) = answer(admin, "/-/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("baton_generation 1"), "{metrics}");
    let version = http::get(admin, "/-/version").unwrap().json();
    assert_eq!(version["version"], baton::VERSION);
    for path in ["/", "/index.html", "/-/x", "/missing"] {
        assert_eq!(
            answer(admin, path),
            (404, "404 Not Found\n".into()),
            "{path}"
        );
    }
}

/// Large files take the sendfile fast path on TCP listeners: not on the admin listener, and
/// a root's large `/-/` file is still served on the web listener.
#[test]
fn the_fast_path_follows_the_listeners_role() {
    let root = root_with_dash();
    let big = vec![b'x'; 300 << 10];
    std::fs::write(root.join("big.bin"), &big).unwrap();
    std::fs::write(root.join("-/big.bin"), &big).unwrap();
    let (_baton, web, admin) = start_with_admin(&["--root", r_of(&root)]);
    for path in ["/big.bin", "/-/big.bin"] {
        let r = http::get(web, path).unwrap();
        assert_eq!((r.status, r.body.len()), (200, big.len()), "{path}");
        assert_eq!(
            answer(admin, path),
            (404, "404 Not Found\n".into()),
            "{path}"
        );
    }
    let metrics = answer(admin, "/-/metrics").1;
    let sent = metrics
        .lines()
        .find(|l| l.starts_with("baton_sendfile_responses_total"))
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(sent.ends_with(" 1"), "{sent}");
}

#[test]
fn admin_public_and_endpoints_switch() {
    let root = root_with_dash();
    let dir = TempDir::new("admin-config");

    // public = []: the health check too is on the admin listener only.
    let config = dir.join("private.toml");
    std::fs::write(&config, "[admin]\npublic = []\n").unwrap();
    let c = config.to_str().unwrap();
    let (_baton, web, admin) = start_with_admin(&["--config", c, "--root", r_of(&root)]);
    assert_eq!(answer(web, "/-/healthy").0, 404);
    assert_eq!(answer(admin, "/-/healthy").0, 200);

    // endpoints = false: none anywhere, the root's /-/ paths everywhere but on admin.
    let config = dir.join("off.toml");
    std::fs::write(&config, "[admin]\nendpoints = false\n").unwrap();
    let c = config.to_str().unwrap();
    let (_baton, addr) = start(&["--config", c, "--root", r_of(&root)]);
    assert_eq!(answer(addr, "/-/healthy").0, 404);
    assert_eq!(answer(addr, "/-/version").0, 404);
    assert_eq!(answer(addr, "/-/metrics"), (200, "root's metrics".into()));
    let (_baton, web, admin) = start_with_admin(&["--config", c, "--root", r_of(&root)]);
    for addr in [web, admin] {
        assert_eq!(answer(addr, "/-/healthy").0, 404);
        assert_eq!(answer(addr, "/-/x"), (200, "root's x".into()));
    }
}

#[test]
fn without_an_admin_listener_every_listener_answers_the_endpoints() {
    let root = root_with_dash();
    let (_baton, addr) = start(&["--root", r_of(&root)]);
    assert_eq!(answer(addr, "/-/healthy"), (200, "ok\n".into()));
    assert_eq!(answer(addr, "/-/version").0, 200);
    let (status, metrics) = answer(addr, "/-/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("baton_generation 1"), "{metrics}");
    // Other /-/ paths are the root's.
    assert_eq!(answer(addr, "/-/x"), (200, "root's x".into()));
    // Another name for the admin listener: http is not it.
    let (_baton, addr) = start(&["--root", r_of(&root), "--admin-listener", "ops"]);
    assert_eq!(answer(addr, "/-/version").0, 200);
}

// ---------------------------------------------------------------- baton check ----

#[test]
fn a_bad_value_of_each_new_key_is_one_line_from_check() {
    let dir = TempDir::new("check-pages");
    let file = dir.join("baton.toml");
    let f = file.to_str().unwrap();
    for (toml, key) in [
        ("[files]\nnot_found_page = 404\n", "not_found_page"),
        (
            "[files]\nnot_found_page = \"../404.html\"\n",
            "files.not_found_page",
        ),
        (
            "[files]\nerror_page = \"/etc/50x.html\"\n",
            "files.error_page",
        ),
        ("[files]\nerror_page = false\n", "error_page"),
        ("[files]\nfallback = \"\"\n", "files.fallback"),
        ("[files]\nfallback = [\"index.html\"]\n", "fallback"),
        ("[files]\nlisting = \"yes\"\n", "listing"),
        ("[admin]\nendpoints = \"no\"\n", "endpoints"),
        ("[admin]\nlistener = \"a b\"\n", "admin.listener"),
        ("[admin]\nlistener = 9090\n", "listener"),
        ("[admin]\npublic = [\"/-/secret\"]\n", "admin.public"),
        ("[admin]\npublic = \"/-/healthy\"\n", "public"),
    ] {
        std::fs::write(&file, toml).unwrap();
        let (code, _, err) = run_baton(&["check", "--config", f]);
        assert_eq!(code, 1, "{toml}: {err}");
        assert_eq!(err.lines().count(), 1, "{toml}: {err}");
        assert!(err.contains(key), "{toml}: {err}");
    }
    // An admin listener that names no listener is fine: the endpoints answer everywhere.
    std::fs::write(&file, "[admin]\nlistener = \"nowhere\"\n").unwrap();
    let (code, _, err) = run_baton(&["check", "--config", f]);
    assert_eq!(code, 0, "{err}");
}
