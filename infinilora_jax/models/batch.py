"""Per-step inputs of one forward pass: a flat, ragged token batch over a paged KV cache.

Projections, experts and LoRA run on the flat token list (no padding between sequences). Attention gathers each
row's new tokens into query blocks ([B, 1] for decode rows, [B, Q] for prefill chunks) and its KV pages into a
[B, P * page_size] context; `RowSpec` and `build_step_batch` turn per-sequence work into these arrays, padded to
bucketed shapes so that a steady stream of steps reuses a handful of compiled programs.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QueryBlock:
    """Rows of queries for attention: row b's q-th query is flat token index[b, q] (N for padding)."""

    index: jax.Array  # [B, Q] int32
    block_tables: jax.Array  # [B, P] int32 KV pages of each row in sequence order; unused entries: page 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepBatch:
    tokens: jax.Array  # [N] int32 new tokens of every row, concatenated (padding: 0)
    positions: jax.Array  # [N] int32 position of each token in its sequence (padding: 0)
    adapter_slots: jax.Array  # [N] int32 adapter pool slot per token (0 = no adapter)
    cache_slots: jax.Array  # [N] int32 flat KV slot (page * page_size + offset) to write; padding: out of range
    decode: QueryBlock  # rows with one new token: [Bd, 1] queries over [Bd, Pd] pages
    prefill: QueryBlock  # rows with several new tokens: [Bp, Q] queries over [Bp, Pp] pages (Bp may be 0)
    logits_indices: jax.Array  # [M] int32 flat indices of the tokens whose logits (or samples) are returned

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]


@dataclasses.dataclass
class RowSpec:
    """One sequence's work in a step: `tokens` at positions start, start+1, ... ."""

    tokens: list[int]
    start: int
    adapter_slot: int
    pages: list[int]  # KV pages of the sequence covering at least start + len(tokens) positions
    logits: str = "last"  # "last": the last new token's logits, "all": every new token's, "none"


def bucket(n: int, minimum: int, maximum: int | None = None) -> int:
    """Smallest power of two >= n (and >= minimum), capped at maximum (which must then be >= n)."""
    b = max(minimum, 1 << max(0, n - 1).bit_length())
    if maximum is not None:
        b = min(b, maximum)
        assert n <= b, (n, maximum)
    return b


def build_step_batch(rows: list[RowSpec], page_size: int, num_pages: int, *, min_tokens: int = 16,
                     min_rows: int = 4, min_query: int = 16, min_pages: int = 4, max_pages: int | None = None,
                     max_tokens: int | None = None) -> tuple[StepBatch, list[list[int]]]:
    """Pack rows into bucketed arrays. Returns the batch and, per row, the positions in `logits_indices`
    holding its requested logits (in token order).

    Attention runs in two blocks so that decode rows never pay for a prefill chunk's query length: decode rows
    (one new token) and prefill rows (several). Buckets (powers of two with floors): tokens N; decode rows Bd and
    prefill rows Bp (each 0 when there are none); queries per prefill row Q (at least `min_query`); pages per
    row P (shared by both blocks).
    """
    n = sum(len(r.tokens) for r in rows)
    n_pad = bucket(n, min_tokens, max_tokens)
    tokens = np.zeros(n_pad, np.int32)
    positions = np.zeros(n_pad, np.int32)
    slots = np.zeros(n_pad, np.int32)
    cache_slots = np.full(n_pad, num_pages * page_size, np.int32)  # out of range: the scatter drops it
    logits: list[int] = []
    row_logits: list[list[int]] = []
    blocks: dict[bool, list[tuple[list[int], np.ndarray]]] = {True: [], False: []}  # is_decode -> (tokens, pages)
    at = 0
    for b, r in enumerate(rows):
        k = len(r.tokens)
        pos = np.arange(r.start, r.start + k, dtype=np.int32)
        need = -(-(r.start + k) // page_size)
        if len(r.pages) < need:
            raise ValueError(f"row {b} covers {r.start + k} positions but has {len(r.pages)} pages of {page_size}")
        pages = np.asarray(r.pages[:need], np.int32)
        tokens[at:at + k] = r.tokens
        positions[at:at + k] = pos
        slots[at:at + k] = r.adapter_slot
        cache_slots[at:at + k] = pages[pos // page_size] * page_size + pos % page_size
        blocks[k == 1].append((list(range(at, at + k)), pages))
        wanted = {"last": [at + k - 1], "all": list(range(at, at + k)), "none": []}[r.logits]
        row_logits.append(list(range(len(logits), len(logits) + len(wanted))))
        logits += wanted
        at += k

    p_pad = bucket(max((len(p) for entries in blocks.values() for _, p in entries), default=1), min_pages, max_pages)

    def block(entries, q_pad: int) -> QueryBlock:
        b_pad = bucket(len(entries), min_rows) if entries else 0
        index = np.full((b_pad, q_pad), n_pad, np.int32)
        tables = np.zeros((b_pad, p_pad), np.int32)
        for i, (idx, pages) in enumerate(entries):
            index[i, : len(idx)] = idx
            tables[i, : len(pages)] = pages
        return QueryBlock(index, tables)

    longest = max((len(t) for t, _ in blocks[False]), default=1)
    decode = block(blocks[True], 1)
    prefill = block(blocks[False], bucket(longest, min_query))
    rows_pad = decode.index.shape[0] + prefill.index.shape[0]  # one sample per row at most: no extra bucket
    m_pad = bucket(len(logits), n_pad) if any(r.logits == "all" for r in rows) else rows_pad
    logits_indices = np.zeros(m_pad, np.int32)
    logits_indices[: len(logits)] = logits
    batch = StepBatch(tokens, positions, slots, cache_slots, decode, prefill, logits_indices)
    return batch, row_logits
