"""How many bytes a checkpoint spends on one linear layer, from its config.json ``quantization_config``.

Each scheme's bytes follow the tensors its checkpoints store (an ``in × out`` linear layer; g the group size)::

    16-bit           2·in·out
    fp8 per-tensor   in·out + 4                                   (weight_scale, fp32)
    fp8 per-channel  in·out + 4·out                               (compressed-tensors "channel")
    fp8 block b×b    in·out + 4·⌈out/b⌉·⌈in/b⌉                     (weight_scale_inv, Qwen/DeepSeek FP8)
    int-N group      N/8·in·out + 2·⌈in/g⌉·out [+ N/8·⌈in/g⌉·out zeros] [+ 4·in g_idx]   (AWQ, GPTQ,
                     compressed-tensors pack-quantized)
    mxfp4            in·out/2 + in·out/32                         (blocks + one E8M0 scale per 32, gpt-oss)
    nvfp4            in·out/2 + in·out/16 + 8                     (fp4 pairs, an fp8 scale per 16, two fp32 globals)

Which layers stay 16-bit comes from the config (``ignore``, ``modules_to_not_convert``, ``ignored_layers``), by the
categories the estimator counts (attention, mlp, experts, router, lm_head, vision, projector). A method not listed
here is an error that names it: a guessed size would be a wrong plan.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from appliance.errors import InputError

__all__ = ["CATEGORY_NAMES", "LinearFormat", "QuantScheme", "quant_scheme"]

# A typical module name of each category, to test ignore-list entries (plain names or "re:" patterns) against.
CATEGORY_NAMES: dict[str, tuple[str, ...]] = {
    "attention": ("model.layers.0.self_attn.q_proj", "model.language_model.layers.0.self_attn.o_proj"),
    "mlp": ("model.layers.0.mlp.down_proj", "model.language_model.layers.0.mlp.gate_proj"),
    "experts": ("model.layers.0.mlp.experts.0.down_proj", "model.layers.0.mlp.experts"),
    "router": ("model.layers.0.mlp.gate", "model.layers.0.mlp.router", "model.layers.0.block_sparse_moe.gate"),
    "lm_head": ("lm_head",),
    "vision": (
        "model.vision_tower.encoder.layers.0.self_attn.q_proj",
        "visual.blocks.0.attn.qkv",
        "vision_model.encoder.layers.0.mlp.fc1",
    ),
    "projector": (
        "model.multi_modal_projector.linear_1",
        "visual.merger.mlp.0",
        "model.embed_vision.embedding_projection",
    ),
}
# Categories a method leaves in 16 bit unless its config says otherwise: AutoAWQ / GPTQ quantize the decoder's
# linear layers only; every method keeps lm_head and the MoE router (out = experts, too small to pack) in 16 bit.
DEFAULT_KEPT = {"lm_head", "router"}
DECODER_ONLY_METHODS = {"awq", "gptq", "mxfp4"}


@dataclass(frozen=True)
class LinearFormat:
    """One stored format of a linear layer's weight."""

    label: str
    bits: float  # bits per weight of the packed values
    group: int = 0  # values per scale along the input dimension (0: per channel / tensor / block)
    scale_bytes: int = 2
    zeros: bool = False  # asymmetric: packed zero points per group
    g_idx: bool = False  # GPTQ's act-order index, int32 per input feature
    block: int = 0  # fp8 block quantization: one fp32 scale per block × block tile
    per_channel: bool = False
    extra_bytes: int = 0  # per-tensor scales

    def nbytes(self, n_in: int, n_out: int) -> int:
        """Bytes of an ``n_in × n_out`` weight with its scales, zero points and indices."""
        values = math.ceil(n_in * n_out * self.bits / 8)
        if self.block:
            return values + 4 * math.ceil(n_out / self.block) * math.ceil(n_in / self.block)
        if self.group:
            groups = math.ceil(n_in / self.group) * n_out
            extra = groups * self.scale_bytes
            if self.zeros:
                extra += math.ceil(groups * self.bits / 8)
            if self.g_idx:
                extra += 4 * n_in
            return values + extra
        if self.per_channel:
            return values + self.scale_bytes * n_out
        return values + self.extra_bytes


BF16 = LinearFormat("16-bit", 16)


@dataclass(frozen=True)
class QuantScheme:
    """The checkpoint's formats: the quantized one and the categories kept in 16 bit."""

    method: str
    linear: LinearFormat
    kept: frozenset[str]

    def format_for(self, category: str) -> LinearFormat:
        """The format a layer of ``category`` is stored in."""
        return BF16 if category in self.kept else self.linear

    @property
    def label(self) -> str:
        """E.g. ``awq int4 g128``."""
        return f"{self.method} {self.linear.label}" if self.method != "none" else "16-bit"


