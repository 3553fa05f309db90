"""The gateway in front of a real vLLM, called with the openai SDK over TLS, as a dental workstation calls it."""

from __future__ import annotations

import base64
import http.server
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from appliance.wire import SSEParser, classify
from tests.conftest import RunningGateway, RunningVllm, free_port, launch_gateway
from tests.integration.conftest import OPEN_CLIENTS
from tests.integration.conftest import sdk_client as client

pytestmark = pytest.mark.vllm


def vllm_metric(vllm: RunningVllm, name: str, **labels: str) -> float:
    """Sum of a vLLM Prometheus series (matching the given labels) read from its own /metrics."""
    with urllib.request.urlopen(vllm.base_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def chat_posts_seen_by_vllm(vllm: RunningVllm) -> float:
    return vllm_metric(vllm, "http_requests_total", handler="/v1/chat/completions")


def png_data_url(size: tuple[int, int] = (256, 256)) -> str:
    img = Image.new("L", size)
    img.putdata([(x * 7 + y * 3) % 256 for y in range(size[1]) for x in range(size[0])])
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def get_json(gw: RunningGateway, path: str) -> tuple[int, Any]:
    """GET a gateway path over TLS: (status, parsed JSON), for error statuses too."""
    with httpx.Client(verify=gw.ssl_context(), timeout=30) as http:
        resp = http.get(gw.base_url + path)
        return resp.status_code, resp.json()


def raw_post(gw: RunningGateway, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    hdrs = {"Authorization": f"Bearer {gw.key}", "Content-Type": "application/json", **(headers or {})}
    with httpx.Client(verify=gw.ssl_context(), timeout=60) as http:
        return http.post(gw.base_url + "/v1/chat/completions", content=body, headers=hdrs)


# --- the happy paths ----------------------------------------------------------------------------------------------


def test_streaming_over_tls_with_the_sdk(gateway_server: RunningGateway, vllm_server: RunningVllm) -> None:
    audited = len(gateway_server.audit_records())
    stream = client(gateway_server).chat.completions.create(
        model=vllm_server.model,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_data_url()}},
            {"type": "text", "text": "Describe the lower left molar."}]}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},  # random weights may pick EOS early; the counts below need all 6 tokens
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    rec = gateway_server.wait_audit(audited + 1)[-1]
    assert rec["route"] == "chat" and rec["status"] == 200 and rec["stream"] is True
    assert rec["key"] and rec["key"] != gateway_server.key
    assert rec["images"] == 1 and isinstance(rec["image_bytes"], int) and rec["image_bytes"] > 0
    assert rec["completion_tokens"] == 6 and isinstance(rec["prompt_tokens"], int)
    assert isinstance(rec["ttfb_ms"], float) and isinstance(rec["duration_ms"], float)
    audit_text = gateway_server.audit_log.read_text()
    assert gateway_server.key not in audit_text and "molar" not in audit_text and "iVBOR" not in audit_text


def test_non_streaming_forces_n_1(gateway_server: RunningGateway, vllm_server: RunningVllm) -> None:
    answer = client(gateway_server).chat.completions.create(
        model=vllm_server.model,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=3,
        n=3,
        extra_body={"ignore_eos": True},
    )
    assert len(answer.choices) == 1
    assert answer.usage is not None and answer.usage.completion_tokens == 3


def test_models_list(gateway_server: RunningGateway, vllm_server: RunningVllm) -> None:
    assert [m.id for m in client(gateway_server).models.list()] == [vllm_server.model]


def test_tls_is_verified_against_the_clinic_ca(gateway_server: RunningGateway) -> None:
    untrusting = openai.OpenAI(base_url=gateway_server.base_url + "/v1", api_key=gateway_server.key, max_retries=0)
    OPEN_CLIENTS.append(untrusting)
    with pytest.raises(openai.APIConnectionError):
        untrusting.models.list()


def test_health_ready_metrics(gateway_server: RunningGateway, vllm_server: RunningVllm) -> None:
    ctx = gateway_server.ssl_context()
    with urllib.request.urlopen(gateway_server.base_url + "/healthz", context=ctx) as resp:
        assert json.loads(resp.read()) == {"alive": True}
    with urllib.request.urlopen(gateway_server.base_url + "/readyz", context=ctx) as resp:
        ready = json.loads(resp.read())
    assert ready == {"ready": True, "reasons": [], "upstreams": [{"url": vllm_server.base_url, "healthy": True,
                                                                   "reason": ""}]}  # fmt: skip
    with urllib.request.urlopen(gateway_server.base_url + "/metrics", context=ctx) as resp:
        text = resp.read().decode()
    assert 'clinic_edge_gateway_requests_total{route="chat",status="200"}' in text
    assert "clinic_edge_gateway_ttfb_seconds_bucket" in text


