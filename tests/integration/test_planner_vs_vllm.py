"""The planner's predictions for the demo model against what a real vLLM (CPU build) logs at start-up.

Two servers: the suite's shared one (started with the CPU profile's constants, which the planner reuses), and one
started from the very env file ``clinic-edge plan --write-env`` writes, with a KV cache and context that differ from
the defaults, so the comparison cannot pass by both sides reading the same constants.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.demo_model import DEMO_MODEL_NAME
from appliance.vllm_server import VllmLaunch, VllmServer
from tests.conftest import RunningVllm, free_port

pytestmark = pytest.mark.vllm

KV_LINE = re.compile(
    r"CPU KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x"
)
CHECKPOINT_LINE = re.compile(r"Checkpoint size: ([\d.]+) GiB")
KV_SET_LINE = re.compile(r"Explicitly set \(([\d.]+)/[\d.]+\) GiB for KV cache")


def _logged(log: str) -> dict[str, float]:
    kv = KV_LINE.search(log)
    assert kv, "vLLM's log has no 'CPU KV cache size' line"
    out = {
        "tokens": int(kv.group(1).replace(",", "")),
        "max_model_len": int(kv.group(2).replace(",", "")),
        "concurrency": float(kv.group(3)),
    }
    if m := CHECKPOINT_LINE.search(log):
        out["weights_gib"] = float(m.group(1))
    if m := KV_SET_LINE.search(log):
        out["kv_gib"] = float(m.group(1))
    return out


def _plan(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    code = main(["plan", *argv, "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    doc: dict[str, object] = json.loads(out)
    return doc


def test_planner_matches_the_shared_servers_log(vllm_server: RunningVllm, capsys: pytest.CaptureFixture[str]) -> None:
    logged = _logged(vllm_server.log_path.read_text(errors="replace"))
    doc = _plan(capsys, str(vllm_server.model_dir), "--hardware", "cpu")
    assert doc["kv_cache_tokens"] == logged["tokens"]
    assert doc["max_model_len"] == logged["max_model_len"]
    assert abs(float(doc["max_concurrency"]) - logged["concurrency"]) < 0.01  # type: ignore[arg-type]
    if "weights_gib" in logged:
        assert abs(float(doc["weights_gib"]) - logged["weights_gib"]) <= 0.01  # type: ignore[arg-type]
    if "kv_gib" in logged:
        assert float(doc["kv_cache_gib"]) == logged["kv_gib"]  # type: ignore[arg-type]


def _env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def test_vllm_starts_from_the_written_env_file_and_logs_the_predicted_kv(
    demo_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = _plan(
        capsys,
        str(demo_model_dir),
        "--hardware",
        "cpu",
        "--kv-cache-gib",
        "2",
        "--max-model-len",
        "2048",
        "--concurrency",
        "3",
        "--served-model-name",
        DEMO_MODEL_NAME,
        "--write-env",
        str(tmp_path / "env"),
    )
    env = _env_file(tmp_path / "env" / "vllm-0.env")
    words = env.pop("CLINIC_EDGE_VLLM_ARGS").split()  # as ExecStart's $CLINIC_EDGE_VLLM_ARGS splits them
    # The unit's fixed part (--model, --served-model-name, --host, --port) is VllmLaunch's; the rest is passed as is,
    # on a free port instead of 8000.
    assert words[:8] == [
        "--model",
        str(demo_model_dir.resolve()),
        "--served-model-name",
        DEMO_MODEL_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        "8000",
    ]
    launch = VllmLaunch(
        model=demo_model_dir, served_model_name=DEMO_MODEL_NAME, port=free_port(), args=words[9:], env=env
    )
    server = VllmServer(launch, tmp_path / "vllm.log")
    server.start()
    try:
        server.wait_ready(timeout=600)
        logged = _logged(server.log_tail(200_000))
    finally:
        server.stop()
    assert logged["tokens"] == doc["kv_cache_tokens"] and logged["max_model_len"] == 2048
    assert abs(float(doc["max_concurrency"]) - logged["concurrency"]) < 0.01  # type: ignore[arg-type]
    assert logged.get("kv_gib", 2.0) == 2.0
