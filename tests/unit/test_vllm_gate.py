"""``clinic-edge vllm-gate``: on unified memory, MemAvailable must cover vLLM's start-up request; the model's page
cache is dropped first when it does not."""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.cli import main
from appliance.planner import start_gate
from appliance.planner.accounting import GIB
from appliance.planner.start_gate import VLLM_CONTEXT_GIB, PageCacheDrop, drop_page_cache, gate_plan, run_gate
from tests.unit.planner.ground_truth import FIXTURES
from tests.unit.planner.test_safetensors_header import write_safetensors

SPARK_TOTAL_GIB = 119.5


def write_meminfo(path: Path, total_gib: float, available_gib: float) -> Path:
    kib = 1024**2
    path.write_text(
        f"MemTotal:       {int(total_gib * kib)} kB\nMemFree:        1000 kB\n"
        f"MemAvailable:   {int(available_gib * kib)} kB\nCached:         0 kB\n"
    )
    return path


def model_dir(tmp_path: Path, config: str = "Qwen3-8B") -> Path:
    """A model directory as the installer leaves it: config, tokenizer and two safetensors shards with data."""
    model = tmp_path / "models" / config.lower()
    model.mkdir(parents=True)
    (model / "config.json").write_text((FIXTURES / f"{config}.json").read_text())
    (model / "tokenizer.json").write_text("{}")
    write_safetensors(model / "model-00001-of-00002.safetensors", {"a": ("BF16", [256, 256])}, sparse=False)
    write_safetensors(model / "model-00002-of-00002.safetensors", {"b": ("BF16", [256, 256])}, sparse=False)
    return model


def write_plan(capsys: pytest.CaptureFixture[str], tmp_path: Path, *argv: str) -> Path:
    out = tmp_path / "etc"
    assert main(["plan", *argv, "--write-env", str(out), "--json"]) == 0
    capsys.readouterr()
    return out / "plan.json"


def spark_plan(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, config: str = "Qwen3-8B", weights: str = "15.3"
) -> tuple[Path, dict[str, Any]]:
    model = model_dir(tmp_path, config)
    path = write_plan(
        capsys, tmp_path, str(model), "--hardware", "dgx-spark", "--weights-gib", weights, "--max-model-len", "40960"
    )
    return path, json.loads(path.read_text())


def gate(
    capsys: pytest.CaptureFixture[str], plan: Path, meminfo: Path, again: Callable[[], object] = lambda: None
) -> tuple[int, str, dict[str, Any]]:
    """Run the gate for people, then (after ``again`` restores the box) with --json: same exit code."""
    code = main(["vllm-gate", "--plan", str(plan), "--meminfo", str(meminfo)])
    text = capsys.readouterr()
    assert "Traceback" not in text.err
    again()
    assert main(["vllm-gate", "--plan", str(plan), "--meminfo", str(meminfo), "--json"]) == code
    return code, text.out + text.err, json.loads(capsys.readouterr().out)


def test_enough_memory_passes_with_one_line_of_figures(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    plan, doc = spark_plan(capsys, tmp_path)
    requested = doc["requested_bytes"] / GIB
    meminfo = write_meminfo(tmp_path / "meminfo", SPARK_TOTAL_GIB, requested + VLLM_CONTEXT_GIB + 0.5)
    code, text, result = gate(capsys, plan, meminfo)
    assert code == 0 and text.count("\n") == 1 and text.startswith("vllm-gate: ok:")
    assert f"vLLM will ask {requested:.2f} GiB ({doc['gpu_memory_utilization']:g} × 119.50 GiB)" in text
    assert result["passed"] and result["dropped"] is None  # nothing to drop when enough is free


def test_short_memory_drops_the_model_page_cache_then_passes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan, doc = spark_plan(capsys, tmp_path)
    needed = doc["requested_bytes"] / GIB + VLLM_CONTEXT_GIB
    meminfo = write_meminfo(tmp_path / "meminfo", SPARK_TOTAL_GIB, needed - 2)
    advised: list[tuple[str, int, int, int]] = []
    real = os.posix_fadvise

    def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        advised.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length, advice))
        real(fd, offset, length, advice)
        write_meminfo(meminfo, SPARK_TOTAL_GIB, needed + 1)  # the kernel gave the model's pages back

    monkeypatch.setattr(start_gate.os, "posix_fadvise", fadvise)
    code, text, result = gate(capsys, plan, meminfo, lambda: write_meminfo(meminfo, SPARK_TOTAL_GIB, needed - 2))
    assert code == 0 and "dropped the page cache of 4 model file(s)" in text
    model = Path(doc["model"]["path"])
    files = sorted(str(p.resolve()) for p in model.iterdir())
    assert sorted({a[0] for a in advised}) == files
    assert {a[1:] for a in advised} == {(0, 0, os.POSIX_FADV_DONTNEED)}  # the whole of each file
    assert result["available_after_drop_bytes"] > result["available_bytes"]


