"""The device check behind ``tests/gpu/run``: our assumptions about NVIDIA hardware against a real GPU.

Each step prints what it read; a step whose reading contradicts what clinic-edge assumes is a MISMATCH and makes the
exit code 1. Steps that cannot run on this machine (no systemd, no psutil) say so and do not count as mismatches.
Standard library plus pynvml (imported from a carried wheel when the machine lacks it); nothing from the network.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
for wheel in sorted(Path(os.environ.get("GPU_CHECK_WHEELS", ROOT / "build" / "gpu-wheels")).glob("*.whl")):
    sys.path.append(str(wheel))  # pure-Python wheels import straight from the zip

UNIT = ROOT / "systemd" / "clinic-edge-vllm@.service"
MIB = 1024**2
GIB = 1024**3
mismatches: list[str] = []


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def show(label: str, value: object) -> None:
    print(f"   {label:<34} {value}", flush=True)


def mismatch(text: str) -> None:
    mismatches.append(text)
    print(f"   MISMATCH: {text}", flush=True)


def run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str] | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None


def nvidia_smi() -> list[dict[str, str]]:
    """nvidia-smi's own answers: the reference everything else is compared with."""
    step("nvidia-smi")
    fields = "index,name,driver_version,memory.total,memory.used,addressing_mode,pci.bus_id"
    proc = run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"])
    if proc is None or proc.returncode != 0:
        # Older drivers do not know addressing_mode: ask again without it.
        fields = fields.replace(",addressing_mode", "")
        proc = run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"])
    if proc is None or proc.returncode != 0:
        mismatch(f"nvidia-smi did not answer: {proc.stderr if proc else 'not installed'}")
        return []
    keys = fields.split(",")
    rows = [dict(zip(keys, (v.strip() for v in line.split(",")), strict=False)) for line in proc.stdout.splitlines()]
    for row in rows:
        show(f"GPU {row['index']}", json.dumps(row))
    query = run(["nvidia-smi", "-q"])
    fabric = re.findall(r"Fabric\s*\n\s*State\s*:\s*(.+)\n\s*Status\s*:\s*(.+)", query.stdout if query else "")
    show("nvidia-smi -q fabric (state, status)", fabric or "no Fabric section")
    for row, (state, status) in zip(rows, fabric, strict=False):
        row["fabric_state"], row["fabric_status"] = state.strip(), status.strip()
    show("/proc/driver/nvidia/version", Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
         if Path("/proc/driver/nvidia/version").exists() else "absent")  # fmt: skip
    lspci = run(["lspci", "-n", "-d", "10de:"])
    show("lspci -n -d 10de:", (lspci.stdout.strip().replace("\n", " | ") if lspci else "lspci not installed") or "-")
    return rows


def preflight_reader(smi: list[dict[str, str]]) -> Any:
    """appliance.preflight's ctypes NVML reader and the checks it drives."""
    from appliance import preflight

    step("preflight (NVML through ctypes, standard library)")
    facts = preflight.probe_gpus()
    for key in ("names", "memory_totals", "driver_version", "cuda_version", "driver_flavour", "fabric", "nvswitches",
                "fabricmanager_version", "fabricmanager_active", "unified", "nvml_error"):  # fmt: skip
        show(key, getattr(facts, key))
    if smi:
        if facts.names != [r["name"] for r in smi]:
            mismatch(f"preflight names {facts.names} != nvidia-smi {[r['name'] for r in smi]}")
        if facts.driver_version != smi[0]["driver_version"]:
            mismatch(f"preflight driver {facts.driver_version} != nvidia-smi {smi[0]['driver_version']}")
        for total, row in zip(facts.memory_totals, smi, strict=False):
            if row["memory.total"].isdigit() and total is not None and total // MIB != int(row["memory.total"]):
                mismatch(f"preflight memory {total // MIB} MiB != nvidia-smi {row['memory.total']} MiB")
            if not row["memory.total"].isdigit() and not facts.unified:
                mismatch(f"nvidia-smi has no memory total ({row['memory.total']}) but preflight did not see unified")
        for word, row in zip(facts.fabric, smi, strict=False):
            state = row.get("fabric_state", "N/A").lower()
            expected = None if state in ("n/a", "not supported") else state.replace(" ", "-")
            if word is not None and expected is not None and not word.startswith(expected.split("-")[0]):
                mismatch(f"preflight fabric {word!r} but nvidia-smi says {row.get('fabric_state')!r}")
            if (word is None) != (expected is None):
                mismatch(f"preflight fabric {word!r} but nvidia-smi says {row.get('fabric_state')!r}")
    dgx = Path("/etc/dgx-release").exists()
    profile, check = preflight.resolve_profile("auto", facts, dgx, platform.machine())
    show("profile (auto)", f"{profile}: {check.status} {check.detail}")
    if facts.names and check.status != "ok":
        mismatch(f"profile detection failed on a real GPU: {check.detail}")
    for c in preflight.gpu_checks(facts, dgx, plan_file=Path("/nonexistent")):
        show(f"check {c.name}", f"{c.status}: {c.detail}" + (f" → {c.remedy}" if c.remedy else ""))
        if c.name == "driver" and (facts.driver_major or 0) >= preflight.MIN_DRIVER_MAJOR and c.status != "ok":
            mismatch(f"driver {facts.driver_version} is ≥ {preflight.MIN_DRIVER_MAJOR} but the check says {c.status}")
    return facts


