"""The plan for people (a budget table) and for scripts (the ``--json`` document, also ``plan.json``)."""

from __future__ import annotations

import shlex
from collections import Counter
from typing import Any

from appliance.planner.accounting import GIB, Budget
from appliance.planner.envfile import BASE_PORT, replica_env, vllm_args
from appliance.planner.plan import Plan

__all__ = ["SCHEMA", "plan_document", "plan_table"]

SCHEMA = 1
VLLM_MODULE_CMD = "python -m vllm.entrypoints.openai.api_server"


def _gib(n: int | float) -> float:
    return round(n / GIB, 2)


def plan_document(plan: Plan) -> dict[str, Any]:
    """The plan as one JSON-ready document (GiB = 2^30 bytes, rounded to 0.01 like vLLM's logs)."""
    b = plan.budget
    k = plan.knobs
    replicas = []
    for i in range(plan.replicas):
        env = replica_env(plan, i)
        replicas.append(
            {
                "index": i,
                "port": BASE_PORT + i,
                "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES"),
                "vllm_args": vllm_args(plan, i),
                "env": {key: v for key, v in env.items() if key != "CLINIC_EDGE_VLLM_ARGS"},
            }
        )
    return {
        "schema": SCHEMA,
        "verdict": plan.verdict,
        "reasons": plan.reasons,
        "suggestions": plan.suggestions,
        "model": plan.facts.to_dict() | {"path": str(plan.model_dir) if plan.model_dir else None},
        "served_model_name": plan.served_model_name,
        "hardware": {key: round(v, 2) if isinstance(v, float) else v for key, v in plan.hardware.to_dict().items()},
        "vllm_version": ".".join(str(x) for x in k.vllm_version),
        "total_gib": _gib(b.total_bytes),
        "gpu_memory_utilization": b.utilization if plan.hardware.kind == "cuda" else None,
        "utilization_ceiling": plan.utilization_ceiling,
        "ceiling_concurrency": round(plan.ceiling_concurrency, 2) if plan.ceiling_concurrency is not None else None,
        "start_margin_gib": plan.start_margin_gib,
        "requested_gib": _gib(b.requested_bytes),
        "requested_bytes": b.requested_bytes,
        "weights_gib": _gib(b.weights_bytes),
        "weights_source": plan.weights_source,
        "activation_gib": _gib(b.activation_bytes),
        "non_torch_gib": _gib(b.non_torch_bytes),
        "cudagraph_gib": _gib(b.cudagraph_bytes),
        "cudagraph_subtracted": k.estimates_cudagraphs,
        "kv_cache_gib": _gib(b.kv_bytes),
        "kv_cache_bytes": b.kv_bytes,
        "kv_cache_measured": b.kv_measured,
        "kv_cache_memory_bytes": plan.kv_cache_memory_bytes,
        "kv_cache_tokens": b.kv_tokens if b.kv_bytes > 0 else 0,
        "num_blocks": b.num_blocks,
        "kv_layout": b.layout.to_dict(),
        "max_concurrency": round(b.max_concurrency(), 2) if b.kv_bytes > 0 else 0.0,
        "max_model_len": plan.max_model_len,
        "concurrency": plan.concurrency,
        "sessions_per_replica": plan.sessions_per_replica,
        "images_per_request": plan.images_per_request,
        "max_num_batched_tokens": k.batched_tokens(),
        "in_flight_tokens": b.in_flight_tokens,
        "max_num_seqs": k.num_seqs(),
        "unified_reserve_gib": plan.reserve_gib,
        "topology": {"replicas": plan.replicas, "tp": plan.tp, "gpus": plan.hardware.gpus},
        "vllm_args": vllm_args(plan, 0),
        "flag_reasons": plan.flag_reasons,
        "replicas": replicas,
    }


def _block_text(b: Budget) -> str:
    """16, or 16/32 when unified pages give some groups a larger block (Gemma 4's full layers)."""
    return "/".join(str(size) for size in sorted({g.block_size for g in b.layout.groups}))


def _groups_text(plan: Plan) -> str:
    layout = plan.budget.layout
    kinds = Counter(g.kind if g.window is None else f"{g.kind}:{g.window}" for g in layout.groups)
    if len(layout.groups) == 1:
        return f"1 group of {layout.group_size} layers"
    parts = " + ".join(f"{n} {kind}" for kind, n in kinds.items())
    pad = f", {layout.padding_layers} padding layers" if layout.padding_layers else ""
    return f"{len(layout.groups)} groups of {layout.group_size} layers ({parts}{pad})"


