"""ManagedProcess: a child and everything it spawns are gone after stop(), after a signal to us, after an error and
after our own death. The children are real processes (Python sleeping, with a grandchild); so are the signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from appliance.processes import KILL_WAIT_S, Interrupted, ManagedProcess

# A child that starts a grandchild (in its group, or in a new session with "setsid"), writes both pids, and sleeps.
# The grandchild takes 0.5 s to stop: by then the child is gone and the grandchild has a new parent (init).
PARENT_OF_ONE = """
import os, subprocess, sys, time
SLOW_TO_STOP = (
    "import signal, sys, time; signal.signal(15, lambda *_: (time.sleep(0.5), sys.exit(0))); "
    "print('ready', flush=True); time.sleep(300)"
)
grandchild = subprocess.Popen(
    [sys.executable, "-c", SLOW_TO_STOP], stdout=subprocess.PIPE, start_new_session=sys.argv[2] == "setsid"
)
grandchild.stdout.readline()  # its handler is in place
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {grandchild.pid}")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(300)
"""
IGNORES_SIGTERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); " \
    "time.sleep(300)"  # fmt: skip


def alive(pid: int) -> bool:
    """Running, sleeping or stopped — not gone and not a zombie (which holds no memory or port)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_pids(record: Path, timeout: float = 10.0) -> list[int]:
    """The pids a child wrote to ``record``."""
    deadline = time.monotonic() + timeout
    while not record.exists():
        assert time.monotonic() < deadline, "the child did not start"
        time.sleep(0.01)
    return [int(p) for p in record.read_text().split()]


@pytest.fixture
def family(tmp_path: Path) -> Iterator[tuple[list[str], Path]]:
    """The argv of a child with a grandchild, and where it writes their pids; nothing of it survives the test."""
    record = tmp_path / "pids"
    yield [sys.executable, "-c", PARENT_OF_ONE, str(record), "same-group"], record
    if record.exists():
        for pid in wait_pids(record):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_stop_ends_the_child_and_its_grandchild(family: tuple[list[str], Path]) -> None:
    argv, record = family
    proc = ManagedProcess(argv, grace=5)
    proc.start()
    child, grandchild = wait_pids(record)
    assert proc.tree_pids() == {child, grandchild}
    assert os.getpgid(child) == child and os.getpgid(grandchild) == child, "the child leads the tree's group"
    assert os.getsid(child) == os.getsid(0), "in our session (a new one is a new scheduler autogroup)"
    started = time.monotonic()
    assert proc.stop() == -signal.SIGTERM
    assert time.monotonic() - started < 2
    assert not alive(child) and not alive(grandchild)
    assert proc.tree_pids() == set()
    assert proc.stop() == -signal.SIGTERM, "a second stop() is harmless"


def test_a_grandchild_that_left_the_group_is_stopped_too(tmp_path: Path) -> None:
    record = tmp_path / "pids"
    with ManagedProcess([sys.executable, "-c", PARENT_OF_ONE, str(record), "setsid"], grace=5) as proc:
        child, grandchild = wait_pids(record)
        assert os.getpgid(grandchild) != child
        assert proc.tree_pids() == {child, grandchild}
    assert not alive(child) and not alive(grandchild)


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace() -> None:
    with ManagedProcess([sys.executable, "-c", IGNORES_SIGTERM], stdout=subprocess.PIPE, text=True, grace=0.5) as proc:
        assert proc.popen.stdout is not None and proc.popen.stdout.readline() == "ready\n"
        started = time.monotonic()
        assert proc.stop() == -signal.SIGKILL
        assert 0.5 <= time.monotonic() - started < 0.5 + KILL_WAIT_S
        proc.popen.stdout.close()
    assert not alive(proc.popen.pid)


def test_an_error_in_the_with_block_stops_the_tree_and_restores_the_handlers(family: tuple[list[str], Path]) -> None:
    argv, record = family
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    with pytest.raises(ValueError, match="the command failed"), ManagedProcess(argv) as proc:
        pids = wait_pids(record)
        assert signal.getsignal(signal.SIGTERM) != before[signal.SIGTERM], "our handler is in place while it runs"
        raise ValueError("the command failed")
    assert not any(alive(pid) for pid in pids)
    assert proc.popen.returncode == -signal.SIGTERM
    assert {sig: signal.getsignal(sig) for sig in before} == before


