"""Preflight on GPU boxes, against a fake libnvidia-ml.so.1 that answers as NVML documents (no GPU exists here).

Driver branch, NVSwitch fabric and Fabric Manager, the toolchain Triton needs, GB10, Grace Hopper, and a GPU count
that changed since the plan was made: each a clear verdict before anything changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import preflight
from appliance.preflight import GpuFacts, gpu_checks, read_nvml, resolve_profile, wait_for_fabric
from tests.fakes.nvml import FakeGpu, build_fake_nvml, write_fake_nvml_config

ROOT = Path(__file__).resolve().parents[2]
HGX = [FakeGpu(fabric_state=3)] * 8  # eight SXM H100 whose fabric registration completed


@pytest.fixture(scope="session")
def fake_nvml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fake_nvml(tmp_path_factory.mktemp("nvml"))


@pytest.fixture
def nvml_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    config = tmp_path / "nvml.conf"
    monkeypatch.setenv("FAKE_NVML_CONFIG", str(config))
    yield config


def _check(checks: list[preflight.Check], name: str) -> preflight.Check:
    return next(c for c in checks if c.name == name)


def test_nvml_is_read_with_the_standard_library(fake_nvml: Path, nvml_config: Path) -> None:
    write_fake_nvml_config(nvml_config, HGX, driver="580.95.05", cuda=13000)
    facts = read_nvml(str(fake_nvml))
    assert facts.driver_works and facts.source == "nvml"
    assert facts.names == ["NVIDIA H100 80GB HBM3"] * 8
    assert facts.memory_totals == [81559 * 1024**2] * 8
    assert (facts.driver_version, facts.driver_major, facts.cuda_version) == ("580.95.05", 580, 13000)
    assert facts.fabric == ["completed"] * 8
    assert facts.nvswitch_box and not facts.unified


def test_a_gb10_without_memory_figures_is_unified(fake_nvml: Path, nvml_config: Path) -> None:
    write_fake_nvml_config(nvml_config, [FakeGpu(name="NVIDIA GB10", total=0)])
    facts = read_nvml(str(fake_nvml))
    assert facts.unified and facts.memory_totals == [None] and facts.fabric == [None]
    profile, check = resolve_profile("auto", facts, False, "aarch64")
    assert (profile, check.status) == ("dgx-spark", "ok")


def test_a_driver_that_does_not_load_is_said_plainly(fake_nvml: Path, nvml_config: Path) -> None:
    write_fake_nvml_config(nvml_config, [], init_error=9)
    facts = read_nvml(str(fake_nvml))
    assert not facts.driver_works
    assert facts.nvml_error is not None and "Driver Not Loaded" in facts.nvml_error
    assert "no NVIDIA driver library" in (read_nvml(str(fake_nvml.parent / "absent.so")).nvml_error or "")


def test_a_driver_older_than_580_fails_with_the_package_to_install() -> None:
    old = GpuFacts(names=["NVIDIA H100 80GB HBM3"], driver_works=True, driver_version="550.54.15", cuda_version=12040)
    driver = _check(gpu_checks(old, dgx_os=False, plan_file=Path("/nonexistent")), "driver")
    assert driver.status == "fail"
    assert "550.54.15" in driver.detail and "CUDA 12.4" in driver.detail and "580" in driver.detail
    assert "nvidia-headless-580-server-open nvidia-utils-580-server" in driver.remedy
    on_dgx = _check(gpu_checks(old, dgx_os=True, plan_file=Path("/nonexistent")), "driver")
    assert on_dgx.status == "fail" and "full-upgrade" in on_dgx.remedy


def test_a_580_driver_is_kept_and_described() -> None:
    facts = GpuFacts(names=["NVIDIA H200"], driver_works=True, driver_version="580.95.05", cuda_version=13000,
                     driver_flavour="open", fabric=[None])  # fmt: skip
    checks = gpu_checks(facts, dgx_os=False, plan_file=Path("/nonexistent"))
    driver = _check(checks, "driver")
    assert driver.status == "ok" and "open kernel modules" in driver.detail and "CUDA 13.0" in driver.detail
    assert _check(checks, "fabric").status == "ok"


def test_a_missing_driver_keeps_the_secure_boot_remedy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight, "_secure_boot", lambda: True)
    checks = gpu_checks(GpuFacts(pci_present=True), dgx_os=False, plan_file=Path("/nonexistent"))
    assert _check(checks, "driver").status == "warn" and "open kernel modules" in _check(checks, "driver").detail
    sb = _check(checks, "secure boot")
    assert sb.status == "fail" and "mokutil" in sb.remedy


def _hgx(fabric: str | None, fm: str | None, active: bool = True) -> GpuFacts:
    return GpuFacts(names=["NVIDIA H100 80GB HBM3"] * 8, driver_works=True, driver_version="580.95.05",
                    fabric=[fabric] * 8, nvswitches=4, fabricmanager_version=fm,
                    fabricmanager_active=active)  # fmt: skip


@pytest.mark.parametrize(
    ("facts", "status", "says"),
    [
        (_hgx("completed", "580.95.05-1"), "ok", "fabric ready"),
        (_hgx("not-started", None, active=False), "warn", "nvidia-fabricmanager-580 580.95.05 will be installed"),
        (_hgx("not-started", "580.65.06-0ubuntu1", active=False), "fail", "does not match driver 580.95.05"),
        (_hgx("not-started", "580.95.05-1", active=False), "warn", "not running: it will be started"),
        (_hgx("in-progress", "580.95.05-1"), "warn", "still being set up"),
        (_hgx("not-started", "580.95.05-1"), "fail", "error 802"),
        (_hgx("failed: Unknown Error (999)", "580.95.05-1"), "fail", "error 802"),
    ],
)
def test_nvswitch_boxes_need_a_matching_running_fabric_manager(facts: GpuFacts, status: str, says: str) -> None:
    fabric = _check(gpu_checks(facts, dgx_os=False, plan_file=Path("/nonexistent")), "fabric")
    assert fabric.status == status, fabric
    assert says in fabric.detail
    if status == "fail":
        assert fabric.remedy


def test_a_fabric_manager_of_another_version_is_named_with_the_exact_packages() -> None:
    fabric = _check(gpu_checks(_hgx("not-started", "580.65.06-1"), False, plan_file=Path("/x")), "fabric")
    assert "nvidia-fabricmanager-580=580.95.05-* libnvidia-nscq-580=580.95.05-*" in fabric.remedy


def test_grace_hopper_is_refused_not_planned_as_an_h200() -> None:
    _, check = resolve_profile("auto", GpuFacts(names=["NVIDIA GH200 480GB"], driver_works=True), False,
                                     "aarch64")  # fmt: skip
    assert check.status == "fail" and "Grace Hopper" in check.detail


def _plan(tmp_path: Path, gpus: int, detected: bool = True) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"hardware": {"kind": "cuda", "gpus": gpus, "detected": detected}}))
    return path


def test_a_gpu_count_that_changed_since_the_plan_fails_before_anything_changes(tmp_path: Path) -> None:
    two = GpuFacts(names=["NVIDIA H100 80GB HBM3"] * 2, driver_works=True, driver_version="580.95.05")
    count = _check(gpu_checks(two, False, plan_file=_plan(tmp_path, 8)), "gpu count")
    assert count.status == "fail"
    assert "made for 8 GPUs" in count.detail and "reports 2" in count.detail
    assert "--replan" in count.remedy and "Xid" in count.remedy
    replanned = _check(gpu_checks(two, False, plan_file=_plan(tmp_path, 8), replan=True), "gpu count")
    assert replanned.status == "warn"
    # A plan made from a named profile (before the GPUs were counted) says nothing about this box's GPUs.
    assert not [
        c for c in gpu_checks(two, False, plan_file=_plan(tmp_path, 1, detected=False)) if c.name == "gpu count"
    ]


def test_the_toolchain_triton_needs_is_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    facts = GpuFacts(names=["NVIDIA H200"], driver_works=True, driver_version="580.95.05")
    assert _check(gpu_checks(facts, False, plan_file=Path("/x")), "toolchain").status == "ok"  # gcc is here
    monkeypatch.setattr(preflight.shutil, "which", lambda _name: None)
    monkeypatch.setattr(preflight.sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    toolchain = _check(gpu_checks(facts, False, plan_file=Path("/x")), "toolchain")
    assert toolchain.status == "warn"
    assert "C compiler" in toolchain.detail and "headers" in toolchain.detail and "libc6-dev" in toolchain.detail


def test_waiting_for_the_fabric_ends_when_every_gpu_registered(fake_nvml: Path, nvml_config: Path) -> None:
    write_fake_nvml_config(nvml_config, [FakeGpu(fabric_state=2)] * 4)

    def fabric_manager_finishes() -> None:
        time.sleep(0.6)
        write_fake_nvml_config(nvml_config, [FakeGpu(fabric_state=3)] * 4)

    finisher = threading.Thread(target=fabric_manager_finishes)
    finisher.start()
    try:
        ready, detail = wait_for_fabric(30, str(fake_nvml), interval=0.1)
    finally:
        finisher.join()
    assert ready and "ready on 4 GPUs" in detail, detail
    write_fake_nvml_config(nvml_config, [FakeGpu(fabric_state=1)] * 4)
    stuck, why = wait_for_fabric(0.3, str(fake_nvml), interval=0.1)
    assert not stuck and "GPU 0: not-started" in why


def test_the_script_alone_reports_the_gpus_to_the_driver_role(fake_nvml: Path, tmp_path: Path) -> None:
    # What the preflight role sees on a box: the one file, the system Python, NVML found by name.
    config = write_fake_nvml_config(tmp_path / "nvml.conf", HGX)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    alone = tmp_path / "preflight.py"
    alone.write_text((ROOT / "appliance/preflight.py").read_text())
    env = {"PATH": os.environ["PATH"], "LD_LIBRARY_PATH": str(fake_nvml.parent), "FAKE_NVML_CONFIG": str(config)}
    proc = subprocess.run(
        ["python3", "-S", str(alone), "--json", "--model", str(model), "--port", "18443",
         "--state-dir", str(tmp_path / "state"), "--prefix", str(tmp_path / "opt"),
         "--plan-file", str(tmp_path / "none.json")],
        capture_output=True, text=True, check=False, env=env,
    )  # fmt: skip
    report = json.loads(proc.stdout)
    assert report["profile"] == "h100"
    gpu = report["gpu"]
    assert len(gpu["names"]) == 8 and gpu["driver_major"] == 580 and gpu["nvswitch_box"] is True
    assert {c["name"] for c in report["checks"]} >= {"driver", "fabric", "toolchain"}


def test_the_driver_floor_agrees_everywhere_it_is_written() -> None:
    # Three places must say the same branch: preflight's floor (it ships alone, so it cannot import the others), the
    # bundle's CUDA-to-driver table for vLLM's CUDA 13 torch, and the branch the driver role installs.
    import yaml

    from appliance.bundle import MIN_DRIVER_BY_CUDA

    role = yaml.safe_load((ROOT / "playbooks/roles/nvidia_driver/defaults/main.yml").read_text())
    assert preflight.MIN_DRIVER_MAJOR == MIN_DRIVER_BY_CUDA[13] == int(role["nvidia_driver_branch"])
