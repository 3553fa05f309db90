"""The abuse battery: what a hostile or merely buggy workstation can send, over raw sockets, plain and TLS.

Every case ends the same way: a 4xx with a JSON body (or a close, for framing the parser cannot read), nothing
reached vLLM, nothing held (admission slots, replica counts, relays), one audit line per request, and the gateway
still answers a normal request in full."""

from __future__ import annotations

import asyncio
import json

import pytest

from appliance.gateway import http11
from appliance.keys import revoke_key
from tests.unit.gateway.conftest import MAX_BODY
from tests.unit.gateway.door import EVENTS, Door, chat_body, read_response

pytestmark = pytest.mark.asyncio

K = b"\r\nhost: gw\r\ncontent-type: application/json\r\n"


async def refused(
    door: Door, raw: bytes, status: int | tuple[int, ...] | None, code: str | None = None, *, closes: bool = True
) -> None:
    """Send ``raw``; expect ``status`` (None: a close without an answer, or a 4xx), one audit line, nothing upstream,
    nothing held. ``closes``: the answer ends the connection (a refusal before the body was read)."""
    seen, lines = len(door.upstream.seen), len(door.audit_lines())
    resp = await door.exchange(raw)
    if status is None:
        assert resp is None or 400 <= resp.status < 500, resp
    else:
        assert resp is not None, f"closed without an answer, expected {status}"
        assert resp.status in (status if isinstance(status, tuple) else (status,)), (resp.status, resp.body[:300])
        assert resp.headers["content-type"] == "application/json"
        assert b"Traceback" not in resp.body
        if code is not None:
            assert resp.code == code, resp.body
        assert (resp.headers.get("connection") == "close") == closes, resp.headers
    await door.settle(lines + (1 if resp is not None else len(door.audit_lines()) - lines))
    assert door.upstream.seen[seen:] == []


async def closed_by_gateway(reader: asyncio.StreamReader) -> bool:
    """The gateway closed the connection without an answer (a reset if our last bytes crossed its close)."""
    try:
        return await reader.read() == b""
    except ConnectionResetError:
        return True


def key_head(door: Door, method: str, path: str) -> bytes:
    return f"{method} {path} HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {door.key}\r\n".encode()


# --- request smuggling and framing ----------------------------------------------------------------------------------

SMUGGLED = b"GET /tokenize HTTP/1.1\r\nhost: gw\r\n\r\n"


@pytest.mark.parametrize(
    "framing",
    [
        b"content-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,  # CL.TE
        b"transfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n0\r\n\r\n" + SMUGGLED,  # TE.CL
        b"content-length: 2\r\ncontent-length: 40\r\n\r\n{}" + SMUGGLED,  # duplicate CL, different
        b"content-length: 2\r\ncontent-length: 2\r\n\r\n{}",  # duplicate CL, same
        b"content-length: 2, 2\r\n\r\n{}",
        b"content-length: +2\r\n\r\n{}",
        b"content-length: -1\r\n\r\n{}",
        b"content-length: 0x2\r\n\r\n{}",
        b"transfer-encoding: xchunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",  # obfuscated TE
        b"transfer-encoding : chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        b"transfer-encoding: chunked, identity\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        b"transfer-encoding: chunked\r\ntransfer-encoding: identity\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        b"transfer-encoding: chunked\r\n\r\nfffffffffffffffffffff\r\n{}\r\n0\r\n\r\n",  # chunk-size overflow
        b"transfer-encoding: chunked\r\n\r\n-1\r\n{}\r\n0\r\n\r\n",
        b"transfer-encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n",  # chunk without its CRLF
        b" x: folded\r\n\r\n",
        b"bad header: x\r\n\r\n",
        b"x: a\nb: c\r\n\r\n",  # a bare LF
    ],
)
async def test_smuggling_and_broken_framing_are_refused(door: Door, framing: bytes) -> None:
    raw = b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer %b\r\n" % door.key.encode()
    await refused(door, raw + framing, 400)
    await door.healthy()


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),  # the HTTP/2 preface
        (b"GET /healthz HTTP/2.0\r\n\r\n", 400),
        (b"GET /healthz HTTP/3.1\r\n\r\n", 400),  # the parser knows no such version
        (b"GET /healthz\r\n\r\n", 400),  # HTTP/0.9
        (b"GET /healthz HTTP/1.1\r\nupgrade: h2c\r\nconnection: upgrade, http2-settings\r\n\r\n", 400),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 64, 400),  # TLS to the plain port (or twice)
        (b"\x00\xff\xfe garbage\r\n\r\n", 400),
    ],
)
async def test_other_protocols_are_refused(door: Door, raw: bytes, status: int | tuple[int, ...]) -> None:
    await refused(door, raw, status)
    await door.healthy()


