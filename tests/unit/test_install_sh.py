"""install.sh's flags and checks that run before anything changes (no root needed for these)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "install.sh"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(SCRIPT), *args], capture_output=True, text=True, timeout=30, check=False)


def test_top_level_install_sh_starts_the_installer() -> None:
    # A plain file, not a symbolic link: the folder may travel on a FAT-formatted USB disk.
    assert not SCRIPT.is_symlink()
    assert 'installer/install.sh" "$@"' in SCRIPT.read_text()
    text = (ROOT / "installer" / "install.sh").read_text()
    assert text.startswith("#!/bin/sh\n")
    assert text.rstrip().endswith('main "$@"')


def test_help_teaches_every_flag_with_an_example() -> None:
    proc = _run("--help")
    assert proc.returncode == 0
    for flag in ("--model", "--model-name", "--profile", "--bundle", "--lan", "--port", "--check", "--resume",
                 "--uninstall", "--purge", "--rehearse", "--keep", "--yes"):  # fmt: skip
        assert flag in proc.stdout, flag
    assert "Example" in proc.stdout
    assert "#" not in proc.stdout.splitlines()[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unknown flag '--bogus'"),
        (["--model"], "--model needs a value"),
        (["--port", "abc"], "is not a number"),
        (["--port", "70000"], "out of range"),
        (["--port", "11000"], "reserved"),
        (["--profile", "a100"], "unknown profile 'a100'"),
        (["--lan", "192.168.1.0"], "not an IPv4 network in CIDR form"),
        (["--purge"], "--purge only goes with --uninstall"),
        (["--keep"], "--keep only goes with --rehearse"),
        (["--model-name", "bad name!"], "has characters other than"),
        (["--port=abc"], "is not a number"),
    ],
)
def test_bad_flags_fail_with_a_remedy_and_exit_2(args: list[str], message: str) -> None:
    proc = _run(*args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "what to do:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_it_refuses_to_run_without_root() -> None:
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", str(SCRIPT), "--yes"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert "must run as root" in proc.stderr
    assert "sudo" in proc.stderr


# --- verify_bundle: a bundle built for another box is refused before anything changes ---------------------------------


def _bundle_for(tmp_path: Path, target: dict[str, object]) -> Path:
    from appliance.bundle import write_manifest

    root = tmp_path / "bundle"
    (root / "wheels").mkdir(parents=True)
    (root / "wheels/a-1.0-py3-none-any.whl").write_bytes(b"wheel a")
    write_manifest(root, {"profile": "gpu", "model_name": "demo", "target": target})
    return root


def _verify_bundle(bundle: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # install.sh's own verify_bundle, with its output helpers stubbed (the rest of install.sh needs root and systemd).
    text = (ROOT / "installer" / "install.sh").read_text()
    match = re.search(r"^verify_bundle\(\) \{\n.*?^\}\n", text, re.S | re.M)
    assert match, "verify_bundle() not found in installer/install.sh"
    script = (
        'step() { echo "step: $*"; }\ninfo() { echo "$*"; }\nlog_line() { :; }\n'
        'fatal() { echo "error: $1"; echo "what to do: $2"; exit "${3:-2}"; }\n'
        f"{match[0]}\nverify_bundle\necho verified\n"
    )
    env = {"PATH": os.environ["PATH"], "SRC": str(ROOT), "PYTHON": sys.executable, "BUNDLE": str(bundle),
           "LOG": str(tmp_path / "install.log")}  # fmt: skip
    return subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60, check=False)


def _this_box_target() -> dict[str, object]:
    from appliance.bundle import probe_box

    box = probe_box()
    return {"os": "this-box", "os_name": box.name, "os_release": box.os_release, "glibc": "2.17", "arch": box.arch,
            "python": box.python, "cuda": 13, "min_driver": 580, "vllm": "vllm==0.33.0"}  # fmt: skip


def test_a_bundle_for_another_box_is_refused_before_its_files_are_hashed(tmp_path: Path) -> None:
    spark = {**_this_box_target(), "os": "dgx-os", "os_name": "DGX OS 7 (Ubuntu 24.04)", "os_release": "ubuntu 24.04",
             "arch": "riscv64"}  # fmt: skip
    bundle = _bundle_for(tmp_path, spark)
    (bundle / "wheels/a-1.0-py3-none-any.whl").write_bytes(b"corrupt")  # verify would complain: it must not run
    proc = _verify_bundle(bundle, tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"error: the bundle {bundle} is for DGX OS 7 (Ubuntu 24.04), riscv64" in proc.stdout
    assert "they differ in: " in proc.stdout and "CPU architecture" in proc.stdout
    assert "what to do: On a machine with internet, build a bundle for this box" in proc.stdout
    assert "clinic-edge bundle build --out" in proc.stdout
    assert "corrupt" not in proc.stdout and "verified" not in proc.stdout


def test_a_bundle_for_this_box_passes_both_checks(tmp_path: Path) -> None:
    bundle = _bundle_for(tmp_path, _this_box_target())
    proc = _verify_bundle(bundle, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().endswith("verified")
    (bundle / "wheels/a-1.0-py3-none-any.whl").write_bytes(b"corrupt")
    proc = _verify_bundle(bundle, tmp_path)
    assert proc.returncode == 1
    assert "is incomplete or corrupt" in proc.stdout
