//! What a start sets up for the load to come, seen from outside: the soft `RLIMIT_NOFILE`
//! raised to the hard limit (and logged), for the server and for the keeper, and the listen
//! backlog of a socket baton binds itself.

mod common;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{http, tcp_listener, wait_until, Baton};

const TIMEOUT: Duration = Duration::from_secs(20);

/// `baton serve --config /dev/null ARGS` started with the fd limits `soft`:`hard`.
fn start_limited(args: &[&str], soft: u64, hard: u64) -> Baton {
    let mut cmd = Command::new(common::baton_bin());
    cmd.args(["serve", "--config", "/dev/null"])
        .args(args)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Baton::adopt(cmd.spawn().expect("spawn baton"))
}

/// The soft and hard "Max open files" of a process.
fn nofile(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    (fields[3].parse().unwrap(), fields[4].parse().unwrap())
}

fn free_addr() -> SocketAddr {
    let (listener, addr) = tcp_listener();
    drop(listener);
    addr
}

/// The hard limit the tests start baton with: 4096, or less when the test runs with less.
fn hard_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    limit.rlim_max.min(4096)
}

#[test]
fn a_low_soft_fd_limit_is_raised_to_the_hard_limit_and_a_bound_socket_has_the_backlog() {
    let hard = hard_limit();
    let addr = free_addr();
    let mut baton = start_limited(&["--listen", &addr.to_string()], 64, hard);
    baton.serves = Some(addr);
    baton.wait_ready();
    assert_eq!(nofile(baton.pid()), (hard, hard));
    let line = baton
        .stderr
        .wait_for("event=\"nofile\"", TIMEOUT)
        .unwrap_or_else(|| panic!("no nofile line:\n{}", baton.stderr.text()));
    assert!(
        line.contains(" INFO ")
            && line.contains(&format!(
                "soft limit raised from 64 to {hard}, hard limit {hard}"
            )),
        "{line}"
    );
    assert!(http::get(addr, "/-/healthy").is_ok());

    // The self-bound listener's backlog: ss shows it as Send-Q of a listening socket, as the
    // kernel caps it (net.core.somaxconn).
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    match Command::new("ss")
        .args(["-Hltn", &format!("sport = :{}", addr.port())])
        .output()
    {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            let send_q: u32 = text
                .split_whitespace()
                .nth(2)
                .and_then(|f| f.parse().ok())
                .unwrap_or_else(|| panic!("ss -ltn: {text}"));
            assert_eq!(send_q, somaxconn.min(4096), "ss -ltn: {text}");
        }
        _ => eprintln!("ss is missing: the backlog is not checked"),
    }
}

#[test]
fn the_file_cache_keeps_at_most_a_sixteenth_of_the_fd_limit_open() {
    let dir = common::TempDir::new("held-fds");
    let root = dir.join("www");
    std::fs::create_dir_all(&root).unwrap();
    let body: Vec<u8> = (0..20 << 10).map(|i| (i % 253) as u8).collect();
    for i in 0..40 {
        std::fs::write(root.join(format!("{i}.bin")), &body).unwrap();
    }
    let addr = free_addr();
    let args = [
        "--listen",
        &addr.to_string(),
        "--root",
        root.to_str().unwrap(),
    ];
    let mut baton = start_limited(&args, 256, 256);
    baton.serves = Some(addr);
    baton.wait_ready();
    for i in 0..40 {
        let response = http::get(addr, &format!("/{i}.bin")).unwrap();
        assert_eq!((response.status, response.body.len()), (200, body.len()));
        assert!(response.body == body, "{i}.bin");
    }
    let root = root.to_string_lossy().into_owned();
    let held = common::open_files(baton.pid())
        .into_iter()
        .filter(|target| target.starts_with(&root) && target.ends_with(".bin"))
        .count();
    assert_eq!(held, 256 / 16, "fds of cached files under a limit of 256");
    drop(baton);
}

#[test]
fn the_keeper_raises_the_fd_limit_for_itself_and_its_generations() {
    let hard = hard_limit();
    let addr = free_addr();
    let mut keeper = start_limited(&["--keeper", "--listen", &addr.to_string()], 64, hard);
    keeper.serves = Some(addr);
    assert!(
        wait_until(TIMEOUT, || http::get(addr, "/-/healthy").is_ok()),
        "the keeper's generation does not serve:\n{}",
        keeper.stderr.text()
    );
    let generation = http::get(addr, "/-/version").unwrap().json()["pid"]
        .as_u64()
        .unwrap() as u32;
    assert_ne!(generation, keeper.pid());
    assert_eq!(nofile(keeper.pid()), (hard, hard));
    assert_eq!(nofile(generation), (hard, hard));
    // The keeper raised it (and says so); its generation found it raised.
    keeper
        .stderr
        .wait_for(
            &format!("soft limit raised from 64 to {hard}, hard limit {hard}"),
            TIMEOUT,
        )
        .unwrap_or_else(|| panic!("no nofile line:\n{}", keeper.stderr.text()));
    keeper
        .stderr
        .wait_for(&format!("already the hard limit {hard}"), TIMEOUT)
        .unwrap_or_else(|| panic!("no nofile line:\n{}", keeper.stderr.text()));
    keeper.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(keeper.wait_exit(TIMEOUT).is_some());
}

/// How many threads of a process serve connections (`baton-conn-N`).
fn connection_workers(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("baton-conn-"))
        .count()
}

#[test]
fn connections_are_served_by_the_configured_number_of_workers() {
    let cpus = std::thread::available_parallelism().unwrap().get();
    let hard = hard_limit();
    for (workers, expected) in [("3", 3), ("0", cpus)] {
        let addr = free_addr();
        let mut baton = start_limited(
            &["--listen", &addr.to_string(), "--workers", workers],
            hard,
            hard,
        );
        baton.serves = Some(addr);
        baton.wait_ready();
        // A thread takes its name once it runs.
        let pid = baton.pid();
        wait_until(TIMEOUT, || connection_workers(pid) >= expected);
        assert_eq!(connection_workers(pid), expected, "--workers {workers}");
        // Connections handed out in turn: each is served, keep-alive included.
        let mut conns: Vec<_> = (0..2 * expected)
            .map(|_| http::Conn::tcp(addr).unwrap())
            .collect();
        for _ in 0..2 {
            for conn in &mut conns {
                assert_eq!(conn.get("/-/healthy").unwrap().status, 200);
            }
        }
    }
    let config = std::env::temp_dir().join(format!("baton-workers-{}.toml", std::process::id()));
    std::fs::write(&config, "[server]\nworkers = 2000\n").unwrap();
    let (code, _, err) = common::run_baton(&["check", "--config", config.to_str().unwrap()]);
    let _ = std::fs::remove_file(&config);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("server.workers 2000 is more than 1024") && err.lines().count() == 1,
        "{err}"
    );
}
