"""GPU backend: jax's Pallas paged decode attention kernel for the decode rows, the reference for prefill tiles.

The kernel (`jax.experimental.pallas.ops.gpu.paged_attention`, lowered through Triton; deprecated in jax 0.11.2
but shipped) computes one query per sequence over pages of the 'head_major' cache layout (layout.py: K and V
[kv_heads, num_pages, page, hd]), GQA by grouping each kv head's query heads into 16-row blocks, split over
`k_splits` partitions of the pages and combined with a flash-style correction. It masks by length only: it has
no causal mask within a block of queries, no sliding window and no softmax scale, so:
  - decode rows go to the kernel with q pre-scaled by head_dim ** -0.5 and length = position + 1;
  - prefill tiles (several queries each) run the reference on the head-major cache;
  - with a sliding window, for float32 models (the kernel's dots would run in TF32, which the project does not
    allow for float32), or for shapes Triton cannot take (`unsupported_shape`), decode rows run the reference
    too (logged once).
Padding rows have length 0 and get zeros.
"""

from __future__ import annotations

import functools
import logging
import warnings

import jax
import jax.numpy as jnp

from infinilora_jax.models.attention import reference
from infinilora_jax.models.attention.metadata import block_rows
from infinilora_jax.models.batch import StepBatch

log = logging.getLogger(__name__)


@functools.cache
def _kernel():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the module warns on import that it is deprecated
        from jax.experimental.pallas.ops.gpu import paged_attention
    return paged_attention.paged_attention


@functools.cache
def _fallback(reason: str) -> None:
    log.warning("GPU attention: decode rows use the reference path (%s)", reason)


def kernel_splits(pages: int) -> tuple[int, int]:
    """(k_splits, pages_per_compute_block) for rows of `pages` pages: both must divide it (and the compute block
    is a power of two for Triton): up to 8 pages per compute block, up to 16 partitions."""
    low = pages & -pages  # the largest power of two dividing pages
    per_block = min(low, 8)
    return min(low // per_block, 16), per_block


def unsupported_shape(head_dim: int, page_size: int, pages: int) -> str | None:
    """Why the kernel cannot take these shapes, or None. Triton blocks must be powers of two (the lowering rejects
    head_dim 96, say) and its dots at least 16 wide."""
    pow2 = lambda x: x & (x - 1) == 0  # noqa: E731
    _, per_block = kernel_splits(pages)
    if not (pow2(head_dim) and head_dim >= 16 and pow2(page_size) and per_block * page_size >= 16):
        return f"head_dim {head_dim}, page_size {page_size}: the kernel needs powers of two and 16-wide blocks"
    return None


def attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, batch: StepBatch,
              sliding_window: int | None, interpret: bool) -> jax.Array:
    """q: [N, heads, hd]; k_pages, v_pages: local head-major cache [kv_heads, num_pages, page, hd] -> [N, heads, hd]."""
    reason = ("the kernel has no sliding window" if sliding_window is not None else
              "float32: the kernel's dots would be TF32" if q.dtype == jnp.float32 and not interpret else
              unsupported_shape(q.shape[-1], k_pages.shape[2], batch.decode.block_tables.shape[1]))
    out = jnp.zeros_like(q)
    if batch.decode.index.shape[0] > 0 and reason is None:
        out = decode(q, k_pages, v_pages, batch, interpret)
    else:
        if reason is not None and batch.decode.index.shape[0] > 0:
            _fallback(reason)
        out = reference.paged_attention(q, k_pages, v_pages, batch.positions, batch.decode.index,
                                        batch.decode.block_tables, sliding_window, out, head_major=True)
    return reference.paged_attention(q, k_pages, v_pages, batch.positions, batch.prefill.index,
                                     batch.prefill.block_tables, sliding_window, out, head_major=True)


def decode(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, batch: StepBatch, interpret: bool) -> jax.Array:
    """The decode rows' outputs written into zeros [N, heads, hd]."""
    n, _, hd = q.shape
    rows = block_rows(batch.decode, batch.positions)
    q_ext = jnp.concatenate([q, jnp.zeros_like(q[:1])])  # index N (padding rows) -> zeros
    q_rows = (q_ext[rows.start] * jnp.asarray(hd ** -0.5, q.dtype)).astype(q.dtype)
    k_splits, per_block = kernel_splits(rows.tables.shape[1])
    o = _kernel()(q_rows, k_pages, v_pages, rows.tables, rows.kv_len, block_h=16,
                  pages_per_compute_block=per_block, k_splits=k_splits, interpret=interpret)
    return jnp.zeros((n + 1, *q.shape[1:]), q.dtype).at[rows.start].set(o.astype(q.dtype))[:n]
