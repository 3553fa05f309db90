"""Make a plan: read the model, pick the topology, size vLLM, explain the verdict and what would fit instead.

:func:`make_plan` is the whole planner behind ``clinic-edge plan``; it raises :class:`~appliance.errors.InputError`
or :class:`~appliance.errors.UsageError` for bad input and otherwise returns a :class:`Plan` whose ``verdict`` is
``fits`` (the requested context and sessions fit), ``fits-reduced`` (vLLM will start, with the reduced
``max_model_len`` in its arguments) or ``does-not-fit``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import InputError, UsageError
from appliance.planner.accounting import GIB, SMALL_GPU_BATCHED_TOKENS, Budget, Knobs, budget_for
from appliance.planner.flag_reasons import explain_flags
from appliance.planner.hardware_profile import PROFILES, HardwareProfile
from appliance.planner.model_config import ModelFacts, load_model_facts, read_config
from appliance.planner.safetensors_header import read_checkpoint
from appliance.planner.topology import sessions_per_replica, tp_candidates
from appliance.planner.unified import START_MARGIN_GIB, clinic_limits, kv_for_sessions, sized_budget, start_utilization
from appliance.planner.weights_estimate import estimate_weights
from appliance.vllm_server import CPU_PROFILE

__all__ = ["DEFAULT_UNIFIED_RESERVE_GIB", "UNIFIED_MAX_UTILIZATION", "Plan", "PlanInputs", "make_plan"]

# Unified memory (DGX Spark): memory kept back for DGX OS and its desktop (≈ 3–4 GiB), the gateway and dashboard
# (≈ 0.5 GiB), sshd/journald/Ansible runs and the page cache of the model files while vLLM loads them.
DEFAULT_UNIFIED_RESERVE_GIB = 8.0
# Published Spark recipes run at 0.80–0.88 and CUDA free memory was seen capped near 102 of 121.7 GiB: never plan above.
UNIFIED_MAX_UTILIZATION = 0.85
# Below this context a clinic session is not useful (a radiograph's image tokens plus a short report).
MIN_USEFUL_TOKENS = 256
# The checkpoints a "does not fit" plan prices instead of this one's 16-bit weights (weights_estimate.py).
QUANTIZED_ALTERNATIVES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("FP8 (128 × 128 blocks)", {"quant_method": "fp8", "weight_block_size": [128, 128]}),
    ("4-bit AWQ (group 128)", {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True}),
)
BIGGER_BOXES = ("h200",)


@dataclass(frozen=True)
class PlanInputs:
    """Everything ``clinic-edge plan`` was asked."""

    model: Path
    hardware: HardwareProfile
    knobs: Knobs
    served_model_name: str | None = None
    max_model_len: int | None = None
    concurrency: int = 1
    images_per_request: int | None = None
    tp: int | None = None
    weights_gib: float | None = None
    kv_cache_gib: float | None = None
    reserve_gib: float = DEFAULT_UNIFIED_RESERVE_GIB


@dataclass
class Plan:
    """The planner's answer: the budget of one rank, the topology, the verdict, and vLLM's arguments."""

    facts: ModelFacts
    model_dir: Path | None
    serve_path: Path
    served_model_name: str
    hardware: HardwareProfile
    knobs: Knobs
    budget: Budget
    replicas: int
    tp: int
    max_model_len: int
    concurrency: int
    sessions_per_replica: int
    images_per_request: int
    verdict: str
    reasons: list[str]
    suggestions: list[str]
    weights_source: str
    reserve_gib: float | None
    kv_cache_memory_bytes: int | None = None
    cpu_kv_gib: int | None = None
    notes: list[str] = field(default_factory=list)
    # Unified memory: the utilization the budget was planned at (min(0.85, (available − reserve) / total)) and what
    # it would hold; the budget itself then asks vLLM only for what the engine takes (appliance/planner/unified.py).
    utilization_ceiling: float | None = None
    ceiling_concurrency: float | None = None
    start_margin_gib: float | None = None
    flag_reasons: dict[str, str] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0 fits / fits-reduced, 1 does-not-fit."""
        return 1 if self.verdict == "does-not-fit" else 0


@dataclass(frozen=True)
class _Ctx:
    """What one planning run knows once the model is read and the workload checked."""

    inputs: PlanInputs
    facts: ModelFacts
    model_dir: Path | None
    name: str
    weights: int
    weights_source: str
    max_len: int
    images: int
    min_len: int


def _floor2(x: float) -> float:
    return math.floor(x * 100) / 100


