"""Preflight: every check the installer makes before it changes anything, each failure with its remedy.

Runs with nothing but the standard library, so ``install.sh`` can call it with the system Python before any venv
exists, and the ``preflight`` Ansible role can ship this one file to each box of an inventory
(``ansible.builtin.script``). GPUs are read from NVML itself (``libnvidia-ml.so.1`` through ctypes: the driver's own
answers, no pynvml needed), and from ``lspci`` for what no driver reports (a GPU whose driver is missing, the
NVSwitches of an HGX board).

What a GPU box must have, and why (sources in ``shared/reference/gpu-paths.md``):

- a driver of branch 580 or newer: the pinned vLLM runs on a CUDA 13.0 build of torch, and CUDA 13 needs R580;
- on NVSwitch (HGX) boxes, Fabric Manager of exactly the driver's version, running: without it CUDA fails with
  error 802 "system not yet initialized" while ``nvidia-smi`` looks healthy;
- a C compiler and the Python headers: Triton builds a small C module at vLLM's first start;
- the GPUs the plan was made for: a GPU that disappeared since the last install must not silently shrink the box.

Output: one line per check (``ok`` / ``warn`` / ``FAIL`` with what to do), then ``resolved_profile=P``; with
``--json`` one document ``{"passed", "profile", "checks": [{"name", "status", "detail", "remedy"}]}``.
Exit 0 when nothing failed, 1 when a check failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "MIN_DRIVER_MAJOR",
    "Check",
    "GpuFacts",
    "Report",
    "add_arguments",
    "check_lines",
    "checks_from_args",
    "fabric_word",
    "gpu_checks",
    "main",
    "probe_gpus",
    "read_nvml",
    "resolve_profile",
    "run_checks",
]

GIB = 1024**3
PROFILES = ("auto", "dgx-spark", "h100", "h200", "cpu")
# Disk the vLLM venv needs under /opt (GPU builds pull CUDA libraries).
VENV_BYTES = {"cpu": 4 * GIB, "dgx-spark": 14 * GIB, "h100": 14 * GIB, "h200": 14 * GIB}
MIN_MEMORY = {"cpu": 4 * GIB, "dgx-spark": 64 * GIB, "h100": 32 * GIB, "h200": 32 * GIB}
DGX_DASHBOARD_PORT = 11000
VLLM_FIRST_PORT = 8000
# CUDA 13.x needs driver branch 580 or newer (CUDA minor-version compatibility table); vLLM 0.33 pulls torch 2.14, a
# CUDA 13.0 build. The driver role installs this branch (playbooks/roles/nvidia_driver/defaults/main.yml).
MIN_DRIVER_MAJOR = 580
PLAN_FILE = Path("/etc/clinic-edge/vllm/plan.json")
# NVML_GPU_FABRIC_STATE_*: 0 is "not supported" (no NVSwitch fabric), the others a GPU's registration with it.
FABRIC_STATES = {1: "not-started", 2: "in-progress", 3: "completed"}
PCI_CLASS_GPU = ("0300", "0302")  # VGA / 3D controller
PCI_CLASS_NVSWITCH = "0680"  # "other bridge": how an NVSwitch shows on the PCI bus (10de:22a3 on HGX H100/H200)


@dataclass
class Check:
    """One check's result: ``status`` is ok, warn or fail; a failure always says what to do."""

    name: str
    status: str
    detail: str
    remedy: str = ""


