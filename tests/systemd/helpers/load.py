#!/usr/bin/python3
"""HTTP load against baton on 127.0.0.1 that records every failure, for tests/systemd/lib.sh
(load_start / load_stop).

    load.py DIR [--port 8080] [--keepalive 4] [--fresh 4] [--max-seconds 120]
                [--timeout 10] [--pause-ms 0] [--paths /-/version,/-/version,/]

Two kinds of client threads, all to 127.0.0.1 only:
  keepalive  one http.client connection reused for request after request until the server
             answers with `Connection: close`; then the thread closes it and connects anew
             (counted as a server close, not a failure). Automatic reconnection is off
             (auto_open = 0): a connection the server drops without saying so is a failure.
  fresh      a new connection for every request, closed by the client after the response.
Each thread cycles through --paths. A request counts as ok when the whole response arrived with
a 2xx status (and, for /-/version, a JSON body with a pid). Anything else is a failure, recorded
with: time (seconds since start and wall clock), thread, phase (connect, send, response, body,
status), the exception or the status, the request's number on its connection, the local port,
and the pid/generation that last answered on that connection.

It runs until DIR/stop exists, SIGTERM/SIGINT arrives or --max-seconds pass (so it always ends
by itself), lets the requests in flight finish (each is bounded by --timeout), and writes
DIR/report.json:
    {"ok": N, "failed": F, "failures": [...], "failures_dropped": D, "stopped_by": "stop-file" |
     "SIGTERM" | "SIGINT" | "max-seconds", "duration_s": S, "requests_per_s": R,
     "kinds": {"keepalive": {"ok", "failed", "connections", "server_closes", "max_ms"},
               "fresh": {...}},
     "generations": {"keepalive": {"2": n, ...}, "fresh": {...}},   (from /-/version bodies)
     "pids": {"123": n, ...}, "latency_ms": {"p50", "p99", "max"},
     "slowest": [the 5 slowest successful requests: ms, t, time, worker, kind, path, pid,
                 generation, request_on_connection, local_port], "threads_stuck": [...]}
Latency is from sending the request to the end of the response (the connect is not included).
While running it rewrites DIR/progress.json (the same without "failures" and "latency_ms", with
"last_failure") every 0.2 s.
Both files are replaced atomically (rename). Exits 0 once the report is written.

Written for /usr/bin/python3 (3.11 on Debian 12); standard library only.
"""

import argparse
import datetime
import heapq
import http.client
import json
import os
import signal
import threading
import time

HOST = "127.0.0.1"
MAX_FAILURES_KEPT = 500
SLOWEST_KEPT = 5


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.ok = 0
        self.failures = []
        self.failed = 0
        self.kinds = {k: {"ok": 0, "failed": 0, "connections": 0, "server_closes": 0, "max_ms": 0.0}
                      for k in ("keepalive", "fresh")}
        self.generations = {"keepalive": {}, "fresh": {}}
        self.pids = {}
        self.latencies = []
        self.slowest = []  # heap of the SLOWEST_KEPT slowest successful requests

    def success(self, kind, ms, pid, generation, detail):
        with self.lock:
            if len(self.slowest) < SLOWEST_KEPT or ms > self.slowest[0][0]:
                item = (ms, id(detail), detail)
                if len(self.slowest) < SLOWEST_KEPT:
                    heapq.heappush(self.slowest, item)
                else:
                    heapq.heapreplace(self.slowest, item)
                detail.update(ms=round(ms, 1), kind=kind, pid=pid, generation=generation)
            self.ok += 1
            k = self.kinds[kind]
            k["ok"] += 1
            if ms > k["max_ms"]:
                k["max_ms"] = round(ms, 1)
            self.latencies.append(ms)
            if generation is not None:
                g = self.generations[kind]
                g[str(generation)] = g.get(str(generation), 0) + 1
            if pid is not None:
                self.pids[str(pid)] = self.pids.get(str(pid), 0) + 1

    def failure(self, record):
        record["t"] = round(time.monotonic() - self.t0, 3)
        record["time"] = iso(time.time())
        with self.lock:
            self.failed += 1
            self.kinds[record["kind"]]["failed"] += 1
            if len(self.failures) < MAX_FAILURES_KEPT:
                self.failures.append(record)

    def count(self, kind, what):
        with self.lock:
            self.kinds[kind][what] += 1

    def snapshot(self, final):
        """The report (final) or the progress (no failure list, no latency percentiles)."""
        with self.lock:
            duration = time.monotonic() - self.t0
            out = {
                "ok": self.ok,
                "failed": self.failed,
                "duration_s": round(duration, 3),
                "requests_per_s": round(self.ok / duration, 1) if duration > 0 else 0,
                "kinds": json.loads(json.dumps(self.kinds)),
                "generations": json.loads(json.dumps(self.generations)),
                "pids": dict(self.pids),
                "slowest": [dict(d, time=iso(d["wall"])) for _, _, d in sorted(self.slowest, reverse=True)],
            }
            if final:
                out["failures"] = list(self.failures)
                out["failures_dropped"] = self.failed - len(self.failures)
                lat = list(self.latencies)
            elif self.failures:
                out["last_failure"] = self.failures[-1]
        if final:
            lat.sort()
            out["latency_ms"] = {
                "p50": round(lat[len(lat) // 2], 1) if lat else None,
                "p99": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1) if lat else None,
                "max": round(lat[-1], 1) if lat else None,
            }
        return out


def iso(epoch):
    return datetime.datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="microseconds")


