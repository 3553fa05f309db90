"""Accelerator memory for the memory panel: :func:`appliance.hardware.probe` (the one NVML module) plus the vLLM
processes found with psutil, so the panel can show what vLLM holds — on unified memory (GB10) too, where NVML
reports no memory at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psutil

from appliance.hardware import HardwareSnapshot, probe
from appliance.telemetry.parts import MemoryPart, VllmProcess

__all__ = ["MemorySource", "ProcessInfo", "find_vllm_processes", "live_processes"]


@dataclass(frozen=True)
class ProcessInfo:
    """What the memory source needs to know about one process."""

    pid: int
    ppid: int
    cmdline: str
    rss: int


def _is_vllm(cmdline: str) -> bool:
    text = cmdline.lower()
    # The API server (python -m vllm.entrypoints..., "vllm serve") and its engine core ("VLLM::EngineCore").
    return "vllm.entrypoints" in text or "vllm serve" in text or text.startswith("vllm::")


def find_vllm_processes(processes: Iterable[ProcessInfo]) -> list[VllmProcess]:
    """vLLM processes and their descendants (engine workers), by pid."""
    procs = list(processes)
    children: dict[int, list[ProcessInfo]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    found: dict[int, ProcessInfo] = {}
    stack = [p for p in procs if _is_vllm(p.cmdline)]
    while stack:
        p = stack.pop()
        if p.pid in found:
            continue
        found[p.pid] = p
        stack.extend(children.get(p.pid, []))
    return [
        VllmProcess(pid=p.pid, rss=p.rss, name=p.cmdline.split(" ")[0][-40:])
        for p in sorted(found.values(), key=lambda p: p.pid)
    ]


def live_processes() -> list[ProcessInfo]:
    """Every process psutil can see (a vanished or protected process is skipped)."""
    result: list[ProcessInfo] = []
    for proc in psutil.process_iter(["pid", "ppid", "cmdline", "memory_info"]):
        info = proc.info
        cmdline = " ".join(info.get("cmdline") or [])
        mem = info.get("memory_info")
        if not cmdline:
            continue
        result.append(ProcessInfo(int(info["pid"]), int(info.get("ppid") or 0), cmdline, int(mem.rss) if mem else 0))
    return result


class MemorySource:
    """GPU (or unified) memory and the vLLM processes' share."""

    name = "memory"

    def __init__(
        self,
        hardware: Callable[[], HardwareSnapshot] = probe,
        processes: Callable[[], list[ProcessInfo]] = live_processes,
    ) -> None:
        self._hardware = hardware
        self._processes = processes

    def read(self) -> MemoryPart:
        """One probe of the GPUs and host memory, and the vLLM processes."""
        try:
            snapshot = self._hardware()
        except OSError as exc:
            return MemoryPart(error=f"cannot read memory: {exc}")
        try:
            vllm = find_vllm_processes(self._processes())
        except (OSError, psutil.Error) as exc:
            return MemoryPart(hardware=snapshot, error=f"cannot list processes: {exc}")
        return MemoryPart(hardware=snapshot, vllm_processes=vllm)
