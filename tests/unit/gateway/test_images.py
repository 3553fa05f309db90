"""Image facts from base64 header bytes: formats, dimensions, malformed input."""

from __future__ import annotations

import base64
import io
import re

import pytest
from PIL import Image

from appliance.gateway.images import ImageError, sniff_base64_image


def _b64(fmt: str, size: tuple[int, int], **save: object) -> bytes:
    buf = io.BytesIO()
    Image.new("L" if fmt != "WEBP" else "RGB", size).save(buf, fmt, **save)
    return base64.b64encode(buf.getvalue())


@pytest.mark.parametrize(
    ("fmt", "declared", "save"),
    [
        ("PNG", "png", {}),
        ("JPEG", "jpeg", {}),
        ("JPEG", "jpeg", {"progressive": True}),
        ("JPEG", "jpeg", {"exif": b"Exif\x00\x00" + b"\x00" * 3000}),  # an APP1 segment before the frame header
        ("WEBP", "webp", {"lossless": True}),
        ("WEBP", "webp", {"quality": 50}),
    ],
)
def test_dimensions_and_size_come_from_the_header(fmt: str, declared: str, save: dict[str, object]) -> None:
    text = _b64(fmt, (301, 157), **save)
    facts = sniff_base64_image(declared, text)
    assert (facts.format, facts.width, facts.height) == (declared, 301, 157)
    assert facts.decoded_bytes == len(base64.b64decode(text))


def test_a_slice_of_a_bigger_buffer_is_read_in_place() -> None:
    text = _b64("PNG", (40, 30))
    buf = b'{"url":"data:image/png;base64,' + text + b'"}'
    start = buf.index(text)
    facts = sniff_base64_image("png", buf, start, start + len(text))
    assert (facts.width, facts.height) == (40, 30)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"not base64 at all!!", "multiple of 4"),
        (b"!!!!" * 40, "not valid base64"),
        (_b64("PNG", (8, 8))[:-5], "multiple of 4"),
        (b"QUJD=" + b"QUJD" * 10 + b"===", "padding"),
        (base64.b64encode(b"GIF89a" + b"\x00" * 40), "not a PNG, JPEG or WebP"),
    ],
)
def test_malformed_input_is_refused(text: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=re.escape(message)):
        sniff_base64_image("png", text)


def test_padding_in_the_middle_is_refused() -> None:
    good = _b64("PNG", (8, 8))
    bad = good[:8] + b"====" + good[12:]
    with pytest.raises(ImageError, match=r"padding|not valid"):
        sniff_base64_image("png", bad)


def test_declared_type_must_match_the_bytes() -> None:
    with pytest.raises(ImageError, match="declared image/jpeg but its bytes are PNG"):
        sniff_base64_image("jpeg", _b64("PNG", (8, 8)))


def test_corrupt_tail_is_caught_without_a_full_scan() -> None:
    good = _b64("PNG", (64, 64))
    bad = good[:-8] + b"*&^%" + good[-4:]
    with pytest.raises(ImageError, match="not valid base64"):
        sniff_base64_image("png", bad)


def test_optional_full_alphabet_check() -> None:
    good = bytearray(_b64("PNG", (200, 200)))
    good[len(good) // 2] = ord("*")
    sniff_base64_image("png", bytes(good))  # the default leaves a middle character to vLLM
    with pytest.raises(ImageError, match="alphabet"):
        sniff_base64_image("png", bytes(good), check_alphabet=True)
