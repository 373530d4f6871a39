//! The manual page baton(8) and the shell completions, generated from the command-line
//! definition ([`crate::cli::Cli`]) so that they cannot drift from it.
//!
//! `baton generate --out DIR` (a hidden command, run at package build time) writes `baton.8`
//! and the completions for bash, zsh and fish. The page renders clap's definition (name,
//! synopsis, description, every command with every option) and adds what clap does not know:
//! signals, files, environment and exit status.

use std::io::{self, Write};
use std::path::Path;

use clap::CommandFactory;
use roff::{bold, italic, roman, Roff};

use crate::cli::Cli;

/// Writes `baton.8` and the completions into `dir`.
pub fn generate(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut page = Vec::new();
    render(&mut page)?;
    std::fs::write(dir.join("baton.8"), page)?;
    for (shell, file) in [
        (clap_complete::Shell::Bash, "baton.bash"),
        (clap_complete::Shell::Zsh, "_baton"),
        (clap_complete::Shell::Fish, "baton.fish"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "baton", &mut out);
        std::fs::write(dir.join(file), out)?;
    }
    Ok(())
}

/// Renders baton(8).
pub fn render(w: &mut dyn Write) -> io::Result<()> {
    let cmd = Cli::command().name("baton");
    let man = clap_mangen::Man::new(cmd.clone())
        .section("8")
        .manual("System Manager's Manual")
        .source(format!("baton {}", crate::VERSION));
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;

    let mut roff = Roff::new();
    roff.control("SH", ["COMMANDS"]);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = sub.get_name();
        roff.control("SS", [format!("baton {name} [OPTIONS]").as_str()]);
        if let Some(about) = sub.get_long_about().or(sub.get_about()) {
            for paragraph in about.to_string().split("\n\n") {
                roff.text([roman(paragraph.replace('\n', " "))]);
                roff.control("PP", []);
            }
        }
        for arg in sub.get_arguments().filter(|a| !a.is_hide_set()) {
            let mut flag = Vec::new();
            if let Some(short) = arg.get_short() {
                flag.push(bold(format!("-{short}")));
                flag.push(roman(", "));
            }
            if let Some(long) = arg.get_long() {
                flag.push(bold(format!("--{long}")));
            }
            if arg.get_action().takes_values() {
                if let Some(names) = arg.get_value_names() {
                    flag.push(roman(" "));
                    flag.push(italic(
                        names
                            .iter()
                            .map(|n| n.as_str())
                            .collect::<Vec<_>>()
                            .join(" "),
                    ));
                }
            }
            roff.control("TP", []);
            roff.text(flag);
            if let Some(help) = arg.get_long_help().or(arg.get_help()) {
                roff.text([roman(help.to_string().replace('\n', " "))]);
            }
        }
    }
    section(&mut roff, "SIGNALS", &[
        ("SIGTERM, SIGINT", "Stop accepting, let in-flight requests finish for up to shutdown.drain_timeout (Connection: close on every response, a short grace for idle keep-alive connections), exit 0. A second one exits at once with status 1."),
        ("SIGUSR2, SIGHUP", "Upgrade without downtime: start the executable again (the path baton was started with, or upgrade.exec), hand it the listening sockets, stop accepting and drain, stand by for the probation (upgrade.probation) and take over again if the new process exits within it, else make it the main process and exit 0. On failure the old process keeps serving. One upgrade at a time; further signals are ignored until it ends, and one during a probation ends it early."),
        ("SIGUSR1", "Reopen the log file (--log-file), for logrotate."),
    ]);
    section(&mut roff, "FILES", &[
        ("/etc/baton/baton.toml", "The configuration, read when no --config is given and it exists; baton check validates it. Every key is described in the shipped file."),
        ("/usr/share/baton/www", "The web root of the packaged configuration."),
        ("/run/baton/baton.pid", "The default pidfile for root with --daemon ($XDG_RUNTIME_DIR/baton/baton.pid for other users). Locked with flock(2) while baton runs; the lock, not the pid, tells whether it runs."),
        ("baton.socket, baton.service", "The systemd units: socket activation (FileDescriptorName=http), Type=notify, ExecReload=baton reload --pid $MAINPID, so that systemctl reload is a zero-downtime upgrade that fails when the upgrade fails."),
        ("/run/baton/control/PID", "The control socket of each process, used by baton reload, status and stop: in $RUNTIME_DIRECTORY/control under systemd (RuntimeDirectory=baton), /run/baton/control for root, $XDG_RUNTIME_DIR/baton/control otherwise. The directory is mode 0700 and the socket 0600: only the process's own user and root can use it."),
    ]);
    section(&mut roff, "ENVIRONMENT", &[
        ("LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES, LISTEN_FDS_FIRST_FD", "Socket activation (sd_listen_fds(3)); removed once read. Without LISTEN_PID, the sockets are taken only when LISTEN_FDS_FIRST_FD names the first one (systemfd --no-pid)."),
        ("NOTIFY_SOCKET, WATCHDOG_USEC", "Readiness, status and watchdog notifications to the service manager (sd_notify(3))."),
        ("JOURNAL_STREAM", "When it names stderr, logs go to the journal with structured BATON_* fields."),
        ("RUNTIME_DIRECTORY", "Where the control socket goes (systemd's RuntimeDirectory=)."),
        ("BATON_FOR_PID", "The pid baton's private BATON_* variables (handed from one generation to the next, or from the keeper) are meant for; stray ones in any other process are ignored."),
        ("RUST_LOG", "A log filter; wins over --log-level and log.level."),
    ]);
    section(&mut roff, "EXIT STATUS", &[
        ("0", "Success."),
        ("1", "Failure: a bad configuration, a socket problem, a failed upgrade (baton reload), a process that did not stop in time (baton stop). One line per problem on stderr, or an event in the journal."),
        ("2", "Bad command-line usage."),
        ("3", "baton status: not running."),
        ("4", "baton status: this user may not ask (the process is another user's); the reason on stderr."),
    ]);
    roff.control("SH", ["SEE ALSO"]);
    roff.text([roman("systemctl(1), systemd.socket(5), systemd.service(5), sd_notify(3), sd_listen_fds(3), logrotate(8)")]);
    roff.to_writer(w)?;
    man.render_version_section(w)
}

fn section(roff: &mut Roff, title: &str, entries: &[(&str, &str)]) {
    roff.control("SH", [title]);
    for (term, text) in entries {
        roff.control("TP", []);
        roff.text([bold(*term)]);
        roff.text([roman(*text)]);
    }
}
