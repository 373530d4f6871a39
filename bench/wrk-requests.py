#!/usr/bin/env python3
"""bench/wrk-requests.py: what wrk's requests took, before and after wrk's correction.

    wrk-requests.py CONNECTIONS FILE [BATON_LOG]

FILE is bench/wrk-requests.c's output (start_ns latency_ns fd per request). Prints one line:
the requests' own percentiles ("raw"), the same percentiles after wrk's correction for
coordinated omission, recomputed as wrk's stats_correct does (this is what `wrk --latency`
prints), and the stalls: moments when at least half of the connections were slowed at once
(requests slower than 2 ms that started within 3 ms of one another). With BATON_LOG (baton's
log file), each upgrade's "upgrading to generation" line is a time mark, and the stalls are
also counted by their time from the nearest upgrade (the one before ends the old
generation's probation, and its exit, just before the next upgrade's line).
"""
import bisect
import collections
import datetime
import sys


def percentiles(counts, qs):
    """counts: {latency_us: n}; the first latency whose cumulative count reaches each rank."""
    total = sum(counts.values())
    keys = sorted(counts)
    out = []
    for q in qs:
        rank = round(q * total + 0.5)
        seen = 0
        for k in keys:
            seen += counts[k]
            if seen >= rank:
                out.append(k)
                break
    return out


def corrected(counts, interval):
    """wrk's stats_correct: a request of L >= 2*interval adds samples at L-I, L-2I, ... > I."""
    extra = collections.Counter()
    for latency, n in counts.items():
        if latency >= 2 * interval:
            m = latency - interval
            while m > interval:
                extra[m] += n
                m -= interval
    return counts + extra, sum(extra.values())


def stalls(requests, connections):
    slow = [(s, l) for s, l, _ in requests if l >= 2_000_000]
    clusters = []
    for s, l in slow:
        if clusters and s - clusters[-1][1] < 3_000_000:
            c = clusters[-1]
            c[1] = s
            c[2] += 1
            c[3] = max(c[3], l)
        else:
            clusters.append([s, s, 1, l])
    return [c for c in clusters if c[2] >= connections // 2]


def upgrade_marks(path):
    marks = []
    for line in open(path, errors="replace"):
        if "upgrading to generation" in line:
            stamp = line.split()[0].replace("Z", "+00:00")
            marks.append(datetime.datetime.fromisoformat(stamp).timestamp() * 1e9)
    return sorted(marks)


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: wrk-requests.py CONNECTIONS FILE [BATON_LOG]")
    connections = int(sys.argv[1])
    requests = [tuple(map(int, line.split())) for line in open(sys.argv[2])]
    if not requests:
        sys.exit(f"wrk-requests.py: no request in {sys.argv[2]}: was wrk run with LD_PRELOAD?")
    first = min(r[0] for r in requests)
    last = max(r[0] for r in requests)
    seconds = (last - first) / 1e9
    counts = collections.Counter(l // 1000 for _, l, _ in requests)
    interval = int(seconds * 1e6 / (len(requests) / connections))
    raw = percentiles(counts, [0.5, 0.99, 0.999])
    fixed, added = corrected(counts, interval)
    wrk = percentiles(fixed, [0.5, 0.99, 0.999])
    found = stalls(requests, connections)
    line = (
        f"{len(requests)} requests in {seconds:.1f} s; raw p50/p99/p99.9 {raw[0]}/{raw[1]}/{raw[2]} us; "
        f"as wrk prints them {wrk[0]}/{wrk[1]}/{wrk[2]} us ({added} samples added, interval {interval} us); "
        f"stalls of >= {connections // 2} connections: {len(found)} ({len(found) / seconds:.1f}/s, "
        f"longest {max((c[3] for c in found), default=0) / 1e6:.1f} ms)"
    )
    print(line)
    if len(sys.argv) == 4:
        marks = upgrade_marks(sys.argv[3])
        near = collections.Counter()
        for c in found:
            ms = min(((c[0] - m) / 1e6 for m in marks), key=abs, default=None)
            near[
                "none" if ms is None
                else "0-20 ms before" if -20 <= ms < 0
                else "0-20 ms after" if 0 <= ms < 20
                else "20-100 ms after" if 20 <= ms < 100
                else "elsewhere"
            ] += 1
        print(f"  {len(marks)} upgrades; stalls by their time from the nearest one: " +
              ", ".join(f"{k}: {v}" for k, v in sorted(near.items())))


main()
