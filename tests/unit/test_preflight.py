"""Preflight: profile resolution from GPU facts shaped after NVML/nvidia-smi, and the checks' remedies."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest

from appliance import preflight
from appliance.preflight import GpuFacts, resolve_profile, run_checks
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("names", "dgx", "arch", "want"),
    [
        (["NVIDIA GB10"], True, "aarch64", "dgx-spark"),
        ([], True, "aarch64", "dgx-spark"),
        (["NVIDIA H100 80GB HBM3"] * 2, False, "x86_64", "h100"),
        (["NVIDIA H200"], False, "x86_64", "h200"),
    ],
)
def test_auto_resolves_the_profile_from_the_gpu(names: list[str], dgx: bool, arch: str, want: str) -> None:
    profile, check = resolve_profile("auto", GpuFacts(names=names, driver_works=bool(names)), dgx, arch)
    assert (profile, check.status) == (want, "ok")


def test_no_gpu_fails_and_points_at_the_rehearsal() -> None:
    _, check = resolve_profile("auto", GpuFacts(), False, "x86_64")
    assert check.status == "fail"
    assert "--rehearse" in check.remedy


def test_a_gpu_without_driver_asks_for_an_explicit_profile() -> None:
    _, check = resolve_profile("auto", GpuFacts(pci_present=True), False, "x86_64")
    assert check.status == "fail" and "--profile" in check.remedy


def _model(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "weights.bin").write_bytes(b"\0" * 1_000_000)
    return model


def test_cpu_profile_passes_on_this_machine(tmp_path: Path) -> None:
    report = run_checks("cpu", _model(tmp_path), free_port(), tmp_path / "state", prefix=tmp_path / "opt",
                        gpus=GpuFacts())  # fmt: skip
    failed = [c for c in report.checks if c.status == "fail" and c.name != "systemd"]
    assert failed == []
    assert report.profile == "cpu"


DiskUsage = namedtuple("DiskUsage", "total used free")


def test_too_little_disk_for_the_model_fails_with_a_remedy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda _p: DiskUsage(10**9, 10**9, 1000))
    report = run_checks("cpu", _model(tmp_path), free_port(), tmp_path / "state", prefix=tmp_path / "opt",
                        gpus=GpuFacts())  # fmt: skip
    disk = next(c for c in report.checks if c.name == "disk for the model")
    assert disk.status == "fail"
    assert "Free space" in disk.remedy
    assert not report.passed


def test_a_busy_gateway_port_fails(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        report = run_checks("cpu", _model(tmp_path), port, tmp_path / "state", prefix=tmp_path / "opt",
                            gpus=GpuFacts())  # fmt: skip
    ports = next(c for c in report.checks if c.name == "ports")
    assert ports.status == "fail" and str(port) in ports.detail


def test_a_gpu_profile_without_a_working_driver_under_secure_boot_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(preflight, "_secure_boot", lambda: True)
    report = run_checks("h100", _model(tmp_path), free_port(), tmp_path / "state", prefix=tmp_path / "opt",
                        gpus=GpuFacts(pci_present=True))  # fmt: skip
    sb = next(c for c in report.checks if c.name == "secure boot")
    assert sb.status == "fail" and "mokutil" in sb.remedy


def test_the_script_runs_alone_with_the_standard_library(tmp_path: Path) -> None:
    # The preflight role ships this one file to each box of an inventory (ansible.builtin.script).
    alone = tmp_path / "preflight.py"
    alone.write_text((ROOT / "appliance/preflight.py").read_text())
    proc = subprocess.run(
        ["python3", "-S", str(alone), "--json", "--profile", "cpu", "--model", str(_model(tmp_path)),
         "--port", str(free_port()), "--state-dir", str(tmp_path / "state"), "--prefix", str(tmp_path / "opt")],
        capture_output=True, text=True, check=False, env={"PATH": os.environ["PATH"]},
    )  # fmt: skip
    report = json.loads(proc.stdout)
    assert report["profile"] == "cpu"
    assert {c["name"] for c in report["checks"]} >= {"profile", "host memory", "disk for the model", "ports"}
