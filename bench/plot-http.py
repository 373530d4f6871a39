#!/usr/bin/env python3
"""bench/plot-http.py RESULTS.tsv OUT.svg [SUBTITLE]: draws bench/http.sh's table.

Requests/s and p99 latency against the file size (both axes logarithmic), baton and nginx, one
column of panels per connection count. Plain SVG from the standard library: no plotting package
to install, and a small, diffable file.
"""

import csv
import math
import sys
from html import escape

W, H = 360, 250  # one panel
ML, MR, MT, MB = 70, 20, 34, 46  # its margins
COLORS = {"baton": "#1f77b4", "nginx": "#2ca02c"}


def size_label(b):
    if b >= 1 << 20 and b % (1 << 20) == 0:
        return f"{b >> 20} MiB"
    if b >= 1 << 10 and b % (1 << 10) == 0:
        return f"{b >> 10} KiB"
    return f"{b} B"


def rps_label(v):
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    if v >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


def us_label(v):
    if v >= 1e6:
        return f"{v / 1e6:g} s"
    if v >= 1e3:
        return f"{v / 1e3:g} ms"
    return f"{v:g} µs"


def decades(lo, hi):
    """Ticks at 1, 2, 5 x 10^k covering [lo, hi], and the axis range."""
    lo10 = math.floor(math.log10(lo))
    hi10 = math.ceil(math.log10(hi))
    ticks = [m * 10**k for k in range(lo10, hi10 + 1) for m in (1, 2, 5)]
    ticks = [t for t in ticks if lo / 1.5 <= t <= hi * 1.5]
    bottom, top = math.log10(min([lo] + ticks)), math.log10(max([hi] + ticks))
    pad = max(top - bottom, 0.5) * 0.05
    return ticks, (bottom - pad, top + pad)


def panel(out, x0, y0, title, sizes, series, fmt):
    """One panel at (x0, y0): series is {server: [(bytes, value)]}."""
    pw, ph = W - ML - MR, H - MT - MB
    values = [v for points in series.values() for _, v in points if v > 0]
    if not values:
        return
    ticks, (ylo, yhi) = decades(min(values), max(values))
    xlo, xhi = math.log2(min(sizes)), math.log2(max(sizes))
    xpad = max(xhi - xlo, 2) * 0.05
    xlo, xhi = xlo - xpad, xhi + xpad

    def px(b):
        return x0 + ML + (math.log2(b) - xlo) / (xhi - xlo) * pw

    def py(v):
        return y0 + MT + ph - (math.log10(v) - ylo) / (yhi - ylo) * ph

    out.append(f'<text x="{x0 + ML + pw / 2:.1f}" y="{y0 + 20}" class="t">{escape(title)}</text>')
    out.append(f'<rect x="{x0 + ML}" y="{y0 + MT}" width="{pw}" height="{ph}" class="f"/>')
    for t in ticks:
        y = py(t)
        out.append(f'<line x1="{x0 + ML}" x2="{x0 + ML + pw}" y1="{y:.1f}" y2="{y:.1f}" class="g"/>')
        out.append(f'<text x="{x0 + ML - 6}" y="{y + 4:.1f}" class="yl">{escape(fmt(t))}</text>')
    for b in sizes:
        x = px(b)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y0 + MT}" y2="{y0 + MT + ph}" class="g"/>')
        out.append(f'<text x="{x:.1f}" y="{y0 + MT + ph + 16}" class="xl">{size_label(b)}</text>')
    out.append(f'<text x="{x0 + ML + pw / 2:.1f}" y="{y0 + H - 8}" class="xl">file size</text>')
    for server, points in series.items():
        points = sorted(p for p in points if p[1] > 0)
        path = " ".join(f"{px(b):.1f},{py(v):.1f}" for b, v in points)
        out.append(f'<polyline points="{path}" class="s" stroke="{COLORS[server]}"/>')
        for b, v in points:
            out.append(f'<circle cx="{px(b):.1f}" cy="{py(v):.1f}" r="3" fill="{COLORS[server]}"/>')


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    with open(sys.argv[1], newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        sys.exit(f"{sys.argv[1]}: no results")
    sizes = sorted({int(r["bytes"]) for r in rows})
    conns = sorted({int(r["connections"]) for r in rows})
    subtitle = sys.argv[3] if len(sys.argv) > 3 else ""
    width, height = W * len(conns), 2 * H + 60
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        "<style>.t{font-size:13px;font-weight:bold;text-anchor:middle}"
        ".xl{text-anchor:middle}.yl{text-anchor:end}.f{fill:none;stroke:#888}"
        ".g{stroke:#ddd}.s{fill:none;stroke-width:2}</style>",
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    for i, c in enumerate(conns):
        mine = [r for r in rows if int(r["connections"]) == c]
        for j, (key, name, fmt) in enumerate(
            [("rps", "requests/s", rps_label), ("p99_us", "p99 latency", us_label)]
        ):
            series = {
                s: [(int(r["bytes"]), float(r[f"{s}_{key}"])) for r in mine]
                for s in ("baton", "nginx")
            }
            panel(out, i * W, j * H, f"{name}, {c} connections", sizes, series, fmt)
    y = 2 * H + 16
    x = 20
    for server, color in COLORS.items():
        out.append(f'<line x1="{x}" x2="{x + 24}" y1="{y}" y2="{y}" stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{x + 30}" y="{y + 4}">{server}</text>')
        x += 90
    out.append(f'<text x="{x}" y="{y + 4}">{escape(subtitle)}</text>')
    out.append(
        f'<text x="20" y="{y + 24}">bench/http.sh: static files on loopback; '
        "nginx with 2 workers, sendfile on, tcp_nopush on, access_log off</text>"
    )
    out.append("</svg>")
    with open(sys.argv[2], "w") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
