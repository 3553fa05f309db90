"""Verdict logic, result files (latest.json, retention, history table) and the HTML report."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from appliance.selftest.history import history_rows, history_table, load_history, prune, save_run
from appliance.selftest.report import render_report, svg_histogram, svg_history
from appliance.selftest.runner import plan_quick, plan_single, plan_sweep
from appliance.selftest.verdict import DEFAULT_SLOS, judge, slo_for

STATS = ("mean", "std", "p50", "p90", "p95", "p99")


def _stats(p50: float | None, p99: float | None) -> dict[str, float | None]:
    return {"mean": p50, "std": 1.0 if p50 else None, "p50": p50, "p90": p99, "p95": p99, "p99": p99}


def _point(name: str, *, judged: bool = False, kind: str = "text", p99: float | None = 50.0, failed: int = 0,
           completed: int = 16, samples: list[float] | None = None) -> dict[str, Any]:  # fmt: skip
    return {
        "name": name,
        "kind": kind,
        "judged": judged,
        "concurrency": 4,
        "prompt_tokens": 128,
        "completed": completed,
        "failed": failed,
        "ttft_ms": _stats(p99 / 2 if p99 else None, p99),
        "ttfc_ms": _stats(None, None),
        "tpot_ms": _stats(3.0, 5.0),
        "itl_ms": _stats(3.0, 9.0),
        "e2el_ms": _stats(100.0, 150.0),
        "request_throughput": 10.0,
        "output_throughput": 300.0,
        "errors": {"HTTP 500: boom": failed} if failed else {},
        "samples": {"ttft_ms": samples if samples is not None else [10.0, 20.0, p99 or 0.0]},
    }


def test_gpu_default_is_ttft_p99_100ms_at_concurrency_4() -> None:
    gpu = DEFAULT_SLOS["gpu"]
    assert gpu.ttft_p99_ms == 100.0 and gpu.concurrency == 4 and gpu.max_failed == 0
    assert DEFAULT_SLOS["cpu"].ttft_p99_ms > gpu.ttft_p99_ms


def test_pass_names_every_check() -> None:
    v = judge([_point("short-c1"), _point("short-c4", judged=True, p99=84.2)], slo_for("gpu"))
    assert v.passed
    assert v.reason.startswith("PASS") and "TTFT p99 84.2 ms ≤ 100 ms" in v.reason


def test_fail_says_which_limit_and_where() -> None:
    v = judge([_point("short-c4", judged=True, p99=152.0)], slo_for("gpu"))
    assert not v.passed
    assert v.reason == "FAIL: TTFT p99 152.0 ms > 100 ms (128-token prompts, concurrency 4)"


def test_unjudged_points_do_not_decide_latency_but_their_failures_count() -> None:
    slow_other = _point("p2048-c64", p99=5000.0)
    assert judge([_point("j", judged=True), slow_other], slo_for("gpu")).passed
    broken_other = _point("p2048-c64", failed=1)
    v = judge([_point("j", judged=True), broken_other], slo_for("gpu"))
    assert not v.passed and "1 failed requests of 33 > 0 allowed" in v.reason
    assert judge([_point("j", judged=True), broken_other], slo_for("gpu", {"max_failed": 1})).passed


def test_all_failed_cannot_pass() -> None:
    v = judge([_point("j", judged=True, p99=None, completed=0, failed=4)], slo_for("gpu", {"max_failed": 10}))
    assert not v.passed and "no request completed" in v.reason


def test_image_limit_and_skipped_image() -> None:
    img = _point("image", kind="image", samples=[1500.0])
    v = judge([_point("j", judged=True), img], slo_for("gpu"))
    assert not v.passed and "image TTFT max 1500.0 ms > 1000 ms" in v.reason
    img["skipped"] = "the model does not take images (HTTP 400)"
    assert judge([_point("j", judged=True), img], slo_for("gpu")).passed


def test_overrides_and_optional_slos() -> None:
    slo = slo_for("cpu", {"ttft_p99_ms": 40.0, "tpot_p99_ms": 4.0, "image_ttft_ms": None, "unknown": 1})
    assert slo.ttft_p99_ms == 40.0 and slo.tpot_p99_ms == 4.0
    assert slo.image_ttft_ms == DEFAULT_SLOS["cpu"].image_ttft_ms  # None = keep the default
    v = judge([_point("j", judged=True, p99=30.0)], slo)
    assert not v.passed and "TPOT p99 5.0 ms > 4 ms" in v.reason
    assert slo.goodput_ms() == {"ttft": 40.0, "tpot": 4.0}


def test_plans() -> None:
    quick = plan_quick(4, with_image=True)
    assert [(p.kind, p.concurrency, p.judged) for p in quick] == [
        ("text", 1, False),
        ("text", 4, True),
        ("image", 1, False),
    ]
    sweep = plan_sweep(4, with_image=False, max_model_len=1024)
    text = [p for p in sweep if p.kind == "text"]
    assert {p.concurrency for p in text} == {1, 4, 16, 64}
    clipped = [p for p in text if p.clipped_from == 2048]
    assert clipped and all(p.prompt_tokens + p.max_tokens + 32 <= 1024 for p in clipped)
    assert [p.name for p in sweep if p.judged] == ["p128-c4"]
    assert [p.concurrency for p in sweep if p.kind == "conversation"] == [1, 4]
    full = plan_sweep(4, with_image=True, max_model_len=None)
    assert len([p for p in full if p.kind == "text"]) == 12 and full[-1].kind == "image"
    assert plan_single(8, 64, 64, 32)[0].judged
    with pytest.raises(Exception, match="at least 1"):
        plan_single(0, 1, 1, 1)


def _doc(run_id: str, passed: bool = True, p99: float = 50.0) -> dict[str, Any]:
    point = _point("short-c4", judged=True, p99=p99)
    return {
        "schema": 1,
        "id": run_id,
        "started_at": f"{run_id[:4]}-{run_id[4:6]}-{run_id[6:8]}T{run_id[9:11]}:{run_id[11:13]}:{run_id[13:15]}Z",
        "finished_at": "x",
        "mode": "quick",
        "target": "http://127.0.0.1:8000",
        "model": "demo",
        "verdict": {"passed": passed, "reason": "PASS: fine" if passed else "FAIL: slow", "slo": {"ttft_p99_ms": 100}},
        "summary": {k: point[k] for k in ("ttft_ms", "ttfc_ms", "tpot_ms", "itl_ms", "e2el_ms")}
        | {"completed": 16, "failed": 0, "request_throughput": 1.0, "output_throughput": 2.0},
        "points": [point],
        "gateway_share_ms": None,
        "plan": None,
        "hardware": None,
    }


def test_save_run_writes_file_and_atomic_latest_copy(tmp_path: Path) -> None:
    path = save_run(tmp_path, _doc("20261123T010000Z"))
    assert path.name == "20261123T010000Z.json"
    latest = tmp_path / "latest.json"
    assert latest.is_file() and not latest.is_symlink()
    assert json.loads(latest.read_text()) == json.loads(path.read_text())
    again = save_run(tmp_path, _doc("20261123T010000Z"))  # same second: a new name, never an overwrite
    assert again.name == "20261123T010000Z-1.json" and json.loads(latest.read_text())["id"] == again.stem
    assert not list(tmp_path.glob(".*tmp"))


def test_retention_keeps_the_newest_runs(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not ours")
    for h in range(5):
        save_run(tmp_path, _doc(f"2026112{h}T010000Z"), keep=3)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "20261122T010000Z.json",
        "20261123T010000Z.json",
        "20261124T010000Z.json",
        "latest.json",
        "notes.txt",
    ]
    assert prune(tmp_path, 1) == [tmp_path / "20261122T010000Z.json", tmp_path / "20261123T010000Z.json"]


def test_history_table_newest_first_and_reports_broken_files(tmp_path: Path) -> None:
    save_run(tmp_path, _doc("20261121T020000Z", passed=True, p99=40.0))
    save_run(tmp_path, _doc("20261122T020000Z", passed=False, p99=140.0))
    (tmp_path / "20261120T020000Z.json").write_text("{broken")
    entries = load_history(tmp_path)
    rows = history_rows(entries)
    assert [r["file"] for r in rows] == ["20261122T020000Z.json", "20261121T020000Z.json", "20261120T020000Z.json"]
    table = history_table(entries)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["when", "(UTC)", "mode"]
    assert "2026-11-22 02:00" in lines[2] and "140.0" in lines[2] and lines[2].rstrip().endswith("FAIL")
    assert lines[3].rstrip().endswith("PASS")
    assert "unreadable" in lines[4]
    assert history_table([]) == "No self-test results yet."


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("src", "href") and v and not v.startswith("#"):
                self.external.append(v)


def test_report_is_self_contained_with_both_plots_and_escaped_text() -> None:
    run = _doc("20261123T020000Z")
    run["points"][0]["samples"]["ttft_ms"] = [12.0, 14.0, 15.0, 90.0]
    run["verdict"]["reason"] = "PASS: <script>alert(1)</script>"
    history = [_doc("20261121T020000Z", p99=40.0), _doc("20261122T020000Z", passed=False, p99=140.0)]
    page = render_report(run, history)
    c = _Collector()
    c.feed(page)
    assert c.tags.count("svg") == 2 and "script" not in c.tags and c.external == []
    assert "&lt;script&gt;" in page
    svgs = [page[i : page.index("</svg>", i) + 6] for i in range(len(page)) if page.startswith("<svg", i)]
    hist, hist_plot = (ET.fromstring(s) for s in svgs)  # well-formed XML
    ns = "{http://www.w3.org/2000/svg}"
    assert sum(1 for r in hist.iter(f"{ns}rect") if r.get("class") == "bar") >= 2
    assert any(line.get("class") == "slo" for line in hist.iter(f"{ns}line"))
    assert len(list(hist_plot.iter(f"{ns}circle"))) == 6  # p50 and p99 for 3 runs
    assert {p.get("class") for p in hist_plot.iter(f"{ns}polyline")} == {"p50", "p99"}


def test_plots_without_data() -> None:
    assert "No completed request" in svg_histogram([])
    assert "No earlier runs" in svg_history([])
