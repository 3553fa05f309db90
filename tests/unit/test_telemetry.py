"""The telemetry sources: parsers, defensive readers, real HTTP and the real systemctl of this machine."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from appliance.cli import main
from appliance.telemetry.config import ConfigSource, replica_urls
from appliance.telemetry.gateway import GatewaySource
from appliance.telemetry.health import age_text, problems, short_age
from appliance.telemetry.http import make_fetch
from appliance.telemetry.memory import MemorySource, ProcessInfo, find_vllm_processes
from appliance.telemetry.selftest_files import SelftestSource
from appliance.telemetry.sources import collect
from appliance.telemetry.systemd import CommandResult, SystemdSource, clinic_edge_units, parse_show
from appliance.telemetry.vllm import VllmSource, parse_prometheus
from tests.conftest import free_port, require
from tests.dashboard_support import FIXTURES, scenario_sources

METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:gpu_cache_usage_perc{engine="1",model_name="m"} NaN
vllm:num_requests_running_total 99
"""


def test_parse_prometheus_sums_label_sets_and_skips_nan() -> None:
    found = parse_prometheus(METRICS, ["vllm:num_requests_running", "vllm:gpu_cache_usage_perc", "absent"])
    assert found == {"vllm:num_requests_running": [2.0, 1.0], "vllm:gpu_cache_usage_perc": [0.25]}


class Handler(BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[int, str]]] = {}

    def do_GET(self) -> None:
        status, body = self.routes.get(self.path, (404, "not found"))
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[tuple[str, dict[str, tuple[int, str]]]]:
    routes: ClassVar[dict[str, tuple[int, str]]] = {}
    handler = type("H", (Handler,), {"routes": routes})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", routes
    finally:
        server.shutdown()
        server.server_close()


def test_vllm_source_over_real_http(http_server: tuple[str, dict[str, tuple[int, str]]]) -> None:
    url, routes = http_server
    routes["/health"] = (200, "")
    routes["/metrics"] = (200, METRICS)
    down = f"http://127.0.0.1:{free_port()}"
    part = VllmSource([url, down], make_fetch(timeout=2)).read()
    up, gone = part.replicas
    assert (up.healthy, up.running, up.waiting, up.kv_cache_usage, up.error) == (True, 3.0, 4.0, 0.25, None)
    assert gone.healthy is False and gone.error is not None and "refused" in gone.error
    routes["/health"] = (503, "")
    assert VllmSource([url], make_fetch()).read().replicas[0].error == "/health answered 503"


def test_gateway_readyz_503_carries_reasons(http_server: tuple[str, dict[str, tuple[int, str]]]) -> None:
    url, routes = http_server
    doc = {"ready": False, "reasons": ["no healthy upstream"], "upstreams": [{"url": "u", "healthy": False}]}
    routes["/readyz"] = (503, json.dumps(doc))
    part = GatewaySource(url, make_fetch()).read()
    assert part.ready is False and part.reasons == ["no healthy upstream"] and part.error is None
    routes["/readyz"] = (200, "<html>")
    assert "without the JSON document" in (GatewaySource(url, make_fetch()).read().error or "")


def test_gateway_tls_without_the_ca_says_what_to_do(tmp_path: Path) -> None:
    # Any TLS endpoint that is unreachable reports a reason, never raises.
    part = GatewaySource(f"https://127.0.0.1:{free_port()}", make_fetch(timeout=1)).read()
    assert part.ready is False and part.error is not None


def test_parse_show_blocks() -> None:
    text = (
        "Id=clinic-edge-vllm@0.service\nLoadState=loaded\nActiveState=activating\nSubState=auto-restart\n"
        "StateChangeTimestamp=Mon 2026-11-23 07:55:00 UTC\nNRestarts=7\nResult=exit-code\n\n"
        "Id=clinic-edge-selftest.timer\nLoadState=loaded\nActiveState=active\nSubState=waiting\n"
        "StateChangeTimestamp=\nResult=success\n"
    )
    vllm, timer = parse_show(text)
    assert vllm.restarts == 7 and vllm.since == datetime(2026, 11, 23, 7, 55, tzinfo=UTC) and not vllm.healthy
    assert timer.since is None and timer.restarts is None and timer.healthy


