from __future__ import annotations

import json
import subprocess
import sys

import pytest

from appliance import __version__
from appliance.cli import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"clinic-edge {__version__}"


def test_help_lists_subcommands_and_conventions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("demo-model", "vllm-cpu"):
        assert command in out
    assert "exit codes" in out and "--json" in out


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: clinic-edge" in capsys.readouterr().err


def test_error_is_a_paragraph_not_a_traceback(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "x").write_text("occupied")
    assert main(["demo-model", "build", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "what to do:" in err and "Traceback" not in err


def test_error_as_json(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "x").write_text("occupied")
    assert main(["demo-model", "build", str(tmp_path), "--json"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["error"]["kind"] == "input"
    assert "--force" in doc["error"]["remedy"]


def test_console_script_is_installed() -> None:
    """The installed entry point, not just the module, answers --help."""
    exe = __import__("shutil").which("clinic-edge", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert exe, "clinic-edge console script not found next to the interpreter"
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "commands:" in proc.stdout
