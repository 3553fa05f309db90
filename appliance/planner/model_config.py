"""What the planner needs from a model's config.json: attention layout, sizes, dtype, vision tower.

Multimodal configs nest the language model under ``text_config`` (Gemma 3, Mistral 3, Idefics3, Qwen3-VL) or keep it
at the top level (Qwen2.5-VL). Some fields come from transformers' defaults when the file omits them (Gemma 3 omits
``vocab_size`` 262208 and ``max_position_embeddings`` 131072); those defaults are written down here, per model type.

Gemma 4 (``gemma4``) gives its full-attention layers their own shape: ``global_head_dim`` and, with
``attention_k_eq_v``, ``num_global_key_value_heads`` (vllm/model_executor/models/gemma4.py ``Gemma4DecoderLayer``);
newer transformers save the same facts as ``per_layer_config`` (layer index → ``head_dim``,
``num_key_value_heads``), and both forms are read. The last ``num_kv_shared_layers`` layers reuse an earlier layer's
KV cache and get none of their own (``kv_sharing_target_layer_name``).

Layer types follow vLLM: an explicit ``layer_types`` list wins; Gemma 2 alternates sliding/full; Gemma 3 has one full
layer in every ``sliding_window_pattern`` (6); a ``sliding_window`` applies to every layer unless
``use_sliding_window`` is false (Qwen2 / Qwen2.5-VL ship ``sliding_window: 32768`` with ``use_sliding_window: false``:
that is full attention). DeepSeek-style MLA caches one latent vector per token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import InputError

__all__ = [
    "LayerKind",
    "ModelFacts",
    "VisionFacts",
    "gemma4_layer_shapes",
    "load_model_facts",
    "model_facts_from_config",
    "read_config",
    "resolved_text_config",
]

# Transformers' defaults for fields that configs of these model types may omit.
TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma3_text": {
        "vocab_size": 262208,
        "max_position_embeddings": 131072,
        "head_dim": 256,
        "num_key_value_heads": 4,
        "num_attention_heads": 8,
        "sliding_window": 4096,
        "sliding_window_pattern": 6,
        "intermediate_size": 9216,
        "hidden_size": 2304,
        "num_hidden_layers": 26,
    },
    "gemma2": {"vocab_size": 256000, "max_position_embeddings": 8192, "head_dim": 256, "sliding_window": 4096},
    "llama": {"vocab_size": 32000, "max_position_embeddings": 2048},
    "mistral": {"vocab_size": 32000, "max_position_embeddings": 131072},
    "qwen2": {"vocab_size": 151936, "max_position_embeddings": 32768},
    "gemma4_text": {"sliding_window": 1024, "max_position_embeddings": 262144},
}
# vLLM disables chunked multimodal input for Gemma 3/4 (image tokens attend bidirectionally) and then refuses
# max_num_batched_tokens below the largest item: "Chunked MM input disabled but max_tokens_per_mm_item (2496) is
# larger than max_num_batched_tokens (2048)" for Gemma 4 (vllm-project/recipes #441, #572; gemma4.md).
MM_ITEM_MAX_TOKENS = {"gemma4": 2496}
# Keys under which multimodal configs nest the language model.
TEXT_KEYS = ("text_config", "llm_config", "language_config", "text_model")
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 2, "half": 2, "float": 2}  # vLLM casts fp32 configs to 16-bit
REQUIRED = ("num_hidden_layers", "num_attention_heads", "hidden_size")


@dataclass(frozen=True)
class LayerKind:
    """One attention layer's KV-cache kind: full attention, a sliding window of ``window`` tokens, or MLA.

    ``kv_heads`` / ``head_dim`` are set only where a layer's shape differs from the model's (Gemma 4's full layers).
    """

    kind: str  # "full" | "sliding" | "mla"
    window: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None


@dataclass(frozen=True)
class VisionFacts:
    """The vision tower, enough to estimate its activation during vLLM's profiling run."""

    hidden_size: int
    intermediate_size: int
    patches_per_image: int
    tokens_per_image: int
    # The most tokens one image may take, which max_num_batched_tokens must hold when vLLM schedules an image whole
    # (Gemma 3/4 disable chunked multimodal input); None when images may be chunked.
    batch_floor: int | None = None


@dataclass(frozen=True)
class ModelFacts:
    """Everything the accounting uses, resolved from config.json and defaults."""

    name: str
    architecture: str
    model_type: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    dtype_bytes: int
    layers: list[LayerKind]
    mla_latent_dim: int | None = None  # kv_lora_rank + qk_rope_head_dim
    vision: VisionFacts | None = None
    num_experts: int = 0
    rotary_dim: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        kinds: dict[str, int] = {}
        for layer in self.layers:
            key = layer.kind if layer.window is None else f"{layer.kind}:{layer.window}"
            if layer.head_dim is not None or layer.kv_heads is not None:
                key += f"({layer.kv_heads or self.num_kv_heads}x{layer.head_dim or self.head_dim})"
            kinds[key] = kinds.get(key, 0) + 1
        return {
            "name": self.name,
            "architecture": self.architecture,
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "layer_kinds": kinds,
            "multimodal": self.vision is not None,
            "notes": self.notes,
        }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise InputError(
            f"{path} does not exist.",
            "Give a model directory that contains config.json, or the path of a config.json file.",
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"Cannot read {path}: {exc}.", "Check the file and its permissions.") from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}).",
            "Copy the model's config.json again; it must be the JSON file the model was published with.",
        ) from exc
    if not isinstance(doc, dict):
        raise InputError(f"{path} is not a JSON object.", "Use the model's own config.json.")
    return doc