@dataclass
class GpuFacts:
    """What we could learn about NVIDIA GPUs without changing anything.

    ``fabric`` holds one entry per GPU: ``None`` where the GPU is on no NVSwitch fabric (PCIe cards, NVL bridges,
    GB10), else ``not-started``, ``in-progress``, ``completed`` or ``failed: <NVML error>``.
    """

    names: list[str] = field(default_factory=list)
    memory_totals: list[int | None] = field(default_factory=list)  # bytes; None where NVML has no figure (GB10)
    driver_works: bool = False
    driver_version: str | None = None
    cuda_version: int | None = None  # the newest CUDA the driver runs, e.g. 13000 for 13.0
    driver_flavour: str | None = None  # "open" or "proprietary" kernel modules
    pci_present: bool = False
    nvswitches: int = 0
    fabric: list[str | None] = field(default_factory=list)
    fabricmanager_version: str | None = None
    fabricmanager_active: bool = False
    unified: bool = False
    source: str = "none"
    nvml_error: str | None = None

    @property
    def driver_major(self) -> int | None:
        """The driver's branch (580 for 580.95.05), or None when unknown."""
        head = (self.driver_version or "").split(".")[0]
        return int(head) if head.isdigit() else None

    @property
    def nvswitch_box(self) -> bool:
        """An HGX-style box whose GPUs talk through NVSwitches (and so need Fabric Manager)."""
        return self.nvswitches > 0 or any(f is not None for f in self.fabric)


@dataclass
class Report:
    """All checks and the profile they resolved to."""

    profile: str
    checks: list[Check]
    gpus: GpuFacts | None = None

    @property
    def passed(self) -> bool:
        """True when no check failed (warnings are fine)."""
        return all(c.status != "fail" for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``gpu`` is what the driver role acts on (no second probe of its own)."""
        gpu = None
        if self.gpus is not None:
            gpu = asdict(self.gpus) | {"driver_major": self.gpus.driver_major, "nvswitch_box": self.gpus.nvswitch_box}
        return {
            "passed": self.passed,
            "profile": self.profile,
            "checks": [asdict(c) for c in self.checks],
            "gpu": gpu,
        }


def _run(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class _FabricInfo(ctypes.Structure):
    # nvmlGpuFabricInfo_t (nvml.h): status is meaningful only once state is "completed".
    _fields_ = [
        ("clusterUuid", ctypes.c_ubyte * 16),
        ("status", ctypes.c_int),
        ("cliqueId", ctypes.c_uint),
        ("state", ctypes.c_uint),
    ]


def fabric_word(state: int, status: int, error: str = "") -> str | None:
    """One GPU's NVSwitch fabric state in words (``None``: the GPU is on no fabric)."""
    word = FABRIC_STATES.get(state)
    if word == "completed" and status != 0:
        return f"failed: {error or f'NVML error {status}'}"
    return word


def _nvml_text(lib: ctypes.CDLL, fn: str, *args: Any) -> str | None:
    buf = ctypes.create_string_buffer(96)
    if getattr(lib, fn)(*args, buf, ctypes.c_uint(96)) != 0:
        return None
    return buf.value.decode(errors="replace")


def _nvml_error(lib: ctypes.CDLL, rc: int) -> str:
    lib.nvmlErrorString.restype = ctypes.c_char_p
    text = lib.nvmlErrorString(rc)
    return f"{text.decode() if text else 'NVML error'} ({rc})"


def read_nvml(library: str = "libnvidia-ml.so.1") -> GpuFacts:
    """The GPUs as the driver's NVML library reports them (names, memory, driver and CUDA version, fabric state)."""
    facts = GpuFacts()
    try:
        lib = ctypes.CDLL(library)
    except OSError as exc:
        facts.nvml_error = f"no NVIDIA driver library ({exc})"
        return facts
    rc = lib.nvmlInit_v2()
    if rc != 0:
        facts.nvml_error = f"the NVIDIA driver did not answer: {_nvml_error(lib, rc)}"
        return facts
    try:
        facts.source, facts.driver_works = "nvml", True
        facts.driver_version = _nvml_text(lib, "nvmlSystemGetDriverVersion")
        cuda = ctypes.c_int()
        if lib.nvmlSystemGetCudaDriverVersion_v2(ctypes.byref(cuda)) == 0:
            facts.cuda_version = cuda.value
        count = ctypes.c_uint()
        if lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            count.value = 0
        for index in range(count.value):
            handle = ctypes.c_void_p()
            if lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(handle)) != 0:
                continue
            name = _nvml_text(lib, "nvmlDeviceGetName", handle) or "unknown NVIDIA GPU"
            memory = _Memory()
            # GB10 answers NOT_SUPPORTED (or a total of 0): its GPU memory is the host's.
            total = memory.total if lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) == 0 else None
            facts.names.append(name)
            facts.memory_totals.append(total or None)
            facts.unified = facts.unified or not total or "GB10" in name
            facts.fabric.append(_nvml_fabric(lib, handle))
    finally:
        lib.nvmlShutdown()
    return facts


