"""The portable reference attention over the paged KV cache (every platform; the numerics the others are held to).

Each query row gathers its pages into a contiguous [P * page_size] context and runs causal attention over it with
HF's eager numerics: scores in the activation dtype, scaled, softmax in float32. Memory and work grow with rows x
bucketed context, which is what the kernel backends (tpu.py, gpu.py) avoid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def write_kv(pages: jax.Array, new: jax.Array, cache_slots: jax.Array) -> jax.Array:
    """Scatter new keys or values into the paged cache.

    pages: [num_pages, page_size, kv_heads, head_dim]; new: [N, kv_heads, head_dim]; cache_slots: [N] flat slot
    (page * page_size + offset). Out-of-range slots are dropped: padding tokens (and inactive pipeline stages)
    write nothing.
    """
    flat = pages.reshape(-1, *pages.shape[2:])
    return flat.at[cache_slots].set(new.astype(pages.dtype), mode="drop").reshape(pages.shape)


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, positions: jax.Array,
                    query_index: jax.Array, block_tables: jax.Array, sliding_window: int | None,
                    out: jax.Array | None = None, head_major: bool = False) -> jax.Array:
    """Reference attention of a block of query rows over a paged KV cache (already holding the new keys).

    q: [N, heads, hd]; k_pages, v_pages: [num_pages, page_size, kv_heads, hd] (or [kv_heads, num_pages, page_size,
    hd] when `head_major`, the GPU backend's layout); positions: [N]; query_index: [B, Q] flat token of each
    (row, query), N for padding; block_tables: [B, P].
    Writes the rows' outputs into `out` ([N, heads, hd], zeros if None) and returns it. Gathers each row's pages
    into a contiguous [P * page_size] context, so memory grows with B * P * page_size.
    """
    n = q.shape[0]
    if out is None:
        out = jnp.zeros_like(q)
    b, p = block_tables.shape
    if b == 0:
        return out
    q_rows = jnp.concatenate([q, jnp.zeros_like(q[:1])])[query_index]  # [B, Q, heads, hd]
    q_pos = jnp.concatenate([positions, jnp.zeros_like(positions[:1])])[query_index]  # [B, Q]
    k_ctx, v_ctx = (_context(pages, block_tables, head_major) for pages in (k_pages, v_pages))
    rows = cached_attention(q_rows, k_ctx, v_ctx, q_pos, sliding_window)  # [B, Q, heads, hd]
    return jnp.concatenate([out, jnp.zeros_like(out[:1])]).at[query_index].set(rows)[:n]


def _context(pages: jax.Array, block_tables: jax.Array, head_major: bool) -> jax.Array:
    """Each row's pages as one contiguous context [B, P * page_size, kv_heads, hd]."""
    b, p = block_tables.shape
    if head_major:  # [kv_heads, num_pages, page, hd] -> [kv_heads, B, P, page, hd] -> [B, P, page, kv_heads, hd]
        kv_heads, _, page, hd = pages.shape
        return jnp.moveaxis(pages[:, block_tables], 0, 3).reshape(b, p * page, kv_heads, hd)
    return pages[block_tables].reshape(b, p * pages.shape[1], *pages.shape[2:])


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, positions: jax.Array,
                     sliding_window: int | None) -> jax.Array:
    """Causal attention of new queries over a contiguous KV cache that already holds their own keys.

    q: [B, T, heads, head_dim] (already scaled by nothing; scaling applied here);
    k_cache, v_cache: [B, S, kv_heads, head_dim]; positions: [B, T] position of each query.
    Returns [B, T, heads, head_dim] in q.dtype. A query at position p sees cache slots s <= p (and
    s > p - sliding_window when set), exactly HF's causal / sliding-window masks.
    """
    b, t, heads, hd = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    qg = q.reshape(b, t, kv_heads, group, hd)
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k_cache.astype(q.dtype), precision=precision,
                        preferred_element_type=jnp.float32).astype(q.dtype)
    scores = (scores * jnp.asarray(hd ** -0.5, q.dtype)).astype(jnp.float32)  # scaled in q.dtype, as HF eager
    slot = jnp.arange(k_cache.shape[1])
    visible = slot[None, None, :] <= positions[:, :, None]  # [B, T, S]
    if sliding_window is not None:
        visible &= slot[None, None, :] > positions[:, :, None] - sliding_window
    scores = jnp.where(visible[:, None, None, :, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_cache.astype(q.dtype), precision=precision,
                     preferred_element_type=jnp.float32).astype(q.dtype)
    return out.reshape(b, t, heads, hd)
