# bench/lib.sh: helpers shared by the benchmarks in bench/ (sourced, not run).
#
# The script that sources it sets BENCH_SCRIPT (its name in messages), THREADS and CONNECTIONS
# (wrk -t/-c) and REPO first, and may define cleanup_extra, which cleanup runs before it stops
# the processes in PIDS. Needs bash >= 5 (EPOCHREALTIME).

say() { printf '%s\n' "$*"; }
die() { printf '%s: %s\n' "${BENCH_SCRIPT:-bench}" "$*" >&2; exit 1; }

# ---------------------------------------------------------------- tools
find_nginx() {
    command -v nginx 2>/dev/null || { [[ -x /usr/sbin/nginx ]] && echo /usr/sbin/nginx; } || true
}

# Sets NGINX and WRK, installing nginx and wrk with apt-get when missing; checks curl and ss.
bench_tools() {
    NGINX=$(find_nginx)
    WRK=$(command -v wrk 2>/dev/null || true)
    if [[ -z $NGINX || -z $WRK ]]; then
        # nginx-light: the smallest Debian nginx flavour; static files need nothing more (and on
        # Debian 13+, where the flavours are gone, plain nginx).
        local pkgs=(wrk) SUDO=
        if [[ -z $NGINX ]]; then
            if apt-cache show nginx-light >/dev/null 2>&1; then pkgs+=(nginx-light); else pkgs+=(nginx); fi
        fi
        [[ $(id -u) -eq 0 ]] || SUDO=sudo
        say "installing ${pkgs[*]} ..."
        $SUDO apt-get install -y "${pkgs[@]}" >/dev/null \
            || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y "${pkgs[@]}" >/dev/null; } \
            || die "cannot install ${pkgs[*]}"
        NGINX=$(find_nginx); WRK=$(command -v wrk || true)
        [[ -n $NGINX && -n $WRK ]] || die "nginx or wrk still missing after apt-get install"
    fi
    command -v curl >/dev/null || die "curl is needed"
    command -v ss >/dev/null || die "ss (iproute2) is needed"
}

# Sets BATON: $BATON_BIN, or target/release/baton after `cargo build --release`.
bench_baton() {
    if [[ -n ${BATON_BIN:-} ]]; then
        BATON=$BATON_BIN
    else
        say "building baton (cargo build --release) ..."
        (cd "$REPO" && cargo build --release --quiet) || die "cargo build --release failed"
        BATON=$REPO/target/release/baton
    fi
    [[ -x $BATON ]] || die "$BATON is not executable"
}

# ---------------------------------------------------------------- sleeps that fork nothing
# A read with a timeout on a pipe that never has data: no sleep(1) started while the benchmark's
# own work competes with the load for the CPU.
exec {NAP_FD}<> <(:)
nap() { read -r -t "$1" -u "$NAP_FD" || true; } # seconds, e.g. 0.002
sleep_us() { # microseconds
    local s
    (($1 > 0)) || return 0
    printf -v s '%d.%06d' $(($1 / 1000000)) $(($1 % 1000000))
    nap "$s"
}

