"""The streaming client against a real loopback server that misbehaves on request: timelines and probes."""

from __future__ import annotations

import asyncio

import pytest

from appliance.errors import UnreachableError, UsageError
from appliance.selftest.client import Target, make_session, probe_target, stream_chat
from appliance.selftest.metrics import RequestMeasure, RequestTimeline, measure
from appliance.wire import chat_request
from tests.conftest import free_port
from tests.unit.selftest.conftest import RunningUpstream


def _one(url: str, mode: str, content: str = "hello") -> tuple[RequestTimeline, RequestMeasure]:
    async def go() -> tuple[RequestTimeline, RequestMeasure]:
        target = Target(url)
        async with make_session(target, 1) as session:
            tl = await stream_chat(
                session, target, chat_request(mode, [{"role": "user", "content": content}], max_tokens=4)
            )
        return tl, measure(tl)

    return asyncio.run(go())


def test_ok_stream_has_role_first_and_true_delay(upstream: RunningUpstream) -> None:
    tl, m = _one(upstream.url, "ok", "t-ok")
    kinds = [e.kind for e in tl.events]
    assert kinds == ["role", "content", "content", "content", "content", "usage", "done"]
    assert m.success and m.output_tokens == 4
    recv, sent = upstream.upstream.truth["t-ok"]
    assert m.ttft is not None and m.ttfc is not None
    assert m.ttft >= sent - recv >= 0.015
    assert m.ttfc > m.ttft
    assert len(m.itl) == 4


@pytest.mark.parametrize(
    ("mode", "expect"),
    [
        ("error-mid", "synthetic failure"),
        ("empty", "no event with choices"),
        ("503", "HTTP 503: not ready"),
    ],
)
def test_failures_are_recorded_with_their_reason(upstream: RunningUpstream, mode: str, expect: str) -> None:
    _, m = _one(upstream.url, mode)
    assert not m.success
    assert expect in (m.error or "")


def test_connection_cut_mid_stream_is_a_failure(upstream: RunningUpstream) -> None:
    _, m = _one(upstream.url, "cut")
    assert not m.success
    assert m.error


def test_unreachable_target_is_reported_without_traceback() -> None:
    port = free_port()
    _, m = _one(f"http://127.0.0.1:{port}", "ok")
    assert not m.success and "Connect" in (m.error or "")
    with pytest.raises(UnreachableError) as err:
        asyncio.run(probe_target(Target(f"http://127.0.0.1:{port}")))
    assert "unreachable" in err.value.message and "systemctl status" in err.value.remedy


def test_probe_sees_not_ready_gateway(loading_upstream: RunningUpstream) -> None:
    with pytest.raises(UnreachableError) as err:
        asyncio.run(probe_target(Target(loading_upstream.url)))
    assert "not ready: vLLM is loading the model" in err.value.message


def test_probe_lists_models(upstream: RunningUpstream) -> None:
    info = asyncio.run(probe_target(Target(upstream.url + "/v1/")))
    assert info.kind == "vllm" and info.models == ["upstream"]
    assert info.card("upstream")["max_model_len"] == 4096


def test_target_validation() -> None:
    with pytest.raises(UsageError):
        Target("ftp://box")
    t = Target("https://box:8443/v1", api_key="k")
    assert t.chat_url == "https://box:8443/v1/chat/completions"
    assert t.headers()["Authorization"] == "Bearer k"


def test_load_point_opens_its_connections_once_and_reuses_them(upstream: RunningUpstream) -> None:
    from appliance.selftest.runner import Progress, Workload, plan_single, run_points
    from appliance.selftest.workloads import PromptMaker

    before = upstream.upstream.connections
    work = Workload(model="ok", prompts=PromptMaker())
    (point,) = asyncio.run(run_points(Target(upstream.url), plan_single(4, 12, 8, 2), work, Progress(1, enabled=False)))
    assert point["completed"] == 12 and point["failed"] == 0
    assert upstream.upstream.connections - before == 4  # opened before the clock, then kept alive


def test_load_points_run_with_the_setup_heap_frozen(upstream: RunningUpstream) -> None:
    # A full collection over the tokenizer's heap pauses the client ~160 ms here: every stream in flight would carry
    # it into its TTFT. What exists before the run is frozen (not scanned again).
    import gc

    from appliance.selftest.runner import Progress, Workload, plan_single, run_points
    from appliance.selftest.workloads import PromptMaker

    gc.unfreeze()
    setup = [object() for _ in range(1000)]
    work = Workload(model="ok", prompts=PromptMaker())
    asyncio.run(run_points(Target(upstream.url), plan_single(1, 1, 8, 2), work, Progress(1, enabled=False)))
    try:
        assert gc.get_freeze_count() >= len(setup)
    finally:
        gc.unfreeze()
