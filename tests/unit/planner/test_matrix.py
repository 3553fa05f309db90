"""`clinic-edge plan MODEL --matrix`: every cell is the plan the single-box command would make."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.errors import UsageError
from appliance.planner.accounting import Knobs
from appliance.planner.matrix import CONCURRENCIES, fit_matrix, parse_boxes
from appliance.planner.plan import PlanInputs, make_plan

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "model-configs"
GEMMA4 = FIXTURES / "gemma-4-31B-it.json"


def test_boxes_parse_with_gpu_counts_and_unknown_boxes_are_named() -> None:
    boxes = parse_boxes("dgx-spark,h100,2xh100")
    assert [(label, box.name, box.gpus) for label, box in boxes] == [
        ("dgx-spark", "dgx-spark", 1),
        ("h100", "h100", 1),
        ("2xh100", "h100", 2),
    ]
    with pytest.raises(UsageError, match="'a100'"):
        parse_boxes("h100,a100")


def test_every_cell_is_the_single_box_plan_and_context_shrinks_with_sessions() -> None:
    inputs = PlanInputs(model=GEMMA4, hardware=parse_boxes("h200")[0][1], knobs=Knobs())
    cells = fit_matrix(inputs, parse_boxes("dgx-spark,h200,2xh100"))
    assert len(cells) == 3 * len(CONCURRENCIES)
    for cell in cells:
        box = parse_boxes(cell.box)[0][1]
        plan = make_plan(dataclasses.replace(inputs, hardware=box, concurrency=cell.concurrency, tp=cell.tp))
        assert plan.max_model_len == cell.max_model_len or (cell.max_model_len == 0 and plan.verdict == "does-not-fit")
    for box in ("dgx-spark", "h200", "2xh100"):
        lengths = [c.max_model_len for c in cells if c.box == box]
        assert lengths == sorted(lengths, reverse=True)
    two = {c.concurrency: c for c in cells if c.box == "2xh100"}
    assert two[1].tp == 2 and two[1].max_model_len == 262_144  # pooling both GPUs serves the full context


def test_cli_matrix_json_and_clashing_flags(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", str(GEMMA4), "--matrix", "--hardware", "dgx-spark,h100", "--json"])
    doc = json.loads(capsys.readouterr().out)["matrix"]
    assert code == 0 and doc["boxes"] == ["dgx-spark", "h100"] and doc["concurrency"] == list(CONCURRENCIES)
    assert {c["box"] for c in doc["cells"]} == {"dgx-spark", "h100"} and len(doc["cells"]) == 10
    code = main(["plan", str(GEMMA4), "--matrix", "--write-env", "/tmp/x"])
    assert code == 2 and "--write-env with --matrix" in capsys.readouterr().err
    code = main(["plan", str(GEMMA4), "--hardware", "h100,h200"])
    assert code == 2 and "lists (dgx-spark,h100,2xh100) go with --matrix" in capsys.readouterr().err


def test_does_not_fit_alternatives_are_planned_and_state_their_size_and_fit() -> None:
    inputs = PlanInputs(
        model=GEMMA4, hardware=parse_boxes("h100")[0][1], knobs=Knobs(), max_model_len=32768, concurrency=4
    )
    plan = make_plan(inputs)
    assert plan.verdict == "fits-reduced"
    (awq,) = [s for s in plan.suggestions if s.startswith("A 4-bit AWQ")]
    gib = float(awq.split("(")[2].split(" GiB")[0])
    longest = int(awq.split("up to ")[1].split(" tokens")[0].replace(",", ""))
    # The same request with those weights given by hand reduces to the context the suggestion promised.
    again = make_plan(dataclasses.replace(inputs, weights_gib=gib))
    assert abs(again.max_model_len - longest) <= 64  # the suggestion's size is rounded to 0.1 GiB
    assert any(s.startswith("2 such GPUs with --tp 2: fits") for s in plan.suggestions)
    assert any(s.startswith("An fp8 KV cache") for s in plan.suggestions)


def test_a_smaller_batch_is_priced_for_sliding_window_models() -> None:
    inputs = PlanInputs(
        model=GEMMA4, hardware=parse_boxes("h200")[0][1], knobs=Knobs(), max_model_len=32768, concurrency=4
    )
    plan = make_plan(inputs)
    (smaller,) = [s for s in plan.suggestions if s.startswith("--max-num-batched-tokens 2496")]
    assert "fits" in smaller  # 5 × 377 sliding blocks per request instead of 5 × 1,089
    again = make_plan(dataclasses.replace(inputs, knobs=Knobs(max_num_batched_tokens=2496)))
    assert again.verdict == "fits" and f"{again.budget.max_concurrency():.2f} sessions" in smaller
