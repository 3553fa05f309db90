"""DICOM radiographs turned into the PNG the model reads: in memory, off the event loop, nothing of the header kept.

A workstation may send the radiograph as the imaging system stores it (``data:application/dicom;base64,...``). The
gateway reads the file with pydicom, checks it before any pixel is decoded (one greyscale frame, a transfer syntax
from :data:`SYNTAXES`, at most ``max_pixels`` pixels in the header *and* in the compressed stream's own frame
header, so a small stream cannot unpack into a huge image), decodes it (GDCM for every compressed syntax), renders
it for display the way a viewer does (PS3.3 C.11: modality LUT, then the VOI LUT or window the file carries, else a
0.5–99.5 percentile window; MONOCHROME1 inverted) and writes an 8-bit greyscale PNG. Only that PNG and a few
technical facts (:class:`DicomImage`) leave :func:`convert_dicom`: patient name, IDs, dates, UIDs and every other
header field stay in the parsed dataset, which is dropped when the call returns. Error messages quote no header
value: only numbers (size, frames, bits) and names from the DICOM standard's own tables.

:func:`convert_dicom` blocks (tens to hundreds of milliseconds; ``bench/bench_dicom.py``) and GDCM holds the
interpreter lock while it decodes, so the gateway runs it in worker processes (:mod:`workers`), never in its own.
"""

from __future__ import annotations

import binascii
import io
import logging
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Any

import gdcm  # type: ignore[import-untyped]
import numpy as np
import pydicom
import pydicom.config
from numpy.typing import NDArray
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels.processing import apply_modality_lut, apply_voi
from pydicom.pixels.utils import pixel_array

__all__ = ["SUPPORTED", "SYNTAXES", "DicomError", "DicomImage", "convert_dicom", "png_bytes", "render"]

# The transfer syntaxes dental imaging systems write, by the name the audit line and errors use.
SYNTAXES: dict[str, str] = {
    uid.ImplicitVRLittleEndian: "uncompressed",
    uid.ExplicitVRLittleEndian: "uncompressed",
    uid.ExplicitVRBigEndian: "uncompressed",
    uid.JPEGBaseline8Bit: "JPEG baseline",
    uid.JPEGLossless: "JPEG lossless",
    uid.JPEGLosslessSV1: "JPEG lossless",
    uid.JPEGLSLossless: "JPEG-LS",
    uid.JPEGLSNearLossless: "JPEG-LS",
    uid.JPEG2000Lossless: "JPEG 2000",
    uid.JPEG2000: "JPEG 2000",
    uid.RLELossless: "RLE",
}
SUPPORTED = (
    "single-frame greyscale (MONOCHROME1 or MONOCHROME2) images, 8 to 16 bits, uncompressed or compressed as JPEG "
    "baseline, JPEG lossless, JPEG-LS, JPEG 2000 or RLE"
)
_GREY = ("MONOCHROME1", "MONOCHROME2")
_NATIVE = frozenset((uid.ImplicitVRLittleEndian, uid.ExplicitVRLittleEndian, uid.ExplicitVRBigEndian))
# Photometric interpretations the standard defines: the only values an error may echo.
_KNOWN_PHOTOMETRIC = frozenset(
    ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT",
     "YBR_RCT", "HSV", "ARGB", "CMYK", "YBR_PARTIAL_422")
)  # fmt: skip
_PERCENTILES = (0.5, 99.5)  # the window when the file carries none: robust to burned-in labels and collimation
_SAMPLE_TARGET = 1 << 18  # pixels the percentile window is estimated from (a strided sample: exact enough, fast)
_PNG_LEVEL = 0  # see png_bytes
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}  # 0xF7: JPEG-LS (SOF55)

# pydicom reports odd values as warnings and log lines that quote them (a malformed birth date, a long name): the
# gateway must never print header values, so it reads leniently and silently.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
logging.getLogger("pydicom").disabled = True


