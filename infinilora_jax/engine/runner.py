"""ModelRunner: the model, its adapter pool and cache, and the jitted steps, on one mesh.

The engine (engine/engine.py) decides what runs; the runner turns a StepBatch into sampled tokens or logits. A
generation step is two programs, the forward (`logits`) and a sampler chosen on the host (models/step.py), queued
without waiting: `sample` returns the tokens as device arrays (StepTokens), `fetch` brings them to the host, so
the engine can queue the next step first (async scheduling).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from infinilora_jax.engine.kv_cache import CacheConfig
from infinilora_jax.engine.sampler import FILTERED, GREEDY, PLAIN, SamplingArrays
from infinilora_jax.lora.adapter_cache import AdapterCache
from infinilora_jax.lora.pool import LoraPool, LoraPoolConfig
from infinilora_jax.models.batch import StepBatch
from infinilora_jax.models.config import ModelConfig
from infinilora_jax.models.params import ParamFactory, abstract_factory, zeros_factory
from infinilora_jax.models.step import StepFunctions, allocate_kv_cache
from infinilora_jax.models.transformer import CausalLM
from meshes.layouts import MeshLayout, make_mesh

log = logging.getLogger(__name__)

SAMPLER_WORKS = (GREEDY, PLAIN, FILTERED)  # the sampler programs' works (engine/sampler.py SamplingArrays.work)


@dataclasses.dataclass(frozen=True)
class StepTokens:
    """A queued step's sampled tokens, on the device until `ModelRunner.fetch`."""

    # [rows_out] int32: row i's token (rows past the step's sampling rows: 0); the disaggregated runner's are
    # [devices, rows_out], each device's own (disagg/step.py)
    tokens: jax.Array
    top: tuple | None  # when logprobs were asked: (their logprobs [M], top ids [M, K], top logprobs [M, K])


def count_params(cfg: ModelConfig, layout: MeshLayout, mesh) -> int:
    model = CausalLM(cfg, layout, jnp.float32, abstract_factory(mesh))
    return len(jax.tree.leaves(nnx.state(model)))


class ModelRunner:
    supports_async = True  # `sample` queues the step without reading anything back (engine: async scheduling)
    sampler_programs_per_bucket = 2 * len(SAMPLER_WORKS)  # its own sampler programs per rows bucket: every work,
    # with and without logprobs (`precompile`)

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
        self._zero_tokens: dict[int, jax.Array] = {}

    def new_kv_cache(self, cache: CacheConfig) -> list:
        kv = allocate_kv_cache(self.model, self.mesh, cache.num_pages, cache.page_size, self.dtype)
        self._kv_shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), kv)
        return kv

    def sample(self, batch: StepBatch, kv: list, sampling: SamplingArrays, rows_out: int,
               prev: StepTokens | None = None, token_src: np.ndarray | None = None) -> tuple[StepTokens, list]:
        """Queue a generation step: the forward, then the sampler for batch.logits_indices (its work and logprobs
        chosen from `sampling` on the host). Returns its tokens (padded to rows_out, on the device: `fetch`) and
        the updated KV cache, without waiting for the device. Token t's input is prev.tokens[token_src[t]] where
        token_src[t] >= 0 (tokens the previous step sampled, not yet fetched), else batch.tokens[t]. A pending
        adapter load is carried into the step layer by layer (lora/adapter_cache.py)."""
        load = self.adapters.take_load(set(np.unique(batch.adapter_slots).tolist()))
        prev_tokens = prev.tokens if prev is not None else self._no_tokens(rows_out)
        if token_src is None:
            token_src = np.full(batch.num_tokens, -1, np.int32)
        cache = self.adapters
        if load is None:
            logits, kv = self.steps.run("logits", self.model_state, cache.pool_state, batch, kv, prev_tokens,
                                        token_src)
        else:
            slot, pages = load
            logits, pool_state, kv = self.steps.run("logits_loading", self.model_state, cache.pool_state, batch, kv,
                                                    prev_tokens, token_src, np.int32(slot), pages)
            cache.pool_state["layers"] = pool_state["layers"]
        tokens, *top = self.steps.sampler(logits, sampling, sampling.work(), sampling.wants_logprobs, rows_out)
        self.last_enqueued_at = time.perf_counter()
        return StepTokens(tokens, tuple(top) or None), kv

    def logits_args(self, batch: StepBatch, rows_out: int) -> tuple:
        """The `logits` step's arguments for a batch of no queued-step tokens, the KV cache and the previous
        tokens as shapes (to lower or precompile it)."""
        prev = jax.ShapeDtypeStruct((rows_out,), np.int32, sharding=self.steps.replicated)
        return (self.model_state, self.adapters.pool_state, batch, self._kv_shapes, prev,
                np.full(batch.num_tokens, -1, np.int32))

    @staticmethod
    def fetch(step: StepTokens) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """A queued step's tokens [rows_out] and logprobs on the host (waits for the step)."""
        return np.asarray(step.tokens), (None if step.top is None else tuple(np.asarray(x) for x in step.top))

    def _no_tokens(self, rows_out: int) -> jax.Array:
        """The `prev` tokens of a step that takes none (zeros, replicated as the sampler leaves its tokens)."""
        if rows_out not in self._zero_tokens:
            self._zero_tokens[rows_out] = jax.device_put(np.zeros(rows_out, np.int32), self.steps.replicated)
        return self._zero_tokens[rows_out]

    def prompt_logprobs(self, batch: StepBatch, kv: list, targets: np.ndarray) -> tuple[tuple[np.ndarray, ...], list]:
        """(logprob of targets [M], top ids [M, K], top logprobs [M, K]) at batch.logits_indices (teacher forcing,
        reduced on the device so the [M, vocab] logits never leave it), and the updated KV cache."""
        self.adapters.flush()
        out, kv = self.steps.run("prompt_logprobs", self.model_state, self.adapters.pool_state, batch, kv, targets)
        return tuple(np.asarray(x) for x in out), kv

    def precompile(self, batches: list[StepBatch], score_batches: list[StepBatch] = (), workers: int = 8,
                   on_done=None, rows_out: int | None = None) -> int:
        """Compile ahead of time every program `sample` (with and without a carried adapter load, every sampler
        work, with and without logprobs; rows_out: the engine's, default each batch's rows), `score` and
        `prompt_logprobs` may run for these batches' shapes. Returns the number of programs."""
        m, pool, kv = self.model_state, self.adapters.pool_state, self._kv_shapes
        load = self.adapters.warmup_load() if self.steps.has_pool else None  # one no-op load serves every shape
        calls, samplers = [], []
        for batch in batches:
            out = rows_out or len(batch.logits_indices)
            args = self.logits_args(batch, out)
            calls.append(("logits", args))
            if load is not None:
                slot, pages = load
                calls.append(("logits_loading", (*args, np.int32(slot), pages)))
            samplers += [self.steps.sampler_key(len(batch.logits_indices), work, logprobs, out)
                         for work in SAMPLER_WORKS for logprobs in (False, True)]
        for batch in score_batches:
            calls.append(("score", (m, pool, batch, kv)))
            calls.append(("prompt_logprobs", (m, pool, batch, kv, np.zeros(len(batch.logits_indices), np.int32))))
        samplers = list(dict.fromkeys(samplers))
        self.steps.precompile(calls, workers, on_done)
        self.steps.precompile_samplers(samplers, workers, on_done)
        return len(calls) + len(samplers)

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
