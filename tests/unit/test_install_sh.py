"""install.sh's flags and checks that run before anything changes (no root needed for these)."""

from __future__ import annotations

import subprocess
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
