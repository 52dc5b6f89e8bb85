"""Group rows by key (adapter slot, or adapter slot x expert): fixed shapes, jit-friendly, no host sync.

A row is one token (dense projections, key = slot) or one (token, expert) assignment (per-expert LoRA,
key = slot * E + expert). Inactive rows (slot 0, padding experts) belong to no group and sort last. Group ids
follow key order, so groups are contiguous in the sorted order. The group arrays have the static length
G = min(rows, keys), enough for any input; entries past `num_groups` are unused (size 0).

Rows that arrive grouped (`presorted=True`: the rows of each active key are one contiguous run, as the MoE layer
delivers (token, expert) rows sorted by (expert, slot)) are not sorted: the "sorted order" is the rows' own
order (order and inverse are the identity), groups are the runs in row order, and inactive rows may sit
between them. Then the GPU kernels need no gather of x and none of the delta back. Rows in runs
(`presorted=True, max_groups=n`: a key's rows may form several runs, as the tokens of a step's sequences do,
each sequence's tokens one run of its adapter slot) are taken the same way: each run is a group, and
`max_groups` bounds how many there are.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Grouping:
    order: jax.Array  # [M] int32 row at each sorted position (active rows first, by key)
    inverse: jax.Array  # [M] int32 sorted position of each row: order[inverse[i]] == i
    row_group: jax.Array  # [M] int32 group of each row in the ORIGINAL order; -1: inactive
    group_key: jax.Array  # [G] int32 key of each group; num_keys for unused entries
    group_start: jax.Array  # [G] int32 first sorted position of each group; M for unused entries
    group_size: jax.Array  # [G] int32 rows of each group; 0 for unused entries
    num_groups: jax.Array  # [] int32 groups in use (entries [0, num_groups) of the group arrays)


def group_rows(keys: jax.Array, active: jax.Array, *, num_keys: int, presorted: bool = False,
               max_groups: int | None = None) -> Grouping:
    """Sort rows by key (unless `presorted`) and describe the groups.

    Args:
      keys: [M] int32 key of each row, in [0, num_keys) where active.
      active: [M] bool rows that take part (others get row_group -1 and sort last).
      num_keys: static number of possible keys.
      presorted: the caller guarantees that each active key's rows form one contiguous run (inactive rows may
        lie anywhere); the rows keep their order. A key split over several runs would give more groups than
        the static bound holds, and rows past it would be dropped.
      max_groups: with `presorted`, a key's rows may form several runs, at most this many in all (each run a
        group; the static bound is then min(rows, max_groups) instead of min(rows, num_keys)).
    """
    m = keys.shape[0]
    if max_groups is not None and not presorted:
        raise ValueError("max_groups bounds the runs of rows taken in place: it needs presorted=True")
    g = min(m, num_keys if max_groups is None else max_groups)
    if g < 1:
        raise ValueError(f"group_rows needs rows >= 1 and num_keys >= 1, got rows={m}, num_keys={num_keys}")
    k = _sort_keys(keys, active, num_keys)
    pos = jnp.arange(m, dtype=jnp.int32)
    order = pos if presorted else jnp.argsort(k, stable=True).astype(jnp.int32)
    sk = k if presorted else k[order]
    live = sk < num_keys
    is_start = live & jnp.concatenate([jnp.ones((1,), bool), sk[1:] != sk[:-1]])
    if m * m <= DENSE_MAX:
        return _facts_by_comparison(order, sk, live, is_start, pos, g, num_keys, presorted)
    return _facts_by_search(order, sk, live, is_start, pos, g, num_keys, presorted)


def _sort_keys(keys, active, num_keys: int):
    return jnp.where(active, keys.astype(jnp.int32), num_keys)  # inactive rows: one key past the end


def sort_by_key(keys: jax.Array, active: jax.Array, *, num_keys: int) -> tuple[jax.Array, jax.Array]:
    """(order, inverse) of group_rows without the group facts: rows sorted stably by key, inactive rows last;
    order[inverse[i]] == i. For decode-sized calls (the inverse is a scatter of [M] indices)."""
    order = jnp.argsort(_sort_keys(keys, active, num_keys), stable=True).astype(jnp.int32)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32))
    return order, inverse


DENSE_MAX = 1 << 16  # rows * rows up to which group_rows compares all pairs instead of scanning and searching


def _facts_by_search(order, sk, live, is_start, pos, g: int, num_keys: int, presorted: bool) -> Grouping:
    """group_rows' facts for many rows (prefill) from a scan, binary searches, gathers and one more sort.

    No scatters: on the H200 XLA took ~9 s to compile the four scatters this once used at 4,096 rows (and ~17 s
    with build_units' gathers of their outputs), against ~0.2 s for all of it at 256 rows, and the kernels
    themselves ~0.6 s (benchmarks/lora_kernel_compile.py, docs/benchmarks.md): every prefill-shaped LoRA
    program paid it, once per row count."""
    m = pos.shape[0]
    starts_so_far = jnp.cumsum(is_start.astype(jnp.int32))  # groups started at or before each sorted row
    num_groups = starts_so_far[-1]
    gid_sorted = jnp.where(live, starts_so_far - 1, -1).astype(jnp.int32)
    gi = jnp.arange(g, dtype=jnp.int32)
    # group i starts at the first sorted row where i + 1 groups have started (m past the last group)
    method = "compare_all" if g * m <= DENSE_MAX else "scan_unrolled"
    group_start = jnp.searchsorted(starts_so_far, gi + 1, side="left", method=method).astype(jnp.int32)
    used = gi < num_groups
    group_key = jnp.where(used, sk[jnp.minimum(group_start, m - 1)], num_keys).astype(jnp.int32)
    # a group ends at its last live row before the key changes (inactive rows may follow it when presorted)
    is_end = live & jnp.concatenate([sk[1:] != sk[:-1], jnp.ones((1,), bool)])
    ends_so_far = jnp.cumsum(is_end.astype(jnp.int32))
    ends = jnp.searchsorted(ends_so_far, gi + 1, side="left", method=method).astype(jnp.int32) + 1
    group_size = jnp.where(used, ends - group_start, 0).astype(jnp.int32)
    # a permutation's inverse, by sorting instead of scattering
    inverse = pos if presorted else jnp.argsort(order).astype(jnp.int32)
    return Grouping(order=order, inverse=inverse, row_group=gid_sorted if presorted else gid_sorted[inverse],
                    group_key=group_key, group_start=group_start, group_size=group_size,
                    num_groups=num_groups.astype(jnp.int32))


def _facts_by_comparison(order, sk, live, is_start, pos, g: int, num_keys: int, presorted: bool) -> Grouping:
    """group_rows' facts for few rows (decode) from all-pairs comparisons: a handful of fusions where the cumsum
    binary searches and sort are a dozen small dependent kernels on GPU, each costing more than its work."""
    m = pos.shape[0]
    gid_sorted = jnp.where(live, jnp.sum(is_start[None, :] & (pos[None, :] <= pos[:, None]), axis=1) - 1, -1)
    gid_sorted = gid_sorted.astype(jnp.int32)
    in_group = gid_sorted[None, :] == jnp.arange(g, dtype=jnp.int32)[:, None]  # [g, m]: sorted row j in group i
    starts_g = is_start[None, :] & in_group  # row j starts group i
    has = jnp.any(starts_g, axis=1)
    group_key = jnp.where(has, jnp.sum(jnp.where(starts_g, sk[None, :], 0), axis=1), num_keys).astype(jnp.int32)
    group_start = jnp.where(has, jnp.sum(jnp.where(starts_g, pos[None, :], 0), axis=1), m).astype(jnp.int32)
    group_size = jnp.sum(live[None, :] & in_group, axis=1).astype(jnp.int32)
    if presorted:  # rows in place
        inverse, row_group = pos, gid_sorted
    else:
        sorted_at = order[None, :] == pos[:, None]  # [m, m]: row i sits at sorted position j
        inverse = jnp.sum(jnp.where(sorted_at, pos[None, :], 0), axis=1).astype(jnp.int32)
        row_group = jnp.sum(jnp.where(sorted_at, gid_sorted[None, :], 0), axis=1)
    return Grouping(order=order, inverse=inverse, row_group=row_group.astype(jnp.int32), group_key=group_key,
                    group_start=group_start, group_size=group_size,
                    num_groups=jnp.sum(is_start).astype(jnp.int32))
