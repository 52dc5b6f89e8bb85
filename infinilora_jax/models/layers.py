"""Numerics shared by every family, written to match Hugging Face's reference implementations op for op:
RMSNorm in float32 then cast, RoPE tables in float32 cast to the activation dtype, attention softmax in float32.
All functions act on a device's local shard (they run inside shard_map).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def matmul(x: jax.Array, w: jax.Array, spec: str) -> jax.Array:
    """einsum accumulating in float32, result in x.dtype (what a bf16 GEMM with an f32 accumulator gives)."""
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    return jnp.einsum(spec, x, w, precision=precision, preferred_element_type=jnp.float32).astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x: [..., D]; weight: [D]. HF: normalise in float32, cast back, then scale."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """positions: [N] -> (cos, sin), each [N, head_dim] in dtype (HF's rotate-half convention)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [N, heads, head_dim]; cos, sin: [N, head_dim]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


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
                    out: jax.Array | None = None) -> jax.Array:
    """Reference attention of a block of query rows over a paged KV cache (already holding the new keys).

    q: [N, heads, hd]; k_pages, v_pages: [num_pages, page_size, kv_heads, hd]; positions: [N];
    query_index: [B, Q] flat token of each (row, query), N for padding; block_tables: [B, P].
    Writes the rows' outputs into `out` ([N, heads, hd], zeros if None) and returns it. Gathers each row's pages
    into a contiguous [P * page_size] context, so memory grows with B * P * page_size: the portable path (CPU,
    tests); the fast paths replace it per platform.
    """
    n = q.shape[0]
    if out is None:
        out = jnp.zeros_like(q)
    b, p = block_tables.shape
    if b == 0:
        return out
    q_rows = jnp.concatenate([q, jnp.zeros_like(q[:1])])[query_index]  # [B, Q, heads, hd]
    q_pos = jnp.concatenate([positions, jnp.zeros_like(positions[:1])])[query_index]  # [B, Q]
    k_ctx = k_pages[block_tables].reshape(b, p * k_pages.shape[1], *k_pages.shape[2:])
    v_ctx = v_pages[block_tables].reshape(b, p * v_pages.shape[1], *v_pages.shape[2:])
    rows = cached_attention(q_rows, k_ctx, v_ctx, q_pos, sliding_window)  # [B, Q, heads, hd]
    return jnp.concatenate([out, jnp.zeros_like(out[:1])]).at[query_index].set(rows)[:n]


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
