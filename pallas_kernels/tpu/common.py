"""Small helpers shared by the TPU kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_VMEM_BYTES = 12 * 2**20  # stay below the smallest default scoped VMEM limit (16 MiB on v4/v5e)


def precision(dtype) -> jax.lax.Precision:
    """float32 operands get full float32 products (HIGHEST); bf16 operands are native on the MXU."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def vmem_limit(estimate: int) -> int | None:
    """None (the compiler's default limit) for small kernels; the estimate plus headroom otherwise."""
    return None if estimate <= DEFAULT_VMEM_BYTES else int(estimate * 1.25) + 4 * 2**20


def check_packing(rank_block: int, interpret, *arenas: jax.Array) -> None:
    """On a TPU, a block of a 16-bit array should cover whole (16, 128) tiles: rank blocks of 16 rows. The
    interpreter has no tiling, so tests may use rank blocks of 8 with bf16."""
    if interpret is False:
        for a in arenas:
            pack = max(1, 4 // a.dtype.itemsize)
            if rank_block % (8 * pack):
                raise ValueError(f"rank_block={rank_block} must be a multiple of {8 * pack} for {a.dtype} pages "
                                 "on TPU (sublane packing)")
