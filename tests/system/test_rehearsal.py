"""The system tier: the real installer in a throwaway Debian 12 booted with systemd-nspawn, offline.

One rehearsal (``./install.sh --rehearse --keep``: a cpu bundle with the demo model, a container with a private
network so only ``lo`` exists) is shared by the tests below, which run in file order: what a clinic sees after the
install, an idempotent re-run, a changed setting, the uninstall, and a preflight failure that changes nothing.
Commands run inside with ``nsenter``; the workstation client (the openai SDK) runs in the container's network
namespace only, so its traffic stays on the container's loopback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require
from tests.fakes.nvml import GIB, FakeGpu, build_fake_nvml, write_fake_nvml_config

# The first test also pays for the rehearsal (fixture set-up counts against its timeout): a cold one in CI
# includes debootstrap and the wheel build.
pytestmark = [pytest.mark.system, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("client_probe.py")
PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INNER_INSTALL = "/opt/clinic-edge-src/installer/install.sh"
MODEL = "clinic-edge-demo-vlm"
# A PCIe H100 box as NVML reports it (nvidia-smi: 95830 MiB); its host memory as /proc/meminfo would (512 GiB).
H100_NVL = FakeGpu(name="NVIDIA H100 NVL", total=95830 * 1024**2)
GPU_BOX_MEMINFO = (
    f"MemTotal: {512 * GIB // 1024} kB\nMemFree: {500 * GIB // 1024} kB\nMemAvailable: {500 * GIB // 1024} kB\n"
)


@dataclass
class Rehearsal:
    """The running container: its systemd's PID, the nspawn PID, its root folder and the install's output."""

    pid: int
    nspawn: int
    root: Path
    output: str
    seconds: float

    def run(self, *argv: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (all namespaces), with a clean environment."""
        return subprocess.run(
            ["nsenter", "-t", str(self.pid), "-a", "env", "-i", PATH, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def main_pid(self, unit: str) -> str:
        """The unit's MainPID inside the container (changes when the unit restarts)."""
        return self.run("systemctl", "show", "-P", "MainPID", unit).stdout.strip()


def _first_key(output: str) -> str:
    match = re.search(r"First workstation key \(shown once, store it now\): (\S+)", output)
    assert match, f"no first key in the summary:\n{output[-3000:]}"
    return match.group(1)


@pytest.fixture(scope="module")
def rehearsal() -> Iterator[Rehearsal]:
    """``./install.sh --rehearse --keep`` once; the container is torn down after the module."""
    require(os.geteuid() == 0, "the system tier needs root (debootstrap, systemd-nspawn)")
    for tool in ("debootstrap", "systemd-nspawn", "nsenter", "systemd-analyze"):
        require(
            shutil.which(tool) is not None, f"{tool} is not installed (apt-get install debootstrap systemd-container)"
        )
    env = dict(os.environ, CLINIC_EDGE_PYTHON=sys.executable, CLINIC_EDGE_LOG=str(ROOT / "build" / "rehearse.log"))
    (ROOT / "build").mkdir(exist_ok=True)
    started = time.monotonic()
    proc = subprocess.run(
        [str(ROOT / "install.sh"), "--rehearse", "--keep"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    seconds = time.monotonic() - started
    output = proc.stdout + proc.stderr
    print(f"\nrehearsal: {seconds:.0f} s (cold rehearsal incl. bundle and root from cache when present)")
    match = re.search(r"rehearsal: pid=(\d+) nspawn=(\d+) root=(\S+)", output)
    try:
        assert proc.returncode == 0, f"the rehearsal failed (exit {proc.returncode}):\n{output[-6000:]}"
        assert match, f"the rehearsal printed no container handle:\n{output[-3000:]}"
        yield Rehearsal(int(match.group(1)), int(match.group(2)), Path(match.group(3)), output, seconds)
    finally:
        if match:
            nspawn, root = int(match.group(2)), Path(match.group(3))
            try:
                os.kill(nspawn, signal.SIGTERM)
                for _ in range(60):
                    os.kill(nspawn, 0)
                    time.sleep(0.5)
                os.kill(nspawn, signal.SIGKILL)
            except ProcessLookupError:
                pass
            shutil.rmtree(root, ignore_errors=True)


def test_the_summary_tells_clinic_it_what_it_needs(rehearsal: Rehearsal) -> None:
    out = rehearsal.output
    assert "https://clinic-edge-rehearsal:8443/v1" in out
    assert "/etc/clinic-edge/tls/ca.crt" in out
    assert re.search(r"CA SHA-256 fingerprint:\s+([0-9A-F]{2}:){31}[0-9A-F]{2}", out)
    assert re.search(r"Self-test:\s+PASSED", out), out[-3000:]
    assert "clinic-edge dashboard" in out
    _first_key(out)


def test_the_container_had_no_way_out(rehearsal: Rehearsal) -> None:
    links = rehearsal.run("ip", "-o", "link", "show").stdout.splitlines()
    assert [line.split(":")[1].strip() for line in links] == ["lo"]


def test_units_are_active(rehearsal: Rehearsal) -> None:
    units = ["clinic-edge-vllm@0.service", "clinic-edge-gateway.service", "clinic-edge-firewall.service",
             "clinic-edge-selftest.timer"]  # fmt: skip
    states = rehearsal.run("systemctl", "is-active", *units).stdout.split()
    assert states == ["active"] * len(units)
    verify = rehearsal.run("systemd-analyze", "verify", *(f"/usr/local/lib/systemd/system/{u}" for u in units))
    assert verify.returncode == 0, verify.stderr


def test_the_gateway_answers_over_tls_and_refuses_remote_images(rehearsal: Rehearsal) -> None:
    ca = rehearsal.root / "etc/clinic-edge/tls/ca.crt"
    proc = subprocess.run(
        ["nsenter", "-t", str(rehearsal.pid), "-n", sys.executable, str(PROBE), str(ca),
         _first_key(rehearsal.output), MODEL],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["inline_image"]["choices"] == 1
    # DICOM converted in the gateway's worker processes, under the installed unit's sandbox.
    assert result["dicom_ExplicitVRLittleEndian"] == {"choices": 1}, result
    assert result["dicom_JPEGLSLossless"] == {"choices": 1}, result
    assert result["remote_image"]["status"] == 400
    assert result["outside_contacted"] is False
    assert result["wrong_key"]["status"] == 401


def test_vllm_listens_on_loopback_only_and_the_firewall_is_loaded(rehearsal: Rehearsal) -> None:
    listeners = rehearsal.run("ss", "-Hltn").stdout
    assert re.search(r"127\.0\.0\.1:8000\b", listeners), listeners
    assert not re.search(r"(0\.0\.0\.0|\*|\[::\]):8000\b", listeners), listeners
    rules = rehearsal.run("nft", "list", "table", "inet", "clinic_edge").stdout
    assert "tcp dport 8443 ip saddr 192.168.0.0/16 accept" in rules
    assert "tcp dport 8443 drop" in rules


def test_the_selftest_result_exists_and_passed(rehearsal: Rehearsal) -> None:
    latest = json.loads((rehearsal.root / "var/lib/clinic-edge/selftest/latest.json").read_text())
    assert latest["schema"] == 1
    assert latest["verdict"]["passed"] is True
    assert latest["model"] == MODEL


def test_a_second_run_changes_nothing_and_restarts_nothing(rehearsal: Rehearsal) -> None:
    before = {u: rehearsal.main_pid(u) for u in ("clinic-edge-vllm@0.service", "clinic-edge-gateway.service")}
    started = time.monotonic()
    proc = rehearsal.run(INNER_INSTALL, "--yes")
    print(f"\nidempotent re-run: {time.monotonic() - started:.0f} s")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert re.search(r"localhost\s+: ok=\d+\s+changed=0\s", proc.stdout), proc.stdout[-3000:]
    assert {u: rehearsal.main_pid(u) for u in before} == before
    assert "First workstation key" not in proc.stdout  # shown once only


def test_check_mode_reports_no_change(rehearsal: Rehearsal) -> None:
    proc = rehearsal.run(INNER_INSTALL, "--check")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert re.search(r"changed=0\s", proc.stdout), proc.stdout[-3000:]


def test_changing_the_port_restarts_only_the_gateway(rehearsal: Rehearsal) -> None:
    vllm, gateway = rehearsal.main_pid("clinic-edge-vllm@0.service"), rehearsal.main_pid("clinic-edge-gateway.service")
    proc = rehearsal.run(INNER_INSTALL, "--port", "8444", "--yes")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert rehearsal.main_pid("clinic-edge-vllm@0.service") == vllm
    assert rehearsal.main_pid("clinic-edge-gateway.service") != gateway
    assert "port: 8444" in (rehearsal.root / "etc/clinic-edge/appliance.yml").read_text()
    assert "tcp dport 8444" in rehearsal.run("nft", "list", "table", "inet", "clinic_edge").stdout


def _gpu_box_playbook(rehearsal: Rehearsal, gpus: int, *extra: str) -> subprocess.CompletedProcess[str]:
    """The installer's playbook as it runs on a box with ``gpus`` H100 NVL, NVML answered by the fake library.

    Left out (--skip-tags): the driver, the GPU build of vLLM and the closing self-test, which need a real GPU; and
    the replicas are planned, written and enabled but not started (vllm_start_replicas=false).
    """
    fake = rehearsal.root / "opt/fake-nvml"
    build_fake_nvml(fake)
    write_fake_nvml_config(fake / f"{gpus}.conf", [H100_NVL] * gpus)
    return rehearsal.run(
        "env", "LD_LIBRARY_PATH=/opt/fake-nvml", f"FAKE_NVML_CONFIG=/opt/fake-nvml/{gpus}.conf", "LC_ALL=C.UTF-8",
        "ANSIBLE_CONFIG=/opt/clinic-edge-src/playbooks/ansible.cfg", "/opt/clinic-edge/venv/bin/ansible-playbook",
        "-i", "/opt/clinic-edge-src/playbooks/inventory/localhost.yml", "/opt/clinic-edge-src/playbooks/site.yml",
        "-e", "@/etc/clinic-edge/appliance.yml", "-e", "appliance_src=/opt/clinic-edge-src",
        "-e", "appliance_python=/usr/bin/python3", "-e", "appliance_profile=auto", "-e", "vllm_start_replicas=false",
        "--skip-tags", "driver,vllm-build,selftest", *extra,
    )  # fmt: skip


def _topology(rehearsal: Rehearsal) -> dict[str, object]:
    etc = rehearsal.root / "etc/clinic-edge"
    envs = sorted((etc / "vllm").glob("vllm-*.env"))
    plan = json.loads((etc / "vllm/plan.json").read_text())
    enabled = [
        i for i in range(8)
        if rehearsal.run("systemctl", "is-enabled", f"clinic-edge-vllm@{i}.service").stdout.strip() == "enabled"
    ]  # fmt: skip
    return {
        "env_files": [e.name for e in envs],
        "devices": [re.search(r"^CUDA_VISIBLE_DEVICES=(.*)$", e.read_text(), re.M).group(1) for e in envs],  # type: ignore[union-attr]
        "ports": [re.search(r"--port (\d+)", e.read_text()).group(1) for e in envs],  # type: ignore[union-attr]
        "plan": (plan["topology"]["replicas"], plan["hardware"]["gpus"], plan["hardware"]["detected"]),
        "enabled": enabled,
        "upstreams": re.findall(r"http://127\.0\.0\.1:(\d+)", (etc / "gateway.yml").read_text()),
    }


@pytest.fixture
def gpu_box_memory(rehearsal: Rehearsal) -> Iterator[None]:
    """The container sees a GPU server's host memory (the preflight asks H100 boxes for 32 GiB; we have 24)."""
    (rehearsal.root / "opt/gpu-box-meminfo").write_text(GPU_BOX_MEMINFO)
    assert rehearsal.run("mount", "--bind", "/opt/gpu-box-meminfo", "/proc/meminfo").returncode == 0
    try:
        yield
    finally:
        rehearsal.run("umount", "/proc/meminfo")


@pytest.mark.usefixtures("gpu_box_memory")
def test_an_eight_gpu_box_gets_one_replica_per_gpu_and_the_gateway_all_of_them(rehearsal: Rehearsal) -> None:
    proc = _gpu_box_playbook(rehearsal, 8)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    topo = _topology(rehearsal)
    assert topo["env_files"] == [f"vllm-{i}.env" for i in range(8)]
    assert topo["devices"] == [str(i) for i in range(8)]
    assert topo["ports"] == [str(8000 + i) for i in range(8)]
    assert topo["plan"] == (8, 8, True)
    assert topo["enabled"] == list(range(8))
    assert topo["upstreams"] == [str(8000 + i) for i in range(8)]
    assert "--gpu-memory-utilization" in (rehearsal.root / "etc/clinic-edge/vllm/vllm-7.env").read_text()


@pytest.mark.usefixtures("gpu_box_memory")
def test_a_box_that_lost_gpus_stops_before_anything_changes_and_replans_when_told(rehearsal: Rehearsal) -> None:
    before = _topology(rehearsal)
    proc = _gpu_box_playbook(rehearsal, 2)
    assert proc.returncode != 0
    assert "made for 8 GPUs" in proc.stdout and "--replan" in proc.stdout, proc.stdout[-3000:]
    assert _topology(rehearsal) == before
    proc = _gpu_box_playbook(rehearsal, 2, "-e", "appliance_replan=true")
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    topo = _topology(rehearsal)
    assert topo["env_files"] == ["vllm-0.env", "vllm-1.env"] and topo["devices"] == ["0", "1"]
    assert topo["plan"] == (2, 2, True)
    assert topo["enabled"] == [0, 1]
    assert topo["upstreams"] == ["8000", "8001"]


def test_uninstall_leaves_no_clinic_edge_unit_and_keeps_the_models(rehearsal: Rehearsal) -> None:
    uninstaller = rehearsal.root / "usr/local/sbin/clinic-edge-uninstall"
    assert uninstaller.stat().st_mode & 0o777 == 0o755
    # The one the install wrote, run with the source folder and the bundle hidden (an empty tmpfs over each, in a
    # mount namespace of its own): it must need neither.
    hide = 'mount -t tmpfs none /opt/clinic-edge-src && mount -t tmpfs none /opt/clinic-edge-bundle && exec "$@"'
    proc = rehearsal.run("unshare", "-m", "sh", "-c", hide, "sh", "/usr/local/sbin/clinic-edge-uninstall", "--yes")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "NVIDIA driver and Fabric Manager" in proc.stdout
    units = rehearsal.run("systemctl", "list-units", "--all", "--plain", "--no-legend", "clinic-edge*").stdout
    files = rehearsal.run("systemctl", "list-unit-files", "--plain", "--no-legend", "clinic-edge*").stdout
    assert units.strip() == "" and files.strip() == "", units + files
    for user in ("clinic-edge-vllm", "clinic-edge-gateway", "clinic-edge-selftest"):
        assert rehearsal.run("id", user).returncode != 0, f"the service user {user} is still there"
    for gone in ("opt/clinic-edge", "etc/clinic-edge", "run/clinic-edge", "var/cache/clinic-edge"):
        assert not (rehearsal.root / gone).exists(), gone
    assert not (rehearsal.root / "usr/local/bin/clinic-edge").is_symlink()
    assert not uninstaller.exists()
    assert (rehearsal.root / f"var/lib/clinic-edge/models/{MODEL}/config.json").is_file()
    assert (rehearsal.root / "var/lib/clinic-edge/selftest/latest.json").is_file()
    assert rehearsal.run("nft", "list", "table", "inet", "clinic_edge").returncode != 0
    # --purge is covered against a fake root in tests/unit/test_uninstaller.py (a second install here costs minutes).


def test_check_on_a_bare_box_shows_the_plan_and_changes_nothing(rehearsal: Rehearsal) -> None:
    proc = rehearsal.run(INNER_INSTALL, "--check", "--bundle", "/opt/clinic-edge-bundle", "--profile", "cpu",
                         "--lan", "192.168.0.0/16")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "An install would" in proc.stdout
    assert not (rehearsal.root / "opt/clinic-edge").exists()
    assert not (rehearsal.root / "etc/clinic-edge").exists()


def test_a_preflight_failure_changes_nothing(rehearsal: Rehearsal) -> None:
    # Too little disk for the model: a 64 KiB filesystem over the state folder (models not there yet).
    assert rehearsal.run("mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", "/var/lib/clinic-edge").returncode == 0
    try:
        proc = rehearsal.run(INNER_INSTALL, "--bundle", "/opt/clinic-edge-bundle", "--profile", "cpu",
                             "--lan", "192.168.0.0/16", "--yes")  # fmt: skip
    finally:
        rehearsal.run("umount", "/var/lib/clinic-edge")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "FAIL disk for the model" in proc.stdout
    assert "nothing was changed" in proc.stderr
    assert not (rehearsal.root / "opt/clinic-edge").exists()
    assert not (rehearsal.root / "etc/clinic-edge").exists()
    assert rehearsal.run("systemctl", "list-unit-files", "--plain", "--no-legend", "clinic-edge*").stdout.strip() == ""
