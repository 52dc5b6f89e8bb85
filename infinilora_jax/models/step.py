"""One jitted SPMD forward over the (pp, ep, tp) mesh: the model's local code inside a single shard_map."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from infinilora_jax.lora.pool import LoraPool
from infinilora_jax.models.batch import ForwardBatch
from infinilora_jax.models.params import partition_specs
from infinilora_jax.models.transformer import CausalLM
from meshes.axes import MODEL_AXES, logical_spec

ForwardFn = Callable[[nnx.State, nnx.State | None, ForwardBatch, list], tuple[jax.Array, list]]


def kv_cache_specs(model: CausalLM) -> list[tuple[PartitionSpec, PartitionSpec]]:
    _, dims = model.kv_cache_shape(1, 1)
    spec = logical_spec(*dims)
    return [(spec, spec) for _ in range(model.plan.layers_per_stage)]


def allocate_kv_cache(model: CausalLM, mesh: Mesh, batch: int, max_len: int, dtype) -> list:
    """Zeroed per-layer-slot (k, v) caches, created directly in their sharding."""
    shape, dims = model.kv_cache_shape(batch, max_len)
    sharding = NamedSharding(mesh, logical_spec(*dims))
    make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return [(make(), make()) for _ in range(model.plan.layers_per_stage)]


def build_forward(model: CausalLM, pool: LoraPool | None, mesh: Mesh) -> ForwardFn:
    """jit(shard_map(local forward)); the KV cache is donated and updated in place."""
    model_graph, model_state = nnx.split(model)
    pool_graph, pool_state = nnx.split(pool) if pool is not None else (None, None)
    kv_specs = kv_cache_specs(model)
    batch_specs = jax.tree.map(lambda _: PartitionSpec(), ForwardBatch(*([0] * 5)))

    def local(model_state, pool_state, batch, kv):
        local_model = nnx.merge(model_graph, model_state)
        local_pool = nnx.merge(pool_graph, pool_state) if pool_graph is not None else None
        return local_model(batch, kv, local_pool)

    in_specs = (partition_specs(model_state), partition_specs(pool_state) if pool is not None else None,
                batch_specs, kv_specs)
    out_specs = (PartitionSpec(None, MODEL_AXES), kv_specs)
    sharded = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    return jax.jit(sharded, donate_argnums=(3,))
