"""vLLM's memory accounting, reproduced: the per-GPU budget, KV-cache blocks, groups, tokens and concurrency.

The identity vLLM applies on every rank (``vllm/v1/worker/gpu_worker.py``)::

    requested = total × gpu_memory_utilization         (start-up fails unless free memory ≥ requested)
    kv_cache  = requested − weights − peak_activation − non_torch [− cudagraph_estimate, from v0.21]

and the block math of ``vllm/v1/core/kv_cache_utils.py`` (groups of equal size for hybrid sliding/full models, one
shared block pool, per-request blocks per group, ``Maximum concurrency`` = blocks / Σ blocks per request)::

    page(layer)      = 2 × block × kv_heads_per_rank × head_dim × dtype_bytes          (kv_cache_interface.py)
    unified pages    : a smaller page gets block × (largest page / its page)  (unify_kv_cache_spec_page_size)
    num_blocks       = kv_cache // (page × group_size)
    blocks/request   = Σ full groups cdiv(L, block_g) + Σ sliding groups (cdiv(min(W − 1 + F, L), block_g) + 1)
    F (in flight)    = max_concurrent_batches × max_num_batched_tokens                (vllm/config/vllm.py)

Models whose layers differ in head size (Gemma 4: sliding 16 × 256, full 4 × 512) get one page size by a larger
block on the layers with the smaller page, and each group then counts its request's blocks in its own block size.

What vLLM *measures* at start-up (peak activation, non-torch memory, CUDA-graph memory) the planner *estimates*; the
estimates and their calibration against published start-up logs are described at :func:`activation_bytes` and in
docs/planner.md. Everything else is exact.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from appliance.errors import InputError, UsageError
from appliance.planner.model_config import ModelFacts

__all__ = [
    "GIB",
    "Budget",
    "Knobs",
    "KvLayout",
    "activation_bytes",
    "budget_for",
    "cudagraph_bytes",
    "kv_layout",
    "non_torch_bytes",
    "parse_version",
]

GIB = 1024**3
MIB = 1024**2
# Fitted to published H100 start-up logs (see docs/planner.md): the dummy sampler run on max_num_seqs rows keeps
# about 9.56 fp32 copies of the logits alive (bf16 logits, fp32 cast, sort values + int64 indices, softmax, ...),
# and the dummy forward keeps its hidden states (≈ 1.28 × tokens × hidden × 2 bytes).
SAMPLER_LOGIT_COPIES = 9.56
HIDDEN_KEEP_FACTOR = 1.28
# Non-torch memory (CUDA context, cuBLAS workspaces, NCCL buffers) as logged: 0.13–0.14 GiB at TP1, 0.54–0.55 beyond.
NON_TORCH_TP1_GIB = 0.14
NON_TORCH_TPN_GIB = 0.55
# vLLM's serve defaults (vllm/engine/arg_utils.py).
BIG_GPU_BATCHED_TOKENS, BIG_GPU_SEQS = 8192, 1024
SMALL_GPU_BATCHED_TOKENS, SMALL_GPU_SEQS = 2048, 256
CUDA_BLOCK_SIZE, MLA_BLOCK_SIZE, CPU_BLOCK_SIZE = 16, 64, 128
# Block size of the attention backend vLLM picks when a model's layers differ in head size: Gemma 4 logs "heterogeneous
# head dimensions ... Forcing TRITON_ATTN backend" (vllm/model_executor/models/config.py, Gemma4Config), and
# TRITON_ATTN takes the cache's default block size (vllm/config/cache.py, 16 on CUDA). FA4, which newer vLLM prefers
# where it is installed, was not traced: planning it needs --block-size.
BACKEND_BLOCK_SIZES = {"TRITON_ATTN": 16, "FLASH_ATTN": 16, "FLASHINFER": 16}
MIXED_HEAD_BACKEND = "TRITON_ATTN"
# From v0.21 the sliding-window reservation counts the tokens of every batch in flight, and asynchronous scheduling
# (on by default) keeps two: VllmConfig.max_in_flight_tokens = max_concurrent_batches × max_num_batched_tokens
# (vllm/config/vllm.py). v0.19.1's logged Gemma 4 row reproduces with one batch, v0.21's and v0.29's with two
# (docs/planner.md, tests/unit/planner/test_gemma4.py).
ASYNC_IN_FLIGHT_FROM = (0, 21)
MAX_CUDAGRAPH_CAPTURE = 512


def parse_version(text: str) -> tuple[int, int]:
    """``"0.11"``, ``"0.11.2"``, ``"v0.33.0"`` → ``(0, 11)``; raises ValueError otherwise."""
    parts = text.strip().lstrip("v").split(".")
    if len(parts) < 2 or not parts[0].isdigit() or not parts[1].isdigit():
        raise ValueError(text)
    return int(parts[0]), int(parts[1])


@dataclass(frozen=True)
class Knobs:
    """vLLM's settings that change the accounting (``None``: vLLM's default for the box)."""

    vllm_version: tuple[int, int] = (0, 33)
    gpu_memory_utilization: float | None = None
    block_size: int | None = None
    kv_cache_dtype: str = "auto"
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    enforce_eager: bool = False
    device: str = "cuda"  # "cuda" | "cpu"
    big_gpu: bool = True
    async_scheduling: bool | None = None  # None: vLLM's default for the version
    attention_backend: str | None = None  # None: the backend vLLM picks

    @property
    def estimates_cudagraphs(self) -> bool:
        """From v0.21 vLLM subtracts a CUDA-graph estimate before sizing the KV cache."""
        return self.vllm_version >= (0, 21) and not self.enforce_eager and self.device == "cuda"

    @property
    def tokens_from_concurrency(self) -> bool:
        """From v0.21 "KV cache size: N tokens" is int(max concurrency × max_model_len), before that blocks×size."""
        return self.vllm_version >= (0, 21)

    def default_utilization(self) -> float:
        """vLLM's default --gpu-memory-utilization: 0.90 before v0.21, 0.92 from then."""
        return 0.92 if self.vllm_version >= (0, 21) else 0.90

    def batched_tokens(self) -> int:
        """--max-num-batched-tokens, or vLLM's default for this GPU."""
        if self.max_num_batched_tokens:
            return self.max_num_batched_tokens
        return BIG_GPU_BATCHED_TOKENS if self.big_gpu else SMALL_GPU_BATCHED_TOKENS

    def num_seqs(self) -> int:
        """--max-num-seqs, or vLLM's default for this GPU."""
        if self.max_num_seqs:
            return self.max_num_seqs
        return BIG_GPU_SEQS if self.big_gpu else SMALL_GPU_SEQS

    def in_flight_tokens(self) -> int:
        """Tokens the scheduler may have in flight (F): two batches under asynchronous scheduling, else one."""
        asynchronous = self.async_scheduling
        if asynchronous is None:
            asynchronous = self.vllm_version >= ASYNC_IN_FLIGHT_FROM and self.device == "cuda"
        return (2 if asynchronous else 1) * self.batched_tokens()

    def kv_dtype_bytes(self, model_dtype_bytes: int) -> int:
        """Bytes per cached value: 1 for fp8 KV caches, else the model's dtype."""
        return 1 if self.kv_cache_dtype.startswith("fp8") else model_dtype_bytes