def test_missing_unit_is_not_found() -> None:
    out = "Id=clinic-edge-gateway.service\nLoadState=loaded\nActiveState=active\nSubState=running\n"
    source = SystemdSource(
        ["clinic-edge-gateway.service", "clinic-edge-vllm@0.service"], lambda argv: CommandResult(0, out, "")
    )
    part = source.read()
    assert [u.healthy for u in part.units] == [True, False] and part.units[1].load_state == "not-found"


def test_real_systemctl_here_reports_its_reason() -> None:
    require(shutil.which("systemctl") is not None, "no systemctl on this machine")
    part = SystemdSource(clinic_edge_units(1)).read()
    require(part.error is not None, "systemd runs here; the not-PID-1 path cannot be observed")
    assert part.error.startswith("systemctl: ") and len(part.error) > len("systemctl: ")
    journal = SystemdSource(clinic_edge_units(1)).journal("clinic-edge-gateway.service")
    assert journal.error is not None or journal.lines == []


def write(path: Path, doc: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))


def test_selftest_files_are_read_defensively(tmp_path: Path) -> None:
    folder = tmp_path / "selftest"
    write(folder / "20261120T020000Z.json", {"id": "a", "finished_at": "2026-11-20T02:00:00Z"})  # almost empty
    write(folder / "20261121T020000Z.json", "{not json")
    write(folder / "20261122T020000Z.json", ["not", "a", "result"])
    run = {
        "id": "b",
        "finished_at": "2026-11-22T02:00:00+00:00",
        "verdict": {"passed": "yes"},
        "summary": {"ttft_ms": {"p50": "fast", "p99": 80}},
    }
    write(folder / "20261122T030000Z.json", run)
    write(folder / "latest.json", run)
    part = SelftestSource(tmp_path).read()
    assert part.error is None and [r.id for r in part.history] == ["a", "b"]
    latest = part.latest
    assert latest is not None and latest.passed is None and latest.ttft_p50_ms is None and latest.ttft_p99_ms == 80
    # The state dir may also be the results folder itself.
    assert SelftestSource(folder).read().latest == latest
    assert SelftestSource(tmp_path / "nothing").read().latest is None


def test_config_source_without_an_install(tmp_path: Path) -> None:
    part = ConfigSource(tmp_path, "box").read()
    assert part.hostname == "box" and part.endpoint is None and part.plan_summary() == "no plan"
    assert part.error is not None and "appliance.yml not found" in part.error
    assert replica_urls(None) == ["http://127.0.0.1:8000"]
    assert replica_urls({"topology": {"replicas": 2}}) == ["http://127.0.0.1:8000", "http://127.0.0.1:8001"]


def test_vllm_process_tree() -> None:
    procs = [
        ProcessInfo(10, 1, "/venv/bin/python -m vllm.entrypoints.openai.api_server --port 8000", 100),
        ProcessInfo(11, 10, "VLLM::EngineCore", 1000),
        ProcessInfo(12, 11, "python -c from multiprocessing.resource_tracker import main", 5),
        ProcessInfo(20, 1, "bash", 1),
    ]
    assert [p.pid for p in find_vllm_processes(procs)] == [10, 11, 12]


def test_memory_source_on_this_machine_reads_host_memory() -> None:
    part = MemorySource().read()
    assert part.error is None and part.hardware is not None and part.hardware.host.total > 0


def test_health_and_ages(tmp_path: Path) -> None:
    assert age_text(timedelta(seconds=42)) == "42 s" and age_text(timedelta(hours=3, minutes=10)) == "3 h 10 min"
    assert short_age(timedelta(days=2, hours=4)) == "2d4h"
    snap = collect(scenario_sources("h100_healthy", tmp_path))
    assert problems(snap, snap.taken_at) == []
    later = problems(snap, snap.taken_at + timedelta(days=2))
    assert [p.severity for p in later] == ["warn"] and "old" in later[0].text


