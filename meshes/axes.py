"""The one place where logical array dimensions meet mesh axis names.

Layers and loaders name dimensions logically ("heads", "experts", ...); `logical_spec` maps them to mesh axes.
Nothing else in the code base spells a mesh axis as a raw string.
"""

from __future__ import annotations

from jax.sharding import PartitionSpec

PP = "pp"  # pipeline stages: layers split into contiguous stages
EP = "ep"  # expert parallelism: experts (and their adapter pages) split over devices
TP = "tp"  # tensor parallelism: attention heads and MLP width split over devices
MODEL_AXES = (PP, EP, TP)

# logical dimension name -> mesh axis (or axes); names missing here are replicated.
LOGICAL_RULES: dict[str, str | tuple[str, ...]] = {
    "stage": PP,  # leading dim of every per-layer array: which stage holds that layer
    "experts": EP,
    "heads": TP,
    "kv_heads": TP,
    "mlp": TP,  # dense-MLP intermediate width
    "expert_mlp": TP,  # per-expert intermediate width
    "vocab": MODEL_AXES,  # embedding / lm-head rows: spread over every device
}


def logical_spec(*dims: str | None) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry these logical names (None = replicated dim)."""
    return PartitionSpec(*(LOGICAL_RULES.get(d) if d else None for d in dims))
