"""Replicas or tensor parallelism: how the box's GPUs are split between vLLM processes.

When the model and the KV cache the clinic needs fit on one GPU, every GPU runs its own vLLM replica and the gateway
balances between them: replicas have no all-reduce on every layer, survive one GPU's failure, and a single-GPU engine
is the simplest thing that works. Only when one GPU is too small does the planner use the smallest tensor-parallel
size that fits (vLLM requires the attention heads to divide evenly between ranks).
"""

from __future__ import annotations

import math

__all__ = ["sessions_per_replica", "tp_candidates"]


def tp_candidates(gpus: int, num_attention_heads: int, num_kv_heads: int) -> list[int]:
    """Tensor-parallel sizes vLLM accepts for this model on ``gpus`` GPUs, smallest first."""
    out = []
    tp = 1
    while tp <= max(1, gpus):
        heads_ok = num_attention_heads % tp == 0
        kv_ok = num_kv_heads % tp == 0 or tp % num_kv_heads == 0
        if heads_ok and kv_ok:
            out.append(tp)
        tp *= 2
    return out or [1]


def sessions_per_replica(concurrency: int, replicas: int) -> int:
    """Sessions each replica must hold at full length when the gateway spreads ``concurrency`` over ``replicas``."""
    return max(1, math.ceil(concurrency / max(1, replicas)))
