"""The dashboard with Pilot: state and keys first, then an SVG snapshot per recorded scenario."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import DataTable

from appliance.commands.dashboard import selftest_argv
from appliance.telemetry.parts import GatewayPart
from tests.dashboard_support import SCENARIOS, SIZE, assert_snapshot, plain, scenario_sources
from tui.app import DashboardApp, DashboardSettings
from tui.screens.help import HelpScreen
from tui.screens.journal import JournalScreen
from tui.screens.main import MainScreen
from tui.widgets.memory_panel import MemoryPanel
from tui.widgets.selftest_panel import SelftestPanel
from tui.widgets.services_panel import ServicesPanel
from tui.widgets.top_bar import TopBar

EXPECTED_SCENARIOS = {
    "gateway_down",
    "gb10_unified",
    "h100_healthy",
    "no_gpu",
    "no_selftest_yet",
    "selftest_failed",
    "two_gpus_two_replicas",
}


def make_app(name: str, tmp_path: Path, **settings: Any) -> DashboardApp:
    return DashboardApp(DashboardSettings(sources=scenario_sources(name, tmp_path), refresh=60, **settings))


async def settle(app: DashboardApp, pilot: Any) -> MainScreen:
    await pilot.pause()
    await app.workers.wait_for_complete()
    await pilot.pause()
    return app.main_screen


def test_all_seven_scenarios_are_recorded() -> None:
    assert set(SCENARIOS) == EXPECTED_SCENARIOS


@pytest.mark.asyncio
@pytest.mark.parametrize("name", sorted(EXPECTED_SCENARIOS))
async def test_snapshot(name: str) -> None:
    # A fixed folder: the no-self-test screen names it, and the snapshot must not change from run to run.
    root = Path("/tmp/clinic-edge-dashboard-snapshots") / name
    shutil.rmtree(root, ignore_errors=True)
    app = make_app(name, root)
    async with app.run_test(size=SIZE) as pilot:
        screen = await settle(app, pilot)
        assert screen.snapshot() is not None, "every source answered"
        assert_snapshot(app.export_screenshot(), name)


@pytest.mark.asyncio
async def test_h100_healthy_state(tmp_path: Path) -> None:
    app = make_app("h100_healthy", tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        screen = await settle(app, pilot)
        assert screen.query_one(TopBar).problems == []
        memory = plain(screen.query_one(MemoryPanel).content)
        assert "71.4 GiB / 79.6 GiB" in memory and "vLLM holds 70.8 GiB" in memory
        assert "KV" in memory and "41 %" in memory and "running 3" in memory


@pytest.mark.asyncio
async def test_two_gpus_two_replicas_state(tmp_path: Path) -> None:
    app = make_app("two_gpus_two_replicas", tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        screen = await settle(app, pilot)
        memory = plain(screen.query_one(MemoryPanel).content)
        assert "GPU 0" in memory and "GPU 1" in memory and ":8001" in memory and "61 %" in memory
        assert screen.query_one("#units", DataTable).row_count == 5


@pytest.mark.asyncio
async def test_gb10_shows_unified_memory_and_na(tmp_path: Path) -> None:
    app = make_app("gb10_unified", tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        screen = await settle(app, pilot)
        memory = plain(screen.query_one(MemoryPanel).content)
        assert "unified memory" in memory and "util N/A" in memory
        assert "122.4 GiB" in memory and "vLLM holds 88.4 GiB" in memory
        problems = screen.query_one(TopBar).problems or []
        assert [p.severity for p in problems] == ["warn"] and "old" in problems[0].text
        assert "last run is 3 d 2 h old" in plain(screen.query_one(SelftestPanel).content)


@pytest.mark.asyncio
async def test_no_gpu_says_so(tmp_path: Path) -> None:
    app = make_app("no_gpu", tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        screen = await settle(app, pilot)
        memory = plain(screen.query_one(MemoryPanel).content)
        assert "No NVIDIA GPU" in memory and "NVML Shared Library Not Found" in memory


@pytest.mark.asyncio
async def test_gateway_down_is_unhealthy_and_journal_key(tmp_path: Path) -> None:
    app = make_app("gateway_down", tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        screen = await settle(app, pilot)
        bad = [p.text for p in screen.query_one(TopBar).problems or [] if p.severity == "bad"]
        assert any("gateway.service is failed" in t for t in bad) and any("/readyz" in t for t in bad)
        assert isinstance(screen.parts["gateway"], GatewayPart) and screen.parts["gateway"].ready is False
        await pilot.press("down", "j")  # select the gateway's row, open its journal
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert isinstance(app.screen, JournalScreen) and app.screen.unit == "clinic-edge-gateway.service"
        assert app.screen.result is not None and "keys.json" in "\n".join(app.screen.result.lines)
        await pilot.press("escape")
        assert app.screen is screen


@pytest.mark.asyncio
async def test_selftest_failed_and_never_run(tmp_path: Path) -> None:
    app = make_app("selftest_failed", tmp_path / "a")
    async with app.run_test(size=SIZE) as pilot:
        screen = await settle(app, pilot)
        text = plain(screen.query_one(SelftestPanel).content)
        assert "FAILED" in text and "412 ms" in text
        assert "97 %" in plain(screen.query_one(MemoryPanel).content), "the older gpu_cache_usage_perc gauge is read"
    app = make_app("no_selftest_yet", tmp_path / "b")
    async with app.run_test(size=SIZE) as pilot:
        screen = await settle(app, pilot)
        assert "No self-test yet" in plain(screen.query_one(SelftestPanel).content)


@pytest.mark.asyncio
async def test_help_and_quit_keys(tmp_path: Path) -> None:
    app = make_app("h100_healthy", tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)
        await pilot.press("q")
        await pilot.pause()
    assert app.return_code == 0


@pytest.mark.asyncio
async def test_systemd_missing_is_reported_and_the_rest_works(tmp_path: Path) -> None:
    sources = scenario_sources("h100_healthy", tmp_path)
    # What systemctl says in a container without systemd as PID 1 (this machine's real answer).
    not_pid1 = "System has not been booted with systemd as init system (PID 1). Can't operate."
    sources.units._run = lambda argv: __import__("appliance.telemetry.systemd").telemetry.systemd.CommandResult(  # type: ignore[attr-defined]
        1, "", not_pid1 + "\nFailed to connect to bus: Host is down\n"
    )
    app = DashboardApp(DashboardSettings(sources=sources, refresh=60))
    async with app.run_test(size=SIZE) as pilot:
        screen = await settle(app, pilot)
        assert screen.parts["units"].error == f"systemctl: {not_pid1}"
        assert not_pid1 in plain(screen.query_one("#units-error").content)  # type: ignore[attr-defined]
        assert "71.4 GiB" in plain(screen.query_one(MemoryPanel).content)
        await pilot.press("j")
        await pilot.pause()
        assert isinstance(app.screen, MainScreen), "no unit to show: a notification, not a crash"


@pytest.mark.asyncio
async def test_a_source_that_raises_shows_why(tmp_path: Path) -> None:
    sources = scenario_sources("h100_healthy", tmp_path)

    class Broken:
        name = "memory"

        def read(self) -> Any:
            raise RuntimeError("driver exploded")

    sources.memory = Broken()
    app = DashboardApp(DashboardSettings(sources=sources, refresh=60))
    async with app.run_test(size=SIZE) as pilot:
        screen = await settle(app, pilot)
        assert "driver exploded" in plain(screen.query_one(MemoryPanel).content)
        assert screen.query_one(ServicesPanel).units is not None and screen.parts["selftest"].latest is not None


FAKE_SELFTEST = """
import json, sys, pathlib, time
args = sys.argv[1:]
state = pathlib.Path(args[args.index("--state-dir") + 1])  # the results folder itself, as the real selftest
print("warming up", file=sys.stderr, flush=True)
time.sleep(0.2)
print("request 8/8", file=sys.stderr, flush=True)
doc = {"schema": 1, "id": "fake", "started_at": "2026-11-23T07:59:30+00:00", "finished_at": "2026-11-23T07:59:59+00:00",
       "mode": "quick", "verdict": {"passed": %s, "reason": "TTFT p99 12 ms within the 100 ms SLO"},
       "summary": {"ttft_ms": {"p50": 7.0, "p99": 12.0}}}