@pytest.mark.parametrize(("config", "weights"), [("Qwen3-8B", "15.3"), ("gemma-3-27b-it", "51.4")])
def test_still_short_fails_with_the_figures_and_a_replan_that_fits(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: str, weights: str
) -> None:
    plan, doc = spark_plan(capsys, tmp_path, config, weights)
    available = doc["requested_bytes"] / GIB + VLLM_CONTEXT_GIB - 3
    meminfo = write_meminfo(tmp_path / "meminfo", SPARK_TOTAL_GIB, available)
    calls: list[Path] = []

    def drop(path: Path) -> PageCacheDrop:
        calls.append(path)
        return PageCacheDrop(files=4, bytes=1024**2)

    monkeypatch.setattr(start_gate, "drop_page_cache", drop)
    code, text, result = gate(capsys, plan, meminfo)
    assert code == 1 and not result["passed"] and calls == [Path(doc["model"]["path"]).resolve()] * 2
    shown = int(available * 1024**2) / 1024**2  # meminfo counts whole KiB
    assert f"MemAvailable {shown:.2f} of 119.50 GiB" in text and "3.00 GiB short" in text
    assert "unknown to us" in text and "what to do:" in text and "systemctl stop" in text
    # The re-plan command is exact: run it, and its plan passes the gate on the same box.
    command = result["remedy"].split("`sudo clinic-edge plan ")[1].split("`")[0]
    argv = ["clinic-edge", "plan", *shlex.split(command)]
    assert argv[2] == str(Path(doc["model"]["path"]).resolve()) and "--max-model-len" in argv
    assert 1024 <= int(argv[argv.index("--max-model-len") + 1]) < doc["max_model_len"]
    argv[argv.index("--write-env") + 1] = str(tmp_path / "replanned")
    assert main([*argv[1:], "--json"]) == 0
    capsys.readouterr()
    replanned = tmp_path / "replanned" / "plan.json"
    code, text, _ = gate(capsys, replanned, meminfo)
    assert code == 0, text


def test_discrete_gpu_plans_pass_at_once(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    plan = write_plan(capsys, tmp_path, str(FIXTURES / "Qwen3-8B.json"), "--hardware", "h100", "--weights-gib", "15.3")
    code, text, result = gate(capsys, plan, tmp_path / "no-meminfo-needed")
    assert code == 0 and "discrete-GPU plan" in text and result["unified"] is False


def test_a_missing_plan_says_how_to_write_one(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["vllm-gate", "--plan", str(tmp_path / "plan.json")]) == 2
    err = capsys.readouterr().err
    assert "Cannot read the vLLM plan" in err and "clinic-edge plan MODEL --write-env" in err


def test_an_older_plan_without_requested_bytes_is_still_gated(tmp_path: Path) -> None:
    doc = {
        "hardware": {"kind": "cuda", "unified": True, "name": "dgx-spark"},
        "gpu_memory_utilization": 0.84,
        "total_gib": 119.5,
        "vllm_args": ["--model", str(tmp_path)],
    }
    plan = gate_plan(doc)
    assert plan.requested_bytes == -(-int(119.5 * GIB) * 84 // 100)  # ceil(total × 0.84)
    meminfo = write_meminfo(tmp_path / "meminfo", SPARK_TOTAL_GIB, 102.0)
    result = run_gate(plan, meminfo, drop=lambda _: PageCacheDrop())
    assert not result.passed and "choose a smaller model" in result.remedy  # no context to cut


def test_fadvise_really_runs_on_real_files_without_privilege(tmp_path: Path) -> None:
    model = model_dir(tmp_path)
    for p in model.iterdir():
        p.read_bytes()  # in the page cache now
    result = drop_page_cache(model)
    # Whether the kernel dropped the pages cannot be observed portably (mincore needs an mmap per file); that
    # posix_fadvise accepted every file, read-only, is what this checks.
    assert result.files == 4 and result.skipped == []
    assert result.bytes == sum(p.stat().st_size for p in model.iterdir())


def test_unreadable_files_are_skipped_not_fatal(tmp_path: Path) -> None:
    model = model_dir(tmp_path)
    (model / "broken-link.safetensors").symlink_to(tmp_path / "gone")  # is_file() is false: not listed
    secret = model / "secret.bin"
    secret.write_bytes(b"x")
    secret.chmod(0)
    result = drop_page_cache(model)
    if os.geteuid() == 0:  # root reads anything
        assert result.files == 5 and result.skipped == []
    else:
        assert result.files == 4 and result.skipped and "secret.bin" in result.skipped[0]


def test_a_custom_unified_box_is_replanned_with_its_own_size(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = model_dir(tmp_path)
    argv = [str(model), "--gpu-mem-gib", "121.7", "--unified-memory", "--weights-gib", "15.3"]
    plan = write_plan(capsys, tmp_path, *argv, "--max-model-len", "40960")
    doc = json.loads(plan.read_text())
    meminfo = write_meminfo(tmp_path / "meminfo", 121.7, doc["requested_bytes"] / GIB + VLLM_CONTEXT_GIB - 2)
    monkeypatch.setattr(start_gate, "drop_page_cache", lambda _: PageCacheDrop())
    code, _, result = gate(capsys, plan, meminfo)
    command = result["remedy"].split("`sudo clinic-edge plan ")[1].split("`")[0]
    assert code == 1 and command.startswith(f"{model.resolve()} --gpu-mem-gib 121.7 --unified-memory ")
