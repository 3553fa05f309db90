"""``clinic-edge selftest --quick`` end to end: the real gateway (TLS, workstation key) in front of the real vLLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.cli import main
from tests.conftest import RunningGateway, RunningVllm, free_port, launch_gateway

pytestmark = pytest.mark.vllm

# Tests check the machinery, not this machine's speed (no timed assertions): limits no working run can miss.
LENIENT = ("--slo-ttft-p99-ms", "60000", "--slo-image-ttft-ms", "60000")


def test_quick_run_through_the_gateway_with_its_share(
    gateway_server: RunningGateway,
    vllm_server: RunningVllm,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CLINIC_EDGE_API_KEY", gateway_server.key)  # the key never on the command line
    assert gateway_server.ca_path is not None
    code = main(
        ["selftest", "--quick", "--target", gateway_server.base_url, "--ca-cert", str(gateway_server.ca_path),
         "--direct", vllm_server.base_url, "--state-dir", str(tmp_path), "--profile", "cpu", *LENIENT, "--json"]
    )  # fmt: skip
    doc = json.loads(capsys.readouterr().out)
    assert code == 0, doc["verdict"]["reason"]
    assert doc["target_kind"] == "gateway" and doc["model"] == vllm_server.model
    points = {p["name"]: p for p in doc["points"]}
    assert points["short-c4"]["completed"] == points["short-c4"]["requests"]
    assert points["image"]["completed"] == 1  # the drawn radiograph passes the gateway's image checks
    assert isinstance(doc["gateway_share_ms"], float) and doc["gateway_share"]["failed"] == 0
    assert gateway_server.key not in (tmp_path / "latest.json").read_text()


def test_gateway_refuses_a_bad_key_exit_2(
    gateway_server: RunningGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gateway_server.ca_path is not None
    code = main(
        ["selftest", "--quick", "--target", gateway_server.base_url, "--ca-cert", str(gateway_server.ca_path),
         "--api-key", "not-a-key", "--state-dir", str(tmp_path)]
    )  # fmt: skip
    assert code == 2 and "refused the API key" in capsys.readouterr().err


def test_untrusted_certificate_says_to_pass_the_clinic_ca(
    gateway_server: RunningGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["selftest", "--quick", "--target", gateway_server.base_url, "--state-dir", str(tmp_path)])
    assert code == 2 and "--ca-cert" in capsys.readouterr().err


def test_gateway_without_a_ready_upstream_exits_2_not_ready(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gw = launch_gateway(tmp_path / "gw", [f"http://127.0.0.1:{free_port()}"], wait_ready=False)
    try:
        assert gw.ca_path is not None
        code = main(
            ["selftest", "--quick", "--target", gw.base_url, "--ca-cert", str(gw.ca_path), "--api-key", gw.key,
             "--state-dir", str(tmp_path / "s")]
        )  # fmt: skip
    finally:
        gw.stop()
    err = capsys.readouterr().err
    assert code == 2 and "is not ready" in err and "what to do:" in err
