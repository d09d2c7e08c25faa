"""Plots as inline SVG, drawn on the server: no JavaScript library, no CDN, works offline.

The anomaly timeline plots, for each evidence of a workload, the largest score/threshold ratio
of its models (1.0 = at threshold, the dashed line) against time, one dot per window coloured
by severity, with the line joining them.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Sequence
from typing import Any

SEVERITY_COLOURS = {
    "none": "#2e7d32",
    "info": "#558b2f",
    "low": "#9e9d24",
    "medium": "#f9a825",
    "high": "#ef6c00",
    "critical": "#c62828",
}


def _fmt_time(t: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(t))


def timeline(points: Sequence[dict[str, Any]], width: int = 820, height: int = 240) -> str:
    """SVG of ``points`` (dicts with ``received_at``, ``score``, ``severity``, ``seq``)."""
    pts = [p for p in points if p.get("score") is not None and math.isfinite(p["score"])]
    pad_l, pad_r, pad_t, pad_b = 48, 12, 12, 28
    w, h = width - pad_l - pad_r, height - pad_t - pad_b
    head = (
        f'<svg id="timeline" class="timeline-plot" role="img" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'aria-label="anomaly score timeline">'
        f'<rect x="{pad_l}" y="{pad_t}" width="{w}" height="{h}" class="plot-bg"/>'
    )
    if not pts:
        return (
            head + f'<text x="{pad_l + w / 2}" y="{pad_t + h / 2}" text-anchor="middle" '
            'class="plot-empty">no behaviour scores yet</text></svg>'
        )
    pts = sorted(pts, key=lambda p: p["received_at"])
    t0: float = float(pts[0]["received_at"])
    t1: float = float(pts[-1]["received_at"])
    span = max(t1 - t0, 1e-6)
    ymax = max(1.5, max(float(p["score"]) for p in pts) * 1.1)

    def x(t: float) -> float:
        return pad_l + (t - t0) / span * w if len(pts) > 1 else pad_l + w / 2

    def y(v: float) -> float:
        return pad_t + h - min(max(v, 0.0), ymax) / ymax * h

    parts = [head]
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        v = ymax * frac
        parts.append(
            f'<line x1="{pad_l}" x2="{pad_l + w}" y1="{y(v):.1f}" y2="{y(v):.1f}" class="grid"/>'
            f'<text x="{pad_l - 6}" y="{y(v) + 4:.1f}" text-anchor="end" class="axis">{v:.2f}</text>'
        )
    parts.append(
        f'<line x1="{pad_l}" x2="{pad_l + w}" y1="{y(1.0):.1f}" y2="{y(1.0):.1f}" '
        'class="threshold"><title>threshold (score = threshold)</title></line>'
    )
    parts.append(
        f'<text x="{pad_l}" y="{height - 8}" class="axis">{_fmt_time(t0)} UTC</text>'
        f'<text x="{pad_l + w}" y="{height - 8}" text-anchor="end" class="axis">'
        f"{_fmt_time(t1)} UTC</text>"
    )
    line = " ".join(f"{x(p['received_at']):.1f},{y(p['score']):.1f}" for p in pts)
    parts.append(f'<polyline points="{line}" class="series"/>')
    for p in pts:
        sev = p.get("severity") or "none"
        colour = SEVERITY_COLOURS.get(sev, "#555")
        tip = html.escape(
            f"seq {p.get('seq')} · score {p['score']:.3f} · {sev}"
            + (f" · {p['label']}" if p.get("label") else "")
        )
        parts.append(
            f'<circle cx="{x(p["received_at"]):.1f}" cy="{y(p["score"]):.1f}" r="3.5" '
            f'fill="{colour}" class="point sev-{html.escape(sev)}"><title>{tip}</title></circle>'
        )
    parts.append("</svg>")
    return "".join(parts)
