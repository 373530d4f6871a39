//! Signal intake: turns POSIX signals into lifecycle events.
//!
//! | signal          | event                                  |
//! |-----------------|----------------------------------------|
//! | SIGTERM, SIGINT | [`Event::Stop`]: drain and exit         |
//! | SIGUSR2, SIGHUP | [`Event::Upgrade`]: start the next generation |
//! | SIGUSR1         | [`Event::ReopenLogs`]                   |
//!
//! The handlers are tokio's: they only record the signal, and the lifecycle reacts in its own
//! task, so no work runs in signal context. Installing them replaces the default actions, which
//! would otherwise kill the process (SIGHUP, SIGUSR1, SIGUSR2).

use std::io;

use tokio::signal::unix::{signal, Signal, SignalKind};

/// What a signal asks the process to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Stop(&'static str),
    Upgrade(&'static str),
    ReopenLogs,
}

/// The installed handlers. Create it inside the runtime, as early as possible.
pub struct Signals {
    term: Signal,
    int: Signal,
    usr2: Signal,
    hup: Signal,
    usr1: Signal,
}

impl Signals {
    pub fn install() -> io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            usr2: signal(SignalKind::user_defined2())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
        })
    }

    /// The next event. Several deliveries of one signal before this is polled count once.
    pub async fn recv(&mut self) -> Event {
        tokio::select! {
            _ = self.term.recv() => Event::Stop("SIGTERM"),
            _ = self.int.recv() => Event::Stop("SIGINT"),
            _ = self.usr2.recv() => Event::Upgrade("SIGUSR2"),
            _ = self.hup.recv() => Event::Upgrade("SIGHUP"),
            _ = self.usr1.recv() => Event::ReopenLogs,
        }
    }
}
