//! The manual page baton(8) and the shell completions, generated from the command-line
//! definition (the [`clap::Command`] the caller passes in, `baton generate`'s own) so that they
//! cannot drift from it.
//!
//! `baton generate --out DIR` (a hidden command) writes `baton.8` and the completions for
//! bash, zsh and fish. They are committed in [`GENERATED_DIR`], which the package takes them
//! from, so that a plain `cargo deb` builds the complete package; a unit test fails when they
//! are stale and names the command that regenerates them. The page renders clap's definition
//! (name, synopsis, description, every command with every option) and adds what clap does not
//! know: the configuration keys ([`crate::config::KEYS`], the parser's own table), examples,
//! signals, files, environment and exit status.
//!
//! The generated files name the version of `Cargo.toml`, not one stamped with
//! `BATON_VERSION`, so that they do not depend on how the binary was built.

use std::io::{self, Write};
use std::path::Path;

use roff::{bold, italic, roman, Roff};

use crate::config::{DEFAULT_CONFIG_PATH, KEYS};

/// Where the generated files are committed, relative to the source tree; the package's assets
/// (`[package.metadata.deb]` in `Cargo.toml`) come from here.
pub const GENERATED_DIR: &str = "packaging/generated";

/// The command that regenerates [`GENERATED_DIR`].
pub const REGENERATE: &str = "cargo run -- generate --out packaging/generated";

/// The version the generated files name.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Every generated file for the command line `cli`: its name and contents.
pub fn files(cli: &clap::Command) -> io::Result<Vec<(&'static str, Vec<u8>)>> {
    let mut page = Vec::new();
    render(cli, &mut page)?;
    let mut files = vec![("baton.8", page)];
    for (shell, file) in [
        (clap_complete::Shell::Bash, "baton.bash"),
        (clap_complete::Shell::Zsh, "_baton"),
        (clap_complete::Shell::Fish, "baton.fish"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut public_command(cli), "baton", &mut out);
        files.push((file, out));
    }
    Ok(files)
}

/// Writes `baton.8` and the completions for the command line `cli` into `dir`.
pub fn generate(cli: &clap::Command, dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, contents) in files(cli)? {
        std::fs::write(dir.join(name), contents)?;
    }
    Ok(())
}

/// The command line without its hidden commands (clap_complete offers those too), for the
/// completions.
pub fn public_command(cli: &clap::Command) -> clap::Command {
    let full = cli.clone().version(VERSION);
    let mut public = clap::Command::new("baton")
        .version(VERSION)
        .propagate_version(full.is_propagate_version_set())
        .disable_help_subcommand(full.is_disable_help_subcommand_set())
        .subcommand_required(full.is_subcommand_required_set())
        .about(full.get_about().cloned().unwrap_or_default())
        .long_about(full.get_long_about().cloned().unwrap_or_default());
    for arg in full.get_arguments() {
        public = public.arg(arg.clone());
    }
    for sub in full.get_subcommands().filter(|s| !s.is_hide_set()) {
        public = public.subcommand(sub.clone());
    }
    public
}

