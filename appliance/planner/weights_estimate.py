"""The weights' size from config.json alone, counted tensor by tensor as the checkpoint stores them.

Used when no safetensors are at hand (a bare config.json, or a model directory before the download); when they are,
their headers stay the truth (safetensors_header.py). Per decoder layer, with h = hidden_size::

    attention  q: h·heads·d   k, v: h·kv·d (none for V when K doubles as V)   o: heads·d·h   [+ biases, q/k norms]
    MLA        q: h·heads·(nope+rope) or via q_lora_rank   kv_a: h·(kv_lora+rope)   kv_b: kv_lora·heads·(nope+v)
    MLP        gated 3·h·i  [+ biases]
    MoE        experts·3·h·i_e + router h·experts  [+ shared experts, expert biases]
    norms      2·h (4·h for Gemma 2/3/4)

plus the embeddings (vocab·h, and as much again for an untied lm_head), the final norm, and the vision tower with
its projector (vision_tower.py). Each linear layer is priced in the checkpoint's format (quant_format.py).
vLLM adds a few tensors of its own at load: Gemma 4 copies K into V on its full layers (``load_extra_bytes``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from appliance.errors import InputError
from appliance.planner.model_config import gemma4_layer_shapes, resolved_text_config
from appliance.planner.quant_format import LinearFormat, QuantScheme, quant_scheme
from appliance.planner.vision_tower import vision_params

__all__ = ["WeightsEstimate", "estimate_weights"]

DTYPE16 = 2
# Families whose q/k/v projections carry biases although attention_bias is absent (Qwen2 lineage).
QKV_BIAS_TYPES = {"qwen2", "qwen2_5_vl", "qwen2_vl", "qwen2_moe"}
# Families with RMSNorm on q and k per head (Qwen3, Gemma 3/4).
QK_NORM_TYPES = {"qwen3", "qwen3_moe", "qwen3_vl_text", "qwen3_vl", "gemma3_text", "gemma4_text"}
# Gemma 2/3/4 normalize before and after both attention and MLP.
FOUR_NORM_TYPES = {"gemma2", "gemma3_text", "gemma4_text"}
# transformers' default tie_word_embeddings when a config omits it.
TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3_text", "gemma4_text"}
REQUIRED = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")


@dataclass
class WeightsEstimate:
    """Bytes by part as the checkpoint stores them, and what vLLM adds at load."""

    parts: dict[str, int] = field(default_factory=dict)
    params: int = 0
    load_extra_bytes: int = 0
    quantization: str = "16-bit"
    notes: list[str] = field(default_factory=list)

    @property
    def checkpoint_bytes(self) -> int:
        """The safetensors bytes the checkpoint would hold."""
        return sum(self.parts.values())

    @property
    def loaded_bytes(self) -> int:
        """What vLLM holds after loading (before its rotary caches, which plan.py adds for every source)."""
        return self.checkpoint_bytes + self.load_extra_bytes

    def add(self, part: str, nbytes: int, params: int) -> None:
        """Count ``params`` values of ``part`` taking ``nbytes``."""
        self.parts[part] = self.parts.get(part, 0) + int(nbytes)
        self.params += int(params)

    def linear(self, part: str, fmt: LinearFormat, n_in: int, n_out: int, count: int = 1) -> None:
        """Count ``count`` linear layers of ``n_in × n_out`` stored as ``fmt``."""
        self.add(part, count * fmt.nbytes(n_in, n_out), count * n_in * n_out)

    def vector(self, part: str, n: int) -> None:
        """Count a 16-bit vector (norm weights, biases) of ``n`` values."""
        self.add(part, DTYPE16 * n, n)


def _i(text: dict[str, Any], key: str, default: int = 0) -> int:
    value = text.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _check_fields(text: dict[str, Any], source: str, architecture: str) -> None:
    missing = [k for k in REQUIRED if not _i(text, k)]
    if not (_i(text, "intermediate_size") or _i(text, "moe_intermediate_size")):
        missing.append("intermediate_size")
    if missing:
        raise InputError(
            f"{source} ({architecture}) lacks {', '.join(missing)}, so the weights cannot be estimated from it.",
            "Use the model's original config.json, plan from the model directory with its *.safetensors files, or "
            "give the weights' size with --weights-gib (e.g. --weights-gib 14.99 for Llama-3.1-8B in bf16).",
            details={"missing": missing, "architecture": architecture},
        )


def _attention(est: WeightsEstimate, text: dict[str, Any], model_type: str, q: QuantScheme) -> None:
    h, layers = _i(text, "hidden_size"), _i(text, "num_hidden_layers")
    heads = _i(text, "num_attention_heads")
    kv = _i(text, "num_key_value_heads", heads)
    d = _i(text, "head_dim") or h // heads
    fmt = q.format_for("attention")
    if _i(text, "kv_lora_rank"):
        _mla(est, text, fmt)
        return
    shapes = gemma4_layer_shapes(text, layers) if model_type == "gemma4_text" else {}
    k_eq_v = bool(text.get("attention_k_eq_v"))
    qkv_bias = bool(text.get("attention_bias")) or model_type in QKV_BIAS_TYPES
    o_bias = bool(text.get("attention_bias")) and model_type not in QKV_BIAS_TYPES
    for i in range(layers):
        layer_kv, layer_d = shapes.get(i, (None, None))
        lkv, ld = layer_kv or kv, layer_d or d
        est.linear("attention", fmt, h, heads * ld)
        est.linear("attention", fmt, h, lkv * ld)
        if i in shapes and k_eq_v:
            # The checkpoint has no v_proj; vLLM loads K into both slots of qkv_proj (gemma4.py).
            est.load_extra_bytes += fmt.nbytes(h, lkv * ld)
        else:
            est.linear("attention", fmt, h, lkv * ld)
        est.linear("attention", fmt, heads * ld, h)
        if qkv_bias:
            est.vector("attention", (heads + 2 * lkv) * ld)
        if o_bias:
            est.vector("attention", h)
        if model_type in QK_NORM_TYPES:
            est.vector("norms", 2 * ld)
    if model_type == "gpt_oss":
        est.add("attention", 4 * heads * layers, heads * layers)  # attention sinks, fp32 (one per head)


def _mla(est: WeightsEstimate, text: dict[str, Any], fmt: LinearFormat) -> None:
    """DeepSeek-style multi-head latent attention."""
    h, layers, heads = _i(text, "hidden_size"), _i(text, "num_hidden_layers"), _i(text, "num_attention_heads")
    rope, nope = _i(text, "qk_rope_head_dim", 64), _i(text, "qk_nope_head_dim", 128)
    v, kv_lora, q_lora = _i(text, "v_head_dim", 128), _i(text, "kv_lora_rank"), _i(text, "q_lora_rank")
    if q_lora:
        est.linear("attention", fmt, h, q_lora, layers)
        est.vector("norms", q_lora * layers)
        est.linear("attention", fmt, q_lora, heads * (nope + rope), layers)
    else:
        est.linear("attention", fmt, h, heads * (nope + rope), layers)
    est.linear("attention", fmt, h, kv_lora + rope, layers)
    est.vector("norms", kv_lora * layers)
    est.linear("attention", fmt, kv_lora, heads * (nope + v), layers)
    est.linear("attention", fmt, heads * v, h, layers)


def _moe_layers(text: dict[str, Any], layers: int) -> list[bool]:
    """Which layers carry experts (DeepSeek's first dense layers, Qwen-MoE's sparse step and MLP-only layers)."""
    first_dense = _i(text, "first_k_dense_replace")
    freq = _i(text, "moe_layer_freq", 1) or 1
    step = _i(text, "decoder_sparse_step", 1) or 1
    mlp_only = set(text.get("mlp_only_layers") or [])
    return [i >= first_dense and i % freq == 0 and (i + 1) % step == 0 and i not in mlp_only for i in range(layers)]


def _mlp(est: WeightsEstimate, text: dict[str, Any], model_type: str, q: QuantScheme) -> None:
    h, layers = _i(text, "hidden_size"), _i(text, "num_hidden_layers")
    inter = _i(text, "intermediate_size")
    experts = _i(text, "num_local_experts") or _i(text, "num_experts") or _i(text, "n_routed_experts")
    if model_type == "gemma4_text" and not text.get("enable_moe_block"):
        experts = 0
    expert_inter = _i(text, "moe_intermediate_size") or inter
    dense_fmt, expert_fmt, router_fmt = q.format_for("mlp"), q.format_for("experts"), q.format_for("router")
    mlp_bias = bool(text.get("mlp_bias"))
    for is_moe in _moe_layers(text, layers) if experts else [False] * layers:
        # Gemma 4's MoE layers keep a dense MLP beside the experts (enable_moe_block).
        if (not is_moe or model_type == "gemma4_text") and inter:
            est.linear("mlp", dense_fmt, h, inter, 2)
            est.linear("mlp", dense_fmt, inter, h)
            if mlp_bias:
                est.vector("mlp", 2 * inter + h)
        if not is_moe:
            continue
        est.linear("experts", expert_fmt, h, expert_inter, 2 * experts)
        est.linear("experts", expert_fmt, expert_inter, h, experts)
        est.linear("router", router_fmt, h, experts)
        if model_type == "gpt_oss":
            est.vector("experts", experts * (2 * expert_inter + h))  # expert biases
            est.vector("router", experts)
        if _i(text, "n_shared_experts"):
            shared = _i(text, "n_shared_experts") * expert_inter
            est.linear("mlp", dense_fmt, h, shared, 2)
            est.linear("mlp", dense_fmt, shared, h)
        if _i(text, "shared_expert_intermediate_size"):
            shared = _i(text, "shared_expert_intermediate_size")
            est.linear("mlp", dense_fmt, h, shared, 2)
            est.linear("mlp", dense_fmt, shared, h)
            est.linear("router", router_fmt, h, 1)  # shared_expert_gate


def estimate_weights(config: dict[str, Any], source: str = "config.json") -> WeightsEstimate:
    """Estimate the checkpoint's bytes from ``config`` (raises InputError naming missing fields or methods)."""
    text, model_type = resolved_text_config(config)
    archs = config.get("architectures")
    architecture = str(archs[0]) if isinstance(archs, list) and archs else model_type or "unknown"
    _check_fields(text, source, architecture)
    q = quant_scheme(config, text)
    est = WeightsEstimate(quantization=q.label)
    h, layers, vocab = _i(text, "hidden_size"), _i(text, "num_hidden_layers"), _i(text, "vocab_size")
    _attention(est, text, model_type, q)
    _mlp(est, text, model_type, q)
    est.vector("norms", (4 if model_type in FOUR_NORM_TYPES else 2) * h * layers + h)
    est.add("embeddings", DTYPE16 * vocab * h, vocab * h)
    per_layer = _i(text, "hidden_size_per_layer_input")
    if per_layer:  # Gemma 4 E2B/E4B: a second embedding table feeding every layer
        est.add("embeddings", DTYPE16 * _i(text, "vocab_size_per_layer_input", vocab) * layers * per_layer, 0)
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", model_type in TIED_BY_DEFAULT))
    if not tied:
        est.linear("lm_head", q.format_for("lm_head"), h, vocab)
    vision = config.get("vision_config")
    if isinstance(vision, dict):
        for part, params in vision_params(config, vision, h).items():
            fmt = q.format_for(part)
            # Towers are priced per value: 16-bit, or the scheme's packed bits where a method quantizes them.
            est.add(part, params * DTYPE16 if fmt.bits == 16 else math.ceil(params * fmt.bits / 8), params)
    return est
