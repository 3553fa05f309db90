"""The systemd unit files: systemd-analyze verify, the gateway's exposure score, and the GPU-critical directives."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require

UNITS = Path(__file__).resolve().parents[2] / "systemd"
ALL = sorted(p.name for p in UNITS.iterdir())
MAX_GATEWAY_EXPOSURE = 3.0
# The vLLM unit keeps the GPU devices, loopback TCP and run-time compilation; the firewall keeps CAP_NET_ADMIN as root.
MAX_VLLM_EXPOSURE = 2.5
MAX_FIREWALL_EXPOSURE = 2.0


def _directives(name: str) -> list[tuple[str, str]]:
    out = []
    for line in (UNITS / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.append((key.strip(), value.strip()))
    return out


@pytest.mark.parametrize("name", ALL)
def test_unit_verifies(name: str) -> None:
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze is not installed")
    proc = subprocess.run(["systemd-analyze", "verify", str(UNITS / name)], capture_output=True, text=True, check=False)
    # The programs live under /opt/clinic-edge only on an installed box (the system tier verifies them there).
    complaints = [
        line
        for line in proc.stderr.splitlines()
        if line.strip() and not re.search(r"Command /opt/clinic-edge/\S+ is not executable", line)
    ]
    assert complaints == [], "\n".join(complaints)


def _exposure(name: str) -> float:
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze is not installed")
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(UNITS / name)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout + proc.stderr)
    assert match, proc.stdout[-2000:] + proc.stderr[-2000:]
    return float(match.group(1))


def test_gateway_exposure_is_at_most_3() -> None:
    score = _exposure("clinic-edge-gateway.service")
    print(f"\nclinic-edge-gateway.service exposure: {score}")
    assert score <= MAX_GATEWAY_EXPOSURE


def test_vllm_exposure_is_at_most_2_5() -> None:
    score = _exposure("clinic-edge-vllm@.service")
    print(f"\nclinic-edge-vllm@.service exposure: {score}")
    assert score <= MAX_VLLM_EXPOSURE


def test_firewall_exposure_is_at_most_2() -> None:
    score = _exposure("clinic-edge-firewall.service")
    print(f"\nclinic-edge-firewall.service exposure: {score}")
    assert score <= MAX_FIREWALL_EXPOSURE


def test_vllm_unit_filters_system_calls_and_gates_unified_memory() -> None:
    d = _directives("clinic-edge-vllm@.service")
    assert ("SystemCallFilter", "@system-service") in d and ("SystemCallErrorNumber", "EPERM") in d
    assert ("ProtectProc", "invisible") in d
    # torch and Triton write executable code at run time; /proc/meminfo must stay readable.
    assert "MemoryDenyWriteExecute" not in dict(d) and "ProcSubset" not in dict(d)
    assert (
        "ExecStartPre",
        "/opt/clinic-edge/venv/bin/clinic-edge vllm-gate --plan /etc/clinic-edge/vllm/plan.json",
    ) in d


def test_vllm_unit_keeps_the_gpu_and_stays_on_loopback() -> None:
    d = _directives("clinic-edge-vllm@.service")
    assert ("EnvironmentFile", "/etc/clinic-edge/vllm/vllm-%i.env") in d
    assert (
        "ExecStart",
        "/opt/clinic-edge/vllm/bin/python -m vllm.entrypoints.openai.api_server $CLINIC_EDGE_VLLM_ARGS",
    ) in d
    assert ("DeviceAllow", "char-nvidia-frontend rw") in d
    assert ("DeviceAllow", "char-nvidia-uvm rw") in d
    assert "PrivateDevices" not in dict(d)
    assert ("IPAddressDeny", "any") in d and ("IPAddressAllow", "localhost") in d
    assert ("NoNewPrivileges", "yes") in d and ("ProtectSystem", "strict") in d
    assert ("Restart", "on-failure") in d
    assert ("User", "clinic-edge-vllm") in d
    assert dict(d)["TimeoutStartSec"] == "30min"
    assert any(k == "ReadWritePaths" for k, _ in d)


def test_vllm_keeps_idle_connections_longer_than_the_gateway_reuses_them() -> None:
    from appliance.gateway.config import GatewayConfig
    from appliance.vllm_server import SERVING_ENV

    env = dict(kv.split("=", 1) for k, v in _directives("clinic-edge-vllm@.service") if k == "Environment"
               for kv in v.split())  # fmt: skip
    assert env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] == SERVING_ENV["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"]
    assert float(env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"]) > GatewayConfig().upstream_keepalive_s


def test_gateway_unit_is_denied_the_network_but_loopback_and_the_lan_drop_in() -> None:
    d = _directives("clinic-edge-gateway.service")
    assert ("IPAddressDeny", "any") in d and ("IPAddressAllow", "localhost") in d
    assert ("ExecStart", "/opt/clinic-edge/venv/bin/clinic-edge gateway --config /etc/clinic-edge/gateway.yml") in d
    dropin = (UNITS.parent / "playbooks/roles/gateway/templates/50-lan.conf.j2").read_text()
    assert "IPAddressAllow={{ gateway_lan_cidr }}" in dropin


def test_units_say_how_to_override_them() -> None:
    for name in ALL:
        head = (UNITS / name).read_text().split("[Unit]")[0]
        assert "systemctl edit" in head or name == "clinic-edge-firewall.service", name
