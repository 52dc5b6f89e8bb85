"""Numerics shared by every family, written to match Hugging Face's reference implementations op for op:
RMSNorm in float32 then cast, RoPE tables in float32 cast to the activation dtype, attention softmax in float32.
All functions act on a device's local shard (they run inside shard_map).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The reference paged attention moved to models/attention/reference.py (one module per attention backend);
# re-exported here for callers that still import it from layers.
from infinilora_jax.models.attention.reference import cached_attention, paged_attention, write_kv

__all__ = ["apply_rope", "cached_attention", "matmul", "paged_attention", "rms_norm", "rope_tables", "write_kv"]


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
