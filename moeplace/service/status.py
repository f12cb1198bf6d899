"""The status page of one deployment: server-rendered HTML with inline SVG plots, no JavaScript.

Plots over the retained windows: tokens per window (the traffic the deployment served), and
``load_imbalance_mean`` per window of the placement marked current next to the contiguous layout
(experts in id order: what a stack does with no placement). Below: every placement version with
its report. Everything interpolated is escaped.
"""

from __future__ import annotations

import datetime as _dt
from html import escape
from typing import Any

import numpy as np

W, H, PAD = 640, 180, 36


def _time(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _axis(labels: list[str]) -> str:
    """First and last window start under the x axis (each point's own in its tooltip)."""
    if not labels:
        return ""
    out = f'<text x="{PAD}" y="{H - PAD + 16}" font-size="11">{escape(labels[0])} UTC</text>'
    if len(labels) > 1:
        out += (f'<text x="{W - PAD}" y="{H - PAD + 16}" font-size="11" text-anchor="end">'
                f'{escape(labels[-1])} UTC</text>')
    return out


def _bars(values: list[float], labels: list[str], title: str, css: str) -> str:
    """A bar chart as SVG; one ``rect`` per value (the browser test counts them)."""
    n = max(len(values), 1)
    top = max(values) if values and max(values) > 0 else 1.0
    bw = (W - 2 * PAD) / n
    parts = [f'<svg class="{css}" role="img" aria-label="{escape(title)}" width="{W}" '
             f'height="{H}" viewBox="0 0 {W} {H}"><title>{escape(title)}</title>',
             f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#555"/>',
             f'<text x="{PAD}" y="14" font-size="11">max {top:,.0f}</text>']
    for i, (v, lab) in enumerate(zip(values, labels, strict=True)):
        h = (H - 2 * PAD) * v / top
        x = PAD + i * bw + 1
        parts.append(f'<rect class="bar" x="{x:.1f}" y="{H - PAD - h:.1f}" width="{max(bw - 2, 1):.1f}"'
                     f' height="{h:.1f}" fill="#4a7bd0"><title>{escape(lab)}: {v:,.0f}</title></rect>')
    parts.append(_axis(labels) + "</svg>")
    return "".join(parts)


def _lines(series: dict[str, list[float]], labels: list[str], title: str, css: str) -> str:
    """A line chart as SVG; one ``polyline`` per series with a legend entry."""
    vals = [v for s in series.values() for v in s if np.isfinite(v)]
    lo, hi = (min(vals), max(vals)) if vals else (1.0, 2.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.05, hi + 0.05
    n = max(len(labels), 1)

    def xy(i: int, v: float) -> str:
        x = PAD + (W - 2 * PAD) * (i + 0.5) / n
        y = H - PAD - (H - 2 * PAD) * (v - lo) / (hi - lo)
        return f"{x:.1f},{y:.1f}"

    colors = ["#d0473f", "#888888", "#2e9e5b"]
    parts = [f'<svg class="{css}" role="img" aria-label="{escape(title)}" width="{W}" '
             f'height="{H}" viewBox="0 0 {W} {H}"><title>{escape(title)}</title>',
             f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#555"/>',
             f'<text x="{PAD}" y="14" font-size="11">{lo:.3f} .. {hi:.3f}</text>']
    for j, (name, s) in enumerate(series.items()):
        c = colors[j % len(colors)]
        pts = " ".join(xy(i, v) for i, v in enumerate(s))
        parts.append(f'<polyline class="series" data-name="{escape(name)}" fill="none" '
                     f'stroke="{c}" stroke-width="2" points="{pts}"/>')
        for i, v in enumerate(s):
            parts.append(f'<circle cx="{xy(i, v).split(",")[0]}" cy="{xy(i, v).split(",")[1]}" '
                         f'r="3" fill="{c}"><title>{escape(name)} {escape(labels[i])}: '
                         f'{v:.4f}</title></circle>')
        parts.append(f'<text x="{W - PAD - 200}" y="{14 + 13 * j}" font-size="11" fill="{c}">'
                     f'{escape(name)}</text>')
    parts.append(_axis(labels) + "</svg>")
    return "".join(parts)


def render_status(dep: dict[str, Any], windows: list[dict[str, Any]],
                  placements: list[dict[str, Any]], current_imbalance: list[float] | None,
                  contiguous_imbalance: list[float]) -> str:
    """The page. ``windows``: ``{window, start, tokens, batches}`` oldest first; the imbalance
    lists hold one value per window."""
    did = escape(str(dep["id"]))
    c = dep["cluster"]
    labels = [_time(w["start"]) for w in windows]
    rows = []
    for p in reversed(placements):
        r = p["report"]
        m = r.get("metrics", {})
        mig = r.get("migration_from_current") or {}
        cur = " (current)" if p["version"] == dep.get("current_version") else ""
        links = " ".join(f'<a href="/v1/deployments/{did}/placements/{p["version"]}?format={f}">'
                         f'{f}</a>' for f in ("moeplace", "sglang", "trtllm", "eplb"))
        gap = r.get("gap")
        rows.append(
            f"<tr><td>{p['version']}{cur}</td><td>{escape(_time(p['created']))}</td>"
            f"<td>{escape(str(r.get('method', '')))}</td><td>{escape(str(r.get('status', '')))}</td>"
            f"<td>{m.get('load_imbalance_mean', float('nan')):.4f}</td>"
            f"<td>{'' if gap is None else f'{gap:.1%}'}</td>"
            f"<td>{escape(str(mig.get('experts_moved', '')))}</td><td>{links}</td></tr>")
    series = {"contiguous (no placement)": contiguous_imbalance}
    if current_imbalance is not None:
        series = {f"current (v{dep['current_version']})": current_imbalance, **series}
    plots = ("<p>No statistics in the retained windows yet.</p>" if not windows else
             "<h2>Traffic: tokens per window</h2>"
             + _bars([float(w["tokens"]) for w in windows], labels, "tokens per window", "tokens")
             + "<h2>load_imbalance_mean per window (max GPU load / mean, lower is better)</h2>"
             + _lines(series, labels, "load imbalance per window", "imbalance"))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>moeplace: {did}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:760px}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}</style>
</head><body>
<h1>Deployment {did}</h1>
<p id="shape">{escape(str(dep.get('model') or 'model'))}: {dep['num_layers']} MoE layers x
{dep['num_experts']} experts, top-{dep['top_k']}; {c['num_gpus']} GPUs in {c['num_nodes']}
node(s), {c['replicas']} replicas; engine {escape(str(dep.get('engine', '')))}.
{len(windows)} windows, {sum(w['tokens'] for w in windows):,} tokens retained.</p>
{plots}
<h2>Placement versions</h2>
<table id="versions"><tr><th>version</th><th>created (UTC)</th><th>method</th><th>status</th>
<th>load_imbalance_mean</th><th>gap</th><th>experts moved</th><th>files</th></tr>
{''.join(rows) or '<tr><td colspan="8">none yet</td></tr>'}</table>
</body></html>
"""