# --- routes ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/invocations", "/tokenize", "/detokenize", "/pause", "/resume", "/health", "/v1/completions",
        "/v1/embeddings", "/v2/chat/completions", "/update_weights", "/scale_elastic_ep",
        "/v1/chat/completions/../../invocations", "/v1/chat/completions/", "//v1/chat/completions",
        "/v1/chat/completions%2F..%2F..%2Finvocations", "/V1/chat/completions", "/v1/chat/completions;x=1",
        "/%2e%2e/invocations", "/v1/./chat/completions", "http://127.0.0.1:8000/invocations",
        "/v1/chat/completions%00", "*",
    ],
)  # fmt: skip
async def test_routes_that_are_not_allow_listed_are_404(door: Door, path: str) -> None:
    body = chat_body()
    raw = key_head(door, "POST", path) + b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
    await refused(door, raw + body, 404, "not_found")


async def test_a_query_string_is_not_forwarded(door: Door) -> None:
    body = chat_body()
    raw = key_head(door, "POST", "/v1/chat/completions?x=/../invocations") + K[2:]
    resp = await door.exchange(raw + b"content-length: %d\r\n\r\n" % len(body) + body)
    assert resp is not None and resp.status == 200
    assert door.upstream.seen == [("POST", "/v1/chat/completions")]
    await door.settle(1)


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/chat/completions"), ("DELETE", "/v1/models"),
                                              ("POST", "/healthz"), ("PUT", "/metrics")])  # fmt: skip
async def test_wrong_methods_are_405(door: Door, method: str, path: str) -> None:
    await refused(door, key_head(door, method, path) + b"\r\n", 405, "method_not_allowed")


# --- oversized everything -------------------------------------------------------------------------------------------


async def test_oversized_request_line_header_and_field_count(door: Door) -> None:
    long_path = "/v1/chat/completions?" + "a" * (http11.MAX_REQUEST_LINE + 10)
    await refused(door, key_head(door, "POST", long_path) + b"\r\n", 414, "request_line_too_long")
    big = door.head(extra=b"x-big: " + b"a" * http11.MAX_HEAD_BYTES + b"\r\n", length=2) + b"{}"
    await refused(door, big, 431, "headers_too_large")
    many = door.head(extra=b"".join(b"x-%d: 1\r\n" % i for i in range(http11.MAX_HEADER_FIELDS + 1)), length=2)
    await refused(door, many + b"{}", 431, "headers_too_large")
    same = door.head(extra=b"x-same: 1\r\n" * (http11.MAX_HEADER_FIELDS + 1), length=2)  # one dict entry
    await refused(door, same + b"{}", 431, "headers_too_large")
    await door.healthy()


async def test_a_head_that_never_ends_is_refused_at_the_limit(door: Door) -> None:
    # A header value the parser would buffer without bound, in many writes, never finished.
    reader, writer = await door.connect()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nx-endless: ")
    for _ in range(40):
        writer.write(b"a" * 1024)
        await writer.drain()
    resp = await read_response(reader)
    writer.close()
    assert resp is not None and resp.status == 431
    await door.settle(1)
    await door.healthy()


async def test_content_length_over_the_limit_is_refused_before_the_body(door: Door) -> None:
    reader, writer = await door.connect()
    writer.write(door.head(length=50 * 1024**3))  # 50 GB announced, nothing sent
    await writer.drain()
    resp = await read_response(reader)
    writer.close()
    assert resp is not None and resp.status == 413 and resp.code == "body_too_large"
    assert "limit" in str(resp.json()["error"])
    await door.settle(1)
    assert door.upstream.seen == []


