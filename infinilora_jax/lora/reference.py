"""Reference multi-LoRA math in pure JAX: the definition every kernel is checked against.

Every token carries an adapter slot; slot 0 means "no adapter" and its pool rows are zero. Adapter scaling
(alpha / r, or alpha / sqrt(r) with rsLoRA) is folded into B when an adapter is loaded, so the delta is plainly
`(x @ A[slot]) @ B[slot]`. Ranks below the pool's rank R are zero-padded, which leaves the result exact.

This gathers one A and one B per token (memory O(tokens * in * R)): it is the reference, not the fast path.
It is also what the engine runs at decode sizes on GPUs (pallas_kernels/dispatch.py), so the shrink's form is
selectable for measurement (`SHRINK`, a trace-time choice: `SHRINK.use(...)` or INFINILORA_LORA_SHRINK) = einsum
(default), mulsum (a float32 product and a sum) or batched (a dot_general batched over rows);
benchmarks/lora_expand_forms.py times them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from infinilora_jax.trace_choice import TraceTimeChoice

SHRINK_ENV = "INFINILORA_LORA_SHRINK"
SHRINK_FORMS = ("einsum", "mulsum", "batched")
SHRINK = TraceTimeChoice("LoRA shrink form", SHRINK_ENV, SHRINK_FORMS, "einsum", "reference.SHRINK.use")


def _shrink(x: jax.Array, a: jax.Array, a_rank_major: bool) -> jax.Array:
    """x [N, D_in] against each row's gathered A pages ([N, R, D_in] rank-major, else [N, D_in, R]) -> [N, R]
    float32, in the form `SHRINK` selects (rank-minor pages: always the einsum)."""
    form = SHRINK.selected() if a_rank_major else "einsum"
    if form == "mulsum":
        return jnp.sum(a.astype(jnp.float32) * x[:, None, :].astype(jnp.float32), axis=-1)
    if form == "batched":
        return jax.lax.dot_general(a, x[:, :, None], (((2,), (1,)), ((0,), (0,))),
                                   preferred_element_type=jnp.float32)[..., 0]
    return jnp.einsum(_shrink_spec(a_rank_major, "n"), x, a, preferred_element_type=jnp.float32)


def add_delta(y: jax.Array, delta: jax.Array) -> jax.Array:
    """y + delta computed in float32 and rounded once to y.dtype."""
    return (y.astype(jnp.float32) + delta.reshape(y.shape)).astype(y.dtype)


def _shrink_spec(a_rank_major: bool, batch: str) -> str:
    """einsum of x rows with gathered A pages: rank-minor [.., D_in, R] or rank-major [.., R, D_in]."""
    return f"{batch}i,{batch}ri->{batch}r" if a_rank_major else f"{batch}i,{batch}ir->{batch}r"


def lora_delta(x: jax.Array, slots: jax.Array, lora_a: jax.Array, lora_b: jax.Array, *,
               a_rank_major: bool = False) -> jax.Array:
    """Dense-projection LoRA delta, one adapter slot per token.

    Args:
      x: [N, D_in] activations.
      slots: [N] int32 adapter slot of each token (0 = none).
      lora_a: [S, D_in, R] A pages of every slot ([S, R, D_in] with a_rank_major, as the pool keeps them).
      lora_b: [S, R, *out] B pages of every slot (scaling folded in); `out` may be several dims.

    Returns:
      [N, *out] float32 delta (callers add it to the base output in float32 and round once, as PEFT does).
    """
    out_shape = lora_b.shape[2:]
    b = lora_b.reshape(*lora_b.shape[:2], -1)
    shrink = _shrink(x, lora_a[slots], a_rank_major)
    delta = jnp.einsum("nr,nro->no", shrink, b[slots].astype(jnp.float32))
    return delta.reshape(x.shape[0], *out_shape)


def expert_lora_delta(x: jax.Array, slots: jax.Array, experts: jax.Array, lora_a: jax.Array,
                      lora_b: jax.Array, *, a_rank_major: bool = False) -> jax.Array:
    """Per-expert LoRA delta: a row routed to expert e with adapter slot a uses A[a, e] and B[a, e].

    Args:
      x: [M, D_in] one row per (token, expert) assignment.
      slots: [M] int32 adapter slot of each row (0 = none).
      experts: [M] int32 expert of each row, local to this device's expert shard; rows with an
        out-of-range expert (padding) get a zero delta.
      lora_a: [S, E, D_in, R] ([S, E, R, D_in] with a_rank_major).
      lora_b: [S, E, R, *out] (scaling folded in).

    Returns:
      [M, *out] float32 delta.
    """
    num_experts = lora_a.shape[1]
    valid = (experts >= 0) & (experts < num_experts)
    slots = jnp.where(valid, slots, 0)
    experts = jnp.where(valid, experts, 0)
    out_shape = lora_b.shape[3:]
    b = lora_b.reshape(*lora_b.shape[:3], -1)
    shrink = _shrink(x, lora_a[slots, experts], a_rank_major)
    delta = jnp.einsum("mr,mro->mo", shrink, b[slots, experts].astype(jnp.float32))
    return delta.reshape(x.shape[0], *out_shape)


def paged_lora_delta(x: jax.Array, slots: jax.Array, experts: jax.Array | None, a_rows: jax.Array,
                     b_rows: jax.Array, table, num_experts: int = 1, b_table=None) -> jax.Array:
    """LoRA delta with pages addressed by a page table in two row arenas (pallas_kernels/layout.py).

    The page of (slot s, expert e) is rows [(start[s] + e * stride[s]) * rb, ... + nblocks[s] * rb) of both
    arenas (rb = table.rank_block): A rows are rank components of A (PEFT's lora_A rows), B rows the matching
    rank components of B (scaling folded in). The definition the TPU kernels implement.

    Args:
      x: [M, D_in] rows.
      slots: [M] int32 adapter slot of each row (slot 0 has nblocks 0: no delta).
      experts: [M] int32 local expert of each row, or None for a dense projection; rows whose expert lies
        outside [0, num_experts) (padding) get a zero delta.
      a_rows: [P, D_in] A arena; b_rows: [P, D_out] B arena (any whole-array views of buffers).
      table: a `PageTable` (start, stride, nblocks per slot; static rank_block and max_blocks).
      b_table: the B arena's table when its pages start elsewhere than A's (same stride and nblocks); None:
        `table` addresses both.

    Returns:
      [M, D_out] float32 delta.
    """
    rb, width = table.rank_block, table.max_blocks * table.rank_block
    live = slots > 0
    expert = jnp.zeros_like(slots)
    if experts is not None:
        live &= (experts >= 0) & (experts < num_experts)
        expert = jnp.where(live, experts, 0)
    slots = jnp.where(live, slots, 0)
    first = (table.start[slots] + expert * table.stride[slots]) * rb  # [M]
    r = jnp.arange(width)
    used = live[:, None] & (r[None, :] < table.nblocks[slots][:, None] * rb)  # [M, W]
    idx = jnp.where(used, first[:, None] + r[None, :], 0)
    # contract over the gathered rows' minor dim ([M, W, D_in] as gathered): on the H200 this is one gather +
    # reduction fusion, without a transpose
    shrink = _shrink(x, a_rows[idx], a_rank_major=True)
    shrink = jnp.where(used, shrink, 0.0)
    if b_table is not None:
        first = (b_table.start[slots] + expert * b_table.stride[slots]) * rb
        idx = jnp.where(used, first[:, None] + r[None, :], 0)
    # On the H200 XLA computes this batched matrix-vector product as a transpose of the gathered float32
    # [M, D_out, W] plus a reduction (0.8 ms per 8-layer decode step on the LoRA server). A sum of W scaled
    # B-row gathers avoids it but doubled CPU compile times in the tests; benchmarks/lora_expand_forms.py
    # times both forms on the GPU before choosing.
    return jnp.einsum("nr,nro->no", shrink, b_rows[idx].astype(jnp.float32))
