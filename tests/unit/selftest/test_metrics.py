"""Metric arithmetic on recorded event timelines, checked against vLLM's definitions and numpy's statistics."""

from __future__ import annotations

import importlib.util
import math
import random

import pytest

from appliance.selftest.metrics import (
    RequestTimeline,
    StreamEvent,
    describe,
    measure,
    percentile,
    summarize,
)
from tests.conftest import require

T0 = 100.0
USAGE = {"prompt_tokens": 40, "completion_tokens": 3, "total_tokens": 43}


def _tl(*events: StreamEvent, status: int | None = 200, error: str | None = None) -> RequestTimeline:
    return RequestTimeline(start=T0, status=status, events=list(events), error=error)


def _vllm_stream(role_at: float = 0.020, gaps: tuple[float, ...] = (0.005, 0.004, 0.006)) -> RequestTimeline:
    """Role chunk, three content chunks (the last with finish_reason), usage chunk, [DONE]."""
    t = T0 + role_at
    events = [StreamEvent(t, "role")]
    for g in gaps:
        t += g
        events.append(StreamEvent(t, "content", has_content=True))
    events += [StreamEvent(t + 0.001, "usage", usage=USAGE), StreamEvent(t + 0.0011, "done")]
    return _tl(*events)


def test_role_chunk_counts_for_ttft_but_not_for_ttfc() -> None:
    m = measure(_vllm_stream())
    assert m.success and m.error is None
    assert m.ttft == pytest.approx(0.020)
    assert m.ttfc == pytest.approx(0.025)  # the first content chunk
    # ITL: every gap between events with choices, including role → first content.
    assert m.itl == pytest.approx((0.005, 0.004, 0.006))
    # E2EL: the last event with choices; the usage chunk and [DONE] do not move it.
    assert m.e2el == pytest.approx(0.035)
    assert m.output_tokens == 3 and m.prompt_tokens == 40
    assert m.tpot == pytest.approx((0.035 - 0.020) / 2)


def test_usage_chunk_is_the_source_of_output_tokens() -> None:
    tl = _vllm_stream()
    tl.events[-2] = StreamEvent(tl.events[-2].t, "usage", usage={"prompt_tokens": 7, "completion_tokens": 10})
    m = measure(tl)
    assert m.output_tokens == 10 and m.prompt_tokens == 7
    assert m.tpot == pytest.approx(0.015 / 9)


def test_without_usage_output_tokens_are_content_events() -> None:
    tl = _vllm_stream()
    del tl.events[-2]
    m = measure(tl)
    assert m.success and m.output_tokens == 3 and m.prompt_tokens is None


def test_without_usage_a_reasoning_models_thinking_counts_as_output_tokens() -> None:
    tl = _tl(
        StreamEvent(T0 + 0.01, "role"),
        StreamEvent(T0 + 0.02, "content", has_reasoning=True),
        StreamEvent(T0 + 0.03, "content", has_reasoning=True),
        StreamEvent(T0 + 0.04, "content", has_content=True),
        StreamEvent(T0 + 0.041, "done"),
    )
    m = measure(tl)
    assert m.success and m.output_tokens == 3 and m.ttfc == pytest.approx(0.04)
    assert m.tpot == pytest.approx((0.04 - 0.01) / 2)


def test_one_output_token_has_no_tpot() -> None:
    tl = _tl(
        StreamEvent(T0 + 0.01, "role"),
        StreamEvent(T0 + 0.02, "content", has_content=True),
        StreamEvent(T0 + 0.021, "usage", usage={"prompt_tokens": 5, "completion_tokens": 1}),
        StreamEvent(T0 + 0.022, "done"),
    )
    m = measure(tl)
    assert m.success and m.tpot is None


def test_mid_stream_error_is_a_failure_with_its_message() -> None:
    tl = _tl(
        StreamEvent(T0 + 0.01, "role"),
        StreamEvent(T0 + 0.02, "content", has_content=True),
        StreamEvent(T0 + 0.03, "error", error="engine died"),
        StreamEvent(T0 + 0.031, "done"),
    )
    m = measure(tl)
    assert not m.success
    assert m.error == "engine died"
    assert m.ttft == pytest.approx(0.01)  # still recorded, but it does not enter the statistics
    pm = summarize([m, measure(_vllm_stream())], duration_s=1.0)
    assert pm.failed == 1 and pm.completed == 1
    assert pm.errors == {"engine died": 1}
    assert pm.ttft_ms["p50"] == pytest.approx(20.0)


def test_empty_stream_and_stream_cut_before_done_fail() -> None:
    empty = measure(_tl(StreamEvent(T0 + 0.01, "done")))
    assert not empty.success and "no event with choices" in (empty.error or "")
    nothing = measure(_tl())
    assert not nothing.success
    cut = _vllm_stream()
    del cut.events[-1]
    m = measure(cut)
    assert not m.success and "[DONE]" in (m.error or "")


