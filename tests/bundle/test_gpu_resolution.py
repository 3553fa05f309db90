"""The GPU bundle resolves for every real target box, with the right torch, kernels, CPU, Python and glibc.

Each check reads pip's report from the same resolution ``clinic-edge bundle build`` runs (``appliance.bundle.resolve``
with ``pip_target_args``), metadata only.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

from appliance.bundle import MIN_DRIVER_BY_CUDA, VLLM_GPU, cuda_major, pip_target_args, resolve_target
from tests.bundle.conftest import TARGETS, BundleResolutions

# What vllm==0.33.0 brings (../shared/reference/gpu-paths.md §2). When VLLM_GPU moves, these move with it, after
# checking the new torch's CUDA build against MIN_DRIVER_BY_CUDA and the drivers the boxes run.
VLLM_TORCH = "2.14.0"
VLLM_CUDA = 13
FLASHINFER_KERNEL_WHEELS = ("flashinfer-cubin", "flashinfer-jit-cache")
# Resolving reads metadata only: what pip fetches in whole must stay far below one torch wheel (≈ 450 MB).
MAX_DOWNLOAD_MB = 64.0
_LEGACY_GLIBC = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}

per_target = pytest.mark.parametrize("key", list(TARGETS))


def _pin(requires: list[str], name: str) -> Requirement:
    pins = [Requirement(spec) for spec in requires if canonicalize_name(Requirement(spec).name) == name]
    assert len(pins) == 1, f"expected one requirement on {name}, found {pins}"
    return pins[0]


def _wheel_glibc(platform_tag: str) -> tuple[int, int] | None:
    match = re.fullmatch(r"manylinux_(\d+)_(\d+)_\w+", platform_tag)
    if match:
        return int(match[1]), int(match[2])
    return _LEGACY_GLIBC.get(platform_tag.split("_", 1)[0])


@per_target
def test_vllm_resolves_with_its_pinned_torch_a_cuda_13_build(resolutions: BundleResolutions, key: str) -> None:
    r = resolutions.by_key[key].resolution
    assert r.version("vllm") == VLLM_GPU.split("==")[1]
    torch = r.version("torch")
    assert torch == VLLM_TORCH
    assert _pin(r.requires("vllm"), "torch").specifier.contains(torch)
    assert cuda_major(r.requires("torch")) == VLLM_CUDA, r.requires("torch")
    assert MIN_DRIVER_BY_CUDA[VLLM_CUDA] == 580  # CUDA 13.x runs on driver branch 580 and newer


@per_target
def test_flashinfer_kernel_wheels_match_flashinfer_python(resolutions: BundleResolutions, key: str) -> None:
    # FlashInfer ignores kernel wheels of another version and downloads cubins at first use instead.
    r = resolutions.by_key[key].resolution
    flashinfer = r.version("flashinfer-python")
    assert flashinfer is not None
    assert _pin(r.requires("vllm"), "flashinfer-python").specifier.contains(flashinfer)
    for name in FLASHINFER_KERNEL_WHEELS:
        assert r.version(name) in (None, flashinfer), f"{name} {r.version(name)} next to flashinfer {flashinfer}"


@per_target
def test_every_wheel_fits_the_target_cpu_python_and_glibc(resolutions: BundleResolutions, key: str) -> None:
    resolved = resolutions.by_key[key]
    target, report = resolved.target, resolved.resolution.report
    accepted = set(target.platforms()) | {"any"}
    version = tuple(int(part) for part in target.python.split("."))
    interpreter = "cp" + target.python.replace(".", "")
    # The tags pip accepts on the target (packaging's, which pip uses): cp312/abi3/none, py3x, any.
    supported = set(cpython_tags(version, [interpreter], target.platforms()))
    supported |= set(compatible_tags(version, interpreter, target.platforms()))
    needed: dict[str, tuple[int, int]] = {}
    for item in report["install"]:
        url = item["download_info"]["url"]
        assert url.startswith("https://"), f"{url}: not from the package index"
        filename = url.rsplit("/", 1)[-1]
        _, _, _, tags = parse_wheel_filename(filename)
        platforms = {tag.platform for tag in tags}
        assert platforms & accepted, f"{filename}: no platform tag {target.arch} with glibc ≤ {target.os.glibc}"
        assert all(p == "any" or p.endswith(f"_{target.arch}") for p in platforms), f"{filename}: another CPU"
        assert tags & supported, f"{filename}: not for CPython {target.python} on {target.arch}"
        glibcs = [g for g in map(_wheel_glibc, platforms) if g]
        if glibcs:
            needed[filename] = min(glibcs)
    assert needed, "no manylinux wheel at all: the resolution cannot be vLLM's"
    newest = max(needed.values())
    assert newest <= target.os.glibc, [f for f, g in needed.items() if g > target.os.glibc]


@per_target
def test_the_resolution_is_complete_for_the_target_python_and_cpu(resolutions: BundleResolutions, key: str) -> None:
    # pip evaluates markers with the Python running it; what the target's markers need must be there all the same.
    resolved = resolutions.by_key[key]
    report = resolved.resolution.report
    env = {**report["environment"], "python_version": resolved.target.python,
           "python_full_version": f"{resolved.target.python}.0", "platform_machine": resolved.target.arch}  # fmt: skip
    chosen = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}
    lacking = []
    for item in report["install"]:
        for spec in item["metadata"].get("requires_dist") or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
                continue
            version = chosen.get(canonicalize_name(req.name))
            if version is None or not req.specifier.contains(version, prereleases=True):
                lacking.append(f"{item['metadata']['name']} needs {spec} (resolved: {version})")
    assert not lacking


@per_target
def test_resolving_downloads_no_wheels(resolutions: BundleResolutions, key: str) -> None:
    log = resolutions.by_key[key].resolution.log
    units = {"kB": 1e-3, "MB": 1.0, "GB": 1e3}
    fetched = [
        (m[1], float(m[2]) * units[m[3]]) for m in re.finditer(r"Downloading (\S+) \(([\d.]+) (kB|MB|GB)\)", log)
    ]
    total = sum(size for _, size in fetched)
    assert total < MAX_DOWNLOAD_MB, sorted(fetched, key=lambda f: -f[1])[:5]
    assert resolutions.left_on_disk < MAX_DOWNLOAD_MB * 2**20


def test_flashinfer_cubin_for_vllms_flashinfer_is_not_on_pypi_yet(resolutions: BundleResolutions) -> None:
    # A canary: PyPI's flashinfer-cubin stops at 0.6.13 (flashinfer-ai/flashinfer#4781), so the bundle cannot carry
    # the cubins. When this fails, PyPI has them: add flashinfer-cubin==<that version> to bundle_requirements, set
    # VLLM_HAS_FLASHINFER_CUBIN=1 in the vLLM env file, and delete this test.
    key = "dgx-os"  # the cubin wheel is py3-none-any: asking for one box is enough
    flashinfer = resolutions.by_key[key].resolution.version("flashinfer-python")
    target = resolve_target("gpu", *TARGETS[key])
    argv = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
            "--use-feature=fast-deps", *pip_target_args(target), f"flashinfer-cubin=={flashinfer}"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0, f"flashinfer-cubin=={flashinfer} is on PyPI now: put it in the bundle"
    assert "No matching distribution found for flashinfer-cubin" in proc.stderr, proc.stderr[-2000:]
