"""Published vLLM start-up figures (GiB = 2^30) and the planner's predictions for them.

Rows are numbered as in the project's reference table. W weights per rank, Act peak activation, NT non-torch,
KV "Available KV cache memory" per rank, Tok "GPU KV cache size", Conc "Maximum concurrency". Sources: llm-d-benchmark's
empirical vLLM memory results (H100, v0.11, --block-size 128, max-model-len 16000), LMCache PR #1769 (v0.10/0.11
defaults), vLLM PR #21489 (gemma-3-4b through the LLM class: 16384 batched tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.planner.accounting import GIB, Knobs
from appliance.planner.hardware_profile import custom_profile
from appliance.planner.plan import Plan, PlanInputs, make_plan

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "model-configs"
H100_TOTAL = 79.18


@dataclass(frozen=True)
class Row:
    """One published start-up."""

    number: int
    fixture: str
    total_gib: float
    tp: int
    util: float
    max_model_len: int
    version: tuple[int, int] = (0, 11)
    block_size: int | None = 128
    batched_tokens: int | None = None
    weights: float | None = None  # per rank
    activation: float | None = None
    non_torch: float | None = None
    kv: float | None = None
    tokens: int | None = None
    concurrency: float | None = None
    startup_fails: bool = False

    @property
    def logged_kv(self) -> float | None:
        """KV as logged, or as implied by the identity when only its terms were published."""
        if self.kv is not None:
            return self.kv
        if None in (self.weights, self.activation, self.non_torch):
            return None
        assert self.weights is not None and self.activation is not None and self.non_torch is not None
        return self.util * self.total_gib - self.weights - self.activation - self.non_torch


ROWS = [
    Row(
        1, "Llama-3.1-8B-Instruct", H100_TOTAL, 1, 0.90, 16000, weights=14.99, activation=4.76, non_torch=0.13, kv=51.38
    ),
    Row(
        2,
        "Llama-3.1-70B-Instruct",
        H100_TOTAL,
        2,
        0.90,
        16000,
        weights=33.88,
        activation=4.84,
        non_torch=0.55,
        kv=32.00,
    ),
    Row(
        3,
        "Llama-3.1-70B-Instruct",
        H100_TOTAL,
        1,
        0.90,
        16000,
        weights=67.72,
        activation=4.84,
        non_torch=0.14,
        kv=-1.44,
        startup_fails=True,
    ),
    Row(4, "Qwen3-32B", H100_TOTAL, 1, 0.90, 16000, weights=61.03, activation=5.64, non_torch=0.14, kv=4.45),
    Row(
        6,
        "Mistral-Small-3.1-24B-Instruct-2503",
        H100_TOTAL,
        1,
        0.95,
        16000,
        weights=44.76,
        activation=2.12,
        non_torch=0.14,
        kv=28.20,
        tokens=184_832,
        concurrency=11.55,
    ),
    Row(7, "Qwen3-0.6B", H100_TOTAL, 1, 0.90, 16000, weights=1.12, activation=5.56, non_torch=0.13, kv=64.45),
    Row(8, "gpt-oss-20b", H100_TOTAL, 1, 0.90, 16000, weights=13.47, activation=7.38, non_torch=0.13, kv=50.28),
    Row(
        9,
        "Qwen3-8B",
        H100_TOTAL,
        1,
        0.90,
        40960,
        version=(0, 10),
        block_size=None,
        kv=50.32,
        tokens=366_400,
        concurrency=8.95,
    ),
    Row(
        11,
        "Llama-3.1-70B-Instruct",
        H100_TOTAL,
        4,
        0.90,
        131072,
        version=(0, 10),
        block_size=None,
        kv=32.06,
        tokens=420_208,
        concurrency=3.21,
    ),
    Row(
        16,
        "gemma-3-4b-it",
        178.36,
        1,
        0.90,
        16384,
        version=(0, 10),
        block_size=None,
        batched_tokens=16384,
        weights=8.58,
        activation=9.96,
        non_torch=0.07,
    ),
]
# The full config.json each row's checkpoint was built from, for planning with weights estimated from it (fixtures;
# rows 2/3 are Llama-3.3-70B-Instruct-FP8-dynamic, row 6 Mistral-Small-3.2 = 3.1's architecture).
ESTIMATE_CONFIGS = {
    1: "full/Llama-3.1-8B-Instruct",
    2: "full/Llama-3.3-70B-Instruct-FP8-dynamic",
    3: "full/Llama-3.3-70B-Instruct-FP8-dynamic",
    4: "Qwen3-32B",
    6: "full/Mistral-Small-3.1-24B-Instruct-2503",
    7: "Qwen3-0.6B",
    8: "gpt-oss-20b",
    9: "Qwen3-8B",
    11: "full/Llama-3.1-70B-Instruct",
    16: "gemma-3-4b-it",
}
# Rows with every term of the identity: the planner estimates activation and non-torch memory itself.
ESTIMATED = [r for r in ROWS if r.weights is not None and not r.startup_fails]
# Rows with logged tokens: given the logged KV memory, blocks/tokens/concurrency must follow exactly.
WITH_TOKENS = [r for r in ROWS if r.tokens is not None]


def predict(row: Row, *, measured_kv: bool = False, estimated_weights: bool = False) -> Plan:
    """The planner's plan for ``row`` (with the logged KV memory when ``measured_kv``; with the weights estimated from
    the row's full config.json instead of the logged ones when ``estimated_weights``)."""
    hardware = custom_profile(row.total_gib, row.tp, unified=False)
    knobs = Knobs(
        vllm_version=row.version,
        gpu_memory_utilization=row.util,
        block_size=row.block_size,
        max_num_batched_tokens=row.batched_tokens,
    )
    return make_plan(
        PlanInputs(
            model=FIXTURES / f"{ESTIMATE_CONFIGS[row.number] if estimated_weights else row.fixture}.json",
            hardware=hardware,
            knobs=knobs,
            max_model_len=row.max_model_len,
            tp=row.tp,
            weights_gib=None if estimated_weights else (row.weights or 1.0) * row.tp,
            kv_cache_gib=row.kv if measured_kv else None,
        )
    )