/// Renders baton(8) for the command line `cli`.
pub fn render(cli: &clap::Command, w: &mut dyn Write) -> io::Result<()> {
    let cmd = cli.clone().name("baton").version(VERSION);
    let man = clap_mangen::Man::new(cmd.clone())
        .section("8")
        .manual("System Manager's Manual")
        .source(format!("baton {VERSION}"));
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;

    let mut roff = Roff::new();
    roff.control("SH", ["COMMANDS"]);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = sub.get_name();
        let mut synopsis = format!("baton {name}");
        if sub
            .get_arguments()
            .any(|a| !a.is_positional() && !a.is_hide_set())
        {
            synopsis.push_str(" [OPTIONS]");
        }
        for arg in sub.get_positionals() {
            let value = arg
                .get_value_names()
                .map_or(arg.get_id().as_str(), |n| n[0].as_str());
            synopsis.push_str(&format!(" [{value}]"));
        }
        roff.control("SS", [synopsis.as_str()]);
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
            if takes_values(arg) {
                if let Some(names) = arg.get_value_names() {
                    if !flag.is_empty() {
                        flag.push(roman(" "));
                    }
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
                let mut help = help.to_string().replace('\n', " ");
                let defaults: Vec<_> = arg
                    .get_default_values()
                    .iter()
                    .map(|v| v.to_string_lossy())
                    .collect();
                if !defaults.is_empty() {
                    help.push_str(&format!(" [default: {}]", defaults.join(", ")));
                }
                let values: Vec<_> = arg
                    .get_possible_values()
                    .into_iter()
                    .filter(|v| !v.is_hide_set())
                    .map(|v| v.get_name().to_owned())
                    .collect();
                if takes_values(arg) && !values.is_empty() {
                    help.push_str(&format!(" [possible values: {}]", values.join(", ")));
                }
                roff.text([roman(help)]);
            }
        }
    }
    configuration(&mut roff);
    examples(&mut roff);
    section(&mut roff, "SIGNALS", &[
        ("SIGTERM, SIGINT", "Stop accepting, let in-flight requests finish for up to shutdown.drain_timeout (Connection: close on every response, a short grace for idle keep-alive connections), exit 0. A second one exits at once with status 1."),
        ("SIGUSR2, SIGHUP", "Upgrade without downtime: start the executable again (the path baton was started with, or upgrade.exec), hand it the listening sockets, stop accepting and drain, stand by for the probation (upgrade.probation) and take over again if the new process exits within it, else make it the main process and exit 0. On failure the old process keeps serving. One upgrade at a time; further signals are ignored until it ends, and one during a probation ends it early."),
        ("SIGUSR1", "Reopen the log file (--log-file), for logrotate."),
    ]);
    section(&mut roff, "FILES", &[
        ("/etc/baton/baton.toml", "The configuration, read when no --config is given and it exists; baton check validates it. Every key is listed under CONFIGURATION."),
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

/// Whether the option takes a value: not a flag whose action stores a value but which takes
/// no argument (`num_args = 0`).
fn takes_values(arg: &clap::Arg) -> bool {
    arg.get_action().takes_values() && arg.get_num_args().is_none_or(|n| n.takes_values())
}

/// A configuration file for EXAMPLES (a unit test checks that it is valid).
pub const EXAMPLE_CONFIG: &str = r#"[server]
listen = ["http=0.0.0.0:80", "local=[::1]:8080"]
root = "/srv/www"

[limits]
max_connections = 2000
idle_timeout = "30s"

[log]
access = "/var/log/baton/access.log"

[upgrade]
probation = "30s"
"#;

/// CONFIGURATION: every key of the file, from the parser's own table.
fn configuration(roff: &mut Roff) {
    roff.control("SH", ["CONFIGURATION"]);
    roff.text([roman(format!(
        "The configuration file is TOML: {DEFAULT_CONFIG_PATH}, or the file given with --config. \
         Every key is optional; the key section.name below is the key name in the table [section]. \
         Command-line options win over the file, the file over the defaults. Durations are strings \
         such as \"30s\", \"500ms\" or \"2m\", at most a day. Unknown keys and bad values are \
         errors, all reported at once, one line each; baton check reports them without starting. \
         Under systemd, baton.socket's sockets win over server.listen for the listeners of the \
         same name."
    ))]);
    let mut current = "";
    for key in KEYS {
        if key.section != current {
            current = key.section;
            roff.control("SS", [format!("[{current}]").as_str()]);
        }
        let default = match key.default {
            Some(value) => format!("default {value}"),
            None => format!("unset by default: {}", key.unset),
        };
        roff.control("TP", []);
        roff.text([
            bold(key.path()),
            roman(" ("),
            italic(key.kind),
            roman(format!("; {default})")),
        ]);
        roff.text([roman(key.help)]);
    }
}

/// EXAMPLES.
fn examples(roff: &mut Roff) {
    roff.control("SH", ["EXAMPLES"]);
    for (command, text) in [
        ("baton serve .", "Serve the current directory at http://127.0.0.1:8080/ until Ctrl-C."),
        ("baton serve /srv/www --listen 0.0.0.0:8000 --access-log", "Serve /srv/www on port 8000 of every IPv4 address, one access log line per request on stderr (in nginx's combined format)."),
        ("baton serve /srv/www --access-log /var/log/baton/access.log --access-log-format json", "The access log in a file, as JSON lines with the duration, the host and the generation; logrotate sends SIGUSR1 to reopen it."),
        ("journalctl -u baton BATON_EVENT=access BATON_STATUS=404", "With log.access = \"journal\" (or \"on\" under systemd): the requests answered 404."),
        ("baton serve --listen http=127.0.0.1:8080 --listen local=unix:/tmp/baton.sock", "Serve the embedded page on a TCP port and on a unix socket."),
        ("baton check", "Check /etc/baton/baton.toml and print every problem in it; exits 1 if there is one."),
        ("systemctl reload baton", "After editing /etc/baton/baton.toml or installing a new binary: upgrade the packaged service without dropping a connection. The command fails, and the old process keeps serving, if the new one does not come up."),
        ("journalctl -u baton BATON_EVENT=upgrade-failed", "Why upgrades of the packaged service failed."),
        ("baton serve --daemon /srv/www", "Without systemd: run in the background, guarded by the pidfile /run/baton/baton.pid (root) or $XDG_RUNTIME_DIR/baton/baton.pid; returns once it serves."),
        ("baton status; baton reload; baton stop", "Without systemd: show, upgrade without downtime, and stop the daemon started above, found by its default pidfile."),
    ] {
        roff.control("TP", []);
        roff.text([bold(command)]);
        roff.text([roman(text)]);
    }
    roff.control("PP", []);
    roff.text([roman("A configuration file that serves /srv/www on port 80 of every IPv4 address and port 8080 of the IPv6 loopback, logs every request, allows 2000 connections and keeps the previous process on standby for 30 seconds after each upgrade:")]);
    roff.control("PP", []);
    roff.control("RS", ["4"]);
    roff.control("nf", []);
    for line in EXAMPLE_CONFIG.lines() {
        roff.text([roman(line)]);
    }
    roff.control("fi", []);
    roff.control("RE", []);
}

fn section(roff: &mut Roff, title: &str, entries: &[(&str, &str)]) {
    roff.control("SH", [title]);
    for (term, text) in entries {
        roff.control("TP", []);
        roff.text([bold(*term)]);
        roff.text([roman(*text)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_configuration_is_valid() {
        let config = crate::config::Config::from_toml_str(EXAMPLE_CONFIG, None).unwrap();
        assert_eq!(config.listeners.len(), 2);
        assert_eq!(config.limits.max_connections, 2000);
    }
}
