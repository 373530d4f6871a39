#!/usr/bin/env bash
# bench/upgrade.sh: what an upgrade under load costs, three ways side by side on loopback, each
# serving the same 1 KiB file as bench/http.sh under the same wrk load (-t2 -c64, keep-alive):
#
#   baton    baton's own upgrade, UPGRADES times: SIGUSR2 to the current generation, then
#            its log read until another generation says it serves (TRIGGER=signal), or `baton
#            reload --pid <current>` (TRIGGER=cli, which also starts a CLI process per upgrade);
#            then GET /-/version, which must come from the new generation (asked again
#            while the old one still answers)
#   nginx    nginx's binary upgrade: USR2 to the master, wait for the new pid file, QUIT to the
#            old master, wait until it is gone; UPGRADES times
#   restart  a plain restart of a socket-activated baton: this benchmark holds the listening
#            socket (bench/supervise.py, as systemd's socket unit would) and restarts baton with
#            SIGTERM, wait for its exit, start the next one; UPGRADES times
#
# Each scenario: a warm-up, a steady run without upgrades, then a run of the same length with
# the upgrades spaced evenly in it (one every INTERVAL, from LEAD seconds on). For baton, a
# "probes" run in between does the benchmark's own work of each upgrade (a read of the log or a
# baton CLI call, a GET of /-/version) on the same schedule without upgrading: what that costs
# is not the upgrade's. It reports the
# requests wrk saw fail (socket errors connect/read/write/timeout, non-2xx/3xx answers), wrk's
# latency during the upgrades against the steady run, and how long each switch took. baton and
# nginx run under a subreaper (bench/supervise.py), so every process an upgrade leaves behind is
# seen to exit, with its status, and its CPU time is accounted for.
#
# wrk's latency percentiles are corrected for coordinated omission (wrk's stats_correct): a
# request that took L adds samples at L minus each multiple of the mean time between requests,
# so a stall of a few ms on all connections weighs far more in wrk's p99 than in what the
# requests took. bench/wrk-stalls.sh prints both, with the stalls.
#
# A benchmark that prints figures, not a test: it exits 0 whatever the verdict (non-zero only
# when it cannot run). The machine is assumed noisy: the "others" column is the share of CPU
# that neither the server nor the benchmark's own processes used; a scenario whose runs exceed
# NOISE_MAX is run again (RETRIES times) and the quieter attempt is kept.
#
# Environment (defaults in brackets):
#   UPGRADES [100]      upgrades (or restarts) per scenario
#   INTERVAL [0.15]     seconds from one upgrade's start to the next one's
#   LEAD [1] TAIL [2]   seconds of load before the first upgrade / after the last one
#   DURATION            wrk -d of both runs [LEAD + UPGRADES * INTERVAL + TAIL, whole seconds]
#   WARMUP [2s]         wrk -d of the warm-up per scenario (0 to skip)
#   THREADS [2]         wrk -t
#   CONNECTIONS [64]    wrk -c
#   DRAIN_TIMEOUT [5s]  baton --drain-timeout
#   NOISE_MAX [5]       "others" (%) above which a run counts as noisy
#   RETRIES [1]         reruns of a scenario whose runs were noisy
#   PROBES [1]          baton: also a "probes" run, with the benchmark's own per-upgrade work
#                       (a read of the log and GET /-/version; with TRIGGER=cli baton status
#                       and GET /-/version) on the same schedule but no upgrade (0: skip)
#   ROUNDS [1]          steady, probes and upgrade runs per attempt, in turn; latencies are the
#                       medians over the rounds, failures and upgrades the sums (a run's p99
#                       alone moves by 2x from one run to the next on a shared 2-core machine)
#   TRIGGER [signal]    baton: how an upgrade is asked for: signal (kill -USR2, a bash builtin:
#                       the new generation is the only process started) or cli (baton reload)
#   PIN                 SERVER/LOAD, CPU lists for taskset, e.g. 0/1: each server and what it
#                       starts run on SERVER, wrk and this script on LOAD. On a 2-core machine
#                       wrk and the server otherwise preempt each other, and a run's p99 moves
#                       by 2x from one run to the next [unset: no pinning]
#   SCENARIOS           a subset of "baton nginx restart" [all three]
#   BATON_BIN           run this baton binary instead of building target/release/baton
#   KEEP_TMP=1          keep the temporary directory (configs, logs, raw wrk outputs)
#
# Needs nginx and wrk (installed with apt-get when missing), curl, ss, python3, and cargo unless
# BATON_BIN.

set -euo pipefail

UPGRADES=${UPGRADES:-100}
INTERVAL=${INTERVAL:-0.15}
LEAD=${LEAD:-1}
TAIL=${TAIL:-2}
WARMUP=${WARMUP:-2s}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-64}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-5s}
NOISE_MAX=${NOISE_MAX:-5}
RETRIES=${RETRIES:-1}
PROBES=${PROBES:-1}
ROUNDS=${ROUNDS:-1}
TRIGGER=${TRIGGER:-signal}
PROBE_TEXT="a read of the log + GET /-/version"
[[ $TRIGGER == signal ]] || PROBE_TEXT="baton status + GET /-/version"
SCENARIOS=${SCENARIOS:-baton nginx restart}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_SCRIPT=bench/upgrade.sh
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer, not '$ROUNDS'"
[[ $TRIGGER == signal || $TRIGGER == cli ]] || die "TRIGGER must be signal or cli, not '$TRIGGER'"

