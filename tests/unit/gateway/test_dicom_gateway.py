"""DICOM through the real gateway (plain HTTP, fake vLLM): converted in worker processes, forwarded as PNG, refused
with a 400 that says what was sent, every path giving back what the request held, and not one header value in
anything the run produced (the wire to vLLM, the audit log, the metrics, the error bodies, the logs)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydicom import uid

from appliance.gateway.dicom import convert_dicom
from appliance.gateway.workers import ConversionPool
from tests.unit.gateway.conftest import close_door, open_door
from tests.unit.gateway.dicomgen import MARKERS, crash_worker, data_url, dicom_file, private_marker, radiograph
from tests.unit.gateway.door import Door, chat_body

pytestmark = pytest.mark.asyncio

ROWS, COLS = 120, 160


@pytest.fixture
def gw(plain_door: Door) -> Door:
    """The plain-HTTP gateway of the battery's conftest."""
    return plain_door


def dicom_part(data: bytes) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": data_url(data)}}


def request(*parts: dict[str, Any], stream: bool = True) -> bytes:
    return chat_body([*parts, {"type": "text", "text": "Findings?"}], stream=stream)


def forwarded_pngs(raw: bytes) -> list[bytes]:
    body = json.loads(raw)
    urls = [p["image_url"]["url"] for m in body["messages"] for p in m["content"] if p.get("type") == "image_url"]
    assert all(u.startswith("data:image/png;base64,") for u in urls), [u[:40] for u in urls]
    return [base64.b64decode(u.split(",", 1)[1]) for u in urls]


async def test_a_dicom_reaches_vllm_as_the_png_it_renders_to(gw: Door) -> None:
    data = dicom_file(radiograph(ROWS, COLS, 12), uid.JPEGLSLossless, extra={"WindowCenter": 1800, "WindowWidth": 2400})
    resp = await gw.exchange(gw.post(request(dicom_part(data))))
    assert resp is not None and resp.status == 200, resp
    await gw.settle(1)
    (png,) = forwarded_pngs(gw.upstream.bodies[-1])
    want = base64.b64decode(convert_dicom(base64.b64encode(data), 10**8).png_base64)
    assert png == want
    assert np.asarray(Image.open(io.BytesIO(png))).shape == (ROWS, COLS)
    rec = gw.audit_lines()[-1]
    assert rec["status"] == 200 and rec["images"] == 1
    assert isinstance(rec["dicom"], list) and rec["dicom"][0].startswith(f"dicom, {COLS}×{ROWS}, 12 bit, JPEG-LS, ")


async def test_dicom_and_png_images_mix_in_one_request(gw: Door) -> None:
    png = io.BytesIO()
    Image.new("L", (32, 32), 90).save(png, "PNG")
    png_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    parts = [dicom_part(dicom_file(radiograph(ROWS, COLS, 12), uid.RLELossless)),
             {"type": "image_url", "image_url": {"url": png_url}},
             dicom_part(dicom_file(radiograph(64, 48, 12, seed=3)))]  # fmt: skip
    resp = await gw.exchange(gw.post(request(*parts, stream=False)))
    assert resp is not None and resp.status == 200, resp
    sizes = [Image.open(io.BytesIO(p)).size for p in forwarded_pngs(gw.upstream.bodies[-1])]
    assert sizes == [(COLS, ROWS), (32, 32), (48, 64)]
    await gw.settle(1)


@pytest.mark.parametrize(
    ("make", "code", "says"),
    [
        (lambda: dicom_file(np.concatenate([radiograph(ROWS, COLS)] * 3), extra={"NumberOfFrames": 3, "Rows": ROWS}),
         "unsupported_dicom", "3 frames"),
        (lambda: dicom_file(radiograph(ROWS, COLS, 8).astype(np.uint8), bits_stored=8, photometric="RGB",
                            extra={"SamplesPerPixel": 3}), "unsupported_dicom", "RGB"),
        (lambda: dicom_file(radiograph(ROWS, COLS))[:900], "invalid_dicom", "truncated"),
    ],
    ids=["multi-frame", "colour", "truncated"],
)  # fmt: skip
async def test_a_refused_dicom_is_a_400_saying_what_and_where(gw: Door, make: Any, code: str, says: str) -> None:
    resp = await gw.exchange(gw.post(request({"type": "text", "text": "x"}, dicom_part(make()))))
    assert resp is not None and resp.status == 400 and resp.code == code, resp
    message = resp.json()["error"]["message"]  # type: ignore[index]
    assert "messages[0].content[1] (DICOM) was refused" in message and says in message, message
    await gw.settle(1)
    assert gw.upstream.bodies == [] and gw.audit_lines()[-1]["reason"] == code
    await gw.healthy()