def _weights(inputs: PlanInputs, facts: ModelFacts, model_dir: Path | None) -> tuple[int, str]:
    """Whole-model weight bytes as vLLM loads them, and where the figure came from.

    --weights-gib wins; then the safetensors headers (exact); without them the estimate from config.json
    (weights_estimate.py), which a bare config or a model directory before its download gets.
    """
    if inputs.weights_gib is not None:
        if inputs.weights_gib <= 0:
            raise UsageError(f"--weights-gib {inputs.weights_gib} must be positive.", "Give the weights in GiB.")
        return int(inputs.weights_gib * GIB), "--weights-gib"
    # vLLM also keeps each rotary embedding's cos/sin cache (max positions × rotary dim, model dtype) on the GPU.
    rope = facts.max_position_embeddings * facts.rotary_dim * facts.dtype_bytes
    ckpt = read_checkpoint(model_dir) if model_dir is not None else None
    if ckpt is not None:
        return ckpt.tensor_bytes + rope, f"safetensors headers ({len(ckpt.files)} file(s), {ckpt.num_params:,} values)"
    est = estimate_weights(read_config(inputs.model), str(inputs.model))
    where = "no *.safetensors files" if model_dir is not None else "a bare config"
    return est.loaded_bytes + rope, (
        f"estimated from config.json ({where}; {est.params:,} values, {est.quantization}; give --weights-gib to "
        "override)"
    )


def _default_utilization(inputs: PlanInputs) -> float:
    hw = inputs.hardware
    if inputs.knobs.gpu_memory_utilization is not None:
        return inputs.knobs.gpu_memory_utilization
    if hw.unified:
        available = hw.available_gib if hw.available_gib is not None else hw.total_gib
        return _floor2(min(UNIFIED_MAX_UTILIZATION, (available - inputs.reserve_gib) / hw.total_gib))
    return inputs.knobs.default_utilization()


def _budget(ctx: _Ctx, tp: int, util: float, knobs: Knobs, *, inputs: PlanInputs | None = None) -> Budget:
    inputs = inputs or ctx.inputs
    facts, weights, max_len = ctx.facts, ctx.weights, ctx.max_len
    hw = inputs.hardware
    measured = int(inputs.kv_cache_gib * GIB) if inputs.kv_cache_gib is not None else None
    b = budget_for(
        facts,
        tp=tp,
        total_bytes=int(hw.total_gib * GIB),
        utilization=util,
        weights_bytes=math.ceil(weights / tp),
        max_model_len=max_len,
        knobs=knobs,
        kv_bytes_measured=measured,
    )
    floor = facts.vision.batch_floor if facts.vision is not None and ctx.images else None
    if util <= 0 or util > 1:
        b.startup_error = f"--gpu-memory-utilization {util} is outside (0, 1]"
    elif floor and knobs.batched_tokens() < floor:
        b.startup_error = (
            f"Chunked MM input disabled but max_tokens_per_mm_item ({floor}) is larger than max_num_batched_tokens "
            f"({knobs.batched_tokens()}); give --max-num-batched-tokens {floor} or more"
        )
    elif hw.available_gib is not None and b.requested_bytes > hw.available_gib * GIB:
        b.startup_error = (
            f"Free memory on device ({hw.available_gib:.2f}/{hw.total_gib:.2f} GiB) on startup is less than desired "
            f"GPU memory utilization ({util}, {b.requested_bytes / GIB:.2f} GiB)"
        )
    if hw.unified and not b.startup_error:
        available = hw.available_gib if hw.available_gib is not None else hw.total_gib
        if b.requested_bytes > (available - inputs.reserve_gib) * GIB:
            safe = _floor2(min(UNIFIED_MAX_UTILIZATION, (available - inputs.reserve_gib) / hw.total_gib))
            b.policy_error = (
                f"on unified memory vLLM would take {b.requested_bytes / GIB:.2f} of {available:.2f} GiB available, "
                f"leaving less than the {inputs.reserve_gib:g} GiB reserve for the OS, gateway and dashboard (the box "
                f"can freeze); --gpu-memory-utilization {safe} keeps it"
            )
    return b


def _classify(b: Budget, sessions: int, min_len: int) -> tuple[str, int]:
    """("fits" | "fits-reduced" | "does-not-fit", the max_model_len to run with)."""
    if b.startup_error or b.policy_error or b.kv_bytes <= 0:
        return "does-not-fit", b.max_model_len
    if b.max_concurrency() >= sessions:
        return "fits", b.max_model_len
    best = b.largest_len(sessions)
    if best >= min_len:
        return "fits-reduced", best
    return "does-not-fit", b.max_model_len


