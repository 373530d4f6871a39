//! A load client: keep-alive connections and fresh connections at once, counting every answer
//! and recording every failure (connect error, reset, truncated or non-2xx answer) exactly.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::http::{self, Conn};

pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    workers: Vec<JoinHandle<()>>,
    started: Instant,
}

/// What the load saw.
#[derive(Debug)]
pub struct Report {
    pub ok: u64,
    pub failures: Vec<String>,
}

impl Load {
    /// Starts `keep_alive` workers that reuse one connection each (reconnecting only when the
    /// server announced `Connection: close` and closed cleanly), and `fresh` workers that open
    /// a connection per request.
    pub fn start(addr: SocketAddr, keep_alive: usize, fresh: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let started = Instant::now();
        let mut workers = Vec::new();
        for i in 0..keep_alive + fresh {
            let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
            let fail = move |what: String| {
                failures
                    .lock()
                    .unwrap()
                    .push(format!("{:?} worker {i}: {what}", started.elapsed()))
            };
            workers.push(std::thread::spawn(move || {
                if i < keep_alive {
                    keep_alive_worker(addr, &stop, &ok, fail)
                } else {
                    fresh_worker(addr, &stop, &ok, fail)
                }
            }));
        }
        Load {
            stop,
            ok,
            failures,
            workers,
            started,
        }
    }

    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    /// Waits until `n` more requests have been answered (the load is really flowing).
    pub fn wait_progress(&self, n: u64) {
        let target = self.ok() + n;
        assert!(
            super::wait_until(Duration::from_secs(30), || self.ok() >= target),
            "the load made no progress: {} answered, failures: {:?}",
            self.ok(),
            self.failures.lock().unwrap()
        );
    }

    pub fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }

    pub fn stop(self) -> Report {
        self.stop.store(true, Ordering::SeqCst);
        for w in self.workers {
            w.join().unwrap();
        }
        let _ = self.started;
        Report {
            ok: self.ok.load(Ordering::SeqCst),
            failures: self.failures.lock().unwrap().clone(),
        }
    }
}

fn keep_alive_worker(addr: SocketAddr, stop: &AtomicBool, ok: &AtomicU64, fail: impl Fn(String)) {
    let mut conn: Option<Conn<std::net::TcpStream>> = None;
    while !stop.load(Ordering::SeqCst) {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::tcp(addr) {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    fail(format!("connect: {e}"));
                    continue;
                }
            },
        };
        match c.get("/-/version") {
            Ok(r) if (200..300).contains(&r.status) => {
                ok.fetch_add(1, Ordering::SeqCst);
                if r.closes() {
                    if let Err(e) = c.expect_close() {
                        fail(format!("after Connection: close: {e}"));
                    }
                    conn = None;
                }
            }
            Ok(r) => {
                fail(format!("status {}", r.status));
                conn = None;
            }
            Err(e) => {
                fail(format!("keep-alive request: {e}"));
                conn = None;
            }
        }
    }
}

fn fresh_worker(addr: SocketAddr, stop: &AtomicBool, ok: &AtomicU64, fail: impl Fn(String)) {
    while !stop.load(Ordering::SeqCst) {
        match http::get(addr, "/-/healthy") {
            Ok(r) if (200..300).contains(&r.status) => {
                ok.fetch_add(1, Ordering::SeqCst);
            }
            Ok(r) => fail(format!("status {}", r.status)),
            Err(e) => fail(format!("fresh request: {e}")),
        }
    }
}