@dataclass(frozen=True)
class KvGroup:
    """One KV-cache group: ``layers`` layers (padding included) of one kind, in blocks of ``block_size`` tokens."""

    kind: str
    window: int | None
    layers: int
    block_size: int = CUDA_BLOCK_SIZE


@dataclass(frozen=True)
class KvLayout:
    """How vLLM lays out the KV cache for a model on one rank."""

    block_size: int  # the backend's block size (the smallest of the groups')
    page_bytes: int  # one block of one layer (equal for every layer once vLLM has unified the pages)
    groups: list[KvGroup]
    group_size: int  # layers per group; every group's layers share one tensor per position
    padding_layers: int
    num_layers: int

    @property
    def block_bytes(self) -> int:
        """Memory one block id costs across the layers that share it."""
        return self.page_bytes * self.group_size

    def blocks_per_request(self, max_model_len: int, in_flight_tokens: int) -> int:
        """Blocks one request of ``max_model_len`` tokens takes, summed over groups (vLLM's admission math)."""
        total = 0
        for g in self.groups:
            if g.kind == "sliding" and g.window is not None:
                tokens = min(g.window - 1 + in_flight_tokens, max_model_len)
                total += math.ceil(tokens / g.block_size) + 1
            else:
                total += math.ceil(max_model_len / g.block_size)
        return total

    def bytes_per_token(self) -> float:
        """KV bytes per token of one full-attention-equivalent request (for people)."""
        return sum(self.page_bytes * g.layers / g.block_size for g in self.groups) - (
            self.page_bytes * self.padding_layers / self.block_size
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "block_size": self.block_size,
            "page_bytes": self.page_bytes,
            "group_size": self.group_size,
            "groups": [
                {"kind": g.kind, "window": g.window, "layers": g.layers, "block_size": g.block_size}
                for g in self.groups
            ],
            "padding_layers": self.padding_layers,
        }


