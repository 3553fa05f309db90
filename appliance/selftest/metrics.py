"""Latency metrics from recorded stream timelines, defined exactly as ``vllm bench serve`` defines them.

Pure arithmetic, no I/O: the client records *when* each SSE event arrived (``time.perf_counter`` seconds) and *what*
it was (:func:`appliance.wire.classify`); this module turns those timelines into numbers.

Definitions (vLLM 0.32, ``vllm/benchmarks/lib/endpoint_request_func.py`` and ``serve.py``):

* **TTFT** — first event with non-empty ``choices`` (vLLM's role-only chunk counts) minus the start, which is taken
  just before the POST.
* **ITL** — the gaps between successive events with non-empty ``choices`` (so the role chunk → first content gap is
  one of them).
* **E2EL** — the last event with non-empty ``choices`` minus the start (the trailing usage chunk and ``[DONE]`` do
  not move it).
* **TPOT** — ``(E2EL − TTFT) / (output_tokens − 1)`` for requests with more than one output token; output tokens are
  ``usage.completion_tokens``. For goodput a request with one token has TPOT 0.
* Statistics: mean, population std (``numpy.std``), percentiles with numpy's default linear interpolation.
* Throughput: completed requests and output tokens divided by the wall time of the whole load point.
* Goodput: completed requests meeting *every* SLO given (``limit >= value``), per second.

Ours beside those: **TTFC**, time to first *content* (the first event carrying answer text; a reasoning model's
thinking counts for TTFT, as in vLLM's bench, but not for TTFC), reported separately; and a
stricter notion of failure — a stream that carries an ``error`` event or ends without ``[DONE]`` counts as failed
(vLLM's bench counts it as a success when a role chunk came first). Failures are counted, never dropped.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from appliance.wire import ChunkKind

__all__ = [
    "PERCENTILES",
    "STAT_KEYS",
    "PointMetrics",
    "RequestMeasure",
    "RequestTimeline",
    "StreamEvent",
    "describe",
    "measure",
    "percentile",
    "summarize",
]

PERCENTILES = (50.0, 90.0, 95.0, 99.0)
STAT_KEYS = ("mean", "std", "p50", "p90", "p95", "p99")
MS = 1000.0


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One SSE event as the client saw it: arrival time and what it was (no text kept: no patient data)."""

    t: float
    kind: ChunkKind
    has_content: bool = False
    usage: Mapping[str, Any] | None = None
    error: str | None = None
    has_reasoning: bool = False  # a reasoning model's thinking: output tokens, though not answer text


@dataclass(slots=True)
class RequestTimeline:
    """Everything recorded about one request: its start, HTTP status and events, or the error that ended it."""

    start: float
    status: int | None = None
    events: list[StreamEvent] = field(default_factory=list)
    error: str | None = None
    end: float | None = None  # when the response finished or failed (for throughput bookkeeping only)


@dataclass(frozen=True, slots=True)
class RequestMeasure:
    """One request's figures in seconds (``None`` when not defined for it)."""

    success: bool
    error: str | None
    ttft: float | None = None
    ttfc: float | None = None
    e2el: float | None = None
    itl: tuple[float, ...] = ()
    output_tokens: int = 0
    prompt_tokens: int | None = None
    start: float = 0.0

    @property
    def tpot(self) -> float | None:
        """``(E2EL − TTFT) / (output_tokens − 1)``; ``None`` with one output token or fewer."""
        if not self.success or self.ttft is None or self.e2el is None or self.output_tokens <= 1:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


def measure(tl: RequestTimeline) -> RequestMeasure:
    """Apply vLLM's definitions to one timeline."""
    if tl.error is not None and tl.status is None:
        return RequestMeasure(False, tl.error, start=tl.start)
    if tl.status != 200:
        return RequestMeasure(False, tl.error or f"HTTP {tl.status}", start=tl.start)
    ttft: float | None = None
    ttfc: float | None = None
    last: float | None = None
    itl: list[float] = []
    usage: Mapping[str, Any] | None = None
    token_events = 0
    error: str | None = None
    done = False
    for ev in tl.events:
        if ev.kind in ("role", "content"):
            if ttft is None:
                ttft = ev.t - tl.start
            else:
                assert last is not None
                itl.append(ev.t - last)
            last = ev.t
            if ev.has_content or ev.has_reasoning:
                token_events += 1
            if ev.has_content and ttfc is None:
                ttfc = ev.t - tl.start
        if ev.usage:
            usage = ev.usage
        if ev.kind == "error" and error is None:
            error = ev.error or "the server sent an error event mid-stream"
        if ev.kind == "done":
            done = True
    prompt_tokens = _int_or_none(usage.get("prompt_tokens")) if usage else None
    if ttft is None or last is None:
        reason = error or tl.error or "the stream carried no event with choices (no first token)"
        return RequestMeasure(False, reason, prompt_tokens=prompt_tokens, start=tl.start)
    if error is None and tl.error is not None:
        error = tl.error
    if error is None and not done:
        error = "the stream ended before data: [DONE]"
    completion = _int_or_none(usage.get("completion_tokens")) if usage else None
    # vLLM falls back to re-tokenizing the text; we keep no text, and vLLM streams one token per event, answer or
    # thinking alike.
    output_tokens = completion if completion is not None else token_events
    return RequestMeasure(
        success=error is None,
        error=error,
        ttft=ttft,
        ttfc=ttfc,
        e2el=last - tl.start,
        itl=tuple(itl),
        output_tokens=output_tokens,
        prompt_tokens=prompt_tokens,
        start=tl.start,
    )


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """numpy's default (``method="linear"``) percentile of already sorted values."""
    if not sorted_values:
        raise ValueError("percentile of an empty sample")
    rank = (len(sorted_values) - 1) * p / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = rank - lo
    a, b = sorted_values[lo], sorted_values[hi]
    # numpy's _lerp: a + (b - a) * t, and b - (b - a) * (1 - t) for t >= 0.5 (keeps monotonicity at the ends).
    return a + (b - a) * frac if frac < 0.5 else b - (b - a) * (1 - frac)


