from __future__ import annotations

import json
from pathlib import Path

from appliance.demo_model import IMAGE_SEQ_LEN, build_demo_model
from tests.conftest import require


def test_build_is_deterministic_and_complete(demo_model_dir: Path, tmp_path: Path) -> None:
    again = build_demo_model(tmp_path / "again")
    first = {p.name: p.read_bytes() for p in demo_model_dir.iterdir()}
    assert {p.name: p.read_bytes() for p in again.path.iterdir()} == first
    config = json.loads(first["config.json"])
    assert config["architectures"] == ["Idefics3ForConditionalGeneration"]
    assert config["text_config"]["head_dim"] == 64
    proc = json.loads(first["processor_config.json"])
    assert proc["image_seq_len"] == IMAGE_SEQ_LEN == 64
    assert "<image>" in json.loads(first["tokenizer.json"])["added_tokens"][4]["content"]


def test_rebuild_needs_force(demo_model_dir: Path, tmp_path: Path) -> None:
    require(True, "")
    target = tmp_path / "m"
    build_demo_model(target)
    marker = target / "config.json"
    before = marker.stat().st_mtime_ns
    build_demo_model(target, force=True)
    assert marker.stat().st_mtime_ns >= before