def plan_table(plan: Plan) -> str:
    """A readable budget: each line in GiB, the verdict, reasons, suggestions and the exact vLLM command line."""
    b, k, hw = plan.budget, plan.knobs, plan.hardware
    version = ".".join(str(x) for x in k.vllm_version)
    lines: list[str] = []
    if hw.kind == "cpu":
        lines.append(
            f"clinic-edge plan: {plan.facts.name} on the CPU build of vLLM ({version}), host {hw.total_gib:.2f} GiB"
        )
    else:
        unified = ", unified memory" if hw.unified else ""
        lines.append(
            f"clinic-edge plan: {plan.facts.name} on {hw.gpus} × {hw.device_name or hw.name} "
            f"({hw.total_gib:.2f} GiB{unified}), vLLM {version}"
        )
    if hw.note:
        lines.append(f"  ({hw.note})")
    lines.append("")
    rows: list[tuple[str, float, str]] = []
    if hw.kind == "cpu":
        rows.append(("weights", b.weights_bytes / GIB, plan.weights_source))
        rows.append(("KV cache (VLLM_CPU_KVCACHE_SPACE)", b.kv_bytes / GIB, "fixed by the CPU build"))
        rows.append(("= host memory vLLM takes", b.requested_bytes / GIB, ""))
    else:
        rows.append(("total (as CUDA reports it)", b.total_bytes / GIB, ""))
        rows.append((f"× gpu-memory-utilization {b.utilization:g}", b.requested_bytes / GIB, "requested"))
        per = f" / TP {plan.tp}" if plan.tp > 1 else ""
        rows.append(("− weights" + per, b.weights_bytes / GIB, plan.weights_source))
        rows.append(
            (
                "− peak activation (estimate)",
                b.activation_bytes / GIB,
                f"{k.batched_tokens()} batched tokens, {k.num_seqs()} sequences",
            )
        )
        rows.append(("− non-torch (estimate)", b.non_torch_bytes / GIB, "CUDA context, NCCL"))
        if k.estimates_cudagraphs:
            rows.append(("− CUDA graphs (estimate)", b.cudagraph_bytes / GIB, "subtracted from v0.21"))
        elif not k.enforce_eager:
            rows.append(("  CUDA graphs (estimate)", b.cudagraph_bytes / GIB, "not subtracted before v0.21"))
        note = "measured (--kv-cache-gib)" if b.kv_measured else ""
        if plan.kv_cache_memory_bytes:
            note = f"pinned: --kv-cache-memory-bytes {plan.kv_cache_memory_bytes}"
        rows.append(("= KV cache", b.kv_bytes / GIB, note))
        graphs = b.cudagraph_bytes if k.estimates_cudagraphs else 0
        left = b.requested_bytes - b.weights_bytes - b.activation_bytes - b.non_torch_bytes - graphs - b.kv_bytes
        if plan.utilization_ceiling is not None and left > 0:
            rows.append(("  left in the request (margin)", left / GIB, "vLLM's start-up check asks for it too"))
    width = max(len(r[0]) for r in rows) + 2
    lines.append(f"  {'per GPU' if hw.kind == 'cuda' else 'host':<{width}}{'GiB':>9}")
    for label, value, note in rows:
        lines.append(f"  {label:<{width}}{value:>9.2f}   {note}".rstrip())
    lines.append("")
    if b.kv_bytes > 0:
        lines.append(
            f"  KV cache: {b.num_blocks:,} blocks of {_block_text(b)} tokens, {_groups_text(plan)}, "
            f"{b.layout.bytes_per_token() / 1024:.1f} KiB per token"
        )
        lines.append(
            f"  KV cache size: {b.kv_tokens:,} tokens; maximum concurrency {b.max_concurrency():.2f}x "
            f"at {plan.max_model_len:,} tokens per request"
        )
    topo = f"{plan.replicas} replica(s) × TP {plan.tp}" if hw.kind == "cuda" else "1 replica (CPU)"
    lines.append(
        f"  topology: {topo}; {plan.concurrency} session(s) requested, {plan.sessions_per_replica} per replica"
    )
    lines.append("")
    lines.append(f"verdict: {plan.verdict}")
    lines.extend(f"  - {r}" for r in plan.reasons)
    if plan.suggestions:
        lines.append("what would fit:")
        lines.extend(f"  - {s}" for s in plan.suggestions)
    lines.append("")
    if plan.flag_reasons:
        lines.append("why these flags:")
        lines.extend(f"  --{flag} {why}" for flag, why in plan.flag_reasons.items())
        lines.append("")
    for i in range(plan.replicas):
        env = replica_env(plan, i)
        prefix = " ".join(
            f"{key}={shlex.quote(v)}"
            for key, v in env.items()
            if key in ("CUDA_VISIBLE_DEVICES", "VLLM_CPU_KVCACHE_SPACE")
        )
        cmd = " ".join([VLLM_MODULE_CMD, *map(shlex.quote, vllm_args(plan, i))])
        lines.append(f"vLLM command line (replica {i}):")
        lines.append(f"  {prefix} {cmd}".replace("   ", "  "))
    return "\n".join(lines)
