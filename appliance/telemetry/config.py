"""What the appliance is: the install answers (``appliance.yml``) and the planner's ``plan.json``."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from appliance.errors import InputError
from appliance.planner.envfile import BASE_PORT
from appliance.planner.plan_file import PlanFile, read_plan_file
from appliance.telemetry.parts import ConfigPart

__all__ = ["DEFAULT_GATEWAY_PORT", "ConfigSource", "read_plan", "replica_urls"]

DEFAULT_GATEWAY_PORT = 8443
FIRST_VLLM_PORT = BASE_PORT  # replica i listens on 127.0.0.1:(BASE_PORT + i)


def read_plan(etc_dir: Path) -> PlanFile | None:
    """The planner's ``ETC/vllm/plan.json``, or ``None`` when it is missing or unreadable."""
    try:
        return read_plan_file(etc_dir / "vllm" / "plan.json")
    except InputError:
        return None


def replica_urls(plan: PlanFile | Mapping[str, Any] | None) -> list[str]:
    """The loopback URLs of the plan's vLLM replicas: their ``port``s, else 8000+i for ``topology.replicas``."""
    if plan is not None and not isinstance(plan, PlanFile):
        plan = PlanFile.from_document(plan)
    if plan is not None and plan.replica_ports:
        return [f"http://127.0.0.1:{port}" for port in plan.replica_ports]
    replicas = plan.replicas if plan is not None else None
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
            plan = PlanFile.from_document({})
        port = _text(answers, "appliance_port", "port", "gateway_port") or str(DEFAULT_GATEWAY_PORT)
        endpoint = _text(answers, "endpoint", "endpoint_url")
        if endpoint is None and answers:
            endpoint = f"https://{self.hostname}:{port}/v1"
        return ConfigPart(
            hostname=self.hostname,
            endpoint=endpoint,
            model=_text(answers, "appliance_model_name", "served_model_name", "model_name") or plan.model_name,
            plan_verdict=plan.verdict,
            replicas=plan.replicas,
            tp=plan.tp,
            max_model_len=plan.max_model_len,
            max_concurrency=plan.max_concurrency,
            kv_cache_gib=plan.kv_cache_gib,
            hardware=plan.hardware_name,
            error="; ".join(problems) or None,
        )
