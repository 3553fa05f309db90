"""``clinic-edge selftest`` against a real vLLM (CPU build) serving the demo model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.selftest.workloads import PromptMaker, RemoteTokenizer, load_tokenizer
from tests.conftest import RunningVllm

pytestmark = pytest.mark.vllm

# Tests check the machinery, not this machine's speed (no timed assertions): limits no working run can miss.
LENIENT = ("--slo-ttft-p99-ms", "60000", "--slo-image-ttft-ms", "60000")


def test_quick_run_passes_with_exact_prompts_and_an_image(
    vllm_server: RunningVllm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "report.html"
    code = main(
        ["selftest", "--quick", "--target", vllm_server.base_url, "--state-dir", str(tmp_path), "--json",
         "--profile", "cpu", *LENIENT, "--report", str(report)]
    )  # fmt: skip
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert code == 0, doc["verdict"]["reason"]
    assert doc["target_kind"] == "vllm" and doc["model"] == vllm_server.model  # first model of /v1/models
    assert doc["snapshot"]["prompt_tokens_exact"] is True  # the tokenizer came from vLLM's model path
    points = {p["name"]: p for p in doc["points"]}
    assert set(points) == {"short-c1", "short-c4", "image"}
    for p in (points["short-c1"], points["short-c4"]):
        assert p["failed"] == 0 and p["completed"] == p["requests"]
        # 128 tokens of content plus the chat template's few ("User: ...<end_of_utterance>\nAssistant:")
        assert 128 < p["mean_prompt_tokens"] <= 128 + 12, p["mean_prompt_tokens"]
        assert p["tpot_ms"]["p50"] > 0 and p["ttfc_ms"]["p50"] >= p["ttft_ms"]["p50"]
    image = points["image"]
    assert image["completed"] == 1 and image["mean_prompt_tokens"] > 150  # the tiles' image tokens
    assert doc["verdict"]["passed"] and (tmp_path / "latest.json").is_file()
    assert "[3/3] image request" in err
    assert report.read_text().count("<svg") == 2


def test_single_point_and_gateway_share_machinery(
    vllm_server: RunningVllm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Target and --direct both vLLM: the interleaving runs end to end (a share near zero, not asserted: timing).
    code = main(
        ["selftest", "--target", vllm_server.base_url, "--direct", vllm_server.base_url, "--concurrency", "2",
         "--requests", "4", "--prompt-tokens", "32", "--max-tokens", "8", "--state-dir", str(tmp_path), "--json",
         "--profile", "cpu", *LENIENT]
    )  # fmt: skip
    doc = json.loads(capsys.readouterr().out)
    assert code == 0, doc["verdict"]["reason"]
    assert doc["completed"] == 4 and doc["tpot_ms"]["p50"] is not None
    assert doc["snapshot"]["ignore_eos"] is True
    assert doc["points"][0]["total_output_tokens"] == 4 * 8  # each request ran to its length
    share = doc["gateway_share"]
    assert isinstance(doc["gateway_share_ms"], float) and share["pairs"] == 16 and share["failed"] == 0


def test_unknown_model_exits_2(vllm_server: RunningVllm, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["selftest", "--target", vllm_server.base_url, "--model", "nope", "--state-dir", str(tmp_path)])
    assert code == 2 and "does not serve a model named 'nope'" in capsys.readouterr().err


def test_prompts_are_exact_token_counts(vllm_server: RunningVllm) -> None:
    tok = load_tokenizer(vllm_server.model_dir)
    assert tok is not None
    maker = PromptMaker(tok)
    for n in (16, 128, 512, 900):
        for seed in range(3):
            assert maker.count(maker.text(n, seed)) == n
    assert maker.text(64, 1) != maker.text(64, 2)
    # Where transformers is missing (the box's clinic-edge venv), vLLM's /tokenize and /detokenize do the same job.
    remote = RemoteTokenizer(vllm_server.base_url, vllm_server.model, {"Content-Type": "application/json"})
    assert remote.works()
    via_vllm = PromptMaker(remote)
    for n in (16, 300):
        text = via_vllm.text(n, seed=5)
        assert maker.count(text) == n
    assert not RemoteTokenizer(vllm_server.base_url, "no-such-model", {}).works()
