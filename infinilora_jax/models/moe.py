"""Top-k mixture of SwiGLU experts with expert parallelism (runs on local shards inside shard_map).

Token dispatch (per pipeline stage; expert weights sharded over EP, their intermediate width over TP):
  1. every device routes all N tokens (the router is tiny and replicated);
  2. each EP rank takes its contiguous 1/ep of the tokens and packs one row per (token, expert) assignment
     into a per-destination buffer [ep, C, H], C = tokens_per_rank * min(k, experts_per_rank), which is large
     enough that no assignment is ever dropped (the result equals the dense reference exactly);
  3. `all_to_all` over EP delivers each row to the device holding its expert (with the adapter slot of its
     token, so per-expert LoRA is computed beside the expert);
  4. rows are sorted by local expert and run through grouped GEMMs (models/grouped_matmul.py);
  5. a second `all_to_all` returns the rows; each rank weights and sums its tokens' k rows, the TP partial
     sums are reduced, and an `all_gather` over EP gives every device the full [N, H] output again.
XLA:CPU has no ragged all-to-all, hence fixed-capacity buffers; the capacity bound is exact, not a drop policy.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from infinilora_jax.lora.reference import add_delta
from infinilora_jax.models.grouped_matmul import grouped_matmul
from infinilora_jax.models.layers import matmul
from meshes.axes import EP, TP
from pallas_kernels.dispatch import expert_lora_delta, lora_delta  # kernels on TPU, the reference elsewhere


def route(x: jax.Array, router: jax.Array, top_k: int, normalize: bool,
          router_delta: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """HF routing: logits in the activation dtype, softmax in float32, top-k, optional renormalisation.

    x: [N, H]; router: [H, E]; router_delta: [N, E] float32 LoRA delta of the router logits, or None.
    Returns (weights [N, k] in x.dtype, expert ids [N, k] int32).
    """
    logits = matmul(x, router, "nh,he->ne")
    if router_delta is not None:
        logits = add_delta(logits, router_delta)
    return route_logits(logits, top_k, normalize)


def route_logits(logits: jax.Array, top_k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """`route` from router logits [N, E] (activation dtype): (weights [N, k] in that dtype, expert ids [N, k])."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(logits.dtype), experts.astype(jnp.int32)


class Packed(NamedTuple):
    """One EP rank's (token, expert) assignments packed by destination rank, and what `combine_rows` needs."""

    send_x: jax.Array  # [ep, C, H] rows, one per assignment
    send_e: jax.Array  # [ep, C] int32 expert local to the destination (num_local for empty rows)
    send_s: jax.Array  # [ep, C] int32 adapter slot of the row's token
    dest: jax.Array  # [A] destination rank of each assignment (A = per_rank * k)
    pos: jax.Array  # [A] row of each assignment in its destination's buffer
    valid: jax.Array  # [A] the assignment's token is a real token of this rank
    weights: jax.Array  # [per_rank, k] routing weights of this rank's tokens
    experts: jax.Array  # [per_rank, k] global expert ids of this rank's tokens


