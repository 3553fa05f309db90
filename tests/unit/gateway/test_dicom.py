"""DICOM to PNG (:mod:`appliance.gateway.dicom`): every supported transfer syntax and photometric interpretation
rendered like an independent numpy reference, and every malformed or unsupported file refused with a 400's message
that quotes nothing from the header."""

from __future__ import annotations

import base64
import io
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from appliance.gateway.dicom import DicomError, convert_dicom
from tests.unit.gateway.dicomgen import MARKERS, compress, dicom_file, private_marker, radiograph

CAP = 50_000_000
ROWS, COLS = 96, 128
LOSSLESS = [
    uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.ExplicitVRBigEndian, uid.RLELossless,
    uid.JPEGLossless, uid.JPEGLosslessSV1, uid.JPEGLSLossless, uid.JPEG2000Lossless,
]  # fmt: skip
LOSSY = [uid.JPEGBaseline8Bit, uid.JPEG2000]
WINDOW = {"WindowCenter": 1800, "WindowWidth": 2400}


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def png_pixels(png_base64: bytes) -> NDArray[np.uint8]:
    img = Image.open(io.BytesIO(base64.b64decode(png_base64)))
    assert img.format == "PNG" and img.mode == "L"
    return np.asarray(img)


def reference(pixels: NDArray[Any], center: float, width: float, *, slope: float = 1, intercept: float = 0,
              monochrome1: bool = False) -> NDArray[np.uint8]:  # fmt: skip
    """PS3.3 C.11.2.1.2.1 (LINEAR) written out independently of the gateway's code."""
    x = pixels.astype(np.float64) * slope + intercept
    y = np.where(
        x <= center - 0.5 - (width - 1) / 2,
        0.0,
        np.where(x > center - 0.5 + (width - 1) / 2, 1.0, ((x - (center - 0.5)) / (width - 1) + 0.5)),
    )
    if monochrome1:
        y = 1.0 - y
    return np.round(y * 255).astype(np.uint8)


def pixels_for(ts: str) -> tuple[NDArray[Any], int]:
    if ts == uid.JPEGBaseline8Bit:
        return (radiograph(ROWS, COLS, 8)).astype(np.uint8), 8
    return radiograph(ROWS, COLS, 12), 12


def convert(data: bytes, cap: int = CAP) -> NDArray[np.uint8]:
    return png_pixels(convert_dicom(b64(data), cap).png_base64)


def refused(data: bytes, cap: int = CAP) -> DicomError:
    with pytest.raises(DicomError) as info:
        convert_dicom(b64(data), cap)
    err = info.value
    for marker in [*MARKERS.values(), private_marker()]:
        assert marker not in str(err), f"the error quotes a header field: {err}"
    return err


# --- every syntax and photometric interpretation, against the reference ----------------------------------------


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("ts", LOSSLESS + LOSSY, ids=lambda t: uid.UID(t).keyword)
def test_each_syntax_renders_like_the_reference(ts: str, photometric: str) -> None:
    pixels, bits = pixels_for(ts)
    window = WINDOW if bits == 12 else {"WindowCenter": 128, "WindowWidth": 200}
    data = dicom_file(pixels, ts, bits_stored=bits, photometric=photometric, extra=window)
    got = convert(data)
    want = reference(pixels, window["WindowCenter"], window["WindowWidth"], monochrome1=photometric == "MONOCHROME1")
    assert got.shape == (ROWS, COLS)
    diff = np.abs(got.astype(int) - want.astype(int))
    if ts in LOSSLESS:
        assert diff.max() <= 1, f"lossless {ts}: max difference {diff.max()}"
    else:
        assert diff.mean() < 3, f"lossy {ts}: mean difference {diff.mean():.2f}"
    image = convert_dicom(b64(data), CAP)
    assert image.describe().startswith(f"dicom, {COLS}×{ROWS}, {bits} bit, ")


def test_modality_rescale_comes_before_the_window() -> None:
    pixels = radiograph(ROWS, COLS, 12)
    data = dicom_file(pixels, extra={"RescaleSlope": 2, "RescaleIntercept": -1000, "WindowCenter": 2600,
                                     "WindowWidth": 4000})  # fmt: skip
    want = reference(pixels, 2600, 4000, slope=2, intercept=-1000)
    assert np.abs(convert(data).astype(int) - want.astype(int)).max() <= 1


