#!/usr/bin/env bash
# bench/http.sh: baton vs Debian's nginx serving the same static files on loopback, loaded with
# wrk: a matrix of file sizes x connection counts.
#
# A benchmark that prints figures, not a test: it exits 0 whatever the verdict (non-zero only
# when it cannot run). The machine is assumed noisy, so at every point (size, connections) the
# rounds alternate between the servers (baton then nginx, then nginx then baton, ...) and the
# table shows the median of the rounds per server. Both servers run all along; RSS is read after
# every round (baton: its one process; nginx: master + workers) and the table shows the largest.
# The verdict names the points where baton misses a goal, and of those the ties: points where
# baton was ahead in some rounds and behind in others.
#
# Environment (defaults in brackets):
#   SIZES ["1k 64k 1m 16m"]   file sizes (k = KiB, m = MiB, or bytes)
#   CONNECTIONS ["64 1000"]   wrk -c values
#   ROUNDS [3]                rounds per server and point
#   DURATION [5s]             wrk -d per round
#   WARMUP [1s]               wrk -d of one warm-up run per server and point (0 to skip)
#   THREADS [2]               wrk -t
#   TIMEOUT [10s]             wrk --timeout (a 16 MiB file at 1000 connections takes seconds)
#   DISCARD=1                 wrk drops response bodies in the kernel (recv with MSG_TRUNC,
#                             bench/wrk-discard.c, built with cc) instead of copying them: at
#                             16 MiB and 64 connections, where wrk's copying is the bottleneck,
#                             this measures the servers
#   RESULTS                   write the medians here too, tab-separated [in the temporary dir]
#   PLOT                      draw the table into this SVG file (bench/plot-http.py)
#   BATON_BIN                 run this baton binary instead of building target/release/baton
#   KEEP_TMP=1                keep the temporary directory (configs, logs, raw wrk outputs)
#   Anything baton or tokio reads from the environment passes through, e.g.
#   TOKIO_WORKER_THREADS=1 (tokio's multi-thread runtime honours it; default: one per core).
#
# The fd limit of this shell is raised to its hard limit (wrk and both servers inherit it).
# Needs nginx and wrk (installed with apt-get when missing), curl, ss, python3 for PLOT, and
# cargo unless BATON_BIN.

set -euo pipefail