def backend_block_size(facts: ModelFacts, knobs: Knobs) -> int:
    """The block size of the attention backend vLLM will use (``--block-size`` wins)."""
    if knobs.block_size:
        return knobs.block_size
    if knobs.device == "cpu":
        return CPU_BLOCK_SIZE
    if facts.mla_latent_dim:
        return MLA_BLOCK_SIZE
    mixed = len({layer.head_dim or facts.head_dim for layer in facts.layers}) > 1
    backend = knobs.attention_backend or (MIXED_HEAD_BACKEND if mixed else None)
    if backend is None:
        return CUDA_BLOCK_SIZE
    if backend not in BACKEND_BLOCK_SIZES:
        raise UsageError(
            f"The block size of attention backend {backend} is not known to the planner.",
            f"Give the block size vLLM logs for {backend} with --block-size.",
        )
    return BACKEND_BLOCK_SIZES[backend]


def kv_layout(facts: ModelFacts, tp: int, knobs: Knobs) -> KvLayout:
    """The KV-cache layout on one of ``tp`` ranks: page size per layer and vLLM's layer groups."""
    dtype_bytes = knobs.kv_dtype_bytes(facts.dtype_bytes)
    block = backend_block_size(facts, knobs)
    if facts.mla_latent_dim:
        page = block * facts.mla_latent_dim * dtype_bytes  # one latent, no K/V pair, not split by TP
        n = len(facts.layers)
        return KvLayout(block, page, [KvGroup("mla", None, n, block)], n, 0, n)
    # One spec per layer shape (kind, window, heads per rank, head size), with its page at the backend's block size.
    specs: Counter[tuple[str, int | None, int, int]] = Counter()
    for layer in facts.layers:
        kv_heads = max(1, (layer.kv_heads or facts.num_kv_heads) // tp)  # replicated when TP exceeds the KV heads
        specs[(layer.kind, layer.window, kv_heads, layer.head_dim or facts.head_dim)] += 1
    pages = {spec: 2 * block * spec[2] * spec[3] * dtype_bytes for spec in specs}
    page = max(pages.values())
    # unify_kv_cache_spec_page_size: smaller pages get a proportionally larger block (vLLM refuses uneven ratios).
    blocks = {spec: block * page // p for spec, p in pages.items()}
    uneven = [spec for spec, p in pages.items() if page % p]
    if uneven:
        raise InputError(
            f"{facts.name}'s KV pages of {sorted(set(pages.values()))} bytes are not multiples of each other; vLLM "
            "refuses such a model (unify_kv_cache_spec_page_size).",
            "Check the config's head_dim / global_head_dim and num_key_value_heads, or try another --tp.",
        )
    n_layers = len(facts.layers)
    if len(specs) == 1:
        ((spec, n),) = specs.items()
        return KvLayout(block, page, [KvGroup(spec[0], spec[1], n, block)], n, 0, n_layers)
    smallest, largest = min(specs.values()), max(specs.values())
    group_size = largest if largest < smallest * 1.5 else smallest
    groups: list[KvGroup] = []
    padding = 0
    for spec, n in specs.items():
        k = math.ceil(n / group_size)
        padding += k * group_size - n
        groups.extend(KvGroup(spec[0], spec[1], group_size, blocks[spec]) for _ in range(k))
    return KvLayout(min(blocks.values()), page, groups, group_size, padding, n_layers)


def activation_bytes(facts: ModelFacts, tp: int, knobs: Knobs) -> int:
    """Peak activation of vLLM's profiling run on one rank (an estimate, calibrated on published logs).

    The profiling run is the vision encoder on the largest image batch its budget allows, one dummy forward of
    ``max_num_batched_tokens`` tokens, and a dummy sampler on ``max_num_seqs`` rows of fp32 logits over the whole
    vocabulary (not split by TP). Their peaks do not overlap; what each leaves behind (hidden states, encoder outputs)
    stays. For most models the sampler dominates, which is why a 0.6B model with a 152k vocabulary peaks higher
    (5.56 GiB) than an 8B model with 128k (4.76 GiB).
    """
    tokens = knobs.batched_tokens()
    seqs = min(knobs.num_seqs(), tokens)
    hidden = facts.hidden_size
    dtype = 2
    sampler = SAMPLER_LOGIT_COPIES * seqs * facts.vocab_size * 4
    keep = HIDDEN_KEEP_FACTOR * tokens * hidden * dtype
    inter = facts.intermediate_size * (4 if facts.num_experts else 1)  # MoE: top-k experts' intermediate cache
    forward = tokens * dtype * (3 * inter / tp + 4 * hidden)
    encoder_peak = 0.0
    encoder_keep = 0.0
    if facts.vision is not None:
        v = facts.vision
        budget = max(tokens, v.tokens_per_image)
        images = max(1, budget // v.tokens_per_image)
        patches = images * v.patches_per_image
        encoder_peak = patches * (v.intermediate_size + 3 * v.hidden_size) * dtype
        encoder_keep = images * v.tokens_per_image * hidden * dtype
    return int(max(forward, sampler + keep, encoder_peak) + encoder_keep)


def non_torch_bytes(tp: int) -> int:
    """CUDA context, cuBLAS and NCCL memory outside PyTorch's allocator, as vLLM logs it."""
    return int((NON_TORCH_TP1_GIB if tp == 1 else NON_TORCH_TPN_GIB) * GIB)


def cudagraph_bytes(facts: ModelFacts, tp: int, knobs: Knobs) -> int:
    """A rough estimate of vLLM's CUDA-graph memory (captured per batch size, PIECEWISE and FULL).

    Modelled as the largest captured batch's working memory plus a per-graph cost; published captures range from
    −0.9 to +1.0 GiB and vLLM's own estimate can overshoot by GiBs, so treat this line as ± 1 GiB.
    """
    if knobs.enforce_eager or knobs.device != "cuda":
        return 0
    largest = min(MAX_CUDAGRAPH_CAPTURE, 2 * knobs.num_seqs())
    sizes = 3 + largest // 8  # 1, 2, 4, then every 8 up to the largest
    graphs = 2 * sizes  # PIECEWISE and FULL decode graphs
    per_graph = max(MIB, facts.num_layers * 64 * 1024)
    inter = facts.intermediate_size * (4 if facts.num_experts else 1)
    first = largest * 2 * (3 * inter / tp + 4 * facts.hidden_size)
    return int(first + (graphs - 1) * per_graph)


@dataclass
class Budget:
    """One rank's budget and what it buys, in bytes and tokens."""

    tp: int
    total_bytes: int
    utilization: float
    requested_bytes: int
    weights_bytes: int
    activation_bytes: int
    non_torch_bytes: int
    cudagraph_bytes: int
    kv_bytes: int
    layout: KvLayout
    max_model_len: int
    in_flight_tokens: int  # F: tokens of every batch in flight (the sliding-window reservation)
    tokens_from_concurrency: bool
    kv_measured: bool = False
    startup_error: str | None = None  # vLLM's own start-up check would fail with this
    policy_error: str | None = None  # a clinic-edge safety rule is broken (the unified-memory reserve)

    @property
    def num_blocks(self) -> int:
        """Blocks in the shared pool (vLLM's ``num_gpu_blocks``)."""
        return max(0, self.kv_bytes // self.layout.block_bytes) if self.kv_bytes > 0 else 0

    def blocks_per_request(self, max_model_len: int | None = None) -> int:
        """Blocks one request of ``max_model_len`` (default: the plan's) needs."""
        return self.layout.blocks_per_request(max_model_len or self.max_model_len, self.in_flight_tokens)

    def max_concurrency(self, max_model_len: int | None = None) -> float:
        """vLLM's "Maximum concurrency for L tokens per request"."""
        return self.num_blocks / self.blocks_per_request(max_model_len)

    @property
    def kv_tokens(self) -> int:
        """vLLM's "KV cache size: N tokens" for the version being planned."""
        if self.tokens_from_concurrency:
            return int(self.max_concurrency() * self.max_model_len)
        return self.num_blocks // len(self.layout.groups) * self.layout.block_size

    def needed_bytes(self, max_model_len: int) -> int:
        """KV memory one request of ``max_model_len`` tokens needs (vLLM's start-up check)."""
        return self.blocks_per_request(max_model_len) * self.layout.block_bytes

    def largest_len(self, sessions: int = 1, upper: int | None = None) -> int:
        """The largest max_model_len at which ``sessions`` requests of that length fit (0: not even one token)."""
        hi = upper or self.max_model_len
        lo, best = 1, 0
        while lo <= hi:
            mid = (lo + hi) // 2
            if self.num_blocks >= sessions * self.blocks_per_request(mid) and self.kv_bytes > 0:
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        return best

    def check_startup(self) -> str | None:
        """vLLM's own KV start-up checks: the error it would raise, or ``None``."""
        if self.startup_error:
            return self.startup_error
        if self.kv_bytes <= 0:
            return (
                "No available memory for the cache blocks: weights, activation and overheads leave "
                f"{self.kv_bytes / GIB:.2f} GiB for the KV cache"
            )
        needed = self.needed_bytes(self.max_model_len)
        if needed > self.kv_bytes:
            est = self.largest_len()
            return (
                f"To serve at least one request with max seq len ({self.max_model_len}), {needed / GIB:.2f} GiB KV "
                f"cache is needed, which is larger than the available KV cache memory ({self.kv_bytes / GIB:.2f} "
                f"GiB); the estimated maximum model length is {est}"
            )
        return None


def budget_for(
    facts: ModelFacts,
    *,
    tp: int,
    total_bytes: int,
    utilization: float,
    weights_bytes: int,
    max_model_len: int,
    knobs: Knobs,
    kv_bytes_measured: int | None = None,
) -> Budget:
    """Compute one rank's budget the way vLLM does (``weights_bytes`` is already per rank)."""
    layout = kv_layout(facts, tp, knobs)
    requested = math.ceil(total_bytes * utilization)
    act = activation_bytes(facts, tp, knobs)
    nt = non_torch_bytes(tp)
    cg = cudagraph_bytes(facts, tp, knobs)
    if kv_bytes_measured is not None:
        kv = kv_bytes_measured
    else:
        kv = requested - weights_bytes - act - nt - (cg if knobs.estimates_cudagraphs else 0)
    return Budget(
        tp=tp,
        total_bytes=total_bytes,
        utilization=utilization,
        requested_bytes=requested,
        weights_bytes=weights_bytes,
        activation_bytes=act,
        non_torch_bytes=nt,
        cudagraph_bytes=cg,
        kv_bytes=kv,
        layout=layout,
        max_model_len=max_model_len,
        in_flight_tokens=knobs.in_flight_tokens(),
        tokens_from_concurrency=knobs.tokens_from_concurrency,
        kv_measured=kv_bytes_measured is not None,
    )
