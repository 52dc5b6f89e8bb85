"""LoRA expand on TPU (Mosaic): y_i += s @ B_i[page] in float32, rounded once, in place, for one or several
outputs in one launch (fused q/k/v, fused gate/up).

    s^T    [sum R_i, Mp] f32   shrink output (tokens on lanes)
    B_i    [P_i, N_i]          B arena of target i (rank rows, scaling folded in)
    y_i    [Mp, N_i]           base output of target i, aliased to the result (any float dtype; float32 zeros
                               give the plain delta)

Grid: (column tiles of all outputs, work items of the tile's target). Column tiles of target i sit in one
contiguous range; within a column tile, the items of target i (schedule.py) run in token-tile order and each
adds the contribution of one rank block of one group: rows outside the group are masked on the s side, so the
float32 accumulator of a token tile collects every group's delta and is added to y once, at the tile's last
item. Token tiles with no work are never visited and keep y (input_output_aliases), so slot-0 rows cost
nothing and stay bit-identical. Operands of the targets that are idle in a column tile hold their block index
(no refetch, no write-back of unwritten blocks).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.tpu.common import check_packing, vmem_limit
from pallas_kernels.tpu.schedule import Schedule

TN_DIMS = (((0,), (0,)), ((), ()))  # [r, m] x [r, n] -> [m, n]


def expand_dot(s: jax.Array, b: jax.Array) -> jax.Array:
    """s^T @ b, [rb, tm] f32 x [rb, tn] -> [tm, tn] f32, close to a float32 product of the f32 s and b.

    bf16 b: s is split into bf16 high and low parts, two native one-pass MXU products (s is then carried to
    ~16 mantissa bits, ~2e-6 relative error on the delta; a float32 HIGHEST product would take 6 passes, which at these
    shapes costs more MXU time than the B block takes to load). Other dtypes: float32 at HIGHEST precision.
    """
    if b.dtype == jnp.bfloat16:
        hi = s.astype(jnp.bfloat16)
        lo = (s - hi.astype(jnp.float32)).astype(jnp.bfloat16)
        dot = lambda v: jax.lax.dot_general(v, b, TN_DIMS, preferred_element_type=jnp.float32)
        return dot(hi) + dot(lo)
    return jax.lax.dot_general(s, b.astype(jnp.float32), TN_DIMS, precision=jax.lax.Precision.HIGHEST,
                               preferred_element_type=jnp.float32)


def pick_column_tile(n: int, target: int) -> int:
    """Largest multiple of 128 <= target dividing n; n itself when none does (a full-width block is legal)."""
    best = 0
    for tn in range(128, min(n, target) + 1, 128):
        if n % tn == 0:
            best = tn
    return best or n


@dataclasses.dataclass(frozen=True)
class ExpandGrid:
    """Index maps of the expand grid (column tile j, item t); scalar-prefetch refs follow the grid indices
    in the order (count, tile, group, row, first, last, block). An operand of target i is active in target i's
    column tiles; before them it holds its first block, after them its last one, and past target i's item
    count it holds its last item's block: idle steps never change a block index."""

    ntiles: tuple[int, ...]  # column tiles of each target
    items: int  # Ie, the stride of the per-target item lists

    @property
    def starts(self) -> tuple[int, ...]:
        return tuple(sum(self.ntiles[:i]) for i in range(len(self.ntiles)))

    def seg_of(self, j):
        s = jnp.int32(0)
        for start in self.starts[1:]:
            s = s + (jnp.asarray(j) >= start).astype(jnp.int32)
        return s

    def _item(self, i, t, count):
        """Index into target i's item list at step t, clamped to its last item."""
        return i * self.items + jnp.clip(t, 0, jnp.maximum(count[i] - 1, 0))

    def lane_map(self, j, t, count, tile, *_):
        s = self.seg_of(j)
        return 0, tile[s * self.items + jnp.clip(t, 0, jnp.maximum(count[s] - 1, 0))]

    def _held(self, i, j, t, count, table):
        """(value of target i's table at this step, column tile of target i), held outside its range."""
        s = self.seg_of(j)
        here, before = table[self._item(i, t, count)], table[i * self.items]
        after = table[self._item(i, count[i], count)]
        value = jnp.where(s == i, here, jnp.where(s < i, before, after))
        col = jnp.where(s == i, j - self.starts[i], jnp.where(s < i, 0, self.ntiles[i] - 1))
        return value, col

    def b_map(self, i):
        return lambda j, t, count, tile, group, row, first, last, block: self._held(i, j, t, count, block)

    def y_map(self, i):
        return lambda j, t, count, tile, *_: self._held(i, j, t, count, tile)


def expand_vmem_bytes(tm: int, tns, rows: int, rank_block: int, y_dtypes, b_dtypes) -> int:
    """Double-buffered s^T block, row groups, per target B block and y in/out blocks, plus the accumulators."""
    total = 2 * (rows * tm * 4 + 8 * tm * 4)
    for tn, yd, bd in zip(tns, y_dtypes, b_dtypes):
        total += 2 * (rank_block * tn * jnp.dtype(bd).itemsize + 2 * tm * tn * jnp.dtype(yd).itemsize)
        total += tm * tn * 4
    return total


