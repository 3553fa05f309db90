"""The memory panel: per-GPU (or unified) memory with the vLLM processes' share, and each replica's KV cache."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.text import Text
from textual.widgets import Static

from appliance.hardware import GpuDevice
from appliance.telemetry.parts import MemoryPart, VllmPart
from tui.widgets.bars import bar, gib, na

__all__ = ["MemoryPanel", "render_memory", "render_replicas"]


def _vllm_share(gpu: GpuDevice, part: MemoryPart) -> tuple[int | None, bool]:
    """Bytes vLLM holds on ``gpu`` per NVML, and whether NVML listed any vLLM process there at all."""
    pids = part.vllm_pids()
    listed = [mem for pid, mem in gpu.processes.items() if pid in pids]
    known = [m for m in listed if m is not None]
    return (sum(known) if known else None), bool(listed)


def _gpu_lines(gpu: GpuDevice, part: MemoryPart) -> list[Text]:
    util = f"  util {gpu.utilization_pct} %" if gpu.utilization_pct is not None else "  util N/A"
    held, listed = _vllm_share(gpu, part)
    if gpu.unified:
        assert part.hardware is not None
        host = part.hardware.host
        head = Text.assemble((f"GPU {gpu.index} ", "bold"), gpu.name, ("  unified memory", "bold magenta"), util)
        frac = host.used / host.total if host.total else None
        usage = Text.assemble("  ", bar(frac), f" {gib(host.used)} / {gib(host.total)} · free {gib(host.available)}")
        if held is None and part.vllm_processes:
            vllm = Text(f"  vLLM holds {gib(part.vllm_rss())} (resident, {len(part.vllm_processes)} processes)")
        elif held is not None:
            vllm = Text(f"  vLLM holds {gib(held)}" + (f" ({held / host.total:.0%})" if host.total else ""))
        else:
            vllm = Text("  vLLM holds: no vLLM process found", style="yellow")
        return [head, usage, vllm]
    head = Text.assemble((f"GPU {gpu.index} ", "bold"), gpu.name, util)
    total, used = gpu.memory_total, gpu.memory_used
    frac = used / total if used is not None and total else None
    pct = f" ({frac:.0%})" if frac is not None else ""
    usage = Text.assemble("  ", bar(frac), f" {gib(used)} / {gib(total)}{pct}")
    if held is not None:
        share = f" ({held / total:.0%} of the GPU)" if total else ""
        vllm = Text(f"  vLLM holds {gib(held)}{share}")
    elif listed:
        vllm = Text("  vLLM holds N/A (NVML does not report per-process memory)")
    else:
        vllm = Text("  vLLM holds: no vLLM process on this GPU", style="yellow")
    return [head, usage, vllm]


def render_memory(part: MemoryPart | None) -> RenderableType:
    """Memory lines for ``part`` (``None``: still reading)."""
    if part is None:
        return Text("reading…", style="dim")
    lines: list[RenderableType] = []
    if part.error:
        lines.append(Text(f"⚠ {part.error}", style="bold red"))
    hw = part.hardware
    if hw is None:
        return Group(*lines)
    if not hw.gpus:
        lines.append(Text("No NVIDIA GPU", style="bold yellow"))
        lines.append(Text(f"  {hw.nvml_error or 'NVML found no device'}", style="dim"))
        frac = hw.host.used / hw.host.total if hw.host.total else None
        lines.append(Text.assemble("  host ", bar(frac), f" {gib(hw.host.used)} / {gib(hw.host.total)}"))
        if part.vllm_processes:
            lines.append(Text(f"  vLLM resident {gib(part.vllm_rss())} ({len(part.vllm_processes)} processes)"))
        return Group(*lines)
    for gpu in hw.gpus:
        lines.extend(_gpu_lines(gpu, part))
    if hw.driver_version:
        lines.append(Text(f"driver {hw.driver_version}", style="dim"))
    return Group(*lines)


def render_replicas(part: VllmPart | None) -> RenderableType:
    """One line per vLLM replica: health, KV-cache usage, running and waiting requests."""
    if part is None:
        return Text("reading…", style="dim")
    if part.error:
        return Text(f"⚠ {part.error}", style="bold red")
    lines: list[Text] = []
    for replica in part.replicas:
        port = replica.url.rsplit(":", 1)[-1]
        state = (
            Text(" up ", style="bold black on green") if replica.healthy else Text(" DOWN ", style="bold white on red")
        )
        kv = replica.kv_cache_usage
        lines.append(
            Text.assemble(
                f":{port} ",
                state,
                "  KV ",
                bar(kv, width=12),
                f" {na(None if kv is None else kv * 100, '{:.0f} %')}",
                f"  running {na(replica.running, '{:.0f}')}  waiting {na(replica.waiting, '{:.0f}')}",
            )
        )
        if replica.error:
            lines.append(Text(f"  {replica.error}", style="red"))
    return Group(*lines)


class MemoryPanel(Static):
    """GPU / unified memory and vLLM's view of its KV cache."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(Text("reading…", style="dim"), **kwargs)  # type: ignore[arg-type]
        self.border_title = "Memory"
        self._memory: MemoryPart | None = None
        self._vllm: VllmPart | None = None

    def show(self, memory: MemoryPart | None = None, vllm: VllmPart | None = None) -> None:
        """Update whichever part arrived and redraw."""
        self._memory = memory or self._memory
        self._vllm = vllm or self._vllm
        self.update(
            Group(
                render_memory(self._memory), Text(""), Text("vLLM replicas", style="bold"), render_replicas(self._vllm)
            )
        )
