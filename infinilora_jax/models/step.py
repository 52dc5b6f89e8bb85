"""The jitted SPMD steps over the (pp, ep, tp) mesh: the model's local code inside one shard_map.

`score` returns float32 logits (teacher forcing); `prompt_logprobs` the logprob of each next token and the top
ones, reduced on the device; `sample` returns sampled token ids (and, when a row asks, their logprobs), with the
sampler fused into the same program so only [M] integers (and [M, 20] logprobs) leave the device each step.
`sample_loading` is `sample` that also brings one adapter into its pool slot layer by layer (layer-wise loading):
the adapter's pages arrive in host memory, each layer's pages are copied to the device inside the step and written
into the donated pool, so layer l waits only for its own copy and the copies overlap the layers before it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from infinilora_jax.engine.sampler import SamplingArrays, sample, token_logprobs
from infinilora_jax.lora.pool import LoraPool
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
        self.vocab_size = model.cfg.vocab_size
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
        self.jit_step("sample", self._sample, (3,))
        self.jit_step("prompt_logprobs", self._prompt_logprobs, (3,))
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
            self.jit_step("sample_loading", self._sample_loading, (1, 3))

    def _score(self, model_state, pool_state, batch: StepBatch, kv):
        """-> (float32 logits [M, vocab_size], kv)."""
        logits, kv = self._forward(model_state, pool_state, batch, kv)
        return logits[:, : self.vocab_size], kv



    def _sample_loading(self, model_state, pool_state, batch: StepBatch, kv, sampling: SamplingArrays, slot, pages):
        """-> (as `_sample`'s first output, pool with `pages` written into `slot`, kv)."""
        logits, pool_state, kv = self._forward_loading(model_state, pool_state, batch, kv, slot, pages)
        tokens = sample(logits, sampling, self.vocab_size)
        return (tokens, *token_logprobs(logits, tokens, sampling.logprobs, self.vocab_size)), pool_state, kv

    def _sample(self, model_state, pool_state, batch: StepBatch, kv, sampling: SamplingArrays):
        """-> ((sampled token ids [M] int32, their logprobs [M], top ids [M, K], top logprobs [M, K]), kv);
        the logprobs are zeros unless some row asks for them."""
        logits, kv = self._forward(model_state, pool_state, batch, kv)
        tokens = sample(logits, sampling, self.vocab_size)
        return (tokens, *token_logprobs(logits, tokens, sampling.logprobs, self.vocab_size)), kv

    def _prompt_logprobs(self, model_state, pool_state, batch: StepBatch, kv, targets):
        """targets: [M] int32 the token following each logits position ->
        ((logprob of targets [M], top ids [M, K], top logprobs [M, K]), kv)."""
        logits, kv = self._forward(model_state, pool_state, batch, kv)
        return token_logprobs(logits, targets, jnp.ones(targets.shape, bool), self.vocab_size), kv
