"""How modules declare parameters: a global shape, logical dimension names, and a factory that supplies values.

A module never creates its own weights. It asks a `ParamFactory` for each one, by name; the factory decides
what the value is: an abstract `jax.ShapeDtypeStruct` (to plan memory or build a loader), random values (tests
and benchmarks), or arrays read from a checkpoint straight into their target sharding (loading/).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from meshes.axes import logical_spec


@dataclasses.dataclass(frozen=True)
class ParamDecl:
    name: str  # dotted path, e.g. "layers.3.attn.wq"
    shape: tuple[int, ...]  # global shape
    dims: tuple[str | None, ...]  # logical dimension names (meshes/axes.py)
    dtype: jnp.dtype
    # For per-layer arrays (dims[0] == "stage"): the model layer held by each stage's slice, and the
    # layer-independent parameter key (e.g. "attn.wq"). Empty for whole-model arrays.
    layers: tuple[int, ...] = ()
    key: str = ""

    def sharding(self, mesh: Mesh) -> NamedSharding:
        return NamedSharding(mesh, logical_spec(*self.dims))


class ParamFactory(Protocol):
    def __call__(self, decl: ParamDecl) -> jax.Array | jax.ShapeDtypeStruct: ...


def declare(factory: ParamFactory, name: str, shape, dims, dtype, layers: tuple[int, ...] = (),
            key: str = "") -> nnx.Param:
    decl = ParamDecl(name, tuple(int(s) for s in shape), tuple(dims), jnp.dtype(dtype), tuple(layers), key)
    assert len(decl.shape) == len(decl.dims), decl
    assert not layers or (decl.dims[0] == "stage" and len(layers) == decl.shape[0]), decl
    return nnx.Param(factory(decl), dims=decl.dims)


def abstract_factory(mesh: Mesh) -> ParamFactory:
    """ShapeDtypeStructs carrying their target sharding: nothing is allocated."""
    return lambda d: jax.ShapeDtypeStruct(d.shape, d.dtype, sharding=d.sharding(mesh))


def zeros_factory(mesh: Mesh) -> ParamFactory:
    """Zero-filled arrays created directly in their sharding (adapter pools, KV caches)."""
    def make(d: ParamDecl) -> jax.Array:
        return jax.jit(lambda: jnp.zeros(d.shape, d.dtype), out_shardings=d.sharding(mesh))()
    return make


def random_factory(mesh: Mesh, seed: int = 0, std: float = 0.02) -> ParamFactory:
    """Random weights (norm weights are ones), generated on the devices: for tests and benchmarks.

    A per-layer array's values depend only on (key, layer), so every mesh layout gets the same model.
    """
    def make(d: ParamDecl) -> jax.Array:
        if d.name.endswith("norm"):
            return jax.jit(lambda: jnp.ones(d.shape, d.dtype), out_shardings=d.sharding(mesh))()
        def normal(name: str, shape):
            key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)
            return (std * jax.random.normal(key, shape, jnp.float32)).astype(d.dtype)
        if d.layers:
            gen = lambda: jnp.stack([normal(f"{d.key}@{layer}", d.shape[1:]) for layer in d.layers])
        else:
            gen = lambda: normal(d.name, d.shape)
        return jax.jit(gen, out_shardings=d.sharding(mesh))()
    return make


def partition_specs(state: nnx.State) -> dict:
    """PartitionSpecs from each Param's logical `dims` metadata, as a pure dict shaped like
    `nnx.to_pure_dict(state)` (the form parameters travel in through jit and shard_map)."""
    specs = jax.tree.map(lambda v: logical_spec(*v.get_metadata()["dims"]), state,
                         is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(specs)

