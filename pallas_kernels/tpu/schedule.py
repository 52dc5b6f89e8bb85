"""Work lists for the TPU shrink/expand kernels, built from a row grouping (pure JAX, fixed shapes).

Kernel rows are cut into token tiles of `tm` rows. A *visit* is one (group, token tile) pair the group has rows
in; groups with no work (slot 0, rank 0 in every target) get no visit, so they cost nothing. A *work item* is
one rank block of one target of one visit: the kernels' grid runs over work items only, so a rank-8 adapter
costs one item per visit where a rank-64 one costs eight (with rank blocks of 8).

Two row orders:
  * sorted (prefill, SGMV-like): rows sorted by group, tiles of `tm` rows; consecutive groups share at most one
    tile, so there are at most tiles + groups - 1 visits.
  * unsorted (decode, BGMV-like): rows stay where they are and form ONE tile; every group visits it once. No
    row is moved; the kernels mask rows by group id.

Index maps must not make the pipeline fetch a block it will not use. For a fused launch (several targets), an
operand of target i that is idle at an item keeps the block index of its previous item of target i (or its
first one, before it starts): `held` below. All arrays are 1-D int32 (scalar prefetch lives in SMEM).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.grouping import Grouping
from pallas_kernels.layout import PageTable


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
    row_group: jax.Array  # [1, Mp] int32 group of each kernel row (-1: none)
    # shrink: one item per (visit, target, rank block), in that order
    sh_tile: jax.Array  # [Is] token tile of the item
    sh_group: jax.Array  # [Is] group of the item
    sh_row: jax.Array  # [Is] first row of the item's rank block in s^T (target offset included)
    sh_seg: jax.Array  # [Is] target of the item
    sh_first: jax.Array  # [Is] 1 if the item is the first of its tile
    sh_block: jax.Array  # [T*Is] A rank block target i reads at item t: sh_block[i*Is + t] (held when idle)
    sh_count: jax.Array  # [] items in use
    # expand: per target i, one item per (visit, rank block); entries [i*Ie, i*Ie + ex_count[i])
    ex_tile: jax.Array  # [T*Ie]
    ex_group: jax.Array  # [T*Ie]
    ex_row: jax.Array  # [T*Ie] first row of the rank block in s^T (target offset included)
    ex_first: jax.Array  # [T*Ie] 1: first item of its token tile (zero the accumulator)
    ex_last: jax.Array  # [T*Ie] 1: last item of its token tile (write the output tile)
    ex_block: jax.Array  # [T*Ie] B rank block of the item
    ex_count: jax.Array  # [T] items in use per target
    tm: int = dataclasses.field(metadata=dict(static=True))  # token tile rows
    items_shrink: int = dataclasses.field(metadata=dict(static=True))  # Is
    items_expand: int = dataclasses.field(metadata=dict(static=True))  # Ie
    rank_block: int = dataclasses.field(metadata=dict(static=True))  # rows per rank block
    seg_ranks: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))  # s^T rows of each target

    @property
    def num_rows(self) -> int:
        return self.row_group.shape[1]


def seg_offsets(seg_ranks: tuple[int, ...]) -> tuple[int, ...]:
    """Row offset of each target's rank rows in the shrink output s^T [sum(seg_ranks), Mp]."""
    out, acc = [], 0
    for r in seg_ranks:
        out.append(acc)
        acc += r
    return tuple(out)


def _held(real: jax.Array, mine: jax.Array) -> jax.Array:
    """real where `mine`; elsewhere the value at the previous `mine` position, or the first one before it."""
    n = real.shape[0]
    idx = jnp.arange(n, dtype=jnp.int32)
    last = jax.lax.cummax(jnp.where(mine, idx, -1))
    first = jnp.argmax(mine).astype(jnp.int32)  # 0 when nothing is mine: any in-range block will do
    return real[jnp.where(last >= 0, last, first)]


COMPARE_ALL_MAX = 1 << 16  # elements of the [items, entries] comparison _expand_items may build


def _expand_items(n, num_items: int):
    """Item t of a list where entry v repeats n[v] times: (entry, index within entry, valid, count)."""
    cum = jnp.cumsum(n)
    t = jnp.arange(num_items, dtype=jnp.int32)
    # searchsorted's default is a while loop of binary-search steps (on GPU several small kernels per step);
    # small lists compare all pairs in one fusion, larger ones unroll the steps
    method = "compare_all" if num_items * n.shape[0] <= COMPARE_ALL_MAX else "scan_unrolled"
    v = jnp.minimum(jnp.searchsorted(cum, t, side="right", method=method), n.shape[0] - 1).astype(jnp.int32)
    w = t - (cum[v] - n[v])
    count = cum[-1].astype(jnp.int32)
    return v, w, t < count, count


