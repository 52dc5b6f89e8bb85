"""Collectives between the roles, and role-conditional compute, for local code inside the disaggregated step.

Every device runs the same program, so each exchange is a collective all devices execute at top level (never
inside a role branch), while compute that only one role may run (a base GEMM, attention, a LoRA page read) sits
in a role branch: a `lax.cond`/`lax.switch` whose other branches return zeros, so a device only pays for its own
role's work. A branch costs ~24 us on GPU (XLA copies the predicate to the host and waits: measured on H200 by
benchmarks/cond_overhead.py), so the step uses at most one per segment between two collectives: `split` runs
the base side and the LoRA side of a segment in one conditional.

Exchanges are XLA `ppermute`s over (role, dp) (the portable path and the reference for a remote-DMA push):
base instance d's device at expert shard e pushes to the LoRA device (stage, e) and gets the reply from it.
With dp instances every LoRA stage receives dp pushes, one ppermute each. `INFINILORA_EXCHANGE` (or
`push.exchange_impl_override`) swaps each leaf's ppermute for a device-initiated Pallas push (push.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from infinilora_jax.disagg.push import exchange_impl, permute
from meshes.axes import DP, ROLE


def _zeros(shapes):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def on(pred, fn, *args):
    """fn(*args) where `pred` holds, zeros of the same shapes elsewhere (lax.cond: one branch runs)."""
    shapes = jax.eval_shape(fn, *args)
    return jax.lax.cond(pred, fn, lambda *_: _zeros(shapes), *args)


def split(branch, base_fn, base_args: tuple, lora_fn, lora_args: tuple, idle: bool):
    """One conditional for a segment's work of both roles: branch 0 runs base_fn(*base_args), branch 1
    lora_fn(*lora_args), branch 2 (only if `idle`: LoRA devices of other stages) neither. Returns (base_fn's
    result, lora_fn's result), zeros for the side that did not run."""
    base_shapes, lora_shapes = jax.eval_shape(base_fn, *base_args), jax.eval_shape(lora_fn, *lora_args)
    branches = [lambda b, lo: (base_fn(*b), _zeros(lora_shapes)),
                lambda b, lo: (_zeros(base_shapes), lora_fn(*lo)),
                lambda b, lo: (_zeros(base_shapes), _zeros(lora_shapes))]
    return jax.lax.switch(branch, branches[:3 if idle else 2], base_args, lora_args)


def _ppermute(tree, perm):
    """ppermute of a pytree over (role, dp): XLA's collective (one op for the tree) by default, else each leaf
    with the selected push implementation (push.py)."""
    impl = exchange_impl()
    if impl == "ppermute":
        return jax.lax.ppermute(tree, (ROLE, DP), perm=perm)
    return jax.tree.map(lambda x: permute(x, (ROLE, DP), perm, impl), tree)


def to_lora(tree, stage: int, dp: int):
    """Push each base instance's `tree` to LoRA stage `stage` (same ep coordinate). On the LoRA devices of that
    stage returns the pushes stacked over instances ([dp, ...] per leaf); zeros elsewhere."""
    got = [_ppermute(tree, [(d, dp + stage)]) for d in range(dp)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *got)


def to_base(tree, stage: int, dp: int, instance):
    """Reply: LoRA stage `stage` sends leaf[d] of `tree` ([dp, ...] per leaf) to base instance d. On a base
    device returns its instance's part; zeros elsewhere."""
    back = [_ppermute(jax.tree.map(lambda a, d=d: a[d], tree), [(dp + stage, d)])
            for d in range(dp)]
    if dp == 1:
        return back[0]
    return jax.tree.map(lambda *xs: jnp.stack(xs)[instance], *back)


__all__ = ["on", "split", "to_base", "to_lora"]