def _check_inputs(inputs: PlanInputs, facts: ModelFacts) -> tuple[int, int]:
    """Validate workload flags against the model; return (max_model_len, images per request)."""
    if inputs.concurrency < 1:
        raise UsageError(f"--concurrency {inputs.concurrency} must be at least 1.", "Give the sessions that must fit.")
    images = inputs.images_per_request
    if images is not None and images < 0:
        raise UsageError(f"--images-per-request {images} is negative.", "Give 0 or more images per request.")
    if facts.vision is None and images:
        raise UsageError(
            f"--images-per-request {images}, but {facts.name} ({facts.architecture}) has no vision tower.",
            "Plan a vision-language model, or drop --images-per-request.",
        )
    images = images if images is not None else (1 if facts.vision is not None else 0)
    limit = facts.max_position_embeddings
    if inputs.max_model_len is None:
        max_len = CPU_PROFILE.max_model_len if inputs.hardware.kind == "cpu" else limit
    else:
        max_len = inputs.max_model_len
        if max_len < 1:
            raise UsageError(f"--max-model-len {max_len} must be positive.", "Give the context length in tokens.")
        if max_len > limit:
            raise UsageError(
                f"--max-model-len {max_len} is longer than {facts.name}'s max_position_embeddings ({limit}); "
                "vLLM refuses to start with it.",
                f"Use --max-model-len {limit} or less.",
            )
    image_tokens = images * facts.vision.tokens_per_image if facts.vision else 0
    if image_tokens >= max_len:
        raise UsageError(
            f"{images} image(s) per request take {image_tokens} tokens, not less than --max-model-len {max_len}.",
            f"Raise --max-model-len above {image_tokens + MIN_USEFUL_TOKENS} or lower --images-per-request.",
        )
    if inputs.tp is not None and inputs.hardware.kind == "cuda":
        if inputs.tp < 1 or inputs.tp > inputs.hardware.gpus:
            raise UsageError(
                f"--tp {inputs.tp} with {inputs.hardware.gpus} GPU(s).",
                "Tensor parallelism needs that many GPUs: raise --gpus or lower --tp.",
            )
        if facts.num_attention_heads % inputs.tp:
            raise UsageError(
                f"--tp {inputs.tp} does not divide {facts.name}'s {facts.num_attention_heads} attention heads; "
                "vLLM refuses it.",
                "Use a tensor-parallel size that divides the attention heads (1, 2, 4, 8...).",
            )
    return max_len, images