def test_a_voi_lut_sequence_wins_over_percentiles() -> None:
    pixels = radiograph(ROWS, COLS, 12)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    lut = (np.sqrt(np.arange(4096) / 4095) * 65535).astype(np.uint16)  # a gamma curve: nothing linear matches it
    item.LUTData = lut.tobytes()
    item["LUTData"].VR = "OW"
    data = dicom_file(pixels, extra={"VOILUTSequence": Sequence([item])})
    want = np.round(lut[pixels] / 65535 * 255).astype(np.uint8)
    assert np.abs(convert(data).astype(int) - want.astype(int)).max() <= 1


def test_without_a_window_the_percentiles_span_the_grey_range() -> None:
    pixels = radiograph(ROWS * 4, COLS * 4, 16)
    got = convert(dicom_file(pixels, bits_stored=16))
    low, high = np.percentile(pixels, [0.5, 99.5])
    want = np.round(np.clip((pixels - low) / (high - low), 0, 1) * 255).astype(np.uint8)
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.mean() < 2, "the percentile window is estimated from a sample: close, not exact"
    assert (got == 0).mean() < 0.02 and (got == 255).mean() < 0.02 and got.std() > 40


def test_monochrome1_is_the_negative_of_monochrome2() -> None:
    pixels = radiograph(ROWS, COLS, 12)
    two = convert(dicom_file(pixels, photometric="MONOCHROME2"))
    one = convert(dicom_file(pixels, photometric="MONOCHROME1"))
    assert np.abs((255 - two.astype(int)) - one.astype(int)).max() <= 1


def test_the_png_carries_no_text_chunks_and_no_header_value() -> None:
    data = dicom_file(radiograph(ROWS, COLS, 12), uid.JPEGLSLossless, extra=WINDOW)
    png = base64.b64decode(convert_dicom(b64(data), CAP).png_base64)
    chunks, pos = [], 8
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos : pos + 8])
        chunks.append(kind)
        pos += 12 + length
    assert chunks == [b"IHDR", b"IDAT", b"IEND"]
    for marker in [*MARKERS.values(), private_marker()]:
        assert marker.encode() not in png


# --- refused before decoding ------------------------------------------------------------------------------------


def test_multi_frame_is_refused_saying_so() -> None:
    pixels = radiograph(ROWS, COLS, 12)
    two = np.concatenate([pixels, pixels])  # two frames back to back
    data = dicom_file(two, extra={"NumberOfFrames": 2, "Rows": ROWS})
    err = refused(data)
    assert err.code == "unsupported_dicom" and "2 frames" in str(err) and "CBCT" in str(err)


def test_colour_is_refused_saying_so() -> None:
    pixels = radiograph(ROWS, COLS, 8).astype(np.uint8)
    data = dicom_file(pixels, bits_stored=8, photometric="RGB", extra={"SamplesPerPixel": 3})
    err = refused(data)
    assert err.code == "unsupported_dicom" and "RGB" in str(err) and "greyscale" in str(err)


@pytest.mark.parametrize(
    ("ts", "declared"),
    [(uid.JPEGLSLossless, uid.JPEGExtended12Bit), (uid.JPEGLSLossless, "1.2.826.0.1.3680043.99"),
     (uid.JPEGLSLossless, uid.DeflatedExplicitVRLittleEndian), (uid.JPEG2000Lossless, "1.2.840.10008.1.2.4.94")],
)  # fmt: skip
def test_an_unsupported_syntax_is_refused_naming_only_standard_ones(ts: str, declared: str) -> None:
    data = dicom_file(radiograph(ROWS, COLS, 12), ts, declare=declared)
    err = refused(data)
    assert err.code == "unsupported_dicom" and "JPEG-LS" in str(err), str(err)
    known = uid.UID(declared)
    if known.is_transfer_syntax and known.name != declared:
        assert known.name in str(err)
    else:
        assert "unknown transfer syntax" in str(err) and declared not in str(err)


def test_pixel_count_over_the_cap_is_refused_before_decoding() -> None:
    data = dicom_file(radiograph(ROWS, COLS, 12), uid.JPEGLSLossless)
    err = refused(data, cap=ROWS * COLS - 1)
    assert err.code == "image_too_many_pixels" and "MP" in str(err)


def test_a_jpeg2000_bomb_is_refused_before_decoding() -> None:
    """A tiny J2K stream whose own header claims 60000x60000 inside a 96x128 DICOM: the decoder would follow it."""
    stream = bytearray(dicom_file_frame(uid.JPEG2000Lossless))
    siz = stream.find(b"\xff\x51")
    stream[siz + 6 : siz + 14] = struct.pack(">II", 60000, 60000)
    data = dicom_file(radiograph(ROWS, COLS, 12), uid.JPEG2000Lossless, frame=bytes(stream))
    err = refused(data)
    assert "60000x60000" in str(err) and f"{COLS}x{ROWS}" in str(err)