def _nvml_fabric(lib: ctypes.CDLL, handle: ctypes.c_void_p) -> str | None:
    if not hasattr(lib, "nvmlDeviceGetGpuFabricInfo"):  # drivers older than the fabric API: no NVSwitch support
        return None
    info = _FabricInfo()
    if lib.nvmlDeviceGetGpuFabricInfo(handle, ctypes.byref(info)) != 0:  # NOT_SUPPORTED: pre-Hopper, no fabric
        return None
    return fabric_word(info.state, info.status, _nvml_error(lib, info.status) if info.status else "")


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def probe_gpus(library: str = "libnvidia-ml.so.1", driver_proc: Path = Path("/proc/driver/nvidia/version")) -> GpuFacts:
    """GPUs through NVML, the PCI bus (GPUs without a driver, NVSwitches) and the packages Fabric Manager needs."""
    facts = read_nvml(library)
    version = _read_text(driver_proc)
    if version:
        facts.driver_flavour = "open" if "Open Kernel Module" in version else "proprietary"
    for line in (_run(["lspci", "-n", "-d", "10de:"]) or "").splitlines():
        parts = line.split()  # "41:00.0 0680: 10de:22a3 (rev a1)"
        pci_class = parts[1].rstrip(":") if len(parts) > 1 else ""
        facts.pci_present = facts.pci_present or pci_class in PCI_CLASS_GPU
        facts.nvswitches += pci_class == PCI_CLASS_NVSWITCH
    if not facts.names and facts.pci_present:
        facts.source = "lspci"
    if facts.nvswitch_box:
        for package in (f"nvidia-fabricmanager-{facts.driver_major}", "nvidia-fabricmanager"):
            installed = _run(["dpkg-query", "-W", "-f=${Version}", package])
            if installed:
                facts.fabricmanager_version = installed.strip()
                break
        facts.fabricmanager_active = _unit_active("nvidia-fabricmanager.service")
    return facts


def resolve_profile(requested: str, gpus: GpuFacts, dgx_os: bool, arch: str) -> tuple[str, Check]:
    """Turn ``auto`` into a concrete profile from the GPUs found; check an explicit one against them."""
    names = " ".join(gpus.names)
    if requested == "cpu":
        return "cpu", Check("profile", "ok", "cpu (the CPU build of vLLM; rehearsals and tests, not for clinics)")
    if "GH200" in names:
        # "NVIDIA GH200 ..." contains "H200" but is a different box (Grace CPU, aarch64, coherent memory).
        return requested, Check(
            "profile",
            "fail",
            f"this box has a Grace Hopper GPU ({names}), which clinic-edge does not support yet",
            "Install on a DGX Spark or an x86_64 server with H100/H200 GPUs.",
        )
    if requested == "auto":
        if "GB10" in names or (dgx_os and arch == "aarch64"):
            found = "dgx-spark"
        elif "H200" in names:
            found = "h200"
        elif "H100" in names:
            found = "h100"
        elif gpus.pci_present:
            return "auto", Check(
                "profile",
                "fail",
                "an NVIDIA GPU is on the PCI bus but no driver answers, so its model is unknown",
                "Pass --profile dgx-spark, h100 or h200; the installer then installs the driver.",
            )
        else:
            return "auto", Check(
                "profile",
                "fail",
                "no NVIDIA GPU found (NVML, nvidia-smi and lspci see none)",
                "Install on a box with a supported GPU, or rehearse without one: ./install.sh --rehearse "
                "(or --profile cpu).",
            )
        count = f"{len(gpus.names)} × " if len(gpus.names) > 1 else ""
        return found, Check("profile", "ok", f"{found} (detected: {count}{gpus.names[0] if gpus.names else 'DGX OS'})")
    if not gpus.names and not gpus.pci_present:
        return requested, Check(
            "profile", "fail", f"--profile {requested} asks for a GPU but none is present", "Use --profile cpu here."
        )
    return requested, Check("profile", "ok", f"{requested} (GPUs: {names or 'driver not loaded yet'})")


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _unit_active(unit: str) -> bool:
    return _run(["systemctl", "is-active", "--quiet", unit]) is not None