SIZES=${SIZES:-1k 64k 1m 16m}
CONNECTIONS_LIST=${CONNECTIONS:-64 1000}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5s}
WARMUP=${WARMUP:-1s}
THREADS=${THREADS:-2}
TIMEOUT=${TIMEOUT:-10s}
RESULTS=${RESULTS:-}
PLOT=${PLOT:-}
DISCARD=${DISCARD:-0}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_SCRIPT=bench/http.sh
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh"

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer, not '$ROUNDS'"
[[ $DISCARD == 0 || $DISCARD == 1 ]] || die "DISCARD must be 0 or 1, not '$DISCARD'"
bytes_of() { # 1k, 64k, 1m, 16m, 1000
    case $1 in
        *[kK]) echo $((${1%?} * 1024)) ;;
        *[mM]) echo $((${1%?} * 1024 * 1024)) ;;
        *) echo "$1" ;;
    esac
}
label_of() { # bytes: 1 KiB, 64 KiB, 1 MiB, 1000 B
    awk -v b="$1" 'BEGIN { if (b >= 1048576 && b % 1048576 == 0) printf "%d MiB", b / 1048576;
        else if (b >= 1024 && b % 1024 == 0) printf "%d KiB", b / 1024; else printf "%d B", b }'
}
read -ra SIZE_LIST <<<"$SIZES"
read -ra CONN_LIST <<<"$CONNECTIONS_LIST"
((${#SIZE_LIST[@]} > 0 && ${#CONN_LIST[@]} > 0)) || die "SIZES and CONNECTIONS must not be empty"
max_conns=0
for s in "${SIZE_LIST[@]}"; do
    [[ $s =~ ^[1-9][0-9]*[kKmM]?$ ]] || die "SIZES: '$s' is not a size (1k, 64k, 1m, 16m, 1000)"
done
for c in "${CONN_LIST[@]}"; do
    [[ $c =~ ^[1-9][0-9]*$ ]] || die "CONNECTIONS: '$c' is not a positive integer"
    ((c > max_conns)) && max_conns=$c
done
# wrk holds one fd per connection; the servers as many again (nginx sets its own limit).
raise_fds $((max_conns + 256))

bench_tools
bench_baton
bench_tmp
RESULTS=${RESULTS:-$TMP/results.tsv}
WRK_ENV=() DISCARD_NOTE=
if [[ $DISCARD == 1 ]]; then
    command -v cc >/dev/null || die "DISCARD=1 needs a C compiler: apt-get install gcc"
    cc -O2 -shared -fPIC -o "$TMP/wrk-discard.so" "$REPO/bench/wrk-discard.c" -ldl \
        || die "cannot build bench/wrk-discard.c"
    WRK_ENV=(env LD_PRELOAD="$TMP/wrk-discard.so") DISCARD_NOTE=", bodies discarded"
fi

# ---------------------------------------------------------------- content and servers
bench_content
for s in "${SIZE_LIST[@]}"; do
    b=$(bytes_of "$s")
    [[ -e $TMP/www/file-$b.bin ]] && continue
    head -c "$b" /dev/urandom >"$TMP/www/file-$b.bin"
    chmod 644 "$TMP/www/file-$b.bin"
done

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

BASE_nginx=http://127.0.0.1:$NGINX_PORT
BASE_baton=http://127.0.0.1:$BATON_PORT
wait_up nginx "$BASE_nginx/file.bin" "$NGINX_PID" "$TMP/nginx/error.log"
wait_up baton "$BASE_baton/file.bin" "$BATON_PID" "$TMP/baton.stderr.log"
sleep 0.5
IDLE_RSS_baton=$(rss_kib "$BATON_PID")
# shellcheck disable=SC2034 # read through ${!pids}
PIDS_baton="$BATON_PID"
PIDS_nginx="$NGINX_PID $(children_of "$NGINX_PID" | tr '\n' ' ')"
# shellcheck disable=SC2086 # a list of pids
IDLE_RSS_nginx=$(rss_kib $PIDS_nginx)

# ---------------------------------------------------------------- check the answers
for s in "${SIZE_LIST[@]}"; do
    b=$(bytes_of "$s")
    for srv in baton nginx; do
        base=BASE_$srv
        check_body "$srv" "${!base}/file-$b.bin" "$TMP/www/file-$b.bin"
    done
done
say "check: both answer 200 with the same body for every size ($SIZES)"

# ---------------------------------------------------------------- run
wrk_point() { # connections duration url: the command, for the header
    echo ${WRK_ENV[@]+"LD_PRELOAD=<bench/wrk-discard.c, built>"} "$WRK" -t"$THREADS" -c"$1" -d"$2" --timeout "$TIMEOUT" --latency "$3"
}
run_wrk() { # connections duration url
    ${WRK_ENV[@]+"${WRK_ENV[@]}"} "$WRK" -t"$THREADS" -c"$1" -d"$2" --timeout "$TIMEOUT" --latency "$3"
}
say ""
say_machine
say "fd limit: $(ulimit -n) (ulimit -n of the benchmark, wrk and baton)"
say "commands:"
say "  nginx: ${NGINX_CMD[*]}   (config below)"
say "  baton: ${TOKIO_WORKER_THREADS:+TOKIO_WORKER_THREADS=$TOKIO_WORKER_THREADS }${BATON_CMD[*]}"
say "  load:  $(wrk_point C "$DURATION" 'http://127.0.0.1:PORT/file-SIZE.bin'), C in: $CONNECTIONS_LIST; SIZE in: $SIZES"
if [[ $WARMUP != 0 && $WARMUP != 0s ]]; then
    say "         per point: warm-up $(wrk_point C "$WARMUP" '...') per server, then $ROUNDS rounds alternating the servers"
else
    say "         per point: $ROUNDS rounds alternating the servers, no warm-up"
fi
sed 's/^/    | /' "$TMP/nginx/nginx.conf" | grep -v '^    | *$'
say ""

printf '%-8s %5s %-5s %-6s %10s %10s %10s %10s %7s %8s %8s %10s %7s\n' size conns round server req/s MB/s \
    p50 p99 errors srv-cpu us/req rss others
for c in "${CONN_LIST[@]}"; do
    for s in "${SIZE_LIST[@]}"; do
        b=$(bytes_of "$s") point=$b-$c
        if [[ $WARMUP != 0 && $WARMUP != 0s ]]; then
            for srv in baton nginx; do
                base=BASE_$srv
                run_wrk "$c" "$WARMUP" "${!base}/file-$b.bin" >"$TMP/warmup-$point-$srv.txt" 2>&1 \
                    || die "wrk failed: $(cat "$TMP/warmup-$point-$srv.txt")"
            done
        fi
        for r in $(seq "$ROUNDS"); do
            order="baton nginx"
            ((r % 2 == 1)) || order="nginx baton"
            for srv in $order; do
                base=BASE_$srv pids=PIDS_$srv
                out=$TMP/round-$point-$r-$srv.txt
                # shellcheck disable=SC2086 # a list of pids
                cpu_start ${!pids}
                run_wrk "$c" "$DURATION" "${!base}/file-$b.bin" >"$out" 2>&1 || die "wrk failed: $(cat "$out")"
                read -r rps p50 p99 max errors < <(parse_wrk "$out")
                # shellcheck disable=SC2086
                read -r cores usreq others < <(cpu_stop "$rps" ${!pids})
                # shellcheck disable=SC2086
                rss=$(rss_kib ${!pids})
                echo "$rps $p50 $p99 $max $errors $cores $usreq $others $rss" >>"$TMP/results-$point-$srv.txt"
                printf '%-8s %5s %-5s %-6s %10.0f %10.1f %10s %10s %7s %8s %8s %10s %6s%%\n' "$(label_of "$b" | tr -d ' ')" \
                    "$c" "$r" "$srv" "$rps" "$(awk -v r="$rps" -v b="$b" 'BEGIN { print r * b / 1e6 }')" \
                    "$(fmt_us "$p50")" "$(fmt_us "$p99")" "$errors" "$cores" "$usreq" "$(fmt_kib "$rss" | tr -d ' ')" "$others"
            done
        done
        kill -0 "$BATON_PID" 2>/dev/null || die "baton died during the run: $(tail -5 "$TMP/baton.stderr.log")"
        kill -0 "$NGINX_PID" 2>/dev/null || die "nginx died during the run: $(tail -5 "$TMP/nginx/error.log")"
    done
done
# shellcheck disable=SC2086
FINAL_RSS_nginx=$(rss_kib $PIDS_nginx)
FINAL_RSS_baton=$(rss_kib "$BATON_PID")
PEAK_baton=$(awk '$1 == "VmHWM:" { print $2 }' "/proc/$BATON_PID/status")

# ---------------------------------------------------------------- the table
# A p99 of a point where no request completed (a 16 MiB file at 1000 connections in a short
# round, shared fairly) is no figure.
p99_of() { # rps p99_us
    if awk -v r="$1" 'BEGIN { exit !(r > 0) }'; then fmt_us "$2"; else echo "none-done"; fi
}
col() { awk -v c="$1" '{ print $c }' "$TMP/results-$2-$3.txt" | median; }
# The lowest and highest of the per-round ratios baton/nginx of column $2 at point $1 ("lo hi"):
# the rounds alternate the servers, so round r of one is next to round r of the other.
# A third word says whether the rounds went both ways: "tie" if baton was ahead (req/s: ratio >=
# 1; p99: <= 1) in some rounds and behind in others, "-" if not. For p99, rounds in which either
# server completed no request have no p99 and are left out.
round_ratios() { # point column
    paste -d' ' "$TMP/results-$1-baton.txt" "$TMP/results-$1-nginx.txt" | awk -v c="$2" '
        (c == 1 || ($1 > 0 && $10 > 0)) && $(c + 9) > 0 {
            r = $c / $(c + 9)
            if (!seen || r < lo) lo = r
            if (!seen || r > hi) hi = r
            seen = 1
        }
        END {
            ahead = (c == 1) ? hi >= 1 : lo <= 1
            behind = (c == 1) ? lo < 1 : hi > 1
            printf "%.2f %.2f %s\n", lo, hi, (seen && ahead && behind) ? "tie" : "-"
        }'
}
colmax() { awk -v c="$1" '$c > m { m = $c } END { print m + 0 }' "$TMP/results-$2-$3.txt"; }
say ""
say "medians of $ROUNDS rounds ($DURATION each, wrk -t$THREADS$DISCARD_NOTE); rss: the largest after a round"
say "(baton: its process; nginx: master + workers); ratios baton/nginx"
printf '%-8s %5s %12s %12s %7s %10s %10s %7s %10s %10s %6s %6s %6s\n' size conns baton-req/s nginx-req/s \
    ratio baton-p99 nginx-p99 ratio baton-rss nginx-rss errors b-cpu n-cpu
printf 'bytes\tconnections\tbaton_rps\tnginx_rps\tbaton_p99_us\tnginx_p99_us\tbaton_rss_kib\tnginx_rss_kib\terrors\n' >"$RESULTS"
misses=() ties=()
# A missed goal at the point of the loop below (label, c, point): what (req/s, p99), its column
# in the results files, the ratio of the medians; and whether the rounds call it a tie.
missed() {
    misses+=("$label/$c $1 ${3}x")
    local lo hi tie
    read -r lo hi tie < <(round_ratios "$point" "$2")
    if [[ $tie == tie ]]; then ties+=("$label/$c $1 (rounds ${lo}-${hi}x)"); fi
}
errors_total=0
# Set by the declares below, per point.
rps_baton='' rps_nginx='' p99_baton='' p99_nginx='' rss_baton='' rss_nginx='' cpu_baton='' cpu_nginx=''
for c in "${CONN_LIST[@]}"; do
    for s in "${SIZE_LIST[@]}"; do
        b=$(bytes_of "$s") point=$(bytes_of "$s")-$c
        for srv in baton nginx; do
            declare "rps_$srv=$(col 1 "$point" $srv)" "p99_$srv=$(col 3 "$point" $srv)"
            declare "rss_$srv=$(colmax 9 "$point" $srv)" "cpu_$srv=$(col 6 "$point" $srv)"
        done
        errs=$(cat "$TMP/results-$point-baton.txt" "$TMP/results-$point-nginx.txt" | awk '{ s += $5 } END { print s + 0 }')
        errors_total=$((errors_total + errs))
        rr=$(ratio "$rps_baton" "$rps_nginx") pr=$(ratio "$p99_baton" "$p99_nginx")
        label=$(label_of "$b")
        printf '%-8s %5s %12.0f %12.0f %6sx %10s %10s %6sx %10s %10s %6s %6.2f %6.2f\n' "${label// /}" "$c" \
            "$rps_baton" "$rps_nginx" "$rr" "$(p99_of "$rps_baton" "$p99_baton")" "$(p99_of "$rps_nginx" "$p99_nginx")" "$pr" \
            "$(fmt_kib "$rss_baton" | tr -d ' ')" "$(fmt_kib "$rss_nginx" | tr -d ' ')" "$errs" "$cpu_baton" "$cpu_nginx"
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$b" "$c" "$rps_baton" "$rps_nginx" \
            "$p99_baton" "$p99_nginx" "$rss_baton" "$rss_nginx" "$errs" >>"$RESULTS"
        awk -v a="$rps_baton" -v n="$rps_nginx" 'BEGIN { exit !(a >= n) }' || missed req/s 1 "$rr"
        awk -v a="$p99_baton" -v n="$p99_nginx" -v r="$rps_baton" 'BEGIN { exit !(a <= n && r > 0) }' || missed p99 3 "$pr"
        if ((c == max_conns)); then
            awk -v a="$rss_baton" -v n="$rss_nginx" 'BEGIN { exit !(a <= n) }' || misses+=("$label/$c rss ${rss_baton}>${rss_nginx} KiB")
        fi
    done
done
say "(b-cpu, n-cpu: cores the server used; run the rounds above for the noise column 'others')"
say ""
say "rss: baton idle (after start) $(fmt_kib "$IDLE_RSS_baton"), after the run $(fmt_kib "$FINAL_RSS_baton"), peak (VmHWM) $(fmt_kib "$PEAK_baton");"
say "     nginx idle $(fmt_kib "$IDLE_RSS_nginx"), after the run $(fmt_kib "$FINAL_RSS_nginx")"
awk -v a="$IDLE_RSS_baton" 'BEGIN { exit !(a <= 10240) }' || misses+=("idle rss $(fmt_kib "$IDLE_RSS_baton") > 10 MiB")

if ((errors_total > 0)); then
    say "warning: wrk counted $errors_total errors or non-2xx/3xx answers (column errors); those points are suspect"
fi
goals="req/s >= nginx and p99 <= nginx at every point, rss at $max_conns connections <= nginx, idle rss <= 10 MiB"
if [[ ${#misses[@]} -eq 0 ]]; then
    say "verdict: baton MEETS the goals ($goals)"
else
    joined=$(printf '%s; ' "${misses[@]}")
    say "verdict: baton MISSES the goals ($goals): ${joined%; }"
    if [[ ${#ties[@]} -gt 0 ]]; then
        joined=$(printf '%s; ' "${ties[@]}")
        say "         of those, baton was ahead in some rounds and behind in others (a tie within this"
        say "         machine's noise, not a lead either way): ${joined%; }"
    fi
fi

if [[ -n $PLOT ]]; then
    python3 "$REPO/bench/plot-http.py" "$RESULTS" "$PLOT" \
        "$(date -u +%F): medians of $ROUNDS rounds of $DURATION, wrk -t$THREADS$DISCARD_NOTE, $(nproc) cores shared with wrk" \
        && say "plot: $PLOT"
fi
