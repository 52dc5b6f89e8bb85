"""Collectives between the roles, and role-conditional compute, for local code inside the disaggregated step.

Every device runs the same program, so each exchange is a collective all devices execute at top level (never
inside a role branch), while compute is wrapped in `on(predicate, fn)`: a `lax.cond` whose other branch
returns zeros, so a device only pays for its own role's work.

Exchanges are XLA `ppermute`s over (role, dp) (the portable path and the reference for a remote-DMA push):
base instance d's device at expert shard e pushes to the LoRA device (stage, e) and gets the reply from it.
With dp instances every LoRA stage receives dp pushes, one ppermute each.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from meshes.axes import DP, ROLE


def on(pred, fn, *args):
    """fn(*args) where `pred` holds, zeros of the same shapes elsewhere (lax.cond: one branch runs)."""
    shapes = jax.eval_shape(fn, *args)
    return jax.lax.cond(pred, fn, lambda *_: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), *args)


def to_lora(tree, stage: int, dp: int):
    """Push each base instance's `tree` to LoRA stage `stage` (same ep coordinate). On the LoRA devices of that
    stage returns the pushes stacked over instances ([dp, ...] per leaf); zeros elsewhere."""
    got = [jax.lax.ppermute(tree, (ROLE, DP), perm=[(d, dp + stage)]) for d in range(dp)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *got)


def to_base(tree, stage: int, dp: int, instance):
    """Reply: LoRA stage `stage` sends leaf[d] of `tree` ([dp, ...] per leaf) to base instance d. On a base
    device returns its instance's part; zeros elsewhere."""
    back = [jax.lax.ppermute(jax.tree.map(lambda a, d=d: a[d], tree), (ROLE, DP), perm=[(dp + stage, d)])
            for d in range(dp)]
    if dp == 1:
        return back[0]
    return jax.tree.map(lambda *xs: jnp.stack(xs)[instance], *back)


__all__ = ["on", "to_base", "to_lora"]
