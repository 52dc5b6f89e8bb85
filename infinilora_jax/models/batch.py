"""Per-step inputs of one forward pass: a flat, ragged token batch over a paged KV cache.

Projections, experts and LoRA run on the flat token list (no padding between sequences). Attention gathers each
row's new tokens into query blocks ([B, 1] for decode rows, [T, 16] tiles of prefill chunks) and its KV pages
into a [B, P * page_size] context; `RowSpec` and `build_step_batch` turn per-sequence work into these arrays, in
the shapes of a `ShapePolicy`, so that a steady stream of steps reuses a few compiled programs.
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

    @property
    def max_sequences(self) -> int:
        """Static bound on the sequences in the step: the decode block's rows (ShapePolicy.decode_rows holds one
        row per sequence the step may have; build_step_batch checks it). Each sequence's tokens are one
        contiguous run of its adapter slot, so this bounds the runs the LoRA kernels take in place."""
        return self.decode.index.shape[0]


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


@dataclasses.dataclass(frozen=True)
class ShapePolicy:
    """The finite set of step shapes an engine uses, so a steady stream never compiles a new program.

    Every array shape of a step follows from two bucketed numbers: the token count N (a power of two from
    `min_tokens` up to the step budget) and the pages per row P (a power of two from `min_pages` up to the
    context limit). Decode rows, prefill tiles and sampled rows are functions of N and the limits below, and a
    step either has a prefill block or not: at most |N| x |P| x 2 sampling programs, all enumerable up front
    (`LLMEngine.warmup`).

    Prefill rows are cut into tiles of `query_tile` queries, each tile attending over its row's pages, so a
    long chunk and many short prompts fill the same [tiles, query_tile] block: a step's prefill tokens (<= N)
    in at most `max_prefill_rows` rows need at most N / query_tile + max_prefill_rows tiles.
    """

    page_size: int
    num_pages: int
    max_rows: int  # sequences per step at most (the scheduler's max_num_seqs)
    max_prefill_rows: int  # rows with several new tokens per step at most
    max_pages: int  # pages of a sequence at the context limit
    max_tokens: int  # the step's token budget
    min_tokens: int = 16
    query_tile: int = 16
    min_pages: int = 4

    def tokens(self, n: int) -> int:
        return bucket(n, self.min_tokens, bucket(self.max_tokens, self.min_tokens))

    def pages(self, p: int) -> int:
        return bucket(p, min(self.min_pages, self.max_pages), self.max_pages)

    def decode_rows(self, n_pad: int) -> int:
        """Rows of the decode block (and sampled rows) of an N-token step: one token per row."""
        return min(n_pad, bucket(self.max_rows, 1))

    @property
    def max_sampled_rows(self) -> int:
        """The most rows a sampling step samples (its logits rows: one per decode row or prefill chunk)."""
        return self.decode_rows(self.tokens(self.max_tokens))

    def prefill_tiles(self, n_pad: int) -> int:
        return -(-n_pad // self.query_tile) + self.max_prefill_rows

    def token_buckets(self) -> list[int]:
        top = self.tokens(self.max_tokens)
        return [b for b in (self.min_tokens << i for i in range(32)) if b <= top]

    def page_buckets(self) -> list[int]:
        top = self.max_pages
        out = [self.pages(1)]
        while out[-1] < top:
            out.append(self.pages(out[-1] + 1))
        return out


def step_needs(rows: list[RowSpec], page_size: int) -> tuple[int, int, bool]:
    """(new tokens, pages of the longest row, whether some row has several new tokens) of a step's rows: what
    its bucketed shapes follow from."""
    return (sum(len(r.tokens) for r in rows),
            max([-(-(r.start + len(r.tokens)) // page_size) for r in rows] + [1]),
            any(len(r.tokens) > 1 for r in rows))


def build_step_batch(rows: list[RowSpec], page_size: int, num_pages: int,
                     policy: ShapePolicy | None = None, *, n_pad: int | None = None, p_pad: int | None = None,
                     prefill: bool | None = None) -> tuple[StepBatch, list[list[int]]]:
    """Pack rows into arrays of the policy's shapes. Returns the batch and, per row, the positions in
    `logits_indices` holding its requested logits (in token order).

    Attention runs in two blocks so that decode rows never pay for a prefill chunk's query length: decode rows
    (one new token: [Bd, 1] queries) and prefill tiles ([T, query_tile] queries). Without a policy (one-off
    batches, tests) the shapes are just large enough for these rows. n_pad, p_pad (policy buckets at least as
    large as these rows need) and prefill=True force larger shapes: several base instances stepping together
    (disagg/engine.py) need batches of one shape.
    """
    if policy is None:
        policy = ShapePolicy(page_size, num_pages, max_rows=max(1, len(rows)),
                             max_prefill_rows=sum(len(r.tokens) > 1 for r in rows),
                             max_pages=max([-(-(r.start + len(r.tokens)) // page_size) for r in rows] + [1]),
                             max_tokens=sum(len(r.tokens) for r in rows))
    assert (policy.page_size, policy.num_pages) == (page_size, num_pages), policy
    n = sum(len(r.tokens) for r in rows)
    if n_pad is None:
        n_pad = policy.tokens(n)
    elif n_pad < n:
        raise ValueError(f"n_pad={n_pad} is below the {n} tokens of these rows")
    max_sequences = policy.decode_rows(n_pad)  # also the decode block's rows: StepBatch.max_sequences
    if len(rows) > max_sequences:  # it must bound the rows' token runs (the LoRA kernels take them in place)
        raise ValueError(f"{len(rows)} rows exceed the {max_sequences} sequences of a {n_pad}-token step ({policy})")
    tokens = np.zeros(n_pad, np.int32)
    positions = np.zeros(n_pad, np.int32)
    slots = np.zeros(n_pad, np.int32)
    cache_slots = np.full(n_pad, num_pages * page_size, np.int32)  # out of range: the scatter drops it
    logits: list[int] = []
    row_logits: list[list[int]] = []
    decode_rows: list[tuple[list[int], list[int]]] = []
    tiles: list[tuple[list[int], list[int]]] = []
    tile = policy.query_tile
    at = 0
    # Python scalars for decode rows (one token each): this loop runs on the host every step, and numpy calls
    # on one element cost far more than the element
    for b, r in enumerate(rows):
        k = len(r.tokens)
        need = -(-(r.start + k) // page_size)
        if len(r.pages) < need:
            raise ValueError(f"row {b} covers {r.start + k} positions but has {len(r.pages)} pages of {page_size}")
        pages = r.pages[:need]
        if k == 1:
            tokens[at], positions[at], slots[at] = r.tokens[0], r.start, r.adapter_slot
            cache_slots[at] = pages[r.start // page_size] * page_size + r.start % page_size
            decode_rows.append(([at], pages))
        else:
            pos = np.arange(r.start, r.start + k, dtype=np.int32)
            tokens[at:at + k] = r.tokens
            positions[at:at + k] = pos
            slots[at:at + k] = r.adapter_slot
            cache_slots[at:at + k] = np.asarray(pages, np.int32)[pos // page_size] * page_size + pos % page_size
            tiles += [(list(range(at + t, at + min(t + tile, k))), pages) for t in range(0, k, tile)]
        if r.logits == "last":
            row_logits.append([len(logits)])
            logits.append(at + k - 1)
        elif r.logits == "all":
            row_logits.append(list(range(len(logits), len(logits) + k)))
            logits += range(at, at + k)
        elif r.logits == "none":
            row_logits.append([])
        else:
            raise ValueError(f"row {b}: logits={r.logits!r} (last, all or none)")
        at += k

    p_need = policy.pages(max((len(p) for _, p in decode_rows + tiles), default=1))
    if p_pad is None:
        p_pad = p_need
    elif p_pad < p_need:
        raise ValueError(f"p_pad={p_pad} is below the {p_need} pages these rows need")

    def block(entries, num_rows: int, q_pad: int) -> QueryBlock:
        if len(entries) > num_rows:
            raise ValueError(f"{len(entries)} query rows exceed the policy's {num_rows} ({policy})")
        index = np.full((num_rows, q_pad), n_pad, np.int32)
        tables = np.zeros((num_rows, p_pad), np.int32)
        for i, (idx, pages) in enumerate(entries):
            index[i, : len(idx)] = idx
            tables[i, : len(pages)] = pages
        return QueryBlock(index, tables)

    decode = block(decode_rows, max_sequences, 1)
    prefill = block(tiles, policy.prefill_tiles(n_pad) if tiles or prefill else 0, tile)
    m_pad = n_pad if any(r.logits == "all" for r in rows) else max_sequences
    if len(logits) > m_pad:
        raise ValueError(f"{len(logits)} logits rows exceed {m_pad} ({policy})")
    logits_indices = np.zeros(m_pad, np.int32)
    logits_indices[: len(logits)] = logits
    batch = StepBatch(tokens, positions, slots, cache_slots, decode, prefill, logits_indices)
    return batch, row_logits


def padding_batch(policy: ShapePolicy, n_pad: int, p_pad: int, prefill: bool, all_logits: bool = False
                  ) -> StepBatch:
    """A batch of the given shapes that reads nothing and writes nothing (every KV write out of range): runs a
    program once so it is compiled before traffic arrives."""
    rows = policy.decode_rows(n_pad)
    tiles = policy.prefill_tiles(n_pad) if prefill else 0
    empty = lambda b, q: QueryBlock(np.full((b, q), n_pad, np.int32), np.zeros((b, p_pad), np.int32))
    zeros = np.zeros(n_pad, np.int32)
    return StepBatch(zeros, zeros, zeros, np.full(n_pad, policy.num_pages * policy.page_size, np.int32),
                     empty(rows, 1), empty(tiles, policy.query_tile),
                     np.zeros(n_pad if all_logits else rows, np.int32))
