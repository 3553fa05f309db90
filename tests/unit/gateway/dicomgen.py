"""Synthetic DICOM radiographs for the tests and the benchmark: no patient data, every header field a marker.

:func:`radiograph` draws a smooth 12- or 16-bit "jaw" (a gradient, bright ellipses for teeth, noise) so that the
compressed syntaxes compress like real images; :func:`dicom_file` wraps pixels in a Part 10 file of any supported
transfer syntax, encoding with GDCM (JPEG lossless, JPEG-LS; in a child process), Pillow (JPEG baseline, JPEG 2000)
or pydicom (RLE). Each identifying header field holds a unique marker (``MARKERS``), so a test can grep everything
a run produced for any of them.
"""

from __future__ import annotations

import base64
import functools
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import gdcm
import numpy as np
from numpy.typing import NDArray
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate

__all__ = ["MARKERS", "data_url", "dicom_file", "radiograph"]

# Every text-valued header field a dental system fills, each with a string found nowhere else.
MARKERS: dict[str, str] = {
    "PatientName": "Zqxmarkpatname^Wvymark",
    "PatientID": "ZQXPID7731",
    "PatientBirthDate": "19070412",
    "PatientSex": "ZQXSEX",
    "OtherPatientIDs": "ZQXOTHERID5521",
    "PatientAddress": "Zqxmark Street 99",
    "InstitutionName": "Zqxmark Dental Clinic",
    "ReferringPhysicianName": "Zqxmarkref^Doc",
    "StudyDescription": "ZQXSTUDYDESC",
    "SeriesDescription": "ZQXSERIESDESC",
    "AccessionNumber": "ZQXACC4410",
    "StudyID": "ZQXSTUDY88",
    "StudyDate": "19090101",
    "StudyTime": "091011.123456",
    "Manufacturer": "ZqxmarkVendor",
    "ManufacturerModelName": "ZqxmarkModel",
    "DeviceSerialNumber": "ZQXSERIAL0042",
    "StationName": "ZQXSTATION",
    "OperatorsName": "Zqxmarkop^Erator",
    "StudyInstanceUID": "1.2.826.0.1.3680043.9.9999.1.771",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.9.9999.2.772",
    "SOPInstanceUID": "1.2.826.0.1.3680043.9.9999.3.773",
    "ImageComments": "ZQXCOMMENTS",
}
_PRIVATE_MARK = "ZQXPRIVATEVALUE"  # a vendor's private tag: dental systems write many
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_DX_INTRAORAL = "1.2.840.10008.5.1.4.1.1.1.3"
_ROOT = Path(__file__).resolve().parents[3]
_KEEP: list[object] = []


def radiograph(rows: int, cols: int, bits: int = 12, seed: int = 0) -> NDArray[np.uint16]:
    """A synthetic greyscale radiograph with values in 0..2**bits-1 (smooth, so it compresses like a real one)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    img = 0.25 + 0.35 * (x / max(cols - 1, 1)) * (1 - 0.5 * y / max(rows - 1, 1))
    for k in range(8):  # teeth
        cx, cy = cols * (0.15 + 0.1 * k), rows * 0.5
        img += 0.3 * (((x - cx) / (cols * 0.04)) ** 2 + ((y - cy) / (rows * 0.3)) ** 2 < 1)
    img += rng.normal(0, 0.004, img.shape).astype(np.float32)
    top = (1 << bits) - 1
    return np.clip(img / img.max() * top, 0, top).astype(np.uint16)


def _gdcm_encode(pixels: NDArray[Any], bits_stored: int, ts: str) -> bytes:
    """One frame compressed by GDCM (in memory): JPEG lossless and JPEG-LS, which Pillow cannot write."""
    rows, cols = pixels.shape
    allocated = pixels.dtype.itemsize * 8
    img = gdcm.Image()
    img.SetNumberOfDimensions(2)
    img.SetDimensions((cols, rows, 1))
    img.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(gdcm.PhotometricInterpretation.MONOCHROME2))
    img.SetPixelFormat(gdcm.PixelFormat(1, allocated, bits_stored, bits_stored - 1, 0))
    elem = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    elem.SetByteStringValue(pixels.astype(f"<u{allocated // 8}").tobytes())
    img.SetDataElement(elem)
    img.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.ExplicitVRLittleEndian))
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(ts)))
    change.SetInput(img)
    if not change.Change():
        raise RuntimeError(f"GDCM could not encode {ts}")
    output = change.GetOutput()
    element = output.GetDataElement()
    frags = element.GetSequenceOfFragments()
    pieces = [frags.GetFragment(i) for i in range(frags.GetNumberOfFragments())]
    values = [piece.GetByteValue() for piece in pieces]
    # Kept alive: deleting SWIG proxies of GDCM's reference-counted objects aborts ("ReferenceCount > 0"); the
    # child process this runs in ends with os._exit, before any destructor.
    _KEEP.append((img, elem, change, output, element, frags, pieces, values))
    return b"".join(value.GetBuffer().encode("utf-8", "surrogateescape") for value in values)


def _pillow_encode(pixels: NDArray[Any], ts: str) -> bytes:
    out = io.BytesIO()
    if ts == uid.JPEGBaseline8Bit:
        Image.fromarray(pixels.astype(np.uint8), "L").save(out, format="JPEG", quality=95)
    else:  # JPEG 2000 codestream (not JP2), reversible for .90
        lossy = {"quality_mode": "rates", "quality_layers": [10]} if ts == uid.JPEG2000 else {}
        Image.fromarray(pixels).save(out, format="JPEG2000", no_jp2=True, irreversible=bool(lossy), **lossy)
    return out.getvalue()


@functools.lru_cache(maxsize=64)
def _gdcm_in_child(raw: bytes, shape: tuple[int, int], dtype: str, bits_stored: int, ts: str) -> bytes:
    """GDCM's encoders corrupt their heap now and then (seen as an abort a few calls in): each runs in a child."""
    code = (
        "import sys, numpy as np; from tests.unit.gateway.dicomgen import _gdcm_encode; "
        f"px = np.frombuffer(sys.stdin.buffer.read(), {dtype!r}).reshape({shape!r}); "
        f"sys.stdout.buffer.write(_gdcm_encode(px, {bits_stored}, {ts!r})); sys.stdout.flush(); "
        "import os; os._exit(0)"  # GDCM's destructors abort now and then at exit (a reference count check)
    )
    for _attempt in range(3):
        done = subprocess.run([sys.executable, "-c", code], input=raw, capture_output=True, check=False,
                              cwd=_ROOT, timeout=120)  # fmt: skip
        if done.returncode == 0 and done.stdout:
            return done.stdout
    raise RuntimeError(f"GDCM could not encode {ts}: {done.stderr[-500:]!r}")


