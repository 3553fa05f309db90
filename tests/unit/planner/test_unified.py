"""DGX Spark (unified memory): vLLM is asked only for what the engine takes, its profiling run is sized for the
clinic, and every flag says why it has its value."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from appliance.cli import main
from appliance.planner.accounting import GIB
from appliance.planner.unified import START_MARGIN_GIB, UNIFIED_BATCHED_TOKENS, UNIFIED_MIN_SEQS
from appliance.telemetry.config import ConfigSource
from tests.unit.planner.ground_truth import FIXTURES

MIB = 1024**2
# Today's planner (before this change) wrote min(0.85, (109.5 − 8) / 119.5) = 0.84 for every Spark plan.
OLD_SPARK_UTILIZATION = 0.84
MEMORY_FLAGS = {
    "max-model-len",
    "gpu-memory-utilization",
    "kv-cache-memory-bytes",
    "max-num-seqs",
    "max-num-batched-tokens",
}


def plan(capsys: pytest.CaptureFixture[str], config: str, *argv: str) -> tuple[int, dict[str, Any]]:
    code = main(["plan", str(FIXTURES / f"{config}.json"), *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def arg(doc: dict[str, Any], flag: str) -> str | None:
    args = doc["vllm_args"]
    return args[args.index(flag) + 1] if flag in args else None


def engine_take_gib(doc: dict[str, Any]) -> float:
    return (
        doc["weights_gib"] + doc["kv_cache_gib"] + doc["activation_gib"] + doc["non_torch_gib"] + doc["cudagraph_gib"]
    )


@pytest.mark.parametrize(
    ("config", "weights", "length", "sessions", "at_most"),
    # gemma-3: 0.61 since the sliding groups reserve two in-flight batches (v0.21 on, accounting.py).
    [("gemma-3-27b-it", "51.4", "32768", "4", 0.61), ("Llama-3.1-70B-Instruct", "67.72", "32768", "2", 0.76)],
)
def test_spark_utilization_is_what_the_engine_takes_not_the_ceiling(
    capsys: pytest.CaptureFixture[str], config: str, weights: str, length: str, sessions: str, at_most: float
) -> None:
    code, doc = plan(
        capsys,
        config,
        "--hardware",
        "dgx-spark",
        "--weights-gib",
        weights,
        "--max-model-len",
        length,
        "--concurrency",
        sessions,
    )
    util = doc["gpu_memory_utilization"]
    assert code == 0 and doc["verdict"] == "fits"
    assert util <= at_most < OLD_SPARK_UTILIZATION and doc["utilization_ceiling"] == OLD_SPARK_UTILIZATION
    assert arg(doc, "--gpu-memory-utilization") == f"{util:g}"
    # It covers everything the engine takes plus the margin, rounded up to 0.01 of the total and no more.
    take = engine_take_gib(doc) + START_MARGIN_GIB
    assert util * doc["total_gib"] >= take - 0.03 and (util - 0.01) * doc["total_gib"] < take + 0.03
    assert doc["requested_bytes"] == math.ceil(int(doc["total_gib"] * GIB) * util)
    # The KV cache pinned is what the sessions need (whole MiB), and vLLM's concurrency covers them.
    pinned = int(arg(doc, "--kv-cache-memory-bytes") or 0)
    assert pinned == doc["kv_cache_memory_bytes"] == doc["kv_cache_bytes"] and pinned % MIB == 0
    assert int(sessions) <= doc["max_concurrency"] < int(sessions) + 0.1
    assert doc["ceiling_concurrency"] > doc["max_concurrency"]


def test_spark_caps_sequences_and_batched_tokens_to_the_clinic(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--hardware", "dgx-spark", "--weights-gib", "51.4", "--max-model-len", "32768"]
    code, doc = plan(capsys, "gemma-3-27b-it", *base, "--concurrency", "4")
    assert code == 0 and arg(doc, "--max-num-seqs") == str(UNIFIED_MIN_SEQS)
    assert arg(doc, "--max-num-batched-tokens") == str(UNIFIED_BATCHED_TOKENS)
    assert doc["max_num_seqs"] == UNIFIED_MIN_SEQS and doc["max_num_batched_tokens"] == UNIFIED_BATCHED_TOKENS
    # The activation budget follows the smaller profiling run (vLLM's defaults: 8192 tokens, 1024 sequences).
    _, defaults = plan(capsys, "gemma-3-27b-it", *base, "--max-num-batched-tokens", "8192", "--max-num-seqs", "1024")
    assert doc["activation_gib"] < defaults["activation_gib"] / 4
    assert arg(defaults, "--max-num-seqs") == "1024"  # what the user gives stays
    # More sessions than the floor: one sequence each.
    _, many = plan(capsys, "Qwen3-8B", "--hardware", "dgx-spark", "--weights-gib", "15.3", "--concurrency", "12")
    assert arg(many, "--max-num-seqs") == "12" and arg(many, "--max-num-batched-tokens") == "2048"


def test_spark_keeps_whole_images_in_one_step(capsys: pytest.CaptureFixture[str]) -> None:
    # Gemma 3: 256 tokens per image, far below the cap. Qwen2.5-VL: up to 16384 per image, above vLLM's 8192
    # default, so the planner leaves vLLM's default as it was instead of lowering it.
    _, gemma = plan(capsys, "gemma-3-27b-it", "--hardware", "dgx-spark", "--weights-gib", "51.4")
    assert int(arg(gemma, "--max-num-batched-tokens") or 0) >= 256
    code, qwen = plan(
        capsys,
        "Qwen2.5-VL-7B-Instruct",
        "--hardware",
        "dgx-spark",
        "--weights-gib",
        "15.45",
        "--max-model-len",
        "65536",
    )
    assert code == 0 and arg(qwen, "--max-num-batched-tokens") is None and qwen["max_num_batched_tokens"] == 8192
    assert arg(qwen, "--max-num-seqs") == str(UNIFIED_MIN_SEQS)


def test_given_utilization_on_spark_is_kept_with_the_whole_kv_cache_pinned(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, doc = plan(
        capsys, "Qwen3-8B", "--hardware", "dgx-spark", "--weights-gib", "15.3", "--gpu-memory-utilization", "0.6"
    )
    assert code == 0 and doc["gpu_memory_utilization"] == 0.6 and doc["utilization_ceiling"] is None
    left = doc["requested_gib"] - engine_take_gib(doc)
    assert abs(left) < 0.02  # the KV cache is all that 0.6 × total leaves
    assert doc["flag_reasons"]["gpu-memory-utilization"].startswith("0.6: given with --gpu-memory-utilization")


def test_every_flag_the_planner_sets_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--hardware", "dgx-spark", "--weights-gib", "51.4", "--max-model-len", "32768", "--concurrency", "4"]
    _, doc = plan(capsys, "gemma-3-27b-it", *argv)
    reasons = doc["flag_reasons"]
    assert set(reasons) == MEMORY_FLAGS
    for flag, why in reasons.items():
        assert why.startswith(str(arg(doc, f"--{flag}"))), (flag, why)  # the value first, then why
    util = reasons["gpu-memory-utilization"]
    assert f"weights {doc['weights_gib']:.2f} + KV {doc['kv_cache_gib']:.2f}" in util and "margin 1.00" in util
    assert "ceiling 0.84" in util and "free before loading" in util
    assert "4 session(s)" in reasons["kv-cache-memory-bytes"] and "#46307" in reasons["max-num-seqs"]
    assert "peak activation" in reasons["max-num-batched-tokens"]
    main(["plan", str(FIXTURES / "gemma-3-27b-it.json"), *argv])
    text = capsys.readouterr().out
    assert "why these flags:" in text and "--gpu-memory-utilization 0." in text.split("why these flags:")[1]
    assert "left in the request (margin)" in text
    # A discrete GPU: vLLM's defaults, said so.
    _, h100 = plan(capsys, "Llama-3.1-8B-Instruct", "--hardware", "h100", "--weights-gib", "14.99")
    assert set(h100["flag_reasons"]) == {"max-model-len", "gpu-memory-utilization"}
    assert h100["flag_reasons"]["gpu-memory-utilization"].startswith("0.92: vLLM's default")
    assert "max_position_embeddings" in h100["flag_reasons"]["max-model-len"]


def test_fits_reduced_on_spark_says_the_length_was_cut(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = plan(
        capsys, "Llama-3.1-70B-Instruct", "--hardware", "dgx-spark", "--weights-gib", "67.72", "--concurrency", "4"
    )
    assert code == 0 and doc["verdict"] == "fits-reduced" and doc["max_model_len"] < 131072
    assert doc["gpu_memory_utilization"] <= OLD_SPARK_UTILIZATION and doc["max_concurrency"] >= 4
    assert "the largest at which 4 session(s)" in doc["flag_reasons"]["max-model-len"]
    assert "asked 131072" in doc["flag_reasons"]["max-model-len"]


def test_plan_json_readers_still_read_a_spark_plan(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = FIXTURES / "gemma-3-27b-it.json"
    argv = ["plan", str(config), "--hardware", "dgx-spark", "--weights-gib", "51.4", "--max-model-len", "32768"]
    assert main([*argv, "--write-env", str(tmp_path / "vllm")]) == 0
    capsys.readouterr()
    part = ConfigSource(tmp_path, "spark").read()
    assert part.plan_verdict == "fits" and part.replicas == 1 and part.max_model_len == 32768
    assert part.max_concurrency and part.max_concurrency >= 1 and part.kv_cache_gib
