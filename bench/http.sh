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

say() { printf '%s\n' "$*"; }
die() { printf 'bench/http.sh: %s\n' "$*" >&2; exit 1; }

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer, not '$ROUNDS'"

# ---------------------------------------------------------------- tools
find_nginx() {
    command -v nginx 2>/dev/null || { [[ -x /usr/sbin/nginx ]] && echo /usr/sbin/nginx; } || true
}
NGINX=$(find_nginx)
WRK=$(command -v wrk 2>/dev/null || true)
if [[ -z $NGINX || -z $WRK ]]; then
    # nginx-light: the smallest Debian nginx flavour; static files need nothing more (and on
    # Debian 13+, where the flavours are gone, plain nginx).
    pkgs=(wrk)
    if [[ -z $NGINX ]]; then
        if apt-cache show nginx-light >/dev/null 2>&1; then pkgs+=(nginx-light); else pkgs+=(nginx); fi
    fi
    SUDO=; [[ $(id -u) -eq 0 ]] || SUDO=sudo
    say "installing ${pkgs[*]} ..."
    $SUDO apt-get install -y "${pkgs[@]}" >/dev/null \
        || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y "${pkgs[@]}" >/dev/null; } \
        || die "cannot install ${pkgs[*]}"
    NGINX=$(find_nginx); WRK=$(command -v wrk || true)
    [[ -n $NGINX && -n $WRK ]] || die "nginx or wrk still missing after apt-get install"
fi
command -v curl >/dev/null || die "curl is needed"
command -v ss >/dev/null || die "ss (iproute2) is needed"

if [[ -n ${BATON_BIN:-} ]]; then
    BATON=$BATON_BIN
else
    say "building baton (cargo build --release) ..."
    (cd "$REPO" && cargo build --release --quiet) || die "cargo build --release failed"
    BATON=$REPO/target/release/baton
fi
[[ -x $BATON ]] || die "$BATON is not executable"

# ---------------------------------------------------------------- processes and cleanup
TMP=$(mktemp -d "${TMPDIR:-/tmp}/baton-bench.XXXXXX")
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        # Give each a moment to stop (baton drains, nginx stops its workers), then insist.
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
    if [[ ${KEEP_TMP:-0} == 1 ]]; then say "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'trap - INT; cleanup; trap - EXIT; kill -INT $$' INT
trap 'exit 143' TERM HUP

# A port nothing listens on now (a race with other programs is possible but unlikely).
free_port() {
    local port used
    used=$(ss -Htan | awk '{print $4}' | sed 's/.*://' | sort -u)
    for _ in $(seq 200); do
        port=$((20000 + RANDOM % 40000))
        grep -qx "$port" <<<"$used" || { echo "$port"; return; }
    done
    die "no free port found"
}

wait_up() { # name url pid log
    for _ in $(seq 100); do
        curl -fsS -o /dev/null "$2" 2>/dev/null && return 0
        kill -0 "$3" 2>/dev/null || { cat "$4" >&2; die "$1 exited at start (log above)"; }
        sleep 0.1
    done
    cat "$4" >&2; die "$1 did not answer $2 within 10 s"
}

# ---------------------------------------------------------------- content and servers
# nginx's workers drop to an unprivileged user when started as root: let them read the root.
chmod 755 "$TMP"
mkdir -p "$TMP/www" "$TMP/nginx"
head -c 1024 /dev/urandom >"$TMP/www/file.bin"
chmod 644 "$TMP/www/file.bin"

NGINX_PORT=$(free_port)
BATON_PORT=$(free_port)
while [[ $BATON_PORT == "$NGINX_PORT" ]]; do BATON_PORT=$(free_port); done

MIME=; [[ -r /etc/nginx/mime.types ]] && MIME="include /etc/nginx/mime.types;"
cat >"$TMP/nginx/nginx.conf" <<EOF
# Debian's defaults where they matter for static files; no logging of requests.
daemon off;
worker_processes 2;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events {
    worker_connections 1024;
}
http {
    sendfile on;
    tcp_nopush on;
    $MIME
    default_type application/octet-stream;
    access_log off;
    client_body_temp_path $TMP/nginx/body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    server {
        listen 127.0.0.1:$NGINX_PORT;
        root $TMP/www;
    }
}
EOF

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
    read -r code size < <(curl -sS -o "$TMP/$s.body" -w '%{http_code} %{size_download}\n' "${!url}")
    [[ $code == 200 && $size == 1024 ]] || die "$s answered $code with $size bytes (want 200, 1024)"
    cmp -s "$TMP/$s.body" "$TMP/www/file.bin" || die "$s served a body that differs from the file"
done
say "check: both answer 200 with the same 1024-byte body"

# ---------------------------------------------------------------- wrk and its output
# Converts a wrk time ("250.00us", "1.08ms", "2.00s", "1.50m") to microseconds.
to_us() {
    awk -v v="$1" 'BEGIN {
        if (match(v, /^[0-9.]+/) == 0) { print "nan"; exit }
        n = substr(v, 1, RLENGTH); u = substr(v, RLENGTH + 1)
        f = (u == "us") ? 1 : (u == "ms") ? 1e3 : (u == "s") ? 1e6 : (u == "m") ? 6e7 : (u == "h") ? 3.6e9 : (u == "ns") ? 1e-3 : -1
        if (f < 0) { print "nan"; exit }
        printf "%.3f\n", n * f }'
}
# Converts a wrk count ("56.20k", "1.2M", "111654.54") to a plain number.
to_num() {
    awk -v v="$1" 'BEGIN {
        if (match(v, /^[0-9.]+/) == 0) { print "nan"; exit }
        n = substr(v, 1, RLENGTH); u = substr(v, RLENGTH + 1)
        f = (u == "") ? 1 : (u == "k") ? 1e3 : (u == "M") ? 1e6 : (u == "G") ? 1e9 : -1
        if (f < 0) { print "nan"; exit }
        printf "%.2f\n", n * f }'
}

