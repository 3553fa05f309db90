"""Child processes that never outlive the command that started them — the one place clinic-edge starts and stops them.

Every command and test helper that runs a program for longer than a call goes through :class:`ManagedProcess`:

* The child leads its own process group, in the caller's session (a new session is a new scheduler autogroup; see
  :mod:`appliance.vllm_server`), so one signal reaches everything it spawns.
* :meth:`ManagedProcess.stop` ends the whole tree: SIGTERM to the group and to any descendant that left it, SIGKILL
  to whatever is left after ``grace`` seconds, and it returns only once no process of the tree is left.
* While a child started from the main thread runs, SIGTERM, SIGINT and SIGHUP raise :class:`Interrupted` there:
  ``with`` blocks unwind and stop their children, and the CLI exits 128 + the signal's number (143, 130, 129). A
  second signal during the stop skips the rest of the grace period. The previous handlers come back with the last
  child.
* ``PR_SET_PDEATHSIG`` sends the child SIGTERM when the thread that started it dies without unwinding (SIGKILL, a
  crash), so even then the child is told to stop; what it spawned is then its own to stop (vLLM stops its engine
  core on SIGTERM).

Linux only: the process tree is read from ``/proc``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

__all__ = ["GRACE_S", "HANDLED_SIGNALS", "KILL_WAIT_S", "Interrupted", "ManagedProcess"]

GRACE_S = 10.0  # default time between SIGTERM and SIGKILL
KILL_WAIT_S = 5.0  # after SIGKILL only the kernel's clean-up is left; longer means a process stuck in the kernel
POLL_S = 0.02
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1

Stream = int | IO[Any] | None


class Interrupted(KeyboardInterrupt):
    """A signal (SIGTERM, SIGINT or SIGHUP) arrived while a managed child ran; ``exit_code`` is 128 + its number.

    A :class:`KeyboardInterrupt`, so code that already cleans up on Ctrl-C cleans up on SIGTERM and SIGHUP too.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