def _secure_boot() -> bool | None:
    out = _run(["mokutil", "--sb-state"])
    if out is not None:
        return "enabled" in out.lower()
    for var in Path("/sys/firmware/efi/efivars").glob("SecureBoot-*"):
        try:
            return var.read_bytes()[-1:] == b"\x01"
        except OSError:
            return None
    return None


def _meminfo_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def run_checks(
    requested: str,
    model: Path,
    port: int,
    state_dir: Path,
    *,
    prefix: Path = Path("/opt/clinic-edge"),
    model_name: str | None = None,
    gpus: GpuFacts | None = None,
    plan_file: Path = PLAN_FILE,
    replan: bool = False,
) -> Report:
    """Every check, in the order a person would fix them. Reads only; changes nothing."""
    arch = platform.machine()
    dgx_os = Path("/etc/dgx-release").exists()
    gpus = gpus if gpus is not None else probe_gpus()
    profile, profile_check = resolve_profile(requested, gpus, dgx_os, arch)
    checks = [profile_check]

    # systemd as init: the whole appliance is systemd units.
    if Path("/run/systemd/system").is_dir():
        checks.append(Check("systemd", "ok", "systemd is the init system"))
    else:
        checks.append(
            Check("systemd", "fail", "systemd is not running as init", "Install on a box booted with systemd.")
        )

    if profile == "cpu" and arch != "x86_64":
        checks.append(
            Check(
                "cpu build",
                "fail",
                f"the CPU build of vLLM is tested on x86_64 only, this is {arch}",
                "Rehearse on x86_64.",
            )
        )

    if profile != "cpu":
        checks += gpu_checks(gpus, dgx_os, plan_file=plan_file, replan=replan)

    total = _meminfo_total()
    need_mem = MIN_MEMORY.get(profile, 4 * GIB)
    if total < need_mem:
        checks.append(
            Check(
                "host memory",
                "fail",
                f"{total / GIB:.1f} GiB of memory, the {profile} profile needs {need_mem / GIB:.0f} GiB",
                "Use a box with more memory.",
            )
        )
    else:
        checks.append(Check("host memory", "ok", f"{total / GIB:.1f} GiB"))

    # Disk: the model is copied under the state dir, the vLLM venv goes under /opt.
    if not (model / "config.json").is_file():
        checks.append(Check("model", "fail", f"{model} has no config.json", "Point --model at a model directory."))
    else:
        size = _dir_size(model)
        stored = state_dir / "models" / (model_name or model.name)
        need = 0 if stored.exists() and _dir_size(stored) >= size else size + size // 10 + 64 * 1024**2
        where = _existing_parent(state_dir)
        free = shutil.disk_usage(where).free
        if free < need:
            checks.append(
                Check(
                    "disk for the model",
                    "fail",
                    f"{free / GIB:.2f} GiB free on {where}, the model needs {need / GIB:.2f} GiB",
                    f"Free space on {where} (or mount a larger disk at {state_dir}), then run install.sh again.",
                )
            )
        else:
            checks.append(Check("disk for the model", "ok", f"{size / GIB:.2f} GiB model, {free / GIB:.1f} GiB free"))
    venv_need = 0 if (prefix / "vllm" / "bin" / "python").exists() else VENV_BYTES.get(profile, 14 * GIB)
    where = _existing_parent(prefix)
    free = shutil.disk_usage(where).free
    if free < venv_need:
        checks.append(
            Check(
                "disk for vLLM",
                "fail",
                f"{free / GIB:.1f} GiB free on {where}, vLLM needs {venv_need / GIB:.0f} GiB",
                f"Free space on {where}, then run install.sh again.",
            )
        )
    else:
        checks.append(Check("disk for vLLM", "ok", f"{free / GIB:.1f} GiB free on {where}"))

    # Ports: ours may be held by our own units (a re-run); anything else is a conflict.
    if port == DGX_DASHBOARD_PORT:
        checks.append(Check("ports", "fail", "port 11000 is the DGX Dashboard's", "Pick another --port."))
    elif _port_in_use(port) and not _unit_active("clinic-edge-gateway.service"):
        checks.append(
            Check("ports", "fail", f"port {port} is already in use", f"Stop what listens on {port}, or pass --port.")
        )
    elif _port_in_use(VLLM_FIRST_PORT) and not _unit_active("clinic-edge-vllm@0.service"):
        checks.append(
            Check("ports", "fail", f"port {VLLM_FIRST_PORT} (vLLM replica 0) is in use", "Stop the other vLLM first.")
        )
    else:
        detail = f"{port} (gateway) and {VLLM_FIRST_PORT}+ (vLLM, loopback) are free or ours"
        if profile == "dgx-spark":
            detail += f"; {DGX_DASHBOARD_PORT} stays the DGX Dashboard's"
        checks.append(Check("ports", "ok", detail))
    return Report(profile=profile, checks=checks, gpus=gpus)


