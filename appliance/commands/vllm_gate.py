"""``clinic-edge vllm-gate``: right before vLLM starts, is enough memory free for its start-up check?"""

from __future__ import annotations

import argparse
from pathlib import Path

from appliance.cli import EXIT_NEGATIVE, EXIT_OK, Outcome
from appliance.planner.start_gate import DEFAULT_PLAN, gate_plan, read_plan_file, run_gate

__all__ = ["register"]

EXAMPLES = """\
examples:
  clinic-edge vllm-gate --plan /etc/clinic-edge/vllm/plan.json
  clinic-edge vllm-gate --json

It runs as ExecStartPre= of clinic-edge-vllm@.service, as the unit's unprivileged user, and only reads: the plan,
/proc/meminfo and the model's files. On unified memory (DGX Spark) vLLM refuses to start unless MemAvailable covers
gpu_memory_utilization × total; when it does not, the gate first drops the page cache of the model's own files
(posix_fadvise DONTNEED) and checks again. Discrete-GPU plans pass at once.

exit codes: 0 enough memory is free (or a discrete-GPU plan), 1 not enough (the message says what to do),
            2 the plan is missing or unreadable.
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``vllm-gate``."""
    p = subparsers.add_parser(
        "vllm-gate",
        parents=[common],
        help="before vLLM starts on unified memory: is enough memory free for its start-up check?",
        description="Compare MemAvailable with what vLLM's start-up check will ask (the plan's "
        "gpu_memory_utilization × total), dropping the model files' page cache when short.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--plan", type=Path, default=DEFAULT_PLAN, metavar="FILE", help=f"default {DEFAULT_PLAN}")
    p.add_argument("--meminfo", type=Path, default=Path("/proc/meminfo"), metavar="FILE", help="default /proc/meminfo")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> Outcome:
    result = run_gate(gate_plan(read_plan_file(args.plan)), args.meminfo)
    text = result.message if result.passed else f"{result.message}\nwhat to do: {result.remedy}"
    return Outcome(data=result.to_dict(), text=text, exit_code=EXIT_OK if result.passed else EXIT_NEGATIVE)
