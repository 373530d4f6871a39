#!/usr/bin/env bash
# bench/upgrade-timeline.sh: when, after a SIGUSR2, an upgrade's slow requests happen, request by
# request. bench/upgrade.sh gives wrk's p99 during upgrades against a steady run; this one
# records every request of the same kind of load (keep-alive GETs of a 1 KiB file, one at a
# time per connection) with its start time, so that the requests slower than the steady p99 can
# be placed in time after each SIGUSR2: the spawn of the new generation, its start, the handover
# and the reconnects of the drained connections each have their window.
#
# Per round: a steady run and a run with UPGRADES upgrades (SIGUSR2 to the current generation,
# then its log read every millisecond until another generation says it serves), one every
# INTERVAL seconds from LEAD on, each with a fresh baton. The load is bench/timeline.rs, built
# here with rustc -O. bench/timeline.py prints the table.
#
# A benchmark that prints figures, not a test: it exits 0 whatever the figures say.
#
# Environment (defaults in brackets):
#   ROUNDS [3]          steady and upgrade runs, in turn
#   UPGRADES [10]       upgrades per run
#   INTERVAL [1]        seconds between upgrades
#   LEAD [2]            seconds of load before the first upgrade
#   CONNECTIONS [64]    connections of the load
#   THREADS [1]         threads of the load
#   BESIDE_WRK [0]      also run wrk -t1 with this many connections beside the load, on the
#                       same CPU, and print its p99 per run: the same upgrades as wrk sees them
#   PIN [0/1]           SERVER/LOAD CPU lists for taskset: baton (and what it starts) on
#                       SERVER, the load and this script on LOAD; empty: no pinning. One
#                       thread of load on its own CPU keeps the load's own scheduling out of
#                       the latencies
#   BATON_BIN           run this baton instead of building target/release/baton
#   KEEP_TMP=1          keep the temporary directory (records, logs)

set -euo pipefail

ROUNDS=${ROUNDS:-3}
UPGRADES=${UPGRADES:-10}
INTERVAL=${INTERVAL:-1}
LEAD=${LEAD:-2}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
BESIDE_WRK=${BESIDE_WRK:-0}
PIN=${PIN-0/1}
# In µs, for bash's integer arithmetic (awk's %d stops at 2^31 in mawk).
LEAD_US=$(awk -v s="$LEAD" 'BEGIN { printf "%.0f", s * 1e6 }')
INTERVAL_US=$(awk -v s="$INTERVAL" 'BEGIN { printf "%.0f", s * 1e6 }')
CPUS=$(nproc)
# How long a steady run reads the log after each mark, as an upgrade run does until the switch.
SWITCH_US=15000
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_SCRIPT=bench/upgrade-timeline.sh
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh"

