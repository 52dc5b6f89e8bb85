"""The jitted SPMD steps over the (pp, ep, tp) mesh: the model's local code inside one shard_map.

`score` returns float32 logits (teacher forcing); `prompt_logprobs` the logprob of each next token and the top
ones, reduced on the device; `logits` is the generation step's forward: the logits of the rows that sample, left
on the device for a sampler program (`sampler`: one small program per rows bucket and sampling work, chosen on
the host, so no branch predicate is read back mid-step and the host can queue the next step before this one's
tokens are back: engine/engine.py, async scheduling). `logits` takes the previous step's sampled tokens (still on
the device) and, per token, where to find its input among them. `logits_loading` is `logits` that also brings one
adapter into its pool slot layer by layer (layer-wise loading): the adapter's pages arrive in host memory, each
layer's pages are copied to the device inside the step and written into the donated pool, so layer l waits only
for its own copy and the copies overlap the layers before it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from infinilora_jax.engine.sampler import SamplingArrays, sample, token_logprobs
from infinilora_jax.lora.pool import LoraPool
from infinilora_jax.models import host_inputs
from infinilora_jax.models.batch import QueryBlock, StepBatch
from infinilora_jax.models.params import partition_specs
from infinilora_jax.models.precompiled import PrecompiledSteps
from infinilora_jax.models.transformer import CausalLM
from meshes.axes import MODEL_AXES, logical_spec


def kv_cache_specs(model: CausalLM) -> list[tuple[PartitionSpec, ...]]:
    _, dims = model.kv_cache_shape(1, 1)
    spec = logical_spec(*dims)
    return [(spec,) * model.kv_cache_arrays for _ in range(model.plan.layers_per_stage)]


def allocate_kv_cache(model: CausalLM, mesh: Mesh, num_pages: int, page_size: int, dtype) -> list:
    """Zeroed per-layer-slot cache arrays ((k, v) pages, or one combined array: the model's attention backend
    decides, models/attention/layout.py), created directly in their sharding."""
    shape, dims = model.kv_cache_shape(num_pages, page_size)
    sharding = NamedSharding(mesh, logical_spec(*dims))
    make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return [tuple(make() for _ in range(model.kv_cache_arrays)) for _ in range(model.plan.layers_per_stage)]



def incoming_page_specs(pool_specs: dict) -> dict:
    """Specs of one adapter's pages: the pool's, without the adapter-slot dimension (dim 1)."""
    return jax.tree.map(drop_slot_dim, pool_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def drop_slot_dim(spec: PartitionSpec) -> PartitionSpec:
    """A pool page's spec without its adapter-slot dimension (dim 1; missing trailing entries mean None)."""
    parts = tuple(spec)
    return PartitionSpec(*(parts[:1] + parts[2:]))


def write_incoming(layer_pages: dict, slot, incoming: dict) -> dict:
    """Local code: copy one layer slot's incoming pages (host memory) to the device and write them into `slot`."""
    def write(buf, page):
        return buf.at[:, slot].set(jax.device_put(page, jax.memory.Space.Device).astype(buf.dtype))

    return jax.tree.map(write, layer_pages, incoming)


