"""Multi-LoRA shrink and delta: the portable baselines and the dispatcher, against copy and matmul ceilings.

For the GPU machine (not run yet; a --smoke run on CPU checks the script only). Per case (T tokens spread over
`adapters` distinct adapters of a pool of `slots` slots, rank r, hidden H, bf16) it times, inside one jitted
`fori_loop` per variant (so host dispatch stays out; each iteration feeds one element of its output back into
x, so nothing is hoisted), the median over repeats of:
  shrink  x[T, H] . A[slot][H, r] -> [T, r] float32:
            gather+einsum (the reference's shrink), one-hot (x @ every slot's A, then select),
            ragged_dot (rows sorted by slot), gpu-kernel (pallas_kernels/gpu/, on GPU only)
  delta   (x . A[slot]) . B[slot] -> [T, H] float32:
            reference (lora/reference.py), dispatch (pallas_kernels.dispatch.lora_delta: on GPU the reference
            unless INFINILORA_LORA_BACKEND=gpu; on TPU the Mosaic TPU kernels), one-hot, ragged_dot,
            gpu-kernel (the Mosaic GPU kernels through the dispatcher, on GPU only)
and the ceilings measured in the same run: device copy bandwidth (read + write of a large buffer) and bf16
matmul throughput. `floor us` is the bytes each case must move (x, the distinct adapters' pages, outputs)
at the measured copy bandwidth. Every variant's output is checked against the reference (relative error).

    PYTHONPATH=. python3 benchmarks/lora_kernels.py --out $OUT/lora_kernels
    python benchmarks/lora_kernels.py --smoke       # CPU, tiny shapes: checks the script, not the numbers
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from infinilora_jax.lora import reference  # noqa: E402
from pallas_kernels import dispatch  # noqa: E402
from pallas_kernels.gpu import ops as gpu_ops  # noqa: E402
from pallas_kernels.layout import PageTable, a_rows_from_pool, padded_rank  # noqa: E402

F = flags.FLAGS
flags.DEFINE_list("cases", ["64,32,16", "256,64,16", "256,64,64", "4096,64,64"], "T,adapters,rank per case")
flags.DEFINE_integer("hidden", 4096, "H (input and output width)")
flags.DEFINE_integer("slots", 128, "adapter slots in the pool (slot 0 = none)")
flags.DEFINE_integer("iters", 50, "calls per timed loop")
flags.DEFINE_integer("repeats", 5, "timed loops per variant")
flags.DEFINE_bool("smoke", False, "tiny shapes, 2 iterations (CPU check of the script)")
flags.DEFINE_string("out", None, "write <out>.json")

DT = jnp.bfloat16


def shrink_gather(x, slots, a, b):
    del b
    return jnp.einsum("ni,nir->nr", x, a[slots], preferred_element_type=jnp.float32)


def shrink_onehot(x, slots, a, b):
    del b
    s, h, r = a.shape
    full = jnp.dot(x, jnp.swapaxes(a, 0, 1).reshape(h, s * r), preferred_element_type=jnp.float32)
    return jnp.einsum("nsr,ns->nr", full.reshape(-1, s, r), jax.nn.one_hot(slots, s, dtype=jnp.float32))


def _ragged(x, slots, w, num_slots):
    order = jnp.argsort(slots)
    sizes = jnp.bincount(slots, length=num_slots).astype(jnp.int32)
    out = jax.lax.ragged_dot(x[order], w, sizes, preferred_element_type=jnp.float32)
    return jnp.zeros_like(out).at[order].set(out)


def shrink_ragged(x, slots, a, b):
    del b
    return _ragged(x, slots, a, a.shape[0])


def delta_onehot(x, slots, a, b):
    s = shrink_onehot(x, slots, a, b)  # [T, r]
    onehot = jax.nn.one_hot(slots, a.shape[0], dtype=jnp.float32)
    per_slot = jnp.einsum("nr,ns->nsr", s, onehot).reshape(x.shape[0], -1)  # [T, S*r]
    return jnp.dot(per_slot.astype(b.dtype), b.reshape(-1, b.shape[-1]), preferred_element_type=jnp.float32)


def delta_ragged(x, slots, a, b):
    s = shrink_ragged(x, slots, a, b)
    return _ragged(s.astype(b.dtype), slots, b, a.shape[0])


def shrink_gpu_kernel(x, slots, a, b):
    """The Mosaic GPU shrink (pallas_kernels/gpu/); the A arena is built per call here (one transpose), where the
    pool should keep A rank-major (tools/gpu_lora_kernel_check.py times it without that copy)."""
    del b
    rank = a.shape[-1]
    rb = padded_rank(rank, 16)
    table = PageTable.padded(a.shape[0], 1, rb, rb)
    return gpu_ops.lora_shrink(x, slots, slots > 0, a_rows_from_pool(a, rb), table, num_experts=1)[:, :rank]


def delta_gpu_kernel(x, slots, a, b):
    return dispatch.lora_delta(x, slots, a, b, backend=dispatch.LoraBackend.GPU)


SHRINK = {"gather+einsum": shrink_gather, "one-hot": shrink_onehot, "ragged_dot": shrink_ragged}
DELTA = {"reference": reference.lora_delta, "dispatch": dispatch.lora_delta, "one-hot": delta_onehot,
         "ragged_dot": delta_ragged}
if jax.default_backend() == "gpu":  # Mosaic GPU kernels: Hopper only
    SHRINK["gpu-kernel"] = shrink_gpu_kernel
    DELTA["gpu-kernel"] = delta_gpu_kernel


def timed(fn, *args) -> float:
    """Median seconds per call of fn(*args), inside a jitted fori_loop. Each iteration adds a zero made from the
    sum of its whole output into x: a zero from one output element let XLA shrink pure-XLA variants to the
    slice that element needs. (The sum is one extra read of the output, included in the time.)"""
    def loop(x, *rest):
        def body(_, x):
            out = fn(x, *rest)
            return x.at[0, 0].add((jnp.sum(out, dtype=jnp.float32) * 0).astype(x.dtype))
        return jax.lax.fori_loop(0, F.iters, body, x)
    run = jax.jit(loop)
    jax.block_until_ready(run(*args))
    times = []
    for _ in range(F.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(*args))
        times.append((time.perf_counter() - t0) / F.iters)
    return statistics.median(times)


def _wall(run, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(run(*args))
    return time.perf_counter() - t0


def ceilings(n_bytes: int, n: int) -> tuple[float, float]:
    """(copy bytes/s, read + write; bf16 matmul flop/s)."""
    buf = jnp.ones((n_bytes // 2,), DT)
    # the whole buffer is the loop carry: every iteration reads and writes all of it
    run = jax.jit(lambda v: jax.lax.fori_loop(0, F.iters, lambda _, a: a + jnp.asarray(1, DT), v))
    jax.block_until_ready(run(buf))
    t_copy = statistics.median(_wall(run, buf) / F.iters for _ in range(F.repeats))
    m = jnp.ones((n, n), DT)
    t_mm = timed(lambda v, w: jnp.dot(v, w, preferred_element_type=jnp.float32), m, m)
    return 2 * buf.nbytes / t_copy, 2 * n ** 3 / t_mm


def make_case(rng, tokens, adapters, rank):
    h, s = F.hidden, F.slots
    a = rng.normal(size=(s, h, rank)).astype(np.float32) / np.sqrt(h)
    b = rng.normal(size=(s, rank, h)).astype(np.float32) / np.sqrt(rank)
    a[0], b[0] = 0, 0
    used = rng.choice(np.arange(1, s), size=adapters, replace=False)
    slots = rng.choice(used, size=tokens)
    x = rng.normal(size=(tokens, h)).astype(np.float32)
    return jnp.asarray(x, DT), jnp.asarray(slots, jnp.int32), jnp.asarray(a, DT), jnp.asarray(b, DT)


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def main(argv):
    del argv
    if F.smoke:
        F.hidden, F.slots, F.iters, F.repeats = 256, 16, 2, 1
        F.cases = ["8,4,16", "64,8,16"]
    print(f"  platform {jax.default_backend()}, device {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"dispatch backend {dispatch.select_backend().value}")
    copy_bw, mm = ceilings(2**30 if not F.smoke else 2**22, 8192 if not F.smoke else 256)
    print(f"  ceilings: copy {copy_bw / 1e9:.0f} GB/s (read + write), bf16 matmul {mm / 1e12:.1f} TFLOP/s")
    rng = np.random.default_rng(0)
    rows = []
    for case in F.cases:
        tokens, adapters, rank = (int(v) for v in case.split(","))
        x, slots, a, b = make_case(rng, tokens, adapters, rank)
        h = F.hidden
        page = h * rank * 2
        shrink_bytes = tokens * h * 2 + adapters * page + tokens * rank * 4
        delta_bytes = shrink_bytes + adapters * page + tokens * h * 4
        want_s, want_d = shrink_gather(x, slots, a, b), reference.lora_delta(x, slots, a, b)
        for op, variants, n_bytes, want in (("shrink", SHRINK, shrink_bytes, want_s),
                                            ("delta", DELTA, delta_bytes, want_d)):
            floor_us = 1e6 * n_bytes / copy_bw
            for name, fn in variants.items():
                try:
                    err = rel_err(jax.jit(fn)(x, slots, a, b), want)
                    us = 1e6 * timed(fn, x, slots, a, b)
                except Exception as e:  # noqa: BLE001 - a failing variant (a new kernel) must not stop the rest
                    print(f"  {op:6s} T={tokens:5d} adapters={adapters:3d} r={rank:3d}  {name:14s} FAILED: "
                          f"{type(e).__name__}: {e}")
                    rows.append(dict(op=op, tokens=tokens, adapters=adapters, rank=rank, variant=name,
                                     error=f"{type(e).__name__}: {e}"))
                    continue
                rows.append(dict(op=op, tokens=tokens, adapters=adapters, rank=rank, variant=name, us=us,
                                 floor_us=floor_us, bytes=n_bytes, rel_err=err))
                print(f"  {op:6s} T={tokens:5d} adapters={adapters:3d} r={rank:3d}  {name:14s} {us:9.1f} us  "
                      f"floor {floor_us:7.1f} us  ({us / floor_us:6.1f}x)  rel err {err:.1e}")
    if F.out:
        os.makedirs(os.path.dirname(F.out) or ".", exist_ok=True)
        with open(F.out + ".json", "w") as f:
            json.dump({"copy_bytes_per_s": copy_bw, "matmul_flops": mm, "hidden": F.hidden, "slots": F.slots,
                       "device": jax.devices()[0].device_kind, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
