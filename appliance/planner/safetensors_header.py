"""Weight sizes from safetensors headers — the header bytes only, never the tensor data.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON naming every tensor's dtype,
shape and ``data_offsets`` (relative to the end of the header), then the data. Reading the header tells us exactly how
many bytes vLLM will load, in microseconds, even for a 60 GB checkpoint. A sharded checkpoint has
``model.safetensors.index.json`` whose ``weight_map`` names the shard of each tensor; every shard's header is read.

Every inconsistency (a header longer than the file, offsets past the end of the file, a dtype we do not know, a shape
that disagrees with the offsets) is an :class:`~appliance.errors.InputError`: a truncated download must not be
planned as if it were complete.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import InputError

__all__ = [
    "DTYPE_BYTES",
    "CheckpointWeights",
    "FileWeights",
    "read_checkpoint",
    "read_header",
]

# safetensors dtype names → bytes per element (sub-byte types are packed; their bytes come from data_offsets).
DTYPE_BYTES: dict[str, float] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "F4": 0.5,
    "F6_E2M3": 0.75,
    "F6_E3M2": 0.75,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}
# The format's own limit (safetensors refuses headers over 100 MB): a bigger length means a corrupt file.
MAX_HEADER_BYTES = 100_000_000
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class FileWeights:
    """What one safetensors file holds: tensor bytes, parameter count and bytes per dtype."""

    path: Path
    tensor_bytes: int
    num_tensors: int
    num_params: int
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointWeights:
    """The sum over a checkpoint's files."""

    files: list[FileWeights]

    @property
    def tensor_bytes(self) -> int:
        """Bytes of tensor data vLLM will load (before tensor parallelism splits it)."""
        return sum(f.tensor_bytes for f in self.files)

    @property
    def num_params(self) -> int:
        """Number of stored elements (packed sub-byte formats count their elements)."""
        return sum(f.num_params for f in self.files)

    @property
    def bytes_by_dtype(self) -> dict[str, int]:
        """Tensor bytes per safetensors dtype, e.g. ``{"BF16": 16060522496}``."""
        out: dict[str, int] = {}
        for f in self.files:
            for dtype, n in f.bytes_by_dtype.items():
                out[dtype] = out.get(dtype, 0) + n
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "files": len(self.files),
            "tensor_bytes": self.tensor_bytes,
            "num_params": self.num_params,
            "bytes_by_dtype": self.bytes_by_dtype,
        }


def _corrupt(path: Path, what: str) -> InputError:
    return InputError(
        f"{path} is not a valid safetensors file: {what}.",
        "The file is probably truncated or damaged (an interrupted download or copy). Copy the model again and "
        "compare its checksums with the source, or pass --weights-gib to plan without the weight files.",
        details={"path": str(path)},
    )


def read_header(path: Path) -> dict[str, Any]:
    """The parsed JSON header of one safetensors file (reads 8 + N bytes, whatever the file's size)."""
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                raise _corrupt(path, f"it is {size} bytes long, shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", head)
            if length == 0 or length > MAX_HEADER_BYTES:
                raise _corrupt(path, f"its header length field says {length} bytes")
            if 8 + length > size:
                raise _corrupt(path, f"its header claims {length} bytes but the file has only {size - 8} after it")
            raw = fh.read(length)
    except OSError as exc:
        raise InputError(
            f"Cannot read {path}: {exc.strerror or exc}.",
            "Check that the file exists and that this user may read it.",
            details={"path": str(path)},
        ) from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"its header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    header["__file_size__"] = size
    header["__header_length__"] = length
    return header


def _file_weights(path: Path) -> FileWeights:
    header = read_header(path)
    size = int(header.pop("__file_size__"))
    data_start = 8 + int(header.pop("__header_length__"))
    header.pop("__metadata__", None)
    total = 0
    params = 0
    by_dtype: dict[str, int] = {}
    max_end = 0
    for name, info in header.items():
        if not isinstance(info, dict):
            raise _corrupt(path, f"tensor {name!r} has no description")
        dtype = info.get("dtype")
        shape = info.get("shape")
        offsets = info.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise _corrupt(path, f"tensor {name!r} has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise _corrupt(path, f"tensor {name!r} has an invalid shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise _corrupt(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
        nbytes = offsets[1] - offsets[0]
        count = math.prod(shape)
        if nbytes != math.ceil(count * DTYPE_BYTES[dtype]):
            raise _corrupt(
                path,
                f"tensor {name!r} ({dtype} {shape}) should take {count * DTYPE_BYTES[dtype]:.0f} "
                f"bytes but its data_offsets span {nbytes}",
            )
        total += nbytes
        params += count
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
        max_end = max(max_end, offsets[1])
    if data_start + max_end > size:
        raise _corrupt(
            path,
            f"its tensors end at byte {data_start + max_end:,} but the file is only {size:,} bytes long (truncated)",
        )
    return FileWeights(
        path=path, tensor_bytes=total, num_tensors=len(header), num_params=params, bytes_by_dtype=by_dtype
    )


def _index_files(index: Path) -> list[Path]:
    try:
        doc = json.loads(index.read_text())
    except OSError as exc:
        raise InputError(f"Cannot read {index}: {exc.strerror or exc}.", "Check the file's permissions.") from exc
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{index} is not valid JSON ({exc}).",
            "Copy the model again; the index of a sharded checkpoint must be intact.",
        ) from exc
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(
            f"{index} has no weight_map.",
            "Copy the model again; the index of a sharded checkpoint must list its shards.",
        )
    names = sorted({str(v) for v in weight_map.values()})
    files = [index.parent / n for n in names]
    missing = [str(f.name) for f in files if not f.is_file()]
    if missing:
        raise InputError(
            f"{index} names shards that are missing: {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            + ".",
            "Finish copying the model (every shard listed in the index), or pass --weights-gib to plan without them.",
            details={"missing": missing},
        )
    return files


def read_checkpoint(model_dir: Path) -> CheckpointWeights | None:
    """The weights of the checkpoint in ``model_dir``; ``None`` when it holds no safetensors files.

    With an index, exactly the shards it names are read; otherwise every ``*.safetensors`` file in the directory.
    """
    index = model_dir / INDEX_NAME
    if index.is_file():
        files = _index_files(index)
    else:
        files = sorted(p for p in model_dir.glob("*.safetensors") if p.is_file())
    if not files:
        return None
    return CheckpointWeights(files=[_file_weights(f) for f in files])
