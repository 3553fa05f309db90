"""A self-contained HTML report of one self-test run and its history, for clinic IT to attach to a support ticket.

One file, no scripts, no external fonts or images: the plots are inline SVG drawn here (a TTFT histogram of the run
and TTFT p50/p99 over the kept history). Every text that comes from a file is HTML-escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["render_report", "svg_histogram", "svg_history"]

W, H = 640, 240
PAD_L, PAD_R, PAD_T, PAD_B = 56, 16, 16, 40
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:980px;color:#1b1f24}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.pass{background:#e6f4ea;border:1px solid #34a853}.fail{background:#fdecea;border:1px solid #d93025}
.banner{padding:10px 14px;border-radius:6px;margin:12px 0}.muted{color:#5f6368}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{padding:4px 8px;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f6f8fa}
svg text{font:11px system-ui,sans-serif;fill:#3c4043}code{font-size:12px}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _n(value: Any, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) and math.isfinite(value) else "–"


def _g(value: Any) -> str:
    return f"{value:g}" if isinstance(value, int | float) else _e(value if value is not None else "–")


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _frame(x_lo: float, x_hi: float, y_hi: float, x_label: str, y_label: str, *, x_ticks: bool = True) -> list[str]:
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    out = [f'<rect x="{PAD_L}" y="{PAD_T}" width="{pw}" height="{ph}" fill="#fff" stroke="#ccc"/>']
    for t in _ticks(0, y_hi, 4):
        y = PAD_T + ph - t / y_hi * ph if y_hi else PAD_T + ph
        out.append(f'<line x1="{PAD_L}" x2="{PAD_L + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end">{t:g}</text>')
    for t in _ticks(x_lo, x_hi, 6) if x_ticks else []:
        x = PAD_L + (t - x_lo) / (x_hi - x_lo) * pw if x_hi > x_lo else PAD_L
        out.append(f'<text x="{x:.1f}" y="{PAD_T + ph + 16}" text-anchor="middle">{t:g}</text>')
    out.append(f'<text x="{PAD_L + pw / 2}" y="{H - 6}" text-anchor="middle">{_e(x_label)}</text>')
    out.append(
        f'<text x="14" y="{PAD_T + ph / 2}" text-anchor="middle" transform="rotate(-90 14 {PAD_T + ph / 2})">'
        f"{_e(y_label)}</text>"
    )
    return out


def svg_histogram(samples_ms: Sequence[float], limit_ms: float | None = None, bins: int = 30) -> str:
    """A TTFT histogram (requests per bin) with the SLO limit as a red line when it is in range."""
    if not samples_ms:
        return '<p class="muted">No completed request: nothing to plot.</p>'
    lo, hi = 0.0, max(samples_ms) * 1.05
    if limit_ms is not None and limit_ms <= hi * 1.5:
        hi = max(hi, limit_ms * 1.05)
    width = (hi - lo) / bins
    counts = [0] * bins
    for s in samples_ms:
        counts[min(bins - 1, int((s - lo) / width))] += 1
    top = max(counts)
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img">']
    parts.append(f"<title>TTFT distribution of {len(samples_ms)} requests</title>")
    parts += _frame(lo, hi, top, "time to first token (ms)", "requests")
    for i, c in enumerate(counts):
        if not c:
            continue
        x = PAD_L + i * pw / bins
        h = c / top * ph
        parts.append(
            f'<rect class="bar" x="{x + 0.5:.1f}" y="{PAD_T + ph - h:.1f}" width="{pw / bins - 1:.1f}" '
            f'height="{h:.1f}" fill="#4285f4"><title>{lo + i * width:.1f}–{lo + (i + 1) * width:.1f} ms: {c}'
            "</title></rect>"
        )
    if limit_ms is not None and limit_ms <= hi:
        x = PAD_L + (limit_ms - lo) / (hi - lo) * pw
        parts.append(
            f'<line class="slo" x1="{x:.1f}" x2="{x:.1f}" y1="{PAD_T}" y2="{PAD_T + ph}" stroke="#d93025" '
            'stroke-dasharray="4 3"/>'
        )
        parts.append(f'<text x="{x + 4:.1f}" y="{PAD_T + 12}" style="fill:#d93025">SLO {limit_ms:g} ms</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_history(runs: Sequence[Mapping[str, Any]], limit_ms: float | None = None) -> str:
    """TTFT p50 and p99 of each kept run, oldest to newest (failed runs marked red)."""
    pts = [
        (r.get("started_at", ""), (r.get("summary") or {}).get("ttft_ms") or {}, (r.get("verdict") or {}).get("passed"))
        for r in runs
    ]
    pts = [(t, s, ok) for t, s, ok in pts if isinstance(s.get("p50"), int | float)]
    if not pts:
        return '<p class="muted">No earlier runs with figures.</p>'
    y_hi = max(*(float(s.get("p99") or s["p50"]) for _, s, _ in pts), limit_ms or 0) * 1.1 or 1.0
    n = len(pts)
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img">']
    parts.append(f"<title>TTFT p50 and p99 over the last {n} runs</title>")

    def xy(i: int, v: float) -> tuple[float, float]:
        x = PAD_L + (i / (n - 1) * pw if n > 1 else pw / 2)
        return x, PAD_T + ph - v / y_hi * ph

    parts += _frame(1, max(n, 2), y_hi, f"{n} runs, oldest → newest", "TTFT (ms)", x_ticks=False)
    for i in {0, n - 1}:
        x = xy(i, 0)[0]
        when = str(pts[i][0]).replace("T", " ")[:16]
        anchor = "start" if i == 0 and n > 1 else "end" if n > 1 else "middle"
        parts.append(f'<text x="{x:.1f}" y="{PAD_T + ph + 16}" text-anchor="{anchor}">{_e(when)}</text>')

    for key, colour in (("p99", "#ea8600"), ("p50", "#1a73e8")):
        coords = [xy(i, float(s[key])) for i, (_, s, _) in enumerate(pts) if isinstance(s.get(key), int | float)]
        if len(coords) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
            parts.append(f'<polyline class="{key}" points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for i, (t, s, ok) in enumerate(pts):
            if isinstance(s.get(key), int | float):
                x, y = xy(i, float(s[key]))
                fill = colour if ok else "#d93025"
                parts.append(
                    f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{fill}"><title>{_e(t)} {key} '
                    f"{float(s[key]):.1f} ms</title></circle>"
                )
    if limit_ms is not None:
        y = xy(0, limit_ms)[1]
        parts.append(
            f'<line x1="{PAD_L}" x2="{PAD_L + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#d93025" stroke-dasharray="4 3"/>'
        )
    parts.append(
        f'<text x="{PAD_L + 8}" y="{PAD_T + 14}" style="fill:#1a73e8">● p50</text>'
        f'<text x="{PAD_L + 60}" y="{PAD_T + 14}" style="fill:#ea8600">● p99</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def _clipped(point: Mapping[str, Any]) -> str:
    return f" (of {_e(point['clipped_from'])})" if point.get("clipped_from") else ""


def _stat_row(name: str, stats: Mapping[str, Any]) -> str:
    cells = "".join(f"<td>{_n(stats.get(k))}</td>" for k in ("mean", "std", "p50", "p90", "p95", "p99"))
    return f"<tr><td>{_e(name)}</td>{cells}</tr>"


def render_report(run: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> str:
    """The whole HTML document for ``run`` (a schema-1 result) with ``history`` (older results, any order)."""
    verdict = run.get("verdict") or {}
    slo = verdict.get("slo") or {}
    summary = run.get("summary") or {}
    passed = bool(verdict.get("passed"))
    points = run.get("points") or []
    judged = [p for p in points if p.get("judged")] or points
    samples = [s for p in judged for s in (p.get("samples") or {}).get("ttft_ms") or []]
    hist_runs = sorted([*history], key=lambda r: str(r.get("started_at", "")))
    if not any(r.get("id") == run.get("id") for r in hist_runs):
        hist_runs.append(run)

    rows = "".join(
        "<tr>"
        f"<td>{_e(p.get('name'))}{' ★' if p.get('judged') else ''}</td><td>{_e(p.get('kind'))}</td>"
        f"<td>{_e(p.get('concurrency'))}</td><td>{_e(p.get('prompt_tokens') or '–')}{_clipped(p)}</td>"
        f"<td>{p.get('completed', 0)}/{p.get('failed', 0)}</td>"
        f"<td>{_n((p.get('ttft_ms') or {}).get('p50'))}</td><td>{_n((p.get('ttft_ms') or {}).get('p99'))}</td>"
        f"<td>{_n((p.get('ttfc_ms') or {}).get('p50'))}</td><td>{_n((p.get('tpot_ms') or {}).get('p50'))}</td>"
        f"<td>{_n((p.get('itl_ms') or {}).get('p99'))}</td><td>{_n((p.get('e2el_ms') or {}).get('p50'))}</td>"
        f"<td>{_n(p.get('output_throughput'))}</td></tr>"
        for p in points
    )
    errors = {e: n for p in points for e, n in (p.get("errors") or {}).items()}
    error_html = (
        "<h2>Errors</h2><table><tr><th>error</th><th>requests</th></tr>"
        + "".join(f"<tr><td>{_e(e)}</td><td>{n}</td></tr>" for e, n in errors.items())
        + "</table>"
        if errors
        else ""
    )
    share = run.get("gateway_share_ms")
    share_html = (
        f"<p>Gateway's share of TTFT (p50, gateway minus direct, interleaved): <b>{_n(share, 2)} ms</b></p>"
        if isinstance(share, int | float)
        else ""
    )
    hw = run.get("hardware") or {}
    gpus = ", ".join(str(g.get("name")) for g in hw.get("gpus") or []) or "no NVIDIA GPU"
    cpu = (hw.get("cpu") or {}).get("model") or ""
    flags = (run.get("snapshot") or {}).get("vllm_flags")
    flags_html = (
        "".join(f"<p><code>{_e(k)}: {_e(' '.join(v))}</code></p>" for k, v in flags.items())
        if isinstance(flags, dict)
        else '<p class="muted">No vLLM environment files found.</p>'
    )
    stats_rows = "".join(
        _stat_row(label, summary.get(key) or {})
        for label, key in (
            ("TTFT", "ttft_ms"),
            ("time to first content", "ttfc_ms"),
            ("TPOT", "tpot_ms"),
            ("ITL", "itl_ms"),
            ("E2EL", "e2el_ms"),
        )
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>clinic-edge self-test {_e(run.get("id"))}</title><style>{CSS}</style></head><body>
<h1>clinic-edge self-test</h1>
<p class="muted">{_e(run.get("started_at"))} → {_e(run.get("finished_at"))} · mode {_e(run.get("mode"))} ·
target {_e(run.get("target"))} ({_e(run.get("target_kind", ""))}) · model {_e(run.get("model"))}</p>
<div class="banner {"pass" if passed else "fail"}"><b>{"PASS" if passed else "FAIL"}</b> —
{_e(str(verdict.get("reason", "")).removeprefix("PASS: ").removeprefix("FAIL: "))}</div>
<p class="muted">SLO profile {_e(slo.get("profile"))}: TTFT p99 ≤ {_g(slo.get("ttft_p99_ms"))} ms at the clinic's
concurrency {_e(slo.get("concurrency"))}; image TTFT ≤ {_g(slo.get("image_ttft_ms"))} ms; at most
{_e(slo.get("max_failed"))} failed requests. Definitions as <code>vllm bench serve</code>.</p>
{share_html}
<h2>Judged figures (ms)</h2>
<table><tr><th></th><th>mean</th><th>std</th><th>p50</th><th>p90</th><th>p95</th><th>p99</th></tr>{stats_rows}</table>
<p>{summary.get("completed", 0)} requests completed, {summary.get("failed", 0)} failed.</p>
<h2>TTFT distribution (judged load points)</h2>
{svg_histogram(samples, slo.get("ttft_p99_ms"))}
<h2>History: TTFT p50 / p99 per run</h2>
{svg_history(hist_runs, slo.get("ttft_p99_ms"))}
<h2>Load points</h2>
<table><tr><th>point</th><th>kind</th><th>conc.</th><th>prompt tok.</th><th>ok/failed</th><th>TTFT p50</th>
<th>TTFT p99</th><th>TTFC p50</th><th>TPOT p50</th><th>ITL p99</th><th>E2EL p50</th><th>out tok/s</th></tr>
{rows}</table>
<p class="muted">★ judged by the verdict. Times in ms.</p>
{error_html}
<h2>What was measured</h2>
<p>Hardware: {_e(gpus)}; CPU {_e(cpu)} ({_e((hw.get("cpu") or {}).get("count"))} cores).</p>
{flags_html}
<p class="muted">clinic-edge {_e(run.get("clinic_edge_version", ""))} · result id {_e(run.get("id"))} ·
no patient data: prompts and the radiograph are synthetic.</p>
</body></html>
"""
