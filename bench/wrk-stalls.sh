#!/usr/bin/env bash
# bench/wrk-stalls.sh: why wrk's p99 during upgrades differs from what each request took.
#
# baton serves a 1 KiB file on SERVER_CPU; wrk -t1 -c64 loads it from LOAD_CPU for DURATION
# seconds, once steady and once with one SIGUSR2 upgrade a second (from 1 s on), ROUNDS times
# in turn. wrk runs under bench/wrk-requests.c, which records each of its requests, and
# bench/wrk-requests.py prints per run: wrk's own p99 (corrected for coordinated omission),
# the requests' raw percentiles, the same corrected again from them (it must match wrk's), and
# the stalls (moments when half of the connections or more were slowed at once), by their
# time from the nearest upgrade.
#
# A benchmark that prints figures, not a test: it exits 0 whatever they are.
#
# Environment (defaults in brackets):
#   ROUNDS [2]  DURATION [15] (seconds)  SERVER_CPU [0]  LOAD_CPU [1]
#   PROBATION [10s]     baton --upgrade-probation
#   BATON_BIN           run this binary instead of building target/release/baton
#   KEEP_TMP=1          keep the temporary directory (logs, request files)
#
# Needs wrk (installed with apt-get when missing, with nginx, as by the other benchmarks), cc,
# python3, curl, ss and taskset, and cargo unless BATON_BIN.

set -euo pipefail

ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-15}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
PROBATION=${PROBATION:-10s}
THREADS=1
CONNECTIONS=64
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_SCRIPT=bench/wrk-stalls.sh
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh"

(( DURATION >= 4 )) || die "DURATION=$DURATION: give at least 4 seconds (a second of lead, upgrades, a tail)"
bench_tools
for tool in cc python3 taskset; do
    command -v "$tool" >/dev/null || die "$tool is missing: apt-get install gcc python3 util-linux"
done
bench_tmp
# Every generation of a run, whatever its pid after the upgrades.
cleanup_extra() { pkill -TERM -f -- "--pidfile $TMP/baton.pid" 2>/dev/null || true; }
bench_baton
bench_content
cc -O2 -shared -fPIC -o "$TMP/wrk-requests.so" "$REPO/bench/wrk-requests.c" -ldl \
    || die "cannot build bench/wrk-requests.c"
PORT=$(free_port)
URL=http://127.0.0.1:$PORT/file.bin

run() { # kind round
    local kind=$1 round=$2 log=$TMP/$1-$2.log requests=$TMP/$1-$2.requests i
    rm -f "$TMP/baton.pid"
    taskset -c "$SERVER_CPU" "$BATON" serve --listen "127.0.0.1:$PORT" --root "$TMP/www" \
        --pidfile "$TMP/baton.pid" --upgrade-probation "$PROBATION" >"$log" 2>&1 &
    wait_up baton "$URL" $! "$log"
    taskset -c "$LOAD_CPU" "$WRK" -t$THREADS -c$CONNECTIONS -d2s "$URL" >/dev/null
    WRK_REQUESTS_OUT=$requests LD_PRELOAD=$TMP/wrk-requests.so \
        taskset -c "$LOAD_CPU" "$WRK" -t$THREADS -c$CONNECTIONS -d"${DURATION}s" --latency "$URL" \
        >"$TMP/$kind-$round.wrk" &
    local load=$!
    if [[ $kind == upgrades ]]; then
        nap 1
        for i in $(seq $((DURATION - 3))); do
            # The pidfile names the main process; during a probation that is the old generation,
            # which ends the probation and has the new one upgrade.
            kill -USR2 "$(<"$TMP/baton.pid")"
            nap 1
        done
    fi
    wait "$load"
    cleanup_extra
    for i in $(seq 100); do pgrep -f -- "--pidfile $TMP/baton.pid" >/dev/null || break; nap 0.1; done
    printf '%-8s round %s: wrk p99 %s; ' "$kind" "$round" "$(awk '$1 == "99%" {print $2}' "$TMP/$kind-$round.wrk")"
    if [[ $kind == upgrades ]]; then
        python3 "$REPO/bench/wrk-requests.py" $CONNECTIONS "$requests" "$log"
    else
        python3 "$REPO/bench/wrk-requests.py" $CONNECTIONS "$requests"
    fi
}

say "baton on CPU $SERVER_CPU, wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s on CPU $LOAD_CPU; $(nproc) CPUs"
for round in $(seq "$ROUNDS"); do
    run steady "$round"
    run upgrades "$round"
done
