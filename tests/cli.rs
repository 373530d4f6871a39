//! The command line as a user meets it: `baton serve DIR`, the help, the completions.

mod common;

use common::http;
use common::{run_baton, tcp_listener, Spawn, TempDir};

#[test]
fn serve_dir_serves_that_directory() {
    let root = TempDir::new("serve-dir");
    std::fs::write(root.join("hello.txt"), "hello from DIR\n").unwrap();
    let (listener, addr) = tcp_listener();
    let mut baton = Spawn::serve(&[root.path().to_str().unwrap()])
        .fd(listener, None)
        .start();
    baton.wait_ready();
    let response = http::get(addr, "/hello.txt").unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.text(), "hello from DIR\n");
}

#[test]
fn serve_dir_and_root_together_is_a_one_line_usage_error() {
    let a = TempDir::new("serve-dir-a");
    let b = TempDir::new("serve-dir-b");
    let (a, b) = (a.path().to_str().unwrap(), b.path().to_str().unwrap());
    let (code, out, err) = run_baton(&["serve", a, "--root", b]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(out, "");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("baton: serve: DIR (") && err.contains(a) && err.contains(b),
        "{err}"
    );
}

#[test]
fn a_default_is_printed_once() {
    for (command, default) in [("reload", "[default: 90s]"), ("stop", "[default: 60s]")] {
        let (code, out, err) = run_baton(&[command, "--help"]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(out.matches(default).count(), 1, "{command} --help: {out}");
    }
}

#[test]
fn help_is_a_command_like_the_others() {
    let (code, out, err) = run_baton(&["help", "--help"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Usage: baton help [COMMAND]"), "{out}");
    // `baton help X` prints what `baton X --help` does.
    for command in ["serve", "reload", "stop", "status", "check"] {
        let (code, out, err) = run_baton(&["help", command]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            out,
            run_baton(&[command, "--help"]).1,
            "baton help {command}"
        );
    }
    assert_eq!(run_baton(&["help"]).1, run_baton(&["--help"]).1);
    let (code, _, err) = run_baton(&["help", "nonsense"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, _) = run_baton(&["help", "generate"]);
    assert_eq!(code, 2, "the hidden command has no help to show");
}

#[test]
fn completions_do_not_offer_the_hidden_command() {
    let dir = TempDir::new("completions");
    let (code, _, err) = run_baton(&["generate", "--out", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    for file in ["baton.bash", "_baton", "baton.fish"] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        assert!(!text.contains("generate"), "{file} offers generate");
        assert!(text.contains("serve") && text.contains("reload"), "{file}");
    }
    let (_, out, _) = run_baton(&["--help"]);
    assert!(!out.contains("generate"), "{out}");
}
