//! Signal intake: turns POSIX signals into lifecycle events, by a [`SignalMap`].
//!
//! | signal (default map) | event                                  |
//! |----------------------|----------------------------------------|
//! | SIGTERM, SIGINT      | [`Event::Stop`]: drain and exit         |
//! | SIGUSR2, SIGHUP      | [`Event::Upgrade`]: start the next generation |
//! | SIGUSR1              | [`Event::ReopenLogs`]                   |
//!
//! The handlers are tokio's: they only record the signal, and the lifecycle reacts in its own
//! task, so no work runs in signal context. Installing them replaces the default actions, which
//! would otherwise kill the process (SIGHUP, SIGUSR1, SIGUSR2). Without systemd the keeper
//! forwards SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 to the main generation.

use std::future::poll_fn;
use std::io;
use std::task::Poll;

use nix::sys::signal::Signal as Sig;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// What a signal asks the process to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Stop(&'static str),
    Upgrade(&'static str),
    ReopenLogs,
}

/// Which signals mean what. A signal in none of the lists keeps its default action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalMap {
    pub stop: Vec<Sig>,
    pub upgrade: Vec<Sig>,
    pub reopen_logs: Vec<Sig>,
}

impl Default for SignalMap {
    /// SIGTERM and SIGINT stop, SIGUSR2 and SIGHUP upgrade, SIGUSR1 reopens the logs.
    fn default() -> Self {
        SignalMap {
            stop: vec![Sig::SIGTERM, Sig::SIGINT],
            upgrade: vec![Sig::SIGUSR2, Sig::SIGHUP],
            reopen_logs: vec![Sig::SIGUSR1],
        }
    }
}

/// The installed handlers. Create it inside the runtime, as early as possible.
pub struct Signals {
    handlers: Vec<(Signal, Event)>,
}

impl Signals {
    /// Installs a handler for every signal of `map`.
    pub fn install(map: &SignalMap) -> io::Result<Signals> {
        let mut handlers = Vec::new();
        let events = map
            .stop
            .iter()
            .map(|s| (*s, Event::Stop(s.as_str())))
            .chain(map.upgrade.iter().map(|s| (*s, Event::Upgrade(s.as_str()))))
            .chain(map.reopen_logs.iter().map(|s| (*s, Event::ReopenLogs)));
        for (sig, event) in events {
            handlers.push((signal(SignalKind::from_raw(sig as i32))?, event));
        }
        Ok(Signals { handlers })
    }

    /// The next event. Several deliveries of one signal before this is polled count once.
    pub async fn recv(&mut self) -> Event {
        poll_fn(|cx| {
            for (handler, event) in &mut self.handlers {
                if handler.poll_recv(cx).is_ready() {
                    return Poll::Ready(*event);
                }
            }
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_mapped_signal_becomes_its_event() {
        let map = SignalMap {
            stop: vec![],
            upgrade: vec![Sig::SIGWINCH],
            reopen_logs: vec![],
        };
        let mut signals = Signals::install(&map).unwrap();
        nix::sys::signal::raise(Sig::SIGWINCH).unwrap();
        assert_eq!(signals.recv().await, Event::Upgrade("SIGWINCH"));
    }
}
