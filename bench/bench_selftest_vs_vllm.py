"""Does ``clinic-edge selftest`` agree with ``vllm bench serve``? TTFT p50 side by side on one vLLM, same load.

Starts vLLM (CPU build) serving the demo model, then alternates, ``--rounds`` times:

* our single load point: ``clinic-edge selftest --target URL --concurrency 8 --requests 64 --prompt-tokens 64
  --max-tokens 32 --json`` (a subprocess), and
* vLLM's benchmark through its module (``--backend openai-chat --endpoint /v1/chat/completions --dataset-name random
  --random-input-len 64 --random-output-len 32 --num-prompts 64 --max-concurrency 8``), in a subprocess so its event
  loop never mixes with ours,

and prints both TTFT p50s per round, their ratio, and the median ratio. Goal: within ±5 %.

Usage: .venv/bin/python -m bench.bench_selftest_vs_vllm [--rounds 4] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from appliance.demo_model import DEMO_MODEL_NAME, build_demo_model
from appliance.vllm_server import VllmLaunch, VllmServer

VLLM_BENCH = """
import sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.benchmarks.serve import add_cli_args, main
parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ours(url: str, state: Path, args: argparse.Namespace) -> dict[str, float]:
    cmd = [
        sys.executable, "-m", "appliance", "selftest", "--target", url, "--concurrency", str(args.concurrency),
        "--requests", str(args.requests), "--prompt-tokens", str(args.input_len), "--max-tokens",
        str(args.output_len), "--image", "no", "--state-dir", str(state), "--json",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"clinic-edge selftest failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    doc = json.loads(proc.stdout)
    return {"p50": doc["ttft_ms"]["p50"], "p99": doc["ttft_ms"]["p99"], "failed": doc["failed"]}


def vllms(url: str, model_dir: Path, out_dir: Path, rnd: int, args: argparse.Namespace) -> dict[str, float]:
    name = f"vllm-{rnd}.json"
    argv = [
        "--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--base-url", url,
        "--model", DEMO_MODEL_NAME, "--tokenizer", str(model_dir), "--dataset-name", "random",
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
        "--num-prompts", str(args.requests), "--max-concurrency", str(args.concurrency),
        "--seed", str(1000 + rnd), "--save-result", "--result-dir", str(out_dir), "--result-filename", name,
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--disable-tqdm",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", VLLM_BENCH, *argv], capture_output=True, text=True, check=False, timeout=600
    )
    if proc.returncode != 0:
        raise SystemExit(f"vllm bench serve failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    doc = json.loads((out_dir / name).read_text())
    return {"p50": doc["median_ttft_ms"], "p99": doc["p99_ttft_ms"], "failed": doc.get("failed", 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--model-dir", type=Path, help="demo model directory (built in a temporary folder if absent)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-selftest-") as tmp:
        work = Path(tmp)
        model_dir = args.model_dir or build_demo_model(work / "demo-vlm").path
        launch = VllmLaunch(model=model_dir, served_model_name=DEMO_MODEL_NAME, port=_free_port())
        print(f"Starting vLLM (CPU build) on {launch.base_url} …", flush=True)
        with VllmServer(launch, work / "vllm.log"):
            print(
                f"Load: {args.requests} requests, {args.input_len} prompt tokens, {args.output_len} output tokens, "
                f"concurrency {args.concurrency}; {args.rounds} rounds, alternating (vLLM first on odd rounds)\n"
            )
            print(
                f"{'round':>5} {'clinic-edge p50':>16} {'vllm bench p50':>15} {'ratio':>7} {'ours p99':>9} "
                f"{'vllm p99':>9}"
            )
            ratios = []
            rows = []
            for r in range(1, args.rounds + 1):
                if r % 2:
                    theirs = vllms(launch.base_url, model_dir, work, r, args)
                    mine = ours(launch.base_url, work / "state", args)
                else:
                    mine = ours(launch.base_url, work / "state", args)
                    theirs = vllms(launch.base_url, model_dir, work, r, args)
                ratio = mine["p50"] / theirs["p50"]
                ratios.append(ratio)
                rows.append((mine, theirs))
                print(
                    f"{r:>5} {mine['p50']:>16.2f} {theirs['p50']:>15.2f} {ratio:>7.3f} {mine['p99']:>9.2f} "
                    f"{theirs['p99']:>9.2f}"
                    + (f"  failed: {mine['failed']}/{theirs['failed']}" if mine["failed"] or theirs["failed"] else ""),
                    flush=True,
                )
            med_ours = statistics.median(m["p50"] for m, _ in rows)
            med_theirs = statistics.median(t["p50"] for _, t in rows)
            print(
                f"\nmedian over rounds: clinic-edge {med_ours:.2f} ms, vllm bench serve {med_theirs:.2f} ms; "
                f"ratio of medians {med_ours / med_theirs:.3f}, median per-round ratio {statistics.median(ratios):.3f}"
            )


if __name__ == "__main__":
    main()