# ---------------------------------------------------------------- knobs
[[ $UPGRADES =~ ^[1-9][0-9]*$ ]] || die "UPGRADES must be a positive integer, not '$UPGRADES'"
[[ $RETRIES =~ ^[0-9]+$ ]] || die "RETRIES must be an integer, not '$RETRIES'"
for v in INTERVAL LEAD TAIL NOISE_MAX; do
    [[ ${!v} =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "$v must be a number of seconds (or %), not '${!v}'"
done
for s in $SCENARIOS; do
    [[ $s =~ ^(baton|nginx|restart)$ ]] || die "unknown scenario '$s' (baton, nginx, restart)"
done
us_of() { awk -v s="$1" 'BEGIN { printf "%d\n", s * 1e6 }'; } # seconds -> microseconds
INTERVAL_US=$(us_of "$INTERVAL") LEAD_US=$(us_of "$LEAD") TAIL_US=$(us_of "$TAIL")
if [[ -z ${DURATION:-} ]]; then
    DURATION=$(awk -v l="$LEAD" -v n="$UPGRADES" -v i="$INTERVAL" -v t="$TAIL" \
        'BEGIN { d = l + n * i + t; printf "%ds\n", (d == int(d)) ? d : int(d) + 1 }')
fi
[[ $DURATION =~ ^([0-9]+)s?$ ]] || die "DURATION must be whole seconds (like 18s), not '$DURATION'"
DURATION=${BASH_REMATCH[1]}s
DUR_US=$((${DURATION%s} * 1000000))

bench_tools
command -v python3 >/dev/null || die "python3 is needed (bench/supervise.py)"
SUPERVISE=(python3 "$REPO/bench/supervise.py")
PIN=${PIN:-} PIN_TEXT="none"
if [[ -n $PIN ]]; then
    [[ $PIN =~ ^([0-9,-]+)/([0-9,-]+)$ ]] || die "PIN must be SERVER_CPUS/LOAD_CPUS like 0/1, not '$PIN'"
    command -v taskset >/dev/null || die "PIN needs taskset (util-linux)"
    taskset -cp "${BASH_REMATCH[2]}" $$ >/dev/null || die "cannot run this script on CPUs ${BASH_REMATCH[2]}"
    SUPERVISE=(taskset -c "${BASH_REMATCH[1]}" "${SUPERVISE[@]}")
    PIN_TEXT="servers on CPUs ${BASH_REMATCH[1]}, wrk and this script on CPUs ${BASH_REMATCH[2]}"
fi
export SUPERVISE_KILL_AFTER=4 # below cleanup's 5 s per process
bench_baton
bench_tmp
bench_content

# ---------------------------------------------------------------- processes
# Every process here runs under a supervise.py (in PIDS); cleanup_extra stops wrk and the
# servers first, so that a Ctrl-C leaves nothing behind.
WRK_PID= BATON_CUR= NGINX_MASTER= SOCK_SUP=
cleanup_extra() {
    local pid
    [[ -n $WRK_PID ]] && kill -TERM "$WRK_PID" 2>/dev/null
    [[ -n $SOCK_SUP ]] && kill -TERM "$SOCK_SUP" 2>/dev/null
    for pid in $BATON_CUR $NGINX_MASTER; do kill -TERM "$pid" 2>/dev/null; done
    [[ -r $TMP/nginx/nginx.pid.oldbin ]] && kill -TERM "$(<"$TMP/nginx/nginx.pid.oldbin")" 2>/dev/null
    return 0
}

# True while pid runs (a zombie has stopped running).
alive() {
    local s
    { read -r s <"/proc/$1/stat"; } 2>/dev/null || return 1
    s=${s##*) }
    [[ ${s:0:1} != Z ]]
}
# Waits up to ms milliseconds for a command to succeed, polling every millisecond.
wait_for() { # ms command...
    local until now
    now_us now; until=$((now + $1 * 1000))
    shift
    while ! "$@"; do
        now_us now
        ((now < until)) || return 1
        sleep_us 1000
    done
}
# "spawn PID" / "exit PID STATUS" lines of a supervise.py log.
spawned_pid() { awk '$1 == "spawn" { print $2; exit }' "$1"; }
exit_status() { awk -v p="$2" '$1 == "exit" && $2 == p { print $3; exit }' "$1"; }

# Percentiles of a column (nearest rank): "p50 p99 max", or "nan nan nan" when empty.
stats() { # file column
    awk -v c="$2" '{ print $c }' "$1" | sort -g | awk '{ v[NR] = $1 }
        function rank(q,  r, k) { r = q * NR; k = int(r); if (k < r) k++; if (k < 1) k = 1; return v[k] }
        END { if (NR == 0) print "nan nan nan"; else print rank(0.5), rank(0.99), v[NR] }'
}
fmt_ms() { awk -v u="$1" 'BEGIN { if (u == "nan" || u == "") print "-"; else if (u >= 1e5) printf "%.0f", u / 1e3; else if (u >= 1e4) printf "%.1f", u / 1e3; else printf "%.2f", u / 1e3 }'; }

# GET http://127.0.0.1:PORT/PATH with bash's /dev/tcp, forking nothing (the benchmark's own work
# during the upgrades competes with the server for the CPU): BODY is the response body, or the
# whole response when it is not a 200.
http_get() { # port path
    local fd resp rc=0
    exec {fd}<>"/dev/tcp/127.0.0.1/$1" || { BODY="cannot connect to 127.0.0.1:$1"; return 1; }
    printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$2" >&"$fd"
    IFS= read -r -d '' -t 5 -u "$fd" resp || rc=$? # 1 at the end of the stream, > 128 on timeout
    exec {fd}>&-
    ((rc <= 128)) || { BODY="no complete answer within 5 s: $resp"; return 1; }
    [[ $resp == "HTTP/1.1 200 "* ]] || { BODY=$resp; return 1; }
    BODY=${resp#*$'\r\n\r\n'}
}

PROBLEMS=() # what went wrong, precisely; printed at the end
problem() { PROBLEMS+=("$*"); say "PROBLEM: $*"; }

# ---------------------------------------------------------------- the servers
# Each scenario defines start_X (sets URL, SUP (the supervise.py pid) and whatever the upgrades
# need), upgrade_X I (one upgrade; appends a line to $UPG; non-zero stops the upgrades), and
# stop_X (stops gracefully and checks that everything exited).

BATON_CMD_TEXT= NGINX_CMD_TEXT= RESTART_CMD_TEXT=

start_baton() {
    local port cmd
    port=$(free_port)
    cmd=("$BATON" serve --listen "127.0.0.1:$port" --root "$TMP/www" --drain-timeout "$DRAIN_TIMEOUT")
    BATON_CMD_TEXT="${cmd[*]}"
    "${SUPERVISE[@]}" reap "$TMP/baton.procs" -- "${cmd[@]}" >>"$TMP/baton.log" 2>&1 &
    SUP=$!; PIDS+=("$SUP")
    wait_for 5000 test -s "$TMP/baton.procs" || die "supervise.py did not start baton"
    BATON_CUR=$(spawned_pid "$TMP/baton.procs")
    exec {LOG_FD}<"$TMP/baton.log"
    LOG_PART= SERVING_PID= SERVING_GEN=
    BATON_OLD=()
    URL=http://127.0.0.1:$port/file.bin BASE=http://127.0.0.1:$port BATON_PORT=$port
    wait_up baton "$URL" "$BATON_CUR" "$TMP/baton.log"
    check_body baton "$URL"
    log_scan
    [[ $SERVING_PID == "$BATON_CUR" ]] || die "baton (pid $BATON_CUR) serves, but its log has no \"serving generation G (pid $BATON_CUR)\" line (last seen: pid '$SERVING_PID')"
}

# Sets V_PID and V_GEN from the /-/version JSON in BODY.
baton_version() {
    V_PID= V_GEN=
    [[ $BODY =~ \"pid\":([0-9]+) ]] && V_PID=${BASH_REMATCH[1]}
    [[ $BODY =~ \"generation\":([0-9]+) ]] && V_GEN=${BASH_REMATCH[1]}
    return 0
}

upgrade_baton() {
    [[ $TRIGGER == cli ]] || { upgrade_baton_by_signal "$@"; return; }
    local i=$1 t0 t1 rc out old=$BATON_CUR new gen ms
    now_us t0
    if "$BATON" reload --pid "$old" >"$TMP/reload.out" 2>&1; then rc=0; else rc=$?; fi
    now_us t1
    out=$(<"$TMP/reload.out")
    if [[ $rc != 0 ]]; then
        problem "upgrade $i: \`$BATON reload --pid $old\` exited $rc: $out"
        return 1
    fi
    if [[ ! $out =~ upgraded\ pid\ $old\ to\ generation\ ([0-9]+)\ \(pid\ ([0-9]+)\)\ in\ ([0-9]+)\ ms ]]; then
        problem "upgrade $i: \`$BATON reload --pid $old\` exited 0 but printed: $out"
        return 1
    fi
    gen=${BASH_REMATCH[1]} new=${BASH_REMATCH[2]} ms=${BASH_REMATCH[3]}
    record_upgrade "$i" "$old" "$new" "$gen" "$t0" "$t1" "$ms"
}

# After upgrade I from pid OLD to pid NEW (generation GEN), asked at T0 and seen done at T1:
# checks that /-/version comes from NEW and GEN and appends the upgrade's line to $UPG. The
# handoff time (column 5) is filled in from the log once the generations are gone
# (fill_handoffs): the old generation logs it when its probation ends.
record_upgrade() { # i old new gen t0 t1 ms(baton's own measure)
    local i=$1 old=$2 new=$3 gen=$4 t0=$5 t1=$6 ms=$7
    local tries
    BATON_OLD+=("$old"); BATON_CUR=$new
    # The old generation stops accepting only once the new one serves: for a moment both
    # answer, so the old one's answer is asked again (a millisecond later, up to 1000 times).
    for ((tries = 1; ; tries++)); do
        if ! http_get "$BATON_PORT" /-/version; then
            problem "upgrade $i: GET $BASE/-/version after the upgrade to pid $new failed: ${BODY:0:300}"
            return 1
        fi
        baton_version
        [[ $V_PID == "$new" && $V_GEN == "$gen" ]] && break
        if [[ $V_PID != "$old" ]] || ((tries >= 1000)); then
            problem "upgrade $i: /-/version after the upgrade to generation $gen (pid $new) came from generation '$V_GEN' (pid '$V_PID') after $tries tries"
            return 1
        fi
        nap 0.001
    done
    # i old new generation handoff_us wall_us baton's-own-ms start_us
    echo "$i $old $new $gen - $((t1 - t0)) $ms $t0" >>"$UPG"
}

# Column 5 of each upgrade line: the handoff (the signal to the new generation serving), as the
# old generation logged it ("handed over to generation G (pid P) in 9.26ms"). An upgrade whose
# old generation was stopped on probation logs none and keeps "-".
fill_handoffs() {
    local f
    for f in "$TMP"/baton-*.upgrades; do
        [[ -e $f ]] || continue
        awk 'NR == FNR {
                if (match($0, /handed over to generation [0-9]+ \(pid [0-9]+\) in [0-9.]+[a-zµ]+/)) {
                    split(substr($0, RSTART, RLENGTH), w, " ")
                    pid = w[7]; gsub(/\)/, "", pid)
                    d = w[9]; v = d + 0; u = d; sub(/^[0-9.]+/, "", u)
                    m = (u == "s") ? 1e6 : (u == "ms") ? 1e3 : (u == "ns") ? 1e-3 : 1
                    us[pid] = sprintf("%.0f", v * m)
                }
                next
            }
            { if ($3 in us) $5 = us[$3]; print }' "$TMP/baton.log" "$f" >"$f.tmp" && mv "$f.tmp" "$f"
    done
}

# SIGUSR2 to the current generation, then the log read every millisecond until another
# generation says it serves; record_upgrade then checks that /-/version answers from it.
# (Polling /-/version itself, as this benchmark did before, costs the CPU wrk runs on about
# 0.5 ms per GET: bash reads a socket one byte per read(2).)
upgrade_baton_by_signal() {
    local i=$1 t0 t1 now old=$BATON_CUR
    now_us t0
    if ! kill -USR2 "$old"; then
        problem "upgrade $i: kill -USR2 $old failed"
        return 1
    fi
    while log_scan; [[ $SERVING_PID == "$old" ]]; do
        now_us now
        if ((now - t0 > 10000000)); then
            problem "upgrade $i: no other generation than pid $old serves 10 s after SIGUSR2: $(tail -3 "$TMP/baton.log")"
            return 1
        fi
        nap 0.001
    done
    now_us t1
    record_upgrade "$i" "$old" "$SERVING_PID" "$SERVING_GEN" "$t0" "$t1" "$(((t1 - t0) / 1000))"
}

# The benchmark's own work of an upgrade without the upgrade, for the "probes" run: a read of
# the log (TRIGGER=signal) or a baton CLI call over the control socket (TRIGGER=cli), and GET
# /-/version.
probe_baton() {
    local i=$1
    if [[ $TRIGGER == signal ]]; then
        log_scan
        if ! http_get "$BATON_PORT" /-/version; then
            problem "probe $i: GET $BASE/-/version failed: ${BODY:0:300}"
            return 1
        fi
        echo "$i" >>"$UPG"
        return 0
    fi
    if ! "$BATON" status --pid "$BATON_CUR" >"$TMP/probe.out" 2>&1; then
        problem "probe $i: \`$BATON status --pid $BATON_CUR\` failed: $(<"$TMP/probe.out")"
        return 1
    fi
    if ! http_get "$BATON_PORT" /-/version; then
        problem "probe $i: GET $BASE/-/version failed: ${BODY:0:300}"
        return 1
    fi
    echo "$i" >>"$UPG"
}

stop_baton() { # checks that every generation exited, and exited 0
    local pid st n=0 ok=0 bad=()
    for pid in "${BATON_OLD[@]}"; do
        # Each old generation stands by while its successor is on probation (10 s by default;
        # the next upgrade ends it early), then drains for up to DRAIN_TIMEOUT. A SIGTERM to the
        # last generation before its probation ended would make the old one take over again.
        wait_for $((${DRAIN_TIMEOUT%s} * 1000 + 13000)) eval '! alive '"$pid"' && [[ -n $(exit_status "$TMP/baton.procs" '"$pid"') ]]' || true
        n=$((n + 1))
        st=$(exit_status "$TMP/baton.procs" "$pid")
        if [[ $st == 0 ]]; then ok=$((ok + 1))
        elif alive "$pid"; then bad+=("pid $pid still running")
        else bad+=("pid $pid exit status '${st:-unknown}'"); fi
    done
    say "baton: old generations exited: $ok of $n with status 0"
    ((${#bad[@]} == 0)) || problem "baton: old generations not cleanly gone: ${bad[*]}"
    BATON_OLD_SUMMARY="$ok/$n"
    kill -TERM "$BATON_CUR" 2>/dev/null || problem "baton: current generation pid $BATON_CUR was not running at the end"
    if wait_for 10000 eval '! kill -0 '"$SUP"' 2>/dev/null'; then
        wait "$SUP" 2>/dev/null || true
        st=$(exit_status "$TMP/baton.procs" "$BATON_CUR")
        [[ $st == 0 ]] || problem "baton: the last generation (pid $BATON_CUR) exited with '$st' on SIGTERM"
        say "baton: the last generation stopped on SIGTERM (exit $st); no baton process is left"
    else
        problem "baton: processes left 10 s after SIGTERM to pid $BATON_CUR: $(children_of "$SUP" | tr '\n' ' ')"
    fi
    BATON_CUR=
}

start_nginx() {
    local port cmd
    port=$(free_port)
    nginx_conf "$port" on
    cmd=("$NGINX" -e "$TMP/nginx/error.log" -p "$TMP/nginx/" -c "$TMP/nginx/nginx.conf")
    NGINX_CMD_TEXT="${cmd[*]}"
    rm -f "$TMP/nginx/nginx.pid" "$TMP/nginx/nginx.pid.oldbin"
    "${SUPERVISE[@]}" reap "$TMP/nginx.procs" -- "${cmd[@]}" >>"$TMP/nginx/stdout.log" 2>&1 &
    SUP=$!; PIDS+=("$SUP")
    wait_for 10000 test -s "$TMP/nginx/nginx.pid" || { cat "$TMP/nginx/error.log" >&2; die "nginx wrote no pid file"; }
    NGINX_MASTER=$(<"$TMP/nginx/nginx.pid") NGINX_OLD=()
    URL=http://127.0.0.1:$port/file.bin
    wait_up nginx "$URL" "$NGINX_MASTER" "$TMP/nginx/error.log"
    check_body nginx "$URL"
}

new_master() { # old: true once nginx.pid names another, running pid
    local p
    { read -r p <"$TMP/nginx/nginx.pid"; } 2>/dev/null || return 1
    [[ -n $p && $p != "$1" ]] && alive "$p" && NEW_MASTER=$p
}

upgrade_nginx() {
    local i=$1 t0 t1 t2 t3 old=$NGINX_MASTER
    now_us t0
    kill -USR2 "$old"
    if ! wait_for 10000 new_master "$old"; then
        problem "upgrade $i: no new nginx master 10 s after \`kill -USR2 $old\`: $(tail -3 "$TMP/nginx/error.log" | tr '\n' ' ')"
        return 1
    fi
    now_us t1
    kill -QUIT "$old"
    now_us t2
    if ! wait_for 30000 eval '! alive '"$old"; then
        problem "upgrade $i: the old nginx master $old still runs 30 s after \`kill -QUIT $old\`"
        return 1
    fi
    now_us t3
    NGINX_OLD+=("$old"); NGINX_MASTER=$NEW_MASTER
    # i old new usr2->pidfile_us quit->gone_us total_us start_us
    echo "$i $old $NEW_MASTER $((t1 - t0)) $((t3 - t2)) $((t3 - t0)) $t0" >>"$UPG"
}

stop_nginx() {
    local pid st ok=0 n=0 bad=()
    for pid in "${NGINX_OLD[@]}"; do
        n=$((n + 1))
        wait_for 2000 eval '[[ -n $(exit_status "$TMP/nginx.procs" '"$pid"') ]]' || true
        st=$(exit_status "$TMP/nginx.procs" "$pid")
        if [[ $st == 0 ]]; then ok=$((ok + 1)); else bad+=("master $pid: '${st:-not reaped}'"); fi
    done
    say "nginx: old masters exited: $ok of $n with status 0"
    ((${#bad[@]} == 0)) || problem "nginx: old masters not cleanly gone: ${bad[*]}"
    NGINX_OLD_SUMMARY="$ok/$n"
    kill -QUIT "$NGINX_MASTER" 2>/dev/null || problem "nginx: master $NGINX_MASTER was not running at the end"
    if wait_for 10000 eval '! kill -0 '"$SUP"' 2>/dev/null'; then
        wait "$SUP" 2>/dev/null || true
        say "nginx: the last master stopped on SIGQUIT (exit $(exit_status "$TMP/nginx.procs" "$NGINX_MASTER")); no nginx process is left"
    else
        problem "nginx: processes left 10 s after SIGQUIT to $NGINX_MASTER: $(children_of "$SUP" | tr '\n' ' ')"
    fi
    NGINX_MASTER=
}

sock_cmd() { # command: sends it to supervise.py socket, sets REPLY to its answer
    printf '%s\n' "$1" >&"$SOCK_IN"
    read -r -t 60 -u "$SOCK_OUT" REPLY || { REPLY="error no answer from supervise.py within 60 s"; return 1; }
    [[ $REPLY == ok* ]]
}

start_restart() {
    local port cmd
    port=$(free_port)
    cmd=("$BATON" serve --listen "127.0.0.1:$port" --root "$TMP/www" --drain-timeout "$DRAIN_TIMEOUT")
    RESTART_CMD_TEXT="${cmd[*]}"
    coproc SOCKHELPER { exec "${SUPERVISE[@]}" socket "$TMP/restart.procs" "127.0.0.1:$port" "$TMP/restart.log" \
        -- "${cmd[@]}" 2>>"$TMP/restart.helper.log"; }
    SOCK_SUP=$SOCKHELPER_PID SUP=$SOCKHELPER_PID SOCK_IN=${SOCKHELPER[1]} SOCK_OUT=${SOCKHELPER[0]}
    PIDS+=("$SUP")
    sock_cmd start || die "the socket-activated baton did not start: $REPLY $(tail -5 "$TMP/restart.log")"
    read -r _ BATON_CUR _ <<<"$REPLY"
    URL=http://127.0.0.1:$port/file.bin
    check_body restart "$URL"
}

upgrade_restart() {
    local i=$1 t0 old new st gap ex sp
    now_us t0
    if ! sock_cmd restart; then
        problem "restart $i: $REPLY (server log: $(tail -3 "$TMP/restart.log" | tr '\n' ' '))"
        return 1
    fi
    read -r _ old st new gap ex sp <<<"$REPLY"
    BATON_CUR=$new
    [[ $st == 0 ]] || problem "restart $i: baton pid $old exited with '$st' on SIGTERM"
    # i old new gap_us exit_us spawn_us start_us
    echo "$i $old $new $gap $ex $sp $t0" >>"$UPG"
}

stop_restart() {
    printf 'quit\n' >&"$SOCK_IN"
    if wait_for 10000 eval '! kill -0 '"$SUP"' 2>/dev/null'; then
        wait "$SUP" 2>/dev/null || true
        local st
        st=$(exit_status "$TMP/restart.procs" "$BATON_CUR")
        [[ $st == 0 ]] || problem "restart: the last baton (pid $BATON_CUR) exited with '$st' on SIGTERM"
        say "restart: $(grep -c '^exit' "$TMP/restart.procs") baton processes exited, $(awk '$1 == "exit" && $3 != 0' "$TMP/restart.procs" | wc -l) of them with a status other than 0; none is left"
    else
        problem "restart: processes left 10 s after quit: $(children_of "$SUP" | tr '\n' ' ')"
    fi
    SOCK_SUP= BATON_CUR=
}

# ---------------------------------------------------------------- one run under load
# run SCENARIO KIND(steady|upgrades) ATTEMPT: one wrk run; with upgrades, they run meanwhile on
# their schedule. Appends "kind attempt rps p50 p99 max requests connect read write timeout
# non2xx cores usreq others upgrades_done" to $TMP/SCENARIO.runs.
run() {
    local scn=$1 kind=$2 att=$3 out=$TMP/$1-$2-$3.wrk t0 now next i ndone=0 rps p50 p99 max errs
    local req con rd wr to n2 cores usreq others action
    UPG=$TMP/$scn-$att.upgrades
    cpu_start tree "$SUP"
    $(wrk_cmd "$DURATION" "$URL") >"$out" 2>&1 &
    WRK_PID=$!
    now_us t0
    if [[ $kind != steady ]]; then
        action=upgrade_$scn
        [[ $kind == probes ]] && action=probe_$scn UPG=$TMP/$scn-$att.probes
        ((ROUND > 1)) || : >"$UPG"
        for ((i = 1; i <= UPGRADES; i++)); do
            next=$((t0 + LEAD_US + (i - 1) * INTERVAL_US))
            now_us now
            if ((now > t0 + DUR_US - TAIL_US / 2)); then
                say "  ($scn: the wrk run is nearly over after $ndone ${kind}; stopping there)"
                break
            fi
            sleep_us $((next - now))
            "$action" "$i" || break
            ndone=$i
        done
    fi
    wait "$WRK_PID" || die "wrk failed: $(cat "$out")"
    WRK_PID=
    read -r rps p50 p99 max errs < <(parse_wrk "$out")
    read -r cores usreq others < <(cpu_stop "$rps" tree "$SUP")
    read -r req con rd wr to n2 < <(wrk_failures "$out")
    echo "$kind $att $rps $p50 $p99 $max $req $con $rd $wr $to $n2 $cores $usreq $others $ndone" >>"$TMP/$scn.runs"
    if [[ $scn != nginx ]] && ((con + rd + wr + to + n2 > 0)); then
        # A failed request with baton serving is a finding, never noise: it blocks a rerun.
        problem "$scn, $kind run (attempt $att): wrk saw $((con + rd + wr + to + n2)) failed requests (connect $con, read $rd, write $wr, timeout $to, non-2xx/3xx $n2) from \`$(wrk_cmd "$DURATION" "$URL")\`"
    fi
    printf '%-8s %-9s %3s %10.0f %9s %9s %9s %9s %4s %5s %5s %5s %5s %5s %6s %6s %5s%%\n' "$scn" "$kind" "$att" \
        "$rps" "$((req))" "$(fmt_us "$p50")" "$(fmt_us "$p99")" "$(fmt_us "$max")" "$((con + rd + wr + to + n2))" \
        "$con" "$rd" "$wr" "$to" "$n2" "$cores" "$usreq" "$others"
}

# ---------------------------------------------------------------- run
say ""
say_machine
say "python:   $(python3 --version 2>&1)"
say "load:     $(wrk_cmd "$DURATION" 'http://127.0.0.1:PORT/file.bin')  (1 KiB file, keep-alive)"
say "schedule: per scenario a ${WARMUP} warm-up, then $ROUNDS round(s) of: a steady run,$([[ $PROBES != 1 ]] || echo ' (baton: a probes run,)') a run with $UPGRADES upgrades, one every ${INTERVAL}s from ${LEAD}s on"
say "pinning:  $PIN_TEXT"
say "noise:    a scenario whose runs show others > ${NOISE_MAX}% is run again (up to $RETRIES time(s)); the quieter attempt counts"
say ""
printf '%-8s %-9s %3s %10s %9s %9s %9s %9s %4s %5s %5s %5s %5s %5s %6s %6s %6s\n' scenario run try req/s \
    requests p50 p99 max fail conn read write tmout non2x srvcpu us/req others

for scn in $SCENARIOS; do
    : >"$TMP/$scn.runs"
    "start_$scn"
    if [[ $WARMUP != 0 && $WARMUP != 0s ]]; then
        $(wrk_cmd "$WARMUP" "$URL") >"$TMP/$scn-warmup.wrk" 2>&1 || die "wrk failed: $(cat "$TMP/$scn-warmup.wrk")"
    fi
    best= best_noise=
    for ((att = 1; att <= RETRIES + 1; att++)); do
        nproblems=${#PROBLEMS[@]}
        for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
            run "$scn" steady "$att"
            if [[ $PROBES == 1 ]] && declare -F "probe_$scn" >/dev/null; then run "$scn" probes "$att"; fi
            run "$scn" upgrades "$att"
        done
        noise=$(awk -v a="$att" '$2 == a && $15 > m { m = $15 } END { print m + 0 }' "$TMP/$scn.runs")
        if [[ -z $best ]] || ((noise < best_noise)); then best=$att best_noise=$noise; fi
        # Rerun only for noise, never to get past a failure.
        ((${#PROBLEMS[@]} == nproblems)) || break
        ((noise > NOISE_MAX)) || break
        ((att > RETRIES)) || say "  ($scn: others reached ${noise}% > ${NOISE_MAX}%: noisy, running it again)"
    done
    declare "BEST_$scn=$best" "NOISE_$scn=$best_noise"
    "stop_$scn"
    [[ $scn != baton ]] || fill_handoffs
done

# ---------------------------------------------------------------- figures
say ""
say "(fail = conn + read + write + tmout (wrk's socket errors) + non2x (non-2xx/3xx answers);"
say " srvcpu: cores the server's process tree used; us/req: its CPU time per request; others: share"
say " of the machine's CPU charged to neither the server nor this benchmark and wrk: other load,"
say " i.e. noise, plus kernel work no process is charged for, such as loopback softirq time)"

# Fields of a run line (see run): 3 rps 4 p50 5 p99 6 max 7 requests 8-12 failures 15 others 16 done
# A field of a scenario's runs of one kind and attempt: the median over the rounds (nothing when
# there is no such run); runsum: the sum.
runfield() {
    local v
    v=$(awk -v k="$2" -v a="$3" -v f="$4" '$1 == k && $2 == a { print $f }' "$TMP/$1.runs")
    [[ -z $v ]] || median <<<"$v"
}
runsum() { awk -v k="$2" -v a="$3" -v f="$4" '$1 == k && $2 == a { s += $f; n++ } END { if (n) print s }' "$TMP/$1.runs"; }
failed_of() { awk -v k="$2" -v a="$3" '$1 == k && $2 == a { s += $8 + $9 + $10 + $11 + $12 } END { print s + 0 }' "$TMP/$1.runs"; }

declare -A NAME=([baton]="baton upgrade" [nginx]="nginx binary upgrade" [restart]="socket-activated restart")
for scn in $SCENARIOS; do
    a=BEST_$scn; a=${!a}
    upg=$TMP/$scn-$a.upgrades
    ndone=$(runsum "$scn" upgrades "$a" 16)
    f_up=$(failed_of "$scn" upgrades "$a") f_st=$(failed_of "$scn" steady "$a")
    p99_st=$(runfield "$scn" steady "$a" 5) p99_up=$(runfield "$scn" upgrades "$a" 5)
    say ""
    say "${NAME[$scn]} (attempt $a): $ndone of $((UPGRADES * ROUNDS)) done, $(awk 'NR > 1 && $1 == i + 1 { s += $NF - p; n++ } { p = $NF; i = $1 } END { if (n) printf "one every %.0f ms on average", s / n / 1e3 }' "$upg")"
    say "  failed requests: $f_up during the upgrades ($(awk -v k=upgrades -v a="$a" '$1 == k && $2 == a { c += $8; r += $9; w += $10; t += $11; n += $12 } END { printf "connect %d, read %d, write %d, timeout %d, non-2xx/3xx %d", c, r, w, t, n }' "$TMP/$scn.runs")), $f_st in the steady runs"
    if ((ndone > 0)); then
        say "  per upgrade: $(awk -v f="$f_up" -v n="$ndone" -v c="$CONNECTIONS" 'BEGIN { printf "%.2f failed requests, %.3f per keep-alive connection (%d connections)", f / n, f / n / c, c }')"
    fi
    say "  wrk latency p50/p99/max: steady $(fmt_us "$(runfield "$scn" steady "$a" 4)") / $(fmt_us "$p99_st") / $(fmt_us "$(runfield "$scn" steady "$a" 6)"), during $(fmt_us "$(runfield "$scn" upgrades "$a" 4)") / $(fmt_us "$p99_up") / $(fmt_us "$(runfield "$scn" upgrades "$a" 6)"); p99 during/steady $(ratio "$p99_up" "$p99_st")x"
    case $scn in
    baton)
        read -r h50 h99 hmax < <(awk '$5 != "-"' "$upg" | stats /dev/stdin 5)
        read -r w50 w99 wmax < <(stats "$upg" 6)
        say "  handoff (signal to the new generation serving, as the old one logs it; $(awk '$5 != "-"' "$upg" | wc -l) of $(wc -l <"$upg")) p50/p99/max: $(fmt_ms "$h50") / $(fmt_ms "$h99") / $(fmt_ms "$hmax") ms"
        if [[ $TRIGGER == cli ]]; then
            say "  \`baton reload\` wall time p50/p99/max: $(fmt_ms "$w50") / $(fmt_ms "$w99") / $(fmt_ms "$wmax") ms"
        else
            say "  SIGUSR2 to the new generation's \"serving\" line read from the log p50/p99/max: $(fmt_ms "$w50") / $(fmt_ms "$w99") / $(fmt_ms "$wmax") ms"
        fi
        say "  old generations gone at the end: ${BATON_OLD_SUMMARY:-?} (exited with status 0 / upgraded away)"
        if [[ -n $(runfield baton probes "$a" 5) ]]; then
            PROBE_RATIO=$(ratio "$(runfield baton probes "$a" 5)" "$p99_st")
            say "  probes run (the same schedule, $PROBE_TEXT, no upgrade): p50/p99/max $(fmt_us "$(runfield baton probes "$a" 4)") / $(fmt_us "$(runfield baton probes "$a" 5)") / $(fmt_us "$(runfield baton probes "$a" 6)"), p99 probes/steady ${PROBE_RATIO}x, $(failed_of baton probes "$a") failed"
        fi
        SW_baton="$h50 $h99 $hmax"
        ;;
    nginx)
        read -r a50 a99 amax < <(stats "$upg" 4)
        read -r q50 q99 qmax < <(stats "$upg" 5)
        read -r c50 c99 cmax < <(stats "$upg" 6)
        say "  USR2 to the new pid file p50/p99/max: $(fmt_ms "$a50") / $(fmt_ms "$a99") / $(fmt_ms "$amax") ms"
        say "  QUIT to the old master gone p50/p99/max: $(fmt_ms "$q50") / $(fmt_ms "$q99") / $(fmt_ms "$qmax") ms"
        say "  whole upgrade (USR2 to old master gone) p50/p99/max: $(fmt_ms "$c50") / $(fmt_ms "$c99") / $(fmt_ms "$cmax") ms"
        say "  old masters gone at the end: ${NGINX_OLD_SUMMARY:-?} (exited with status 0 / upgraded away)"
        SW_nginx="$a50 $a99 $amax"
        ;;
    restart)
        read -r g50 g99 gmax < <(stats "$upg" 4)
        read -r e50 e99 emax < <(stats "$upg" 5)
        read -r s50 s99 smax < <(stats "$upg" 6)
        say "  restart gap (SIGTERM to the new process answering) p50/p99/max: $(fmt_ms "$g50") / $(fmt_ms "$g99") / $(fmt_ms "$gmax") ms"
        say "    of which SIGTERM to exit (drain): $(fmt_ms "$e50") / $(fmt_ms "$e99") / $(fmt_ms "$emax") ms, start to answer: $(fmt_ms "$s50") / $(fmt_ms "$s99") / $(fmt_ms "$smax") ms"
        SW_restart="$g50 $g99 $gmax"
        ;;
    esac
done

say ""
say "commands:"
for scn in $SCENARIOS; do
    case $scn in
    baton)
        say "  baton:   $BATON_CMD_TEXT   (under bench/supervise.py reap, a subreaper)"
        if [[ $TRIGGER == cli ]]; then
            say "           upgrade (TRIGGER=cli): $BATON reload --pid <current pid>; then GET http://127.0.0.1:PORT/-/version (bash /dev/tcp)"
        else
            say "           upgrade (TRIGGER=signal): kill -USR2 <current pid> (bash builtin); the log read every 1 ms until another generation serves; then GET /-/version (bash /dev/tcp)"
        fi
        [[ $PROBES != 1 ]] || say "           probes run: $PROBE_TEXT" ;;
    nginx)
        say "  nginx:   $NGINX_CMD_TEXT   (daemon on, config below; under bench/supervise.py reap)"
        say "           upgrade: kill -USR2 <master>; wait for a new pid in nginx.pid; kill -QUIT <old master>; wait until it is gone"
        sed 's/^/    | /' "$TMP/nginx/nginx.conf" | grep -v '^    | *$' ;;
    restart)
        say "  restart: python3 bench/supervise.py socket LOG 127.0.0.1:PORT OUT -- $RESTART_CMD_TEXT"
        say "           (holds the listening socket; runs baton with it as fd 3, LISTEN_FDS=1, LISTEN_PID=<baton's pid>)"
        say "           restart: kill -TERM <baton>; wait for its exit; start the next; GET /-/version until it answers" ;;
    esac
done
say "  load:    $(wrk_cmd "$DURATION" 'http://127.0.0.1:PORT/file.bin'), steady and during the upgrades; warm-up $(wrk_cmd "$WARMUP" '...')"

say ""
say "summary: $UPGRADES upgrades per run, one every ${INTERVAL}s, in ${DURATION} wrk runs (-t$THREADS -c$CONNECTIONS), $ROUNDS round(s): latencies are medians over the rounds"
printf '%-25s %5s %7s %8s %9s %10s %10s %7s %8s %8s %8s %7s\n' scenario done failed per-upg per-conn \
    p99-steady p99-during ratio sw-p50ms sw-p99ms sw-maxms others
for scn in $SCENARIOS; do
    a=BEST_$scn; a=${!a}
    ndone=$(runsum "$scn" upgrades "$a" 16) f=$(failed_of "$scn" upgrades "$a")
    p99_st=$(runfield "$scn" steady "$a" 5) p99_up=$(runfield "$scn" upgrades "$a" 5)
    sw=SW_$scn; read -r s50 s99 smax <<<"${!sw:-nan nan nan}"
    n=NOISE_$scn
    printf '%-25s %5s %7s %8s %9s %10s %10s %7s %8s %8s %8s %6s%%\n' "${NAME[$scn]}" "$ndone" "$f" \
        "$(awk -v f="$f" -v n="$ndone" 'BEGIN { if (n > 0) printf "%.2f", f / n; else print "-" }')" \
        "$(awk -v f="$f" -v n="$ndone" -v c="$CONNECTIONS" 'BEGIN { if (n > 0) printf "%.3f", f / n / c; else print "-" }')" \
        "$(fmt_us "$p99_st")" "$(fmt_us "$p99_up")" "$(ratio "$p99_up" "$p99_st")x" \
        "$(fmt_ms "$s50")" "$(fmt_ms "$s99")" "$(fmt_ms "$smax")" "${!n}"
done
say "(per-upg: failed requests per upgrade; per-conn: per upgrade and keep-alive connection;"
say " sw: the switch time. baton: signal to the new generation serving (the handoff the old one logs);"
say " nginx: USR2 to the new master's pid file; restart: SIGTERM to the new process answering;"
say " others: the noisiest run of the attempt kept)"

noisy=()
for scn in $SCENARIOS; do n=NOISE_$scn; ((${!n} <= NOISE_MAX)) || noisy+=("$scn ${!n}%"); done
if ((${#noisy[@]} > 0)); then
    say ""
    say "warning: noisy machine: others > ${NOISE_MAX}% in the runs kept for ${noisy[*]}; latency figures are suspect, run again on a quieter machine"
fi

if [[ " $SCENARIOS " == *" baton "* ]]; then
    a=$BEST_baton
    f=$(failed_of baton upgrades "$a") ndone=$(runsum baton upgrades "$a" 16)
    read -r h50 h99 _ <<<"$SW_baton"
    r=$(ratio "$(runfield baton upgrades "$a" 5)" "$(runfield baton steady "$a" 5)")
    misses=()
    ((ndone == UPGRADES * ROUNDS)) || misses+=("only $ndone of $((UPGRADES * ROUNDS)) upgrades done")
    ((f == 0)) || misses+=("$f failed requests")
    awk -v v="$h50" 'BEGIN { exit !(v != "nan" && v <= 15000) }' || misses+=("handoff p50 $(fmt_ms "$h50") ms > 15 ms")
    awk -v v="$h99" 'BEGIN { exit !(v != "nan" && v <= 50000) }' || misses+=("handoff p99 $(fmt_ms "$h99") ms > 50 ms")
    awk -v v="$r" 'BEGIN { exit !(v != "inf" && v <= 1.2) }' || misses+=("p99 during upgrades ${r}x steady > 1.2x")
    ((${#PROBLEMS[@]} == 0)) || misses+=("${#PROBLEMS[@]} problem(s), listed below")
    say ""
    goals="0 failed requests; handoff p50 <= 15 ms, p99 <= 50 ms; p99 during upgrades <= 1.2x steady"
    if ((${#misses[@]} == 0)); then
        say "verdict: baton MEETS its upgrade goals ($goals)"
    else
        say "verdict: baton MISSES its upgrade goals ($goals): $(IFS=';'; echo "${misses[*]}" | sed 's/;/; /g')"
    fi
    [[ -z ${PROBE_RATIO:-} ]] || say "(for scale: the benchmark's own per-upgrade work alone, without upgrading, gave p99 ${PROBE_RATIO}x steady)"
fi
if ((${#PROBLEMS[@]} > 0)); then
    say ""
    say "problems:"
    for p in "${PROBLEMS[@]}"; do say "  - $p"; done
fi