# ---------------------------------------------------------------- processes and cleanup
# Creates TMP and installs the traps: on exit, Ctrl-C or SIGTERM, cleanup_extra (if defined)
# runs, then every pid in PIDS is stopped (SIGTERM, 5 s, SIGKILL) and TMP is removed.
bench_tmp() {
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/baton-bench.XXXXXX")
    PIDS=()
    trap cleanup EXIT
    trap 'trap - INT; cleanup; trap - EXIT; kill -INT $$' INT
    trap 'exit 143' TERM HUP
}
cleanup() {
    local pid
    if declare -F cleanup_extra >/dev/null; then cleanup_extra || true; fi
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

# baton's log as it grows, read from LOG_FD (the caller opens it on the log file; a read at its
# end returns at once). Sets SERVING_PID and SERVING_GEN from the last "serving generation G (pid
# P)" line, which a generation logs once it accepts. Reading a regular file, bash's read takes
# whole blocks: a scan costs a few syscalls, where a GET over /dev/tcp costs one read per byte.
log_scan() {
    local line
    while :; do
        if IFS= read -r -u "$LOG_FD" line; then
            line=$LOG_PART$line LOG_PART=
            if [[ $line =~ serving\ generation\ ([0-9]+)\ \(pid\ ([0-9]+)\) ]]; then
                SERVING_GEN=${BASH_REMATCH[1]} SERVING_PID=${BASH_REMATCH[2]}
            fi
        else
            # A line still being written: kept until its end arrives.
            LOG_PART+=$line
            return 0
        fi
    done
}

# ---------------------------------------------------------------- content and nginx
# $TMP/www/file.bin: 1024 random bytes, readable by nginx's unprivileged workers.
bench_content() {
    # nginx's workers drop to an unprivileged user when started as root: let them read the root.
    chmod 755 "$TMP"
    mkdir -p "$TMP/www" "$TMP/nginx"
    head -c 1024 /dev/urandom >"$TMP/www/file.bin"
    chmod 644 "$TMP/www/file.bin"
}

# Writes $TMP/nginx/nginx.conf: serve $TMP/www on 127.0.0.1:PORT, pid file $TMP/nginx/nginx.pid.
nginx_conf() { # port daemon(on|off)
    local mime=
    [[ -r /etc/nginx/mime.types ]] && mime="include /etc/nginx/mime.types;"
    cat >"$TMP/nginx/nginx.conf" <<EOF
# Debian's defaults where they matter for static files; no logging of requests.
daemon $2;
worker_processes 2;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
# Room for bench/http.sh's 1000 connections in one worker (Debian's default is 768).
worker_rlimit_nofile 4096;
events {
    worker_connections 2048;
}
http {
    sendfile on;
    tcp_nopush on;
    $mime
    default_type application/octet-stream;
    access_log off;
    client_body_temp_path $TMP/nginx/body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    server {
        listen 127.0.0.1:$1;
        root $TMP/www;
    }
}
EOF
}

# Dies unless URL answers 200 with exactly FILE [$TMP/www/file.bin].
check_body() { # name url [file]
    local code size file=${3:-$TMP/www/file.bin} want
    want=$(stat -c %s "$file")
    read -r code size < <(curl -sS -o "$TMP/$1.body" -w '%{http_code} %{size_download}\n' "$2")
    [[ $code == 200 && $size == "$want" ]] || die "$1 answered $code with $size bytes (want 200, $want)"
    cmp -s "$TMP/$1.body" "$file" || die "$1 served a body that differs from ${file##*/}"
    rm -f "$TMP/$1.body"
}

# Raises this shell's soft fd limit (inherited by wrk and the servers) to at least N, up to the
# hard limit; dies when the hard limit is below N.
raise_fds() { # n
    local hard
    hard=$(ulimit -Hn)
    if [[ $hard != unlimited ]] && ((hard < $1)); then
        die "wrk needs $1 fds but the hard limit (ulimit -Hn) is $hard: raise it (limits.conf, LimitNOFILE=)"
    fi
    ulimit -n "$hard" 2>/dev/null || ulimit -n "$1" || die "cannot raise ulimit -n to $1"
}

# The resident set size of the given pids together, in KiB (0 for pids that are gone).
rss_kib() { # pids
    local p kib t=0
    for p in "$@"; do
        kib=$(awk '$1 == "VmRSS:" { print $2 }' "/proc/$p/status" 2>/dev/null || true)
        t=$((t + ${kib:-0}))
    done
    echo "$t"
}

fmt_kib() { awk -v k="$1" 'BEGIN { printf "%.1f MiB", k / 1024 }'; }

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

# Prints "requests connect read write timeout non2xx" from one wrk output: what parse_wrk sums
# as errors, one by one, and the number of requests wrk completed.
wrk_failures() {
    awk '/ requests in / { r = $1 }
         /Socket errors:/ { gsub(/,/, ""); c = $4; rd = $6; w = $8; t = $10 }
         /Non-2xx or 3xx responses:/ { n = $NF }
         END { printf "%d %d %d %d %d %d\n", r, c, rd, w, t, n }' "$1"
}

wrk_cmd() { # duration url
    echo "$WRK" -t"$THREADS" -c"$CONNECTIONS" -d"$1" --latency "$2"
}

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

fmt_us() { awk -v u="$1" 'BEGIN { if (u >= 1e6) printf "%.2fs", u / 1e6; else if (u >= 1e3) printf "%.2fms", u / 1e3; else printf "%.0fus", u }'; }

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "inf" }'; }

