//! An accept loop that ends on its own (returns, or panics) while its generation should be
//! serving must not leave a process that says it serves and accepts nothing: the generation
//! stops, and `serve` fails with the reason, so the service manager restarts it (or, in an
//! upgrade, the old generation rolls back).
//!
//! The child is this test binary again, running only [`child`] with [`CHILD_ENV`] set to what
//! its accept loop does: `return` or `panic`.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use baton_lifecycle::Options;

const CHILD_ENV: &str = "BATON_LIFECYCLE_TEST_ACCEPT_LOOP";

/// The child: serves with an accept loop that ends at once; prints what `serve` returned.
#[test]
fn child() {
    let Ok(how) = std::env::var(CHILD_ENV) else {
        return;
    };
    let options = Options::new("acceptloop", "1")
        .listen("probe=127.0.0.1:0".parse().unwrap())
        .control_socket(false);
    // SAFETY: the harness's main thread only waits for this one test (--test-threads=1) and
    // reads no variable meanwhile.
    let lifecycle = unsafe { baton_lifecycle::start(options) }.unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let served = runtime.block_on(lifecycle.serve(move |_accept| {
        let how = how.clone();
        async move {
            if how == "panic" {
                panic!("the listener is gone");
            }
        }
    }));
    match served {
        Ok(exit) => println!("SERVED OK {exit:?}"),
        Err(e) => println!("SERVED ERR {e}"),
    }
}

/// Runs the child; it must be done within a deadline (a generation that goes on "serving"
/// with no accept loop would never end).
fn run_child(how: &str) -> String {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--test-threads=1", "--nocapture", "-q"])
        .env(CHILD_ENV, how)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .stdout(Stdio::piped())
        // The panic's own report: kept out of the test's output.
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the generation went on after its accept loop ended ({how})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    out
}

#[test]
fn an_accept_loop_that_returns_while_serving_fails_the_generation() {
    let out = run_child("return");
    assert!(
        out.contains("SERVED ERR the accept loop returned while the generation was serving"),
        "{out}"
    );
}

#[test]
fn an_accept_loop_that_panics_fails_the_generation_with_the_panic() {
    let out = run_child("panic");
    assert!(
        out.contains("SERVED ERR the accept loop panicked: the listener is gone"),
        "{out}"
    );
}