async def test_a_chunked_body_over_the_limit_is_refused_while_it_arrives(door: Door) -> None:
    reader, writer = await door.connect()
    writer.write(door.head(extra=b"transfer-encoding: chunked\r\n"))
    chunk = b"%x\r\n%b\r\n" % (64 * 1024, b" " * 64 * 1024)
    resp = None
    for _ in range(MAX_BODY // (64 * 1024) + 8):
        try:
            writer.write(chunk)
            await writer.drain()
        except (ConnectionResetError, BrokenPipeError):
            break
    resp = await read_response(reader)
    writer.close()
    assert resp is not None and resp.status == 413
    await door.settle(1)
    assert door.upstream.seen == []


async def test_expect_100_continue_is_answered_only_for_acceptable_requests(door: Door) -> None:
    expect = b"expect: 100-continue\r\n"
    for raw, status in [
        (door.head(length=MAX_BODY + 1, extra=expect), 413),
        (door.head(length=10, extra=expect, key="ce_not-a-key"), 401),
        (key_head(door, "POST", "/invocations") + expect + b"content-length: 10\r\n\r\n", 404),
        (door.head(length=10, extra=b"expect: something-else\r\n"), 417),
    ]:
        reader, writer = await door.connect()
        writer.write(raw)
        resp = await read_response(reader)
        writer.close()
        assert resp is not None and resp.status == status, resp  # the final answer, no 100 before it
    await door.settle(4)
    body = chat_body()
    reader, writer = await door.connect()
    writer.write(door.head(length=len(body), extra=expect))
    interim = await read_response(reader)
    assert interim is not None and interim.status == 100
    writer.write(body)
    resp = await read_response(reader)
    writer.close()
    assert resp is not None and resp.status == 200
    await door.settle(5)


# --- keys and content type ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("auth", "code"),
    [
        (b"", "missing_api_key"),
        (b"authorization: Basic dXNlcjpwYXNz\r\n", "invalid_authorization"),
        (b"authorization: Bearer\r\n", "invalid_authorization"),
        (b"authorization: Bearer ce_wrong\r\n", "invalid_api_key"),
        (b"authorization: Bearer \xff\xfe\x00\r\n", None),
        (b"authorization: Bearer " + b"k" * 8000 + b"\r\n", "invalid_api_key"),
    ],
)
async def test_bad_keys_are_401_before_the_body_is_read(door: Door, auth: bytes, code: str | None) -> None:
    raw = b"POST /v1/chat/completions HTTP/1.1" + K + auth + b"content-length: %d\r\n\r\n" % MAX_BODY
    if code is None:  # a NUL in a header is not HTTP: the parser refuses it
        await refused(door, raw, None)
        return
    await refused(door, raw, 401, code)  # MAX_BODY announced, nothing sent: answered from the head alone


async def test_a_key_revoked_while_the_gateway_runs_is_refused_at_once(door: Door) -> None:
    task = asyncio.create_task(door.exchange(door.post(chat_body("hold", stream=True))))
    for _ in range(500):
        if door.upstream.seen:
            break
        await asyncio.sleep(0.01)
    assert revoke_key(door.keys_file, "ws")
    resp = await door.exchange(door.post(chat_body()))
    assert resp is not None and resp.status == 401 and resp.code == "invalid_api_key"
    assert len(door.upstream.seen) == 1
    door.upstream.gate.set()  # the stream that started before the revocation finishes
    resp = await task
    assert resp is not None and resp.status == 200 and b"[DONE]" in resp.body
    await door.settle(2)


@pytest.mark.parametrize("ctype", [b"text/plain", b"application/x-www-form-urlencoded", b"application/jsonx", b""])
async def test_a_body_that_is_not_declared_json_is_refused_as_vllm_does(door: Door, ctype: bytes) -> None:
    body = chat_body()
    raw = key_head(door, "POST", "/v1/chat/completions")
    raw += (b"content-type: " + ctype + b"\r\n" if ctype else b"") + b"content-length: %d\r\n\r\n" % len(body)
    await refused(door, raw + body, 400, "unsupported_media_type")


