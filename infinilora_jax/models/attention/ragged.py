"""The contract of jax's TPU ragged paged attention kernel, in plain JAX (jittable, any platform).

Same inputs and meaning as `jax.experimental.pallas.ops.tpu.ragged_paged_attention`: sequence i's queries are
q[cu_q_lens[i]:cu_q_lens[i + 1]], the last of them at position kv_lens[i] - 1, attending causally (and within
`sliding_window`) over the first kv_lens[i] slots of its pages page_indices[i] in the combined K/V cache. Tokens
outside the first num_seqs sequences get zeros. It gathers a context per token (memory grows with tokens x
pages), so it exists for checking the TPU backend's layout and metadata on CPU (backend TPU_EMULATED), not for
speed; tests/test_attention.py holds it to jax's own `ref_ragged_paged_attention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ragged_paged_attention(q: jax.Array, kv_pages: jax.Array, kv_lens: jax.Array, page_indices: jax.Array,
                           cu_q_lens: jax.Array, num_seqs: jax.Array, *, sm_scale: float,
                           sliding_window: int | None = None) -> jax.Array:
    """q: [T, heads, hd]; kv_pages: [num_pages, page_size, 2 * kv_heads, hd] (K even, V odd heads) -> [T, heads, hd]."""
    t, heads, hd = q.shape
    _, page_size, combined, _ = kv_pages.shape
    kv_heads = combined // 2
    s, p = page_indices.shape
    tok = jnp.arange(t)
    seq = jnp.minimum(jnp.searchsorted(cu_q_lens[1:], tok, side="right"), s - 1)
    valid = tok < cu_q_lens[num_seqs[0]]
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    pos = kv_lens[seq] - q_len + (tok - cu_q_lens[seq])  # [T]
    ctx = kv_pages[page_indices[seq]].reshape(t, p * page_size, combined, hd)
    k, v = ctx[:, :, 0::2], ctx[:, :, 1::2]
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    qg = q.reshape(t, kv_heads, heads // kv_heads, hd)
    scores = jnp.einsum("tkgd,tskd->tkgs", qg, k.astype(q.dtype), precision=precision,
                        preferred_element_type=jnp.float32) * sm_scale
    slot = jnp.arange(p * page_size)
    visible = (slot[None, :] <= pos[:, None]) & (slot[None, :] < kv_lens[seq][:, None])
    if sliding_window is not None:
        visible &= slot[None, :] > pos[:, None] - sliding_window
    scores = jnp.where(visible[:, None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("tkgs,tskd->tkgd", probs, v, precision=precision, preferred_element_type=jnp.float32)
    out = jnp.where(valid[:, None, None, None], out, 0)
    return out.reshape(t, heads, hd).astype(q.dtype)
