"""The bundle tier: pip's resolution of the GPU bundle for each real target box, metadata only, once per session.

It needs PyPI (through pip only). Outside CI an unreachable PyPI skips the tier with the reason; with CI=true it
fails (tests/conftest.py's ``require``). A resolution that fails with PyPI reachable always fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.bundle import Resolution, Target, bundle_requirements, project_root, resolve, resolve_target
from tests.conftest import require

# The three boxes clinic-edge ships to: DGX Spark, and H100/H200 servers on Ubuntu 24.04 and 22.04.
TARGETS = {"dgx-os": ("dgx-os", "aarch64"), "ubuntu-24.04": ("ubuntu-24.04", "x86_64"),
           "ubuntu-22.04": ("ubuntu-22.04", "x86_64")}  # fmt: skip
# pip settings that would mix this machine's own wheel folders or caps into what PyPI resolves.
_LOCAL_PIP_SETTINGS = ("PIP_FIND_LINKS", "PIP_CONSTRAINT", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX", "PIP_REQUIRE_HASHES")


_SUMMARY: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Each target's resolution time and wheel count, after the results (not hidden in captured output)."""
    if _SUMMARY:
        terminalreporter.section("bundle resolutions")
        for line in _SUMMARY:
            terminalreporter.write_line(line)


@dataclass
class Resolved:
    """One target's resolution, and what it left on disk."""

    target: Target
    resolution: Resolution


@dataclass
class BundleResolutions:
    """Every target's resolution, the seconds all of them took together, and the bytes pip left behind."""

    by_key: dict[str, Resolved]
    wall_seconds: float
    left_on_disk: int


def _disk_usage(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def pip_env(scratch: Path) -> dict[str, str]:
    """PyPI only (no local config files, find-links or constraints); pip's cache and temp files under ``scratch``."""
    env = {k: v for k, v in os.environ.items() if k not in _LOCAL_PIP_SETTINGS}
    (scratch / "cache").mkdir(parents=True, exist_ok=True)
    (scratch / "tmp").mkdir(parents=True, exist_ok=True)
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_CACHE_DIR=str(scratch / "cache"), TMPDIR=str(scratch / "tmp"))
    return env


@pytest.fixture(scope="session")
def pip_scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """pip's cache and temp folder for the tier, with os.environ pointed at them while the tier runs."""
    scratch = tmp_path_factory.mktemp("pip")
    with pytest.MonkeyPatch.context() as mp:
        for key in _LOCAL_PIP_SETTINGS:
            mp.delenv(key, raising=False)
        for key, value in pip_env(scratch).items():
            mp.setenv(key, value)
        yield scratch


@pytest.fixture(scope="session")
def pypi(pip_scratch: Path) -> None:
    """PyPI answers pip (the tier's prerequisite)."""
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "vllm"],
                              capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
        reached, why = proc.returncode == 0, (proc.stdout + proc.stderr).strip()[-500:]
    except subprocess.TimeoutExpired:
        reached, why = False, "pip index versions vllm timed out after 120 s"
    require(reached, f"PyPI cannot be reached through pip: {why}")


@pytest.fixture(scope="session")
def resolutions(pypi: None, pip_scratch: Path) -> BundleResolutions:
    """The GPU bundle's requirement set resolved for every target, in parallel, the way ``bundle build`` does."""
    root = project_root()

    def one(key: str) -> Resolved:
        target = resolve_target("gpu", *TARGETS[key])
        workdir = pip_scratch / "reports" / key
        workdir.mkdir(parents=True)
        return Resolved(target, resolve(sys.executable, target, bundle_requirements(root, "gpu", target), workdir))

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(TARGETS)) as pool:
        done = dict(zip(TARGETS, pool.map(one, TARGETS), strict=True))
    wall = time.monotonic() - started
    left = _disk_usage(pip_scratch / "cache") + _disk_usage(pip_scratch / "tmp")
    for key, resolved in done.items():
        r = resolved.resolution
        _SUMMARY.append(
            f"{key}: {len(r.report['install'])} wheels in {r.seconds:.0f} s ({len(r.requirements)} requirements)"
        )
    _SUMMARY.append(f"all targets in parallel: {wall:.0f} s; pip left {left / 2**20:.1f} MiB on disk")
    return BundleResolutions(done, wall, left)