class ManagedProcess:
    """A child process in its own process group whose whole tree :meth:`stop` ends; use it as a context manager.

    ``grace`` is the time between SIGTERM and SIGKILL. ``parent_death_signal`` (default SIGTERM; None for none) is
    what the child gets when the thread that started it dies, so start it from a thread that outlives it.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str = "",
        stdin: Stream = subprocess.DEVNULL,
        stdout: Stream = None,
        stderr: Stream = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        text: bool = False,
        grace: float = GRACE_S,
        parent_death_signal: int | None = signal.SIGTERM,
    ) -> None:
        self.argv = list(argv)
        self.name = name or Path(self.argv[0]).name
        self.grace = grace
        self._popen_args: dict[str, Any] = {"stdin": stdin, "stdout": stdout, "stderr": stderr, "text": text}
        self._popen_args.update(env=dict(env) if env is not None else None, cwd=cwd)
        self.parent_death_signal = parent_death_signal
        self._popen: subprocess.Popen[Any] | None = None
        self._owner = False  # whether this child holds the main thread's signal handlers
        self._stopped = False  # stop() released the signal handlers
        self._ended = False  # stop() saw the whole tree gone

    @property
    def popen(self) -> subprocess.Popen[Any]:
        """The running child's :class:`subprocess.Popen` (its pipes, ``poll()``, ``wait()``)."""
        if self._popen is None:
            raise RuntimeError(f"{self.name} was not started; call start() first")
        return self._popen

    @property
    def pid(self) -> int | None:
        """The child's process id (also its process group's id) once started."""
        return self._popen.pid if self._popen is not None else None

    def start(self) -> subprocess.Popen[Any]:
        """Start the child; from the main thread, SIGTERM/SIGINT/SIGHUP now raise :class:`Interrupted` until
        :meth:`stop`. Raises :class:`OSError` when the program cannot be started."""
        if self._popen is not None:
            raise RuntimeError(f"{self.name} was already started")
        # A signal between the fork and the bookkeeping would leave a child nobody stops: hold it until both are done.
        with _deferred_signals():
            self._owner = _SIGNALS.acquire()
            try:
                # The only way to set PDEATHSIG in the child; it runs prctl and getppid, no imports and no locks.
                preexec = self._preexec()
                self._popen = subprocess.Popen(
                    self.argv,
                    process_group=0,
                    preexec_fn=preexec,  # noqa: PLW1509
                    **self._popen_args,
                )
            except BaseException:
                self._release()
                raise
        if _SIGNALS.has_pending():
            self.stop()  # raises Interrupted once the child is gone
        return self._popen

    def poll(self) -> int | None:
        """The child's exit code, or None while it runs."""
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        """Block until the child exits (the tree may outlive it: :meth:`stop` ends that); return its exit code."""
        return self.popen.wait(timeout)

    def tree_pids(self) -> set[int]:
        """The living processes of the child's tree: its process group and their descendants (zombies left out:
        they hold no memory or port)."""
        return {p.pid for p in _living(self.popen, set())} if not self._ended else set()

    def stop(self, grace: float | None = None) -> int | None:
        """End the child and everything it spawned: SIGTERM, then SIGKILL after ``grace`` seconds (default: the
        constructor's). Returns the child's exit code (negative: the signal that ended it), or None if never started.
        Safe to call again, and from another thread than the one that started it."""
        popen = self._popen
        if popen is None:
            return None
        grace = self.grace if grace is None else grace
        try:
            with _deferred_signals():
                self._end_tree(popen, grace)
        finally:
            self._release()
        return popen.returncode

    def __enter__(self) -> ManagedProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _end_tree(self, popen: subprocess.Popen[Any], grace: float) -> None:
        if self._ended:
            return
        pgid = popen.pid
        tree = _living(popen, set())
        if tree:
            _send(pgid, tree, signal.SIGTERM)
            tree = _wait_gone(popen, tree, grace)
        if tree:
            _send(pgid, tree, signal.SIGKILL)
            tree = _wait_gone(popen, tree, KILL_WAIT_S, forced=True)
        popen.poll()  # reap the leader whatever happened, so it is not left a zombie
        if tree:
            pids = ",".join(str(p.pid) for p in sorted(tree, key=lambda p: p.pid))
            sys.stderr.write(
                f"clinic-edge: processes {pids} of {self.name} are still there {KILL_WAIT_S:.0f} s after SIGKILL "
                f"(stuck in the kernel?); look at them with: ps -o pid,stat,wchan,cmd -p {pids}\n"
            )
        else:
            self._ended = True  # from now on the pid may belong to someone else: never signal it again

    def _preexec(self) -> Callable[[], None] | None:
        if self.parent_death_signal is None:
            return None
        sig, parent = int(self.parent_death_signal), os.getpid()
        prctl = _libc().prctl  # looked up before the fork: the child runs only what it must

        def set_parent_death_signal() -> None:
            prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
            if os.getppid() != parent:  # the parent died before prctl took effect: nobody would tell us
                os.kill(os.getpid(), sig)

        return set_parent_death_signal

    def _release(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        pending = _SIGNALS.stop_done()
        _SIGNALS.release(self._owner)
        if pending is not None:
            raise Interrupted(pending)


# --- the process tree, from /proc ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Proc:
    pid: int
    started: int  # clock ticks after boot: tells a process from a later one that reuses its pid
    # Not part of its identity: an orphan's parent becomes init, and a process may change its group.
    ppid: int = field(compare=False)
    pgid: int = field(compare=False)


def _table() -> dict[int, _Proc]:
    procs: dict[int, _Proc] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        # The command name (2nd field) may hold spaces and parentheses; the fields after its last ')' do not.
        fields = stat[stat.rindex(b")") + 2 :].split()
        if fields[0] in (b"Z", b"X"):
            continue
        procs[int(entry)] = _Proc(int(entry), int(fields[19]), ppid=int(fields[1]), pgid=int(fields[2]))
    return procs


def _living(popen: subprocess.Popen[Any], known: set[_Proc]) -> set[_Proc]:
    """The child's group, its descendants and theirs, and those of ``known`` still alive (zombies left out)."""
    pgid, table = popen.pid, _table()
    children: dict[int, list[_Proc]] = {}
    for proc in table.values():
        children.setdefault(proc.ppid, []).append(proc)
    found = {p for p in table.values() if p.pgid == pgid} | {table[p.pid] for p in known if table.get(p.pid) == p}
    # The leader's pid is its own until it is reaped (and, as a group id, while the group has members).
    stack = [p.pid for p in found] + ([pgid] if popen.returncode is None else [])
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child.pid)
    return found


