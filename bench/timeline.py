#!/usr/bin/env python3
"""bench/timeline.py: where an upgrade's slow requests fall, from bench/timeline.rs's records.

    timeline.py STEADY_RUNS -- UPGRADE_RUNS

Each run is a pair of files, RUN.lat (timeline.rs's output) and RUN.up (one line per
upgrade: the EPOCHREALTIME of its SIGUSR2, in µs). A steady run's .up holds the same schedule
without upgrades, so that both runs are cut into the same windows. The first second and the
last half second of each run are left out (connections opening, the end of the load).

Prints, per kind of run, the latency percentiles over all its rounds, then for each window
after a SIGUSR2 the requests that started in it per upgrade and how many of them took longer
than the steady runs' p99: what an upgrade adds at the tail, and when.
"""
import sys

WINDOWS_MS = [0, 2, 4, 6, 8, 10, 12, 16, 20, 30, 50, 100, 200, 500, 1000]


def load(run):
    with open(run + ".lat") as f:
        recs = [tuple(int(x) for x in line.split()) for line in f if line.strip()]
    with open(run + ".up") as f:
        marks = sorted(int(line.split()[0]) for line in f if line.strip())
    start = min(r[0] for r in recs)
    end = max(r[0] for r in recs)
    recs = [r for r in recs if start + 1_000_000 < r[0] < end - 500_000]
    return recs, marks


def pct(sorted_values, q):
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


def windows(recs, marks, threshold):
    """Requests started per window after a mark, and those above threshold, summed."""
    total = [0] * (len(WINDOWS_MS) - 1)
    slow = [0] * (len(WINDOWS_MS) - 1)
    for start, latency, _, _ in recs:
        before = [m for m in marks if m <= start]
        if not before:
            continue
        since_ms = (start - before[-1]) / 1000
        for i in range(len(WINDOWS_MS) - 1):
            if WINDOWS_MS[i] <= since_ms < WINDOWS_MS[i + 1]:
                total[i] += 1
                slow[i] += latency > threshold
                break
    return total, slow


def main():
    args = sys.argv[1:]
    if "--" not in args:
        sys.exit("usage: timeline.py STEADY_RUNS -- UPGRADE_RUNS")
    cut = args.index("--")
    kinds = {"steady": [load(r) for r in args[:cut]], "upgrades": [load(r) for r in args[cut + 1:]]}
    lat = {k: sorted(r[1] for recs, _ in runs for r in recs) for k, runs in kinds.items()}
    threshold = pct(lat["steady"], 0.99)
    for kind, values in lat.items():
        print(f"{kind:9} {len(values):9} requests  p50 {pct(values, .5)} us  p90 {pct(values, .9)} us"
              f"  p99 {pct(values, .99)} us  p99.9 {pct(values, .999)} us  max {values[-1]} us")
    print(f"p99 upgrades/steady: {pct(lat['upgrades'], .99) / threshold:.2f}x")
    rec = sorted(r[1] for recs, _ in kinds["upgrades"] for r in recs if r[3])
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
        for recs, marks in runs:
            t, s = windows(recs, marks, threshold)
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