# --- everything refused never reaches vLLM -------------------------------------------------------------------------


class _Listener(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []  # noqa: RUF012 - shared on purpose: the test reads it

    def do_GET(self) -> None:
        self.hits.append(self.path)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def image_host() -> Iterator[str]:
    """A web server on loopback standing in for a remote image host: it records any connection."""
    _Listener.hits = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Listener)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _msg(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "Findings?"}]}]


def _img(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


REJECTIONS: list[tuple[str, dict[str, Any], int, str, str]] = [
    ("remote_https", {"messages": _msg(_img("https://images.example.org/pano.png"))}, 400,
     "image_url_not_inline", "Send the radiograph inline"),
    ("remote_http_redirect", {"messages": _msg(_img("{image_host}/redirect-to-metadata"))}, 400,
     "image_url_not_inline", "never downloads images"),
    ("file_url", {"messages": _msg(_img("file:///etc/passwd"))}, 400, "image_url_not_inline", "'file:'"),
    ("other_scheme", {"messages": _msg(_img("ftp://pacs/x.png"))}, 400, "image_url_not_inline", "'ftp:'"),
    ("gif", {"messages": _msg(_img("data:image/gif;base64,R0lGODlhAQABAAAAACw="))}, 400,
     "unsupported_image_type", "image/gif"),
    ("audio", {"messages": _msg({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}})}, 400,
     "unsupported_content_type", "no audio, video"),
    ("video", {"messages": _msg({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}})}, 400,
     "unsupported_content_type", "no audio, video"),
    ("malformed_base64", {"messages": _msg(_img("data:image/png;base64,%%%%not+base64%%"))}, 400,
     "invalid_image", "not valid base64"),
    ("too_many_images", {"messages": _msg(*[_img(png_data_url((32, 32)))] * 5)}, 400, "too_many_images",
     "at most 4"),
    ("too_many_pixels", {"messages": _msg(_img(png_data_url((9000, 6000))))}, 400, "image_too_many_pixels",
     "9000x6000"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "body", "status", "code", "text"), REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_rejections_never_reach_vllm(
    gateway_server: RunningGateway,
    vllm_server: RunningVllm,
    image_host: str,
    name: str,
    body: dict[str, Any],
    status: int,
    code: str,
    text: str,
) -> None:
    payload = json.dumps({"model": vllm_server.model, "max_tokens": 2, **body}).replace("{image_host}", image_host)
    before = chat_posts_seen_by_vllm(vllm_server)
    audited = len(gateway_server.audit_records())
    with pytest.raises(openai.APIStatusError) as info:
        client(gateway_server).chat.completions.create(**json.loads(payload))
    err = info.value
    assert err.status_code == status
    assert isinstance(err.body, dict) and err.body.get("code") == code, err.body
    assert text in err.message
    assert "base64," not in err.message.replace("data:image/png;base64,<base64 of the file>", "")
    assert chat_posts_seen_by_vllm(vllm_server) == before, "vLLM received a refused request"
    assert _Listener.hits == [], "something fetched the image URL"
    rec = gateway_server.wait_audit(audited + 1)[-1]
    assert (rec["status"], rec["reason"]) == (status, code)


