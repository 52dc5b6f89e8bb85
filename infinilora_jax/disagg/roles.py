"""Role buffers: per-device storage that each device reads as its own role's state.

In one SPMD program every device holds a shard of every array, all shards the same shape. Disaggregated mode
therefore keeps its whole device state as *role buffers*: arrays of global shape [devices, *local] sharded
over every mesh axis (`PER_DEVICE`), so each device holds exactly one [1, *local] block of its own. The
*shape* of a block is the base role's (a base instance's shard of one weight, or one layer's K or V pages);
its *content* depends on the device's role:

  base devices   the block is what its shape says: base weights of the device's expert shard, or its
                 instance's KV pages;
  LoRA devices   the same bytes hold adapter pages: the LoRA server views each block through a whole-array
                 reshape as rank-row arenas `[size / width, width]` (disagg/pages.py), a free bitcast.

So no device holds bytes for a role it does not play: a LoRA device's "weights" and "KV cache" are its
adapter-page arenas, and no adapter page exists anywhere else.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from meshes.axes import BASE_ROLE, LORA_ROLE, ROLE_AXES
from meshes.layouts import RoleLayout

PER_DEVICE = PartitionSpec(ROLE_AXES)  # dim 0 (one entry per device) split over every mesh axis


@dataclasses.dataclass(frozen=True)
class BufferSpec:
    name: str  # "w:layers/0/attn/wq", "kv:0:k", ...
    shape: tuple[int, ...]  # the block every device holds (the base role's local shape)
    dtype: np.dtype
    kind: str  # "weight" | "kv"

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize


def device_roles(mesh: Mesh) -> list[tuple[object, int, int, int]]:
    """(device, role, dp, ep) of every device, in the order of the PER_DEVICE dimension."""
    out = []
    for index in np.ndindex(mesh.devices.shape):
        role, dp, _, ep, _ = index
        out.append((mesh.devices[index], role, dp, ep))
    return out


@functools.cache
def _zeros_on(shape: tuple[int, ...], dtype, device) -> jax.stages.Wrapped:
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=SingleDeviceSharding(device))


def assemble(mesh: Mesh, blocks: list[jax.Array], memory_kind: str | None = None) -> jax.Array:
    """A role buffer from one [1, *local] block per device (each already on its device, in `memory_kind`,
    PER_DEVICE order)."""
    return jax.make_array_from_single_device_arrays((len(blocks), *blocks[0].shape[1:]),
                                                    NamedSharding(mesh, PER_DEVICE, memory_kind=memory_kind), blocks)


def zeros_buffer(mesh: Mesh, shape: tuple[int, ...], dtype) -> jax.Array:
    n = mesh.devices.size
    return jax.jit(lambda: jnp.zeros((n, *shape), dtype), out_shardings=NamedSharding(mesh, PER_DEVICE))()


def weight_buffers(model_state: dict, mesh: Mesh, layout: RoleLayout) -> tuple[dict[str, jax.Array],
                                                                              dict[str, BufferSpec]]:
    """Role buffers of a base instance's weights.

    model_state: the pure parameter dict of one base instance (layout.base), sharded over the devices of base
    instance 0 (mesh.devices[BASE_ROLE, 0]). Base device (d, e) gets the shard of base device (0, e); LoRA
    devices get zeros of the same shape (their arenas). Each parameter is deleted once copied, so the peak is
    one parameter above the weights. Returns (name -> buffer, name -> spec)."""
    roles = device_roles(mesh)
    buffers, specs = {}, {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(model_state)[0]:
        name = "w:" + "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        by_device = {s.device: s.data for s in leaf.addressable_shards}
        local = tuple(leaf.sharding.shard_shape(leaf.shape))
        blocks = []
        for device, role, _, ep in roles:
            if role == BASE_ROLE:
                source = by_device[mesh.devices[BASE_ROLE, 0, 0, ep, 0]].reshape(1, *local)
                blocks.append(source if source.devices() == {device} else jax.device_put(source, device))
            else:
                blocks.append(_zeros_on((1, *local), leaf.dtype, device)())
        buffers[name] = assemble(mesh, blocks)
        specs[name] = BufferSpec(name, local, np.dtype(leaf.dtype), "weight")
        del by_device, blocks
        leaf.delete()
    return buffers, specs


def weight_names(model_state: dict) -> tuple[list[str], jax.tree_util.PyTreeDef]:
    """Buffer names of the parameter leaves, in flattening order, and the tree to rebuild the dict from them."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(model_state)
    names = ["w:" + "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p) for p, _ in paths]
    return names, treedef


def kv_specs(num_layers: int, kv_block: tuple[int, ...], dtype) -> dict[str, BufferSpec]:
    """K and V pages of every layer: kv_block = [1, num_pages, page_size, kv_heads, head_dim] per device."""
    out = {}
    for layer in range(num_layers):
        for which in ("k", "v"):
            name = f"kv:{layer}:{which}"
            out[name] = BufferSpec(name, tuple(kv_block), np.dtype(dtype), "kv")
    return out


def role_of_devices(mesh: Mesh) -> dict[str, str]:
    """str(device) -> "base" | "lora"."""
    return {str(d): ("base" if r == BASE_ROLE else "lora") for d, r, _, _ in device_roles(mesh)}


def live_bytes(arrays) -> dict[str, int]:
    """Bytes of the given arrays' shards, per device (from shapes: no shard arrays are materialised)."""
    out: dict[str, int] = {}
    for leaf in jax.tree.leaves(arrays):
        nbytes = math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
        for device in leaf.sharding.addressable_devices:
            key = str(device)
            out[key] = out.get(key, 0) + nbytes
    return out


__all__ = ["BASE_ROLE", "LORA_ROLE", "PER_DEVICE", "BufferSpec", "assemble", "device_roles", "kv_specs",
           "live_bytes", "role_of_devices", "weight_buffers", "weight_names", "zeros_buffer"]
