# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_baton_global_optspecs
    string join \n h/help V/version
end

function __fish_baton_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_baton_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_baton_using_subcommand
    set -l cmd (__fish_baton_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c baton -n "__fish_baton_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c baton -n "__fish_baton_needs_command" -s V -l version -d 'Print version'
complete -c baton -n "__fish_baton_needs_command" -f -a "serve" -d 'Serve HTTP until stopped'
complete -c baton -n "__fish_baton_needs_command" -f -a "check" -d 'Check a configuration file and print every problem in it'
complete -c baton -n "__fish_baton_needs_command" -f -a "reload" -d 'Upgrade a running baton with zero downtime and wait for the outcome'
complete -c baton -n "__fish_baton_needs_command" -f -a "status" -d 'Show a running baton\'s pid, generation, uptime and listeners'
complete -c baton -n "__fish_baton_needs_command" -f -a "stop" -d 'Stop a running baton gracefully and wait until it has exited'
complete -c baton -n "__fish_baton_needs_command" -f -a "help" -d 'Print the help of baton or of one of its commands'
complete -c baton -n "__fish_baton_using_subcommand serve" -l config -d 'Configuration file [default: /etc/baton/baton.toml when it exists, else built-in defaults]' -r -F
complete -c baton -n "__fish_baton_using_subcommand serve" -l listen -d 'Listen on ADDR (IP:PORT, [IPv6]:PORT or unix:/path) under NAME [default name: http]; repeatable; replaces server.listen' -r
complete -c baton -n "__fish_baton_using_subcommand serve" -l root -d 'Serve static files from DIR instead of the embedded page (or give DIR without --root)' -r -F
complete -c baton -n "__fish_baton_using_subcommand serve" -l pidfile -d 'Lock this pidfile for the process\'s life and write the pid into it; a second instance is refused [default with --daemon: /run/baton/baton.pid for root, $XDG_RUNTIME_DIR/baton/baton.pid otherwise]' -r -F
complete -c baton -n "__fish_baton_using_subcommand serve" -l workers -d 'Threads that serve connections, each with its own event loop; 0: one per CPU [default: 0]' -r
complete -c baton -n "__fish_baton_using_subcommand serve" -l max-connections -d 'Most client connections open at once; more wait in the listen backlog [default: 10000]' -r
complete -c baton -n "__fish_baton_using_subcommand serve" -l header-read-timeout -d 'Time a client has to send a complete request head [default: 10s]' -r
complete -c baton -n "__fish_baton_using_subcommand serve" -l idle-timeout -d 'Close keep-alive connections idle for this long [default: 60s]' -r
complete -c baton -n "__fish_baton_using_subcommand serve" -l send-timeout -d 'Close a connection whose client accepts no byte of its response for this long [default: 60s]' -r
complete -c baton -n "__fish_baton_using_subcommand serve" -l drain-timeout -d 'How long in-flight requests may take to finish on stop [default: 30s]' -r
complete -c baton -n "__fish_baton_using_subcommand serve" -l log-level -d 'Log level or filter (error, warn, info, debug, trace); RUST_LOG wins [default: info]' -r
complete -c baton -n "__fish_baton_using_subcommand serve" -l log-file -d 'Append text logs to this file; SIGUSR1 reopens it (for logrotate)' -r -F
complete -c baton -n "__fish_baton_using_subcommand serve" -l access-log -d 'Access log: off, on, stderr, journal or an absolute file path (SIGUSR1 reopens it); without a value: on, i.e. the journal under systemd, else stderr [default: off]' -r
complete -c baton -n "__fish_baton_using_subcommand serve" -l access-log-format -d 'Access log format: combined (nginx\'s) or json [default: combined]' -r
complete -c baton -n "__fish_baton_using_subcommand serve" -l exec -d 'The binary an upgrade starts [default: this executable, by the path it was started with]' -r -F
complete -c baton -n "__fish_baton_using_subcommand serve" -l upgrade-timeout -d 'How long a new process may take to become ready during an upgrade [default: 60s]' -r
complete -c baton -n "__fish_baton_using_subcommand serve" -l upgrade-probation -d 'After an upgrade, the old process stands by this long and takes over again if the new one exits; 0 switches it off [default: 10s]' -r
complete -c baton -n "__fish_baton_using_subcommand serve" -l startsecs -d 'Keeper: a start counts as successful once the generation has been ready this long [default: 1s]' -r
complete -c baton -n "__fish_baton_using_subcommand serve" -l startretries -d 'Keeper: consecutive failed starts retried (after 1s, 2s, 3s, ...) before giving up [default: 3]' -r
complete -c baton -n "__fish_baton_using_subcommand serve" -l not-found-page -d 'Served with 404 when it exists in the root; "" switches it off [default: 404.html]' -r
complete -c baton -n "__fish_baton_using_subcommand serve" -l error-page -d 'Served with a 5xx when it exists in the root; "" switches it off [default: 50x.html]' -r
complete -c baton -n "__fish_baton_using_subcommand serve" -l fallback -d 'Answer a GET or HEAD of a path not found with this file of the root, 200 (single-page apps)' -r
complete -c baton -n "__fish_baton_using_subcommand serve" -l admin-listener -d 'The listener that takes the /-/ endpoints when one has this name [default: admin]' -r
complete -c baton -n "__fish_baton_using_subcommand serve" -l compress -d 'Compress answers of text types as they are sent, for clients that accept it [default: true]' -r -f -a "true\t''
false\t''"
complete -c baton -n "__fish_baton_using_subcommand serve" -l precompressed -d 'Serve FILE.zst, FILE.br, FILE.gz beside FILE to the clients that accept them [default: true]' -r -f -a "true\t''
false\t''"
complete -c baton -n "__fish_baton_using_subcommand serve" -l compress-codings -d 'The codings used, both ways, comma-separated: zstd, br, gzip (all three by default)' -r
complete -c baton -n "__fish_baton_using_subcommand serve" -l compress-min-size -d 'Answers smaller than this many bytes are not compressed on the fly [default: 1024]' -r
complete -c baton -n "__fish_baton_using_subcommand serve" -l cache-control -d 'Cache-Control by path pattern (/assets/**) or content type (text/html), as PATTERN=VALUE; repeatable, the first match wins; replaces headers.cache_control' -r
complete -c baton -n "__fish_baton_using_subcommand serve" -l add-header -d 'Add this header to every answer from the root; repeatable; replaces headers.add' -r
complete -c baton -n "__fish_baton_using_subcommand serve" -l charset -d 'The charset text types get when they name none; "" for none [default: utf-8]' -r
complete -c baton -n "__fish_baton_using_subcommand serve" -l h2c -d 'Take HTTP/2 with prior knowledge (h2c) on this listener too; repeatable; replaces http2.cleartext' -r
complete -c baton -n "__fish_baton_using_subcommand serve" -l h2-max-streams -d 'HTTP/2: streams a client may have open at once on a connection [default: 128]' -r
complete -c baton -n "__fish_baton_using_subcommand serve" -l h2-max-header-list-size -d 'HTTP/2: the most bytes of a request\'s headers [default: 16384]' -r
complete -c baton -n "__fish_baton_using_subcommand serve" -l daemon -d 'Run in the background (daemon(7)) under a keeper; returns once the first generation serves, or fails with its error'
complete -c baton -n "__fish_baton_using_subcommand serve" -l keeper -d 'Run in the foreground under a keeper: a small process that holds the sockets and the pidfile, restarts a generation that crashes, and outlives upgrades (implied by --daemon and when baton is PID 1; never under systemd, i.e. with NOTIFY_SOCKET set)'
complete -c baton -n "__fish_baton_using_subcommand serve" -l listing -d 'List a directory that has no index.html'
complete -c baton -n "__fish_baton_using_subcommand serve" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c baton -n "__fish_baton_using_subcommand serve" -s V -l version -d 'Print version'
complete -c baton -n "__fish_baton_using_subcommand check" -l config -d 'Configuration file [default: /etc/baton/baton.toml]' -r -F
complete -c baton -n "__fish_baton_using_subcommand check" -l pid -d 'The pid of the baton process (e.g. $MAINPID under systemd)' -r
complete -c baton -n "__fish_baton_using_subcommand check" -l pidfile -d 'The pidfile of the baton process; its pid counts only while the file is locked [default: /run/baton/baton.pid for root, $XDG_RUNTIME_DIR/baton/baton.pid otherwise]' -r -F
complete -c baton -n "__fish_baton_using_subcommand check" -l unit -d 'The systemd unit whose main process to address [default, when the default pidfile is not held: baton.service]' -r
complete -c baton -n "__fish_baton_using_subcommand check" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c baton -n "__fish_baton_using_subcommand check" -s V -l version -d 'Print version'
complete -c baton -n "__fish_baton_using_subcommand reload" -l pid -d 'The pid of the baton process (e.g. $MAINPID under systemd)' -r
complete -c baton -n "__fish_baton_using_subcommand reload" -l pidfile -d 'The pidfile of the baton process; its pid counts only while the file is locked [default: /run/baton/baton.pid for root, $XDG_RUNTIME_DIR/baton/baton.pid otherwise]' -r -F
complete -c baton -n "__fish_baton_using_subcommand reload" -l unit -d 'The systemd unit whose main process to address [default, when the default pidfile is not held: baton.service]' -r
complete -c baton -n "__fish_baton_using_subcommand reload" -l timeout -d 'Give up waiting after this long' -r
complete -c baton -n "__fish_baton_using_subcommand reload" -l wait -d 'Wait for the end of the probation (upgrade.probation) too, and fail if the new process exited within it and the old one took over again'
complete -c baton -n "__fish_baton_using_subcommand reload" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c baton -n "__fish_baton_using_subcommand reload" -s V -l version -d 'Print version'
complete -c baton -n "__fish_baton_using_subcommand status" -l pid -d 'The pid of the baton process (e.g. $MAINPID under systemd)' -r
complete -c baton -n "__fish_baton_using_subcommand status" -l pidfile -d 'The pidfile of the baton process; its pid counts only while the file is locked [default: /run/baton/baton.pid for root, $XDG_RUNTIME_DIR/baton/baton.pid otherwise]' -r -F
complete -c baton -n "__fish_baton_using_subcommand status" -l unit -d 'The systemd unit whose main process to address [default, when the default pidfile is not held: baton.service]' -r
complete -c baton -n "__fish_baton_using_subcommand status" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c baton -n "__fish_baton_using_subcommand status" -s V -l version -d 'Print version'
complete -c baton -n "__fish_baton_using_subcommand stop" -l pid -d 'The pid of the baton process (e.g. $MAINPID under systemd)' -r
complete -c baton -n "__fish_baton_using_subcommand stop" -l pidfile -d 'The pidfile of the baton process; its pid counts only while the file is locked [default: /run/baton/baton.pid for root, $XDG_RUNTIME_DIR/baton/baton.pid otherwise]' -r -F
complete -c baton -n "__fish_baton_using_subcommand stop" -l unit -d 'The systemd unit whose main process to address [default, when the default pidfile is not held: baton.service]' -r
complete -c baton -n "__fish_baton_using_subcommand stop" -l timeout -d 'Give up waiting after this long; the drain itself is bounded by shutdown.drain_timeout' -r
complete -c baton -n "__fish_baton_using_subcommand stop" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c baton -n "__fish_baton_using_subcommand stop" -s V -l version -d 'Print version'
complete -c baton -n "__fish_baton_using_subcommand help" -s h -l help -d 'Print help'
complete -c baton -n "__fish_baton_using_subcommand help" -s V -l version -d 'Print version'
