//! Path resolution beneath the root, against a real directory tree full of symlinks that stay
//! inside and symlinks that lead out: nothing outside the root is ever opened, whatever the
//! sequence of names, dots, percent-encodings and links (a property test), and the links that
//! stay inside still work.

mod common;

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};

use baton::http::beneath::{Root, Stat};
use common::TempDir;
use http_body_util::BodyExt;
use proptest::prelude::*;

const SECRET: &str = "TOPSECRET";

/// `base/root` is the root; `base/outside` and `base/rootx` (a sibling whose name starts like
/// the root's) hold secrets.
struct Tree {
    _base: TempDir,
    root: PathBuf,
    /// Device and inode of every file and directory below the root (links not followed).
    inside: HashSet<(u64, u64)>,
}

fn tree() -> Tree {
    let base = TempDir::new("beneath");
    let b = base.path().to_owned();
    let root = b.join("root");
    for dir in ["root/dir/sub", "outside/dir", "rootx"] {
        std::fs::create_dir_all(b.join(dir)).unwrap();
    }
    for file in [
        "outside/secret",
        "outside/dir/secret",
        "rootx/secret",
        "secret",
    ] {
        std::fs::write(b.join(file), format!("{SECRET} {file}")).unwrap();
    }
    for file in ["root/a.txt", "root/dir/b.txt", "root/dir/sub/c.txt"] {
        std::fs::write(b.join(file), format!("public {file}")).unwrap();
    }
    let abs = |p: &str| b.join(p);
    let links: &[(&str, PathBuf)] = &[
        // Inside.
        ("root/dir/up", "..".into()),
        ("root/dir/in", "../a.txt".into()),
        ("root/dir/sub/in2", "../../dir/b.txt".into()),
        ("root/in-abs", abs("root/a.txt")),
        ("root/root-abs", abs("root")),
        ("root/chain", "dir/up/dir/in".into()),
        // Outside.
        ("root/out-rel", "../outside/secret".into()),
        ("root/out-abs", abs("outside/secret")),
        ("root/dir-out", "../outside".into()),
        ("root/dir/deep-out", "../../outside/dir".into()),
        ("root/abs-dotdot", abs("root/../outside/secret")),
        ("root/sib", abs("rootx/secret")),
        ("root/dir/sib-rel", "../../rootx/secret".into()),
        ("root/dir/chain-out", "up/dir-out/secret".into()),
        ("root/base", "..".into()),
        ("root/etc", "/etc/passwd".into()),
        ("root/loop", "loop".into()),
    ];
    for (link, target) in links {
        symlink(target, b.join(link)).unwrap();
    }
    let mut inside = HashSet::new();
    let mut todo = vec![root.clone()];
    while let Some(p) = todo.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.is_symlink() {
            continue;
        }
        inside.insert((m.dev(), m.ino()));
        if m.is_dir() {
            todo.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    Tree {
        _base: base,
        root,
        inside,
    }
}

/// Names that exist somewhere in the tree, and dots.
const NAMES: &[&str] = &[
    "a.txt",
    "b.txt",
    "c.txt",
    "dir",
    "sub",
    "up",
    "in",
    "in2",
    "in-abs",
    "root-abs",
    "chain",
    "out-rel",
    "out-abs",
    "dir-out",
    "deep-out",
    "abs-dotdot",
    "sib",
    "sib-rel",
    "chain-out",
    "base",
    "etc",
    "loop",
    "secret",
    "outside",
    "root",
    "rootx",
    "passwd",
    ".",
    "..",
    "",
];

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(NAMES).prop_map(String::from),
        1 => prop::collection::vec(prop::sample::select(&['a', '.', '/', '%', '2', 'e', 'f', '\\'][..]), 0..6)
            .prop_map(String::from_iter),
    ]
}

/// Opens `path` beneath the tree's root: Ok with what was opened, or the error.
fn open(root: &Root, path: &str) -> std::io::Result<Stat> {
    let (file, stat) = root.open_read(Path::new(path))?;
    assert_eq!(Stat::of(file.as_fd()).unwrap(), stat);
    Ok(stat)
}

