#!/usr/bin/env bash
# bench/features.sh: what the web features cost and give (compression, the access log), on
# loopback with wrk.
#
#   1. 1 KiB of binary content (not compressed), no Accept-Encoding: baton with compression on
#      (the default) against baton with it off (--compress false --precompressed false). Goal:
#      within 5% (ratio >= 0.95).
#   2. The same with a browser's Accept-Encoding ("gzip, deflate, br, zstd"): the sidecar
#      lookups are the cost here.
#   3. 24 KiB of HTML compressed on the fly with gzip: baton against nginx (`gzip on`, level 6
#      as baton's, same types). baton compresses a small file once and keeps the compressed form
#      with its cached content; nginx compresses every response.
#   4. 1 MiB of CSS compressed on the fly with gzip: too large for baton's cache, so both
#      compress every response as they send it.
#   5. The same HTML from a pre-compressed .gz sidecar: baton against nginx (`gzip_static on`).
#   6. 1 KiB with the access log (combined, to a file) against baton without: what a line
#      costs; and the same for nginx (`access_log FILE combined`), the peer's own cost.
#
# A benchmark that prints figures, not a test: it exits 0 whatever the verdict. The machine is
# assumed noisy: the rounds alternate between the two servers of a point and the table shows
# the median per server.
#
# Environment (defaults in brackets): ROUNDS [3], DURATION [5s], CONNECTIONS [64], THREADS [2],
# BATON_BIN (instead of building target/release/baton), KEEP_TMP=1.

set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_SCRIPT=bench/features.sh
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh"

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer, not '$ROUNDS'"
[[ $CONNECTIONS =~ ^[1-9][0-9]*$ ]] || die "CONNECTIONS must be a positive integer"
raise_fds $((CONNECTIONS + 256))
bench_tools
bench_baton
command -v gzip >/dev/null || die "gzip is needed"
bench_tmp

# ---------------------------------------------------------------- content and servers
bench_content
python3 - "$TMP/www/page.html" <<'EOF'
import random, sys
random.seed(7)
words = "the of and to in is for on that with as by this be are from at or an it".split()
rows = []
while sum(map(len, rows)) < 24 * 1024:
    text = " ".join(random.choice(words) for _ in range(12))
    rows.append(f'<tr class="r{random.randrange(9)}"><td>{random.randrange(10**6)}</td><td>{text}</td></tr>\n')