@functools.partial(jax.jit, static_argnames=("col_tile", "interpret"))
def expand(s_t: jax.Array, b_rows: tuple[jax.Array, ...], ys: tuple[jax.Array, ...], sched: Schedule, *,
           col_tile: int = 512, interpret=False) -> tuple[jax.Array, ...]:
    """ys[i] + s @ B_i for every row with work, computed in float32 and rounded once to ys[i].dtype.

    Args:
      s_t: [sum R_i, Mp] float32 from `shrink` with the same schedule.
      b_rows: per fused target, its B arena [P_i, N_i].
      ys: per fused target, [Mp, N_i]; aliased to the outputs (in place when the caller donates them).
      sched: the work list.
      col_tile: target width of an output column tile (see pick_column_tile).
      interpret: False on TPU; True or a `pltpu.InterpretParams` to run on CPU.
    """
    nseg = len(b_rows)
    rb, tm, items = sched.rank_block, sched.tm, sched.items_expand
    rows, mp = s_t.shape
    if len(ys) != nseg or len(sched.seg_ranks) != nseg or rows != sum(sched.seg_ranks) or mp != sched.num_rows:
        raise ValueError(f"expand: {nseg} B arenas, {len(ys)} outputs, s^T {s_t.shape} for a schedule of "
                         f"targets with ranks {sched.seg_ranks} over {sched.num_rows} rows")
    for i, (b, y) in enumerate(zip(b_rows, ys)):
        if b.ndim != 2 or b.shape[0] % rb or y.shape != (mp, b.shape[1]):
            raise ValueError(f"target {i}: B arena {b.shape} must be [P, N] with P a multiple of {rb}, "
                             f"and y {y.shape} must be [{mp}, N]")
    check_packing(rb, interpret, *b_rows)
    tns = tuple(pick_column_tile(y.shape[1], col_tile) for y in ys)
    ntiles = tuple(y.shape[1] // tn for y, tn in zip(ys, tns))
    grid_maps = ExpandGrid(ntiles=ntiles, items=items)
    seg_of = grid_maps.seg_of

    def kernel(count_ref, tile_ref, group_ref, row_ref, first_ref, last_ref, block_ref, s_ref, rg_ref, *refs):
        b_refs, y_refs = refs[:nseg], refs[nseg:2 * nseg]
        o_refs, acc_refs = refs[2 * nseg:3 * nseg], refs[3 * nseg:]
        del tile_ref, block_ref
        j, t = pl.program_id(0), pl.program_id(1)
        s = seg_of(j)
        for i in range(nseg):
            @pl.when(s == i)
            def _target(i=i):
                count = count_ref[i]
                k = i * items + t

                @pl.when(t < count)
                def _item():
                    @pl.when(first_ref[k] == 1)
                    def _zero():
                        acc_refs[i][...] = jnp.zeros_like(acc_refs[i])

                    r0 = pl.multiple_of(row_ref[k], rb)
                    mine = jnp.broadcast_to(rg_ref[...], (rb, tm)) == group_ref[k]
                    part = jnp.where(mine, s_ref[pl.ds(r0, rb), :], 0.0)  # [rb, tm]
                    acc_refs[i][...] += expand_dot(part, b_refs[i][...])

                    @pl.when(last_ref[k] == 1)
                    def _store():
                        o_refs[i][...] = (y_refs[i][...].astype(jnp.float32) + acc_refs[i][...]).astype(
                            o_refs[i].dtype)

                @pl.when((count == 0) & (t == 0))
                def _pass_through():  # this target has no work: its column tile passes through unchanged
                    o_refs[i][...] = y_refs[i][...]

    lane_map = grid_maps.lane_map
    in_specs = [pl.BlockSpec((rows, tm), lane_map), pl.BlockSpec((1, tm), lane_map)]
    in_specs += [pl.BlockSpec((rb, tns[i]), grid_maps.b_map(i)) for i in range(nseg)]
    in_specs += [pl.BlockSpec((tm, tns[i]), grid_maps.y_map(i)) for i in range(nseg)]
    out_specs = [pl.BlockSpec((tm, tns[i]), grid_maps.y_map(i)) for i in range(nseg)]
    num_prefetch = 7
    aliases = {num_prefetch + 2 + nseg + i: i for i in range(nseg)}
    grid = (sum(ntiles), jnp.max(sched.ex_count))
    vmem = expand_vmem_bytes(tm, tns, rows, rb, [y.dtype for y in ys], [b.dtype for b in b_rows])
    out_bytes = sum(y.size * y.dtype.itemsize for y in ys)
    cost = pl.CostEstimate(flops=sum(2 * mp * r * y.shape[1] for r, y in zip(sched.seg_ranks, ys)),
                           transcendentals=0,
                           bytes_accessed=2 * out_bytes + s_t.size * 4 * sum(ntiles)
                           + sum(min(b.size, r * mp // tm * b.shape[1]) * b.dtype.itemsize
                                 for r, b in zip(sched.seg_ranks, b_rows)))
    call = pl.pallas_call(
        kernel,
        out_shape=tuple(jax.ShapeDtypeStruct(y.shape, y.dtype) for y in ys),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=num_prefetch, grid=grid, in_specs=in_specs, out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32) for tn in tns]),
        input_output_aliases=aliases,
        compiler_params=pltpu.CompilerParams(
            # Column tiles are independent for a single target; with several, idle targets hold blocks across
            # column tiles, so the axis must run in order on one core.
            dimension_semantics=("parallel" if nseg == 1 else "arbitrary", "arbitrary"),
            vmem_limit_bytes=vmem_limit(vmem)),
        cost_estimate=cost, interpret=interpret, name="lora_expand")
    return tuple(call(sched.ex_count, sched.ex_tile, sched.ex_group, sched.ex_row, sched.ex_first, sched.ex_last,
                      sched.ex_block, s_t, sched.row_group, *b_rows, *ys))