def write_json(path, data):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.rename(tmp, path)


def describe(e):
    return f"{type(e).__name__}: {e}"


def worker(name, kind, args, stats, stop):
    paths = args.paths
    i = int(name.rsplit("-", 1)[1])  # threads start at different paths
    conn = None
    on_conn = 0  # requests completed on the current connection
    local_port = None
    last = {"pid": None, "generation": None}
    pause = args.pause_ms / 1000.0

    def fail(phase, error, **extra):
        rec = {"worker": name, "kind": kind, "phase": phase, "error": error, "path": path,
               "request_on_connection": on_conn + 1, "local_port": local_port,
               "last_pid": last["pid"], "last_generation": last["generation"]}
        rec.update(extra)
        stats.failure(rec)

    def drop():
        nonlocal conn
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass
        conn = None

    while not stop.is_set():
        path = paths[i % len(paths)]
        i += 1
        if conn is None:
            on_conn = 0
            local_port = None
            last = {"pid": None, "generation": None}
            conn = http.client.HTTPConnection(HOST, args.port, timeout=args.timeout)
            conn.auto_open = 0  # never reconnect behind our back
            try:
                conn.connect()
                local_port = conn.sock.getsockname()[1]
            except Exception as e:  # noqa: BLE001 - every failure is a result
                fail("connect", describe(e))
                drop()
                time.sleep(0.01)  # do not spin on a refused port
                continue
            stats.count(kind, "connections")
        t, wall = time.monotonic(), time.time()
        try:
            conn.request("GET", path, headers={"User-Agent": f"baton-load/{name}"})
        except Exception as e:  # noqa: BLE001
            fail("send", describe(e))
            drop()
            continue
        try:
            resp = conn.getresponse()
        except Exception as e:  # noqa: BLE001
            fail("response", describe(e))
            drop()
            continue
        try:
            body = resp.read()
        except Exception as e:  # noqa: BLE001
            fail("body", describe(e), status=resp.status)
            drop()
            continue
        ms = (time.monotonic() - t) * 1000.0
        close = resp.will_close or "close" in (resp.getheader("Connection") or "").lower()
        pid = generation = None
        ok = 200 <= resp.status < 300
        if not ok:
            fail("status", f"HTTP {resp.status} {resp.reason}", status=resp.status,
                 body=body[:200].decode("utf-8", "replace"))
        elif path == "/-/version":
            try:
                v = json.loads(body)
                pid, generation = int(v["pid"]), int(v["generation"])
            except Exception as e:  # noqa: BLE001
                ok = False
                fail("body", f"/-/version body is not JSON with pid and generation: {describe(e)}",
                     status=resp.status, body=body[:200].decode("utf-8", "replace"))
        if ok:
            on_conn += 1
            if pid is not None:
                last = {"pid": pid, "generation": generation}
            stats.success(kind, ms, pid, generation, {
                "t": round(t - stats.t0, 3), "wall": wall, "worker": name, "path": path,
                "request_on_connection": on_conn, "local_port": local_port})
        if kind == "fresh":
            drop()
        elif close:
            stats.count(kind, "server_closes")
            drop()
        if pause:
            time.sleep(pause)
    drop()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dir")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--keepalive", type=int, default=4)
    p.add_argument("--fresh", type=int, default=4)
    p.add_argument("--max-seconds", type=float, default=120.0)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--pause-ms", type=float, default=0.0)
    p.add_argument("--paths", default="/-/version,/-/version,/")
    args = p.parse_args()
    args.paths = [x for x in args.paths.split(",") if x]

    stats = Stats()
    stop = threading.Event()
    stopped_by = []

    def on_signal(signum, _frame):
        stopped_by.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    threads = []
    for kind, n in (("keepalive", args.keepalive), ("fresh", args.fresh)):
        for j in range(n):
            name = f"{kind}-{j}"
            t = threading.Thread(target=worker, name=name, args=(name, kind, args, stats, stop),
                                 daemon=True)
            t.start()
            threads.append(t)

    stop_file = os.path.join(args.dir, "stop")
    progress = os.path.join(args.dir, "progress.json")
    deadline = stats.t0 + args.max_seconds
    next_progress = 0.0
    while not stop.is_set():
        now = time.monotonic()
        if os.path.exists(stop_file):
            stopped_by.append("stop-file")
            stop.set()
            break
        if now >= deadline:
            stopped_by.append("max-seconds")
            stop.set()
            break
        if now >= next_progress:
            write_json(progress, stats.snapshot(False))
            next_progress = now + 0.2
        stop.wait(0.05)

    # Requests in flight finish (each bounded by --timeout); a thread still stuck after that is
    # reported rather than waited for.
    join_deadline = time.monotonic() + args.timeout + 2
    for t in threads:
        t.join(max(0.0, join_deadline - time.monotonic()))
    report = stats.snapshot(True)
    report["stopped_by"] = stopped_by[0] if stopped_by else "?"
    report["threads_stuck"] = [t.name for t in threads if t.is_alive()]
    write_json(progress, stats.snapshot(False))
    write_json(os.path.join(args.dir, "report.json"), report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