SERVER_PIN=() LOAD_PIN=()
if [[ -n $PIN ]]; then
    [[ $PIN == */* ]] || die "PIN=$PIN: give SERVER/LOAD CPU lists, e.g. 0/1"
    command -v taskset >/dev/null || die "PIN needs taskset (util-linux)"
    SERVER_PIN=(taskset -c "${PIN%/*}") LOAD_PIN=(taskset -c "${PIN#*/}")
    taskset -cp "${PIN#*/}" $$ >/dev/null || die "cannot pin this script to CPU ${PIN#*/}"
fi
command -v rustc >/dev/null || die "rustc is needed (it comes with cargo)"
if ((BESIDE_WRK > 0)); then
    WRK=$(command -v wrk) || die "BESIDE_WRK needs wrk (apt-get install wrk)"
fi
command -v python3 >/dev/null || die "python3 is needed"
command -v curl >/dev/null || die "curl is needed"
command -v ss >/dev/null || die "ss (iproute2) is needed"

bench_tmp
bench_baton
bench_content
rustc -O --edition 2021 -o "$TMP/timeline" "$REPO/bench/timeline.rs" || die "cannot build bench/timeline.rs"

# One run: KIND (steady|upgrades) NAME. Writes $TMP/NAME.lat and $TMP/NAME.up.
# An upgrade is SIGUSR2, then the log read every millisecond until another generation says it
# serves (see log_scan in bench/lib.sh: a read of a regular file, no GET, no process started,
# so the script's own work on the load's CPU stays small). A steady run reads the log the same
# way for as long as a switch takes, without the signal.
one_run() {
    local kind=$1 name=$2 cur prev= i t0 next now seconds pids=() pid
    PORT=$(free_port)
    "${SERVER_PIN[@]}" "$BATON" serve --listen "127.0.0.1:$PORT" --root "$TMP/www" >"$TMP/$name.log" 2>&1 &
    cur=$!
    pids+=("$cur")
    wait_up baton "http://127.0.0.1:$PORT/file.bin" "$cur" "$TMP/$name.log"
    exec {LOG_FD}<"$TMP/$name.log"
    LOG_PART= SERVING_PID= SERVING_GEN=
    log_scan
    [[ $SERVING_PID == "$cur" ]] || die "$name: baton (pid $cur) serves, but its log says no \"serving generation G (pid $cur)\""
    seconds=$(((LEAD_US + UPGRADES * INTERVAL_US) / 1000000 + 2))
    "${LOAD_PIN[@]}" "$TMP/timeline" "127.0.0.1:$PORT" /file.bin "$THREADS" "$CONNECTIONS" "$seconds" "$TMP/$name.lat" &
    local load=$! beside=
    if ((BESIDE_WRK > 0)); then
        "${LOAD_PIN[@]}" "$WRK" -t1 -c"$BESIDE_WRK" -d"${seconds}s" --latency "http://127.0.0.1:$PORT/file.bin" >"$TMP/$name.wrk" 2>&1 &
        beside=$!
    fi
    : >"$TMP/$name.up"
    t0=${EPOCHREALTIME//[!0-9]/}
    for ((i = 0; i < UPGRADES; i++)); do
        next=$((t0 + LEAD_US + i * INTERVAL_US))
        now=${EPOCHREALTIME//[!0-9]/}
        sleep_us $((next - now))
        now=${EPOCHREALTIME//[!0-9]/}
        echo "$now" >>"$TMP/$name.up"
        [[ $kind == upgrades ]] && kill -USR2 "$cur"
        while log_scan; [[ $SERVING_PID == "$cur" ]]; do
            if [[ $kind == steady ]] && ((${EPOCHREALTIME//[!0-9]/} - now > SWITCH_US)); then break; fi
            ((${EPOCHREALTIME//[!0-9]/} - now < 10000000)) || die "$name: no other generation than pid $cur serves 10 s after SIGUSR2"
            nap 0.001
        done
        [[ $kind == upgrades ]] || continue
        prev=$cur cur=$SERVING_PID
        pids+=("$cur")
    done
    wait "$load" || die "$name: the load failed (a request lost?)"
    [[ -z $beside ]] || wait "$beside" || die "$name: wrk failed: $(cat "$TMP/$name.wrk")"
    # The last generation is on probation: SIGTERM to the one standing by stops both (SIGTERM
    # to the new one would make the old one take over again).
    kill -TERM "${prev:-$cur}" 2>/dev/null || true
    for _ in $(seq 300); do
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && break; pid=; done
        [[ -n $pid ]] || break
        nap 0.1
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    exec {LOG_FD}<&-
}

say "baton:    $BATON ($("$BATON" --version 2>/dev/null | head -1))"
say "load:     bench/timeline.rs, $THREADS thread(s), $CONNECTIONS keep-alive connections, GET /file.bin (1 KiB)${PIN:+, PIN=$PIN}$( ((BESIDE_WRK == 0)) || echo "; beside it wrk -t1 -c$BESIDE_WRK")"
say "schedule: $ROUNDS round(s) of a steady run and a run with $UPGRADES upgrades (SIGUSR2), one every ${INTERVAL}s from ${LEAD}s on"
say "machine:  $CPUS CPUs, $(uname -r)"
STEADY=() UPGRADED=()
for ((r = 1; r <= ROUNDS; r++)); do
    say "round $r: steady ..."
    one_run steady "steady-$r"
    STEADY+=("$TMP/steady-$r")
    say "round $r: upgrades ..."
    one_run upgrades "upgrades-$r"
    UPGRADED+=("$TMP/upgrades-$r")
done
say ""
python3 "$REPO/bench/timeline.py" "${STEADY[@]}" -- "${UPGRADED[@]}"
if ((BESIDE_WRK > 0)); then
    say ""
    say "wrk -t1 -c$BESIDE_WRK beside it, p99 per run (wrk --latency):"
    for run in "${STEADY[@]}" "${UPGRADED[@]}"; do
        say "  ${run##*/}: $(awk '$1 == "99%" { print $2 }' "$run.wrk")"
    done
fi
