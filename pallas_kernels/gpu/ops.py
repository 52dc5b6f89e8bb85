"""Multi-LoRA on Hopper: group rows, build work units, shrink, expand; decode and prefill variants.

    decode  (BGMV-like: few rows per adapter, rows <= blocks.decode_rows): the shrink splits D_in over
            blocks.decode_ksplit CTAs per unit, so a handful of adapters still keeps every SM streaming its pages;
            up to blocks.run_rows rows, run units (runs.py: one unit per run of one page in an 8-row window,
            shared with the window-major expand as its pairs; no group facts); else up to blocks.per_row_rows
            rows, one unit per row in the rows' own order (no sort, no gathers).
            With blocks.window_unit_rows (0, or at least 64: every unit), the units take the window-major
            expand (window_expand.py: one CTA per 8 rows and column tile streams the pages those rows use)
            instead of one CTA per (unit, column tile).
    prefill (SGMV-like: long runs per adapter): one CTA per (unit, D_in), units of up to 64 rows per group.
Both sort rows by (slot, expert) once (a gather of x; per-row units keep the rows in place, and rows that arrive
grouped, `rows_grouped=True`, as the MoE layer sorts them by (expert, slot), or in runs, `row_runs=n`, as a
step's tokens come, each sequence's one run of its slot, are not moved), run one shrink and
one expand launch for all the targets sharing x (fused q/k/v, gate/up: each CTA takes one target's unit), and add
the delta into y in float32 (one rounding) at the rows' original positions; rows with no work (slot 0, padding
experts, rank-0 targets) keep y bit-identical. Each page is read once per 64-row chunk of its group (once per
row with per-row units).
The tunable settings (pipeline depth, the decode split and its row limit, expand tile) come per device from
block_tables.py (tuned_blocks.json), or as `blocks=`.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp

from pallas_kernels.gpu.block_tables import GpuBlocks, blocks_for, current_device_key
from pallas_kernels.gpu.common import pad_rows, padded_rows
from pallas_kernels.gpu.expand import expand, split_hi_lo
from pallas_kernels.gpu.runs import run_units
from pallas_kernels.gpu.shrink import BK, shrink
from pallas_kernels.gpu.units import build_units, per_row_units, rank_buckets
from pallas_kernels.gpu.window_expand import pair_rows, window_expand, window_pairs
from pallas_kernels.grouping import group_rows, sort_by_key
from pallas_kernels.layout import PageTable

# Replace the block table's window_unit_rows (0: the unit-major expand; at least 64: every unit on the
# window-major expand) and run_rows (calls of up to this many rows take run units; 0: none) for an experiment.
# Read when a program is traced: set them before the process starts.
WINDOW_UNIT_ROWS_ENV_VAR = "INFINILORA_GPU_WINDOW_UNIT_ROWS"
RUN_ROWS_ENV_VAR = "INFINILORA_GPU_RUN_ROWS"
_ROW_OVERRIDES = ((WINDOW_UNIT_ROWS_ENV_VAR, "window_unit_rows", "a unit's rows"),
                  (RUN_ROWS_ENV_VAR, "run_rows", "a call's rows"))


def device_blocks(dtype, interpret) -> GpuBlocks:
    """The block table's settings for this device (the interpreter's entry when interpreting) and dtype, with
    $INFINILORA_GPU_WINDOW_UNIT_ROWS and $INFINILORA_GPU_RUN_ROWS over its window_unit_rows and run_rows."""
    blocks = blocks_for(current_device_key(interpret is not None), jnp.dtype(dtype).name)
    for var, field, what in _ROW_OVERRIDES:
        if (text := os.environ.get(var)) is not None:
            try:
                rows = int(text)
            except ValueError:
                raise ValueError(f"{var}={text!r}: {what} (0: never)") from None
            blocks = dataclasses.replace(blocks, **{field: rows})
    return blocks


def pick_ksplit(rows: int, d_in: int, blocks: GpuBlocks) -> int:
    """Decode splits D_in (while the slices stay whole BK blocks); prefill does not."""
    if rows > blocks.decode_rows:
        return 1
    k = blocks.decode_ksplit
    while k > 1 and d_in % (BK * k):
        k //= 2
    return k


@functools.partial(jax.jit, static_argnames=("num_experts", "ksplit", "interpret", "blocks", "rows_grouped",
                                             "row_runs"))
def lora_apply(ys: tuple[jax.Array, ...], x: jax.Array, keys: jax.Array, active: jax.Array,
               a_rows: tuple[jax.Array, ...], b_rows: tuple[jax.Array, ...], tables: tuple[PageTable, ...], *,
               num_experts: int, ksplit: int | None = None, interpret=None,
               b_tables: tuple[PageTable | None, ...] | None = None,
               blocks: GpuBlocks | None = None, rows_grouped: bool = False,
               row_runs: int | None = None) -> tuple[jax.Array, ...]:
    """ys[i] + delta_i (float32 sum, one rounding) for LoRA targets i sharing the input x.

    Args:
      ys: per target [M, N_i] base outputs (float32 zeros to get the plain delta).
      x: [M, D_in] bf16 rows (tokens, or (token, expert) assignments).
      keys: [M] int32 slot * num_experts + expert; active: [M] bool rows with an adapter and a real expert.
      a_rows, b_rows: per target its A arena [P_i, D_in] and B arena [P_i, N_i] (layout.py), x's dtype.
      tables: per target its PageTable; the kernels fetch max_blocks * rank_block rows per page (the rank).
      b_tables: per target None (B's pages at A's rows) or B's own PageTable (same rank block, strides, blocks).
      ksplit: D_in slices of the shrink (None: by variant, pick_ksplit).
      interpret: None on a GPU; a `plgpu.InterpretGPUParams` to run in the Mosaic GPU interpreter on CPU.
      blocks: the tunable settings (None: the device's block table entry, device_blocks).
      rows_grouped: the rows of each active key are one contiguous run (grouping.group_rows' `presorted`): the
        kernels read x and write the delta in place, with no sort and no gathers.
      row_runs: the rows with work come as at most this many runs of one key each, a key possibly in several
        runs (a step's tokens: each sequence's tokens are one run of its slot, so the sequence count bounds the
        runs): taken in place as with rows_grouped. A bound below the true count drops the rows past it.
    """
    m = x.shape[0]
    blocks = device_blocks(x.dtype, interpret) if blocks is None else blocks
    ksplit = pick_ksplit(m, x.shape[1], blocks) if ksplit is None else ksplit
    # Padding rows (to a multiple of 8, at least one 64-row window; none for m >= 64 a multiple of 8) keep the
    # row count a multiple of the 8-row SMEM tile; they hold zeros and are never stored.
    mx = padded_rows(m)
    num_keys = tables[0].num_slots * num_experts
    runs = m <= blocks.run_rows  # run units (runs.py), shared by the shrink and the window-major expand
    per_row = not runs and m <= blocks.per_row_rows  # one unit per row (units.per_row_units)
    # rows keep their order: no gather of x, none of the delta back
    in_place = per_row or rows_grouped or row_runs is not None
    # the kernels' row order: rows sorted by key (runs: by a sort alone; else with the group facts), or as given
    grouping = order = inverse = None
    if runs and not in_place:
        order, inverse = sort_by_key(keys, active, num_keys=num_keys)
    elif not (runs or per_row):
        grouping = group_rows(keys, active, num_keys=num_keys, presorted=in_place, max_groups=row_runs)
        order, inverse = grouping.order, grouping.inverse
    x_rows = pad_rows(x if in_place else x[order], mx)
    run_keys, run_active = (keys, active) if in_place else (keys[order], active[order])
    ranks, buckets, units, run_pairs = [], [], [], []
    for table, b_table in zip(tables, b_tables or (None,) * len(tables)):
        ranks.append(table.max_blocks * table.rank_block)
        buckets.append(rank_buckets(ranks[-1], blocks.rank_buckets))
        kwargs = dict(num_experts=num_experts, b_table=b_table, buckets=buckets[-1])
        if runs:
            u, p = run_units(run_keys, run_active, table, mx=mx, **kwargs)
            units.append(u)
            run_pairs.append(p)
        elif per_row:
            units.append(per_row_units(keys, active, table, **kwargs))
        else:
            units.append(build_units(grouping, table, **kwargs))
    ranks, buckets, units = tuple(ranks), tuple(buckets), tuple(units)
    # every target in one shrink launch and one expand launch
    s_parts = shrink(x_rows, tuple(a_rows), units, ranks=ranks, ksplit=ksplit, stages=blocks.stages,
                     buckets=buckets, interpret=interpret)
    masked = []
    for s, u, rank in zip(s_parts, units, ranks):
        s = s.sum(0)[:m, :rank]
        # Rows of no unit were never written; columns past a page's rank may hold a neighbouring page's rows.
        masked.append(pad_rows(jnp.where(jnp.arange(rank)[None, :] < u.row_rank[:, None], s, 0.0), mx))
    if runs or blocks.window_unit_rows:  # the window-major expand
        pairs = tuple(run_pairs) if runs else tuple(window_pairs(u, mx) for u in units)
        per_pair = [pair_rows(s, p, b.dtype) for s, p, b in zip(masked, pairs, b_rows)]
        deltas = window_expand(tuple(h for h, _ in per_pair), tuple(lo for _, lo in per_pair), tuple(b_rows), pairs,
                               cols=blocks.window_cols, stages=blocks.stages, interpret=interpret)
    else:
        parts = [split_hi_lo(s, b.dtype) for s, b in zip(masked, b_rows)]
        deltas = expand(tuple(h for h, _ in parts), tuple(lo for _, lo in parts), tuple(b_rows), units,
                        cols=blocks.expand_cols, buckets=buckets, tiles=blocks.expand_tiles, stages=blocks.stages,
                        interpret=interpret)
    out = []
    for y, d, u in zip(ys, deltas, units):
        if in_place:  # rows never moved
            d, work = d[:m], u.row_rank > 0
        else:
            d, work = d[inverse], (u.row_rank > 0)[inverse]
        out.append(jnp.where(work[:, None], (y.astype(jnp.float32) + d).astype(y.dtype), y))
    return tuple(out)


@functools.partial(jax.jit, static_argnames=("num_experts", "ksplit", "interpret", "blocks", "row_runs"))
def lora_shrink(x: jax.Array, keys: jax.Array, active: jax.Array, a_rows: jax.Array, table: PageTable, *,
                num_experts: int, ksplit: int | None = None, interpret=None,
                blocks: GpuBlocks | None = None, row_runs: int | None = None) -> jax.Array:
    """[M, R] float32 shrink alone (x @ A[page]^T per row; 0 for rows with no work) on grouped units: for
    benchmarks. row_runs: as lora_apply's (the rows stay in place)."""
    m = x.shape[0]
    blocks = device_blocks(x.dtype, interpret) if blocks is None else blocks
    ksplit = pick_ksplit(m, x.shape[1], blocks) if ksplit is None else ksplit
    grouping = group_rows(keys, active, num_keys=table.num_slots * num_experts, presorted=row_runs is not None,
                          max_groups=row_runs)
    x_sorted = pad_rows(x if row_runs is not None else x[grouping.order], padded_rows(m))
    rank = table.max_blocks * table.rank_block
    buckets = rank_buckets(rank, blocks.rank_buckets)
    units = build_units(grouping, table, num_experts=num_experts, buckets=buckets)
    s = shrink(x_sorted, (a_rows,), (units,), ranks=(rank,), ksplit=ksplit, stages=blocks.stages,
               buckets=(buckets,), interpret=interpret)[0].sum(0)[:m, :rank]
    s = jnp.where(jnp.arange(rank)[None, :] < units.row_rank[:, None], s, 0.0)
    return s if row_runs is not None else s[grouping.inverse]
