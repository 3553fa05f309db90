"""Recorded telemetry: the same source classes as live, fed from one scenario file instead of the machine.

Used by the tests (each dashboard snapshot is a recorded scenario), by the CPU benchmark, and by
``clinic-edge dashboard --replay FILE`` to show a scenario without the hardware. A scenario is JSON::

    {"now": ISO-8601, "hostname": str, "meminfo": {"total_kib", "available_kib"},
     "nvml": null | {"init_error": str} | {"driver": str, "devices": [{"name", "uuid",
              "memory": {"total", "used"} | "NotSupported", "processes": [{"pid", "used"}],
              "util": int | "NotSupported"}]},
     "processes": [{"pid", "ppid", "cmdline", "rss"}],
     "commands": {"systemctl": {"returncode", "stdout", "stderr"}, "journalctl": {...}},
     "http": {URL: {"status", "body"} | {"error": str}},
     "files": {"etc/RELATIVE": text | JSON value, "state/RELATIVE": ...},
     "vllm_urls": [URL], "gateway_url": URL}

NVML is replayed through a stand-in module with pynvml's function names, so :func:`appliance.hardware.probe` runs
its real logic (the GB10 fallback included); ``null`` means pynvml is absent.
"""

from __future__ import annotations

import json
import types
from collections.abc import Sequence
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from appliance.hardware import HardwareSnapshot, probe, read_meminfo
from appliance.telemetry.config import ConfigSource
from appliance.telemetry.gateway import GatewaySource
from appliance.telemetry.http import FetchError, HttpAnswer
from appliance.telemetry.memory import MemorySource, ProcessInfo
from appliance.telemetry.selftest_files import SelftestSource
from appliance.telemetry.sources import Sources
from appliance.telemetry.systemd import CommandResult, SystemdSource, clinic_edge_units
from appliance.telemetry.vllm import VllmSource

__all__ = ["load_scenario", "recorded_nvml", "replay_sources"]


class _NVMLError(Exception):
    pass


class _NVMLNotSupportedError(_NVMLError):
    def __str__(self) -> str:
        return "Not Supported"


def recorded_nvml(record: dict[str, Any]) -> types.ModuleType:
    """A module shaped like pynvml answering from ``record`` (``"NotSupported"`` values raise NotSupported)."""
    mod = types.ModuleType("recorded_pynvml")
    devices: list[dict[str, Any]] = list(record.get("devices", []))

    def answer(key: str, handle: int) -> Any:
        value = devices[handle].get(key, "NotSupported")
        if value == "NotSupported":
            raise _NVMLNotSupportedError()
        if key == "memory":
            return types.SimpleNamespace(total=value["total"], used=value["used"], free=value["total"] - value["used"])
        if key == "processes":
            return [types.SimpleNamespace(pid=p["pid"], usedGpuMemory=p.get("used")) for p in value]
        if key == "util":
            return types.SimpleNamespace(gpu=value, memory=0)
        return value

    def init() -> None:
        if record.get("init_error"):
            raise _NVMLError(record["init_error"])

    functions: dict[str, Any] = {
        "NVMLError": _NVMLError,
        "nvmlInit": init,
        "nvmlShutdown": lambda: None,
        "nvmlDeviceGetCount": lambda: len(devices),
        "nvmlDeviceGetHandleByIndex": lambda i: i,
        "nvmlSystemGetDriverVersion": lambda: record.get("driver", "unknown"),
        "nvmlDeviceGetName": partial(answer, "name"),
        "nvmlDeviceGetUUID": partial(answer, "uuid"),
        "nvmlDeviceGetMemoryInfo": partial(answer, "memory"),
        "nvmlDeviceGetComputeRunningProcesses": partial(answer, "processes"),
        "nvmlDeviceGetGraphicsRunningProcesses": lambda h: [],
        "nvmlDeviceGetUtilizationRates": partial(answer, "util"),
    }
    for name, fn in functions.items():
        setattr(mod, name, fn)
    return mod


def load_scenario(path: Path) -> dict[str, Any]:
    """A scenario document from ``path``."""
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict):
        raise ValueError(f"{path} is not a scenario (a JSON object)")
    return doc


def _materialise(scenario: dict[str, Any], root: Path) -> tuple[Path, Path, Path]:
    etc, state = root / "etc", root / "state"
    for relative, content in scenario.get("files", {}).items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content if isinstance(content, str) else json.dumps(content, indent=1))
    meminfo = root / "meminfo"
    mem = scenario.get("meminfo", {"total_kib": 16 * 1024**2, "available_kib": 8 * 1024**2})
    meminfo.write_text(f"MemTotal: {mem['total_kib']} kB\nMemAvailable: {mem['available_kib']} kB\n")
    return etc, state, meminfo


def replay_sources(scenario: dict[str, Any], root: Path) -> Sources:
    """Sources answering from ``scenario``; its files are written under ``root`` (a fresh directory)."""
    etc, state, meminfo = _materialise(scenario, root)
    http: dict[str, Any] = scenario.get("http", {})
    commands: dict[str, Any] = scenario.get("commands", {})

    def fetch(url: str) -> HttpAnswer:
        answer = http.get(url, {"error": "connection refused (service not running?)"})
        if "error" in answer:
            raise FetchError(answer["error"])
        body = answer.get("body", "")
        return HttpAnswer(int(answer.get("status", 200)), body if isinstance(body, str) else json.dumps(body))

    def run(argv: Sequence[str]) -> CommandResult:
        result = commands.get(argv[0], {"returncode": 127, "stderr": f"{argv[0]} not found"})
        return CommandResult(int(result.get("returncode", 0)), result.get("stdout", ""), result.get("stderr", ""))

    nvml_record = scenario.get("nvml")
    nvml = recorded_nvml(nvml_record) if isinstance(nvml_record, dict) else None
    processes = [
        ProcessInfo(p["pid"], p.get("ppid", 1), p["cmdline"], p.get("rss", 0)) for p in scenario.get("processes", [])
    ]

    def hardware() -> HardwareSnapshot:
        if nvml is None:
            return HardwareSnapshot(gpus=[], host=read_meminfo(meminfo), nvml_error="pynvml is not installed")
        return probe(nvml, meminfo)

    urls: list[str] = scenario.get("vllm_urls", ["http://127.0.0.1:8000"])
    units = SystemdSource(clinic_edge_units(len(urls)), run)
    now = datetime.fromisoformat(scenario.get("now", "2026-11-23T08:00:00+00:00"))
    return Sources(
        config=ConfigSource(etc, scenario.get("hostname", "clinic-box")),
        memory=MemorySource(hardware, lambda: processes, meminfo=lambda: read_meminfo(meminfo)),
        vllm=VllmSource(urls, fetch),
        gateway=GatewaySource(scenario.get("gateway_url", "https://127.0.0.1:8443"), fetch),
        units=units,
        selftest=SelftestSource(state),
        journal=units.journal,
        clock=lambda: now,
    )