def hardware_module(smi: list[dict[str, str]]) -> None:
    """appliance.hardware (pynvml) and the dashboard's memory source."""
    step("hardware module (pynvml) and the dashboard's memory source")
    try:
        import pynvml  # noqa: F401
    except ImportError:
        mismatch("pynvml is not importable: carry build/gpu-wheels (pip download -d build/gpu-wheels nvidia-ml-py)")
        return
    from appliance.hardware import probe

    snap = probe()
    show("driver / CUDA", f"{snap.driver_version} / {snap.cuda_driver_version}  (nvml_error {snap.nvml_error})")
    for gpu in snap.gpus:
        show(f"GPU {gpu.index}", f"{gpu.name} total {gpu.memory_total} used {gpu.memory_used} unified {gpu.unified} "
             f"fabric {gpu.fabric} util {gpu.utilization_pct}%")  # fmt: skip
    if smi and [g.name for g in snap.gpus] != [r["name"] for r in smi]:
        mismatch("hardware.probe names differ from nvidia-smi")
    for gpu, row in zip(snap.gpus, smi, strict=False):
        if (
            row["memory.total"].isdigit()
            and not gpu.unified
            and (gpu.memory_total or 0) // MIB != int(row["memory.total"])
        ):
            mismatch(f"hardware.probe GPU {gpu.index} total {gpu.memory_total} != nvidia-smi {row['memory.total']} MiB")
    try:
        from appliance.telemetry.memory import MemorySource
    except ImportError as exc:
        show("dashboard memory source", f"not importable here ({exc}); not a mismatch")
        return
    part = MemorySource().read()
    show("dashboard memory source", f"error {part.error}; GPUs {len(part.hardware.gpus) if part.hardware else '-'}")
    if part.hardware is not None and len(part.hardware.gpus) != len(smi):
        mismatch("the dashboard's memory source sees another GPU count than nvidia-smi")


CUDA_PROBE = r"""
import ctypes, json
cuda = ctypes.CDLL("libcuda.so.1")
out = {"cuInit": cuda.cuInit(0)}
n = ctypes.c_int()
out["cuDeviceGetCount"] = cuda.cuDeviceGetCount(ctypes.byref(n)); out["devices"] = n.value
totals = []
for i in range(n.value):
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    cuda.cuDeviceGet(ctypes.byref(dev), i)
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    if cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0 and cuda.cuCtxSetCurrent(ctx) == 0:
        cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total))
        cuda.cuDevicePrimaryCtxRelease(dev)
    totals.append([free.value, total.value])
out["mem"] = totals
print(json.dumps(out))
"""


def unit_properties() -> list[str]:
    """The vLLM unit's sandboxing, as systemd-run -p properties (its own file is the source)."""
    wanted = re.compile(
        r"^(User|Group|NoNewPrivileges|ProtectSystem|ProtectHome|PrivateTmp|PrivateUsers|ProtectProc|ProcSubset|"
        r"ProtectKernel\w+|ProtectControlGroups|ProtectClock|ProtectHostname|RestrictNamespaces|RestrictRealtime|"
        r"RestrictSUIDSGID|LockPersonality|CapabilityBoundingSet|SystemCallArchitectures|SystemCallFilter|"
        r"SystemCallErrorNumber|RestrictAddressFamilies|DevicePolicy|DeviceAllow|IPAddressDeny|IPAddressAllow|"
        r"MemoryDenyWriteExecute|UMask)="
    )
    props = []
    for line in UNIT.read_text().splitlines():
        if wanted.match(line):
            key, _, value = line.partition("=")
            if key in ("User", "Group"):
                value = "nobody" if key == "User" else "nogroup"
            props.append(f"{key}={value}")
    return props


