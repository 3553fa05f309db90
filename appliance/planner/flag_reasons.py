"""Why each vLLM flag the planner sets has its value: one short sentence per flag, figures included.

They go into ``plan.json`` (``flag_reasons``, keyed by the flag without its dashes) and under "why these flags" in
``clinic-edge plan``'s table, so whoever reads a unit's arguments can trace every number to its source.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from appliance.planner.accounting import GIB, activation_bytes
from appliance.planner.unified import UNIFIED_MIN_SEQS, engine_take_bytes

if TYPE_CHECKING:
    from appliance.planner.plan import Plan, PlanInputs

__all__ = ["explain_flags"]

MIB = 1024**2
FREEZE = (
    "on unified memory the profiling run is not bounded by the utilization and running out of memory freezes the "
    "box (vllm #46307)"
)


def _g(n: float) -> str:
    return f"{n / GIB:.2f}"


def _max_model_len(plan: Plan, inputs: PlanInputs) -> str:
    n = plan.max_model_len
    if plan.verdict == "fits-reduced":
        return (
            f"{n}: the largest at which {plan.sessions_per_replica} session(s) per replica fit in the KV cache "
            f"(asked {inputs.max_model_len or plan.facts.max_position_embeddings})"
        )
    if inputs.max_model_len is not None:
        return f"{n}: as asked (--max-model-len)"
    if plan.hardware.kind == "cpu":
        return f"{n}: the CPU profile's default context"
    return f"{n}: the model's max_position_embeddings (no --max-model-len given)"


def _utilization(plan: Plan, inputs: PlanInputs) -> str:
    b, hw = plan.budget, plan.hardware
    u = f"{b.utilization:g}"
    asks = f"vLLM checks that {_g(b.requested_bytes)} of {_g(b.total_bytes)} GiB are free before loading the weights"
    if inputs.knobs.gpu_memory_utilization is not None:
        return f"{u}: given with --gpu-memory-utilization; {asks}"
    if not hw.unified:
        since = "from v0.21" if plan.knobs.vllm_version >= (0, 21) else "before v0.21"
        return f"{u}: vLLM's default ({since}); {asks} and sizes the KV cache from what is left"
    available = hw.available_gib if hw.available_gib is not None else hw.total_gib
    ceiling = plan.utilization_ceiling if plan.utilization_ceiling is not None else b.utilization
    ceiling_text = (
        f"ceiling {ceiling:g} = min(0.85, ({available:.2f} available − {plan.reserve_gib:g} reserve) / "
        f"{hw.total_gib:.2f} GiB)"
    )
    if plan.utilization_ceiling is None:
        return f"{u}: the {ceiling_text}; {asks}"
    margin = (plan.start_margin_gib or 0.0) * GIB
    take = engine_take_bytes(b, b.kv_bytes) + margin
    capped = "; capped at the ceiling" if b.utilization >= ceiling else ""
    return (
        f"{u}: weights {_g(b.weights_bytes)} + KV {_g(b.kv_bytes)} + activation {_g(b.activation_bytes)} + "
        f"non-torch {_g(b.non_torch_bytes)} + graphs {_g(b.cudagraph_bytes)} + margin {_g(margin)} GiB = "
        f"{_g(take)} of {_g(b.total_bytes)} GiB, rounded up; vLLM checks this much is free before loading, and with "
        f"the KV cache pinned it takes no more{capped} ({ceiling_text})"
    )


def _kv(plan: Plan, pinned: int) -> str:
    b = plan.budget
    head = f"{pinned} ({_g(pinned)} GiB)"
    why = "pinned so the KV cache does not shrink with page cache at the next start"
    if plan.utilization_ceiling is None:
        return f"{head}: all the KV cache {b.utilization:g} × total leaves; {why}"
    sessions = plan.sessions_per_replica
    return (
        f"{head}: {sessions} session(s) × {b.blocks_per_request():,} blocks × "
        f"{b.layout.block_bytes / MIB:.2f} MiB for {plan.max_model_len:,} tokens each; {why} (the "
        f"{plan.utilization_ceiling:g} ceiling would hold {plan.ceiling_concurrency or 0:.2f}: raise --concurrency "
        "to use it)"
    )


def _seqs(plan: Plan, inputs: PlanInputs, n: int) -> str:
    if inputs.knobs.max_num_seqs is not None:
        return f"{n}: given with --max-num-seqs"
    default = dataclasses.replace(plan.knobs, max_num_seqs=None).num_seqs()
    return (
        f"{n}: max(--concurrency {plan.concurrency}, {UNIFIED_MIN_SEQS}) instead of vLLM's default {default}: the "
        f"profiling run's sampler keeps fp32 logits for that many rows; {FREEZE}"
    )


def _batched(plan: Plan, inputs: PlanInputs, n: int) -> str:
    if inputs.knobs.max_num_batched_tokens is not None:
        return f"{n}: given with --max-num-batched-tokens"
    k = plan.knobs
    default_knobs = dataclasses.replace(k, max_num_batched_tokens=None, max_num_seqs=inputs.knobs.max_num_seqs)
    before = activation_bytes(plan.facts, plan.tp, default_knobs)
    vision = plan.facts.vision
    floor = vision.batch_floor if vision is not None and plan.images_per_request else None
    if floor and n == floor and not plan.hardware.unified:
        return (
            f"{n} instead of vLLM's default {default_knobs.batched_tokens()}: vLLM schedules each image whole and "
            f"refuses to start with fewer batched tokens than {plan.facts.name}'s largest image ({floor})"
        )
    image = ""
    if vision is not None:
        image = f" and one image's {max(vision.tokens_per_image, floor or 0)} tokens"
    return (
        f"{n} instead of vLLM's default {default_knobs.batched_tokens()}: peak activation of the profiling run "
        f"{_g(before)} → {_g(plan.budget.activation_bytes)} GiB; at least --max-num-seqs {k.num_seqs()}{image}, "
        f"as vLLM requires; {FREEZE}"
    )


def explain_flags(plan: Plan, inputs: PlanInputs) -> dict[str, str]:
    """``{flag without dashes: "value: why"}`` for every memory flag the planner writes into vLLM's arguments."""
    out = {"max-model-len": _max_model_len(plan, inputs)}
    if plan.hardware.kind == "cpu":
        return out
    out["gpu-memory-utilization"] = _utilization(plan, inputs)
    if plan.kv_cache_memory_bytes:
        out["kv-cache-memory-bytes"] = _kv(plan, plan.kv_cache_memory_bytes)
    if plan.knobs.max_num_seqs:
        out["max-num-seqs"] = _seqs(plan, inputs, plan.knobs.max_num_seqs)
    if plan.knobs.max_num_batched_tokens:
        out["max-num-batched-tokens"] = _batched(plan, inputs, plan.knobs.max_num_batched_tokens)
    return out
