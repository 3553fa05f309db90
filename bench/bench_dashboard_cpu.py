#!/usr/bin/env python3
"""The dashboard's own CPU use at the default refresh (goal: at most 2 % of one core).

Runs ``clinic-edge dashboard`` in a real terminal (a private tmux server, 120x40) and measures the process's CPU
time (user + system, its reaped children included: systemctl) with psutil over three windows after a warm-up, for
two setups side by side: a recorded scenario (--replay) and this machine's live sources (NVML probe, psutil process
scan, HTTP to the given or default URLs, systemctl). Prints the median % of one core for each, and the ratio.

Usage: bench/bench_dashboard_cpu.py [--seconds 30] [--refresh 2] [--vllm URL]
Needs tmux. Talks only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "tests" / "fixtures" / "dashboard" / "two_gpus_two_replicas.json"
GOAL_PCT = 2.0


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system)


def measure(label: str, dashboard_args: list[str], seconds: float, windows: int = 3, warmup: float = 6.0) -> float:
    """Median % of one core over ``windows`` windows of ``seconds / windows`` each."""
    socket = f"clinic-edge-bench-{time.monotonic_ns()}"
    tmux = ["tmux", "-L", socket, "-f", "/dev/null"]
    argv = [sys.executable, "-m", "appliance", "dashboard", *dashboard_args]
    command = f"cd {shlex.quote(str(ROOT))} && exec env -u COLUMNS -u LINES {shlex.join(argv)}"
    subprocess.run([*tmux, "new-session", "-d", "-s", "bench", "-x", "120", "-y", "40", command], check=True)
    try:
        pid = int(
            subprocess.run(
                [*tmux, "display", "-p", "-t", "bench", "#{pane_pid}"], capture_output=True, text=True, check=True
            ).stdout
        )
        proc = psutil.Process(pid)
        time.sleep(warmup)  # imports and the first paint are start-up cost, not steady state
        results = []
        for _ in range(windows):
            c0, w0 = cpu_seconds(proc), time.monotonic()
            time.sleep(seconds / windows)
            c1, w1 = cpu_seconds(proc), time.monotonic()
            results.append((c1 - c0) / (w1 - w0) * 100)
        median = statistics.median(results)
        windows_text = ", ".join(f"{r:.2f}" for r in results)
        print(f"{label:<34} median {median:5.2f} % of one core  (windows: {windows_text})")
        subprocess.run([*tmux, "send-keys", "-t", "bench", "q"], check=True)
        proc.wait(timeout=15)
        return median
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="measured seconds per setup (default 30)")
    parser.add_argument("--refresh", type=float, default=2.0, help="dashboard refresh period (default 2, the default)")
    parser.add_argument("--vllm", metavar="URL", help="a running vLLM to watch in the live setup (loopback only)")
    args = parser.parse_args()
    if shutil.which("tmux") is None:
        print("bench_dashboard_cpu: tmux is not installed (apt-get install tmux)", file=sys.stderr)
        return 2
    if args.vllm and not args.vllm.startswith(("http://127.", "http://[::1]", "http://localhost")):
        print("bench_dashboard_cpu: --vllm must be a loopback URL", file=sys.stderr)
        return 2
    print(f"dashboard CPU use, refresh {args.refresh:g} s, {args.seconds:g} s measured per setup, tmux 120x40")
    replay = measure(
        "recorded scenario (--replay)", ["--replay", str(SCENARIO), "--refresh", str(args.refresh)], args.seconds
    )
    with tempfile.TemporaryDirectory() as tmp:
        live_args = [
            "--etc-dir",
            tmp,
            "--state-dir",
            tmp,
            "--refresh",
            str(args.refresh),
            "--gateway",
            "https://127.0.0.1:8443",
        ]
        live_args += ["--vllm", args.vllm or "http://127.0.0.1:8000"]
        live = measure("live sources on this machine", live_args, args.seconds)
    print(f"live / recorded ratio: {live / replay:.2f}" if replay > 0 else "live / recorded ratio: n/a")
    worst = max(replay, live)
    print(f"goal <= {GOAL_PCT:g} % of one core: {'met' if worst <= GOAL_PCT else 'NOT met'} (worst {worst:.2f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