def make_plan(inputs: PlanInputs) -> Plan:
    """Plan vLLM for ``inputs.model`` on ``inputs.hardware``."""
    facts, model_dir = load_model_facts(inputs.model)
    max_len, images = _check_inputs(inputs, facts)
    weights, weights_source = _weights(inputs, facts, model_dir)
    name = inputs.served_model_name or facts.name
    min_len = min(max_len, (images * facts.vision.tokens_per_image if facts.vision else 0) + MIN_USEFUL_TOKENS)
    ctx = _Ctx(inputs, facts, model_dir, name, weights, weights_source, max_len, images, min_len)
    if inputs.hardware.kind == "cpu":
        return _cpu_plan(ctx)

    hw = inputs.hardware
    util = _default_utilization(inputs)
    knobs = dataclasses.replace(
        _box_knobs(inputs, facts), big_gpu=hw.big_gpu, device="cuda", gpu_memory_utilization=util
    )
    candidates = [inputs.tp] if inputs.tp else tp_candidates(hw.gpus, facts.num_attention_heads, facts.num_kv_heads)
    tried: list[tuple[str, int, Budget, int]] = []
    for tp in candidates:
        replicas = max(1, hw.gpus // tp)
        sessions = sessions_per_replica(inputs.concurrency, replicas)
        b = _budget(ctx, tp, util, knobs)
        verdict, run_len = _classify(b, sessions, min_len)
        tried.append((verdict, run_len, b, sessions))
        if verdict == "fits":
            break
    order = {"fits": 0, "fits-reduced": 1, "does-not-fit": 2}
    verdict, run_len, budget, sessions = min(tried, key=lambda t: (order[t[0]], t[2].tp))
    if verdict == "does-not-fit":
        verdict, run_len, budget, sessions = tried[-1]
    budget.max_model_len = run_len
    tp = budget.tp
    replicas = max(1, hw.gpus // tp)
    ceiling_budget = budget
    if hw.unified and verdict != "does-not-fit" and inputs.knobs.gpu_memory_utilization is None:
        # vLLM checks free ≥ total × utilization before loading even with the KV cache pinned
        # (vllm/v1/worker/utils.py request_memory): ask it only for what the engine takes (unified.py).
        kv = kv_for_sessions(budget, sessions)
        budget = sized_budget(budget, kv, start_utilization(budget, kv, util))

    reasons = _reasons(ctx, verdict, budget, sessions, budget.utilization)
    plan = Plan(
        facts=facts,
        model_dir=model_dir,
        serve_path=model_dir if model_dir is not None else inputs.model.resolve().parent,
        served_model_name=name,
        hardware=hw,
        knobs=knobs,
        budget=budget,
        replicas=replicas,
        tp=tp,
        max_model_len=run_len,
        concurrency=inputs.concurrency,
        sessions_per_replica=sessions,
        images_per_request=images,
        verdict=verdict,
        reasons=reasons,
        suggestions=[],
        weights_source=weights_source,
        reserve_gib=inputs.reserve_gib if hw.unified else None,
    )
    if hw.unified and budget.kv_bytes > 0:
        # Pin the KV cache so its size does not move with the page cache at the next start.
        plan.kv_cache_memory_bytes = budget.kv_bytes // (1024 * 1024) * (1024 * 1024)
    if budget is not ceiling_budget:
        plan.utilization_ceiling = util
        plan.ceiling_concurrency = ceiling_budget.max_concurrency()
        plan.start_margin_gib = START_MARGIN_GIB
    if verdict != "fits":
        plan.suggestions = _suggestions(ctx, sessions, plan)
    plan.flag_reasons = explain_flags(plan, inputs)
    return plan


def _box_knobs(inputs: PlanInputs, facts: ModelFacts) -> Knobs:
    """The user's knobs; on unified memory with --max-num-seqs / --max-num-batched-tokens sized for the clinic.

    A model that schedules each image whole (Gemma 4: 2496 tokens) gets --max-num-batched-tokens raised to that floor
    when vLLM's default for the box is below it and the user gave none: vLLM refuses to start otherwise.
    """
    knobs = inputs.knobs
    if inputs.hardware.unified:
        knobs = clinic_limits(knobs, facts, inputs.concurrency)
    floor = facts.vision.batch_floor if facts.vision is not None and inputs.images_per_request != 0 else None
    box = dataclasses.replace(knobs, big_gpu=inputs.hardware.big_gpu)
    if floor and knobs.max_num_batched_tokens is None and box.batched_tokens() < floor:
        knobs = dataclasses.replace(knobs, max_num_batched_tokens=floor)
    return knobs


def _reasons(ctx: _Ctx, verdict: str, b: Budget, sessions: int, util: float) -> list[str]:
    inputs, max_len = ctx.inputs, ctx.max_len
    reasons: list[str] = []
    startup = b.startup_error or (b.check_startup() if verdict == "does-not-fit" else None)
    if startup:
        reasons.append(f"vLLM would not start: {startup}.")
    if verdict == "fits":
        reasons.append(
            f"{b.max_concurrency():.2f} sessions of {max_len:,} tokens fit per replica "
            f"({sessions} needed); KV cache {b.kv_bytes / GIB:.2f} GiB."
        )
    elif verdict == "fits-reduced":
        full = b.max_concurrency(max_len)
        reasons.append(
            f"At --max-model-len {max_len:,} only {full:.2f} sessions fit per replica, {sessions} needed: "
            f"max-model-len reduced to {b.max_model_len:,}."
        )
    elif not startup and not b.policy_error:
        reasons.append(
            f"Not even {sessions} session(s) of {MIN_USEFUL_TOKENS} tokens fit in {b.kv_bytes / GIB:.2f} GiB of KV "
            "cache."
        )
    if b.policy_error:
        reasons.append(f"Unsafe: {b.policy_error}.")
    if inputs.knobs.vllm_version < (0, 21) and not inputs.knobs.enforce_eager:
        headroom = (1 - util) * b.total_bytes
        if b.cudagraph_bytes > headroom:
            reasons.append(
                f"CUDA graphs (≈ {b.cudagraph_bytes / GIB:.2f} GiB) are captured after the KV cache and may not fit "
                f"in the {headroom / GIB:.2f} GiB left by --gpu-memory-utilization {util}."
            )
    return reasons


def _alt_budget(ctx: _Ctx, tp: int, **changes: Any) -> Budget:
    """The budget the same request would get with ``changes`` (kv_cache_dtype, weights, hardware)."""
    inputs = ctx.inputs
    knob_changes = {k: v for k, v in changes.items() if k in ("kv_cache_dtype", "max_num_batched_tokens")}
    hw = changes.get("hardware", inputs.hardware)
    alt_inputs = dataclasses.replace(inputs, hardware=hw, kv_cache_gib=None if changes else inputs.kv_cache_gib)
    util = _default_utilization(alt_inputs)
    knobs = dataclasses.replace(
        _box_knobs(alt_inputs, ctx.facts),
        big_gpu=hw.big_gpu,
        device="cuda",
        gpu_memory_utilization=util,
        **knob_changes,
    )
    alt_ctx = dataclasses.replace(ctx, weights=int(changes.get("weights", ctx.weights)))
    return _budget(alt_ctx, tp, util, knobs, inputs=alt_inputs)


def _fit_text(b: Budget, sessions: int, max_len: int) -> tuple[bool, str | None]:
    """(whether the full request fits, what the budget gives: sessions at max_len or the longest context)."""
    if b.startup_error or b.policy_error or b.kv_bytes <= 0:
        return False, None
    held = b.max_concurrency(max_len)
    if held >= sessions:
        return True, f"fits, {held:.2f} sessions of {max_len:,} tokens"
    best = b.largest_len(sessions, upper=max_len)
    return False, (f"{sessions} session(s) of up to {best:,} tokens" if best >= MIN_USEFUL_TOKENS else None)


def _smaller_batch(ctx: _Ctx, plan: Plan) -> int | None:
    """A smaller --max-num-batched-tokens worth pricing: for sliding-window models whose reservation follows it."""
    if ctx.inputs.knobs.max_num_batched_tokens is not None or not any(
        g.kind == "sliding" for g in plan.budget.layout.groups
    ):
        return None
    vision = ctx.facts.vision
    floor = max(SMALL_GPU_BATCHED_TOKENS, (vision.batch_floor or 0) if vision is not None else 0)
    return floor if floor < plan.knobs.batched_tokens() else None


def _quantized_weights(ctx: _Ctx) -> list[tuple[str, int]]:
    """Whole-model weights of this model's FP8 and 4-bit checkpoints, estimated from its config (none if it is
    quantized already)."""
    try:
        config = read_config(ctx.inputs.model)
        base = estimate_weights(config)
    except InputError:
        return []
    if base.quantization != "16-bit":
        return []
    out = []
    for label, qc in QUANTIZED_ALTERNATIVES:
        alt = estimate_weights({**config, "quantization_config": qc})
        out.append((label, ctx.weights - base.loaded_bytes + alt.loaded_bytes))
    return out


def _suggestions(ctx: _Ctx, sessions: int, plan: Plan) -> list[str]:
    """What would fit instead, each alternative planned with the same accounting and its fit stated."""
    inputs, facts, max_len = ctx.inputs, ctx.facts, ctx.max_len
    out: list[str] = []
    b, tp, hw = plan.budget, plan.tp, inputs.hardware
    largest = b.largest_len(sessions, upper=max_len) if b.kv_bytes > 0 and not b.startup_error else 0
    if plan.verdict == "does-not-fit" and largest >= 1:
        out.append(f"Largest max-model-len for {sessions} session(s) per replica: --max-model-len {largest}.")
    elif plan.verdict == "fits-reduced":
        out.append(f"Running with --max-model-len {plan.max_model_len} (the largest that fits {sessions} session(s)).")
    if b.kv_bytes > 0 and b.max_concurrency(max_len) < sessions:
        out.append(
            f"At --max-model-len {max_len} this box holds {b.max_concurrency(max_len):.2f} session(s) per replica."
        )
    if not inputs.knobs.kv_cache_dtype.startswith("fp8"):
        _, fit = _fit_text(_alt_budget(ctx, tp, kv_cache_dtype="fp8"), sessions, max_len)
        if fit:
            out.append(f"An fp8 KV cache (--kv-cache-dtype fp8, half the KV memory): {fit}.")
    smaller = _smaller_batch(ctx, plan)
    if smaller:
        _, fit = _fit_text(_alt_budget(ctx, tp, max_num_batched_tokens=smaller), sessions, max_len)
        if fit:
            out.append(
                f"--max-num-batched-tokens {smaller} (each request's sliding-window layers reserve the tokens in "
                f"flight, {b.in_flight_tokens:,} now): {fit}."
            )
    for label, weights in _quantized_weights(ctx):
        _, fit = _fit_text(_alt_budget(ctx, tp, weights=weights), sessions, max_len)
        if fit:
            out.append(f"A {label} checkpoint of this model ({weights / GIB:.1f} GiB of weights): {fit}.")
    if not hw.unified:
        partial: str | None = None
        for more in (2, 4, 8):
            if more <= tp or facts.num_attention_heads % more:
                continue
            bigger = dataclasses.replace(hw, gpus=more, available_gib=None)
            full, fit = _fit_text(_alt_budget(ctx, more, hardware=bigger), sessions, max_len)
            what = (
                f"Tensor parallelism over {more} GPUs (--tp {more})"
                if more <= hw.gpus
                else f"{more} such GPUs with --tp {more}"
            )
            if full:
                out.append(f"{what}: {fit}.")
                partial = None
                break
            partial = f"{what}: {fit}." if fit else partial
        if partial:
            out.append(partial)
    for name in BIGGER_BOXES:
        box = PROFILES[name]
        if box.total_gib > hw.total_gib:
            _, fit = _fit_text(_alt_budget(ctx, 1, hardware=box), sessions, max_len)
            if fit:
                out.append(f"A bigger box: one {box.device_name} ({box.total_gib:g} GiB): {fit}.")
    if not out:
        out.append("Choose a smaller model, or a box with more GPU memory.")
    return out


def _cpu_plan(ctx: _Ctx) -> Plan:
    """The CPU build: the KV cache is exactly VLLM_CPU_KVCACHE_SPACE GiB (an integer), blocks of 128 tokens."""
    inputs, facts, model_dir, weights, max_len = ctx.inputs, ctx.facts, ctx.model_dir, ctx.weights, ctx.max_len
    hw = inputs.hardware
    if inputs.tp not in (None, 1):
        raise UsageError("--tp with --hardware cpu.", "The CPU profile runs one vLLM process; drop --tp.")
    kv_gib = CPU_PROFILE.kv_cache_gib if inputs.kv_cache_gib is None else int(inputs.kv_cache_gib)
    if kv_gib < 1:
        raise UsageError(
            f"--kv-cache-gib {inputs.kv_cache_gib} on cpu: vLLM's CPU build takes whole GiB (VLLM_CPU_KVCACHE_SPACE).",
            "Give --kv-cache-gib 1 or more.",
        )
    knobs = dataclasses.replace(inputs.knobs, device="cpu", big_gpu=False, enforce_eager=True)
    b = budget_for(
        facts,
        tp=1,
        total_bytes=int(hw.total_gib * GIB),
        utilization=1.0,
        weights_bytes=weights,
        max_model_len=max_len,
        knobs=knobs,
        kv_bytes_measured=kv_gib * GIB,
    )
    b.activation_bytes = b.non_torch_bytes = b.cudagraph_bytes = 0  # the CPU build does not budget them
    b.requested_bytes = weights + b.kv_bytes
    available = hw.available_gib if hw.available_gib is not None else hw.total_gib
    if b.requested_bytes > available * GIB:
        b.startup_error = (
            f"Available memory ({available:.2f} GiB) is less than the weights plus the KV cache "
            f"({b.requested_bytes / GIB:.2f} GiB)"
        )
    sessions = inputs.concurrency
    verdict, run_len = _classify(b, sessions, ctx.min_len)
    b.max_model_len = run_len
    reasons = _reasons(ctx, verdict, b, sessions, 1.0)
    plan = Plan(
        facts=facts,
        model_dir=model_dir,
        serve_path=model_dir if model_dir is not None else inputs.model.resolve().parent,
        served_model_name=ctx.name,
        hardware=hw,
        knobs=knobs,
        budget=b,
        replicas=1,
        tp=1,
        max_model_len=run_len,
        concurrency=sessions,
        sessions_per_replica=sessions,
        images_per_request=ctx.images,
        verdict=verdict,
        reasons=reasons,
        suggestions=[],
        weights_source=ctx.weights_source,
        reserve_gib=None,
        cpu_kv_gib=kv_gib,
    )
    if verdict != "fits":
        largest = b.largest_len(sessions, upper=max_len) if not b.startup_error else 0
        plan.suggestions = (
            [f"Largest max-model-len for {sessions} session(s): --max-model-len {largest}."] if largest else []
        ) + [f"Raise the KV cache (--kv-cache-gib {kv_gib + 1}) if the host has the memory."]
    plan.flag_reasons = explain_flags(plan, inputs)
    return plan