def pack_rows(x: jax.Array, slots: jax.Array, weights: jax.Array, experts: jax.Array, *, num_local: int,
              ep: int) -> Packed:
    """Steps 2 of the module docstring: this EP rank's 1/ep of the N tokens, one row per (token, expert).

    x: [N, H]; slots: [N]; weights, experts: [N, k] from `route`. Runs on local shards (EP rank from the mesh).
    """
    n, hidden = x.shape
    top_k = experts.shape[1]
    per_rank = -(-n // ep)
    pad = per_rank * ep - n
    rank = jax.lax.axis_index(EP) if ep > 1 else 0
    take = lambda a: jax.lax.dynamic_slice_in_dim(jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)),
                                                  rank * per_rank, per_rank)
    my_x, my_experts, my_weights, my_slots = take(x), take(experts), take(weights), take(slots)
    my_valid = (rank * per_rank + jnp.arange(per_rank)) < n  # [per_rank]

    dest = (my_experts // num_local).reshape(-1)  # [A]
    local_expert = (my_experts % num_local).reshape(-1)
    token_of = jnp.repeat(jnp.arange(per_rank), top_k)
    valid = my_valid[token_of]
    capacity = per_rank * min(top_k, num_local)
    onehot = jax.nn.one_hot(dest, ep, dtype=jnp.int32)
    pos = jnp.take_along_axis(jnp.cumsum(onehot, axis=0) - 1, dest[:, None], axis=1)[:, 0]
    dest_w = jnp.where(valid, dest, ep)  # invalid rows are dropped by the scatter
    # Scatter only each buffer row's assignment index (A marks an empty row), then gather the rows: on GPU a
    # gather of [ep * C, H] rows is one cheap fusion, a scatter of them is not.
    num_assignments = dest.shape[0]
    assignment = jnp.full((ep, capacity), num_assignments, jnp.int32).at[dest_w, pos].set(
        jnp.arange(num_assignments, dtype=jnp.int32), mode="drop")
    empty = assignment == num_assignments
    source = jnp.minimum(assignment, num_assignments - 1)  # in range; empty rows are masked below
    token = jnp.where(empty, 0, token_of.astype(jnp.int32)[source])
    send_x = jnp.where(empty[..., None], jnp.zeros((), x.dtype), my_x[token])
    send_e = jnp.where(empty, num_local, local_expert[source])
    send_s = jnp.where(empty, 0, my_slots[token])
    return Packed(send_x, send_e, send_s, dest, pos, valid, my_weights, my_experts)


def combine_rows(back: jax.Array, packed: Packed) -> jax.Array:
    """back: [ep, C, H] expert outputs returned to this rank -> [per_rank, H], each token's k rows weighted and
    summed in ascending expert order in the activation dtype (as HF's loop over experts does, so low-precision
    results round the same way; in float32 the order is immaterial). A partial sum over TP shards."""
    ep = back.shape[0]
    per_rank, top_k = packed.experts.shape
    rows = back[jnp.minimum(packed.dest, ep - 1), packed.pos]  # [A, H]
    rows = rows * packed.weights.reshape(-1)[:, None]
    rows = jnp.where(packed.valid[:, None], rows, 0).reshape(per_rank, top_k, back.shape[-1])
    order = jnp.argsort(packed.experts, axis=1)
    rows = jnp.take_along_axis(rows, order[:, :, None], axis=1)
    y = rows[:, 0]
    for j in range(1, top_k):
        y = y + rows[:, j]
    return y


def sort_rows(row_experts: jax.Array, num_local: int, row_slots: jax.Array | None = None,
              num_slots: int = 0) -> tuple[jax.Array, jax.Array]:
    """(order that sorts rows by local expert, stably; group sizes [num_local] int32). Padding rows carry
    expert id num_local and sort last, outside every group. With `row_slots` (adapter slots in [0, num_slots))
    the rows of one expert are sorted by slot too, so each (slot, expert) pair's rows are contiguous: the
    per-expert LoRA kernels then take them in place (dispatch.expert_lora_delta's rows_grouped)."""
    key = row_experts if row_slots is None else row_experts * num_slots + row_slots
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.bincount(row_experts, length=num_local + 1)[:num_local].astype(jnp.int32)
    return order, group_sizes


def _precision(rows: jax.Array):
    return jax.lax.Precision.HIGHEST if rows.dtype == jnp.float32 else None


def expert_gate_up(sorted_rows: jax.Array, group_sizes: jax.Array, w_gate_up: jax.Array) -> jax.Array:
    """Grouped GEMM of rows sorted by expert: [R, H] x [E_l, H, 2, I_l] -> [R, 2, I_l] in the rows' dtype."""
    num_local, hidden, _, inter = w_gate_up.shape
    gate_up = grouped_matmul(sorted_rows, w_gate_up.reshape(num_local, hidden, 2 * inter), group_sizes,
                             precision=_precision(sorted_rows)).astype(sorted_rows.dtype)
    return gate_up.reshape(-1, 2, inter)


def expert_down(act: jax.Array, group_sizes: jax.Array, w_down: jax.Array) -> jax.Array:
    """Grouped GEMM: [R, I_l] x [E_l, I_l, H] -> [R, H] in act's dtype."""
    return grouped_matmul(act, w_down, group_sizes, precision=_precision(act)).astype(act.dtype)


def _expert_ffn(rows: jax.Array, row_experts: jax.Array, row_slots: jax.Array, w_gate_up: jax.Array,
                w_down: jax.Array, lora: dict | None) -> jax.Array:
    """SwiGLU of each row through its local expert, plus per-expert LoRA deltas.

    rows: [R, H]; row_experts: [R] local expert id (== num_local_experts for padding rows);
    row_slots: [R] adapter slot; w_gate_up: [E_l, H, 2, I_l]; w_down: [E_l, I_l, H].
    Returns [R, H], a partial sum over the TP shards of I (padding rows are zero).
    """
    pages = [lora[t] for t in ("gate_up", "down") if lora is not None and lora.get(t) is not None]
    # with expert LoRA, rows sorted by (expert, slot): each page's rows are one run the kernels take in place
    order, group_sizes = (sort_rows(row_experts, w_gate_up.shape[0], row_slots, pages[0][0].shape[0]) if pages
                          else sort_rows(row_experts, w_gate_up.shape[0]))
    sorted_rows = rows[order]
    sorted_experts = row_experts[order]
    gate_up = expert_gate_up(sorted_rows, group_sizes, w_gate_up)
    sorted_slots = row_slots[order]
    if lora is not None and lora.get("gate_up") is not None:
        gate_up = add_delta(gate_up, expert_lora_delta(sorted_rows, sorted_slots, sorted_experts, *lora["gate_up"],
                                                       a_rank_major=True, slot_ranks=_ranks(lora, "gate_up"),
                                                       rows_grouped=True))
    act = jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1]
    out = expert_down(act, group_sizes, w_down)
    if lora is not None and lora.get("down") is not None:
        out = add_delta(out, expert_lora_delta(act, sorted_slots, sorted_experts, *lora["down"], a_rank_major=True,
                                               slot_ranks=_ranks(lora, "down"), rows_grouped=True))
    return unsort(out, order)


