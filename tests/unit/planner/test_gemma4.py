"""Gemma 4 sized as vLLM sizes it: every logged start-up of ../shared/reference/gemma4.md reproduced.

vLLM facts relied on, by file (vllm-project/vllm):
* ``vllm/model_executor/models/gemma4.py``: full layers use ``global_head_dim`` and, with ``attention_k_eq_v``,
  ``num_global_key_value_heads``; sliding layers ``head_dim`` / ``num_key_value_heads``.
* ``vllm/v1/kv_cache_interface.py``: ``page_size_bytes = 2 × block × heads × head_size × dtype`` (K copied into V is
  stored as a normal V: ``head_size_v = head_size``); ``SlidingWindowSpec.max_memory_usage_bytes`` =
  ``(cdiv(min(W − 1 + F, L), block) + 1) × page``.
* ``vllm/v1/core/kv_cache_utils.py``: ``unify_kv_cache_spec_page_size`` (smaller pages get a larger block),
  groups of the smallest layer count, ``get_max_concurrency_for_kv_cache_config`` = blocks / Σ per-group blocks.
* ``vllm/config/vllm.py``: ``max_in_flight_tokens = max_concurrent_batches × max_num_batched_tokens``, 2 batches under
  asynchronous scheduling.
* ``vllm/model_executor/models/config.py`` (Gemma4Config): mixed head sizes force the TRITON_ATTN backend (block 16).

Tolerances as the issue asks: tokens ± 2 %, concurrency ± 5 %.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import UsageError
from appliance.planner.accounting import GIB, Budget, Knobs, budget_for, kv_layout
from appliance.planner.hardware_profile import HardwareProfile, named_profile
from appliance.planner.model_config import LayerKind, ModelFacts, model_facts_from_config
from appliance.planner.plan import PlanInputs, make_plan

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "model-configs"
G31 = FIXTURES / "gemma-4-31B-it.json"
G26 = FIXTURES / "gemma-4-26B-A4B-it.json"
FULL_LEN = 262_144
A100 = HardwareProfile("a100", "cuda", 1, 79.15, device_name="NVIDIA A100-SXM4-80GB")


def config(path: Path = G31) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def facts(path: Path = G31) -> ModelFacts:
    return model_facts_from_config(config(path), path.stem)


def measured(
    f: ModelFacts, *, tp: int, kv_gib: float, version: tuple[int, int], max_len: int = FULL_LEN, **knobs: Any
) -> Budget:
    """One rank's budget with vLLM's logged 'Available KV cache memory'."""
    return budget_for(
        f,
        tp=tp,
        total_bytes=int(79.18 * GIB),
        utilization=0.9,
        weights_bytes=0,
        max_model_len=max_len,
        knobs=Knobs(vllm_version=version, **knobs),
        kv_bytes_measured=int(kv_gib * GIB),
    )


def within(value: float, logged: float, tolerance: float) -> bool:
    return abs(value - logged) <= tolerance * logged


# --- layout ---------------------------------------------------------------------------------------------------


def test_sliding_and_full_layers_keep_their_own_head_shapes() -> None:
    f = facts()
    kinds = f.to_dict()["layer_kinds"]
    assert kinds == {"sliding:1024": 50, "full(4x512)": 10}


def test_full_layers_get_a_double_block_so_every_page_is_256_kib_at_tp1() -> None:
    layout = kv_layout(facts(), 1, Knobs())
    # sliding 2 × 16 × 16 heads × 256 × 2 B = 262,144 B; full 2 × 16 × 4 × 512 × 2 = 131,072 → block 32 → 262,144.
    assert layout.page_bytes == 262_144
    assert [(g.kind, g.block_size, g.layers) for g in layout.groups].count(("sliding", 16, 10)) == 5
    assert [(g.kind, g.block_size) for g in layout.groups if g.kind == "full"] == [("full", 32)]
    assert layout.block_bytes == 2_621_440 and layout.padding_layers == 0
    # Marginal cost at long context: only the 10 full layers grow, 10 × 8,192 B per token.
    b = measured(facts(), tp=1, kv_gib=50, version=(0, 33))
    assert b.needed_bytes(FULL_LEN) - b.needed_bytes(FULL_LEN - 32) == 10 * 8192 * 32


@pytest.mark.parametrize(("tp", "page", "full_block"), [(2, 131_072, 32), (4, 65_536, 32), (8, 32_768, 16)])
def test_pages_per_rank_under_tensor_parallelism(tp: int, page: int, full_block: int) -> None:
    layout = kv_layout(facts(), tp, Knobs())
    assert layout.page_bytes == page
    # TP8: 2 sliding heads × 256 = 1 replicated global head × 512, the pages are equal and both use block 16.
    assert {g.block_size for g in layout.groups if g.kind == "full"} == {full_block}


def test_fp8_kv_halves_every_page() -> None:
    assert kv_layout(facts(), 1, Knobs(kv_cache_dtype="fp8")).page_bytes == 131_072


def test_b_req_at_full_length_matches_the_v029_trace() -> None:
    layout = kv_layout(facts(), 1, Knobs())
    # apron trace (gemma4.md [S7]): 9,157 at F=2048, 9,797 at F=4096, 13,637 at F=16384.
    assert [layout.blocks_per_request(FULL_LEN, f) for f in (2048, 4096, 16384)] == [9157, 9797, 13637]
    # H100/H200 default: 8192 batched tokens × 2 batches in flight.
    b = measured(facts(), tp=1, kv_gib=50, version=(0, 29))
    assert b.in_flight_tokens == 16384 and b.blocks_per_request() == 13637


def test_per_layer_config_form_sizes_the_same_as_global_head_dim() -> None:
    doc = copy.deepcopy(config())
    text = doc["text_config"]
    full = [i for i, t in enumerate(text["layer_types"]) if t == "full_attention"]
    for key in ("global_head_dim", "num_global_key_value_heads", "attention_k_eq_v"):
        text.pop(key)
    text["per_layer_config"] = {str(i): {"head_dim": 512, "num_key_value_heads": 4} for i in full}
    new = model_facts_from_config(doc, "per-layer")
    assert new.layers == facts().layers
    assert kv_layout(new, 1, Knobs()) == kv_layout(facts(), 1, Knobs())


def test_without_k_eq_v_full_layers_keep_the_sliding_kv_head_count() -> None:
    doc = copy.deepcopy(config())
    doc["text_config"]["attention_k_eq_v"] = False
    layers = model_facts_from_config(doc, "no-k-eq-v").layers
    assert {(layer.kv_heads, layer.head_dim) for layer in layers if layer.kind == "full"} == {(None, 512)}


def test_kv_shared_layers_get_no_cache_of_their_own() -> None:
    doc = copy.deepcopy(config())
    doc["text_config"]["num_kv_shared_layers"] = 20
    f = model_facts_from_config(doc, "shared")
    assert len(f.layers) == 40 and f.num_layers == 60


def test_block_size_follows_the_backend_and_block_size_flag() -> None:
    assert kv_layout(facts(), 1, Knobs()).block_size == 16  # TRITON_ATTN, forced for mixed head sizes
    doubled = kv_layout(facts(), 1, Knobs(block_size=32))
    assert {g.block_size for g in doubled.groups} == {32, 64} and doubled.page_bytes == 2 * 262_144
    with pytest.raises(UsageError, match="FLASH_ATTN_FA4"):
        kv_layout(facts(), 1, Knobs(attention_backend="FLASH_ATTN_FA4"))


# --- images ---------------------------------------------------------------------------------------------------


def test_an_image_costs_280_soft_tokens_and_needs_2496_batched_tokens() -> None:
    vision = facts().vision
    assert vision is not None
    assert vision.tokens_per_image == 280 and vision.batch_floor == 2496
    assert vision.patches_per_image == 280 * 3 * 3  # pooled 3 × 3 patches per soft token


def test_a_4096_token_context_with_an_image_plans() -> None:
    plan = make_plan(
        PlanInputs(model=G31, hardware=named_profile("h100", 1), knobs=Knobs(), max_model_len=4096, weights_gib=58.46)
    )
    assert plan.verdict == "fits" and plan.images_per_request == 1


def test_a_small_gpu_gets_the_image_floor_and_a_too_small_flag_is_vllms_error() -> None:
    inputs = PlanInputs(model=G31, hardware=A100, knobs=Knobs(), max_model_len=8192, weights_gib=19.6)
    plan = make_plan(inputs)
    assert plan.knobs.max_num_batched_tokens == 2496 and plan.verdict == "fits"
    assert "largest image (2496)" in plan.flag_reasons["max-num-batched-tokens"]
    small = make_plan(dataclasses.replace(inputs, knobs=Knobs(max_num_batched_tokens=2048)))
    assert small.verdict == "does-not-fit"
    assert any("max_tokens_per_mm_item (2496) is larger than max_num_batched_tokens (2048)" in r for r in small.reasons)
    text_only = make_plan(dataclasses.replace(inputs, knobs=Knobs(max_num_batched_tokens=2048), images_per_request=0))
    assert text_only.verdict == "fits"


# --- logged start-ups (gemma4.md "Logged vLLM start-ups") --------------------------------------------------------


def test_g1_v020_log_formula_31b_bf16_tp1() -> None:
    # hf-mem PR #61: 24.54 GiB → 26,800 tokens = num_blocks // 6 groups × 16 (pre-v0.21 log; F does not enter).
    b = measured(facts(), tp=1, kv_gib=24.54, version=(0, 20))
    assert b.num_blocks == 10_051 and within(b.kv_tokens, 26_800, 0.02)


@pytest.mark.parametrize(("version", "logged"), [((0, 20), 55_000), ((0, 21), 525_000)])
def test_g3_awq_on_an_a100_before_and_after_the_log_change(version: tuple[int, int], logged: int) -> None:
    # vllm #43308: "~50 GB" KV (read as 50 GiB: 50 GB would give 50,864 tokens, −7.5 %), util 0.9, defaults.
    # The A100 default of 2048 batched tokens is raised to the image floor 2496; v0.21 keeps 2 batches in flight.
    plan = make_plan(
        PlanInputs(
            model=G31,
            hardware=A100,
            knobs=Knobs(vllm_version=version, gpu_memory_utilization=0.9),
            weights_gib=19.6,
            kv_cache_gib=50,
        )
    )
    b = plan.budget
    assert b.in_flight_tokens == (4992 if version >= (0, 21) else 2496)
    assert within(b.kv_tokens, logged, 0.02)


def _with_eagle3_drafter(f: ModelFacts) -> ModelFacts:
    # An EAGLE3 drafter adds one full-attention layer; its page (16 KV heads × 256, the target's sliding shape) equals
    # the unified page, so it keeps block 16 and forms a third spec of one layer: vLLM's groups shrink to one layer
    # each (61 groups). Without it the logged tokens/concurrency ratio is missed by 9 %.
    return dataclasses.replace(f, layers=[*f.layers, LayerKind("full", None, 16, 256)])


def test_g4_awq_eagle3_tp2_fp8_tokens_per_concurrency() -> None:
    # 0.20.0, fp8 KV, mnbt 16384, max-len 262,144: 244K tokens (pre-v0.21 log) and 6.11x. The KV memory was not
    # logged; the ratio tokens / concurrency = block × B_req / groups does not depend on it.
    f = _with_eagle3_drafter(facts())
    layout = kv_layout(f, 2, Knobs(kv_cache_dtype="fp8"))
    assert layout.page_bytes == 65_536 and len(layout.groups) == 61
    b = measured(f, tp=2, kv_gib=60, version=(0, 20), kv_cache_dtype="fp8", max_num_batched_tokens=16384)
    ratio = b.kv_tokens / b.max_concurrency()
    assert within(ratio, 244_000 / 6.11, 0.02)
    # KV per rank the log implies (6.11 × B_req blocks of 64 KiB): 57 GiB of the 0.94 × 79.18 = 74.4 GiB requested.
    implied = 6.11 * b.blocks_per_request() * layout.block_bytes / GIB
    assert 55 < implied < 59


def test_g7_nvfp4_post_v021_log_formula() -> None:
    # robotmunki.com log: mnbt 4096, 1,563,739 tokens, 5.97x at 262,144; KV 71.34 GiB derived (fp8 KV at TP1). It
    # reproduces with one batch in flight (the version and the async setting were not logged).
    b = measured(
        facts(), tp=1, kv_gib=71.34, version=(0, 21), kv_cache_dtype="fp8", max_num_batched_tokens=4096,
        async_scheduling=False,
    )  # fmt: skip
    assert within(b.kv_tokens, 1_563_739, 0.02) and within(b.max_concurrency(), 5.97, 0.05)


@pytest.mark.parametrize(
    ("max_len", "tokens", "concurrency"), [(32_768, 78_433, 2.39), (65_536, 116_025, 1.77), (131_072, 152_592, 1.16)]
)
def test_g10_26b_a4b_v029_pinned_kv(max_len: int, tokens: int, concurrency: float) -> None:
    # epsilonagentx/intel_arc_gpu_llm: v0.29.0, --kv-cache-memory-bytes 4.25 GiB, mnbt 2496 → F = 2 × 2496.
    f = facts(G26)
    assert f.to_dict()["layer_kinds"] == {"sliding:1024": 25, "full(2x512)": 5}
    b = measured(f, tp=1, kv_gib=4.25, version=(0, 29), max_len=max_len, max_num_batched_tokens=2496)
    assert b.in_flight_tokens == 4992
    assert within(b.kv_tokens, tokens, 0.02) and within(b.max_concurrency(), concurrency, 0.05)


def test_the_default_full_context_does_not_start_on_one_h100_at_bf16() -> None:
    # gemma4.md: weights ~58.5 GiB and one 262,144-token request needs 33.3 GiB of KV at TP1 (F = 16,384).
    plan = make_plan(PlanInputs(model=G31, hardware=named_profile("h100", 1), knobs=Knobs(), weights_gib=58.46))
    assert plan.budget.needed_bytes(FULL_LEN) / GIB == pytest.approx(33.3, abs=0.05)
    assert plan.max_model_len < FULL_LEN or plan.verdict == "does-not-fit"
