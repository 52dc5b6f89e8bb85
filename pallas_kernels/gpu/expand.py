"""LoRA expand on Hopper (Mosaic GPU): d = s @ B[page] for every work unit (units.py), in float32.

    s_hi, s_lo [Mx, R] 16-bit   the float32 shrink output split in two 16-bit parts (s ~= s_hi + s_lo);
                                Mx a multiple of 8, at least one 64-row window (common.padded_rows)
    B          [P, N]           B arena (rank rows, scaling folded in), P a multiple of 8; a unit's page starts
                                at its b_page_row
    d          [Mx, N] f32      delta rows in sorted order; rows of no unit are left unwritten

Several targets (fused q/k/v, gate/up) run in one launch, each CTA on one target's unit and column tiles. One CTA
per (target's unit, group of `tiles` column tiles of `cols` columns), the targets' CTAs listed end to end in a 1-D
grid so a narrow target has no CTAs for the wide one's tiles: per tile it loads the unit's s window [64, R] (both
parts) and the page's [R, cols] block of B, and accumulates s_hi @ B + s_lo @ B with two wgmmas: s carried to ~16
mantissa bits, as the reference's float32 expand (a single 16-bit s would lose ~3 decimal digits). Only the unit's
rows are stored. With one tile per CTA there is nothing to overlap inside a CTA; with several, a pipeline keeps up
to `stages` tiles' blocks in flight while earlier tiles multiply and store (the s window is re-read per tile, from
L2).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.gpu.block_tables import EXPAND_COL_CHOICES
from pallas_kernels.gpu.common import check_operands, check_tma_array, compiler_params, out_width, store_rows
from pallas_kernels.gpu.units import TILE_ROWS, Units, stack_units, unit_of_target, window

# float32 bits kept by a 16-bit type's mantissa (sign, exponent, the top 7 (bf16) or 10 (f16) mantissa bits)
_HI_MASK = {jnp.dtype(jnp.bfloat16): 0xFFFF0000, jnp.dtype(jnp.float16): 0xFFFFE000}


def split_hi_lo(s: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """s (float32) ~= hi + lo, both in the 16-bit `dtype`, to ~16 mantissa bits.

    hi is s with its low mantissa bits cleared by an integer mask, not `s.astype(dtype)`: XLA's GPU compiler
    removes float32 -> 16-bit -> float32 convert pairs (xla_allow_excess_precision, on by default), which
    turned `s - s.astype(bf16).astype(f32)` into 0 on the H200, so lo vanished and the float32 delta kept
    only 8 bits (1.7e-3 relative). Bit operations cannot be simplified that way: hi converts to `dtype`
    exactly (bf16; f16 for values in its normal range), lo = s - hi is exact in float32 and rounds once."""
    bits = jax.lax.bitcast_convert_type(s.astype(jnp.float32), jnp.uint32)
    hi = jax.lax.bitcast_convert_type(bits & jnp.uint32(_HI_MASK[jnp.dtype(dtype)]), jnp.float32)
    return hi.astype(dtype), (s - hi).astype(dtype)


def column_tile(n: int, cols: int) -> int:
    """The widest tile of at most `cols` columns (a power of two times 64) that divides n; 0 if none does."""
    if cols not in EXPAND_COL_CHOICES:
        raise ValueError(f"expand columns {cols} not in {EXPAND_COL_CHOICES}")
    while cols >= 64 and n % cols:
        cols //= 2
    return cols if cols >= 64 else 0


SMEM_BYTES = 220 * 1024  # of the 227 KiB a Hopper CTA may use; the rest for barriers and alignment


def tiles_per_cta(n_tiles: int, tiles: int) -> int:
    """The largest divisor of n_tiles that is at most `tiles` (0: all n_tiles)."""
    want = n_tiles if tiles == 0 else min(tiles, n_tiles)
    return max(k for k in range(1, want + 1) if n_tiles % k == 0)


def pipeline_depth(stages: int, tiles: int, width: int, bn: int, itemsize: int) -> int:
    """Tiles in flight: at most `stages` and `tiles`, within SMEM (per tile the two s windows and the B block,
    plus the float32 staging buffer of the row stores)."""
    per_tile = (2 * TILE_ROWS * width + width * bn) * itemsize
    fit = (SMEM_BYTES - TILE_ROWS * bn * 4) // per_tile
    return max(1, min(stages, tiles, fit))


def unit_tile(hi_ref, lo_ref, b_ref, o_ref, *, row0, size, page, g, bn: int, width: int, mx: int) -> None:
    """In a kernel: one unit's column tile g (`bn` columns) with no pipeline: its 64-row s window (both parts)
    and the [width, bn] block of its page (B arena row `page`) in, two wgmmas, the unit's `size` rows (from
    sorted row `row0`) stored into o_ref. Also the window-major expand's path for long units."""
    base, off, page = window(row0, page, mx)
    s_spec = plgpu.BlockSpec((pl.Element(TILE_ROWS), width), lambda _: (base, 0))

    def acc_scope(acc_ref):
        def step(_, hi_smem, lo_smem, b_smem):
            plgpu.wgmma(acc_ref, hi_smem, b_smem)
            plgpu.wgmma(acc_ref, lo_smem, b_smem)

        plgpu.emit_pipeline(
            step, grid=(1,), max_concurrent_steps=1,
            in_specs=[s_spec, s_spec, plgpu.BlockSpec((pl.Element(width), bn), lambda _: (page, g))],
        )(hi_ref, lo_ref, b_ref)
        return acc_ref[...]

    acc = pl.run_scoped(acc_scope, plgpu.ACC((TILE_ROWS, bn)))
    store_rows(acc, o_ref, row0, off, size, g * bn, bn)


