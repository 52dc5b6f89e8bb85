"""Kernel metadata derived from a StepBatch inside the jitted step (fixed shapes: no new compile variants).

A StepBatch carries attention work as two blocks of query rows over the flat token list: decode rows [Bd, 1] and
prefill tiles [T, 16] (models/batch.py), each with a block table. Every token 0..n-1 of the step belongs to
exactly one decode row or tile (build_step_batch packs them so), and a row's tokens are consecutive.

- `block_rows`: per row of a block, its first token, query count, kv length (position of its last query + 1;
  0 for padding rows) and first query position.
- `ragged_rows` (the TPU ragged kernel's input): the rows of both blocks as *sequences* over the flat token list,
  in token order, consecutive tiles of one prefill chunk merged into one sequence (so the kernel reads the
  chunk's pages once per query block, not once per 16-query tile): cu_q_lens [S + 1], kv_lens [S], page_indices
  [S, P], num_seqs [1], S = Bd + T. A step with no rows (a warm-up padding batch) gets one sequence of one
  padding token over page 0, so the kernel always has work and starts no copy it does not wait for.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from infinilora_jax.models.batch import QueryBlock, StepBatch


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockRows:
    start: jax.Array  # [B] first flat token of the row (N for padding rows)
    q_len: jax.Array  # [B] queries in the row (0 for padding rows)
    kv_len: jax.Array  # [B] position of the row's last query + 1 (0 for padding rows)
    first_pos: jax.Array  # [B] position of the row's first query
    tables: jax.Array  # [B, P] the row's pages


def block_rows(block: QueryBlock, positions: jax.Array) -> BlockRows:
    n = positions.shape[0]
    index = block.index
    q_len = jnp.sum(index < n, axis=1).astype(jnp.int32)
    last = jnp.take_along_axis(index, jnp.maximum(q_len - 1, 0)[:, None], axis=1)[:, 0]
    pos = jnp.concatenate([positions, jnp.full((1,), -1, positions.dtype)])  # index N (padding) -> -1
    kv_len = jnp.where(q_len > 0, pos[last] + 1, 0).astype(jnp.int32)
    return BlockRows(index[:, 0], q_len, kv_len, pos[index[:, 0]], block.block_tables.astype(jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RaggedRows:
    cu_q_lens: jax.Array  # [S + 1] int32: sequence i's queries are flat tokens cu_q_lens[i]:cu_q_lens[i + 1]
    kv_lens: jax.Array  # [S] int32: its kv length (its last query's position + 1)
    page_indices: jax.Array  # [S, P] int32
    num_seqs: jax.Array  # [1] int32: sequences in use (>= 1)
    num_tokens: jax.Array  # [] int32: tokens covered by real rows (tokens from here on are padding)


def ragged_rows(batch: StepBatch) -> RaggedRows:
    blocks = [block_rows(b, batch.positions) for b in (batch.decode, batch.prefill) if b.index.shape[0] > 0]
    width = max(b.tables.shape[1] for b in blocks)
    blocks = [dataclasses.replace(b, tables=jnp.pad(b.tables, ((0, 0), (0, width - b.tables.shape[1]))))
              for b in blocks]
    rows = jax.tree.map(lambda *xs: jnp.concatenate(xs), *blocks)
    s = rows.start.shape[0]
    order = jnp.argsort(rows.start, stable=True)  # token order; padding rows (start N) last
    rows = jax.tree.map(lambda x: x[order], rows)
    valid = rows.q_len > 0
    prev = jax.tree.map(lambda x: jnp.concatenate([x[:1], x[:-1]]), rows)
    follows = (jnp.arange(s) > 0) & (prev.q_len > 0) & (rows.start == prev.start + prev.q_len) \
        & (rows.first_pos == prev.kv_len) & jnp.all(rows.tables == prev.tables, axis=1)
    begins = valid & ~follows  # the first tile of a sequence (the same row's tiles follow it)
    seq = jnp.where(valid, jnp.cumsum(begins) - 1, s)  # s: out of range, dropped by the scatters below
    q_lens = jnp.zeros(s, jnp.int32).at[seq].add(rows.q_len, mode="drop")
    kv_lens = jnp.zeros(s, jnp.int32).at[seq].max(rows.kv_len, mode="drop")
    tables = jnp.zeros_like(rows.tables).at[seq].set(rows.tables, mode="drop")  # a sequence's tiles share pages
    num_tokens = jnp.sum(q_lens)
    empty = num_tokens == 0  # no rows: one sequence of one padding token over page 0
    q_lens = q_lens.at[0].set(jnp.where(empty, 1, q_lens[0]))
    kv_lens = kv_lens.at[0].set(jnp.where(empty, 1, kv_lens[0]))
    num_seqs = jnp.maximum(jnp.sum(begins), 1).astype(jnp.int32)[None]
    cu_q_lens = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(q_lens).astype(jnp.int32)])
    return RaggedRows(cu_q_lens, kv_lens, tables, num_seqs, num_tokens.astype(jnp.int32))