def describe(values_s: Iterable[float]) -> dict[str, float | None]:
    """mean, std (population), p50, p90, p95, p99 in **milliseconds**; all ``None`` for an empty sample.

    vLLM prints 0 for an empty sample; we say "no data" so that a run where everything failed cannot pass an SLO.
    """
    vals = sorted(v * MS for v in values_s)
    if not vals:
        return dict.fromkeys(STAT_KEYS)
    n = len(vals)
    mean = math.fsum(vals) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / n)
    out: dict[str, float | None] = {"mean": mean, "std": std}
    for p in PERCENTILES:
        out[f"p{p:g}"] = percentile(vals, p)
    return out


@dataclass(frozen=True)
class PointMetrics:
    """The figures for one load point (or several pooled), as the result file stores them."""

    ttft_ms: dict[str, float | None]
    ttfc_ms: dict[str, float | None]
    tpot_ms: dict[str, float | None]
    itl_ms: dict[str, float | None]
    e2el_ms: dict[str, float | None]
    completed: int
    failed: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    request_goodput: float | None
    total_output_tokens: int
    mean_prompt_tokens: float | None
    errors: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "ttft_ms": self.ttft_ms,
            "ttfc_ms": self.ttfc_ms,
            "tpot_ms": self.tpot_ms,
            "itl_ms": self.itl_ms,
            "e2el_ms": self.e2el_ms,
            "completed": self.completed,
            "failed": self.failed,
            "duration_s": self.duration_s,
            "request_throughput": self.request_throughput,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
            "request_goodput": self.request_goodput,
            "total_output_tokens": self.total_output_tokens,
            "mean_prompt_tokens": self.mean_prompt_tokens,
            "errors": self.errors,
        }


def summarize(
    measures: Sequence[RequestMeasure], duration_s: float, goodput_slo_ms: Mapping[str, float] | None = None
) -> PointMetrics:
    """Pool request measures into a load point's metrics.

    ``duration_s`` is the wall time of the whole point (vLLM: from before the first request to after the last).
    ``goodput_slo_ms`` takes the keys ``ttft``, ``tpot``, ``e2el`` (milliseconds), as ``--goodput`` does.
    """
    ok = [m for m in measures if m.success]
    failed = len(measures) - len(ok)
    itls = [gap for m in ok for gap in m.itl]
    tpots = [t for m in ok if (t := m.tpot) is not None]
    total_out = sum(m.output_tokens for m in ok)
    prompts = [m.prompt_tokens for m in ok if m.prompt_tokens is not None]
    total_in = sum(prompts)
    dur = duration_s if duration_s > 0 else float("nan")
    goodput: float | None = None
    if goodput_slo_ms:
        good = sum(1 for m in ok if _meets(m, goodput_slo_ms))
        goodput = good / dur if duration_s > 0 else 0.0
    errors = Counter(_error_class(m.error) for m in measures if not m.success)
    return PointMetrics(
        ttft_ms=describe(m.ttft for m in ok if m.ttft is not None),
        ttfc_ms=describe(m.ttfc for m in ok if m.ttfc is not None),
        tpot_ms=describe(tpots),
        itl_ms=describe(itls),
        e2el_ms=describe(m.e2el for m in ok if m.e2el is not None),
        completed=len(ok),
        failed=failed,
        duration_s=duration_s,
        request_throughput=len(ok) / dur if duration_s > 0 else 0.0,
        output_throughput=total_out / dur if duration_s > 0 else 0.0,
        total_token_throughput=(total_in + total_out) / dur if duration_s > 0 else 0.0,
        request_goodput=goodput,
        total_output_tokens=total_out,
        mean_prompt_tokens=(total_in / len(prompts)) if prompts else None,
        errors=dict(errors),
    )


def _meets(m: RequestMeasure, slo_ms: Mapping[str, float]) -> bool:
    values = {"ttft": m.ttft, "tpot": m.tpot if m.tpot is not None else 0.0, "e2el": m.e2el}
    for key, limit in slo_ms.items():
        value = values.get(key)
        if value is None or not limit / MS >= value:  # vLLM's comparison, in seconds
            return False
    return True


def _error_class(error: str | None) -> str:
    """A short, count-able form of an error (first line, bounded); errors never carry prompt text."""
    text = (error or "unknown error").strip().splitlines()[0] if error and error.strip() else "unknown error"
    return text[:160]
