//! What a generation serves, seen from the lifecycle: something that accepts on the listening
//! sockets, stops accepting when told, and drains its connections.
//!
//! The lifecycle never looks inside a connection. It asks a [`Workload`] to serve the sockets
//! at start (a new generation only once its predecessor committed), tells the [`Serving`] it got
//! to stop accepting when a successor serves or a stop begins, and waits for its drain. After a
//! rollback it asks the workload to serve the sockets again. A workload may also hand its open
//! connections on to the next generation instead of draining them ([`Serving::pass_on`],
//! [`Serving::adopt`]). [`Stats`] are the lifecycle's
//! counters (upgrades, handoff and drain times), for the service's own metrics.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::activation::Listener;
use crate::handoff::{Adopted, PassOn};
use crate::upgrade::Counts;

/// A service's part of a generation: it serves the listening sockets it is given.
pub trait Workload: Send + 'static {
    /// What serves one set of sockets.
    type Serving: Serving;

    /// Prepares to serve `listeners`; nothing is accepted before [`Serving::start_accepting`].
    /// Called once at start and again after a rollback (with the process's own copies of the
    /// same sockets).
    fn serve(&mut self, listeners: Vec<Listener>) -> std::io::Result<Self::Serving>;

    /// Connections open now, for the log lines of a stop or a handover.
    fn open_connections(&self) -> u64;

    /// The reopen-logs signal (SIGUSR1 by default) arrived: open the workload's own log files
    /// anew by their paths, as the lifecycle does with its log file (logrotate renamed them).
    /// Called in the process's event loop, also while it drains: return quickly (hand the
    /// work to the thread that writes the logs). Nothing, by default.
    fn reopen_logs(&self) {}
}

/// One set of sockets being served.
pub trait Serving: Send + 'static {
    /// Starts the accept loops.
    fn start_accepting(&mut self);

    /// Stops accepting, keeping the connections; returns once no accept loop runs. The
    /// listening sockets stay open elsewhere (the upgrade keeps its copies): never
    /// `shutdown(2)` them, that would stop the successor's accepts too.
    fn stop_accepting(&mut self) -> impl Future<Output = ()> + Send;

    /// Lets the open connections finish, closing those still open after `timeout`.
    fn drain(self, timeout: Duration) -> impl Future<Output = DrainReport> + Send;

    /// Takes the connections the previous generation passes on during an upgrade
    /// ([`crate::handoff`]), to serve them once accepting starts, alongside the accepted ones.
    /// Called before [`Serving::start_accepting`], in a new generation only. By default the
    /// workload declines (`Err` gives them back), and the old generation drains its
    /// connections instead.
    fn adopt(&mut self, connections: Adopted) -> Result<(), Adopted> {
        Err(connections)
    }

    /// The new generation adopts connections: pass on, instead of draining, those that can be
    /// (see [`crate::handoff`] for when). Called after [`Serving::stop_accepting`] and before
    /// [`Serving::drain`], which still waits for the connections not passed on. Nothing by
    /// default.
    fn pass_on(&mut self, to: PassOn) {
        drop(to);
    }

    /// Completes, with why, if serving ends on its own while it should accept (an accept loop
    /// that returned or panicked): the generation then stops and fails, so that a service
    /// manager restarts it, or an upgrade's old generation rolls back. Never, by default.
    fn ended(&mut self) -> impl Future<Output = String> + Send {
        std::future::pending()
    }
}

/// How a drain went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Connections open when the drain began.
    pub open_at_start: usize,
    /// Connections closed forcibly at the deadline.
    pub forced: u64,
    /// Connections passed on to the next generation instead ([`Serving::pass_on`]).
    pub passed_on: u64,
    /// How long it took.
    pub duration: Duration,
}

/// The lifecycle's counters, shared with the service (for `/metrics` and the like).
#[derive(Debug, Default)]
pub struct Stats {
    upgrades_ok: AtomicU64,
    upgrades_failed: AtomicU64,
    upgrades_rolled_back: AtomicU64,
    /// f64 bits; 0.0 when unknown.
    last_handoff_seconds: AtomicU64,
    last_drain_seconds: AtomicU64,
    drain_forced_closes: AtomicU64,
}

impl Stats {
    /// Starts from the counts the previous generation passed on.
    pub fn new(counts: Counts) -> Stats {
        let stats = Stats::default();
        stats.upgrades_ok.store(counts.ok, Ordering::Relaxed);
        stats
            .upgrades_failed
            .store(counts.failed, Ordering::Relaxed);
        stats
            .upgrades_rolled_back
            .store(counts.rolled_back, Ordering::Relaxed);
        stats
    }

    /// Upgrades by result, over all generations of this service.
    pub fn upgrades(&self) -> Counts {
        Counts {
            ok: self.upgrades_ok.load(Ordering::Relaxed),
            failed: self.upgrades_failed.load(Ordering::Relaxed),
            rolled_back: self.upgrades_rolled_back.load(Ordering::Relaxed),
        }
    }

    /// From the upgrade's signal in the old process until this one served, if this
    /// generation was started by an upgrade.
    pub fn last_handoff_seconds(&self) -> f64 {
        f64::from_bits(self.last_handoff_seconds.load(Ordering::Relaxed))
    }

    /// How long the previous generation took to drain, once it reported it.
    pub fn last_drain_seconds(&self) -> f64 {
        f64::from_bits(self.last_drain_seconds.load(Ordering::Relaxed))
    }

    /// Connections the previous generation closed at its drain deadline.
    pub fn drain_forced_closes(&self) -> u64 {
        self.drain_forced_closes.load(Ordering::Relaxed)
    }

    pub(crate) fn upgrade_succeeded(&self) {
        self.upgrades_ok.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn upgrade_failed(&self) {
        self.upgrades_failed.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn upgrade_rolled_back(&self) {
        self.upgrades_rolled_back.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn handed_over(&self, took: Duration) {
        self.last_handoff_seconds
            .store(took.as_secs_f64().to_bits(), Ordering::Relaxed);
    }

    pub(crate) fn predecessor_drained(&self, took: Duration, forced: u64) {
        self.last_drain_seconds
            .store(took.as_secs_f64().to_bits(), Ordering::Relaxed);
        self.drain_forced_closes
            .fetch_add(forced, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_start_from_the_predecessors() {
        let stats = Stats::new(Counts {
            ok: 2,
            failed: 1,
            rolled_back: 3,
        });
        stats.upgrade_succeeded();
        stats.upgrade_rolled_back();
        assert_eq!(
            stats.upgrades(),
            Counts {
                ok: 3,
                failed: 1,
                rolled_back: 4
            }
        );
        stats.predecessor_drained(Duration::from_millis(1500), 2);
        stats.predecessor_drained(Duration::from_millis(500), 1);
        assert_eq!(stats.last_drain_seconds(), 0.5);
        assert_eq!(stats.drain_forced_closes(), 3);
    }
}
