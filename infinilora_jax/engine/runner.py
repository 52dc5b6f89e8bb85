"""ModelRunner: the model, its adapter pool and cache, and the jitted steps, on one mesh.

The engine (engine/engine.py) decides what runs; the runner turns a StepBatch into sampled tokens or logits.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from infinilora_jax.engine.kv_cache import CacheConfig
from infinilora_jax.engine.sampler import SamplingArrays
from infinilora_jax.lora.adapter_cache import AdapterCache
from infinilora_jax.lora.pool import LoraPool, LoraPoolConfig
from infinilora_jax.models.batch import StepBatch
from infinilora_jax.models.config import ModelConfig
from infinilora_jax.models.params import ParamFactory, abstract_factory, zeros_factory
from infinilora_jax.models.step import StepFunctions, allocate_kv_cache
from infinilora_jax.models.transformer import CausalLM
from meshes.layouts import MeshLayout, make_mesh

log = logging.getLogger(__name__)


def count_params(cfg: ModelConfig, layout: MeshLayout, mesh) -> int:
    model = CausalLM(cfg, layout, jnp.float32, abstract_factory(mesh))
    return len(jax.tree.leaves(nnx.state(model)))


class ModelRunner:
    def __init__(self, cfg: ModelConfig, layout: MeshLayout, dtype, make_factory, pool_cfg: LoraPoolConfig, *,
                 max_host_adapters: int = 64, max_adapter_bytes: int | None = None, devices=None,
                 progress: bool = True):
        """make_factory(mesh, on_param) -> ParamFactory supplies the weights (checkpoint, random, Orbax)."""
        self.cfg, self.layout, self.dtype = cfg, layout, jnp.dtype(dtype)
        layout.check_fits(cfg)
        self.mesh = make_mesh(layout, devices)
        bar = tqdm(total=count_params(cfg, layout, self.mesh), desc="loading weights", unit="tensor",
                   disable=not progress, leave=False)
        factory: ParamFactory = make_factory(self.mesh, lambda decl: bar.update(1))
        self.model = CausalLM(cfg, layout, self.dtype, factory)
        bar.close()
        self.model_state = nnx.to_pure_dict(nnx.state(self.model))
        self.pool = LoraPool(cfg, self.model.plan, pool_cfg, self.dtype, zeros_factory(self.mesh))
        self.adapters = AdapterCache(cfg, self.model.plan, self.pool, self.dtype,
                                     max_host_adapters=max_host_adapters, max_adapter_bytes=max_adapter_bytes)
        self.steps = StepFunctions(self.model, self.pool, self.mesh)

    def new_kv_cache(self, cache: CacheConfig) -> list:
        return allocate_kv_cache(self.model, self.mesh, cache.num_pages, cache.page_size, self.dtype)

    def sample(self, batch: StepBatch, kv: list, sampling: SamplingArrays,
               logprobs: bool = False) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None, list]:
        """Sampled token ids [M] for batch.logits_indices; when `logprobs`, (their logprobs [M], top ids [M, K],
        top logprobs [M, K]) (fetched from the device only then); and the updated KV cache."""
        (tokens, *top), kv = self.steps.sample(self.model_state, self.adapters.pool_state, batch, kv, sampling)
        return np.asarray(tokens), (tuple(np.asarray(x) for x in top) if logprobs else None), kv

    def prompt_logprobs(self, batch: StepBatch, kv: list, targets: np.ndarray) -> tuple[tuple[np.ndarray, ...], list]:
        """(logprob of targets [M], top ids [M, K], top logprobs [M, K]) at batch.logits_indices (teacher forcing,
        reduced on the device so the [M, vocab] logits never leave it), and the updated KV cache."""
        out, kv = self.steps.prompt_logprobs(self.model_state, self.adapters.pool_state, batch, kv, targets)
        return tuple(np.asarray(x) for x in out), kv

    def score(self, batch: StepBatch, kv: list) -> tuple[np.ndarray, list]:
        """float32 logits [M, vocab] for batch.logits_indices, and the updated KV cache."""
        logits, kv = self.steps.score(self.model_state, self.adapters.pool_state, batch, kv)
        return np.asarray(logits), kv

    def live_bytes_per_device(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for leaf in jax.tree.leaves((self.model_state, self.adapters.pool_state)):
            for shard in leaf.addressable_shards:
                key = str(shard.device)
                out[key] = out.get(key, 0) + shard.data.nbytes
        return out