open(sys.argv[1], "w").write("<!doctype html><table>\n" + "".join(rows)[: 24 * 1024] + "</table>\n")
EOF
cp "$TMP/www/page.html" "$TMP/www/static.html"
for _ in $(seq 43); do cat "$TMP/www/page.html"; done | head -c $((1024 * 1024)) >"$TMP/www/large.css"
gzip -6 -k "$TMP/www/static.html"
chmod 644 "$TMP/www"/*

NGINX_PORT=$(free_port)
ON_PORT=$(free_port)
OFF_PORT=$(free_port)
LOG_PORT=$(free_port)
NGINX_LOG_PORT=$(free_port)
nginx_conf "$NGINX_PORT" off
# Compression as baton does it: the same level, the text types, sidecars for static.html.
sed -i 's|^    access_log off;|    access_log off;\n    gzip on; gzip_comp_level 6; gzip_min_length 1024; gzip_vary on;\n    gzip_types text/css application/javascript application/json image/svg+xml text/plain;\n    location = /static.html { gzip_static on; }|' "$TMP/nginx/nginx.conf"
# nginx allows "location" in server only: move it.
python3 - "$TMP/nginx/nginx.conf" <<'EOF'
import sys
p = sys.argv[1]; s = open(p).read()
loc = "    location = /static.html { gzip_static on; }\n"
s = s.replace(loc, "", 1)
s = s.replace("        root ", "        location = /static.html { gzip_static on; }\n        root ", 1)
open(p, "w").write(s)
EOF

# A second nginx, the same but for its access log.
mkdir -p "$TMP/nginx-log"
sed -e "s|listen 127.0.0.1:$NGINX_PORT;|listen 127.0.0.1:$NGINX_LOG_PORT;|" \
    -e "s|pid $TMP/nginx/nginx.pid;|pid $TMP/nginx-log/nginx.pid;|" \
    -e "s|^    access_log off;|    access_log $TMP/nginx-log/access.log combined;|" \
    -e "s|$TMP/nginx/\([a-z]*\);|$TMP/nginx-log/\1;|" \
    "$TMP/nginx/nginx.conf" >"$TMP/nginx-log/nginx.conf"
"$NGINX" -e "$TMP/nginx-log/error.log" -p "$TMP/nginx-log/" -c "$TMP/nginx-log/nginx.conf" >"$TMP/nginx-log/stdout.log" 2>&1 &
PIDS+=($!); NGINX_LOG_PID=$!

"$NGINX" -e "$TMP/nginx/error.log" -p "$TMP/nginx/" -c "$TMP/nginx/nginx.conf" >"$TMP/nginx/stdout.log" 2>&1 &
PIDS+=($!); NGINX_PID=$!
"$BATON" serve --listen "127.0.0.1:$ON_PORT" --root "$TMP/www" >"$TMP/on.log" 2>&1 &
PIDS+=($!); ON_PID=$!
"$BATON" serve --listen "127.0.0.1:$OFF_PORT" --root "$TMP/www" --compress false --precompressed false >"$TMP/off.log" 2>&1 &
PIDS+=($!); OFF_PID=$!
"$BATON" serve --listen "127.0.0.1:$LOG_PORT" --root "$TMP/www" --access-log "$TMP/access.log" >"$TMP/log.log" 2>&1 &
PIDS+=($!); LOG_PID=$!

declare -A BASE=(
    [nginx]=http://127.0.0.1:$NGINX_PORT
    [on]=http://127.0.0.1:$ON_PORT
    [off]=http://127.0.0.1:$OFF_PORT
    [log]=http://127.0.0.1:$LOG_PORT
    [nginx-log]=http://127.0.0.1:$NGINX_LOG_PORT
)
wait_up nginx "${BASE[nginx]}/file.bin" "$NGINX_PID" "$TMP/nginx/error.log"
wait_up "baton (compression on)" "${BASE[on]}/file.bin" "$ON_PID" "$TMP/on.log"
wait_up "baton (compression off)" "${BASE[off]}/file.bin" "$OFF_PID" "$TMP/off.log"
wait_up "baton (access log)" "${BASE[log]}/file.bin" "$LOG_PID" "$TMP/log.log"
wait_up "nginx (access log)" "${BASE[nginx-log]}/file.bin" "$NGINX_LOG_PID" "$TMP/nginx-log/error.log"

# Each server compresses what it should: the gzip answers decompress to the page.
for srv in on nginx; do
    for page in page.html static.html large.css; do
        curl -fsS -H 'Accept-Encoding: gzip' -D "$TMP/h" -o "$TMP/body.gz" "${BASE[$srv]}/$page"
        grep -qi '^content-encoding: gzip' "$TMP/h" || die "$srv did not gzip $page"
        gzip -dc "$TMP/body.gz" | cmp -s - "$TMP/www/$page" || die "$srv: gunzip of $page differs"
    done
done
check_body "baton (compression on)" "${BASE[on]}/file.bin"
say "check: both baton and nginx gzip the page, and it decompresses to the file"

# ---------------------------------------------------------------- run
point() { # label path accept-encoding (or "") server-a server-b
    local label=$1 path=$2 accept=$3 a=$4 b=$5 r srv out
    local -a header=()
    [[ -n $accept ]] && header=(-H "Accept-Encoding: $accept")
    declare -A RPS P99
    # A warm-up each: the first requests of a server fill its caches.
    for srv in "$a" "$b"; do
        "$WRK" -t"$THREADS" -c"$CONNECTIONS" -d1s "${header[@]}" "${BASE[$srv]}$path" >/dev/null
    done
    for r in $(seq "$ROUNDS"); do
        local order=("$a" "$b")
        ((r % 2 == 0)) && order=("$b" "$a")
        for srv in "${order[@]}"; do
            out=$TMP/wrk-$srv-$r.out
            "$WRK" -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "${header[@]}" \
                "${BASE[$srv]}$path" >"$out"
            read -r rps _ p99 _ errors < <(parse_wrk "$out")
            ((errors == 0)) || say "  ($srv round $r: $errors errors)"
            RPS[$srv]+="$rps "
            P99[$srv]+="$p99 "
        done
    done
    local ra rb pa pb
    ra=$(tr ' ' '\n' <<<"${RPS[$a]}" | grep . | median)
    rb=$(tr ' ' '\n' <<<"${RPS[$b]}" | grep . | median)
    pa=$(tr ' ' '\n' <<<"${P99[$a]}" | grep . | median)
    pb=$(tr ' ' '\n' <<<"${P99[$b]}" | grep . | median)
    printf '| %s | %s vs %s | %.0f | %.0f | %sx | %s | %s |\n' "$label" "$a" "$b" "$ra" "$rb" \
        "$(ratio "$ra" "$rb")" "$(fmt_us "$pa")" "$(fmt_us "$pb")"
}

say ""
say_machine
say "wrk -t$THREADS -c$CONNECTIONS -d$DURATION, $ROUNDS alternating rounds per server, medians"
say ""
say "| what | servers (a vs b) | a req/s | b req/s | a/b | a p99 | b p99 |"
say "|---|---|---:|---:|---:|---:|---:|"
point "1 KiB binary, no Accept-Encoding" /file.bin "" on off
point "1 KiB binary, browser Accept-Encoding" /file.bin "gzip, deflate, br, zstd" on off
point "24 KiB HTML, gzip on the fly" /page.html gzip on nginx
point "1 MiB CSS, gzip on the fly" /large.css gzip on nginx
point "24 KiB HTML, .gz sidecar" /static.html gzip on nginx
point "1 KiB binary, access log to a file" /file.bin "" log on
point "1 KiB binary, nginx's access log to a file" /file.bin "" nginx-log nginx
lines=$(wc -l <"$TMP/access.log")
dropped=$(curl -fsS "${BASE[log]}/-/metrics" | awk '$1 == "baton_access_log_dropped_total" { print $2 }')
say ""
say "access log: $lines lines written, ${dropped:-?} dropped (baton_access_log_dropped_total)"
