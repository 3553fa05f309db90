"""Facts the playbooks and the Python package both need, written once in each and checked to agree here."""

from __future__ import annotations

from pathlib import Path

import yaml

from appliance import preflight
from appliance.planner.envfile import BASE_PORT

ROOT = Path(__file__).resolve().parents[2]
SHARED = yaml.safe_load((ROOT / "playbooks/group_vars/all.yml").read_text())


def test_the_vllm_ports_agree() -> None:
    assert SHARED["appliance_vllm_base_port"] == BASE_PORT == preflight.VLLM_FIRST_PORT


def test_the_plan_file_and_units_are_where_the_code_looks() -> None:
    assert Path(SHARED["appliance_vllm_env_dir"]) / "plan.json" == preflight.PLAN_FILE
    unit = (ROOT / "systemd/clinic-edge-vllm@.service").read_text()
    assert f"EnvironmentFile={SHARED['appliance_vllm_env_dir']}/vllm-%i.env" in unit
    assert f"ExecStartPre={SHARED['appliance_cli']} vllm-gate" in unit


def test_no_role_writes_a_shared_fact_out_again() -> None:
    spelled_out = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "playbooks/roles").rglob("*")
        if path.is_file()
        and path.suffix in (".yml", ".j2")
        and any(str(SHARED[key]) in path.read_text() for key in ("appliance_unit_dir", "appliance_cli"))
    ]
    assert spelled_out == []
