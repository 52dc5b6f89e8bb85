"""Helpers shared by the GPU LoRA kernels."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.gpu.units import TILE_ROWS, UNIT_ROWS

NUM_SMS = 132  # H100 / H200 SXM
STAGES = 4  # pipeline depth (TMA copies in flight per CTA)
UNIT_ROWS_POW2 = 1 << (UNIT_ROWS.bit_length() - 1)  # largest rung of the store ladder


def compiler_params():
    # Warpgroup semantics: Mosaic GPU infers the SMEM layouts (swizzle, tiling) the wgmma operands need.
    return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


def check_operands(name: str, *arrays: jax.Array) -> None:
    for a in arrays:
        if a.dtype not in (jnp.bfloat16, jnp.float16):
            raise NotImplementedError(f"{name}: the GPU kernels take 16-bit activations and pages, got {a.dtype}")


def store_rows(acc: jax.Array, out_ref, row0, off, size, col0, width: int) -> None:
    """out[row0 : row0 + size, col0 : col0 + width] = acc[off : off + size] (off + size <= TILE_ROWS, dynamic).

    A TMA box has a static shape, so the rows go out as a ladder of power-of-two slices (64, 32, ..., 1): at
    most 7 stores, and rows past `size` (other groups' rows) are never touched.
    """
    @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((TILE_ROWS, width), out_ref.dtype))
    def _scope(o_smem):
        o_smem[...] = acc.astype(o_smem.dtype)
        plgpu.commit_smem()
        start = 0
        rows = UNIT_ROWS_POW2
        while rows:
            @pl.when(size & rows != 0)
            def _store(rows=rows, start=start):
                plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(off + start, rows)],
                                        out_ref.at[pl.ds(row0 + start, rows), pl.ds(col0, width)])
            start = start + (size & rows)
            rows //= 2
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