@pytest.mark.parametrize(
    ("name", "code"), [("h100_healthy", 0), ("gateway_down", 1), ("selftest_failed", 1), ("no_selftest_yet", 0)]
)
def test_status_exit_code_and_json(name: str, code: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--json", "--replay", str(FIXTURES / f"{name}.json")]) == code
    doc = json.loads(capsys.readouterr().out)
    assert doc["healthy"] is (code == 0) and set(doc) >= {"memory", "vllm", "gateway", "units", "selftest", "problems"}


def test_status_text_and_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--replay", str(FIXTURES / "gateway_down.json")]) == 1
    out = capsys.readouterr().out
    assert out.startswith("clinic-edge status · clinic-h100") and "UNHEALTHY (2 problems)" in out
    assert main(["status", "--vllm", "127.0.0.1:8000"]) == 2
    assert "not an http(s) URL" in capsys.readouterr().err


def test_status_on_this_machine_exits_1_and_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    argv = ["status", "--etc-dir", str(tmp_path), "--state-dir", str(tmp_path), "--vllm", f"http://127.0.0.1:{port}"]
    assert main([*argv, "--gateway", f"http://127.0.0.1:{port}", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    texts = " | ".join(p["text"] for p in doc["problems"])
    assert "refused" in texts and doc["memory"]["hardware"]["host"]["total"] > 0


def test_memory_source_reprobes_a_missing_driver_only_now_and_then(tmp_path: Path) -> None:
    from appliance.hardware import HardwareSnapshot, HostMemory

    calls = {"probe": 0, "scan": 0}
    now = [0.0]

    def hardware() -> HardwareSnapshot:
        calls["probe"] += 1
        return HardwareSnapshot(gpus=[], host=HostMemory(10, 5), nvml_error="no NVIDIA driver answered")

    def processes() -> list[ProcessInfo]:
        calls["scan"] += 1
        return []

    source = MemorySource(hardware, processes, meminfo=lambda: HostMemory(10, 4), nvml_retry_s=60, clock=lambda: now[0])
    first = source.read()
    now[0] = 30.0
    second = source.read()
    assert calls["probe"] == 1 and second.hardware is not None and second.hardware.host.available == 4
    assert first.hardware is not None and second.hardware.nvml_error == first.hardware.nvml_error
    now[0] = 61.0
    source.read()
    assert calls["probe"] == 2 and calls["scan"] == 3


def test_a_gpu_plan_without_a_gpu_is_unhealthy(tmp_path: Path) -> None:
    scenario = json.loads((FIXTURES / "h100_healthy.json").read_text())
    scenario["nvml"] = {"init_error": "Driver Not Loaded"}
    from appliance.telemetry.replay import replay_sources

    snap = collect(replay_sources(scenario, tmp_path))
    (problem,) = problems(snap, snap.taken_at)
    assert problem.severity == "bad" and "plan is for h100" in problem.text and "Driver Not Loaded" in problem.text


def test_the_planners_real_plan_json_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = Path(__file__).parents[1] / "fixtures" / "model-configs" / "Llama-3.1-8B-Instruct.json"
    argv = ["plan", str(config), "--hardware", "h100", "--gpus", "2", "--weights-gib", "14.99"]
    assert main([*argv, "--write-env", str(tmp_path / "vllm")]) == 0
    capsys.readouterr()
    part = ConfigSource(tmp_path, "box").read()
    assert part.plan_verdict == "fits" and part.replicas == 2 and part.tp == 1 and part.hardware == "h100"
    assert part.max_model_len and part.max_concurrency and part.kv_cache_gib
    from appliance.telemetry.config import read_plan

    assert replica_urls(read_plan(tmp_path)) == ["http://127.0.0.1:8000", "http://127.0.0.1:8001"]