@functools.partial(jax.jit, static_argnames=("cols", "buckets", "interpret", "tiles", "stages"))
def expand(s_hi: tuple[jax.Array, ...], s_lo: tuple[jax.Array, ...], b_rows: tuple[jax.Array, ...],
           units: tuple[Units, ...], *, cols: int = 128,
           buckets: tuple[tuple[int, ...] | None, ...] | None = None, interpret=None, tiles: int = 1,
           stages: int = 4) -> tuple[jax.Array, ...]:
    """Per target t, [Mx, N_t] float32 delta rows (sorted order); see the module docstring. All targets (s parts,
    B arena and units one each) run in one launch: the grid holds, target after target, units per target x that
    target's column tiles (a 2-D grid over the widest target's tiles left 58% of the CTAs of Qwen3's q/k/v,
    4096 | 512 | 512 columns, with nothing to do). `cols`: output columns per CTA
    (block_tables.GpuBlocks.expand_cols; narrower where N_t is not a multiple). `buckets`: per target the rank
    widths pages are read at (units.rank_buckets; None: its full rank); a unit reads units.bucket's width of s
    and B. `tiles`: column tiles per CTA (block_tables.GpuBlocks.expand_tiles; 0: all of a target's), pipelined
    `stages` deep (within SMEM)."""
    num_targets = len(b_rows)
    if not len(s_hi) == len(s_lo) == len(units) == num_targets >= 1:
        raise ValueError(f"one s pair, B arena and Units per target: {len(s_hi)} / {len(s_lo)} s parts, "
                         f"{num_targets} arenas, {len(units)} units")
    mx = s_hi[0].shape[0]
    ranks = tuple(h.shape[1] for h in s_hi)
    buckets = tuple(b or (r,) for b, r in zip(buckets or (None,) * num_targets, ranks))
    tile_sets = []  # per target: (columns per tile, tiles, tiles per CTA)
    for hi, lo, b, rank, bs in zip(s_hi, s_lo, b_rows, ranks, buckets):
        check_operands("expand", hi, lo, b)
        if lo.shape != hi.shape or hi.shape[0] != mx or hi.dtype != b.dtype or lo.dtype != b.dtype:
            raise ValueError(f"s parts {hi.shape} {hi.dtype} / {lo.shape} {lo.dtype} must match, with {mx} rows, "
                             f"in B's dtype {b.dtype}")
        if rank % 16 or not 16 <= rank <= 256:
            raise ValueError(f"rank {rank} must be a multiple of 16 in [16, 256] (wgmma K of 16-bit operands)")
        if bs[-1] != rank or any(w % 16 or rank % w for w in bs):
            raise ValueError(f"rank buckets {bs} must be multiples of 16 dividing rank {rank}, ending at it")
        bn = column_tile(b.shape[1], cols)
        if not bn:
            raise ValueError(f"output width {b.shape[1]} must be a multiple of 64")
        for width in bs:
            check_tma_array("expand", "s_hi (sorted rows)", hi.shape, hi.dtype, width)
        check_tma_array("expand", "B arena", b.shape, b.dtype, bn)
        assert out_width(bn, jnp.float32) == bn  # rows of the staged output are 128-byte multiples
        n_tiles = b.shape[1] // bn
        tile_sets.append((bn, n_tiles, tiles_per_cta(n_tiles, tiles)))
    per, meta = stack_units(units)
    first_cta = [0]  # target t's CTAs: [first_cta[t], first_cta[t + 1]), its units fastest, then tile groups
    for _, n_tiles, k in tile_sets:
        first_cta.append(first_cta[-1] + per * (n_tiles // k))

    def body(row0_ref, size_ref, page_ref, bucket_ref, count_ref, *refs):
        hi_refs, lo_refs = refs[:num_targets], refs[num_targets:2 * num_targets]
        b_refs, o_refs = refs[2 * num_targets:3 * num_targets], refs[3 * num_targets:]
        cta = jax.lax.axis_index("cta")

        def target(t, u, g):
            bn, _, k = tile_sets[t]
            row0 = row0_ref[u]
            base, off, page = window(row0, page_ref[u], mx)

            def run(width):
                s_spec = plgpu.BlockSpec((pl.Element(TILE_ROWS), width), lambda _: (base, 0))
                if k == 1:  # one tile (g): nothing to overlap inside the CTA
                    unit_tile(hi_refs[t], lo_refs[t], b_refs[t], o_refs[t], row0=row0, size=size_ref[u], page=page,
                              g=g, bn=bn, width=width, mx=mx)
                    return

                def tile(idx, hi_smem, lo_smem, b_smem):  # tile g * k + i: multiply, store its rows
                    def acc_scope(acc_ref):
                        plgpu.wgmma(acc_ref, hi_smem, b_smem)
                        plgpu.wgmma(acc_ref, lo_smem, b_smem)
                        return acc_ref[...]

                    acc = pl.run_scoped(acc_scope, plgpu.ACC((TILE_ROWS, bn)))
                    store_rows(acc, o_refs[t], row0, off, size_ref[u], (g * k + idx[0]) * bn, bn)

                depth = pipeline_depth(stages, k, width, bn, jnp.dtype(b_refs[t].dtype).itemsize)
                plgpu.emit_pipeline(
                    tile, grid=(k,), max_concurrent_steps=depth,
                    in_specs=[s_spec, s_spec,
                              plgpu.BlockSpec((pl.Element(width), bn), lambda i: (page, g * k + i))],
                )(hi_refs[t], lo_refs[t], b_refs[t])

            if len(buckets[t]) == 1:
                run(ranks[t])
            else:  # one static-shaped path per bucket, as in the shrink
                for i, width in enumerate(buckets[t]):
                    pl.when(bucket_ref[u] == i)(functools.partial(run, width))

        for t in range(num_targets):  # static paths; SMEM is shared between them (one runs per CTA)
            local = cta - first_cta[t]
            u, g = t * per + local % per, local // per  # stacked unit index, tile group
            mine = (cta >= first_cta[t]) & (cta < first_cta[t + 1])
            pl.when(mine & unit_of_target(u, t, per, count_ref, size_ref))(functools.partial(target, t, u, g))

    kernel = plgpu.kernel(
        body, out_type=tuple(jax.ShapeDtypeStruct((mx, b.shape[1]), jnp.float32) for b in b_rows),
        grid=(first_cta[-1],), grid_names=("cta",),
        compiler_params=compiler_params(), interpret=interpret)
    return tuple(kernel(meta.row0, meta.size, meta.b_page_row, meta.bucket, meta.count, *s_hi, *s_lo, *b_rows))