def cuda_under_hardening(facts: Any) -> None:
    """cuInit as the vLLM unit would run it (unprivileged, sandboxed), and CUDA's memory total against NVML's."""
    step("CUDA under the vLLM unit's hardening")
    from appliance.planner.hardware_profile import NVML_TO_CUDA_GIB

    python = sys.executable
    if Path("/run/systemd/system").is_dir() and os.geteuid() == 0:
        props = unit_properties()
        show("systemd-run properties", " ".join(props))
        argv = ["systemd-run", "--wait", "--pipe", "--quiet", "--collect"]
        argv += [a for p in props for a in ("-p", p)]
        argv += [python, "-c", CUDA_PROBE]
        how = "systemd-run with the unit's properties"
    elif os.geteuid() == 0 and shutil.which("setpriv"):
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--no-new-privs", python, "-c",
                CUDA_PROBE]  # fmt: skip
        how = "setpriv as nobody with no-new-privs (systemd is not PID 1 here)"
    else:
        argv = [python, "-c", CUDA_PROBE]
        how = "as this user (neither systemd nor root: hardening not applied)"
    started = time.monotonic()
    proc = run(argv, timeout=180)
    show("how", how)
    if proc is None or proc.returncode != 0:
        mismatch(f"the CUDA probe failed ({how}): {proc.stderr[-1500:] if proc else 'timed out'}")
        return
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    show("result", f"{result} in {time.monotonic() - started:.1f} s")
    if result["cuInit"] != 0:
        mismatch(f"cuInit returned {result['cuInit']} under the unit's hardening (802: fabric not ready)")
    if result.get("devices") != len(facts.names):
        mismatch(f"CUDA sees {result.get('devices')} devices, NVML {len(facts.names)}")
    for i, (total_nvml, (_, total_cuda)) in enumerate(zip(facts.memory_totals, result.get("mem", []), strict=False)):
        if total_nvml and total_cuda:
            delta = (total_nvml - total_cuda) / GIB
            show(f"GPU {i} NVML − CUDA total", f"{delta:.3f} GiB (the planner assumes {NVML_TO_CUDA_GIB})")
            if abs(delta - NVML_TO_CUDA_GIB) > 0.5:
                mismatch(f"GPU {i}: NVML − CUDA = {delta:.2f} GiB, the planner assumes {NVML_TO_CUDA_GIB} GiB")


NETWORK_PROBE = r"""
import json, socket, sys, time
server = socket.socket()
server.bind((sys.argv[1], 0))
server.listen()
started = time.monotonic()
try:
    socket.create_connection(server.getsockname(), timeout=10).close()
    result = "connected"
except OSError as exc:
    result = f"{type(exc).__name__}: {exc}"
print(json.dumps({"result": result, "seconds": time.monotonic() - started}))
"""


def network_fence() -> None:
    """The unit's IP fence: a connection to one of this box's own non-loopback addresses must fail at once.

    (The CPU rehearsal cannot show this: in its container systemd has no cgroup-v2 BPF firewall, so IPAddressDeny is
    not enforced there.)
    """
    step("the vLLM unit's network fence (IPAddressDeny=any, IPAddressAllow=localhost)")
    if not (Path("/run/systemd/system").is_dir() and os.geteuid() == 0):
        show("skipped", "needs systemd as PID 1 and root; not a mismatch")
        return
    proc = run(["ip", "-o", "-4", "addr", "show", "scope", "global"])
    addresses = re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", proc.stdout if proc else "")
    if not addresses:
        show("skipped", "this box has no non-loopback IPv4 address to aim at; not a mismatch")
        return
    props = [p for p in unit_properties() if p.split("=")[0] in ("IPAddressDeny", "IPAddressAllow")]
    plain = run([sys.executable, "-c", NETWORK_PROBE, addresses[0]])
    fence = [a for p in props for a in ("-p", p)]
    fenced = run(["systemd-run", "--wait", "--pipe", "--quiet", "--collect", *fence, sys.executable, "-c",
                  NETWORK_PROBE, addresses[0]])  # fmt: skip
    show("without the fence", plain.stdout.strip() if plain else "did not run")
    show("with the unit's fence", fenced.stdout.strip() if fenced else "did not run")
    if fenced is None or not fenced.stdout.strip():
        mismatch("the fenced probe did not run")
        return
    outcome = json.loads(fenced.stdout.strip().splitlines()[-1])
    if not outcome["result"].startswith("PermissionError") or outcome["seconds"] > 1:
        mismatch(f"the unit's IP fence did not refuse at once: {outcome}")


def toolchain() -> None:
    step("what vLLM needs at its first start")
    show("cc / gcc", f"{shutil.which('cc')} / {shutil.which('gcc')}")
    import sysconfig

    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    show("Python.h", f"{header} {'present' if header.is_file() else 'MISSING'}")
    show("nvidia_uvm loaded", Path("/sys/module/nvidia_uvm").exists())
    show("/dev/nvidia-uvm", Path("/dev/nvidia-uvm").exists())
    show("nvidia-fabricmanager", (run(["systemctl", "is-active", "nvidia-fabricmanager"]) or
                                  subprocess.CompletedProcess([], 1, "unknown", "")).stdout.strip())  # fmt: skip


def main() -> int:
    started = time.monotonic()
    show("machine", f"{platform.machine()} {platform.platform()} Python {platform.python_version()}")
    smi = nvidia_smi()
    facts = preflight_reader(smi)
    hardware_module(smi)
    if facts.driver_works:
        cuda_under_hardening(facts)
    network_fence()
    toolchain()
    print(f"\n{len(mismatches)} mismatch(es) in {time.monotonic() - started:.0f} s")
    for text in mismatches:
        print(f" - {text}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())
