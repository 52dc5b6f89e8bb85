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
