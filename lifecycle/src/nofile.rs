//! `RLIMIT_NOFILE`: the soft limit raised to the hard limit at start ([`crate::Options::raise_nofile`]).
//!
//! A server holds one fd per connection, and the soft limit systemd and most shells give
//! (1024) is far below what a busy server needs, while the hard limit is high (systemd: 512K);
//! nginx raises it with `worker_rlimit_nofile`. The raise happens in [`crate::start_with`]
//! before the sockets are bound, and in the keeper, whose generations inherit the limit; its
//! outcome is logged once logging is set up ([`log_outcome`]): one info line with both
//! values, or a warning when the limit could not be raised.

use std::sync::Mutex;

/// What the raise did, kept until it can be logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The soft limit is the hard limit now (`before` == `soft` when it already was).
    Raised {
        before: libc::rlim_t,
        soft: libc::rlim_t,
        hard: libc::rlim_t,
    },
    /// setrlimit(2) refused it.
    Failed {
        soft: libc::rlim_t,
        hard: libc::rlim_t,
        errno: i32,
    },
}

static OUTCOME: Mutex<Option<Outcome>> = Mutex::new(None);

fn getrlimit() -> std::io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer to a rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(limit)
}

fn setrlimit(soft: libc::rlim_t, hard: libc::rlim_t) -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: a valid pointer to a rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The highest limit the kernel allows (`fs.nr_open`), for an unlimited hard limit.
fn nr_open() -> Option<libc::rlim_t> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (to `fs.nr_open` when the hard limit is
/// unlimited) and records the outcome for [`log_outcome`].
pub(crate) fn raise() {
    let outcome = match getrlimit() {
        Ok(limit) => {
            let before = limit.rlim_cur;
            let mut target = limit.rlim_max;
            if target == libc::RLIM_INFINITY {
                target = nr_open().unwrap_or(target);
            }
            let result = if before >= target {
                Ok(())
            } else {
                setrlimit(target, limit.rlim_max)
            };
            match result {
                Ok(()) => Outcome::Raised {
                    before,
                    soft: target.max(before),
                    hard: limit.rlim_max,
                },
                Err(e) => Outcome::Failed {
                    soft: before,
                    hard: limit.rlim_max,
                    errno: e.raw_os_error().unwrap_or(0),
                },
            }
        }
        Err(e) => Outcome::Failed {
            soft: 0,
            hard: 0,
            errno: e.raw_os_error().unwrap_or(0),
        },
    };
    *OUTCOME.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
}

/// Logs what [`raise`] did, once (nothing when it did not run).
pub(crate) fn log_outcome() {
    let outcome = OUTCOME.lock().unwrap_or_else(|e| e.into_inner()).take();
    match outcome {
        None => {}
        Some(Outcome::Raised { before, soft, hard }) if before == soft => tracing::info!(
            event = "nofile",
            soft,
            hard,
            "RLIMIT_NOFILE: soft limit {soft}, already the hard limit {hard}"
        ),
        Some(Outcome::Raised { before, soft, hard }) => tracing::info!(
            event = "nofile",
            soft,
            hard,
            before,
            "RLIMIT_NOFILE: soft limit raised from {before} to {soft}, hard limit {hard}"
        ),
        Some(Outcome::Failed { soft, hard, errno }) => tracing::warn!(
            event = "nofile",
            soft,
            hard,
            "RLIMIT_NOFILE: cannot raise the soft limit {soft} to the hard limit {hard}: {}; \
             connections beyond it fail with EMFILE",
            std::io::Error::from_raw_os_error(errno)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_reaches_the_hard_limit_and_is_logged_once() {
        let limit = getrlimit().unwrap();
        raise();
        let after = getrlimit().unwrap();
        if limit.rlim_max != libc::RLIM_INFINITY {
            assert_eq!(after.rlim_cur, limit.rlim_max);
        }
        assert_eq!(after.rlim_max, limit.rlim_max);
        assert!(OUTCOME.lock().unwrap().is_some());
        log_outcome();
        assert!(OUTCOME.lock().unwrap().is_none());
    }
}