# --- GPU boxes: driver, NVSwitch fabric, the toolchain vLLM compiles with at run time, the planned GPUs ---
def gpu_checks(gpus: GpuFacts, dgx_os: bool, *, plan_file: Path = PLAN_FILE, replan: bool = False) -> list[Check]:
    """The checks only a GPU profile needs, in the order a person would fix them."""
    checks = [_driver_check(gpus, dgx_os)]
    if not gpus.driver_works and not dgx_os:
        sb = _secure_boot()
        if sb:
            checks.append(
                Check(
                    "secure boot",
                    "fail",
                    "Secure Boot is on and the NVIDIA driver must be installed: an unsigned module would not load",
                    "Disable Secure Boot in the firmware, or install the signed driver and enroll its MOK key "
                    "(mokutil --import), then run install.sh again.",
                )
            )
    fabric = _fabric_check(gpus)
    if fabric is not None:
        checks.append(fabric)
    checks.append(_toolchain_check())
    planned = _planned_gpus(plan_file)
    if planned is not None and gpus.names and planned != len(gpus.names):
        if replan:
            checks.append(Check("gpu count", "warn", f"the plan had {planned} GPUs, this box has {len(gpus.names)}: "
                                "re-planning for the GPUs present (--replan)"))  # fmt: skip
        else:
            checks.append(
                Check(
                    "gpu count",
                    "fail",
                    f"the installed plan ({plan_file}) was made for {planned} GPUs, but the driver now reports "
                    f"{len(gpus.names)}; the installed services were left as they are",
                    "If a GPU failed or came loose, check nvidia-smi and dmesg (Xid errors) and call the hardware "
                    "vendor. If the change is intended, re-plan for the GPUs present: sudo ./install.sh --replan",
                )
            )
    if gpus.unified:
        checks.append(Check("memory", "ok", "unified memory (GPU memory is host memory; NVML reports N/A)"))
    return checks


def _driver_check(gpus: GpuFacts, dgx_os: bool) -> Check:
    if not gpus.driver_works:
        if dgx_os:
            return Check(
                "driver", "fail", "DGX OS without a working NVIDIA driver", "Update DGX OS (apt full-upgrade), reboot."
            )
        why = f" ({gpus.nvml_error})" if gpus.nvml_error else ""
        return Check(
            "driver",
            "warn",
            f"no working NVIDIA driver{why}: the {MIN_DRIVER_MAJOR} server driver (open kernel modules) will be "
            "installed, then a reboot is needed",
        )
    version = gpus.driver_version or "?"
    about = version
    if gpus.driver_flavour:
        about += f", {gpus.driver_flavour} kernel modules"
    if gpus.cuda_version:
        about += f", CUDA {gpus.cuda_version // 1000}.{gpus.cuda_version % 1000 // 10}"
    major = gpus.driver_major
    if major is not None and major < MIN_DRIVER_MAJOR:
        if dgx_os:
            remedy = "Update DGX OS (sudo apt update && sudo apt full-upgrade), reboot, then run install.sh again."
        else:
            extra = f" nvidia-fabricmanager-{MIN_DRIVER_MAJOR}" if gpus.nvswitch_box else ""
            remedy = (
                f"Install the {MIN_DRIVER_MAJOR} server driver: sudo apt-get install "
                f"nvidia-headless-{MIN_DRIVER_MAJOR}-server-open nvidia-utils-{MIN_DRIVER_MAJOR}-server{extra} "
                "(offline: from a local Ubuntu mirror), reboot, then run install.sh again."
            )
        return Check(
            "driver",
            "fail",
            f"NVIDIA driver {about} is too old: the pinned vLLM runs on a CUDA 13 build of torch, which needs "
            f"driver {MIN_DRIVER_MAJOR} or newer",
            remedy,
        )
    return Check("driver", "ok", f"NVIDIA driver {about} (≥ {MIN_DRIVER_MAJOR}, kept as is)")