def test_http_error_and_transport_error_fail() -> None:
    http = measure(_tl(status=503, error="HTTP 503: not ready"))
    assert not http.success and http.error == "HTTP 503: not ready"
    transport = measure(_tl(status=None, error="ClientConnectorError: refused"))
    assert not transport.success and transport.ttft is None


def test_summary_counts_failures_and_throughputs() -> None:
    ok = [measure(_vllm_stream(role_at=0.01 * (i + 1))) for i in range(4)]
    bad = [measure(_tl(status=None, error="ClientConnectorError: refused")) for _ in range(2)]
    pm = summarize(ok + bad, duration_s=2.0, goodput_slo_ms={"ttft": 25.0})
    assert pm.completed == 4 and pm.failed == 2
    assert pm.request_throughput == pytest.approx(2.0)
    assert pm.output_throughput == pytest.approx(12 / 2.0)
    assert pm.total_token_throughput == pytest.approx((4 * 40 + 12) / 2.0)
    # TTFTs are 10, 20, 30, 40 ms: two meet 25 ms.
    assert pm.request_goodput == pytest.approx(1.0)
    assert pm.ttft_ms["mean"] == pytest.approx(25.0)
    assert pm.ttft_ms["std"] == pytest.approx(math.sqrt(125.0))  # population std, as numpy.std
    assert pm.errors == {"ClientConnectorError: refused": 2}
    assert len([g for m in ok for g in m.itl]) == 12


def test_goodput_uses_every_slo_and_tpot_zero_for_single_token() -> None:
    one = measure(
        _tl(
            StreamEvent(T0 + 0.01, "role"),
            StreamEvent(T0 + 0.02, "content", has_content=True),
            StreamEvent(T0 + 0.021, "usage", usage={"completion_tokens": 1}),
            StreamEvent(T0 + 0.022, "done"),
        )
    )
    slow = measure(_vllm_stream(gaps=(0.1, 0.1, 0.1)))  # 3 tokens: TPOT = 300 ms / 2 = 150 ms
    pm = summarize([one, slow], duration_s=1.0, goodput_slo_ms={"ttft": 50.0, "tpot": 50.0})
    assert pm.request_goodput == pytest.approx(1.0)  # only the single-token request is good
    assert pm.tpot_ms["p50"] == pytest.approx(150.0)  # tpot stats only from requests with > 1 token


def test_all_failed_gives_no_figures_not_zeros() -> None:
    pm = summarize([measure(_tl(status=500, error="HTTP 500: boom"))], duration_s=1.0)
    assert pm.completed == 0 and pm.failed == 1
    assert pm.ttft_ms == dict.fromkeys(("mean", "std", "p50", "p90", "p95", "p99"))


def test_percentiles_match_numpy_linear() -> None:
    require(importlib.util.find_spec("numpy") is not None, "numpy not installed (it comes with the cpu extra)")
    import numpy as np

    rng = random.Random(7)
    for n in (1, 2, 3, 10, 64, 101):
        values = sorted(rng.uniform(0, 500) for _ in range(n))
        for p in (0, 1, 50, 90, 95, 99, 99.9, 100):
            assert percentile(values, p) == pytest.approx(float(np.percentile(values, p)), rel=1e-12, abs=1e-12)
        d = describe(v / 1000 for v in values)
        assert d["std"] == pytest.approx(float(np.std(values)), rel=1e-9, abs=1e-9)
        assert d["mean"] == pytest.approx(float(np.mean(values)), rel=1e-12)


def test_percentile_hand_checked() -> None:
    assert percentile([10.0, 20.0], 50) == 15.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert percentile([5.0], 99) == 5.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_reasoning_counts_for_ttft_but_the_answer_starts_ttfc() -> None:
    from appliance.selftest.client import _record

    tl = _tl()
    payloads = [
        b'{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}',
        b'{"choices":[{"index":0,"delta":{"reasoning_content":"Periapical film;"}}]}',
        b'{"choices":[{"index":0,"delta":{"reasoning_content":" check 36."}}]}',
        b'{"choices":[{"index":0,"delta":{"content":"Caries on 36."},"finish_reason":"stop"}]}',
        b'{"choices":[],"usage":{"prompt_tokens":40,"completion_tokens":3,"total_tokens":43}}',
        b"[DONE]",
    ]
    for payload in payloads:
        _record(tl, payload)
    stamps = [ev.t for ev in tl.events]
    m = measure(tl)
    assert m.success
    assert m.ttft == pytest.approx(stamps[0] - T0)
    assert m.ttfc == pytest.approx(stamps[3] - T0)  # thinking is not the answer
    del tl.events[4]  # a server that sends no usage: the thinking events count as output tokens too
    assert measure(tl).output_tokens == 3
