"""One rule for every request, whatever fails inside: a failure injected at each stage of a request's path ends in a
JSON 500 (or, once the 200 is out, an ended answer), exactly one audit line, the metrics counted, nothing held, no
traceback on the wire and no request content in the log; and the gateway serves the next request normally."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from appliance.gateway import app as app_module
from appliance.gateway.app import Gateway
from appliance.gateway.relay import ConnectionPool, Relay, UpstreamConnection
from tests.unit.gateway.door import Door, chat_body

pytestmark = pytest.mark.asyncio

SECRET = "patient Erika Mustermann, tooth 36"  # in the failing exception's message: must never reach the log


def boom(*_: object, **__: object) -> Any:
    raise RuntimeError(SECRET)


async def _raising(*_: object, **__: object) -> Any:
    raise RuntimeError(SECRET)


def after(n: int, real: Callable[..., Any]) -> Callable[..., Any]:
    """``real`` for the first ``n`` calls, then a failure."""
    calls = [0]

    def wrapped(*args: Any, **kw: Any) -> Any:
        calls[0] += 1
        if calls[0] > n:
            raise RuntimeError(SECRET)
        return real(*args, **kw)

    return wrapped


def inject(stage: str, mp: pytest.MonkeyPatch, gw: Gateway) -> None:
    if stage == "head check":
        mp.setattr(Gateway, "_authenticate", boom)
    elif stage == "validation":
        mp.setattr(app_module, "validate_chat", boom)
    elif stage == "admission wait":
        mp.setattr(gw.admission, "try_acquire", lambda _key: False)
        mp.setattr(gw.admission, "acquire", _raising)
    elif stage == "connect":
        gw.conns.close_all()
        mp.setattr(ConnectionPool, "connect", _raising)
    elif stage == "send":
        mp.setattr(UpstreamConnection, "send", boom)
    elif stage == "upstream head":
        mp.setattr(Relay, "on_headers", boom)
    elif stage == "mid-stream":
        mp.setattr(Relay, "flush", after(1, Relay.flush))  # the first read (with the 200) goes out
    elif stage == "answer complete":
        mp.setattr(Gateway, "_chat_relayed", boom)
    elif stage == "models":
        assert gw.session is not None
        mp.setattr(gw.session, "get", boom)
    else:
        raise AssertionError(stage)


@pytest.mark.parametrize(
    ("stage", "path", "wire"),
    [
        ("head check", "/v1/chat/completions", "json"),
        ("validation", "/v1/chat/completions", "json"),
        ("admission wait", "/v1/chat/completions", "json"),
        ("connect", "/v1/chat/completions", "json"),
        ("send", "/v1/chat/completions", "json"),
        ("upstream head", "/v1/chat/completions", "json"),
        ("mid-stream", "/v1/chat/completions", "cut"),
        ("answer complete", "/v1/chat/completions", "whole"),
        ("models", "/v1/models", "json"),
    ],
)
async def test_a_failure_at_any_stage_is_one_500_one_audit_line_and_nothing_held(
    plain_door: Door, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], stage: str, path: str,
    wire: str,
) -> None:  # fmt: skip
    door, gw = plain_door, plain_door.gateway
    await door.healthy()  # a kept-alive upstream connection exists now (the "send" stage reuses it)
    lines = len(door.audit_lines())
    route = "models" if path == "/v1/models" else "chat"
    before = gw.metrics.requests[(route, 500)], gw.metrics.rejections["internal_error"]
    with monkeypatch.context() as mp:
        inject(stage, mp, gw)
        if path == "/v1/models":
            raw = f"GET /v1/models HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {door.key}\r\n\r\n".encode()
        else:
            raw = door.post(chat_body("hold" if stage == "mid-stream" else "hi", stream=True))
        reader, writer = await door.connect()
        writer.write(raw)
        got = b""
        if stage == "mid-stream":  # the upstream holds after its first events: release it once they arrived
            got = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            door.upstream.gate.set()
        got += await asyncio.wait_for(reader.read(), 10)  # the gateway closes the connection after a failure
        writer.close()
        await door.settle(lines + 1)
    assert b"Traceback" not in got and SECRET.encode() not in got
    if wire == "json":
        assert got.startswith(b"HTTP/1.1 500 "), got[:200]
        assert b'"code":"internal_error"' in got and b"connection: close" in got
    elif wire == "cut":  # the 200 was out: the answer is cut short (its chunked framing never ends)
        assert got.startswith(b"HTTP/1.1 200 ") and not got.endswith(b"0\r\n\r\n"), got[-200:]
    else:  # the failure came after the whole answer was relayed
        assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"), got[-200:]
    record = door.audit_lines()[-1]
    assert (record["route"], record["status"], record["reason"]) == (route, 500, "internal_error")
    assert (gw.metrics.requests[(route, 500)], gw.metrics.rejections["internal_error"]) == (before[0] + 1,
                                                                                           before[1] + 1)  # fmt: skip
    err = capsys.readouterr().err
    assert f"internal error on request {record['request_id']}: RuntimeError" in err or stage == "head check"
    assert "internal error on request" in err and SECRET not in err
    await door.healthy()


async def test_a_failure_while_the_client_leaves_still_ends_the_request(
    plain_door: Door, monkeypatch: pytest.MonkeyPatch
) -> None:
    door = plain_door
    monkeypatch.setattr(Relay, "client_gone", boom)
    reader, writer = await door.connect()
    writer.write(door.post(chat_body("hold", stream=True)))
    await reader.readuntil(b"\r\n\r\n")
    writer.close()
    await door.settle(1)
    assert door.audit_lines()[-1]["reason"] == "internal_error"
    for _ in range(200):
        if door.upstream.aborted:
            break
        await asyncio.sleep(0.01)
    assert door.upstream.aborted == 1  # vLLM's connection was closed all the same
    door.upstream.gate.set()
    monkeypatch.undo()
    await door.healthy()


async def test_idle_upstream_connections_past_their_keepalive_are_closed() -> None:
    # After a burst of streams, their idle connections to vLLM must not hold sockets until vLLM's own timeout.
    class Transport:
        closed = False

        def close(self) -> None:
            self.closed = True

    pool = ConnectionPool(connect_timeout=1.0, keepalive=2.0)
    old, fresh = UpstreamConnection("u"), UpstreamConnection("u")
    now = time.monotonic()
    for conn, idle in ((old, 3.0), (fresh, 0.5)):
        conn.transport = Transport()  # type: ignore[assignment]
        conn.reusable = True
        pool.release(conn)
        conn.idle_since = now - idle
    pool.close_expired(now)
    assert old.transport.closed and not fresh.transport.closed  # type: ignore[union-attr]
    assert pool.take_idle("u") is fresh


async def test_a_failure_in_the_stall_watchdog_ends_that_request(
    plain_door: Door, monkeypatch: pytest.MonkeyPatch
) -> None:
    door, gw = plain_door, plain_door.gateway
    reader, writer = await door.connect()
    writer.write(door.post(chat_body("hold", stream=True)))
    await reader.readuntil(b"\r\n\r\n")
    monkeypatch.setattr(Relay, "check_timeouts", boom)
    gw._check_stalls(time.monotonic(), 1.0)  # what the watchdog does every few seconds
    assert await asyncio.wait_for(reader.read(), 5)  # the rest, then the close
    writer.close()
    await door.settle(1)
    assert (door.audit_lines()[-1]["status"], door.audit_lines()[-1]["reason"]) == (500, "internal_error")
    door.upstream.gate.set()
    monkeypatch.undo()
    await door.healthy()
