"""KV cache layouts, one per backend family, chosen when the cache is allocated.

Per layer slot the cache is a tuple of arrays, each [pp, ...] globally (stage first) and [...] locally:
  'pages'      (reference): (K, V), each [num_pages, page_size, kv_heads, hd]
  'combined'   (TPU): (KV,), [num_pages, page_size, 2 * kv_heads, hd_pad]: K of head h at combined head 2h, V at
               2h + 1 (the layout jax's ragged paged attention kernel reads: one DMA brings a page's K and V), and
               head_dim zero-padded to a multiple of 128 (the kernel's lane width: it cannot take head_dim 64 or
               16; zeros change no score and the padded output columns are dropped). Splitting the combined heads
               over TP keeps each device's K/V pairs together.
  'head_major' (GPU): (K, V), each [kv_heads, num_pages, page_size, hd] (the layout jax's Pallas GPU paged decode
               kernel reads: one kv head's pages are one block).
Writes scatter each new token's K/V to its flat slot page * page_size + offset; out-of-range slots (padding
tokens, inactive pipeline stages) are dropped, whatever the layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from infinilora_jax.models.attention import reference

LANES = 128  # the TPU kernel's head_dim granule


def padded_head_dim(head_dim: int) -> int:
    return -(-head_dim // LANES) * LANES


def num_arrays(layout: str) -> int:
    return 1 if layout == "combined" else 2


def array_shape(layout: str, num_pages: int, page_size: int, kv_heads: int, head_dim: int
                ) -> tuple[tuple[int, ...], tuple[str | None, ...]]:
    """Shape and logical dims of one cache array of a layer slot, without the stage dim."""
    if layout == "combined":
        return (num_pages, page_size, 2 * kv_heads, padded_head_dim(head_dim)), (None, None, "kv_heads", None)
    if layout == "head_major":
        return (kv_heads, num_pages, page_size, head_dim), ("kv_heads", None, None, None)
    return (num_pages, page_size, kv_heads, head_dim), (None, None, "kv_heads", None)


def write(layout: str, kv: tuple, k: jax.Array, v: jax.Array, cache_slots: jax.Array) -> tuple:
    """kv: a layer slot's local cache arrays; k, v: [N, kv_heads, hd] new keys and values -> updated arrays."""
    if layout == "combined":
        (pages,) = kv
        new = jnp.stack([k, v], axis=2).reshape(k.shape[0], -1, k.shape[-1])  # K0 V0 K1 V1 ...
        new = jnp.pad(new, ((0, 0), (0, 0), (0, pages.shape[-1] - new.shape[-1])))
        return (reference.write_kv(pages, new, cache_slots),)
    if layout == "head_major":
        return tuple(_write_head_major(pages, new, cache_slots) for pages, new in zip(kv, (k, v)))
    return tuple(reference.write_kv(pages, new, cache_slots) for pages, new in zip(kv, (k, v)))


def _write_head_major(pages: jax.Array, new: jax.Array, cache_slots: jax.Array) -> jax.Array:
    kv_heads, num_pages, page_size, hd = pages.shape
    flat = pages.reshape(kv_heads, num_pages * page_size, hd)
    flat = flat.at[:, cache_slots].set(jnp.swapaxes(new, 0, 1).astype(pages.dtype), mode="drop")
    return flat.reshape(pages.shape)


def from_pages(layout: str, k_pages: jax.Array, v_pages: jax.Array) -> tuple:
    """A cache in the 'pages' layout ([..., num_pages, page, kv_heads, hd]) converted to `layout` (tests, tools)."""
    if layout == "combined":
        kv = jnp.stack([k_pages, v_pages], axis=-2)
        kv = kv.reshape(*k_pages.shape[:-2], 2 * k_pages.shape[-2], k_pages.shape[-1])
        pad = padded_head_dim(kv.shape[-1]) - kv.shape[-1]
        return (jnp.pad(kv, [(0, 0)] * (kv.ndim - 1) + [(0, pad)]),)
    if layout == "head_major":
        return tuple(jnp.moveaxis(p, -2, -4) for p in (k_pages, v_pages))
    return k_pages, v_pages
