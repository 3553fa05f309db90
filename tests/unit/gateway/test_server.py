"""The gateway's HTTP server and relay in-process, against a scripted SSE upstream (fast; vLLM itself is in the
integration tier): byte-exact relay, upstream death mid-stream, client disconnect, routes, retries over replicas."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from appliance.gateway.config import GatewayConfig
from appliance.keys import add_key
from appliance.wire import SSEParser, classify
from tests.conftest import free_port
from tests.unit.gateway.conftest import start_gateway

pytestmark = pytest.mark.asyncio

EVENTS = [
    b'{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}',
    *[b'{"choices":[{"index":0,"delta":{"content":"t%d "}}]}' % i for i in range(20)],
    b'{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":20,"total_tokens":27}}',
]


@dataclass
class Script:
    """What the fake upstream saw."""

    requests: list[dict[str, object]] = field(default_factory=list)
    aborted: int = 0


async def _upstream(script: Script, port: int) -> web.AppRunner:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        script.requests.append(body)
        if body.get("model") == "unknown":
            return web.json_response({"error": {"message": "model not found", "code": 404}}, status=404)
        if body.get("model") == "slow":
            await asyncio.sleep(5)
        if not body.get("stream"):
            return web.json_response({"choices": [{"message": {"content": "ok"}}], "usage": {"prompt_tokens": 3,
                                      "completion_tokens": 1}})  # fmt: skip
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        die = "die" in json.dumps(body)
        hang = "hang" in json.dumps(body)
        try:
            for i, event in enumerate(EVENTS):
                await resp.write(b"data: " + event + b"\n\n")
                if die and i == 3:
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                if hang and i == 3:
                    await asyncio.sleep(30)  # a hung engine: the connection stays open, nothing more comes
                await asyncio.sleep(0.01)
            if "split-done" in json.dumps(body):  # [DONE] in two HTTP chunks, two reads apart
                await resp.write(b"data: [DO")
                await asyncio.sleep(0.02)
                await resp.write(b"NE]\n\n")
            else:
                await resp.write(b"data: [DONE]\n\n")
            if "cut-after-done" in json.dumps(body):  # the connection drops before the closing empty chunk
                await asyncio.sleep(0.05)  # once the gateway has read [DONE]: a reset can discard unread bytes
                assert request.transport is not None
                request.transport.abort()
                return resp
            if "linger" in json.dumps(body):
                await asyncio.sleep(1)  # the closing empty chunk comes late; the client has hung up by then
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            script.aborted += 1
            raise
        return resp

    async def health(_: web.Request) -> web.Response:
        return web.Response()

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/invocations", chat)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


@dataclass
class Env:
    url: str
    key: str
    script: Script
    audit: Path


@pytest_asyncio.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    script = Script()
    up_port, dead_port = free_port(), free_port()
    runner = await _upstream(script, up_port)
    keys = tmp_path / "keys.json"
    key = add_key(keys, "ws")

    def config(port: int) -> GatewayConfig:
        return GatewayConfig(
            upstreams=[f"http://127.0.0.1:{dead_port}", f"http://127.0.0.1:{up_port}"],  # one replica is down
            listen=f"127.0.0.1:{port}", keys_file=keys, audit_log=tmp_path / "audit.jsonl", health_interval_s=0.2,
            first_byte_timeout_s=0.5, stall_timeout_s=0.4, max_per_key=1, queue_timeout_s=5,
        )  # fmt: skip

    task, gw_port = await start_gateway(config)
    try:
        yield Env(f"http://127.0.0.1:{gw_port}", key, script, tmp_path / "audit.jsonl")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await runner.cleanup()


def _body(**kw: object) -> dict[str, object]:
    return {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True, **kw}


async def _events(resp: aiohttp.ClientResponse) -> list[bytes]:
    parser = SSEParser()
    out: list[bytes] = []
    async for chunk in resp.content.iter_any():
        out += parser.feed(chunk)
    return out


async def test_stream_is_relayed_byte_for_byte(env: Env) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(env.url + "/v1/chat/completions", json=_body(n=3, max_tokens=10**6),
                  headers={"Authorization": f"Bearer {env.key}"}) as resp,
    ):  # fmt: skip
        assert resp.status == 200 and resp.headers["content-type"] == "text/event-stream"
        assert len(resp.headers["x-request-id"]) == 16
        events = await _events(resp)
    assert events == [*EVENTS, b"[DONE]"]
    forwarded = env.script.requests[-1]
    assert forwarded["n"] == 1 and forwarded["max_tokens"] == 2048
    await asyncio.sleep(0.05)
    rec = json.loads(env.audit.read_text().splitlines()[-1])
    assert (rec["status"], rec["prompt_tokens"], rec["completion_tokens"], rec["key"]) == (200, 7, 20, "ws")


async def test_non_streaming_and_models(env: Env) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {env.key}"}) as http:
        async with http.post(env.url + "/v1/chat/completions", json=_body(stream=False)) as resp:
            assert resp.status == 200 and (await resp.json())["choices"][0]["message"]["content"] == "ok"
        async with http.get(env.url + "/v1/models") as resp:
            assert (await resp.json())["data"][0]["id"] == "fake"


async def _post_events(env: Env, body: dict[str, object]) -> list[bytes]:
    """The SSE events of one streamed request (within 10 s)."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(env.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {env.key}"}) as resp,
    ):
        return await asyncio.wait_for(_events(resp), 10)


