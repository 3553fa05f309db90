"""hardware.probe against a fake NVML shaped after pynvml's documented behaviour (no GPU exists here)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

from appliance.hardware import probe, read_meminfo
from tests.fakes.nvml import FakeGpu, build_fake_nvml, write_fake_nvml_config

GIB = 1024**3


class NVMLError(Exception):
    pass


class NVMLErrorNotSupported(NVMLError):
    pass


def fake_nvml(devices: list[dict[str, Any]], init_error: Exception | None = None) -> types.ModuleType:
    """A module with pynvml's function names; a device dict value that is an exception is raised."""
    mod = types.ModuleType("pynvml")
    mod.NVMLError = NVMLError  # type: ignore[attr-defined]

    def answer(handle: int, key: str) -> Any:
        value = devices[handle][key]
        if isinstance(value, Exception):
            raise value
        return value

    def init() -> None:
        if init_error:
            raise init_error

    mod.nvmlInit = init  # type: ignore[attr-defined]
    mod.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    mod.nvmlDeviceGetCount = lambda: len(devices)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    mod.nvmlSystemGetDriverVersion = lambda: "580.95.05"  # type: ignore[attr-defined]
    for fn, key in {
        "nvmlDeviceGetName": "name",
        "nvmlDeviceGetUUID": "uuid",
        "nvmlDeviceGetMemoryInfo": "memory",
        "nvmlDeviceGetComputeRunningProcesses": "procs",
        "nvmlDeviceGetGraphicsRunningProcesses": "gprocs",
        "nvmlDeviceGetUtilizationRates": "util",
    }.items():
        setattr(mod, fn, lambda h, k=key: answer(h, k))
    return mod


def meminfo(tmp_path: Path, total_kib: int, avail_kib: int) -> Path:
    p = tmp_path / "meminfo"
    p.write_text(f"MemTotal:       {total_kib} kB\nMemFree:        1000 kB\nMemAvailable:   {avail_kib} kB\n")
    return p


def test_h100_reads_nvml_memory_and_processes(tmp_path: Path) -> None:
    dev = {
        "name": "NVIDIA H100 80GB HBM3",
        "uuid": "GPU-1",
        "memory": types.SimpleNamespace(total=85520809984, used=70 * GIB, free=0),
        "procs": [types.SimpleNamespace(pid=4242, usedGpuMemory=69 * GIB)],
        "gprocs": [],
        "util": types.SimpleNamespace(gpu=87, memory=40),
    }
    snap = probe(fake_nvml([dev]), meminfo(tmp_path, 2 * 1024**3, 1024**3))
    (gpu,) = snap.gpus
    assert not snap.unified and gpu.memory_total == 85520809984 and gpu.memory_used == 70 * GIB
    assert gpu.processes == {4242: 69 * GIB} and gpu.utilization_pct == 87
    assert snap.driver_version == "580.95.05"


def test_gb10_not_supported_falls_back_to_meminfo(tmp_path: Path) -> None:
    dev = {
        "name": "NVIDIA GB10",
        "uuid": "GPU-x",
        "memory": NVMLErrorNotSupported(),
        "procs": [types.SimpleNamespace(pid=7, usedGpuMemory=None)],
        "gprocs": NVMLErrorNotSupported(),
        "util": NVMLErrorNotSupported(),
    }
    total, avail = 127_535_000, 100_000_000  # kB
    snap = probe(fake_nvml([dev]), meminfo(tmp_path, total, avail))
    (gpu,) = snap.gpus
    assert snap.unified and gpu.unified
    assert gpu.memory_total == total * 1024 and gpu.memory_used == (total - avail) * 1024
    assert gpu.utilization_pct is None and gpu.processes == {7: None}


def test_total_zero_is_unified_too(tmp_path: Path) -> None:
    dev = {
        "name": "NVIDIA Thor",
        "uuid": None,
        "memory": types.SimpleNamespace(total=0, used=0, free=0),
        "procs": [],
        "gprocs": [],
        "util": types.SimpleNamespace(gpu=0, memory=0),
    }
    assert probe(fake_nvml([dev]), meminfo(tmp_path, 1000, 500)).unified


def test_no_driver_says_so(tmp_path: Path) -> None:
    snap = probe(fake_nvml([], init_error=NVMLError("NVML Shared Library Not Found")), meminfo(tmp_path, 1000, 500))
    assert snap.gpus == [] and snap.nvml_error and "Not Found" in snap.nvml_error


def test_read_meminfo_of_this_machine() -> None:
    host = read_meminfo()
    assert host.total > host.available > 0


def _probe_with_real_pynvml(tmp_path: Path, gpus: list[FakeGpu], **config: Any) -> dict[str, Any]:
    """hardware.probe() in a fresh process whose pynvml finds the fake libnvidia-ml.so.1 by name, as on a box."""
    lib = build_fake_nvml(tmp_path / "lib")
    nvml_config = write_fake_nvml_config(tmp_path / "nvml.conf", gpus, **config)
    env = dict(os.environ, LD_LIBRARY_PATH=str(lib.parent), FAKE_NVML_CONFIG=str(nvml_config))
    code = "import json; from appliance.hardware import probe; print(json.dumps(probe().to_dict()))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_the_real_pynvml_reads_fabric_state_and_cuda_version(tmp_path: Path) -> None:
    snap = _probe_with_real_pynvml(tmp_path, [FakeGpu(fabric_state=3), FakeGpu(fabric_state=2)], cuda=13000)
    assert snap["driver_version"] == "580.95.05" and snap["cuda_driver_version"] == 13000
    assert [g["fabric"] for g in snap["gpus"]] == ["completed", "in-progress"]
    assert [g["memory_total"] for g in snap["gpus"]] == [81559 * 1024**2] * 2
    assert snap["gpus"][0]["processes"] == {}


def test_pcie_gpus_and_gb10_report_no_fabric(tmp_path: Path) -> None:
    snap = _probe_with_real_pynvml(tmp_path, [FakeGpu(name="NVIDIA H100 NVL"), FakeGpu(name="NVIDIA GB10", total=0)])
    assert [g["fabric"] for g in snap["gpus"]] == [None, None]
    assert snap["gpus"][1]["unified"] is True and snap["unified"] is True


def test_a_gpu_off_its_fabric_makes_the_box_unhealthy(tmp_path: Path) -> None:
    from appliance.telemetry.health import problems
    from appliance.telemetry.replay import replay_sources
    from appliance.telemetry.sources import collect

    fixtures = Path(__file__).parents[1] / "fixtures" / "dashboard"
    scenario = json.loads((fixtures / "h100_healthy.json").read_text())
    snap = collect(replay_sources(scenario, tmp_path))
    assert problems(snap, snap.taken_at) == []
    gpu = snap.memory.hardware.gpus[0] if snap.memory.hardware else None
    assert gpu is not None
    stuck = dataclasses.replace(gpu, fabric="not-started")
    hardware = dataclasses.replace(snap.memory.hardware, gpus=[stuck])  # type: ignore[type-var]
    snap = dataclasses.replace(snap, memory=dataclasses.replace(snap.memory, hardware=hardware))
    (problem,) = problems(snap, snap.taken_at)
    assert problem.severity == "bad" and "NVSwitch fabric (not-started)" in problem.text and "802" in problem.text
