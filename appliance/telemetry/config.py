"""What the appliance is: the install answers (``appliance.yml``) and the planner's ``plan.json``."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import yaml

from appliance.telemetry.parts import ConfigPart

__all__ = ["DEFAULT_GATEWAY_PORT", "ConfigSource", "read_plan", "replica_urls"]

DEFAULT_GATEWAY_PORT = 8443
FIRST_VLLM_PORT = 8000


def read_plan(etc_dir: Path) -> dict[str, Any] | None:
    """The planner's document from ``ETC/vllm/plan.json``, or ``None`` when it is missing or unreadable."""
    try:
        doc = json.loads((etc_dir / "vllm" / "plan.json").read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def replica_urls(plan: dict[str, Any] | None) -> list[str]:
    """The loopback URLs of the plan's vLLM replicas: their ``port``s, else 8000+i for ``topology.replicas``."""
    listed = plan.get("replicas") if plan else None
    if isinstance(listed, list):
        ports = [_int(r.get("port")) for r in listed if isinstance(r, dict)]
        if ports and all(ports):
            return [f"http://127.0.0.1:{port}" for port in ports]
    topology = plan.get("topology") if plan else None
    replicas = _int(topology.get("replicas")) if isinstance(topology, dict) else None
    return [f"http://127.0.0.1:{FIRST_VLLM_PORT + i}" for i in range(replicas or 1)]


def _text(doc: dict[str, Any], *keys: str) -> str | None:
    for key in keys:
        value = doc.get(key)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
            return str(value)
    return None


class ConfigSource:
    """Reads ``ETC/appliance.yml`` (install.sh's answers: ``appliance_model_name``, ``appliance_port``...) and
    ``ETC/vllm/plan.json``; either may be missing (then says so)."""

    name = "config"

    def __init__(self, etc_dir: Path, hostname: str | None = None) -> None:
        self.etc_dir = etc_dir
        self.hostname = hostname or socket.gethostname()

    def read(self) -> ConfigPart:
        """Host, endpoint, model and the plan summary."""
        problems: list[str] = []
        answers: dict[str, Any] = {}
        answers_path = self.etc_dir / "appliance.yml"
        try:
            loaded = yaml.safe_load(answers_path.read_text())
            answers = loaded if isinstance(loaded, dict) else {}
        except FileNotFoundError:
            problems.append(f"{answers_path} not found (not installed yet?)")
        except (OSError, yaml.YAMLError) as exc:
            problems.append(f"{answers_path} unreadable: {str(exc).splitlines()[0]}")
        plan = read_plan(self.etc_dir)
        if plan is None:
            problems.append(f"{self.etc_dir / 'vllm' / 'plan.json'} missing or not JSON")
            plan = {}
        port = _text(answers, "appliance_port", "port", "gateway_port") or str(DEFAULT_GATEWAY_PORT)
        endpoint = _text(answers, "endpoint", "endpoint_url")
        if endpoint is None and answers:
            endpoint = f"https://{self.hostname}:{port}/v1"
        topology: dict[str, Any] = plan["topology"] if isinstance(plan.get("topology"), dict) else {}
        hardware = plan.get("hardware")
        kv = plan.get("kv_cache_gib")
        return ConfigPart(
            hostname=self.hostname,
            endpoint=endpoint,
            model=_text(answers, "appliance_model_name", "served_model_name", "model_name")
            or _text(plan, "served_model_name", "model"),
            plan_verdict=_text(plan, "verdict"),
            replicas=_int(topology.get("replicas")),
            tp=_int(topology.get("tp")),
            max_model_len=_int(plan.get("max_model_len")),
            max_concurrency=_float(plan.get("max_concurrency")),
            kv_cache_gib=_float(kv),
            hardware=_text(hardware, "name", "profile") if isinstance(hardware, dict) else _text(plan, "hardware"),
            error="; ".join(problems) or None,
        )
