//! A subreaper for the test process, standing in for systemd (PID 1): a new generation is
//! orphaned on purpose (double fork) and must be adopted and reaped by someone.
//!
//! Once [`init`] ran, this thread reaps every child of the test process and records the exit
//! statuses; waits must then go through [`wait_exit`] (std's `Child::wait` would find nothing).

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

struct Table {
    exited: Mutex<HashMap<i32, ExitStatus>>,
    changed: Condvar,
}

static TABLE: OnceLock<Table> = OnceLock::new();

/// Makes the test process a child subreaper and starts reaping. Idempotent.
pub fn init() {
    TABLE.get_or_init(|| {
        nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
        std::thread::spawn(reap);
        Table {
            exited: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
        }
    });
}

pub fn active() -> bool {
    TABLE.get().is_some()
}

fn reap() {
    loop {
        let mut status = 0;
        // SAFETY: plain waitpid.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid > 0 {
            let table = TABLE.get().unwrap();
            table
                .exited
                .lock()
                .unwrap()
                .insert(pid, ExitStatus::from_raw(status));
            table.changed.notify_all();
        } else {
            // No children right now (ECHILD): look again shortly.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// The exit status of `pid`, if it has exited (and was our child or adopted).
pub fn status(pid: u32) -> Option<ExitStatus> {
    TABLE
        .get()?
        .exited
        .lock()
        .unwrap()
        .get(&(pid as i32))
        .copied()
}

/// Every pid reaped so far.
pub fn reaped() -> Vec<i32> {
    TABLE
        .get()
        .map(|t| t.exited.lock().unwrap().keys().copied().collect())
        .unwrap_or_default()
}

/// Waits until `pid` has been reaped.
pub fn wait_exit(pid: u32, timeout: Duration) -> Option<ExitStatus> {
    let table = TABLE.get()?;
    let deadline = Instant::now() + timeout;
    let mut exited = table.exited.lock().unwrap();
    loop {
        if let Some(s) = exited.get(&(pid as i32)) {
            return Some(*s);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        exited = table
            .changed
            .wait_timeout(exited, deadline - now)
            .unwrap()
            .0;
    }
}