async def test_json_content_type_with_parameters_is_accepted(door: Door) -> None:
    body = chat_body()
    raw = key_head(door, "POST", "/v1/chat/completions") + b"content-type: Application/JSON; charset=utf-8\r\n"
    resp = await door.exchange(raw + b"content-length: %d\r\n\r\n" % len(body) + body)
    assert resp is not None and resp.status == 200


# --- JSON the standard cannot carry ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "json_too_deep"),  # deeper than the interpreter's stack
        (b'{"model":"m","messages":[{"role":"user","content":"hi"}],"x":' + b"[" * 65 + b"]" * 65 + b"}",
         "json_too_deep"),
        (b'{"model":"m","messages":[{"role":"user","content":"\\ud800"}]}', "invalid_unicode"),
        (b'{"model":"m","messages":[{"role":"user","content":"\\udfff\\ud800"}]}', "invalid_unicode"),
        (b'{"model":"m","messages":[{"role":"user","content":"hi","\\ud83d":1}]}', "invalid_unicode"),
        (b'{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":NaN}', "invalid_number"),
        (b'{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":-Infinity}', "invalid_number"),
        (b'{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":1e999}', "invalid_number"),
        (b'{"model":"m","messages":[{"role":"user","content":"hi"}],"seed":' + b"9" * 5000 + b"}", "invalid_json"),
        (b'{"model":"m","messages":[{"role":"user","content":"\xed\xa0\x80"}]}', "invalid_json"),  # CESU surrogate
        (b'{"model":"m","messages":[{"role":"user","content":"\xff"}]}', "invalid_json"),
        (b"\xef\xbb\xbf{}", "invalid_json"),  # a BOM
        (b'{"model":"m","messages":[' + b'{"role":"user","content":"a"},' * 20_000 + b"1]}", "invalid_messages"),
    ],
    ids=["deep-100k", "deep-65", "lone-high", "reversed-pair", "lone-in-key", "nan", "-inf", "1e999", "5000-digits",
         "cesu", "not-utf8", "bom", "long-list"],
)  # fmt: skip
async def test_json_bombs_and_invalid_unicode_are_400s_that_free_the_slot(door: Door, body: bytes, code: str) -> None:
    # These used to escape validation as a 500 with no audit line, keeping the key's admission slot for good.
    for _ in range(door.gateway.cfg.max_per_key + 1):  # more than the key's slots: none may stay taken
        await refused(door, door.post(body), 400, code, closes=False)
    assert door.gateway.metrics.rejections[code] == door.gateway.cfg.max_per_key + 1
    await door.healthy()


# --- pipelining, slow clients, disconnects --------------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order_and_a_bad_one_ends_the_connection(door: Door) -> None:
    reader, writer = await door.connect()
    writer.write(door.post(chat_body(stream=True)) + door.post(chat_body()) + key_head(door, "GET", "/pause")
                 + b"\r\n" + door.post(chat_body()))  # fmt: skip
    statuses = []
    while (resp := await read_response(reader)) is not None:
        statuses.append(resp.status)
    writer.close()
    assert statuses == [200, 200, 404]  # nothing after the refusal is read
    await door.settle(3)
    assert len(door.upstream.seen) == 2


async def test_slow_loris_on_headers_is_closed(door: Door) -> None:
    reader, writer = await door.connect()
    loop = asyncio.get_running_loop()
    start = loop.time()
    closed = asyncio.create_task(closed_by_gateway(reader))
    for byte in door.head(length=2):  # one byte every 50 ms: the head would take ~10 s
        if closed.done():
            break
        writer.write(bytes([byte]))
        await asyncio.sleep(0.05)
    assert await asyncio.wait_for(closed, 5)
    assert loop.time() - start < http11.HEAD_TIMEOUT + 2
    writer.close()
    await door.settle(0)
    await door.healthy()


