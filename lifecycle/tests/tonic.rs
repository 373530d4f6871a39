//! `examples/tonic.rs` as a real process: the gRPC health service answers for generation 1,
//! SIGUSR2 upgrades it to generation 2 while a client checks the health on a fresh connection
//! after another, and not one of those checks fails; SIGTERM then stops generation 2 with exit
//! status 0.
//!
//! The example is built once with the cargo that runs the tests, into the same target
//! directory and profile, with the same features (so the library is not built twice). The test
//! process is then a child subreaper (see tests/common/reaper.rs of baton), as systemd is for a
//! service: the new generation is orphaned by its double fork and adopted here.

#[allow(dead_code)]
#[path = "../../tests/common/reaper.rs"]
mod reaper;

#[path = "common/examples.rs"]
mod build_examples;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tonic::transport::Endpoint;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const TIMEOUT: Duration = Duration::from_secs(15);

/// The built `examples/tonic`, built once.
fn example() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| build_examples::build(&["tonic"]).join("tonic"))
}

fn kill(pid: u32, signal: Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
}

/// The lines every generation wrote to the shared stderr pipe; waitable.
#[derive(Clone, Default)]
struct Lines(Arc<(Mutex<Vec<String>>, Condvar)>);

impl Lines {
    fn push(&self, line: String) {
        let (lock, cv) = &*self.0;
        lock.lock().unwrap().push(line);
        cv.notify_all();
    }

    fn text(&self) -> String {
        self.0 .0.lock().unwrap().join("\n")
    }

    /// Waits for the log event `event` of `generation`; panics with the log if it does not
    /// come.
    fn event(&self, event: &str, generation: u64) -> String {
        let (lock, cv) = &*self.0;
        let deadline = Instant::now() + TIMEOUT;
        let mut lines = lock.lock().unwrap();
        loop {
            let found = lines.iter().find(|l| {
                field(l, "event") == Some(event)
                    && field(l, "generation") == Some(&generation.to_string())
            });
            if let Some(line) = found {
                return line.clone();
            }
            let now = Instant::now();
            if now >= deadline {
                drop(lines);
                panic!(
                    "no event={event:?} of generation {generation}; stderr:\n{}",
                    self.text()
                );
            }
            lines = cv.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }
}

/// A field of a log line: `key=value` or `key="value"`.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = line.split(&format!(" {key}=")).nth(1)?;
    match rest.strip_prefix('"') {
        Some(quoted) => quoted.split('"').next(),
        None => rest.split_whitespace().next(),
    }
}

/// The pid in `serving generation G (pid P)`.
fn pid_of(ready: &str) -> u32 {
    ready
        .split("(pid ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {ready:?}"))
}

/// Kills every generation still running when the test ends (a failed assertion).
struct Pids(Mutex<Vec<u32>>);

impl Drop for Pids {
    fn drop(&mut self) {
        for &pid in self.0.lock().unwrap().iter() {
            if reaper::status(pid).is_none() {
                kill(pid, Signal::SIGKILL);
            }
        }
    }
}

/// One health check of `service` on a connection of its own.
async fn check(addr: SocketAddr, service: &str) -> Result<ServingStatus, String> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(|status| format!("check {service:?}: {status:?}"))?;
    Ok(response.into_inner().status())
}

#[test]
fn upgrade_under_health_checks() {
    let exe = example();
    let started = Instant::now();
    let mut cmd = Command::new(exe);
    cmd.arg("127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for name in [
        "RUST_LOG",
        "NOTIFY_SOCKET",
        "JOURNAL_STREAM",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
    ] {
        cmd.env_remove(name);
    }
    // The subreaper reaps it: its status comes from reaper::wait_exit.
    #[allow(clippy::zombie_processes)]
    let mut child = cmd.spawn().expect("spawn examples/tonic");
    let pids = Pids(Mutex::new(vec![child.id()]));
    let stderr = Lines::default();
    let pipe = child.stderr.take().unwrap();
    let lines = stderr.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            lines.push(line);
        }
    });
    let old = pid_of(&stderr.event("ready", 1));
    assert_eq!(old, child.id());
    let listening = stderr.event("listening", 1);
    let addr: SocketAddr = field(&listening, "address")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {listening:?}"));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    assert_eq!(
        runtime.block_on(check(addr, "generation-1")),
        Ok(ServingStatus::Serving)
    );
    // Generation 1 knows nothing of generation 2.
    let unknown = runtime.block_on(check(addr, "generation-2"));
    assert!(
        unknown.as_ref().is_err_and(|e| e.contains("NotFound")),
        "{unknown:?}"
    );

    // A client checking the overall health, each time on a fresh connection, through the
    // whole upgrade.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let client = runtime.spawn({
        let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
        async move {
            while !stop.load(Ordering::SeqCst) {
                match check(addr, "").await {
                    Ok(ServingStatus::Serving) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    other => failures.lock().unwrap().push(format!("{other:?}")),
                }
            }
        }
    });
    let wait_ok = |at_least: u64| {
        let deadline = Instant::now() + TIMEOUT;
        while ok.load(Ordering::SeqCst) < at_least {
            assert!(Instant::now() < deadline, "the client got no answers");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_ok(5);

    kill(old, Signal::SIGUSR2);
    let new = pid_of(&stderr.event("ready", 2));
    assert_ne!(new, old);
    pids.0.lock().unwrap().push(new);
    // Generation 2 answers for itself on a new connection.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match runtime.block_on(check(addr, "generation-2")) {
            Ok(ServingStatus::Serving) => break,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "generation 2 does not answer: {other:?}\n{}",
                    stderr.text()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    stderr.event("main", 2);
    let status = reaper::wait_exit(old, TIMEOUT)
        .unwrap_or_else(|| panic!("generation 1 did not exit:\n{}", stderr.text()));
    assert!(
        status.success(),
        "generation 1: {status:?}\n{}",
        stderr.text()
    );
    // Generation 1 is gone: from now on, only generation 2 answers.
    let after = ok.load(Ordering::SeqCst);
    wait_ok(after + 5);
    stop.store(true, Ordering::SeqCst);
    runtime.block_on(client).unwrap();
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} of {} checks failed: {failures:#?}\n{}",
        failures.len(),
        failures.len() as u64 + ok.load(Ordering::SeqCst),
        stderr.text()
    );
    assert_eq!(
        runtime
            .block_on(check(addr, "generation-1"))
            .map_err(|e| e.contains("NotFound")),
        Err(true),
        "generation 1 still answers"
    );

    kill(new, Signal::SIGTERM);
    let status = reaper::wait_exit(new, TIMEOUT)
        .unwrap_or_else(|| panic!("generation 2 did not exit:\n{}", stderr.text()));
    assert!(
        status.success(),
        "generation 2: {status:?}\n{}",
        stderr.text()
    );
    eprintln!(
        "{} health checks on fresh connections across the upgrade, none failed; {:?}",
        ok.load(Ordering::SeqCst),
        started.elapsed()
    );
}
