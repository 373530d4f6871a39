//! The connection workers: threads that each run a single-threaded tokio runtime and serve the
//! connections handed to them, from accept to close (nginx's worker processes, as threads).
//!
//! The accept loops run on the process's multi-threaded runtime and hand each accepted socket
//! to the next worker in turn; the worker registers it with its own reactor, so the
//! connection's readiness events, timers and task never leave that thread.
//!
//! Why not the multi-threaded runtime's own scheduling: under a thousand busy keep-alive
//! connections on two cores, its bounded local run queues (256 tasks) spill woken connections
//! into the shared queue, which a worker looks at only every few dozen tasks; those
//! connections wait while others are served again and again. Measured with `bench/http.sh`
//! (1 KiB, `wrk -t2 -c1000`, Debian's nginx side by side): p99 43 ms against nginx's 21 ms on
//! the multi-threaded runtime, 17.6 ms against 15.7 ms with these workers, and requests/s
//! from 0.88x to 1.02x nginx's. A single-threaded runtime keeps one unbounded queue in the
//! order its connections became ready, as an nginx worker's event loop does.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The most workers `server.workers` may ask for.
pub const MAX_WORKERS: usize = 1024;

/// Running workers; dropping this ends them (and any connection still on them).
pub(super) struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
    /// Dropped with `Workers`: each worker's runtime returns and is dropped on its thread.
    _stop: Vec<oneshot::Sender<()>>,
}

/// Each worker's blocking pool (cold file reads): its share of tokio's default of 512 threads,
/// so that the process keeps that bound, not that much per worker.
fn blocking_share(workers: usize) -> usize {
    (512 / workers).max(1)
}

impl Workers {
    /// Starts `count` workers (0: one per CPU this process may run on).
    pub(super) fn start(count: usize) -> io::Result<Workers> {
        let count = match count {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let mut handles = Vec::with_capacity(count);
        let mut stop = Vec::with_capacity(count);
        for index in 0..count {
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let (handle_tx, handle_rx) = std::sync::mpsc::channel();
            // The runtime is built and dropped on its own thread: one dropped inside the
            // caller's runtime (a failed spawn drops its closure) would panic.
            std::thread::Builder::new()
                .name(format!("baton-conn-{index}"))
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .thread_name("baton-blocking")
                        .max_blocking_threads(blocking_share(count))
                        .build();
                    let runtime = match runtime {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            let _ = handle_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = handle_tx.send(Ok(runtime.handle().clone()));
                    // Until `Workers` is dropped; then the runtime, and what is left on it,
                    // is dropped here.
                    let _ = runtime.block_on(stop_rx);
                })?;
            let handle = handle_rx
                .recv()
                .map_err(|_| io::Error::other("a connection worker ended while starting"))??;
            handles.push(handle);
            stop.push(stop_tx);
        }
        Ok(Workers {
            handles,
            next: AtomicUsize::new(0),
            _stop: stop,
        })
    }

    /// The worker for the next connection: each in turn.
    pub(super) fn next(&self) -> &Handle {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[index]
    }

    /// How many there are.
    pub(super) fn len(&self) -> usize {
        self.handles.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_in_turn_on_threads_of_its_own() {
        let workers = Workers::start(3).unwrap();
        assert_eq!(workers.len(), 3);
        let ids: Vec<_> = (0..6)
            .map(|_| {
                let (tx, rx) = std::sync::mpsc::channel();
                workers.next().spawn(async move {
                    tx.send(std::thread::current().name().map(str::to_owned))
                        .unwrap();
                });
                rx.recv().unwrap().unwrap()
            })
            .collect();
        assert_eq!(
            ids,
            ["baton-conn-0", "baton-conn-1", "baton-conn-2"].repeat(2)
        );
    }

    #[test]
    fn the_workers_share_the_blocking_threads() {
        assert_eq!(blocking_share(1), 512);
        assert_eq!(blocking_share(2), 256);
        assert_eq!(blocking_share(3), 170);
        assert_eq!(blocking_share(1024), 1);
    }

    #[test]
    fn zero_is_one_per_cpu() {
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(Workers::start(0).unwrap().len(), cpus);
    }

    #[test]
    fn dropping_them_ends_their_threads() {
        let workers = Workers::start(1).unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        // Held by a task that never ends: dropped only when the worker's runtime is.
        workers.next().spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await
        });
        drop(workers);
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(10)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        );
    }
}
