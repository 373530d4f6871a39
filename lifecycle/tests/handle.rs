//! The `Handle` a service holds, used for real: `set_status` reaches the service manager as
//! `STATUS=`, `upgrade` starts the next generation and answers with it, and `stop` stops it.
//!
//! The service is this test binary again, running only [`child`] with [`CHILD_ENV`] set: its
//! generation 1 sets a status and upgrades itself through the handle (the upgrade starts the
//! same binary with the same arguments: generation 2), generation 2 stops itself through the
//! handle (as soon as it accepts, before it is the main pid). Each prints what the handle and `serve` returned. The test plays the service
//! manager with a `NOTIFY_SOCKET` receiver that judges messages as systemd does
//! (`NotifyAccess=main`, `MAINPID=`, `BARRIER=1`).

#[path = "../../tests/common/notify.rs"]
#[allow(dead_code)]
mod notify;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use baton_lifecycle::Options;

const CHILD_ENV: &str = "BATON_LIFECYCLE_TEST_HANDLE";

/// The service: generation 1 upgrades itself, generation 2 stops itself.
#[test]
fn child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let options = Options::new("handletest", "1")
        .listen("probe=127.0.0.1:0".parse().unwrap())
        .probation(Duration::ZERO)
        .control_socket(false);
    // SAFETY: the harness's main thread only waits for this one test (--test-threads=1) and
    // reads no variable meanwhile.
    let lifecycle = unsafe { baton_lifecycle::start(options) }.unwrap();
    let generation = lifecycle.generation();
    let handle = lifecycle.handle();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let served = runtime.block_on(async move {
        let (serving, until_serving) = tokio::sync::oneshot::channel::<()>();
        let mut serving = Some(serving);
        let served = lifecycle.serve(move |mut accept| {
            let started = serving.take();
            async move {
                let listener = accept.tcp("probe").unwrap();
                if let Some(started) = started {
                    let _ = started.send(());
                }
                tokio::select! {
                    _ = accept.stopping() => {}
                    _ = listener.accept() => {}
                }
            }
        });
        let asking = tokio::spawn(async move {
            // Once the accept loop runs, this process is the main pid (no probation).
            let _ = until_serving.await;
            if generation == 1 {
                handle.set_status("generation 1 asks for its successor");
                match handle.upgrade(false).await {
                    Ok(up) => println!(
                        "UPGRADED pid={} generation={} promoted={}",
                        up.pid, up.generation, up.promoted
                    ),
                    Err(e) => println!("UPGRADE-ERR {e}"),
                }
            } else {
                println!("STOPPING generation={generation}");
                handle.stop();
            }
        });
        let served = served.await;
        // The answer to the upgrade comes before the handover ends `serve`: print it first.
        let _ = asking.await;
        served
    });
    match served {
        Ok(exit) => println!("EXIT generation={generation} {exit:?}"),
        Err(e) => println!("EXIT-ERR generation={generation} {e}"),
    }
}

#[test]
fn a_handle_sets_the_status_upgrades_and_stops() {
    let dir = std::env::temp_dir().join(format!("baton-lifecycle-handle-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let receiver = notify::Receiver::new(&dir);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--test-threads=1", "--nocapture", "-q"])
        .env(CHILD_ENV, "1")
        .env("NOTIFY_SOCKET", &receiver.path)
        .env_remove("LISTEN_FDS")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    receiver.set_main_pid(child.id());
    let first = child.id();
    // Both generations write to this pipe; it ends when both have exited.
    let stdout = child.stdout.take().unwrap();
    let (lines, read) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let mut out = Vec::new();
    while out
        .iter()
        .filter(|l: &&String| l.starts_with("EXIT"))
        .count()
        < 2
    {
        match read.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => out.push(line),
            Err(_) => break,
        }
    }
    let _ = child.wait();
    let upgraded = out
        .iter()
        .find_map(|l| l.strip_prefix("UPGRADED pid="))
        .unwrap_or_else(|| panic!("no upgrade through the handle: {out:#?}"));
    let second: u32 = upgraded.split(' ').next().unwrap().parse().unwrap();
    assert_ne!(second, first, "{out:#?}");
    assert!(upgraded.ends_with("generation=2 promoted=true"), "{out:#?}");
    let want = [
        format!("EXIT generation=1 HandedOver {{ pid: {second}, generation: 2 }}"),
        "STOPPING generation=2".to_owned(),
        "EXIT generation=2 Stopped".to_owned(),
    ];
    for line in &want {
        assert!(out.contains(line), "want {line:?} in {out:#?}");
    }
    // The receiver reads on a thread of its own: wait for what the processes sent.
    let status_from_handle = |m: &notify::Message| {
        m.pid == first as i32
            && m.accepted
            && m.get("STATUS") == Some("generation 1 asks for its successor")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let messages = loop {
        let messages = receiver.messages();
        let seen = messages.iter().any(status_from_handle);
        if seen || std::time::Instant::now() > deadline {
            break messages;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        messages.iter().any(status_from_handle),
        "no STATUS= from the handle: {messages:#?}"
    );

    let _ = std::fs::remove_dir_all(&dir);
}
