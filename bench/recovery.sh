#!/usr/bin/env bash
# bench/recovery.sh: how long the service is dark after a crash without systemd, and what the
# clients see. baton runs under its keeper (`baton serve --keeper`) on loopback; a load of
# WORKERS threads sends GET /-/version, each on a fresh connection (connect, request, answer,
# close), back to back. KILLS times, spaced SPACING seconds apart (more than keeper.startsecs,
# so that each kill is a crash after a successful start and the restart is immediate), the
# benchmark SIGKILLs the serving generation (the pid in the pidfile) and measures:
#
#   recovery     from the kill to the first answer given by the new generation, as a client
#                sees it (the new pid in /-/version)
#   ready        from the kill to the keeper writing the new pid into the pidfile (READY=1)
#   failed       requests that failed, by kind: "refused" (ECONNREFUSED: must stay 0, the
#                keeper holds the socket), "reset/eof" (in flight on the killed process), other
#   slowest      the longest request that completed across the kill (it waited in the backlog)
#
# A benchmark that prints figures, not a test: exits 0 whatever it measured (non-zero only when
# it cannot run).
#
# Environment (defaults in brackets):
#   KILLS [10]        crashes to measure
#   WORKERS [8]       client threads, one fresh connection per request
#   SPACING [2]       seconds between kills (must exceed keeper.startsecs, 1 s by default)
#   BATON_BIN         run this baton binary instead of building target/release/baton
#   KEEP_TMP=1        keep the temporary directory (keeper log, raw results)
#
# Needs python3 and curl, and cargo unless BATON_BIN.

set -euo pipefail

KILLS=${KILLS:-10}
WORKERS=${WORKERS:-8}
SPACING=${SPACING:-2}
BENCH_SCRIPT=recovery.sh
REPO=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh"

command -v python3 >/dev/null || die "python3 is needed"
command -v curl >/dev/null || die "curl is needed"
command -v ss >/dev/null || die "ss (iproute2) is needed"
bench_baton
bench_tmp

PORT=$(free_port)
"$BATON" serve --config /dev/null --keeper --listen "127.0.0.1:$PORT" \
    --pidfile "$TMP/baton.pid" --drain-timeout 5s >"$TMP/keeper.log" 2>&1 &
PIDS+=($!)
wait_up baton "http://127.0.0.1:$PORT/-/healthy" "$!" "$TMP/keeper.log"

say "baton $("$BATON" --version | awk '{print $2}') under its keeper on 127.0.0.1:$PORT;" \
    "$KILLS SIGKILLs of the serving generation, $WORKERS fresh-connection clients"

python3 - "$PORT" "$TMP/baton.pid" "$KILLS" "$WORKERS" "$SPACING" <<'EOF'
import errno, json, os, signal, socket, statistics, sys, threading, time

port, pidfile, kills, workers, spacing = (int(sys.argv[1]), sys.argv[2], int(sys.argv[3]),
                                          int(sys.argv[4]), float(sys.argv[5]))
REQUEST = b"GET /-/version HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
lock = threading.Lock()
results = []            # (start, end, pid or None, failure kind or None)
stop = threading.Event()

def one():
    start = time.monotonic()
    s = socket.socket()
    s.settimeout(30)
    try:
        s.connect(("127.0.0.1", port))
        s.sendall(REQUEST)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            return (start, time.monotonic(), None, "reset/eof" if not data else "status")
        return (start, time.monotonic(), json.loads(body)["pid"], None)
    except OSError as e:
        kind = {errno.ECONNREFUSED: "refused", errno.ECONNRESET: "reset/eof",
                errno.EPIPE: "reset/eof"}.get(e.errno, type(e).__name__)
        return (start, time.monotonic(), None, kind)
    finally:
        s.close()

def worker():
    while not stop.is_set():
        r = one()
        with lock:
            results.append(r)

def pid_in_pidfile():
    try:
        with open(pidfile) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None

threads = [threading.Thread(target=worker) for _ in range(workers)]
for t in threads:
    t.start()
time.sleep(1.0)
rounds = []
for k in range(kills):
    old = pid_in_pidfile()
    with lock:
        mark = len(results)
    t_kill = time.monotonic()
    os.kill(old, signal.SIGKILL)
    ready = None
    while time.monotonic() - t_kill < 30:
        p = pid_in_pidfile()
        if p and p != old:
            ready = time.monotonic() - t_kill
            break
        time.sleep(0.0005)
    time.sleep(spacing)
    with lock:
        window = results[mark:]
    firsts = [end - t_kill for (start, end, pid, fail) in window if pid and pid != old]
    recovery = min(firsts) if firsts else None
    failed = {}
    for (_, _, _, fail) in window:
        if fail:
            failed[fail] = failed.get(fail, 0) + 1
    across = [end - start for (start, end, pid, fail) in window
              if pid and pid != old and start < t_kill + (recovery or 0)]
    slowest = max(across) if across else 0.0
    rounds.append((recovery, ready, failed, slowest, len(window)))
    print(f"kill {k + 1:2}: recovery {recovery * 1000 if recovery else float('nan'):7.1f} ms, "
          f"ready {ready * 1000 if ready else float('nan'):7.1f} ms, "
          f"failed {sum(failed.values())} {failed or ''}, "
          f"slowest across the kill {slowest * 1000:6.1f} ms, {len(window)} requests")
stop.set()
for t in threads:
    t.join()

rec = [r[0] * 1000 for r in rounds if r[0]]
rdy = [r[1] * 1000 for r in rounds if r[1]]
total = {}
for r in rounds:
    for k, v in r[2].items():
        total[k] = total.get(k, 0) + v
print()
print(f"recovery (kill -> first answer of the new generation): median {statistics.median(rec):.1f} ms, "
      f"min {min(rec):.1f}, max {max(rec):.1f} over {len(rec)} kills")
print(f"ready (kill -> pidfile names the new pid):            median {statistics.median(rdy):.1f} ms, "
      f"min {min(rdy):.1f}, max {max(rdy):.1f}")
print(f"failed requests: {sum(total.values())} in {sum(r[4] for r in rounds)} "
      f"({', '.join(f'{k} {v}' for k, v in sorted(total.items())) or 'none'}); "
      f"at most {workers} per kill can be in flight")
print(f"restarts counted by the keeper: see baton_restarts_total")
EOF
curl -fsS "http://127.0.0.1:$PORT/-/metrics" | grep '^baton_restarts_total' || true