def compress(pixels: NDArray[Any], bits_stored: int, ts: str) -> bytes:
    """One frame in transfer syntax ``ts`` (the encapsulated frame's bytes)."""
    if ts in (uid.JPEGLossless, uid.JPEGLosslessSV1, uid.JPEGLSLossless, uid.JPEGLSNearLossless):
        shape = (int(pixels.shape[0]), int(pixels.shape[1]))
        return _gdcm_in_child(pixels.tobytes(), shape, pixels.dtype.str, bits_stored, ts)
    return _pillow_encode(pixels, ts)


def dicom_file(
    pixels: NDArray[Any],
    ts: str = uid.ExplicitVRLittleEndian,
    *,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    frame: bytes | None = None,
    extra: dict[str, Any] | None = None,
    declare: str | None = None,
) -> bytes:
    """A DICOM Part 10 file holding ``pixels`` (rows x cols) in transfer syntax ``ts``, every identifying field
    marked. ``frame`` replaces the compressed frame (for lying streams); ``extra`` sets or overrides elements;
    ``declare`` names another transfer syntax in the file meta (the data stays encoded as ``ts``)."""
    rows, cols = pixels.shape
    ds = Dataset()
    for keyword, value in MARKERS.items():
        setattr(ds, keyword, value)
    ds.SOPClassUID = _DX_INTRAORAL
    ds.Modality = "IO"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    block = ds.private_block(0x0029, "ZQXVENDOR", create=True)
    block.add_new(0x10, "LO", _PRIVATE_MARK)
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = _DX_INTRAORAL
    ds.file_meta.MediaStorageSOPInstanceUID = MARKERS["SOPInstanceUID"]
    ds.file_meta.ImplementationClassUID = "1.2.826.0.1.3680043.9.9999.4"
    if ts == uid.RLELossless:
        ds.PixelData = pixels.astype(f"<u{pixels.dtype.itemsize}").tobytes()
        ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
        ds.compress(uid.RLELossless, encoding_plugin="pydicom")
    elif ts in (uid.ImplicitVRLittleEndian, uid.ExplicitVRLittleEndian, uid.ExplicitVRBigEndian):
        order = ">" if ts == uid.ExplicitVRBigEndian else "<"
        ds.PixelData = pixels.astype(f"{order}u{pixels.dtype.itemsize}").tobytes()
    else:
        ds.PixelData = encapsulate([frame if frame is not None else compress(pixels, bits_stored, ts)])
        ds["PixelData"].VR = "OB"
    if frame is not None and ts == uid.RLELossless:
        ds.PixelData = encapsulate([frame])
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True, little_endian=ts != uid.ExplicitVRBigEndian,
               implicit_vr=ts == uid.ImplicitVRLittleEndian)  # fmt: skip
    data = out.getvalue()
    if declare is not None:  # the meta's UID is padded to an even length with NUL
        old = ts.encode() + b"\x00" * (len(ts) % 2)
        new = declare.encode() + b"\x00" * (len(declare) % 2)
        at = data.index(b"\x02\x00\x10\x00UI")
        assert data[at + 8 : at + 8 + len(old)] == old and len(old) == len(new), "declare a UID of the same length"
        data = data[: at + 8] + new + data[at + 8 + len(new) :]
    return data


def data_url(dicom: bytes) -> str:
    """The ``image_url`` a workstation sends."""
    return "data:application/dicom;base64," + base64.b64encode(dicom).decode()


def private_marker() -> str:
    """The private tag's marker (kept apart: it is not a standard keyword)."""
    return _PRIVATE_MARK


def crash_worker(b64: bytes, max_pixels: int) -> Any:
    """A conversion that kills its worker process, as a codec bug hit by a crafted file would."""
    import os

    os._exit(70)