def build_schedule(grouping: Grouping, row_group: jax.Array, tables: tuple[PageTable, ...], *, num_experts: int,
                   tm: int, num_rows: int, sorted_rows: bool, arena_blocks: tuple[int, ...]) -> Schedule:
    """Work lists for one launch.

    Args:
      grouping: groups of the rows (keys = slot * num_experts + expert).
      row_group: [Mp] int32 group of each kernel row (-1 none): grouping.row_group (unsorted) or the sorted
        group ids padded with -1 (sorted).
      tables: one PageTable per fused target; all share the rank block.
      tm: token tile rows (== num_rows for unsorted rows).
      num_rows: Mp, rows the kernels see (a multiple of tm).
      sorted_rows: rows sorted by group (prefill) or in their own order (decode, one tile).
      arena_blocks: rank blocks in each target's arenas; block indices are clamped into them, so a bad page
        table can give wrong numbers but never an out-of-bounds DMA.
    """
    rb = tables[0].rank_block
    if any(t.rank_block != rb for t in tables):
        raise ValueError(f"fused targets must share the rank block, got {[t.rank_block for t in tables]}")
    if num_rows % tm or (not sorted_rows and tm != num_rows):
        raise ValueError(f"{num_rows=} must be a multiple of {tm=} (equal to it for unsorted rows)")
    num_groups = grouping.group_key.shape[0]
    g_live = jnp.arange(num_groups) < grouping.num_groups
    slot = jnp.minimum(grouping.group_key // num_experts, tables[0].num_slots - 1)
    expert = grouping.group_key % num_experts
    # per target: rank blocks of each group's page and the page's first block
    nb = [jnp.where(g_live, t.nblocks[slot], 0) for t in tables]
    base = [t.start[slot] + expert * t.stride[slot] for t in tables]
    has_work = sum(n > 0 for n in nb) > 0

    if sorted_rows:
        tiles = num_rows // tm
        size = jnp.where(has_work, grouping.group_size, 0)
        first_tile = grouping.group_start // tm
        visits_per_group = jnp.where(size > 0, (grouping.group_start + size - 1) // tm - first_tile + 1, 0)
        max_visits = tiles + num_groups - 1
    else:
        first_tile = jnp.zeros((num_groups,), jnp.int32)
        visits_per_group = has_work.astype(jnp.int32)
        max_visits = num_groups
    vg, vw, v_ok, _ = _expand_items(visits_per_group.astype(jnp.int32), max_visits)
    v_tile = jnp.where(v_ok, first_tile[vg] + vw, 0).astype(jnp.int32)
    v_nb = [jnp.where(v_ok, n[vg], 0) for n in nb]  # [V] rank blocks per target per visit

    seg_ranks = tuple(t.max_blocks * rb for t in tables)
    offs = seg_offsets(seg_ranks)

    # shrink: items (visit, target, block)
    per_visit = sum(v_nb)
    items_s = max_visits * sum(t.max_blocks for t in tables)
    sv, sw, s_ok, s_count = _expand_items(per_visit, items_s)
    pre = [jnp.zeros_like(per_visit)]
    for n in v_nb[:-1]:
        pre.append(pre[-1] + n)
    seg = sum((sw >= p[sv]).astype(jnp.int32) for p in pre[1:]) if len(pre) > 1 else jnp.zeros_like(sw)
    pre_all = jnp.stack(pre)  # [T, V]
    chunk = sw - pre_all[seg, sv]
    g_of = vg[sv]
    s_tile = jnp.where(s_ok, v_tile[sv], 0)
    s_row = jnp.where(s_ok, jnp.asarray(offs, jnp.int32)[seg] + chunk * rb, 0)
    s_first = jnp.concatenate([jnp.ones((1,), bool), s_tile[1:] != s_tile[:-1]])
    clamp = lambda b, i: jnp.clip(b, 0, arena_blocks[i] - 1)
    s_block = jnp.concatenate([clamp(_held(base[i][g_of] + chunk, s_ok & (seg == i)), i)
                               for i in range(len(tables))])

    # expand: per target, items (visit, block)
    items_e = max_visits * max(t.max_blocks for t in tables)
    ex = {k: [] for k in ("tile", "group", "row", "first", "last", "block")}
    counts = []
    for i in range(len(tables)):
        ev, ew, e_ok, e_count = _expand_items(v_nb[i], items_e)
        tile = jnp.where(e_ok, v_tile[ev], 0)
        nxt_same = jnp.concatenate([tile[1:] == tile[:-1], jnp.zeros((1,), bool)])
        ex["tile"].append(tile)
        ex["group"].append(jnp.where(e_ok, vg[ev], -2))
        ex["row"].append(jnp.where(e_ok, offs[i] + ew * rb, offs[i]))
        ex["first"].append(jnp.concatenate([jnp.ones((1,), bool), tile[1:] != tile[:-1]]))
        ex["last"].append(~nxt_same | (jnp.arange(items_e) == e_count - 1))
        ex["block"].append(clamp(jnp.where(e_ok, base[i][vg[ev]] + ew, 0), i))
        counts.append(e_count)
    cat = lambda xs: jnp.concatenate(xs).astype(jnp.int32)
    return Schedule(
        row_group=row_group.reshape(1, -1).astype(jnp.int32),
        sh_tile=s_tile.astype(jnp.int32), sh_group=jnp.where(s_ok, g_of, -2).astype(jnp.int32),
        sh_row=s_row.astype(jnp.int32), sh_seg=seg.astype(jnp.int32), sh_first=s_first.astype(jnp.int32),
        sh_block=s_block.astype(jnp.int32), sh_count=s_count,
        ex_tile=cat(ex["tile"]), ex_group=cat(ex["group"]), ex_row=cat(ex["row"]), ex_first=cat(ex["first"]),
        ex_last=cat(ex["last"]), ex_block=cat(ex["block"]), ex_count=jnp.stack(counts).astype(jnp.int32),
        tm=tm, items_shrink=items_s, items_expand=items_e, rank_block=rb, seg_ranks=seg_ranks)
