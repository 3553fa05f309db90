"""vLLM's block math and version differences, on small hand-checked cases."""

from __future__ import annotations

import pytest

from appliance.planner.accounting import GIB, Knobs, budget_for, kv_layout, parse_version
from tests.unit.planner.test_model_config import facts


def test_kv_heads_are_replicated_when_tp_exceeds_them() -> None:
    f = facts("Qwen2.5-VL-7B-Instruct")  # 4 KV heads
    assert kv_layout(f, 2, Knobs()).page_bytes == 2 * 16 * 2 * 128 * 2
    assert kv_layout(f, 8, Knobs()).page_bytes == 2 * 16 * 1 * 128 * 2  # max(1, 4 // 8)


def test_fp8_kv_cache_halves_the_page() -> None:
    f = facts("Llama-3.1-8B-Instruct")
    assert kv_layout(f, 1, Knobs(kv_cache_dtype="fp8")).page_bytes * 2 == kv_layout(f, 1, Knobs()).page_bytes


def test_sliding_window_blocks_per_request() -> None:
    f = facts("gemma-3-27b-it")
    layout = kv_layout(f, 1, Knobs())
    # full group: cdiv(32768, 16) = 2048; each of 6 sliding groups: cdiv(min(1023 + 8192, 32768), 16) + 1 = 577.
    assert layout.blocks_per_request(32768, 8192) == 2048 + 6 * 577
    # Short requests: the window is capped by max_model_len.
    assert layout.blocks_per_request(512, 8192) == 32 + 6 * 33


def test_token_formula_changed_in_v021_for_hybrid_models() -> None:
    f = facts("gemma-3-27b-it")
    common = {
        "tp": 1,
        "total_bytes": int(79.18 * GIB),
        "utilization": 0.9,
        "weights_bytes": 0,
        "max_model_len": 32768,
        "kv_bytes_measured": 20 * GIB,
    }
    old = budget_for(f, knobs=Knobs(vllm_version=(0, 20)), **common)  # type: ignore[arg-type]
    new = budget_for(f, knobs=Knobs(vllm_version=(0, 21)), **common)  # type: ignore[arg-type]
    assert old.num_blocks == new.num_blocks == 20 * GIB // (10 * 131072)
    assert old.kv_tokens == old.num_blocks // 7 * 16
    # From v0.21 two batches are in flight (async scheduling): each sliding group reserves
    # cdiv(min(1023 + 2 × 8192, 32768), 16) + 1 = 1089 blocks (gemma4.md rows G3, G10).
    assert new.kv_tokens == int(new.num_blocks / (2048 + 6 * 1089) * 32768)
    assert new.kv_tokens > old.kv_tokens  # sliding groups hold only their window
    sync = budget_for(f, knobs=Knobs(vllm_version=(0, 21), async_scheduling=False), **common)  # type: ignore[arg-type]
    assert sync.kv_tokens == int(sync.num_blocks / (2048 + 6 * 577) * 32768)


def test_cuda_graph_estimate_and_default_utilization_by_version() -> None:
    f = facts("Llama-3.1-8B-Instruct")
    common = {
        "tp": 1,
        "total_bytes": int(79.18 * GIB),
        "utilization": 0.9,
        "weights_bytes": 15 * GIB,
        "max_model_len": 8192,
    }
    old = budget_for(f, knobs=Knobs(vllm_version=(0, 20)), **common)  # type: ignore[arg-type]
    new = budget_for(f, knobs=Knobs(vllm_version=(0, 33)), **common)  # type: ignore[arg-type]
    eager = budget_for(f, knobs=Knobs(vllm_version=(0, 33), enforce_eager=True), **common)  # type: ignore[arg-type]
    assert new.cudagraph_bytes > 0 and old.kv_bytes - new.kv_bytes == new.cudagraph_bytes
    assert eager.cudagraph_bytes == 0 and eager.kv_bytes == old.kv_bytes
    assert Knobs(vllm_version=(0, 20)).default_utilization() == 0.90
    assert Knobs(vllm_version=(0, 21)).default_utilization() == 0.92


def test_activation_grows_with_max_num_seqs_and_small_gpus_use_small_defaults() -> None:
    f = facts("Llama-3.1-8B-Instruct")
    common = {
        "tp": 1,
        "total_bytes": int(79.18 * GIB),
        "utilization": 0.9,
        "weights_bytes": 15 * GIB,
        "max_model_len": 8192,
    }
    big = budget_for(f, knobs=Knobs(), **common)  # type: ignore[arg-type]
    few = budget_for(f, knobs=Knobs(max_num_seqs=64), **common)  # type: ignore[arg-type]
    small = budget_for(f, knobs=Knobs(big_gpu=False), **common)  # type: ignore[arg-type]
    assert big.activation_bytes > 4 * GIB > few.activation_bytes
    # Two batches of 2048 tokens in flight under async scheduling (v0.21 on).
    assert small.in_flight_tokens == 2 * 2048 and small.activation_bytes < big.activation_bytes


def test_start_up_check_names_the_estimated_maximum_length() -> None:
    f = facts("Llama-3.1-8B-Instruct")
    b = budget_for(
        f,
        tp=1,
        total_bytes=int(79.18 * GIB),
        utilization=0.9,
        weights_bytes=0,
        max_model_len=131072,
        knobs=Knobs(),
        kv_bytes_measured=1 * GIB,
    )
    message = b.check_startup()
    assert message is not None and f"estimated maximum model length is {b.largest_len()}" in message
    assert b.largest_len() == 8192  # 1 GiB / 128 KiB per token


@pytest.mark.parametrize(("text", "want"), [("0.11", (0, 11)), ("v0.33.0", (0, 33)), ("1.2.3rc1", (1, 2))])
def test_parse_version(text: str, want: tuple[int, int]) -> None:
    assert parse_version(text) == want
    with pytest.raises(ValueError):
        parse_version("latest")