class DicomError(ValueError):
    """The DICOM file cannot be shown to the model; the message says why and quotes no header value."""

    def __init__(self, message: str, code: str = "invalid_dicom") -> None:
        super().__init__(message, code)  # both in args: the error is pickled back from a worker process
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class DicomImage:
    """What a conversion hands on: the PNG (base64, ready to splice) and the technical facts the audit line keeps."""

    png_base64: bytes
    width: int
    height: int
    bits: int
    syntax: str
    ms: float

    def describe(self) -> str:
        """The audit line's summary, e.g. ``dicom, 2440×1292, 12 bit, JPEG-LS, 38 ms``."""
        return f"dicom, {self.width}×{self.height}, {self.bits} bit, {self.syntax}, {self.ms:.0f} ms"


def _int(ds: Dataset, keyword: str, default: int) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DicomError(f"its {keyword} is not a number") from None


def _refuse_deflated(data: bytes) -> None:
    """Deflated files are refused before pydicom reads them: it inflates the whole dataset in memory, unbounded (a
    12 MB zip bomb is gigabytes). The file meta group is small and uncompressed; its length is its first element."""
    known = data[128:132] == b"DICM" and data[132:140] == b"\x02\x00\x00\x00UL\x04\x00"
    end = 144 + int.from_bytes(data[140:144], "little") if known else 1024
    if uid.DeflatedExplicitVRLittleEndian.encode() in data[128 : min(end, 4096)]:
        raise DicomError(
            f"its transfer syntax is '{uid.DeflatedExplicitVRLittleEndian.name}'; supported are {SUPPORTED}",
            "unsupported_dicom",
        )


def _read(data: bytes) -> Dataset:
    _refuse_deflated(data)
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        for _ in ds.iterall():  # pydicom parses values when first touched: make a malformed one fail here
            pass
        return ds
    except Exception:  # any failure to parse: pydicom's messages may quote the bytes it choked on
        raise DicomError(
            "it is not a readable DICOM file (truncated, or a length in its header runs past the data); send the "
            "file exactly as the imaging system stored it (DICOM Part 10, with the 'DICM' preamble)"
        ) from None


def _syntax(ds: Dataset) -> tuple[str, str]:
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    name = SYNTAXES.get(ts)
    if name is None:
        known = uid.UID(ts)
        # Only a name from the standard's table is echoed: a made-up UID could carry anything.
        shown = f"'{known.name}'" if known.is_transfer_syntax and known.name != ts else "an unknown transfer syntax"
        raise DicomError(f"its transfer syntax is {shown}; supported are {SUPPORTED}", "unsupported_dicom")
    return ts, name


def _codestream_size(frame: bytes, ts: str) -> tuple[int, int] | None:
    """(width, height) from a compressed frame's own header (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ); None: RLE."""
    if ts in uid.JPEG2000TransferSyntaxes:
        start = frame.find(b"\xff\x4f\xff\x51")  # SOC then SIZ: a JP2 wrapper may come first
        if start < 0 or len(frame) < start + 24:
            raise DicomError("its JPEG 2000 stream has no image header (SIZ)")
        xsiz, ysiz, xo, yo = struct.unpack(">IIII", frame[start + 8 : start + 24])
        return xsiz - xo, ysiz - yo
    if ts == uid.RLELossless:
        return None
    pos = 2
    for _ in range(256):
        if frame[pos : pos + 1] != b"\xff" or len(frame) < pos + 4:
            break
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker in _JPEG_SOF and len(frame) >= pos + 9:
            height, width = struct.unpack(">HH", frame[pos + 5 : pos + 9])
            return width, height
        if marker in (0xD9, 0xDA):
            break
        pos += 2 + struct.unpack(">H", frame[pos + 2 : pos + 4])[0]
    raise DicomError("its JPEG stream has no frame header (SOF)")


