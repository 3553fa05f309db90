"""What accelerator memory this box has — the only module that talks to NVML.

Shaped after NVML's documented behaviour and what GB10 (DGX Spark) really returns: ``nvmlDeviceGetMemoryInfo``
raises ``NVMLError_NotSupported`` or reports total 0 on unified-memory boxes; there the truth is host memory from
``/proc/meminfo`` (MemTotal / MemAvailable). Any NVML call that is not supported yields ``None`` (shown as N/A),
never an exception. With no NVIDIA driver at all, :func:`probe` says so plainly.

On NVSwitch (HGX) boxes each GPU also reports its registration with the NVSwitch fabric
(``nvmlDeviceGetGpuFabricInfo``): until Fabric Manager completes it, CUDA fails with error 802 while every memory
figure looks healthy, so the state travels with the device.

Tests replace NVML with a fake module of the same shape (pass ``nvml=`` to :func:`probe`), or load the real pynvml
against a fake ``libnvidia-ml.so.1`` (``tests/fakes/nvml``).
"""

from __future__ import annotations

import ctypes
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from appliance.preflight import fabric_word

__all__ = ["GpuDevice", "HardwareSnapshot", "HostMemory", "probe", "read_meminfo"]

GIB = 1024**3


@dataclass(frozen=True)
class HostMemory:
    """Host memory from ``/proc/meminfo``, in bytes."""

    total: int
    available: int

    @property
    def used(self) -> int:
        """Memory in use (MemTotal − MemAvailable), as nvtop and nvitop report unified memory."""
        return self.total - self.available


@dataclass(frozen=True)
class GpuDevice:
    """One GPU as NVML reports it; ``None`` means NVML does not support that query on this device."""

    index: int
    name: str
    uuid: str | None
    memory_total: int | None
    memory_used: int | None
    unified: bool
    processes: dict[int, int | None] = field(default_factory=dict)  # pid → bytes (None: not reported)
    utilization_pct: int | None = None
    # NVSwitch fabric: None (on no fabric), "not-started", "in-progress", "completed" or "failed: ..."
    fabric: str | None = None

    @property
    def fabric_ready(self) -> bool:
        """False while an NVSwitch GPU has not joined its fabric (CUDA would fail with error 802)."""
        return self.fabric in (None, "completed")


@dataclass(frozen=True)
class HardwareSnapshot:
    """What :func:`probe` found: the GPUs (possibly none), host memory, and why NVML was unusable if it was."""

    gpus: list[GpuDevice]
    host: HostMemory
    nvml_error: str | None = None
    driver_version: str | None = None
    cuda_driver_version: int | None = None  # the newest CUDA the driver runs: 13000 is CUDA 13.0

    @property
    def unified(self) -> bool:
        """True on unified-memory boxes (GB10): GPU memory is host memory."""
        return any(g.unified for g in self.gpus)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (bytes as integers)."""
        return asdict(self) | {"unified": self.unified}


def read_meminfo(path: Path = Path("/proc/meminfo")) -> HostMemory:
    """MemTotal and MemAvailable in bytes."""
    values: dict[str, int] = {}
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    total = values.get("MemTotal", 0)
    return HostMemory(total=total, available=values.get("MemAvailable", values.get("MemFree", 0)))


def _load_nvml() -> ModuleType | None:
    try:
        import pynvml
    except ImportError:
        return None
    module: ModuleType = pynvml
    return module


def _call(nvml: ModuleType, fn: str, *args: Any) -> Any:
    """Call an NVML function; ``None`` for any NVML error (NotSupported on GB10, NoPermission, ...)."""
    call = getattr(nvml, fn, None)
    if call is None:  # an older pynvml without this function: the same as a driver without it
        return None
    try:
        return call(*args)
    except nvml.NVMLError:
        return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _device(nvml: ModuleType, index: int, host: HostMemory) -> GpuDevice:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    name = _text(_call(nvml, "nvmlDeviceGetName", handle)) or "unknown NVIDIA GPU"
    mem = _call(nvml, "nvmlDeviceGetMemoryInfo", handle)
    total = int(mem.total) if mem is not None else None
    used = int(mem.used) if mem is not None else None
    unified = total in (None, 0) or "GB10" in name
    if unified:
        total, used = host.total, host.used
    procs: dict[int, int | None] = {}
    for fn in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        for proc in _call(nvml, fn, handle) or []:
            mem_used = getattr(proc, "usedGpuMemory", None)
            procs[int(proc.pid)] = int(mem_used) if isinstance(mem_used, int) else None
    util = _call(nvml, "nvmlDeviceGetUtilizationRates", handle)
    return GpuDevice(
        fabric=_fabric(nvml, handle),
        index=index,
        name=name,
        uuid=_text(_call(nvml, "nvmlDeviceGetUUID", handle)),
        memory_total=total,
        memory_used=used,
        unified=unified,
        processes=procs,
        utilization_pct=int(util.gpu) if util is not None else None,
    )


def _fabric(nvml: ModuleType, handle: Any) -> str | None:
    """The GPU's NVSwitch fabric state; None where the driver or the GPU has no fabric (NOT_SUPPORTED)."""
    info_type = getattr(nvml, "c_nvmlGpuFabricInfo_t", None)
    if info_type is None:
        return None
    info = info_type()
    # pynvml hands the structure to NVML as it is given: it must be a pointer.
    if _call(nvml, "nvmlDeviceGetGpuFabricInfo", handle, ctypes.byref(info)) is None:
        return None
    return fabric_word(int(info.state), int(info.status))


def probe(nvml: ModuleType | None = None, meminfo: Path = Path("/proc/meminfo")) -> HardwareSnapshot:
    """Read the GPUs and host memory once. Never raises for NVML problems: they land in ``nvml_error``."""
    host = read_meminfo(meminfo)
    nvml = nvml if nvml is not None else _load_nvml()
    if nvml is None:
        return HardwareSnapshot(gpus=[], host=host, nvml_error="pynvml is not installed")
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded on boxes without a driver
        return HardwareSnapshot(gpus=[], host=host, nvml_error=f"no NVIDIA driver answered: {exc}")
    try:
        count = int(nvml.nvmlDeviceGetCount())
        gpus = [_device(nvml, i, host) for i in range(count)]
        driver = _text(_call(nvml, "nvmlSystemGetDriverVersion"))
        cuda = _call(nvml, "nvmlSystemGetCudaDriverVersion_v2")
    finally:
        _call(nvml, "nvmlShutdown")
    return HardwareSnapshot(
        gpus=gpus, host=host, driver_version=driver, cuda_driver_version=cuda if isinstance(cuda, int) else None
    )
