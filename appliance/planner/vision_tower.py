"""Parameters of a multimodal model's vision tower and projector, from ``vision_config``.

A tower is ``layers`` ViT blocks of width h: attention 4·h² (fused or not), an MLP of 2·h·i (3·h·i when gated),
their biases and norms, then a patch embedding (channels · temporal patch · patch² · h), learned position embeddings
where the family has them, and the projector into the language model's width H. The families differ only in those
choices, written down per ``vision_config.model_type`` below from the models' modelling code in transformers
(``modeling_siglip.py``, ``modeling_pixtral.py`` + ``modeling_mistral3.py``, ``modeling_qwen2_5_vl.py``,
``modeling_qwen3_vl.py``, ``modeling_gemma3.py``, ``modeling_gemma4.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["vision_params"]


@dataclass(frozen=True)
class TowerShape:
    """What a family's ViT block and stem hold."""

    attn_bias: bool
    gated: bool
    mlp_bias: bool
    norm_params: int  # 1: RMSNorm (weight), 2: LayerNorm (weight + bias)
    norms_per_layer: int = 2
    qk_norm: bool = False
    patch_bias: bool = False
    stem_norm: bool = False  # a norm after the patch embedding (pixtral ln_pre) or after the blocks (post_layernorm)
    positions: str = "none"  # "grid": (image/patch)² table, "table": num_position_embeddings, "2d": 2 × size table


FAMILIES = {
    "siglip_vision_model": TowerShape(True, False, True, 2, patch_bias=True, stem_norm=True, positions="grid"),
    "siglip": TowerShape(True, False, True, 2, patch_bias=True, stem_norm=True, positions="grid"),
    "gemma4_vision": TowerShape(False, True, False, 1, norms_per_layer=4, qk_norm=True, positions="2d"),
    "pixtral": TowerShape(False, True, False, 1, stem_norm=True),
    "qwen2_5_vl": TowerShape(True, True, True, 1),
    "qwen2_vl": TowerShape(True, False, True, 2),
    "qwen3_vl": TowerShape(True, False, True, 2, patch_bias=True, positions="table"),
}


def _i(d: dict[str, Any], *keys: str, default: int = 0) -> int:
    for key in keys:
        value = d.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return default


def _tower(vc: dict[str, Any], shape: TowerShape) -> int:
    h = _i(vc, "hidden_size", "embed_dim")
    layers = _i(vc, "num_hidden_layers", "depth")
    inter = _i(vc, "intermediate_size") or h * _i(vc, "mlp_ratio", default=4)
    heads = _i(vc, "num_attention_heads", "num_heads", default=1)
    block = 4 * h * h + (4 * h if shape.attn_bias else 0)
    block += (3 if shape.gated else 2) * h * inter
    if shape.mlp_bias:
        block += (2 if shape.gated else 1) * inter + h
    block += shape.norms_per_layer * shape.norm_params * h
    if shape.qk_norm:
        block += 2 * (_i(vc, "head_dim") or h // heads)
    patch = _i(vc, "patch_size", "spatial_patch_size", default=14)
    stem = _i(vc, "num_channels", "in_chans", "in_channels", default=3) * _i(vc, "temporal_patch_size", default=1)
    stem = stem * patch * patch * h + (h if shape.patch_bias else 0)
    if shape.stem_norm:
        stem += shape.norm_params * h
    if shape.positions == "grid":
        stem += (_i(vc, "image_size", default=224) // patch) ** 2 * h
    elif shape.positions == "table":
        stem += _i(vc, "num_position_embeddings") * h
    elif shape.positions == "2d":
        stem += 2 * _i(vc, "position_embedding_size") * h
    return layers * block + stem


def _projector(config: dict[str, Any], vc: dict[str, Any], family: str, text_hidden: int) -> int:
    h = _i(vc, "hidden_size", "embed_dim")
    out = _i(vc, "out_hidden_size") or text_hidden
    merge = _i(vc, "spatial_merge_size") or _i(config, "spatial_merge_size", default=2)
    if family in ("qwen2_5_vl", "qwen2_vl", "qwen3_vl"):
        merged = h * merge * merge
        one = merged * merged + merged + merged * out + out  # fc1 + bias, fc2 + bias
        norm = 2 * h if family != "qwen2_5_vl" else h  # LayerNorm (qwen2/3) or RMSNorm (2.5) before the merge
        deepstack = len(vc.get("deepstack_visual_indexes") or [])
        return one + norm + deepstack * (one + 2 * merged)  # deepstack mergers normalize after the shuffle
    if family == "pixtral":
        bias = bool(config.get("multimodal_projector_bias"))
        merger = h * merge * merge * h
        return h + merger + h * text_hidden + text_hidden * text_hidden + (2 * text_hidden if bias else 0)
    if family == "gemma4_vision":
        return h * text_hidden  # embed_vision.embedding_projection (its norm has no weight)
    if str(config.get("model_type")) == "gemma3":
        return h * text_hidden + h  # mm_input_projection_weight + mm_soft_emb_norm
    return h * text_hidden + text_hidden + text_hidden * text_hidden + text_hidden  # LLaVA's two-layer MLP


def vision_params(config: dict[str, Any], vc: dict[str, Any], text_hidden: int) -> dict[str, int]:
    """``{"vision": tower parameters, "projector": projector parameters}``; an unknown family is priced as SigLIP."""
    family = str(vc.get("model_type") or config.get("model_type") or "")
    shape = FAMILIES.get(family, FAMILIES["siglip"])
    return {"vision": _tower(vc, shape), "projector": _projector(config, vc, family, text_hidden)}
