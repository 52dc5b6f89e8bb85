"""The projections a LoRA adapter can target, and the shapes of their adapter pages.

Scaling is folded into B at load time. Pages are stored per layer slot, stacked over pipeline stages like the
base weights (models/stages.py), with the adapter-slot dimension first so one adapter's pages are contiguous.
"""

from __future__ import annotations

from infinilora_jax.models.config import ModelConfig

ATTENTION_TARGETS = ("q", "k", "v", "o")
DENSE_MLP_TARGETS = ("gate", "up", "down")  # dense-MLP layers (Qwen3 mlp_only_layers)
EXPERT_TARGETS = ("router", "expert_gate_up", "expert_down")  # router logits; per-expert LoRA (gate_up: one A)
ALL_TARGETS = ATTENTION_TARGETS + DENSE_MLP_TARGETS + EXPERT_TARGETS


def page_decls(target: str, cfg: ModelConfig, pp: int, slots: int, rank: int):
    """((A shape, A dims), (B shape, B dims)) for one layer slot of one target, global shapes.

    A pages are rank-major, [..., R, D_in] (PEFT's lora_A.weight orientation): the GPU and TPU kernels read
    rank rows of D_in (a free view of the page), and the reference's gather + einsum reads them as fast as
    rank-minor pages or faster (benchmarks/lora_kernels.py, docs/benchmarks.md)."""
    h, q_out, kv_out = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    e, ie, idense = cfg.num_experts, cfg.moe_intermediate_size, cfg.dense_intermediate_size
    lead, lead_dims = (pp, slots), ("stage", None)
    table = {
        "q": ((rank, h), (None, None), (rank, q_out), (None, "heads")),
        "k": ((rank, h), (None, None), (rank, kv_out), (None, "kv_heads")),
        "v": ((rank, h), (None, None), (rank, kv_out), (None, "kv_heads")),
        "o": ((rank, q_out), (None, "heads"), (rank, h), (None, None)),
        "gate": ((rank, h), (None, None), (rank, idense), (None, "mlp")),
        "up": ((rank, h), (None, None), (rank, idense), (None, "mlp")),
        "down": ((rank, idense), (None, "mlp"), (rank, h), (None, None)),
        "router": ((rank, h), (None, None), (rank, e), (None, None)),
        "expert_gate_up": ((e, rank, h), ("experts", None, None), (e, rank, 2, ie),
                           ("experts", None, None, "expert_mlp")),
        "expert_down": ((e, rank, ie), ("experts", None, "expert_mlp"), (e, rank, h), ("experts", None, None)),
    }
    a_shape, a_dims, b_shape, b_dims = table[target]
    return (lead + a_shape, lead_dims + a_dims), (lead + b_shape, lead_dims + b_dims)