def _fabric_check(gpus: GpuFacts) -> Check | None:
    """NVSwitch boxes need Fabric Manager of exactly the driver's version, and every GPU registered with the fabric."""
    if not gpus.nvswitch_box:
        return Check("fabric", "ok", "no NVSwitch: Fabric Manager not needed") if gpus.driver_works else None
    major, want = gpus.driver_major or MIN_DRIVER_MAJOR, gpus.driver_version
    states = [s for s in gpus.fabric if s is not None]
    where = f"{gpus.nvswitches} NVSwitches, {len(gpus.names)} GPUs" if gpus.nvswitches else f"{len(gpus.names)} GPUs"
    if states and all(s == "completed" for s in states):
        return Check("fabric", "ok", f"NVSwitch fabric ready ({where}; Fabric Manager {gpus.fabricmanager_version})")
    if not gpus.driver_works:
        return Check("fabric", "warn", f"NVSwitch box ({where}): Fabric Manager will be installed with the driver")
    installed = (gpus.fabricmanager_version or "").split(":")[-1].split("-")[0]
    package = f"nvidia-fabricmanager-{major}"
    if not installed:
        return Check(
            "fabric",
            "warn",
            f"NVSwitch box ({where}) without Fabric Manager: {package} {want} will be installed and started "
            "(without it CUDA fails with error 802 while nvidia-smi looks healthy)",
        )
    if installed != want:
        return Check(
            "fabric",
            "fail",
            f"Fabric Manager {installed} does not match driver {want}: it refuses to start, so CUDA would fail "
            "with error 802",
            f"sudo apt-get install {package}={want}-* libnvidia-nscq-{major}={want}-*, then run install.sh again.",
        )
    summary = ", ".join(f"GPU {i}: {s}" for i, s in enumerate(gpus.fabric) if s != "completed")
    if not gpus.fabricmanager_active:
        return Check("fabric", "warn", f"Fabric Manager {installed} is installed but not running: it will be started")
    if all(s in ("completed", "in-progress") for s in states):
        return Check("fabric", "warn", f"the NVSwitch fabric is still being set up ({summary}); the install waits")
    return Check(
        "fabric",
        "fail",
        f"the NVSwitch fabric is not ready ({summary}) although Fabric Manager {installed} runs: CUDA would fail "
        "with error 802",
        "Read journalctl -u nvidia-fabricmanager; sudo systemctl restart nvidia-fabricmanager, wait 2 minutes and "
        "run install.sh again. If it stays so, check nvidia-smi -q and dmesg (Xid errors) and call the vendor.",
    )


def _toolchain_check() -> Check:
    """Triton (under vLLM's torch.compile) builds a C launcher at the first start: it needs cc and Python.h."""
    minor = f"3.{sys.version_info[1]}"
    missing = []
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        missing.append("a C compiler")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        missing.append(f"the Python {minor} headers")
    if not missing:
        return Check("toolchain", "ok", f"C compiler and Python {minor} headers (Triton compiles at vLLM's start)")
    return Check(
        "toolchain",
        "warn",
        f"{' and '.join(missing)} missing: Triton compiles a small C module when vLLM starts; the install adds "
        f"gcc, libc6-dev and python{minor}-dev (offline: they must come from the OS media or a local mirror)",
    )


