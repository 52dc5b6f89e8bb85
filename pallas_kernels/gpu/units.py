"""Work units of the GPU LoRA kernels: one unit per (group, chunk of up to UNIT_ROWS rows of the group).

Rows are sorted by group (grouping.py), so a group's rows are one contiguous run of sorted positions. A unit
covers rows [row0, row0 + size) of that run and the page of its (slot, expert): A arena rows [page_row,
page_row + R) and B arena rows [b_page_row, b_page_row + R) (the same rows unless B's pages are placed
elsewhere, as the disaggregated LoRA server's placement may do). The kernels read a window of TILE_ROWS (the
wgmma M of one warpgroup) rows starting at row0 rounded down to a multiple of 8 (Mosaic GPU's TMA into tiled
SMEM needs 8-row aligned offsets), moved back to end at the buffer's last row where it would run past it: the
unit's rows sit at window offset row0 % 8 (or further in, at the end). A group's first unit starts at
the group and takes up to TILE_ROWS - row0 % 8 rows; its later units start at window boundaries (aligned) and take
up to TILE_ROWS. So a group of n rows starting at offset o has ceil((o + n) / TILE_ROWS) units, each page being
read once per unit (fixed 56-row chunks read a 64-row group's page twice, and more often for long groups).
Groups with no work (slot 0, a rank-0 target) get no unit, so they cost nothing. The number of units is
data-dependent; arrays have the static bound (rows + 7 * groups) // TILE_ROWS + groups (the sum over groups of
ceil((o + n) / 64) with o <= 7), and the kernels skip units past `count`.

Per-row units (`per_row_units`, the BGMV-like decode variant): one unit per row, over the rows in their own
order, so nothing is sorted and nothing is gathered: no group facts, no gather of x, no gather of the delta
back. Each unit reads its row's whole page (a page shared by k rows is read k times, from L2 after the first)
and a 64-row window of x for one row: at decode, where most pages serve one or two rows, that trades a little
bandwidth for the dozen small glue kernels grouping costs. Rows with no work get size 0 and are skipped.

Rank buckets: a unit whose page holds fewer rank rows than the arena's page width can read fewer. With static
`buckets` (ascending widths, each a multiple of 16 dividing the widest), `bucket` is the narrowest that holds
the unit's rank rows, and the kernels have one static-shaped path per bucket: a rank-16 adapter in a rank-64
pool then moves 16 rows of A and B per page instead of 64.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.grouping import Grouping
from pallas_kernels.layout import PageTable
from pallas_kernels.tpu.schedule import _expand_items as expand_items

TILE_ROWS = 64  # wgmma M of one warpgroup: rows of the window a unit reads
ALIGN = 8  # row alignment of a window start
UNIT_ROWS = TILE_ROWS  # most rows of one unit (a unit at window offset o has at most TILE_ROWS - o)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Units:
    row0: jax.Array  # [U] int32 first sorted row of the unit (0 for unused units)
    size: jax.Array  # [U] int32 rows of the unit, 1..UNIT_ROWS (0 for unused units)
    page_row: jax.Array  # [U] int32 first A arena row of the unit's page
    b_page_row: jax.Array  # [U] int32 first B arena row of the unit's page
    count: jax.Array  # [1] int32 units in use (entries [0, count)); stacked (stack_units): [targets]
    row_rank: jax.Array  # [M] int32 per SORTED row: rank rows of its page that hold data (0: no work)
    bucket: jax.Array  # [U] int32 index into the kernels' static rank buckets (0 with a single bucket)

    @property
    def bound(self) -> int:
        return self.row0.shape[0]


def stack_units(units: tuple[Units, ...]) -> tuple[int, Units]:
    """(units per target, the targets' units end to end) for one launch over several targets: target t's units
    are entries [t * per, t * per + count[t]). Targets sharing a grouping have the same bound."""
    per = units[0].bound
    if any(u.bound != per for u in units):
        raise ValueError(f"targets of one launch need the same unit bound, got {[u.bound for u in units]}")
    if len(units) == 1:
        return per, units[0]
    return per, jax.tree.map(lambda *fields: jnp.concatenate(fields), *units)


def unit_of_target(u, t: int, per: int, count_ref, size_ref):
    """In a kernel: whether grid unit u is a unit in use of target t (stack_units' arrangement) with rows to do
    (per-row units of rows with no work have size 0)."""
    return (u >= t * per) & (u < t * per + count_ref[t]) & (size_ref[u] > 0)


def window(row0, page_row, rows: int):
    """In a kernel: (window start, the unit's offset in it, page row), with the divisibility Mosaic GPU needs.
    `rows`: the static row count of the buffer windows are read from (common.padded_rows: a multiple of 8, at
    least TILE_ROWS). A window starts at row0 rounded down to 8, or TILE_ROWS before the buffer's end where
    that would run past it: the unit's rows, which end within both, stay inside, so no slack rows are needed."""
    if rows % ALIGN or rows < TILE_ROWS:
        raise ValueError(f"windows of {TILE_ROWS} rows need a buffer of at least {TILE_ROWS} rows, a multiple of "
                         f"{ALIGN}; got {rows}")
    base = jnp.minimum(row0 - row0 % ALIGN, rows - TILE_ROWS)
    return pl.multiple_of(base, ALIGN), row0 - base, pl.multiple_of(page_row, ALIGN)


def pages_of_keys(keys, live, table: PageTable, num_experts: int, b_table: PageTable | None):
    """Per key (slot * num_experts + expert): the rank blocks of its page (0 where not `live`), and the first A
    and B arena rows of that page."""
    slot = jnp.clip(keys // num_experts, 0, table.num_slots - 1)
    expert = keys % num_experts
    nb = jnp.where(live, table.nblocks[slot], 0)
    page_row = (table.start[slot] + expert * table.stride[slot]) * table.rank_block
    b_page_row = page_row
    if b_table is not None:
        b_page_row = (b_table.start[slot] + expert * b_table.stride[slot]) * table.rank_block
    return nb, page_row, b_page_row


def bucket_of(nb, table: PageTable, buckets: tuple[int, ...] | None):
    """The narrowest of the kernels' rank widths (`buckets`; None: the page width alone) holding nb rank blocks."""
    widths = jnp.asarray(buckets or (table.max_blocks * table.rank_block,), jnp.int32)
    return jnp.minimum(jnp.sum(widths[None, :] < (nb * table.rank_block)[:, None], axis=1), widths.shape[0] - 1)


def per_row_units(keys: jax.Array, active: jax.Array, table: PageTable, *, num_experts: int,
                  b_table: PageTable | None = None, buckets: tuple[int, ...] | None = None) -> Units:
    """One unit per row (row order kept: x needs no sorting); keys and active as grouping.group_rows takes
    them. Units of rows with no work (inactive, or a rank-0 page) have size 0; the kernels skip them."""
    m = keys.shape[0]
    nb, page_row, b_page_row = pages_of_keys(keys, active, table, num_experts, b_table)
    bucket = bucket_of(nb, table, buckets)
    work = nb > 0
    return Units(row0=jnp.arange(m, dtype=jnp.int32), size=work.astype(jnp.int32),
                 page_row=jnp.where(work, page_row, 0).astype(jnp.int32),
                 b_page_row=jnp.where(work, b_page_row, 0).astype(jnp.int32),
                 count=jnp.full((1,), m, jnp.int32), row_rank=(nb * table.rank_block).astype(jnp.int32),
                 bucket=jnp.where(work, bucket, 0).astype(jnp.int32))


def rank_buckets(width: int, enabled: bool) -> tuple[int, ...]:
    """The static rank widths the kernels read pages at: every multiple of 16 that divides `width` and is a
    power of two times 16, then `width` itself (only `width` when not enabled)."""
    if not enabled:
        return (width,)
    return tuple(b for b in (16, 32, 64, 128) if b < width and width % b == 0) + (width,)


def build_units(grouping: Grouping, table: PageTable, *, num_experts: int, b_table: PageTable | None = None,
                buckets: tuple[int, ...] | None = None) -> Units:
    """Units for one target. Keys of the grouping are slot * num_experts + expert. b_table: where B's pages start
    when not at A's rows (it must share A's rank block, strides and block counts). buckets: the kernels' rank
    widths (rank_buckets; None: the page width alone)."""
    m = grouping.order.shape[0]
    num_groups = grouping.group_key.shape[0]
    live = jnp.arange(num_groups) < grouping.num_groups
    nb, page_row, b_page_row = pages_of_keys(grouping.group_key, live, table, num_experts, b_table)
    size = jnp.where(nb > 0, grouping.group_size, 0)
    start = jnp.minimum(grouping.group_start, m)  # m for unused entries
    base = start - start % ALIGN  # the first unit's window; later units start at its window boundaries
    end = start + size
    chunks = jnp.where(size > 0, (end - base + TILE_ROWS - 1) // TILE_ROWS, 0)
    # sum of ceil((o + n) / 64) <= sum((n + 7) / 64 + 1) over groups
    bound = (m + (ALIGN - 1) * num_groups) // TILE_ROWS + num_groups
    ug, uw, ok, count = expand_items(chunks.astype(jnp.int32), bound)
    row0 = jnp.where(uw == 0, start[ug], base[ug] + uw * TILE_ROWS)
    unit_size = jnp.minimum(end[ug], base[ug] + (uw + 1) * TILE_ROWS) - row0
    # rank rows with data, per sorted row (inactive rows sort last and have group -1)
    sorted_group = grouping.row_group[grouping.order]
    row_rank = jnp.where(sorted_group >= 0, nb[jnp.maximum(sorted_group, 0)], 0) * table.rank_block
    bucket = bucket_of(nb[ug], table, buckets)  # a unit has rows only if its page has some
    return Units(row0=jnp.where(ok, row0, 0).astype(jnp.int32),
                 size=jnp.where(ok, unit_size, 0).astype(jnp.int32),
                 page_row=jnp.where(ok, page_row[ug], 0).astype(jnp.int32),
                 b_page_row=jnp.where(ok, b_page_row[ug], 0).astype(jnp.int32),
                 count=jnp.reshape(count, (1,)).astype(jnp.int32), row_rank=row_rank.astype(jnp.int32),
                 bucket=jnp.where(ok, bucket, 0).astype(jnp.int32))
