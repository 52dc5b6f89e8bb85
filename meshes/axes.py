"""The one place where logical array dimensions meet mesh axis names.

Layers and loaders name dimensions logically ("heads", "experts", ...); `logical_spec` maps them to mesh axes.
Nothing else in the code base spells a mesh axis as a raw string.
"""

from __future__ import annotations

from jax.sharding import PartitionSpec

ROLE = "role"  # disaggregated mode only: 0 = base-model devices, 1 = LoRA-server devices
DP = "dp"  # disaggregated mode only: base instances; on the LoRA role, the LoRA server's pipeline stage
PP = "pp"  # pipeline stages: layers split into contiguous stages
EP = "ep"  # expert parallelism: experts (and their adapter pages) split over devices
TP = "tp"  # tensor parallelism: attention heads and MLP width split over devices
MODEL_AXES = (PP, EP, TP)  # one model replica (coupled) or one base instance (disaggregated)
ROLE_AXES = (ROLE, DP, *MODEL_AXES)  # the global mesh of disaggregated mode
BASE_ROLE, LORA_ROLE = 0, 1  # coordinates along ROLE

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
