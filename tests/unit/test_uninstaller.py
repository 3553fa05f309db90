"""The uninstaller the base role writes at install time: rendered by Ansible, then run against a fake root.

The fake root is honest because every path the script touches is a role variable: the test renders the template with
those variables pointed under ``tmp_path`` and puts stubs for systemctl, nft, id and userdel first on PATH (they log
their arguments). The system tier runs the real one in the rehearsal container.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOKS = ROOT / "playbooks"
TEMPLATE = PLAYBOOKS / "roles/base/templates/clinic-edge-uninstall.sh.j2"
DEFAULTS = PLAYBOOKS / "roles/base/defaults/main.yml"
USERS = ["clinic-edge-vllm", "clinic-edge-gateway", "clinic-edge-selftest"]

STUBS = {
    # Two vLLM instances are loaded; the template unit itself is never listed by list-units.
    "systemctl": """#!/bin/sh
echo "systemctl $*" >>"$STUB_LOG"
case $1 in list-units) printf '%s\\n' 'clinic-edge-vllm@0.service loaded active running vLLM 0' \
    'clinic-edge-vllm@1.service loaded active running vLLM 1' 'clinic-edge-gateway.service loaded active running gw' ;;
esac
exit 0
""",
    "nft": '#!/bin/sh\necho "nft $*" >>"$STUB_LOG"\nexit 0\n',
    "id": """#!/bin/sh
if [ "$1" = -u ]; then echo "${STUB_UID:-0}"; exit 0; fi
grep -qx "$1" "$STUB_USERS"
""",
    "userdel": '#!/bin/sh\necho "userdel $*" >>"$STUB_LOG"\ngrep -vx "$1" "$STUB_USERS" >"$STUB_USERS.new"\n'
    'mv "$STUB_USERS.new" "$STUB_USERS"\n',
}


def render(dest: Path, overrides: dict[str, object] | None = None) -> Path:
    """The template rendered by Ansible itself, with the role's defaults (and ``overrides``), as an install does."""
    ansible = Path(sys.executable).parent / "ansible"
    require(ansible.exists(), "ansible is not installed in this venv (pip install -e '.[test]')")
    env = os.environ | {
        "ANSIBLE_CONFIG": str(PLAYBOOKS / "ansible.cfg"),
        "ANSIBLE_LOCAL_TEMP": str(dest.parent / ".ansible-tmp"),
        "ANSIBLE_REMOTE_TEMP": str(dest.parent / ".ansible-tmp"),
        "ANSIBLE_HOME": str(dest.parent / ".ansible"),
    }
    argv = [str(ansible), "localhost", "-c", "local", "-i", "localhost,", "-m", "ansible.builtin.template",
            "-a", f"src={TEMPLATE} dest={dest} mode=0755", "-e", f"@{DEFAULTS}",
            "-e", json.dumps({"ansible_python_interpreter": sys.executable} | (overrides or {}))]  # fmt: skip
    proc = subprocess.run(argv, cwd=PLAYBOOKS, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dest


def test_the_rendered_uninstaller_is_posix_sh_with_this_installs_values_baked_in(tmp_path: Path) -> None:
    script = render(tmp_path / "clinic-edge-uninstall")
    assert script.stat().st_mode & 0o777 == 0o755
    subprocess.run(["sh", "-n", str(script)], check=True)
    require(shutil.which("shellcheck") is not None, "shellcheck is not installed (apt-get install shellcheck)")
    lint = subprocess.run(["shellcheck", "-s", "sh", str(script)], capture_output=True, text=True, check=False)
    assert lint.returncode == 0, lint.stdout
    text = script.read_text()
    assert text.splitlines()[-1] == 'main "$@"'
    assert "PREFIX=/opt/clinic-edge\n" in text and "SELF=/usr/local/sbin/clinic-edge-uninstall\n" in text
    assert f"USERS='{' '.join(USERS)}'\n" in text
    assert "{{" not in text and "{%" not in text


@pytest.fixture
def box(tmp_path: Path) -> dict[str, Path]:
    """A fake root with what an install leaves, the uninstaller rendered for it, and the PATH stubs."""
    root = tmp_path / "root"
    defaults = yaml.safe_load(DEFAULTS.read_text())
    # The facts the roles share (playbooks/group_vars/all.yml) fill in the defaults that refer to them.
    shared = yaml.safe_load((PLAYBOOKS / "group_vars/all.yml").read_text())
    defaults = {
        key: shared[value[3:-3].strip()] if isinstance(value, str) and value[3:-3].strip() in shared else value
        for key, value in defaults.items()
    }
    paths = {
        key: str(root) + value
        for key, value in defaults.items()
        if isinstance(value, str) and value.startswith("/") and key != "base_prefix"
    }
    overrides: dict[str, object] = paths | {
        "base_prefix": f"{root}/opt/clinic-edge",
        "base_system_files": [str(root) + f for f in defaults["base_system_files"]],
    }
    files = [
        "opt/clinic-edge/venv/bin/python",
        "etc/clinic-edge/appliance.yml",
        "etc/clinic-edge/tls/ca.crt",
        "var/lib/clinic-edge/models/demo/config.json",
        "var/lib/clinic-edge/selftest/latest.json",
        "var/lib/clinic-edge/reboot-pending",
        "var/log/clinic-edge/install.log",
        "var/cache/clinic-edge/vllm-0/hf/x",
        "run/clinic-edge/ansible.rc",
        "usr/local/lib/systemd/system/clinic-edge-gateway.service.d/50-lan.conf",
        "usr/local/lib/systemd/system/someone-else.service",
        "etc/systemd/system/clinic-edge-vllm@.service.d/override.conf",
        "etc/systemd/system/someone-else.service",
        "etc/modules-load.d/clinic-edge-nvidia.conf",
        "etc/modprobe.d/clinic-edge-blacklist-nouveau.conf",
        "etc/modprobe.d/nvidia-graphics-drivers.conf",
        *[f"usr/local/lib/systemd/system/{u}" for u in defaults["base_units"]],
    ]
    for relative in files:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text("x")
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "usr/local/bin/clinic-edge").symlink_to(root / "opt/clinic-edge/venv/bin/clinic-edge")
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    (wants / "clinic-edge-gateway.service").symlink_to(
        root / "usr/local/lib/systemd/system/clinic-edge-gateway.service"
    )
    (root / "usr/local/sbin").mkdir(parents=True)
    render(root / "usr/local/sbin/clinic-edge-uninstall", overrides)
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, body in STUBS.items():
        (stubs / name).write_text(body)
        (stubs / name).chmod(0o755)
    (tmp_path / "users").write_text("\n".join([*USERS, "alice"]) + "\n")
    return {"root": root, "stubs": stubs, "log": tmp_path / "calls.log", "users": tmp_path / "users"}