async def _last_audit_record(env: Env) -> dict[str, object]:
    """The newest audit line, once there is one (the gateway writes it when the request is over; up to 2 s)."""
    for _ in range(100):
        if env.audit.exists() and env.audit.read_text().strip():
            break
        await asyncio.sleep(0.02)
    return json.loads(env.audit.read_text().splitlines()[-1])  # type: ignore[no-any-return]


async def test_upstream_dies_mid_stream(env: Env) -> None:
    events = await _post_events(env, _body(die=True))
    assert events[:4] == EVENTS[:4]
    kinds = [classify(e).kind for e in events[4:]]
    assert kinds == ["error", "done"]
    error = classify(events[4]).error
    assert error is not None and error["code"] == "upstream_stream_failed"


async def test_upstream_lost_after_done_is_a_complete_answer(env: Env) -> None:
    # Everything up to [DONE] arrived; only vLLM's closing empty chunk was lost with the connection. The workstation
    # has its whole answer: no error event after [DONE], and the replica is not blamed for a failed stream.
    events = await _post_events(env, _body(messages=[{"role": "user", "content": "cut-after-done"}]))
    assert events == [*EVENTS, b"[DONE]"]
    rec = await _last_audit_record(env)
    assert (rec["status"], rec.get("reason"), rec["completion_tokens"]) == (200, None, 20)


async def test_done_split_over_two_reads_still_counts_as_delivered(env: Env) -> None:
    # The same, with "data: [DONE]" cut in two by the upstream's writes: the end is checked over the last two pieces.
    body = _body(messages=[{"role": "user", "content": "split-done cut-after-done"}])
    events = await _post_events(env, body)
    assert events == [*EVENTS, b"[DONE]"]
    rec = await _last_audit_record(env)
    assert (rec["status"], rec.get("reason")) == (200, None)


async def test_a_stream_that_stalls_is_ended_with_an_error_event(env: Env) -> None:
    events = await _post_events(env, _body(hang=True))
    assert events[:4] == EVENTS[:4]
    assert [classify(e).kind for e in events[4:]] == ["error", "done"]
    for _ in range(100):  # the upstream saw the gateway hang up (vLLM would abort the request)
        if env.script.aborted:
            break
        await asyncio.sleep(0.02)
    assert env.script.aborted == 1
    await asyncio.sleep(0.05)
    rec = json.loads(env.audit.read_text().splitlines()[-1])
    assert (rec["status"], rec["reason"]) == (200, "upstream_stream_failed")


async def test_client_disconnect_closes_the_upstream_request(env: Env) -> None:
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            env.url + "/v1/chat/completions", json=_body(), headers={"Authorization": f"Bearer {env.key}"}
        )
        await resp.content.readany()
        resp.close()  # drop the connection mid-stream
    for _ in range(100):
        if env.script.aborted:
            break
        await asyncio.sleep(0.02)
    assert env.script.aborted == 1


async def test_client_that_hangs_up_after_done_got_a_complete_answer(env: Env) -> None:
    # The openai SDK closes the response as soon as it reads [DONE], often before vLLM's closing empty chunk arrives.
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            env.url + "/v1/chat/completions", json=_body(linger=True), headers={"Authorization": f"Bearer {env.key}"}
        )
        parser = SSEParser()
        events: list[bytes] = []
        while b"[DONE]" not in events:
            events += parser.feed(await resp.content.readany())
        resp.close()
    rec = await _last_audit_record(env)
    assert (rec["status"], rec.get("reason")) == (200, None)


async def test_routes_and_auth(env: Env) -> None:
    async with aiohttp.ClientSession() as http:
        for method, path in [("POST", "/invocations"), ("GET", "/tokenize"), ("POST", "/pause"), ("GET", "/")]:
            async with http.request(method, env.url + path, headers={"Authorization": f"Bearer {env.key}"}) as r:
                assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
        async with http.get(env.url + "/v1/chat/completions") as r:
            assert r.status == 405
        async with http.head(env.url + "/healthz") as r:
            assert r.status == 200 and await r.read() == b""
        async with http.post(env.url + "/v1/chat/completions", json=_body()) as r:
            assert r.status == 401 and r.headers["www-authenticate"] == "Bearer"
        async with http.get(env.url + "/readyz") as r:
            doc = await r.json()
            assert [u["healthy"] for u in doc["upstreams"]] == [False, True]
            assert doc["ready"] is True and doc["upstreams"][0]["reason"]
        async with http.get(env.url + "/metrics") as r:
            assert "clinic_edge_gateway_upstream_healthy" in await r.text()
    assert not [r for r in env.script.requests if "invocations" in json.dumps(r)]