def _ranks(lora: dict, name: str):
    """[S] int32 page rank of each slot for one LoRA (lora["ranks"], from the pool), or None (full rank)."""
    return lora.get("ranks", {}).get(name)


def unsort(sorted_rows: jax.Array, order: jax.Array) -> jax.Array:
    """Rows back in their order before `rows[order]` (order: a permutation). A gather by the inverse
    permutation: its scatter is of int32 indices, not of [R, H] rows."""
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype),
                                                  unique_indices=True)
    return sorted_rows[inverse]


def moe_block(x: jax.Array, slots: jax.Array, router: jax.Array, w_gate_up: jax.Array, w_down: jax.Array,
              lora: dict | None, *, top_k: int, normalize: bool, ep: int) -> jax.Array:
    """Sparse MoE block on local shards.

    x: [N, H] (identical on every device of this stage); slots: [N] adapter slot per token;
    router: [H, E]; w_gate_up: [E/ep, H, 2, I/tp]; w_down: [E/ep, I/tp, H];
    lora: {"gate_up": (A [S, E/ep, R, H], B [S, E/ep, R, 2, I/tp]), "down": (A [S, E/ep, R, I/tp], B [S, E/ep, R, H]),
           "router": (A [S, R, H], B [S, R, E]) or None, "ranks": {same keys: [S] int32 page rank per slot}}
          or None (A pages rank-major, as the pool keeps them; "ranks" optional: without, full rank).
    Returns [N, H], identical on every device of the stage.
    """
    n, hidden = x.shape
    num_local = w_gate_up.shape[0]
    router_pair = lora.get("router") if lora is not None else None
    router_delta = (lora_delta(x, slots, *router_pair, a_rank_major=True, slot_ranks=_ranks(lora, "router"))
                    if router_pair is not None else None)
    weights, experts = route(x, router, top_k, normalize, router_delta)
    packed = pack_rows(x, slots, weights, experts, num_local=num_local, ep=ep)
    capacity = packed.send_e.shape[1]
    if ep > 1:
        recv_x, recv_e, recv_s = (jax.lax.all_to_all(a, EP, 0, 0) for a in packed[:3])
    else:
        recv_x, recv_e, recv_s = packed[:3]
    out = _expert_ffn(recv_x.reshape(-1, hidden), recv_e.reshape(-1), recv_s.reshape(-1), w_gate_up, w_down,
                      lora).reshape(ep, capacity, hidden)
    back = jax.lax.all_to_all(out, EP, 0, 0) if ep > 1 else out
    y = jax.lax.psum(combine_rows(back, packed), TP)
    if ep > 1:
        y = jax.lax.all_gather(y, EP, tiled=True)
    return y[:n]
