"""LoRA shrink on Hopper (Mosaic GPU): s = x @ A[page]^T for every work unit (units.py).

    x      [Mx, D_in]            rows sorted by group (or grouped in place); Mx = common.padded_rows(M): a
                                 multiple of 8 (TMA into 8-row tiled SMEM), at least one 64-row window
    A      [P, D_in]             A arena (rank rows, layout.py), P a multiple of 8
    s      [ksplit, Mx, Ro] f32  partial sums over ksplit slices of D_in, Ro = R rounded up to 32 columns (rows
                                 of 128 bytes: TMA stores from SMEM at any row); columns past R are zero;
                                 rows of no unit are left unwritten

Several targets sharing x (fused q/k/v, gate/up: one A arena, rank and set of units each) run in one launch, each
CTA on one target's unit, so their CTAs fill the GPU together (at decode a single target's few units leave most SMs
idle) and the launch is paid once. One CTA per (target's unit, D_in slice). It streams its slice of the unit's x
window [64, D_in] and of its page [R, D_in] through SMEM in (64 | R, bk) blocks (TMA, `stages` in flight) and
accumulates the [64, R] product with wgmma (A block read transposed, K-major, as wgmma wants it). Only the unit's
`size` rows are stored. Decode splits D_in (ksplit > 1) so a few adapters still occupy every SM; prefill has enough
units and keeps ksplit = 1. Pages are fetched R rows wide, or at the unit's rank bucket (units.py) when buckets are
given; columns past a page's rank must be masked by the caller (ops.py does).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.gpu.block_tables import STAGE_CHOICES
from pallas_kernels.gpu.common import check_operands, check_tma_array, compiler_params, out_width, store_rows
from pallas_kernels.gpu.units import TILE_ROWS, Units, stack_units, unit_of_target, window

BK = 64  # 128 bytes of 16-bit values: one swizzle row


@functools.partial(jax.jit, static_argnames=("ranks", "ksplit", "stages", "buckets", "interpret"))
def shrink(x: jax.Array, a_rows: tuple[jax.Array, ...], units: tuple[Units, ...], *, ranks: tuple[int, ...],
           ksplit: int = 1, stages: int = 4, buckets: tuple[tuple[int, ...] | None, ...] | None = None,
           interpret=None) -> tuple[jax.Array, ...]:
    """Per target t, [ksplit, Mx, out_width(ranks[t])] float32 partial shrink outputs (sum over axis 0, take
    [:, :rank]); see the module docstring. All targets (their A arenas, units and ranks, one each) share x and
    run in one launch: the grid is (targets x units per target, ksplit), and each CTA takes its target's static
    path. `stages`: TMA pipeline depth (block_tables.GpuBlocks). `buckets`: per target the rank widths pages
    are read at (units.rank_buckets; None: its rank alone); a unit reads units.bucket's width, columns past it
    are stored as zeros."""
    mx, d_in = x.shape
    num_targets = len(a_rows)
    buckets = tuple(b or (r,) for b, r in zip(buckets or (None,) * num_targets, ranks))
    if not len(units) == len(ranks) == len(buckets) == num_targets >= 1:
        raise ValueError(f"one A arena, Units, rank and bucket list per target: {num_targets} arenas, "
                         f"{len(units)} units, {len(ranks)} ranks, {len(buckets)} bucket lists")
    check_operands("shrink", x, *a_rows)
    for a, rank, bs in zip(a_rows, ranks, buckets):
        if a.ndim != 2 or a.shape[1] != d_in:
            raise ValueError(f"A arena {a.shape} must be [P, {d_in}]")
        if rank % 8 or not 8 <= rank <= 256:
            raise ValueError(f"rank {rank} must be a multiple of 8 in [8, 256] (wgmma N)")
        if bs[-1] != rank or any(b % 8 or b > rank for b in bs):
            raise ValueError(f"rank buckets {bs} must be multiples of 8 up to rank {rank}, ending at it")
        check_tma_array("shrink", "A arena", a.shape, a.dtype, BK)
    if stages not in STAGE_CHOICES:
        raise ValueError(f"stages {stages} not in {STAGE_CHOICES}")
    if d_in % (BK * ksplit):
        raise ValueError(f"D_in {d_in} must be a multiple of {BK} * ksplit={ksplit}")
    steps = d_in // BK // ksplit
    check_tma_array("shrink", "x (sorted rows)", x.shape, x.dtype, BK)
    per, meta = stack_units(units)

    def body(row0_ref, size_ref, page_ref, bucket_ref, count_ref, x_ref, *refs):
        a_refs, o_refs = refs[:num_targets], refs[num_targets:]
        u, kk = jax.lax.axis_index("unit"), jax.lax.axis_index("k")

        def target(t):
            rank, ro = ranks[t], out_width(ranks[t], jnp.float32)
            row0 = row0_ref[u]
            base, off, page = window(row0, page_ref[u], mx)

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
                    )(x_ref, a_refs[t])
                    return acc_ref[...]

                acc = pl.run_scoped(acc_scope, plgpu.ACC((TILE_ROWS, width)))
                store_rows(acc, o_refs[t].at[kk], row0, off, size_ref[u], 0, ro)

            if len(buckets[t]) == 1:
                run(rank)
            else:  # one static-shaped path per bucket; a unit takes the narrowest that holds its rank rows
                for i, width in enumerate(buckets[t]):
                    pl.when(bucket_ref[u] == i)(functools.partial(run, width))

        for t in range(num_targets):  # static paths; SMEM is shared between them (one runs per CTA)
            pl.when(unit_of_target(u, t, per, count_ref, size_ref))(functools.partial(target, t))

    kernel = plgpu.kernel(
        body, out_type=tuple(jax.ShapeDtypeStruct((ksplit, mx, out_width(r, jnp.float32)), jnp.float32)
                             for r in ranks),
        grid=(num_targets * per, ksplit), grid_names=("unit", "k"), compiler_params=compiler_params(),
        interpret=interpret)
    return tuple(kernel(meta.row0, meta.size, meta.page_row, meta.bucket, meta.count, x, *a_rows))
