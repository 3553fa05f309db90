"""Build the demo model: a tiny, random-weight Idefics3 vision-language model that vLLM serves on a CPU.

It is the model of the CPU rehearsal profile and of the test suite. It says nothing useful, but it exercises every
part of the real path: a vision tower that tiles inline images (224-px tiles at patch 14, 64 tokens per tile, plus
one global tile), a Llama text model, a byte-level BPE tokenizer with Idefics3's special tokens, and a chat template
that places the image. Everything is generated offline from a fixed seed, so two builds are byte-identical.

Building needs ``torch`` and ``transformers`` (the ``cpu`` extra); nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import InputError

__all__ = ["DEMO_MODEL_NAME", "DemoModel", "build_demo_model", "demo_text_config"]

DEMO_MODEL_NAME = "clinic-edge-demo-vlm"
SEED = 20261123
TILE_PX = 224
PATCH_PX = 14
SCALE_FACTOR = 2
IMAGE_SEQ_LEN = (TILE_PX // PATCH_PX) ** 2 // SCALE_FACTOR**2  # 64 tokens per tile
VOCAB_TARGET = 1024

SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<pad>",
    "<unk>",
    "<image>",
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
    *[f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)],
]

# Accepts plain-string and OpenAI-style list content; images go where the message puts them.
CHAT_TEMPLATE = (
    "<|begin_of_text|>"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ ' ' + message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ ' ' + part['text'] }}"
    "{% elif part['type'] in ('image', 'image_url') %}{{ '<image>' }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Training text for the tokenizer: synthetic, dental-flavoured, no patient data.
_CORPUS = [
    "Describe the periapical radiograph of the lower left first molar.",
    "The panoramic image shows all erupted teeth, the mandibular canal and both maxillary sinuses.",
    "No radiolucency at the apex. The lamina dura is intact and the periodontal ligament space is normal.",
    "Interproximal caries on the distal surface of the upper right second premolar, extending into dentin.",
    "Bone loss is horizontal, about thirty percent, with calculus on the mesial root surfaces.",
    "A bitewing radiograph shows the crowns of the upper and lower teeth and the alveolar crest.",
    "Root canal treatment with a well condensed filling ending one millimetre short of the apex.",
    "Impacted lower third molar, mesioangular, close to the inferior alveolar nerve canal.",
    "Assistant: I see an image of teeth. User: What do you see in this image? Please answer briefly.",
    "0123456789 . , ; : ! ? ( ) - / % mm cm left right upper lower mesial distal buccal lingual occlusal",
]


@dataclass(frozen=True)
class DemoModel:
    """A built demo model: where it is and a digest of its files."""

    path: Path
    name: str
    sha256: dict[str, str]
    num_parameters: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description for ``--json`` output and manifests."""
        return {
            "path": str(self.path),
            "name": self.name,
            "files": self.sha256,
            "num_parameters": self.num_parameters,
        }


def demo_text_config(vocab_size: int, pad_token_id: int) -> dict[str, Any]:
    """The Llama text model's config (hidden 128, 2 layers, head_dim 64: the CPU attention kernel's minimum)."""
    return {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "pad_token_id": pad_token_id,
    }


def _train_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def _build_into(out: Path) -> int:
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        PreTrainedTokenizerFast,
    )

    tok = _train_tokenizer()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<end_of_utterance>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    vocab_size = len(tokenizer)

    config = Idefics3Config(
        text_config=demo_text_config(vocab_size, tokenizer.pad_token_id),
        vision_config={
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": TILE_PX,
            "patch_size": PATCH_PX,
        },
        scale_factor=SCALE_FACTOR,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = Idefics3ForConditionalGeneration(config).to(torch.bfloat16).eval()
    model.save_pretrained(out)

    image_processor = Idefics3ImageProcessorPil(
        do_resize=True,
        size={"longest_edge": 2 * TILE_PX},
        max_image_size={"longest_edge": TILE_PX},
        do_image_splitting=True,
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
        do_pad=True,
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    return int(sum(p.numel() for p in model.parameters()))


def _digest(directory: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        out[str(path.relative_to(directory))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def build_demo_model(directory: Path, *, force: bool = False) -> DemoModel:
    """Build the demo model into ``directory`` (atomically: a half-built model never appears there).

    An existing non-empty directory is an error unless ``force``; then it is replaced.
    """
    directory = directory.resolve()
    if directory.exists() and any(directory.iterdir()) and not force:
        raise InputError(
            f"{directory} already exists and is not empty.",
            "Choose an empty or new directory, or pass --force to replace what is there.",
        )
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise InputError(
            f"building the demo model needs torch and transformers, which are not installed ({exc.name}).",
            "Install the CPU extra: pip install 'clinic-edge[cpu]' (or run tests/run, which does).",
        ) from exc
    directory.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".demo-model-", dir=directory.parent) as tmp:
        staging = Path(tmp) / "model"
        staging.mkdir()
        num_parameters = _build_into(staging)
        (staging / "clinic-edge-demo.json").write_text(
            json.dumps({"name": DEMO_MODEL_NAME, "seed": SEED, "purpose": "tests and CPU rehearsal only"}, indent=2)
            + "\n"
        )
        for path in staging.iterdir():
            path.chmod(0o644)  # the vLLM service user only needs to read them
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    return DemoModel(path=directory, name=DEMO_MODEL_NAME, sha256=_digest(directory), num_parameters=num_parameters)
