"""Hypothesis strategies for whole HTTP requests to the gateway, shaped by docs/openapi.yaml: its two routes and the
chat body's fields, then bent every way the description forbids (wrong types, non-finite numbers, lone surrogates,
deep nesting, remote and malformed images (DICOM too), mangled bytes, odd heads and framings).

Every request is framed so that the gateway can tell where it ends (Content-Length equals the body sent, or the
chunks add up): a request that waits for bytes that never come would only measure a timeout."""

from __future__ import annotations

import base64
import io
import json
import os
from typing import Any

from hypothesis import strategies as st
from PIL import Image
from pydicom import uid

from tests.unit.gateway.dicomgen import dicom_file, radiograph

__all__ = ["HEAD_ONLY", "http_requests"]

HEAD_ONLY = b"HEAD "  # requests starting with this get a head without a body


def _image(fmt: str, size: tuple[int, int], noise: bool = False) -> str:
    img = Image.frombytes("L", size, os.urandom(size[0] * size[1])) if noise else Image.new("L", size)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


def _dicom(ts: str) -> str:
    return base64.b64encode(dicom_file(radiograph(12, 16, 12), ts)).decode()


_PAYLOADS = [
    _image("PNG", (8, 6)), _image("JPEG", (9, 7)), _image("WEBP", (5, 5)), _image("PNG", (40, 40), True),
    _dicom(uid.ExplicitVRLittleEndian), _dicom(uid.RLELossless), _dicom(uid.JPEG2000Lossless),
]  # fmt: skip
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="

texts = st.text(max_size=24) | st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=3)
scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | texts
    | st.sampled_from([1e308, -0.0, 10**400])
)  # fmt: skip
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4), max_leaves=10
)


@st.composite
def _payload(draw: st.DrawFn) -> str:
    good = draw(st.sampled_from(_PAYLOADS))
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return good
    if kind == 1:  # a character replaced, somewhere
        i = draw(st.integers(0, len(good) - 1))
        bad: str = draw(st.sampled_from([*"!*-_ .\\", "é", "\u0000", *_B64[:4]]))
        return good[:i] + bad + good[i + 1 :]
    if kind == 2:  # cut short
        return good[: draw(st.integers(0, len(good)))]
    if kind == 3:
        return draw(st.text(_B64, max_size=700))
    return str(draw(texts))


image_urls = st.one_of(
    st.builds(
        "data:{}{},{}".format,
        st.sampled_from(
            [
                "image/png",
                "image/jpeg",
                "image/webp",
                "IMAGE/PNG",
                "image/gif",
                "text/plain",
                "",
                "application/dicom",
                "Application/DICOM",
            ]
        ),
        st.sampled_from([";base64", "", ";charset=utf-8;base64", ";BASE64"]),
        _payload(),
    ),
    st.sampled_from(
        [
            "http://10.0.0.1/x.png",
            "https://pacs.clinic.lan/1",
            "file:///etc/passwd",
            "ftp://x/y",
            "javascript:alert(1)",
            "",
            "data:",
            "data:image/png;base64",
            "//evil/x.png",
        ]
    ),
    texts,
)
parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": image_urls})}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": image_urls}),
    st.dictionaries(
        st.sampled_from(["type", "text", "image_url", "audio_url", "file", "input_audio"]), json_values, max_size=3
    ),
    json_values,
)
messages = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool"]) | texts,
     "content": texts | st.lists(parts, max_size=4) | json_values},
    optional={"name": texts, "tool_calls": json_values},
)  # fmt: skip
_OPTIONAL: dict[str, Any] = {
    "stream": st.booleans() | json_values,
    "stream_options": st.just({"include_usage": True}) | json_values,
    "max_tokens": st.integers(-5, 10**7) | json_values,
    "max_completion_tokens": st.integers(-5, 10**7) | json_values,
    "temperature": st.floats() | json_values,
    "n": st.integers(-1, 10),
    "best_of": st.integers(-1, 10),
    "seed": st.integers(-(2**80), 2**80),
    "chat_template": texts,
    "mm_processor_kwargs": json_values,
    "tools": json_values,
    "response_format": json_values,
}
chat_objects = st.fixed_dictionaries(
    {"model": st.just("fake") | texts, "messages": st.lists(messages, max_size=4) | json_values},
    optional=_OPTIONAL,
)
_plain_text = st.text(st.characters(codec="utf-8"), max_size=40)
valid_chats = st.fixed_dictionaries(
    {"model": st.just("fake"),
     "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": _plain_text
                                                 | st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                                   "text": _plain_text}),
                                                            min_size=1, max_size=2)}),
                          min_size=1, max_size=3)},
    optional={"stream": st.booleans(), "max_tokens": st.integers(1, 10**6), "temperature": st.floats(0, 2),
              "stream_options": st.just({"include_usage": True}), "seed": st.integers(0, 2**31)},
)  # fmt: skip


