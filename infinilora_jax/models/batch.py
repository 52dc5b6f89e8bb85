"""Per-step inputs of one forward pass, as a pytree that crosses jit and shard_map boundaries."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ForwardBatch:
    """B rows of T new tokens each; row b reads and writes KV-cache row b.

    Padding tokens (token_valid False) write nothing to the cache and their outputs are ignored.
    """

    tokens: jax.Array  # [B, T] int32
    positions: jax.Array  # [B, T] int32 position of each token in its sequence (padding: any valid position)
    token_valid: jax.Array  # [B, T] bool
    adapter_slots: jax.Array  # [B, T] int32 adapter slot per token (0 = no adapter)
    logits_indices: jax.Array  # [M] int32 flat indices b * T + t of the tokens whose logits are returned

    @staticmethod
    def from_rows(rows: list[list[int]], starts: list[int], slots: list[int], t_bucket: int, b_bucket: int,
                  all_logits: bool) -> ForwardBatch:
        """Right-padded batch of token rows; row b continues its sequence at position starts[b].

        Returns logits for every token of every row (all_logits) or for the last token of each row.
        Rows beyond len(rows) (batch padding) are all padding.
        """
        tokens = np.zeros((b_bucket, t_bucket), np.int32)
        positions = np.zeros((b_bucket, t_bucket), np.int32)
        valid = np.zeros((b_bucket, t_bucket), bool)
        adapter = np.zeros((b_bucket, t_bucket), np.int32)
        last = np.zeros((b_bucket,), np.int32)
        for b, (row, start, slot) in enumerate(zip(rows, starts, slots)):
            n = len(row)
            tokens[b, :n] = row
            positions[b, :n] = np.arange(start, start + n)
            valid[b, :n] = True
            adapter[b, :] = slot
            last[b] = b * t_bucket + n - 1
        if all_logits:
            indices = np.arange(b_bucket * t_bucket, dtype=np.int32)
        else:
            indices = last
        return ForwardBatch(tokens, positions, valid, adapter, indices)