# Prints "rps p50_us p99_us max_us errors" from one wrk --latency output.
parse_wrk() {
    local out=$1 rps p50 p99 max errors
    rps=$(awk '$1 == "Requests/sec:" {print $2}' "$out")
    p50=$(awk '$1 == "50%" {print $2; exit}' "$out")
    p99=$(awk '$1 == "99%" {print $2; exit}' "$out")
    max=$(awk '$1 == "Latency" && NF >= 4 {print $4; exit}' "$out")
    # Socket errors (connect/read/write/timeout) plus non-2xx/3xx responses.
    errors=$(awk '/Socket errors:/ { gsub(/,/, ""); s += $4 + $6 + $8 + $10 }
                  /Non-2xx or 3xx responses:/ { s += $NF } END { print s + 0 }' "$out")
    [[ -n $rps && -n $p50 && -n $p99 && -n $max ]] || { cat "$out" >&2; die "cannot parse wrk output $out"; }
    echo "$(to_num "$rps") $(to_us "$p50") $(to_us "$p99") $(to_us "$max") $errors"
}

wrk_cmd() { # duration url
    echo "$WRK" -t"$THREADS" -c"$CONNECTIONS" -d"$1" --latency "$2"
}

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

fmt_us() { awk -v u="$1" 'BEGIN { if (u >= 1e6) printf "%.2fs", u / 1e6; else if (u >= 1e3) printf "%.2fms", u / 1e3; else printf "%.0fus", u }'; }

# ---------------------------------------------------------------- run
say ""
say "machine:  $(nproc) cores, $(uname -sr), load average $(cut -d' ' -f1-3 /proc/loadavg)"
say "versions: $("$NGINX" -v 2>&1 | sed 's/^nginx version: //'), $("$WRK" -v 2>&1 | head -1 | awk '{print $1, $2}'), baton $("$BATON" --version | awk '{print $2}')"
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

# CPU accounting per round, in clock ticks: the server's processes (nginx: master and workers),
# wrk (the children this shell has waited for), and the whole machine. What the machine spent
# beyond those two is other load: the noise indicator in the "others" column.
HZ=$(getconf CLK_TCK)
fields_of() { # pid: the fields of /proc/pid/stat after "pid (comm) ", i.e. from state on
    local line
    { read -r line <"/proc/$1/stat"; } 2>/dev/null || return 1
    echo "${line##*) }"
}
children_of() {
    local f p fields
    for f in /proc/[0-9]*/stat; do
        p=${f#/proc/}; p=${p%/stat}
        read -ra fields < <(fields_of "$p") || continue
        [[ ${fields[1]:-} == "$1" ]] && echo "$p"
    done
    return 0
}
pids_ticks() { # pids: their utime+stime
    local t=0 p fields
    for p in "$@"; do
        read -ra fields < <(fields_of "$p") || continue
        t=$((t + fields[11] + fields[12]))
    done
    echo "$t"
}
waited_ticks() { awk '{ sub(/^.*\) /, ""); print $14 + $15 }' /proc/$$/stat; }
machine_ticks() { awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat; }
PIDS_baton="$BATON_PID"
PIDS_nginx="$NGINX_PID $(children_of "$NGINX_PID" | tr '\n' ' ')"

printf '%-6s %-6s %12s %10s %10s %10s %7s %8s %8s %7s\n' round server req/s p50 p99 max errors \
    srv-cpu us/req others
for r in $(seq "$ROUNDS"); do
    for s in baton nginx; do
        url=URL_$s pids=PIDS_$s
        out=$TMP/round$r-$s.txt
        srv0=$(pids_ticks ${!pids}) wrk0=$(waited_ticks); read -r busy0 all0 < <(machine_ticks)
        t0=$(date +%s.%N)
        $(wrk_cmd "$DURATION" "${!url}") >"$out" 2>&1 || die "wrk failed: $(cat "$out")"
        t1=$(date +%s.%N)
        srv1=$(pids_ticks ${!pids}) wrk1=$(waited_ticks); read -r busy1 all1 < <(machine_ticks)
        read -r rps p50 p99 max errors < <(parse_wrk "$out")
        read -r cores usreq others < <(awk -v hz="$HZ" -v t="$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" \
            -v srv=$((srv1 - srv0)) -v wrk=$((wrk1 - wrk0)) -v busy=$((busy1 - busy0)) -v all=$((all1 - all0)) \
            -v rps="$rps" 'BEGIN {
                o = (all > 0) ? 100 * (busy - srv - wrk) / all : 0; if (o < 0) o = 0
                printf "%.2f %.1f %.0f\n", srv / hz / t, (rps > 0) ? 1e6 * srv / hz / t / rps : 0, o }')
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

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "inf" }'; }
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
