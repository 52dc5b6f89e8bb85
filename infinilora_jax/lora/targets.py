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
    """((A shape, A dims), (B shape, B dims)) for one layer slot of one target, global shapes."""
    h, q_out, kv_out = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    e, ie, idense = cfg.num_experts, cfg.moe_intermediate_size, cfg.dense_intermediate_size
    lead, lead_dims = (pp, slots), ("stage", None)
    table = {
        "q": ((h, rank), (None, None), (rank, q_out), (None, "heads")),
        "k": ((h, rank), (None, None), (rank, kv_out), (None, "kv_heads")),
        "v": ((h, rank), (None, None), (rank, kv_out), (None, "kv_heads")),
        "o": ((q_out, rank), ("heads", None), (rank, h), (None, None)),
        "gate": ((h, rank), (None, None), (rank, idense), (None, "mlp")),
        "up": ((h, rank), (None, None), (rank, idense), (None, "mlp")),
        "down": ((idense, rank), ("mlp", None), (rank, h), (None, None)),
        "router": ((h, rank), (None, None), (rank, e), (None, None)),
        "expert_gate_up": ((e, h, rank), ("experts", None, None), (e, rank, 2, ie),
                           ("experts", None, None, "expert_mlp")),
        "expert_down": ((e, ie, rank), ("experts", "expert_mlp", None), (e, rank, h), ("experts", None, None)),
    }
    a_shape, a_dims, b_shape, b_dims = table[target]
    return (lead + a_shape, lead_dims + a_dims), (lead + b_shape, lead_dims + b_dims)
