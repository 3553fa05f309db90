"""safetensors headers of files generated here: single, sharded, sparse, truncated and corrupt."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from appliance.errors import InputError
from appliance.planner.safetensors_header import read_checkpoint

BYTES = {"BF16": 2, "F32": 4, "F8_E4M3": 1, "I64": 8}


def write_safetensors(
    path: Path, tensors: dict[str, tuple[str, list[int]]], *, sparse: bool = True, cut: int = 0
) -> int:
    """Write a valid safetensors file (data as a sparse hole); return its tensor bytes. ``cut`` truncates it."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = BYTES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        if sparse:
            fh.truncate(8 + len(raw) + offset - cut)
        else:
            fh.write(b"\0" * (offset - cut))
    return offset


def test_single_file(tmp_path: Path) -> None:
    n = write_safetensors(
        tmp_path / "model.safetensors",
        {
            "embed.weight": ("BF16", [1000, 64]),
            "norm.weight": ("F32", [64]),
            "proj.weight": ("F8_E4M3", [64, 64]),
        },
        sparse=False,
    )
    ckpt = read_checkpoint(tmp_path)
    assert ckpt is not None
    assert ckpt.tensor_bytes == n == 1000 * 64 * 2 + 64 * 4 + 64 * 64
    assert ckpt.num_params == 1000 * 64 + 64 + 64 * 64
    assert ckpt.bytes_by_dtype == {"BF16": 128000, "F32": 256, "F8_E4M3": 4096}


def test_sharded_index_reads_exactly_the_named_shards(tmp_path: Path) -> None:
    a = write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {"a": ("BF16", [4096, 4096])})
    b = write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {"b": ("BF16", [4096, 1024])})
    write_safetensors(tmp_path / "consolidated.safetensors", {"x": ("BF16", [8192, 8192])})  # not in the index
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "metadata": {},
                "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
            }
        )
    )
    ckpt = read_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.tensor_bytes == a + b and len(ckpt.files) == 2


def test_missing_shard_is_named(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "s1.safetensors", {"a": ("BF16", [8])})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})
    )
    with pytest.raises(InputError, match=r"s2\.safetensors"):
        read_checkpoint(tmp_path)


def test_no_weights_is_none(tmp_path: Path) -> None:
    assert read_checkpoint(tmp_path) is None


def test_truncated_data_is_refused(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "model.safetensors", {"a": ("BF16", [1024, 1024])}, cut=1)
    with pytest.raises(InputError, match="truncated"):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x01\x02", "shorter than the 8-byte header length"),
        (struct.pack("<Q", 10**12) + b"{}", "header length field"),
        (struct.pack("<Q", 500) + b"{}", "claims 500 bytes"),
        (struct.pack("<Q", 4) + b"{x:1", "not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    ],
)
def test_corrupt_headers(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(InputError, match=message):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("info", "message"),
    [
        ({"dtype": "Q3", "shape": [2], "data_offsets": [0, 2]}, "unknown dtype"),
        ({"dtype": "BF16", "shape": [2], "data_offsets": [0, 3]}, "should take 4 bytes"),
        ({"dtype": "BF16", "shape": "2", "data_offsets": [0, 4]}, "invalid shape"),
        ({"dtype": "BF16", "shape": [2], "data_offsets": [4, 0]}, "invalid data_offsets"),
    ],
)
def test_inconsistent_tensor_entries(tmp_path: Path, info: dict[str, object], message: str) -> None:
    raw = json.dumps({"t": info}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
    with pytest.raises(InputError, match=message):
        read_checkpoint(tmp_path)
