"""What fits where: the largest context at each concurrency on each box, with the planner's own accounting.

``clinic-edge plan MODEL --matrix [--hardware dgx-spark,h100,h200,2xh100]`` plans the model once per (box,
concurrency) with the context left to the planner, so each cell is exactly what ``clinic-edge plan --concurrency N``
would run with on that box: the model's full context when it fits, the reduced ``--max-model-len`` of a
``fits-reduced`` plan, or nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from appliance.errors import UsageError
from appliance.planner.hardware_profile import HardwareProfile, named_profile
from appliance.planner.plan import PlanInputs, make_plan
from appliance.planner.topology import tp_candidates

__all__ = ["CONCURRENCIES", "MatrixCell", "fit_matrix", "matrix_table", "parse_boxes"]

CONCURRENCIES = (1, 2, 4, 8, 16)
MATRIX_BOXES = ("dgx-spark", "h100", "h200", "2xh100")
NAMED = ("dgx-spark", "h100", "h200")


@dataclass(frozen=True)
class MatrixCell:
    """One box at one concurrency: the context it runs with (0: does not fit) and how."""

    box: str
    concurrency: int
    max_model_len: int
    verdict: str
    tp: int
    replicas: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)


def parse_boxes(text: str) -> list[tuple[str, HardwareProfile]]:
    """``"dgx-spark,h100,2xh100"`` → labelled profiles (``NxBOX``: N GPUs of a named box)."""
    out: list[tuple[str, HardwareProfile]] = []
    for raw in (part.strip() for part in text.split(",")):
        count, _, name = raw.rpartition("x") if "x" in raw and raw.split("x", 1)[0].isdigit() else ("", "", raw)
        if name not in NAMED or (count and int(count) < 1):
            raise UsageError(
                f"--hardware {raw!r} is not a box the matrix knows.",
                f"Give a comma-separated list of {', '.join(NAMED)}, each optionally as NxBOX (e.g. 2xh100).",
            )
        out.append((raw, named_profile(name, int(count) if count else None)))
    return out


def fit_matrix(inputs: PlanInputs, boxes: list[tuple[str, HardwareProfile]]) -> list[MatrixCell]:
    """Plan ``inputs`` on every box at every concurrency of :data:`CONCURRENCIES`.

    On a box of several GPUs every tensor-parallel size vLLM accepts is tried (replicas at TP 1 split the sessions,
    TP pools the memory) and the cell keeps the one with the longest context, the smaller TP on a tie.
    """
    cells: list[MatrixCell] = []
    for label, box in boxes:
        for sessions in CONCURRENCIES:
            first = make_plan(dataclasses.replace(inputs, hardware=box, concurrency=sessions, tp=None))
            facts = first.facts
            best = first
            for tp in tp_candidates(box.gpus, facts.num_attention_heads, facts.num_kv_heads):
                plan = make_plan(dataclasses.replace(inputs, hardware=box, concurrency=sessions, tp=tp))
                if plan.verdict != "does-not-fit" and (
                    best.verdict == "does-not-fit" or plan.max_model_len > best.max_model_len
                ):
                    best = plan
            fits = best.verdict != "does-not-fit"
            cells.append(
                MatrixCell(label, sessions, best.max_model_len if fits else 0, best.verdict, best.tp, best.replicas)
            )
    return cells


def matrix_table(model: str, cells: list[MatrixCell]) -> str:
    """Concurrency down, boxes across: the context each runs with ("–": does not fit)."""
    boxes = list(dict.fromkeys(c.box for c in cells))
    by = {(c.box, c.concurrency): c for c in cells}
    width = max(14, *(len(b) + 2 for b in boxes))
    lines = [
        f"clinic-edge plan --matrix: {model}, largest context (tokens) per session at each concurrency",
        "",
        f"  {'sessions':<10}" + "".join(f"{b:>{width}}" for b in boxes),
    ]
    for sessions in CONCURRENCIES:
        row = f"  {sessions:<10}"
        for box in boxes:
            cell = by[(box, sessions)]
            text = f"{cell.max_model_len:,}" if cell.max_model_len else "–"
            if cell.max_model_len and cell.tp > 1:
                text += f" tp{cell.tp}"
            row += f"{text:>{width}}"
        lines.append(row)
    lines += [
        "",
        "  each cell is `clinic-edge plan MODEL --hardware BOX --concurrency N` (same accounting, its verdict)",
    ]
    return "\n".join(lines)
