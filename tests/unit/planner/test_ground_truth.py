"""Every published start-up in the reference table, reproduced by the planner."""

from __future__ import annotations

import pytest

from appliance.planner.accounting import GIB
from tests.unit.planner.ground_truth import ESTIMATED, ROWS, WITH_TOKENS, Row, estimated_kv_error, predict

# Row 6 (Mistral-Small-3.2 served in Mistral format) logged 2.12 GiB of activation, where the dummy sampler alone on
# 1024 rows × 131k vocabulary takes ≈ 4.8 GiB on every other model; the planner stays on the safe side there.
KNOWN_OVERESTIMATE = {6}


def _id(row: Row) -> str:
    return f"row{row.number}-{row.fixture}"


@pytest.mark.parametrize("row", WITH_TOKENS, ids=_id)
def test_tokens_and_concurrency_follow_from_logged_kv_memory(row: Row) -> None:
    budget = predict(row, measured_kv=True).budget
    assert row.tokens is not None and row.concurrency is not None
    assert abs(budget.kv_tokens - row.tokens) <= 0.02 * row.tokens
    assert abs(budget.max_concurrency() - row.concurrency) <= 0.02 * row.concurrency


@pytest.mark.parametrize(
    "row",
    [
        pytest.param(
            r,
            marks=pytest.mark.xfail(strict=True, reason="activation logged far below the sampler's known cost"),
        )
        if r.number in KNOWN_OVERESTIMATE
        else r
        for r in ESTIMATED
    ],
    ids=_id,
)
def test_kv_memory_with_estimated_activation_within_half_a_gib(row: Row) -> None:
    plan = predict(row)
    logged = row.logged_kv
    assert logged is not None
    assert abs(plan.budget.kv_bytes / GIB - logged) <= 0.5
    assert plan.verdict == "fits"


def test_mistral_row_is_overestimated_on_the_safe_side() -> None:
    (row,) = [r for r in ROWS if r.number == 6]
    plan = predict(row)
    assert row.kv is not None
    assert plan.budget.kv_bytes / GIB < row.kv  # the planner leaves more headroom than vLLM used, never less


def test_row3_start_up_failure_is_predicted() -> None:
    (row,) = [r for r in ROWS if r.number == 3]
    plan = predict(row)
    assert plan.verdict == "does-not-fit" and plan.exit_code == 1
    assert abs(plan.budget.kv_bytes / GIB - (-1.44)) <= 0.5
    assert any("No available memory for the cache blocks" in r for r in plan.reasons)
    # What would fit: tensor parallelism over 2 GPUs (row 2 is exactly that start-up) or quantized weights.
    assert any("--tp 2" in s for s in plan.suggestions)


def test_activation_estimates_track_the_vocabulary_not_the_model_size() -> None:
    by_number = {r.number: predict(r).budget.activation_bytes / GIB for r in ESTIMATED}
    # A 0.6B model with 152k vocabulary peaks above an 8B model with 128k, as logged (5.56 vs 4.76).
    assert by_number[7] > by_number[1]
    for row in ESTIMATED:
        if row.number not in KNOWN_OVERESTIMATE:
            assert row.activation is not None
            assert abs(by_number[row.number] - row.activation) <= 0.5


# With the weights estimated from config.json too, every logged KV memory is reproduced within 1 GiB except row 6
# (above, on the safe side); the worst are row 11 (+0.95, TP4, nothing but KV logged) and gpt-oss (+0.62: vLLM pads
# the MXFP4 experts at load, which the checkpoint-based estimate does not count). `python -m
# tests.unit.planner.ground_truth` prints the table.
@pytest.mark.parametrize(
    "row", [r for r in ROWS if r.logged_kv is not None and r.number not in KNOWN_OVERESTIMATE], ids=_id
)
def test_kv_memory_with_weights_estimated_from_the_config_within_one_gib(row: Row) -> None:
    error = estimated_kv_error(row)
    assert error is not None and abs(error) <= 1.0


def test_every_row_plans_from_its_bare_config() -> None:
    worst = max(abs(e) for r in ROWS if (e := estimated_kv_error(r)) is not None and r.number not in KNOWN_OVERESTIMATE)
    assert worst < 1.0
    (row3,) = [r for r in ROWS if r.number == 3]
    assert predict(row3, estimated_weights=True).verdict == "does-not-fit"  # the FP8 70B still fails on one H100