def _send(pgid: int, tree: set[_Proc], sig: signal.Signals) -> None:
    # Gone meanwhile (ProcessLookupError) is what we want; PermissionError: a pid just reused by another user.
    if any(p.pgid == pgid for p in tree):  # an empty group's id is free for the kernel to hand out again
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
    for proc in tree:
        if proc.pgid != pgid:  # left the group (setsid, setpgid): reached one by one
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(proc.pid, sig)


def _wait_gone(popen: subprocess.Popen[Any], tree: set[_Proc], timeout: float, *, forced: bool = False) -> set[_Proc]:
    deadline = time.monotonic() + timeout
    while True:
        popen.poll()  # reap the leader as soon as it exits
        tree = _living(popen, tree)
        if not tree or time.monotonic() >= deadline or (not forced and _SIGNALS.force):
            return tree
        time.sleep(POLL_S)


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC  # noqa: PLW0603 - loaded once, on first use, not at import (the CLI imports this module)
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        # prctl's options are unsigned longs: without a prototype ctypes would pass ints, their high bits undefined.
        _LIBC.prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]
        _LIBC.prctl.restype = ctypes.c_int
    return _LIBC


# --- signals -------------------------------------------------------------------------------------------------------


class _SignalHandlers:
    """The main thread's SIGTERM/SIGINT/SIGHUP handlers while it has managed children, and what arrived."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._owners = 0  # children started from the main thread and not yet stopped
        self._saved: dict[int, Any] = {}
        self.deferring = 0  # > 0: inside start()/stop(), where a signal is noted instead of raised
        self.raised = False  # Interrupted was raised: later signals only hurry the stop
        self.pending: int | None = None
        self.force = False  # a signal arrived while stopping: skip the rest of the grace period

    def acquire(self) -> bool:
        """Count a new child; the first one from the main thread installs the handlers. True if it counts."""
        if not _in_main_thread():  # signal.signal() works only there
            return False
        with self._lock:
            if self._owners == 0:
                self._saved = {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS}
                for sig in HANDLED_SIGNALS:
                    signal.signal(sig, self._on_signal)
            self._owners += 1
        return True

    def release(self, owner: bool) -> None:
        """Uncount a stopped child; the last one puts the previous handlers back."""
        if not owner:
            return
        with self._lock:
            self._owners -= 1
            if self._owners == 0:
                for sig, handler in self._saved.items():
                    signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
                self._saved = {}
                self.raised, self.pending, self.force = False, None, False

    def has_pending(self) -> bool:
        """Whether a signal waits to be raised (only the main thread raises it)."""
        return self.pending is not None and self.deferring == 0 and _in_main_thread()

    def stop_done(self) -> int | None:
        """A stop is over: forget the signal that caused it (the next one is a new request), and return one that
        arrived meanwhile, for the caller to raise now (main thread only)."""
        if self.deferring or not _in_main_thread():
            return None
        pending, self.pending, self.force = self.pending, None, False
        self.raised = pending is not None
        return pending

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.raised or self.pending is not None:
            self.force = True  # a second signal: whoever is stopping stops hard
            return
        if self.deferring:
            self.pending = signum
            return
        self.raised = True
        raise Interrupted(signum)


_SIGNALS = _SignalHandlers()


class _deferred_signals:  # noqa: N801 - used as a statement, like contextlib's lower-case managers
    def __enter__(self) -> None:
        if _in_main_thread():
            _SIGNALS.deferring += 1

    def __exit__(self, *exc: object) -> None:
        if _in_main_thread():
            _SIGNALS.deferring -= 1


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