UNQUANTIZED = QuantScheme("none", BF16, frozenset(CATEGORY_NAMES))


def _ignored(entries: list[str], method: str) -> frozenset[str]:
    kept = set(DEFAULT_KEPT)
    if method in DECODER_ONLY_METHODS:
        kept |= {"vision", "projector"}
    for entry in entries:
        # "re:" entries are regular expressions (compressed-tensors); others are module names, "*" a wildcard.
        pattern = entry[3:] if entry.startswith("re:") else re.escape(entry).replace(r"\*", r"[^.]+")
        for category, names in CATEGORY_NAMES.items():
            if any(re.search(pattern, name) or name in entry for name in names):
                kept.add(category)
    return frozenset(kept)


def _int_format(method: str, bits: int, group: int, *, zeros: bool, g_idx: bool) -> LinearFormat:
    return LinearFormat(f"int{bits} g{group}", bits, group=group, zeros=zeros, g_idx=g_idx)


def _compressed_tensors(qc: dict[str, Any]) -> LinearFormat:
    groups = qc.get("config_groups") or {}
    weights = next((g.get("weights") for g in groups.values() if isinstance(g, dict) and g.get("weights")), None)
    if not isinstance(weights, dict):
        raise InputError(
            "quantization_config (compressed-tensors) has no config_groups.*.weights, so the weights' size is unknown.",
            "Give the weights' size with --weights-gib, or plan from the model directory with its safetensors.",
        )
    bits = int(weights.get("num_bits", 8))
    kind = str(weights.get("type", "int"))
    strategy = str(weights.get("strategy", "tensor"))
    group = int(weights.get("group_size") or 0)
    if kind == "float" and bits == 8:
        if strategy == "block":
            size = (weights.get("block_structure") or [128, 128])[0]
            return LinearFormat(f"fp8 block {size}", 8, block=int(size))
        if strategy == "channel":
            return LinearFormat("fp8 per-channel", 8, per_channel=True, scale_bytes=2)
        return LinearFormat("fp8 per-tensor", 8, extra_bytes=4)
    if kind == "float" and bits == 4:
        return LinearFormat("nvfp4", 4, group=group or 16, scale_bytes=1, extra_bytes=8)
    symmetric = weights.get("symmetric", True) is not False
    if strategy == "channel":
        return LinearFormat(f"int{bits} per-channel", bits, per_channel=True)
    return _int_format(
        "compressed-tensors", bits, group or 128, zeros=not symmetric, g_idx=bool(weights.get("actorder"))
    )


def quant_scheme(config: dict[str, Any], text: dict[str, Any]) -> QuantScheme:
    """The checkpoint's quantization from ``quantization_config`` (top level or in ``text_config``)."""
    qc = config.get("quantization_config") or text.get("quantization_config")
    if not isinstance(qc, dict):
        return UNQUANTIZED
    method = str(qc.get("quant_method", "")).lower()
    ignore = [str(x) for key in ("ignore", "modules_to_not_convert", "ignored_layers", "exclude_modules")
              for x in (qc.get(key) or [])]  # fmt: skip
    if method == "fp8":
        block = qc.get("weight_block_size")
        fmt = (
            LinearFormat(f"fp8 block {block[0]}", 8, block=int(block[0]))
            if isinstance(block, list) and block
            else LinearFormat("fp8 per-tensor", 8, extra_bytes=4)
        )
    elif method in ("awq", "gptq"):
        bits = int(qc.get("bits") or qc.get("w_bit") or 4)
        group = int(qc.get("group_size") or qc.get("q_group_size") or 128)
        # AWQ stores zero points unless zero_point is false; GPTQ checkpoints always store qzeros.
        zeros = method == "gptq" or qc.get("zero_point", True) is not False
        fmt = _int_format(method, bits, group if group > 0 else 1 << 30, zeros=zeros, g_idx=method == "gptq")
    elif method == "compressed-tensors":
        fmt = _compressed_tensors(qc)
    elif method == "mxfp4":
        fmt = LinearFormat("4-bit, a scale per 32", 4.25)
    elif method == "modelopt" and str(qc.get("quant_algo", "")).upper() in ("NVFP4", "FP8"):
        algo = str(qc.get("quant_algo")).upper()
        fmt = (
            LinearFormat("nvfp4", 4, group=16, scale_bytes=1, extra_bytes=8)
            if algo == "NVFP4"
            else LinearFormat("fp8 per-tensor", 8, extra_bytes=4)
        )
    else:
        name = method or "(no quant_method)"
        raise InputError(
            f"quantization_config names the method {name!r}, which the planner cannot size from the config.",
            "Plan from the model directory with its safetensors files (their headers give the exact size), or give "
            "the weights' size with --weights-gib.",
            details={"quant_method": name},
        )
    return QuantScheme(method, fmt, _ignored(ignore, method))