def test_auth_refusals(gateway_server: RunningGateway, vllm_server: RunningVllm) -> None:
    before = chat_posts_seen_by_vllm(vllm_server)
    body = json.dumps({"model": vllm_server.model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    with httpx.Client(verify=gateway_server.ssl_context(), timeout=30) as http:
        missing = http.post(gateway_server.base_url + "/v1/chat/completions", content=body)
        wrong = http.post(
            gateway_server.base_url + "/v1/chat/completions", content=body, headers={"Authorization": "Bearer ce_no"}
        )
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    assert "Authorization: Bearer <key>" in missing.json()["error"]["message"]
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert chat_posts_seen_by_vllm(vllm_server) == before


def test_body_too_large(gateway_server: RunningGateway, vllm_server: RunningVllm) -> None:
    before = chat_posts_seen_by_vllm(vllm_server)
    resp = raw_post(gateway_server, b'{"model": "x", "messages": [], "pad": "' + b"A" * (33 * 1024 * 1024) + b'"}')
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "body_too_large"
    assert chat_posts_seen_by_vllm(vllm_server) == before


VLLM_ROUTES = ["/invocations", "/tokenize", "/detokenize", "/pause", "/v1/completions", "/v1/embeddings", "/health",
               "/version", "/v1/chat/completions/../../pause"]  # fmt: skip


@pytest.mark.parametrize("path", VLLM_ROUTES)
def test_no_other_vllm_route_is_reachable(gateway_server: RunningGateway, vllm_server: RunningVllm, path: str) -> None:
    before = vllm_metric(vllm_server, "http_requests_total")
    with httpx.Client(verify=gateway_server.ssl_context(), timeout=30) as http:
        for method in ("GET", "POST"):
            resp = http.request(
                method, gateway_server.base_url + path, headers={"Authorization": f"Bearer {gateway_server.key}"},
                content=b'{"prompt": "x"}',
            )  # fmt: skip
            assert resp.status_code == 404, (method, path, resp.status_code)
            assert resp.json()["error"]["code"] == "not_found"
    # vLLM counts its own /metrics scrape (this one); nothing else may have arrived.
    assert vllm_metric(vllm_server, "http_requests_total") - before <= 1


# --- disconnects, revocation, admission, upstream down ---------------------------------------------------------


def _wait_metric(vllm: RunningVllm, name: str, want: float, timeout: float = 20.0, **labels: str) -> float:
    deadline = time.monotonic() + timeout
    while True:
        value = vllm_metric(vllm, name, **labels)
        if value == want or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


LONG = 950  # the demo model's context is 1024 tokens; ignore_eos makes vLLM generate all of them


def _settled_tokens(vllm: RunningVllm, timeout: float = 30.0) -> float:
    """vLLM's generated-token counter once it stops moving (two readings 0.5 s apart agree)."""
    deadline = time.monotonic() + timeout
    last = vllm_metric(vllm, "vllm:generation_tokens_total")
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = vllm_metric(vllm, "vllm:generation_tokens_total")
        if now == last:
            return now
        last = now
    raise AssertionError(f"vLLM was still generating after {timeout:.0f} s")


def _long_body(model: str, stream: bool) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": LONG,
            "stream": stream, "ignore_eos": True}  # fmt: skip


def test_disconnect_mid_stream_aborts_in_vllm(gateway_server: RunningGateway, vllm_server: RunningVllm) -> None:
    audited = len(gateway_server.audit_records())
    generated = _settled_tokens(vllm_server)
    hdrs = {"Authorization": f"Bearer {gateway_server.key}"}
    url = gateway_server.base_url + "/v1/chat/completions"
    with (
        httpx.Client(verify=gateway_server.ssl_context(), timeout=60) as http,
        http.stream("POST", url, json=_long_body(vllm_server.model, True), headers=hdrs) as resp,
    ):
        assert resp.status_code == 200
        parser = SSEParser()
        seen = 0
        for chunk in resp.iter_raw():
            seen += sum(1 for data in parser.feed(chunk) if classify(data).kind == "content")
            if seen >= 3:
                break
    # Leaving the loop closed the connection after 3 of LONG tokens: vLLM must stop before LONG.
    assert _settled_tokens(vllm_server) - generated < LONG  # all LONG (+1 probe) if never aborted
    assert gateway_server.wait_audit(audited + 1)[-1]["reason"] == "client_disconnected"


def test_disconnect_while_waiting_non_streaming_aborts_in_vllm(
    gateway_server: RunningGateway, vllm_server: RunningVllm
) -> None:
    # The workstation hangs up while the gateway waits for a non-streamed answer. The test closes the socket itself
    # once vLLM is generating: a client read timeout would be the obvious way, but Python's TLS read (under httpx)
    # sometimes overslept its 0.3 s until the whole answer came (seen in CI and here), which tests the client.
    audited = len(gateway_server.audit_records())
    generated = _settled_tokens(vllm_server)
    body = json.dumps(_long_body(vllm_server.model, False)).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {gateway_server.key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    port = int(gateway_server.base_url.rsplit(":", 1)[1])
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    with gateway_server.ssl_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(head + body)
        deadline = time.monotonic() + 30
        while vllm_metric(vllm_server, "vllm:generation_tokens_total") == generated:
            assert time.monotonic() < deadline, "vLLM did not start generating within 30 s"
            time.sleep(0.02)
    # The socket is closed: vLLM must stop before the end of the answer (LONG tokens, +1 probe, if never aborted).
    assert _settled_tokens(vllm_server) - generated < LONG
    assert gateway_server.wait_audit(audited + 1)[-1]["reason"] == "client_disconnected"


def test_key_revoked_mid_session(gateway_server: RunningGateway, vllm_server: RunningVllm) -> None:
    cli = [sys.executable, "-m", "appliance", "keys"]
    out = subprocess.run([*cli, "add", "surgery-2", "--keys-file", str(gateway_server.keys_file)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    key = out.stdout.strip().splitlines()[-1]
    ws = client(gateway_server, key)
    messages = [{"role": "user", "content": "Hi"}]
    ws.chat.completions.create(model=vllm_server.model, messages=messages, max_tokens=1)  # type: ignore[arg-type]
    subprocess.run([*cli, "revoke", "surgery-2", "--keys-file", str(gateway_server.keys_file)], check=True)
    with pytest.raises(openai.AuthenticationError) as info:
        ws.chat.completions.create(model=vllm_server.model, messages=messages, max_tokens=1)  # type: ignore[arg-type]
    assert "unknown or revoked" in info.value.message


def test_admission_limits(vllm_server: RunningVllm, tmp_path: Path) -> None:
    gw = launch_gateway(
        tmp_path, [vllm_server.base_url],
        extra_args=["--max-per-key", "1", "--max-inflight", "1", "--queue-timeout-s", "0.2", "--retry-after-s", "2"],
    )  # fmt: skip
    try:
        other = subprocess.run(
            [sys.executable, "-m", "appliance", "keys", "add", "second", "--keys-file", str(gw.keys_file)],
            capture_output=True, text=True, check=True,
        ).stdout.strip().splitlines()[-1]  # fmt: skip
        url = gw.base_url + "/v1/chat/completions"
        short = {"model": vllm_server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
        # The demo model writes ~1000 tokens a second, so on a busy machine the long request can end before both
        # short ones are answered; such an attempt proves nothing and is repeated (at most 5 times).
        for _attempt in range(5):
            done_before = sum(1 for r in gw.audit_records() if r["status"] == 200)
            with (
                httpx.Client(verify=gw.ssl_context(), timeout=60) as http,
                http.stream("POST", url, json=_long_body(vllm_server.model, True),
                            headers={"Authorization": f"Bearer {gw.key}"}) as long_resp,
            ):  # fmt: skip
                # The 200 head is here: one long generation holds this key's only slot and the gateway's only slot,
                assert long_resp.status_code == 200
                # so the same key waits 0.2 s, then gets 429; another key finds the gateway full (sent together).
                with ThreadPoolExecutor(2) as pool:
                    same_key_f = pool.submit(http.post, url, json=short, headers={"Authorization": f"Bearer {gw.key}"})
                    busy_f = pool.submit(http.post, url, json=short, headers={"Authorization": f"Bearer {other}"})
                    same_key, busy = same_key_f.result(), busy_f.result()
                # Its audit line is written when it ends: none yet means it held the slots throughout.
                still_running = sum(1 for r in gw.audit_records() if r["status"] == 200) == done_before
            if still_running:
                break
        assert still_running, "the long request ended before the short ones were answered, 5 times"
        assert same_key.status_code == 429 and same_key.headers["retry-after"] == "2"
        assert same_key.json()["error"]["code"] == "per_key_limit"
        assert "Too many requests" in same_key.json()["error"]["message"]
        assert busy.status_code == 429 and busy.json()["error"]["code"] == "gateway_busy"
    finally:
        gw.stop()


def test_upstream_down_gives_503_with_retry_after(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gw = launch_gateway(tmp_path, [dead], wait_ready=False)
    try:
        deadline = time.monotonic() + 10
        while True:
            status, ready = get_json(gw, "/readyz")
            if ready["upstreams"][0]["reason"] != "not checked yet" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert status == 503
        assert ready["ready"] is False and "unreachable" in ready["upstreams"][0]["reason"]
        with pytest.raises(openai.APIStatusError) as info:
            client(gw).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 503
        assert info.value.response.headers["retry-after"] == "5"
        assert isinstance(info.value.body, dict) and info.value.body["code"] == "no_upstream"
    finally:
        gw.stop()


def test_plain_http_refused_off_loopback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "appliance", "gateway", "--upstream", "http://127.0.0.1:1", "--listen",
         "0.0.0.0:18443", "--keys-file", str(tmp_path / "k.json")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "Refusing plain HTTP" in proc.stderr