def _one_in(n: int) -> st.SearchStrategy[bool]:
    """True about once in ``n`` draws (Hypothesis favours boundary integers; a list draws evenly)."""
    return st.sampled_from([True] + [False] * (n - 1))


@st.composite
def chat_bodies(draw: st.DrawFn) -> bytes:
    """A chat body: mostly JSON objects of the right shape with wrong details, sometimes mangled bytes."""
    kind = draw(st.sampled_from(["valid"] * 3 + ["shaped"] * 4 + ["any"]))
    obj: Any = draw(valid_chats if kind == "valid" else chat_objects if kind == "shaped" else json_values)
    if kind != "valid" and draw(_one_in(8)) and isinstance(obj, dict):  # nesting around the limit (64)
        depth = draw(st.integers(1, 300))
        obj["x"] = json.loads("[" * depth + "]" * depth)
    text = json.dumps(obj, ensure_ascii=draw(st.booleans()))  # allow_nan: NaN and Infinity appear as such
    body = bytearray(text.encode("utf-8", "surrogatepass"))
    for _ in range(draw(st.sampled_from([0] * 6 + [1, 2, 3])) if kind != "valid" else 0):  # replace, insert, delete
        pos = draw(st.integers(0, len(body)))
        op = draw(st.integers(0, 2))
        byte = draw(st.sampled_from(b'[]{}",:\\\x00\xff\xc3\xed ') | st.integers(0, 255))
        if op == 0 and pos < len(body):
            body[pos] = byte
        elif op == 1:
            body.insert(pos, byte)
        elif pos < len(body):
            del body[pos]
    return bytes(body)


_METHODS = ["POST"] * 12 + ["GET"] * 3 + ["HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "post", "CONNECT"]
_PATHS = ["/v1/chat/completions"] * 12 + [
    "/v1/models", "/v1/models", "/healthz", "/readyz", "/metrics", "/invocations", "/tokenize", "/pause",
    "/v1/chat/completions?x=1", "/v1/chat/completions/", "/v1/chat/completions/../../invocations", "/v1//models",
    "http://127.0.0.1/invocations", "*", "/%2e%2e/invocations",
]  # fmt: skip
_TOKEN = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=12)
_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


@st.composite
def http_requests(draw: st.DrawFn, key: str) -> bytes:
    """One whole request: head and framed body."""
    method = draw(st.sampled_from(_METHODS))
    path = draw(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30) if draw(_one_in(12))
                else st.sampled_from(_PATHS))  # fmt: skip
    version = draw(st.sampled_from(["HTTP/1.1"] * 8 + ["HTTP/1.0", "HTTP/2.0"]))
    auth = draw(st.sampled_from([f"Bearer {key}"] * 8 + [f"bearer  {key} ", "Bearer ce_wrong", "Basic eDp5", "", key]))
    ctype = draw(st.sampled_from(["application/json"] * 8 + ["application/json; charset=utf-8", "text/plain", ""]))
    body = draw(chat_bodies()) if method in ("POST", "post", "PUT") else draw(st.sampled_from([b"", b"{}"]))
    head = [f"{method} {path} {version}", "host: gw"]
    if auth:
        head.append(f"authorization: {auth}")
    if ctype:
        head.append(f"content-type: {ctype}")
    head += [f"{n}: {v}" for n, v in draw(st.lists(st.tuples(_TOKEN, _VALUE), max_size=3))]
    if draw(_one_in(40)):
        head += [f"x-many-{i}: 1" for i in range(120)]
    expect = draw(st.sampled_from([""] * 10 + ["100-continue", "200-ok"]))
    if expect:
        head.append(f"expect: {expect}")
    framing = draw(st.sampled_from(["length"] * 8 + ["chunked", "both", "twice"]))
    raw_body = body
    if framing == "chunked" and version == "HTTP/1.1":
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=3)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if b > a]
        head.append("transfer-encoding: chunked")
        raw_body = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    elif framing == "both":  # refused by the parser, whatever follows
        head += [f"content-length: {len(body)}", "transfer-encoding: chunked"]
    elif framing == "twice":
        head += [f"content-length: {len(body)}", f"content-length: {len(body) + 1}"]
    elif body or method in ("POST", "post", "PUT"):
        head.append(f"content-length: {len(body)}")
    return "\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + raw_body
