"""TPU backend: jax's Mosaic ragged paged attention kernel (RPA) over all of a step's rows in one call.

RPA takes the flat token list as ragged sequences (metadata.ragged_rows: decode rows and prefill chunks, each
chunk's 16-query tiles merged back into one sequence) over the 'combined' cache layout (layout.py: K and V
interleaved on heads, head_dim padded to 128). q is padded to the same head_dim and the kernel's output cut back;
sm_scale is the true head_dim ** -0.5. Sliding windows are passed through (the kernel masks them). Tokens not in
any row (padding) get zeros: the kernel leaves their rows unwritten.

Numerics differ from the reference in rounding only: the kernel keeps scores in float32 (the reference rounds
them to the activation dtype before the float32 softmax, as HF eager does) and accumulates with an online
softmax.

Modes: "mosaic" (TPU hardware; block sizes from jax's tuned table), "interpret" (the Pallas TPU interpreter on
CPU; jax 0.11.2's interpreter fails inside this kernel, see tests/test_attention.py), "emulated" (ragged.py, the
kernel's contract in plain JAX, for checking everything around the kernel on CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from infinilora_jax.models.attention import ragged
from infinilora_jax.models.attention.metadata import RaggedRows


def attention(q: jax.Array, kv_pages: jax.Array, rows: RaggedRows, sliding_window: int | None, mode: str
              ) -> jax.Array:
    """q: [N, heads, hd]; kv_pages: local combined cache [num_pages, page, 2 * kv_heads, hd_pad] -> [N, heads, hd]."""
    n, _, hd = q.shape
    hd_pad = kv_pages.shape[-1]
    qp = jnp.pad(q, ((0, 0), (0, 0), (0, hd_pad - hd)))
    args = (qp, kv_pages, rows.kv_lens, rows.page_indices, rows.cu_q_lens, rows.num_seqs)
    scale = float(hd ** -0.5)
    if mode == "emulated":
        out = ragged.ragged_paged_attention(*args, sm_scale=scale, sliding_window=sliding_window)
    else:
        from jax.experimental.pallas import tpu as pltpu
        from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

        if mode == "interpret":
            blocks = dict(num_kv_pages_per_block=min(rows.page_indices.shape[1], 2), num_queries_per_block=min(n, 8))
            with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
                out = ragged_paged_attention(*args, sm_scale=scale, sliding_window=sliding_window, **blocks)
        else:
            out = ragged_paged_attention(*args, sm_scale=scale, sliding_window=sliding_window,
                                         **_block_sizes(qp, kv_pages, rows))
    out = out[..., :hd]
    return jnp.where((jnp.arange(n) < rows.num_tokens)[:, None, None], out, jnp.zeros((), out.dtype))


def _block_sizes(q: jax.Array, kv_pages: jax.Array, rows: RaggedRows) -> dict:
    """jax's tuned (kv pages, queries) per block for this TPU; where jax cannot tell the TPU generation (lowering
    for TPU from another platform), its defaults for generations it has no table for (128, 32), clipped."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel

    try:
        heads_blk, combined_blk = kernel.get_min_heads_per_blk(q.shape[1], kv_pages.shape[2], q.dtype,
                                                                kv_pages.dtype)
        pages, queries = kernel.get_tuned_block_sizes(q.dtype, kv_pages.dtype, heads_blk, combined_blk // 2,
                                                      q.shape[2], kv_pages.shape[1], q.shape[0],
                                                      rows.page_indices.shape[1])
    except NotImplementedError:  # "TPU version must be 4 or higher": not running on a TPU
        pages, queries = min(rows.page_indices.shape[1], 128), min(q.shape[0], 32)
    return dict(num_kv_pages_per_block=pages, num_queries_per_block=queries)
