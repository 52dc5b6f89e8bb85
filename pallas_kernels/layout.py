"""The adapter page layout the LoRA kernels read: rank rows in two arenas, addressed in rank blocks.

One target (say q of one layer) keeps its adapters in two row arenas:

    A rows  [P, D_in]   row p is one rank component of some adapter's A (PEFT's lora_A.weight row)
    B rows  [P, D_out]  row p is the matching rank component of its B (scaling folded in)

Rows are grouped in rank blocks of `rank_block` rows (a multiple of 8, the TPU sublane count). The page of
(adapter slot s, expert e) is `nblocks[s]` consecutive blocks starting at block `start[s] + e * stride[s]`;
a rank-r adapter needs ceil(r / rank_block) blocks, so kernels read and multiply only those. `PageTable` holds
(start, stride, nblocks) per slot; slot 0 ("no adapter") always has nblocks 0.

Two ways to fill the arenas, both read by the same kernels:
  * padded pool (today's `lora/pool.py`): every slot owns max_rank rows per expert, whatever its rank.
    A pool B `[S, (E,) R, *out]` is already rank-major: `reshape(S*E*R, out)` is the B arena, a free view. A pool
    A `[S, (E,) D_in, R]` is rank-minor and needs one transpose (`a_rows_from_pool`); storing A as
    `[S, (E,) R, D_in]` (PEFT's own lora_A orientation) makes it a free view too. `PageTable.padded` gives
    start = s * E * R / rank_block, stride = R / rank_block, nblocks = ceil(rank[s] / rank_block).
  * packed arena: an adapter takes exactly nblocks * E blocks (`PageTable.packed`), so (rank blocks of 8) a rank-8
    adapter costs a quarter of a rank-32 one in memory as well as in bandwidth. Any buffer whose size is a multiple
    of D_in (for instance a base weight [H, 4H] lent by the LoRA server's role, or a KV page range) can be viewed as
    an A arena by a whole-array reshape to [size / D_in, D_in]: a bitcast, no copy.

See docs/architecture/06-lora-kernels.md.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def num_rank_blocks(rank, rank_block: int):
    """ceil(rank / rank_block), for Python ints or int arrays."""
    return (rank + rank_block - 1) // rank_block


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PageTable:
    """Where each adapter slot's pages sit in a target's row arenas, in units of rank blocks."""

    start: jax.Array  # [S] int32 first block of slot s (expert 0)
    stride: jax.Array  # [S] int32 blocks between expert e and e + 1 of slot s
    nblocks: jax.Array  # [S] int32 rank blocks each page of slot s uses (0 = no adapter: skipped)
    rank_block: int = dataclasses.field(metadata=dict(static=True))  # rows per rank block
    max_blocks: int = dataclasses.field(metadata=dict(static=True))  # upper bound of nblocks (static)

    @property
    def num_slots(self) -> int:
        return self.start.shape[0]

    @classmethod
    def padded(cls, num_slots: int, num_experts: int, max_rank: int, rank_block: int,
               slot_ranks: jax.Array | None = None) -> PageTable:
        """Pages of the padded pool: slot s, expert e at rows [(s*E + e) * R, ... + rank[s]).

        slot_ranks: [S] int32 true rank of each slot (None: every slot but 0 uses max_rank). Slot 0 is forced
        to rank 0.
        """
        _check_rank_block(rank_block, max_rank)
        per_page = max_rank // rank_block
        if slot_ranks is None:
            slot_ranks = jnp.full((num_slots,), max_rank, jnp.int32)
        slot_ranks = jnp.asarray(slot_ranks, jnp.int32)
        if slot_ranks.shape != (num_slots,):
            raise ValueError(f"slot_ranks must be [{num_slots}], got {slot_ranks.shape}")
        nblocks = jnp.clip(num_rank_blocks(slot_ranks, rank_block), 0, per_page).at[0].set(0)
        slots = jnp.arange(num_slots, dtype=jnp.int32)
        return cls(start=slots * (num_experts * per_page), stride=jnp.full((num_slots,), per_page, jnp.int32),
                   nblocks=nblocks.astype(jnp.int32), rank_block=rank_block, max_blocks=per_page)

    @classmethod
    def packed(cls, slot_ranks, num_experts: int, rank_block: int, max_rank: int) -> PageTable:
        """Pages of a packed arena: slots one after another, each taking E * ceil(rank / rank_block) blocks.

        slot_ranks: [S] host ints (slot 0 must be 0). Returns the table; the arena needs
        `total_blocks(table, num_experts)` blocks."""
        _check_rank_block(rank_block, max_rank)
        ranks = np.asarray(slot_ranks, np.int64)
        if ranks[0] != 0 or np.any(ranks < 0) or np.any(ranks > max_rank):
            raise ValueError(f"slot ranks must lie in [0, {max_rank}] with slot 0 = 0, got {ranks.tolist()}")
        nblocks = num_rank_blocks(ranks, rank_block)
        start = np.concatenate([[0], np.cumsum(nblocks * num_experts)[:-1]])
        return cls(start=jnp.asarray(start, jnp.int32), stride=jnp.asarray(nblocks, jnp.int32),
                   nblocks=jnp.asarray(nblocks, jnp.int32), rank_block=rank_block,
                   max_blocks=max_rank // rank_block)


def total_blocks(table: PageTable, num_experts: int) -> int:
    """Blocks a packed arena needs for this table (host)."""
    start, nblocks, stride = (np.asarray(a) for a in (table.start, table.nblocks, table.stride))
    return int(np.max(start + (num_experts - 1) * stride + nblocks, initial=0))


def _check_rank_block(rank_block: int, max_rank: int) -> None:
    if rank_block <= 0 or rank_block % 8 or max_rank % rank_block:
        raise ValueError(f"rank_block={rank_block} must be a positive multiple of 8 that divides "
                         f"max_rank={max_rank}")


def padded_rank(rank: int, rank_block: int) -> int:
    """The smallest multiple of rank_block >= rank (the pool rank the kernels need)."""
    return num_rank_blocks(rank, rank_block) * rank_block


def a_rows_from_pool(lora_a: jax.Array, rank_block: int, *, rank_major: bool = False) -> jax.Array:
    """A arena [S*E*R', D_in] from pool A pages.

    lora_a: [S, D_in, R] or [S, E, D_in, R] (today's pool, rank-minor: one transpose) or, with rank_major,
      [S, R, D_in] / [S, E, R, D_in] (a free reshape). R is zero-padded up to a multiple of rank_block.
    """
    if not rank_major:
        lora_a = jnp.swapaxes(lora_a, -1, -2)
    pad = padded_rank(lora_a.shape[-2], rank_block) - lora_a.shape[-2]
    if pad:
        lora_a = jnp.pad(lora_a, [(0, 0)] * (lora_a.ndim - 2) + [(0, pad), (0, 0)])
    return lora_a.reshape(-1, lora_a.shape[-1])


def b_rows_from_pool(lora_b: jax.Array, rank_axis: int, rank_block: int) -> jax.Array:
    """B arena [S*E*R', prod(out)] from pool B pages [S, (E,) R, *out] (rank at `rank_axis`): a free view
    unless R must be zero-padded to a multiple of rank_block."""
    rank = lora_b.shape[rank_axis]
    lead = lora_b.shape[:rank_axis + 1]
    flat = lora_b.reshape(*lead, -1)
    pad = padded_rank(rank, rank_block) - rank
    if pad:
        flat = jnp.pad(flat, [(0, 0)] * rank_axis + [(0, pad), (0, 0)])
    return flat.reshape(-1, flat.shape[-1])
