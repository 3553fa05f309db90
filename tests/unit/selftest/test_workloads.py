"""Workloads: the calibrated fallback for prompt lengths, conversations, the drawn radiograph (no patient data)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image

from appliance.selftest.workloads import (
    CONVERSATIONS,
    PromptMaker,
    conversation_turns,
    image_message,
    model_takes_images,
    radiograph_png,
)


def test_fallback_calibrates_from_server_counts() -> None:
    maker = PromptMaker()
    assert not maker.exact and maker.count("x") is None
    # The server said 16 words → 40 prompt tokens and 256 words → 520: 2 tokens per word (template cancels out).
    maker.calibrate((16, 40), (256, 520))
    assert maker.tokens_per_word == 2.0
    assert len(maker.text(128, seed=3).split()) == 64
    assert maker.text(128, seed=3) != maker.text(128, seed=4)  # every request its own prompt
    maker.calibrate((16, 0), (256, 0))  # a server that reports nothing leaves the ratio alone
    assert maker.tokens_per_word == 2.0


def test_conversation_turns_replay_history() -> None:
    conv = CONVERSATIONS[0]
    turns = conversation_turns(conv)
    assert len(turns) == len(conv.turns)
    assert [m["role"] for m in turns[2]] == ["user", "assistant", "user", "assistant", "user"]
    assert turns[2][1]["content"] == conv.turns[0][1]
    assert sum(len(c.turns) for c in CONVERSATIONS) >= 12


def test_radiograph_is_a_grayscale_png_unseen_for_each_seed() -> None:
    a, b = radiograph_png(1), radiograph_png(2)
    assert a != b and radiograph_png(1) == a
    img = Image.open(io.BytesIO(a))
    assert img.format == "PNG" and img.mode == "L" and img.size == (768, 384)
    msg = image_message(a)
    url = msg[0]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,") and base64.b64decode(url.split(",", 1)[1]) == a


def test_model_takes_images_from_config(tmp_path: Path) -> None:
    assert model_takes_images(None) is None
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert model_takes_images(tmp_path) is False
    (tmp_path / "config.json").write_text('{"model_type": "idefics3", "vision_config": {"patch_size": 14}}')
    assert model_takes_images(tmp_path) is True


def test_synthetic_requests_run_to_their_length_unless_told_otherwise() -> None:
    # vllm bench serve sets ignore_eos for its random datasets; the self-test's synthetic load does the same.
    from appliance.selftest.runner import Workload

    work = Workload(model="m", prompts=PromptMaker())
    assert work.text_body(16, 4)["ignore_eos"] is True
    assert work.image_body(4)["ignore_eos"] is True
    free = Workload(model="m", prompts=PromptMaker(), ignore_eos=False)
    assert "ignore_eos" not in free.text_body(16, 4) and "ignore_eos" not in free.image_body(4)
