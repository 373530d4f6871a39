#!/usr/bin/env bash
# bench/http.sh: baton vs Debian's nginx, serving the same 1 KiB file on loopback, loaded with wrk.
#
# A benchmark that prints figures, not a test: it exits 0 whatever the verdict (non-zero only
# when it cannot run). The machine is assumed noisy, so rounds alternate between the servers
# (baton, nginx, baton, nginx, ...) and the table shows the median of the rounds per server.
#
# Environment (defaults in brackets):
#   ROUNDS [3]        rounds per server
#   DURATION [10s]    wrk -d per round
#   WARMUP [2s]       wrk -d of the one warm-up run per server before the rounds (0 to skip)
#   THREADS [2]       wrk -t
#   CONNECTIONS [64]  wrk -c
#   BATON_BIN         run this baton binary instead of building target/release/baton
#   KEEP_TMP=1        keep the temporary directory (configs, logs, raw wrk outputs)
#   Anything baton or tokio reads from the environment passes through, e.g.
#   TOKIO_WORKER_THREADS=1 (tokio's multi-thread runtime honours it; default: one per core).
#
# Needs nginx and wrk (installed with apt-get when missing), curl, ss, and cargo unless BATON_BIN.

set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-64}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_SCRIPT=bench/http.sh
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh"

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer, not '$ROUNDS'"

bench_tools
bench_baton
bench_tmp

# ---------------------------------------------------------------- content and servers
bench_content

NGINX_PORT=$(free_port)
BATON_PORT=$(free_port)
while [[ $BATON_PORT == "$NGINX_PORT" ]]; do BATON_PORT=$(free_port); done
nginx_conf "$NGINX_PORT" off

NGINX_CMD=("$NGINX" -e "$TMP/nginx/error.log" -p "$TMP/nginx/" -c "$TMP/nginx/nginx.conf")
BATON_CMD=("$BATON" serve --listen "127.0.0.1:$BATON_PORT" --root "$TMP/www")

"${NGINX_CMD[@]}" >"$TMP/nginx/stdout.log" 2>&1 &
PIDS+=($!); NGINX_PID=$!
"${BATON_CMD[@]}" >"$TMP/baton.stdout.log" 2>"$TMP/baton.stderr.log" &
PIDS+=($!); BATON_PID=$!

URL_nginx=http://127.0.0.1:$NGINX_PORT/file.bin
URL_baton=http://127.0.0.1:$BATON_PORT/file.bin
wait_up nginx "$URL_nginx" "$NGINX_PID" "$TMP/nginx/error.log"
wait_up baton "$URL_baton" "$BATON_PID" "$TMP/baton.stderr.log"

# ---------------------------------------------------------------- check the answers
for s in baton nginx; do
    url=URL_$s
    check_body "$s" "${!url}"
done
say "check: both answer 200 with the same 1024-byte body"

# ---------------------------------------------------------------- run
say ""
say_machine
say "commands:"
say "  nginx: ${NGINX_CMD[*]}   (config below)"
say "  baton: ${TOKIO_WORKER_THREADS:+TOKIO_WORKER_THREADS=$TOKIO_WORKER_THREADS }${BATON_CMD[*]}"
say "  load:  $(wrk_cmd "$DURATION" 'http://127.0.0.1:PORT/file.bin')"
say "         alternating baton, nginx x $ROUNDS rounds; warm-up: $(wrk_cmd "$WARMUP" '...') per server"
sed 's/^/    | /' "$TMP/nginx/nginx.conf" | grep -v '^    | *$'
say ""

if [[ $WARMUP != 0 && $WARMUP != 0s ]]; then
    for s in baton nginx; do
        url=URL_$s
        $(wrk_cmd "$WARMUP" "${!url}") >"$TMP/warmup-$s.txt" 2>&1 || die "wrk failed: $(cat "$TMP/warmup-$s.txt")"
    done
fi

# CPU accounting per round (bench/lib.sh): the server's processes (nginx: master and workers),
# wrk, and the whole machine; "others" is the noise indicator.
PIDS_baton="$BATON_PID"
PIDS_nginx="$NGINX_PID $(children_of "$NGINX_PID" | tr '\n' ' ')"

printf '%-6s %-6s %12s %10s %10s %10s %7s %8s %8s %7s\n' round server req/s p50 p99 max errors \
    srv-cpu us/req others