def estimated_kv_error(row: Row) -> float | None:
    """Planned minus logged KV GiB when the weights, activation and non-torch memory are all estimated."""
    logged = row.logged_kv
    if logged is None:
        return None
    return predict(row, estimated_weights=True).budget.kv_bytes / GIB - logged


def error_table() -> str:
    """The per-row errors, for the report (``python -m tests.unit.planner.ground_truth``)."""
    lines = [
        "| # | model | TP | KV logged | KV planned | error GiB | Act logged | Act est. | Tok logged | Tok planned | "
        "error % | KV, weights from config | error GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        plan = predict(row)
        b = plan.budget
        kv_logged = row.logged_kv
        tok = ""
        if row.tokens is not None:
            measured = predict(row, measured_kv=True).budget
            tok = (
                f"{row.tokens:,} | {measured.kv_tokens:,} | {100 * (measured.kv_tokens - row.tokens) / row.tokens:+.2f}"
            )
        else:
            tok = "– | – | –"
        kv_cell = (
            f"{kv_logged:.2f} | {b.kv_bytes / GIB:.2f} | {b.kv_bytes / GIB - kv_logged:+.2f}"
            if kv_logged is not None and row.weights is not None
            else f"{row.kv:.2f} | – | –"
        )
        act = f"{row.activation:.2f}" if row.activation is not None else "–"
        verdict = " (start-up fails: predicted)" if row.startup_fails and plan.verdict == "does-not-fit" else ""
        est = predict(row, estimated_weights=True).budget.kv_bytes / GIB
        err = estimated_kv_error(row)
        lines.append(
            f"| {row.number} | {row.fixture}{verdict} | {row.tp} | {kv_cell} | {act} | "
            f"{b.activation_bytes / GIB:.2f} | {tok} | {est:.2f} | {'–' if err is None else f'{err:+.2f}'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(error_table())
