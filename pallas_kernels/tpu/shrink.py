"""LoRA shrink on TPU (Mosaic): s^T = (x @ A[page])^T per work item, for one or several targets at once.

    x      [Mp, D_in]          kernel rows (sorted by group for prefill, as they come for decode)
    A_i    [P_i, D_in]         A arena of target i (rank rows, layout.py)
    s^T    [sum R_i, Mp] f32   rank rows of every target (target i at rows off_i .. off_i + R_i), tokens on lanes

The output is transposed (tokens on the 128-wide lane axis, rank on sublanes) so that a rank block of 8 or 16 rows
is a legal TPU block and a dynamic, sublane-aligned slice: an adapter then reads and multiplies only its own rank
blocks of A (16 rows for a rank-16 bf16 adapter), not max_rank rows. Grid: one step per work item (schedule.py), a
dynamic length: slot-0 rows and rank-0 targets produce no step at all. Per step, one [rb, D_in] block of A and (when
the tile changes) the [tm, D_in] token tile are fetched; the full D_in stays in VMEM (no K tiling), which bounds tm
for wide inputs (block_tables.py). Lanes (tokens) of other groups are left as they were, so a tile shared by two
groups is filled by consecutive items; lanes of no group hold zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.tpu.common import check_packing, precision, vmem_limit
from pallas_kernels.tpu.schedule import Schedule

NT_DIMS = (((1,), (1,)), ((), ()))  # [r, K] x [m, K] -> [r, m]


def shrink_vmem_bytes(tm: int, d_in: int, rows: int, rank_block: int, x_dtype, a_dtype) -> int:
    """VMEM the pipeline needs: double-buffered x tile, A block, row groups and output block."""
    x_b = jnp.dtype(x_dtype).itemsize
    a_b = jnp.dtype(a_dtype).itemsize
    return 2 * (tm * d_in * x_b + rank_block * d_in * a_b + 8 * tm * 4 + rows * tm * 4)


@functools.partial(jax.jit, static_argnames=("interpret",))
def shrink(x: jax.Array, a_rows: tuple[jax.Array, ...], sched: Schedule, *, interpret=False) -> jax.Array:
    """s^T [sum R_i, Mp] float32: for every work item, the rank block of x_tile @ A_i[page].

    Args:
      x: [Mp, D_in] kernel rows.
      a_rows: per fused target, its A arena [P_i, D_in]; P_i a multiple of the rank block.
      sched: work list (schedule.build_schedule) for these rows and targets.
      interpret: False on TPU; True or a `pltpu.InterpretParams` to run on CPU.

    Rows of s^T beyond a group's rank, and lanes of rows in no group, are zero or stale: the expand kernel
    never reads them.
    """
    mp, d_in = x.shape
    tm = sched.tm
    nseg = len(a_rows)
    rb = sched.rank_block
    rows = sum(sched.seg_ranks)
    if len(sched.seg_ranks) != nseg:
        raise ValueError(f"{nseg} A arenas for a schedule of {len(sched.seg_ranks)} targets")
    for i, a in enumerate(a_rows):
        if a.ndim != 2 or a.shape[1] != d_in or a.shape[0] % rb:
            raise ValueError(f"A arena {i}: shape {a.shape} must be [P, {d_in}] with P a multiple of {rb}")
    if mp != sched.num_rows or mp % tm:
        raise ValueError(f"x rows {mp} must equal the schedule's rows {sched.num_rows} (a multiple of {tm=})")
    check_packing(rb, interpret, x, *a_rows)
    dtype = jnp.promote_types(x.dtype, a_rows[0].dtype)
    items = sched.items_shrink

    def kernel(tile_ref, group_ref, row_ref, seg_ref, first_ref, block_ref, x_ref, rg_ref, *refs):
        a_refs, o_ref = refs[:nseg], refs[nseg]
        del tile_ref, block_ref
        t = pl.program_id(0)

        @pl.when(first_ref[t] == 1)
        def _zero():
            o_ref[...] = jnp.zeros_like(o_ref)

        # lanes of this item's group; the int32 row is broadcast over sublanes before the compare
        mine = jnp.broadcast_to(rg_ref[...], (rb, tm)) == group_ref[t]  # [rb, tm]
        r0 = pl.multiple_of(row_ref[t], rb)
        for i, a_ref in enumerate(a_refs):
            @pl.when(seg_ref[t] == i)
            def _item(a_ref=a_ref):
                part = jax.lax.dot_general(a_ref[...].astype(dtype), x_ref[...].astype(dtype), NT_DIMS,
                                           precision=precision(dtype), preferred_element_type=jnp.float32)
                cur = o_ref[pl.ds(r0, rb), :]
                o_ref[pl.ds(r0, rb), :] = jnp.where(mine, part, cur)

    def a_map(i):
        return lambda t, tile, group, row, seg, first, block: (block[i * items + t], 0)

    tile_map = lambda t, tile, *_: (tile[t], 0)
    lane_map = lambda t, tile, *_: (0, tile[t])
    in_specs = [pl.BlockSpec((tm, d_in), tile_map), pl.BlockSpec((1, tm), lane_map)]
    in_specs += [pl.BlockSpec((rb, d_in), a_map(i)) for i in range(nseg)]
    vmem = shrink_vmem_bytes(tm, d_in, rows, rb, x.dtype, a_rows[0].dtype)
    cost = pl.CostEstimate(flops=2 * mp * d_in * rows, transcendentals=0,
                           bytes_accessed=x.size * x.dtype.itemsize + rows * mp * 4
                           + sum(min(a.shape[0], rows * mp // max(tm, 1)) * d_in * a.dtype.itemsize
                                 for a in a_rows))
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows, mp), jnp.float32),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6, grid=(sched.sh_count,), in_specs=in_specs,
            out_specs=pl.BlockSpec((rows, tm), lane_map)),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",),
                                             vmem_limit_bytes=vmem_limit(vmem)),
        cost_estimate=cost, interpret=interpret, name="lora_shrink")
    return call(sched.sh_tile, sched.sh_group, sched.sh_row, sched.sh_seg, sched.sh_first, sched.sh_block,
                x, sched.row_group, *a_rows)
