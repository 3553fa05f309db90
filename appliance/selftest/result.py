"""The self-test result document (schema 1, docs/interfaces.md) and the snapshot of what was measured.

The schema's keys are a contract with the dashboard: add fields, never rename. The snapshot records the plan, the
vLLM flags of every replica, the model and the hardware, so that a result read months later says what it was about.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.errors import InputError
from appliance.planner.plan_file import read_plan_document
from appliance.selftest.verdict import Verdict

__all__ = ["SCHEMA", "build_result", "hardware_snapshot", "read_plan", "read_vllm_flags", "utc_now"]

SCHEMA = 1
DEFAULT_PLAN = Path("/etc/clinic-edge/vllm/plan.json")
DEFAULT_VLLM_ENV_DIR = Path("/etc/clinic-edge/vllm")
SUMMARY_KEYS = ("ttft_ms", "ttfc_ms", "tpot_ms", "itl_ms", "e2el_ms")


def utc_now() -> dt.datetime:
    """Now, in UTC, to the second."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def read_plan(path: Path = DEFAULT_PLAN) -> dict[str, Any] | None:
    """The planner's ``plan.json`` as its whole document (the result keeps it as it was), or ``None`` when there
    is none (or it is unreadable)."""
    try:
        return read_plan_document(path)
    except InputError:
        return None


def read_vllm_flags(env_dir: Path = DEFAULT_VLLM_ENV_DIR) -> dict[str, list[str]] | None:
    """``CLINIC_EDGE_VLLM_ARGS`` of every ``vllm-<i>.env``, split like a shell would; ``None`` when none exist."""
    out: dict[str, list[str]] = {}
    try:
        files = sorted(env_dir.glob("vllm-*.env"))
    except OSError:
        return None
    for f in files:
        try:
            for line in f.read_text().splitlines():
                key, sep, value = line.partition("=")
                if sep and key.strip() == "CLINIC_EDGE_VLLM_ARGS":
                    out[f.stem] = shlex.split(shlex.split(value)[0] if value.strip()[:1] in "\"'" else value)
        except (OSError, ValueError):
            continue
    return out or None


def hardware_snapshot() -> dict[str, Any]:
    """GPUs and memory (via :mod:`appliance.hardware`, the only NVML user) plus CPU facts."""
    from appliance.hardware import probe

    snap = probe().to_dict()
    snap["cpu"] = {"count": os.cpu_count(), "machine": platform.machine(), "model": _cpu_model()}
    return snap


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def build_result(
    *,
    run_id: str,
    started_at: dt.datetime,
    finished_at: dt.datetime,
    mode: str,
    target: str,
    target_kind: str,
    model: str,
    points: list[dict[str, Any]],
    verdict: Verdict,
    gateway_share: dict[str, Any] | None,
    plan: dict[str, Any] | None,
    hardware: dict[str, Any] | None,
    snapshot: dict[str, Any],
) -> dict[str, Any]:
    """Assemble the schema-1 document.

    ``summary`` holds the latency figures of the judged load point(s), the ones the verdict used (their names are in
    ``summary.scope``), and the completed/failed counts of the whole run.
    """
    judged = [p for p in points if p.get("judged")] or [p for p in points if p.get("kind") == "text"] or points
    summary = _summary_of(judged)
    # Failures are never dropped: the counts cover every load point, not only the judged ones.
    summary["completed"] = sum(int(p["completed"]) for p in points)
    summary["failed"] = sum(int(p["failed"]) for p in points)
    return {
        "schema": SCHEMA,
        "id": run_id,
        "started_at": started_at.isoformat().replace("+00:00", "Z"),
        "finished_at": finished_at.isoformat().replace("+00:00", "Z"),
        "mode": mode,
        "target": target,
        "target_kind": target_kind,
        "model": model,
        "verdict": verdict.to_dict(),
        "summary": summary,
        "points": points,
        "gateway_share_ms": gateway_share.get("gateway_share_ms") if gateway_share else None,
        "gateway_share": gateway_share,
        "plan": plan,
        "hardware": hardware,
        "snapshot": snapshot,
        "clinic_edge_version": __version__,
    }


def _summary_of(points: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The summary block: one point's figures as they are, several pooled (percentiles from the raw TTFTs)."""
    if not points:
        return {k: None for k in SUMMARY_KEYS} | {
            "completed": 0,
            "failed": 0,
            "request_throughput": 0.0,
            "output_throughput": 0.0,
        }
    if len(points) == 1:
        p = points[0]
        out = {k: p[k] for k in SUMMARY_KEYS}
        out |= {k: p[k] for k in ("completed", "failed", "request_throughput", "output_throughput")}
        out["scope"] = [p["name"]]
        return out
    # Several judged points (not the usual case): the worst of each statistic, so the summary never flatters.
    out = {}
    for k in SUMMARY_KEYS:
        stats: dict[str, float | None] = {}
        for stat in ("mean", "std", "p50", "p90", "p95", "p99"):
            vals = [p[k][stat] for p in points if p[k].get(stat) is not None]
            stats[stat] = max(vals) if vals else None
        out[k] = stats
    out["completed"] = sum(int(p["completed"]) for p in points)
    out["failed"] = sum(int(p["failed"]) for p in points)
    out["request_throughput"] = min(float(p["request_throughput"]) for p in points)
    out["output_throughput"] = min(float(p["output_throughput"]) for p in points)
    out["scope"] = [p["name"] for p in points]
    return out