async def test_slow_loris_on_the_body_is_closed(door: Door) -> None:
    body = chat_body("x" * 2000)
    reader, writer = await door.connect()
    writer.write(door.head(length=len(body)))
    closed = asyncio.create_task(closed_by_gateway(reader))
    for i in range(0, len(body), 10):
        if closed.done():
            break
        writer.write(body[i : i + 10])
        await asyncio.sleep(0.05)
    assert await asyncio.wait_for(closed, 5)
    writer.close()
    await door.settle(0)
    assert door.upstream.seen == []


@pytest.mark.parametrize("stage", ["request-line", "head", "half-body"])
async def test_disconnects_while_sending_leave_nothing_behind(door: Door, stage: str) -> None:
    body = chat_body("x" * 5000)
    raw = {"request-line": b"POST /v1/ch", "head": door.head(length=len(body)),
           "half-body": door.post(body)[: -len(body) // 2]}[stage]  # fmt: skip
    _, writer = await door.connect()
    writer.write(raw)
    await writer.drain()
    writer.close()
    await asyncio.sleep(0.05)
    await door.settle(0)
    assert door.upstream.seen == []
    await door.healthy()


async def test_disconnects_while_queued_or_streaming_are_audited_and_free_their_slot(door: Door) -> None:
    per_key = door.gateway.cfg.max_per_key
    held = []
    for _ in range(per_key):  # take every slot of the key with streams that wait upstream
        reader, writer = await door.connect()
        writer.write(door.post(chat_body("hold", stream=True)))
        held.append((reader, writer))
    for _ in range(500):
        if door.gateway.admission.inflight == per_key and len(door.upstream.seen) == per_key:
            break
        await asyncio.sleep(0.01)
    reader, writer = await door.connect()  # queued behind them, then gone
    writer.write(door.post(chat_body()))
    for _ in range(500):
        if door.gateway.admission.waiting:
            break
        await asyncio.sleep(0.01)
    writer.close()
    for _, w in held:  # gone mid-stream
        w.close()
    await door.settle(per_key + 1)
    statuses = sorted((r["status"], r["reason"]) for r in door.audit_lines())
    assert statuses == [(499, "client_disconnected")] * (per_key + 1)
    for _ in range(200):  # vLLM saw every stream's connection close (it would abort the generation)
        if door.upstream.aborted == per_key:
            break
        await asyncio.sleep(0.01)
    assert door.upstream.aborted == per_key
    door.upstream.gate.set()
    await door.healthy()


# --- HTTP/1.0 -------------------------------------------------------------------------------------------------------


async def test_an_http10_client_gets_an_unframed_stream_and_a_close(door: Door) -> None:
    body = chat_body(stream=True)
    raw = b"POST /v1/chat/completions HTTP/1.0" + K + b"authorization: Bearer %b\r\n" % door.key.encode()
    resp = await door.exchange(raw + b"content-length: %d\r\n\r\n" % len(body) + body)
    assert resp is not None and resp.status == 200
    assert "transfer-encoding" not in resp.headers and resp.headers["connection"] == "close"
    assert resp.body == b"".join(b"data: " + e + b"\n\n" for e in [*EVENTS, b"[DONE]"])
    raw = b"POST /v1/chat/completions HTTP/1.0" + K + b"authorization: Bearer %b\r\n" % door.key.encode()
    plain = chat_body()
    resp = await door.exchange(raw + b"content-length: %d\r\n\r\n" % len(plain) + plain)
    assert resp is not None and resp.status == 200 and json.loads(resp.body)["choices"]
    await door.settle(2)


async def test_a_refused_upload_is_drained_while_it_flows_so_the_client_can_read_the_answer(door: Door) -> None:
    # Closing at once with unread bytes resets the connection; a client still uploading may then lose the 413.
    reader, writer = await door.connect()
    writer.write(door.head(length=MAX_BODY + 1))
    piece = b" " * (MAX_BODY // 8)
    for _ in range(8):  # ~1.2 s in all, far past LINGER_TIMEOUT, but never pausing that long
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.15)
    resp = await read_response(reader)
    assert resp is not None and resp.status == 413
    writer.close()
    await door.settle(1)