def test_a_jpeg_ls_stream_larger_than_its_header_is_refused() -> None:
    stream = bytearray(dicom_file_frame(uid.JPEGLSLossless))
    sof = stream.find(b"\xff\xf7")
    stream[sof + 5 : sof + 9] = struct.pack(">HH", 40000, 40000)
    err = refused(dicom_file(radiograph(ROWS, COLS, 12), uid.JPEGLSLossless, frame=bytes(stream)))
    assert "40000x40000" in str(err)


def test_an_rle_bomb_is_refused() -> None:
    """Runs that would unpack far beyond the frame: GDCM decodes into a buffer of the header's size."""
    segment = b"\x81\x00" * 200_000  # 128 zero bytes per two stream bytes: 25 MB from 400 kB
    header = struct.pack("<16I", 2, 64, 64 + len(segment), *([0] * 13))
    err = refused(dicom_file(radiograph(ROWS, COLS, 12), uid.RLELossless, frame=header + segment + segment))
    assert err.code == "invalid_dicom"


def test_truncated_files_are_refused() -> None:
    data = dicom_file(radiograph(ROWS, COLS, 12))
    for cut in (100, 200, 400, len(data) // 2, len(data) - 1):
        assert refused(data[:cut]).code in ("invalid_dicom", "unsupported_dicom")
    compressed = dicom_file(radiograph(ROWS, COLS, 12), uid.JPEGLSLossless)
    assert refused(compressed[: len(compressed) - 300]).code == "invalid_dicom"


def test_lying_lengths_are_refused() -> None:
    data = bytearray(dicom_file(radiograph(ROWS, COLS, 12)))
    at = data.find(b"\x10\x00\x10\x00PN")  # PatientName (0010,0010), explicit VR: a 2-byte length follows
    data[at + 6 : at + 8] = b"\xff\xff"  # swallows the elements after it, Pixel Data included
    assert refused(bytes(data)).code == "invalid_dicom"
    short = bytearray(dicom_file(radiograph(ROWS, COLS, 12)))
    at = short.rfind(b"\xe0\x7f\x10\x00OW\x00\x00")
    short[at + 8 : at + 12] = struct.pack("<I", ROWS * COLS)  # half the frame: the rest parses as garbage
    assert refused(bytes(short)).code == "invalid_dicom"
    rows = dicom_file(radiograph(ROWS, COLS, 12), extra={"Rows": ROWS * 2})  # more rows than pixels
    assert "shorter" in str(refused(rows))


def test_not_dicom_and_not_base64_are_refused() -> None:
    png = io.BytesIO()
    Image.new("L", (8, 8)).save(png, "PNG")
    assert refused(png.getvalue()).code == "invalid_dicom"
    with pytest.raises(DicomError, match="not valid base64"):
        convert_dicom(b"AAA*", CAP)


def test_a_file_without_pixels_is_refused() -> None:
    data = dicom_file(radiograph(ROWS, COLS, 12))
    at = data.rfind(b"\xe0\x7f\x10\x00")
    assert "no Pixel Data" in str(refused(data[:at]))


def dicom_file_frame(ts: str) -> bytes:
    """The compressed frame a file of ``ts`` would carry."""
    return compress(radiograph(ROWS, COLS, 12), 12, ts)


# --- mangled files: refused with a DicomError, never another exception (or a crash of the codec) ----------------

_SEEDS = {ts: dicom_file(radiograph(24, 32, 12), ts) for ts in (uid.ExplicitVRLittleEndian, uid.RLELossless,
                                                                 uid.JPEGLSLossless, uid.JPEG2000Lossless)}  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ts=st.sampled_from(sorted(_SEEDS)),
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.none() | st.floats(0, 1),
)
def test_mangled_files_are_converted_or_refused_cleanly(
    ts: str, edits: list[tuple[float, int]], cut: float | None
) -> None:
    data = bytearray(_SEEDS[ts])
    for where, value in edits:
        data[int(where * len(data))] = value
    if cut is not None:
        del data[int(cut * len(data)) :]
    try:
        image = convert_dicom(b64(bytes(data)), 4096)
    except DicomError as err:
        assert err.code in ("invalid_dicom", "unsupported_dicom", "image_too_many_pixels")
        return
    assert png_pixels(image.png_base64).shape == (image.height, image.width)
