"""Request validation: every rejection path, and the forwarded body equals what was checked."""

from __future__ import annotations

import base64
import io
import json
import os
from typing import Any

import pytest
from PIL import Image

from appliance.gateway.validate import Limits, RejectedError, validate_chat

LIMITS = Limits(max_images=2, max_image_bytes=2_000_000, max_image_pixels=4_000_000, max_tokens_cap=256)


def png_url(size: tuple[int, int] = (64, 48), noise: bool = False) -> str:
    img = Image.new("L", size)
    if noise:
        img = Image.frombytes("L", size, os.urandom(size[0] * size[1]))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def body(*parts: dict[str, Any], **extra: Any) -> bytes:
    return json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "hi"}]}], **extra}
    ).encode()


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def forwarded(b: bytes) -> dict[str, Any]:
    return json.loads(b"".join(bytes(p) for p in validate_chat(b, LIMITS).body))  # type: ignore[no-any-return]


def rejected(b: bytes) -> RejectedError:
    with pytest.raises(RejectedError) as info:
        validate_chat(b, LIMITS)
    return info.value


def test_big_image_is_forwarded_byte_for_byte() -> None:
    url = png_url((700, 700), noise=True)
    assert len(url) > 100_000
    sent = json.loads(body(image(url), stream=True))
    got = forwarded(body(image(url), stream=True))
    assert got["messages"] == sent["messages"]
    req = validate_chat(body(image(url)), LIMITS)
    assert req.images == 1 and req.image_bytes == len(base64.b64decode(url.split(",", 1)[1]))
    assert any(isinstance(p, memoryview) for p in req.body), "the big image should not be copied"


def test_n_forced_and_max_tokens_capped() -> None:
    got = forwarded(body(n=4, best_of=4, max_tokens=100_000, max_completion_tokens=10))
    assert got["n"] == 1 and "best_of" not in got
    assert got["max_tokens"] == 256 and got["max_completion_tokens"] == 10
    assert forwarded(body())["max_tokens"] == 256


@pytest.mark.parametrize(
    ("url", "code", "text"),
    [
        ("https://example.org/x.png", "image_url_not_inline", "never downloads images"),
        ("http://169.254.169.254/latest", "image_url_not_inline", "Send the radiograph inline"),
        ("file:///etc/passwd", "image_url_not_inline", "'file:'"),
        ("ftp://server/x.png", "image_url_not_inline", "'ftp:'"),
        ("/tmp/x.png", "image_url_not_inline", "no scheme"),
        ("data:image/gif;base64,R0lGODlhAQABAAAAACw=", "unsupported_image_type", "image/gif"),
        ("data:application/pdf;base64,JVBERi0=", "unsupported_image_type", "application/pdf"),
        ("data:image/png,rawbytes", "image_not_base64", "base64-encoded"),
        ("data:image/png;base64,@@@@not+base64+at+all!!!", "invalid_image", "not valid base64"),
        ("data:image/jpeg;base64," + png_url().split(",", 1)[1], "invalid_image", "declared image/jpeg"),
    ],
)
def test_image_urls_that_are_refused(url: str, code: str, text: str) -> None:
    err = rejected(body(image(url)))
    assert (err.status, err.code) == (400, code)
    assert text in err.message
    assert "base64" not in err.message.split("data:image/png;base64,")[-1][:0]  # never echoes the payload
    assert url[30:] not in err.message or len(url) < 40


@pytest.mark.parametrize(
    "part",
    [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,AAAA"}},
        {"type": "video_url", "video_url": {"url": "https://x/y.mp4"}},
        {"type": "image_embeds", "image_embeds": "AAAA"},
        {"type": "file", "file": {"file_data": "AAAA"}},
    ],
)
def test_audio_video_and_other_parts_are_refused(part: dict[str, Any]) -> None:
    err = rejected(body(part))
    assert (err.status, err.code) == (400, "unsupported_content_type")
    assert "'text' and 'image_url' parts only" in err.message


def test_text_part_smuggling_media_is_refused() -> None:
    err = rejected(body({"type": "text", "text": "x", "image_url": {"url": "https://x"}}))
    assert err.code == "invalid_content"


def test_limits() -> None:
    assert rejected(body(*[image(png_url())] * 3)).code == "too_many_images"
    err = rejected(body(image(png_url((2100, 2000)))))
    assert err.code == "image_too_many_pixels" and "2100x2000" in err.message
    big = png_url((1500, 1500), noise=True)
    assert rejected(body(image(big))).code == "image_too_large"


def test_malformed_requests() -> None:
    assert rejected(b"{not json").code == "invalid_json"
    assert rejected(b"[1, 2]").code == "invalid_json"
    assert rejected(json.dumps({"model": "m", "messages": []}).encode()).code == "invalid_messages"
    assert rejected(body(max_tokens=-1)).code == "invalid_max_tokens"
    assert rejected(body(chat_template="{{ x }}")).code == "field_not_allowed"


def test_marker_after_other_text_is_not_trusted() -> None:
    """A data URL whose base64 run starts after other text must be checked whole, not just the tail."""
    real = png_url((700, 700), noise=True).split(",", 1)[1]
    url = "data:image/png;base64,XXXX;base64," + real
    err = rejected(body(image(url)))
    assert err.status == 400


def test_base64_text_inside_a_prompt_is_left_alone() -> None:
    text = "see data:image/png;base64," + "A" * 2000
    got = forwarded(json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode())
    assert got["messages"][0]["content"] == text
