"""Preflight: every check the installer makes before it changes anything, each failure with its remedy.

Runs with nothing but the standard library, so ``install.sh`` can call it with the system Python before any venv
exists, and the ``preflight`` Ansible role can ship this one file to each box of an inventory
(``ansible.builtin.script``). GPUs are read through :mod:`appliance.hardware` (NVML) when it is importable, else
``nvidia-smi``, else ``lspci`` (a GPU with no working driver).

Output: one line per check (``ok`` / ``warn`` / ``FAIL`` with what to do), then ``resolved_profile=P``; with
``--json`` one document ``{"passed", "profile", "checks": [{"name", "status", "detail", "remedy"}]}``.
Exit 0 when nothing failed, 1 when a check failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import socket
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Check", "GpuFacts", "Report", "add_arguments", "check_lines", "main", "resolve_profile", "run_checks"]

GIB = 1024**3
PROFILES = ("auto", "dgx-spark", "h100", "h200", "cpu")
# Disk the vLLM venv needs under /opt (GPU builds pull CUDA libraries).
VENV_BYTES = {"cpu": 4 * GIB, "dgx-spark": 14 * GIB, "h100": 14 * GIB, "h200": 14 * GIB}
MIN_MEMORY = {"cpu": 4 * GIB, "dgx-spark": 64 * GIB, "h100": 32 * GIB, "h200": 32 * GIB}
DGX_DASHBOARD_PORT = 11000
VLLM_FIRST_PORT = 8000


@dataclass
class Check:
    """One check's result: ``status`` is ok, warn or fail; a failure always says what to do."""

    name: str
    status: str
    detail: str
    remedy: str = ""


@dataclass
class GpuFacts:
    """What we could learn about NVIDIA GPUs without changing anything."""

    names: list[str] = field(default_factory=list)
    driver_works: bool = False
    driver_version: str | None = None
    pci_present: bool = False
    unified: bool = False
    source: str = "none"


@dataclass
class Report:
    """All checks and the profile they resolved to."""

    profile: str
    checks: list[Check]

    @property
    def passed(self) -> bool:
        """True when no check failed (warnings are fine)."""
        return all(c.status != "fail" for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"passed": self.passed, "profile": self.profile, "checks": [asdict(c) for c in self.checks]}


def _run(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def probe_gpus() -> GpuFacts:
    """GPUs via NVML (appliance.hardware), then nvidia-smi, then lspci."""
    facts = GpuFacts()
    try:
        from appliance import hardware

        snap = hardware.probe()
        if snap.gpus:
            facts.names = [g.name for g in snap.gpus]
            facts.driver_works, facts.driver_version = True, snap.driver_version
            facts.unified, facts.source = snap.unified, "nvml"
    except ImportError:
        pass
    if not facts.names:
        out = _run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
        if out:
            rows = [r.split(",") for r in out.strip().splitlines() if r.strip()]
            facts.names = [r[0].strip() for r in rows]
            facts.driver_version = rows[0][1].strip() if rows and len(rows[0]) > 1 else None
            facts.driver_works, facts.source = True, "nvidia-smi"
            facts.unified = any("GB10" in n for n in facts.names)
    out = _run(["lspci", "-d", "10de:", "-mm"])
    facts.pci_present = bool(out and out.strip())
    if not facts.names and facts.pci_present:
        facts.source = "lspci"
    return facts


def resolve_profile(requested: str, gpus: GpuFacts, dgx_os: bool, arch: str) -> tuple[str, Check]:
    """Turn ``auto`` into a concrete profile from the GPUs found; check an explicit one against them."""
    names = " ".join(gpus.names)
    if requested == "cpu":
        return "cpu", Check("profile", "ok", "cpu (the CPU build of vLLM; rehearsals and tests, not for clinics)")
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
        return found, Check("profile", "ok", f"{found} (detected: {names or 'DGX OS'})")
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

    # Driver: never touch a working one or DGX OS; otherwise the nvidia_driver role installs a pinned branch.
    if profile != "cpu":
        if gpus.driver_works:
            checks.append(Check("driver", "ok", f"NVIDIA driver {gpus.driver_version or '?'} answers (kept as is)"))
        elif dgx_os:
            checks.append(
                Check(
                    "driver",
                    "fail",
                    "DGX OS without a working NVIDIA driver",
                    "Update DGX OS (apt full-upgrade), reboot.",
                )
            )
        else:
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
            checks.append(
                Check("driver", "warn", "no working NVIDIA driver: a pinned server branch will be installed (reboot)")
            )
        if gpus.unified:
            checks.append(Check("memory", "ok", "unified memory (GPU memory is host memory; NVML reports N/A)"))

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
    return Report(profile=profile, checks=checks)


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


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``python3 preflight.py --profile P --model DIR --port N [--json]``."""
    parser = argparse.ArgumentParser(
        prog="clinic-edge preflight",
        description="Check this box before installing (reads only). Example: "
        "clinic-edge preflight --profile auto --model /srv/models/qwen --port 8443",
    )
    add_arguments(parser)
    parser.add_argument("--prefix", type=Path, default=Path("/opt/clinic-edge"))
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = parser.parse_args(argv)
    report = run_checks(
        args.profile, args.model, args.port, args.state_dir, prefix=args.prefix, model_name=args.model_name
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print("\n".join([*check_lines(report), f"resolved_profile={report.profile}"]))
    return 0 if report.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
