"""The offline bundle's manifest and verification, and the model store."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from appliance.bundle import build_bundle, gpu_download_argv, verify_bundle, write_manifest
from appliance.cli import main
from appliance.errors import InputError, UsageError
from appliance.model_store import RECORD, install_model

ROOT = Path(__file__).resolve().parents[2]


def _bundle(tmp_path: Path) -> Path:
    root = tmp_path / "bundle"
    (root / "wheels").mkdir(parents=True)
    (root / "model/demo").mkdir(parents=True)
    (root / "wheels/a-1.0-py3-none-any.whl").write_bytes(b"wheel a")
    (root / "model/demo/config.json").write_text('{"model_type": "idefics3"}')
    (root / "model/demo/model.safetensors").write_bytes(os.urandom(4096))
    write_manifest(root, {"profile": "cpu", "arch": "x86_64", "python": "3.11", "model_name": "demo"})
    return root


def test_an_intact_bundle_verifies(tmp_path: Path) -> None:
    assert verify_bundle(_bundle(tmp_path)).ok


def test_verify_names_missing_extra_and_corrupt_files(tmp_path: Path) -> None:
    root = _bundle(tmp_path)
    (root / "wheels/a-1.0-py3-none-any.whl").unlink()
    (root / "wheels/stray.whl").write_bytes(b"x")
    data = bytearray((root / "model/demo/model.safetensors").read_bytes())
    data[100] ^= 0xFF
    (root / "model/demo/model.safetensors").write_bytes(bytes(data))
    problems = verify_bundle(root)
    assert problems.missing == ["wheels/a-1.0-py3-none-any.whl"]
    assert problems.extra == ["wheels/stray.whl"]
    assert problems.corrupt == ["model/demo/model.safetensors"]
    assert not problems.ok


def test_bundle_verify_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _bundle(tmp_path)
    assert main(["bundle", "verify", str(root), "--json"]) == 0
    (root / "model/demo/config.json").write_text("{}")
    capsys.readouterr()
    assert main(["bundle", "verify", str(root), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["corrupt"] == ["model/demo/config.json"]
    assert main(["bundle", "verify", str(tmp_path / "nowhere"), "--json"]) == 2


def test_verify_runs_with_the_standard_library_only(tmp_path: Path) -> None:
    # install.sh verifies with the system Python before any venv exists: no site-packages (-S).
    root = _bundle(tmp_path)
    env = {"PYTHONPATH": str(ROOT), "PATH": os.environ["PATH"]}
    ok = subprocess.run(["python3", "-S", "-m", "appliance.bundle", "verify", str(root)], env=env,
                        capture_output=True, text=True, check=False)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    (root / "wheels/extra.whl").write_bytes(b"x")
    bad = subprocess.run(["python3", "-S", "-m", "appliance.bundle", "verify", str(root)], env=env,
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert bad.returncode == 1
    assert "extra: wheels/extra.whl" in bad.stdout


def test_gpu_wheels_are_fetched_for_the_target_platform(tmp_path: Path) -> None:
    argv = gpu_download_argv("python3", tmp_path, "aarch64", "3.12", ["vllm==0.33.0"])
    assert argv[argv.index("--platform") + 1] == "manylinux_2_28_aarch64"
    assert argv[argv.index("--python-version") + 1] == "3.12"
    assert argv[argv.index("--abi") + 1] == "cp312"
    assert "--only-binary=:all:" in argv
    assert argv[-1] == "vllm==0.33.0"


def test_build_rejects_impossible_requests(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="architecture"):
        build_bundle(tmp_path, profile="gpu", arch="sparc", py_version="3.12", cache=tmp_path, demo_model=True)
    with pytest.raises(UsageError, match="this machine"):
        build_bundle(tmp_path, profile="cpu", arch="x86_64", py_version="3.10", cache=tmp_path, demo_model=True)
    with pytest.raises(UsageError, match="exactly one"):
        build_bundle(tmp_path, profile="gpu", arch="aarch64", py_version="3.12", cache=tmp_path)


def test_model_install_copies_verifies_and_is_idempotent(tmp_path: Path) -> None:
    root = _bundle(tmp_path)
    store = tmp_path / "store"
    first = install_model(root / "model/demo", store, "demo", root / "manifest.json")
    assert first.changed and first.files == 2
    stored = store / "demo" / "model.safetensors"
    assert stored.read_bytes() == (root / "model/demo/model.safetensors").read_bytes()
    assert oct(stored.stat().st_mode & 0o777) == "0o644"
    assert (store / "demo" / RECORD).is_file()
    assert not install_model(root / "model/demo", store, "demo", root / "manifest.json").changed


def test_model_install_refuses_a_corrupt_source(tmp_path: Path) -> None:
    root = _bundle(tmp_path)
    (root / "model/demo/model.safetensors").write_bytes(b"tampered")
    with pytest.raises(InputError, match="corrupt"):
        install_model(root / "model/demo", tmp_path / "store", "demo", root / "manifest.json")
    assert not (tmp_path / "store" / "demo").exists()