#[test]
fn links_that_stay_inside_work_and_the_others_fail() {
    let t = tree();
    let root = Root::open(&t.root).unwrap();
    let ino = |p: &str| std::fs::metadata(t.root.join(p)).unwrap().ino();
    for (path, target) in [
        ("a.txt", "a.txt"),
        ("dir/in", "a.txt"),
        ("dir/up/a.txt", "a.txt"),
        ("dir/sub/in2", "dir/b.txt"),
        ("in-abs", "a.txt"),
        ("root-abs/dir/b.txt", "dir/b.txt"),
        ("chain", "a.txt"),
        ("dir/sub/../b.txt", "dir/b.txt"),
        ("", "."),
    ] {
        let stat = open(&root, path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(stat.ino, ino(target), "{path}");
    }
    for path in [
        "out-rel",
        "out-abs",
        "dir-out/secret",
        "dir/deep-out/secret",
        "abs-dotdot",
        "sib",
        "dir/sib-rel",
        "dir/chain-out",
        "base/secret",
        "etc",
        "loop",
        "..",
        "../secret",
        "dir/../../secret",
        "/etc/passwd",
    ] {
        assert!(open(&root, path).is_err(), "{path} opened");
    }
}

#[test]
fn a_root_given_through_a_symlink_takes_absolute_links_in_either_spelling() {
    let t = tree();
    let alias = t.root.parent().unwrap().join("alias");
    symlink(&t.root, &alias).unwrap();
    symlink(alias.join("a.txt"), t.root.join("via-alias")).unwrap();
    let root = Root::open(&alias).unwrap();
    assert!(open(&root, "via-alias").is_ok());
    assert!(open(&root, "in-abs").is_ok());
    assert!(open(&root, "out-abs").is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Whatever opens is a file or directory below the root.
    #[test]
    fn nothing_outside_the_root_is_opened(segments in prop::collection::vec(segment(), 0..8)) {
        let t = TREE.with(|t| t.root.clone());
        let root = Root::open(&t).unwrap();
        let path = segments.join("/");
        if let Ok(stat) = open(&root, &path) {
            prop_assert!(TREE.with(|t| t.inside.contains(&(stat.dev, stat.ino))), "{path:?} opened something outside");
        }
        let _ = root.stat(Path::new(&path)).map(|stat| {
            assert!(TREE.with(|t| t.inside.contains(&(stat.dev, stat.ino))), "{path:?}: stat outside");
        });
    }

    /// The same through the file service, with the request path percent-encoded at random:
    /// no answer carries a secret.
    #[test]
    fn no_request_path_serves_a_secret(
        segments in prop::collection::vec((segment(), 0..4u8), 0..8),
        range in any::<bool>(),
    ) {
        let mut path = String::new();
        for (segment, encoding) in &segments {
            path.push_str(match encoding % 4 { 3 => "%2f", _ => "/" });
            match encoding {
                1 => path.extend(segment.bytes().map(|b| format!("%{b:02x}"))),
                2 => path.push_str(&segment.replace('.', "%2E")),
                _ => path.push_str(segment),
            }
        }
        if path.is_empty() {
            path.push('/');
        }
        let Ok(uri) = path.parse::<axum::http::Uri>() else { return Ok(()) };
        let mut request = axum::http::Request::get(uri);
        if range {
            request = request.header("range", "bytes=0-3");
        }
        let request = request.body(axum::body::Body::empty()).unwrap();
        let (status, body) = RUNTIME.with(|rt| rt.block_on(async {
            let files = TREE.with(|t| baton::http::Confined::new(&t.root).unwrap());
            let response = tower::ServiceExt::oneshot(files, request).await.unwrap();
            let status = response.status();
            (status, response.into_body().collect().await.unwrap().to_bytes())
        }));
        prop_assert!(!String::from_utf8_lossy(&body).contains(SECRET), "{path:?}: {status}");
        prop_assert!(status.as_u16() < 500, "{path:?}: {status}");
    }
}

thread_local! {
    static TREE: Tree = tree();
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
}
