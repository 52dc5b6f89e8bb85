"""ModelRunner: the model, its adapter pool and registry, and the jitted forward, on one mesh.

This is the layer the simple generation loop (llm.py) drives today and the scheduler drives later.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from infinilora_jax.lora.pool import LoraPool, LoraPoolConfig
from infinilora_jax.lora.registry import AdapterRegistry
from infinilora_jax.models.batch import ForwardBatch
from infinilora_jax.models.config import ModelConfig
from infinilora_jax.models.params import ParamFactory, abstract_factory, zeros_factory
from infinilora_jax.models.step import allocate_kv_cache, build_forward
from infinilora_jax.models.transformer import CausalLM
from meshes.layouts import MeshLayout, make_mesh

log = logging.getLogger(__name__)


def count_params(cfg: ModelConfig, layout: MeshLayout, mesh) -> int:
    model = CausalLM(cfg, layout, jnp.float32, abstract_factory(mesh))
    return len(jax.tree.leaves(nnx.state(model)))


class ModelRunner:
    def __init__(self, cfg: ModelConfig, layout: MeshLayout, dtype, make_factory, pool_cfg: LoraPoolConfig,
                 max_adapter_bytes: int | None = None, devices=None, progress: bool = True):
        """make_factory(mesh, on_param) -> ParamFactory supplies the weights (checkpoint, random, Orbax)."""
        self.cfg, self.layout, self.dtype = cfg, layout, jnp.dtype(dtype)
        layout.check_fits(cfg)
        self.mesh = make_mesh(layout, devices)
        bar = tqdm(total=count_params(cfg, layout, self.mesh), desc="loading weights", unit="tensor",
                   disable=not progress, leave=False)
        factory: ParamFactory = make_factory(self.mesh, lambda decl: bar.update(1))
        self.model = CausalLM(cfg, layout, self.dtype, factory)
        bar.close()
        self.model_state = nnx.state(self.model)
        self.pool = LoraPool(cfg, self.model.plan, pool_cfg, self.dtype, zeros_factory(self.mesh))
        self.registry = AdapterRegistry(cfg, self.model.plan, self.pool, self.mesh, self.dtype, max_adapter_bytes)
        self._forward = build_forward(self.model, self.pool, self.mesh)

    def new_kv_cache(self, batch: int, max_len: int) -> list:
        return allocate_kv_cache(self.model, self.mesh, batch, max_len, self.dtype)

    def forward(self, batch: ForwardBatch, kv: list) -> tuple[np.ndarray, list]:
        """Returns (float32 logits [M, vocab] for batch.logits_indices, updated KV cache)."""
        logits, kv = self._forward(self.model_state, self.registry.pool_state, batch, kv)
        return np.asarray(logits)[:, : self.cfg.vocab_size], kv

    def live_bytes_per_device(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for leaf in jax.tree.leaves((self.model_state, self.registry.pool_state)):
            for shard in leaf.addressable_shards:
                key = str(shard.device)
                out[key] = out.get(key, 0) + shard.data.nbytes
        return out
