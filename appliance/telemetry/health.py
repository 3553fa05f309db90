"""The health verdict over a snapshot: what is wrong (``bad``) and what deserves a look (``warn``).

``clinic-edge status`` exits 1 when any problem is ``bad``; the dashboard shows the same list in its header. A
source that could not be read is ``bad`` when it watches something that must be up (units, gateway, vLLM, the
self-test's results), because then nobody can say it is healthy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

from appliance.telemetry.sources import Snapshot
from appliance.tls import GATEWAY_RESTART, RENEW_BEFORE

__all__ = ["DEFAULT_SELFTEST_MAX_AGE", "Problem", "age_text", "problems", "short_age"]

# The timer runs nightly; a result older than a day and a bit means a run was missed.
DEFAULT_SELFTEST_MAX_AGE = timedelta(hours=26)


@dataclass(frozen=True)
class Problem:
    """One thing that is wrong (``bad``) or suspicious (``warn``), in words, with the part it concerns."""

    severity: Literal["bad", "warn"]
    part: str
    text: str


def age_text(delta: timedelta) -> str:
    """``42 s``, ``5 min``, ``3 h 10 min``, ``2 d 4 h``."""
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def short_age(delta: timedelta) -> str:
    """``42s``, ``5m``, ``3h10m``, ``2d4h`` — for table cells."""
    text = age_text(delta)
    for long, short in ((" min", "m"), (" s", "s"), (" h", "h"), (" d", "d"), (" ", "")):
        text = text.replace(long, short)
    return text


def problems(snap: Snapshot, now: datetime, selftest_max_age: timedelta = DEFAULT_SELFTEST_MAX_AGE) -> list[Problem]:
    """Everything that is wrong or suspicious, ``bad`` first."""
    found: list[Problem] = []

    def bad(part: str, text: str) -> None:
        found.append(Problem("bad", part, text))

    def warn(part: str, text: str) -> None:
        found.append(Problem("warn", part, text))

    if snap.units.error:
        bad("units", f"service state unknown: {snap.units.error}")
    for unit in snap.units.units:
        if not unit.healthy:
            state = unit.load_state if unit.load_state == "not-found" else f"{unit.active_state}/{unit.sub_state}"
            result = f", result {unit.result}" if unit.result and unit.result != "success" else ""
            bad("units", f"{unit.name} is {state}{result}")
    if snap.gateway.error:
        bad("gateway", f"gateway: {snap.gateway.error}")
    elif snap.gateway.ready is False:
        bad("gateway", "gateway not ready: " + ("; ".join(snap.gateway.reasons) or "no reason given"))
    if snap.vllm.error:
        bad("vllm", snap.vllm.error)
    for replica in snap.vllm.replicas:
        if not replica.healthy:
            bad("vllm", f"vLLM {replica.url}: {replica.error or 'unhealthy'}")
        elif replica.error:
            warn("vllm", f"vLLM {replica.url}: {replica.error}")
    selftest = snap.selftest
    if selftest.error:
        bad("selftest", selftest.error)
    elif selftest.latest is None:
        warn("selftest", "no self-test result yet")
    else:
        if selftest.latest.passed is False:
            bad("selftest", f"last self-test failed: {selftest.latest.reason or 'no reason given'}")
        when = selftest.latest.when
        if when is not None and now - when > selftest_max_age:
            warn(
                "selftest",
                f"last self-test is {age_text(now - when)} old (expected within {age_text(selftest_max_age)})",
            )
    if snap.memory.error:
        warn("memory", snap.memory.error)
    hardware = snap.memory.hardware
    planned = (snap.config.hardware or "").lower()
    if hardware is not None and not hardware.gpus and planned and "cpu" not in planned:
        bad("memory", f"the plan is for {snap.config.hardware} but no NVIDIA GPU answers: {hardware.nvml_error}")
    for gpu in hardware.gpus if hardware is not None else []:
        if not gpu.fabric_ready:
            bad(
                "gpu",
                f"GPU {gpu.index} has not joined its NVSwitch fabric ({gpu.fabric}): CUDA fails with error 802 until "
                "it does; check systemctl status nvidia-fabricmanager",
            )
    if snap.config.error:
        warn("config", snap.config.error)
    _certificate_problems(snap, now, bad, warn)
    found.sort(key=lambda p: p.severity != "bad")
    return found


def _certificate_problems(
    snap: Snapshot, now: datetime, bad: Callable[[str, str], None], warn: Callable[[str, str], None]
) -> None:
    """Expired: workstations refuse the gateway (bad). Within :data:`RENEW_BEFORE`: time to renew (warn)."""
    cert = snap.certificate
    if cert.error:
        warn("certificate", cert.error)
    if cert.not_after is None:
        return
    left = cert.not_after - now
    renew = f"sudo clinic-edge tls renew --dir {Path(cert.path).parent}, then {GATEWAY_RESTART}"
    if left <= timedelta(0):
        bad(
            "certificate",
            f"the gateway's certificate expired {age_text(-left)} ago: workstations refuse to connect; run {renew}",
        )
    elif left <= RENEW_BEFORE:
        warn("certificate", f"the gateway's certificate expires in {age_text(left)}; run {renew}")