def _text_section(config: dict[str, Any]) -> dict[str, Any]:
    for key in TEXT_KEYS:
        section = config.get(key)
        if isinstance(section, dict):
            return section
    return config


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _layer_kinds(text: dict[str, Any], num_layers: int, model_type: str, notes: list[str]) -> list[LayerKind]:
    window = _int(text.get("sliding_window"))
    explicit = text.get("layer_types")
    if isinstance(explicit, list) and len(explicit) == num_layers:
        out = []
        for t in explicit:
            if t in ("sliding_attention", "sliding") and window:
                out.append(LayerKind("sliding", window))
            else:
                out.append(LayerKind("full"))
        return out
    if window and text.get("use_sliding_window") is False:
        notes.append(f"sliding_window {window} is disabled (use_sliding_window: false): full attention")
        return [LayerKind("full")] * num_layers
    if model_type == "gemma3_text" and window:
        pattern = _int(text.get("sliding_window_pattern")) or 6
        return [
            LayerKind("full") if (i + 1) % pattern == 0 else LayerKind("sliding", window) for i in range(num_layers)
        ]
    if model_type == "gemma2" and window:
        return [LayerKind("sliding", window) if i % 2 == 0 else LayerKind("full") for i in range(num_layers)]
    if window and model_type not in ("qwen2", "qwen2_5_vl", "qwen2_vl"):
        return [LayerKind("sliding", window)] * num_layers
    return [LayerKind("full")] * num_layers


def gemma4_layer_shapes(text: dict[str, Any], num_layers: int) -> dict[int, tuple[int | None, int | None]]:
    """Gemma 4's per-layer attention shapes: layer index → (kv_heads, head_dim), from either config form."""
    shapes: dict[int, tuple[int | None, int | None]] = {}
    per_layer = text.get("per_layer_config")
    items: list[tuple[Any, Any]] = []
    if isinstance(per_layer, dict):
        items = list(per_layer.items())
    elif isinstance(per_layer, list):
        items = list(enumerate(per_layer))
    for index, entry in items:
        if isinstance(entry, dict) and str(index).isdigit() and int(index) < num_layers:
            shapes[int(index)] = (_int(entry.get("num_key_value_heads")), _int(entry.get("head_dim")))
    if shapes:
        return shapes
    global_dim = _int(text.get("global_head_dim"))
    # vLLM uses the global KV head count on full layers only when K doubles as V (gemma4.py, attention_k_eq_v).
    global_heads = _int(text.get("num_global_key_value_heads")) if text.get("attention_k_eq_v") else None
    types = text.get("layer_types")
    if (global_dim or global_heads) and isinstance(types, list):
        for i, t in enumerate(types[:num_layers]):
            if t == "full_attention":
                shapes[i] = (global_heads, global_dim)
    return shapes


