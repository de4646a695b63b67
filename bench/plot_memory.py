#!/usr/bin/env python3
"""Plots server memory against open connections for bench/side-by-side.sh, as an SVG drawn by
hand (no plotting library needed on a bare Python 3).

Input: one CSV per server, lines "established,rss_kb" sampled while its connections ramped up
(established = TCP connections on the server's port, from ss). Usage:
    plot_memory.py OUT.svg LABEL=FILE.csv [LABEL=FILE.csv ...]
Y is the server's RSS growth over its own baseline (MiB), X the connections it holds.
"""
import sys

W, H = 900, 440
LEFT, RIGHT, TOP, BOTTOM = 80, 330, 40, 60
COLOURS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"]


def nice_step(span, ticks=5):
    raw = span / ticks
    mag = 10 ** len(str(int(raw))) / 10 if raw >= 1 else 1
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def main():
    out, series = sys.argv[1], []
    for arg in sys.argv[2:]:
        label, path = arg.split("=", 1)
        points = []
        for line in open(path):
            est, rss = line.strip().split(",")[:2]
            points.append((int(est), int(rss)))
        if not points:
            continue
        base = points[0][1]
        # RSS growth per distinct connection count (the last reading at each count).
        by_est = {}
        for est, rss in points:
            by_est[est] = max(0, rss - base) / 1024
        series.append((label, sorted(by_est.items())))
    xmax = max(p[0] for _, pts in series for p in pts) or 1
    ymax = max(p[1] for _, pts in series for p in pts) or 1
    xstep, ystep = nice_step(xmax), nice_step(ymax)
    xmax = xstep * -(-xmax // xstep)
    ymax = ystep * -(-ymax // ystep)
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def sx(x):
        return LEFT + x / xmax * pw

    def sy(y):
        return TOP + ph - y / ymax * ph

    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{LEFT}" y="22" font-size="15">Server memory (RSS growth) against open '
        f'WebSocket connections</text>',
    ]
    x = 0
    while x <= xmax:
        svg.append(f'<line x1="{sx(x):.1f}" y1="{TOP}" x2="{sx(x):.1f}" y2="{TOP + ph}" stroke="#eee"/>')
        svg.append(f'<text x="{sx(x):.1f}" y="{TOP + ph + 18}" text-anchor="middle">{int(x):,}</text>')
        x += xstep
    y = 0
    while y <= ymax:
        svg.append(f'<line x1="{LEFT}" y1="{sy(y):.1f}" x2="{LEFT + pw}" y2="{sy(y):.1f}" stroke="#eee"/>')
        svg.append(f'<text x="{LEFT - 8}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
        y += ystep
    svg.append(f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    svg.append(f'<text x="{LEFT + pw / 2}" y="{H - 18}" text-anchor="middle">open connections</text>')
    svg.append(f'<text transform="translate(22 {TOP + ph / 2}) rotate(-90)" text-anchor="middle">'
               f'RSS growth (MiB)</text>')
    for i, (label, pts) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{sx(e):.1f},{sy(m):.1f}" for e, m in pts)
        svg.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        last_e, last_m = pts[-1]
        per = last_m * 1024 * 1024 / last_e if last_e else 0
        ly = TOP + 20 + i * 40
        svg.append(f'<line x1="{LEFT + pw + 15}" y1="{ly}" x2="{LEFT + pw + 40}" y2="{ly}" '
                   f'stroke="{colour}" stroke-width="3"/>')
        svg.append(f'<text x="{LEFT + pw + 46}" y="{ly + 4}">{label}</text>')
        svg.append(f'<text x="{LEFT + pw + 46}" y="{ly + 19}" fill="#555">'
                   f'{last_m:.1f} MiB at {last_e:,} ({per:,.0f} B each)</text>')
    svg.append("</svg>")
    open(out, "w").write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main()
