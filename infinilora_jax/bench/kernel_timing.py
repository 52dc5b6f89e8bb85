"""What one jitted call costs inside a larger program (a decode or prefill step): its device time per call.

`per_call` runs the call `iters` times in one jitted, unrolled loop and reads the kernels' busy time from a
profiler trace of one loop. Rolled loops and per-program timing mislead at these sizes: on the GPU a rolled
`fori_loop` reads its condition back to the host every iteration (~20 us, benchmarks/cond_overhead.py) and every
program launch costs tens of us, more than a decode-size LoRA call (docs/benchmarks.md, ninth session). Each
iteration passes its output through an optimization barrier and feeds one element back into the first
argument, so XLA can neither hoist the call out of the loop nor shrink it to the slice that element needs.
The element is fed back as float32 times zero: XLA folds an integer `v * 0` to 0 (and then drops the call as
dead code: integer-output calls such as group_rows timed ~0 us), but not a float one (0 * NaN is NaN).
Subtract the loop's own cost (`per_call(identity, ...)`) from each figure.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from infinilora_jax.bench import device_trace


def identity(x, *args):
    """The timing loop's own cost (the feedback write into x): time it and subtract it from each call.

    It returns one element of x, not x: returning x itself kept x alive through the optimization barrier, and
    on the H200 XLA then copied all of x before each feedback write (18 us per call at 4,096 x 4,096 bf16,
    against ~2.5 us of loop cost inside a real call's profile: twentieth session), so every figure it was
    subtracted from came out low by about the time to copy x."""
    del args
    return x.reshape(-1)[:1] * 1


def timing_loop(fn, iters: int):
    """jit of `iters` unrolled calls of fn, each depending on the one before through its first argument."""
    def loop(x, *rest):
        def body(_, x):
            out = jax.lax.optimization_barrier(fn(x, *rest))
            first = jax.tree.leaves(out)[0].reshape(-1)[0].astype(jnp.float32)
            return x.at[(0,) * x.ndim].add((first * 0).astype(x.dtype))
        return jax.lax.fori_loop(0, iters, body, x, unroll=True)
    return jax.jit(loop)


def per_call(fn, *args, iters: int, repeats: int, trace: bool = True, profile: bool = False) -> dict:
    """Per call of fn(*args): `wall_us` (median over `repeats` loops; on the GPU it carries the per-program
    launch cost spread over the calls) and `device_us` (kernel busy time per call in a profiler trace of one
    loop; None where the trace shows no device, as on CPU, or when trace=False). `profile` prints the trace's
    top kernels per call."""
    run = timing_loop(fn, iters)
    jax.block_until_ready(run(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(*args))
        times.append((time.perf_counter() - t0) / iters)
    device_us = None
    if trace:
        with device_trace.traced() as where:
            jax.block_until_ready(run(*args))
        devices = {k: v for k, v in device_trace.summarize(where(), calls=1, top=8).items()
                   if k.startswith("/device:")}
        device_us = sum(d["busy_us"] for d in devices.values()) / iters if devices else None
        if profile:
            for device, d in devices.items():
                print(f"      {device}: busy {d['busy_us'] / iters:.1f} us of {d['span_us'] / iters:.1f} us per "
                      f"call, {d['ops_per_call'] / iters:.1f} kernels per call")
                for name, us in d["top_us"]:
                    print(f"        {us / iters:8.2f} us  {name}")
    return dict(wall_us=1e6 * statistics.median(times), device_us=device_us)


def net_us(t: dict, base: dict) -> float:
    """A call's cost less the loop's own: device time where traced, else wall time."""
    if t["device_us"] is None or base["device_us"] is None:
        return max(t["wall_us"] - base["wall_us"], 0.0)
    return max(t["device_us"] - base["device_us"], 0.0)