say_machine() {
    say "machine:  $(nproc) cores, $(uname -sr), load average $(cut -d' ' -f1-3 /proc/loadavg)"
    say "versions: $("$NGINX" -v 2>&1 | sed 's/^nginx version: //'), $("$WRK" -v 2>&1 | head -1 | awk '{print $1, $2}'), baton $("$BATON" --version | awk '{print $2}')"
}

# ---------------------------------------------------------------- CPU accounting
# In clock ticks: the server's processes, wrk (the children this shell has waited for), and the
# whole machine. What the machine spent beyond those is other load: the noise indicator.
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
# CPU ticks of a process and all its descendants, those already reaped included (through the
# cutime/cstime of whoever reaped them). Exact for a subreaper root, whose orphaned descendants
# come back to it instead of to PID 1. Forks nothing.
tree_ticks() { # root pid
    local -A parent=() own=()
    local f p q line fields t=0
    for f in /proc/[0-9]*/stat; do
        { read -r line <"$f"; } 2>/dev/null || continue
        p=${f#/proc/}; p=${p%/stat}
        read -ra fields <<<"${line##*) }"
        parent[$p]=${fields[1]}
        own[$p]=$((fields[11] + fields[12] + fields[13] + fields[14]))
    done
    for p in "${!own[@]}"; do
        q=$p
        while [[ -n $q && $q != "$1" && $q -gt 1 ]]; do q=${parent[$q]:-}; done
        [[ $q == "$1" ]] && t=$((t + own[$p]))
    done
    echo "$t"
}
waited_ticks() { awk '{ sub(/^.*\) /, ""); print $14 + $15 }' /proc/$$/stat; }
machine_ticks() { awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat; }

# cpu_start [pids|tree ROOT]: takes the first sample; cpu_stop (same arguments) RPS prints
# "cores us/req others%": the cores the server used, its CPU time per request and the share of
# the machine's CPU charged to neither the server nor wrk.
cpu_sample() {
    local srv
    if [[ ${1:-} == tree ]]; then srv=$(tree_ticks "$2"); else srv=$(pids_ticks "$@"); fi
    echo "$srv $(waited_ticks) $(machine_ticks) ${EPOCHREALTIME//[!0-9]/}"
}
cpu_start() { CPU0=$(cpu_sample "$@"); }
cpu_stop() { # rps, then the arguments of cpu_start
    local rps=$1 srv0 wrk0 busy0 all0 t0 srv1 wrk1 busy1 all1 t1
    shift
    read -r srv0 wrk0 busy0 all0 t0 <<<"$CPU0"
    read -r srv1 wrk1 busy1 all1 t1 < <(cpu_sample "$@")
    awk -v hz="$HZ" -v t="$(((t1 - t0) / 1000))" -v srv=$((srv1 - srv0)) -v wrk=$((wrk1 - wrk0)) \
        -v busy=$((busy1 - busy0)) -v all=$((all1 - all0)) -v rps="$rps" 'BEGIN {
            t /= 1000; o = (all > 0) ? 100 * (busy - srv - wrk) / all : 0; if (o < 0) o = 0
            printf "%.2f %.1f %.0f\n", srv / hz / t, (rps > 0) ? 1e6 * srv / hz / t / rps : 0, o }'
}

# Sets the variable named VAR to the microseconds since the epoch, without forking.
now_us() { printf -v "$1" '%s' "${EPOCHREALTIME//[!0-9]/}"; }