def _planned_gpus(plan_file: Path) -> int | None:
    """The GPU count of the installed plan, when it was planned on this box's detected GPUs."""
    try:
        plan = json.loads(plan_file.read_text())
        hardware = plan["hardware"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(hardware, dict) or hardware.get("kind") != "cuda" or not hardware.get("detected"):
        return None
    gpus = hardware.get("gpus")
    return gpus if isinstance(gpus, int) else None


def wait_for_fabric(seconds: float, library: str = "libnvidia-ml.so.1", interval: float = 5.0) -> tuple[bool, str]:
    """Poll NVML until every GPU on an NVSwitch fabric has registered (Fabric Manager takes a minute or two)."""
    deadline = time.monotonic() + seconds
    while True:
        facts = read_nvml(library)
        pending = [f"GPU {i}: {s}" for i, s in enumerate(facts.fabric) if s not in (None, "completed")]
        if facts.driver_works and not pending:
            return True, f"NVSwitch fabric ready on {len(facts.names)} GPUs"
        why = ", ".join(pending) or facts.nvml_error or "no GPU"
        if time.monotonic() > deadline:
            return False, f"the NVSwitch fabric did not come up within {seconds:.0f} s ({why})"
        time.sleep(interval)


def check_lines(report: Report) -> list[str]:
    """One line per check, with the remedy after an arrow for warnings and failures."""
    lines = []
    for c in report.checks:
        mark = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}[c.status]
        line = f"{mark} {c.name}: {c.detail}"
        if c.remedy and c.status != "ok":
            line += f" → {c.remedy}"
        lines.append(line)
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags both entries take: this file run on its own, and ``clinic-edge preflight``."""
    parser.add_argument("--profile", default="auto", choices=PROFILES)
    parser.add_argument("--model", type=Path, required=True, help="model directory (config.json inside)")
    parser.add_argument("--model-name", help="its name in the model store (default: the directory's name)")
    parser.add_argument("--port", type=int, default=8443, help="the gateway's port (default 8443)")
    parser.add_argument("--state-dir", type=Path, default=Path("/var/lib/clinic-edge"))
    parser.add_argument("--plan-file", type=Path, default=PLAN_FILE, help=f"the installed plan (default {PLAN_FILE})")
    parser.add_argument(
        "--replan", action="store_true", help="accept that the GPUs differ from the installed plan's (re-plan them)"
    )


def checks_from_args(args: argparse.Namespace) -> Report:
    """:func:`run_checks` with the flags :func:`add_arguments` defined (both entries parse the same ones)."""
    return run_checks(
        args.profile,
        args.model,
        args.port,
        args.state_dir,
        prefix=getattr(args, "prefix", Path("/opt/clinic-edge")),
        model_name=args.model_name,
        plan_file=args.plan_file,
        replan=args.replan,
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``python3 preflight.py --profile P --model DIR --port N [--json]``.

    ``python3 preflight.py --wait-fabric SECONDS`` instead waits until every GPU has joined its NVSwitch fabric (the
    driver role runs it after starting Fabric Manager): exit 0 ready, 1 not within the time, with the states.
    """
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--wait-fabric"]:
        waiter = argparse.ArgumentParser(prog="preflight.py --wait-fabric")
        waiter.add_argument("--wait-fabric", type=float, required=True, metavar="SECONDS")
        ready, detail = wait_for_fabric(waiter.parse_args(argv).wait_fabric)
        print(detail)
        return 0 if ready else 1
    parser = argparse.ArgumentParser(
        prog="clinic-edge preflight",
        description="Check this box before installing (reads only). Example: "
        "clinic-edge preflight --profile auto --model /srv/models/qwen --port 8443",
    )
    add_arguments(parser)
    parser.add_argument("--prefix", type=Path, default=Path("/opt/clinic-edge"))
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = parser.parse_args(argv)
    report = checks_from_args(args)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print("\n".join([*check_lines(report), f"resolved_profile={report.profile}"]))
    return 0 if report.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
