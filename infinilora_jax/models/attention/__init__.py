"""Attention over the paged KV cache, with one backend per platform.

    backend.py    which backend (REFERENCE / TPU / GPU and their CPU-testable variants), `use_backend`
    layout.py     the KV cache layout each backend reads, and writing new K/V into it
    metadata.py   kernel metadata derived from a StepBatch inside the step (no new shapes, no new programs)
    reference.py  gather pages + einsum: every platform, the numerics the kernels are held to
    tpu.py        jax's Mosaic ragged paged attention kernel over every row at once
    gpu.py        jax's Pallas (Triton) paged decode kernel for decode rows, the reference for prefill tiles
    ragged.py     the TPU kernel's contract in plain JAX (CPU checks of the TPU path)

The model calls `write_kv` then `paged_attention` once per layer with its backend; both act on a device's local
shards inside shard_map. A layer slot's cache is a tuple of arrays in the backend's layout (layout.py).
"""

from __future__ import annotations

import jax

from infinilora_jax.models.attention import gpu, layout, reference, tpu
from infinilora_jax.models.attention.backend import AttentionBackend, select_backend, use_backend
from infinilora_jax.models.attention.metadata import ragged_rows
from infinilora_jax.models.batch import StepBatch

_TPU_MODES = {AttentionBackend.TPU: "mosaic", AttentionBackend.TPU_INTERPRET: "interpret",
              AttentionBackend.TPU_EMULATED: "emulated"}


def write_kv(backend: AttentionBackend, kv: tuple, k: jax.Array, v: jax.Array, cache_slots: jax.Array) -> tuple:
    """Write each token's new keys and values ([N, kv_heads, hd]) to its cache slot; returns the updated arrays."""
    return layout.write(backend.layout, kv, k, v, cache_slots)


def paged_attention(backend: AttentionBackend, q: jax.Array, kv: tuple, batch: StepBatch,
                    sliding_window: int | None) -> jax.Array:
    """Attention of every query token of the step over the cache (which already holds the step's K/V).

    q: [N, heads, hd] -> [N, heads, hd]; padding tokens get zeros.
    """
    if backend in _TPU_MODES:
        return tpu.attention(q, kv[0], ragged_rows(batch), sliding_window, _TPU_MODES[backend])
    if backend in (AttentionBackend.GPU, AttentionBackend.GPU_INTERPRET):
        return gpu.attention(q, *kv, batch, sliding_window, interpret=backend is AttentionBackend.GPU_INTERPRET)
    out = None
    for block in (batch.decode, batch.prefill):
        out = reference.paged_attention(q, *kv, batch.positions, block.index, block.block_tables, sliding_window,
                                        out)
    return out


__all__ = ["AttentionBackend", "paged_attention", "select_backend", "use_backend", "write_kv"]
