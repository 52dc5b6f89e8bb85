"""LoRA expand on Hopper (Mosaic GPU), window-major: per 8-row window of sorted rows, the delta of every page
that window's units use, accumulated in one CTA.

Why: at decode most work units hold one row. The unit-major expand (expand.py) gives each (unit, column tile) a
CTA that multiplies a 64-row window of s (wgmma's smallest M) by one 8 KB block of B and stages a 64-row float32
tile to store one row; the H200 streamed B at ~1.3 TB/s that way (sixteenth session), half the shrink's rate.
Here the product is taken transposed, d^T = B^T s^T, so the rows are wgmma's N (8 is its smallest) and the
columns its M: one CTA owns output rows [8w, 8w + 8) and a tile of `cols` columns, and streams the B blocks of
the (at most 8) pages its rows use through a TMA pipeline `stages` deep, accumulating a [cols, 8] float32 tile
in registers, stored once, transposed in registers into the rows of d (no row ladder, no atomics). (Storing
d^T and letting XLA transpose it in the add cost up to 11 us more per call on the H200: the add reads d^T with a
stride; eighteenth session.)

A page is read once per window its unit's rows touch, so a unit of n rows costs ~n / 8 + 1 reads of its page
(once in the unit-major path): the form for units of few rows. Mixing the two in one launch (units of more than
4 or 8 rows unit-major, the rest on windows) lost to one of the pure forms on every problem the tuner timed on
the H200 (nineteenth and twentieth sessions), and was removed.

    pairs      (window w, i < count[w]): the i-th page among the pages of window w's rows, in row order; its B
               arena row `page[w * 8 + i]`. A window holds at most 8 pairs (each owns a row).
    s_hi, s_lo [Mx / 8 * 8 * 8, R] 16-bit: per pair its window's 8 rows of s, rows of other pairs (and rows of
               no work) zeroed, in two 16-bit parts (expand.split_hi_lo: s carried to ~16 mantissa bits)
    B          [P, N]  B arena (rank rows, scaling folded in)
    d          [Mx, N] float32; a window with a pair stores all 8 rows (zeros on rows of no work); rows of
               windows with no pair are left unwritten

Pages are read at the pool's full rank (no rank buckets): columns of s past a page's rank are zero, so the rows
read past it contribute nothing.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.gpu.common import check_operands, check_tma_array, compiler_params
from pallas_kernels.gpu.expand import SMEM_BYTES, column_tile, split_hi_lo
from pallas_kernels.gpu.units import ALIGN, Units

WINDOW = 8  # rows per window: the smallest wgmma N; a multiple of the 8-row TMA tile, so windows need no padding


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WindowPairs:
    count: jax.Array  # [Mx / 8] int32 pages met by each window's rows (0..8)
    page: jax.Array  # [Mx / 8 * 8] int32 B arena row of pair (w, i) at w * 8 + i (0 for i >= count[w])
    owner: jax.Array  # [Mx / 8, 8, 8] bool: row j of window w belongs to pair i (owner[w, i, j])


def window_pairs(units: Units, mx: int) -> WindowPairs:
    """The (window, page) pairs of one target's units over a sorted-row buffer of mx rows (a multiple of 8).

    Units cover disjoint runs of rows but need not be listed in row order (the MoE layer's in-place rows list
    groups by key, not by position), so each row finds its unit as the last unit start at or before it."""
    if mx % WINDOW:
        raise ValueError(f"windows of {WINDOW} rows need a multiple of {WINDOW} rows, got {mx}")
    bound = units.bound
    rows = jnp.arange(mx, dtype=jnp.int32)
    live = (jnp.arange(bound) < units.count[0]) & (units.size > 0)
    unit_at = jnp.full((mx,), -1, jnp.int32).at[jnp.where(live, units.row0, mx)].set(
        jnp.arange(bound, dtype=jnp.int32), mode="drop")
    last_start = jax.lax.cummax(jnp.where(unit_at >= 0, rows, -1))
    unit = unit_at[jnp.maximum(last_start, 0)]
    safe = jnp.maximum(unit, 0)
    covered = ((last_start >= 0) & (rows < units.row0[safe] + units.size[safe])).reshape(-1, WINDOW)
    unit = unit.reshape(-1, WINDOW)
    first, owner = window_runs(unit, covered)  # a pair: a run of one unit's rows in a window
    count = jnp.sum(first, axis=1, dtype=jnp.int32)
    page = at_run_start(first, owner, units.b_page_row[jnp.maximum(unit, 0)]).reshape(-1)
    return WindowPairs(count=count, page=page, owner=owner)


def window_runs(ids: jax.Array, counted: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Runs of one id among the counted rows of each 8-row window, in row order: (first [nw, 8]: the row starts
    a run; owner [nw, run i, row j]: row j is in the window's i-th run). Comparisons and sums over [nw, 8, 8]
    that XLA fuses: no scan, no scatter. ids, counted: [nw, 8]."""
    same = jnp.concatenate([jnp.zeros_like(counted[:, :1]), (ids[:, 1:] == ids[:, :-1]) & counted[:, :-1]],
                           axis=1)
    first = counted & ~same
    j = jnp.arange(WINDOW, dtype=jnp.int32)
    run_of_row = jnp.sum(first[:, None, :] & (j[None, :] <= j[:, None])[None], axis=2, dtype=jnp.int32) - 1
    return first, counted[:, None, :] & (run_of_row[:, None, :] == j[None, :, None])