for r in $(seq "$ROUNDS"); do
    for s in baton nginx; do
        url=URL_$s pids=PIDS_$s
        out=$TMP/round$r-$s.txt
        cpu_start ${!pids}
        $(wrk_cmd "$DURATION" "${!url}") >"$out" 2>&1 || die "wrk failed: $(cat "$out")"
        read -r rps p50 p99 max errors < <(parse_wrk "$out")
        read -r cores usreq others < <(cpu_stop "$rps" ${!pids})
        echo "$rps $p50 $p99 $max $errors $cores $usreq $others" >>"$TMP/results-$s.txt"
        printf '%-6s %-6s %12.0f %10s %10s %10s %7s %8s %8s %6s%%\n' "$r" "$s" "$rps" \
            "$(fmt_us "$p50")" "$(fmt_us "$p99")" "$(fmt_us "$max")" "$errors" "$cores" "$usreq" "$others"
    done
done
kill -0 "$BATON_PID" 2>/dev/null || die "baton died during the run: $(tail -5 "$TMP/baton.stderr.log")"
kill -0 "$NGINX_PID" 2>/dev/null || die "nginx died during the run: $(tail -5 "$TMP/nginx/error.log")"

col() { awk -v c="$1" '{ print $c }' "$TMP/results-$2.txt" | median; }
for s in baton nginx; do
    declare "rps_$s=$(col 1 $s)" "p50_$s=$(col 2 $s)" "p99_$s=$(col 3 $s)" "max_$s=$(col 4 $s)"
    declare "cpu_$s=$(col 6 $s)" "usreq_$s=$(col 7 $s)" "oth_$s=$(col 8 $s)"
    declare "err_$s=$(awk '{ s += $5 } END { print s + 0 }' "$TMP/results-$s.txt")"
done

say ""
say "median of $ROUNDS rounds ($DURATION each, -t$THREADS -c$CONNECTIONS):"
printf '%-6s %12s %10s %10s %10s %7s %8s %8s %7s\n' server req/s p50 p99 max errors srv-cpu us/req others
for s in baton nginx; do
    rps=rps_$s p50=p50_$s p99=p99_$s max=max_$s err=err_$s cpu=cpu_$s usreq=usreq_$s oth=oth_$s
    printf '%-6s %12.0f %10s %10s %10s %7s %8.2f %8.1f %6.0f%%\n' "$s" "${!rps}" \
        "$(fmt_us "${!p50}")" "$(fmt_us "${!p99}")" "$(fmt_us "${!max}")" "${!err}" "${!cpu}" "${!usreq}" "${!oth}"
done
say "(srv-cpu: cores the server used; us/req: its CPU time per request; others: share of the"
say " machine's CPU charged to neither the server nor wrk: other load, i.e. noise, plus kernel"
say " work no process is charged for, such as softirq time of the loopback traffic)"

rps_ratio=$(ratio "$rps_baton" "$rps_nginx")
p99_ratio=$(ratio "$p99_baton" "$p99_nginx")
say ""
say "baton/nginx: req/s ${rps_ratio}x (goal >= 1.00x), p99 ${p99_ratio}x (goal <= 1.00x)"

ok_rps=$(awk -v a="$rps_baton" -v b="$rps_nginx" 'BEGIN { print (a >= b) ? 1 : 0 }')
ok_p99=$(awk -v a="$p99_baton" -v b="$p99_nginx" 'BEGIN { print (a <= b) ? 1 : 0 }')
misses=()
[[ $ok_rps == 1 ]] || misses+=("req/s ${rps_ratio}x < 1.00x")
[[ $ok_p99 == 1 ]] || misses+=("p99 ${p99_ratio}x > 1.00x")
if [[ $err_baton != 0 || $err_nginx != 0 ]]; then
    say "warning: wrk counted errors or non-2xx/3xx answers (baton $err_baton, nginx $err_nginx); figures are suspect"
fi
if [[ ${#misses[@]} -eq 0 ]]; then
    say "verdict: baton MEETS the goals (req/s >= 1.0x nginx, p99 <= nginx)"
else
    say "verdict: baton MISSES the goals (req/s >= 1.0x nginx, p99 <= nginx): $(IFS=';'; echo "${misses[*]}" | sed 's/;/; /g')"
fi