async def test_idle_and_slow_connections_are_closed(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.gateway import http11

    monkeypatch.setattr(http11, "IDLE_TIMEOUT", 0.2)
    monkeypatch.setattr(http11, "REQUEST_TIMEOUT", 0.3)
    host, port = env.url.removeprefix("http://").split(":")
    idle_r, idle_w = await asyncio.open_connection(host, int(port))
    slow_r, slow_w = await asyncio.open_connection(host, int(port))
    slow_w.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %b\r\n"
        b"content-type: application/json\r\ncontent-length: 100\r\n\r\n{" % env.key.encode()
    )  # never finishes
    assert await asyncio.wait_for(idle_r.read(), 5) == b""  # closed by the gateway
    assert await asyncio.wait_for(slow_r.read(), 5) == b""
    idle_w.close()
    slow_w.close()


async def test_upstream_errors_are_relayed_and_silence_times_out(env: Env) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {env.key}"}) as http:
        async with http.post(env.url + "/v1/chat/completions", json=_body(model="unknown")) as resp:
            assert resp.status == 404 and (await resp.json())["error"]["message"] == "model not found"
        async with http.post(env.url + "/v1/chat/completions", json=_body(model="slow")) as resp:
            assert resp.status == 504 and resp.headers["retry-after"] == "5"
            assert (await resp.json())["error"]["code"] == "upstream_timeout"
    await asyncio.sleep(0.05)
    reasons = [json.loads(line)["reason"] for line in env.audit.read_text().splitlines()]
    assert reasons[-2:] == ["upstream_rejected", "upstream_timeout"]


async def test_a_finished_request_leaves_no_reference_cycle(env: Env) -> None:
    # A request that outlives its answer until the cycle collector runs keeps its body alive: with a 4 MB radiograph
    # the next upload then lands in fresh pages, which cost ~8 ms here (measured). Everything must go by refcount.
    import gc

    from appliance.gateway.app import _Scope
    from appliance.gateway.relay import Relay

    def alive() -> int:
        return sum(1 for o in gc.get_objects() if isinstance(o, (_Scope, Relay)))

    gc.collect()
    gc.disable()
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {env.key}"}) as http:
            for body in (_body(), _body(stream=False), _body(linger=True)):
                async with http.post(env.url + "/v1/chat/completions", json=body) as resp:
                    assert resp.status == 200
                    await resp.read()
            await asyncio.sleep(0.05)
            assert alive() == 0
    finally:
        gc.enable()


async def test_a_request_over_the_key_limit_waits_for_a_slot_then_is_answered(env: Env) -> None:
    # max_per_key=1: the second request waits (no task existed for the first one: it went straight to the upstream).
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {env.key}"}) as http:
        first = asyncio.create_task(_post_events(env, _body(linger=True)))
        await asyncio.sleep(0.1)
        async with http.post(env.url + "/v1/chat/completions", json=_body(stream=False)) as resp:
            assert resp.status == 200
        assert first.done()  # it had to finish before the second could start
        events = await first
    # Its upstream never sent the closing empty chunk: after the stall timeout the answer is closed as complete.
    assert events[-1] == b"[DONE]" and "error" not in [classify(e).kind for e in events]
    assert json.loads(env.audit.read_text().splitlines()[0])["reason"] is None


async def test_a_workstation_that_leaves_while_queued_is_logged_and_frees_nothing(env: Env) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {env.key}"}) as http:
        first = asyncio.create_task(_post_events(env, _body(linger=True)))
        await asyncio.sleep(0.1)
        with pytest.raises(TimeoutError):
            async with http.post(env.url + "/v1/chat/completions", json=_body(stream=False),
                                 timeout=aiohttp.ClientTimeout(total=0.2)):  # fmt: skip
                pass
        assert (await first)[-1] == b"[DONE]"
        async with http.post(env.url + "/v1/chat/completions", json=_body(stream=False)) as resp:
            assert resp.status == 200  # the slot came back
    records = [json.loads(line) for line in env.audit.read_text().splitlines()]
    assert [(r["status"], r["reason"]) for r in records if r["route"] == "chat"] == [
        (499, "client_disconnected"),
        (200, None),
        (200, None),
    ]