def at_run_start(first: jax.Array, owner: jax.Array, per_row: jax.Array) -> jax.Array:
    """[nw, 8] per row -> [nw, 8] per run (window_runs): the value at the run's first row; 0 past the runs."""
    return jnp.sum(jnp.where(owner & first[:, None, :], per_row[:, None, :], 0), axis=2, dtype=jnp.int32)


def pair_rows(s: jax.Array, pairs: WindowPairs, dtype) -> tuple[jax.Array, jax.Array]:
    """s [Mx, R] float32 (sorted rows, masked past each row's rank) as the kernel's per-pair rows: two 16-bit
    parts [Mx / 8 * 64, R], pair (w, i)'s 8 rows at (w * 8 + i) * 8, rows of other pairs zero."""
    mx, rank = s.shape
    per = jnp.where(pairs.owner[..., None], s.reshape(mx // WINDOW, 1, WINDOW, rank), 0.0)
    hi, lo = split_hi_lo(per.reshape(-1, rank), dtype)
    return hi, lo


def pipeline_depth(stages: int, rank: int, cols: int, itemsize: int) -> int:
    """B blocks (with their two s blocks) in flight: at most `stages` and a window's 8 pairs, within SMEM
    beside the [cols, 8] float32 staging tile."""
    per_step = (rank * cols + 2 * WINDOW * rank) * itemsize
    fit = (SMEM_BYTES - cols * WINDOW * 4) // per_step
    return max(1, min(stages, WINDOW, fit))


@functools.partial(jax.jit, static_argnames=("cols", "stages", "interpret"))
def window_expand(s_hi: tuple[jax.Array, ...], s_lo: tuple[jax.Array, ...], b_rows: tuple[jax.Array, ...],
                  pairs: tuple[WindowPairs, ...], *, cols: int = 256, stages: int = 4,
                  interpret=None) -> tuple[jax.Array, ...]:
    """Per target t, d [Mx, N_t] float32; see the module docstring. All targets run in one launch: a 1-D grid of,
    target after target, windows x that target's column tiles (`cols` columns, narrower where N_t is not a
    multiple)."""
    num_targets = len(b_rows)
    if not len(s_hi) == len(s_lo) == len(pairs) == num_targets >= 1:
        raise ValueError(f"per target one set of pair rows, B arena and WindowPairs: {len(s_hi)} / {len(s_lo)} "
                         f"pair parts, {num_targets} arenas, {len(pairs)} pair sets")
    nw = pairs[0].count.shape[0]
    mx = nw * WINDOW
    plans = []  # per target: (rank, tile columns, tiles, pipeline depth)
    for hi, lo, b, p in zip(s_hi, s_lo, b_rows, pairs):
        check_operands("window_expand", hi, lo, b)
        rank = hi.shape[1]
        if lo.shape != hi.shape or hi.shape[0] != nw * WINDOW * WINDOW or p.count.shape[0] != nw:
            raise ValueError(f"pair rows {hi.shape} / {lo.shape} must both be [{nw * WINDOW * WINDOW}, R] for "
                             f"{nw} windows (every target's)")
        if any(a.dtype != b.dtype for a in (hi, lo)):
            raise ValueError(f"s parts must be in B's dtype {b.dtype}")
        if rank % 16 or not 16 <= rank <= 256:
            raise ValueError(f"rank {rank} must be a multiple of 16 in [16, 256] (wgmma K of 16-bit operands)")
        bn = column_tile(b.shape[1], cols)
        if not bn:
            raise ValueError(f"output width {b.shape[1]} must be a multiple of 64")
        check_tma_array("window_expand", "s pair rows", hi.shape, hi.dtype, rank)
        check_tma_array("window_expand", "B arena", b.shape, b.dtype, bn)
        plans.append((rank, bn, b.shape[1] // bn, pipeline_depth(stages, rank, bn, jnp.dtype(b.dtype).itemsize)))
    first_cta = [0]  # target t's CTAs: [first_cta[t], first_cta[t + 1])
    for _, _, n_tiles, _ in plans:
        first_cta.append(first_cta[-1] + nw * n_tiles)
    names = ("count", "page", "hi", "lo", "b", "o")

    def body(*refs):
        ref = {name: refs[i * num_targets:(i + 1) * num_targets] for i, name in enumerate(names)}
        cta = jax.lax.axis_index("cta")

        def windows(t, w, g):
            rank, bn, _, depth = plans[t]

            def s_block(i):
                return pl.multiple_of((w * WINDOW + i) * WINDOW, ALIGN), 0

            def acc_scope(acc_ref):
                def step(_, hi_smem, lo_smem, b_smem):
                    plgpu.wgmma(acc_ref, b_smem.T, hi_smem.T)
                    plgpu.wgmma(acc_ref, b_smem.T, lo_smem.T)

                plgpu.emit_pipeline(
                    step, grid=(ref["count"][t][w],), max_concurrent_steps=depth,
                    in_specs=[plgpu.BlockSpec((pl.Element(WINDOW), rank), s_block),
                              plgpu.BlockSpec((pl.Element(WINDOW), rank), s_block),
                              plgpu.BlockSpec((pl.Element(rank), bn), lambda i: (
                                  pl.multiple_of(ref["page"][t][w * WINDOW + i], ALIGN), g))],
                )(ref["hi"][t], ref["lo"][t], ref["b"][t])
                return acc_ref[...]

            acc = pl.run_scoped(acc_scope, plgpu.ACC((bn, WINDOW)))
            row0 = pl.multiple_of(w * WINDOW, ALIGN)

            # the tile transposed in registers (WGMMA -> WGMMA_TRANSPOSED: one shuffle per 2 x 2) into delta rows
            @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((WINDOW, bn), jnp.float32))
            def _store(o_smem):
                o_smem.T[...] = plgpu.layout_cast(acc, plgpu.Layout.WGMMA_TRANSPOSED)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem, ref["o"][t].at[pl.ds(row0, WINDOW), pl.ds(g * bn, bn)])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        for t in range(num_targets):  # static paths; SMEM is shared between them (one runs per CTA)
            lo, hi = first_cta[t], first_cta[t + 1]
            local = cta - lo
            w, g = local % nw, local // nw  # w is in range for every CTA, so the count load is safe anywhere
            pl.when((cta >= lo) & (cta < hi) & (ref["count"][t][w] > 0))(functools.partial(windows, t, w, g))

    kernel = plgpu.kernel(
        body, out_type=tuple(jax.ShapeDtypeStruct((mx, b.shape[1]), jnp.float32) for b in b_rows),
        grid=(first_cta[-1],), grid_names=("cta",), compiler_params=compiler_params(), interpret=interpret)
    return tuple(kernel(*(p.count for p in pairs), *(p.page for p in pairs), *s_hi, *s_lo, *b_rows))
