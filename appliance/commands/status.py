"""``clinic-edge status [--json]``: the dashboard's data, read once, for scripts and monitoring.

Exit 0 when healthy (warnings allowed), 1 when anything is unhealthy.
"""

from __future__ import annotations

import argparse

from appliance.cli import EXIT_NEGATIVE, EXIT_OK, Outcome
from appliance.commands.telemetry_flags import add_telemetry_flags, selftest_max_age, sources_from_args
from appliance.telemetry.health import Problem, age_text, problems
from appliance.telemetry.sources import Snapshot, collect

__all__ = ["register", "render_text"]

GIB = 1024**3


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``status``."""
    parser = subparsers.add_parser(
        "status",
        parents=[common],
        help="is the appliance healthy? (once; exit 1 when not)",
        description="Read memory, vLLM, the gateway, the systemd units and the self-test results once, print them "
        "and exit 1 when anything is unhealthy (a unit down, the gateway not ready, the last self-test failed, a "
        "source that cannot be read). Example: clinic-edge status --json | jq .problems",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_telemetry_flags(parser)
    parser.set_defaults(func=_status)


def _gib(value: int | None) -> str:
    return "N/A" if value is None else f"{value / GIB:.1f} GiB"


def _ms(value: float | None) -> str:
    return "N/A" if value is None else f"{value:.0f} ms"


def _count(value: float | None) -> str:
    return "N/A" if value is None else f"{value:.0f}"


def _memory_lines(snap: Snapshot) -> list[str]:
    part = snap.memory
    if part.error:
        return [f"memory    error: {part.error}"]
    hw = part.hardware
    if hw is None:
        return ["memory    N/A"]
    if not hw.gpus:
        return [f"memory    no NVIDIA GPU ({hw.nvml_error}); host {_gib(hw.host.used)} / {_gib(hw.host.total)} used"]
    lines = []
    for gpu in hw.gpus:
        label = "unified" if gpu.unified else "used"
        fabric = f" · NVSwitch fabric {gpu.fabric}" if gpu.fabric else ""
        lines.append(
            f"memory    GPU {gpu.index} {gpu.name}: {label} {_gib(gpu.memory_used)} / {_gib(gpu.memory_total)}{fabric}"
        )
    if hw.driver_version:
        cuda = hw.cuda_driver_version
        lines.append(
            f"driver    NVIDIA {hw.driver_version}" + (f", CUDA {cuda // 1000}.{cuda % 1000 // 10}" if cuda else "")
        )
    return lines


def render_text(snap: Snapshot, found: list[Problem]) -> str:
    """The human-readable status report."""
    cfg = snap.config
    bad = [p for p in found if p.severity == "bad"]
    lines = [f"clinic-edge status · {cfg.hostname} · {snap.taken_at:%Y-%m-%d %H:%M:%S %Z}"]
    lines.append(f"UNHEALTHY ({len(bad)} problem{'s' if len(bad) != 1 else ''})" if bad else "HEALTHY")
    lines += [f"  {'✖' if p.severity == 'bad' else '▲'} {p.text}" for p in found]
    lines.append(f"endpoint  {cfg.endpoint or 'unknown'} · model {cfg.model or 'unknown'} · plan {cfg.plan_summary()}")
    lines += _memory_lines(snap)
    for r in snap.vllm.replicas:
        kv = "N/A" if r.kv_cache_usage is None else f"{r.kv_cache_usage:.0%}"
        state = "healthy" if r.healthy else "DOWN"
        counts = f"running {_count(r.running)}, waiting {_count(r.waiting)}"
        lines.append(f"vllm      {r.url} {state}, KV cache {kv}, {counts}")
    gw = snap.gateway
    lines.append(f"gateway   {gw.url}: {'ready' if gw.ready else 'NOT READY'}" + (f" ({gw.error})" if gw.error else ""))
    for u in snap.units.units:
        since = f", since {u.since:%Y-%m-%d %H:%M}" if u.since else ""
        lines.append(
            f"unit      {u.name}: {u.active_state}/{u.sub_state}{since}, restarts {u.restarts}, result {u.result}"
        )
    run = snap.selftest.latest
    if run is not None:
        age = f"{age_text(snap.taken_at - run.when)} ago" if run.when else "time unknown"
        verdict = {True: "passed", False: "FAILED", None: "unknown"}[run.passed]
        lines.append(
            f"selftest  {verdict} {age}: TTFT p50 {_ms(run.ttft_p50_ms)}, p99 {_ms(run.ttft_p99_ms)} ({run.reason})"
        )
    return "\n".join(lines)


def _status(args: argparse.Namespace) -> Outcome:
    sources = sources_from_args(args)
    snap = collect(sources)
    found = problems(snap, snap.taken_at, selftest_max_age(args))
    healthy = not any(p.severity == "bad" for p in found)
    data = snap.to_dict() | {
        "healthy": healthy,
        "problems": [{"severity": p.severity, "part": p.part, "text": p.text} for p in found],
    }
    return Outcome(data=data, text=render_text(snap, found), exit_code=EXIT_OK if healthy else EXIT_NEGATIVE)
