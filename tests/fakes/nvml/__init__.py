"""A fake ``libnvidia-ml.so.1`` (``fake_nvml.c``), built with the system C compiler, and its configuration file.

The real pynvml and the preflight's ctypes reader load it exactly as they load NVIDIA's library: by path, or by name
through ``LD_LIBRARY_PATH``. It answers after the NVML API reference (see the C file's header); nothing else about a
GPU is faked.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FakeGpu", "build_fake_nvml", "write_fake_nvml_config"]

SOURCE = Path(__file__).with_name("fake_nvml.c")
LIBRARY = "libnvidia-ml.so.1"
GIB = 1024**3
# NVML's totals for the GPUs we ship to (nvidia-smi's MiB × 2^20).
H100_SXM_TOTAL = 81559 * 1024**2
H200_TOTAL = 143771 * 1024**2
NOT_ON_A_FABRIC = -1  # nvmlDeviceGetGpuFabricInfo answers NOT_SUPPORTED (PCIe cards)


@dataclass(frozen=True)
class FakeGpu:
    """One device as NVML will report it; ``total`` 0 means memory queries are not supported (GB10)."""

    name: str = "NVIDIA H100 80GB HBM3"
    total: int = H100_SXM_TOTAL
    used: int = 4 * 1024**2
    fabric_state: int = NOT_ON_A_FABRIC  # NVML_GPU_FABRIC_STATE_*: 1 not started, 2 in progress, 3 completed
    fabric_status: int = 0  # nvmlReturn_t of the fabric probe


def build_fake_nvml(dest: Path) -> Path:
    """Compile the fake library into ``dest/libnvidia-ml.so.1`` (once) and return its path."""
    lib = dest / LIBRARY
    if lib.is_file() and lib.stat().st_mtime >= SOURCE.stat().st_mtime:
        return lib
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("the fake NVML library needs a C compiler: apt-get install gcc")
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(lib), str(SOURCE)],
        check=True,
        capture_output=True,
    )
    return lib


def write_fake_nvml_config(
    path: Path, gpus: list[FakeGpu], *, driver: str = "580.95.05", cuda: int = 13000, init_error: int = 0
) -> Path:
    """Write the file ``FAKE_NVML_CONFIG`` names: the driver, its CUDA version and one line per GPU."""
    lines = [f"driver {driver}", f"cuda {cuda}", f"init {init_error}"]
    lines += [f"gpu {g.name}|{g.total}|{g.used}|{g.fabric_state}|{g.fabric_status}" for g in gpus]
    path.write_text("\n".join(lines) + "\n")
    return path
