"""Multi-LoRA on TPU: group rows, build the work lists, shrink, expand; decode and prefill variants.

    decode  (BGMV-like, few rows per adapter): rows stay in place and form one token tile; every distinct
            (slot, expert) page is fetched once and applied to the rows of its group through a lane mask.
            Nothing is permuted, so the only extra traffic is the page reads themselves.
    prefill (SGMV-like, long segments per adapter): rows are sorted by (slot, expert) (one gather of x and y),
            cut into token tiles, and each group visits only the tiles it has rows in.
Both run the same two kernels (shrink.py, expand.py); only the work lists differ (schedule.py). The variant
is picked from the static row count (`Blocks.decode_rows`, per device in block_tables.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.grouping import group_rows
from pallas_kernels.layout import PageTable
from pallas_kernels.tpu.expand import expand
from pallas_kernels.tpu.schedule import build_schedule
from pallas_kernels.tpu.shrink import shrink


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Static tiling of one launch."""

    token_tile: int = 128  # prefill token tile (tokens are the lane axis of s^T: a multiple of 128)
    col_tile: int = 512  # prefill: target width of an output column tile (a multiple of 128)
    decode_col_tile: int = 2048  # decode: wider, since each column tile walks every work item again
    rank_block: int = 16  # rows per rank block (a multiple of 8; 16 fills a bf16 sublane tile)
    decode_rows: int = 128  # up to this many rows: the decode variant (one unsorted token tile)

    def __post_init__(self):
        if (self.token_tile % 128 or self.col_tile % 128 or self.decode_col_tile % 128 or self.rank_block % 8
                or self.decode_rows < 1):
            raise ValueError(f"bad blocks {self}: token_tile and the column tiles must be multiples of 128, "
                             "rank_block a multiple of 8, decode_rows positive")


def use_decode(rows: int, blocks: Blocks) -> bool:
    return rows <= blocks.decode_rows


SMEM_BUDGET = 256 * 1024  # bytes of scalar-prefetch work lists per launch (SMEM is 1 MiB from v4 on)


def metadata_bytes(rows: int, tm: int, num_keys: int, tables: tuple[PageTable, ...], sorted_rows: bool) -> int:
    """SMEM the work lists of one launch take (schedule.py): static, from the bounds, not the data."""
    groups = min(rows, num_keys)
    visits = -(-rows // tm) + groups - 1 if sorted_rows else groups
    blocks = [t.max_blocks for t in tables]
    items_s, items_e = visits * sum(blocks), visits * max(blocks)
    return 4 * ((5 + len(tables)) * items_s + 6 * len(tables) * items_e + len(tables))


@functools.partial(jax.jit, static_argnames=("num_experts", "blocks", "interpret", "smem_budget"))
def lora_apply(ys: tuple[jax.Array, ...], x: jax.Array, keys: jax.Array, active: jax.Array,
               a_rows: tuple[jax.Array, ...], b_rows: tuple[jax.Array, ...], tables: tuple[PageTable, ...], *,
               num_experts: int, blocks: Blocks, interpret=False,
               smem_budget: int = SMEM_BUDGET) -> tuple[jax.Array, ...]:
    """ys[i] + delta_i (float32 sum, one rounding) for LoRA targets i that share the input x.

    Args:
      ys: per target [M, N_i] base outputs (float32 zeros to get the plain delta).
      x: [M, D_in] rows (tokens, or (token, expert) assignments).
      keys: [M] int32 slot * num_experts + expert of each row.
      active: [M] bool rows with an adapter (slot > 0) and a real expert.
      a_rows, b_rows: per target, its A arena [P_i, D_in] and B arena [P_i, N_i] (layout.py).
      tables: per target, its PageTable (same rank block as `blocks`).
      num_experts: E (1 for dense projections).
      blocks: static tiling; the variant follows from M.
      interpret: False on TPU; True or a `pltpu.InterpretParams` on CPU.
      smem_budget: bytes of work lists per launch; prefill rows are split into launches of fewer rows when
        the static bound exceeds it (many groups: per-expert LoRA over thousands of rows).
    """
    m = x.shape[0]
    if any(t.rank_block != blocks.rank_block for t in tables):
        raise ValueError(f"page tables use rank blocks {[t.rank_block for t in tables]}, blocks say "
                         f"{blocks.rank_block}")
    num_keys = tables[0].num_slots * num_experts
    args = dict(tables=tables, num_experts=num_experts, blocks=blocks, interpret=interpret,
                arena_blocks=tuple(a.shape[0] // blocks.rank_block for a in a_rows))
    if use_decode(m, blocks) and metadata_bytes(m, m, num_keys, tables, False) <= smem_budget:
        return _decode(ys, x, keys, active, a_rows, b_rows, **args)
    tm = blocks.token_tile
    chunk = -(-m // tm) * tm
    while chunk > tm and metadata_bytes(chunk, tm, num_keys, tables, True) > smem_budget:
        chunk = -(-chunk // 2 // tm) * tm
    if metadata_bytes(chunk, tm, num_keys, tables, True) > smem_budget:
        raise ValueError(f"work lists of {tm} rows need {metadata_bytes(tm, tm, num_keys, tables, True)} bytes "
                         f"of SMEM, above {smem_budget=}")
    parts = [_prefill(tuple(y[s:s + chunk] for y in ys), x[s:s + chunk], keys[s:s + chunk],
                      active[s:s + chunk], a_rows, b_rows, **args) for s in range(0, m, chunk)]
    return parts[0] if len(parts) == 1 else tuple(jnp.concatenate(p) for p in zip(*parts))


def _decode(ys, x, keys, active, a_rows, b_rows, *, tables, num_experts, blocks, interpret, arena_blocks):
    """Rows in place, one token tile."""
    m = x.shape[0]
    grouping = group_rows(keys, active, num_keys=tables[0].num_slots * num_experts)
    sched = build_schedule(grouping, grouping.row_group, tables, num_experts=num_experts, tm=m, num_rows=m,
                           sorted_rows=False, arena_blocks=arena_blocks)
    s_t = shrink(x, a_rows, sched, interpret=interpret)
    return expand(s_t, b_rows, ys, sched, col_tile=blocks.decode_col_tile, interpret=interpret)


def _prefill(ys, x, keys, active, a_rows, b_rows, *, tables, num_experts, blocks, interpret, arena_blocks):
    """Rows sorted by group, token tiles of blocks.token_tile rows."""
    m = x.shape[0]
    grouping = group_rows(keys, active, num_keys=tables[0].num_slots * num_experts)
    tm = blocks.token_tile
    mp = -(-m // tm) * tm
    order = jnp.concatenate([grouping.order, jnp.zeros((mp - m,), jnp.int32)])  # padding rows read row 0
    row_group = jnp.concatenate([grouping.row_group[grouping.order], jnp.full((mp - m,), -1, jnp.int32)])
    sched = build_schedule(grouping, row_group, tables, num_experts=num_experts, tm=tm, num_rows=mp,
                           sorted_rows=True, arena_blocks=arena_blocks)
    s_t = shrink(x[order], a_rows, sched, interpret=interpret)
    out = expand(s_t, b_rows, tuple(y[order] for y in ys), sched, col_tile=blocks.col_tile, interpret=interpret)
    return tuple(o[grouping.inverse] for o in out)