def _decode_rle(ds: Dataset, width: int, height: int) -> NDArray[Any]:
    """RLE through GDCM, which decodes into a buffer of the header's size: pydicom's own RLE decoder grows its
    output as long as the runs go on (a 12 MB stream of runs is 768 MB)."""
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(frame)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((width, height, 1))
    image.SetDataElement(element)
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(gdcm.PhotometricInterpretation.MONOCHROME2))
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.RLELossless))
    allocated, stored, signed = int(ds.BitsAllocated), int(ds.BitsStored), int(ds.get("PixelRepresentation", 0))
    image.SetPixelFormat(gdcm.PixelFormat(1, allocated, stored, stored - 1, signed))
    buffer = image.GetBuffer()
    if buffer is None:
        raise ValueError("GDCM could not decode the RLE frame")
    raw = buffer.encode("utf-8", "surrogateescape")  # GDCM hands bytes over as a surrogate-escaped str
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    return np.frombuffer(raw, dtype, count=width * height).reshape(height, width)


def _decode(ds: Dataset, ts: str, width: int, height: int) -> NDArray[Any]:
    if ts == uid.RLELossless:
        return _decode_rle(ds, width, height)
    return pixel_array(ds, decoding_plugin="" if ts in _NATIVE else "gdcm")


def _check(ds: Dataset, ts: str, max_pixels: int) -> tuple[int, int, int]:
    """Everything checked before decoding; (width, height, bits stored)."""
    if "PixelData" not in ds:
        raise DicomError(
            "it holds no image (no Pixel Data): the file is truncated, or it is not an image object (a report, a "
            "worklist); send the radiograph's file as the imaging system stored it"
        )
    frames = _int(ds, "NumberOfFrames", 1)
    if frames != 1:
        raise DicomError(
            f"it holds {frames} frames (a CBCT volume or a series); the gateway accepts {SUPPORTED}. Send one "
            "radiograph, or export a single slice or view from the imaging software",
            "unsupported_dicom",
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    samples = _int(ds, "SamplesPerPixel", 1)
    if samples != 1 or photometric not in _GREY:
        shown = photometric if photometric in _KNOWN_PHOTOMETRIC else "not stated"
        raise DicomError(
            f"it is a colour or non-greyscale image ({samples} samples per pixel, photometric interpretation "
            f"{shown[:20]}); the gateway accepts {SUPPORTED}. Send it as a PNG or JPEG instead",
            "unsupported_dicom",
        )
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    allocated, stored = _int(ds, "BitsAllocated", 0), _int(ds, "BitsStored", 0)
    if rows <= 0 or cols <= 0:
        raise DicomError("its header gives a zero width or height")
    if rows * cols > max_pixels:
        raise DicomError(
            f"it is {cols}x{rows} pixels ({rows * cols / 1e6:.1f} MP); the limit is {max_pixels / 1e6:.1f} MP. "
            "Downscale it before sending",
            "image_too_many_pixels",
        )
    if allocated not in (8, 16) or not 1 <= stored <= allocated:
        raise DicomError(
            f"it has {stored} bits stored in {allocated}; the gateway accepts {SUPPORTED}", "unsupported_dicom"
        )
    if ts not in _NATIVE:
        try:
            frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        except Exception:
            raise DicomError("its compressed pixel data is malformed (no complete frame)") from None
        size = _codestream_size(frame, ts)
        if size is not None and size != (cols, rows):
            # The decoder would follow the stream, not the header: a few bytes could claim a gigapixel.
            raise DicomError(
                f"its compressed image is {size[0]}x{size[1]} pixels but its header says {cols}x{rows}; the file "
                "is damaged or was edited",
            )
    elif len(ds.PixelData) < rows * cols * allocated // 8:
        raise DicomError("its pixel data is shorter than its header says (truncated)")
    return cols, rows, stored


def _window(values: NDArray[np.float64], sample: NDArray[np.float64], ds: Dataset) -> NDArray[np.float64]:
    """``values`` (modality units) mapped to 0..1 for display: the file's VOI LUT or window (PS3.3 C.11.2), else a
    percentile window estimated from ``sample``."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        descriptor = ds.VOILUTSequence[0].get("LUTDescriptor")
        out_bits = int(descriptor[2]) if descriptor and 8 <= int(descriptor[2]) <= 16 else 16
        entries = np.rint(values).astype(np.int64)  # a LUT is indexed by whole modality values
        out: NDArray[np.float64] = apply_voi(entries, ds, index=0).astype(np.float64) / float((1 << out_bits) - 1)
        return np.clip(out, 0.0, 1.0, out=out)
    center = width = None
    if "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            center = float(ds.WindowCenter[0] if ds["WindowCenter"].VM > 1 else ds.WindowCenter)
            width = float(ds.WindowWidth[0] if ds["WindowWidth"].VM > 1 else ds.WindowWidth)
        except (TypeError, ValueError, IndexError):
            center = width = None
    function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper()
    if center is None or width is None or not width > 0:
        low, high = (float(v) for v in np.percentile(sample, _PERCENTILES))
        out = (values - low) / max(high - low, 1e-9)
    elif function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    elif function == "LINEAR_EXACT":
        out = (values - (center - width / 2)) / width
    else:  # LINEAR (C.11.2.1.2.1), with its half-step offsets; a width under 1 is treated as 1 (a threshold)
        out = (values - (center - 0.5)) / max(width - 1, 1e-9) + 0.5
    return np.clip(out, 0.0, 1.0, out=out)


def render(ds: Dataset, pixels: NDArray[Any]) -> NDArray[np.uint8]:
    """The 8-bit display image of a decoded greyscale frame: modality LUT, VOI, MONOCHROME1 inverted.

    Computed once per possible stored value (at most 65,536) and applied as a lookup table: one pass over the
    pixels instead of a handful of floating-point passes.
    """
    if pixels.dtype.itemsize > 2 or pixels.dtype.kind not in "iu":
        raise DicomError(f"its pixels decoded as {pixels.dtype.itemsize * 8}-bit values; at most 16 are supported")
    unsigned = np.dtype(f"u{pixels.dtype.itemsize}")
    index = pixels.view(unsigned)  # signed values index the table by their two's-complement bit pattern
    domain = np.arange(1 << (8 * pixels.dtype.itemsize), dtype=unsigned).view(pixels.dtype)
    modality = np.asarray(apply_modality_lut(domain, ds), dtype=np.float64)
    step = max(1, int((pixels.size / _SAMPLE_TARGET) ** 0.5))
    shown = _window(modality, modality[index[::step, ::step]], ds)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        shown = 1.0 - shown
    table = (shown * 255.0 + 0.5).astype(np.uint8)
    image: NDArray[np.uint8] = table[index]
    return image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(image: NDArray[np.uint8]) -> bytes:
    """An 8-bit greyscale PNG, stored uncompressed (zlib level 0, filter None).

    It travels only over loopback to vLLM: compressing it (zlib level 1) took 50 ms for a panoramic, more than
    the whole conversion budget, to save 2 MB on a local socket (``bench/bench_dicom.py`` measures it).
    """
    height, width = image.shape
    rows = np.zeros((height, width + 1), np.uint8)  # each row: filter type 0, then the pixels
    rows[:, 1:] = image
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(rows.data, _PNG_LEVEL)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def convert_dicom(b64: bytes | bytearray | memoryview, max_pixels: int) -> DicomImage:
    """The PNG (base64) of the DICOM file whose base64 is ``b64``; raises :class:`DicomError` (a 400's message)."""
    started = time.perf_counter()
    try:
        data = binascii.a2b_base64(b64, strict_mode=True)
    except binascii.Error:
        raise DicomError("it is not valid base64") from None
    ds = _read(data)
    ts, syntax = _syntax(ds)
    width, height, bits = _check(ds, ts, max_pixels)
    try:
        pixels = _decode(ds, ts, width, height)
    except Exception:  # the codec's message may quote the stream; ours says what to do
        raise DicomError(
            f"its {syntax} pixel data could not be decoded (damaged, or a variant the gateway cannot read); send it "
            "uncompressed or as PNG"
        ) from None
    if pixels.shape != (height, width):
        raise DicomError(f"its pixel data decoded to {pixels.shape} instead of one {width}x{height} frame")
    image = render(ds, pixels)
    png = binascii.b2a_base64(png_bytes(image), newline=False)
    return DicomImage(png, width, height, bits, syntax, (time.perf_counter() - started) * 1000)
