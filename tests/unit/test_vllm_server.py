"""How VllmServer places vLLM among processes: its own process group (stop() must take the engine core with it) but
the caller's session (a new session is a new scheduler autogroup, and vLLM's spinning engine core then starved the
caller's clients on a 2-core box). A stand-in script takes vLLM's place; the processes and signals are real."""

from __future__ import annotations

import os
import time
from pathlib import Path

from appliance.vllm_server import VllmLaunch, VllmServer

# Started as `<python> -m vllm... --model ...`: ignores its arguments, starts a child (the "engine core") in the same
# group, records both pids, and waits.
STAND_IN = """#!/bin/sh
sleep 300 &
echo "$$ $!" > "{record}"
wait
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child of a living parent stays a zombie until reaped: dead for our purpose.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _started(record: Path) -> tuple[int, int]:
    deadline = time.monotonic() + 10
    while not record.exists() or not record.read_text().strip():
        assert time.monotonic() < deadline, "the stand-in server did not start"
        time.sleep(0.02)
    leader, child = record.read_text().split()
    return int(leader), int(child)


def test_server_gets_its_own_group_in_the_callers_session_and_stop_ends_the_group(tmp_path: Path) -> None:
    record = tmp_path / "pids"
    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN.format(record=record))
    stand_in.chmod(0o755)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    server = VllmServer(VllmLaunch(model=tmp_path / "model", served_model_name="m", port=1, python=stand_in),
                        tmp_path / "vllm.log")  # fmt: skip
    server.start()
    try:
        leader, child = _started(record)
        assert leader == server.pid
        assert os.getpgid(leader) == leader, "vLLM must lead its own process group"
        assert os.getpgid(child) == leader, "the engine core must be in vLLM's group"
        assert os.getsid(leader) == os.getsid(0), "vLLM must stay in the caller's session (scheduler autogroup)"
    finally:
        server.stop(grace=5)
    assert not _alive(leader) and not _alive(child)
