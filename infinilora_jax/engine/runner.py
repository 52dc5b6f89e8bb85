"""ModelRunner: the model, its adapter pool and cache, and the jitted steps, on one mesh.

The engine (engine/engine.py) decides what runs; the runner turns a StepBatch into sampled tokens or logits.
"""

from __future__ import annotations

import logging
import time

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
                 progress: bool = True, background_loads: bool = False):
        """make_factory(mesh, on_param) -> ParamFactory supplies the weights (checkpoint, random, Orbax).
        background_loads: adapters are copied in outside the steps (lora/adapter_cache.py)."""
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
                                     max_host_adapters=max_host_adapters, max_adapter_bytes=max_adapter_bytes,
                                     background_loads=background_loads)
        self.steps = StepFunctions(self.model, self.pool, self.mesh)
        self.last_enqueued_at = 0.0  # perf_counter() when the last `sample` call's step was enqueued (benchmarks)

    def new_kv_cache(self, cache: CacheConfig) -> list:
        kv = allocate_kv_cache(self.model, self.mesh, cache.num_pages, cache.page_size, self.dtype)
        self._kv_shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), kv)
        return kv

    def sample(self, batch: StepBatch, kv: list, sampling: SamplingArrays,
               logprobs: bool = False) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None, list]:
        """Sampled token ids [M] for batch.logits_indices; when `logprobs`, (their logprobs [M], top ids [M, K],
        top logprobs [M, K]) (fetched from the device only then); and the updated KV cache. A pending adapter
        load is carried into the step layer by layer (lora/adapter_cache.py)."""
        load = self.adapters.take_load(set(np.unique(batch.adapter_slots).tolist()))
        return self._sample(batch, kv, sampling, load, logprobs)

    def prompt_logprobs(self, batch: StepBatch, kv: list, targets: np.ndarray) -> tuple[tuple[np.ndarray, ...], list]:
        """(logprob of targets [M], top ids [M, K], top logprobs [M, K]) at batch.logits_indices (teacher forcing,
        reduced on the device so the [M, vocab] logits never leave it), and the updated KV cache."""
        self.adapters.flush()
        out, kv = self.steps.run("prompt_logprobs", self.model_state, self.adapters.pool_state, batch, kv, targets)
        return tuple(np.asarray(x) for x in out), kv

    def precompile(self, batches: list[StepBatch], score_batches: list[StepBatch] = (), workers: int = 8,
                   on_done=None) -> int:
        """Compile ahead of time every program `sample` (with and without a carried adapter load), `score` and
        `prompt_logprobs` may run for these batches' shapes. Returns the number of programs."""
        m, pool, kv = self.model_state, self.adapters.pool_state, self._kv_shapes
        load = self.adapters.warmup_load() if self.steps.has_pool else None  # one no-op load serves every shape
        calls = []
        for batch in batches:
            sampling = SamplingArrays.build([], [], [], len(batch.logits_indices))
            calls.append(("sample", (m, pool, batch, kv, sampling)))
            if load is not None:
                slot, pages = load
                calls.append(("sample_loading", (m, pool, batch, kv, sampling, np.int32(slot), pages)))
        for batch in score_batches:
            calls.append(("score", (m, pool, batch, kv)))
            calls.append(("prompt_logprobs", (m, pool, batch, kv, np.zeros(len(batch.logits_indices), np.int32))))
        self.steps.precompile(calls, workers, on_done)
        return len(calls)

    def _sample(self, batch, kv, sampling, load, logprobs: bool):
        cache = self.adapters
        if load is None:
            (tokens, *top), kv = self.steps.run("sample", self.model_state, cache.pool_state, batch, kv, sampling)
        else:
            slot, pages = load
            (tokens, *top), pool_state, kv = self.steps.run("sample_loading", self.model_state, cache.pool_state,
                                                            batch, kv, sampling, np.int32(slot), pages)
            cache.pool_state["layers"] = pool_state["layers"]
        self.last_enqueued_at = time.perf_counter()  # the rest of `sample` waits for the step's tokens
        return np.asarray(tokens), (tuple(np.asarray(x) for x in top) if logprobs else None), kv

    def score(self, batch: StepBatch, kv: list) -> tuple[np.ndarray, list]:
        """float32 logits [M, vocab] for batch.logits_indices, and the updated KV cache."""
        self.adapters.flush()
        logits, kv = self.steps.run("score", self.model_state, self.adapters.pool_state, batch, kv)
        return np.asarray(logits), kv

    def live_bytes_per_device(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for leaf in jax.tree.leaves((self.model_state, self.adapters.pool_state)):
            for shard in leaf.addressable_shards:
                key = str(shard.device)
                out[key] = out.get(key, 0) + shard.data.nbytes
        return out