async def test_too_many_pixels_is_refused_with_the_image_limit(tmp_path: Path) -> None:
    door, task, runner = await open_door(tmp_path, tls=False, max_image_pixels=ROWS * COLS - 1)
    try:
        resp = await door.exchange(door.post(request(dicom_part(dicom_file(radiograph(ROWS, COLS), uid.RLELossless)))))
        assert resp is not None and resp.status == 400 and resp.code == "image_too_many_pixels", resp
        await door.settle(1)
    finally:
        await close_door(task, runner)


async def test_a_client_gone_during_conversion_gives_everything_back(gw: Door) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    real = gw.gateway.converter.convert

    async def slow(b64: bytes, max_pixels: int) -> Any:
        started.set()
        await release.wait()
        return await real(b64, max_pixels)

    gw.gateway.converter.convert = slow  # type: ignore[method-assign]
    _reader, writer = await gw.connect()
    writer.write(gw.post(request(dicom_part(dicom_file(radiograph(ROWS, COLS))))))
    await writer.drain()
    await asyncio.wait_for(started.wait(), 10)
    assert gw.gateway.admission.inflight == 1
    writer.close()
    await gw.settle(1)
    release.set()
    rec = gw.audit_lines()[-1]
    assert rec["status"] == 499 and rec["reason"] == "client_disconnected"
    assert gw.upstream.bodies == []
    gw.gateway.converter.convert = real  # type: ignore[method-assign]
    await gw.healthy()


async def test_a_worker_killed_by_a_file_is_a_400_and_the_pool_recovers(gw: Door) -> None:
    gw.gateway.converter.close()
    gw.gateway.converter = ConversionPool(1, crash_worker)
    data = dicom_file(radiograph(ROWS, COLS))
    resp = await gw.exchange(gw.post(request(dicom_part(data))))
    assert resp is not None and resp.status == 400 and resp.code == "invalid_dicom", resp
    assert "decoder failed" in resp.json()["error"]["message"]  # type: ignore[index]
    gw.gateway.converter._convert = convert_dicom  # the next file is fine: a fresh pool converts it
    resp = await gw.exchange(gw.post(request(dicom_part(data))))
    assert resp is not None and resp.status == 200, resp
    await gw.settle(2)


async def test_no_header_value_survives_anywhere(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Every identifying field carries a unique marker; after good and refused requests of every syntax, nothing
    the run produced holds any marker: the bytes vLLM received, the audit log, /metrics, the error bodies, the
    gateway's and its workers' output."""
    door, task, runner = await open_door(tmp_path, tls=False)
    answers: list[bytes] = []
    try:
        pixels = radiograph(ROWS, COLS, 12)
        good = [dicom_file(pixels, ts) for ts in (uid.ExplicitVRLittleEndian, uid.RLELossless, uid.JPEGLSLossless,
                                                  uid.JPEGLosslessSV1, uid.JPEG2000Lossless)]  # fmt: skip
        bad = [
            dicom_file(np.concatenate([pixels, pixels]), extra={"NumberOfFrames": 2, "Rows": ROWS}),
            dicom_file(pixels.astype(np.uint8), bits_stored=8, photometric="RGB", extra={"SamplesPerPixel": 3}),
            dicom_file(pixels)[:1200],
            dicom_file(pixels, uid.JPEGLSLossless, declare="1.2.826.0.1.3680043.99"),
            dicom_file(pixels, extra={"Rows": ROWS * 2}),
        ]
        for i, data in enumerate(good + bad):
            resp = await door.exchange(door.post(request(dicom_part(data), stream=i % 2 == 0)))
            assert resp is not None and resp.status == (200 if i < len(good) else 400), (i, resp)
            answers.append(resp.body + json.dumps(resp.headers).encode())
        metrics = await door.exchange(door.head("GET", "/metrics", length=0))
        assert metrics is not None and metrics.status == 200
        await door.settle(len(good) + len(bad))
        assert len(door.upstream.bodies) == len(good)
        assert b"dicom_images_total 5" in metrics.body
    finally:
        await close_door(task, runner)
    out, err = capfd.readouterr()
    produced = {
        "wire to vLLM": b"\n".join(door.upstream.bodies),
        "audit log": door.audit.read_bytes(),
        "metrics": metrics.body,
        "answers": b"\n".join(answers),
        "output": (out + err).encode(),
    }
    # The PNGs vLLM received, decoded: a marker must not hide in base64 either.
    pngs = b"".join(p for raw in door.upstream.bodies for p in forwarded_pngs(raw))
    produced["PNGs"] = pngs
    for marker in [*MARKERS.values(), private_marker()]:
        for where, text in produced.items():
            assert marker.encode() not in text, f"{marker!r} found in the {where}"
    assert produced["audit log"].count(b'"dicom":["dicom, ') == len(good)
