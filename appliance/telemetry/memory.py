"""Accelerator memory for the memory panel: :func:`appliance.hardware.probe` (the one NVML module) plus the vLLM
processes found with psutil, so the panel can show what vLLM holds — on unified memory (GB10) too, where NVML
reports no memory at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psutil

from appliance.hardware import HardwareSnapshot, HostMemory, probe, read_meminfo
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


def _refresh_rss(known: list[VllmProcess]) -> list[VllmProcess] | None:
    """The known vLLM processes with fresh RSS, or ``None`` when one of them is gone (then rescan)."""
    fresh = []
    for p in known:
        try:
            fresh.append(VllmProcess(p.pid, int(psutil.Process(p.pid).memory_info().rss), p.name))
        except psutil.Error:
            return None
    return fresh


class MemorySource:
    """GPU (or unified) memory and the vLLM processes' share.

    Kept cheap for a 2 s refresh: a box without an NVIDIA driver is re-probed every ``nvml_retry_s`` (host memory is
    read every time), and the full process scan runs every ``scan_every_s``; in between only the RSS of the known
    vLLM processes is re-read.
    """

    name = "memory"

    def __init__(
        self,
        hardware: Callable[[], HardwareSnapshot] = probe,
        processes: Callable[[], list[ProcessInfo]] = live_processes,
        *,
        meminfo: Callable[[], HostMemory] = read_meminfo,
        nvml_retry_s: float = 60.0,
        scan_every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._hardware = hardware
        self._processes = processes
        self._meminfo = meminfo
        self._nvml_retry_s = nvml_retry_s
        self._scan_every_s = scan_every_s
        self._clock = clock
        self._no_driver: tuple[float, str] | None = None
        self._vllm: tuple[float, list[VllmProcess]] | None = None

    def _snapshot(self) -> HardwareSnapshot:
        now = self._clock()
        if self._no_driver is not None and now - self._no_driver[0] < self._nvml_retry_s:
            return HardwareSnapshot(gpus=[], host=self._meminfo(), nvml_error=self._no_driver[1])
        snapshot = self._hardware()
        no_driver = not snapshot.gpus and snapshot.nvml_error is not None
        self._no_driver = (now, snapshot.nvml_error or "") if no_driver else None
        return snapshot

    def _vllm_processes(self) -> list[VllmProcess]:
        now = self._clock()
        if self._vllm is not None and now - self._vllm[0] < self._scan_every_s and self._processes is live_processes:
            fresh = _refresh_rss(self._vllm[1])
            if fresh is not None:
                return fresh
        found = find_vllm_processes(self._processes())
        self._vllm = (now, found)
        return found

    def read(self) -> MemoryPart:
        """One probe of the GPUs and host memory, and the vLLM processes."""
        try:
            snapshot = self._snapshot()
        except OSError as exc:
            return MemoryPart(error=f"cannot read memory: {exc}")
        try:
            vllm = self._vllm_processes()
        except (OSError, psutil.Error) as exc:
            return MemoryPart(hardware=snapshot, error=f"cannot list processes: {exc}")
        return MemoryPart(hardware=snapshot, vllm_processes=vllm)
