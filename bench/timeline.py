#!/usr/bin/env python3
"""bench/timeline.py: where an upgrade's slow requests fall, from bench/timeline.rs's records.

    timeline.py STEADY_RUNS -- UPGRADE_RUNS

Each run is a pair of files, RUN.lat (timeline.rs's output) and RUN.up (one line per
upgrade: the EPOCHREALTIME of its SIGUSR2, in µs). A steady run's .up holds the same schedule
without upgrades, so that both runs are cut into the same windows. The first and the last half
second of each run are left out (connections opening, the end of the load); the script puts
the first mark a second or more into the load, and the last one's second ends before the load
does.

Prints, per kind of run, the latency percentiles over all its rounds, then for each window
after a SIGUSR2 the requests that started in it per upgrade and how many of them took longer
than the steady runs' p99: what an upgrade adds at the tail, and when.
"""
import bisect
import sys
from array import array

WINDOWS_MS = [0, 2, 4, 6, 8, 10, 12, 16, 20, 30, 50, 100, 200, 500, 1000]


def load(run):
    """(starts, latencies, reconnected latencies, marks) of a run; starts sorted."""
    rows = array("q")
    with open(run + ".lat") as f:
        for line in f:
            fields = line.split()
            if len(fields) == 4:
                rows.extend((int(fields[0]), int(fields[1]), int(fields[3])))
    if not rows:
        sys.exit(f"{run}.lat: no requests recorded")
    with open(run + ".up") as f:
        marks = sorted(int(line.split()[0]) for line in f if line.strip())
    records = sorted(zip(rows[0::3], rows[1::3], rows[2::3]))
    first, last = records[0][0], records[-1][0]
    # Connections opening, and the end of the load.
    records = [r for r in records if first + 500_000 < r[0] < last - 500_000]
    starts = array("q", (r[0] for r in records))
    latencies = array("q", (r[1] for r in records))
    reconnected = array("q", (r[1] for r in records if r[2]))
    return starts, latencies, reconnected, marks


def pct(sorted_values, q):
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


def windows(starts, latencies, marks, threshold):
    """Requests started per window after a mark, and those above threshold, summed."""
    total = [0] * (len(WINDOWS_MS) - 1)
    slow = [0] * (len(WINDOWS_MS) - 1)
    for mark in marks:
        for i in range(len(WINDOWS_MS) - 1):
            lo = bisect.bisect_left(starts, mark + WINDOWS_MS[i] * 1000)
            hi = bisect.bisect_left(starts, mark + WINDOWS_MS[i + 1] * 1000)
            total[i] += hi - lo
            slow[i] += sum(1 for k in range(lo, hi) if latencies[k] > threshold)
    return total, slow


def main():
    args = sys.argv[1:]
    if "--" not in args:
        sys.exit("usage: timeline.py STEADY_RUNS -- UPGRADE_RUNS")
    cut = args.index("--")
    kinds = {"steady": [load(r) for r in args[:cut]], "upgrades": [load(r) for r in args[cut + 1:]]}
    lat = {k: sorted(x for run in runs for x in run[1]) for k, runs in kinds.items()}
    threshold = pct(lat["steady"], 0.99)
    for kind, values in lat.items():
        print(f"{kind:9} {len(values):9} requests  p50 {pct(values, .5)} us  p90 {pct(values, .9)} us"
              f"  p99 {pct(values, .99)} us  p99.9 {pct(values, .999)} us  max {values[-1]} us")
    print(f"p99 upgrades/steady: {pct(lat['upgrades'], .99) / threshold:.2f}x")
    rec = sorted(x for run in kinds["upgrades"] for x in run[2])
    if rec:
        print(f"requests on a new connection (after Connection: close): {len(rec)}, latency p50 "
              f"{pct(rec, .5)} us, max {rec[-1]} us")
    print(f"\nper window after SIGUSR2 (steady: the same schedule, no upgrade), per upgrade: requests"
          f" started, and those slower than the steady p99 ({threshold} us)")
    print(f"{'window':>13} | {'steady':>15} | {'upgrades':>15}")
    per = {}
    for kind, runs in kinds.items():
        total = [0] * (len(WINDOWS_MS) - 1)
        slow = [0] * (len(WINDOWS_MS) - 1)
        n = 0
        for starts, latencies, _, marks in runs:
            t, s = windows(starts, latencies, marks, threshold)
            total = [a + b for a, b in zip(total, t)]
            slow = [a + b for a, b in zip(slow, s)]
            n += len(marks)
        per[kind] = (total, slow, max(n, 1))
    extra = 0.0
    for i in range(len(WINDOWS_MS) - 1):
        cells = []
        for kind in ("steady", "upgrades"):
            total, slow, n = per[kind]
            cells.append(f"{total[i] / n:7.0f} {slow[i] / n:7.1f}")
        extra += per["upgrades"][1][i] / per["upgrades"][2] - per["steady"][1][i] / per["steady"][2]
        print(f"{WINDOWS_MS[i]:5}-{WINDOWS_MS[i + 1]:4} ms | {cells[0]:>15} | {cells[1]:>15}")
    print(f"slow requests an upgrade adds: {extra:.0f}")


if __name__ == "__main__":
    main()
