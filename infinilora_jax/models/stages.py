"""Which layer lives where under pipeline parallelism.

Layers are split into `pp` contiguous stages of `layers_per_stage`. Every per-layer array is stored stacked
over stages: "layer slot" j is one array of shape [pp, ...] whose slice s holds layer s * layers_per_stage + j,
sharded over the `pp` mesh axis so each stage's devices hold only their own layers. Inside shard_map a device
sees [1, ...] and uses it whole, a free view (a stacked [L, ...] array sliced per layer would be copied).

A slot whose layers differ in kind across stages (one stage's layer j dense, another's sparse) holds both
kinds of weights; each stage uses its own kind and the other stays zero. That costs memory only for models
that mix dense and sparse layers unevenly (e.g. Qwen3 `mlp_only_layers`).
"""

from __future__ import annotations

import dataclasses

from infinilora_jax.errors import LayoutError


@dataclasses.dataclass(frozen=True)
class StagePlan:
    pp: int
    layers_per_stage: int
    slot_kinds: tuple[tuple[bool, ...], ...]  # slot_kinds[j][s]: layer j of stage s is sparse (MoE)

    @classmethod
    def build(cls, moe_layers: tuple[bool, ...], pp: int) -> StagePlan:
        if len(moe_layers) % pp:
            raise LayoutError(f"{len(moe_layers)} layers do not split into pp={pp} equal stages")
        per = len(moe_layers) // pp
        kinds = tuple(tuple(moe_layers[s * per + j] for s in range(pp)) for j in range(per))
        return cls(pp, per, kinds)

    def layer_index(self, stage: int, slot: int) -> int:
        return stage * self.layers_per_stage + slot

    def slot_has_moe(self, slot: int) -> bool:
        return any(self.slot_kinds[slot])

    def slot_has_dense(self, slot: int) -> bool:
        return not all(self.slot_kinds[slot])
