"""Random adapters of a given rank on chosen targets, for benchmarks and load tests at real model sizes."""

from __future__ import annotations

import numpy as np

from infinilora_jax.loading.peft_adapter import AdapterWeights
from infinilora_jax.models.config import ModelConfig


def random_adapter(cfg: ModelConfig, name: str, rank: int, targets: tuple[str, ...], seed: int,
                   scale: float = 0.1, dtype=np.float32) -> AdapterWeights:
    """A LoRA of `rank` on every layer's `targets` (names from lora/targets.py that apply to the layer), with
    A ~ N(0, 1/in) and B ~ N(0, scale^2 / rank): each delta is about `scale` times its input's scale."""
    rng = np.random.default_rng(seed)
    h, e = cfg.hidden_size, cfg.num_experts
    q, kv, i, d = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.moe_intermediate_size, \
        cfg.dense_intermediate_size
    shapes = {"q": ((h,), (q,)), "k": ((h,), (kv,)), "v": ((h,), (kv,)), "o": ((q,), (h,)),
              "gate": ((h,), (d,)), "up": ((h,), (d,)), "down": ((d,), (h,)), "router": ((h,), (e,)),
              "expert_gate_up": ((e, h), (e, 2, i)), "expert_down": ((e, i), (e, h))}
    pages = {}
    for layer in range(cfg.num_layers):
        sparse = cfg.moe_layers[layer]
        for target in targets:
            if (target in ("gate", "up", "down") and sparse) or (target in ("router", "expert_gate_up",
                                                                            "expert_down") and not sparse):
                continue
            a_in, b_out = shapes[target]
            lead = a_in[:-1]
            # A is drawn [.., in, r] as before (a seed gives the same adapter as it did) and kept rank-major
            a = rng.standard_normal((*a_in, rank), np.float32) / np.sqrt(a_in[-1])
            b = rng.standard_normal((*lead, rank, *b_out[len(lead):]), np.float32) * (scale / np.sqrt(rank))
            pages[(layer, target)] = (np.ascontiguousarray(np.swapaxes(a, -1, -2)).astype(dtype), b.astype(dtype))
    return AdapterWeights(name, f"<random seed={seed}>", rank, float(rank), False, pages)