class StepFunctions(PrecompiledSteps):
    """jit(shard_map(local forward)) for one model + adapter pool on one mesh; the KV cache is donated."""

    def __init__(self, model: CausalLM, pool: LoraPool | None, mesh: Mesh):
        self.vocab_size, self.padded_vocab = model.cfg.vocab_size, model.vocab_padded
        self.has_pool = pool is not None and bool(jax.tree.leaves(nnx.state(pool)))  # a pool with no targets: none
        super().__init__()
        model_graph, model_state = nnx.split(model)
        pool_graph, pool_state = nnx.split(pool) if pool is not None else (None, None)
        # Parameters travel as pure dicts (nnx.to_pure_dict); each device rebuilds its local modules.
        kv_specs = kv_cache_specs(model)
        block = QueryBlock(0, 0)
        batch_specs = jax.tree.map(lambda _: PartitionSpec(), StepBatch(0, 0, 0, 0, block, block, 0))

        def local(model_state, pool_state, batch, kv):
            local_model = nnx.merge(model_graph, nnx.State(model_state))
            local_pool = nnx.merge(pool_graph, nnx.State(pool_state)) if pool_graph is not None else None
            hidden, kv = local_model(batch, kv, local_pool)
            return local_model.logits(hidden), kv

        in_specs = (partition_specs(model_state), partition_specs(pool_state) if pool is not None else None,
                    batch_specs, kv_specs)
        self._forward = jax.shard_map(local, mesh=mesh, in_specs=in_specs,
                                      out_specs=(PartitionSpec(None, MODEL_AXES), kv_specs), check_vma=False)
        self.jit_step("score", self._score, (3,))
        self.jit_step("logits", self._logits, (3,))
        self.jit_step("prompt_logprobs", self._prompt_logprobs, (3,))
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.logits_sharding = NamedSharding(mesh, PartitionSpec(None, MODEL_AXES))
        self._samplers: dict[tuple, jax.stages.Compiled] = {}  # sampler_key(...) -> executable
        if self.has_pool:
            pool_specs = partition_specs(pool_state)
            page_specs = incoming_page_specs(pool_specs)

            def local_loading(model_state, pool_state, batch, kv, slot, pages):
                pool_state = {"layers": {j: write_incoming(layer, slot, pages[j])
                                         for j, layer in pool_state["layers"].items()}}
                logits, kv = local(model_state, pool_state, batch, kv)
                return logits, pool_state, kv

            self._forward_loading = jax.shard_map(
                local_loading, mesh=mesh,
                in_specs=(*in_specs, PartitionSpec(), page_specs["layers"]),
                out_specs=(PartitionSpec(None, MODEL_AXES), pool_specs, kv_specs), check_vma=False)
            self.jit_step("logits_loading", self._logits_loading, (1, 3))

    def _score(self, model_state, pool_state, batch: StepBatch, kv):
        """-> (float32 logits [M, vocab_size], kv)."""
        logits, kv = self._forward(model_state, pool_state, batch, kv)
        return logits[:, : self.vocab_size], kv

    def _logits(self, model_state, pool_state, batch: StepBatch, kv, prev_tokens, token_src):
        """-> (float32 logits [M, V_padded] of batch.logits_indices, kv). Token t's input is
        prev_tokens[token_src[t]] where token_src[t] >= 0 (a token the previous step sampled, not yet on the host),
        else batch.tokens[t]."""
        return self._forward(model_state, pool_state, with_prev_tokens(batch, prev_tokens, token_src), kv)

    def _logits_loading(self, model_state, pool_state, batch: StepBatch, kv, prev_tokens, token_src, slot, pages):
        """-> (as `_logits`' first output, pool with `pages` written into `slot`, kv)."""
        return self._forward_loading(model_state, pool_state, with_prev_tokens(batch, prev_tokens, token_src), kv,
                                     slot, pages)

    # ---- the sampler programs ----

    @staticmethod
    def sampler_key(rows: int, work: int, logprobs: bool, rows_out: int) -> tuple:
        return rows, work, logprobs, rows_out

    def sampler(self, logits, sampling: SamplingArrays, work: int, logprobs: bool, rows_out: int):
        """Sample rows of `logits` (a `logits` step's output, on the device) with the host-chosen `work`
        (SamplingArrays.work). -> (token ids [rows_out] int32, rows past M zero, replicated over the mesh so the
        next step reads them as `prev_tokens`; and when `logprobs`, their logprobs [M], top ids [M, K], top
        logprobs [M, K]). Nothing waits for the device; the sampling rows cross in one transfer."""
        key = self.sampler_key(logits.shape[0], work, logprobs, rows_out)
        program = self._samplers.get(key)
        if program is None:
            program = self._samplers[key] = self._lower_sampler(*key).compile()
        return program(logits, host_inputs.pack(jax.tree.leaves(sampling)))

    def precompile_samplers(self, keys, workers: int = 8, on_done=None) -> None:
        """Compile the sampler programs of these `sampler_key`s ahead of time."""
        keys = [k for k in dict.fromkeys(keys) if k not in self._samplers]
        lowered = {k: self._lower_sampler(*k) for k in keys}
        self._compile_all(lowered, self._samplers, workers, on_done)

    def _lower_sampler(self, rows: int, work: int, logprobs: bool, rows_out: int):
        example = SamplingArrays.build([], [], [], rows)
        leaves, treedef = jax.tree.flatten(example)
        layout = host_inputs.layout_of(leaves)

        def _sample(logits, words):
            sampling = jax.tree.unflatten(treedef, host_inputs.unpack(words, layout))
            tokens = sample(logits, sampling, self.vocab_size, work)
            padded = jnp.pad(tokens, (0, rows_out - rows))
            if not logprobs:
                return (padded,)
            return (padded, *token_logprobs(logits, tokens, sampling.logprobs, self.vocab_size, True))

        out = (self.replicated,) * (4 if logprobs else 1)
        logits = jax.ShapeDtypeStruct((rows, self.padded_vocab), jnp.float32, sharding=self.logits_sharding)
        words = jax.ShapeDtypeStruct((host_inputs.pack(leaves).size,), np.int32, sharding=self.replicated)
        return jax.jit(_sample, out_shardings=out).lower(logits, words)

    def _prompt_logprobs(self, model_state, pool_state, batch: StepBatch, kv, targets):
        """targets: [M] int32 the token following each logits position ->
        ((logprob of targets [M], top ids [M, K], top logprobs [M, K]), kv)."""
        logits, kv = self._forward(model_state, pool_state, batch, kv)
        return token_logprobs(logits, targets, jnp.ones(targets.shape, bool), self.vocab_size), kv


def with_prev_tokens(batch: StepBatch, prev_tokens: jax.Array, token_src: jax.Array) -> StepBatch:
    """The batch with token t replaced by prev_tokens[token_src[t]] where token_src[t] >= 0."""
    taken = prev_tokens[jnp.clip(token_src, 0, prev_tokens.shape[0] - 1)]
    return dataclasses.replace(batch, tokens=jnp.where(token_src >= 0, taken, batch.tokens))
