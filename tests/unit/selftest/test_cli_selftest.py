"""``clinic-edge selftest`` end to end against the deterministic loopback upstream: exit codes, JSON, files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.cli import main
from tests.conftest import free_port
from tests.unit.selftest.conftest import RunningUpstream

SINGLE = ["--concurrency", "2", "--requests", "6", "--prompt-tokens", "16", "--max-tokens", "4"]
# Tests check the machinery, not this machine's speed (no timed assertions): limits no working run can miss.
LENIENT = ["--slo-ttft-p99-ms", "60000", "--slo-image-ttft-ms", "60000"]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict, str]:  # type: ignore[type-arg]
    code = main(["selftest", *argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if "--json" in argv else {"text": out}), err


def test_single_point_json_carries_the_contract_keys(
    upstream: RunningUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc, err = _run(
        capsys, "--target", upstream.url, *SINGLE, "--profile", "cpu", *LENIENT, "--state-dir", str(tmp_path), "--json"
    )
    assert code == 0, doc["verdict"]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms", "ttfc_ms"):
        assert set(doc[key]) == {"mean", "std", "p50", "p90", "p95", "p99"}
    assert doc["completed"] == 6 and doc["failed"] == 0 and doc["output_throughput"] > 0
    assert doc["verdict"]["passed"] is True and doc["mode"] == "single"
    assert doc["ttft_ms"]["p50"] >= 15.0  # the upstream's first-event delay
    assert doc["schema"] == 1 and doc["summary"]["ttft_ms"] == doc["ttft_ms"]
    saved = json.loads((tmp_path / "latest.json").read_text())
    assert saved["id"] == doc["id"] and Path(doc["result_file"]).is_file()
    assert saved["hardware"]["cpu"]["count"] >= 1 and saved["snapshot"]["prompt_tokens_exact"] is False
    assert saved["snapshot"]["prompt_tokenizer"] == "calibrated"  # no tokenizer, no /tokenize: usage counts
    assert "[1/1]" in err  # progress on stderr, the JSON alone on stdout


def test_slo_miss_exits_1_with_the_reason(
    upstream: RunningUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc, _ = _run(
        capsys, "--target", upstream.url, *SINGLE, "--profile", "cpu", "--slo-ttft-p99-ms", "1",
        "--state-dir", str(tmp_path),
    )  # fmt: skip
    assert code == 1
    assert "FAIL — TTFT p99" in doc["text"] and "> 1 ms" in doc["text"]


def test_quick_with_image_and_report_then_history(
    upstream: RunningUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "r.html"
    code, doc, _ = _run(
        capsys, "--quick", "--target", upstream.url, "--profile", "cpu", *LENIENT, "--state-dir", str(tmp_path / "s"),
        "--report", str(report), "--json",
    )  # fmt: skip
    assert code == 0
    assert [p["name"] for p in doc["points"]] == ["short-c1", "short-c4", "image"]
    assert doc["summary"]["scope"] == ["short-c4"] and doc["summary"]["completed"] == 8 + 24 + 1
    assert "<svg" in report.read_text()
    code, hist, _ = _run(capsys, "history", "--state-dir", str(tmp_path / "s"), "--json")
    assert code == 0 and len(hist["runs"]) == 1 and hist["runs"][0]["passed"] is True
    code, text, _ = _run(capsys, "history", "--state-dir", str(tmp_path / "s"))
    assert "quick" in text["text"] and "PASS" in text["text"]


def test_target_down_exits_2_with_what_to_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, doc, _ = _run(capsys, "--quick", "--target", url, "--state-dir", str(tmp_path), "--json")
    assert code == 2
    assert doc["error"]["kind"] == "unreachable" and "systemctl status" in doc["error"]["remedy"]
    # Nothing measured, but the failed run is recorded so the dashboard and history show the box was down.
    saved = json.loads((tmp_path / "latest.json").read_text())
    assert saved["verdict"]["passed"] is False and "did not answer" in saved["verdict"]["reason"]
    assert saved["points"] == [] and saved["summary"]["completed"] == 0
    assert doc["error"]["details"]["result_file"].endswith(".json")


def test_target_not_ready_exits_2(
    loading_upstream: RunningUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["selftest", "--quick", "--target", loading_upstream.url, "--state-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "not ready: vLLM is loading the model" in err and "what to do:" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--quick", "--concurrency", "3"], "--quick cannot be combined"),
        (["--sweep", "--prompt-tokens", "3"], "--sweep takes only --requests"),
        (["--target", "ftp://x"], "not an http(s) URL"),
        ([], "No --target given"),
    ],
)
def test_bad_flags_exit_2(argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["selftest", *argv, "--state-dir", str(tmp_path)])
    assert code == 2 and message in capsys.readouterr().err


def test_unwritable_state_dir_is_caught_before_measuring(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["selftest", "--target", "http://127.0.0.1:9", "--state-dir", str(blocker / "sub")])
    assert code == 2 and "Cannot write self-test results" in capsys.readouterr().err


def test_api_key_from_environment_and_config_file(
    upstream: RunningUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "selftest.yml"
    cfg.write_text(f"target: {upstream.url}\nprofile: cpu\nttft_p99_ms: 2\nstate_dir: {tmp_path / 's'}\n")
    monkeypatch.setenv("CLINIC_EDGE_API_KEY", "secret-from-env")
    code, doc, _ = _run(capsys, "--config", str(cfg), *SINGLE, "--json")
    assert code == 1 and doc["verdict"]["slo"]["ttft_p99_ms"] == 2  # config applied; 15 ms > 2 ms
    assert "secret-from-env" not in json.dumps(doc)
    code, doc, _ = _run(capsys, "--config", str(cfg), *SINGLE, "--slo-ttft-p99-ms", "60000", "--json")
    assert code == 0  # the flag wins over the file
    bad = tmp_path / "bad.yml"
    bad.write_text("tagret: x\n")
    assert main(["selftest", "--config", str(bad)]) == 2
    assert "unknown keys: tagret" in capsys.readouterr().err


def test_snapshot_records_plan_and_vllm_flags(
    upstream: RunningUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vdir = tmp_path / "etc" / "vllm"
    vdir.mkdir(parents=True)
    (vdir / "plan.json").write_text(json.dumps({"verdict": "fits", "model": "demo"}))
    (vdir / "vllm-0.env").write_text(
        "# Written by 'clinic-edge plan --write-env'\n"
        "CLINIC_EDGE_VLLM_ARGS=--model /srv/m --port 8000 --max-model-len 1024\nVLLM_CPU_KVCACHE_SPACE=1\n"
    )
    code, doc, _ = _run(
        capsys, "--target", upstream.url, *SINGLE, "--profile", "cpu", *LENIENT, "--state-dir", str(tmp_path / "s"),
        "--etc-dir", str(tmp_path / "etc"), "--json",
    )  # fmt: skip
    assert code == 0
    assert doc["plan"] == {"verdict": "fits", "model": "demo"}
    assert doc["snapshot"]["vllm_flags"] == {
        "vllm-0": ["--model", "/srv/m", "--port", "8000", "--max-model-len", "1024"]
    }


def test_only_a_text_only_refusal_skips_the_image() -> None:
    from appliance.commands.selftest import _skip_image_if_refused

    text_only = {"kind": "image", "completed": 0, "failed": 1, "errors": {"HTTP 400: x is not a multimodal model": 1}}
    gateway_no = {"kind": "image", "completed": 0, "failed": 1, "errors": {"HTTP 400: image larger than 20 MB": 1}}
    _skip_image_if_refused([text_only, gateway_no])
    assert text_only["skipped"] and text_only["failed"] == 0
    assert "skipped" not in gateway_no and gateway_no["failed"] == 1
