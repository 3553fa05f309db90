"""The start gate: right before vLLM starts on unified memory, is as much memory free as its start-up check will ask?

vLLM refuses to start unless free memory ≥ ``total × gpu_memory_utilization`` (``vllm/v1/worker/utils.py``
``request_memory``); on unified memory (DGX Spark) "free" is the host's MemAvailable, shared with the OS, other
programs and the page cache. The gate reads MemAvailable; when it is short it drops the page cache of the model's own
files — ``posix_fadvise(POSIX_FADV_DONTNEED)`` on each file, which any user that can read them may do: no root, no
``drop_caches``, no writes — reads MemAvailable again, and passes or fails with the figures and what to do.

It runs as ``ExecStartPre=`` of the vLLM unit, as its unprivileged user under ``ProtectSystem=strict``: it only reads
(the plan, ``/proc/meminfo``, the model directory). Discrete-GPU plans pass at once: their check is against GPU
memory, which NVML reports and preflight covers. Which pages the kernel really dropped cannot be observed portably
(``mincore`` needs an mmap of each file): the gate judges by MemAvailable alone.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import ClinicEdgeError, InputError
from appliance.hardware import read_meminfo
from appliance.planner.accounting import GIB, Knobs, parse_version
from appliance.planner.hardware_profile import HardwareProfile, named_profile
from appliance.planner.plan import DEFAULT_UNIFIED_RESERVE_GIB, MIN_USEFUL_TOKENS, Plan, PlanInputs, make_plan
from appliance.planner.plan_file import PlanFile, read_plan_file

__all__ = [
    "DEFAULT_PLAN",
    "VLLM_CONTEXT_GIB",
    "GatePlan",
    "GateResult",
    "PageCacheDrop",
    "drop_page_cache",
    "gate_plan",
    "read_plan_file",
    "run_gate",
]

DEFAULT_PLAN = Path("/etc/clinic-edge/vllm/plan.json")
# vLLM measures free memory after creating its own CUDA context: its reading runs 2.6–2.7 GiB below the MemAvailable
# seen before it starts (llamastash/llamastash PR #81, on GB10). The gate asks for this much on top.
VLLM_CONTEXT_GIB = 3.0
NAMED_BOXES = ("dgx-spark", "h100", "h200")


@dataclass(frozen=True)
class GatePlan:
    """What the gate needs from ``plan.json``."""

    unified: bool
    utilization: float
    total_bytes: int  # as the plan has it (CUDA's total)
    requested_bytes: int  # ceil(total × utilization): what vLLM's check asks
    model_dir: Path | None
    replan_argv: list[str]  # `clinic-edge plan ...` without --max-model-len
    replan_inputs: PlanInputs | None  # the same, for make_plan
    max_model_len: int


@dataclass
class PageCacheDrop:
    """What ``drop_page_cache`` did: files advised, their bytes, and files it could not open."""

    files: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)


@dataclass
class GateResult:
    """The verdict, its figures in bytes, and the one-line message (plus a remedy when it failed)."""

    passed: bool
    message: str
    remedy: str = ""
    unified: bool = True
    requested_bytes: int = 0
    needed_bytes: int = 0
    available_bytes: int | None = None
    available_after_drop_bytes: int | None = None
    dropped: PageCacheDrop | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def _replan(plan: PlanFile, model: str) -> tuple[list[str], PlanInputs]:
    """The `clinic-edge plan` command that re-plans this plan (without --max-model-len), and the same as inputs."""
    name = plan.hardware_name or "auto"
    total = plan.total_gib or 0.0
    if name in NAMED_BOXES:
        argv = ["clinic-edge", "plan", model, "--hardware", name]
        hardware = named_profile(name, None)
    elif name == "custom":
        argv = ["clinic-edge", "plan", model, "--gpu-mem-gib", f"{total:g}", "--unified-memory"]
        hardware = HardwareProfile("custom", "cuda", 1, total, True)
    else:  # planned on the box (--hardware auto): search with the figures it measured then
        argv = ["clinic-edge", "plan", model, "--hardware", "auto"]
        hardware = HardwareProfile("custom", "cuda", 1, total, True, plan.available_gib)
    args = plan.vllm_args
    knobs = Knobs()
    if plan.vllm_version is not None:
        argv += ["--vllm-version", plan.vllm_version]
        knobs = dataclasses.replace(knobs, vllm_version=parse_version(plan.vllm_version))
    if "--kv-cache-dtype" in args[:-1]:
        value = args[args.index("--kv-cache-dtype") + 1]
        argv += ["--kv-cache-dtype", value]
        knobs = dataclasses.replace(knobs, kv_cache_dtype=value)
    if "--block-size" in args[:-1]:
        value = args[args.index("--block-size") + 1]
        argv += ["--block-size", value]
        knobs = dataclasses.replace(knobs, block_size=int(value))
    if "--enforce-eager" in args:
        argv.append("--enforce-eager")
        knobs = dataclasses.replace(knobs, enforce_eager=True)
    weights = plan.weights_gib if plan.weights_source == "--weights-gib" else None
    if weights is not None:
        argv += ["--weights-gib", f"{weights:g}"]  # unified boxes have one GPU: per rank = whole model
    reserve = plan.unified_reserve_gib
    if reserve is not None and reserve != DEFAULT_UNIFIED_RESERVE_GIB:
        argv += ["--reserve-gib", f"{reserve:g}"]
    images = plan.images_per_request if plan.multimodal else None
    if images is not None:
        argv += ["--images-per-request", f"{images:g}"]
    concurrency = plan.concurrency if plan.concurrency is not None and plan.concurrency >= 1 else 1
    argv += ["--concurrency", str(concurrency)]
    served = plan.served_model_name
    if served:
        argv += ["--served-model-name", served]
    inputs = PlanInputs(
        model=Path(model),
        hardware=hardware,
        knobs=knobs,
        served_model_name=served,
        concurrency=concurrency,
        images_per_request=int(images) if images is not None else None,
        weights_gib=weights,
        reserve_gib=reserve if reserve is not None else DEFAULT_UNIFIED_RESERVE_GIB,
    )
    return [*argv, "--write-env", str(DEFAULT_PLAN.parent)], inputs


def gate_plan(plan: PlanFile | Mapping[str, Any]) -> GatePlan:
    """The gate's view of ``plan.json`` (read, or as its parsed document); InputError when a figure it needs is
    missing."""
    plan = plan if isinstance(plan, PlanFile) else PlanFile.from_document(plan)
    util, total, args = plan.gpu_memory_utilization, plan.total_gib, plan.vllm_args
    model = args[args.index("--model") + 1] if "--model" in args[:-1] else None
    if not plan.unified:
        return GatePlan(False, 0.0, 0, 0, None, [], None, 0)
    if util is None or total is None or model is None:
        raise InputError(
            "The vLLM plan lacks gpu_memory_utilization, total_gib or vLLM's --model argument.",
            "Write it again with `clinic-edge plan MODEL --write-env /etc/clinic-edge/vllm`.",
        )
    total_bytes = int(total * GIB)
    argv, inputs = _replan(plan, model)
    requested = plan.requested_bytes
    if requested is None:  # plans written before the planner recorded it
        requested = math.ceil(total_bytes * util)
    return GatePlan(
        unified=True,
        utilization=util,
        total_bytes=total_bytes,
        requested_bytes=requested,
        model_dir=Path(model),
        replan_argv=argv,
        replan_inputs=inputs,
        max_model_len=plan.max_model_len or 0,
    )


def drop_page_cache(model_dir: Path) -> PageCacheDrop:
    """Ask the kernel to drop the cached pages of every file under ``model_dir`` (read-only; no privilege needed).

    Pages that are dirty or mapped by a running process stay; nothing here can tell how many went.
    """
    out = PageCacheDrop()
    paths = [model_dir] if model_dir.is_file() else sorted(p for p in model_dir.rglob("*") if p.is_file())
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            out.skipped.append(f"{path}: {exc.strerror or exc}")
            continue
        try:
            size = os.fstat(fd).st_size
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # offset 0, length 0: the whole file
            out.files += 1
            out.bytes += size
        except OSError as exc:
            out.skipped.append(f"{path}: {exc.strerror or exc}")
        finally:
            os.close(fd)
    return out


def _g(n: float) -> str:
    return f"{n / GIB:.2f}"


def _largest_len_that_passes(plan: GatePlan, asks: Callable[[Plan], int], available: int) -> int | None:
    """The largest --max-model-len (a multiple of 1024 when ≥ 1024) whose plan fits and whose start-up request
    ``asks`` fits in ``available``: the planner itself, searched (requests grow with the context)."""
    if plan.replan_inputs is None:
        return None
    lo, hi, best = MIN_USEFUL_TOKENS, plan.max_model_len - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        try:
            trial = make_plan(dataclasses.replace(plan.replan_inputs, max_model_len=mid))
        except ClinicEdgeError:  # e.g. the images take more than mid tokens, or the model cannot be read
            trial = None
        if trial is not None and trial.verdict == "fits" and asks(trial) <= available:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best // 1024 * 1024 if best is not None and best >= 1024 else best


def _remedy(plan: GatePlan, asks: Callable[[Plan], int], available: int) -> str:
    stop = (
        "Stop other programs that hold memory or the GPU (see `nvidia-smi` and `ps aux --sort=-rss | head`; e.g. "
        "`sudo systemctl stop <service>` or `docker stop <container>`), then `sudo systemctl restart "
        "'clinic-edge-vllm@*'`"
    )
    shorter = _largest_len_that_passes(plan, asks, available)
    if shorter is None:
        return stop + "; or choose a smaller model: no useful context fits in what is free now."
    cmd = " ".join([*plan.replan_argv, "--max-model-len", str(shorter)])
    return f"{stop}; or re-plan with a smaller context that fits what is free now: `sudo {cmd}`."


def run_gate(
    plan: GatePlan,
    meminfo: Path = Path("/proc/meminfo"),
    drop: Callable[[Path], PageCacheDrop] | None = None,
) -> GateResult:
    """Pass when MemAvailable covers vLLM's request plus its own CUDA context, dropping the model's page cache first
    when it does not."""
    if not plan.unified:
        return GateResult(
            True,
            "vllm-gate: ok: discrete-GPU plan; vLLM's start-up check is against GPU memory, which NVML covers",
            unified=False,
        )
    host = read_meminfo(meminfo)

    def _asks(planned: int, utilization: float) -> int:
        # vLLM's check uses CUDA's total; on unified memory that is about MemTotal: take the larger, to be safe.
        return max(planned, math.ceil(host.total * utilization)) + int(VLLM_CONTEXT_GIB * GIB)

    needed = _asks(plan.requested_bytes, plan.utilization)
    requested = needed - int(VLLM_CONTEXT_GIB * GIB)
    figures = (
        f"vLLM will ask {_g(requested)} GiB ({plan.utilization:g} × {_g(max(plan.total_bytes, host.total))} GiB) "
        f"+ {VLLM_CONTEXT_GIB:g} GiB for its CUDA context"
    )
    result = GateResult(False, "", requested_bytes=requested, needed_bytes=needed, available_bytes=host.available)
    available = host.available
    if available < needed and plan.model_dir is not None:
        result.dropped = (drop or drop_page_cache)(plan.model_dir)
        available = read_meminfo(meminfo).available
        result.available_after_drop_bytes = available
    dropped = ""
    if result.dropped is not None:
        dropped = (
            f"; dropped the page cache of {result.dropped.files} model file(s) ({_g(result.dropped.bytes)} GiB): "
            f"{_g(host.available)} → {_g(available)} GiB available"
        )
    if available >= needed:
        result.passed = True
        result.message = f"vllm-gate: ok: MemAvailable {_g(available)} GiB ≥ {_g(needed)} GiB: {figures}{dropped}"
        return result
    short = needed - available
    result.message = (
        f"vllm-gate: not enough free memory for vLLM to start: MemAvailable {_g(available)} of {_g(host.total)} GiB, "
        f"{_g(short)} GiB short: {figures}{dropped}. What holds the other {_g(host.total - available)} GiB is "
        "unknown to us (other programs, the kernel, page cache of other files)."
    )
    result.remedy = _remedy(plan, lambda p: _asks(p.budget.requested_bytes, p.budget.utilization), available)
    return result
