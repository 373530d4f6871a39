//! systemd's file descriptor store: listeners baton bound itself survive a crash or a restart.
//!
//! A listener that `baton.socket` hands in lives in systemd, which keeps it open while baton
//! crashes, restarts or upgrades. A listener baton bound itself (configured, but not in the
//! socket unit) lived only in baton's processes: a crash closed it, and until the restarted
//! process bound it again every client was refused. With `FileDescriptorStoreMax=` in the unit,
//! the main process pushes such listeners to the unit's fd store (`FDSTORE=1`, `FDNAME=`,
//! `FDPOLL=0`: a listening socket has nothing to report by polling, and must not be dropped for
//! it); systemd keeps its copy open across a crash-restart and a `systemctl restart`, and passes
//! it to the next start in `LISTEN_FDS`. Connections meanwhile wait in the socket's backlog
//! instead of being refused.
//!
//! # Names
//!
//! A stored listener's fd name is [`PREFIX`] + the listener's name: `bound/extra` for the
//! listener `extra`. The prefix tells a stored fd apart from a socket unit's fd (listener names
//! cannot contain `/`, see `ListenSpec`), so at the next start ([`crate::activation`]):
//! - a `bound/NAME` fd serves the listener `NAME`, as a socket unit's fd would, unless a socket
//!   unit's fd serves that listener too (then the stored one is stale);
//! - a `bound/NAME` fd with no listener `NAME` in the configuration (the listener was removed)
//!   is closed, logged, and removed from the store with `FDSTOREREMOVE=1` + `FDNAME=`
//!   ([`remove_later`]), instead of failing the start; a socket unit's fd with an unknown name
//!   stays an error.
//!
//! The name also travels from one generation to the next in `LISTEN_FDNAMES` during an upgrade
//! (see [`crate::activation::Listener::handover_name`]), so the new generation still knows
//! which of its inherited listeners are self-bound and pushes them too once it is the main pid:
//! systemd ignores an fd it already stores (same open file description). A stored listener
//! whose configured address changed is stale: baton binds the new address and the old name is
//! removed from the store before the new socket is pushed under it; a stored socket whose
//! address a renamed listener has now serves that listener, and its old name is removed from
//! the store so that the push under the new name is not ignored as a duplicate.
//!
//! # When
//!
//! Under `NotifyAccess=main` only the main pid may push, so [`on_main_pid`] is called by the
//! process that is the main pid and serves: the first generation when it sends `READY=1`, a new
//! generation once its predecessor has made it the main pid. It first sends the removals noted
//! at start, then one `FDSTORE=1` datagram per self-bound listener. Without `NOTIFY_SOCKET`
//! it does nothing. With `FileDescriptorStoreMax=0` (systemd's default) systemd refuses the push
//! and closes its copy: that costs one warning in the journal from systemd and nothing else;
//! the listener then behaves as before (a crash closes it).

use std::os::fd::BorrowedFd;
use std::sync::Mutex;

use sd_notify::NotifyState;

use crate::notify;

/// The fd name prefix of a listener baton bound itself; the listener's name follows.
pub const PREFIX: &str = "bound/";

/// The longest fd name systemd accepts (`FDNAME_MAX`); a longer `FDNAME=` is stored under the
/// default name "stored", which would not find its listener again.
pub const FDNAME_MAX: usize = 255;

/// What the start found, told once this process is the main pid (sockets are resolved before
/// logging is set up): stale stored fds (fd name, fd number, why).
#[derive(Default)]
struct Pending {
    removals: Vec<(String, i32, String)>,
}

static PENDING: Mutex<Pending> = Mutex::new(Pending {
    removals: Vec::new(),
});

fn pending() -> std::sync::MutexGuard<'static, Pending> {
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

/// The fd name under which the listener `listener` is stored and handed over.
pub fn stored_name(listener: &str) -> String {
    format!("{PREFIX}{listener}")
}

/// The listener a stored fd name belongs to, or `None` for a name not made by
/// [`stored_name`] (a socket unit's fd).
pub fn listener_of(fd_name: &str) -> Option<&str> {
    fd_name.strip_prefix(PREFIX).filter(|l| !l.is_empty())
}

/// Notes a stale stored fd name (its fd closed already, or kept under another name: `fd` is
/// the number it had) to remove from the store with `FDSTOREREMOVE=1` and to log, with `why`,
/// at [`on_main_pid`].
pub fn remove_later(fd_name: &str, fd: i32, why: String) {
    let mut pending = pending();
    if !pending.removals.iter().any(|(n, _, _)| n == fd_name) {
        pending.removals.push((fd_name.to_owned(), fd, why));
    }
}

