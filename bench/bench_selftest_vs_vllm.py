"""Does ``clinic-edge selftest`` agree with ``vllm bench serve``? TTFT p50 side by side on one vLLM, same load.

Starts vLLM (CPU build) serving the demo model, then alternates, ``--rounds`` times:

* our single load point (what ``clinic-edge selftest --concurrency 8 --requests 64 --prompt-tokens 64
  --max-tokens 32`` runs: warm-up once, then the self-test's runner), in this process, and
* vLLM's benchmark through its module (``--backend openai-chat --endpoint /v1/chat/completions --dataset-name random
  --random-input-len 64 --random-output-len 32 --num-prompts 64 --max-concurrency 8``), in a long-lived subprocess
  (vLLM imported once) so its event loop never mixes with ours,

and prints both TTFT p50s per round, their ratio and the median ratio. Beside them, per side, what shows that the
loads were the same: the prompt and output tokens vLLM counted (vLLM's benchmark sets ``ignore_eos`` for random
prompts, and so does the self-test), the share of prompt tokens vLLM's prefix cache served (a side whose prompts
shared prefixes would prefill less), and the CPU time each client spent. Goal: within ±5 %.

vLLM runs on all CPUs but the last, the clients on the last one (``--no-pin`` lets them share). On a 2-core machine
vLLM's worker takes one core and everything else shares the other; sharing it, the client that costs less CPU (ours:
~140 ms a round against ~200 ms) slows vLLM less and reads a TTFT ~15 % lower. That is a difference in the load the
clients put on the box, not in how they measure.

Usage: .venv/bin/python -m bench.bench_selftest_vs_vllm [--rounds 4] [--model-dir DIR] [--our-prompts vllm] [--no-pin]

``--our-prompts vllm`` makes our side send vLLM's random-dataset prompts instead of the self-test's: a diagnostic
that separates the prompts' effect from the clients'.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from appliance.demo_model import DEMO_MODEL_NAME, build_demo_model
from appliance.processes import Interrupted, ManagedProcess
from appliance.selftest.client import Target
from appliance.selftest.runner import Progress, Workload, plan_single, run_points, warm_up
from appliance.selftest.workloads import PromptMaker, load_tokenizer
from appliance.telemetry.vllm import parse_prometheus
from appliance.vllm_server import VllmLaunch, VllmServer

# A long-lived worker: imports vLLM once, then runs one `vllm bench serve` per line on stdin (the line is the seed).
VLLM_WORKER = """
import contextlib, gc, io, sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.benchmarks.serve import add_cli_args, main
base = sys.argv[1:]
# Importing vLLM leaves ~630k objects; a full collection over them pauses this process ~0.3 s mid-run, inflating the
# TTFT of every stream in flight. Freeze them, as clinic-edge's runner freezes its own setup heap: the comparison is
# then between the two clients' measurements, not between their garbage collectors.
gc.collect()
gc.freeze()
print("READY", flush=True)
for line in sys.stdin:
    seed = line.strip()
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    argv = [*base, "--seed", seed, "--result-filename", f"vllm-{seed}.json"]
    with contextlib.redirect_stdout(io.StringIO()):
        main(parser.parse_args(argv))
    print("DONE", seed, flush=True)
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VllmBench:
    """``vllm bench serve`` in its own process (its own event loop), run once per :meth:`run`."""

    def __init__(self, url: str, model_dir: Path, out_dir: Path, args: argparse.Namespace) -> None:
        self.out_dir = out_dir
        argv = [
            "--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--base-url", url,
            "--model", DEMO_MODEL_NAME, "--tokenizer", str(model_dir), "--dataset-name", "random",
            "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
            "--num-prompts", str(args.requests), "--max-concurrency", str(args.concurrency),
            "--save-result", "--result-dir", str(out_dir),
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--disable-tqdm",
        ]  # fmt: skip
        self._worker = ManagedProcess(
            [sys.executable, "-c", VLLM_WORKER, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.proc = self._worker.start()
        try:
            self._expect("READY")
        except BaseException:
            self.close(finish=False)
            raise

    def _expect(self, word: str) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(word):
                return
        raise SystemExit(f"the vllm bench serve worker exited (code {self.proc.wait()})")

    def run(self, seed: int) -> dict[str, float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{seed}\n")
        self.proc.stdin.flush()
        self._expect("DONE")
        doc = json.loads((self.out_dir / f"vllm-{seed}.json").read_text())
        return {
            "p50": doc["median_ttft_ms"],
            "p99": doc["p99_ttft_ms"],
            "failed": doc.get("failed", 0),
            "out": doc["total_output_tokens"],
        }

    def close(self, finish: bool = True) -> None:
        """Stop the worker and whatever it started; with ``finish``, first let it end its run (end of its input)."""
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        if finish:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=60)
        self._worker.stop()
        if self.proc.stdout:
            self.proc.stdout.close()


class VllmPrompts(PromptMaker):
    """vLLM's random-dataset prompts (random token ids, decoded), handed out in turn: a diagnostic, to tell the
    prompts' effect from the clients' (``--our-prompts vllm``)."""

    def __init__(self, model_dir: Path, input_len: int, output_len: int) -> None:
        from vllm.benchmarks.datasets.datasets import RandomDataset
        from vllm.tokenizers import get_tokenizer

        super().__init__(load_tokenizer(model_dir))
        self._vllm_tokenizer = get_tokenizer(str(model_dir))
        self._dataset = RandomDataset(random_seed=7)
        self._lens = (input_len, output_len)
        self._queue: list[str] = []

    def text(self, n_tokens: int, seed: int) -> str:
        if not self._queue:
            samples = self._dataset.sample(
                tokenizer=self._vllm_tokenizer, num_requests=256, input_len=self._lens[0], output_len=self._lens[1]
            )
            self._queue = [str(s.prompt) for s in samples]
        return self._queue.pop()


class Ours:
    """Our single load point, run in this process through the self-test's own code path."""

    def __init__(self, url: str, model_dir: Path, args: argparse.Namespace) -> None:
        self.target = Target(url)
        self.args = args
        prompts = (
            VllmPrompts(model_dir, args.input_len, args.output_len)
            if args.our_prompts == "vllm"
            else PromptMaker(load_tokenizer(model_dir))
        )
        self.work = Workload(model=DEMO_MODEL_NAME, prompts=prompts)
        assert self.work.prompts.exact, "the demo model's tokenizer did not load"
        asyncio.run(warm_up(self.target, self.work))

    def run(self) -> dict[str, float]:
        a = self.args
        points = plan_single(a.concurrency, a.requests, a.input_len, a.output_len)
        (res,) = asyncio.run(run_points(self.target, points, self.work, Progress(1, enabled=False)))
        return {
            "p50": res["ttft_ms"]["p50"],
            "p99": res["ttft_ms"]["p99"],
            "failed": res["failed"],
            "out": res["total_output_tokens"],
        }


COUNTERS = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total", "vllm:prompt_tokens_total")


def _counters(base_url: str) -> list[float]:
    """vLLM's prefix-cache hits and queries and its prompt tokens, all in tokens: the two sides' loads must match (a
    side whose prompts were longer, or shared prefixes, would prefill more, or less)."""
    import urllib.request

    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as resp:  # noqa: S310 - loopback URL we built
        text = resp.read().decode()
    found = parse_prometheus(text, COUNTERS)
    return [sum(found.get(name, [])) for name in COUNTERS]


def _measured(base_url: str, client_pid: int, run: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``run()``'s figures plus what the load cost: the prefix-cache hit rate (%) and prompt tokens vLLM counted, and
    the CPU time (ms) the client process spent. On a small machine the client shares cores with vLLM, so a client that
    costs more CPU also slows the server it measures."""
    import psutil

    client = psutil.Process(client_pid)
    before, cpu0 = _counters(base_url), sum(client.cpu_times()[:2])
    out = run()
    after, cpu1 = _counters(base_url), sum(client.cpu_times()[:2])
    hits, queries, prompt = (a - b for a, b in zip(after, before, strict=True))
    return out | {
        "hit": 100 * hits / queries if queries else float("nan"),  # nan: vLLM counted no query
        "prompt": prompt,
        "cpu_ms": 1000 * (cpu1 - cpu0),
    }


def _pair(mine: dict[str, float], theirs: dict[str, float], key: str) -> str:
    """``ours/vllm`` for one figure, rounded to a whole number (the column header names the figure)."""
    return f"{mine[key]:.0f}/{theirs[key]:.0f}"


def _pin(server_pid: int | None) -> str:
    """Keep vLLM and the clients off each other's CPUs: vLLM on all but the last CPU, this process and the vLLM
    benchmark it starts on the last one. On a small machine a client that costs more CPU otherwise slows the very
    server it measures (``--no-pin`` shows it); that is a difference between the clients' loads, not between their
    definitions of TTFT."""
    cpus = sorted(os.sched_getaffinity(0))
    if server_pid is None or len(cpus) < 2:
        return "not pinned: fewer than 2 CPUs"
    server_cpus, client_cpus = set(cpus[:-1]), {cpus[-1]}
    group = subprocess.run(["pgrep", "-g", str(server_pid)], capture_output=True, text=True, check=False).stdout
    for pid in group.split():
        for task in os.listdir(f"/proc/{pid}/task"):  # every thread: an affinity set on a process covers only one
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                os.sched_setaffinity(int(task), server_cpus)
    os.sched_setaffinity(0, client_cpus)  # before the benchmark's worker starts: it inherits this
    return f"vLLM on CPUs {_cpu_list(server_cpus)}, both clients on CPU {_cpu_list(client_cpus)}"


def _cpu_list(cpus: set[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def _bootstrap_median_ci(values: list[float], n: int = 2000, level: float = 0.90) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median (how sure the median ratio is on a noisy machine)."""
    import random

    rng = random.Random(7)  # noqa: S311 - resampling, not secrets
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n))
    cut = int(n * (1 - level) / 2)
    return meds[cut], meds[n - 1 - cut]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--model-dir", type=Path, help="demo model directory (built in a temporary folder if absent)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument(
        "--our-prompts",
        choices=("selftest", "vllm"),
        default="selftest",
        help="what our side sends: the self-test's prompts (default) or vLLM's random-dataset prompts (diagnostic)",
    )
    ap.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run vLLM and the clients on separate CPUs (default); --no-pin lets them share",
    )
    ap.add_argument(
        "--nice", type=int, default=0, help="change this process's (and its children's) niceness; < 0 needs root"
    )
    args = ap.parse_args()
    if args.nice:
        # On a shared machine other work preempts the measured processes; a lower niceness narrows that noise.
        os.nice(args.nice)
    with tempfile.TemporaryDirectory(prefix="bench-selftest-") as tmp:
        work = Path(tmp)
        model_dir = args.model_dir or build_demo_model(work / "demo-vlm").path
        launch = VllmLaunch(model=model_dir, served_model_name=DEMO_MODEL_NAME, port=_free_port())
        print(f"Starting vLLM (CPU build) on {launch.base_url} …", flush=True)
        with VllmServer(launch, work / "vllm.log") as server, contextlib.ExitStack() as stack:
            where = _pin(server.pid) if args.pin else "vLLM and both clients share all CPUs"
            print(
                f"Load: {args.requests} requests, {args.input_len} prompt tokens, {args.output_len} output tokens, "
                f"concurrency {args.concurrency}; {args.rounds} rounds, alternating (vLLM first on odd rounds); "
                f"{where}\n"
            )
            print(
                f"{'round':>5} {'clinic-edge p50':>16} {'vllm bench p50':>15} {'ratio':>7} {'ours p99':>9} "
                f"{'vllm p99':>9} {'prompt tokens':>13} {'output tokens':>13} {'cache hits %':>12} "
                f"{'client CPU ms':>13}"
                "  (pairs: ours/vllm)"
            )
            ratios = []
            rows = []
            bench = VllmBench(launch.base_url, model_dir, work, args)
            # The worker stops on every path, a signal included (the with block above stops vLLM); at once on errors.
            stack.push(lambda exc_type, exc, tb: bench.close(finish=exc_type is None))
            mine_runner = Ours(launch.base_url, model_dir, args)
            for r in range(1, args.rounds + 1):
                url = launch.base_url
                their_run = functools.partial(bench.run, 1000 + r)
                measure_theirs = functools.partial(_measured, url, bench.proc.pid, their_run)
                measure_mine = functools.partial(_measured, url, os.getpid(), mine_runner.run)
                if r % 2:
                    theirs, mine = measure_theirs(), measure_mine()
                else:
                    mine, theirs = measure_mine(), measure_theirs()
                ratio = mine["p50"] / theirs["p50"]
                ratios.append(ratio)
                rows.append((mine, theirs))
                print(
                    f"{r:>5} {mine['p50']:>16.2f} {theirs['p50']:>15.2f} {ratio:>7.3f} {mine['p99']:>9.2f} "
                    f"{theirs['p99']:>9.2f} {_pair(mine, theirs, 'prompt'):>13} {_pair(mine, theirs, 'out'):>13} "
                    f"{_pair(mine, theirs, 'hit'):>12} {_pair(mine, theirs, 'cpu_ms'):>13}"
                    + (f"  failed: {mine['failed']}/{theirs['failed']}" if mine["failed"] or theirs["failed"] else ""),
                    flush=True,
                )
            med_ours = statistics.median(m["p50"] for m, _ in rows)
            med_theirs = statistics.median(t["p50"] for _, t in rows)
            print(
                f"\nmedian over rounds: clinic-edge {med_ours:.2f} ms, vllm bench serve {med_theirs:.2f} ms; "
                f"ratio of medians {med_ours / med_theirs:.3f}, median per-round ratio {statistics.median(ratios):.3f}"
            )
            lo, hi = _bootstrap_median_ci(ratios)
            print(f"median per-round ratio, 90 % bootstrap interval: [{lo:.3f}, {hi:.3f}] (goal: within 0.95–1.05)")


if __name__ == "__main__":
    try:
        main()
    except Interrupted as stop:  # vLLM and the worker are stopped; exit as the CLI does (143 SIGTERM, 130 Ctrl-C, ...)
        sys.exit(stop.exit_code)
