"""Paged attention at decode shapes: the reference against the platform's kernel backend (models/attention/).

B decode rows, each with a context of L tokens on randomly placed pages; one layer's K/V write + attention,
repeated K times inside one jitted `fori_loop` (each iteration's output is the next one's queries, so nothing is
hoisted), so host dispatch stays out of the timing. Prints the time per call, the bytes of K/V the rows must read
and the bandwidth that implies, and (--check) the largest difference between the backends' outputs.

    python benchmarks/attention.py --batch 64 --context 512,2048,8192 --dtype bfloat16 --out $OUT/attention

Backends default to the platform's (GPU: reference,gpu; TPU: reference,tpu); on CPU, --backends
reference,gpu_interpret,tpu_emulated with tiny shapes checks that the script runs.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from infinilora_jax.models.attention import AttentionBackend, layout, paged_attention, write_kv  # noqa: E402
from infinilora_jax.models.batch import RowSpec, ShapePolicy, build_step_batch  # noqa: E402

F = flags.FLAGS
flags.DEFINE_list("backends", None, "attention backends (default: reference and the platform's kernel backend)")
flags.DEFINE_integer("batch", 64, "decode rows")
flags.DEFINE_list("context", ["512", "2048", "8192"], "context lengths (tokens per row)")
flags.DEFINE_integer("heads", 32, "query heads (one device's share)")
flags.DEFINE_integer("kv_heads", 8, "")
flags.DEFINE_integer("head_dim", 128, "")
flags.DEFINE_integer("page_size", 16, "")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "")
flags.DEFINE_integer("iters", 50, "calls per timed loop")
flags.DEFINE_integer("repeats", 5, "timed loops (the median is reported)")
flags.DEFINE_bool("check", True, "compare every backend's output with the first one's")
flags.DEFINE_string("out", None, "write <out>.json")


def decode_step(batch_size: int, context: int, page_size: int, rng):
    """A decode StepBatch (each row's new token at position context - 1) over shuffled pages."""
    pages_per_row = -(-context // page_size)
    num_pages = batch_size * pages_per_row + 1
    order = rng.permutation(np.arange(1, num_pages))
    rows = [RowSpec([1], context - 1, 0, order[b * pages_per_row:(b + 1) * pages_per_row].tolist())
            for b in range(batch_size)]
    policy = ShapePolicy(page_size, num_pages, max_rows=batch_size, max_prefill_rows=1, max_pages=pages_per_row,
                         max_tokens=batch_size)
    batch, _ = build_step_batch(rows, page_size, num_pages, policy)
    return jax.tree.map(jnp.asarray, batch), num_pages


@functools.cache
def timed_loop(backend: AttentionBackend, iters: int):
    def body(_, carry):
        q, kv, batch, k, v = carry
        kv = write_kv(backend, kv, k, v, batch.cache_slots)
        return paged_attention(backend, q, kv, batch, None), kv, batch, k, v

    def run(q, kv, batch, k, v):
        q, kv, *_ = jax.lax.fori_loop(0, iters, body, (q, kv, batch, k, v))
        return q, kv

    return jax.jit(run, donate_argnums=(1,))


def measure(backend: AttentionBackend, context: int, rng) -> tuple[dict, np.ndarray]:
    dtype = jnp.dtype(F.dtype)
    batch, num_pages = decode_step(F.batch, context, F.page_size, rng)
    n = batch.num_tokens
    key = jax.random.key(0)
    kq, kk, kv_, kp = jax.random.split(key, 4)
    q = jax.random.normal(kq, (n, F.heads, F.head_dim), dtype)
    k = jax.random.normal(kk, (n, F.kv_heads, F.head_dim), dtype)
    v = jax.random.normal(kv_, (n, F.kv_heads, F.head_dim), dtype)
    pages = jax.random.normal(kp, (2, num_pages, F.page_size, F.kv_heads, F.head_dim), dtype)
    cache = layout.from_pages(backend.layout, pages[0], pages[1])
    del pages
    one = timed_loop(backend, 1)
    out, cache = one(q, cache, batch, k, v)  # compile, and the output after one call (for --check)
    out = np.asarray(out, np.float32)
    loop = timed_loop(backend, F.iters)
    _, cache = loop(q, cache, batch, k, v)  # compile
    jax.block_until_ready(cache)
    times = []
    for _ in range(F.repeats):
        t = time.perf_counter()
        _, cache = loop(q, cache, batch, k, v)
        jax.block_until_ready(cache)
        times.append((time.perf_counter() - t) / F.iters)
    us = 1e6 * float(np.median(times))
    kv_bytes = 2 * F.batch * context * F.kv_heads * F.head_dim * dtype.itemsize  # K and V the rows must read
    return {"backend": backend.value, "context": context, "us": us, "kv_bytes": kv_bytes,
            "gb_per_s": kv_bytes / us / 1e3}, out


def main(argv):
    del argv
    platform = jax.default_backend()
    names = F.backends or ["reference", {"tpu": "tpu", "gpu": "gpu"}.get(platform, "reference")]
    backends = [AttentionBackend(b) for b in dict.fromkeys(names)]
    print(f"  {platform}: {jax.devices()[0].device_kind}; batch {F.batch}, heads {F.heads}/{F.kv_heads}, head_dim "
          f"{F.head_dim}, page {F.page_size}, {F.dtype}; {F.iters} calls per loop, median of {F.repeats}")
    print(f"  {'context':>8} {'backend':>14} {'us/call':>10} {'K/V MB':>8} {'GB/s':>8} {'max |diff|':>11}")
    results = []
    for context in map(int, F.context):
        first = None
        for backend in backends:
            r, out = measure(backend, context, np.random.default_rng(context))
            if first is None:
                first = out
            r["max_abs_diff"] = float(np.max(np.abs(out - first))) if F.check else None
            results.append(r)
            diff = "" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2e}"
            print(f"  {context:8d} {backend.value:>14} {r['us']:10.1f} {r['kv_bytes'] / 1e6:8.1f} "
                  f"{r['gb_per_s']:8.1f} {diff:>11}", flush=True)
    if F.out:
        os.makedirs(os.path.dirname(F.out) or ".", exist_ok=True)
        with open(F.out + ".json", "w") as f:
            json.dump({"platform": platform, "device": jax.devices()[0].device_kind, "results": results,
                       "config": {k: getattr(F, k) for k in ("batch", "heads", "kv_heads", "head_dim", "page_size",
                                                             "dtype", "iters", "repeats")}}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
