"""Where a Mosaic GPU LoRA kernel's start-up cost goes: trace + lower, XLA compile, first run, by shape.

Found with it (eleventh session, H200): prefill-shaped LoRA programs took 14-19 s to compile whatever the widths,
decode-shaped ones 1-2 s; the kernels themselves ~0.6 s. The cost was XLA compiling group_rows' four scatters
(9 s at 4,096 rows) and build_units' gathers of their outputs (8 s more); group_rows now searches and sorts
instead (1.8 s for the whole prefill delta). The pieces (argsort, cumsum, searchsorted, group_rows,
build_units, the shrink kernel on prebuilt units) are timed alone to find such costs. Per case (one process,
each case a fresh jitted function):

    lower     trace + lower to StableHLO (Pallas -> Mosaic GPU MLIR, in Python)
    compile   XLA compile of the lowered program
    first     the first call (Mosaic GPU may build the kernel here, at the custom call's first execution)
    again     the same shapes through a new jitted function: what a second program with the same kernel pays
    twice     one program calling the kernels twice on different inputs of the same shapes
    run       a warm call, wall time

Cases vary D_in (the shrink's pipelined K loop), D_out (the expand's column grid), the pipeline depth and the
variant, for the dense delta (shrink + expand) and the shrink alone; the reference (gather + einsum) is timed
the same way.

    PYTHONPATH=. python benchmarks/lora_kernel_compile.py --out $OUT/lora_kernel_compile.json
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from pallas_kernels import dispatch  # noqa: E402
from pallas_kernels.gpu import ops as gpu_ops  # noqa: E402
from pallas_kernels.gpu.block_tables import GpuBlocks  # noqa: E402
from pallas_kernels.gpu.common import padded_rows  # noqa: E402
from pallas_kernels.gpu.shrink import shrink  # noqa: E402
from pallas_kernels.gpu.units import build_units  # noqa: E402
from pallas_kernels.grouping import group_rows  # noqa: E402
from pallas_kernels.layout import PageTable  # noqa: E402
from pallas_kernels.tpu.schedule import _expand_items  # noqa: E402

F = flags.FLAGS
flags.DEFINE_string("out", None, "write the rows as JSON here")
flags.DEFINE_list("cases", None, "only these case or piece names (default: all cases, then all pieces)")
flags.DEFINE_float("budget_s", 500, "stop starting cases after this many seconds")

# name: (what, rows, d_in, d_out, rank, adapters, stages, decode[, rank buckets])
CASES = {
    "ref 4096x4096": ("reference", 4096, 4096, 4096, 64, 16, 4, False),
    "shrink din1024": ("shrink", 4096, 1024, 0, 64, 16, 4, False),
    "shrink din4096": ("shrink", 4096, 4096, 0, 64, 16, 4, False),
    "shrink din14336": ("shrink", 4096, 14336, 0, 64, 16, 4, False),
    "shrink din4096 st2": ("shrink", 4096, 4096, 0, 64, 16, 2, False),
    "shrink din4096 decode": ("shrink", 256, 4096, 0, 64, 16, 4, True),
    "delta 1024x1024": ("delta", 4096, 1024, 1024, 64, 16, 4, False),
    "delta 1024x4096": ("delta", 4096, 1024, 4096, 64, 16, 4, False),
    "delta 4096x4096": ("delta", 4096, 4096, 4096, 64, 16, 4, False),
    "delta 4096x4096 decode": ("delta", 256, 4096, 4096, 64, 16, 4, True),
    # one static kernel path per rank bucket (16 / 32 / 64): what GpuBlocks.rank_buckets costs at start-up
    "delta 4096x4096 buckets": ("delta", 4096, 4096, 4096, 64, 16, 6, False, True),
    "delta 4096x4096 no buckets": ("delta", 4096, 4096, 4096, 64, 16, 6, False, False),
}


# The glue around the kernels alone, at prefill and decode row counts: name: (piece, rows)
PIECES = {f"{piece} m{m}": (piece, m) for m in (4096, 256) for piece in
          ("argsort", "cumsum", "searchsorted", "group_rows", "build_units", "shrink_kernel", "scatter_set",
           "scatter_add", "scatter_max")}


def make_piece(rng, piece, m, adapters=16, rank=64, d_in=4096):
    """(fn, args) for one piece of the GPU path's glue, or the shrink kernel alone on prebuilt units."""
    keys = jnp.asarray(rng.integers(1, adapters + 1, size=m), jnp.int32)
    table = PageTable.padded(adapters + 1, 1, rank, rank)
    if piece == "argsort":
        return (lambda k: jnp.argsort(k, stable=True)), (keys,)
    if piece == "cumsum":
        return (lambda k: jnp.cumsum(k)), (keys,)
    if piece == "searchsorted":
        return (lambda k: _expand_items(k % 3, m // 56 + adapters)), (keys,)
    # single scatters of the kinds the engine's programs still use (moe.py's inverse permutation, attention
    # metadata's per-sequence lengths): which kind cost group_rows its compile time is not yet known
    if piece == "scatter_set":
        return (lambda k: jnp.zeros_like(k).at[jnp.argsort(k)].set(jnp.arange(m, dtype=k.dtype))), (keys,)
    if piece == "scatter_add":
        return (lambda k: jnp.zeros((adapters + 1,), jnp.int32).at[k].add(1, mode="drop")), (keys,)
    if piece == "scatter_max":
        return (lambda k: jnp.zeros((adapters + 1,), jnp.int32).at[k].max(k, mode="drop")), (keys,)
    if piece == "group_rows":
        return (lambda k: group_rows(k, k > 0, num_keys=adapters + 1)), (keys,)
    if piece == "build_units":
        return (lambda k: build_units(group_rows(k, k > 0, num_keys=adapters + 1), table, num_experts=1)), (keys,)
    units = jax.jit(lambda k: build_units(group_rows(k, k > 0, num_keys=adapters + 1), table, num_experts=1))(keys)
    x = jnp.asarray(rng.normal(size=(padded_rows(m), d_in)), jnp.bfloat16)
    a = jnp.asarray(rng.normal(size=((adapters + 1) * rank, d_in)), jnp.bfloat16)
    return (lambda x, a, u: shrink(x, (a,), (u,), ranks=(rank,), ksplit=1, stages=4)), (x, a, units)


def run_piece(rng, name, spec) -> dict:
    fn, args = make_piece(rng, *spec)
    lowered, t_lower = timed(lambda: jax.jit(fn).trace(*args).lower())
    compiled, t_compile = timed(lambda: lowered.compile())
    _, t_first = timed(lambda: compiled(*args))
    print(f"{name:24s} lower {t_lower:6.2f}  compile {t_compile:6.2f}  first {t_first:6.2f}", flush=True)
    return dict(case=name, piece=spec[0], rows=spec[1], lower_s=t_lower, compile_s=t_compile, first_s=t_first)


def make_args(rng, what, rows, d_in, d_out, rank, adapters):
    s = adapters + 1
    x = jnp.asarray(rng.normal(size=(rows, d_in)), jnp.bfloat16)
    slots = jnp.asarray(rng.integers(1, s, size=rows), jnp.int32)
    a = jnp.asarray(rng.normal(size=(s, rank, d_in)) / np.sqrt(d_in), jnp.bfloat16)
    if what == "shrink":
        return (x, slots, a)
    b = jnp.asarray(rng.normal(size=(s, rank, max(d_out, 64))) / np.sqrt(rank), jnp.bfloat16)
    return (x, slots, a, b)


def make_fn(what, rank, stages, decode, buckets=False):
    blocks = GpuBlocks(stages=stages, decode_rows=(1 << 30) if decode else 0, rank_buckets=buckets)
    if what == "reference":
        return lambda x, s, a, b: dispatch.lora_delta(x, s, a, b, a_rank_major=True, backend="reference")
    if what == "delta":
        return lambda x, s, a, b: dispatch.lora_delta(x, s, a, b, a_rank_major=True, backend="gpu", blocks=blocks)

    def shrink_alone(x, s, a):
        table = PageTable.padded(a.shape[0], 1, rank, rank)
        return gpu_ops.lora_shrink(x, s, s > 0, a.reshape(-1, a.shape[-1]), table, num_experts=1, blocks=blocks)
    return shrink_alone


def timed(f):
    t0 = time.perf_counter()
    out = f()
    jax.block_until_ready(out)
    return out, time.perf_counter() - t0


def run_case(rng, name, spec) -> dict:
    what, rows, d_in, d_out, rank, adapters, stages, decode, *rest = spec
    buckets = bool(rest and rest[0])
    args = make_args(rng, what, rows, d_in, d_out, rank, adapters)
    fn = make_fn(what, rank, stages, decode, buckets)
    lowered, t_lower = timed(lambda: jax.jit(fn).trace(*args).lower())
    compiled, t_compile = timed(lambda: lowered.compile())
    _, t_first = timed(lambda: compiled(*args))
    _, t_run = timed(lambda: compiled(*args))
    # a new jitted function, same shapes: jax's own cache misses; does the kernel build again?
    fn2 = make_fn(what, rank, stages, decode, buckets)
    _, t_again = timed(lambda: jax.jit(fn2)(*args))
    # two calls in one program (different inputs, same shapes)
    args2 = make_args(rng, what, rows, d_in, d_out, rank, adapters)
    fn3 = make_fn(what, rank, stages, decode, buckets)
    both = jax.jit(lambda p, q: (fn3(*p), fn3(*q)))
    _, t_twice = timed(lambda: both(args, args2))
    row = dict(case=name, what=what, rows=rows, d_in=d_in, d_out=d_out, rank=rank, adapters=adapters,
               stages=stages, decode=decode, buckets=buckets, lower_s=t_lower, compile_s=t_compile, first_s=t_first,
               again_s=t_again, twice_s=t_twice, run_ms=1e3 * t_run)
    print(f"{name:24s} lower {t_lower:6.2f}  compile {t_compile:6.2f}  first {t_first:6.2f}  again {t_again:6.2f}"
          f"  twice {t_twice:6.2f}  run {1e3 * t_run:7.2f} ms", flush=True)
    return row


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    names = F.cases or list(CASES) + list(PIECES)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; seconds unless marked", flush=True)
    rows, t0 = [], time.perf_counter()
    for name in names:
        if time.perf_counter() - t0 > F.budget_s:
            print(f"budget spent: skipped {name}", flush=True)
            continue
        rows.append(run_piece(rng, name, PIECES[name]) if name in PIECES else run_case(rng, name, CASES[name]))
        if F.out:
            os.makedirs(os.path.dirname(F.out) or ".", exist_ok=True)
            with open(F.out, "w") as f:
                json.dump(dict(jax=jax.__version__, device=jax.devices()[0].device_kind, rows=rows), f, indent=1)


if __name__ == "__main__":
    app.run(main)