def run(box: dict[str, Path], *args: str, uid: int = 0) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": f"{box['stubs']}:/usr/bin:/bin",
        "STUB_LOG": str(box["log"]),
        "STUB_USERS": str(box["users"]),
        "STUB_UID": str(uid),
    }
    script = box["root"] / "usr/local/sbin/clinic-edge-uninstall"
    return subprocess.run(["sh", str(script), *args], env=env, capture_output=True, text=True, timeout=60, check=False)


def test_uninstall_removes_what_the_install_made_and_keeps_models_history_and_logs(box: dict[str, Path]) -> None:
    proc = run(box, "--yes")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    root = box["root"]
    for gone in ["opt/clinic-edge", "etc/clinic-edge", "run/clinic-edge", "var/cache/clinic-edge",
                 "var/lib/clinic-edge/reboot-pending", "etc/modules-load.d/clinic-edge-nvidia.conf",
                 "etc/modprobe.d/clinic-edge-blacklist-nouveau.conf", "etc/systemd/system/clinic-edge-vllm@.service.d",
                 "etc/systemd/system/multi-user.target.wants/clinic-edge-gateway.service",
                 "usr/local/lib/systemd/system/clinic-edge-gateway.service.d",
                 "usr/local/lib/systemd/system/clinic-edge-vllm@.service",
                 "usr/local/sbin/clinic-edge-uninstall"]:  # fmt: skip
        assert not (root / gone).exists() and not (root / gone).is_symlink(), gone
    assert not (root / "usr/local/bin/clinic-edge").is_symlink()
    for kept in ["var/lib/clinic-edge/models/demo/config.json", "var/lib/clinic-edge/selftest/latest.json",
                 "var/log/clinic-edge/install.log", "usr/local/lib/systemd/system/someone-else.service",
                 "etc/systemd/system/someone-else.service", "etc/modprobe.d/nvidia-graphics-drivers.conf"]:  # fmt: skip
        assert (root / kept).is_file(), kept
    calls = box["log"].read_text().splitlines()
    for unit in ["clinic-edge-vllm@0.service", "clinic-edge-vllm@1.service", "clinic-edge-gateway.service",
                 "clinic-edge-selftest.timer", "clinic-edge-firewall.service"]:  # fmt: skip
        assert f"systemctl disable --now {unit}" in calls, unit
    assert "systemctl disable --now clinic-edge-vllm@.service" not in calls
    assert "systemctl daemon-reload" in calls and "nft delete table inet clinic_edge" in calls
    assert [c for c in calls if c.startswith("userdel")] == [f"userdel {u}" for u in USERS]
    assert box["users"].read_text() == "alice\n"
    assert "Kept: " in proc.stdout and "NVIDIA driver and Fabric Manager" in proc.stdout


def test_purge_also_removes_models_history_and_logs(box: dict[str, Path]) -> None:
    proc = run(box, "--purge", "--yes")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (box["root"] / "var/lib/clinic-edge").exists()
    assert not (box["root"] / "var/log/clinic-edge").exists()
    assert not (box["root"] / "opt/clinic-edge").exists()
    assert "removed, with its data" in proc.stdout


def test_it_refuses_to_run_without_root_and_changes_nothing(box: dict[str, Path]) -> None:
    proc = run(box, "--yes", uid=1000)
    assert proc.returncode == 2
    assert "must run as root" in proc.stderr and "sudo" in proc.stderr
    assert (box["root"] / "opt/clinic-edge").is_dir() and not box["log"].exists()


def test_unknown_flag_and_help(box: dict[str, Path]) -> None:
    bad = run(box, "--purge-everything")
    assert bad.returncode == 2 and "unknown flag '--purge-everything'" in bad.stderr
    helped = run(box, "--help")
    assert helped.returncode == 0 and "--purge" in helped.stdout and "Keeps:" in helped.stdout
    assert (box["root"] / "opt/clinic-edge").is_dir()