@pytest.mark.parametrize(("sig", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_a_signal_to_us_raises_interrupted_after_which_the_tree_is_gone(
    family: tuple[list[str], Path], sig: signal.Signals, exit_code: int
) -> None:
    argv, record = family
    before = signal.getsignal(sig)
    with pytest.raises(Interrupted) as caught, ManagedProcess(argv):
        pids = wait_pids(record)
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler raises before this returns
    assert caught.value.signum == sig and caught.value.exit_code == exit_code
    assert isinstance(caught.value, KeyboardInterrupt), "code that cleans up on Ctrl-C cleans up on SIGTERM too"
    assert not any(alive(pid) for pid in pids)
    assert signal.getsignal(sig) == before


def test_a_second_signal_skips_the_rest_of_the_grace() -> None:
    proc = ManagedProcess([sys.executable, "-c", IGNORES_SIGTERM], stdout=subprocess.PIPE, text=True, grace=60)
    started = 0.0
    with pytest.raises(Interrupted), proc:
        assert proc.popen.stdout is not None and proc.popen.stdout.readline() == "ready\n"
        # The first SIGTERM starts a graceful stop the child ignores; the second, 0.3 s into it, cuts it short.
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        started = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
    assert time.monotonic() - started < 0.3 + KILL_WAIT_S
    assert proc.popen.returncode == -signal.SIGKILL
    assert proc.popen.stdout is not None
    proc.popen.stdout.close()


def test_the_handlers_stay_until_the_last_child_is_stopped() -> None:
    before = signal.getsignal(signal.SIGTERM)
    sleeper = [sys.executable, "-c", "import time; time.sleep(300)"]
    with ManagedProcess(sleeper) as outer:
        with ManagedProcess(sleeper):
            ours = signal.getsignal(signal.SIGTERM)
            assert ours != before
        assert signal.getsignal(signal.SIGTERM) == ours, "the outer child still runs"
        assert outer.poll() is None
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_child_started_from_another_thread_leaves_the_handlers_alone(family: tuple[list[str], Path]) -> None:
    argv, record = family
    before = signal.getsignal(signal.SIGTERM)
    seen: list[object] = []

    def run() -> None:
        with ManagedProcess(argv):
            wait_pids(record)
            seen.append(signal.getsignal(signal.SIGTERM))

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(30)
    assert seen == [before]
    assert not any(alive(pid) for pid in wait_pids(record))


def test_a_program_that_cannot_start_raises_and_leaves_the_handlers_alone(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(FileNotFoundError):
        ManagedProcess([str(tmp_path / "no-such-program")]).start()
    assert signal.getsignal(signal.SIGTERM) == before


# The parent as a command is: start a child with a grandchild, print their pids, wait; exit 128 + signal on one.
COMMAND = """
import sys
from appliance.processes import Interrupted, ManagedProcess
try:
    with ManagedProcess([sys.executable, "-c", sys.argv[1], sys.argv[2], "same-group"], grace=5) as proc:
        proc.wait()
except Interrupted as exc:
    sys.exit(exc.exit_code)
"""


def start_command(record: Path) -> subprocess.Popen[bytes]:
    """``COMMAND`` as a real process (in this test's process group, as a shell would start it) once its tree runs."""
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root}
    command = subprocess.Popen([sys.executable, "-c", COMMAND, PARENT_OF_ONE, str(record)], env=env)
    wait_pids(record)
    return command


@pytest.mark.parametrize(("sig", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_a_command_signalled_alone_stops_its_tree_and_exits_128_plus_the_signal(
    tmp_path: Path, sig: signal.Signals, exit_code: int
) -> None:
    record = tmp_path / "pids"
    command = start_command(record)
    try:
        pids = wait_pids(record)
        started = time.monotonic()
        os.kill(command.pid, sig)  # the parent alone, as a process manager or `kill PID` does
        assert command.wait(timeout=10) == exit_code
        assert time.monotonic() - started < 2
        assert not any(alive(pid) for pid in pids)
    finally:
        command.kill()
        command.wait()


def test_a_command_killed_outright_still_takes_its_child_down(tmp_path: Path) -> None:
    """SIGKILL runs no handler: PR_SET_PDEATHSIG tells the child, which here has no handler of its own."""
    record = tmp_path / "pids"
    command = start_command(record)
    child, grandchild = wait_pids(record)
    try:
        os.kill(command.pid, signal.SIGKILL)
        command.wait(timeout=10)
        deadline = time.monotonic() + 5
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not alive(child)
    finally:
        # What the child spawned is the child's to stop (vLLM stops its engine core on SIGTERM); this one does not.
        for pid in (child, grandchild):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
