#!/usr/bin/env bash
# bench/tls.sh: baton against Debian's nginx over TLS, with the same certificate and files, on
# loopback: HTTPS (HTTP/1.1, wrk) and HTTP/2 (h2load, ALPN h2) for 1 KiB and 1 MiB at 64
# connections, and full TLS handshakes per second (openssl s_time -new).
#
# A benchmark that prints figures, not a test: it exits 0 whatever the verdict. The rounds
# alternate between the servers; the table shows the median per server.
#
# nginx gets keepalive_requests 1000000: its default (1000) closes an HTTP/2 connection with
# a GOAWAY after 1000 requests, and h2load, which makes no new connection after one, would
# count the rest as failed.
#
# Environment (defaults in brackets): ROUNDS [3], DURATION [5] (seconds), CONNECTIONS [64],
# STREAMS [10] (h2load -m), BATON_BIN (instead of building target/release/baton), KEEP_TMP=1.
# Needs nginx, wrk, h2load (nghttp2-client), openssl: installed with apt-get when missing.

set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
CONNECTIONS=${CONNECTIONS:-64}
STREAMS=${STREAMS:-10}
THREADS=2

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_SCRIPT=bench/tls.sh
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh"

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer, not '$ROUNDS'"
[[ $DURATION =~ ^[1-9][0-9]*$ ]] || die "DURATION must be whole seconds, not '$DURATION'"
raise_fds $((CONNECTIONS + 256))
bench_tools
if ! command -v h2load >/dev/null || ! command -v openssl >/dev/null; then
    say "installing nghttp2-client openssl ..."
    apt-get install -y nghttp2-client openssl >/dev/null || die "cannot install h2load and openssl"
fi
bench_baton
bench_tmp