state.mkdir(parents=True, exist_ok=True)
(state / "latest.json").write_text(json.dumps(doc))
print(json.dumps(doc))
sys.exit(%d)
"""


@pytest.mark.asyncio
@pytest.mark.parametrize("passed", [True, False])
async def test_run_quick_selftest_key(tmp_path: Path, passed: bool) -> None:
    script = tmp_path / "fake_selftest.py"
    script.write_text(FAKE_SELFTEST % (passed, 0 if passed else 1))
    argv = selftest_argv([sys.executable, str(script)], "http://127.0.0.1:8000", tmp_path / "replay" / "state", None)
    assert argv[-2:] == ["--state-dir", str(tmp_path / "replay" / "state" / "selftest")]
    app = DashboardApp(
        DashboardSettings(
            sources=scenario_sources("no_selftest_yet", tmp_path / "replay"), refresh=60, selftest_argv=argv
        )
    )
    async with app.run_test(size=SIZE) as pilot:
        screen = await settle(app, pilot)
        assert screen.parts["selftest"].latest is None
        await pilot.press("t")
        await pilot.pause()
        assert screen.selftest_job is not None and screen.query_one(SelftestPanel).progress is not None
        await pilot.press("t")  # a second press while running does not start another
        for _ in range(100):
            await pilot.pause(0.05)
            if screen.selftest_outcome is not None:
                break
        await app.workers.wait_for_complete()
        await pilot.pause()
        outcome = screen.selftest_outcome
        assert outcome is not None and outcome.passed is passed
        assert ("passed" if passed else "failed") in outcome.summary and "TTFT p99 12 ms" in outcome.summary
        assert screen.query_one(SelftestPanel).progress is None
        latest = screen.parts["selftest"].latest
        assert latest is not None and latest.id == "fake" and latest.ttft_p99_ms == 12.0
        assert json.loads((tmp_path / "replay" / "state" / "selftest" / "latest.json").read_text())["id"] == "fake"


@pytest.mark.asyncio
async def test_refresh_key_and_timer_read_again(tmp_path: Path) -> None:
    sources = scenario_sources("h100_healthy", tmp_path)
    reads = {"n": 0}
    inner = sources.selftest

    class Counting:
        name = "selftest"

        def read(self) -> Any:
            reads["n"] += 1
            return inner.read()

    sources.selftest = Counting()
    app = DashboardApp(DashboardSettings(sources=sources, refresh=60))
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        before = reads["n"]
        assert before >= 1
        await pilot.press("r")
        await settle(app, pilot)
        assert reads["n"] == before + 1
    app = DashboardApp(DashboardSettings(sources=sources, refresh=0.2))
    async with app.run_test(size=SIZE) as pilot:
        for _ in range(50):  # bounded: at most ~5 s on a loaded machine
            await pilot.pause(0.1)
            if reads["n"] >= before + 4:
                break
        await settle(app, pilot)
        assert reads["n"] >= before + 4, "the timer refreshes every 0.2 s"


def test_dashboard_cli_rejects_a_too_fast_refresh(capsys: pytest.CaptureFixture[str]) -> None:
    from appliance.cli import main

    assert main(["dashboard", "--refresh", "0.01"]) == 2
    assert "too fast" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["dashboard", "--help"])
    assert "Example: clinic-edge dashboard" in capsys.readouterr().out
