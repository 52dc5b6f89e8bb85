"""Helpers shared by the GPU LoRA kernels, and the alignment rules their TMA copies rely on.

TMA (cp.async.bulk.tensor) needs: a 16-byte aligned global base address (every kernel operand is a whole XLA
buffer: aligned), global row strides that are multiples of 16 bytes, a box whose inner dimension is a multiple
of 16 bytes, and a 128-byte aligned SMEM address. Mosaic GPU checks the strides and the box when lowering, and
(for tiled SMEM) that a gmem array's rows are a multiple of the 8-row tile; it does not check the SMEM address of
a dynamic slice of an SMEM buffer, which is the runtime fault `CUDA_ERROR_MISALIGNED_ADDRESS`. The checks below
make each of these a trace-time error with the operand's name.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.gpu.units import ALIGN, TILE_ROWS, UNIT_ROWS

NUM_SMS = 132  # H100 / H200 SXM
UNIT_ROWS_POW2 = 1 << (UNIT_ROWS.bit_length() - 1)  # largest rung of the store ladder (a unit's rows: 1..64)
TMA_GMEM_BYTES = 16  # global row strides and box inner dimensions: multiples of this
TMA_SMEM_BYTES = 128  # SMEM address of a TMA copy: a multiple of this


def compiler_params():
    # Warpgroup semantics: Mosaic GPU infers the SMEM layouts (swizzle, tiling) the wgmma operands need.
    return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


def check_operands(name: str, *arrays: jax.Array) -> None:
    for a in arrays:
        if a.dtype not in (jnp.bfloat16, jnp.float16):
            raise NotImplementedError(f"{name}: the GPU kernels take 16-bit activations and pages, got {a.dtype}")


def round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def padded_rows(m: int) -> int:
    """Rows of a sorted-row buffer (x, s, outputs) for m rows: a multiple of the 8-row SMEM tile (TMA into tiled
    SMEM needs the gmem row count to be one), at least one 64-row window (units.window keeps every window
    inside). For m >= 64, a multiple of 8, that is m itself: x needs no padded copy."""
    return max(round_up(m, ALIGN), TILE_ROWS)


def pad_rows(a: jax.Array, rows: int) -> jax.Array:
    """a [m, n] with zero rows appended up to `rows` (padded_rows(m)); a itself when it already has them."""
    if a.shape[0] == rows:
        return a
    return jnp.concatenate([a, jnp.zeros((rows - a.shape[0], *a.shape[1:]), a.dtype)])


def out_width(width: int, dtype) -> int:
    """Columns of an output whose rows are stored by `store_rows`: `width` rounded up so that a row is a
    multiple of 128 bytes (an SMEM slice at any row offset is then 128-byte aligned)."""
    return round_up(width, TMA_SMEM_BYTES // jnp.dtype(dtype).itemsize)


def check_tma_array(kernel: str, name: str, shape, dtype, box_cols: int) -> None:
    """A 2-D (or leading-batched) gmem operand read or written by TMA in boxes of `box_cols` columns, starting
    at rows that are multiples of 8."""
    item = jnp.dtype(dtype).itemsize
    rows, cols = shape[-2], shape[-1]
    problems = []
    if rows % ALIGN:
        problems.append(f"{rows} rows is not a multiple of {ALIGN} (TMA into 8-row tiled SMEM)")
    if cols * item % TMA_GMEM_BYTES:
        problems.append(f"a row of {cols * item} bytes is not a multiple of {TMA_GMEM_BYTES} (TMA stride)")
    if box_cols * item % TMA_GMEM_BYTES or cols % box_cols:
        problems.append(f"a box of {box_cols} columns ({box_cols * item} bytes) must be a multiple of "
                        f"{TMA_GMEM_BYTES} bytes and divide the {cols} columns")
    if problems:
        raise ValueError(f"{kernel}: operand {name} {tuple(shape)} {jnp.dtype(dtype).name}: "
                         + "; ".join(problems))


def store_rows(acc: jax.Array, out_ref, row0, off, size, col0, width: int) -> None:
    """out[row0 : row0 + size, col0 : col0 + width] = acc[off : off + size] (off + size <= TILE_ROWS, dynamic).

    A TMA box has a static shape, so the rows go out as a ladder of power-of-two slices (64, 32, ..., 1) of an
    SMEM staging buffer [TILE_ROWS, width]: at most 7 stores, and rows past `size` (other units' rows) are never
    touched. Each slice starts at a dynamic row, so a row must be a multiple of 128 bytes (TMA's SMEM alignment):
    `width` may exceed acc's columns (see `out_width`); the extra columns get zeros.
    """
    item = jnp.dtype(out_ref.dtype).itemsize
    if width * item % TMA_SMEM_BYTES:
        raise ValueError(f"store_rows: rows of {width} x {jnp.dtype(out_ref.dtype).name} = {width * item} bytes; "
                         f"TMA stores from SMEM slices at any row need a multiple of {TMA_SMEM_BYTES} bytes "
                         f"(use out_width)")
    cols = acc.shape[1]
    if cols > width:
        raise ValueError(f"store_rows: accumulator of {cols} columns does not fit {width}")

    @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((TILE_ROWS, width), out_ref.dtype))
    def _scope(o_smem):
        if cols == width:
            o_smem[...] = acc.astype(o_smem.dtype)
        else:
            o_smem.at[:, pl.ds(0, cols)][...] = acc.astype(o_smem.dtype)
            o_smem.at[:, pl.ds(cols, width - cols)][...] = jnp.zeros((TILE_ROWS, width - cols), o_smem.dtype)
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
