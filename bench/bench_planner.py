#!/usr/bin/env python3
"""How long planning takes: a model with 60 GB of safetensors (goal ≤ 0.2 s: the planner reads headers only) and a
bare config.json whose weights are estimated from the architecture (goal ≤ 0.05 s).

Builds a Llama-70B-shaped checkpoint in a temporary directory: 30 shards named by model.safetensors.index.json,
723 tensors, 60 GB of tensor data as sparse holes (no disk space used, no data written), then times, side by side
in one run: reading the headers alone, the whole in-process plan, and the ``clinic-edge plan --json`` command
(Python start-up included); then the whole plan from the same model's bare config.json and from Gemma 4 31B's
(tests/fixtures/model-configs/gemma-4-31B-it.json). Prints medians and their ratio to the goal.

Usage: python bench/bench_planner.py [--runs N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from appliance.planner.accounting import Knobs
from appliance.planner.hardware_profile import named_profile
from appliance.planner.plan import PlanInputs, make_plan
from appliance.planner.safetensors_header import read_checkpoint

GOAL_S = 0.2
BARE_GOAL_S = 0.05
GEMMA4 = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "model-configs" / "gemma-4-31B-it.json"
TARGET_BYTES = 60 * 10**9
SHARDS = 30
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "vocab_size": 128256,
    "torch_dtype": "bfloat16",
}


def tensor_list() -> list[tuple[str, list[int]]]:
    """Llama-70B's tensors, scaled in the first dimension so the total is 60 GB of bf16."""
    h, i, kv = 8192, 28672, 1024
    out: list[tuple[str, list[int]]] = [("model.embed_tokens.weight", [128256, h])]
    for layer in range(80):
        p = f"model.layers.{layer}."
        out += [
            (p + "self_attn.q_proj.weight", [h, h]),
            (p + "self_attn.k_proj.weight", [kv, h]),
            (p + "self_attn.v_proj.weight", [kv, h]),
            (p + "self_attn.o_proj.weight", [h, h]),
            (p + "mlp.gate_proj.weight", [i, h]),
            (p + "mlp.up_proj.weight", [i, h]),
            (p + "mlp.down_proj.weight", [h, i]),
            (p + "input_layernorm.weight", [h]),
            (p + "post_attention_layernorm.weight", [h]),
        ]
    out += [("model.norm.weight", [h]), ("lm_head.weight", [128256, h])]
    total = sum(2 * _count(s) for _, s in out)
    scale = TARGET_BYTES / total
    return [(n, [max(1, int(s[0] * scale)), *s[1:]] if len(s) == 2 else s) for n, s in out]


def _count(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def build(directory: Path) -> int:
    """Write the sharded checkpoint (headers + sparse holes); return its tensor bytes."""
    tensors = tensor_list()
    weight_map: dict[str, str] = {}
    total = 0
    for k in range(SHARDS):
        chunk = tensors[k::SHARDS]
        name = f"model-{k + 1:05d}-of-{SHARDS:05d}.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for tname, shape in chunk:
            n = 2 * _count(shape)
            header[tname] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[tname] = name
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with (directory / name).open("wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            fh.truncate(8 + len(raw) + offset)  # a hole: no data is written
        total += offset
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(CONFIG))
    return total


def timed(fn: object, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append(time.perf_counter() - start)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--keep", type=Path, help="build the checkpoint here and keep it")
    args = parser.parse_args()
    directory = args.keep or Path(tempfile.mkdtemp(prefix="bench-planner-"))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        print(f"building a 60 GB sparse checkpoint in {directory} ...", file=sys.stderr)
        total = build(directory)
        ckpt = read_checkpoint(directory)
        assert ckpt is not None and ckpt.tensor_bytes == total
        inputs = PlanInputs(model=directory, hardware=named_profile("h100", 4), knobs=Knobs(), max_model_len=32768)
        headers = timed(lambda: read_checkpoint(directory), args.runs)
        plans = timed(lambda: make_plan(inputs), args.runs)
        cli = [
            sys.executable,
            "-m",
            "appliance",
            "plan",
            str(directory),
            "--hardware",
            "h100",
            "--gpus",
            "4",
            "--max-model-len",
            "32768",
            "--json",
        ]
        cli_runs = timed(lambda: subprocess.run(cli, capture_output=True, check=False), max(3, args.runs // 4))
        bare = directory / "bare" / "config.json"
        bare.parent.mkdir(exist_ok=True)
        bare.write_text(json.dumps(CONFIG))
        bare_inputs = PlanInputs(model=bare, hardware=named_profile("h100", 4), knobs=Knobs(), max_model_len=32768)
        gemma_inputs = PlanInputs(model=GEMMA4, hardware=named_profile("dgx-spark", None), knobs=Knobs())
        bare_runs = timed(lambda: make_plan(bare_inputs), args.runs)
        gemma_runs = timed(lambda: make_plan(gemma_inputs), args.runs)
        plan = make_plan(inputs)
        print(
            f"checkpoint: {len(ckpt.files)} shards, {sum(f.num_tensors for f in ckpt.files)} tensors, "
            f"{total / 1e9:.1f} GB ({total / 2**30:.2f} GiB); plan: {plan.verdict}, TP {plan.tp}"
        )
        print(f"{'what':<38}{'median s':>10}{'p90 s':>9}{'÷ goal':>9}")
        for label, xs in (
            (f"read {SHARDS} safetensors headers", headers),
            ("whole plan, in process", plans),
            ("clinic-edge plan --json (process)", cli_runs),
            ("bare config.json, weights estimated", bare_runs),
            ("Gemma 4 31B bare config on dgx-spark", gemma_runs),
        ):
            p90 = sorted(xs)[int(0.9 * (len(xs) - 1))]
            goal = BARE_GOAL_S if xs is bare_runs or xs is gemma_runs else GOAL_S
            print(f"{label:<38}{statistics.median(xs):>10.4f}{p90:>9.4f}{statistics.median(xs) / goal:>9.3f}")
        print(
            f"goal: ≤ {GOAL_S} s for planning (in process); "
            f"{'met' if statistics.median(plans) <= GOAL_S else 'NOT met'}; ≤ {BARE_GOAL_S} s from a bare config: "
            f"{'met' if max(statistics.median(bare_runs), statistics.median(gemma_runs)) <= BARE_GOAL_S else 'NOT met'}"
        )
    finally:
        if args.keep is None:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