def _gemma4_layers(text: dict[str, Any], layers: list[LayerKind], notes: list[str]) -> list[LayerKind]:
    """Apply Gemma 4's per-layer shapes and drop the KV-shared layers (they own no KV cache)."""
    shapes = gemma4_layer_shapes(text, len(layers))
    out = [LayerKind(layer.kind, layer.window, *shapes[i]) if i in shapes else layer for i, layer in enumerate(layers)]
    shared = _int(text.get("num_kv_shared_layers")) or 0
    if shared:
        notes.append(f"the last {shared} layers share an earlier layer's KV cache (num_kv_shared_layers)")
        out = out[: len(out) - shared]
    return out


def _vision(config: dict[str, Any], model_type: str) -> VisionFacts | None:
    vc = config.get("vision_config")
    if not isinstance(vc, dict):
        return None
    hidden = _int(vc.get("hidden_size")) or _int(vc.get("embed_dim")) or 1024
    inter = _int(vc.get("intermediate_size")) or 4 * hidden
    patch = _int(vc.get("patch_size")) or 14
    merge = _int(vc.get("spatial_merge_size")) or _int(config.get("spatial_merge_size")) or 1
    image = _int(vc.get("image_size"))
    soft = _int(config.get("vision_soft_tokens_per_image")) or _int(vc.get("default_output_length"))
    if soft:
        # Gemma 4: a fixed budget of soft tokens per image, each pooled from pooling_kernel_size² patches.
        pool = _int(vc.get("pooling_kernel_size")) or 1
        return VisionFacts(
            hidden_size=hidden,
            intermediate_size=inter,
            patches_per_image=soft * pool * pool,
            tokens_per_image=soft,
            batch_floor=MM_ITEM_MAX_TOKENS.get(model_type),
        )
    # Fixed-size tiles, or dynamic resolution (Qwen2-VL family) up to the processor's default max_pixels, 3584².
    patches = (image // patch) ** 2 if image else 12_845_056 // (patch * patch)
    tokens = _int(config.get("mm_tokens_per_image"))
    if tokens is None:
        scale = _int(config.get("scale_factor")) or 1
        tokens = max(1, patches // (merge * merge) // (scale * scale))
    return VisionFacts(
        hidden_size=hidden,
        intermediate_size=inter,
        patches_per_image=patches,
        tokens_per_image=tokens,
        batch_floor=MM_ITEM_MAX_TOKENS.get(model_type),
    )


def resolved_text_config(config: dict[str, Any], notes: list[str] | None = None) -> tuple[dict[str, Any], str]:
    """The language model's section of ``config`` with transformers' defaults filled in, and its model type."""
    text = dict(_text_section(config))
    top_type = str(config.get("model_type", ""))
    model_type = str(text.get("model_type", top_type))
    if model_type == "gemma3" or (top_type == "gemma3" and not text.get("model_type")):
        model_type = "gemma3_text"
    if model_type == "gemma4":
        model_type = "gemma4_text"
    for key, value in TYPE_DEFAULTS.get(model_type, {}).items():
        if key not in text:  # an explicit null (Mistral's "sliding_window": null) is kept: it means "none"
            if notes is not None:
                notes.append(f"{key} not in config: using the {model_type} default {value}")
            text[key] = value
    return text, model_type


def model_facts_from_config(config: dict[str, Any], name: str, source: str = "config.json") -> ModelFacts:
    """Resolve :class:`ModelFacts` from a parsed config.json; raises :class:`InputError` naming missing fields."""
    top_type = str(config.get("model_type", ""))
    notes: list[str] = []
    text, model_type = resolved_text_config(config, notes)
    archs = config.get("architectures")
    architecture = str(archs[0]) if isinstance(archs, list) and archs else top_type or "unknown"

    missing = [k for k in REQUIRED if _int(text.get(k)) is None]
    if missing:
        raise InputError(
            f"{source} ({architecture}) lacks {', '.join(missing)}, so the KV cache cannot be sized.",
            "The planner needs num_hidden_layers, num_attention_heads and hidden_size (and num_key_value_heads, "
            "head_dim when they differ from the defaults) in config.json or its text_config. Use the model's "
            "original config.json.",
            details={"missing": missing, "architecture": architecture},
        )
    num_layers = int(text["num_hidden_layers"])
    heads = int(text["num_attention_heads"])
    hidden = int(text["hidden_size"])
    kv_heads = _int(text.get("num_key_value_heads")) or heads
    head_dim = _int(text.get("head_dim")) or hidden // heads
    vocab = _int(text.get("vocab_size")) or _int(config.get("vocab_size"))
    if vocab is None:
        raise InputError(
            f"{source} ({architecture}) has no vocab_size.",
            "Add the model's vocab_size or use its original config.json; the sampler's memory depends on it.",
            details={"missing": ["vocab_size"]},
        )
    max_pos = _int(text.get("max_position_embeddings")) or _int(config.get("max_position_embeddings")) or 4096
    inter = _int(text.get("intermediate_size")) or _int(text.get("moe_intermediate_size")) or 4 * hidden
    dtype_name = str(
        text.get("torch_dtype") or text.get("dtype") or config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    )
    dtype_bytes = DTYPE_BYTES.get(dtype_name, 2)

    kv_lora = _int(text.get("kv_lora_rank"))
    mla_dim = None
    if kv_lora:
        mla_dim = kv_lora + (_int(text.get("qk_rope_head_dim")) or 64)
        layers = [LayerKind("mla")] * num_layers
        notes.append(f"MLA: one latent of {mla_dim} values per token per layer")
    else:
        layers = _layer_kinds(text, num_layers, model_type, notes)
        if model_type == "gemma4_text":
            layers = _gemma4_layers(text, layers, notes)
    experts = _int(text.get("num_local_experts")) or _int(text.get("num_experts")) or _int(text.get("n_routed_experts"))
    rope = text.get("rope_scaling") or text.get("rope_parameters")
    partial = text.get("partial_rotary_factor")
    rotary = int(head_dim * float(partial)) if isinstance(partial, (int, float)) else head_dim
    if isinstance(rope, dict) and rope.get("rope_type") == "llama3":
        notes.append("llama3 RoPE scaling")
    return ModelFacts(
        name=name,
        architecture=architecture,
        model_type=model_type,
        num_layers=num_layers,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=hidden,
        intermediate_size=inter,
        vocab_size=vocab,
        max_position_embeddings=max_pos,
        dtype_bytes=dtype_bytes,
        layers=layers,
        mla_latent_dim=mla_dim,
        vision=_vision(config, top_type if top_type else model_type),
        num_experts=experts or 0,
        rotary_dim=rotary,
        notes=notes,
    )


def read_config(model: Path) -> dict[str, Any]:
    """The parsed config.json of ``model`` (a directory or the file itself)."""
    return _read_json(model / "config.json" if model.is_dir() else model)


def load_model_facts(model: Path) -> tuple[ModelFacts, Path | None]:
    """Read ``model`` (a directory with config.json, or a config.json file); return the facts and the model dir.

    The directory is ``None`` when a bare config file was given (there are then no weight files to read).
    """
    if model.is_dir():
        config_path = model / "config.json"
        if not config_path.is_file():
            raise InputError(
                f"{model} has no config.json.",
                "Give the model's directory (the one with config.json and the *.safetensors files) or a config.json.",
            )
        name = model.resolve().name
        model_dir: Path | None = model
    else:
        config_path = model
        name = model.resolve().parent.name if model.name == "config.json" else model.stem
        model_dir = None
    config = _read_json(config_path)
    return model_facts_from_config(config, name, str(config_path)), model_dir