/// Which of `sockets` (the listeners by their handover names) to push: those with [`PREFIX`]
/// (the others belong to a socket unit), unless their name is too long for systemd.
#[allow(clippy::type_complexity)]
fn plan<'a, 'b>(
    sockets: &'b [(BorrowedFd<'a>, &'b str)],
) -> (Vec<(BorrowedFd<'a>, &'b str)>, Vec<&'b str>) {
    let (mut pushes, mut too_long) = (Vec::new(), Vec::new());
    for (fd, name) in sockets {
        if listener_of(name).is_none() {
            continue;
        }
        if name.len() > FDNAME_MAX {
            too_long.push(*name);
        } else {
            pushes.push((*fd, *name));
        }
    }
    (pushes, too_long)
}

/// Updates systemd's fd store: call it when this process has become the unit's main pid and
/// serves (where it sends `READY=1`). `sockets` are this process's listening sockets with their
/// handover names ([`crate::upgrade::Upgrader::sockets`]).
///
/// Logs what the start found (stale stored fds), sends `FDSTOREREMOVE=1` +
/// `FDNAME=` for each stored fd found stale at start, then, for each self-bound listener, `FDSTORE=1` + `FDNAME=bound/NAME` + `FDPOLL=0` with the socket. Does
/// nothing without `NOTIFY_SOCKET`. Failures are logged, never fatal: without the store a
/// listener is only as durable as it was before.
pub fn on_main_pid<'a>(sockets: impl IntoIterator<Item = (BorrowedFd<'a>, &'a str)>) {
    let Pending { removals } = std::mem::take(&mut *pending());
    let enabled = notify::enabled();
    for (name, fd, why) in &removals {
        let removed = match enabled {
            false => Ok(false),
            true => notify::send_with_fds(
                &[NotifyState::FdStoreRemove, NotifyState::FdName(name)],
                &[],
            )
            .map(|()| true),
        };
        let outcome = match removed {
            Ok(true) => "asked systemd to remove it from its fd store",
            Ok(false) => "no service manager to tell",
            Err(ref e) => {
                tracing::warn!("cannot ask systemd to remove '{name}' from its fd store: {e}");
                "it stays in systemd's fd store"
            }
        };
        tracing::info!(
            event = "fdstore-stale",
            fd = fd,
            fd_name = %name,
            "fd {fd} ('{name}', a listener baton bound earlier): {why}; {outcome}"
        );
    }
    if !enabled {
        return;
    }
    let sockets: Vec<(BorrowedFd<'a>, &'a str)> = sockets.into_iter().collect();
    let (pushes, too_long) = plan(&sockets);
    for name in too_long {
        tracing::warn!(
            fd_name = name,
            "listener '{}' is not kept in systemd's fd store: its fd name would be longer than {FDNAME_MAX} characters; shorten the name",
            listener_of(name).unwrap_or(name)
        );
    }
    for (fd, name) in pushes {
        match notify::send_with_fds(
            &[
                NotifyState::FdStore,
                NotifyState::FdName(name),
                NotifyState::Custom("FDPOLL=0"),
            ],
            &[fd],
        ) {
            Ok(()) => tracing::info!(
                event = "fdstore-pushed",
                fd_name = name,
                "offered listener '{}' to systemd's fd store as '{name}' (kept if FileDescriptorStoreMax= allows)",
                listener_of(name).unwrap_or(name)
            ),
            Err(e) => tracing::warn!(
                fd_name = name,
                "cannot offer listener '{}' to systemd's fd store: {e}; a crash will close it",
                listener_of(name).unwrap_or(name)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn stored_names_round_trip_and_socket_unit_names_are_not_stored() {
        assert_eq!(stored_name("extra"), "bound/extra");
        assert_eq!(listener_of("bound/extra"), Some("extra"));
        assert_eq!(listener_of(&stored_name("a.b_c-1")), Some("a.b_c-1"));
        for unit_name in [
            "http",
            "baton.socket",
            "",
            "bound",
            "bound/",
            "xbound/extra",
        ] {
            assert_eq!(listener_of(unit_name), None, "{unit_name:?}");
        }
    }

    #[test]
    fn only_prefixed_names_short_enough_for_systemd_are_pushed() {
        let (a, b) = (
            std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
            std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        );
        let long = stored_name(&"x".repeat(250));
        let sockets = [
            (a.as_fd(), "http"),
            (b.as_fd(), "bound/extra"),
            (b.as_fd(), long.as_str()),
        ];
        let (push, too_long) = plan(&sockets);
        assert_eq!(
            push.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
            ["bound/extra"]
        );
        assert_eq!(too_long, [long.as_str()]);
    }
}
