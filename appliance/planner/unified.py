"""Unified memory (DGX Spark, GB10): ask vLLM's start-up check only for what the engine will take, and keep the
profiling run small.

Two facts of vLLM drive this module:

* Before it loads the weights every worker compares free memory with ``total × gpu_memory_utilization`` and refuses
  to start when less is free — unconditionally, even when ``--kv-cache-memory-bytes`` pins the KV cache
  (``vllm/v1/worker/utils.py`` ``request_memory``, called from ``Worker.init_device`` in
  ``vllm/v1/worker/gpu_worker.py``; with the KV cache pinned, ``determine_available_memory`` returns the pinned size
  and never uses the utilization again). On unified memory "free" is shared with the OS and the page cache of the
  model files, so a high utilization fails a correct plan. Since the planner pins the KV cache, the utilization only
  has to cover what the engine takes: weights + KV cache + activation + non-torch + CUDA graphs + a margin.
* On GB10 the profiling run is not bounded by the utilization, and running out of memory freezes the whole box
  (vllm-project/vllm #46307). Its size follows ``max_num_batched_tokens`` (the dummy forward) and ``max_num_seqs``
  (the dummy sampler's fp32 logits), whose big-GPU defaults (8192 / 1024) serve hundreds of users, not a clinic.
"""

from __future__ import annotations

import dataclasses
import math

from appliance.planner.accounting import (
    BIG_GPU_SEQS,
    GIB,
    SMALL_GPU_BATCHED_TOKENS,
    Budget,
    Knobs,
)
from appliance.planner.model_config import ModelFacts

__all__ = [
    "START_MARGIN_GIB",
    "UNIFIED_BATCHED_TOKENS",
    "UNIFIED_MIN_SEQS",
    "clinic_limits",
    "engine_take_bytes",
    "kv_for_sessions",
    "sized_budget",
    "start_utilization",
]

# A few sequences beyond the clinic's sessions: the self-test, health probes and short requests still get a slot.
UNIFIED_MIN_SEQS = 8
# vLLM's own default for GPUs under 70 GiB (vllm/engine/arg_utils.py): a proven size, 4× smaller than the big-GPU one.
UNIFIED_BATCHED_TOKENS = SMALL_GPU_BATCHED_TOKENS
# Kept on top of the estimated take: the activation and CUDA-graph lines are estimates (± 1 GiB, docs/planner.md).
START_MARGIN_GIB = 1.0
MIB = 1024**2


def clinic_limits(knobs: Knobs, facts: ModelFacts, sessions: int) -> Knobs:
    """``knobs`` with --max-num-seqs and --max-num-batched-tokens sized for ``sessions`` (those the user gave stay).

    Sequences: max(sessions, UNIFIED_MIN_SEQS). Batched tokens: UNIFIED_BATCHED_TOKENS, but never below the sequences
    (vLLM refuses max_num_batched_tokens < max_num_seqs) nor below one image's tokens (an image is scheduled whole);
    when that would exceed vLLM's default for the box, the default stays.
    """
    seqs = knobs.max_num_seqs or min(BIG_GPU_SEQS, max(sessions, UNIFIED_MIN_SEQS))
    tokens = knobs.max_num_batched_tokens
    if tokens is None:
        # An image is scheduled whole: its tokens, or the model's larger floor (Gemma 4: 2496, model_config.py).
        image_tokens = max(facts.vision.tokens_per_image, facts.vision.batch_floor or 0) if facts.vision else 0
        wanted = max(UNIFIED_BATCHED_TOKENS, seqs, image_tokens)
        tokens = wanted if wanted < knobs.batched_tokens() else None
    return dataclasses.replace(knobs, max_num_seqs=seqs, max_num_batched_tokens=tokens)


def kv_for_sessions(b: Budget, sessions: int) -> int:
    """KV bytes to pin: what ``sessions`` requests of the budget's max_model_len need, in whole MiB, at most the
    KV cache the ceiling leaves (vLLM cuts the pinned bytes into blocks exactly like a profiled KV cache)."""
    needed = sessions * b.blocks_per_request() * b.layout.block_bytes
    return min(math.ceil(needed / MIB) * MIB, b.kv_bytes)


def engine_take_bytes(b: Budget, kv_bytes: int) -> int:
    """What the engine holds once started: weights, KV cache, activation peak, non-torch and CUDA graphs (captured
    in any vLLM version unless --enforce-eager, when the estimate is 0)."""
    return b.weights_bytes + kv_bytes + b.activation_bytes + b.non_torch_bytes + b.cudagraph_bytes


def start_utilization(b: Budget, kv_bytes: int, ceiling: float) -> float:
    """ceil((engine take + START_MARGIN_GIB) / total, 2 decimals), never above ``ceiling``."""
    take = engine_take_bytes(b, kv_bytes) + START_MARGIN_GIB * GIB
    return min(ceiling, math.ceil(take / b.total_bytes * 100) / 100)


def sized_budget(b: Budget, kv_bytes: int, utilization: float) -> Budget:
    """The budget vLLM will run with: ``utilization`` requested, ``kv_bytes`` pinned."""
    return dataclasses.replace(
        b, utilization=utilization, requested_bytes=math.ceil(b.total_bytes * utilization), kv_bytes=kv_bytes
    )
