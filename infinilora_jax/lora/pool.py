"""The device-side adapter pool: fixed pages for `max_adapters` adapters of rank up to `max_rank`.

Slot 0 is reserved for "no adapter" and stays zero. An adapter's pages are written into a free slot in one
jitted, donated update; until that update returns, nothing refers to the slot (see lora/registry.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infinilora_jax.errors import AdapterError, ConfigError
from infinilora_jax.loading.peft_adapter import AdapterWeights
from infinilora_jax.lora.targets import ALL_TARGETS, ATTENTION_TARGETS, DENSE_MLP_TARGETS, EXPERT_TARGETS, page_decls
from infinilora_jax.models.config import ModelConfig
from infinilora_jax.models.params import ParamFactory, declare
from infinilora_jax.models.stages import StagePlan


@dataclasses.dataclass(frozen=True)
class LoraPoolConfig:
    max_adapters: int = 8  # adapters resident at once (slots 1..max_adapters)
    max_rank: int = 16  # largest rank a resident adapter may have
    targets: tuple[str, ...] = ALL_TARGETS  # projections that may carry LoRA

    def __post_init__(self):
        if self.max_adapters < 1 or self.max_rank < 1:
            raise ConfigError(f"LoraPoolConfig: max_adapters={self.max_adapters} and max_rank={self.max_rank} "
                              "must be positive")
        unknown = set(self.targets) - set(ALL_TARGETS)
        if unknown:
            raise ConfigError(f"LoraPoolConfig: unknown targets {sorted(unknown)}; known: {ALL_TARGETS}")

    @property
    def num_slots(self) -> int:
        return self.max_adapters + 1


def slot_targets(cfg: ModelConfig, plan: StagePlan, slot: int, enabled: tuple[str, ...]) -> tuple[str, ...]:
    """Targets that exist in one layer slot: attention always, dense or expert MLP by the slot's layer kinds."""
    present = ATTENTION_TARGETS
    present += DENSE_MLP_TARGETS if plan.slot_has_dense(slot) else ()
    present += EXPERT_TARGETS if plan.slot_has_moe(slot) else ()
    return tuple(t for t in present if t in enabled)


class LoraPool(nnx.Module):
    """layers[j][target] = {"a": [pp, S, ...], "b": [pp, S, ...], "rank": [pp, S] int32} for each layer slot j.

    "rank" is the rank rows each slot's page of that target holds in that layer (0: none): written with the pages
    in the same donated update, so the kernels may skip the zero padding above it (pallas_kernels/dispatch.py
    `slot_ranks`) and never see a stale value."""

    def __init__(self, cfg: ModelConfig, plan: StagePlan, pool_cfg: LoraPoolConfig, dtype, factory: ParamFactory):
        self.pool_cfg = pool_cfg
        layers = []
        for j in range(plan.layers_per_stage):
            pages = {}
            for target in slot_targets(cfg, plan, j, pool_cfg.targets):
                (a_shape, a_dims), (b_shape, b_dims) = page_decls(target, cfg, plan.pp, pool_cfg.num_slots,
                                                                   pool_cfg.max_rank)
                pages[target] = nnx.Dict(
                    a=declare(factory, f"lora.{j}.{target}.a", a_shape, a_dims, dtype),
                    b=declare(factory, f"lora.{j}.{target}.b", b_shape, b_dims, dtype),
                    rank=declare(factory, f"lora.{j}.{target}.rank", a_shape[:2], a_dims[:2], jnp.int32))
            layers.append(nnx.Dict(pages))
        self.layers = nnx.List(layers)


def make_layer_writer():
    """A jitted (layer_pages, slot, new_pages) -> layer_pages that overwrites one adapter slot of one layer slot,
    in place (donated; each buffer keeps its sharding). layer_pages: pure dict target -> {"a", "b"} device arrays
    [pp, S, ...]; new_pages: the same with the slot dimension removed ([pp, ...] host arrays)."""

    def write(layer_pages, slot, new_pages):
        return jax.tree.map(lambda buf, page: buf.at[:, slot].set(page.astype(buf.dtype)), layer_pages, new_pages)

    return jax.jit(write, donate_argnums=0)


def check_fits(pool: LoraPool, plan: StagePlan, weights: AdapterWeights) -> None:
    """Raise AdapterError if the adapter needs a target the pool does not carry or a rank above its maximum."""
    max_rank = pool.pool_cfg.max_rank
    for (layer, target), (a, _) in weights.pages.items():
        if target not in pool.layers[layer % plan.layers_per_stage]:
            raise AdapterError(f"adapter targets {target!r} on layer {layer}, which this server's adapter pool does "
                               f"not carry (enabled targets: {pool.pool_cfg.targets})", path=weights.path)
        rank = a.shape[-2]
        if rank > max_rank:
            raise AdapterError(f"{target} of layer {layer} needs rank {rank} (per-expert gate and up LoRAs take 2r), "
                               f"above the configured maximum rank {max_rank}", path=weights.path, field="r")


def adapter_pages(pool: LoraPool, plan: StagePlan, weights: AdapterWeights | None) -> dict:
    """Host pages of one adapter for one pool slot, zero-padded to the pool's rank (pure dict, slot dim removed);
    all zeros for None. Raises AdapterError as `check_fits` does."""
    if weights is not None:
        check_fits(pool, plan, weights)
    pages = jax.tree.map(lambda a: np.zeros(a.shape[:1] + a.shape[2:], jnp.dtype(a.dtype)),
                         nnx.to_pure_dict(nnx.state(pool)))
    for (layer, target), (a, b) in (weights.pages.items() if weights is not None else ()):
        stage, slot = divmod(layer, plan.layers_per_stage)
        page = pages["layers"][slot][target]
        rank = a.shape[-2]
        page["a"][stage, ..., :rank, :] = a  # both rank-major: contiguous rows
        rank_axis = 1 if target.startswith("expert_") else 0
        index = (stage,) + (slice(None),) * rank_axis + (slice(0, rank),)
        page["b"][index] = b
        page["rank"][stage] = rank
    return pages
