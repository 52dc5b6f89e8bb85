"""LoRA shrink on Hopper (Mosaic GPU): s = x @ A[page]^T for every work unit (units.py).

    x      [Mx, D_in]            rows sorted by group; Mx = common.padded_rows(M): a multiple of 8 (TMA into
                                 8-row tiled SMEM) with one window of slack (windows never run off the end)
    A      [P, D_in]             A arena (rank rows, layout.py), P a multiple of 8
    s      [ksplit, Mx, Ro] f32  partial sums over ksplit slices of D_in, Ro = R rounded up to 32 columns (rows
                                 of 128 bytes: TMA stores from SMEM at any row); columns past R are zero;
                                 rows of no unit are left unwritten

One CTA per (unit, D_in slice). It streams its slice of the unit's x window [64, D_in] and of its page
[R, D_in] through SMEM in (64 | R, bk) blocks (TMA, `stages` in flight) and accumulates the [64, R] product
with wgmma (A block read transposed, K-major, as wgmma wants it). Only the unit's `size` rows are stored.
Decode splits D_in (ksplit > 1) so a few adapters still occupy every SM; prefill has enough units and keeps
ksplit = 1. Pages are fetched R rows wide, or at the unit's rank bucket (units.py) when buckets are given;
columns past a page's rank must be masked by the caller (ops.py does).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.gpu.block_tables import STAGE_CHOICES
from pallas_kernels.gpu.common import check_operands, check_tma_array, compiler_params, out_width, store_rows
from pallas_kernels.gpu.units import TILE_ROWS, Units, window

BK = 64  # 128 bytes of 16-bit values: one swizzle row


@functools.partial(jax.jit, static_argnames=("rank", "ksplit", "stages", "buckets", "interpret"))
def shrink(x: jax.Array, a_rows: jax.Array, units: Units, *, rank: int, ksplit: int = 1, stages: int = 4,
           buckets: tuple[int, ...] | None = None, interpret=None) -> jax.Array:
    """[ksplit, Mx, out_width(rank)] float32 partial shrink outputs (sum over axis 0, take [:, :rank]); see the
    module docstring. `stages`: TMA pipeline depth (block_tables.GpuBlocks). `buckets`: the rank widths pages
    are read at (units.rank_buckets; None: `rank` alone); a unit reads units.bucket's width, columns past it
    are stored as zeros."""
    mx, d_in = x.shape
    buckets = buckets or (rank,)
    check_operands("shrink", x, a_rows)
    if a_rows.ndim != 2 or a_rows.shape[1] != d_in:
        raise ValueError(f"A arena {a_rows.shape} must be [P, {d_in}]")
    if rank % 8 or not 8 <= rank <= 256:
        raise ValueError(f"rank {rank} must be a multiple of 8 in [8, 256] (wgmma N)")
    if buckets[-1] != rank or any(b % 8 or b > rank for b in buckets):
        raise ValueError(f"rank buckets {buckets} must be multiples of 8 up to rank {rank}, ending at it")
    if stages not in STAGE_CHOICES:
        raise ValueError(f"stages {stages} not in {STAGE_CHOICES}")
    if d_in % (BK * ksplit):
        raise ValueError(f"D_in {d_in} must be a multiple of {BK} * ksplit={ksplit}")
    steps = d_in // BK // ksplit
    check_tma_array("shrink", "x (sorted rows)", x.shape, x.dtype, BK)
    check_tma_array("shrink", "A arena", a_rows.shape, a_rows.dtype, BK)
    ro = out_width(rank, jnp.float32)

    def body(row0_ref, size_ref, page_ref, bucket_ref, count_ref, x_ref, a_ref, o_ref):
        u, kk = jax.lax.axis_index("unit"), jax.lax.axis_index("k")

        @pl.when(u < count_ref[0])
        def _unit():
            row0 = row0_ref[u]
            base, off, page = window(row0, page_ref[u])

            def run(width):
                def acc_scope(acc_ref):
                    plgpu.emit_pipeline(
                        lambda _, x_smem, a_smem: plgpu.wgmma(acc_ref, x_smem, a_smem.T),
                        grid=(steps,),
                        in_specs=[
                            plgpu.BlockSpec((pl.Element(TILE_ROWS), BK), lambda k: (base, kk * steps + k),
                                            delay_release=1),
                            plgpu.BlockSpec((pl.Element(width), BK), lambda k: (page, kk * steps + k),
                                            delay_release=1),
                        ],
                        max_concurrent_steps=min(stages, max(steps, 2)),
                    )(x_ref, a_ref)
                    return acc_ref[...]

                acc = pl.run_scoped(acc_scope, plgpu.ACC((TILE_ROWS, width)))
                store_rows(acc, o_ref.at[kk], row0, off, size_ref[u], 0, ro)

            if len(buckets) == 1:
                run(rank)
            else:  # one static-shaped path per bucket; a unit takes the narrowest that holds its rank rows
                for i, width in enumerate(buckets):
                    pl.when(bucket_ref[u] == i)(functools.partial(run, width))

    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((ksplit, mx, ro), jnp.float32),
        grid=(units.bound, ksplit), grid_names=("unit", "k"), compiler_params=compiler_params(),
        interpret=interpret)
    return kernel(units.row0, units.size, units.page_row, units.bucket, units.count, x, a_rows)