# ---------------------------------------------------------------- certificate and content
bench_content
head -c 1024 /dev/urandom >"$TMP/www/1k.bin"
head -c $((1024 * 1024)) /dev/urandom >"$TMP/www/1m.bin"
chmod 644 "$TMP/www"/*
mkdir -p "$TMP/tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$TMP/tls/key.pem" -out "$TMP/tls/cert.pem" 2>/dev/null
chmod 644 "$TMP/tls"/*

NGINX_PORT=$(free_port)
BATON_PORT=$(free_port)
nginx_conf "$NGINX_PORT" off
sed -i -e "s|listen 127.0.0.1:$NGINX_PORT;|listen 127.0.0.1:$NGINX_PORT ssl http2;\n        ssl_certificate $TMP/tls/cert.pem;\n        ssl_certificate_key $TMP/tls/key.pem;\n        ssl_protocols TLSv1.2 TLSv1.3;\n        ssl_session_cache shared:SSL:10m;\n        keepalive_requests 1000000;|" \
    "$TMP/nginx/nginx.conf"
cat >"$TMP/baton.toml" <<EOF
[server]
listen = ["https=127.0.0.1:$BATON_PORT"]
root = "$TMP/www"
[tls.https]
cert = "$TMP/tls/cert.pem"
key = "$TMP/tls/key.pem"
EOF

"$NGINX" -e "$TMP/nginx/error.log" -p "$TMP/nginx/" -c "$TMP/nginx/nginx.conf" >"$TMP/nginx/stdout.log" 2>&1 &
PIDS+=($!); NGINX_PID=$!
"$BATON" serve --config "$TMP/baton.toml" >"$TMP/baton.log" 2>&1 &
PIDS+=($!); BATON_PID=$!
declare -A BASE=([baton]=https://127.0.0.1:$BATON_PORT [nginx]=https://127.0.0.1:$NGINX_PORT)
declare -A PORT=([baton]=$BATON_PORT [nginx]=$NGINX_PORT)
CURL=(curl -fsS --cacert "$TMP/tls/cert.pem")
for srv in baton nginx; do
    pid=${srv^^}_PID
    for _ in $(seq 100); do
        "${CURL[@]}" -o /dev/null "${BASE[$srv]}/file.bin" 2>/dev/null && break
        kill -0 "${!pid}" 2>/dev/null || die "$srv exited at start (see $TMP)"
        sleep 0.1
    done
    for size in 1k 1m; do
        "${CURL[@]}" -o "$TMP/body" "${BASE[$srv]}/$size.bin" || die "$srv: GET /$size.bin over HTTPS failed"
        cmp -s "$TMP/body" "$TMP/www/$size.bin" || die "$srv: /$size.bin differs"
        version=$("${CURL[@]}" --http2 -o /dev/null -w '%{http_version}' "${BASE[$srv]}/$size.bin")
        [[ $version == 2 ]] || die "$srv: ALPN did not choose h2 (HTTP/$version)"
    done
done
say "check: both serve both files over HTTPS, and HTTP/2 by ALPN"

# ---------------------------------------------------------------- runs
measure() { # kind server path: prints "req/s p99_us" (p99 "-" where the tool gives none)
    local out=$TMP/run.out
    case $1 in
        https)
            "$WRK" -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency "${BASE[$2]}$3" >"$out"
            read -r rps _ p99 _ _ < <(parse_wrk "$out")
            echo "$rps $p99" ;;
        h2)
            h2load -t"$THREADS" -c"$CONNECTIONS" -m"$STREAMS" -D"$DURATION" "${BASE[$2]}$3" >"$out" 2>&1
            awk -v srv="$2" '/^finished in/ { gsub(/,/, ""); r = $4 } /^requests:/ { gsub(/,/, ""); f = $10 }
                 END { if (f > 0) printf "(%s: %d requests failed)\n", srv, f > "/dev/stderr"; print r, "-" }' "$out" ;;
        handshakes)
            openssl s_time -connect "127.0.0.1:${PORT[$2]}" -new -time "$DURATION" 2>/dev/null >"$out" || true
            awk '/connections\/user sec/ { v = $0 } END { split(v, a, " "); print a[1] " -" }' "$out" ;;
    esac
}

point() { # label kind path
    declare -A RPS P99
    for r in $(seq "$ROUNDS"); do
        local order=(baton nginx)
        ((r % 2 == 0)) && order=(nginx baton)
        for srv in "${order[@]}"; do
            read -r rps p99 < <(measure "$2" "$srv" "$3")
            RPS[$srv]+="$rps "
            P99[$srv]+="$p99 "
        done
    done
    local rb rn pb pn
    rb=$(tr ' ' '\n' <<<"${RPS[baton]}" | grep . | median)
    rn=$(tr ' ' '\n' <<<"${RPS[nginx]}" | grep . | median)
    if [[ ${P99[baton]} == *-* ]]; then
        pb=-; pn=-
    else
        pb=$(fmt_us "$(tr ' ' '\n' <<<"${P99[baton]}" | grep . | median)")
        pn=$(fmt_us "$(tr ' ' '\n' <<<"${P99[nginx]}" | grep . | median)")
    fi
    printf '| %s | %.0f | %.0f | %sx | %s | %s |\n' "$1" "$rb" "$rn" "$(ratio "$rb" "$rn")" "$pb" "$pn"
}

say ""
say_machine
say "$CONNECTIONS connections, ${DURATION}s runs, $ROUNDS alternating rounds per server, medians;"
say "HTTPS: wrk -t$THREADS; HTTP/2: h2load -t$THREADS -m$STREAMS; handshakes: openssl s_time -new"
say ""
say "| what | baton /s | nginx /s | baton/nginx | baton p99 | nginx p99 |"
say "|---|---:|---:|---:|---:|---:|"
point "HTTPS 1 KiB" https /1k.bin
point "HTTPS 1 MiB" https /1m.bin
point "HTTP/2 1 KiB" h2 /1k.bin
point "HTTP/2 1 MiB" h2 /1m.bin
point "TLS handshakes (new sessions)" handshakes /
