//! A TCP echo server with baton's lifecycle: every line a client sends comes back.
//!
//! ```text
//! cargo run -p baton-lifecycle --example echo -- 127.0.0.1:7000
//! kill -USR2 <pid>          # upgrade: a new process takes over, no connection is refused
//! kill -TERM <pid>          # stop: open connections finish their line, then close
//! ```
//!
//! `echo reload PID` upgrades the echo server PID through its control socket and waits for the
//! outcome, as `ExecReload=` must (see the unit files in the crate docs).
//!
//! Its address is the first argument (default 127.0.0.1:7000); under systemd a socket passed
//! with `FileDescriptorName=echo` wins. `ECHO_PREFIX` (if set) is put before every echoed line,
//! so that a test can tell generations apart across an upgrade.

use std::process::ExitCode;

use baton_lifecycle::Options;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// How long a client may stay quiet once the drain began.
const QUIET: std::time::Duration = std::time::Duration::from_secs(1);

fn main() -> ExitCode {
    let address = std::env::args().nth(1).unwrap_or("127.0.0.1:7000".into());
    if address == "reload" {
        return reload(std::env::args().nth(2));
    }
    let spec = match format!("echo={address}").parse() {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("echo: {e}");
            return ExitCode::from(2);
        }
    };
    let options = Options::new("echo", env!("CARGO_PKG_VERSION"))
        .listen(spec)
        .probation(std::time::Duration::from_millis(500))
        .log("info", None);
    // SAFETY: first thing in main; no other thread exists.
    let lifecycle = match unsafe { baton_lifecycle::start(options) } {
        Ok(lifecycle) => lifecycle,
        Err(e) => {
            eprintln!("echo: {e}");
            return ExitCode::FAILURE;
        }
    };
    let prefix = std::env::var("ECHO_PREFIX").unwrap_or_default();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            lifecycle.abandon(&format!("cannot start the runtime: {e}"));
            eprintln!("echo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = runtime.block_on(lifecycle.serve(move |mut accept| {
        let prefix = prefix.clone();
        async move {
            let listener = match accept.tcp("echo") {
                Ok(listener) => listener,
                Err(e) => return eprintln!("echo: {e}"),
            };
            loop {
                let stream = tokio::select! {
                    _ = accept.stopping() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => {
                            // Out of fds, most likely: wait instead of spinning on the client
                            // still pending.
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let connection = accept.connection();
                let prefix = prefix.clone();
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = BufReader::new(read).lines();
                    let mut draining = false;
                    loop {
                        // A quiet client is done once the drain began; `next_line` may be
                        // cancelled without losing data.
                        let read = async {
                            match draining {
                                false => Some(lines.next_line().await),
                                true => tokio::time::timeout(QUIET, lines.next_line()).await.ok(),
                            }
                        };
                        let line = tokio::select! {
                            biased;
                            // Past the deadline: close now.
                            _ = connection.closing() => return,
                            _ = connection.draining(), if !draining => {
                                draining = true;
                                continue;
                            }
                            line = read => match line {
                                Some(line) => line,
                                None => return,
                            },
                        };
                        let Ok(Some(line)) = line else { return };
                        let echoed = format!("{prefix}{line}\n");
                        if write.write_all(echoed.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    }));
    match served {
        // Stopped, or handed over to the next generation: the connections drained either way.
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("echo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `echo reload PID`: asks PID for an upgrade and waits until the new generation serves.
fn reload(pid: Option<String>) -> ExitCode {
    let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok()) else {
        eprintln!("echo: reload needs the pid of the echo server: echo reload PID");
        return ExitCode::from(2);
    };
    // The control socket is in echo's runtime directory: say who we are before looking.
    baton_lifecycle::env::set_identity(baton_lifecycle::Identity::new(
        "echo",
        env!("CARGO_PKG_VERSION"),
    ));
    // Allows for the new generation's start and its probation.
    let timeout = std::time::Duration::from_secs(60);
    let answer = baton_lifecycle::control::Client::connect(pid)
        .and_then(|mut client| client.request("upgrade wait", timeout));
    match answer {
        Ok(answer) if answer["ok"] == true => {
            println!("echo: pid {pid} upgraded to pid {}", answer["pid"]);
            ExitCode::SUCCESS
        }
        Ok(answer) => {
            eprintln!(
                "echo: upgrade failed: {}",
                answer["error"].as_str().unwrap_or("no reason given")
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("echo: {e}");
            ExitCode::FAILURE
        }
    }
}
